#![allow(clippy::disallowed_methods)]
//! The Debian packages (`scripts/package-deb`, `deploy/debian/`) as an
//! administrator meets them: built, checked by lintian, installed with apt
//! on a clean `debian:bookworm-slim`, the controller started the way its
//! unit starts it, upgraded, removed and purged; how exposed the systemd
//! units are (`systemd-analyze security`); and both units run for real
//! under systemd as PID 1 (`tests/docker/systemd.Dockerfile`): started,
//! a job run in the sandbox under the agent unit's restrictions, the agent
//! drained by `systemctl stop`, the controller reloaded. The blue-green
//! switch (`deploy/blue-green/`) with its systemd runner runs there too:
//! the packaged controller switched blue -> green -> blue by the template
//! unit behind the system's nginx, under REST load, on the embedded store
//! and on Redis, and the colour that served starting again after a reboot.
//!
//! The first test's container has no init, so there the units are checked
//! with `systemd-analyze verify` and the controller is started by hand with
//! the unit's user and environment file.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hobotnica_tests::docker::{Container, Docker, docker, repo_root};
use hobotnica_tests::net::free_addr;
use hobotnica_tests::wait::{wait_for, wait_until};

/// A controller's start, store and listeners included.
const START_TIMEOUT: Duration = Duration::from_secs(60);

