//! EDGE: `AgentService` — registration, the dispatch stream, leases, log
//! intake and completion, as proto messages. The rules are the core's
//! (`crate::agents`); this file only turns messages into its calls and its
//! answers back into messages. See `proto/hobotnica/v1/agent.proto` for the
//! contract.

use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};
use hobotnica_common::ids::JobId;
use hobotnica_common::job::{JobTimings, Outcome as DomainOutcome};
use hobotnica_common::proto;
use hobotnica_common::proto::agent_service_server::AgentService;
use hobotnica_common::proto::{
    AGENT_ID_METADATA, AgentMessage, Assignment, Cancel, CompleteJobRequest, CompleteJobResponse,
    ControllerMessage, ForgetRepository, Heartbeat, LogAck, LogChunk, Outcome, RegisterRequest,
    RegisterResponse, RenewLeaseRequest, RenewLeaseResponse, agent_message, controller_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use super::{bearer, status};
use crate::agents::{
    AgentRecord, Attached, Completion, JobAssignment, LogPiece, Registration, SessionInput,
    SessionOutput, run_log_intake, run_session,
};
use crate::services::Services;

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

    /// The registered agent making the call.
    async fn caller(&self, metadata: &MetadataMap) -> Result<AgentRecord, Status> {
        let token = bearer(metadata)?;
        let agent_id = agent_id(metadata)?;
        self.services
            .agent_caller(token, agent_id)
            .await
            .map_err(status)
    }

    /// The registered agent opening a stream that ends when its token is
    /// revoked.
    async fn attach(&self, metadata: &MetadataMap) -> Result<Attached, Status> {
        let token = bearer(metadata)?;
        let agent_id = agent_id(metadata)?;
        self.services
            .attach_agent(token, agent_id)
            .await
            .map_err(status)
    }
}

fn agent_id(metadata: &MetadataMap) -> Result<&str, Status> {
    metadata
        .get(AGENT_ID_METADATA)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Status::invalid_argument(format!("missing {AGENT_ID_METADATA} metadata")))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn controller_message(kind: controller_message::Kind) -> ControllerMessage {
    ControllerMessage { kind: Some(kind) }
}

fn assignment(assignment: JobAssignment) -> controller_message::Kind {
    let JobAssignment {
        job,
        env,
        secrets,
        git_http_header,
        max_log_bytes,
    } = assignment;
    controller_message::Kind::Assignment(Assignment {
        job_id: job.id.0,
        attempt: job.attempt,
        repo: job.repo.to_string(),
        git_url: job.git_url,
        commit: job.commit.to_string(),
        branch: job.branch.unwrap_or_default(),
        target: job.target,
        kind: job.kind.as_str().to_owned(),
        env: env.into_iter().collect(),
        timeout_ms: job.timeout_secs.saturating_mul(1000),
        secrets,
        git_http_header,
        max_log_bytes,
        // Taken as the session stream hands the message to the transport.
        sent_at_unix_us: Some(Utc::now().timestamp_micros()),
    })
}

fn session_message(output: SessionOutput) -> ControllerMessage {
    controller_message(match output {
        SessionOutput::Assign(job) => assignment(*job),
        SessionOutput::Cancel { job, attempt } => controller_message::Kind::Cancel(Cancel {
            job_id: job.0,
            attempt,
            // No reason beyond the request itself: the agent's log line and
            // the job's message then read "cancelled", as when the cancel
            // reaches the agent through a lease renewal instead.
            reason: String::new(),
        }),
        SessionOutput::Forget { git_url } => {
            controller_message::Kind::ForgetRepository(ForgetRepository { git_url })
        }
        SessionOutput::Heartbeat => controller_message::Kind::Heartbeat(Heartbeat {}),
    })
}

fn session_input(message: AgentMessage) -> SessionInput {
    match message.kind {
        Some(agent_message::Kind::Capacity(capacity)) => SessionInput::Capacity {
            free_slots: capacity.free_slots,
            assignments_received: capacity.assignments_received,
        },
        _ => SessionInput::Other,
    }
}

fn log_piece(chunk: LogChunk) -> LogPiece {
    LogPiece {
        job: JobId(chunk.job_id),
        attempt: chunk.attempt,
        seq: chunk.seq,
        offset: chunk.offset,
        data: chunk.data,
    }
}

/// The phase readings of a completion; `None` from an agent that sends none.
fn job_timings(timings: Option<proto::JobTimings>) -> Option<JobTimings> {
    let timings = timings?;
    let at = |micros: Option<i64>| micros.and_then(DateTime::from_timestamp_micros);
    Some(JobTimings {
        assignment_sent_at: at(timings.assignment_sent_at_unix_us),
        received_at: at(timings.received_at_unix_us),
        fetched_at: at(timings.fetched_at_unix_us),
        fetch_ran: timings.fetch_ran,
        work_tree_ready_at: at(timings.work_tree_ready_at_unix_us),
        sandbox_ready_at: at(timings.sandbox_ready_at_unix_us),
        make_spawned_at: at(timings.make_spawned_at_unix_us),
        make_exited_at: at(timings.make_exited_at_unix_us),
        log_acked_at: at(timings.log_acked_at_unix_us),
        completion_sent_at: at(timings.completion_sent_at_unix_us),
    })
}

