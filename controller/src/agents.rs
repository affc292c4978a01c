//! CORE: the agent protocol's rules. Who a caller is (its token, and the
//! agent that token registered), what it may register as (its name belongs
//! to its token; a token with labels allows only those), which jobs it is
//! given (the dispatch session), and what it may do with a job it holds
//! (renew the lease, ship log chunks, complete it) — plus the agent tokens
//! operators manage. `grpc/agent.rs` only turns proto messages into these
//! calls and their answers (or [`AgentError`]s) back into proto.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};
use hobotnica_common::ids::{AgentId, JobId};
use hobotnica_common::job::{Job, JobState, JobTimings, Outcome, format_labels, missing_label};
use hobotnica_common::logs::{LOG_NOTICE_ALLOWANCE, MAX_CHUNK_BYTES, log_limit_message};
use hobotnica_common::secrets::InPlaceMasker;
use hobotnica_common::token::{constant_time_eq, hash_token, new_token, random_hex};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;
use crate::error::CoreError;
use crate::metrics::LogChunk;
use crate::services::Services;
pub use crate::store::{AgentRecord, AgentTokenRecord};
use crate::store::{Finish, JobFilter, StoreError, StoreEvent};
use crate::wakeups::{Waiting, Wake, safety_poll_interval};

/// How often the controller sends a heartbeat on a session (keeps proxies
/// from closing an idle stream); every other one also refreshes the agent's
/// last-seen time.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How long a session goes without writing its agent's `last_seen`: two
/// heartbeats less a little, so that a write every other beat keeps the
/// agent well within [`AGENT_CONNECTED_WITHIN`] (20 s and the store's
/// latency against 30 s).
const LAST_SEEN_REFRESH: Duration = Duration::from_millis(19_500);
/// Most concurrent jobs an agent may announce.
pub const MAX_CONCURRENCY: u32 = 256;
/// Longest completion message kept, in characters.
const MAX_COMPLETION_MESSAGE_CHARS: usize = 1000;
/// The token id of the shared pool token.
pub const POOL_TOKEN_ID: &str = "pool";

/// Why the controller refuses an agent's call, in the terms of the agent
/// protocol (`agent.proto` lists the status each becomes).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The token is wrong or revoked, or is not the one the agent
    /// registered with: the agent stops.
    #[error("{0}")]
    Unauthenticated(String),
    /// The agent id is unknown: the agent registers again.
    #[error("agent {0} is not registered")]
    UnknownAgent(String),
    #[error("{0}")]
    Invalid(String),
    /// The agent speaks another protocol version.
    #[error(
        "protocol version {agent} is not supported: this controller speaks {controller}; upgrade the agent or the controller"
    )]
    UnsupportedProtocol { agent: u32, controller: u32 },
    /// The name was registered with another agent token.
    #[error(
        "agent name {name:?} is registered with another agent token: start this agent under another name (--name), or revoke the token that registered it (which frees the name) and register again"
    )]
    NameTaken { name: String },
    /// The agent asked for a label its token does not carry.
    #[error(
        "label {key}={value} is not allowed by this agent token (it allows {allowed}): register with those labels only, or use a token created with this one"
    )]
    LabelNotAllowed {
        key: String,
        value: String,
        allowed: String,
    },
    /// The job is not running under this attempt for this agent (fencing).
    #[error("{0}")]
    NotHeld(String),
    /// The controller holds fewer log bytes than the agent says it sent.
    #[error("the log has {stored} of {expected} bytes: ship the rest first")]
    LogIncomplete { stored: u64, expected: u64 },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    OutOfRange(String),
    /// The store cannot be reached; the agent retries.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl From<StoreError> for AgentError {
    fn from(err: StoreError) -> AgentError {
        match err {
            StoreError::NotFound(what) => AgentError::NotFound(what),
            StoreError::Conflict(detail) => AgentError::NotHeld(detail),
            StoreError::LeaseLost { .. } => AgentError::NotHeld(err.to_string()),
            StoreError::LogGap { .. } => AgentError::OutOfRange(err.to_string()),
            StoreError::AgentNameTaken { name } => AgentError::NameTaken { name },
            StoreError::Unavailable(cause) => AgentError::Unavailable(cause),
        }
    }
}

/// A valid agent token: `pool` or a per-agent token's id, and the labels it
/// allows (none for the pool token).
#[derive(Debug, Clone)]
pub struct AgentToken {
    pub id: String,
    pub labels: BTreeMap<String, String>,
}

/// What an agent registers with.
#[derive(Debug, Clone)]
pub struct Registration {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub concurrency: u32,
    pub version: String,
    pub protocol_version: u32,
}

/// A registered agent and the timings it is to keep.
#[derive(Debug, Clone)]
pub struct Registered {
    pub agent: AgentRecord,
    pub lease_timeout: Duration,
    pub renew_interval: Duration,
    pub kill_grace: Duration,
}

/// The answer to a lease renewal.
#[derive(Debug, Clone, Copy)]
pub struct Renewed {
    pub cancel_requested: bool,
    pub lease_timeout: Duration,
}

/// How an agent says a job attempt ended.
#[derive(Debug, Clone)]
pub struct Completion {
    pub job: JobId,
    pub attempt: u32,
    /// `None`: missing or unknown on the wire.
    pub outcome: Option<Outcome>,
    pub exit_code: Option<i32>,
    pub message: String,
    pub log_length: u64,
    pub duration_ms: u64,
    /// When each phase of the attempt ended, as the agent saw them.
    pub timings: Option<JobTimings>,
}

/// A job as it is handed to an agent: the record plus its variables
/// (repository and one-time; secrets opened), the values to mask, and the
/// git credentials header of a GitHub repository. No `Debug`: it holds
/// secrets.
pub struct JobAssignment {
    pub job: Job,
    pub env: BTreeMap<String, String>,
    pub secrets: Vec<String>,
    pub git_http_header: String,
    /// The most the job's log may hold (the repository's limit, never above
    /// the controller's).
    pub max_log_bytes: u64,
}

/// What an agent says on its session.
#[derive(Debug, Clone, Copy)]
pub enum SessionInput {
    /// Free slots, and how many assignments it has received so far.
    Capacity {
        free_slots: u32,
        assignments_received: u64,
    },
    /// Anything else (heartbeats): ignored.
    Other,
}

/// What a session tells an agent.
pub enum SessionOutput {
    Assign(Box<JobAssignment>),
    Cancel {
        job: JobId,
        attempt: u32,
    },
    /// Delete clones of a repository whose access is gone.
    Forget {
        git_url: String,
    },
    Heartbeat,
}

/// One piece of a job's log, as an agent ships it.
#[derive(Debug, Clone)]
pub struct LogPiece {
    pub job: JobId,
    pub attempt: u32,
    pub seq: u64,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The answer to a log piece: the job's committed length.
#[derive(Debug, Clone, Copy)]
pub struct LogAcked {
    pub job: JobId,
    pub seq: u64,
    pub committed: u64,
}

/// A registered agent on an open stream, subscribed to events before its
/// token was checked, so that a revocation after the check is seen.
pub struct Attached {
    pub agent: AgentRecord,
    events: broadcast::Receiver<StoreEvent>,
}

impl Services {
    /// Checks an agent token: the pool token or a per-agent token that has
    /// not been revoked.
    pub async fn authenticate_agent(&self, token: &str) -> Result<AgentToken, AgentError> {
        let hash = hash_token(token);
        if let Some(pool) = &self.agent_pool_token_hash
            && constant_time_eq(hash.as_bytes(), pool.as_bytes())
        {
            return Ok(AgentToken {
                id: POOL_TOKEN_ID.to_owned(),
                labels: BTreeMap::new(),
            });
        }
        match self.store.find_agent_token(&hash).await? {
            Some(token) => Ok(AgentToken {
                id: token.id,
                labels: token.labels,
            }),
            None => Err(AgentError::Unauthenticated(
                "the agent token is not valid or was revoked".to_owned(),
            )),
        }
    }

