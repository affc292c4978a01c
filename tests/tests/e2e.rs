//! End-to-end tests over real processes: a `hobotnica-controller`, one or
//! more `hobotnica-agent`s and the `hobot` CLI, against a real git
//! repository. Build the binaries first: `cargo build --workspace --bins`.
//!
//! Each test starts its own controller (temp data dir, free ports), so tests
//! run in parallel. Waits are conditions with deadlines, never bare sleeps.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hobotnica_tests::git::{BIG_OUTPUT_BYTES, INTERLEAVED_OUTPUT, MAKEFILE, big_output_sha256};
use hobotnica_tests::output::make_output;
use hobotnica_tests::procs::{processes_in_dir, processes_with_env, signal_all};
use hobotnica_tests::{
    Agent, AgentOpts, Api, Controller, ControllerOpts, GitRepo, JobState, cli, net, wait_until,
};
use nix::sys::signal::Signal;
use reqwest::Method;
use serde_json::{Value, json};

/// Deadline for an ordinary job (clone, make) to finish.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// GNU make's exit status when a recipe fails (whatever the recipe's own).
const MAKE_FAILED: i32 = 2;
/// The repository every test registers.
const REPO: &str = "local/demo";

/// A controller, an agent and a registered repository `local/demo`.
struct Setup {
    controller: Controller,
    agent: Agent,
    repo: GitRepo,
    api: Api,
}

async fn setup() -> Setup {
    setup_with(AgentOpts::default()).await
}

