//! Jobs and repositories as the core sees them, and the job state machine.
//!
//! ```text
//! queued -> running -> succeeded | failed | cancelled | timed_out | lost
//!    \-> cancelled
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{AgentId, CommitSha, JobId};

/// Where a job is in its life. Terminal states never change again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    Lost,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
        JobState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
            JobState::Lost => "lost",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }

    /// Whether the state machine allows `self -> next`.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Queued, Running)
                | (Queued, Cancelled)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Running, TimedOut)
                | (Running, Lost)
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown state {s:?}; expected one of queued, running, succeeded, failed, cancelled, timed_out, lost"
                )
            })
    }
}

/// What a job is for: `test` and `deploy` get their own env scope and rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Test,
    Deploy,
    Custom,
}

impl JobKind {
    /// `test` for target test, `deploy` for target deploy, `custom` otherwise.
    pub fn for_target(target: &str) -> JobKind {
        match target {
            "test" => JobKind::Test,
            "deploy" => JobKind::Deploy,
            _ => JobKind::Custom,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Test => "test",
            JobKind::Deploy => "deploy",
            JobKind::Custom => "custom",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What created a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Api,
    Webhook,
    Retry,
}

/// How an agent says a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl Outcome {
    pub fn state(self) -> JobState {
        match self {
            Outcome::Succeeded => JobState::Succeeded,
            Outcome::Failed => JobState::Failed,
            Outcome::Cancelled => JobState::Cancelled,
            Outcome::TimedOut => JobState::TimedOut,
        }
    }
}

/// Default wall-clock limit of a job, per repository.
pub const DEFAULT_JOB_TIMEOUT_SECS: u64 = 60 * 60;

/// A registered repository.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Repo {
    pub owner: String,
    pub name: String,
    pub git_url: String,
    /// Branch used when a trigger names neither a commit nor a branch.
    pub default_branch: String,
    /// Wall-clock limit of each job.
    pub timeout_secs: u64,
    pub created_at: DateTime<Utc>,
    /// Set for a GitHub repository.
    #[serde(default)]
    pub github: Option<GitHubLink>,
    /// Why the repository is disabled (access revoked); `None` while it works.
    #[serde(default)]
    pub disabled: Option<String>,
    /// The repository's variables (scope `all`, `test` or `deploy`).
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// Whether a `test` job whose agent was lost is queued again once,
    /// automatically (deploys never are).
    #[serde(default = "default_requeue_lost_tests")]
    pub requeue_lost_tests: bool,
    /// Labels the token of an agent must vouch for before it may take a
    /// deploy of this repository (and with it the deploy's secrets).
    #[serde(default)]
    pub deploy_labels: BTreeMap<String, String>,
    /// The most a job's log may hold, in bytes; `None`: the controller's
    /// `--max-log-bytes`. Never above it: the smaller of the two applies.
    #[serde(default)]
    pub max_log_bytes: Option<u64>,
    /// Where to tell about finished jobs (URLs and secrets sealed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<crate::notifications::NotificationTarget>,
}

fn default_requeue_lost_tests() -> bool {
    true
}

/// `requested_by` of a job queued again because its agent was lost.
pub const AUTOMATIC_RETRY: &str = "automatic retry (agent lost)";

/// Which jobs a repository variable applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EnvScope {
    All,
    Test,
    Deploy,
}

impl EnvScope {
    /// Whether a variable of this scope applies to a job of `kind`.
    pub fn applies_to(self, kind: JobKind) -> bool {
        match self {
            EnvScope::All => true,
            EnvScope::Test => kind == JobKind::Test,
            EnvScope::Deploy => kind == JobKind::Deploy,
        }
    }
}

/// A repository variable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StoredEnvVar", into = "StoredEnvVar")]
pub struct EnvVar {
    pub key: String,
    pub scope: EnvScope,
    pub value: EnvValue,
}

/// A variable's value: in the clear, or a secret kept sealed
/// (`secrets::SecretKey::seal`, context `env:<owner>/<name>:<key>`).
#[derive(Clone, Debug, PartialEq)]
pub enum EnvValue {
    Plain(String),
    Sealed(String),
}

impl EnvVar {
    pub fn is_secret(&self) -> bool {
        matches!(self.value, EnvValue::Sealed(_))
    }
}

/// How a variable is stored (both stores keep this shape): `secret` with
/// exactly one of `value` and `sealed`.
#[derive(Serialize, Deserialize)]
struct StoredEnvVar {
    key: String,
    scope: EnvScope,
    secret: bool,
    value: Option<String>,
    sealed: Option<String>,
}

impl TryFrom<StoredEnvVar> for EnvVar {
    type Error = String;

    fn try_from(stored: StoredEnvVar) -> Result<EnvVar, String> {
        let value = match (stored.secret, stored.value, stored.sealed) {
            (false, Some(value), None) => EnvValue::Plain(value),
            (true, None, Some(sealed)) => EnvValue::Sealed(sealed),
            _ => {
                return Err(format!(
                    "variable {}: a secret has only a sealed value, a plain variable only a value",
                    stored.key
                ));
            }
        };
        Ok(EnvVar {
            key: stored.key,
            scope: stored.scope,
            value,
        })
    }
}

