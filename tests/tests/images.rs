//! The container images (`deploy/docker/Dockerfile`, `scripts/docker-build`)
//! as a user runs them: built in one command and small, running as a fixed
//! non-root user with one declared volume and a health check, a controller
//! and an agent container running a job from the host through the REST API,
//! the agent draining on `docker stop`, and bad configuration ending the
//! container at once with a line that names the problem.
//!
//! Containers use the host's network (the tests' engine has no other) and
//! listen on 127.0.0.1 only.

#![allow(clippy::disallowed_methods)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hobotnica_tests::docker::{Container, Docker, docker, repo_root};
use hobotnica_tests::git::makefile_with_test_recipe;
use hobotnica_tests::net::{closed_addr, free_addr};
use hobotnica_tests::{Api, GitRepo, wait_for, wait_until};
use serde_json::json;

/// The uid and gid the images run as (deploy/docker/Dockerfile).
const IMAGE_UID: u32 = 10001;
/// The largest agent image we ship: Debian bookworm-slim (74.8 MB here),
/// git, make, bubblewrap and the agent.
const AGENT_MAX_BYTES: u64 = 150_000_000;
/// The largest controller image we ship: the same base and git (the
/// controller runs `git ls-remote` for repositories registered by git URL)
/// and a 24 MB binary; about 136 MB.
const CONTROLLER_MAX_BYTES: u64 = 150_000_000;
/// How long a container may take to answer, become healthy or exit.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a job may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// The health check interval the tests' containers use (the images say 15 s).
const HEALTH_INTERVAL: &str = "1s";
/// The sandbox's options for the agent container (deploy/README.md).
fn sandbox_options() -> Vec<String> {
    let profile = repo_root().join("deploy/docker/agent-seccomp.json");
    vec![
        "--security-opt".to_owned(),
        format!("seccomp={}", profile.display()),
        "--security-opt".to_owned(),
        "systempaths=unconfined".to_owned(),
    ]
}

/// The two images, built once per test process by `scripts/docker-build`.
struct Images {
    controller: String,
    agent: String,
    build_time: Duration,
}

fn images() -> Option<(&'static Docker, &'static Images)> {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    let docker = docker()?;
    let images = IMAGES.get_or_init(|| {
        let tag = env!("CARGO_PKG_VERSION");
        let started = Instant::now();
        docker.script("docker-build", &["--tag", tag]);
        Images {
            controller: format!("hobotnica/controller:{tag}"),
            agent: format!("hobotnica/agent:{tag}"),
            build_time: started.elapsed(),
        }
    });
    Some((docker, images))
}

fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// A directory for files the containers mount, owned by the images' user,
/// with `files` in it at mode 0600 (Docker secrets are read-only files of
/// the container's user).
struct Secrets {
    dir: tempfile::TempDir,
}

impl Secrets {
    fn new(files: &[(&str, &str)]) -> Secrets {
        let dir = tempfile::Builder::new()
            .prefix("hobotnica-images-secrets-")
            .tempdir()
            .expect("temp dir");
        for (name, content) in files {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("{content}\n")).expect("write a secret");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600");
            std::os::unix::fs::chown(&path, Some(IMAGE_UID), Some(IMAGE_UID)).expect("chown");
        }
        Secrets { dir }
    }

    /// `-v <file>:/run/secrets/<name>:ro`.
    fn mount(&self, name: &str) -> [String; 2] {
        [
            "-v".to_owned(),
            format!(
                "{}:/run/secrets/{name}:ro",
                self.dir.path().join(name).display()
            ),
        ]
    }
}

/// Gives `path` and everything below it to the images' user (git refuses
/// a repository another user owns).
fn chown_tree(path: &Path) {
    std::os::unix::fs::chown(path, Some(IMAGE_UID), Some(IMAGE_UID)).expect("chown");
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).expect("read dir").flatten() {
            chown_tree(&entry.path());
        }
    }
}

