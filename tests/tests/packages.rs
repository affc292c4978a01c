#![allow(clippy::disallowed_methods)]
//! The Debian packages (`scripts/package-deb`, `deploy/debian/`) as an
//! administrator meets them: built, checked by lintian, installed with apt
//! on a clean `debian:bookworm-slim`, the controller started the way its
//! unit starts it, upgraded, removed and purged; and how exposed the
//! systemd units are (`systemd-analyze security`).
//!
//! systemd does not run in the container (there is no init there), so the
//! units are checked with `systemd-analyze verify` and the controller is
//! started by hand with the unit's user and environment file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hobotnica_tests::docker::{Container, Docker, docker, repo_root};
use hobotnica_tests::wait::wait_until;

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

    let packages = step("build the packages", || build(docker, &[]));
    let version = version_of(&packages[0]);
    for package in &packages {
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

    step("lintian", || lintian(&packages));
    step("the -dbgsym packages hold each binary's debug info", || {
        debug_info(&packages)
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
        security(&packages)
    });
    eprintln!("total: {:.1} s", total.elapsed().as_secs_f64());
}

/// Runs `what`, printing how long it took.
fn step<T>(name: &str, what: impl FnOnce() -> T) -> T {
    eprintln!("step: {name}");
    let started = Instant::now();
    let result = what();
    eprintln!("  took {:.1} s", started.elapsed().as_secs_f64());
    result
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
