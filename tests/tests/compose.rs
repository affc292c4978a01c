//! The compose setup of `deploy/compose` end to end, with Debian's
//! docker-compose 1.29 against the tests' own Docker engine (host
//! networking only): `init` writes the secrets once; `compose.yaml` brings
//! up Redis, two controllers behind nginx and two agents; a repository
//! registered with `hobot` through nginx runs `make test` and `make deploy`
//! on the containerised agents; a job survives the controller its agent is
//! connected to being stopped mid-job; nothing is lost when every container
//! restarts. `embedded.yaml` (one controller, embedded store, one agent)
//! runs a job too.
//!
//! No registry is reachable here: the Redis and nginx images are local
//! stand-ins built from `tests/docker/` (Debian's packages on the local
//! `debian:bookworm-slim`), passed through `REDIS_IMAGE` and `NGINX_IMAGE`.

// The test runs docker, docker-compose, init and hobot as processes.
#![allow(clippy::disallowed_methods)]

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hobotnica_tests::docker::{Docker, dist_dir, docker, repo_root};
use hobotnica_tests::net::{established_connections, free_addr};
use hobotnica_tests::{Api, GitRepo, JobState, unique, wait_until};
use reqwest::Method;
use serde_json::json;

/// The stand-in images' tags.
const REDIS_IMAGE: &str = "hobotnica-test/redis:latest";
const NGINX_IMAGE: &str = "hobotnica-test/nginx:latest";
/// The uid the Hobotnica images run as (deploy/docker/Dockerfile).
const IMAGE_UID: u32 = 10001;
/// The uid of the Redis image's redis user (official image and stand-in).
const REDIS_UID: u32 = 999;
/// How long the containers may take to come up, reconnect or fail over.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one job may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// Builds the Hobotnica images (`scripts/docker-build`) and the Redis and
/// nginx stand-ins, once per test process; prints how long it took.
fn images(docker: &'static Docker) {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let started = Instant::now();
        docker.script("docker-build", &[]);
        for (tag, file) in [
            (REDIS_IMAGE, "redis.Dockerfile"),
            (NGINX_IMAGE, "nginx.Dockerfile"),
        ] {
            docker.build_test_image(tag, file);
        }
        for image in [
            "hobotnica/controller:latest",
            "hobotnica/agent:latest",
            REDIS_IMAGE,
            NGINX_IMAGE,
        ] {
            eprintln!(
                "compose: image {image}: {:.1} MB",
                docker.image_size(image) as f64 / 1e6
            );
        }
        eprintln!(
            "compose: phase images: {:.1} s",
            started.elapsed().as_secs_f64()
        );
    });
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `deploy/compose/init` writing into `secrets`; its output.
fn init(secrets: &Path, redis_port: u16) -> Output {
    let output = Command::new(repo_root().join("deploy/compose/init"))
        .env("HOBOTNICA_SECRETS_DIR", secrets)
        .env("HOBOTNICA_REDIS_PORT", redis_port.to_string())
        .output()
        .expect("deploy/compose/init runs");
    assert!(
        output.status.success(),
        "init failed ({}):\n{}",
        output.status,
        text(&output)
    );
    output
}

/// The files init writes and who must own them.
const SECRET_FILES: &[(&str, u32)] = &[
    ("admin-token", IMAGE_UID),
    ("agent-token", IMAGE_UID),
    ("secret-key", IMAGE_UID),
    ("redis-password", IMAGE_UID),
    ("redis-url", IMAGE_UID),
    ("redis.conf", REDIS_UID),
];

