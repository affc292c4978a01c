//! Blue-green switches of the controller behind a real nginx, with the
//! files `deploy/blue-green/` ships: its nginx site (only the listen
//! addresses changed, to free loopback ports) and its `switch` script,
//! which starts the controllers itself (`HOBOTNICA_BG_RUNNER=process`).
//! nginx, the switch and the controllers run unprivileged (as `nobody`
//! when the tests run as root), as they would in production.
//!
//! While the switches run, a bounded load goes through nginx: REST reads
//! and writes (new jobs), signed GitHub pushes, jobs streaming logs, a
//! `hobot logs -f` tail and two agents, all through nginx only. Checked
//! after: no request failed, every accepted push queued exactly one job,
//! every job ran once and its log is byte-exact, the tail printed every
//! byte once. Printed: the latencies during the switches (with Redis, the
//! latency they add; embedded, the pause of the store's hand-over).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hobotnica_tests::daemon::{Daemon, Spec};
use hobotnica_tests::github::{FakeGitHub, GitHubUser, new_delivery_id, send_webhook};
use hobotnica_tests::redis::RedisServer;
use hobotnica_tests::{AgentTarget, Job, Permission, RawResponse, bins};
use tokio::sync::Mutex;

use super::*;
use crate::github::{GH_REPO, LOGIN, NAME, OWNER};

/// The uid and gid of `nobody`.
const NOBODY: u32 = 65534;
/// How long one switch may take, whole.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(120);
/// Jobs' output.
const GATE_OUTPUT: &str = "waiting for the gate\ngate opened\n";
const TEST_OUTPUT: &str = "hello from stdout\nhello from stderr\ntests passed\n";

