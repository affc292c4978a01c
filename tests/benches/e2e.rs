//! End-to-end measurements over real processes (no assertions on speed;
//! one printed line per figure):
//!
//! - dispatch latency of 100 sequential jobs (REST POST → make runs the
//!   recipe, and POST → `started_at`): embedded; Redis with one controller;
//!   Redis with two controllers, the job POSTed to one and the agent
//!   connected to the other; PostgreSQL with one and with two controllers;
//!   with where the time goes, phase by phase
//!   (p50/p95 of each gap), beside the machine's floor for the same work
//!   without Hobotnica;
//! - throughput: 200 jobs POSTed as fast as two clients can, run by 2
//!   agents of one slot, and 300 jobs run by 4 agents of two slots: Redis
//!   and PostgreSQL with two controllers (one client and half the agents on
//!   each), and embedded; with where the jobs' time and the machine's CPU
//!   went;
//! - controller memory (`VmRSS`, `VmHWM`) with 200 agent processes
//!   connected: Redis and embedded;
//! - a thousand idle agent sessions held in this process through the agent
//!   crate's own client code: each controller's memory and idle CPU, and
//!   dispatch latency against one session (the ratio): embedded, and Redis
//!   with two controllers;
//! - a 50 MiB log (end-to-end time, read-back time, peak RSS of the
//!   controller and the agent);
//! - a snapshot of 1000 finished jobs with their logs: the file's size and
//!   the time to export it, import it and migrate it between stores.
//!
//! `cargo build --release --workspace --bins && cargo bench -p hobotnica-tests`
//! (or point `HOBOTNICA_BIN_DIR` at other binaries). Redis figures need
//! `redis-server` on the `PATH` (the harness starts its own, AOF with
//! `appendfsync always`).

#![allow(clippy::unwrap_used, clippy::print_stdout)]

#[path = "e2e/agents_rss.rs"]
mod agents_rss;
#[path = "e2e/big_log.rs"]
mod big_log;
#[path = "e2e/breakdown.rs"]
mod breakdown;
#[path = "e2e/cpu.rs"]
mod cpu;
#[path = "e2e/dispatch.rs"]
mod dispatch;
#[path = "e2e/export.rs"]
mod export;
#[path = "e2e/idle_sessions.rs"]
mod idle_sessions;
#[path = "e2e/sandbox.rs"]
mod sandbox;
#[path = "e2e/throughput.rs"]
mod throughput;
#[path = "e2e/webhooks.rs"]
mod webhooks;

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hobotnica_tests::postgres::PostgresServer;
use hobotnica_tests::redis::RedisServer;
use hobotnica_tests::{Controller, ControllerOpts, GitRepo};

/// Deadline for one job.
const JOB_TIMEOUT: Duration = Duration::from_secs(300);
/// The repository every measurement registers.
const REPO: &str = "local/demo";
/// Lease of the benches' controllers: the controller's default, not the
/// harness's short one, so that renewals cost what they cost in production.
const LEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Which store the controllers keep their state in, and how many of them
/// run side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// One controller with its own redb.
    Embedded,
    /// `controllers` controllers sharing one Redis.
    Redis { controllers: usize },
    /// `controllers` controllers sharing one PostgreSQL database.
    Postgres { controllers: usize },
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Embedded => f.write_str("embedded"),
            Mode::Redis { controllers: 1 } => f.write_str("redis, 1 controller"),
            Mode::Redis { controllers } => write!(f, "redis, {controllers} controllers"),
            Mode::Postgres { controllers: 1 } => f.write_str("postgres, 1 controller"),
            Mode::Postgres { controllers } => {
                write!(f, "postgres, {controllers} controllers")
            }
        }
    }
}

/// `count` controllers on the shared store `opts` names (the first one's
/// tokens for the others).
async fn sharing_one_store(opts: ControllerOpts, count: usize) -> Vec<Controller> {
    let mut controllers = vec![Controller::start(opts).await];
    for _ in 1..count {
        let peer = controllers[0].peer_opts();
        controllers.push(Controller::start(peer).await);
    }
    controllers
}

/// Controllers in one [`Mode`] with `local/demo` registered.
struct Topology {
    /// Dropped after the controllers (fields drop in order).
    controllers: Vec<Controller>,
    repo: GitRepo,
    redis: Option<RedisServer>,
    postgres: Option<PostgresServer>,
}

