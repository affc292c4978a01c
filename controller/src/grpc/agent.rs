//! EDGE: `AgentService` — registration, the dispatch stream, leases, log
//! intake and completion. See `proto/hobotnica/v1/agent.proto` for the
//! contract.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use chrono::Utc;
use futures_util::Stream;
use hobotnica_common::ids::{AgentId, JobId};
use hobotnica_common::job::{
    Job, JobState, Outcome as DomainOutcome, format_labels, missing_label,
};
use hobotnica_common::logs::MAX_CHUNK_BYTES;
use hobotnica_common::proto::agent_service_server::AgentService;
use hobotnica_common::proto::{
    AGENT_ID_METADATA, AgentMessage, Assignment, Cancel, CompleteJobRequest, CompleteJobResponse,
    ControllerMessage, ForgetRepository, Heartbeat, LogAck, LogChunk, Outcome, PROTOCOL_VERSION,
    RegisterRequest, RegisterResponse, RenewLeaseRequest, RenewLeaseResponse, agent_message,
    controller_message,
};
use hobotnica_common::token::{constant_time_eq, hash_token};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use super::{bearer, status};
use crate::services::Services;
use crate::store::{AgentRecord, Finish, StoreError, StoreEvent};

/// How often the controller sends a heartbeat on a session (keeps proxies
/// from closing an idle stream) and refreshes the agent's last-seen time.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Most concurrent jobs an agent may announce.
pub const MAX_CONCURRENCY: u32 = 256;
/// Messages buffered towards one agent.
const OUTBOUND_BUFFER: usize = 32;

pub struct AgentGrpc {
    services: Services,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl AgentGrpc {
    pub fn new(services: Services, shutdown: CancellationToken, tasks: TaskTracker) -> AgentGrpc {
        AgentGrpc {
            services,
            shutdown,
            tasks,
        }
    }

    /// Which token the caller holds: `pool` or a per-agent token's id, and
    /// the labels it allows (none for the pool token).
    async fn token(
        &self,
        metadata: &MetadataMap,
    ) -> Result<(String, BTreeMap<String, String>), Status> {
        let hash = hash_token(bearer(metadata)?);
        if let Some(pool) = &self.services.agent_pool_token_hash
            && constant_time_eq(hash.as_bytes(), pool.as_bytes())
        {
            return Ok(("pool".to_owned(), BTreeMap::new()));
        }
        match self
            .services
            .store
            .find_agent_token(&hash)
            .await
            .map_err(status)?
        {
            Some(token) => Ok((token.id, token.labels)),
            None => Err(Status::unauthenticated(
                "the agent token is not valid or was revoked",
            )),
        }
    }

    async fn token_id(&self, metadata: &MetadataMap) -> Result<String, Status> {
        Ok(self.token(metadata).await?.0)
    }

    /// The registered agent making the call.
    async fn caller(&self, metadata: &MetadataMap) -> Result<AgentRecord, Status> {
        let token_id = self.token_id(metadata).await?;
        let id = metadata
            .get(AGENT_ID_METADATA)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!("missing {AGENT_ID_METADATA} metadata"))
            })?;
        let agent = self
            .services
            .store
            .get_agent(&AgentId(id.to_owned()))
            .await
            .map_err(status)?
            .ok_or_else(|| Status::not_found(format!("agent {id} is not registered")))?;
        if agent.token_id != token_id {
            return Err(Status::unauthenticated(
                "the token does not belong to this agent",
            ));
        }
        Ok(agent)
    }

    /// The job, if `agent` holds it under `attempt`.
    async fn held_job(&self, agent: &AgentRecord, id: u64, attempt: u32) -> Result<Job, Status> {
        let job = self
            .services
            .store
            .get_job(JobId(id))
            .await
            .map_err(status)?
            // NOT_FOUND is reserved for an unknown agent (see agent.proto).
            .ok_or_else(|| Status::failed_precondition(format!("job {id} does not exist")))?;
        if job.agent.as_ref() != Some(&agent.id) || job.attempt != attempt {
            return Err(Status::failed_precondition(format!(
                "job {id} attempt {attempt} is not held by this agent"
            )));
        }
        Ok(job)
    }
}

