//! Throughput: a [`Shape`]'s `id` jobs POSTed as fast as its clients can
//! (client `k` talks to controller `k`, round the controllers), run by its
//! agents (agent `n` connected to controller `n`, the others as its
//! fail-over list). Jobs name the commit, so a POST costs no `git
//! ls-remote` and the figure is about queueing and running. Time runs from
//! the first POST to the last `finished_at`. Then where the jobs' time went
//! under that load, phase by phase, and where the CPU went, process by
//! process, beside the CPU the same work costs without Hobotnica.

use std::time::{Duration, Instant};

use hobotnica_tests::{Agent, AgentOpts, Api, JobState};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::breakdown::{self, Sample};
use super::cpu::{self, CpuMeter};
use super::{JOB_TIMEOUT, Mode, REPO, Topology, now_ns, rfc3339_ns};

/// One throughput run's size.
#[derive(Clone, Copy)]
pub struct Shape {
    /// Jobs in the run.
    pub jobs: usize,
    /// Agents running them.
    pub agents: usize,
    /// `--concurrency` of each agent.
    pub slots: u32,
    /// Clients POSTing jobs at once, each one request after another.
    pub submitters: usize,
}

/// The runs: two agents of one slot each (the figure peers are compared
/// on), and the project's own four agents of two slots.
pub const SHAPES: [Shape; 2] = [
    Shape {
        jobs: 200,
        agents: 2,
        slots: 1,
        submitters: 2,
    },
    Shape {
        jobs: 300,
        agents: 4,
        slots: 2,
        submitters: 2,
    },
];

/// Deadline for the whole run.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

pub async fn throughput(mode: Mode, shape: Shape) {
    let Shape {
        jobs,
        agents: agent_count,
        slots,
        submitters: submitter_count,
    } = shape;
    let topology = Topology::start(mode).await;
    let mut agents = Vec::with_capacity(agent_count);
    for n in 0..agent_count {
        let agent = Agent::start(
            topology.controller(n),
            AgentOpts {
                concurrency: slots,
                more_controllers: topology.other_grpc_urls(n),
                ..AgentOpts::default()
            },
        )
        .await;
        agents.push(agent);
    }
    warm_up(&topology, agent_count * slots as usize).await;

    let mut meter = CpuMeter::new();
    for controller in &topology.controllers {
        meter.process("controllers", controller.pid());
    }
    for agent in &agents {
        meter.process("agents", agent.pid());
    }
    let agent_pids: Vec<_> = agents.iter().map(Agent::pid).collect();
    meter.descendants("the jobs: git, sandboxes and make", &agent_pids);
    meter.process("redis-server", topology.redis_pid());
    for pid in topology.postgres_pids() {
        meter.process("postgres (server and backends)", Some(pid));
    }
    meter.start();

    let body = json!({ "target": "id", "commit": topology.repo.head() });
    let started_ns = now_ns();
    let started = Instant::now();
    let mut submitters = JoinSet::new();
    for k in 0..submitter_count {
        let count = (k..jobs).step_by(submitter_count).count();
        submitters.spawn(submit(topology.controller(k).api(), body.clone(), count));
    }
    let mut last_ids = Vec::new();
    let mut ids = Vec::with_capacity(jobs);
    let mut posted = Vec::with_capacity(jobs);
    while let Some(submitted) = submitters.join_next().await {
        let submitted = submitted.unwrap();
        last_ids.extend(submitted.last().map(|(id, _)| *id));
        ids.extend(submitted.iter().map(|(id, _)| *id));
        posted.extend(submitted.iter().map(|(_, at)| *at));
    }
    let enqueue_time = started.elapsed();

    // Each client's last job first (one cheap request per poll), then the
    // rest, most of which have ended by then. The polling does not count:
    // the end is the latest `finished_at`.
    let api = topology.controller(0).api();
    for id in last_ids {
        api.wait_for_end(id, RUN_TIMEOUT).await;
    }
    let mut last_finished_ns = started_ns;
    let mut samples = Vec::with_capacity(ids.len());
    for (id, posted) in ids.iter().zip(posted) {
        let job = api.wait_for_end(*id, RUN_TIMEOUT).await;
        samples.push(Sample::new(posted, &job, None, None));
        assert_eq!(
            job.state,
            JobState::Succeeded,
            "job {id} of the throughput run: {job:#?}"
        );
        let finished = job.finished_at.as_deref().and_then(rfc3339_ns).unwrap();
        last_finished_ns = last_finished_ns.max(finished);
    }
    let wall = started.elapsed().as_secs_f64();
    let secs = (last_finished_ns - started_ns) as f64 / 1e9;
    let title = format!("{mode}, {agent_count} agents x {slots}");
    println!(
        "throughput ({title}): {} jobs, {submitter_count} clients: {:.1} jobs/s \
         ({secs:.2}s from the first POST to the last finished_at; POSTs done \
         after {:.2}s)",
        ids.len(),
        ids.len() as f64 / secs,
        enqueue_time.as_secs_f64(),
    );
    breakdown::report(&format!("throughput, {title}"), &samples, None);
    let origin = topology.repo.path().to_owned();
    let commit = topology.repo.head();
    let scratch = topology.controllers[0].scratch_dir("cpu-floor");
    let floor = tokio::task::spawn_blocking(move || cpu::floor_cpu_ms(&origin, &commit, &scratch))
        .await
        .unwrap();
    meter.report(&title, ids.len(), wall, Some(floor));
}

/// POSTs `count` jobs one after another; returns their ids in order, each
/// with when it was POSTed (ns since the Unix epoch).
async fn submit(api: Api, body: Value, count: usize) -> Vec<(u64, i128)> {
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let posted = now_ns();
        ids.push((api.run_job(REPO, body.clone()).await.id, posted));
    }
    ids
}

/// Fills every slot of every agent (`slots` in all) with a `gate` job,
/// waits until all of them run make (so each agent has its clone of the
/// repository), then opens the gate and waits for them to succeed.
async fn warm_up(topology: &Topology, slots: usize) {
    let gate = topology.controllers[0].scratch_dir("warm-up").join("open");
    let body = json!({ "target": "gate", "env": { "E2E_GATE": gate.to_str().unwrap() } });
    let api = topology.controller(0).api();
    let mut ids = Vec::new();
    for _ in 0..slots {
        ids.push(api.run_job(REPO, body.clone()).await.id);
    }
    for id in &ids {
        api.wait_for_log(*id, "waiting for the gate", JOB_TIMEOUT)
            .await;
    }
    std::fs::write(&gate, b"").unwrap();
    for id in &ids {
        api.wait_for_success(*id, JOB_TIMEOUT).await;
    }
}
