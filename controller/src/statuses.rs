//! Commit statuses on GitHub: the core queues a job whenever it starts or
//! ends, and one task posts `pending` / `success` / `failure` / `error` with
//! retries and backoff. A failed post never fails or delays the job.
//!
//! Architecture invariant: statuses are queued by the controller that made
//! the transition (claim, completion, expiry, cancel), so each is posted once
//! even with many controllers.

use std::time::Duration;

use hobotnica_common::job::{Job, JobState};
use hobotnica_common::logs::log_limit_summary;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::github::{CommitStatus, GitHubError, StatusState};
use crate::services::Services;

/// Status updates waiting to be posted; beyond this, new ones are dropped
/// (with a warning) rather than slowing jobs down.
const QUEUE_CAPACITY: usize = 4096;
/// The longest description GitHub takes on a commit status.
const MAX_DESCRIPTION_CHARS: usize = 140;
/// Attempts per status before giving up.
const MAX_ATTEMPTS: u32 = 6;
/// First retry delay; doubled each time.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(500);
/// Longest wait for GitHub's rate limit to reset.
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct StatusSender(mpsc::Sender<Job>);
pub type StatusReceiver = mpsc::Receiver<Job>;

pub fn channel() -> (StatusSender, StatusReceiver) {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    (StatusSender(tx), rx)
}

impl StatusSender {
    /// Queues the job's status for posting (GitHub repositories only).
    pub fn job_changed(&self, job: &Job) {
        if let Err(err) = self.0.try_send(job.clone()) {
            tracing::warn!(job_id = job.id.0, error = %err, "commit status dropped: the queue is full");
        }
    }
}

fn status_of(job: &Job, target_url: String) -> Option<CommitStatus> {
    let (state, description) = match job.state {
        JobState::Queued => return None,
        JobState::Running => (StatusState::Pending, "running"),
        JobState::Succeeded => (StatusState::Success, "succeeded"),
        JobState::Failed => (StatusState::Failure, "failed"),
        JobState::Cancelled => (StatusState::Error, "cancelled"),
        JobState::TimedOut => (StatusState::Error, "timed out"),
        JobState::Lost => (StatusState::Error, "lost (its agent went away)"),
    };
    let mut description = format!("make {}: {description}", job.target);
    // A job stopped at its log limit says so (GitHub takes 140 characters).
    if job.state == JobState::Failed
        && let Some(summary) = job.message.as_deref().and_then(log_limit_summary)
        && description.chars().count() + 2 + summary.chars().count() <= MAX_DESCRIPTION_CHARS
    {
        description = format!("{description}: {summary}");
    }
    Some(CommitStatus {
        state,
        context: format!("hobotnica/{}", job.target),
        description,
        target_url,
    })
}

/// Posts queued statuses until `shutdown`.
pub async fn post_statuses(
    services: Services,
    mut queue: StatusReceiver,
    shutdown: CancellationToken,
) {
    loop {
        let job = tokio::select! {
            () = shutdown.cancelled() => return,
            job = queue.recv() => match job {
                Some(job) => job,
                None => return,
            },
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = post(&services, &job) => {}
        }
    }
}

async fn post(services: &Services, job: &Job) {
    let target_url = format!("{}/jobs/{}", services.public_url(), job.id);
    let Some(status) = status_of(job, target_url) else {
        return;
    };
    let repo = match services
        .store
        .get_repo(&job.repo.owner, &job.repo.name)
        .await
    {
        Ok(Some(repo)) => repo,
        Ok(None) => return,
        Err(err) => {
            tracing::warn!(job_id = job.id.0, error = %err, "commit status skipped: store unavailable");
            return;
        }
    };
    let Some(token) = services.repo_token(&repo) else {
        return;
    };
    let mut delay = FIRST_RETRY_DELAY;
    for attempt in 1..=MAX_ATTEMPTS {
        match services
            .github
            .create_status(&token, &repo.owner, &repo.name, &job.commit, &status)
            .await
        {
            Ok(()) => {
                tracing::info!(job_id = job.id.0, state = ?status.state, "commit status posted");
                services.metrics.commit_status_posted();
                return;
            }
            Err(err @ GitHubError::BadCredentials) => {
                services.metrics.commit_status_failed();
                services.access_lost(&repo, &err).await;
                return;
            }
            Err(GitHubError::NotFound) => {
                services.metrics.commit_status_failed();
                // GitHub answers 404 to a write the token may not make:
                // read access alone is not lost access.
                if !matches!(services.confirm_access(&repo, &token).await, Ok(false)) {
                    tracing::warn!(
                        job_id = job.id.0,
                        repo = %job.repo,
                        "cannot post commit statuses: the stored token needs push access (commit statuses: write)"
                    );
                }
                return;
            }
            Err(GitHubError::RateLimited { reset }) => {
                let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
                let wait = reset
                    .map_or(MAX_RATE_LIMIT_WAIT, |reset| {
                        Duration::from_secs(reset.saturating_sub(now))
                    })
                    .min(MAX_RATE_LIMIT_WAIT);
                tracing::warn!(
                    job_id = job.id.0,
                    wait_s = wait.as_secs(),
                    "GitHub rate limit: waiting to post a status"
                );
                tokio::time::sleep(wait).await;
            }
            Err(err) => {
                tracing::warn!(job_id = job.id.0, attempt, error = %err, "cannot post a commit status; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    services.metrics.commit_status_failed();
    tracing::error!(job_id = job.id.0, "gave up posting a commit status");
}