const UNITS: [(&str, &str); 2] = [
    ("hobotnica-controller", "hobotnica-controller.service"),
    ("hobotnica-agent", "hobotnica-agent.service"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_packages_install_upgrade_remove_and_purge_on_a_clean_system() {
    let Some(docker) = docker() else { return };
    let total = Instant::now();

    let packages = step("build the packages", || packages(docker));
    let version = version_of(&packages[0]);
    for package in packages {
        let size = std::fs::metadata(package).expect("package built").len();
        eprintln!(
            "  {:<48} {:6.1} MB",
            package.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
            size as f64 / 1e6
        );
    }
    assert_eq!(
        packages.len(),
        4,
        "controller, agent and their -dbgsym: {packages:?}"
    );

    step("lintian", || lintian(packages));
    step("the -dbgsym packages hold each binary's debug info", || {
        debug_info(packages)
    });

    let deb_dir = packages[0].parent().expect("in target/dist/deb").to_owned();
    let mount = format!("{}:/debs:ro", deb_dir.display());
    let container = Container::run(
        docker,
        "hobotnica-packages",
        &["-v", &mount, "debian:bookworm-slim", "sleep", "infinity"],
    );
    let debs = |version: &str| {
        ["hobotnica-controller", "hobotnica-agent"]
            .map(|name| format!("/debs/{name}_{version}_amd64.deb"))
    };

    step(
        "install with apt-get (and systemd, for its analyser)",
        || {
            sh(&container, "apt-get update -q");
            let [controller, agent] = debs(&version);
            sh(
                &container,
                &format!(
                    "apt-get install -y -q --no-install-recommends {controller} {agent} systemd"
                ),
            );
        },
    );

    step("check what the install made", || {
        for (path, owner, mode) in [
            ("/var/lib/hobotnica", "hobotnica:hobotnica", "700"),
            ("/var/lib/hobotnica-agent", "hobotnica:hobotnica", "700"),
            ("/etc/hobotnica/controller.env", "root:hobotnica", "640"),
            ("/etc/hobotnica/agent.env", "root:hobotnica", "640"),
            ("/usr/bin/hobotnica-controller", "root:root", "755"),
            ("/usr/bin/hobotnica-agent", "root:root", "755"),
            ("/usr/bin/hobot", "root:root", "755"),
            (
                "/lib/systemd/system/hobotnica-controller.service",
                "root:root",
                "644",
            ),
            (
                "/lib/systemd/system/hobotnica-agent.service",
                "root:root",
                "644",
            ),
        ] {
            assert_eq!(
                sh(&container, &format!("stat -c '%U:%G %a' {path}")).trim(),
                format!("{owner} {mode}"),
                "{path}"
            );
        }
        let user = sh(&container, "getent passwd hobotnica");
        assert!(
            user.ends_with(":/nonexistent:/usr/sbin/nologin\n"),
            "{user}"
        );
        let uid: u32 = user
            .split(':')
            .nth(2)
            .and_then(|id| id.parse().ok())
            .expect("a uid");
        assert!(uid < 1000, "a system user: {user}");
        for (binary, name) in [
            ("hobotnica-controller", "hobotnica-controller"),
            ("hobot", "hobot"),
            ("hobotnica-agent", "hobotnica-agent"),
        ] {
            let shown = sh(&container, &format!("{binary} --version"));
            assert!(shown.starts_with(&format!("{name} ")), "{shown}");
        }
        // Enabled for boot, as dh_installsystemd would.
        for (_, unit) in UNITS {
            sh(
                &container,
                &format!("test -L /etc/systemd/system/multi-user.target.wants/{unit}"),
            );
        }
    });

    step("systemd-analyze verify both units", || {
        let units = UNITS.map(|(_, unit)| format!("/lib/systemd/system/{unit}"));
        let output = sh(
            &container,
            &format!("systemd-analyze verify --man=no {} 2>&1", units.join(" ")),
        );
        assert!(output.trim().is_empty(), "verify complained:\n{output}");
    });

    step(
        "start the controller as its unit does; hobot reaches it",
        || {
            // The unit's user, environment file and working directory; the
            // pid is kept to stop it. Ports of the system's choosing: the
            // host's network is shared with other tests. Its log goes to the
            // container's, printed if the test fails.
            container_detached(
                docker,
                &container,
                "cd /var/lib/hobotnica && set -a && . /etc/hobotnica/controller.env && set +a \
                 && export HOBOTNICA_LISTEN=127.0.0.1:0 HOBOTNICA_GRPC_LISTEN=127.0.0.1:0 \
                 && echo $$ > /run/controller.pid \
                 && exec setpriv --reuid hobotnica --regid hobotnica --init-groups \
                 hobotnica-controller 2>/proc/1/fd/2",
            );
        },
    );
    let started = Instant::now();
    wait_until(
        START_TIMEOUT,
        "the packaged controller to answer hobot",
        || {
            // controller.json names the ports once they are bound.
            let answered = container
                .exec(&[
                    "sh",
                    "-c",
                    "test -f /var/lib/hobotnica/controller.json \
                 && hobot --data-dir /var/lib/hobotnica agents ls",
                ])
                .status
                .success();
            async move { answered }
        },
    )
    .await;
    eprintln!(
        "  the controller answered after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for generated in ["admin-token", "secret-key"] {
        assert_eq!(
            sh(
                &container,
                &format!("stat -c '%U %a' /var/lib/hobotnica/{generated}")
            )
            .trim(),
            "hobotnica 600",
            "the controller generates its {generated} in its data directory"
        );
    }
    sh(&container, "kill $(cat /run/controller.pid)");
    wait_until(START_TIMEOUT, "the controller to stop on SIGTERM", || {
        let gone = !container
            .exec(&["sh", "-c", "kill -0 $(cat /run/controller.pid)"])
            .status
            .success();
        async move { gone }
    })
    .await;

    let next = next_version(&version);
    step(&format!("upgrade {version} -> {next}"), || {
        build(docker, &["--version", &next]);
        // What the administrator changed and what the services keep must
        // survive an upgrade.
        sh(
            &container,
            "echo HOBOTNICA_LOG=debug >> /etc/hobotnica/controller.env \
             && install -o hobotnica -g hobotnica -m 0600 /dev/null /etc/hobotnica/agent-token \
             && echo hbag_0123456789abcdef > /etc/hobotnica/agent-token \
             && touch /var/lib/hobotnica-agent/kept",
        );
        let [controller, agent] = debs(&next);
        sh(&container, &format!("dpkg -i {controller} {agent}"));
        for (package, _) in UNITS {
            assert_eq!(
                sh(
                    &container,
                    &format!("dpkg-query -W -f '${{Version}}' {package}")
                ),
                next
            );
        }
        assert!(
            sh(&container, "cat /etc/hobotnica/controller.env").ends_with("HOBOTNICA_LOG=debug\n"),
            "the administrator's change to the conffile is kept"
        );
        for env in ["controller.env", "agent.env"] {
            assert_eq!(
                sh(
                    &container,
                    &format!("stat -c '%U:%G %a' /etc/hobotnica/{env}")
                )
                .trim(),
                "root:hobotnica 640"
            );
        }
        sh(
            &container,
            "test -f /var/lib/hobotnica/admin-token && test -f /var/lib/hobotnica-agent/kept",
        );
    });

    step("remove: the data and the configuration stay", || {
        sh(&container, "dpkg -r hobotnica-controller hobotnica-agent");
        sh(
            &container,
            "! test -e /usr/bin/hobotnica-controller && ! test -e /usr/bin/hobot \
             && ! test -e /usr/bin/hobotnica-agent",
        );
        sh(
            &container,
            "test -f /var/lib/hobotnica/admin-token && test -f /var/lib/hobotnica/secret-key \
             && test -f /var/lib/hobotnica-agent/kept \
             && test -f /etc/hobotnica/controller.env && test -f /etc/hobotnica/agent.env \
             && getent passwd hobotnica",
        );
    });

    step("purge the controller: the agent's user stays", || {
        sh(&container, "dpkg -P hobotnica-controller");
        sh(
            &container,
            "! test -e /var/lib/hobotnica && ! test -e /etc/hobotnica/controller.env \
             && test -f /etc/hobotnica/agent.env && getent passwd hobotnica",
        );
    });

    step("purge the agent: everything but the token is gone", || {
        sh(&container, "dpkg -P hobotnica-agent");
        sh(
            &container,
            "! test -e /var/lib/hobotnica-agent && ! test -e /etc/hobotnica/agent.env \
             && ! getent passwd hobotnica && ! getent group hobotnica \
             && test -z \"$(dpkg-statoverride --list)\" \
             && ! test -e /etc/systemd/system/multi-user.target.wants/hobotnica-agent.service",
        );
        // A secret the administrator wrote is theirs to delete.
        sh(&container, "test -f /etc/hobotnica/agent-token");
    });

    step("systemd-analyze security of the packaged units", || {
        security(packages)
    });
    eprintln!("total: {:.1} s", total.elapsed().as_secs_f64());
}

/// The image with systemd as PID 1 (`tests/docker/systemd.Dockerfile`).
const SYSTEMD_IMAGE: &str = "hobotnica-test/systemd:latest";
/// systemd's boot in the container.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// A job, from `hobot run` to its end, and an agent's drain.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// The host name of the container (its own UTS namespace: systemd must not
/// rename the host, whose network the container shares).
const HOSTNAME: &str = "hobotnica-systemd";
/// A file the draining job waits for; the sandbox sees its directory
/// read-only (HOBOTNICA_SANDBOX_RO_BIND).
const GATE: &str = "/srv/gate/open";

/// The fixture repository's Makefile: `make test` says who runs it and on
/// which host name (the sandbox has its own), whether the agent's token is
/// visible, and with GATE set waits until that file exists, so the test
/// decides when the job ends.
const FIXTURE_MAKEFILE: &str = "test:\n\
    \t@echo \"hello from $$(id -un) on $$(hostname)\"\n\
    \t@if test -e /etc/hobotnica/agent-token; then echo token visible; else echo token hidden; fi\n\
    \t@if [ -n \"$$GATE\" ]; then echo \"waiting for $$GATE\"; \
    while [ ! -e \"$$GATE\" ]; do sleep 0.1; done; fi\n\
    \t@echo done\n";

/// The packages' units under a running systemd: the controller's
/// `Type=notify` start returns once it serves and `systemctl reload` keeps it
/// serving; the agent starts under its unit's restrictions (its sandbox
/// check passes), shows its status line, runs a job in bubblewrap and, on
/// `systemctl stop`, lets a running job finish before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_packages_units_start_run_a_job_drain_and_reload_under_systemd() {
    let Some(docker) = docker() else { return };
    let total = Instant::now();
    let packages = step("build the packages", || packages(docker));
    let version = version_of(&packages[0]);
    step("build the systemd image", || {
        docker.build_test_image(SYSTEMD_IMAGE, "systemd.Dockerfile");
        eprintln!(
            "  {SYSTEMD_IMAGE}: {:.1} MB",
            docker.image_size(SYSTEMD_IMAGE) as f64 / 1e6
        );
    });

    let deb_dir = packages[0].parent().expect("in target/dist/deb").to_owned();
    let container = step("boot systemd as the container's PID 1", || {
        boot(
            docker,
            "hobotnica-systemd",
            &format!("{}:/debs:ro", deb_dir.display()),
        )
    });
    let _journal = JournalOnFailure(&container);
    wait_booted(&container).await;

    step("install both packages (their start held back)", || {
        // The postinst starts each service at once, the controller on its
        // default ports, which the host (its network is shared) may use;
        // policy-rc.d holds the starts back until the ports are set.
        sh(
            &container,
            "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d \
             && chmod +x /usr/sbin/policy-rc.d",
        );
        sh(
            &container,
            &format!(
                "dpkg -i /debs/hobotnica-controller_{version}_amd64.deb \
                 /debs/hobotnica-agent_{version}_amd64.deb"
            ),
        );
        sh(&container, "rm /usr/sbin/policy-rc.d");
        for (_, unit) in UNITS {
            assert_eq!(show(&container, unit, "UnitFileState"), "enabled", "{unit}");
            assert_eq!(show(&container, unit, "Type"), "notify", "{unit}");
        }
    });

    let rest = free_addr();
    let grpc = free_addr();
    step("configure: free ports, a pool token both read", || {
        // As an administrator would: the env files' own lines, and a token
        // that never appears in a command line.
        sh(
            &container,
            &format!(
                "sed -i -e 's|^HOBOTNICA_LISTEN=.*|HOBOTNICA_LISTEN={rest}|' \
                 -e 's|^HOBOTNICA_GRPC_LISTEN=.*|HOBOTNICA_GRPC_LISTEN={grpc}|' \
                 -e 's|^#HOBOTNICA_AGENT_TOKEN_FILE=|HOBOTNICA_AGENT_TOKEN_FILE=|' \
                 /etc/hobotnica/controller.env \
                 && sed -i -e 's|^HOBOTNICA_CONTROLLER=.*|HOBOTNICA_CONTROLLER=http://{grpc}|' \
                 -e 's|^#HOBOTNICA_SANDBOX_RO_BIND=.*|HOBOTNICA_SANDBOX_RO_BIND=/srv/gate|' \
                 /etc/hobotnica/agent.env \
                 && install -o hobotnica -g hobotnica -m 0600 /dev/null /etc/hobotnica/agent-token \
                 && od -An -N24 -tx1 /dev/urandom | tr -d ' \\n' > /etc/hobotnica/agent-token \
                 && mkdir -p /srv/gate"
            ),
        );
        for (env, line) in [
            (
                "controller.env",
                "HOBOTNICA_AGENT_TOKEN_FILE=/etc/hobotnica/agent-token",
            ),
            ("agent.env", "HOBOTNICA_SANDBOX_RO_BIND=/srv/gate"),
        ] {
            sh(
                &container,
                &format!("grep -qx '{line}' /etc/hobotnica/{env}"),
            );
        }
    });

    step(
        "systemctl start hobotnica-controller: returns once it serves",
        || {
            let started = Instant::now();
            sh(
                &container,
                "timeout 60 systemctl start hobotnica-controller",
            );
            eprintln!("  READY=1 after {:.2} s", started.elapsed().as_secs_f64());
            assert_eq!(
                show(&container, "hobotnica-controller", "ActiveState"),
                "active"
            );
            // Ready means serving: hobot works at once, with the admin token
            // the controller generated.
            let agents = sh(&container, "hobot --data-dir /var/lib/hobotnica agents ls");
            assert!(agents.starts_with("NAME"), "{agents}");
        },
    );

    step(
        "systemctl start hobotnica-agent: its sandbox check passes",
        || {
            let started = Instant::now();
            sh(&container, "timeout 60 systemctl start hobotnica-agent");
            eprintln!("  READY=1 after {:.2} s", started.elapsed().as_secs_f64());
            assert_eq!(show(&container, "hobotnica-agent", "ActiveState"), "active");
        },
    );
    let connected = format!("Status: \"connected to http://{grpc}; 0 job(s) running\"");
    wait_until(
        JOB_TIMEOUT,
        "systemctl status to show the agent connected",
        || {
            let shown =
                sh(&container, "systemctl status --no-pager hobotnica-agent").contains(&connected);
            async move { shown }
        },
    )
    .await;
    let agents = sh(&container, "hobot --data-dir /var/lib/hobotnica agents ls");
    assert!(
        agents.lines().any(|line| line.starts_with(HOSTNAME)),
        "the agent registered under the host name:\n{agents}"
    );

    step("a job runs in the sandbox under the agent's unit", || {
        sh_with(
            &container,
            "mkdir -p /srv/src && cd /srv/src && git init -q -b main \
             && printf %s \"$1\" > Makefile && git add Makefile \
             && git -c user.name=Test -c user.email=test@example.com commit -q -m fixture \
             && git clone -q --bare /srv/src /srv/fixture.git \
             && chown -R hobotnica:hobotnica /srv/fixture.git",
            &[FIXTURE_MAKEFILE],
        );
        sh(
            &container,
            "hobot --data-dir /var/lib/hobotnica repos add fixture file:///srv/fixture.git --branch main",
        );
        let started = Instant::now();
        let output = container.exec(&[
            "timeout",
            "60",
            "hobot",
            "--data-dir",
            "/var/lib/hobotnica",
            "run",
            "fixture",
            "test",
            "--follow",
        ]);
        check(&output, "hobot run fixture test --follow");
        eprintln!(
            "  the job took {:.2} s from hobot run",
            started.elapsed().as_secs_f64()
        );
        let log = String::from_utf8_lossy(&output.stdout);
        for line in [
            "hello from hobotnica on hobotnica-job",
            "token hidden",
            "done",
        ] {
            assert!(
                log.lines().any(|l| l == line),
                "{line:?} in the job's log:\n{log}"
            );
        }
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(job_succeeded(&said), "{said}");
    });

    eprintln!("step: systemctl stop hobotnica-agent lets the running job finish");
    let mut follow = docker
        .command()
        .args([
            "exec",
            container.name(),
            "timeout",
            "120",
            "hobot",
            "--data-dir",
            "/var/lib/hobotnica",
            "run",
            "fixture",
            "test",
            "--env",
            &format!("GATE={GATE}"),
            "--follow",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker exec hobot run starts");
    let lines = follow_lines(follow.stdout.take().expect("piped stdout"));
    wait_for_line(&lines, &format!("waiting for {GATE}"), JOB_TIMEOUT);
    let stopping = Instant::now();
    sh(&container, "systemctl stop --no-block hobotnica-agent");
    wait_until(JOB_TIMEOUT, "the agent to say it drains", || {
        let journal = sh(
            &container,
            "journalctl --no-pager -o cat -u hobotnica-agent",
        );
        async move { journal.contains("waiting for running jobs") }
    })
    .await;
    assert_eq!(
        show(&container, "hobotnica-agent", "ActiveState"),
        "deactivating"
    );
    assert_eq!(
        show(&container, "hobotnica-agent", "StatusText"),
        "draining: waiting for 1 job(s)"
    );
    sh(&container, &format!("touch {GATE}"));
    wait_until(
        JOB_TIMEOUT,
        "the agent to stop once its job is done",
        || {
            let state = show(&container, "hobotnica-agent", "ActiveState");
            async move { state == "inactive" }
        },
    )
    .await;
    eprintln!(
        "  stopped {:.2} s after systemctl stop (the job ran until the gate opened)",
        stopping.elapsed().as_secs_f64()
    );
    assert_eq!(show(&container, "hobotnica-agent", "Result"), "success");
    let output = follow.wait_with_output().expect("hobot run ends");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && job_succeeded(&said),
        "the drained job succeeds ({}): {said}",
        output.status
    );
    wait_for_line(&lines, "done", JOB_TIMEOUT);
    let journal = sh(
        &container,
        "journalctl --no-pager -o cat -u hobotnica-agent",
    );
    assert!(
        journal.contains("all jobs finished; shutting down"),
        "{journal}"
    );

    step(
        "systemctl reload hobotnica-controller: it keeps serving",
        || {
            let pid = show(&container, "hobotnica-controller", "MainPID");
            sh(&container, "systemctl reload hobotnica-controller");
            // SIGHUP has been delivered when reload returns: a controller it
            // ended refuses the next request.
            let answered = container
                .exec(&["hobot", "--data-dir", "/var/lib/hobotnica", "agents", "ls"])
                .status
                .success();
            let state = sh(
                &container,
                "systemctl show -p ActiveState -p MainPID -p ExecMainCode -p ExecMainStatus \
             hobotnica-controller",
            );
            assert!(
                answered
                    && state.contains("ActiveState=active\n")
                    && state.contains(&format!("MainPID={pid}\n")),
                "the controller (pid {pid}) must survive systemctl reload (SIGHUP), \
             TLS or not; hobot answered: {answered}\n{state}"
            );
        },
    );

    step("systemctl stop hobotnica-controller", || {
        let started = Instant::now();
        sh(&container, "timeout 60 systemctl stop hobotnica-controller");
        eprintln!("  stopped in {:.2} s", started.elapsed().as_secs_f64());
        assert_eq!(
            show(&container, "hobotnica-controller", "Result"),
            "success"
        );
    });
    eprintln!("total: {:.1} s", total.elapsed().as_secs_f64());
}

/// Where the test puts `deploy/blue-green/` in the blue-green container.
const BLUE_GREEN_DIR: &str = "/srv/blue-green";
/// The switch's state directory, which the template unit names.
const BLUE_GREEN_STATE: &str = "/var/lib/hobotnica-blue-green";
/// One switch, whole.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(120);

/// The store both colours share in [`blue_green_under_systemd`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BlueGreenStore {
    /// The embedded store: the new colour waits for the old one to hand it
    /// over.
    Embedded,
    /// A Redis on the host (the network is shared): both serve at once.
    Redis,
}

/// The blue-green switch (`deploy/blue-green/switch`) with its systemd
/// runner, embedded store: the template unit starts each colour as user
/// hobotnica under its hardening; the first switch starts blue, the next
/// ones hand over to green and back to blue while REST requests go through
/// nginx, and none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switch_under_systemd_embedded_store() {
    blue_green_under_systemd(BlueGreenStore::Embedded).await;
}

