//! Notification targets of a repository: where the controller tells
//! someone that a job finished (a Slack-compatible incoming webhook or a
//! signed JSON webhook), which jobs it tells about, and how the last
//! delivery went. The URL and the signing secret are kept sealed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::JobId;
use crate::job::{Job, JobKind, JobState};

/// What a target receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotificationKind {
    /// A Slack-compatible incoming webhook: `{"text": ..., "blocks": ...}`.
    Slack,
    /// A JSON description of the job, signed with HMAC-SHA256.
    Webhook,
}

/// Which finished jobs a target hears about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotificationEvents {
    /// Deploys, whatever their outcome.
    Deploys,
    /// Jobs that failed, timed out or were lost (not cancelled ones).
    Failures,
    /// Every finished job.
    All,
}

impl NotificationEvents {
    /// Whether a finished `job` is one to tell about.
    pub fn matches(self, job: &Job) -> bool {
        if !job.state.is_terminal() {
            return false;
        }
        match self {
            NotificationEvents::Deploys => job.kind == JobKind::Deploy,
            NotificationEvents::Failures => matches!(
                job.state,
                JobState::Failed | JobState::TimedOut | JobState::Lost
            ),
            NotificationEvents::All => true,
        }
    }
}

/// A notification target as stored with its repository.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NotificationTarget {
    /// Its name within the repository.
    pub id: String,
    pub kind: NotificationKind,
    pub events: NotificationEvents,
    /// The URL, sealed with the controller's secret key.
    pub url_sealed: String,
    /// The URL's host, the only part of it ever shown.
    pub host: String,
    /// The signing secret of a `webhook` target, sealed.
    #[serde(default)]
    pub secret_sealed: Option<String>,
    pub created_at: DateTime<Utc>,
    /// How the newest delivery to it went.
    #[serde(default)]
    pub last_delivery: Option<DeliveryStatus>,
}

/// Where a delivery is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Queued, being sent, or waiting for its next attempt.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed; no more will be made.
    Failed,
}

/// How a delivery went, as far as it has gone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeliveryStatus {
    pub delivery_id: String,
    pub job: JobId,
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// When it was queued or last attempted.
    pub at: DateTime<Utc>,
    /// The receiver's last HTTP status, if it answered.
    #[serde(default)]
    pub response_status: Option<u16>,
    /// Why the last attempt failed (never the URL).
    #[serde(default)]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(kind: JobKind, state: JobState) -> Job {
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "id": 1, "repo": "local/demo", "git_url": "file:///x",
            "kind": "test", "target": "test", "commit": "0123456789abcdef0123456789abcdef01234567",
            "branch": null, "env": {}, "from_fork": false, "requested_by": null,
            "trusted_labels": {}, "trigger": "api", "state": "queued", "attempt": 0,
            "agent": null, "agent_name": null, "exit_code": null, "message": null,
            "timeout_secs": 60, "cancel_requested": false, "created_at": "2026-12-07T00:00:00Z",
            "started_at": null, "finished_at": null, "lease_expires_at": null
        }))
        .expect("a job");
        job.kind = kind;
        job.state = state;
        job
    }

    #[test]
    fn events_choose_finished_jobs() {
        use JobKind::{Deploy, Test};
        use JobState::*;
        let table = [
            (NotificationEvents::All, Test, Succeeded, true),
            (NotificationEvents::All, Test, Running, false),
            (NotificationEvents::All, Deploy, Cancelled, true),
            (NotificationEvents::Deploys, Deploy, Succeeded, true),
            (NotificationEvents::Deploys, Deploy, Failed, true),
            (NotificationEvents::Deploys, Test, Failed, false),
            (NotificationEvents::Failures, Test, Succeeded, false),
            (NotificationEvents::Failures, Test, Failed, true),
            (NotificationEvents::Failures, Deploy, TimedOut, true),
            (NotificationEvents::Failures, Test, Lost, true),
            (NotificationEvents::Failures, Test, Cancelled, false),
        ];
        for (events, kind, state, expected) in table {
            assert_eq!(
                events.matches(&job(kind, state)),
                expected,
                "{events:?} {kind:?} {state:?}"
            );
        }
    }
}
