//! Redis mode: several controllers share one Redis (started by the test on a
//! free port, with AOF) and agents connect to any of them. Faults: a
//! controller killed mid-stream, Redis restarted, Redis unreachable.

use super::*;
use hobotnica_tests::ControllerOpts;
use hobotnica_tests::redis::RedisServer;

/// Two controllers on one Redis, with `local/demo` registered.
pub(super) struct Cluster {
    pub(super) redis: RedisServer,
    pub(super) a: Controller,
    pub(super) b: Controller,
    _repo: GitRepo,
}

pub(super) async fn cluster() -> Cluster {
    let redis = RedisServer::start().await;
    let a = Controller::start(ControllerOpts {
        redis_url: Some(redis.url()),
        ..ControllerOpts::default()
    })
    .await;
    let b = Controller::start(a.peer_opts()).await;
    let repo = GitRepo::new();
    a.api().register_repo("demo", &repo.url()).await;
    Cluster {
        redis,
        a,
        b,
        _repo: repo,
    }
}

/// The ids a `count` job appended to `file`, in order.
fn counted(file: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|line| line.parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queued_through_one_controller_runs_on_an_agent_of_the_other() {
    let c = cluster().await;
    let agent = Agent::start(&c.b, AgentOpts::default()).await;

    let job = c.a.api().run_target(REPO, "test").await;
    let done = c.a.api().wait_for_success(job.id, JOB_TIMEOUT).await;
    assert_eq!(done.agent.as_deref(), Some(agent.name.as_str()));
    assert_eq!(c.b.api().job(job.id).await.state, JobState::Succeeded);

    // The log reads the same through either controller, from any offset.
    let via_a = c.a.api().log(job.id).await;
    assert_eq!(c.b.api().log(job.id).await, via_a);
    assert_eq!(c.b.api().log_from(job.id, 5).await, via_a[5..]);
    assert!(text(&via_a).contains("hello from stdout\n"));

    // And over gRPC through the controller the agent is not connected to.
    let cwd = tempfile::tempdir().unwrap();
    let tail = cli::run(Some(&c.a), cwd.path(), &["logs", "-f", &job.id.to_string()]).await;
    assert_eq!(tail.code(), Some(0), "{tail:?}");
    assert_eq!(tail.stdout, via_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_tail_cross_controllers() {
    let c = cluster().await;
    let _agent = Agent::start(&c.b, AgentOpts::default()).await;
    let job = c.a.api().run_target(REPO, "sleep").await;
    // Follow through A while the agent pushes to B.
    let cwd = tempfile::tempdir().unwrap();
    let follow = tokio::spawn({
        let command = cli::command(Some(&c.a), cwd.path())
            .args(["logs", "-f", &job.id.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        command.wait_with_output()
    });
    c.a.api()
        .wait_for_log(job.id, "sleeping", JOB_TIMEOUT)
        .await;

    let asked = Instant::now();
    c.a.api().cancel(job.id).await;
    let done =
        c.b.api()
            .wait_for_state(job.id, &[JobState::Cancelled], Duration::from_secs(5))
            .await;
    println!(
        "cancel through A -> cancelled on B's agent in {:.2}s",
        asked.elapsed().as_secs_f64()
    );
    assert!(done.finished_at.is_some());
    let tailed = follow.await.unwrap().unwrap();
    assert!(
        text(&tailed.stdout).contains("sleeping"),
        "the tail through A saw the output pushed to B: {}",
        text(&tailed.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_when_its_controller_dies_mid_log() {
    let mut c = cluster().await;
    let _agent = Agent::start(
        &c.b,
        AgentOpts {
            more_controllers: vec![c.a.grpc_url()],
            ..AgentOpts::default()
        },
    )
    .await;
    let expected = tokio::task::spawn_blocking(big_output_sha256);
    let job = c.a.api().run_target(REPO, "big").await;
    // Kill B once part of the 50 MiB has gone through it.
    let api = c.a.api();
    wait_until(JOB_TIMEOUT, "the first 5 MB of the log", || {
        let api = api.clone();
        async move { !api.log_from(job.id, 5_000_000).await.is_empty() }
    })
    .await;
    c.b.kill9();

    let done = api.wait_for_success(job.id, Duration::from_secs(300)).await;
    assert_eq!(done.attempt, 1, "the same attempt finished");
    let (len, sha) = api.output_digest(job.id).await;
    assert_eq!(len, BIG_OUTPUT_BYTES, "no byte lost or duplicated");
    assert_eq!(sha, expected.await.unwrap(), "byte-exact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_no_queued_or_running_job() {
    let mut c = cluster().await;
    let count_file = c.a.scratch_dir("count").join("ids");
    let gate = c.a.scratch_dir("gate").join("open");
    let api = c.a.api();
    let agent = Agent::start(&c.b, AgentOpts::default()).await;
    let running = api
        .run_job(
            REPO,
            json!({ "target": "gate", "env": { "E2E_GATE": gate.to_str().unwrap() } }),
        )
        .await;
    api.wait_for_log(running.id, "waiting for the gate", JOB_TIMEOUT)
        .await;
    // The agent's other slot is busy too, so these stay queued.
    let blocker = api
        .run_job(
            REPO,
            json!({ "target": "gate", "env": { "E2E_GATE": gate.to_str().unwrap() } }),
        )
        .await;
    api.wait_for_log(blocker.id, "waiting for the gate", JOB_TIMEOUT)
        .await;
    let mut queued = Vec::new();
    for _ in 0..5 {
        let job = api
            .run_job(
                REPO,
                json!({ "target": "count", "env": { "E2E_COUNT_FILE": count_file.to_str().unwrap() } }),
            )
            .await;
        queued.push(job.id);
    }

    c.redis.kill9();
    c.redis.restart().await;
    // The controller answers 503 until it has reconnected (a loaded
    // machine makes that visible): ask only once it is ready again.
    wait_until(JOB_TIMEOUT, "the controller to reach Redis again", || {
        let api = api.clone();
        async move { api.raw(Method::GET, "/readyz", None).await.status == 200 }
    })
    .await;
    std::fs::write(&gate, b"").unwrap();

    for id in [running.id, blocker.id] {
        let done = api.wait_for_success(id, JOB_TIMEOUT).await;
        assert_eq!(done.agent.as_deref(), Some(agent.name.as_str()));
    }
    for id in &queued {
        api.wait_for_success(*id, JOB_TIMEOUT).await;
    }
    let mut ran = counted(&count_file);
    ran.sort_unstable();
    assert_eq!(ran, queued, "every queued job ran exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_unreachable_the_api_says_503_and_agents_hold_results() {
    let mut c = cluster().await;
    let gate = c.a.scratch_dir("gate").join("open");
    let api = c.a.api();
    let _agent = Agent::start(&c.b, AgentOpts::default()).await;
    let job = api
        .run_job(
            REPO,
            json!({ "target": "gate", "env": { "E2E_GATE": gate.to_str().unwrap() } }),
        )
        .await;
    api.wait_for_log(job.id, "waiting for the gate", JOB_TIMEOUT)
        .await;

    c.redis.stop().await;
    for controller in [&c.a, &c.b] {
        let api = controller.api();
        api.raw(Method::GET, "/api/v1/jobs", None)
            .await
            .assert_problem(503);
        api.raw(Method::GET, "/readyz", None)
            .await
            .assert_problem(503);
    }
    // The job finishes while Redis is gone; its agent keeps the result.
    std::fs::write(&gate, b"").unwrap();
    let outage = c.a.opts.lease_timeout * 2;
    tokio::time::sleep(outage).await; // an outage longer than the lease: time is the point here

    c.redis.restart().await;
    let done = api.wait_for_success(job.id, JOB_TIMEOUT).await;
    assert_eq!(
        api.output(job.id).await,
        "waiting for the gate\ngate opened\n"
    );
    assert_eq!(done.attempt, 1);
    // Both controllers are still serving.
    c.b.api().job(job.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_jobs_through_two_controllers_run_exactly_once() {
    const JOBS: usize = 500;
    let c = cluster().await;
    let count_file = c.a.scratch_dir("count").join("ids");
    let mut agents = Vec::new();
    for (n, primary) in [&c.a, &c.b, &c.a, &c.b].into_iter().enumerate() {
        let other = if n % 2 == 0 { &c.b } else { &c.a };
        agents.push(
            Agent::start(
                primary,
                AgentOpts {
                    concurrency: 2,
                    more_controllers: vec![other.grpc_url()],
                    ..AgentOpts::default()
                },
            )
            .await,
        );
    }
    let body =
        json!({ "target": "count", "env": { "E2E_COUNT_FILE": count_file.to_str().unwrap() } });
    let started = Instant::now();
    let submit = |api: Api, body: Value| async move {
        let mut ids = Vec::new();
        for _ in 0..JOBS / 2 {
            ids.push(api.run_job(REPO, body.clone()).await.id);
        }
        ids
    };
    let (from_a, from_b) = tokio::join!(
        submit(c.a.api(), body.clone()),
        submit(c.b.api(), body.clone())
    );
    let mut ids: Vec<u64> = from_a.into_iter().chain(from_b).collect();
    ids.sort_unstable();
    let file = count_file.clone();
    wait_until(Duration::from_secs(600), "all 500 jobs to run", || {
        let file = file.clone();
        async move { counted(&file).len() >= JOBS }
    })
    .await;
    let api = c.a.api();
    for id in &ids {
        api.wait_for_success(*id, JOB_TIMEOUT).await;
    }
    println!(
        "{JOBS} jobs through 2 controllers on 4 agents in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let mut ran = counted(&count_file);
    ran.sort_unstable();
    assert_eq!(ran, ids, "each job ran exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_reach_redis_over_tls_with_a_private_ca() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = hobotnica_tests::tls::TestPki::create(pki_dir.path());
    let redis = RedisServer::start_tls(&pki).await;
    assert!(redis.url().starts_with("rediss://"));
    let controller = Controller::start(ControllerOpts {
        redis_url: Some(redis.url()),
        extra_args: vec![
            "--redis-ca-cert".to_owned(),
            pki.ca_cert.display().to_string(),
        ],
        ..ControllerOpts::default()
    })
    .await;
    let _agent = Agent::start_default(&controller).await;
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    let job = api.run_target(REPO, "test").await;
    api.wait_for_success(job.id, JOB_TIMEOUT).await;
    assert!(api.output(job.id).await.contains("hello from stdout"));
}

/// A controller started before its Redis waits for it (start order does not
/// matter): it keeps trying, and serves once Redis is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_started_before_redis_waits_for_it() {
    let mut redis = RedisServer::start().await;
    redis.stop().await;
    // A plain listener on Redis' port shows the controller trying it; the
    // connection is closed at once, as a Redis that is not up yet would.
    let listener = tokio::net::TcpListener::bind(redis.addr).await.unwrap();
    let starting = tokio::spawn(Controller::start(ControllerOpts {
        redis_url: Some(redis.url()),
        ..ControllerOpts::default()
    }));
    let (attempt, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .expect("the controller tries to reach Redis")
        .unwrap();
    drop(attempt);
    drop(listener);
    assert!(!starting.is_finished(), "the controller is waiting");

    redis.restart().await;
    let controller = starting
        .await
        .expect("the controller starts once Redis is up");
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    assert_eq!(
        api.get_json("/api/v1/repos/local/demo").await["name"],
        "demo"
    );
}