/// The same with Redis: both colours serve at once during a switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switch_under_systemd_redis_store() {
    blue_green_under_systemd(BlueGreenStore::Redis).await;
}

async fn blue_green_under_systemd(store: BlueGreenStore) {
    let Some(docker) = docker() else { return };
    let total = Instant::now();
    let packages = step("build the packages", || packages(docker));
    let version = version_of(&packages[0]);
    step("build the systemd image", || {
        docker.build_test_image(SYSTEMD_IMAGE, "systemd.Dockerfile");
    });
    let redis = match store {
        BlueGreenStore::Embedded => None,
        BlueGreenStore::Redis => Some(hobotnica_tests::redis::RedisServer::start().await),
    };

    let deb_dir = packages[0].parent().expect("in target/dist/deb").to_owned();
    let name = match store {
        BlueGreenStore::Embedded => "hobotnica-blue-green-embedded",
        BlueGreenStore::Redis => "hobotnica-blue-green-redis",
    };
    let container = step("boot systemd as the container's PID 1", || {
        boot(docker, name, &format!("{}:/debs:ro", deb_dir.display()))
    });
    let _journal = JournalOnFailure(&container);
    wait_booted(&container).await;

    step(
        "install the controller package (its own unit disabled)",
        || {
            sh(
                &container,
                "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d \
             && chmod +x /usr/sbin/policy-rc.d",
            );
            sh(
                &container,
                &format!("dpkg -i /debs/hobotnica-controller_{version}_amd64.deb"),
            );
            sh(
                &container,
                "rm /usr/sbin/policy-rc.d && systemctl disable hobotnica-controller",
            );
        },
    );

    let http = free_addr();
    let grpc = free_addr();
    let colours = [free_addr(), free_addr(), free_addr(), free_addr()];
    step(
        "install the switch, the template unit, the nginx site and the configuration",
        || {
            let source = repo_root().join("deploy/blue-green");
            docker.run(&[
                "cp",
                &source.display().to_string(),
                &format!("{}:{BLUE_GREEN_DIR}", container.name()),
            ]);
            let site = sh(&container, &format!("cat {BLUE_GREEN_DIR}/hobotnica.conf"));
            for shipped in ["listen 127.0.0.1:8080;", "listen 127.0.0.1:8081 http2;"] {
                assert!(site.contains(shipped), "the site has {shipped:?}");
            }
            let mut settings = vec![
                "s|^HOBOTNICA_BG_RUNNER=.*|HOBOTNICA_BG_RUNNER=systemd|".to_owned(),
                format!(
                    "s|^HOBOTNICA_BG_BLUE_HTTP=.*|HOBOTNICA_BG_BLUE_HTTP={}|",
                    colours[0]
                ),
                format!(
                    "s|^HOBOTNICA_BG_BLUE_GRPC=.*|HOBOTNICA_BG_BLUE_GRPC={}|",
                    colours[1]
                ),
                format!(
                    "s|^HOBOTNICA_BG_GREEN_HTTP=.*|HOBOTNICA_BG_GREEN_HTTP={}|",
                    colours[2]
                ),
                format!(
                    "s|^HOBOTNICA_BG_GREEN_GRPC=.*|HOBOTNICA_BG_GREEN_GRPC={}|",
                    colours[3]
                ),
                format!("s|^#HOBOTNICA_PUBLIC_URL=.*|HOBOTNICA_PUBLIC_URL=http://{http}|"),
            ];
            if redis.is_some() {
                // Controllers sharing a Redis share the admin token too.
                settings.push(
                    "s|^#HOBOTNICA_ADMIN_TOKEN_FILE=|HOBOTNICA_ADMIN_TOKEN_FILE=|".to_owned(),
                );
                settings
                    .push("s|^#HOBOTNICA_REDIS_URL_FILE=|HOBOTNICA_REDIS_URL_FILE=|".to_owned());
                settings
                    .push("s|^#HOBOTNICA_SECRET_KEY_FILE=|HOBOTNICA_SECRET_KEY_FILE=|".to_owned());
            }
            let settings: Vec<String> = settings.iter().map(|s| format!("-e '{s}'")).collect();
            sh(
                &container,
                &format!(
                    "install -m 0644 {BLUE_GREEN_DIR}/hobotnica-controller@.service /etc/systemd/system/ \
                     && systemctl daemon-reload \
                     && sed -e 's|listen 127.0.0.1:8080;|listen {http};|' \
                     -e 's|listen 127.0.0.1:8081 http2;|listen {grpc} http2;|' \
                     {BLUE_GREEN_DIR}/hobotnica.conf > /etc/nginx/conf.d/hobotnica.conf \
                     && install -m 0600 /dev/null /etc/hobotnica/blue-green.env \
                     && sed {} {BLUE_GREEN_DIR}/blue-green.env > /etc/hobotnica/blue-green.env",
                    settings.join(" ")
                ),
            );
            if let Some(redis) = &redis {
                sh_with(
                    &container,
                    "install -o hobotnica -g hobotnica -m 0600 /dev/null /etc/hobotnica/redis-url \
                     && echo \"$1\" > /etc/hobotnica/redis-url \
                     && install -o hobotnica -g hobotnica -m 0600 /dev/null /etc/hobotnica/secret-key \
                     && od -An -N32 -tx1 /dev/urandom | tr -d ' \\n' > /etc/hobotnica/secret-key \
                     && install -o hobotnica -g hobotnica -m 0600 /dev/null /etc/hobotnica/admin-token \
                     && printf 'hbt_admin_%s\\n' \"$(od -An -N24 -tx1 /dev/urandom | tr -d ' \\n')\" \
                     > /etc/hobotnica/admin-token",
                    &[&redis.url()],
                );
            }
            let config = sh(&container, "cat /etc/hobotnica/blue-green.env");
            assert!(
                config.contains("\nHOBOTNICA_BG_RUNNER=systemd\n")
                    && config.contains(&format!("\nHOBOTNICA_BG_GREEN_GRPC={}\n", colours[3])),
                "{config}"
            );
            // A repository for the data that must survive the switches.
            sh_with(
                &container,
                "mkdir -p /srv/src && cd /srv/src && git init -q -b main \
                 && printf %s \"$1\" > Makefile && git add Makefile \
                 && git -c user.name=Test -c user.email=test@example.com commit -q -m fixture \
                 && git clone -q --bare /srv/src /srv/fixture.git \
                 && chown -R hobotnica:hobotnica /srv/fixture.git",
                &[FIXTURE_MAKEFILE],
            );
        },
    );

    let first = step("switch: the first start, blue", || {
        switch(docker, container.name(), &[])
    });
    assert!(
        first.contains("nginx is not running") && first.contains("done: blue serves"),
        "{first}"
    );
    step("systemctl enable --now nginx: it serves blue", || {
        sh(&container, "timeout 60 systemctl enable --now nginx");
    });
    let token_file = match store {
        // Generated by the first controller.
        BlueGreenStore::Embedded => "/var/lib/hobotnica/admin-token",
        BlueGreenStore::Redis => "/etc/hobotnica/admin-token",
    };
    let token = sh(&container, &format!("cat {token_file}"))
        .trim()
        .to_owned();
    let api = hobotnica_tests::Api::new(format!("http://{http}"), Some(&token));
    wait_until(START_TIMEOUT, "blue to answer through nginx", || {
        let api = api.clone();
        async move {
            api.try_raw(reqwest::Method::GET, "/readyz", None, &[])
                .await
                .is_ok_and(|response| response.status == 200)
        }
    })
    .await;
    check_colour_serves(&container, "blue", None);

    let registered = api
        .send_json(
            reqwest::Method::POST,
            "/api/v1/repos",
            &serde_json::json!({ "name": "fixture", "git_url": "file:///srv/fixture.git" }),
        )
        .await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let repo_path = registered
        .location
        .clone()
        .expect("the repository's Location");
    let repo = repo_path
        .strip_prefix("/api/v1/repos/")
        .expect("/api/v1/repos/owner/name")
        .to_owned();
    let queued = api.run_target(&repo, "test").await;

    let mut printed = false;
    for (new, old) in [("green", "blue"), ("blue", "green")] {
        let load = BlueGreenLoad::start(api.clone(), repo.clone());
        let started = Instant::now();
        let name = container.name().to_owned();
        let output = tokio::task::spawn_blocking(move || switch(docker, &name, &[]))
            .await
            .expect("the switch's thread");
        let took = started.elapsed();
        let load = load.stop().await;
        eprintln!(
            "switch {old} -> {new} ({store:?} store) took {:.2} s; {} requests through nginx meanwhile",
            took.as_secs_f64(),
            load.requests
        );
        if !printed {
            eprintln!("  the switch said:\n{output}");
            printed = true;
        }
        assert!(
            output.contains(&format!("done: {new} serves")) && !output.contains("warning"),
            "{output}"
        );
        assert!(
            load.failures.is_empty(),
            "every request through nginx must succeed during the switch {old} -> {new}:\n{}\nthe switch said:\n{output}",
            load.failures.join("\n")
        );
        assert!(load.requests > 0, "the load ran");
        check_colour_serves(&container, new, Some(old));
        // What was written before, and during, the switch is still there.
        let repo_now = api.get_json(&repo_path).await;
        assert_eq!(repo_now["git_url"], "file:///srv/fixture.git", "{repo_now}");
        assert_eq!(api.job(queued.id).await.id, queued.id);
        for id in load.jobs {
            assert_eq!(
                api.job(id).await.id,
                id,
                "job {id} queued during the switch"
            );
        }
    }

    step("reboot: the colour that served starts again", || {
        docker.run(&["restart", container.name()]);
    });
    wait_booted(&container).await;
    wait_until(
        START_TIMEOUT,
        "blue to answer through nginx after the reboot",
        || {
            let api = api.clone();
            async move {
                api.try_raw(reqwest::Method::GET, "/readyz", None, &[])
                    .await
                    .is_ok_and(|response| response.status == 200)
            }
        },
    )
    .await;
    check_colour_serves(&container, "blue", Some("green"));
    assert_eq!(api.job(queued.id).await.id, queued.id);

    step("switch --stop: blue stops", || {
        switch(docker, container.name(), &["--stop"]);
        assert_eq!(
            show(&container, "hobotnica-controller@blue", "ActiveState"),
            "inactive"
        );
    });
    drop(redis);
    eprintln!("total: {:.1} s", total.elapsed().as_secs_f64());
}

