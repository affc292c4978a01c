//! A 50 MiB log through one embedded controller: end-to-end time, read-back
//! time, byte-exactness, the peak memory of the controller and agent, and
//! where the CPU went.

use std::time::Instant;

use hobotnica_tests::git::{BIG_OUTPUT_BYTES, big_output_sha256};
use hobotnica_tests::procs::{children_cpu_time, peak_rss_kib};
use hobotnica_tests::{Agent, Controller, GitRepo};

use super::cpu::CpuMeter;
use super::{JOB_TIMEOUT, REPO, mib};

pub async fn big_log() {
    let controller = Controller::start_default().await;
    let agent = Agent::start_default(&controller).await;
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    let expected = tokio::task::spawn_blocking(big_output_sha256);
    // The agent's clone first: the run measures the log, not cloning.
    let warm = api.run_target(REPO, "now").await;
    api.wait_for_success(warm.id, JOB_TIMEOUT).await;
    let expected = expected.await.unwrap();

    // The median of RUNS jobs, each read back: one run swings with
    // the machine.
    let mut meter = CpuMeter::new();
    meter.process("controller", controller.pid());
    meter.process("agent", agent.pid());
    meter.descendants("the job: git, sandbox, make and seq", &[agent.pid()]);
    meter.start();
    let mut runs = Vec::with_capacity(RUNS);
    let mut exact = true;
    for _ in 0..RUNS {
        let started = Instant::now();
        let job = api.run_target(REPO, "big").await;
        api.wait_for_success(job.id, JOB_TIMEOUT).await;
        let job_time = started.elapsed();
        let read = Instant::now();
        let (len, sha) = api.output_digest(job.id).await;
        runs.push((job_time, read.elapsed()));
        exact &= len == BIG_OUTPUT_BYTES && sha == expected;
    }
    let busy: f64 = runs
        .iter()
        .map(|(job, read)| (*job + *read).as_secs_f64())
        .sum();
    meter.report(
        "50 MiB log, POST -> succeeded + read back",
        RUNS,
        busy,
        None,
    );
    runs.sort();
    let (job_time, read_time) = runs[RUNS / 2];
    let log_mib = BIG_OUTPUT_BYTES as f64 / (1024.0 * 1024.0);
    let checkout = repo.path().to_owned();
    let (floor, floor_cpu) = tokio::task::spawn_blocking(move || make_big_into_a_pipe(&checkout))
        .await
        .unwrap();
    println!(
        "50 MiB log: POST -> succeeded {:.2}s ({:.1} MiB/s), read back {:.2}s (median of {RUNS}), \
         byte-exact: {exact}",
        job_time.as_secs_f64(),
        log_mib / job_time.as_secs_f64(),
        read_time.as_secs_f64(),
    );
    println!(
        "50 MiB log: floor, the same `make big` into a pipe here: {:.2}s (CPU {:.2}s); POST -> \
         succeeded x{:.1}, + read back x{:.1}",
        floor.as_secs_f64(),
        floor_cpu.as_secs_f64(),
        job_time.as_secs_f64() / floor.as_secs_f64(),
        (job_time + read_time).as_secs_f64() / floor.as_secs_f64(),
    );
    println!(
        "50 MiB log: peak RSS (VmHWM): controller {}, agent {}",
        mib(controller.pid().and_then(peak_rss_kib)),
        mib(agent.pid().and_then(peak_rss_kib)),
    );
}

/// Runs of the 50 MiB job and of its floor.
const RUNS: usize = 5;

/// The machine's floor for the 50 MiB job: the median of [`RUNS`] runs of
/// the same `make big` in a checkout of the same repository, its output
/// read whole from a pipe; and the CPU time a run used, on average.
#[allow(clippy::disallowed_methods)]
fn make_big_into_a_pipe(checkout: &std::path::Path) -> (std::time::Duration, std::time::Duration) {
    let me = std::process::id();
    let cpu_before = children_cpu_time(me).unwrap_or_default();
    let mut runs: Vec<std::time::Duration> = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            let output = std::process::Command::new("make")
                .arg("big")
                .current_dir(checkout)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            assert!(output.status.success());
            assert_eq!(output.stdout.len() as u64, BIG_OUTPUT_BYTES);
            started.elapsed()
        })
        .collect();
    let cpu = children_cpu_time(me)
        .unwrap_or_default()
        .saturating_sub(cpu_before)
        / RUNS as u32;
    runs.sort();
    (runs[RUNS / 2], cpu)
}

/// Secret variables in the "with secrets" log throughput run.
const SECRETS: usize = 50;

/// Log throughput of the 50 MiB job with no secret to mask and with
/// [`SECRETS`] secret variables (each masked in three forms: value, base64,
/// and the controller's second pass), on one embedded controller.
pub async fn log_throughput_with_secrets() {
    let controller = Controller::start_default().await;
    let _agent = Agent::start_default(&controller).await;
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    for secrets in [0, SECRETS] {
        for n in 0..secrets {
            let value = format!(
                "secret-value-{n:03}-{}",
                hobotnica_common::token::random_hex(8)
            );
            api.set_env(REPO, &format!("SECRET_{n}"), &value, "all", true)
                .await;
        }
        let started = Instant::now();
        let job = api.run_target(REPO, "big").await;
        api.wait_for_success(job.id, JOB_TIMEOUT).await;
        let elapsed = started.elapsed();
        let rate = BIG_OUTPUT_BYTES as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64();
        println!(
            "log throughput with {secrets} secrets to mask: 50 MiB in {:.2}s = {rate:.1} MiB/s (POST -> succeeded)",
            elapsed.as_secs_f64()
        );
    }
}
