//! One job attempt from assignment to completion. A supervisor task owns the
//! job: it prepares the work tree, runs `make <target>`, and consumes one
//! closed enum of events ([`JobEvent`]) from the lease task, the pool, its
//! timers and the process, then reports the outcome once every log byte was
//! acknowledged.

mod lease;
mod spec;
mod supervisor;

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use spec::{Completion, JobKey, JobSpec, LeaseTimings};

use crate::connection::{Connection, LeaseStatus, RpcError, retry};
use crate::logs::LogTransport;
use crate::sandbox::Sandbox;
use crate::workspace::Workspaces;

/// Everything that can make a job's supervisor act.
#[derive(Debug)]
pub enum JobEvent {
    /// make exited (reaped; the rest of its process group was killed).
    ProcessExited(std::io::Result<ExitStatus>),
    /// The lease was renewed; the controller may ask to cancel.
    LeaseRenewed { cancel_requested: bool },
    /// The controller no longer holds this attempt as running on this agent
    /// (FAILED_PRECONDITION): stop, report nothing, forget the job.
    JobGone { reason: String },
    /// A Cancel arrived on the Session.
    CancelRequested { reason: String },
    /// The job's wall-clock limit passed.
    DeadlineReached,
    /// The grace after SIGTERM passed: SIGKILL.
    KillGraceExpired,
    /// The agent's drain timeout passed: cancel with "agent shut down".
    Shutdown,
    /// The log shipper ended before the controller had the whole log (the
    /// spool stayed unreadable, or the shipper crashed): the rest can never
    /// be shipped, so the job fails, reported with what the controller has.
    LogLost { reason: String },
    /// The job's output went past its log limit: the rest is dropped, and
    /// the job is stopped and fails.
    LogLimitReached,
}

/// The calls a job makes to the controller: [`Connection`] in the agent;
/// tests script a controller here.
pub trait JobController: LogTransport + Clone {
    /// RenewLease, retried (with fail-over) while the controller is
    /// unavailable.
    fn renew(&self, key: JobKey) -> impl Future<Output = Result<LeaseStatus, RpcError>> + Send;

    /// CompleteJob, retried (with fail-over) while the controller is
    /// unavailable.
    fn complete(
        &self,
        completion: &Completion,
    ) -> impl Future<Output = Result<(), RpcError>> + Send;
}

impl JobController for Connection {
    async fn renew(&self, key: JobKey) -> Result<LeaseStatus, RpcError> {
        retry(self, "renew lease", || self.renew_lease(key)).await
    }

    async fn complete(&self, completion: &Completion) -> Result<(), RpcError> {
        retry(self, "complete job", || self.complete_job(completion)).await
    }
}

/// What every job of this agent shares.
pub struct JobContext {
    pub connection: Connection,
    /// Where the job's figures are recorded.
    pub metrics: Arc<crate::metrics::AgentMetrics>,
    pub workspaces: Arc<Workspaces>,
    /// Where spools live (`<work_dir>/spool`).
    pub spool_dir: PathBuf,
    /// The agent's environment, the base of every job's environment.
    pub inherited_env: Arc<[(String, String)]>,
    /// Where make runs; `None` with `--isolation none`.
    pub sandbox: Option<Sandbox>,
    /// Cancelled when the agent stops waiting for jobs to report (shutdown
    /// deadline passed or fatal error): supervisors give up shipping and
    /// completing, clean up and return.
    pub abandon: CancellationToken,
}

/// The pool's handle on a running job.
#[derive(Clone)]
pub struct JobHandle {
    events: mpsc::UnboundedSender<JobEvent>,
}

impl JobHandle {
    /// Cancels the job (Cancel from the controller).
    pub fn cancel(&self, reason: String) {
        let _ = self.events.send(JobEvent::CancelRequested { reason });
    }

    /// Cancels the job because the agent shuts down.
    pub fn shut_down(&self) {
        let _ = self.events.send(JobEvent::Shutdown);
    }
}

/// Spawns the job's supervisor into `tasks`; the task yields the job's key
/// when the job is over (reported, or dropped) and cleaned up.
pub fn start(
    context: Arc<JobContext>,
    spec: JobSpec,
    timings: LeaseTimings,
    tasks: &mut JoinSet<JobKey>,
) -> (JobHandle, tokio::task::Id) {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let span = tracing::info_span!(
        "job",
        job_id = spec.key.id.0,
        attempt = spec.key.attempt,
        repo = %spec.repo,
        target = %spec.target,
    );
    let key = spec.key;
    let controller = context.connection.clone();
    let supervisor = supervisor::Supervisor::new(
        context,
        controller,
        spec,
        timings,
        events_tx.clone(),
        events_rx,
    );
    let task = tasks.spawn(
        async move {
            supervisor.run().await;
            key
        }
        .instrument(span),
    );
    (JobHandle { events: events_tx }, task.id())
}