/// Runs `deploy/blue-green/switch` in the container (as root, the
/// configuration in /etc/hobotnica/blue-green.env) to the packaged binary,
/// or with `args` instead; what it printed.
///
/// # Panics
/// When it fails or takes longer than [`SWITCH_TIMEOUT`].
fn switch(docker: &Docker, container: &str, args: &[&str]) -> String {
    let timeout = SWITCH_TIMEOUT.as_secs().to_string();
    let script = format!("{BLUE_GREEN_DIR}/switch");
    let mut argv = vec!["exec", container, "timeout", &timeout, &script];
    if args.is_empty() {
        argv.push("/usr/bin/hobotnica-controller");
    } else {
        argv.extend_from_slice(args);
    }
    let output = docker.try_run(&argv);
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "switch {} failed ({}):\n{printed}",
        argv[4..].join(" "),
        output.status
    );
    printed
}

/// After a switch to `new`: its unit is active and `switch --status` names
/// it; `old`'s unit stopped cleanly; the controller runs as user hobotnica
/// with the unit's hardening (no privileges to gain, no capabilities, a
/// seccomp filter).
fn check_colour_serves(container: &Container, new: &str, old: Option<&str>) {
    let unit = format!("hobotnica-controller@{new}");
    assert_eq!(
        sh(container, &format!("systemctl is-active {unit}")).trim(),
        "active"
    );
    if let Some(old) = old {
        let old_unit = format!("hobotnica-controller@{old}");
        assert_eq!(
            (
                show(container, &old_unit, "ActiveState"),
                show(container, &old_unit, "Result")
            ),
            ("inactive".to_owned(), "success".to_owned()),
            "{old_unit} stopped cleanly"
        );
    }
    let pid = show(container, &unit, "MainPID");
    let status = switch_status(container);
    assert!(
        status.starts_with(&format!("{new}: pid {pid}, hobotnica-controller ")),
        "{status}"
    );
    assert_eq!(
        sh(container, &format!("readlink /proc/{pid}/exe")).trim(),
        format!("{BLUE_GREEN_STATE}/{new}/hobotnica-controller"),
        "{unit} runs the binary the switch installed for {new}"
    );
    let uid = sh(container, "id -u hobotnica").trim().to_owned();
    let proc_status = sh(container, &format!("cat /proc/{pid}/status"));
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}:")))
            .map(|value| value.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status:\n{proc_status}"))
    };
    assert_eq!(
        field("Uid"),
        [uid.as_str(); 4].join(" "),
        "{unit} runs as hobotnica"
    );
    assert_eq!(field("NoNewPrivs"), "1", "{unit}: NoNewPrivileges=yes");
    assert_eq!(
        field("CapEff"),
        "0000000000000000",
        "{unit}: no capabilities"
    );
    assert_eq!(
        field("CapBnd"),
        "0000000000000000",
        "{unit}: CapabilityBoundingSet="
    );
    assert_eq!(field("Seccomp"), "2", "{unit}: SystemCallFilter=");
    eprintln!("  {status}");
}