async fn setup_with(agent_opts: AgentOpts) -> Setup {
    let controller = Controller::start_default().await;
    let agent = Agent::start(&controller, agent_opts).await;
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    Setup {
        controller,
        agent,
        repo,
        api,
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A one-time variable that marks every process of one job, so the test can
/// find them in /proc.
fn marker() -> (String, String) {
    let value = hobotnica_tests::unique("job");
    ("E2E_MARKER".to_owned(), value)
}

fn marker_entry(marker: &(String, String)) -> String {
    format!("{}={}", marker.0, marker.1)
}

/// Waits until make's processes for the marked job exist.
async fn wait_for_processes(marker: &(String, String)) {
    let entry = marker_entry(marker);
    wait_until(JOB_TIMEOUT, "the job's processes to start", || {
        let found = !processes_with_env(&entry).is_empty();
        async move { found }
    })
    .await;
}

/// Waits until no process of the marked job is left.
async fn wait_for_no_processes(marker: &(String, String), timeout: Duration) {
    let entry = marker_entry(marker);
    wait_until(timeout, "the job's processes to be gone", || {
        let left = processes_with_env(&entry);
        async move { left.is_empty() }
    })
    .await;
}

/// Kills whatever is left of the marked job (after an agent was SIGKILLed).
fn kill_marked(marker: &(String, String)) {
    signal_all(&processes_with_env(&marker_entry(marker)), Signal::SIGKILL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_end_to_end_and_its_log_holds_the_exact_interleaved_output() {
    let s = setup().await;
    let head = s.repo.head();

    let job = s.api.run_target(REPO, "interleave").await;
    assert_eq!(job.repo, REPO);
    assert_eq!(job.target, "interleave");
    assert_eq!(job.kind, "custom");
    assert_eq!(job.trigger, "api");
    assert_eq!(job.commit, head);
    assert_eq!(job.branch.as_deref(), Some("main"));
    assert!(
        matches!(job.state, JobState::Queued | JobState::Running),
        "a new job is {:?}",
        job.state
    );

    let done = s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.attempt, 1);
    assert_eq!(done.agent.as_deref(), Some(s.agent.name.as_str()));
    assert!(done.started_at.is_some() && done.finished_at.is_some());

    assert_eq!(s.api.output(job.id).await, INTERLEAVED_OUTPUT);
    let log = s.api.log(job.id).await;
    assert_eq!(s.api.log_from(job.id, 6).await, log[6..]);
    assert_eq!(
        text(&s.api.log_from(job.id, log.len() as u64).await),
        "",
        "reading from the end gives nothing"
    );

    // `make test` is a `test` job; both streams reach the log.
    let job = s.api.run_target(REPO, "test").await;
    assert_eq!(job.kind, "test");
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let log = text(&s.api.log(job.id).await);
    for line in ["hello from stdout", "hello from stderr", "tests passed"] {
        assert!(log.contains(line), "{line:?} missing from {log:?}");
    }
}

/// A finished job says where its time went: every phase's reading is
/// there, in the order the phases happen, between the job's creation and
/// its completion being recorded. The second job finds the commit in the
/// agent's cache and fetches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_shows_its_phase_timings_in_order() {
    let s = setup().await;
    for run in 0..2 {
        let job = s.api.run_target(REPO, "test").await;
        let done = s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
        let timings = done.timings.clone().expect("the job's timings");
        let created: chrono::DateTime<chrono::Utc> = done.created_at.parse().unwrap();
        let finished: chrono::DateTime<chrono::Utc> =
            done.finished_at.as_deref().unwrap().parse().unwrap();
        assert_eq!(timings.accepted_at, created);
        assert_eq!(timings.recorded_at, Some(finished));
        let mut previous = ("created", created);
        for (phase, at) in timings.phases() {
            let at = at.unwrap_or_else(|| panic!("no {phase} reading: {done:#?}"));
            assert!(
                at >= previous.1,
                "{phase} ({at}) before {} ({}): {done:#?}",
                previous.0,
                previous.1
            );
            assert!(at <= finished, "{phase} after finished_at: {done:#?}");
            previous = (phase, at);
        }
        if run == 1 {
            assert_eq!(timings.fetch_ran, Some(false), "{done:#?}");
        }
    }
    // A job still queued or running has none yet.
    let gate = s.controller.scratch_dir("gate").join("open");
    let body = json!({ "target": "gate", "env": { "E2E_GATE": gate.to_str().unwrap() } });
    let waiting = s.api.run_job(REPO, body).await;
    s.api
        .wait_for_log(waiting.id, "waiting for the gate", JOB_TIMEOUT)
        .await;
    assert!(s.api.job(waiting.id).await.timings.is_none());
    std::fs::write(&gate, b"").unwrap();
    s.api.wait_for_success(waiting.id, JOB_TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_fails_the_job_with_its_exit_code() {
    let s = setup().await;
    let job = s.api.run_target(REPO, "fail").await;
    let done = s
        .api
        .wait_for_state(job.id, &[JobState::Failed], JOB_TIMEOUT)
        .await;
    // The job's exit code is make's: GNU make exits 2 when a recipe fails,
    // and says which exit code the recipe had.
    assert_eq!(done.exit_code, Some(MAKE_FAILED));
    let output = s.api.output(job.id).await;
    assert!(output.starts_with("about to fail\n"), "output: {output:?}");
    assert!(
        output.contains("Error 3"),
        "make names the recipe's exit code: {output:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_and_branches_resolve_to_the_right_sha() {
    let s = setup().await;
    let first = s.repo.head();
    let second = s.repo.commit_version("2");
    s.repo.create_branch("feature");
    let feature = s.repo.commit_version("feature");
    s.repo.switch("main");

    let by_default = s.api.run_target(REPO, "version").await;
    let by_commit = s
        .api
        .run_job(REPO, json!({ "target": "version", "commit": first }))
        .await;
    let by_branch = s
        .api
        .run_job(REPO, json!({ "target": "version", "branch": "feature" }))
        .await;
    assert_eq!(by_default.commit, second, "default branch resolves to main");
    assert_eq!(by_default.branch.as_deref(), Some("main"));
    assert_eq!(by_commit.commit, first);
    assert_eq!(by_branch.commit, feature);
    assert_eq!(by_branch.branch.as_deref(), Some("feature"));

    for (job, expected) in [
        (&by_default, "version 2\n"),
        (&by_commit, "version 1\n"),
        (&by_branch, "version feature\n"),
    ] {
        let done = s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
        assert_eq!(done.commit, job.commit, "the commit does not change");
        assert_eq!(s.api.output(job.id).await, expected, "job {}", job.id);
    }

    // A new commit on main is seen: the agent's cached clone is refreshed.
    let third = s.repo.commit_version("3");
    let latest = s
        .api
        .run_job(REPO, json!({ "target": "version", "branch": "main" }))
        .await;
    assert_eq!(latest.commit, third);
    s.api.wait_for_success(latest.id, JOB_TIMEOUT).await;
    assert_eq!(s.api.output(latest.id).await, "version 3\n");

    // Uppercase hex names the same commit.
    let upper = s
        .api
        .run_job(
            REPO,
            json!({ "target": "version", "commit": first.to_ascii_uppercase() }),
        )
        .await;
    assert_eq!(upper.commit, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_environment_has_ci_variables_and_none_of_the_agents_own() {
    let secret = "ghp_e2eSecretLookingToken0123456789abcdefXYZ";
    let s = setup_with(AgentOpts {
        env: vec![
            ("VIRTUAL_ENV".to_owned(), "/opt/e2e-venv".to_owned()),
            ("GITHUB_TOKEN".to_owned(), secret.to_owned()),
            ("AWS_SECRET_ACCESS_KEY".to_owned(), secret.to_owned()),
            (
                "HTTPS_PROXY".to_owned(),
                "http://proxy.invalid:3128".to_owned(),
            ),
            ("HOBOTNICA_DRAIN_TIMEOUT".to_owned(), "31s".to_owned()),
        ],
        ..AgentOpts::default()
    })
    .await;
    let head = s.repo.head();

    let job = s
        .api
        .run_job(
            REPO,
            json!({
                "target": "env",
                "env": { "E2E_ONE_TIME": "hello one-time", "E2E_WITH_EQUALS": "a=b" },
            }),
        )
        .await;
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let log = text(&s.api.log(job.id).await);
    let output = s.api.output(job.id).await;
    let env: BTreeMap<&str, &str> = output
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();

    let id = job.id.to_string();
    for (name, value) in [
        ("CI", "true"),
        ("HOBOTNICA_JOB_ID", id.as_str()),
        ("HOBOTNICA_COMMIT", head.as_str()),
        ("HOBOTNICA_BRANCH", "main"),
        ("HOBOTNICA_REPO", REPO),
        ("HOBOTNICA_TARGET", "env"),
        ("E2E_ONE_TIME", "hello one-time"),
        ("E2E_WITH_EQUALS", "a=b"),
    ] {
        assert_eq!(env.get(name).copied(), Some(value), "{name} in:\n{log}");
    }
    for name in [
        "VIRTUAL_ENV",
        "GITHUB_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "HTTPS_PROXY",
        "HOBOTNICA_AGENT_TOKEN",
        "HOBOTNICA_LOG",
        "HOBOTNICA_DRAIN_TIMEOUT",
        "HOBOTNICA_CONTROLLER",
        "HOBOTNICA_WORK_DIR",
    ] {
        assert!(
            !env.contains_key(name),
            "{name} leaked into the job:\n{log}"
        );
    }
    for value in [
        secret,
        s.controller.agent_token.as_str(),
        s.controller.admin_token.as_str(),
        "/opt/e2e-venv",
        "proxy.invalid",
    ] {
        assert!(
            !log.contains(value),
            "{value:?} leaked into the job:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_of_one_repo_on_one_agent_each_see_their_own_commit() {
    let s = setup_with(AgentOpts {
        concurrency: 2,
        ..AgentOpts::default()
    })
    .await;
    let commit_a = s.repo.commit_version("A");
    let commit_b = s.repo.commit_version("B");
    let sync_dir = s.controller.scratch_dir("sync");
    let sync_dir = sync_dir.to_str().unwrap();

    let job_a = s
        .api
        .run_job(
            REPO,
            json!({ "target": "concurrent", "commit": commit_a, "env": { "E2E_SYNC_DIR": sync_dir } }),
        )
        .await;
    let job_b = s
        .api
        .run_job(
            REPO,
            json!({ "target": "concurrent", "commit": commit_b, "env": { "E2E_SYNC_DIR": sync_dir } }),
        )
        .await;
    // Each job waits until both run, so both succeeding proves they ran at once.
    for (job, commit, version) in [(&job_a, &commit_a, "A"), (&job_b, &commit_b, "B")] {
        let done = s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
        assert_eq!(&done.commit, commit);
        assert_eq!(done.agent.as_deref(), Some(s.agent.name.as_str()));
        assert_eq!(
            s.api.output(job.id).await,
            format!("version {version}\nboth jobs running\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_of_output_arrive_byte_exact() {
    let s = setup().await;
    let expected = tokio::task::spawn_blocking(big_output_sha256);

    let started = Instant::now();
    let job = s.api.run_target(REPO, "big").await;
    s.api
        .wait_for_success(job.id, Duration::from_secs(300))
        .await;
    let job_time = started.elapsed();
    let download = Instant::now();
    let (len, sha) = s.api.output_digest(job.id).await;
    let download_time = download.elapsed();
    println!(
        "50 MiB job: POST -> succeeded in {:.2}s, log read back in {:.2}s",
        job_time.as_secs_f64(),
        download_time.as_secs_f64()
    );
    assert_eq!(len, BIG_OUTPUT_BYTES, "log length");
    assert_eq!(sha, expected.await.unwrap(), "log sha256");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_agent_is_killed_becomes_lost_within_the_lease_timeout() {
    let mut s = setup().await;
    let marker = marker();
    let job = s
        .api
        .run_job(
            REPO,
            json!({ "target": "sleep", "env": { &marker.0: &marker.1 } }),
        )
        .await;
    s.api
        .wait_for_state(job.id, &[JobState::Running], JOB_TIMEOUT)
        .await;
    wait_for_processes(&marker).await;

    let killed = Instant::now();
    s.agent.kill9();
    let lease = s.controller.opts.lease_timeout;
    let lost = s
        .api
        .wait_for_state(job.id, &[JobState::Lost], lease + Duration::from_secs(8))
        .await;
    println!(
        "agent SIGKILL -> job lost in {:.2}s (lease timeout {lease:?})",
        killed.elapsed().as_secs_f64()
    );
    assert!(lost.finished_at.is_some());
    kill_marked(&marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restart_mid_job_is_a_non_event() {
    let mut s = setup().await;

    let finished = s.api.run_target(REPO, "test").await;
    s.api.wait_for_success(finished.id, JOB_TIMEOUT).await;
    let finished_log = s.api.log(finished.id).await;

    let gate = s.controller.scratch_dir("gate").join("open");
    let job = s
        .api
        .run_job(
            REPO,
            json!({ "target": "gate", "env": { "E2E_GATE": gate.to_str().unwrap() } }),
        )
        .await;
    s.api
        .wait_for_log(job.id, "waiting for the gate", JOB_TIMEOUT)
        .await;

    // An operator follows the log across the restart.
    let cwd = tempfile::tempdir().unwrap();
    let followed_path = cwd.path().join("followed.log");
    let mut follower = cli::command(Some(&s.controller), cwd.path())
        .args(["logs", "-f", &job.id.to_string()])
        .stdout(std::fs::File::create(&followed_path).unwrap())
        .spawn()
        .unwrap();
    wait_until(JOB_TIMEOUT, "`hobot logs -f` to print the log", || {
        let printed = std::fs::read_to_string(&followed_path).unwrap_or_default();
        async move { printed.contains("waiting for the gate") }
    })
    .await;

    s.controller.kill9();
    // The job finishes while no controller runs: its end and output must
    // still arrive once one is back.
    std::fs::write(&gate, b"").unwrap();
    s.controller.restart().await;
    let api = s.controller.api();

    let done = api.wait_for_success(job.id, JOB_TIMEOUT).await;
    assert_eq!(done.attempt, 1, "the job ran once");
    assert_eq!(
        api.output(job.id).await,
        "waiting for the gate\ngate opened\n"
    );
    let (status, stderr) = cli::wait_exit(&mut follower, "`hobot logs -f`").await;
    assert_eq!(status.code(), Some(0), "hobot logs -f: {stderr}");
    assert_eq!(
        std::fs::read(&followed_path).unwrap(),
        api.log(job.id).await,
        "`hobot logs -f` resumed where it was: {stderr}"
    );

    // What was there before the restart still is.
    let repos = api.get_json("/api/v1/repos").await;
    let names: Vec<&str> = repos["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|repo| repo["full_name"].as_str())
        .collect();
    assert_eq!(names, [REPO]);
    let before = api.job(finished.id).await;
    assert_eq!(before.state, JobState::Succeeded);
    assert_eq!(api.log(finished.id).await, finished_log);
    let ids: Vec<u64> = api.jobs("").await.iter().map(|job| job.id).collect();
    assert_eq!(ids, [job.id, finished.id], "jobs newest first");

    // The agent is back and takes new work.
    s.agent.wait_connected(&api).await;
    let after = api.run_target(REPO, "test").await;
    assert!(after.id > job.id, "job ids keep growing after a restart");
    api.wait_for_success(after.id, JOB_TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_and_its_processes_and_a_queued_one() {
    let s = setup_with(AgentOpts {
        concurrency: 1,
        ..AgentOpts::default()
    })
    .await;
    let marker = marker();
    let running = s
        .api
        .run_job(
            REPO,
            json!({ "target": "sleep", "env": { &marker.0: &marker.1 } }),
        )
        .await;
    s.api
        .wait_for_state(running.id, &[JobState::Running], JOB_TIMEOUT)
        .await;
    wait_for_processes(&marker).await;

    // The only slot is taken, so this one waits in the queue.
    let queued = s.api.run_target(REPO, "test").await;
    let cancelled = s.api.cancel(queued.id).await;
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(cancelled.started_at.is_none());

    let cancel_sent = Instant::now();
    s.api.cancel(running.id).await;
    let done = s
        .api
        .wait_for_state(running.id, &[JobState::Cancelled], Duration::from_secs(5))
        .await;
    let took = cancel_sent.elapsed();
    wait_for_no_processes(&marker, Duration::from_secs(5)).await;
    println!(
        "cancel -> cancelled in {:.2}s, processes gone in {:.2}s",
        took.as_secs_f64(),
        cancel_sent.elapsed().as_secs_f64()
    );
    assert!(done.finished_at.is_some());

    // Cancelling a finished job is a conflict.
    s.api
        .raw(
            Method::POST,
            &format!("/api/v1/jobs/{}/cancel", running.id),
            None,
        )
        .await
        .assert_problem(409);
    let queued = s.api.job(queued.id).await;
    assert_eq!(queued.state, JobState::Cancelled, "never ran");
    assert!(queued.agent.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_past_the_repository_timeout_is_timed_out() {
    let s = setup().await;
    let repo = s
        .api
        .register_repo_with(json!({ "name": "slow", "git_url": s.repo.url(), "timeout_secs": 2 }))
        .await;
    assert_eq!(repo["timeout_secs"], 2);
    let marker = marker();
    let posted = Instant::now();
    let job = s
        .api
        .run_job(
            "local/slow",
            json!({ "target": "sleep", "env": { &marker.0: &marker.1 } }),
        )
        .await;
    let done = s
        .api
        .wait_for_state(job.id, &[JobState::TimedOut], Duration::from_secs(30))
        .await;
    assert!(posted.elapsed() >= Duration::from_secs(2));
    assert!(done.finished_at.is_some());
    wait_for_no_processes(&marker, Duration::from_secs(5)).await;
}

/// A job that prints forever (`yes`) in a repository limited to 64 KiB of
/// log: the agent stops it like a timeout, the stored log holds the limit
/// and ends with a notice, and the job fails saying so. The next job on the
/// same agent, well under the limit, is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_printing_forever_is_stopped_at_its_log_limit_and_fails() {
    let s = setup().await;
    let repo = s
        .api
        .register_repo_with(
            json!({ "name": "chatty", "git_url": s.repo.url(), "max_log_bytes": 65536 }),
        )
        .await;
    assert_eq!(repo["max_log_bytes"], 65536);
    let makefile = format!("{MAKEFILE}\nforever:\n\t@yes\n");
    s.repo
        .commit(&[("Makefile", &makefile)], "a target that prints forever");
    let marker = marker();
    let posted = Instant::now();
    let job = s
        .api
        .run_job(
            "local/chatty",
            json!({ "target": "forever", "env": { &marker.0: &marker.1 } }),
        )
        .await;
    let done = s
        .api
        .wait_for_state(job.id, &[JobState::Failed], JOB_TIMEOUT)
        .await;
    let took = posted.elapsed();
    let message = done.message.unwrap_or_default();
    assert_eq!(
        message,
        "the log reached its limit of 64.0 KiB (65536 bytes); output stopped and the job was stopped"
    );
    wait_for_no_processes(&marker, Duration::from_secs(5)).await;

    let log = s.api.log(job.id).await;
    let notice = format!("[hobotnica] {message}\n");
    assert!(
        log.ends_with(notice.as_bytes()),
        "the log ends with the notice: {:?}",
        text(&log[log.len().saturating_sub(200)..])
    );
    // The limit's worth of log, a newline if it was cut mid-line, the notice.
    let kept = &log[..log.len() - notice.len()];
    assert!(
        kept.len() == 65536 || (kept.len() == 65537 && kept.ends_with(b"\n")),
        "{} bytes before the notice",
        kept.len()
    );
    assert!(text(kept).contains("y\ny\ny\n"), "yes ran");
    eprintln!("the job printing forever failed {took:?} after it was posted");

    let next = s.api.run_target("local/chatty", "test").await;
    let next = s.api.wait_for_success(next.id, JOB_TIMEOUT).await;
    assert_eq!(next.agent.as_deref(), Some(s.agent.name.as_str()));
    assert!(next.message.is_none(), "{:?}", next.message);
    let log = text(&s.api.log(next.id).await);
    assert!(!log.contains("reached its limit"), "{log}");
    assert_eq!(
        s.api.output(next.id).await,
        "hello from stdout\nhello from stderr\ntests passed\n"
    );
}

/// The controller's `--max-log-bytes` bounds what a repository may ask for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_cannot_raise_the_controllers_log_limit() {
    let controller = Controller::start(ControllerOpts {
        extra_args: vec!["--max-log-bytes".to_owned(), "64KiB".to_owned()],
        ..ControllerOpts::default()
    })
    .await;
    let api = controller.api();
    let repo = GitRepo::new();
    let problem = api
        .send_json(
            Method::POST,
            "/api/v1/repos",
            &json!({ "name": "big", "git_url": repo.url(), "max_log_bytes": 1_048_576 }),
        )
        .await
        .assert_problem(422);
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("max_log_bytes"), "{detail}");
    assert!(detail.contains("65536"), "{detail}");
    let registered = api.register_repo("small", &repo.url()).await;
    assert_eq!(registered["max_log_bytes"], Value::Null);
    let changed = api
        .send_json(
            Method::PATCH,
            "/api/v1/repos/local/small",
            &json!({ "max_log_bytes": 4096 }),
        )
        .await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    assert_eq!(changed.json()["max_log_bytes"], 4096);
    let reset = api
        .send_json(
            Method::PATCH,
            "/api/v1/repos/local/small",
            &json!({ "max_log_bytes": null }),
        )
        .await;
    assert_eq!(reset.status, 200, "{}", reset.text());
    assert_eq!(reset.json()["max_log_bytes"], Value::Null);

    // The same through `hobot`, in human sizes.
    let cwd = tempfile::tempdir().unwrap();
    let url = repo.url();
    let add = ["repos", "add", "cli", &url, "--max-log-bytes", "16KiB"];
    cli::run(Some(&controller), cwd.path(), &add)
        .await
        .success();
    let shown = cli::run(Some(&controller), cwd.path(), &["repos", "show", "cli"])
        .await
        .success();
    assert!(shown.contains("16.0 KiB (16384 bytes)"), "{shown}");
    let too_big = ["repos", "add", "huge", &url, "--max-log-bytes", "1MiB"];
    let out = cli::run(Some(&controller), cwd.path(), &too_big).await;
    assert_ne!(out.code(), Some(0), "{out:#?}");
    assert!(out.stderr.contains("max_log_bytes"), "{out:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_given_sigterm_finishes_its_job_takes_no_new_one_and_exits() {
    let mut s = setup().await;
    let gate = s.controller.scratch_dir("gate").join("open");
    let running = s
        .api
        .run_job(
            REPO,
            json!({ "target": "gate", "env": { "E2E_GATE": gate.to_str().unwrap() } }),
        )
        .await;
    s.api
        .wait_for_log(running.id, "waiting for the gate", JOB_TIMEOUT)
        .await;

    s.agent.sigterm();
    // The agent logs this once it has told the controller it takes no more.
    hobotnica_tests::wait_until(JOB_TIMEOUT, "the agent to start draining", || {
        let output = s.agent.output();
        async move { output.contains("shutting down; waiting for running jobs") }
    })
    .await;
    let queued_after = s.api.run_target(REPO, "test").await;

    // The new agent of an upgrade, started on the same work dir while the
    // old one drains, would clear the running job's tree: it refuses to
    // start, and says what to do instead.
    let mut second = Agent::spawn(
        &s.controller,
        AgentOpts {
            work_dir: Some(s.agent.work_dir()),
            ..AgentOpts::default()
        },
    );
    let refused = second.wait(JOB_TIMEOUT).await;
    assert_eq!(refused.code(), Some(1), "{}", second.output());
    let why = second.output();
    let holder = format!("another agent (pid {})", s.agent.pid().unwrap());
    assert!(why.contains(&holder), "{why}");
    assert!(why.contains("--work-dir"), "{why}");

    std::fs::write(&gate, b"").unwrap();
    let done = s.api.wait_for_success(running.id, JOB_TIMEOUT).await;
    assert_eq!(done.agent.as_deref(), Some(s.agent.name.as_str()));
    let status = s.agent.wait(JOB_TIMEOUT).await;
    assert!(status.success(), "the agent exits cleanly: {status}");
    assert_eq!(
        s.api.output(running.id).await,
        "waiting for the gate\ngate opened\n"
    );

    let waiting = s.api.job(queued_after.id).await;
    assert_eq!(
        waiting.state,
        JobState::Queued,
        "the draining agent must not take it: {waiting:#?}"
    );

    // Another agent takes it.
    let other = Agent::start_default(&s.controller).await;
    let done = s.api.wait_for_success(queued_after.id, JOB_TIMEOUT).await;
    assert_eq!(done.agent.as_deref(), Some(other.name.as_str()));
}

/// Asserts a problem+json with `status` whose `detail` names `field`.
fn assert_field_problem(response: &hobotnica_tests::RawResponse, status: u16, field: &str) {
    let problem = response.assert_problem(status);
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(field),
        "detail of a {status} does not name {field:?}: {problem}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_problem_json_and_creates_nothing() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    let repo = GitRepo::new();
    api.register_repo("demo", &repo.url()).await;
    let jobs_path = format!("/api/v1/repos/{REPO}/jobs");

    // Unknown things.
    for path in [
        "/api/v1/repos/local/nope",
        "/api/v1/jobs/999999",
        "/api/v1/jobs/999999/log",
    ] {
        api.raw(Method::GET, path, None).await.assert_problem(404);
    }
    api.raw(Method::POST, "/api/v1/jobs/999999/cancel", None)
        .await
        .assert_problem(404);
    api.send_json(
        Method::POST,
        "/api/v1/repos/local/nope/jobs",
        &json!({ "target": "test" }),
    )
    .await
    .assert_problem(404);

    // Malformed JSON.
    api.raw(Method::POST, &jobs_path, Some(b"{\"target\": "))
        .await
        .assert_problem(400);
    api.raw(Method::POST, "/api/v1/repos", Some(b"not json"))
        .await
        .assert_problem(400);

    // Missing target.
    let response = api
        .send_json(Method::POST, &jobs_path, &json!({ "branch": "main" }))
        .await;
    let status = if response.status == 400 { 400 } else { 422 };
    assert_field_problem(&response, status, "target");

    // Commits that are not 40 hex characters.
    for commit in [
        "abc123",
        "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
        "0123456789abcdef0123456789abcdef012345678",
        "HEAD",
    ] {
        let response = api
            .send_json(
                Method::POST,
                &jobs_path,
                &json!({ "target": "test", "commit": commit }),
            )
            .await;
        assert_field_problem(&response, 422, "commit");
    }

    // Branches and targets that could be read as commands, options or paths.
    let hostile = ["main;id", "$(id)", "`id`", "a..b", "-rf", "x y", "a|b"];
    for branch in hostile.iter().chain(&["feature/../../etc"]) {
        let response = api
            .send_json(
                Method::POST,
                &jobs_path,
                &json!({ "target": "test", "branch": branch }),
            )
            .await;
        assert_field_problem(&response, 422, "branch");
    }
    for target in hostile.iter().chain(&["..", "VAR=value"]) {
        let response = api
            .send_json(Method::POST, &jobs_path, &json!({ "target": target }))
            .await;
        assert_field_problem(&response, 422, "target");
    }

    // Repository names that are not one path component.
    for name in ["a/b", "..", "../etc", "-x", "a b", ""] {
        let response = api
            .send_json(
                Method::POST,
                "/api/v1/repos",
                &json!({ "name": name, "git_url": repo.url() }),
            )
            .await;
        assert_field_problem(&response, 422, "name");
    }
    let response = api
        .send_json(
            Method::POST,
            "/api/v1/repos",
            &json!({ "owner": "../x", "name": "ok", "git_url": repo.url() }),
        )
        .await;
    assert_field_problem(&response, 422, "owner");

    // A repository that exists already.
    api.send_json(
        Method::POST,
        "/api/v1/repos",
        &json!({ "name": "demo", "git_url": repo.url() }),
    )
    .await
    .assert_problem(409);

    // No token, a wrong token.
    for anonymous in [
        api.with_token(None),
        api.with_token(Some("wrong-token-0123456789")),
    ] {
        anonymous
            .raw(Method::GET, "/api/v1/repos", None)
            .await
            .assert_problem(401);
        anonymous
            .send_json(
                Method::POST,
                "/api/v1/repos",
                &json!({ "name": "sneaky", "git_url": repo.url() }),
            )
            .await
            .assert_problem(401);
        anonymous
            .send_json(Method::POST, &jobs_path, &json!({ "target": "test" }))
            .await
            .assert_problem(401);
    }

    // Nothing was created.
    let repos = api.get_json("/api/v1/repos").await;
    let names: Vec<&str> = repos["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|repo| repo["full_name"].as_str())
        .collect();
    assert_eq!(names, [REPO]);
    assert!(api.jobs("").await.is_empty(), "no job was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_does_not_exist_fails_quickly_with_a_clear_message() {
    let s = setup().await;
    let missing = "0123456789abcdef0123456789abcdef01234567";
    let posted = Instant::now();
    let job = s
        .api
        .run_job(REPO, json!({ "target": "test", "commit": missing }))
        .await;
    let done = s.api.wait_for_end(job.id, Duration::from_secs(30)).await;
    println!(
        "missing commit -> {} in {:.2}s",
        done.state,
        posted.elapsed().as_secs_f64()
    );
    assert_eq!(done.state, JobState::Failed, "{done:#?}");
    let names_it = |text: &str| text.contains(missing) || text.to_lowercase().contains("commit");
    let message = done.message.clone().unwrap_or_default();
    assert!(names_it(&message), "unclear message: {done:#?}");
    let log = text(&s.api.log(job.id).await);
    assert!(names_it(&log), "unclear log: {log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_queued_jobs_each_run_exactly_once() {
    let s = setup_with(AgentOpts {
        concurrency: 2,
        ..AgentOpts::default()
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(s.api.run_target(REPO, "id").await.id);
    }
    for id in &ids {
        let done = s.api.wait_for_success(*id, JOB_TIMEOUT).await;
        assert_eq!(done.attempt, 1, "job {id} ran once");
        assert_eq!(s.api.output(*id).await, format!("job {id}\n"));
    }
    let listed: Vec<u64> = s
        .api
        .jobs("limit=100")
        .await
        .iter()
        .map(|job| job.id)
        .collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hobot_registers_runs_follows_and_lists() {
    let controller = Controller::start_default().await;
    let agent = Agent::start_default(&controller).await;
    let repo = GitRepo::new();
    let api = controller.api();
    let cwd = tempfile::tempdir().unwrap();
    let hobot = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        let controller = &controller;
        let cwd = cwd.path().to_path_buf();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli::run(Some(controller), &cwd, &args).await
        }
    };

    let url = repo.url();
    let out = hobot(&["repos", "add", "demo", &url]).await.success();
    assert!(out.contains(REPO), "{out}");
    let out = hobot(&["repos", "ls"]).await.success();
    assert!(out.contains(REPO) && out.contains(&url), "{out}");
    let shown: Value =
        serde_json::from_str(&hobot(&["--json", "repos", "show", "demo"]).await.success()).unwrap();
    assert_eq!(shown["full_name"], REPO);

    // run --follow: the log on stdout, the job's exit code.
    let out = hobot(&["run", "demo", "test", "--follow"]).await;
    assert_eq!(out.code(), Some(0), "{out:#?}");
    let id = api.jobs("limit=1").await[0].id;
    assert_eq!(out.stdout, api.log(id).await, "stdout is the log");
    assert!(out.stdout_text().contains("hello from stdout"));
    assert!(out.stderr.contains(&format!("job {id}")), "{out:#?}");

    let out = hobot(&["run", "demo", "fail", "--follow"]).await;
    let failed = api.jobs("limit=1").await.remove(0);
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(out.code(), failed.exit_code, "{out:#?}");
    assert_eq!(out.code(), Some(MAKE_FAILED), "{out:#?}");
    assert_eq!(out.stdout, api.log(failed.id).await, "stdout is the log");
    let failed_id = failed.id;

    // logs -f follows a running job to its end.
    let gate = controller.scratch_dir("gate").join("open");
    let gate_env = format!("E2E_GATE={}", gate.display());
    let out = hobot(&["run", "demo", "gate", "--env", &gate_env])
        .await
        .success();
    let gate_id = queued_job_id(&out);
    api.wait_for_log(gate_id, "waiting for the gate", JOB_TIMEOUT)
        .await;
    let follower = cli::command(Some(&controller), cwd.path())
        .args(["logs", "-f", &gate_id.to_string()])
        .spawn()
        .unwrap();
    std::fs::write(&gate, b"").unwrap();
    let out = cli::finish(follower, &["logs", "-f"]).await;
    assert_eq!(out.code(), Some(0), "{out:#?}");
    assert_eq!(
        text(&make_output(&out.stdout)),
        "waiting for the gate\ngate opened\n"
    );
    assert_eq!(out.stdout, api.log(gate_id).await);
    let out = hobot(&["logs", &gate_id.to_string()]).await;
    assert_eq!(out.stdout, api.log(gate_id).await, "{out:#?}");
    let out = hobot(&["logs", "-f", &failed_id.to_string()]).await;
    assert_eq!(
        out.code(),
        Some(MAKE_FAILED),
        "logs -f of a finished job: {out:#?}"
    );

    // Listings.
    let listed: Value =
        serde_json::from_str(&hobot(&["jobs", "ls", "--json"]).await.success()).unwrap();
    let ids: Vec<u64> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [gate_id, failed_id, id]);
    let failed: Value = serde_json::from_str(
        &hobot(&["jobs", "ls", "--state", "failed", "--json"])
            .await
            .success(),
    )
    .unwrap();
    assert_eq!(failed["items"].as_array().unwrap().len(), 1);
    assert_eq!(failed["items"][0]["id"], failed_id);
    let table = hobot(&["jobs", "ls", "--repo", "demo"]).await.success();
    assert!(table.starts_with("ID "), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");
    let shown = hobot(&["jobs", "show", &failed_id.to_string()])
        .await
        .success();
    let field = |name: &str| {
        shown
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_owned())
    };
    assert_eq!(field("state:").as_deref(), Some("failed"), "{shown}");
    assert_eq!(
        field("exit code:").as_deref(),
        Some(MAKE_FAILED.to_string().as_str()),
        "{shown}"
    );
    let agents = hobot(&["agents", "ls"]).await.success();
    assert!(agents.contains(&agent.name), "{agents}");

    let out = hobot(&["repos", "rm", "demo"]).await;
    assert_eq!(out.code(), Some(0), "{out:#?}");
    api.raw(Method::GET, &format!("/api/v1/repos/{REPO}"), None)
        .await
        .assert_problem(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hobot_reports_api_errors_and_unreachable_controllers() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    let repo = GitRepo::new();
    api.register_repo("demo", &repo.url()).await;
    let cwd = tempfile::tempdir().unwrap();

    let out = cli::run(Some(&controller), cwd.path(), &["jobs", "show", "999999"]).await;
    assert_eq!(out.code(), Some(1), "{out:#?}");
    let problem = api
        .raw(Method::GET, "/api/v1/jobs/999999", None)
        .await
        .json();
    let expected = format!(
        "error: {}: {}",
        problem["title"].as_str().unwrap(),
        problem["detail"].as_str().unwrap()
    );
    assert!(out.stderr.starts_with(&expected), "{out:#?}");

    let out = cli::run(
        Some(&controller),
        cwd.path(),
        &["run", "demo", "test", "--commit", "abc"],
    )
    .await;
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert!(
        out.stderr.starts_with("error: ") && out.stderr.contains("commit"),
        "{out:#?}"
    );

    let out = cli::run(
        Some(&controller),
        cwd.path(),
        &["--token", "wrong-token-0123456789", "repos", "ls"],
    )
    .await;
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert!(out.stderr.starts_with("error: "), "{out:#?}");

    let closed = format!("http://{}", net::closed_addr());
    let out = cli::run(None, cwd.path(), &["--url", &closed, "repos", "ls"]).await;
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert!(
        out.stderr.contains(&closed) && out.stderr.contains("hobot up"),
        "{out:#?}"
    );
    let out = cli::run(None, cwd.path(), &["--grpc-url", &closed, "logs", "1"]).await;
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert!(out.stderr.contains(&closed), "{out:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hobot_up_serves_and_hobot_works_from_the_same_directory() {
    use std::os::unix::fs::PermissionsExt as _;

    hobotnica_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::new();
    let http = net::free_addr();
    let grpc = net::free_addr();
    let args = [
        "--listen",
        &http.to_string(),
        "--grpc-listen",
        &grpc.to_string(),
        "--lease-timeout",
        "2s",
    ];
    let (mut up, cwd) = cli::spawn_up(dir.path(), "hobot-up", &args.map(str::to_owned), &[]);
    let data_dir = cwd.join(".hobotnica");
    let controller_file = data_dir.join("controller.json");
    wait_until(
        Duration::from_secs(30),
        "hobot up to write controller.json",
        || {
            let exists = controller_file.is_file();
            async move { exists }
        },
    )
    .await;
    let urls: Value = serde_json::from_slice(&std::fs::read(&controller_file).unwrap()).unwrap();
    assert_eq!(urls["url"], format!("http://{http}"));
    assert_eq!(urls["grpc_url"], format!("http://{grpc}"));
    let admin_token = std::fs::read_to_string(data_dir.join("admin-token")).unwrap();
    let admin_token = admin_token.trim();
    wait_until(
        Duration::from_secs(30),
        "hobot up to print its URLs",
        || {
            let printed = up.stdout();
            let done = printed.contains(&format!("http://{http}/api/docs"))
                && printed.contains(admin_token);
            async move { done }
        },
    )
    .await;
    let agent_token = data_dir.join("agent-token");
    let mode = std::fs::metadata(&agent_token)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the agent token file is private");

    let api = Api::new(format!("http://{http}"), Some(admin_token));
    wait_until(
        Duration::from_secs(30),
        "the local agent to connect",
        || {
            let api = api.clone();
            async move {
                api.agents().await.iter().any(|agent| {
                    agent["name"] == "local-1" && agent["connected"].as_bool() == Some(true)
                })
            }
        },
    )
    .await;

    // No flags, no environment: the data directory says where and how.
    let url = repo.url();
    cli::run(None, &cwd, &["repos", "add", "demo", &url])
        .await
        .success();
    let out = cli::run(None, &cwd, &["run", "demo", "test", "--follow"]).await;
    assert_eq!(out.code(), Some(0), "{out:#?}");
    assert!(out.stdout_text().contains("hello from stdout"), "{out:#?}");
    let out = cli::run(None, &cwd, &["run", "demo", "fail", "--follow"]).await;
    assert_eq!(out.code(), Some(MAKE_FAILED), "{out:#?}");
    let agents = cli::run(None, &cwd, &["agents", "ls"]).await.success();
    assert!(agents.contains("local-1"), "{agents}");

    up.signal(Signal::SIGTERM);
    let status = up.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "hobot up exits 0 on SIGTERM: {status}");
    signal_all(&processes_in_dir(dir.path()), Signal::SIGKILL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_per_agent_token_disconnects_its_agent() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    let created = api
        .send_json(
            Method::POST,
            "/api/v1/agent-tokens",
            &json!({ "name": "build-box-1" }),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let created = created.json();
    let token = created["token"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    let listed = api.get_json("/api/v1/agent-tokens").await;
    assert!(
        !listed.to_string().contains(&token),
        "a token is shown only when created"
    );

    let mut agent = Agent::start(
        &controller,
        AgentOpts {
            env: vec![("HOBOTNICA_AGENT_TOKEN".to_owned(), token.clone())],
            ..AgentOpts::default()
        },
    )
    .await;
    let revoked = api
        .raw(Method::DELETE, &format!("/api/v1/agent-tokens/{id}"), None)
        .await;
    assert_eq!(revoked.status, 204);

    // The session closes and the token no longer registers: the agent stops.
    let status = agent.wait(JOB_TIMEOUT).await;
    assert!(!status.success(), "a revoked agent exits with an error");
    assert!(
        !agent.output().contains(&token),
        "the agent never prints its token"
    );
    let again = api
        .raw(Method::DELETE, &format!("/api/v1/agent-tokens/{id}"), None)
        .await;
    again.assert_problem(404);
}

/// A controller serving TLS (and, with `client_ca`, asking agents for a
/// client certificate) with `local/demo` registered.
async fn tls_controller(client_ca: bool) -> (Controller, GitRepo, Api) {
    let controller = Controller::start(ControllerOpts {
        tls: true,
        client_ca,
        ..ControllerOpts::default()
    })
    .await;
    let repo = GitRepo::new();
    let api = controller.api();
    assert!(api.base.starts_with("https://"), "{}", api.base);
    api.register_repo("demo", &repo.url()).await;
    (controller, repo, api)
}

/// A renewed certificate is picked up on SIGHUP by both listeners, without a
/// restart; a renewal that cannot be read leaves the previous certificate in
/// use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tls_certificate() {
    use hobotnica_tests::tls::TestPki;
    let (controller, _repo, api) = tls_controller(false).await;
    let live = controller.pki.as_ref().expect("a TLS controller").clone();
    let renewed_dir = tempfile::tempdir().unwrap();
    let renewed = TestPki::create(renewed_dir.path());
    let job = api.run_target(REPO, "test").await;
    api.cancel(job.id).await;
    // Whether a new connection (a fresh handshake) trusting only `pki`'s CA
    // gets an answer.
    let ready_trusting = |pki: &TestPki| {
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&pki.ca_pem()).unwrap()])
            .build()
            .unwrap();
        let url = format!("{}/readyz", controller.url());
        async move {
            client
                .get(url)
                .send()
                .await
                .is_ok_and(|answer| answer.status().is_success())
        }
    };
    let hangup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(controller.pid().unwrap() as i32),
            Signal::SIGHUP,
        )
        .unwrap();
    };

    // A half-written renewal: refused, the old certificate stays.
    std::fs::write(&live.server_key, b"not a key").unwrap();
    hangup();
    wait_until(
        JOB_TIMEOUT,
        "the controller to report the unreadable key",
        || async {
            controller
                .output()
                .contains("the previous one stays in use")
        },
    )
    .await;
    assert!(ready_trusting(&live).await);

    // The renewal lands whole: new handshakes present the new certificate.
    std::fs::copy(&renewed.server_cert, &live.server_cert).unwrap();
    std::fs::copy(&renewed.server_key, &live.server_key).unwrap();
    hangup();
    wait_until(
        JOB_TIMEOUT,
        "the renewed certificate to be presented",
        || ready_trusting(&renewed),
    )
    .await;
    assert!(
        !ready_trusting(&live).await,
        "the old certificate is no longer presented"
    );
    // gRPC too: `hobot logs -f` trusting only the renewed CA.
    std::fs::copy(&renewed.ca_cert, &live.ca_cert).unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let out = cli::run(
        Some(&controller),
        cwd.path(),
        &["logs", "-f", &job.id.to_string()],
    )
    .await;
    // The job's end came over the gRPC stream (a cancelled job exits 1).
    assert!(
        out.stderr.contains("cancelled before it started"),
        "{out:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_end_to_end_over_tls() {
    let (controller, _repo, api) = tls_controller(false).await;
    let agent = Agent::start_default(&controller).await;

    // controller.json tells local `hobot`s to use https.
    let urls: Value = serde_json::from_slice(
        &std::fs::read(controller.data_dir().join("controller.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(urls["url"], controller.url());
    assert_eq!(urls["grpc_url"], controller.grpc_url());

    // Over TLS, browsers are told to keep to it.
    let ready = api.raw(Method::GET, "/api/v1/jobs", None).await;
    assert_eq!(
        ready.header("strict-transport-security"),
        Some("max-age=31536000"),
        "{:?}",
        ready.headers
    );

    // Both listeners speak TLS only.
    let plain = reqwest::Client::new();
    for addr in [controller.http_addr, controller.grpc_addr] {
        let answer = plain.get(format!("http://{addr}/readyz")).send().await;
        assert!(
            answer.as_ref().map_or(true, |r| !r.status().is_success()),
            "plaintext on {addr} answered: {answer:?}"
        );
    }

    let job = api.run_target(REPO, "interleave").await;
    let done = api.wait_for_success(job.id, JOB_TIMEOUT).await;
    assert_eq!(done.agent.as_deref(), Some(agent.name.as_str()));
    assert_eq!(api.output(job.id).await, INTERLEAVED_OUTPUT);

    // hobot over https (REST) and TLS gRPC (logs -f), trusting the test CA
    // through HOBOTNICA_CA_CERT.
    let cwd = tempfile::tempdir().unwrap();
    let out = cli::run(Some(&controller), cwd.path(), &["repos", "ls"]).await;
    assert!(out.success().contains(REPO), "{out:#?}");
    let gate = controller.scratch_dir("gate").join("open");
    let gate_env = format!("E2E_GATE={}", gate.display());
    let out = cli::run(
        Some(&controller),
        cwd.path(),
        &["run", "demo", "gate", "--env", &gate_env],
    )
    .await;
    let gate_id = queued_job_id(&out.success());
    api.wait_for_log(gate_id, "waiting for the gate", JOB_TIMEOUT)
        .await;
    let follower = cli::command(Some(&controller), cwd.path())
        .args(["logs", "-f", &gate_id.to_string()])
        .spawn()
        .unwrap();
    std::fs::write(&gate, b"").unwrap();
    let out = cli::finish(follower, &["logs", "-f"]).await;
    assert_eq!(out.code(), Some(0), "{out:#?}");
    assert_eq!(out.stdout, api.log(gate_id).await);
    assert_eq!(
        text(&make_output(&out.stdout)),
        "waiting for the gate\ngate opened\n"
    );

    // Without the CA, hobot refuses the certificate and says what to do.
    let out = cli::command(Some(&controller), cwd.path())
        .env_remove("HOBOTNICA_CA_CERT")
        .args(["repos", "ls"])
        .spawn()
        .unwrap();
    let out = cli::finish(out, &["repos", "ls"]).await;
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert!(
        out.stderr.contains("certificate") && out.stderr.contains("--ca-cert"),
        "{out:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_the_ca_refuses_the_controllers_certificate() {
    let (controller, _repo, api) = tls_controller(false).await;
    let agent = Agent::spawn(
        &controller,
        AgentOpts {
            trust_controller_ca: false,
            ..AgentOpts::default()
        },
    );
    let job = api.run_target(REPO, "test").await;
    wait_until(
        JOB_TIMEOUT,
        "the agent to report the certificate error",
        || {
            let output = agent.output().to_lowercase();
            async move { output.contains("certificate") }
        },
    )
    .await;
    let listed = api.agents().await;
    assert!(
        !listed
            .iter()
            .any(|a| a["name"] == agent.name.as_str() && a["connected"] == true),
        "{listed:?}"
    );
    assert_eq!(
        api.job(job.id).await.state,
        JobState::Queued,
        "{}",
        agent.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_agents_with_a_client_certificate_take_jobs() {
    let (controller, _repo, api) = tls_controller(true).await;
    let job = api.run_target(REPO, "test").await;

    // Without a client certificate: refused for good, no job taken.
    let mut refused = Agent::spawn(&controller, AgentOpts::default());
    let status = refused.wait(JOB_TIMEOUT).await;
    assert!(!status.success(), "{}", refused.output());
    assert!(
        refused.output().contains("client certificate"),
        "{}",
        refused.output()
    );
    assert_eq!(api.job(job.id).await.state, JobState::Queued);

    // With one issued by the client CA: runs the job.
    let agent = Agent::start(
        &controller,
        AgentOpts {
            client_cert: true,
            ..AgentOpts::default()
        },
    )
    .await;
    let done = api.wait_for_success(job.id, JOB_TIMEOUT).await;
    assert_eq!(done.agent.as_deref(), Some(agent.name.as_str()));

    // Operators tail logs over the same gRPC listener without a client
    // certificate (the admin token is their credential).
    let cwd = tempfile::tempdir().unwrap();
    let out = cli::run(
        Some(&controller),
        cwd.path(),
        &["logs", "-f", &job.id.to_string()],
    )
    .await;
    assert_eq!(out.code(), Some(0), "{out:#?}");
    assert_eq!(out.stdout, api.log(job.id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_refuses_plaintext_on_a_non_loopback_address_unless_insecure() {
    use hobotnica_tests::daemon::{Daemon, Spec};

    hobotnica_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let http = net::free_addr();
    let grpc = net::free_addr();
    let spec = |name: &str, extra: &[&str]| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--data-dir".into(),
            dir.path().join(name).into(),
            "--listen".into(),
            format!("0.0.0.0:{}", http.port()).into(),
            "--grpc-listen".into(),
            grpc.to_string().into(),
        ];
        args.extend(extra.iter().map(Into::into));
        Spec {
            name: name.to_owned(),
            program: hobotnica_tests::bins::bin(hobotnica_tests::bins::CONTROLLER),
            args,
            env: vec![("HOBOTNICA_LOG".into(), "info".into())],
            cwd: Some(dir.path().to_path_buf()),
            log_dir: dir.path().to_path_buf(),
        }
    };

    let mut refused = Daemon::spawn(spec("refused", &[]));
    let status = refused.wait(Duration::from_secs(30)).await;
    assert!(!status.success(), "{}", refused.output());
    let stderr = refused.stderr();
    assert!(
        stderr.contains("refusing to serve plaintext on 0.0.0.0")
            && stderr.contains("--tls-cert")
            && stderr.contains("--insecure"),
        "{stderr}"
    );

    let mut insecure = Daemon::spawn(spec("insecure", &["--insecure"]));
    let api = Api::new(format!("http://{http}"), None);
    wait_until(
        Duration::from_secs(30),
        "the --insecure controller to answer",
        || {
            assert!(insecure.is_running(), "{}", insecure.output());
            let api = api.clone();
            async move {
                // Not listening yet is not an answer (and `raw` would panic).
                tokio::net::TcpStream::connect(http).await.is_ok()
                    && api.raw(Method::GET, "/readyz", None).await.status == 200
            }
        },
    )
    .await;
    assert!(
        insecure.stderr().contains("INSECURE"),
        "{}",
        insecure.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hobot_up_with_tls_serves_https_and_its_local_agents_need_no_certificate() {
    use hobotnica_tests::tls::TestPki;

    hobotnica_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(&dir.path().join("pki"));
    let repo = GitRepo::new();
    let http = net::free_addr();
    let grpc = net::free_addr();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let args = [
        "up".to_owned(),
        "--listen".to_owned(),
        http.to_string(),
        "--grpc-listen".to_owned(),
        grpc.to_string(),
        "--tls-cert".to_owned(),
        path(&pki.server_cert),
        "--tls-key".to_owned(),
        path(&pki.server_key),
        // Remote agents would need a client certificate; local ones do not.
        "--client-ca".to_owned(),
        path(&pki.ca_cert),
    ];
    let (mut up, cwd) = cli::spawn_up(dir.path(), "hobot-up-tls", &args[1..], &[]);
    let data_dir = cwd.join(".hobotnica");
    let controller_file = data_dir.join("controller.json");
    wait_until(
        Duration::from_secs(30),
        "hobot up to write controller.json",
        || {
            assert!(up.is_running(), "{}", up.output());
            let exists = controller_file.is_file();
            async move { exists }
        },
    )
    .await;
    let urls: Value = serde_json::from_slice(&std::fs::read(&controller_file).unwrap()).unwrap();
    assert_eq!(urls["url"], format!("https://{http}"));
    assert_eq!(urls["grpc_url"], format!("https://{grpc}"));
    let admin_token = std::fs::read_to_string(data_dir.join("admin-token")).unwrap();
    let api = Api::with_ca(
        format!("https://{http}"),
        Some(admin_token.trim()),
        Some(&pki.ca_pem()),
    );
    wait_until(
        Duration::from_secs(30),
        "the local agent to connect",
        || {
            let api = api.clone();
            async move {
                api.agents().await.iter().any(|agent| {
                    agent["name"] == "local-1" && agent["connected"].as_bool() == Some(true)
                })
            }
        },
    )
    .await;

    // hobot finds the https URLs in the data directory; --ca-cert trusts them.
    let ca = path(&pki.ca_cert);
    let url = repo.url();
    cli::run(
        None,
        &cwd,
        &["--ca-cert", &ca, "repos", "add", "demo", &url],
    )
    .await
    .success();
    let out = cli::run(
        None,
        &cwd,
        &["--ca-cert", &ca, "run", "demo", "test", "--follow"],
    )
    .await;
    assert_eq!(out.code(), Some(0), "{out:#?}");
    assert!(out.stdout_text().contains("hello from stdout"), "{out:#?}");

    up.signal(Signal::SIGTERM);
    let status = up.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "hobot up exits 0 on SIGTERM: {status}");
    signal_all(&processes_in_dir(dir.path()), Signal::SIGKILL);
}

/// Starts `hobot up` on free ports in `dir` and waits until its REST API
/// answers; returns it, its project directory and an admin client.
async fn start_up(
    dir: &std::path::Path,
    name: &str,
) -> (hobotnica_tests::daemon::Daemon, std::path::PathBuf, Api) {
    let http = net::free_addr();
    let grpc = net::free_addr();
    let args = [
        "--listen".to_owned(),
        http.to_string(),
        "--grpc-listen".to_owned(),
        grpc.to_string(),
    ];
    let (mut up, cwd) = cli::spawn_up(dir, name, &args, &[]);
    let token_file = cwd.join(".hobotnica/admin-token");
    wait_until(Duration::from_secs(30), "hobot up's admin token", || {
        assert!(up.is_running(), "{}", up.output());
        let exists = token_file.is_file();
        async move { exists }
    })
    .await;
    let token = std::fs::read_to_string(&token_file).unwrap();
    let api = Api::new(format!("http://{http}"), Some(token.trim()));
    wait_until(Duration::from_secs(30), "hobot up's REST API", || {
        let api = api.clone();
        async move {
            api.try_raw(Method::GET, "/readyz", None, &[])
                .await
                .is_ok_and(|answer| answer.status == 200)
        }
    })
    .await;
    (up, cwd, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hobot_up_says_which_jobs_a_stop_waits_for_and_a_second_ctrl_c_cancels_them() {
    hobotnica_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::new();
    repo.commit(
        &[("Makefile", "test:\n\t@echo started\n\t@sleep 600\n")],
        "a test that takes ten minutes",
    );
    let (mut up, cwd, api) = start_up(dir.path(), "hobot-up-stop").await;
    cli::run(None, &cwd, &["repos", "add", "demo", &repo.url()])
        .await
        .success();
    let job = api.run_target(REPO, "test").await;
    api.wait_for_log(job.id, "started", JOB_TIMEOUT).await;

    // A second hobot up in the same directory (on other ports) refuses to
    // start, saying why, and leaves the first and its job alone.
    let other_ports = [
        "--listen".to_owned(),
        net::free_addr().to_string(),
        "--grpc-listen".to_owned(),
        net::free_addr().to_string(),
    ];
    let (mut second, _) = cli::spawn_up(dir.path(), "hobot-up-second", &other_ports, &[]);
    let refused = second.wait(Duration::from_secs(60)).await;
    assert_eq!(refused.code(), Some(1), "{}", second.output());
    assert!(
        second
            .output()
            .contains("another hobot up (or controller) is using .hobotnica"),
        "{}",
        second.output()
    );
    assert!(up.is_running(), "{}", up.output());
    assert_eq!(api.job(job.id).await.state, JobState::Running);

    // The first Ctrl-C names the job it waits for and how not to wait.
    up.signal(Signal::SIGINT);
    let waiting = format!(
        "waiting up to 30 s for 1 running job to finish: #{} local/demo test",
        job.id
    );
    wait_until(
        Duration::from_secs(30),
        "hobot up to say what it waits for",
        || {
            let said = {
                let output = up.output();
                output.contains(&waiting) && output.contains("Press Ctrl-C again to cancel it now")
            };
            async move { said }
        },
    )
    .await;

    // The second cancels it: it ends cancelled, not lost a lease later.
    up.signal(Signal::SIGINT);
    let status = up.wait(Duration::from_secs(60)).await;
    assert!(
        up.output().contains("Cancelling the running jobs"),
        "{}",
        up.output()
    );
    assert!(status.success(), "{status}: {}", up.output());
    drop(up);
    let (mut again, _, api) = start_up(dir.path(), "hobot-up-again").await;
    let job = api.job(job.id).await;
    assert_eq!(job.state, JobState::Cancelled, "{job:?}");
    again.signal(Signal::SIGTERM);
    assert!(again.wait(Duration::from_secs(60)).await.success());
    signal_all(&processes_in_dir(dir.path()), Signal::SIGKILL);
}

#[tokio::test]
async fn hobot_refuses_a_value_on_the_command_line_and_an_unknown_repository_before_anything_else()
{
    let Setup {
        controller,
        api,
        repo: _repo,
        ..
    } = setup().await;
    let cwd = tempfile::tempdir().unwrap();

    // The value is read from stdin only: given as an argument, it is
    // refused with the way to pass it, and nothing is set.
    let out = cli::run(
        Some(&controller),
        cwd.path(),
        &["env", "set", "demo", "FOO", "bar"],
    )
    .await;
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert!(out.stderr.contains("read from stdin"), "{out:#?}");
    assert!(out.stderr.contains("hobot env set demo FOO"), "{out:#?}");
    assert!(api.env(REPO).await.is_empty());

    // An unknown repository is found before the value is read (stdin is
    // empty here: reading it first would complain about the value).
    let out = cli::run(
        Some(&controller),
        cwd.path(),
        &["env", "set", "nosuch", "FOO"],
    )
    .await;
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert!(out.stderr.to_lowercase().contains("not found"), "{out:#?}");

    // `deploys` of an unknown repository fails as `deploy` does, instead
    // of printing an empty table.
    let listed = cli::run(Some(&controller), cwd.path(), &["deploys", "nosuch"]).await;
    let deployed = cli::run(
        Some(&controller),
        cwd.path(),
        &["deploy", "nosuch", "--branch", "main"],
    )
    .await;
    assert_eq!(listed.code(), deployed.code(), "{listed:#?} {deployed:#?}");
    assert_ne!(listed.code(), Some(0), "{listed:#?}");
    assert!(listed.stdout.is_empty(), "{listed:#?}");
    assert!(
        listed.stderr.to_lowercase().contains("not found"),
        "{listed:#?}"
    );

    // A known repository's deploys are listed, newest first.
    let first = api.deploy(REPO, json!({ "branch": "main" })).await;
    let second = api.deploy(REPO, json!({ "branch": "main" })).await;
    let listed = cli::run(Some(&controller), cwd.path(), &["deploys", "demo"])
        .await
        .success();
    let ids: Vec<&str> = listed
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(
        ids,
        [second.id.to_string(), first.id.to_string()],
        "{listed}"
    );
    let one = cli::run(
        Some(&controller),
        cwd.path(),
        &["deploys", "demo", "--limit", "1"],
    )
    .await;
    assert_eq!(one.code(), Some(0), "{one:#?}");
    assert!(one.stderr.contains("--cursor"), "the next page: {one:#?}");
}

#[tokio::test]
async fn hobot_says_where_it_looked_for_a_controller_and_whose_token_was_refused() {
    let controller = Controller::start_default().await;
    let cwd = tempfile::tempdir().unwrap();

    // No flags and no `hobot up` here: it says it found none, and how to
    // point at one (whatever answers on the default address).
    let out = cli::run(None, cwd.path(), &["repos", "ls"]).await;
    assert_ne!(out.code(), Some(0), "{out:#?}");
    assert!(
        out.stderr.contains("no .hobotnica/controller.json here"),
        "{out:#?}"
    );
    assert!(out.stderr.contains("--data-dir"), "{out:#?}");

    // A URL but no token.
    let mut command = cli::command(None, cwd.path());
    command
        .args(["repos", "ls"])
        .env("HOBOTNICA_URL", controller.url());
    let out = cli::finish(command.spawn().unwrap(), &["repos", "ls"]).await;
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert!(out.stderr.contains("no token was given"), "{out:#?}");

    // A wrong token: where it came from, and where `hobot up` keeps its own.
    let wrong = hobotnica_common::token::new_token("hbt_admin");
    let mut command = cli::command(Some(&controller), cwd.path());
    command.args(["repos", "ls"]).env("HOBOTNICA_TOKEN", &wrong);
    let out = cli::finish(command.spawn().unwrap(), &["repos", "ls"]).await;
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert!(
        out.stderr
            .contains("the token from --token / HOBOTNICA_TOKEN, sent to"),
        "{out:#?}"
    );
    assert!(out.stderr.contains(".hobotnica/admin-token"), "{out:#?}");
    assert!(
        !out.stderr.contains(&wrong),
        "the token is never printed: {out:#?}"
    );

    // A log tail that cannot reach the gRPC address names the option that
    // sets it, not the REST one.
    let closed = format!("http://{}", net::free_addr());
    let mut command = cli::command(Some(&controller), cwd.path());
    command
        .args(["logs", "1"])
        .env("HOBOTNICA_GRPC_URL", &closed);
    let out = cli::finish(command.spawn().unwrap(), &["logs", "1"]).await;
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert!(out.stderr.contains(&closed), "{out:#?}");
    assert!(
        out.stderr.contains("--grpc-url / HOBOTNICA_GRPC_URL"),
        "{out:#?}"
    );
}

#[tokio::test]
async fn hobot_up_on_a_port_in_use_says_which_option_and_leaves_nothing_behind() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_addr = held.local_addr().unwrap().to_string();
    let grpc = net::free_addr().to_string();
    let cwd = tempfile::tempdir().unwrap();
    let out = cli::run(
        None,
        cwd.path(),
        &["up", "--listen", &held_addr, "--grpc-listen", &grpc],
    )
    .await;
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert!(
        out.stderr
            .contains(&format!("cannot listen on {held_addr}")),
        "{out:#?}"
    );
    assert!(out.stderr.contains("--listen"), "{out:#?}");
    assert!(
        !cwd.path().join(".hobotnica").exists(),
        "no data directory is made before the listeners are bound"
    );
}

/// The id in `hobot run`'s "job N queued: ..." line.
fn queued_job_id(stdout: &str) -> u64 {
    stdout
        .strip_prefix("job ")
        .and_then(|rest| rest.split_once(" queued: "))
        .and_then(|(id, _)| id.parse().ok())
        .unwrap_or_else(|| panic!("hobot run prints the job it queued: {stdout:?}"))
}

#[path = "e2e/redis_mode.rs"]
mod redis_mode;

#[path = "e2e/postgres_mode.rs"]
mod postgres_mode;

#[path = "e2e/github.rs"]
mod github;

#[path = "e2e/deploy.rs"]
mod deploy;

#[path = "e2e/sandbox.rs"]
mod sandbox;

#[path = "e2e/identity.rs"]
mod identity;

#[path = "e2e/half_open.rs"]
mod half_open;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_test_job_is_queued_again_once() {
    let controller = Controller::start_default().await;
    let mut agent = Agent::start_default(&controller).await;
    let repo = GitRepo::new();
    let gate = controller.scratch_dir("gate").join("open");
    // A `make test` that waits for the gate (a `test` kind job).
    repo.commit(
        &[(
            "Makefile",
            &hobotnica_tests::git::makefile_with_test_recipe(&[
                "echo waiting for the gate",
                "n=0; while [ ! -e \"$$E2E_GATE\" ]; do n=$$((n+1)); if [ $$n -gt 2400 ]; then exit 9; fi; sleep 0.05; done",
                "echo gate opened",
            ]),
        )],
        "a slow test",
    );
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    let job = api
        .run_job(
            REPO,
            json!({ "target": "test", "env": { "E2E_GATE": gate.to_str().unwrap() } }),
        )
        .await;
    api.wait_for_log(job.id, "waiting for the gate", JOB_TIMEOUT)
        .await;
    agent.kill9();
    api.wait_for_state(job.id, &[JobState::Lost], JOB_TIMEOUT)
        .await;

    // Queued again as a new job: same commit, one-time env, trigger retry.
    let api_ref = &api;
    let again = hobotnica_tests::wait_for(
        JOB_TIMEOUT,
        "the lost test to be queued again",
        || async move {
            api_ref
                .jobs(&format!("repo={REPO}&limit=10"))
                .await
                .into_iter()
                .find(|other| other.id > job.id)
        },
    )
    .await;
    assert_eq!(again.commit, job.commit);
    let view = api.get_json(&format!("/api/v1/jobs/{}", again.id)).await;
    assert_eq!(view["trigger"], "retry");
    assert_eq!(view["requested_by"], "automatic retry (agent lost)");
    assert_eq!(view["env_keys"], json!(["E2E_GATE"]));

    std::fs::write(&gate, b"").unwrap();
    let _other = Agent::start_default(&controller).await;
    api.wait_for_success(again.id, JOB_TIMEOUT).await;
    assert_eq!(
        api.job(job.id).await.state,
        JobState::Lost,
        "the lost job stays lost"
    );
}

#[path = "e2e/contract.rs"]
mod contract;

#[path = "e2e/privacy.rs"]
mod privacy;

#[path = "e2e/core_bugs.rs"]
mod core_bugs;

#[path = "e2e/connections.rs"]
mod connections;

/// Every answer — the API, its docs page, a 404 — carries the security
/// headers a browser needs (before: none): no framing, no MIME sniffing, no
/// referrer, a content security policy; and no HSTS without TLS. The docs
/// page works under that policy (no inline script).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_sends_security_headers() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    for path in [
        "/api/v1/jobs",
        "/api/docs/",
        "/api/openapi.json",
        "/no-such-page",
    ] {
        let answer = api.raw(Method::GET, path, None).await;
        let csp = answer.header("content-security-policy").unwrap_or_default();
        assert!(
            csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'self'"),
            "{path}: {:?}",
            answer.headers
        );
        assert_eq!(
            answer.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(answer.header("x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(
            answer.header("referrer-policy"),
            Some("no-referrer"),
            "{path}"
        );
        assert_eq!(answer.header("strict-transport-security"), None, "{path}");
    }
    let docs = api.raw(Method::GET, "/api/docs/", None).await;
    assert_eq!(docs.status, 200);
    let html = String::from_utf8_lossy(&docs.body).into_owned();
    for tag in html.split("<script").skip(1) {
        let tag = tag.split('>').next().unwrap_or_default();
        assert!(
            tag.contains("src="),
            "an inline script would be blocked by the policy: <script{tag}> in {html}"
        );
    }
    assert!(
        html.contains("<script"),
        "the docs page loads its scripts: {html}"
    );
}

/// A path that is not UTF-8 (`%FF`) in a repository's, a variable's or a
/// job's path parameter is a problem document like every other error
/// (before: axum's `text/plain`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_utf8_gets_problem_json() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    for (method, path) in [
        (Method::GET, "/api/v1/repos/local/%FF"),
        (Method::DELETE, "/api/v1/repos/local/demo/env/%FF"),
        (Method::GET, "/api/v1/jobs/%FF"),
        (Method::POST, "/webhooks/github/%FF"),
    ] {
        let answer = api.raw(method.clone(), path, None).await;
        answer.assert_problem(400);
    }
}

#[path = "e2e/terminal.rs"]
mod terminal;

/// Cancelled jobs through `hobot`: exit status, log, a wrong token.
#[path = "e2e/cancel.rs"]
mod cancel;

/// systemd readiness and the binaries' health checks.
#[path = "e2e/service.rs"]
mod service;

/// Notifications when jobs finish: Slack-compatible and signed webhooks.
#[path = "e2e/notifications.rs"]
mod notifications;

/// Blue-green switches of the controller behind nginx (deploy/blue-green).
#[path = "e2e/blue_green.rs"]
mod blue_green;

/// `--log-format json` and request ids: the fields, and no secret in a log.
#[path = "e2e/logs.rs"]
mod logs;

/// Snapshots: migrate, export and import between stores.
#[path = "e2e/snapshot.rs"]
mod snapshot;
