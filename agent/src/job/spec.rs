//! What the agent knows about a job, in domain terms (no wire types): its
//! key, what to run, the lease timings it runs under and how it ended.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hobotnica_common::ids::JobId;
use hobotnica_common::job::{JobTimings, Outcome};

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

/// A job the controller assigned to this agent. `Debug` shows variable
/// names only, never values, secrets or the git header.
#[derive(Clone)]
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
    /// The most the job's log may hold, in bytes.
    pub max_log_bytes: u64,
    /// The phase readings taken before the job reached its supervisor:
    /// when the controller sent the assignment, when the agent received it.
    pub timings: JobTimings,
}

impl std::fmt::Debug for JobSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobSpec")
            .field("key", &self.key)
            .field("repo", &self.repo)
            .field("commit", &self.commit)
            .field("branch", &self.branch)
            .field("target", &self.target)
            .field("kind", &self.kind)
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("max_log_bytes", &self.max_log_bytes)
            .field(
                "secrets",
                &format_args!("[{} REDACTED]", self.secrets.len()),
            )
            .field(
                "git_http_header",
                &self.git_http_header.as_ref().map(|_| "[REDACTED]"),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod debug_tests {
    use super::*;

    #[test]
    fn debug_never_prints_values_or_secrets() {
        let spec = JobSpec {
            key: JobKey {
                id: hobotnica_common::ids::JobId(1),
                attempt: 1,
            },
            repo: "local/demo".into(),
            git_url: "https://x-access-token:url-secret@example.invalid/r.git".into(),
            commit: "0".repeat(40),
            branch: "main".into(),
            target: "test".into(),
            kind: "test".into(),
            env: [("API_TOKEN".to_owned(), "env-secret-value".to_owned())].into(),
            timeout: None,
            secrets: vec!["listed-secret".into()],
            git_http_header: None,
            max_log_bytes: hobotnica_common::logs::DEFAULT_MAX_LOG_BYTES,
            timings: JobTimings::default(),
        };
        let printed = format!("{spec:?}");
        assert!(printed.contains("API_TOKEN"), "{printed}");
        for secret in ["env-secret-value", "listed-secret", "url-secret"] {
            assert!(!printed.contains(secret), "{printed}");
        }
    }
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
    /// When each phase of the attempt ended (those it reached).
    pub timings: JobTimings,
}
