//! End-to-end measurements over real processes (no assertions on speed):
//! dispatch latency of 100 sequential jobs (REST POST → make starts, and
//! POST → `started_at`), and a 50 MiB log (end-to-end time, read-back time,
//! peak RSS of the controller and the agent).
//!
//! `cargo build --release --workspace --bins && cargo bench -p hobotnica-tests`
//! (or point `HOBOTNICA_BIN_DIR` at other binaries).

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hobotnica_tests::git::{BIG_OUTPUT_BYTES, big_output_sha256};
use hobotnica_tests::procs::peak_rss_kib;
use hobotnica_tests::{Agent, AgentOpts, Controller, GitRepo};

/// Jobs in the dispatch latency run.
const DISPATCH_JOBS: usize = 100;
/// Deadline for one job.
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

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

async fn dispatch_latency() {
    let controller = Controller::start_default().await;
    let _agent = Agent::start(
        &controller,
        AgentOpts {
            concurrency: 1,
            ..AgentOpts::default()
        },
    )
    .await;
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    // Warm the agent's clone so the samples measure dispatch, not cloning.
    let warm = api.run_target("local/demo", "now").await;
    api.wait_for_success(warm.id, JOB_TIMEOUT).await;

    let mut to_make = Vec::with_capacity(DISPATCH_JOBS);
    let mut to_started = Vec::with_capacity(DISPATCH_JOBS);
    for _ in 0..DISPATCH_JOBS {
        let posted = now_ns();
        let job = api.run_target("local/demo", "now").await;
        let done = api.wait_for_success(job.id, JOB_TIMEOUT).await;
        let log = api.output(job.id).await;
        if let Ok(make_ns) = log.trim().parse::<i128>() {
            to_make.push((make_ns - posted) as f64 / 1e6);
        }
        if let Some(started) = done.started_at.as_deref().and_then(rfc3339_ns) {
            to_started.push((started - posted) as f64 / 1e6);
        }
    }
    report("dispatch: REST POST -> make runs the recipe", to_make);
    report("dispatch: REST POST -> started_at", to_started);
}

async fn big_log() {
    let controller = Controller::start_default().await;
    let agent = Agent::start_default(&controller).await;
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    let expected = tokio::task::spawn_blocking(big_output_sha256);

    let started = Instant::now();
    let job = api.run_target("local/demo", "big").await;
    api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let job_time = started.elapsed();
    let read = Instant::now();
    let (len, sha) = api.output_digest(job.id).await;
    let read_time = read.elapsed();
    let exact = len == BIG_OUTPUT_BYTES && sha == expected.await.unwrap();
    let mib = BIG_OUTPUT_BYTES as f64 / (1024.0 * 1024.0);
    println!(
        "50 MiB log: POST -> succeeded {:.2}s ({:.1} MiB/s), read back {:.2}s, byte-exact: {exact}",
        job_time.as_secs_f64(),
        mib / job_time.as_secs_f64(),
        read_time.as_secs_f64(),
    );
    let rss = |pid: Option<u32>| {
        pid.and_then(peak_rss_kib).map_or_else(
            || "?".to_owned(),
            |kib| format!("{:.1} MiB", kib as f64 / 1024.0),
        )
    };
    println!(
        "peak RSS (VmHWM): controller {}, agent {}",
        rss(controller.pid()),
        rss(agent.pid())
    );
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
    runtime.block_on(async {
        dispatch_latency().await;
        big_log().await;
    });
}