/// `switch --status`.
fn switch_status(container: &Container) -> String {
    sh(container, &format!("{BLUE_GREEN_DIR}/switch --status"))
        .trim()
        .to_owned()
}

/// REST reads and writes through nginx while a switch runs, until stopped.
struct BlueGreenLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: tokio::task::JoinSet<LoadDone>,
}

/// What one task of the load did.
#[derive(Default)]
struct LoadDone {
    requests: usize,
    failures: Vec<String>,
    jobs: Vec<u64>,
}

impl BlueGreenLoad {
    /// Two readers (the repository, the job list) and a writer queueing a
    /// job every 100 ms.
    fn start(api: hobotnica_tests::Api, repo: String) -> BlueGreenLoad {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for (method, path, pause) in [
            (reqwest::Method::GET, format!("/api/v1/repos/{repo}"), 20),
            (reqwest::Method::GET, "/api/v1/jobs?limit=5".to_owned(), 20),
            (
                reqwest::Method::POST,
                format!("/api/v1/repos/{repo}/jobs"),
                100,
            ),
        ] {
            let (api, stop) = (api.clone(), stop.clone());
            tasks.spawn(async move {
                let mut done = LoadDone::default();
                let body = serde_json::json!({ "target": "test" }).to_string();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let body = (method == reqwest::Method::POST).then_some(body.as_bytes());
                    let answer = api.try_raw(method.clone(), &path, body, &[]).await;
                    done.requests += 1;
                    match answer {
                        Ok(response) if response.status == 200 => {}
                        Ok(response) if response.status == 202 => {
                            done.jobs
                                .push(response.json()["id"].as_u64().expect("a job id"));
                        }
                        Ok(response) => done.failures.push(format!(
                            "{method} {path}: {} {}",
                            response.status,
                            response.text()
                        )),
                        Err(err) => done.failures.push(format!("{method} {path}: {err:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                done
            });
        }
        BlueGreenLoad { stop, tasks }
    }

    /// Stops the load; what it did, all tasks together.
    async fn stop(mut self) -> LoadDone {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = LoadDone::default();
        while let Some(done) = self.tasks.join_next().await {
            let done = done.expect("a load task");
            all.requests += done.requests;
            all.failures.extend(done.failures);
            all.jobs.extend(done.jobs);
        }
        all
    }
}

/// Starts the systemd image with what systemd as PID 1 needs in a container
/// of the tests' engine, where `--privileged` cannot be used (the host's
/// capability bounding set lacks CAP_SYS_RESOURCE): CAP_SYS_ADMIN (mounts,
/// namespaces) and CAP_SYS_PTRACE (PrivateUsers= writes a child's uid_map)
/// and no other capability beyond Docker's defaults (none to change the
/// shared network or clock); no seccomp filter (systemd installs each unit's
/// own); an unmasked /proc (bwrap mounts a new /proc for every job, which
/// the kernel refuses while parts of /proc are covered); the cgroup tree
/// writable (systemd makes a cgroup per unit, under the container's own);
/// its own host name.
fn boot(docker: &'static Docker, name: &str, debs_mount: &str) -> Container {
    Container::run(
        docker,
        name,
        &[
            "--hostname",
            HOSTNAME,
            "--cap-add",
            "SYS_ADMIN",
            "--cap-add",
            "SYS_PTRACE",
            "--security-opt",
            "seccomp=unconfined",
            "--security-opt",
            "systempaths=unconfined",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/run/lock",
            "--tmpfs",
            "/tmp",
            "--cgroupns",
            "host",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            "-v",
            debs_mount,
            SYSTEMD_IMAGE,
        ],
    )
}

/// Whether `hobot run --follow` said its job succeeded (`job N succeeded`
/// on stderr).
fn job_succeeded(said: &str) -> bool {
    said.lines()
        .any(|line| line.starts_with("job ") && line.ends_with(" succeeded"))
}

/// Waits until systemd has booted the container, with no unit failed.
async fn wait_booted(container: &Container) {
    let booted = Instant::now();
    let state = wait_for(BOOT_TIMEOUT, "systemd to finish booting", || {
        let output = container.exec(&["systemctl", "is-system-running"]);
        let state = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        let done = !matches!(state.as_str(), "" | "initializing" | "starting");
        async move { done.then_some(state) }
    })
    .await;
    assert_eq!(
        state,
        "running",
        "no unit may fail in the container:\n{}",
        sh(container, "systemctl --failed --no-pager")
    );
    eprintln!("  booted in {:.1} s", booted.elapsed().as_secs_f64());
}

/// Prints the container's journal when the test fails (systemd logs there,
/// not to the container's output).
struct JournalOnFailure<'c>(&'c Container);

impl Drop for JournalOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let output = self.0.exec(&["journalctl", "-b", "--no-pager"]);
            eprintln!(
                "--- journal of {} ---\n{}",
                self.0.name(),
                String::from_utf8_lossy(&output.stdout)
            );
        }
    }
}