fn validate_registration(request: &RegisterRequest) -> Result<(), Status> {
    if request.protocol_version != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "protocol version {} is not supported: this controller speaks {PROTOCOL_VERSION}; upgrade the agent or the controller",
            request.protocol_version
        )));
    }
    hobotnica_common::validate::repo_component("name", &request.name)
        .map_err(|err| Status::invalid_argument(err.to_string()))?;
    if request.concurrency == 0 || request.concurrency > MAX_CONCURRENCY {
        return Err(Status::invalid_argument(format!(
            "concurrency must be 1 to {MAX_CONCURRENCY}"
        )));
    }
    if request.labels.len() > 64 {
        return Err(Status::invalid_argument("at most 64 labels"));
    }
    for (key, value) in &request.labels {
        if key.is_empty() || key.len() > 64 || value.len() > 256 {
            return Err(Status::invalid_argument(format!(
                "label {key:?}: keys are 1 to 64 characters, values at most 256"
            )));
        }
    }
    Ok(())
}

/// What an assignment carries beyond the job record: the job's variables
/// (repository and one-time; secrets opened), the values to mask, and the
/// git credentials header of a GitHub repository (basic auth with the token
/// as password, as GitHub expects).
#[derive(Default)]
struct Extras {
    env: std::collections::BTreeMap<String, String>,
    secrets: Vec<String>,
    git_http_header: String,
}

async fn extras(services: &Services, job: &Job) -> Extras {
    let repo = match job.repo.split_once('/') {
        Some((owner, name)) => services.store.get_repo(owner, name).await.ok().flatten(),
        None => None,
    };
    let Some(repo) = repo else {
        return Extras {
            env: job.env.clone(),
            ..Extras::default()
        };
    };
    let environment = services.job_environment(&repo, job);
    let mut extras = Extras {
        env: environment.env,
        secrets: environment.secrets,
        git_http_header: String::new(),
    };
    if let Some(token) = services.repo_token(&repo) {
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("x-access-token:{}", token.expose()));
        extras.git_http_header = format!("Authorization: Basic {basic}");
        extras.secrets.push(token.expose().to_owned());
        extras.secrets.push(basic);
    }
    extras
}

fn forget(git_url: String) -> ControllerMessage {
    ControllerMessage {
        kind: Some(controller_message::Kind::ForgetRepository(
            ForgetRepository { git_url },
        )),
    }
}

fn assignment(job: &Job, extras: Extras) -> ControllerMessage {
    ControllerMessage {
        kind: Some(controller_message::Kind::Assignment(Assignment {
            job_id: job.id.0,
            attempt: job.attempt,
            repo: job.repo.clone(),
            git_url: job.git_url.clone(),
            commit: job.commit.to_string(),
            branch: job.branch.clone().unwrap_or_default(),
            target: job.target.clone(),
            kind: job.kind.as_str().to_owned(),
            env: extras.env.into_iter().collect(),
            timeout_ms: job.timeout_secs.saturating_mul(1000),
            secrets: extras.secrets,
            git_http_header: extras.git_http_header,
        })),
    }
}

fn cancel(job: JobId, attempt: u32) -> ControllerMessage {
    ControllerMessage {
        kind: Some(controller_message::Kind::Cancel(Cancel {
            job_id: job.0,
            attempt,
            reason: "cancel requested".to_owned(),
        })),
    }
}

