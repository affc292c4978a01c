//! PORT: the `Store` trait — everything the controller keeps (repositories,
//! jobs and their queue, leases, logs, agents, agent tokens) — and the events
//! a store publishes when something changes.
//!
//! Architecture invariant: only `store::*` names a database. Everything
//! above the trait works unchanged on any backend, and one conformance suite
//! (`store::conformance`) runs against each backend.

pub mod embedded;
pub mod open;
pub mod postgres;
pub mod redis;
pub mod snapshot;
mod transitions;

#[cfg(test)]
pub(crate) mod conformance;
#[cfg(test)]
pub(crate) mod gated;
pub(crate) mod metered;

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use hobotnica_common::ids::{AgentId, CommitSha, JobId};
use hobotnica_common::job::{Job, JobKind, JobState, JobTimings, Outcome, Repo, RepoRef, Trigger};

/// Errors a caller of the store branches on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The job is not running under this attempt any more (fencing).
    #[error("job {job} attempt {attempt} no longer holds the lease")]
    LeaseLost { job: JobId, attempt: u32 },
    /// The log has a gap before the chunk's offset; resend from `committed`.
    #[error("log chunk leaves a gap: committed {committed}")]
    LogGap { committed: u64 },
    /// The agent name was registered with another agent token; the existing
    /// agent was left as it is.
    #[error("agent name {name:?} belongs to another agent token")]
    AgentNameTaken { name: String },
    /// The backend cannot be reached or failed; the request may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// How long webhook delivery ids are remembered (GitHub redelivers within
/// days at most).
pub const DELIVERY_RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// What a new job is made of; the store assigns its id and queues it.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub repo: RepoRef,
    pub git_url: String,
    pub kind: JobKind,
    pub target: String,
    pub commit: CommitSha,
    pub branch: Option<String>,
    pub env: BTreeMap<String, String>,
    /// Labels the claiming agent's token must vouch for (a deploy's
    /// repository's `deploy_labels`).
    pub trusted_labels: BTreeMap<String, String>,
    pub trigger: Trigger,
    pub timeout_secs: u64,
    /// A pull request from a fork: no secret variables.
    pub from_fork: bool,
    /// Who asked for it.
    pub requested_by: Option<String>,
}

impl NewJob {
    /// The one way a job is made: `make <target>` of `repo` at `commit`.
    /// The repository gives its git URL, its timeout and, for a deploy, the
    /// labels the claiming agent's token must vouch for (`deploy_labels`).
    /// No one-time variables and not from a fork until the caller says so.
    pub fn new(
        repo: &Repo,
        target: String,
        commit: CommitSha,
        branch: Option<String>,
        trigger: Trigger,
        requested_by: String,
    ) -> NewJob {
        let kind = JobKind::for_target(&target);
        NewJob {
            repo: repo.reference(),
            git_url: repo.git_url.clone(),
            kind,
            target,
            commit,
            branch,
            env: BTreeMap::new(),
            trusted_labels: if kind == JobKind::Deploy {
                repo.deploy_labels.clone()
            } else {
                BTreeMap::new()
            },
            trigger,
            timeout_secs: repo.timeout_secs,
            from_fork: false,
            requested_by: Some(requested_by),
        }
    }
}

/// A filter for listing jobs, newest first.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub repo: Option<RepoRef>,
    pub state: Option<JobState>,
    pub kind: Option<JobKind>,
    pub agent: Option<AgentId>,
    /// Only jobs with an id below this one.
    pub before: Option<JobId>,
    pub limit: usize,
}

impl JobFilter {
    pub fn matches(&self, job: &Job) -> bool {
        self.repo.as_ref().is_none_or(|repo| &job.repo == repo)
            && self.state.is_none_or(|state| job.state == state)
            && self.kind.is_none_or(|kind| job.kind == kind)
            && self
                .agent
                .as_ref()
                .is_none_or(|agent| job.agent.as_ref() == Some(agent))
            && self.before.is_none_or(|before| job.id < before)
    }
}

/// How a running job ended.
#[derive(Debug, Clone)]
pub struct Finish {
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    /// The attempt's phases as its agent reported them (kept with the job).
    pub timings: Option<JobTimings>,
}

