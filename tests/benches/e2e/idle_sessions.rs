//! A thousand idle agents on one controller (or split between two sharing
//! Redis), held as [`IDLE_SESSIONS`] sessions in this process: each one
//! speaks the real protocol through the agent crate's own client code
//! (`Connection`: Register, the Session stream with its Hello, Capacity and
//! Heartbeats, CompleteJob), stays idle, and completes a job it is given at
//! once with success, so that what is measured is dispatch and the
//! controller, not make.
//!
//! With them all connected: each controller's `VmRSS`/`VmHWM` and the CPU
//! it spends over [`IDLE_WINDOW`] with nothing to do (heartbeats, and the
//! safety-net claims of idle sessions); then the dispatch latency of
//! [`JOBS`] sequential jobs, REST POST → the assignment reaches a session,
//! and REST POST → `started_at`. The same with one session, and the ratio.
//! With two controllers the jobs are POSTed to the first; the lone session
//! is connected to the last (so its jobs cross through Redis), and the
//! thousand are split between both.
//!
//! Each session holds one TCP connection here and one in the controller:
//! the bench raises its soft `RLIMIT_NOFILE` to the hard limit (the
//! controllers it starts inherit it) and says so.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hobotnica_agent::protocol::{
    AgentIdentity, Completion, Connection, HEARTBEAT_INTERVAL, SessionCommand, TlsOptions,
};
use hobotnica_common::job::Outcome;
use hobotnica_common::private_fs::Secret;
use hobotnica_tests::procs::{cpu_time, peak_rss_kib, rss_kib};
use hobotnica_tests::{unique, wait_until};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{JOB_TIMEOUT, Mode, REPO, Topology, mib, now_ns, percentile, report, rfc3339_ns};

/// Sessions held at once for the crowded figures.
const IDLE_SESSIONS: usize = 1000;
/// Sequential jobs in one dispatch run.
const JOBS: usize = 100;
/// Deadline for every session to register and open its stream.
const ALL_OPEN_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the controllers' idle CPU is measured: a few heartbeat rounds.
const IDLE_WINDOW: Duration = Duration::from_secs(30);
/// Deadline for a job's assignment to reach a session.
const ASSIGNED_TIMEOUT: Duration = Duration::from_secs(60);
/// The agents' keep-alive ping interval (`--keepalive`'s default).
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Latencies of one run, in milliseconds.
struct Latencies {
    to_assigned: Vec<f64>,
    to_started: Vec<f64>,
}

pub async fn idle_sessions(mode: Mode) {
    raise_file_limit();
    let alone = run(mode, 1).await;
    let crowded = run(mode, IDLE_SESSIONS).await;
    for (what, alone, crowded) in [
        (
            "REST POST -> assignment received",
            &alone.to_assigned,
            &crowded.to_assigned,
        ),
        (
            "REST POST -> started_at",
            &alone.to_started,
            &crowded.to_started,
        ),
    ] {
        let (mut alone, mut crowded) = (alone.clone(), crowded.clone());
        alone.sort_by(f64::total_cmp);
        crowded.sort_by(f64::total_cmp);
        println!(
            "dispatch {IDLE_SESSIONS} idle sessions vs 1 ({mode}), {what}: p50 x{:.2}, p99 x{:.2}",
            percentile(&crowded, 50.0) / percentile(&alone, 50.0),
            percentile(&crowded, 99.0) / percentile(&alone, 99.0),
        );
    }
}

/// Raises the soft limit on open files to the hard one: a thousand
/// sessions hold a thousand sockets here and as many in the controller.
fn raise_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        println!("RLIMIT_NOFILE: unknown");
        return;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        println!("RLIMIT_NOFILE raised from {soft} to {hard} (the controllers inherit it)");
    } else {
        println!("RLIMIT_NOFILE: {soft} (hard {hard})");
    }
}

