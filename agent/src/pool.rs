//! The agent's main loop: keeps a registration and a Session with a
//! controller (reconnecting, re-registering, failing over), starts a job
//! supervisor for each assignment up to the concurrency, routes cancels, and
//! on shutdown drains: no new job, running jobs finish (leases still renewed)
//! until the drain timeout, then the rest are cancelled. ForgetRepository
//! deletes a repository's cache and idle work trees in a task of its own.

use std::collections::HashMap;
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::connection::{
    BACKOFF_INITIAL, BACKOFF_MAX, Backoff, Connection, Registration, RpcError, SessionCommand,
    SessionStream,
};
use crate::health;
use crate::job::{self, JobContext, JobHandle, JobKey, JobSpec};

/// How often the agent sends a Heartbeat on its Session.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

/// After the drain timeout cancelled the remaining jobs, how long they may
/// take to ship their logs and report before the agent gives up on them.
pub const SHUTDOWN_REPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// After giving up on reports, how long supervisors may take to clean up
/// before they are aborted.
pub const SHUTDOWN_CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A Session that lived shorter than this counts as a failed connection for
/// the reconnection back-off.
const STABLE_SESSION: Duration = Duration::from_secs(10);

type Connecting =
    Pin<Box<dyn Future<Output = anyhow::Result<(Registration, SessionStream)>> + Send>>;

/// The open Session and its per-stream accounting.
struct Live {
    session: SessionStream,
    /// Assignments received on this stream (for Capacity).
    assignments_received: u64,
    opened: Instant,
}

struct RunningJob {
    handle: JobHandle,
    task: tokio::task::Id,
}

/// Where shutdown stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shutdown {
    Running,
    /// SIGTERM: no new jobs; running jobs may finish.
    Draining,
    /// Drain timeout passed: remaining jobs were told to stop.
    Cancelling,
    /// Report timeout passed: supervisors were told to give up reporting.
    Abandoning,
}

pub(crate) struct Pool {
    connection: Connection,
    context: Arc<JobContext>,
    concurrency: u32,
    drain_timeout: Duration,
    registration: Option<Registration>,
    jobs: HashMap<JobKey, RunningJob>,
    /// The job supervisors; each yields its key when done.
    tasks: JoinSet<JobKey>,
    /// Repositories being forgotten (ForgetRepository); aborted when the
    /// pool returns (the controller sends it again at the next session).
    forgets: JoinSet<()>,
    /// The open Session, if any.
    live: Option<Live>,
    /// Where shutdown stands.
    shutdown: Shutdown,
    /// When the current shutdown stage runs out (none while running).
    deadline: Option<Instant>,
    /// The status file and systemd's status line.
    health: health::Reporter,
}

impl Pool {
    pub(crate) fn new(
        connection: Connection,
        context: Arc<JobContext>,
        concurrency: u32,
        drain_timeout: Duration,
        health: health::Reporter,
    ) -> Pool {
        Pool {
            connection,
            context,
            concurrency,
            drain_timeout,
            registration: None,
            jobs: HashMap::new(),
            tasks: JoinSet::new(),
            forgets: JoinSet::new(),
            live: None,
            shutdown: Shutdown::Running,
            deadline: None,
            health,
        }
    }

    /// Records where the agent stands for `--health-check` and systemd.
    fn report_health(&self) {
        self.health.report(
            self.health_state(),
            self.connection.current_url(),
            self.jobs.len(),
        );
    }

    /// A job started or ended: tells systemd (see `health`).
    fn report_jobs(&self) {
        self.health.jobs_changed(
            self.health_state(),
            self.connection.current_url(),
            self.jobs.len(),
        );
    }

    fn health_state(&self) -> health::State {
        if self.shutdown != Shutdown::Running {
            health::State::Draining
        } else if self.live.is_some() {
            health::State::Connected
        } else {
            health::State::Connecting
        }
    }

    fn free_slots(&self, shutdown: Shutdown) -> u32 {
        if shutdown != Shutdown::Running {
            return 0;
        }
        let running = u32::try_from(self.jobs.len()).unwrap_or(u32::MAX);
        self.concurrency.saturating_sub(running)
    }