/// A job after `finish_job`.
#[derive(Debug, Clone)]
pub struct Finished {
    pub job: Job,
    /// Whether this call ended the job; `false` for a repeat of the same
    /// ending, which changed nothing.
    pub first: bool,
}

/// A registered agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: AgentId,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub concurrency: u32,
    pub version: String,
    /// The agent token it registered with (id of the token, or `pool`): the
    /// name and id belong to that token.
    pub token_id: String,
    /// The labels its token vouches for: its own labels when the token
    /// carries labels (they are a subset of the token's), none for the pool
    /// token or a token without labels.
    #[serde(default)]
    pub vouched_labels: BTreeMap<String, String>,
    pub registered_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// The public URL of the controller its session is on (recorded as the
    /// session opens and at each heartbeat); none before its first session.
    #[serde(default)]
    pub controller: Option<String>,
}

/// An agent token as stored: its hash, never its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentTokenRecord {
    pub id: String,
    pub name: String,
    pub token_hash: String,
    pub created_at: DateTime<Utc>,
    /// The labels agents registering with it may carry (and that it vouches
    /// for); empty: any labels, vouching for none.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A signed-in browser session of the web dashboard, kept under the hash
/// of its id (the id itself is only in the browser's cookie).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub principal: SessionPrincipal,
    /// The token every form of this session carries (CSRF).
    pub csrf_token: String,
    pub created_at: DateTime<Utc>,
    /// After this the session is gone (the store forgets it).
    pub expires_at: DateTime<Utc>,
}

/// Who a session is signed in as.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SessionPrincipal {
    /// The admin token; `fingerprint` ties the session to the admin token
    /// it was opened with (a new admin token ends it).
    Admin { fingerprint: String },
    /// A GitHub user, with their token sealed under the controller's secret
    /// key (context bound to the session), so that each request is checked
    /// against GitHub like a REST call.
    GitHub { login: String, token_sealed: String },
}

/// The queue at a glance (every controller on the store sees the same).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub queued: u64,
    pub running: u64,
    /// When the job first in the queue was created; `None` when the queue
    /// is empty.
    pub oldest_queued_at: Option<DateTime<Utc>>,
}

/// A notification on its way to one target: queued when its job finished,
/// claimed by one controller at a time, kept until it is delivered or
/// given up on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationDelivery {
    /// Random, unique: the receiver's `X-Hobotnica-Delivery`.
    pub id: String,
    pub repo: RepoRef,
    /// The target's id within the repository (its URL and secret are read
    /// from the repository when sending, so a removed target gets nothing).
    pub target: String,
    /// The job as it finished.
    pub job: Job,
    /// Attempts claimed so far (the fencing token of the last claim).
    pub attempt: u32,
    /// When it may be claimed next.
    pub due_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// Changes other parts of the controller react to. Delivery is best effort