fn outcome(value: i32) -> Option<DomainOutcome> {
    match Outcome::try_from(value) {
        Ok(Outcome::Succeeded) => Some(DomainOutcome::Succeeded),
        Ok(Outcome::Failed) => Some(DomainOutcome::Failed),
        Ok(Outcome::Cancelled) => Some(DomainOutcome::Cancelled),
        Ok(Outcome::TimedOut) => Some(DomainOutcome::TimedOut),
        Ok(Outcome::Unspecified) | Err(_) => None,
    }
}

/// A gRPC stream of proto messages until the first error, as domain values.
fn until_error<T: Send + 'static, U: Send + 'static>(
    inbound: Streaming<T>,
    convert: fn(T) -> U,
) -> impl Stream<Item = U> + Send + Unpin {
    tokio_stream::StreamExt::map_while(inbound, move |message| message.ok().map(convert))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentGrpc {
    type SessionStream = BoxStream<ControllerMessage>;
    type PushLogsStream = BoxStream<LogAck>;

    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let token = bearer(request.metadata())?.to_owned();
        let request = request.into_inner();
        let registered = self
            .services
            .register_agent(
                &token,
                Registration {
                    name: request.name,
                    labels: request.labels.into_iter().collect(),
                    concurrency: request.concurrency,
                    version: request.version,
                    protocol_version: request.protocol_version,
                },
            )
            .await
            .map_err(status)?;
        Ok(Response::new(RegisterResponse {
            agent_id: registered.agent.id.0,
            lease_timeout_ms: millis(registered.lease_timeout),
            renew_interval_ms: millis(registered.renew_interval),
            kill_grace_ms: millis(registered.kill_grace),
        }))
    }

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let attached = self.attach(request.metadata()).await?;
        let mut inbound = request.into_inner();
        match inbound.message().await? {
            Some(AgentMessage {
                kind: Some(agent_message::Kind::Hello(hello)),
            }) if hello.agent_id == attached.agent.id.0 => {}
            _ => {
                return Err(Status::invalid_argument(
                    "a session starts with Hello naming the agent",
                ));
            }
        }
        let (outbound, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let services = self.services.clone();
        let shutdown = self.shutdown.clone();
        // Every line the session logs names the agent it serves.
        let span = tracing::info_span!(
            "agent_session",
            agent_id = %attached.agent.id,
            agent = %attached.agent.name,
        );
        self.tasks.spawn(
            async move {
                tracing::info!("session opened");
                let inbound = until_error(inbound, session_input);
                run_session(services, attached, inbound, outbound, shutdown).await;
                tracing::info!("session closed");
            }
            .instrument(span),
        );
        let metrics = self.services.metrics.clone();
        let stream = ReceiverStream::new(rx).map(move |output| {
            output
                .map(|output| {
                    if let SessionOutput::Assign(assignment) = &output {
                        metrics.job_dispatched(&assignment.job, Utc::now());
                    }
                    session_message(output)
                })
                .map_err(status)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn renew_lease(
        &self,
        request: Request<RenewLeaseRequest>,
    ) -> Result<Response<RenewLeaseResponse>, Status> {
        let agent = self.caller(request.metadata()).await?;
        let request = request.into_inner();
        let renewed = self
            .services
            .renew_agent_lease(&agent, JobId(request.job_id), request.attempt)
            .await
            .map_err(status)?;
        Ok(Response::new(RenewLeaseResponse {
            cancel_requested: renewed.cancel_requested,
            lease_timeout_ms: millis(renewed.lease_timeout),
        }))
    }

    async fn push_logs(
        &self,
        request: Request<Streaming<LogChunk>>,
    ) -> Result<Response<Self::PushLogsStream>, Status> {
        let attached = self.attach(request.metadata()).await?;
        let inbound = until_error(request.into_inner(), log_piece);
        let (outbound, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let services = self.services.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(run_log_intake(
            services, attached, inbound, outbound, shutdown,
        ));
        let stream = ReceiverStream::new(rx).map(|ack| {
            ack.map(|ack| LogAck {
                job_id: ack.job.0,
                seq: ack.seq,
                committed: ack.committed,
            })
            .map_err(status)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn complete_job(
        &self,
        request: Request<CompleteJobRequest>,
    ) -> Result<Response<CompleteJobResponse>, Status> {
        let agent = self.caller(request.metadata()).await?;
        let request = request.into_inner();
        self.services
            .complete_agent_job(
                &agent,
                Completion {
                    job: JobId(request.job_id),
                    attempt: request.attempt,
                    outcome: outcome(request.outcome),
                    exit_code: request.exit_code,
                    message: request.message,
                    log_length: request.log_length,
                    duration_ms: request.duration_ms,
                    timings: job_timings(request.timings),
                },
            )
            .await
            .map_err(status)?;
        Ok(Response::new(CompleteJobResponse {}))
    }
}