    /// The registered agent `agent_id`, if `token` is the one it registered
    /// with.
    pub async fn agent_caller(
        &self,
        token: &str,
        agent_id: &str,
    ) -> Result<AgentRecord, AgentError> {
        let token = self.authenticate_agent(token).await?;
        let agent = self
            .store
            .get_agent(&AgentId(agent_id.to_owned()))
            .await?
            .ok_or_else(|| AgentError::UnknownAgent(agent_id.to_owned()))?;
        if agent.token_id != token.id {
            return Err(AgentError::Unauthenticated(
                "the token does not belong to this agent".to_owned(),
            ));
        }
        Ok(agent)
    }

    /// [`Services::agent_caller`] for a stream that must end when the token
    /// is revoked.
    pub async fn attach_agent(&self, token: &str, agent_id: &str) -> Result<Attached, AgentError> {
        let events = self.session_events.subscribe();
        let agent = self.agent_caller(token, agent_id).await?;
        Ok(Attached { agent, events })
    }

    /// Registers (or re-registers) an agent. Its name belongs to the token
    /// that registered it first; a token with labels allows only those
    /// labels and vouches for them.
    pub async fn register_agent(
        &self,
        token: &str,
        registration: Registration,
    ) -> Result<Registered, AgentError> {
        let token = self.authenticate_agent(token).await?;
        validate_registration(&registration)?;
        let vouched_labels = vouched_labels(&token, &registration.labels)?;
        let now = Utc::now();
        let agent = self
            .store
            .register_agent(AgentRecord {
                id: AgentId::generate(),
                name: registration.name,
                labels: registration.labels,
                concurrency: registration.concurrency,
                version: registration.version,
                token_id: token.id,
                vouched_labels,
                registered_at: now,
                last_seen: now,
                controller: None,
            })
            .await?;
        tracing::info!(agent_id = %agent.id, agent = %agent.name, "agent registered");
        Ok(Registered {
            agent,
            lease_timeout: self.config.lease_timeout,
            renew_interval: self.config.renew_interval(),
            kill_grace: self.config.kill_grace,
        })
    }

    /// The job, if `agent` holds it under `attempt`.
    async fn held_job(
        &self,
        agent: &AgentRecord,
        id: JobId,
        attempt: u32,
    ) -> Result<Job, AgentError> {
        let job = self
            .store
            .get_job(id)
            .await?
            // NOT_FOUND is reserved for an unknown agent (see agent.proto).
            .ok_or_else(|| AgentError::NotHeld(format!("job {id} does not exist")))?;
        if job.agent.as_ref() != Some(&agent.id) || job.attempt != attempt {
            return Err(AgentError::NotHeld(format!(
                "job {id} attempt {attempt} is not held by this agent"
            )));
        }
        Ok(job)
    }

    /// Extends the lease of a job `agent` holds.
    pub async fn renew_agent_lease(
        &self,
        agent: &AgentRecord,
        job: JobId,
        attempt: u32,
    ) -> Result<Renewed, AgentError> {
        self.held_job(agent, job, attempt).await?;
        let until = self.lease_until(Utc::now());
        let job = self.store.renew_lease(job, attempt, until).await?;
        Ok(Renewed {
            cancel_requested: job.cancel_requested,
            lease_timeout: self.config.lease_timeout,
        })
    }

    /// Records how a job `agent` holds ended, once the controller has every
    /// log byte.
    pub async fn complete_agent_job(
        &self,
        agent: &AgentRecord,
        completion: Completion,
    ) -> Result<(), AgentError> {
        let job = self
            .held_job(agent, completion.job, completion.attempt)
            .await?;
        let mut outcome = completion
            .outcome
            .ok_or_else(|| AgentError::Invalid("outcome is missing or unknown".to_owned()))?;
        let mut completion = completion;
        if job.state == JobState::Running {
            let stored = self.store.log_len(job.id).await?;
            if stored < completion.log_length {
                // The log was cut at its limit (the agent shipped past it and
                // the rest was discarded): the controller has all it keeps.
                let limit = self.job_log_limit(&job).await?;
                if stored < limit.saturating_add(LOG_NOTICE_ALLOWANCE) {
                    return Err(AgentError::LogIncomplete {
                        stored,
                        expected: completion.log_length,
                    });
                }
                tracing::warn!(job_id = job.id.0, agent_id = %agent.id, stored, sent = completion.log_length, "the agent shipped a log past its limit; the rest was discarded");
                outcome = Outcome::Failed;
                completion.message = format!(
                    "{}; the agent sent {} bytes, the first {stored} were kept",
                    log_limit_message(limit),
                    completion.log_length
                );
            }
        }
        // Shown to operators as one line: no control or bidi characters.
        let message = Some(completion.message)
            .filter(|m| !m.is_empty())
            .map(|m| hobotnica_common::validate::sanitize_text(&m, MAX_COMPLETION_MESSAGE_CHARS));
        let finished = self
            .store
            .finish_job(
                job.id,
                completion.attempt,
                Finish {
                    outcome,
                    exit_code: completion.exit_code,
                    message,
                    timings: completion.timings,
                },
                Utc::now(),
            )
            .await?;
        // A repeated completion (the agent asked again) changed nothing:
        // its commit status was queued the first time.
        if finished.first {
            let job = finished.job;
            tracing::info!(job_id = job.id.0, state = %job.state, exit_code = job.exit_code, duration_ms = completion.duration_ms, "job finished");
            self.statuses.job_changed(&job);
            self.queue_notifications(&job).await;
        }
        Ok(())
    }

    /// A job with what its agent needs beyond the record (see
    /// [`JobAssignment`]); `None` when the job's repository is registered
    /// no more (its variables and token went with it). A store error is
    /// returned, never taken for "no secrets".
    async fn job_assignment(&self, job: Job) -> Result<Option<JobAssignment>, StoreError> {
        let Some(repo) = self.store.get_repo(&job.repo.owner, &job.repo.name).await? else {
            return Ok(None);
        };
        let environment = self.job_environment(&repo, &job);
        let mut assignment = JobAssignment {
            job,
            env: environment.env,
            secrets: environment.secrets,
            git_http_header: String::new(),
            max_log_bytes: self.log_limit(Some(&repo)),
        };
        if let Some(token) = self.repo_token(&repo) {
            // Basic auth with the token as password, as GitHub expects.
            let basic = base64::engine::general_purpose::STANDARD
                .encode(format!("x-access-token:{}", token.expose()));
            assignment.git_http_header = format!("Authorization: Basic {basic}");
            // The token's own forms (its base64 at every alignment covers
            // the header's), and the header's value whole.
            assignment
                .secrets
                .extend(hobotnica_common::mask_forms::mask_forms(token.expose()));
            assignment.secrets.push(basic);
        }
        Ok(Some(assignment))
    }

    /// The most `job`'s log may hold: its repository's limit, the
    /// controller's without one (or without the repository).
    async fn job_log_limit(&self, job: &Job) -> Result<u64, StoreError> {
        let repo = self.store.get_repo(&job.repo.owner, &job.repo.name).await?;
        Ok(self.log_limit(repo.as_ref()))
    }