/// `-v <path>:<path>:ro`: a host path at the same path in the container.
fn same_path_read_only(path: &Path) -> [String; 2] {
    [
        "-v".to_owned(),
        format!("{}:{}:ro", path.display(), path.display()),
    ]
}

fn run(docker: &'static Docker, name: &str, args: &[String]) -> Container {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Container::run(docker, name, &args)
}

/// A controller container on 127.0.0.1 with its tokens as Docker secrets.
struct ControllerContainer {
    container: Container,
    api: Api,
    grpc_url: String,
    agent_token: String,
    _secrets: Secrets,
}

impl ControllerContainer {
    /// What an agent needs: the gRPC URL and the pool token.
    fn agent_target(&self) -> (&str, &str) {
        (&self.grpc_url, &self.agent_token)
    }
}

fn start_controller(
    docker: &'static Docker,
    images: &Images,
    name: &str,
    extra: &[String],
) -> ControllerContainer {
    let admin_token = hobotnica_common::token::new_token("hbad_images");
    let agent_token = hobotnica_common::token::new_token("hbag_images");
    let secrets = Secrets::new(&[("admin-token", &admin_token), ("agent-token", &agent_token)]);
    let http = free_addr();
    let grpc = free_addr();
    let mut args: Vec<String> = [
        "--health-interval",
        HEALTH_INTERVAL,
        "-e",
        &format!("HOBOTNICA_LISTEN={http}"),
        "-e",
        &format!("HOBOTNICA_GRPC_LISTEN={grpc}"),
        "-e",
        "HOBOTNICA_ADMIN_TOKEN_FILE=/run/secrets/admin-token",
        "-e",
        "HOBOTNICA_AGENT_TOKEN_FILE=/run/secrets/agent-token",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    args.extend(secrets.mount("admin-token"));
    args.extend(secrets.mount("agent-token"));
    args.extend_from_slice(extra);
    args.push(images.controller.clone());
    ControllerContainer {
        container: run(docker, name, &args),
        api: Api::new(format!("http://{http}"), Some(&admin_token)),
        grpc_url: format!("http://{grpc}"),
        agent_token,
        _secrets: secrets,
    }
}

/// An agent container of the controller at `grpc_url` (sandbox options
/// included).
fn start_agent(
    docker: &'static Docker,
    images: &Images,
    name: &str,
    (grpc_url, agent_token): (&str, &str),
    extra: &[String],
) -> (Container, Secrets) {
    let secrets = Secrets::new(&[("agent-token", agent_token)]);
    let mut args: Vec<String> = [
        "--health-interval",
        HEALTH_INTERVAL,
        "-e",
        &format!("HOBOTNICA_CONTROLLER={grpc_url}"),
        "-e",
        "HOBOTNICA_AGENT_TOKEN_FILE=/run/secrets/agent-token",
        "-e",
        &format!("HOBOTNICA_AGENT_NAME={name}"),
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    args.extend(sandbox_options());
    args.extend(secrets.mount("agent-token"));
    args.extend_from_slice(extra);
    args.push(images.agent.clone());
    (run(docker, name, &args), secrets)
}

/// Waits until the REST API answers `/readyz`.
async fn wait_ready(api: &Api) {
    wait_until(
        START_TIMEOUT,
        "the controller container to answer /readyz",
        || async {
            api.try_raw(reqwest::Method::GET, "/readyz", None, &[])
                .await
                .is_ok_and(|response| response.status == 200)
        },
    )
    .await;
}

/// Waits until the agent called `name` is connected.
async fn wait_agent(api: &Api, name: &str) {
    wait_until(
        START_TIMEOUT,
        &format!("agent {name} to connect"),
        || async {
            api.agents()
                .await
                .iter()
                .any(|agent| agent["name"] == name && agent["connected"] == true)
        },
    )
    .await;
}

/// Waits until the container's health check says `healthy`.
///
/// # Panics
/// After [`START_TIMEOUT`], with what the health check printed.
async fn wait_healthy(container: &Container) -> Duration {
    let started = Instant::now();
    loop {
        if container.inspect("{{.State.Health.Status}}") == "healthy" {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < START_TIMEOUT,
            "container {} did not become healthy within {START_TIMEOUT:?}; its health checks: {}",
            container.name(),
            container.inspect("{{json .State.Health.Log}}")
        );
        tokio::time::sleep(hobotnica_tests::wait::POLL_INTERVAL).await;
    }
}

/// Waits until the container has exited, and returns its exit code.
async fn wait_exit(container: &Container) -> i64 {
    wait_until(
        START_TIMEOUT,
        &format!("container {} to exit", container.name()),
        || async { container.inspect("{{.State.Status}}") == "exited" },
    )
    .await;
    container
        .inspect("{{.State.ExitCode}}")
        .parse()
        .expect("an exit code")
}

/// The fixture repository, readable by the images' user.
fn fixture_repo() -> GitRepo {
    let repo = GitRepo::new();
    repo.create_branch("slow");
    repo.commit(
        &[(
            "Makefile",
            &makefile_with_test_recipe(&[
                "echo job started",
                "sleep 3",
                "echo job finished after the stop",
            ]),
        )],
        "a test that takes a while",
    );
    repo.switch("main");
    chown_tree(repo.path());
    repo
}

#[test]
fn images_build_in_one_command_and_are_small() {
    let Some((docker, images)) = images() else {
        return;
    };
    let controller = docker.image_size(&images.controller);
    let agent = docker.image_size(&images.agent);
    let base = docker.image_size("debian:bookworm-slim");
    eprintln!(
        "images: built in {:.1} s; debian:bookworm-slim {:.1} MB, {} {:.1} MB, {} {:.1} MB",
        images.build_time.as_secs_f64(),
        megabytes(base),
        images.controller,
        megabytes(controller),
        images.agent,
        megabytes(agent)
    );
    assert!(
        agent < AGENT_MAX_BYTES,
        "the agent image weighs {:.1} MB",
        megabytes(agent)
    );
    assert!(
        controller < CONTROLLER_MAX_BYTES,
        "the controller image weighs {:.1} MB",
        megabytes(controller)
    );
    for image in [&images.controller, &images.agent] {
        let latest = format!("{}:latest", image.split(':').next().expect("a name"));
        assert_eq!(
            docker.run(&["image", "inspect", "--format", "{{.Id}}", image]),
            docker.run(&["image", "inspect", "--format", "{{.Id}}", &latest]),
            "{latest} is {image}"
        );
    }
}

#[test]
fn images_run_as_a_fixed_user_with_one_volume_and_a_health_check() {
    let Some((docker, images)) = images() else {
        return;
    };
    let started = Instant::now();
    for (image, binary, volume) in [
        (
            &images.controller,
            "hobotnica-controller",
            "/var/lib/hobotnica",
        ),
        (&images.agent, "hobotnica-agent", "/var/lib/hobotnica-agent"),
    ] {
        let id = docker.run(&["run", "--rm", "--entrypoint", "id", image]);
        assert!(
            id.starts_with(&format!(
                "uid={IMAGE_UID}(hobotnica) gid={IMAGE_UID}(hobotnica)"
            )),
            "{image} runs as {id}"
        );
        let version = docker.run(&["run", "--rm", image, "--version"]);
        assert_eq!(
            version.trim(),
            format!("{binary} {}", env!("CARGO_PKG_VERSION")),
            "{image} --version"
        );
        let health = docker.run(&[
            "image",
            "inspect",
            "--format",
            "{{json .Config.Healthcheck.Test}}",
            image,
        ]);
        assert_eq!(
            health.trim(),
            format!(r#"["CMD","{binary}","--health-check"]"#),
            "{image}'s HEALTHCHECK"
        );
        let volumes = docker.run(&[
            "image",
            "inspect",
            "--format",
            "{{json .Config.Volumes}}",
            image,
        ]);
        assert_eq!(
            volumes.trim(),
            format!(r#"{{"{volume}":{{}}}}"#),
            "{image}'s volumes"
        );
        // The volume starts out the user's own and private.
        let stat = docker.run(&[
            "run",
            "--rm",
            "--entrypoint",
            "stat",
            image,
            "-c",
            "%u %a",
            volume,
        ]);
        assert_eq!(
            stat.trim(),
            format!("{IMAGE_UID} 700"),
            "{image}'s {volume}"
        );
        eprintln!("images: {image}: {}, volume {volume}", id.trim());
    }
    eprintln!(
        "images: user, version, volume and health check checked in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn controller_and_agent_containers_report_healthy() {
    let Some((docker, images)) = images() else {
        return;
    };
    let controller = start_controller(docker, images, "hobotnica-images-healthy-controller", &[]);
    let took = wait_healthy(&controller.container).await;
    eprintln!(
        "images: the controller container was healthy after {:.1} s",
        took.as_secs_f64()
    );
    let (agent, _secrets) = start_agent(
        docker,
        images,
        "hobotnica-images-healthy-agent",
        controller.agent_target(),
        &[],
    );
    let took = wait_healthy(&agent).await;
    eprintln!(
        "images: the agent container was healthy after {:.1} s",
        took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_container_runs_jobs_and_drains_on_docker_stop() {
    let Some((docker, images)) = images() else {
        return;
    };
    let started = Instant::now();
    let repo = fixture_repo();
    // The controller resolves the branch with git ls-remote, the agent
    // fetches: both see the repository at the same path.
    let repo_mount = same_path_read_only(repo.path());
    let controller = start_controller(docker, images, "hobotnica-images-controller", &repo_mount);
    wait_ready(&controller.api).await;
    let (agent, _secrets) = start_agent(
        docker,
        images,
        "hobotnica-images-agent",
        controller.agent_target(),
        &repo_mount,
    );
    wait_agent(&controller.api, "hobotnica-images-agent").await;
    eprintln!(
        "images: controller and agent containers up in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let api = &controller.api;
    api.register_repo("images", &repo.url()).await;
    let job_started = Instant::now();
    let job = api.run_target("local/images", "test").await;
    let job = api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let output = api.output(job.id).await;
    assert!(
        output.contains("hello from stdout") && output.contains("tests passed"),
        "make test's output: {output:?}"
    );
    assert_eq!(job.agent.as_deref(), Some("hobotnica-images-agent"));
    eprintln!(
        "images: make test in the agent container took {:.1} s",
        job_started.elapsed().as_secs_f64()
    );

    // docker stop while a job runs: the agent drains, the job succeeds, the
    // container exits 0.
    let job = api
        .run_job(
            "local/images",
            json!({ "target": "test", "branch": "slow" }),
        )
        .await;
    api.wait_for_log(job.id, "job started", JOB_TIMEOUT).await;
    let stopped = Instant::now();
    let mut stop = docker.command();
    stop.args(["stop", "--time", "120", agent.name()]);
    let stop = std::thread::spawn(move || stop.output().expect("docker stop runs"));
    let job = api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let output = api.output(job.id).await;
    assert!(output.contains("job finished after the stop"), "{output:?}");
    let stop = tokio::task::spawn_blocking(move || stop.join().expect("docker stop"))
        .await
        .expect("join");
    assert!(stop.status.success(), "docker stop: {stop:?}");
    assert_eq!(
        wait_exit(&agent).await,
        0,
        "the agent's exit code after draining"
    );
    // Logged only when the signal came with a job running: the stop did
    // not merely follow the job's end.
    let logs = agent.logs();
    assert!(
        logs.contains("shutting down; waiting for running jobs"),
        "the agent's log: {logs}"
    );
    eprintln!(
        "images: docker stop drained the running job and the agent exited 0 after {:.1} s",
        stopped.elapsed().as_secs_f64()
    );
    eprintln!(
        "images: job test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A container that ends at once on bad input: non-zero exit, its log
/// names `problem`, without a backtrace.
async fn assert_refused(container: &Container, problem: &str) {
    let code = wait_exit(container).await;
    let logs = container.logs();
    eprintln!(
        "images: {} exited {code}:\n{}",
        container.name(),
        logs.trim_end()
    );
    assert_ne!(code, 0, "{} exited 0:\n{logs}", container.name());
    let naming: Vec<&str> = logs.lines().filter(|line| line.contains(problem)).collect();
    assert_eq!(
        naming.len(),
        1,
        "one line of {}'s log names {problem:?}:\n{logs}",
        container.name()
    );
    let lower = logs.to_lowercase();
    assert!(
        !lower.contains("backtrace") && !lower.contains("panicked"),
        "{}'s log:\n{logs}",
        container.name()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_configuration_ends_the_container_with_one_clear_line() {
    let Some((docker, images)) = images() else {
        return;
    };
    let started = Instant::now();

    // A token file that is not there.
    let missing_token = {
        let http = free_addr();
        let grpc = free_addr();
        run(
            docker,
            "hobotnica-images-missing-token",
            &[
                "-e".into(),
                format!("HOBOTNICA_LISTEN={http}"),
                "-e".into(),
                format!("HOBOTNICA_GRPC_LISTEN={grpc}"),
                "-e".into(),
                "HOBOTNICA_ADMIN_TOKEN_FILE=/run/secrets/admin-token".into(),
                images.controller.clone(),
            ],
        )
    };
    assert_refused(&missing_token, "/run/secrets/admin-token").await;

    // A data directory the image's user cannot write.
    let read_only = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(read_only.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let not_writable = {
        let http = free_addr();
        let grpc = free_addr();
        run(
            docker,
            "hobotnica-images-data-not-writable",
            &[
                "-e".into(),
                format!("HOBOTNICA_LISTEN={http}"),
                "-e".into(),
                format!("HOBOTNICA_GRPC_LISTEN={grpc}"),
                "-v".into(),
                format!("{}:/var/lib/hobotnica", read_only.path().display()),
                images.controller.clone(),
            ],
        )
    };
    assert_refused(&not_writable, "/var/lib/hobotnica").await;

    // The image's default listen addresses without TLS.
    let plaintext = run(
        docker,
        "hobotnica-images-plaintext",
        std::slice::from_ref(&images.controller),
    );
    assert_refused(&plaintext, "--insecure").await;

    let controller = start_controller(docker, images, "hobotnica-images-bad-controller", &[]);
    wait_ready(&controller.api).await;

    // An agent without the sandbox's security options.
    let secrets = Secrets::new(&[("agent-token", &controller.agent_token)]);
    let mut args = vec![
        "-e".to_owned(),
        format!("HOBOTNICA_CONTROLLER={}", controller.grpc_url),
        "-e".to_owned(),
        "HOBOTNICA_AGENT_TOKEN_FILE=/run/secrets/agent-token".to_owned(),
    ];
    args.extend(secrets.mount("agent-token"));
    args.push(images.agent.clone());
    let no_sandbox = run(docker, "hobotnica-images-no-sandbox", &args);
    assert_refused(&no_sandbox, "sandbox").await;

    // A controller URL that is not one.
    let (bad_url, _secrets) = start_agent(
        docker,
        images,
        "hobotnica-images-bad-url",
        ("ftp://127.0.0.1:1", &controller.agent_token),
        &[],
    );
    assert_refused(&bad_url, "ftp://127.0.0.1:1").await;

    // A controller nobody listens at: the agent retries (by design) and
    // says why in its log.
    let nobody = format!("http://{}", closed_addr());
    let (unreachable, _secrets) = start_agent(
        docker,
        images,
        "hobotnica-images-unreachable",
        (&nobody, &controller.agent_token),
        &[],
    );
    let line = wait_for(
        START_TIMEOUT,
        "the agent to say it cannot connect",
        || async {
            unreachable
                .logs()
                .lines()
                .find(|line| line.contains("cannot register") && line.contains(&nobody))
                .map(str::to_owned)
        },
    )
    .await;
    assert_eq!(unreachable.inspect("{{.State.Status}}"), "running");
    eprintln!("images: an agent whose controller is unreachable keeps trying and logs: {line}");
    eprintln!(
        "images: bad configuration checked in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