    /// Queues a Capacity (the free slots now) on the open Session, if any.
    fn send_capacity(&self) {
        if let Some(live) = &self.live {
            let free = self.free_slots(self.shutdown);
            if !live.session.send_capacity(free, live.assignments_received) {
                tracing::debug!("could not queue Capacity; the session is closing");
            }
        }
    }

    /// Runs until `shutdown` is cancelled and the jobs drained, or a fatal
    /// error (token refused, protocol mismatch).
    ///
    /// One loop: every wake-up is a branch below, and each branch's work is
    /// a method of its own.
    pub(crate) async fn run(
        mut self,
        shutdown_signal: CancellationToken,
        stop_now: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut reconnect_backoff = Backoff::default();
        let mut connecting: Option<Connecting> = Some(Box::pin(connect(
            self.connection.clone(),
            self.free_slots(self.shutdown),
            Duration::ZERO,
        )));
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.report_health();
        self.health.ready();

        loop {
            tokio::select! {
                () = shutdown_signal.cancelled(), if self.shutdown == Shutdown::Running => {
                    if self.start_draining().is_break() {
                        return Ok(());
                    }
                }

                () = stop_now.cancelled(), if self.shutdown == Shutdown::Draining => {
                    tracing::warn!(jobs = self.jobs.len(), "asked to stop now; cancelling the running jobs");
                    self.cancel_remaining();
                }

                () = sleep_until(self.deadline) => {
                    if self.stage_ran_out().await.is_break() {
                        return Ok(());
                    }
                }

                connected = poll_connecting(&mut connecting) => {
                    connecting = None;
                    match connected {
                        Ok((registration, session)) => {
                            self.session_opened(registration, session);
                            heartbeat.reset();
                        }
                        Err(error) => {
                            return Err(self.fail(error).await);
                        }
                    }
                }

                command = next_command(&mut self.live) => {
                    match command {
                        Ok(Some(command)) => self.on_command(command),
                        Ok(None) => connecting = Some(self.session_lost(None, &mut reconnect_backoff)),
                        Err(error) => connecting = Some(self.session_lost(Some(error), &mut reconnect_backoff)),
                    }
                }

                Some(joined) = self.tasks.join_next_with_id() => {
                    if self.job_ended(joined).is_break() {
                        return Ok(());
                    }
                }

                Some(joined) = self.forgets.join_next() => {
                    if let Err(error) = joined {
                        tracing::error!(%error, "forgetting a repository failed");
                    }
                }

                _ = heartbeat.tick() => {
                    if let Some(live) = &self.live {
                        live.session.send_heartbeat();
                    }
                    self.report_health();
                }
            }
        }
    }

    /// The shutdown signal: no new jobs (Capacity 0), running jobs may
    /// finish until the drain timeout. `Break` when no job runs: the pool
    /// is done.
    fn start_draining(&mut self) -> ControlFlow<()> {
        self.shutdown = Shutdown::Draining;
        self.report_health();
        if self.jobs.is_empty() {
            tracing::info!("shutting down; no job running");
            return ControlFlow::Break(());
        }
        // Capacity 0 first: once this line is logged, no new job comes.
        self.send_capacity();
        tracing::info!(
            jobs = self.jobs.len(),
            drain_timeout_s = self.drain_timeout.as_secs(),
            "shutting down; waiting for running jobs"
        );
        self.deadline = Some(Instant::now() + self.drain_timeout);
        ControlFlow::Continue(())
    }

    /// Tells every running job to stop, and gives them
    /// [`SHUTDOWN_REPORT_TIMEOUT`] to ship their logs and report.
    fn cancel_remaining(&mut self) {
        self.cancel_all();
        self.shutdown = Shutdown::Cancelling;
        self.deadline = Some(Instant::now() + SHUTDOWN_REPORT_TIMEOUT);
    }