    /// What becomes of a job `agent` has just claimed (or holds back, with
    /// `renew`: its lease is renewed first, which also tells whether the
    /// claim still stands). An assignment goes out only with everything
    /// the job needs: when the store cannot say what that is, the job is
    /// held back and tried again on the session's next round.
    async fn dispatch(&self, agent: &AgentRecord, job: Job, renew: bool) -> Dispatch {
        let job = if renew {
            let now = Utc::now();
            match self
                .store
                .renew_lease(job.id, job.attempt, self.lease_until(now))
                .await
            {
                Ok(current) => current,
                Err(err @ StoreError::LeaseLost { .. }) => {
                    tracing::warn!(job_id = job.id.0, agent_id = %agent.id, error = %err, "a job held back is no longer this agent's");
                    return Dispatch::Dropped;
                }
                Err(err) => {
                    tracing::error!(job_id = job.id.0, agent_id = %agent.id, error = %err, "cannot renew the lease of a job held back; trying again");
                    return Dispatch::Held(Box::new(job));
                }
            }
        } else {
            job
        };
        match self.job_assignment(job.clone()).await {
            Ok(Some(assignment)) => Dispatch::Send(Box::new(assignment)),
            Ok(None) => {
                self.fail_orphan_job(agent, &job).await;
                Dispatch::Dropped
            }
            Err(err) => {
                tracing::error!(job_id = job.id.0, agent_id = %agent.id, repo = %job.repo, error = %err, "cannot read the job's repository (its secrets and git credentials): the assignment is held back and tried again");
                Dispatch::Held(Box::new(job))
            }
        }
    }