type Outbound = mpsc::Sender<Result<ControllerMessage, Status>>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentGrpc {
    type SessionStream = BoxStream<ControllerMessage>;
    type PushLogsStream = BoxStream<LogAck>;

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let (token_id, token_labels) = self.token(request.metadata()).await?;
        let request = request.into_inner();
        validate_registration(&request)?;
        let labels = request.labels.into_iter().collect::<BTreeMap<_, _>>();
        // A token with labels registers agents with those labels only, and
        // vouches for them; other tokens vouch for none.
        let vouched_labels = if token_labels.is_empty() {
            BTreeMap::new()
        } else {
            if let Some((key, value)) = missing_label(&labels, &token_labels) {
                return Err(Status::permission_denied(format!(
                    "label {key}={value} is not allowed by this agent token (it allows {}): register with those labels only, or use a token created with this one",
                    format_labels(&token_labels)
                )));
            }
            labels.clone()
        };
        let now = Utc::now();
        let agent = self
            .services
            .store
            .register_agent(AgentRecord {
                id: AgentId::generate(),
                name: request.name,
                labels,
                concurrency: request.concurrency,
                version: request.version,
                token_id,
                vouched_labels,
                registered_at: now,
                last_seen: now,
            })
            .await
            .map_err(status)?;
        tracing::info!(agent.id = %agent.id, agent.name = %agent.name, "agent registered");
        let config = &self.services.config;
        Ok(Response::new(RegisterResponse {
            agent_id: agent.id.0,
            lease_timeout_ms: millis(config.lease_timeout),
            renew_interval_ms: millis(config.renew_interval()),
            kill_grace_ms: millis(config.kill_grace),
        }))
    }

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        // Subscribed before the token is checked: a revocation after the
        // check is seen.
        let events = self.services.store.subscribe();
        let agent = self.caller(request.metadata()).await?;
        let mut inbound = request.into_inner();
        match inbound.message().await? {
            Some(AgentMessage {
                kind: Some(agent_message::Kind::Hello(hello)),
            }) if hello.agent_id == agent.id.0 => {}
            _ => {
                return Err(Status::invalid_argument(
                    "a session starts with Hello naming the agent",
                ));
            }
        }
        let (outbound, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let services = self.services.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let agent_id = agent.id.clone();
            tracing::info!(agent.id = %agent_id, "session opened");
            run_session(services, agent, inbound, events, outbound, shutdown).await;
            tracing::info!(agent.id = %agent_id, "session closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew_lease(
        &self,
        request: Request<RenewLeaseRequest>,
    ) -> Result<Response<RenewLeaseResponse>, Status> {
        let agent = self.caller(request.metadata()).await?;
        let request = request.into_inner();
        self.held_job(&agent, request.job_id, request.attempt)
            .await?;
        let until = self.services.lease_until(Utc::now());
        let job = self
            .services
            .store
            .renew_lease(JobId(request.job_id), request.attempt, until)
            .await
            .map_err(status)?;
        Ok(Response::new(RenewLeaseResponse {
            cancel_requested: job.cancel_requested,
            lease_timeout_ms: millis(self.services.config.lease_timeout),
        }))
    }

    async fn push_logs(
        &self,
        request: Request<Streaming<LogChunk>>,
    ) -> Result<Response<Self::PushLogsStream>, Status> {
        // Subscribed before the token is checked: a revocation after the
        // check is seen.
        let mut events = self.services.store.subscribe();
        let agent = self.caller(request.metadata()).await?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let services = self.services.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let mut verified: Option<VerifiedJob> = None;
            loop {
                let chunk = tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = token_revoked(&services, &agent, &mut events) => {
                        tracing::info!(agent.id = %agent.id, "log stream closed: the agent token was revoked");
                        let _ = tx.send(Err(Status::unauthenticated("the agent token was revoked"))).await;
                        break;
                    }
                    chunk = inbound.message() => chunk,
                };
                let chunk = match chunk {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) | Err(_) => break,
                };
                let ack = intake_chunk(&services, &agent, &mut verified, chunk).await;
                let stop = ack.is_err();
                if tx.send(ack).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn complete_job(
        &self,
        request: Request<CompleteJobRequest>,
    ) -> Result<Response<CompleteJobResponse>, Status> {
        let agent = self.caller(request.metadata()).await?;
        let request = request.into_inner();
        let job = self
            .held_job(&agent, request.job_id, request.attempt)
            .await?;
        let outcome = match Outcome::try_from(request.outcome) {
            Ok(Outcome::Succeeded) => DomainOutcome::Succeeded,
            Ok(Outcome::Failed) => DomainOutcome::Failed,
            Ok(Outcome::Cancelled) => DomainOutcome::Cancelled,
            Ok(Outcome::TimedOut) => DomainOutcome::TimedOut,
            Ok(Outcome::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument("outcome is missing or unknown"));
            }
        };
        if job.state == JobState::Running {
            let stored = self.services.store.log_len(job.id).await.map_err(status)?;
            if stored < request.log_length {
                return Err(Status::aborted(format!(
                    "the log has {stored} of {} bytes: ship the rest first",
                    request.log_length
                )));
            }
        }
        let message = Some(request.message)
            .filter(|m| !m.is_empty())
            .map(|m| m.chars().take(1000).collect());
        let job = self
            .services
            .store
            .finish_job(
                job.id,
                request.attempt,
                Finish {
                    outcome,
                    exit_code: request.exit_code,
                    message,
                },
                Utc::now(),
            )
            .await
            .map_err(status)?;
        tracing::info!(job.id = %job.id, state = %job.state, exit_code = ?job.exit_code, duration_ms = request.duration_ms, "job finished");
        self.services.statuses.job_changed(&job);
        Ok(Response::new(CompleteJobResponse {}))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Appends one chunk; the answer is the ack (or the status that ends the
/// stream).
/// The job a log stream last wrote to, checked once: its key and the
/// secrets to mask again.
struct VerifiedJob {
    key: (u64, u32),
    masker: hobotnica_common::secrets::InPlaceMasker,
}

async fn intake_chunk(
    services: &Services,
    agent: &AgentRecord,
    verified: &mut Option<VerifiedJob>,
    mut chunk: LogChunk,
) -> Result<LogAck, Status> {
    if chunk.data.len() > 2 * MAX_CHUNK_BYTES {
        return Err(Status::invalid_argument(format!(
            "log chunks are at most {MAX_CHUNK_BYTES} bytes"
        )));
    }
    let key = (chunk.job_id, chunk.attempt);
    if verified.as_ref().is_none_or(|verified| verified.key != key) {
        let job = services
            .store
            .get_job(JobId(chunk.job_id))
            .await
            .map_err(status)?
            .ok_or_else(|| {
                Status::failed_precondition(format!("job {} does not exist", chunk.job_id))
            })?;
        if job.agent.as_ref() != Some(&agent.id) || job.attempt != chunk.attempt {
            return Err(Status::failed_precondition(format!(
                "job {} attempt {} is not held by this agent",
                chunk.job_id, chunk.attempt
            )));
        }
        let secrets: Vec<Vec<u8>> = extras(services, &job)
            .await
            .secrets
            .into_iter()
            .map(String::into_bytes)
            .collect();
        *verified = Some(VerifiedJob {
            key,
            masker: hobotnica_common::secrets::InPlaceMasker::new(&secrets),
        });
    }
    // The agent masked already; mask again without moving offsets.
    if let Some(verified) = verified.as_ref() {
        verified.masker.mask(&mut chunk.data);
    }
    let committed = match services
        .store
        .append_log(
            JobId(chunk.job_id),
            chunk.attempt,
            chunk.offset,
            Bytes::from(chunk.data),
        )
        .await
    {
        Ok(len) => len,
        Err(StoreError::LogGap { committed }) => committed,
        Err(err) => return Err(status(err)),
    };
    Ok(LogAck {
        job_id: chunk.job_id,
        seq: chunk.seq,
        committed,
    })
}

/// Returns once `agent`'s token is revoked (never, if the event feed ends).
/// After missed events it asks the store whether the agent is still
/// registered (revoking a token forgets its agents).
async fn token_revoked(
    services: &Services,
    agent: &AgentRecord,
    events: &mut tokio::sync::broadcast::Receiver<StoreEvent>,
) {
    loop {
        match events.recv().await {
            Ok(StoreEvent::AgentTokenRevoked { token_id }) if token_id == agent.token_id => return,
            Ok(StoreEvent::Resync) | Err(RecvError::Lagged(_)) => {
                if matches!(services.store.get_agent(&agent.id).await, Ok(None)) {
                    return;
                }
            }
            Ok(_) => {}
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// What a session does: push assignments while the agent has free slots,
/// forward cancellations, send heartbeats; ends when the agent goes away,
/// its token is revoked, or the controller shuts down.
async fn run_session(
    services: Services,
    agent: AgentRecord,
    mut inbound: Streaming<AgentMessage>,
    mut events: tokio::sync::broadcast::Receiver<StoreEvent>,
    outbound: Outbound,
    shutdown: CancellationToken,
) {
    let mut free_slots: u64 = 0;
    let mut received: u64 = 0;
    let mut sent: u64 = 0;
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Cancellations asked for while the agent was away.
    let running = services
        .store
        .list_jobs(&crate::store::JobFilter {
            state: Some(JobState::Running),
            agent: Some(agent.id.clone()),
            limit: usize::MAX,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    for job in running.iter().filter(|job| job.cancel_requested) {
        if outbound
            .send(Ok(cancel(job.id, job.attempt)))
            .await
            .is_err()
        {
            return;
        }
    }
    // Repositories whose access is gone: the agent deletes its clones.
    let disabled = services.store.list_repos().await.unwrap_or_default();
    for repo in disabled.into_iter().filter(|repo| repo.disabled.is_some()) {
        if outbound.send(Ok(forget(repo.git_url))).await.is_err() {
            return;
        }
    }

    // Claiming costs a write transaction: try only when something changed.
    let mut try_claim = true;
    loop {
        // Assign while the agent has room; `sent - received` assignments are
        // on their way and not yet counted in `free_slots`.
        while try_claim && free_slots > sent.saturating_sub(received) {
            let now = Utc::now();
            match services
                .store
                .claim_job(&agent, now, services.lease_until(now))
                .await
            {
                Ok(Some(job)) => {
                    tracing::info!(job.id = %job.id, agent.id = %agent.id, attempt = job.attempt, "job assigned");
                    services.statuses.job_changed(&job);
                    let message = assignment(&job, extras(&services, &job).await);
                    if outbound.send(Ok(message)).await.is_err() {
                        // The agent is gone: the lease will expire and the
                        // job becomes lost.
                        return;
                    }
                    sent += 1;
                }
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(agent.id = %agent.id, error = %err, "cannot claim a job");
                    break;
                }
            }
        }
        try_claim = false;
        tokio::select! {
            () = shutdown.cancelled() => return,
            message = inbound.message() => match message {
                Ok(Some(AgentMessage { kind: Some(agent_message::Kind::Capacity(capacity)) })) => {
                    free_slots = u64::from(capacity.free_slots.min(agent.concurrency));
                    received = capacity.assignments_received;
                    try_claim = true;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            },
            event = events.recv() => match event {
                Ok(StoreEvent::CancelRequested { job, attempt, agent: holder }) if holder == agent.id => {
                    if outbound.send(Ok(cancel(job, attempt))).await.is_err() {
                        return;
                    }
                }
                Ok(StoreEvent::RepoDisabled { git_url }) => {
                    if outbound.send(Ok(forget(git_url))).await.is_err() {
                        return;
                    }
                }
                Ok(StoreEvent::AgentTokenRevoked { token_id }) if token_id == agent.token_id => {
                    let _ = outbound.send(Err(Status::unauthenticated("the agent token was revoked"))).await;
                    return;
                }
                // Missed events: was the token revoked meanwhile? (Revoking
                // forgets the token's agents.) Then claim again.
                Ok(StoreEvent::Resync) | Err(RecvError::Lagged(_)) => {
                    if matches!(services.store.get_agent(&agent.id).await, Ok(None)) {
                        let _ = outbound.send(Err(Status::unauthenticated("the agent token was revoked"))).await;
                        return;
                    }
                    try_claim = true;
                }
                // A new job: try to claim it.
                Ok(StoreEvent::JobQueued { .. }) => {
                    try_claim = true;
                }
                Ok(_) => {}
                Err(RecvError::Closed) => return,
            },
            _ = heartbeat.tick() => {
                try_claim = true;
                let beat = ControllerMessage { kind: Some(controller_message::Kind::Heartbeat(Heartbeat {})) };
                if outbound.send(Ok(beat)).await.is_err() {
                    return;
                }
                if let Err(err) = services.store.touch_agent(&agent.id, Utc::now()).await {
                    tracing::warn!(agent.id = %agent.id, error = %err, "cannot record the agent's heartbeat");
                }
            }
        }
    }
}