/// One topology with `count` sessions: memory, idle CPU and dispatch.
async fn run(mode: Mode, count: usize) -> Latencies {
    let topology = Topology::start(mode).await;
    let (assigned_tx, mut assigned) = mpsc::unbounded_channel();
    let open = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let prefix = unique("idle");
    let started = Instant::now();
    let mut sessions = JoinSet::new();
    for n in 0..count {
        // The lone session sits on the last controller, as in `dispatch`.
        let controller = if count == 1 {
            topology.controllers.last().unwrap()
        } else {
            topology.controller(n)
        };
        sessions.spawn(session(
            controller.grpc_url(),
            controller.agent_token.clone(),
            format!("{prefix}-{n}"),
            assigned_tx.clone(),
            Arc::clone(&open),
            stop.clone(),
        ));
    }
    let what = format!("{count} sessions to open");
    wait_until(ALL_OPEN_TIMEOUT, &what, || {
        if let Some(ended) = sessions.try_join_next() {
            panic!("a session ended: {ended:?}");
        }
        let open = open.load(Ordering::Relaxed);
        async move { open == count }
    })
    .await;
    let open_after = started.elapsed();

    // Idle: what a crowd of sessions costs with nothing to do.
    let pids: Vec<u32> = topology
        .controllers
        .iter()
        .map(|controller| controller.pid().unwrap())
        .collect();
    let cpu_before: Vec<_> = pids.iter().map(|pid| cpu_time(*pid)).collect();
    let idle_started = Instant::now();
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle = idle_started.elapsed();
    for (n, (pid, before)) in pids.iter().zip(&cpu_before).enumerate() {
        let busy = cpu_time(*pid)
            .zip(*before)
            .map(|(after, before)| after.saturating_sub(before));
        // The sessions go round the controllers (the lone one: the last).
        let own = if count == 1 {
            usize::from(n + 1 == pids.len())
        } else {
            count / pids.len() + usize::from(n < count % pids.len())
        };
        println!(
            "controller {n} with {own} of {count} idle sessions ({mode}): VmRSS={} VmHWM={} \
             idle CPU {} over {:.0}s (all sessions open after {:.1}s)",
            mib(rss_kib(*pid)),
            mib(peak_rss_kib(*pid)),
            busy.map_or_else(
                || "?".to_owned(),
                |busy| format!("{:.1}%", busy.as_secs_f64() / idle.as_secs_f64() * 100.0)
            ),
            idle.as_secs_f64(),
            open_after.as_secs_f64(),
        );
    }

    let api = topology.controller(0).api();
    let mut latencies = Latencies {
        to_assigned: Vec::with_capacity(JOBS),
        to_started: Vec::with_capacity(JOBS),
    };
    // One job first: the first of anything warms caches and connections.
    for sample in 0..=JOBS {
        let posted = now_ns();
        let job = api.run_target(REPO, "now").await;
        let received = tokio::time::timeout(ASSIGNED_TIMEOUT, async {
            loop {
                let (id, at) = assigned.recv().await.expect("the sessions are held");
                if id == job.id {
                    return at;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("job {} was not assigned to any session", job.id));
        let done = api.wait_for_success(job.id, JOB_TIMEOUT).await;
        if sample == 0 {
            continue;
        }
        latencies.to_assigned.push((received - posted) as f64 / 1e6);
        if let Some(started) = done.started_at.as_deref().and_then(rfc3339_ns) {
            latencies.to_started.push((started - posted) as f64 / 1e6);
        }
    }
    report(
        &format!("dispatch with {count} idle sessions ({mode}): REST POST -> assignment received"),
        latencies.to_assigned.clone(),
    );
    report(
        &format!("dispatch with {count} idle sessions ({mode}): REST POST -> started_at"),
        latencies.to_started.clone(),
    );

    stop.cancel();
    while let Some(ended) = sessions.join_next().await {
        if let Ok(Err(error)) = ended {
            println!("a session failed: {error:#}");
        }
    }
    latencies
}

/// One idle agent: registers as `name`, opens its session with one free
/// slot, heartbeats as the agent does, and completes each job it is given
/// at once with success, telling `assigned` when the assignment arrived.
async fn session(
    grpc_url: String,
    token: String,
    name: String,
    assigned: mpsc::UnboundedSender<(u64, i128)>,
    open: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let connection = Connection::new(
        &[grpc_url],
        &Secret::new(token),
        AgentIdentity {
            name,
            labels: BTreeMap::new(),
            concurrency: 1,
        },
        &TlsOptions::default(),
        KEEPALIVE,
    )?;
    let registration = connection.register().await.context("register")?;
    let mut stream = connection
        .open_session(&registration.agent_id, 1)
        .await
        .context("open the session")?;
    open.fetch_add(1, Ordering::Relaxed);
    let mut received = 0u64;
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    // Jobs completed, by id: a repeated assignment is a bug worth seeing.
    let mut completed: HashMap<u64, u32> = HashMap::new();
    loop {
        let command = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = heartbeat.tick() => {
                stream.send_heartbeat();
                continue;
            }
            command = stream.next() => command.context("the session failed")?,
        };
        match command {
            Some(SessionCommand::Assign(spec)) => {
                let _ = assigned.send((spec.key.id.0, now_ns()));
                received += 1;
                stream.send_capacity(0, received);
                if let Some(attempt) = completed.insert(spec.key.id.0, spec.key.attempt) {
                    println!(
                        "job {} assigned again (attempt {attempt}, now {})",
                        spec.key.id, spec.key.attempt
                    );
                }
                connection
                    .complete_job(&Completion {
                        key: spec.key,
                        outcome: Outcome::Succeeded,
                        exit_code: Some(0),
                        message: String::new(),
                        log_length: 0,
                        duration: Duration::ZERO,
                        timings: Default::default(),
                    })
                    .await
                    .context("complete a job")?;
                stream.send_capacity(1, received);
            }
            Some(_) => {}
            None => anyhow::bail!("the controller ended the session"),
        }
    }
}