/// (a lagging receiver misses events and must re-read the store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StoreEvent {
    /// A job entered the queue: idle agents try to claim.
    JobQueued { job: JobId },
    /// An agent claimed a queued job: it runs now.
    JobStarted { job: JobId },
    /// Someone asked to cancel a running job.
    CancelRequested {
        job: JobId,
        attempt: u32,
        agent: AgentId,
    },
    /// The job's log grew to `len` bytes.
    LogAppended { job: JobId, len: u64 },
    /// The job reached a terminal state.
    JobFinished { job: JobId },
    /// An agent token was revoked: sessions registered with it close.
    AgentTokenRevoked { token_id: String },
    /// Events may have been missed (the event feed reconnected): re-read.
    Resync,
    /// Access to a repository is gone: agents delete their clones of it.
    RepoDisabled { git_url: String },
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Whether the backend answers (readiness).
    async fn ping(&self) -> StoreResult<()>;
    /// Subscribe to change events.
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent>;
    /// Tells every subscriber (on every controller) about an event the
    /// store did not make itself.
    async fn announce(&self, event: StoreEvent);

    async fn create_repo(&self, repo: Repo) -> StoreResult<()>;
    async fn get_repo(&self, owner: &str, name: &str) -> StoreResult<Option<Repo>>;
    async fn list_repos(&self) -> StoreResult<Vec<Repo>>;
    /// Removes the repository (its jobs stay, for history).
    async fn delete_repo(&self, owner: &str, name: &str) -> StoreResult<()>;
    /// Replaces a registered repository's record with `new` if it is still
    /// `old` (compare-and-set); `false` when someone changed it meanwhile.
    async fn update_repo(&self, old: &Repo, new: Repo) -> StoreResult<bool>;
    /// The GitHub repository whose webhook URL has `hook_id`.
    async fn find_repo_by_hook(&self, hook_id: &str) -> StoreResult<Option<Repo>>;
    /// The job recorded under the name `key` by [`Store::create_job_once`],
    /// if any.
    async fn key_job(&self, key: &str) -> StoreResult<Option<JobId>>;

    /// Assigns an id, stores the job as `queued` and publishes `JobQueued`.
    async fn create_job(&self, job: NewJob, now: DateTime<Utc>) -> StoreResult<Job>;
    /// Remembers `key` (a webhook delivery id, a scoped `Idempotency-Key`;
    /// kept for [`DELIVERY_RETENTION`]) and creates `job` (as
    /// [`Store::create_job`] does) in one atomic write, and records
    /// the job's id under each of `names` (read back by
    /// [`Store::key_job`]). The key and the job exist together or not at
    /// all, so a crash cannot leave a key remembered whose job was never
    /// created (its retry would be refused as a repeat). `None`, writing
    /// nothing, when `key` was seen before.
    async fn create_job_once(
        &self,
        key: &str,
        names: &[String],
        job: NewJob,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Job>>;
    async fn get_job(&self, id: JobId) -> StoreResult<Option<Job>>;
    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<Job>>;
    /// Atomically takes the oldest queued job `agent` may run: it becomes
    /// `running` under a new attempt and a lease until `lease_until`.
    async fn claim_job(
        &self,
        agent: &AgentRecord,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<Job>>;
    /// Extends the lease of a running job; `LeaseLost` when the job is not
    /// running under `attempt`.
    async fn renew_lease(
        &self,
        id: JobId,
        attempt: u32,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Job>;
    /// Queued jobs become `cancelled`; running ones get `cancel_requested`
    /// (and `CancelRequested` is published). `Conflict` when finished.
    async fn request_cancel(&self, id: JobId, now: DateTime<Utc>) -> StoreResult<Job>;
    /// Records how a running attempt ended. Repeating the same call is
    /// accepted (and says it was a repeat); a stale attempt gets
    /// `LeaseLost`.
    async fn finish_job(
        &self,
        id: JobId,
        attempt: u32,
        finish: Finish,
        now: DateTime<Utc>,
    ) -> StoreResult<Finished>;
    /// How many jobs are queued and running, and when the oldest queued
    /// job was queued: a few cheap reads (the queue and running indexes'
    /// sizes, the queue's first job), for the metrics' fleet gauges.
    async fn queue_stats(&self) -> StoreResult<QueueStats>;
    /// Every running job whose lease ended before `now` becomes `lost`.
    async fn expire_leases(&self, now: DateTime<Utc>) -> StoreResult<Vec<Job>>;
    /// Gives every running job a lease until at least `until` (after a
    /// controller restart, so agents have time to re-attach).
    async fn extend_leases(&self, until: DateTime<Utc>) -> StoreResult<()>;

    /// Appends a chunk at `offset` of a running attempt's log, idempotently;
    /// returns the committed length.
    async fn append_log(
        &self,
        id: JobId,
        attempt: u32,
        offset: u64,
        data: Bytes,
    ) -> StoreResult<u64>;
    /// Appends a line written by the controller itself (any state).
    async fn append_controller_line(&self, id: JobId, line: &str) -> StoreResult<u64>;
    /// Up to `max` bytes of the log from `offset`.
    async fn read_log(&self, id: JobId, offset: u64, max: usize) -> StoreResult<Bytes>;
    async fn log_len(&self, id: JobId) -> StoreResult<u64>;

    /// Registers an agent; an agent with the same name registered with the
    /// same token keeps its id (`transitions::register_agent`). A name
    /// registered with another token is refused (`AgentNameTaken`) and that
    /// agent's record is left untouched.
    async fn register_agent(&self, agent: AgentRecord) -> StoreResult<AgentRecord>;
    async fn get_agent(&self, id: &AgentId) -> StoreResult<Option<AgentRecord>>;
    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>>;
    /// Records that agent `id` was heard from at `now` through a session
    /// on the controller whose public URL is `controller`.
    async fn touch_agent(
        &self,
        id: &AgentId,
        now: DateTime<Utc>,
        controller: &str,
    ) -> StoreResult<()>;

    async fn create_agent_token(&self, token: AgentTokenRecord) -> StoreResult<()>;
    async fn list_agent_tokens(&self) -> StoreResult<Vec<AgentTokenRecord>>;
    async fn find_agent_token(&self, token_hash: &str) -> StoreResult<Option<AgentTokenRecord>>;
    /// Revokes a token, forgets the agents registered with it (their names
    /// are free again) and publishes `AgentTokenRevoked`.
    async fn delete_agent_token(&self, id: &str) -> StoreResult<()>;

    /// Keeps a new session under `id_hash` until its `expires_at`.
    async fn create_session(&self, id_hash: &str, session: SessionRecord) -> StoreResult<()>;
    /// The session under `id_hash`, unless it is missing or expired at `now`.
    async fn get_session(
        &self,
        id_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<SessionRecord>>;
    /// Forgets a session (sign-out); a missing one is not an error.
    async fn delete_session(&self, id_hash: &str) -> StoreResult<()>;

    /// Queues notifications (`attempt` 0, due at their `due_at`), all or
    /// none.
    async fn queue_notifications(&self, deliveries: Vec<NotificationDelivery>) -> StoreResult<()>;
    /// Atomically takes the pending delivery due first, if one is due at
    /// `now`: its `attempt` grows by one and it is not due again before
    /// `lease_until` (so a controller that dies while sending leaves it to
    /// another after that).
    async fn claim_notification(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<NotificationDelivery>>;
    /// Makes a claimed delivery due again at `due_at` (a failed attempt to
    /// retry); `false`, changing nothing, unless it is still under
    /// `attempt`.
    async fn retry_notification(
        &self,
        id: &str,
        attempt: u32,
        due_at: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Forgets a claimed delivery (delivered, or given up on); `false`,
    /// changing nothing, unless it is still under `attempt`.
    async fn finish_notification(&self, id: &str, attempt: u32) -> StoreResult<bool>;

    /// Moves the logs of jobs that finished before `finished_before` into
    /// their archived form (Redis: compressed segments instead of a stream);
    /// reading them is unchanged. Returns how many logs were archived.
    async fn archive_logs(&self, finished_before: DateTime<Utc>) -> StoreResult<usize>;
    /// Deletes finished jobs, with their logs, that are older than the
    /// policy's age or beyond its count per repository. Queued and running
    /// jobs are never deleted. Returns how many were deleted.
    async fn prune(&self, policy: &Retention, now: DateTime<Utc>) -> StoreResult<usize>;

    /// Sends everything the store holds to `sink` as snapshot records, read
    /// from one consistent view: repositories, then each job followed by
    /// its log, agents, agent tokens, keys, sessions, pending notifications
    /// and last the next job id. Stops early, without error, when the
    /// receiver is dropped.
    async fn export(&self, sink: mpsc::Sender<snapshot::Record>) -> StoreResult<()>;
    /// Whether the store holds nothing at all (an import's precondition).
    async fn is_empty(&self) -> StoreResult<bool>;
    /// Writes snapshot records into the store exactly as they are (ids,
    /// states and offsets kept), without events. For an empty store being
    /// imported into; called with batches in the order of an export.
    async fn import(&self, batch: Vec<snapshot::Record>) -> StoreResult<()>;
    /// Whether an import into this store began and did not finish (the
    /// marker `Record::ImportStarted` wrote is still there): a controller
    /// does not start on such a store.
    async fn import_unfinished(&self) -> StoreResult<bool>;
}

/// How long finished jobs and their logs are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Jobs that finished longer ago are deleted.
    pub max_age: std::time::Duration,
    /// Only the newest this many jobs of a repository are kept.
    pub max_jobs_per_repo: usize,
}

impl Retention {
    /// Whether a finished job is past the age limit.
    pub fn too_old(&self, job: &Job, now: DateTime<Utc>) -> bool {
        job.state.is_terminal()
            && job.finished_at.is_some_and(|finished| {
                (now - finished)
                    .to_std()
                    .is_ok_and(|age| age > self.max_age)
            })
    }
}