    /// A claimed job whose repository was removed after it was queued: it
    /// fails at once, saying so, instead of running without its secrets.
    async fn fail_orphan_job(&self, agent: &AgentRecord, job: &Job) {
        let finish = Finish {
            outcome: Outcome::Failed,
            exit_code: None,
            message: Some(format!(
                "repository {} was removed before the job started",
                job.repo
            )),
            timings: None,
        };
        match self
            .store
            .finish_job(job.id, job.attempt, finish, Utc::now())
            .await
        {
            Ok(finished) => {
                let job = finished.job;
                tracing::warn!(job_id = job.id.0, agent_id = %agent.id, repo = %job.repo, "job failed: its repository was removed");
                self.statuses.job_changed(&job);
                self.queue_notifications(&job).await;
            }
            // Not sent, so its lease runs out and it is lost.
            Err(err) => {
                tracing::warn!(job_id = job.id.0, error = %err, "cannot fail a job whose repository was removed")
            }
        }
    }
}

/// What a session does with a job its agent claimed.
enum Dispatch {
    /// Everything the job needs is known: send it.
    Send(Box<JobAssignment>),
    /// The store could not say what the job needs: keep the claim (and its
    /// lease), send nothing, try again on the next round.
    Held(Box<Job>),
    /// Not this agent's to run any more (finished, or its lease is gone).
    Dropped,
}

pub(crate) fn validate_registration(registration: &Registration) -> Result<(), AgentError> {
    use hobotnica_common::validate;
    let controller = hobotnica_common::proto::PROTOCOL_VERSION;
    if registration.protocol_version != controller {
        return Err(AgentError::UnsupportedProtocol {
            agent: registration.protocol_version,
            controller,
        });
    }
    let invalid = |err: validate::ValidationError| AgentError::Invalid(err.to_string());
    validate::repo_component("name", &registration.name).map_err(invalid)?;
    if registration.concurrency == 0 || registration.concurrency > MAX_CONCURRENCY {
        return Err(AgentError::Invalid(format!(
            "concurrency: must be 1 to {MAX_CONCURRENCY}"
        )));
    }
    validate::agent_version("version", &registration.version).map_err(invalid)?;
    validate::agent_labels("labels", &registration.labels).map_err(invalid)?;
    Ok(())
}

/// The labels `token` vouches for on an agent registering with `labels`: a
/// token with labels allows only (some of) those and vouches for them; the
/// pool token and tokens without labels allow any and vouch for none.
fn vouched_labels(
    token: &AgentToken,
    labels: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, AgentError> {
    if token.labels.is_empty() {
        return Ok(BTreeMap::new());
    }
    if let Some((key, value)) = missing_label(labels, &token.labels) {
        return Err(AgentError::LabelNotAllowed {
            key: key.to_owned(),
            value: value.to_owned(),
            allowed: format_labels(&token.labels),
        });
    }
    Ok(labels.clone())
}

/// What the event feed says about an agent's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenNews {
    Revoked,
    /// Events were missed (a lag, or the feed reconnected): only the store
    /// can tell whether the token was revoked meanwhile.
    MissedEvents,
}

/// Waits for news of `agent`'s token on the event feed (forever, if the
/// feed ends). It only receives, so a `select!` may drop it at any point
/// without losing anything: the store check that [`TokenNews::MissedEvents`]
/// calls for is the caller's to run outside the `select!`, where no other
/// branch can drop it half-way.
async fn token_news(
    agent: &AgentRecord,
    events: &mut broadcast::Receiver<StoreEvent>,
) -> TokenNews {
    loop {
        match events.recv().await {
            Ok(StoreEvent::AgentTokenRevoked { token_id }) if token_id == agent.token_id => {
                return TokenNews::Revoked;
            }
            Ok(StoreEvent::Resync) | Err(RecvError::Lagged(_)) => return TokenNews::MissedEvents,
            Ok(_) => {}
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// Whether the agent is still registered (its token was not revoked); a
/// store that cannot answer is given the benefit of the doubt.
async fn still_registered(services: &Services, agent: &AgentRecord) -> bool {
    !matches!(services.store.get_agent(&agent.id).await, Ok(None))
}

fn revoked() -> AgentError {
    AgentError::Unauthenticated("the agent token was revoked".to_owned())
}

/// Sends `message` towards the agent unless the controller stops first;
/// `false` when the stream is over (the agent went away, or the controller
/// is stopping with the channel full). Room in the channel takes the
/// message even while the controller stops: the stream ends only after
/// what is in it went out, so an assignment made just before a stop still
/// reaches its agent. A full channel means the agent is connected but not
/// reading: a plain `send` would wait for it for ever and hold up the stop.
async fn send_or_stop<T>(
    outbound: &mpsc::Sender<T>,
    message: T,
    shutdown: &CancellationToken,
) -> bool {
    match outbound.try_send(message) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        Err(mpsc::error::TrySendError::Full(message)) => tokio::select! {
            biased;
            sent = outbound.send(message) => sent.is_ok(),
            () = shutdown.cancelled() => false,
        },
    }
}

/// Sends an assignment, and a cancellation asked for while it was held
/// back; `false` when the stream is over.
async fn send_assignment(
    outbound: &mpsc::Sender<Result<SessionOutput, AgentError>>,
    assignment: Box<JobAssignment>,
    shutdown: &CancellationToken,
) -> bool {
    let cancel = assignment
        .job
        .cancel_requested
        .then_some(SessionOutput::Cancel {
            job: assignment.job.id,
            attempt: assignment.job.attempt,
        });
    if !send_or_stop(outbound, Ok(SessionOutput::Assign(assignment)), shutdown).await {
        return false;
    }
    match cancel {
        Some(cancel) => send_or_stop(outbound, Ok(cancel), shutdown).await,
        None => true,
    }
}

/// How long a session waits before it tries again to make the assignment
/// of a job held back: well within its lease, which each try renews.
fn held_retry_interval(lease_timeout: Duration) -> Duration {
    (lease_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(2))
}

/// The job a log stream last wrote to, checked once: its key, the
/// secrets to mask again and how much of its log is kept.
struct VerifiedJob {
    key: (JobId, u32),
    masker: InPlaceMasker,
    /// The job's log limit plus room for the notice that ends a log cut
    /// at its limit: bytes past this are discarded.
    kept: u64,
    /// The most this stream has seen stored of the log (a piece wholly
    /// below it is a resend).
    committed: u64,
}

/// Takes log pieces from an agent until the stream ends, the token is
/// revoked (answered with UNAUTHENTICATED) or the controller shuts down;
/// each piece is answered with an ack or the error that ends the stream.
pub async fn run_log_intake(
    services: Services,
    attached: Attached,
    inbound: impl Stream<Item = LogPiece> + Send + Unpin,
    outbound: mpsc::Sender<Result<LogAcked, AgentError>>,
    shutdown: CancellationToken,
) {
    let Attached { agent, mut events } = attached;
    let mut inbound = inbound;
    let mut verified: Option<VerifiedJob> = None;
    loop {
        let piece = tokio::select! {
            () = shutdown.cancelled() => break,
            news = token_news(&agent, &mut events) => {
                // The store is asked here, in the handler, which no other
                // branch can cancel: inside the select a piece arriving
                // during the check dropped it, and with it a revocation
                // missed in the lag, for good.
                if news == TokenNews::MissedEvents && still_registered(&services, &agent).await {
                    continue;
                }
                tracing::info!(agent_id = %agent.id, "log stream closed: the agent token was revoked");
                send_or_stop(&outbound, Err(revoked()), &shutdown).await;
                break;
            }
            piece = inbound.next() => piece,
        };
        let Some(piece) = piece else { break };
        let ack = intake_piece(&services, &agent, &mut verified, piece).await;
        let stop = ack.is_err();
        if !send_or_stop(&outbound, ack, &shutdown).await || stop {
            break;
        }
    }
}

/// Appends one piece of a held job's log (masked again, offsets unmoved).
async fn intake_piece(
    services: &Services,
    agent: &AgentRecord,
    verified: &mut Option<VerifiedJob>,
    mut piece: LogPiece,
) -> Result<LogAcked, AgentError> {
    if piece.data.len() > 2 * MAX_CHUNK_BYTES {
        return Err(AgentError::Invalid(format!(
            "log chunks are at most {MAX_CHUNK_BYTES} bytes"
        )));
    }
    let key = (piece.job, piece.attempt);
    if verified.as_ref().is_none_or(|verified| verified.key != key) {
        let job = services.held_job(agent, piece.job, piece.attempt).await?;
        // Without its repository (removed meanwhile) there is nothing to
        // mask; a store error is the piece's error, so it is sent again.
        let assignment = services.job_assignment(job).await?;
        let limit = assignment
            .as_ref()
            .map_or(services.config.max_log_bytes, |assignment| {
                assignment.max_log_bytes
            });
        let secrets: Vec<Vec<u8>> = assignment
            .map(|assignment| assignment.secrets)
            .unwrap_or_default()
            .into_iter()
            .map(String::into_bytes)
            .collect();
        *verified = Some(VerifiedJob {
            key,
            masker: InPlaceMasker::new(&secrets),
            kept: limit.saturating_add(LOG_NOTICE_ALLOWANCE),
            committed: 0,
        });
    }
    let mut kept = u64::MAX;
    // The agent masked already; mask again without moving offsets.
    if let Some(verified) = verified.as_ref() {
        verified.masker.mask(&mut piece.data);
        kept = verified.kept;
    }
    // An agent that ships past the job's log limit (it should have stopped
    // the job): what lies past it is discarded, but acknowledged as if it
    // had been stored, so that the agent never resends it forever. Its
    // completion is then taken with the shorter log, and fails.
    let end = piece.offset.saturating_add(piece.data.len() as u64);
    let past_limit = end > kept;
    if past_limit {
        let fits = usize::try_from(kept.saturating_sub(piece.offset)).unwrap_or(usize::MAX);
        piece.data.truncate(fits);
    }
    let received = piece.data.len();
    let committed = if piece.data.is_empty() && past_limit {
        services.metrics.log_piece(received, LogChunk::Rejected);
        services.store.log_len(piece.job).await?
    } else {
        // Wholly below what this stream saw stored: a resend.
        let repeated = verified
            .as_ref()
            .is_some_and(|verified| end <= verified.committed);
        match services
            .store
            .append_log(
                piece.job,
                piece.attempt,
                piece.offset,
                Bytes::from(piece.data),
            )
            .await
        {
            Ok(len) => {
                let result = if repeated {
                    LogChunk::Repeated
                } else if past_limit {
                    LogChunk::Rejected
                } else {
                    LogChunk::Appended
                };
                services.metrics.log_piece(received, result);
                len
            }
            Err(StoreError::LogGap { committed }) => {
                services.metrics.log_piece(received, LogChunk::Rejected);
                committed
            }
            Err(err) => {
                services.metrics.log_piece(received, LogChunk::Rejected);
                return Err(err.into());
            }
        }
    };
    if let Some(verified) = verified.as_mut() {
        verified.committed = verified.committed.max(committed);
    }
    Ok(LogAcked {
        job: piece.job,
        seq: piece.seq,
        // Short of what is kept (a gap), the agent resends from there.
        committed: if past_limit && committed >= kept {
            end
        } else {
            committed
        },
    })
}

/// What an agent missed while it was away: cancels asked for its running
/// jobs, and the repositories whose access is gone (it deletes its clones).
/// `false` when the agent went away meanwhile.
async fn send_catch_up(
    services: &Services,
    agent: &AgentRecord,
    outbound: &mpsc::Sender<Result<SessionOutput, AgentError>>,
    shutdown: &CancellationToken,
) -> bool {
    let running = services
        .store
        .list_jobs(&JobFilter {
            state: Some(JobState::Running),
            agent: Some(agent.id.clone()),
            limit: usize::MAX,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    let cancels = running
        .iter()
        .filter(|job| job.cancel_requested)
        .map(|job| SessionOutput::Cancel {
            job: job.id,
            attempt: job.attempt,
        });
    let disabled = services.store.list_repos().await.unwrap_or_default();
    let forgets = disabled
        .into_iter()
        .filter(|repo| repo.disabled.is_some())
        .map(|repo| SessionOutput::Forget {
            git_url: repo.git_url,
        });
    for output in cancels.chain(forgets) {
        if !send_or_stop(outbound, Ok(output), shutdown).await {
            return false;
        }
    }
    true
}

/// Sends a dispatched assignment, or keeps a held-back job in `held`.
/// Returns how many assignments went out (0 or 1), `None` when the agent
/// went away.
async fn send_dispatched(
    dispatched: Dispatch,
    held: &mut Vec<Job>,
    outbound: &mpsc::Sender<Result<SessionOutput, AgentError>>,
    shutdown: &CancellationToken,
) -> Option<u64> {
    match dispatched {
        Dispatch::Send(assignment) => send_assignment(outbound, assignment, shutdown)
            .await
            .then_some(1),
        Dispatch::Held(job) => {
            held.push(*job);
            Some(0)
        }
        Dispatch::Dropped => Some(0),
    }
}

/// A session counted as opened, and as lost when it ends (whichever way).
struct CountedSession<'a>(&'a crate::metrics::Metrics);

impl<'a> CountedSession<'a> {
    fn open(metrics: &'a crate::metrics::Metrics) -> CountedSession<'a> {
        metrics.agent_session_opened();
        CountedSession(metrics)
    }
}

impl Drop for CountedSession<'_> {
    fn drop(&mut self) {
        self.0.agent_session_lost();
    }
}

/// What a session does: push assignments while the agent has free slots,
/// forward cancellations, send heartbeats; ends when the agent goes away,
/// its token is revoked (answered with UNAUTHENTICATED), or the controller
/// shuts down.
pub async fn run_session(
    services: Services,
    attached: Attached,
    inbound: impl Stream<Item = SessionInput> + Send + Unpin,
    outbound: mpsc::Sender<Result<SessionOutput, AgentError>>,
    shutdown: CancellationToken,
) {
    let Attached { agent, mut events } = attached;
    let _counted = CountedSession::open(&services.metrics);
    let mut inbound = inbound;
    let mut free_slots: u64 = 0;
    let mut received: u64 = 0;
    let mut sent: u64 = 0;
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    if !send_catch_up(&services, &agent, &outbound, &shutdown).await {
        return;
    }

    // Claiming costs a store read (and a write when there is a job): try
    // only when something changed, or when woken for a job.
    let mut try_claim = true;
    // Jobs claimed whose assignment could not be made yet (the store could
    // not say what they need): tried again each round, before any claim.
    let mut held: Vec<Job> = Vec::new();
    let retry_held = held_retry_interval(services.config.lease_timeout);
    // While the agent has room, the session waits in this controller's line
    // of idle sessions: a queued job wakes one of them, not all.
    let key = agent.vouched_labels.clone();
    let mut waiting: Option<Waiting<'_>> = None;
    // The wake-up this round answers, passed on unless it was used.
    let mut woken: Option<Wake> = None;
    let safety_poll = tokio::time::sleep(safety_poll_interval());
    tokio::pin!(safety_poll);
    // When the heartbeat that last wrote `last_seen` was due.
    let mut last_touched: Option<tokio::time::Instant> = None;
    loop {
        for job in std::mem::take(&mut held) {
            let dispatched = services.dispatch(&agent, job, true).await;
            match send_dispatched(dispatched, &mut held, &outbound, &shutdown).await {
                Some(counted) => sent += counted,
                None => return,
            }
        }
        // Assign while the agent has room; `sent - received` assignments are
        // on their way and not yet counted in `free_slots`, and held jobs
        // take a slot each.
        // Never once the controller stops: the stream ends soon, and a job
        // claimed then would wait for its lease to run out.
        let has_room = |sent: u64, held: &Vec<Job>| {
            held.is_empty() && free_slots > sent.saturating_sub(received)
        };
        // In line before claiming: a job queued during the claim wakes
        // this session again rather than finding nobody waiting.
        if has_room(sent, &held) && !shutdown.is_cancelled() {
            if waiting.is_none() {
                waiting = Some(services.idle_sessions.wait(&key));
            }
        } else {
            waiting = None;
        }
        let mut claimed = 0u64;
        let mut found_nothing = false;
        while try_claim && !shutdown.is_cancelled() && has_room(sent, &held) {
            let now = Utc::now();
            match services
                .store
                .claim_job(&agent, now, services.lease_until(now))
                .await
            {
                Ok(Some(job)) => {
                    tracing::info!(job_id = job.id.0, agent_id = %agent.id, attempt = job.attempt, "job assigned");
                    claimed += 1;
                    services.statuses.job_changed(&job);
                    let dispatched = services.dispatch(&agent, job, false).await;
                    match send_dispatched(dispatched, &mut held, &outbound, &shutdown).await {
                        Some(counted) => sent += counted,
                        // The agent is gone: the lease will expire and the
                        // job becomes lost.
                        None => return,
                    }
                }
                Ok(None) => {
                    found_nothing = true;
                    break;
                }
                Err(err) => {
                    tracing::warn!(agent_id = %agent.id, error = %err, "cannot claim a job");
                    break;
                }
            }
        }
        try_claim = false;
        if let Some(wake) = woken.take() {
            match (claimed, found_nothing) {
                // It took a job: the wake-up is used (every queued job
                // brings its own).
                (1.., _) => {}
                // Nothing this agent may take: maybe another's.
                (0, true) => services.idle_sessions.wake_one(wake.tried_by(&key)),
                // It could not look (the store failed, or a held job
                // takes its slot): someone else looks.
                (0, false) => services.idle_sessions.wake_one(wake),
            }
        }
        if !has_room(sent, &held) {
            waiting = None;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(retry_held), if !held.is_empty() => {}
            wake = async { waiting.as_mut().expect("guarded").woken().await }, if waiting.is_some() => {
                // Out of the line until this wake-up is answered; the next
                // round joins it again at its end.
                waiting = None;
                woken = Some(wake);
                try_claim = true;
            }
            // The net under a lost wake-up.
            () = &mut safety_poll => {
                safety_poll.as_mut().reset(tokio::time::Instant::now() + safety_poll_interval());
                try_claim = true;
            }
            input = inbound.next() => match input {
                Some(SessionInput::Capacity { free_slots: free, assignments_received }) => {
                    free_slots = u64::from(free.min(agent.concurrency));
                    received = assignments_received;
                    try_claim = true;
                }
                Some(SessionInput::Other) => {}
                None => return,
            },
            event = events.recv() => match event {
                Ok(StoreEvent::CancelRequested { job, attempt, agent: holder }) if holder == agent.id => {
                    if !send_or_stop(&outbound, Ok(SessionOutput::Cancel { job, attempt }), &shutdown).await {
                        return;
                    }
                }
                Ok(StoreEvent::RepoDisabled { git_url }) => {
                    if !send_or_stop(&outbound, Ok(SessionOutput::Forget { git_url }), &shutdown).await {
                        return;
                    }
                }
                Ok(StoreEvent::AgentTokenRevoked { token_id }) if token_id == agent.token_id => {
                    send_or_stop(&outbound, Err(revoked()), &shutdown).await;
                    return;
                }
                // Missed events: was the token revoked meanwhile? (Revoking
                // forgets the token's agents.) Then claim again.
                Ok(StoreEvent::Resync) | Err(RecvError::Lagged(_)) => {
                    if !still_registered(&services, &agent).await {
                        send_or_stop(&outbound, Err(revoked()), &shutdown).await;
                        return;
                    }
                    try_claim = true;
                }
                // Queued and finished jobs wake idle sessions one at a time
                // (`wakeups::wake_idle_sessions`), and are not relayed here.
                Ok(_) => {}
                Err(RecvError::Closed) => return,
            },
            beat = heartbeat.tick() => {
                if !send_or_stop(&outbound, Ok(SessionOutput::Heartbeat), &shutdown).await {
                    return;
                }
                // `last_seen` is written every other beat or so: often
                // enough to stay within `AGENT_CONNECTED_WITHIN`, half the
                // writes of a thousand idle agents.
                // A failed write is tried again at the next beat.
                if last_touched.is_none_or(|touched| beat.duration_since(touched) >= LAST_SEEN_REFRESH) {
                    match services
                        .store
                        .touch_agent(&agent.id, Utc::now(), services.public_url())
                        .await {
                        Ok(()) => last_touched = Some(beat),
                        Err(err) => tracing::warn!(agent_id = %agent.id, error = %err, "cannot record the agent's heartbeat"),
                    }
                }
            }
        }
    }
}

/// An agent heard from within this time counts as connected (sessions
/// refresh it every heartbeat).
pub const AGENT_CONNECTED_WITHIN: Duration = Duration::from_secs(30);

/// Whether an agent last seen at `last_seen` counts as connected at `now`.
pub fn agent_connected(last_seen: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    (now - last_seen)
        .to_std()
        .is_ok_and(|age| age < AGENT_CONNECTED_WITHIN)
        || last_seen >= now
}

/// An agent as operators see it: its record, whether it is connected and
/// the jobs it runs.
pub struct AgentOverview {
    pub agent: AgentRecord,
    /// Heard from within `AGENT_CONNECTED_WITHIN`.
    pub connected: bool,
    pub running_jobs: Vec<JobId>,
}

impl Services {
    /// Every registered agent, by name, with its running jobs (the admin
    /// only).
    pub async fn agents_overview(&self, caller: &Caller) -> Result<Vec<AgentOverview>, CoreError> {
        caller.require_admin("listing agents")?;
        let now = Utc::now();
        let mut agents = self.store.list_agents().await?;
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        let running = self
            .store
            .list_jobs(&JobFilter {
                state: Some(JobState::Running),
                limit: usize::MAX,
                ..JobFilter::default()
            })
            .await?;
        Ok(agents
            .into_iter()
            .map(|agent| AgentOverview {
                connected: agent_connected(agent.last_seen, now),
                running_jobs: running
                    .iter()
                    .filter(|job| job.agent.as_ref() == Some(&agent.id))
                    .map(|job| job.id)
                    .collect(),
                agent,
            })
            .collect())
    }

    /// Creates a per-agent token that allows `labels` (none: any); returns
    /// its record and its value, which is shown only now.
    pub async fn create_agent_token(
        &self,
        caller: &Caller,
        name: String,
        labels: BTreeMap<String, String>,
    ) -> Result<(AgentTokenRecord, String), CoreError> {
        caller.require_admin("creating agent tokens")?;
        hobotnica_common::validate::repo_component("name", &name)?;
        hobotnica_common::validate::labels("labels", &labels)?;
        let token = new_token(hobotnica_common::token::AGENT_TOKEN_PREFIX);
        let record = AgentTokenRecord {
            id: random_hex(8),
            name,
            token_hash: hash_token(&token),
            created_at: Utc::now(),
            labels,
        };
        self.store.create_agent_token(record.clone()).await?;
        tracing::info!(agent_token_id = %record.id, "agent token created");
        Ok((record, token))
    }

    /// Every agent token (never its value; the admin only).
    pub async fn list_agent_tokens(
        &self,
        caller: &Caller,
    ) -> Result<Vec<AgentTokenRecord>, CoreError> {
        caller.require_admin("listing agent tokens")?;
        Ok(self.store.list_agent_tokens().await?)
    }

    /// Revokes a token: its agents are forgotten and their sessions and log
    /// streams closed.
    pub async fn revoke_agent_token(&self, caller: &Caller, id: &str) -> Result<(), CoreError> {
        caller.require_admin("revoking agent tokens")?;
        self.store.delete_agent_token(id).await?;
        tracing::info!(agent_token_id = %id, "agent token revoked");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use clap::{Args as _, FromArgMatches as _};
    use tokio_stream::wrappers::ReceiverStream;

    use crate::config::ControllerConfig;
    use crate::store::gated::GatedStore;

    /// Longer than anything here takes; the clock is paused, so waiting it
    /// out costs nothing and means "nothing more will happen".
    const DEADLINE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn a_message_with_room_goes_out_even_while_the_controller_stops() {
        // An assignment made just before a stop must reach its agent: the
        // stream drains what it holds before it ends.
        let (outbound, mut rx) = mpsc::channel(1);
        let stopping = CancellationToken::new();
        stopping.cancel();
        assert!(send_or_stop(&outbound, 1, &stopping).await);
        // Full, and stopping: not waited for.
        assert!(!send_or_stop(&outbound, 2, &stopping).await);
        drop(outbound);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, None);
    }

    /// The services of a controller on an embedded store in `dir`, whose
    /// store calls the test can hold.
    async fn services(dir: &std::path::Path) -> (Services, Arc<GatedStore>) {
        let command = ControllerConfig::augment_args(clap::Command::new("t").no_binary_name(true));
        let data_dir = dir.join("data");
        let matches = command
            .try_get_matches_from(["--data-dir", data_dir.to_str().unwrap()])
            .unwrap();
        let config = ControllerConfig::from_arg_matches(&matches).unwrap();
        let mut services = crate::Controller::open(config).await.unwrap().services;
        let gated = Arc::new(GatedStore::new(services.store.clone()));
        services.store = gated.clone();
        // Ends with the test's runtime.
        tokio::spawn(crate::wakeups::wake_idle_sessions(
            services.clone(),
            CancellationToken::new(),
        ));
        (services, gated)
    }

    /// An agent `builder` registered with a token of its own; the token's
    /// value and the registration.
    async fn registered_agent(services: &Services) -> (String, Registered) {
        let (_, token) = services
            .create_agent_token(&Caller::Admin, "builders".to_owned(), BTreeMap::new())
            .await
            .unwrap();
        let registered = services
            .register_agent(
                &token,
                Registration {
                    name: "builder".to_owned(),
                    labels: BTreeMap::new(),
                    concurrency: 1,
                    version: "test".to_owned(),
                    protocol_version: hobotnica_common::proto::PROTOCOL_VERSION,
                },
            )
            .await
            .unwrap();
        (token, registered)
    }

    /// An agent registered with a token of its own, holding a running job;
    /// returns the token's value.
    async fn agent_with_job(services: &Services) -> (String, AgentRecord, Job) {
        let (token, registered) = registered_agent(services).await;
        services
            .store
            .create_job(crate::store::conformance::new_job("test"), Utc::now())
            .await
            .unwrap();
        let now = Utc::now();
        let job = services
            .store
            .claim_job(&registered.agent, now, services.lease_until(now))
            .await
            .unwrap()
            .unwrap();
        (token, registered.agent, job)
    }

    fn piece(job: &Job, offset: u64, data: &[u8]) -> LogPiece {
        LogPiece {
            job: job.id,
            attempt: job.attempt,
            seq: offset,
            offset,
            data: data.to_vec(),
        }
    }

    /// Each log piece is counted by what became of it: new bytes appended,
    /// a resend of stored bytes repeated, a piece past the stored end (a
    /// gap) rejected; every byte received is counted.
    #[tokio::test]
    async fn log_pieces_are_counted_by_what_became_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let (services, _gated) = services(dir.path()).await;
        let (_token, agent, job) = agent_with_job(&services).await;
        let mut verified = None;
        for (offset, data) in [
            (0, &b"hello "[..]),
            (6, b"world\n"),
            (0, b"hello "),
            (100, b"gap"),
        ] {
            intake_piece(&services, &agent, &mut verified, piece(&job, offset, data))
                .await
                .unwrap();
        }
        let text = services.metrics.exposition();
        for expected in [
            "hobotnica_log_chunks_total{result=\"appended\"} 2\n",
            "hobotnica_log_chunks_total{result=\"repeated\"} 1\n",
            "hobotnica_log_chunks_total{result=\"rejected\"} 1\n",
            "hobotnica_log_bytes_received_total 21\n",
            "hobotnica_jobs_started_total{kind=\"test\"} 1\n",
        ] {
            assert!(text.contains(expected), "{expected:?} not in:\n{text}");
        }
    }

    /// The token is revoked while the log stream's event feed lags, so the
    /// stream learns only that events were missed and asks the store. A
    /// piece arrives while the store is still answering. Before the fix the
    /// check ran inside the `select!` and the piece's branch dropped it: the
    /// revocation was never noticed and the stream went on taking pieces.
    /// The store's answer is held until the intake has done all it does
    /// without it (paused clock: the first wait ends only when every task
    /// is idle), so the piece always arrives mid-check.
    #[tokio::test(start_paused = true)]
    async fn a_revocation_missed_in_a_lag_is_noticed_while_pieces_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let (services, gated) = services(dir.path()).await;
        let (token, agent, job) = agent_with_job(&services).await;
        let attached = services.attach_agent(&token, &agent.id.0).await.unwrap();
        let (pieces, inbound) = mpsc::channel(4);
        let (outbound, mut answers) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let intake = tokio::spawn(run_log_intake(
            services.clone(),
            attached,
            ReceiverStream::new(inbound),
            outbound,
            shutdown.clone(),
        ));

        let (entered, answer) = gated.hold_get_agent();
        services.store.announce(StoreEvent::Resync).await;
        tokio::time::timeout(DEADLINE, entered)
            .await
            .expect("missed events make the stream ask the store")
            .unwrap();
        pieces.send(piece(&job, 0, b"hello\n")).await.unwrap();
        let _ = tokio::time::timeout(DEADLINE, answers.recv()).await;
        // The store answers: the agent is gone (revoking forgets agents).
        let _ = answer.send(None);

        loop {
            match tokio::time::timeout(DEADLINE, answers.recv()).await {
                Ok(Some(Ok(_ack))) => {}
                Ok(Some(Err(AgentError::Unauthenticated(_)))) => break,
                other => panic!("the revocation was not noticed: {other:?}"),
            }
        }
        tokio::time::timeout(DEADLINE, intake)
            .await
            .expect("the stream ends")
            .unwrap();
    }

    /// The store fails to read a job's repository when an agent claims the
    /// job. Before the fix the error was taken for "no repository" and the
    /// job went out without its secret variables and git credentials; now
    /// nothing is sent while the store fails, the claim is kept (its lease
    /// renewed), and the job goes out, whole, once the store answers.
    #[tokio::test(start_paused = true)]
    async fn a_job_is_not_sent_without_its_secrets_while_the_store_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (services, gated) = services(dir.path()).await;
        let repo = register_demo(&services).await;
        services
            .set_env(
                &repo,
                crate::variables::SetEnv {
                    key: "API_KEY".to_owned(),
                    value: "s3cret-value".to_owned(),
                    secret: true,
                    scope: hobotnica_common::job::EnvScope::All,
                },
            )
            .await
            .unwrap();
        let (token, registered) = registered_agent(&services).await;
        let job = services
            .store
            .create_job(crate::store::conformance::new_job("test"), Utc::now())
            .await
            .unwrap();
        gated.fail_get_repo(true);

        let attached = services
            .attach_agent(&token, &registered.agent.id.0)
            .await
            .unwrap();
        let (agent_says, inbound) = mpsc::channel(4);
        let (outbound, mut session_says) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let session = tokio::spawn(run_session(
            services.clone(),
            attached,
            ReceiverStream::new(inbound),
            outbound,
            shutdown.clone(),
        ));
        agent_says
            .send(SessionInput::Capacity {
                free_slots: 1,
                assignments_received: 0,
            })
            .await
            .unwrap();

        // Longer than the lease: the claim must be kept alive meanwhile.
        let failing_for = services.config.lease_timeout * 3;
        let until = tokio::time::Instant::now() + failing_for;
        while let Ok(said) = tokio::time::timeout_at(until, session_says.recv()).await {
            if let Some(Ok(SessionOutput::Assign(assignment))) = said {
                panic!(
                    "job {} was sent while its repository could not be read (secrets: {})",
                    assignment.job.id,
                    assignment.secrets.len()
                );
            }
        }
        let held = services.store.get_job(job.id).await.unwrap().unwrap();
        assert_eq!(held.state, JobState::Running, "the claim is kept");
        assert_eq!(held.agent.as_ref(), Some(&registered.agent.id));
        assert!(
            held.lease_expires_at
                .is_some_and(|until| until > Utc::now() + services.config.lease_timeout / 2),
            "the lease of a job held back is renewed"
        );

        gated.fail_get_repo(false);
        let assignment = loop {
            match tokio::time::timeout(DEADLINE, session_says.recv()).await {
                Ok(Some(Ok(SessionOutput::Assign(assignment)))) => break assignment,
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(err))) => panic!("the session ended: {err}"),
                Ok(None) | Err(_) => panic!("the job was not sent once the store answered"),
            }
        };
        assert_eq!(assignment.job.id, job.id);
        assert_eq!(
            assignment.env.get("API_KEY").map(String::as_str),
            Some("s3cret-value")
        );
        assert!(
            assignment
                .secrets
                .iter()
                .any(|secret| secret == "s3cret-value"),
            "the secret is masked"
        );