/// Runs init twice: the first run writes every secret (mode 0600, owned by
/// the image's user, no secret in its output), the second keeps them all.
fn init_secrets(secrets: &Path, redis_port: u16) {
    let first = init(secrets, redis_port);
    let mut contents = Vec::new();
    for (name, uid) in SECRET_FILES {
        let path = secrets.join(name);
        let meta = std::fs::metadata(&path).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "mode of {name}");
        assert_eq!(meta.uid(), *uid, "owner of {name}");
        let content = std::fs::read_to_string(&path).expect("a secret file");
        assert!(content.trim().len() >= 64, "{name} holds a long secret");
        contents.push(content);
    }
    let admin_token = &contents[0];
    assert!(admin_token.starts_with("hbad_"), "an admin token");
    assert!(contents[1].starts_with("hbag_"), "an agent token");
    assert!(
        contents[4].contains(&format!("@127.0.0.1:{redis_port}/")),
        "the Redis URL names the chosen port"
    );
    let said = text(&first);
    for (content, (name, _)) in contents.iter().zip(SECRET_FILES) {
        assert!(
            !said.contains(content.trim()),
            "init printed the secret {name}"
        );
    }

    let second = init(secrets, redis_port);
    for (content, (name, _)) in contents.iter().zip(SECRET_FILES) {
        let now = std::fs::read_to_string(secrets.join(name)).expect("a secret file");
        assert_eq!(&now, content, "a second init kept {name}");
        assert!(
            text(&second).contains(&format!("kept {}", path_str(&secrets.join(name)))),
            "a second init says it kept {name}:\n{}",
            text(&second)
        );
    }
}

/// A compose project: `docker-compose -p <name> -f <files>...` with the
/// variables given; `down -v` when dropped (its logs printed first when
/// the test is failing).
struct Project {
    docker: &'static Docker,
    name: String,
    files: Vec<PathBuf>,
    vars: Vec<(String, String)>,
}