impl Topology {
    async fn start(mode: Mode) -> Topology {
        let opts = ControllerOpts {
            lease_timeout: LEASE_TIMEOUT,
            ..ControllerOpts::default()
        };
        let mut postgres = None;
        let (redis, controllers) = match mode {
            Mode::Embedded => (None, vec![Controller::start(opts).await]),
            Mode::Postgres { controllers: count } => {
                let server = PostgresServer::start().await;
                let opts = ControllerOpts {
                    postgres_url: Some(server.url()),
                    ..opts
                };
                postgres = Some(server);
                (None, sharing_one_store(opts, count).await)
            }
            Mode::Redis { controllers: count } => {
                let redis = RedisServer::start().await;
                let opts = ControllerOpts {
                    redis_url: Some(redis.url()),
                    ..opts
                };
                (Some(redis), sharing_one_store(opts, count).await)
            }
        };
        let repo = GitRepo::new();
        controllers[0]
            .api()
            .register_repo("demo", &repo.url())
            .await;
        Topology {
            controllers,
            repo,
            redis,
            postgres,
        }
    }

    /// The PostgreSQL server's processes (the postmaster and its
    /// backends, which serve the controllers' connections), on PostgreSQL.
    fn postgres_pids(&self) -> Vec<u32> {
        let Some(main) = self.postgres.as_ref().and_then(PostgresServer::pid) else {
            return Vec::new();
        };
        std::iter::once(main)
            .chain(hobotnica_tests::procs::children(main))
            .collect()
    }

    /// redis-server's process id, on Redis.
    fn redis_pid(&self) -> Option<u32> {
        self.redis.as_ref().and_then(RedisServer::pid)
    }

    /// Controller `n`, counting round the controllers.
    fn controller(&self, n: usize) -> &Controller {
        &self.controllers[n % self.controllers.len()]
    }

    /// The gRPC URLs of the controllers other than `n`'s (an agent's
    /// fail-over list).
    fn other_grpc_urls(&self, n: usize) -> Vec<String> {
        let own = n % self.controllers.len();
        self.controllers
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != own)
            .map(|(_, controller)| controller.grpc_url())
            .collect()
    }
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
        .unwrap_or(0)
}

fn rfc3339_ns(text: &str) -> Option<i128> {
    let time = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    time.timestamp_nanos_opt().map(i128::from)
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    if sorted_ms.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted_ms.len() - 1) as f64).round() as usize;
    sorted_ms[rank.min(sorted_ms.len() - 1)]
}

fn report(name: &str, mut samples_ms: Vec<f64>) {
    samples_ms.sort_by(f64::total_cmp);
    println!(
        "{name}: n={} p50={:.2}ms p99={:.2}ms max={:.2}ms",
        samples_ms.len(),
        percentile(&samples_ms, 50.0),
        percentile(&samples_ms, 99.0),
        samples_ms.last().copied().unwrap_or(f64::NAN),
    );
}

/// KiB as `12.3 MiB`, or `?` when unknown.
fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "?".to_owned(),
        |kib| format!("{:.1} MiB", kib as f64 / 1024.0),
    )
}

/// `/proc/loadavg`'s three load averages: other work on the machine skews
/// every figure here.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "?".to_owned(),
        |text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        },
    )
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs nothing.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    hobotnica_tests::init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "load average before: {} ({} CPUs)",
        load_average(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    // `cargo bench -p hobotnica-tests -- NAME` runs only the benches whose
    // name contains NAME (dispatch, throughput, agents, sessions, log,
    // export, sandbox, webhooks).
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let selected =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    runtime.block_on(async {
        if selected("dispatch") {
            for mode in [
                Mode::Embedded,
                Mode::Redis { controllers: 1 },
                Mode::Redis { controllers: 2 },
                Mode::Postgres { controllers: 1 },
                Mode::Postgres { controllers: 2 },
            ] {
                dispatch::dispatch_latency(mode).await;
            }
        }
        if selected("throughput") {
            for shape in throughput::SHAPES {
                for mode in [
                    Mode::Redis { controllers: 2 },
                    Mode::Postgres { controllers: 2 },
                    Mode::Embedded,
                ] {
                    throughput::throughput(mode, shape).await;
                }
            }
        }
        if selected("agents") {
            for mode in [Mode::Redis { controllers: 1 }, Mode::Embedded] {
                agents_rss::controller_rss_with_many_agents(mode).await;
            }
        }
        if selected("sessions") {
            for mode in [Mode::Embedded, Mode::Redis { controllers: 2 }] {
                idle_sessions::idle_sessions(mode).await;
            }
        }
        if selected("log") {
            big_log::big_log().await;
            big_log::log_throughput_with_secrets().await;
        }
        if selected("export") {
            export::export_size().await;
        }
        if selected("sandbox") {
            sandbox::sandbox_cost().await;
        }
        if selected("webhooks") {
            for (connections, in_flight) in webhooks::RUNS {
                for deliveries in [webhooks::Deliveries::Queuing, webhooks::Deliveries::Ignored] {
                    webhooks::webhook_intake(connections, in_flight, deliveries).await;
                }
            }
        }
    });
    println!("load average after: {}", load_average());
}
