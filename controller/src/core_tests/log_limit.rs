//! A job's log limit: the controller's `--max-log-bytes`, lowered per
//! repository, reaches the agent with the job; an agent that ships past it
//! anyway cannot fill the controller's disk, nor is it stuck resending.

use hobotnica_common::job::{JobState, Outcome};
use hobotnica_common::logs::{DEFAULT_MAX_LOG_BYTES, LOG_NOTICE_ALLOWANCE};

use super::completion::log_of;
use super::*;
use crate::repos::RepoChange;

/// Registers `local/<name>` with its own log limit.
async fn repo_with_limit(
    core: &Core,
    name: &str,
    max_log_bytes: Option<u64>,
) -> Result<Repo, CoreError> {
    core.register_git(NewRepo {
        max_log_bytes,
        ..new_git_repo(name)
    })
    .await
}

async fn change_limit(
    core: &Core,
    repo: &Repo,
    max_log_bytes: Option<u64>,
) -> Result<Repo, CoreError> {
    core.services
        .change_settings(
            &Caller::Admin,
            &repo.owner,
            &repo.name,
            RepoChange {
                max_log_bytes: Some(max_log_bytes),
                ..RepoChange::default()
            },
        )
        .await
        .map(|overview| overview.repo)
}

/// The job's limit goes out with its assignment: the controller's (1 GiB
/// by default), or the repository's lower one.
#[tokio::test]
async fn the_assignment_carries_the_effective_limit() {
    let core = Core::start().await;
    let plain = core.git_repo("plain", &[]).await;
    let job = core.queue(&plain, "test").await;
    let agent = core.agent("builder", &[], &[], 1).await;
    let mut session = core.session(&agent).await;
    session.offer(1, 0).await;
    let assignment = session.assignment().await;
    assert_eq!(assignment.job.id, job.id);
    assert_eq!(assignment.max_log_bytes, DEFAULT_MAX_LOG_BYTES);

    let small = repo_with_limit(&core, "small", Some(65536))
        .await
        .expect("registers");
    assert_eq!(small.max_log_bytes, Some(65536));
    let job = core.queue(&small, "test").await;
    session.offer(1, 1).await;
    let assignment = session.assignment().await;
    assert_eq!(assignment.job.id, job.id);
    assert_eq!(assignment.max_log_bytes, 65536);
}

/// A repository may lower the controller's limit, not raise it; `None`
/// goes back to the controller's.
#[tokio::test]
async fn a_repository_may_lower_the_limit_but_not_raise_it() {
    let core = Core::start_with(&["--max-log-bytes", "1MiB"]).await;
    assert_eq!(
        invalid_field(repo_with_limit(&core, "big", Some(2 << 20)).await),
        "max_log_bytes"
    );
    assert_eq!(
        invalid_field(repo_with_limit(&core, "tiny", Some(10)).await),
        "max_log_bytes"
    );
    let repo = repo_with_limit(&core, "app", None)
        .await
        .expect("registers");
    assert_eq!(core.services.log_limit(Some(&repo)), 1 << 20);
    assert_eq!(
        invalid_field(change_limit(&core, &repo, Some((1 << 20) + 1)).await),
        "max_log_bytes"
    );
    let repo = change_limit(&core, &repo, Some(4096))
        .await
        .expect("lowered");
    assert_eq!(repo.max_log_bytes, Some(4096));
    assert_eq!(core.services.log_limit(Some(&repo)), 4096);
    let repo = change_limit(&core, &repo, None).await.expect("reset");
    assert_eq!(repo.max_log_bytes, None);
    assert_eq!(core.services.log_limit(Some(&repo)), 1 << 20);
}

