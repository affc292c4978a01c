//! Half-open connections: a controller that vanishes without closing its
//! sockets (its host died, a route went away) is noticed by agents and log
//! tails through HTTP/2 pings within about twice `--keepalive`, after which
//! they go elsewhere; a job whose agent is cut off this way is `lost` within
//! the lease, and its processes are stopped once the agent is back. The
//! connections go through a proxy the test controls.

use hobotnica_tests::redis::RedisServer;
use hobotnica_tests::{Link, Proxy};

use super::*;

/// The agents' and tails' `--keepalive` here: a dead connection is noticed
/// within about two of these.
const KEEPALIVE: &str = "1s";
/// How long noticing a dead connection may take, with room for a slow
/// machine (the bound is about two keep-alive intervals).
const NOTICE_TIMEOUT: Duration = Duration::from_secs(15);

fn gate_job(gate: &std::path::Path, marker: &(String, String)) -> Value {
    json!({
        "target": "gate",
        "env": { "E2E_GATE": gate.to_str().unwrap(), &marker.0: &marker.1 },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_leaves_a_vanished_controller_for_the_other_and_its_job_finishes() {
    let redis = RedisServer::start().await;
    // A lease long enough to outlast noticing the dead connection: the job
    // must survive the switch, not be lost and retried.
    let a = Controller::start(ControllerOpts {
        redis_url: Some(redis.url()),
        lease_timeout: Duration::from_secs(10),
        ..ControllerOpts::default()
    })
    .await;
    let b = Controller::start(a.peer_opts()).await;
    let repo = GitRepo::new();
    let api = a.api();
    api.register_repo("demo", &repo.url()).await;
    let to_a = Proxy::start(a.grpc_addr).await;
    let to_b = Proxy::start(b.grpc_addr).await;
    let agent = Agent::start(
        &a,
        AgentOpts {
            controller_urls: Some(vec![to_a.url(), to_b.url()]),
            args: vec!["--keepalive".into(), KEEPALIVE.into()],
            concurrency: 1,
            ..AgentOpts::default()
        },
    )
    .await;
    assert_eq!(
        to_b.accepted(),
        0,
        "the agent starts on the first controller"
    );

    let gate = a.scratch_dir("gate").join("open");
    let marker = marker();
    let job = api.run_job(REPO, gate_job(&gate, &marker)).await;
    api.wait_for_log(job.id, "waiting for the gate", JOB_TIMEOUT)
        .await;

    // Controller a's host vanishes: its connections stay open and silent,
    // and so would new ones.
    to_a.set_link(Link::Blackhole);
    let vanished = Instant::now();
    wait_until(NOTICE_TIMEOUT, "the agent to fail over to b", || {
        let moved = to_b.open_connections() > 0;
        async move { moved }
    })
    .await;
    eprintln!(
        "the agent left the vanished controller after {:?}",
        vanished.elapsed()
    );

    // The job goes on through b: same attempt, whole log, success.
    std::fs::write(&gate, b"").unwrap();
    let done = b.api().wait_for_success(job.id, JOB_TIMEOUT).await;
    assert_eq!(done.attempt, 1, "the job was not lost: {done:?}");
    assert_eq!(done.agent.as_deref(), Some(agent.name.as_str()));
    assert_eq!(
        b.api().output(job.id).await,
        "waiting for the gate\ngate opened\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_agent_is_cut_off_is_lost_within_the_lease_and_stopped_when_it_is_back() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    let repo = GitRepo::new();
    api.register_repo("demo", &repo.url()).await;
    let link = Proxy::start(controller.grpc_addr).await;
    let mut agent = Agent::start(
        &controller,
        AgentOpts {
            controller_urls: Some(vec![link.url()]),
            args: vec!["--keepalive".into(), KEEPALIVE.into()],
            concurrency: 1,
            ..AgentOpts::default()
        },
    )
    .await;

    let gate = controller.scratch_dir("gate").join("open");
    let marker = marker();
    let job = api.run_job(REPO, gate_job(&gate, &marker)).await;
    api.wait_for_log(job.id, "waiting for the gate", JOB_TIMEOUT)
        .await;
    wait_for_processes(&marker).await;

    // The agent's host drops off the network: nothing it sends arrives.
    link.set_link(Link::Blackhole);
    let cut = Instant::now();
    let lease = controller.opts.lease_timeout;
    let lost = api
        .wait_for_state(job.id, &[JobState::Lost], lease + NOTICE_TIMEOUT)
        .await;
    eprintln!(
        "the cut-off job was lost after {:?} (lease {lease:?})",
        cut.elapsed()
    );
    assert!(lost.finished_at.is_some(), "{lost:?}");

    // The network comes back: the agent learns the job is gone and stops
    // it, then takes work again.
    link.set_link(Link::Open);
    let entry = marker_entry(&marker);
    wait_until(JOB_TIMEOUT, "the lost job's processes to stop", || {
        let left = processes_with_env(&entry);
        async move { left.is_empty() }
    })
    .await;
    agent.wait_connected(&api).await;
    let next = api.run_target(REPO, "test").await;
    api.wait_for_success(next.id, JOB_TIMEOUT).await;
    assert_eq!(
        api.job(job.id).await.state,
        JobState::Lost,
        "lost stays lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_tail_notices_a_vanished_controller_and_resumes_without_losing_a_byte() {
    let s = setup().await;
    let tail_link = Proxy::start(s.controller.grpc_addr).await;
    let gate = s.controller.scratch_dir("gate").join("open");
    let marker = marker();
    let job = s.api.run_job(REPO, gate_job(&gate, &marker)).await;
    s.api
        .wait_for_log(job.id, "waiting for the gate", JOB_TIMEOUT)
        .await;

    let cwd = tempfile::tempdir().unwrap();
    let followed_path = cwd.path().join("followed.log");
    let mut follower = cli::command(Some(&s.controller), cwd.path())
        .args(["logs", "-f", &job.id.to_string(), "--keepalive", KEEPALIVE])
        .env("HOBOTNICA_GRPC_URL", tail_link.url())
        .stdout(std::fs::File::create(&followed_path).unwrap())
        .spawn()
        .unwrap();
    wait_until(JOB_TIMEOUT, "`hobot logs -f` to print the log", || {
        let printed = std::fs::read_to_string(&followed_path).unwrap_or_default();
        async move { printed.contains("waiting for the gate") }
    })
    .await;

    // The tail's connection goes silent for good; a new one gets through.
    tail_link.stall_open_connections();
    let accepted = tail_link.accepted();
    wait_until(NOTICE_TIMEOUT, "the tail to reconnect", || {
        let again = tail_link.accepted() > accepted;
        async move { again }
    })
    .await;

    std::fs::write(&gate, b"").unwrap();
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let (status, stderr) = cli::wait_exit(&mut follower, "`hobot logs -f`").await;
    assert_eq!(status.code(), Some(0), "hobot logs -f: {stderr}");
    assert_eq!(
        std::fs::read(&followed_path).unwrap(),
        s.api.log(job.id).await,
        "`hobot logs -f` printed every byte once: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hobot_gives_up_on_a_controller_that_accepts_and_never_answers() {
    let controller = Controller::start_default().await;
    let rest = Proxy::start(controller.http_addr).await;
    rest.set_link(Link::Blackhole);
    let cwd = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let child = cli::command(Some(&controller), cwd.path())
        .env("HOBOTNICA_URL", rest.url())
        .args(["jobs", "ls"])
        .spawn()
        .unwrap();
    let output = cli::finish(child, &["jobs", "ls"]).await;
    let took = started.elapsed();
    assert_eq!(output.code(), Some(1), "{output:?}");
    assert!(
        output
            .stderr
            .contains(&format!("cannot reach the controller at {}", rest.url())),
        "{output:?}"
    );
    assert!(output.stderr.contains("no answer within 30s"), "{output:?}");
    assert!(
        took < Duration::from_secs(60),
        "hobot gave up after {took:?}"
    );
}