/// A unit's property (`systemctl show -p <property> --value`).
fn show(container: &Container, unit: &str, property: &str) -> String {
    sh(
        container,
        &format!("systemctl show -p {property} --value {unit}"),
    )
    .trim()
    .to_owned()
}

/// The lines of a running command's output, as they come.
fn follow_lines(output: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    received
}

/// Waits until `lines` brings `expected`.
///
/// # Panics
/// When `timeout` passes first or the output ends, with what came.
fn wait_for_line(lines: &mpsc::Receiver<String>, expected: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line == expected => return,
            Ok(line) => seen.push(line),
            Err(err) => panic!(
                "no line {expected:?} ({err}); the output so far:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// Runs `what`, printing how long it took.
fn step<T>(name: &str, what: impl FnOnce() -> T) -> T {
    eprintln!("step: {name}");
    let started = Instant::now();
    let result = what();
    eprintln!("  took {:.1} s", started.elapsed().as_secs_f64());
    result
}

/// The packages of the workspace's version, built once per test process
/// (both tests install them; two builds at once would write the same
/// files).
fn packages(docker: &Docker) -> &'static [PathBuf] {
    static BUILT: OnceLock<Vec<PathBuf>> = OnceLock::new();
    BUILT.get_or_init(|| build(docker, &[]))
}

/// `scripts/package-deb args...`: the packages it built.
fn build(docker: &Docker, args: &[&str]) -> Vec<PathBuf> {
    docker
        .script("package-deb", args)
        .lines()
        .map(|line| repo_root().join(line.trim()))
        .collect()
}

/// The Debian version in a package's file name (`name_version_arch.deb`).
fn version_of(package: &Path) -> String {
    package
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.split('_').nth(1))
        .expect("name_version_arch.deb")
        .to_owned()
}

