//! PostgreSQL mode: several controllers share one database (a server the
//! test starts on a free port) and agents connect to any of them. Faults: a
//! controller killed mid-stream, PostgreSQL restarted, a job no controller
//! was told about.

use super::*;
use hobotnica_tests::ControllerOpts;
use hobotnica_tests::postgres::PostgresServer;

/// Two controllers on one database, with `local/demo` registered.
struct Cluster {
    postgres: PostgresServer,
    a: Controller,
    b: Controller,
    _repo: GitRepo,
}

async fn cluster() -> Cluster {
    let postgres = PostgresServer::start().await;
    let a = Controller::start(ControllerOpts {
        postgres_url: Some(postgres.url()),
        ..ControllerOpts::default()
    })
    .await;
    let b = Controller::start(a.peer_opts()).await;
    let repo = GitRepo::new();
    a.api().register_repo("demo", &repo.url()).await;
    Cluster {
        postgres,
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
async fn a_cancel_through_one_controller_reaches_a_job_run_through_the_other() {
    let c = cluster().await;
    let _agent = Agent::start(&c.b, AgentOpts::default()).await;
    let job = c.a.api().run_target(REPO, "sleep").await;
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
async fn a_postgres_restart_loses_no_queued_or_running_job() {
    let mut c = cluster().await;
    let count_file = c.a.scratch_dir("count").join("ids");
    let gate = c.a.scratch_dir("gate").join("open");
    let api = c.a.api();
    let agent = Agent::start(&c.b, AgentOpts::default()).await;
    let gated = json!({ "target": "gate", "env": { "E2E_GATE": gate.to_str().unwrap() } });
    let running = api.run_job(REPO, gated.clone()).await;
    api.wait_for_log(running.id, "waiting for the gate", JOB_TIMEOUT)
        .await;
    // The agent's other slot is busy too, so these stay queued.
    let blocker = api.run_job(REPO, gated).await;
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

    c.postgres.kill9();
    // While it is down, both controllers say so.
    for controller in [&c.a, &c.b] {
        let api = controller.api();
        api.raw(Method::GET, "/api/v1/jobs", None)
            .await
            .assert_problem(503);
        api.raw(Method::GET, "/readyz", None)
            .await
            .assert_problem(503);
    }
    c.postgres.restart().await;
    wait_until(
        JOB_TIMEOUT,
        "the controller to reach PostgreSQL again",
        || {
            let api = api.clone();
            async move { api.raw(Method::GET, "/readyz", None).await.status == 200 }
        },
    )
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
async fn two_hundred_jobs_through_two_controllers_run_exactly_once() {
    const JOBS: usize = 200;
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
    // Posted alternately to A and B.
    let mut ids = Vec::new();
    for n in 0..JOBS {
        let controller = if n % 2 == 0 { &c.a } else { &c.b };
        ids.push(controller.api().run_job(REPO, body.clone()).await.id);
    }
    ids.sort_unstable();
    let file = count_file.clone();
    wait_until(Duration::from_secs(600), "all 200 jobs to run", || {
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

/// A job that entered the queue with no notification at all (written
/// straight into the table, as a notification lost on its way would leave
/// it) still runs: idle sessions look at the queue on their own
/// (`wakeups::SAFETY_POLL`), whatever they were told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_nobody_was_told_about_still_runs() {
    let c = cluster().await;
    let agent = Agent::start(&c.b, AgentOpts::default()).await;
    let api = c.a.api();
    let first = api.run_target(REPO, "test").await;
    api.wait_for_success(first.id, JOB_TIMEOUT).await;
    // Once the agent's session has heartbeaten since, it has long made the
    // claim its freed slot asked for and waits idle: from here only a
    // wake-up or its own safety poll makes it look at the queue again.
    let last_seen = |agents: Vec<Value>| agents[0]["last_seen"].clone();
    let seen = last_seen(api.agents().await);
    wait_until(Duration::from_secs(60), "a heartbeat after the job", || {
        let (api, seen) = (api.clone(), seen.clone());
        async move { last_seen(api.agents().await) != seen }
    })
    .await;

    // A copy of that job, queued behind the controllers' backs.
    let id: u64 = c
        .postgres
        .psql(&format!(
            "WITH next AS (SELECT nextval('job_ids') AS id)
             INSERT INTO jobs (id, repo, kind, state, attempt, record)
             SELECT next.id, repo, kind, 'queued', 0,
                    (record::jsonb || jsonb_build_object(
                        'id', next.id, 'state', 'queued', 'attempt', 0,
                        'agent', null, 'agent_name', null, 'exit_code', null,
                        'message', null, 'started_at', null, 'finished_at', null,
                        'lease_expires_at', null, 'timings', null))::text
             FROM jobs, next WHERE jobs.id = {}
             RETURNING id",
            first.id
        ))
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let queued = Instant::now();
    let done = api.wait_for_success(id, Duration::from_secs(90)).await;
    println!(
        "a job queued without a notification ran after {:.1}s",
        queued.elapsed().as_secs_f64()
    );
    assert_eq!(done.agent.as_deref(), Some(agent.name.as_str()));
    assert!(text(&api.log(id).await).contains("hello from stdout\n"));
}

/// A controller started before its PostgreSQL waits for it (start order
/// does not matter): it keeps trying, migrates the schema once the server is
/// up, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_started_before_postgres_waits_for_it() {
    let mut postgres = PostgresServer::start().await;
    postgres.stop().await;
    // A plain listener on the server's port shows the controller trying
    // it; the connection is closed at once, as a server not up yet would.
    let listener = tokio::net::TcpListener::bind(postgres.addr).await.unwrap();
    let starting = tokio::spawn(Controller::start(ControllerOpts {
        postgres_url: Some(postgres.url()),
        ..ControllerOpts::default()
    }));
    let (attempt, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .expect("the controller tries to reach PostgreSQL")
        .unwrap();
    drop(attempt);
    drop(listener);
    assert!(!starting.is_finished(), "the controller is waiting");

    postgres.restart().await;
    let controller = starting
        .await
        .expect("the controller starts once PostgreSQL is up");
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    assert_eq!(
        api.get_json("/api/v1/repos/local/demo").await["name"],
        "demo"
    );
    assert_eq!(
        postgres.psql("SELECT max(version) FROM schema_version"),
        "1"
    );
}

/// `/metrics` in PostgreSQL mode measures the round trip to the database
/// and reads the fleet from it: a job queued through one controller is
/// counted by the other's gauges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_measure_the_round_trip_and_read_the_fleet_from_postgres() {
    let postgres = PostgresServer::start().await;
    let metrics = net::free_addr();
    let a = Controller::start(ControllerOpts {
        postgres_url: Some(postgres.url()),
        extra_args: vec!["--metrics-listen".to_owned(), metrics.to_string()],
        ..ControllerOpts::default()
    })
    .await;
    let b = Controller::start(ControllerOpts {
        extra_args: Vec::new(),
        ..a.peer_opts()
    })
    .await;
    let repo = GitRepo::new();
    b.api().register_repo("demo", &repo.url()).await;
    b.api().run_target(REPO, "test").await;
    let client = reqwest::Client::new();
    let url = format!("http://{metrics}/metrics");
    wait_until(JOB_TIMEOUT, "the queued job in A's gauges", || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let Ok(response) = client.get(&url).send().await else {
                return false;
            };
            let text = response.text().await.unwrap_or_default();
            let has = |prefix: &str, wanted: &str| {
                text.lines()
                    .any(|line| line.starts_with(prefix) && line.ends_with(wanted))
            };
            has("hobotnica_postgres_round_trip_seconds_count", "")
                && !has("hobotnica_postgres_round_trip_seconds_count", " 0")
                && has("hobotnica_jobs_queued", " 1")
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_reach_postgres_over_tls_with_a_private_ca() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = hobotnica_tests::tls::TestPki::create(pki_dir.path());
    let postgres = PostgresServer::start_tls(&pki).await;
    assert!(postgres.url().ends_with("sslmode=verify-full"));
    let controller = Controller::start(ControllerOpts {
        postgres_url: Some(postgres.url()),
        extra_args: vec![
            "--postgres-ca-cert".to_owned(),
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
    assert_eq!(
        postgres.psql(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name LIKE 'hobotnica-controller%'"
        ),
        "t",
        "every connection of the controller is encrypted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_unreachable_the_api_says_503_and_agents_hold_results() {
    // The tests' short lease (2 s) is shorter than an agent's longest
    // back-off between renewals (5 s): after the outage the controller
    // gives running jobs the lease plus a grace longer than that back-off,
    // so the job is not lost.
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

    c.postgres.stop().await;
    for controller in [&c.a, &c.b] {
        let api = controller.api();
        api.raw(Method::GET, "/api/v1/jobs", None)
            .await
            .assert_problem(503);
        api.raw(Method::GET, "/readyz", None)
            .await
            .assert_problem(503);
    }
    // The job finishes while PostgreSQL is gone; its agent keeps the result.
    std::fs::write(&gate, b"").unwrap();
    let outage = c.a.opts.lease_timeout + Duration::from_secs(1);
    tokio::time::sleep(outage).await; // an outage longer than the lease: time is the point here

    c.postgres.restart().await;
    let done = api.wait_for_success(job.id, JOB_TIMEOUT).await;
    assert_eq!(
        api.output(job.id).await,
        "waiting for the gate\ngate opened\n"
    );
    assert_eq!(done.attempt, 1);
    // Both controllers are still serving.
    c.b.api().job(job.id).await;
}