/// An agent that ignores the limit and ships on: the controller keeps the
/// limit plus room for the notice and discards the rest, yet acknowledges
/// every piece (the agent is never stuck resending); its completion with
/// the longer length is taken, and the job fails saying why.
#[tokio::test]
async fn an_agent_shipping_past_the_limit_cannot_fill_the_disk() {
    let core = Core::start().await;
    let repo = repo_with_limit(&core, "chatty", Some(4096))
        .await
        .expect("registers");
    let job = core.queue(&repo, "test").await;
    let (agent, _session) = core.agent_running("builder", &job).await;
    let kept = 4096 + LOG_NOTICE_ALLOWANCE;

    let chunk = vec![b'y'; 3000];
    let pieces: Vec<(u64, &[u8])> = (0..4u64).map(|i| (i * 3000, chunk.as_slice())).collect();
    let acks = core.ship_pieces(&agent, &job, &pieces).await;
    assert_eq!(acks, [3000, 6000, 9000, 12000]);
    // A resend past the limit, and one after a reconnect, are taken too.
    let acks = core
        .ship_pieces(&agent, &job, &[(9000, chunk.as_slice()), (12000, b"more")])
        .await;
    assert_eq!(acks, [12000, 12004]);

    let log = log_of(&core, job.id).await;
    assert_eq!(log.len() as u64, kept);

    core.complete(&agent, &job, Outcome::Succeeded, 12004)
        .await
        .expect("the completion is taken with what was kept");
    let done = core.job(job.id).await;
    assert_state(&done, JobState::Failed);
    let message = done.message.unwrap_or_default();
    assert!(
        message.starts_with("the log reached its limit of 4.0 KiB (4096 bytes)"),
        "{message}"
    );
}

/// A gap below the limit is still a gap: the agent is told to resend from
/// what the controller holds, and a completion short of the limit waits.
#[tokio::test]
async fn below_the_limit_the_log_protocol_is_unchanged() {
    let core = Core::start().await;
    let repo = repo_with_limit(&core, "app", Some(4096))
        .await
        .expect("registers");
    let job = core.queue(&repo, "test").await;
    let (agent, _session) = core.agent_running("builder", &job).await;

    let chunk = vec![b'x'; 3000];
    let acks = core
        .ship_pieces(&agent, &job, &[(0, b"hello\n"), (3000, chunk.as_slice())])
        .await;
    assert_eq!(
        acks,
        [6, 6],
        "a piece past a gap is answered with the committed length"
    );
    let early = core.complete(&agent, &job, Outcome::Succeeded, 6000).await;
    assert!(
        matches!(early, Err(AgentError::LogIncomplete { stored: 6, .. })),
        "{early:?}"
    );
    core.complete(&agent, &job, Outcome::Succeeded, 6)
        .await
        .expect("completes");
    let done = core.job(job.id).await;
    assert_state(&done, JobState::Succeeded);
    assert_eq!(log_of(&core, job.id).await, b"hello\n");
}

/// A job stopped at its log limit says so on GitHub too: its failure
/// status's description names the limit (within GitHub's 140 characters).
#[tokio::test]
async fn the_commit_status_of_a_job_cut_at_its_limit_says_so() {
    let core = Core::start().await;
    let repo = core.github_repo("widget", &[]).await.repo;
    let repo = change_limit(&core, &repo, Some(65536))
        .await
        .expect("lowered");
    let sha = core.git("widget").head();
    let test = core.queue(&repo, "test").await;
    let (agent, _session) = core.agent_running("builder", &test).await;
    core.services
        .complete_agent_job(
            &agent.record,
            Completion {
                job: test.id,
                attempt: 1,
                outcome: Some(Outcome::Failed),
                exit_code: Some(143),
                message: hobotnica_common::logs::log_limit_message(65536),
                log_length: 0,
                duration_ms: 10,
                timings: None,
            },
        )
        .await
        .expect("completed");
    core.statuses("widget", &sha, 2).await;
    let posted = core.github.statuses(&format!("{OWNER}/widget"), &sha);
    assert_eq!(posted[1].state, "failure");
    assert_eq!(
        posted[1].description.as_deref(),
        Some("make test: failed: the log reached its limit of 64.0 KiB")
    );
}