/// The same upstream version with the next Debian revision.
fn next_version(version: &str) -> String {
    let (upstream, revision) = version.rsplit_once('-').expect("a Debian revision");
    let revision: u32 = revision.parse().expect("a numeric revision");
    format!("{upstream}-{}", revision + 1)
}

/// Lintian on the host: no errors; the warnings are printed.
fn lintian(packages: &[PathBuf]) {
    let output = Command::new("lintian")
        .args(["--fail-on", "error", "--display-info"])
        .args(packages)
        .output()
        .expect("lintian runs (./scripts/setup --tests installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    for line in text.lines() {
        eprintln!("  {line}");
    }
    let errors: Vec<_> = text.lines().filter(|line| line.starts_with("E:")).collect();
    assert!(
        output.status.success() && errors.is_empty(),
        "lintian found errors ({}):\n{text}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!(
        "  lintian: {} warnings, {} informational tags",
        text.lines().filter(|line| line.starts_with("W:")).count(),
        text.lines().filter(|line| line.starts_with("I:")).count()
    );
}

/// Each shipped binary's debug info is in its package's -dbgsym, at the
/// path gdb looks it up by (`/usr/lib/debug/.build-id/xx/yyyy.debug`).
fn debug_info(packages: &[PathBuf]) {
    let dbgsym = |package: &str| {
        packages
            .iter()
            .find(|path| {
                path.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.starts_with(&format!("{package}-dbgsym_")))
            })
            .unwrap_or_else(|| panic!("no {package}-dbgsym in {packages:?}"))
    };
    for (package, binary) in [
        ("hobotnica-controller", "hobotnica-controller"),
        ("hobotnica-controller", "hobot"),
        ("hobotnica-agent", "hobotnica-agent"),
    ] {
        let notes = run_ok(
            Command::new("readelf")
                .arg("-n")
                .arg(repo_root().join("target/dist/bin").join(binary)),
        );
        let build_id = String::from_utf8_lossy(&notes.stdout)
            .lines()
            .find_map(|line| line.trim().strip_prefix("Build ID: ").map(str::to_owned))
            .unwrap_or_else(|| panic!("{binary} has a build id"));
        let contents = run_ok(Command::new("dpkg-deb").arg("-c").arg(dbgsym(package)));
        let path = format!(
            "./usr/lib/debug/.build-id/{}/{}.debug",
            &build_id[..2],
            &build_id[2..]
        );
        assert!(
            String::from_utf8_lossy(&contents.stdout).contains(&path),
            "{package}-dbgsym holds {path} ({binary})"
        );
        eprintln!("  {binary}: {path}");
    }
}