impl From<EnvVar> for StoredEnvVar {
    fn from(var: EnvVar) -> StoredEnvVar {
        let (secret, value, sealed) = match var.value {
            EnvValue::Plain(value) => (false, Some(value), None),
            EnvValue::Sealed(sealed) => (true, None, Some(sealed)),
        };
        StoredEnvVar {
            key: var.key,
            scope: var.scope,
            secret,
            value,
            sealed,
        }
    }
}

/// What ties a repository to GitHub. Secrets are kept sealed
/// (`secrets::SecretKey::seal`), never in the clear.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GitHubLink {
    /// The GitHub user whose token the controller uses for this repository.
    pub login: String,
    /// The sealed token (context `github-token:<owner>/<name>`).
    pub token_sealed: String,
    /// The unguessable id in the webhook URL.
    pub hook_id: String,
    /// The sealed webhook secret (context `webhook-secret:<owner>/<name>`).
    pub webhook_secret_sealed: String,
}

impl Repo {
    /// `owner/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// The repository's name as jobs and filters carry it.
    pub fn reference(&self) -> RepoRef {
        RepoRef {
            owner: self.owner.clone(),
            name: self.name.clone(),
        }
    }
}

/// A repository's name: its owner and its name, written `owner/name` (in
/// job records, the API and log messages).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoRef {
    pub owner: String,
    pub name: String,
}

impl RepoRef {
    pub fn new(owner: impl Into<String>, name: impl Into<String>) -> RepoRef {
        RepoRef {
            owner: owner.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for RepoRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

/// Not `owner/name` with both parts present.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not owner/name")]
pub struct InvalidRepoRef(String);

impl FromStr for RepoRef {
    type Err = InvalidRepoRef;

    fn from_str(s: &str) -> Result<RepoRef, InvalidRepoRef> {
        match s.split_once('/') {
            Some((owner, name)) if !owner.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(RepoRef::new(owner, name))
            }
            _ => Err(InvalidRepoRef(s.to_owned())),
        }
    }
}

impl TryFrom<String> for RepoRef {
    type Error = InvalidRepoRef;

    fn try_from(s: String) -> Result<RepoRef, InvalidRepoRef> {
        s.parse()
    }
}

impl From<RepoRef> for String {
    fn from(repo: RepoRef) -> String {
        repo.to_string()
    }
}

/// A job and everything known about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub repo: RepoRef,
    pub git_url: String,
    pub kind: JobKind,
    pub target: String,
    pub commit: CommitSha,
    pub branch: Option<String>,
    /// One-time variables given with the trigger. Repository variables are
    /// added when the job is assigned, so secrets never sit in a job record.
    pub env: BTreeMap<String, String>,
    /// A pull request from a fork: the job gets no secret variables.
    #[serde(default)]
    pub from_fork: bool,
    /// Who asked for the job: `admin`, a GitHub login, or `webhook`.
    #[serde(default)]
    pub requested_by: Option<String>,
    /// Labels the agent's *token* must vouch for to take the job: a deploy's
    /// copy of its repository's `deploy_labels`, made when it is queued.
    #[serde(default)]
    pub trusted_labels: BTreeMap<String, String>,
    pub trigger: Trigger,
    pub state: JobState,
    /// 0 while queued; each time an agent takes the job it is incremented
    /// (fencing token).
    pub attempt: u32,
    pub agent: Option<AgentId>,
    pub agent_name: Option<String>,
    pub exit_code: Option<i32>,
    /// A one-line explanation of the state (why it failed, why it waits).
    pub message: Option<String>,
    pub timeout_secs: u64,
    pub cancel_requested: bool,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// When each phase of the attempt that finished the job happened, as its
    /// agent reported them; `None` for a job no agent completed, or one
    /// completed by an agent that does not report them (and in records
    /// written before they existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<JobTimings>,
}

/// When each phase of a job attempt happened, between `started_at` (the
/// claim) and `finished_at` (the completion recorded): one wall-clock
/// reading each, taken where the phase ends. Every field is `None` when
/// unknown (an older agent or controller, or a phase the attempt never
/// reached, e.g. make when the commit was not found). The controller's
/// and the agent's readings come from two clocks: on two hosts their
/// differences include the clocks' skew.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTimings {
    /// The controller wrote the assignment to the agent's session stream
    /// (controller's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment_sent_at: Option<DateTime<Utc>>,
    /// The agent read the assignment from its session stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<DateTime<Utc>>,
    /// The commit was in the agent's cache clone: cloned, fetched, or
    /// already there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_at: Option<DateTime<Utc>>,
    /// Whether `fetched_at` ended a `git fetch` (`false`: the cache had the
    /// commit, or was cloned with it, and nothing was fetched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_ran: Option<bool>,
    /// The job's work tree was checked out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_tree_ready_at: Option<DateTime<Utc>>,
    /// make's command line was wrapped in the sandbox (bubblewrap), ready
    /// to spawn; the sandbox itself is set up by the spawned process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_ready_at: Option<DateTime<Utc>>,
    /// make (in its sandbox) was spawned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub make_spawned_at: Option<DateTime<Utc>>,
    /// make exited (reaped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub make_exited_at: Option<DateTime<Utc>>,
    /// The controller had acknowledged the log's last byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_acked_at: Option<DateTime<Utc>>,
    /// The agent sent the completion that was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_sent_at: Option<DateTime<Utc>>,
}

