//! How a job ends: the agent's completion is recorded once the whole log is
//! in, repeats are harmless, strangers and stale attempts are refused, and
//! GitHub hears of it as a commit status.

use futures_util::StreamExt as _;
use hobotnica_common::job::{JobState, Outcome};

use super::*;

/// The whole stored log of `job`, as the admin reads it.
pub(super) async fn log_of(core: &Core, job: JobId) -> Vec<u8> {
    let read = core
        .services
        .read_log(&Caller::Admin, job, 0, None)
        .await
        .expect("the log reads");
    let mut bytes = Vec::new();
    let mut body = std::pin::pin!(read.body);
    while let Some(piece) = body.next().await {
        bytes.extend_from_slice(&piece.expect("a piece of log"));
    }
    bytes
}

#[tokio::test]
async fn a_completion_records_the_outcome() {
    let core = Core::start().await;
    let repo = core.git_repo("app", &[]).await;
    let job = core.queue(&repo, "test").await;
    let (agent, _session) = core.agent_running("builder", &job).await;
    assert_eq!(core.ship_log(&agent, &job, b"3 tests failed\n").await, 15);

    core.services
        .complete_agent_job(
            &agent.record,
            Completion {
                job: job.id,
                attempt: 1,
                outcome: Some(Outcome::Failed),
                exit_code: Some(2),
                message: "make: *** [test] Error 2".to_owned(),
                log_length: 15,
                duration_ms: 1200,
                timings: None,
            },
        )
        .await
        .expect("the completion is recorded");
    let done = core.job(job.id).await;
    assert_state(&done, JobState::Failed);
    assert_eq!(done.exit_code, Some(2));
    assert_eq!(done.message.as_deref(), Some("make: *** [test] Error 2"));
    assert!(done.finished_at.is_some());
    assert_eq!(done.agent_name.as_deref(), Some("builder"));
    assert_eq!(log_of(&core, job.id).await, b"3 tests failed\n");
}

#[tokio::test]
async fn a_completion_waits_for_the_whole_log() {
    let core = Core::start().await;
    let repo = core.git_repo("app", &[]).await;
    let job = core.queue(&repo, "test").await;
    let (agent, _session) = core.agent_running("builder", &job).await;

    let early = core.complete(&agent, &job, Outcome::Succeeded, 6).await;
    assert!(
        matches!(
            early,
            Err(AgentError::LogIncomplete {
                stored: 0,
                expected: 6
            })
        ),
        "{early:?}"
    );
    assert_state(&core.job(job.id).await, JobState::Running);

    core.ship_log(&agent, &job, b"hello\n").await;
    core.complete(&agent, &job, Outcome::Succeeded, 6)
        .await
        .expect("complete once the log is in");
    assert_state(&core.job(job.id).await, JobState::Succeeded);
}

#[tokio::test]
async fn a_repeated_completion_is_accepted_and_changes_nothing() {
    let core = Core::start().await;
    let repo = core.git_repo("app", &[]).await;
    let job = core.queue(&repo, "test").await;
    let (agent, _session) = core.agent_running("builder", &job).await;

    core.complete(&agent, &job, Outcome::Succeeded, 0)
        .await
        .expect("completed");
    let first = core.job(job.id).await;
    core.complete(&agent, &job, Outcome::Succeeded, 0)
        .await
        .expect("a repeat (its answer was lost) is accepted");
    assert_eq!(core.job(job.id).await, first, "and changes nothing");

    let contradicting = core.complete(&agent, &job, Outcome::Failed, 0).await;
    assert!(
        matches!(contradicting, Err(AgentError::NotHeld(_))),
        "{contradicting:?}"
    );
    assert_eq!(core.job(job.id).await, first);
}

