//! What the agent knows about a job, in domain terms (no wire types): its
//! key, what to run, the lease timings it runs under and how it ended.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hobotnica_common::ids::JobId;
use hobotnica_common::job::Outcome;

use crate::workspace::GitHttpHeader;

/// One attempt of one job: the unit the agent runs, renews and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JobKey {
    pub id: JobId,
    pub attempt: u32,
}

impl fmt::Display for JobKey {
    /// `<job id>-<attempt>`, also the name of the job's work tree and spool.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.id, self.attempt)
    }
}

/// A job the controller assigned to this agent.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub key: JobKey,
    /// owner/name, for display.
    pub repo: String,
    pub git_url: String,
    /// Checked when the job starts (40 hex characters).
    pub commit: String,
    /// Empty when a commit was given.
    pub branch: String,
    /// Checked with `validate::target` when the job starts.
    pub target: String,
    pub kind: String,
    /// The job's variables, already merged by the controller.
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit of make; `None` means none.
    pub timeout: Option<Duration>,
    /// Values masked in the output before it leaves the host.
    pub secrets: Vec<String>,
    /// Sent by git to the repository's host (private repositories); given
    /// to git only, never to make, and masked like the secrets.
    pub git_http_header: Option<GitHttpHeader>,
}

/// Timings the controller gave at registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// A lease not renewed within this time is lost.
    pub lease_timeout: Duration,
    /// How often each running job's lease is renewed.
    pub renew_interval: Duration,
    /// Grace between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
}

/// Shortest renewal interval the agent accepts from a controller.
pub const MIN_RENEW_INTERVAL: Duration = Duration::from_millis(100);

impl LeaseTimings {
    /// Timings from the controller's milliseconds, with a zero renewal
    /// interval replaced by a third of the lease.
    pub fn from_millis(lease_timeout_ms: u64, renew_interval_ms: u64, kill_grace_ms: u64) -> Self {
        let lease_timeout = Duration::from_millis(lease_timeout_ms);
        let renew_interval = if renew_interval_ms == 0 {
            lease_timeout / 3
        } else {
            Duration::from_millis(renew_interval_ms)
        };
        LeaseTimings {
            lease_timeout,
            renew_interval: renew_interval.max(MIN_RENEW_INTERVAL),
            kill_grace: Duration::from_millis(kill_grace_ms),
        }
    }
}

/// How a job attempt ended, as reported with CompleteJob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub key: JobKey,
    pub outcome: Outcome,
    /// make's exit code; `None` when make never ran or was killed by a signal.
    pub exit_code: Option<i32>,
    /// A one-line reason shown in the job's status.
    pub message: String,
    /// Total bytes of log produced by this attempt.
    pub log_length: u64,
    pub duration: Duration,
}