    /// The current shutdown stage's deadline passed: moves on to the next
    /// (draining → cancelling → abandoning the reports → aborting the
    /// supervisors). `Break` once the supervisors were aborted: the pool is
    /// done.
    async fn stage_ran_out(&mut self) -> ControlFlow<()> {
        match self.shutdown {
            Shutdown::Draining => {
                tracing::warn!(
                    jobs = self.jobs.len(),
                    "drain timeout passed; cancelling the remaining jobs"
                );
                self.cancel_remaining();
            }
            Shutdown::Cancelling => {
                tracing::warn!(
                    jobs = self.jobs.len(),
                    "giving up on reporting the remaining jobs"
                );
                self.context.abandon.cancel();
                self.shutdown = Shutdown::Abandoning;
                self.deadline = Some(Instant::now() + SHUTDOWN_CLEANUP_TIMEOUT);
            }
            Shutdown::Abandoning | Shutdown::Running => {
                tracing::error!(
                    jobs = self.jobs.len(),
                    "job supervisors did not stop; aborting them"
                );
                self.tasks.shutdown().await;
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// A registration and Session were made: the Session becomes the live
    /// one, and gets the free slots now.
    fn session_opened(&mut self, registration: Registration, session: SessionStream) {
        tracing::info!(agent_id = %registration.agent_id, controller = self.connection.current_url(), "session open");
        self.registration = Some(registration);
        self.live = Some(Live {
            session,
            assignments_received: 0,
            opened: Instant::now(),
        });
        // The Capacity queued when connecting may be stale.
        self.send_capacity();
        self.report_health();
    }

    /// The Session ended (`error`: it broke; `None`: the controller closed
    /// it). Returns the reconnection, after a back-off that starts again
    /// when the Session had lived [`STABLE_SESSION`].
    fn session_lost(&mut self, error: Option<RpcError>, backoff: &mut Backoff) -> Connecting {
        let lived = self
            .live
            .as_ref()
            .map(|l| l.opened.elapsed())
            .unwrap_or_default();
        self.live = None;
        self.report_health();
        self.context.metrics.reconnected();
        match error {
            Some(error) => tracing::warn!(%error, "session broken; reconnecting"),
            None => tracing::warn!("the controller closed the session; reconnecting"),
        }
        if lived >= STABLE_SESSION {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        Box::pin(connect(
            self.connection.clone(),
            self.free_slots(self.shutdown),
            delay,
        ))
    }

    /// A job supervisor ended (or panicked): the job is forgotten and its
    /// slot freed. `Break` when shutting down and that was the last job:
    /// the pool is done.
    fn job_ended(
        &mut self,
        joined: Result<(tokio::task::Id, JobKey), tokio::task::JoinError>,
    ) -> ControlFlow<()> {
        let key = match joined {
            Ok((_, key)) => Some(key),
            Err(error) => {
                tracing::error!(%error, "a job supervisor failed");
                let id = error.id();
                self.jobs
                    .iter()
                    .find(|(_, job)| job.task == id)
                    .map(|(key, _)| *key)
            }
        };
        if let Some(key) = key {
            self.jobs.remove(&key);
        }
        self.report_jobs();
        if self.shutdown != Shutdown::Running && self.jobs.is_empty() {
            tracing::info!("all jobs finished; shutting down");
            return ControlFlow::Break(());
        }
        self.send_capacity();
        ControlFlow::Continue(())
    }

    fn on_command(&mut self, command: SessionCommand) {
        match command {
            SessionCommand::Assign(spec) => {
                if let Some(live) = self.live.as_mut() {
                    live.assignments_received += 1;
                }
                self.assign(*spec);
                self.report_jobs();
            }
            SessionCommand::Cancel { key, reason } => match self.jobs.get(&key) {
                Some(job) => {
                    tracing::info!(
                        job_id = key.id.0,
                        attempt = key.attempt,
                        reason,
                        "cancel requested"
                    );
                    job.handle.cancel(reason);
                }
                None => {
                    tracing::debug!(
                        job_id = key.id.0,
                        attempt = key.attempt,
                        "cancel for a job not running here"
                    );
                }
            },
            SessionCommand::Heartbeat => {}
            SessionCommand::ForgetRepository { git_url } => {
                let workspaces = self.context.workspaces.clone();
                let span = tracing::info_span!(
                    "forget_repository",
                    repo = %crate::workspace::redact_url(&git_url)
                );
                self.forgets.spawn(
                    async move {
                        workspaces.forget(&git_url).await;
                    }
                    .instrument(span),
                );
            }
        }
    }

    fn assign(&mut self, spec: JobSpec) {
        let key = spec.key;
        if self.jobs.contains_key(&key) {
            tracing::warn!(
                job_id = key.id.0,
                attempt = key.attempt,
                "assignment of a job already running here; ignored"
            );
            return;
        }
        let Some(registration) = &self.registration else {
            tracing::error!(job_id = key.id.0, "assignment before registration; ignored");
            return;
        };
        if self.free_slots(Shutdown::Running) == 0 {
            // The controller's view lagged behind; the job is ours now, so
            // run it rather than lose it.
            tracing::warn!(
                job_id = key.id.0,
                running = self.jobs.len(),
                "assignment beyond the concurrency; running it anyway"
            );
        }
        let (handle, task) = job::start(
            self.context.clone(),
            spec,
            registration.timings,
            &mut self.tasks,
        );
        if matches!(self.shutdown, Shutdown::Cancelling | Shutdown::Abandoning) {
            handle.shut_down();
        }
        self.jobs.insert(key, RunningJob { handle, task });
    }

    /// Cancels every running job with "agent shut down".
    fn cancel_all(&self) {
        for job in self.jobs.values() {
            job.handle.shut_down();
        }
    }

    /// Stops every job after a fatal error and returns the error.
    async fn fail(&mut self, error: anyhow::Error) -> anyhow::Error {
        tracing::error!(error = %format!("{error:#}"), jobs = self.jobs.len(), "fatal error; stopping");
        self.cancel_all();
        self.context.abandon.cancel();
        let drained = tokio::time::timeout(SHUTDOWN_CLEANUP_TIMEOUT, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.tasks.shutdown().await;
        }
        error
    }
}

/// Registers (again) and opens a Session, retrying until it works or fails
/// for good.
async fn connect(
    connection: Connection,
    free_slots: u32,
    delay: Duration,
) -> anyhow::Result<(Registration, SessionStream)> {
    tokio::time::sleep(delay).await;
    let mut backoff = Backoff::default();
    loop {
        let registration = match connection.register().await {
            Ok(registration) => registration,
            Err(RpcError::Unauthenticated(message)) => {
                anyhow::bail!("the controller refused the agent token: {message}")
            }
            Err(RpcError::FailedPrecondition(message)) => anyhow::bail!(
                "the controller refused this agent's protocol version {} (agent {}): {message}",
                hobotnica_common::proto::PROTOCOL_VERSION,
                hobotnica_common::VERSION,
            ),
            Err(RpcError::Refused { code, message }) => {
                anyhow::bail!("the controller refused the registration ({code:?}): {message}")
            }
            Err(error) => {
                let delay = backoff.next_delay();
                if delay == BACKOFF_INITIAL || delay == BACKOFF_MAX {
                    tracing::warn!(%error, controller = connection.current_url(), retry_in_ms = delay.as_millis() as u64, "cannot register");
                } else {
                    tracing::debug!(%error, controller = connection.current_url(), retry_in_ms = delay.as_millis() as u64, "cannot register");
                }
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        match connection
            .open_session(&registration.agent_id, free_slots)
            .await
        {
            Ok(session) => return Ok((registration, session)),
            Err(RpcError::Unauthenticated(message)) => {
                anyhow::bail!("the controller refused the agent token: {message}")
            }
            Err(error) => {
                // NOT_FOUND included: the loop registers again first.
                let delay = backoff.next_delay();
                tracing::warn!(%error, controller = connection.current_url(), retry_in_ms = delay.as_millis() as u64, "cannot open the session");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn poll_connecting(
    connecting: &mut Option<Connecting>,
) -> anyhow::Result<(Registration, SessionStream)> {
    match connecting {
        Some(future) => future.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn next_command(live: &mut Option<Live>) -> Result<Option<SessionCommand>, RpcError> {
    match live {
        Some(live) => live.session.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