        shutdown.cancel();
        tokio::time::timeout(DEADLINE, session)
            .await
            .expect("the session ends on shutdown")
            .unwrap();
    }

    /// Registers `local/demo`, whose jobs [`crate::store::conformance::new_job`]
    /// makes.
    async fn register_demo(services: &Services) -> hobotnica_common::job::Repo {
        services
            .register(
                &Caller::Admin,
                crate::repos::NewRepository::Git(crate::repos::NewRepo {
                    owner: None,
                    name: "demo".to_owned(),
                    git_url: "file:///srv/demo.git".to_owned(),
                    branch: None,
                    timeout_secs: None,
                    requeue_lost_tests: None,
                    deploy_labels: BTreeMap::new(),
                    max_log_bytes: None,
                }),
            )
            .await
            .unwrap()
            .repo
    }

    /// An agent's open session, from the agent's side.
    struct IdleSession {
        agent: AgentRecord,
        says: mpsc::Sender<SessionInput>,
        hears: mpsc::Receiver<Result<SessionOutput, AgentError>>,
    }

    impl IdleSession {
        /// The next assignment, skipping heartbeats.
        async fn assignment(&mut self) -> Box<JobAssignment> {
            loop {
                match tokio::time::timeout(DEADLINE, self.hears.recv()).await {
                    Ok(Some(Ok(SessionOutput::Heartbeat))) => {}
                    Ok(Some(Ok(SessionOutput::Assign(assignment)))) => return assignment,
                    Ok(Some(Ok(_))) => panic!("expected an assignment"),
                    Ok(Some(Err(err))) => panic!("the session ended: {err}"),
                    Ok(None) | Err(_) => panic!("{} was given nothing", self.agent.name),
                }
            }
        }

        /// Whether the session said anything but heartbeats so far.
        fn heard_more_than_heartbeats(&mut self) -> bool {
            while let Ok(said) = self.hears.try_recv() {
                if !matches!(said, Ok(SessionOutput::Heartbeat)) {
                    return true;
                }
            }
            false
        }
    }

    /// Registers agent `name` with a token of its own allowing (and
    /// vouching for) `token_labels`, opens its session with one free slot,
    /// and waits until it has looked for a job (finding none) and stands in
    /// the line of idle sessions.
    async fn idle_session(
        services: &Services,
        gated: &GatedStore,
        name: &str,
        token_labels: &[(&str, &str)],
        shutdown: &CancellationToken,
    ) -> IdleSession {
        let (_, token) = services
            .create_agent_token(
                &Caller::Admin,
                format!("{name}-token"),
                labels(token_labels),
            )
            .await
            .unwrap();
        let registered = services
            .register_agent(
                &token,
                Registration {
                    name: name.to_owned(),
                    labels: labels(token_labels),
                    concurrency: 1,
                    version: "test".to_owned(),
                    protocol_version: hobotnica_common::proto::PROTOCOL_VERSION,
                },
            )
            .await
            .unwrap();
        let attached = services
            .attach_agent(&token, &registered.agent.id.0)
            .await
            .unwrap();
        let (says, inbound) = mpsc::channel(4);
        let (outbound, hears) = mpsc::channel(64);
        tokio::spawn(run_session(
            services.clone(),
            attached,
            ReceiverStream::new(inbound),
            outbound,
            shutdown.child_token(),
        ));
        let (claims, waiting) = (gated.claims(), services.idle_sessions.waiting());
        says.send(SessionInput::Capacity {
            free_slots: 1,
            assignments_received: 0,
        })
        .await
        .unwrap();
        hobotnica_tests::wait_until(DEADLINE, "the session to look and wait", || {
            let done =
                gated.claims() == claims + 1 && services.idle_sessions.waiting() == waiting + 1;
            async move { done }
        })
        .await;
        IdleSession {
            agent: registered.agent,
            says,
            hears,
        }
    }

    /// Queues `new` with the clock running for the moment: the embedded
    /// store creates jobs on its writer thread, and a paused clock, seeing
    /// every task wait on it, would jump ahead to the sessions' safety
    /// polls meanwhile.
    async fn queue_on_a_running_clock(services: &Services, new: crate::store::NewJob) -> Job {
        tokio::time::resume();
        let job = services.store.create_job(new, Utc::now()).await.unwrap();
        tokio::time::pause();
        job
    }

    /// Five idle sessions, one job: one store claim, by the session that
    /// waited longest, and the others hear nothing. Before, every idle
    /// session woke for each queued job and asked the store (a thousand
    /// reads for one job with a thousand agents).
    #[tokio::test(start_paused = true)]
    async fn one_idle_session_of_many_is_woken_for_a_queued_job() {
        let dir = tempfile::tempdir().unwrap();
        let (services, gated) = services(dir.path()).await;
        register_demo(&services).await;
        let shutdown = CancellationToken::new();
        let mut sessions = Vec::new();
        for n in 0..5 {
            let name = format!("builder-{n}");
            sessions.push(idle_session(&services, &gated, &name, &[], &shutdown).await);
        }
        let before = gated.claims();

        let job =
            queue_on_a_running_clock(&services, crate::store::conformance::new_job("test")).await;
        assert_eq!(sessions[0].assignment().await.job.id, job.id);
        hobotnica_tests::wait_until(DEADLINE, "the others to wait again", || {
            let waiting = services.idle_sessions.waiting();
            async move { waiting == 4 }
        })
        .await;
        // Well short of the safety poll: any other claim would be a
        // session woken for nothing.
        tokio::time::sleep(crate::wakeups::SAFETY_POLL / 2).await;
        assert_eq!(gated.claims() - before, 1, "one claim for one job");
        for session in &mut sessions[1..] {
            assert!(!session.heard_more_than_heartbeats());
        }
        shutdown.cancel();
    }

    /// The session woken first belongs to an agent that may not run the
    /// job (its token does not vouch for the job's labels): it passes the
    /// wake-up on, past the other agents like it, to one that may.
    #[tokio::test(start_paused = true)]
    async fn a_session_that_may_not_take_the_job_passes_the_wake_up_on() {
        let dir = tempfile::tempdir().unwrap();
        let (services, gated) = services(dir.path()).await;
        register_demo(&services).await;
        let shutdown = CancellationToken::new();
        let mut plain = Vec::new();
        for n in 0..3 {
            let name = format!("builder-{n}");
            plain.push(idle_session(&services, &gated, &name, &[], &shutdown).await);
        }
        let deploy = [("pool", "deploy")];
        let mut deployer = idle_session(&services, &gated, "deployer", &deploy, &shutdown).await;
        let before = gated.claims();

        let mut new = crate::store::conformance::new_job("deploy");
        new.trusted_labels = labels(&deploy);
        let job = queue_on_a_running_clock(&services, new).await;
        assert_eq!(deployer.assignment().await.job.id, job.id);
        tokio::time::sleep(crate::wakeups::SAFETY_POLL / 2).await;
        assert_eq!(
            gated.claims() - before,
            2,
            "the first plain agent and the deployer looked; the other plain agents did not"
        );
        for session in &mut plain {
            assert!(!session.heard_more_than_heartbeats());
        }
        shutdown.cancel();
    }

    /// A job's wake-up is lost on the way (it goes to a session that never
    /// acts on it, nor leaves the line): the idle session still takes the
    /// job, on its safety poll.
    #[tokio::test(start_paused = true)]
    async fn a_lost_wake_up_strands_no_job() {
        let dir = tempfile::tempdir().unwrap();
        let (services, gated) = services(dir.path()).await;
        register_demo(&services).await;
        let shutdown = CancellationToken::new();
        let _lost = services.idle_sessions.wait(&BTreeMap::new());
        let mut session = idle_session(&services, &gated, "builder", &[], &shutdown).await;
        let queued_at = tokio::time::Instant::now();
        let job =
            queue_on_a_running_clock(&services, crate::store::conformance::new_job("test")).await;
        assert_eq!(session.assignment().await.job.id, job.id);
        let waited = queued_at.elapsed();
        assert!(
            waited <= crate::wakeups::SAFETY_POLL * 5 / 4,
            "taken after {waited:?}"
        );
        drop(session.says);
        shutdown.cancel();
    }

    fn token(labels: &[(&str, &str)]) -> AgentToken {
        AgentToken {
            id: "t".to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        token(pairs).labels
    }

    /// An agent that is connected but does not read its log acks: the acks
    /// buffer is full when a piece arrives, and the controller is asked to
    /// stop. Before the fix the intake waited to send the ack for ever, and
    /// with it the controller's stop. The inbound channel holds one piece,
    /// so the second `send` returns only once the intake has taken the
    /// first: from then on only the ack's send is left for it to do.
    #[tokio::test(start_paused = true)]
    async fn a_log_stream_whose_agent_does_not_read_ends_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let (services, _) = services(dir.path()).await;
        let (token, agent, job) = agent_with_job(&services).await;
        let attached = services.attach_agent(&token, &agent.id.0).await.unwrap();
        let (pieces, inbound) = mpsc::channel(1);
        let (outbound, _unread) = mpsc::channel(1);
        outbound
            .try_send(Ok(LogAcked {
                job: job.id,
                seq: 0,
                committed: 0,
            }))
            .unwrap();
        let shutdown = CancellationToken::new();
        let intake = tokio::spawn(run_log_intake(
            services.clone(),
            attached,
            ReceiverStream::new(inbound),
            outbound,
            shutdown.clone(),
        ));
        pieces.send(piece(&job, 0, b"hello\n")).await.unwrap();
        pieces.send(piece(&job, 6, b"world\n")).await.unwrap();

        shutdown.cancel();
        tokio::time::timeout(DEADLINE, intake)
            .await
            .expect("the log stream ends on shutdown though its agent does not read")
            .unwrap();
    }

    /// The same for a session: the agent does not read, and the session
    /// has a cancellation to pass on as it opens. Before the fix it waited
    /// to send it for ever, whatever the shutdown token said.
    #[tokio::test(start_paused = true)]
    async fn a_session_whose_agent_does_not_read_ends_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let (services, _) = services(dir.path()).await;
        let (token, agent, job) = agent_with_job(&services).await;
        services
            .store
            .request_cancel(job.id, Utc::now())
            .await
            .unwrap();
        let attached = services.attach_agent(&token, &agent.id.0).await.unwrap();
        let (_agent_says, inbound) = mpsc::channel::<SessionInput>(1);
        let (outbound, _unread) = mpsc::channel(1);
        outbound.try_send(Ok(SessionOutput::Heartbeat)).unwrap();
        let shutdown = CancellationToken::new();
        let session = tokio::spawn(run_session(
            services.clone(),
            attached,
            ReceiverStream::new(inbound),
            outbound,
            shutdown.clone(),
        ));

        shutdown.cancel();
        tokio::time::timeout(DEADLINE, session)
            .await
            .expect("the session ends on shutdown though its agent does not read")
            .unwrap();
    }

    #[test]
    fn a_token_with_labels_allows_and_vouches_for_those_only() {
        let deploy = token(&[("pool", "deploy"), ("os", "linux")]);
        assert_eq!(
            vouched_labels(&deploy, &labels(&[("pool", "deploy")])).unwrap(),
            labels(&[("pool", "deploy")])
        );
        assert_eq!(vouched_labels(&deploy, &labels(&[])).unwrap(), labels(&[]));
        match vouched_labels(&deploy, &labels(&[("pool", "test")])) {
            Err(err @ AgentError::LabelNotAllowed { .. }) => {
                let message = err.to_string();
                assert!(message.contains("pool=test"), "{message}");
                assert!(message.contains("os=linux,pool=deploy"), "{message}");
            }
            other => panic!("expected LabelNotAllowed, got {other:?}"),
        }
        // The pool token and tokens without labels allow any, vouch for none.
        assert_eq!(
            vouched_labels(&token(&[]), &labels(&[("pool", "deploy")])).unwrap(),
            labels(&[])
        );
    }
}