/// Where nginx is: Debian installs it in /usr/sbin, which an unprivileged
/// user's PATH lacks.
fn nginx_binary() -> PathBuf {
    for dir in std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
    {
        let candidate = dir.join("nginx");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("nginx is missing: scripts/setup --tests installs it");
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

/// Runs `program` as `nobody` when the tests run as root (through
/// `setpriv`), else as the test's user: (program, leading args).
fn unprivileged(program: PathBuf) -> (PathBuf, Vec<OsString>) {
    if nix::unistd::geteuid().is_root() {
        (
            PathBuf::from("setpriv"),
            vec![
                format!("--reuid={NOBODY}").into(),
                format!("--regid={NOBODY}").into(),
                "--clear-groups".into(),
                "--".into(),
                program.into(),
            ],
        )
    } else {
        (program, Vec::new())
    }
}

/// Gives `path` and everything in it to `nobody` when running as root.
fn give_away(path: &Path) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let status = std::process::Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown {}", path.display());
}

/// nginx, the switch's configuration and state, and the controllers it
/// started (killed on drop).
struct BlueGreen {
    dir: tempfile::TempDir,
    config: PathBuf,
    http: std::net::SocketAddr,
    grpc: std::net::SocketAddr,
    admin_token: String,
    agent_token: String,
    nginx: Option<Daemon>,
}

impl BlueGreen {
    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    fn api(&self) -> Api {
        Api::new(self.url(), Some(&self.admin_token))
    }

    /// Writes nginx's files and the switch's configuration (`redis`: Redis
    /// mode), runs the first switch (which starts blue), then nginx.
    async fn start(github: &FakeGitHub, redis: Option<&RedisServer>) -> BlueGreen {
        hobotnica_tests::init();
        let dir = tempfile::Builder::new()
            .prefix("hobotnica-blue-green-")
            .tempdir()
            .expect("temp dir");
        let prefix = dir.path().join("nginx");
        let conf = prefix.join("conf");
        std::fs::create_dir_all(prefix.join("logs")).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        let http = net::free_addr();
        let grpc = net::free_addr();

        // The shipped site, on free ports.
        let site = std::fs::read_to_string(repo_root().join("deploy/blue-green/hobotnica.conf"))
            .expect("deploy/blue-green/hobotnica.conf");
        for shipped in ["listen 127.0.0.1:8080;", "listen 127.0.0.1:8081 http2;"] {
            assert!(site.contains(shipped), "the site has {shipped:?}");
        }
        let site = site
            .replace("listen 127.0.0.1:8080;", &format!("listen {http};"))
            .replace(
                "listen 127.0.0.1:8081 http2;",
                &format!("listen {grpc} http2;"),
            );
        std::fs::write(conf.join("hobotnica.conf"), site).unwrap();
        let p = prefix.display();
        std::fs::write(
            conf.join("nginx.conf"),
            format!(
                "worker_processes 1;\n\
                 pid {p}/nginx.pid;\n\
                 error_log {p}/logs/error.log info;\n\
                 worker_shutdown_timeout 60s;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n\
                 \x20   access_log off;\n\
                 \x20   client_body_temp_path {p}/body;\n\
                 \x20   proxy_temp_path {p}/proxy;\n\
                 \x20   fastcgi_temp_path {p}/fastcgi;\n\
                 \x20   uwsgi_temp_path {p}/uwsgi;\n\
                 \x20   scgi_temp_path {p}/scgi;\n\
                 \x20   include hobotnica.conf;\n\
                 }}\n"
            ),
        )
        .unwrap();

        let admin_token = hobotnica_common::token::new_token("hbt_admin");
        let agent_token = hobotnica_common::token::new_token("hbag_pool");
        let data_dir = dir.path().join("data");
        let mut settings = vec![
            format!(
                "HOBOTNICA_BG_STATE_DIR={}",
                dir.path().join("state").display()
            ),
            "HOBOTNICA_BG_RUNNER=process".to_owned(),
            format!("HOBOTNICA_BG_BLUE_HTTP={}", net::free_addr()),
            format!("HOBOTNICA_BG_BLUE_GRPC={}", net::free_addr()),
            format!("HOBOTNICA_BG_GREEN_HTTP={}", net::free_addr()),
            format!("HOBOTNICA_BG_GREEN_GRPC={}", net::free_addr()),
            format!(
                "HOBOTNICA_BG_UPSTREAMS={}/hobotnica-upstreams.conf",
                conf.display()
            ),
            format!("HOBOTNICA_BG_NGINX_PID={p}/nginx.pid"),
            format!("HOBOTNICA_BG_NGINX={}", nginx_binary().display()),
            format!("HOBOTNICA_BG_NGINX_PREFIX={p}"),
            format!("HOBOTNICA_BG_NGINX_CONF={}/nginx.conf", conf.display()),
            format!("HOBOTNICA_DATA_DIR={}", data_dir.display()),
            format!("HOBOTNICA_PUBLIC_URL=http://{http}"),
            format!("HOBOTNICA_ADMIN_TOKEN={admin_token}"),
            format!("HOBOTNICA_AGENT_TOKEN={agent_token}"),
            format!("HOBOTNICA_GITHUB_URL={}", github.url()),
            format!("HOBOTNICA_GITHUB_API_URL={}", github.api_url()),
            "HOBOTNICA_LOG=info".to_owned(),
        ];
        if let Some(redis) = redis {
            let key = dir.path().join("secret-key");
            hobotnica_tests::agent::write_file_with_mode(
                &key,
                &format!("{}\n", "ab".repeat(32)),
                0o600,
            );
            settings.push(format!("HOBOTNICA_REDIS_URL={}", redis.url()));
            settings.push(format!("HOBOTNICA_SECRET_KEY_FILE={}", key.display()));
        }
        let config = dir.path().join("blue-green.env");
        hobotnica_tests::agent::write_file_with_mode(
            &config,
            &format!("{}\n", settings.join("\n")),
            0o600,
        );
        give_away(dir.path());

        let mut blue_green = BlueGreen {
            dir,
            config,
            http,
            grpc,
            admin_token,
            agent_token,
            nginx: None,
        };
        let first = blue_green.switch().await;
        assert!(
            first.contains("nginx is not running") && first.contains("done: blue serves"),
            "{first}"
        );
        let (program, mut args) = unprivileged(nginx_binary());
        args.extend(
            [
                "-p",
                &p.to_string(),
                "-c",
                &conf.join("nginx.conf").display().to_string(),
                "-g",
                "daemon off;",
            ]
            .map(OsString::from),
        );
        blue_green.nginx = Some(Daemon::spawn(Spec {
            name: "nginx".to_owned(),
            program,
            args,
            env: Vec::new(),
            cwd: None,
            log_dir: blue_green.dir.path().to_owned(),
        }));
        let api = blue_green.api();
        wait_until(
            SWITCH_TIMEOUT,
            "the controller to answer through nginx",
            || {
                let api = api.clone();
                async move {
                    api.try_raw(Method::GET, "/readyz", None, &[])
                        .await
                        .is_ok_and(|response| response.status == 200)
                }
            },
        )
        .await;
        blue_green
    }

    /// Runs the switch to the same binary (a new version, as far as the
    /// switch knows) and returns what it printed; panics unless it
    /// succeeds.
    async fn switch(&self) -> String {
        let (program, mut args) = unprivileged(PathBuf::from("bash"));
        args.extend([
            repo_root().join("deploy/blue-green/switch").into(),
            "--config".into(),
            self.config.clone().into(),
            bins::bin(bins::CONTROLLER).into(),
        ]);
        let mut command = tokio::process::Command::new(program);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("HOBOTNICA_") {
                command.env_remove(name);
            }
        }
        let output = tokio::time::timeout(
            SWITCH_TIMEOUT,
            command
                .args(args)
                .current_dir(self.dir.path())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the switch ends in time")
        .expect("run the switch");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "the switch failed:\n{printed}");
        printed
    }

    /// The pid of each colour's controller that runs.
    fn controller_pids(&self) -> Vec<i32> {
        ["blue", "green"]
            .iter()
            .filter_map(|colour| {
                std::fs::read_to_string(self.state_dir().join(colour).join("pid")).ok()
            })
            .filter_map(|pid| pid.trim().parse().ok())
            .filter(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), None).is_ok())
            .collect()
    }

    fn agent(&self, name: &str) -> Agent {
        Agent::spawn_for(
            &AgentTarget {
                grpc_url: self.grpc_url(),
                agent_token: &self.agent_token,
                pki: None,
            },
            AgentOpts {
                name: Some(hobotnica_tests::unique(name)),
                concurrency: 4,
                ..AgentOpts::default()
            },
        )
    }
}