impl Project {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("docker-compose");
        self.docker.env(&mut command);
        command
            .current_dir(repo_root().join("deploy/compose"))
            .args(["--ansi", "never"])
            .arg("--env-file")
            .arg(repo_root().join("deploy/compose/compose-v1.env"))
            .arg("-p")
            .arg(&self.name);
        for file in &self.files {
            command.arg("-f").arg(file);
        }
        command.args(args);
        for (key, value) in &self.vars {
            command.env(key, value);
        }
        command
    }

    /// Runs `docker-compose ... args`; its stdout.
    ///
    /// # Panics
    /// When it fails.
    fn run(&self, args: &[&str]) -> String {
        let output = self.command(args).output().expect("docker-compose runs");
        assert!(
            output.status.success(),
            "docker-compose {} failed ({}):\n{}",
            args.join(" "),
            output.status,
            text(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `docker-compose up -d`, asserting compose made no network of its own
    /// (every service is on the host's network).
    fn up(&self) {
        self.run(&["up", "-d"]);
        let networks = self.docker.run(&[
            "network",
            "ls",
            "--format",
            "{{.Name}}",
            "--filter",
            &format!("name={}", self.name),
        ]);
        assert_eq!(networks.trim(), "", "compose created a network");
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(output) = self
                .command(&["logs", "--no-color", "--tail", "80"])
                .output()
        {
            eprintln!("--- compose project {} ---\n{}", self.name, text(&output));
        }
        let started = Instant::now();
        match self
            .command(&["down", "-v", "--remove-orphans", "--timeout", "30"])
            .output()
        {
            Ok(output) if output.status.success() => eprintln!(
                "compose: {} down -v: {:.1} s",
                self.name,
                started.elapsed().as_secs_f64()
            ),
            Ok(output) => eprintln!("compose: {} down -v failed:\n{}", self.name, text(&output)),
            Err(err) => eprintln!("compose: {} down -v did not run: {err}", self.name),
        }
    }
}

/// A fixture repository the containers can read: owned by the images' user
/// (git refuses a repository of another owner) and bind-mounted read-only
/// at the same path into every container that runs git. Its `HEAD` is
/// returned with it (this process's git refuses it once it is chowned).
fn fixture_repo() -> (GitRepo, String) {
    let repo = GitRepo::new();
    let head = repo.head();
    let status = Command::new("chown")
        .args(["-R", &format!("{IMAGE_UID}:{IMAGE_UID}")])
        .arg(repo.path())
        .status()
        .expect("chown runs");
    assert!(status.success(), "chown the fixture repository");
    (repo, head)
}

/// A compose override file mounting `mounts` read-only at the same paths
/// into `services`, and `env` into the agents among them.
fn override_file(
    dir: &Path,
    services: &[&str],
    mounts: &[&Path],
    agent_env: &[(&str, &str)],
) -> PathBuf {
    let volumes: Vec<String> = mounts
        .iter()
        .map(|path| format!("{0}:{0}:ro", path.display()))
        .collect();
    let mut body = serde_json::Map::new();
    for service in services {
        let mut config = json!({ "volumes": volumes });
        if service.starts_with("agent") {
            config["environment"] = agent_env
                .iter()
                .map(|(key, value)| ((*key).to_owned(), json!(value)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        body.insert((*service).to_owned(), config);
    }
    // JSON is YAML: compose reads it as is.
    let path = dir.join("override.yaml");
    std::fs::write(&path, json!({ "services": body }).to_string()).expect("the override file");
    path
}

/// The number of agents the controller behind `api` lists as connected;
/// `None` while it cannot answer.
async fn connected_agents(api: &Api) -> Option<usize> {
    let response = api
        .try_raw(Method::GET, "/api/v1/agents", None, &[])
        .await
        .ok()?;
    if response.status != 200 {
        return None;
    }
    let list = response.json();
    Some(
        list["items"]
            .as_array()?
            .iter()
            .filter(|agent| agent["connected"].as_bool() == Some(true))
            .count(),
    )
}

async fn wait_ready(api: &Api, agents: usize, what: &str) {
    wait_until(
        READY_TIMEOUT,
        &format!("{what}: ready with {agents} agents"),
        || async move {
            let ready = api
                .try_raw(Method::GET, "/readyz", None, &[])
                .await
                .is_ok_and(|response| response.status == 200);
            ready && connected_agents(api).await == Some(agents)
        },
    )
    .await;
}

/// The shipped `hobot` (target/dist), as a user runs it.
fn hobot(args: &[&str]) -> String {
    let output = Command::new(dist_dir().join("bin/hobot"))
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("hobot runs");
    assert!(
        output.status.success(),
        "hobot {} failed ({}):\n{}",
        args.join(" "),
        output.status,
        text(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn phase(name: &str, started: Instant) -> Instant {
    eprintln!(
        "compose: phase {name}: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_out_compose_runs_jobs_fails_over_and_keeps_everything_across_restarts() {
    let Some(docker) = docker() else { return };
    let total = Instant::now();
    images(docker);
    let mut at = Instant::now();

    let dir = tempfile::tempdir().expect("temp dir");
    let secrets = dir.path().join("secrets");
    let redis_port = free_addr().port();
    init_secrets(&secrets, redis_port);
    at = phase("init (twice)", at);

    let (repo, head) = fixture_repo();
    let gates = dir.path().join("gates");
    std::fs::create_dir(&gates).expect("the gate directory");
    std::fs::set_permissions(&gates, std::fs::Permissions::from_mode(0o755)).expect("chmod gates");
    let override_path = override_file(
        dir.path(),
        &["controller-1", "controller-2", "agent-1", "agent-2"],
        &[repo.path(), &gates],
        &[("HOBOTNICA_SANDBOX_RO_BIND", path_str(&gates))],
    );
    let http = free_addr().port();
    let grpc = free_addr().port();
    let ports = [
        ("HOBOTNICA_HTTP_PORT", http),
        ("HOBOTNICA_GRPC_PORT", grpc),
        ("HOBOTNICA_REDIS_PORT", redis_port),
        ("HOBOTNICA_CONTROLLER_1_HTTP_PORT", free_addr().port()),
        ("HOBOTNICA_CONTROLLER_1_GRPC_PORT", free_addr().port()),
        ("HOBOTNICA_CONTROLLER_2_HTTP_PORT", free_addr().port()),
        ("HOBOTNICA_CONTROLLER_2_GRPC_PORT", free_addr().port()),
    ];
    let mut vars: Vec<(String, String)> = ports
        .iter()
        .map(|(key, port)| ((*key).to_owned(), port.to_string()))
        .collect();
    vars.extend(
        [
            ("HOBOTNICA_SECRETS_DIR", path_str(&secrets)),
            ("REDIS_IMAGE", REDIS_IMAGE),
            ("NGINX_IMAGE", NGINX_IMAGE),
            ("HOBOTNICA_AGENT_STOP_GRACE", "60s"),
        ]
        .map(|(key, value)| (key.to_owned(), value.to_owned())),
    );
    let project = Project {
        docker,
        name: unique("compose").replace('-', ""),
        files: vec![
            repo_root().join("deploy/compose/compose.yaml"),
            override_path,
        ],
        vars,
    };
    project.up();
    let token_file = secrets.join("admin-token");
    let token = std::fs::read_to_string(&token_file).expect("the admin token");
    let url = format!("http://127.0.0.1:{http}");
    let grpc_url = format!("http://127.0.0.1:{grpc}");
    let api = Api::new(url.clone(), Some(token.trim()));
    wait_ready(&api, 2, "nginx in front of the controllers").await;
    at = phase("up", at);

    // The first repository, as the README says: hobot through nginx.
    hobot(&[
        "--url",
        &url,
        "--token-file",
        path_str(&token_file),
        "repos",
        "add",
        "app",
        &repo.url(),
    ]);
    let test = api.run_target("local/app", "test").await;
    let test = api.wait_for_success(test.id, JOB_TIMEOUT).await;
    let test_output = api.output(test.id).await;
    assert!(
        test_output.contains("hello from stdout") && test_output.contains("tests passed"),
        "make test's output: {test_output}"
    );
    let deploy = api.deploy("local/app", json!({})).await;
    let deploy = api.wait_for_success(deploy.id, JOB_TIMEOUT).await;
    let deploy_output = api.output(deploy.id).await;
    assert!(
        deploy_output.contains(&format!("deploying {head}")) && deploy_output.contains("deployed"),
        "make deploy's output: {deploy_output}"
    );
    // hobot logs reads through nginx's gRPC port (LogService.Tail).
    let tailed = hobot(&[
        "--url",
        &url,
        "--grpc-url",
        &grpc_url,
        "--token-file",
        path_str(&token_file),
        "logs",
        &test.id.to_string(),
    ]);
    assert!(tailed.contains("tests passed"), "hobot logs: {tailed}");
    at = phase("first repository, test and deploy", at);

    // A controller stops mid-job: the agent fails over, the job completes.
    let gate = gates.join("fail-over");
    let gated = api
        .run_job(
            "local/app",
            json!({ "target": "gate", "env": { "E2E_GATE": path_str(&gate) } }),
        )
        .await;
    api.wait_for_log(gated.id, "waiting for the gate", JOB_TIMEOUT)
        .await;
    let sessions: Vec<usize> = [ports[4].1, ports[6].1]
        .iter()
        .map(|port| established_connections(*port))
        .collect();
    let stopped = if sessions[0] >= sessions[1] {
        "controller-1"
    } else {
        "controller-2"
    };
    eprintln!("compose: agents' connections to controller-1, -2: {sessions:?}; stopping {stopped}");
    let stop_started = Instant::now();
    project.run(&["stop", stopped]);
    eprintln!(
        "compose: docker-compose stop {stopped}: {:.1} s",
        stop_started.elapsed().as_secs_f64()
    );
    std::fs::write(&gate, b"").expect("open the gate");
    let done = api.wait_for_success(gated.id, JOB_TIMEOUT).await;
    eprintln!(
        "compose: gated job done {:.1} s after the stop began",
        stop_started.elapsed().as_secs_f64()
    );
    assert_eq!(done.attempt, 1, "the same attempt finished");
    let gated_output = api.output(gated.id).await;
    assert_eq!(
        gated_output, "waiting for the gate\ngate opened\n",
        "the job's whole output, through the other controller"
    );
    project.run(&["start", stopped]);
    wait_ready(&api, 2, "both controllers again").await;
    at = phase("fail-over", at);

    // Redis is killed (no snapshot on the way out) and every container
    // restarts: the append-only file alone keeps jobs, logs, repositories.
    let finished = [test.id, deploy.id, gated.id];
    let mut logs = Vec::new();
    for id in finished {
        logs.push(api.log(id).await);
    }
    let restart_started = Instant::now();
    project.run(&["kill", "-s", "SIGKILL", "redis"]);
    project.run(&["restart"]);
    project.run(&["start", "redis"]);
    wait_ready(&api, 2, "the restarted setup").await;
    eprintln!(
        "compose: Redis killed, everything restarted, ready again: {:.1} s",
        restart_started.elapsed().as_secs_f64()
    );
    for (id, log) in finished.iter().zip(&logs) {
        let job = api.job(*id).await;
        assert_eq!(job.state, JobState::Succeeded, "job {id} after the restart");
        assert_eq!(
            &api.log(*id).await,
            log,
            "the log of job {id} after the restart"
        );
    }
    let repos = api.get_json("/api/v1/repos").await;
    assert_eq!(repos["items"].as_array().map(Vec::len), Some(1), "{repos}");
    let after = api.run_target("local/app", "test").await;
    assert!(
        after.id > gated.id,
        "job ids go on after the restart ({} after {})",
        after.id,
        gated.id
    );
    api.wait_for_success(after.id, JOB_TIMEOUT).await;
    // The controllers found Redis set up as they need it.
    let controller_logs = project.run(&["logs", "--no-color", "controller-1", "controller-2"]);
    for warning in ["EVICT", "appendonly no"] {
        assert!(
            !controller_logs.contains(warning),
            "a controller warned about Redis' settings ({warning}):\n{controller_logs}"
        );
    }
    phase("restart", at);

    drop(project);
    eprintln!(
        "compose: scaled-out total: {:.1} s",
        total.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_compose_runs_a_job() {
    let Some(docker) = docker() else { return };
    images(docker);
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let secrets = dir.path().join("secrets");
    init(&secrets, free_addr().port());
    let (repo, _) = fixture_repo();
    let override_path = override_file(dir.path(), &["controller", "agent"], &[repo.path()], &[]);
    let http = free_addr().port();
    let project = Project {
        docker,
        name: unique("embedded").replace('-', ""),
        files: vec![
            repo_root().join("deploy/compose/embedded.yaml"),
            override_path,
        ],
        vars: [
            ("HOBOTNICA_HTTP_PORT", http.to_string()),
            ("HOBOTNICA_GRPC_PORT", free_addr().port().to_string()),
            ("HOBOTNICA_SECRETS_DIR", path_str(&secrets).to_owned()),
            ("HOBOTNICA_AGENT_STOP_GRACE", "60s".to_owned()),
        ]
        .map(|(key, value)| (key.to_owned(), value))
        .into(),
    };
    project.up();
    let token = std::fs::read_to_string(secrets.join("admin-token")).expect("the admin token");
    let api = Api::new(format!("http://127.0.0.1:{http}"), Some(token.trim()));
    wait_ready(&api, 1, "the embedded controller").await;
    // The image's HEALTHCHECK (`hobotnica-controller --health-check`), as
    // Docker sees it now (it says "starting" for its first 30 s).
    let controller = project.run(&["ps", "-q", "controller"]);
    let health = docker.run(&[
        "inspect",
        "--format",
        "{{.State.Health.Status}}",
        controller.trim(),
    ]);
    eprintln!(
        "compose: embedded controller's Docker health: {}",
        health.trim()
    );
    api.register_repo("app", &repo.url()).await;
    let job = api.run_target("local/app", "test").await;
    api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let output = api.output(job.id).await;
    assert!(
        output.contains("tests passed"),
        "make test's output: {output}"
    );
    eprintln!(
        "compose: embedded up to a finished job: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