/// `systemd-analyze security --offline` on the units as packaged: each
/// must be OK or better.
fn security(packages: &[PathBuf]) {
    let root = tempfile::tempdir().expect("a temporary directory");
    for package in packages {
        run_ok(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(package)
                .arg(root.path()),
        );
    }
    for (_, unit) in UNITS {
        let path = root.path().join("lib/systemd/system").join(unit);
        let output = run_ok(
            Command::new("systemd-analyze")
                .args(["security", "--offline=true", "--no-pager"])
                .arg(&path),
        );
        let text = String::from_utf8_lossy(&output.stdout);
        let overall = text
            .lines()
            .find(|line| line.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no overall exposure for {unit}:\n{text}"));
        let level = overall
            .split_once(": ")
            .map(|(_, level)| level.trim().to_owned())
            .expect("unit: level");
        eprintln!("  {unit}: exposure {level}");
        assert!(
            level.contains(" OK") || level.contains(" SAFE"),
            "{unit} must be OK or better: {level}"
        );
    }
}

/// Runs a shell command in the container; its stdout.
///
/// # Panics
/// When it fails, with its output.
fn sh(container: &Container, script: &str) -> String {
    let output = container.exec(&["env", "DEBIAN_FRONTEND=noninteractive", "sh", "-ec", script]);
    check(&output, script);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a shell command in the container with `args` as `$1`...; its
/// stdout.
///
/// # Panics
/// When it fails, with its output.
fn sh_with(container: &Container, script: &str, args: &[&str]) -> String {
    let mut argv = vec!["sh", "-ec", script, "sh"];
    argv.extend_from_slice(args);
    let output = container.exec(&argv);
    check(&output, script);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Starts a shell command in the container without waiting for it.
fn container_detached(docker: &Docker, container: &Container, script: &str) {
    let output = docker.try_run(&["exec", "-d", container.name(), "sh", "-ec", script]);
    check(&output, script);
}

fn run_ok(command: &mut Command) -> Output {
    let output = command.output().expect("the command runs");
    check(&output, &format!("{command:?}"));
    output
}

fn check(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