impl Drop for BlueGreen {
    fn drop(&mut self) {
        signal_all(&self.controller_pids(), Signal::SIGKILL);
        // nginx's master stops its workers on SIGTERM; a SIGKILL (the
        // harness's default) would leave them running, holding their ports.
        if let Some(nginx) = &mut self.nginx {
            nginx.signal(Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while nginx.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if std::thread::panicking() {
            for colour in ["blue", "green"] {
                let log = self.state_dir().join(colour).join("log");
                if let Ok(text) = std::fs::read_to_string(&log) {
                    let tail: String = text
                        .lines()
                        .rev()
                        .take(40)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n");
                    eprintln!("--- {colour} controller (end of its log)\n{tail}");
                }
            }
        }
    }
}

/// One request of the load: when it started, how long it took.
#[derive(Clone, Copy)]
struct Sample {
    started: Instant,
    took: Duration,
}

/// What the load did: samples, failures, jobs it queued, commits it pushed.
#[derive(Default)]
struct LoadRecord {
    samples: Vec<Sample>,
    failures: Vec<String>,
    interleave_jobs: Vec<u64>,
    pushed: Vec<String>,
}

impl LoadRecord {
    /// Records a request that started at `started` and ended now: its
    /// latency, and a failure unless it was answered with `expected`. The
    /// answer, when it was.
    fn answered(
        &mut self,
        what: &str,
        started: Instant,
        result: Result<RawResponse, reqwest::Error>,
        expected: u16,
    ) -> Option<RawResponse> {
        self.samples.push(Sample {
            started,
            took: started.elapsed(),
        });
        match result {
            Ok(response) if response.status == expected => Some(response),
            Ok(response) => {
                let failure = format!("{what}: {} {}", response.status, response.text());
                self.failures.push(failure);
                None
            }
            Err(error) => {
                self.failures.push(format!("{what}: {error:?}"));
                None
            }
        }
    }
}

/// REST reads, REST writes and signed pushes through nginx until `stop`,
/// each kind one request at a time.
fn start_load(
    api: Api,
    github: Arc<GitRepo>,
    webhook_url: String,
    secret: String,
    payloads: Arc<FakeGitHub>,
    record: Arc<Mutex<LoadRecord>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    // Reads.
    {
        let (api, record, stop) = (api.clone(), record.clone(), stop.clone());
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = api
                    .try_raw(
                        Method::GET,
                        &format!("/api/v1/jobs?repo={GH_REPO}&limit=5"),
                        None,
                        &[],
                    )
                    .await;
                record
                    .lock()
                    .await
                    .answered("GET jobs", started, result, 200);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    // Writes: a job that streams its log for a second.
    {
        let (api, record, stop) = (api.clone(), record.clone(), stop.clone());
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let body = json!({ "target": "interleave" });
                let result = api
                    .try_raw(
                        Method::POST,
                        &format!("/api/v1/repos/{GH_REPO}/jobs"),
                        Some(body.to_string().as_bytes()),
                        &[],
                    )
                    .await;
                let mut record = record.lock().await;
                if let Some(response) = record.answered("POST job", started, result, 202) {
                    let id = response.json()["id"].as_u64().expect("job id");
                    record.interleave_jobs.push(id);
                }
                drop(record);
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
    }
    // Pushes, each of a new commit.
    tasks.spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let before = github.head();
            let after = github.commit_version(&hobotnica_tests::unique("push"));
            let payload =
                payloads.push_payload(GH_REPO, "refs/heads/main", &before, &after, false, false);
            let started = Instant::now();
            let response = send_webhook(
                &webhook_url,
                "push",
                &new_delivery_id(),
                &payload,
                Some(&secret),
            )
            .await;
            let mut record = record.lock().await;
            if record
                .answered("push", started, Ok(response), 202)
                .is_some()
            {
                record.pushed.push(after);
            }
            drop(record);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    tasks
}

fn millis(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

/// The `q` quantile of `values` (sorted here).
fn quantile(values: &mut [Duration], q: f64) -> Duration {
    values.sort();
    if values.is_empty() {
        return Duration::ZERO;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let index = ((values.len() - 1) as f64 * q).round() as usize;
    values[index]
}

/// Switches `switches` times under load and checks everything the load
/// did; prints the figures under `label`.
#[allow(clippy::too_many_lines)]
async fn switch_under_load(redis: Option<&RedisServer>, switches: usize, label: &str) {
    let github = Arc::new(FakeGitHub::start().await);
    let token = hobotnica_common::token::new_token("ghp")[..40].to_owned();
    github.add_user(LOGIN, &token);
    let repo = github.add_repo(OWNER, NAME, "main");
    github.grant(&token, GH_REPO, Permission::Admin);
    let blue_green = BlueGreen::start(&github, redis).await;
    let api = blue_green.api();

    let registered = GitHubUser::new(blue_green.url(), LOGIN, &token)
        .register(GH_REPO, json!({}))
        .await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let body = registered.json();
    let webhook_url = body["webhook_url"]
        .as_str()
        .expect("webhook_url")
        .to_owned();
    let secret = body["webhook_secret"].as_str().expect("secret").to_owned();
    assert!(
        webhook_url.starts_with(&blue_green.url()),
        "the hook points at nginx: {webhook_url}"
    );

    let mut agents = vec![blue_green.agent("bg-a"), blue_green.agent("bg-b")];
    for agent in &mut agents {
        agent.wait_connected(&api).await;
    }

    // Jobs that run across every switch, one of them tailed by hobot.
    // Where the jobs' sandboxes can see it.
    let gate_dir = hobotnica_tests::shared_dir().join(hobotnica_tests::unique("blue-green"));
    std::fs::create_dir_all(&gate_dir).unwrap();
    let gate = gate_dir.join("gate");
    let mut gated = Vec::new();
    for _ in 0..2 {
        let job = api
            .run_job(
                GH_REPO,
                json!({ "target": "gate", "env": { "E2E_GATE": gate.to_str().unwrap() } }),
            )
            .await;
        api.wait_for_log(job.id, "waiting for the gate", JOB_TIMEOUT)
            .await;
        gated.push(job.id);
    }
    let cwd = tempfile::tempdir().unwrap();
    let tail = cli::command(None, cwd.path())
        .env("HOBOTNICA_URL", blue_green.url())
        .env("HOBOTNICA_GRPC_URL", blue_green.grpc_url())
        .env("HOBOTNICA_TOKEN", &blue_green.admin_token)
        .args(["logs", "-f", &gated[0].to_string()])
        .spawn()
        .expect("hobot logs -f");

    let record = Arc::new(Mutex::new(LoadRecord::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = start_load(
        api.clone(),
        repo.clone(),
        webhook_url,
        secret,
        github.clone(),
        record.clone(),
        stop.clone(),
    );
    // A baseline before the first switch: some of every kind of request.
    wait_until(JOB_TIMEOUT, "the load to push twice", || {
        let record = record.clone();
        async move { record.lock().await.pushed.len() >= 2 }
    })
    .await;
    let baseline_end = Instant::now();

    let mut windows = Vec::new();
    for n in 0..switches {
        let started = Instant::now();
        let printed = blue_green.switch().await;
        let ended = Instant::now();
        let to = if n % 2 == 0 { "green" } else { "blue" };
        assert!(printed.contains(&format!("done: {to} serves")), "{printed}");
        assert_eq!(
            blue_green.controller_pids().len(),
            1,
            "only the new controller runs after the switch:\n{printed}"
        );
        if n == 0 {
            println!("{label}: the first switch said:\n{printed}");
        }
        windows.push((started, ended));
        // Some load between switches.
        let pushed = record.lock().await.pushed.len();
        wait_until(JOB_TIMEOUT, "a push after the switch", || {
            let record = record.clone();
            async move { record.lock().await.pushed.len() > pushed }
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(joined) = load.join_next().await {
        joined.expect("a load task");
    }
    std::fs::write(&gate, b"").unwrap();

    let record = Arc::try_unwrap(record)
        .ok()
        .expect("the load is over")
        .into_inner();
    assert!(
        record.failures.is_empty(),
        "{} request(s) failed during the switches:\n{}",
        record.failures.len(),
        record.failures.join("\n")
    );

    // Every job ran once, and its log is make's output exactly.
    for id in &gated {
        let job = api.wait_for_success(*id, JOB_TIMEOUT).await;
        assert_eq!(job.attempt, 1, "{job:#?}");
        assert_eq!(api.output(*id).await, GATE_OUTPUT, "job {id}");
    }
    for id in &record.interleave_jobs {
        let job = api.wait_for_success(*id, JOB_TIMEOUT).await;
        assert_eq!(job.attempt, 1, "{job:#?}");
        assert_eq!(api.output(*id).await, INTERLEAVED_OUTPUT, "job {id}");
    }
    // Every accepted push queued exactly one job.
    let pushed_jobs: Vec<Job> = api
        .all_jobs(&format!("repo={GH_REPO}"))
        .await
        .into_iter()
        .filter(|job| job.trigger == "webhook")
        .collect();
    for commit in &record.pushed {
        let jobs: Vec<&Job> = pushed_jobs
            .iter()
            .filter(|job| &job.commit == commit)
            .collect();
        assert_eq!(jobs.len(), 1, "jobs of pushed commit {commit}: {jobs:#?}");
        let job = api.wait_for_success(jobs[0].id, JOB_TIMEOUT).await;
        assert_eq!(job.attempt, 1, "{job:#?}");
        assert_eq!(api.output(job.id).await, TEST_OUTPUT, "job {}", job.id);
    }
    assert_eq!(
        pushed_jobs.len(),
        record.pushed.len(),
        "no job without a push"
    );

    // The tail followed the job across every switch: each byte once.
    let tail = cli::finish(tail, &["logs", "-f"]).await;
    assert_eq!(tail.code(), Some(0), "{}", tail.stderr);
    assert_eq!(
        String::from_utf8_lossy(&hobotnica_tests::output::make_output(&tail.stdout)),
        GATE_OUTPUT,
        "hobot logs -f: {}",
        tail.stderr
    );

    // The figures.
    let mut baseline: Vec<Duration> = record
        .samples
        .iter()
        .filter(|sample| sample.started < baseline_end)
        .map(|sample| sample.took)
        .collect();
    let mut during: Vec<Duration> = Vec::new();
    let mut worst_per_switch: Vec<Duration> = Vec::new();
    for (started, ended) in &windows {
        let inside: Vec<Duration> = record
            .samples
            .iter()
            .filter(|sample| sample.started >= *started && sample.started <= *ended)
            .map(|sample| sample.took)
            .collect();
        worst_per_switch.push(inside.iter().copied().max().unwrap_or_default());
        during.extend(inside);
    }
    let switch_times: Vec<Duration> = windows.iter().map(|(s, e)| *e - *s).collect();
    println!(
        "{label}: {switches} switch(es), each {}..{}; {} requests, {} jobs, {} pushes; \
         latency before: p50 {} max {}; during switches: p50 {} p99 {} max {}; \
         worst request per switch: p50 {} max {}",
        millis(switch_times.iter().copied().min().unwrap_or_default()),
        millis(switch_times.iter().copied().max().unwrap_or_default()),
        record.samples.len(),
        record.interleave_jobs.len() + gated.len() + record.pushed.len(),
        record.pushed.len(),
        millis(quantile(&mut baseline, 0.5)),
        millis(quantile(&mut baseline, 1.0)),
        millis(quantile(&mut during, 0.5)),
        millis(quantile(&mut during, 0.99)),
        millis(quantile(&mut during, 1.0)),
        millis(quantile(&mut worst_per_switch, 0.5)),
        millis(quantile(&mut worst_per_switch, 1.0)),
    );
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_switch_on_redis_loses_nothing_and_pauses_nothing() {
    let redis = RedisServer::start().await;
    switch_under_load(Some(&redis), 4, "blue-green on Redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_switch_on_the_embedded_store_hands_it_over_and_loses_nothing() {
    switch_under_load(None, 10, "blue-green embedded").await;
}
