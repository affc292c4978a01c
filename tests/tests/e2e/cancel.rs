//! Cancelled jobs as a `hobot` user sees them, in a `hobot up` directory:
//! every command that follows a job exits with the one documented status
//! for a cancelled job (130), whether the job was cancelled while queued or
//! while make ran; the log ends with the job's output and one line from
//! Hobotnica, not with make's confusion; and a wrong token is explained
//! without sending the user looking for a GitHub token.

use std::time::Duration;

use hobotnica_tests::{JobState, cli, wait_for};

use super::{JOB_TIMEOUT, start_up, text};

/// What `hobot` exits with when the job it follows was cancelled.
const EXIT_CANCELLED: i32 = 130;
/// The line the agent ends a cancelled job's log with.
const CANCEL_LINE: &str = "[hobotnica] cancelled\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_has_one_exit_status_and_a_clean_log() {
    hobotnica_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let (mut up, cwd, api) = start_up(dir.path(), "hobot-up-cancel").await;
    let repo = hobotnica_tests::GitRepo::new();
    cli::run(None, &cwd, &["repos", "add", "demo", &repo.url()])
        .await
        .success();
    // The gate never opens: make runs a shell looping over `sleep` until
    // the job is cancelled.
    let closed_gate = "E2E_GATE=/nonexistent/gate";
    let hobot = |args: &[&str]| {
        cli::command(None, &cwd)
            .args(args)
            .spawn()
            .expect("start hobot")
    };

    // run --follow, and logs -f beside it, on a job cancelled while make runs.
    let run = hobot(&["run", "demo", "gate", "--env", closed_gate, "--follow"]);
    let running = wait_for_job(&api, "gate", &[]).await;
    api.wait_for_log(running, "waiting for the gate", JOB_TIMEOUT)
        .await;
    let follower = hobot(&["logs", "-f", &running.to_string()]);
    // The deploy runs (and stays) while a second deploy waits for it.
    let deploy = hobot(&["deploy", "demo", "--env", closed_gate, "--follow"]);
    let deploying = wait_for_job(&api, "deploy", &[]).await;
    api.wait_for_log(deploying, "waiting for the gate", JOB_TIMEOUT)
        .await;
    let queued_deploy = hobot(&["deploy", "demo", "--follow"]);
    let queued = wait_for_job(&api, "deploy", &[deploying]).await;
    assert_eq!(api.job(queued).await.state, JobState::Queued);

    for id in [queued, running, deploying] {
        cli::run(None, &cwd, &["jobs", "cancel", &id.to_string()])
            .await
            .success();
    }
    let followed = [
        ("run --follow", running, run),
        ("logs -f", running, follower),
        ("deploy --follow (running)", deploying, deploy),
        ("deploy --follow (queued)", queued, queued_deploy),
    ];
    for (what, id, child) in followed {
        let out = cli::finish(child, &[what]).await;
        assert_eq!(out.code(), Some(EXIT_CANCELLED), "{what}: {out:#?}");
        assert!(
            out.stderr.contains(&format!("job {id} cancelled")),
            "{what} says how the job ended: {out:#?}"
        );
    }
    // Following a job that was cancelled earlier says the same.
    let out = cli::run(None, &cwd, &["logs", "-f", &running.to_string()]).await;
    assert_eq!(out.code(), Some(EXIT_CANCELLED), "{out:#?}");

    for id in [running, deploying] {
        let job = api.job(id).await;
        assert_eq!(job.state, JobState::Cancelled);
        assert_eq!(job.exit_code, None, "make was stopped, it did not end");
        let log = text(&api.log(id).await);
        assert!(!log.contains("No child processes"), "{log}");
        assert_eq!(log.matches("[hobotnica] cancelled").count(), 1, "{log}");
        assert!(log.ends_with(CANCEL_LINE), "{log}");
        assert!(log.contains("waiting for the gate"), "{log}");
    }
    let job = api.job(queued).await;
    assert_eq!((job.state, job.exit_code), (JobState::Cancelled, None));

    // A wrong token: the controller's answer, which token went where, and
    // where `hobot up` keeps the right one; nothing about GitHub.
    let out = cli::run(None, &cwd, &["--token", "hbt_admin_wrong", "jobs", "ls"]).await;
    assert_eq!(out.code(), Some(1), "{out:#?}");
    let url = &api.base;
    assert_eq!(
        out.stderr.trim_end(),
        format!(
            "error: Unauthorized: the token is not the admin token (the token from --token / \
             HOBOTNICA_TOKEN, sent to {url}). A `hobot up` controller keeps its admin token in \
             .hobotnica/admin-token; hobot reads it by itself when run in that directory \
             without --token."
        ),
        "{out:#?}"
    );

    up.signal(nix::sys::signal::Signal::SIGTERM);
    let status = up.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "hobot up exits 0 on SIGTERM: {status}");
}

/// The id of the newest job of `target` that is not in `known`, once it
/// exists.
async fn wait_for_job(api: &hobotnica_tests::Api, target: &str, known: &[u64]) -> u64 {
    wait_for(JOB_TIMEOUT, "the job to be queued", || {
        let api = api.clone();
        let known = known.to_vec();
        let target = target.to_owned();
        async move {
            api.jobs("limit=10")
                .await
                .into_iter()
                .find(|job| job.target == target && !known.contains(&job.id))
                .map(|job| job.id)
        }
    })
    .await
}
