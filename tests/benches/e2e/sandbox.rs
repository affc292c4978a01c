//! What the job sandbox costs: dispatch latency (POST -> make runs the
//! recipe) and the 50 MiB log (POST -> succeeded), each with the default
//! bubblewrap sandbox and with `--isolation none`, in one run.

use std::time::Instant;

use hobotnica_tests::{Agent, AgentOpts};

use super::{JOB_TIMEOUT, Mode, REPO, Topology, now_ns, report, rfc3339_ns};

/// Dispatch samples per isolation.
const JOBS: usize = 50;

pub async fn sandbox_cost() {
    for isolation in ["sandbox", "none"] {
        let topology = Topology::start(Mode::Embedded).await;
        let controller = topology.controllers.last().unwrap();
        let _agent = Agent::start(
            controller,
            AgentOpts {
                concurrency: 1,
                args: vec!["--isolation".to_owned(), isolation.to_owned()],
                ..AgentOpts::default()
            },
        )
        .await;
        let api = topology.controller(0).api();
        let warm = api.run_target(REPO, "now").await;
        api.wait_for_success(warm.id, JOB_TIMEOUT).await;

        let mut to_make = Vec::with_capacity(JOBS);
        let mut to_done = Vec::with_capacity(JOBS);
        for _ in 0..JOBS {
            let posted = now_ns();
            let job = api.run_target(REPO, "now").await;
            let done = api.wait_for_success(job.id, JOB_TIMEOUT).await;
            if let Some(finished) = done.finished_at.as_deref().and_then(rfc3339_ns) {
                to_done.push((finished - posted) as f64 / 1e6);
            }
            let log = api.output(job.id).await;
            if let Ok(make_ns) = log.trim().parse::<i128>() {
                to_make.push((make_ns - posted) as f64 / 1e6);
            }
        }
        report(
            &format!("isolation {isolation}: REST POST -> make runs the recipe"),
            to_make,
        );
        report(
            &format!("isolation {isolation}: REST POST -> finished_at"),
            to_done,
        );

        let started = Instant::now();
        let job = api.run_target(REPO, "big").await;
        api.wait_for_success(job.id, JOB_TIMEOUT).await;
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "isolation {isolation}: 50 MiB log POST -> succeeded {seconds:.2}s ({:.1} MiB/s)",
            50.0 / seconds
        );
    }
}