#[tokio::test]
async fn a_completion_by_another_agent_or_for_a_stale_attempt_is_refused() {
    let core = Core::start().await;
    let repo = core.git_repo("app", &[]).await;
    let job = core.queue(&repo, "test").await;
    let (agent, _session) = core.agent_running("builder", &job).await;
    let other = core.agent("other", &[], &[], 1).await;

    let by_other = core.complete(&other, &job, Outcome::Succeeded, 0).await;
    assert!(
        matches!(by_other, Err(AgentError::NotHeld(_))),
        "{by_other:?}"
    );
    let borrowed = core
        .services
        .agent_caller(&other.token, &agent.record.id.0)
        .await;
    assert!(
        matches!(borrowed, Err(AgentError::Unauthenticated(_))),
        "another agent's token cannot act as this agent: {borrowed:?}"
    );
    let wrong_attempt = core
        .services
        .complete_agent_job(
            &agent.record,
            Completion {
                job: job.id,
                attempt: 2,
                outcome: Some(Outcome::Succeeded),
                exit_code: Some(0),
                message: String::new(),
                log_length: 0,
                duration_ms: 1,
                timings: None,
            },
        )
        .await;
    assert!(
        matches!(wrong_attempt, Err(AgentError::NotHeld(_))),
        "{wrong_attempt:?}"
    );
    assert_state(&core.job(job.id).await, JobState::Running);

    // The lease runs out: the job is lost, and the agent's late
    // completion does not bring it back.
    let lost = core
        .services
        .store
        .expire_leases(chrono::Utc::now() + chrono::Duration::days(1))
        .await
        .expect("leases expire");
    assert_eq!(lost.len(), 1);
    let late = core.complete(&agent, &job, Outcome::Succeeded, 0).await;
    assert!(matches!(late, Err(AgentError::NotHeld(_))), "{late:?}");
    assert_state(&core.job(job.id).await, JobState::Lost);
}

#[tokio::test]
async fn commit_statuses_reach_github() {
    let core = Core::start().await;
    let repo = core.github_repo("widget", &[]).await.repo;
    let sha = core.git("widget").head();
    let test = core.queue(&repo, "test").await;
    let (agent, _session) = core.agent_running("builder", &test).await;
    assert_eq!(
        core.statuses("widget", &sha, 1).await,
        [("pending".to_owned(), "hobotnica/test".to_owned())],
        "the job started"
    );

    core.complete(&agent, &test, Outcome::Succeeded, 0)
        .await
        .expect("completed");
    let deploy = core.queue(&repo, "deploy").await;
    core.services
        .cancel(&Caller::Admin, deploy.id)
        .await
        .expect("cancelled");
    assert_eq!(
        core.statuses("widget", &sha, 3).await,
        [
            ("pending".to_owned(), "hobotnica/test".to_owned()),
            ("success".to_owned(), "hobotnica/test".to_owned()),
            ("error".to_owned(), "hobotnica/deploy".to_owned()),
        ]
    );
    let posted = core.github.statuses("octo-org/widget", &sha);
    assert_eq!(
        posted[1].target_url.as_deref(),
        Some(format!("{PUBLIC_URL}/jobs/{}", test.id).as_str())
    );
    assert_eq!(
        posted[1].creator, MAINTAINER.login,
        "posted with the token the repository was registered with"
    );
}

/// The statuses go out one at a time, in order: one posted after the
/// repeat shows whether the repeat posted one too.
#[tokio::test]
async fn a_repeated_completion_posts_no_second_status() {
    let core = Core::start().await;
    let repo = core.github_repo("widget", &[]).await.repo;
    let sha = core.git("widget").head();
    let test = core.queue(&repo, "test").await;
    let (agent, _session) = core.agent_running("builder", &test).await;
    core.complete(&agent, &test, Outcome::Succeeded, 0)
        .await
        .expect("completed");
    core.complete(&agent, &test, Outcome::Succeeded, 0)
        .await
        .expect("repeated");

    let later = core
        .services
        .trigger(
            &Caller::Admin,
            OWNER,
            "widget",
            JobRequest {
                branch: Some("main".to_owned()),
                ..request("lint")
            },
        )
        .await
        .expect("queued");
    core.services
        .cancel(&Caller::Admin, later.id)
        .await
        .expect("cancelled");
    let all = core.statuses("widget", &sha, 3).await;
    assert_eq!(
        all,
        [
            ("pending".to_owned(), "hobotnica/test".to_owned()),
            ("success".to_owned(), "hobotnica/test".to_owned()),
            ("error".to_owned(), "hobotnica/lint".to_owned()),
        ]
    );
}
