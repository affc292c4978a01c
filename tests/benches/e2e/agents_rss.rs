//! Controller memory with [`RSS_AGENTS`] real `hobotnica-agent` processes
//! (concurrency 1, each with its own temp work dir) connected to one
//! controller: all listed `connected` by `GET /api/v1/agents`, all heard
//! from again after they connected (a heartbeat round), and as many gRPC
//! connections open. Then the controller's `VmRSS` and `VmHWM`, and the
//! dispatch latency of a few jobs with that many idle agents (each queued
//! job wakes every idle session to try a claim).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use hobotnica_tests::net::established_connections;
use hobotnica_tests::procs::{peak_rss_kib, rss_kib};
use hobotnica_tests::{Agent, AgentOpts, Api, wait_for, wait_until};
use serde_json::Value;

use super::{JOB_TIMEOUT, Mode, REPO, Topology, mib, now_ns, report, rfc3339_ns};

/// Agents connected at once.
const RSS_AGENTS: usize = 200;
/// Sequential jobs for the dispatch latency with all those agents idle.
const CROWDED_DISPATCH_JOBS: usize = 20;
/// Deadline for all of them to connect.
const ALL_CONNECTED_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline for all of them to be heard from again: a heartbeat round
/// (`HEARTBEAT_INTERVAL` is 10 s) with room to spare.
const HEARTBEAT_ROUND_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn controller_rss_with_many_agents(mode: Mode) {
    let topology = Topology::start(mode).await;
    let controller = &topology.controllers[0];
    let pid = controller.pid().unwrap();
    let rss_before = rss_kib(pid);
    let api = controller.api();

    let started = Instant::now();
    let mut agents: Vec<Agent> = (0..RSS_AGENTS)
        .map(|_| {
            Agent::spawn(
                controller,
                AgentOpts {
                    concurrency: 1,
                    ..AgentOpts::default()
                },
            )
        })
        .collect();
    let names: HashSet<String> = agents.iter().map(|agent| agent.name.clone()).collect();
    let what = format!("{RSS_AGENTS} agents to connect");
    wait_until(ALL_CONNECTED_TIMEOUT, &what, || {
        for agent in &mut agents {
            if let Some(status) = agent.try_exit() {
                panic!(
                    "agent {} exited ({status}):\n{}",
                    agent.name,
                    agent.output()
                );
            }
        }
        let (api, names) = (&api, &names);
        async move { ours(api, names, |_| true).await == RSS_AGENTS }
    })
    .await;
    let connect_time = started.elapsed();

    // Every session has heartbeated since: they are alive, not just
    // recently seen.
    let connected_ns = now_ns();
    let what = format!("{RSS_AGENTS} agents to heartbeat");
    let heard_from_all = wait_for(HEARTBEAT_ROUND_TIMEOUT, &what, || {
        let (api, names) = (&api, &names);
        async move {
            let seen_since = |agent: &Value| {
                agent["last_seen"]
                    .as_str()
                    .and_then(rfc3339_ns)
                    .is_some_and(|seen| seen > connected_ns)
            };
            let count = ours(api, names, seen_since).await;
            (count == RSS_AGENTS).then_some(count)
        }
    })
    .await;
    let alive = agents
        .iter_mut()
        .map(Agent::is_running)
        .filter(|running| *running)
        .count();
    let connections = established_connections(controller.grpc_addr.port());
    let (rss, hwm) = (rss_kib(pid), peak_rss_kib(pid));
    let agent_rss: Vec<u64> = agents
        .iter()
        .filter_map(|agent| agent.pid().and_then(rss_kib))
        .collect();
    let agent_mean =
        (!agent_rss.is_empty()).then(|| agent_rss.iter().sum::<u64>() / agent_rss.len() as u64);
    println!(
        "controller RSS with {RSS_AGENTS} agents connected ({mode}): VmRSS={} VmHWM={} \
         (before the agents: VmRSS={}; {heard_from_all} listed connected and heartbeating, \
         {alive} processes alive, {connections} gRPC connections, all connected after \
         {:.1}s; mean agent VmRSS {})",
        mib(rss),
        mib(hwm),
        mib(rss_before),
        connect_time.as_secs_f64(),
        mib(agent_mean),
    );

    let mut to_started = Vec::with_capacity(CROWDED_DISPATCH_JOBS);
    for _ in 0..CROWDED_DISPATCH_JOBS {
        let posted = now_ns();
        let job = api.run_target(REPO, "id").await;
        let done = api.wait_for_success(job.id, JOB_TIMEOUT).await;
        if let Some(started) = done.started_at.as_deref().and_then(rfc3339_ns) {
            to_started.push((started - posted) as f64 / 1e6);
        }
    }
    report(
        &format!("dispatch with {RSS_AGENTS} idle agents ({mode}): REST POST -> started_at"),
        to_started,
    );
}

/// How many of the agents named in `names` `GET /api/v1/agents` lists as
/// connected and passing `check`.
async fn ours(api: &Api, names: &HashSet<String>, check: impl Fn(&Value) -> bool) -> usize {
    api.agents()
        .await
        .iter()
        .filter(|agent| {
            agent["name"]
                .as_str()
                .is_some_and(|name| names.contains(name))
                && agent["connected"].as_bool() == Some(true)
                && check(agent)
        })
        .count()
}
