//! Dispatch latency: 100 sequential `now` jobs, each POSTed once the one
//! before it has succeeded, on one idle agent (concurrency 1). The job goes
//! to the first controller and the agent is connected to the last, so with
//! two controllers every job crosses from one to the other through Redis.
//! Each with a trigger that names a branch (resolved by `git ls-remote`)
//! and one that names its commit (as a push webhook does). Then where the
//! time went, phase by phase, beside the machine's floor.

use hobotnica_tests::{Agent, AgentOpts, JobState};
use serde_json::json;

use super::breakdown::{self, Floors, Sample};
use super::{JOB_TIMEOUT, Mode, REPO, Topology, now_ns, report, rfc3339_ns};

/// Jobs in one dispatch latency run.
const DISPATCH_JOBS: usize = 100;

pub async fn dispatch_latency(mode: Mode) {
    let topology = Topology::start(mode).await;
    let agent_controller = topology.controllers.last().unwrap();
    let _agent = Agent::start(
        agent_controller,
        AgentOpts {
            concurrency: 1,
            ..AgentOpts::default()
        },
    )
    .await;
    let api = topology.controller(0).api();
    // Warm the agent's clone so the samples measure dispatch, not cloning.
    let warm = api.run_target(REPO, "now").await;
    api.wait_for_success(warm.id, JOB_TIMEOUT).await;

    // A trigger that names a branch (the controller resolves it with `git
    // ls-remote`), and one that names its commit, as a push webhook does.
    let commit = topology.repo.head();
    let mut runs = Vec::new();
    for (trigger, body) in [
        ("naming a branch", json!({ "target": "now" })),
        (
            "naming its commit",
            json!({ "target": "now", "commit": commit }),
        ),
    ] {
        let mut to_make = Vec::with_capacity(DISPATCH_JOBS);
        let mut to_started = Vec::with_capacity(DISPATCH_JOBS);
        let mut samples = Vec::with_capacity(DISPATCH_JOBS);
        for _ in 0..DISPATCH_JOBS {
            let posted = now_ns();
            let job = api.run_job(REPO, body.clone()).await;
            let (done, visible) = breakdown::wait_visible(&api, job.id).await;
            assert_eq!(done.state, JobState::Succeeded, "{done:#?}");
            let log = api.output(job.id).await;
            let recipe = log.trim().parse::<i128>().ok();
            if let Some(make_ns) = recipe {
                to_make.push((make_ns - posted) as f64 / 1e6);
            }
            if let Some(started) = done.started_at.as_deref().and_then(rfc3339_ns) {
                to_started.push((started - posted) as f64 / 1e6);
            }
            samples.push(Sample::new(posted, &done, recipe, Some(visible)));
        }
        report(
            &format!("dispatch ({mode}), a trigger {trigger}: REST POST -> make runs the recipe"),
            to_make,
        );
        report(
            &format!("dispatch ({mode}), a trigger {trigger}: REST POST -> started_at"),
            to_started,
        );
        runs.push((trigger, samples));
    }

    let origin = topology.repo.path().to_owned();
    let scratch = topology.controllers[0].scratch_dir("floors");
    let floors = tokio::task::spawn_blocking(move || Floors::measure(&origin, &commit, &scratch))
        .await
        .unwrap();
    for (trigger, samples) in &runs {
        breakdown::report(
            &format!("dispatch, {mode}, a trigger {trigger}"),
            samples,
            Some(&floors),
        );
    }
}