impl JobTimings {
    /// The readings in the order the phases happen, named as the API names
    /// them (`fetch_ran` aside).
    pub fn in_order(&self) -> [(&'static str, Option<DateTime<Utc>>); 9] {
        [
            ("assignment_sent_at", self.assignment_sent_at),
            ("received_at", self.received_at),
            ("fetched_at", self.fetched_at),
            ("work_tree_ready_at", self.work_tree_ready_at),
            ("sandbox_ready_at", self.sandbox_ready_at),
            ("make_spawned_at", self.make_spawned_at),
            ("make_exited_at", self.make_exited_at),
            ("log_acked_at", self.log_acked_at),
            ("completion_sent_at", self.completion_sent_at),
        ]
    }
}

/// The first label of `required` that `have` does not carry with the same
/// value, if any: the one rule for "these labels cover those" (an agent for a
/// job, a token for an agent's labels, a token for a deploy).
pub fn missing_label<'a>(
    required: &'a BTreeMap<String, String>,
    have: &BTreeMap<String, String>,
) -> Option<(&'a str, &'a str)> {
    required
        .iter()
        .find(|(key, value)| have.get(key.as_str()) != Some(value))
        .map(|(key, value)| (key.as_str(), value.as_str()))
}

/// `key=value,...`, for messages.
pub fn format_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Job {
    /// Whether an agent whose token vouches for `vouched_labels` may take
    /// this job.
    pub fn claimable_by(&self, vouched_labels: &BTreeMap<String, String>) -> bool {
        missing_label(&self.trusted_labels, vouched_labels).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine() {
        use JobState::*;
        let allowed = [
            (Queued, Running),
            (Queued, Cancelled),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Cancelled),
            (Running, TimedOut),
            (Running, Lost),
        ];
        for from in JobState::ALL {
            for to in JobState::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        for state in JobState::ALL {
            assert_eq!(state.is_terminal(), !matches!(state, Queued | Running));
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
        }
    }

    #[test]
    fn missing_label_finds_the_first_uncovered_label() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let have = labels(&[("os", "linux"), ("pool", "test")]);
        assert_eq!(missing_label(&labels(&[]), &have), None);
        assert_eq!(missing_label(&labels(&[("os", "linux")]), &have), None);
        assert_eq!(
            missing_label(&labels(&[("pool", "deploy")]), &have),
            Some(("pool", "deploy"))
        );
        assert_eq!(
            missing_label(&labels(&[("gpu", "yes")]), &have),
            Some(("gpu", "yes"))
        );
        assert_eq!(
            missing_label(&labels(&[("pool", "test")]), &labels(&[])),
            Some(("pool", "test"))
        );
    }

    /// A record written before timings existed still loads, without them;
    /// a record with some of them keeps exactly those.
    #[test]
    fn job_records_load_with_and_without_timings() {
        let job = Job {
            id: JobId(1),
            repo: RepoRef::new("o", "r"),
            git_url: "https://example.invalid/o/r.git".to_owned(),
            kind: JobKind::Test,
            target: "test".to_owned(),
            commit: "0123456789abcdef0123456789abcdef01234567"
                .parse()
                .expect("commit"),
            branch: None,
            env: BTreeMap::new(),
            from_fork: false,
            requested_by: None,
            trusted_labels: BTreeMap::new(),
            trigger: Trigger::Api,
            state: JobState::Succeeded,
            attempt: 1,
            agent: None,
            agent_name: None,
            exit_code: Some(0),
            message: None,
            timeout_secs: 60,
            cancel_requested: false,
            created_at: DateTime::UNIX_EPOCH,
            started_at: None,
            finished_at: None,
            lease_expires_at: None,
            timings: None,
        };
        let old = serde_json::to_value(&job).expect("serialise");
        assert!(old.get("timings").is_none(), "{old}");
        let loaded: Job = serde_json::from_value(old).expect("an old record loads");
        assert_eq!(loaded, job);

        let with = Job {
            timings: Some(JobTimings {
                received_at: Some(DateTime::UNIX_EPOCH),
                fetch_ran: Some(false),
                ..JobTimings::default()
            }),
            ..job
        };
        let text = serde_json::to_string(&with).expect("serialise");
        assert_eq!(serde_json::from_str::<Job>(&text).expect("load"), with);
    }

    #[test]
    fn kind_follows_target() {
        assert_eq!(JobKind::for_target("test"), JobKind::Test);
        assert_eq!(JobKind::for_target("deploy"), JobKind::Deploy);
        assert_eq!(JobKind::for_target("lint"), JobKind::Custom);
    }
}
