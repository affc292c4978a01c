//! The supervisor of one job attempt: work tree, make, kill path, and the
//! report. Its child tasks (lease renewal, log shipper) live in its own
//! `JoinSet` and end with it.

use std::io;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hobotnica_common::env::{CiVars, compose};
use hobotnica_common::ids::CommitSha;
use hobotnica_common::job::{JobTimings, Outcome};
use hobotnica_common::logs::log_limit_message;
use hobotnica_common::validate;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{Completion, JobContext, JobController, JobEvent, JobSpec, LeaseTimings, lease};
use crate::connection::{Backoff, Connection, RpcError};
use crate::logs::{self, LogTransport, Secrets, Shipper, ShipperEnd, ShipperHandle, Spool};
use crate::process::{self, CommandSpec, Gate, OUTPUT_CLOSE_TIMEOUT, OutputPipe, ProcessGroup};
use crate::sandbox::JobPaths;
use crate::workspace::{JobDirs, Remote, WorkTree, WorkspaceError};

/// Why the job is being stopped before make finished on its own.
#[derive(Debug, Clone)]
enum Stop {
    Cancelled(String),
    TimedOut(Duration),
    ShutDown,
    /// The controller forgot the job: nothing is reported.
    Gone(String),
    /// The log can no longer be shipped: the job fails.
    LogLost(String),
    /// The output went past the log limit (bytes): the job fails.
    LogLimit(u64),
}

/// How the work ended, before it is reported.
struct WorkEnd {
    outcome: Outcome,
    exit_code: Option<i32>,
    message: String,
}

pub(super) struct Supervisor<C: JobController = Connection> {
    context: Arc<JobContext>,
    controller: C,
    spec: JobSpec,
    timings: LeaseTimings,
    events_tx: mpsc::UnboundedSender<JobEvent>,
    events_rx: mpsc::UnboundedReceiver<JobEvent>,
    stop: Option<Stop>,
    /// Set when the shipper ended before the controller had the whole log:
    /// the job is then reported failed, with this reason.
    log_lost: Option<String>,
    /// The job's secrets and its git header's secret parts: masked in make's
    /// output and in every line and message the agent writes about the job.
    secrets: Secrets,
    started: Instant,
    /// When each phase the job reached ended: one clock reading each,
    /// sent with the completion.
    phases: JobTimings,
    /// Lease renewal and log shipping.
    children: JoinSet<()>,
    children_stop: CancellationToken,
}

impl<C: JobController> Supervisor<C> {
    pub(super) fn new(
        context: Arc<JobContext>,
        controller: C,
        spec: JobSpec,
        timings: LeaseTimings,
        events_tx: mpsc::UnboundedSender<JobEvent>,
        events_rx: mpsc::UnboundedReceiver<JobEvent>,
    ) -> Supervisor<C> {
        let header_parts = spec
            .git_http_header
            .as_ref()
            .map(|header| header.secret_parts())
            .unwrap_or_default();
        let secrets = Secrets::new(spec.secrets.iter().chain(&header_parts));
        Supervisor {
            context,
            controller,
            secrets,
            phases: spec.timings.clone(),
            spec,
            timings,
            events_tx,
            events_rx,
            stop: None,
            log_lost: None,
            started: Instant::now(),
            children: JoinSet::new(),
            children_stop: CancellationToken::new(),
        }
    }

    pub(super) async fn run(mut self) {
        let key = self.spec.key;
        let _running = crate::metrics::RunningJob::start(&self.context.metrics);
        tracing::info!(commit = %self.spec.commit, "job started");
        self.spawn_lease();

        let spool_path = self.context.spool_dir.join(format!("{key}.log"));
        let spool = match Spool::with_limit(spool_path, self.spec.max_log_bytes) {
            Ok(spool) => Arc::new(spool),
            Err(error) => {
                let message = format!("could not create the log spool: {error}");
                tracing::error!("{message}");
                let completion = self.completion(
                    WorkEnd {
                        outcome: Outcome::Failed,
                        exit_code: None,
                        message,
                    },
                    0,
                );
                self.report(None, completion).await;
                self.stop_children().await;
                return;
            }
        };

        let shipper_handle = self.spawn_shipper(&spool);
        self.spawn_log_limit_watch(&spool);

        let (tree, mut end) = self.work(&spool).await;
        if spool.is_full() && self.stop.is_none() {
            // make ended on its own before the limit was heard of: its log
            // was cut all the same.
            end = WorkEnd {
                outcome: Outcome::Failed,
                exit_code: end.exit_code,
                message: log_limit_message(spool.limit()),
            };
        }
        let log_length = spool.close();
        match &self.stop {
            Some(Stop::Gone(reason)) => {
                tracing::warn!(
                    reason,
                    "the controller no longer holds this job; dropping it"
                );
                self.context.metrics.job_dropped();
            }
            _ => {
                let completion = self.completion(end, log_length);
                self.report(Some(&shipper_handle), completion).await;
            }
        }

        self.stop_children().await;
        spool.remove();
        if let Some(tree) = tree {
            self.context.workspaces.remove(tree).await;
        }
    }

    /// Starts renewing the job's lease as a child task. If that task
    /// panics, nothing renews the lease any more: the controller will take
    /// the job back, so the job is dropped as gone rather than run on
    /// unnoticed (perhaps twice, once here and once elsewhere).
    fn spawn_lease(&mut self) {
        let crash = CrashReport {
            events: self.events_tx.clone(),
            event: || JobEvent::JobGone {
                reason: "the agent's lease renewal crashed".to_owned(),
            },
        };
        let renew = lease::renew_lease(
            self.controller.clone(),
            self.spec.key,
            self.timings.renew_interval,
            self.events_tx.clone(),
            self.children_stop.clone(),
        );
        self.children.spawn(
            async move {
                let _crash = crash;
                renew.await;
            }
            .in_current_span(),
        );
    }

    /// Tells the job when its output went past the log limit.
    fn spawn_log_limit_watch(&mut self, spool: &Spool) {
        let full = spool.full_token();
        let events = self.events_tx.clone();
        let stop = self.children_stop.clone();
        self.children.spawn(async move {
            tokio::select! {
                () = full.cancelled() => {
                    let _ = events.send(JobEvent::LogLimitReached);
                }
                () = stop.cancelled() => {}
            }
        });
    }

    /// Starts the job's log shipper as a child task.
    fn spawn_shipper(&mut self, spool: &Arc<Spool>) -> ShipperHandle {
        let (shipper, handle) = Shipper::new(self.controller.clone(), self.spec.key, spool.clone());
        let shipper = shipper.counting_in(self.context.metrics.log_bytes_shipped.clone());
        self.children.spawn(
            ship_log(shipper, self.children_stop.clone(), self.events_tx.clone()).in_current_span(),
        );
        handle
    }

    async fn stop_children(&mut self) {
        self.children_stop.cancel();
        while let Some(joined) = self.children.join_next().await {
            if let Err(error) = joined {
                tracing::error!(%error, "a task of the job failed");
            }
        }
    }

    fn completion(&self, end: WorkEnd, log_length: u64) -> Completion {
        Completion {
            key: self.spec.key,
            outcome: end.outcome,
            exit_code: end.exit_code,
            message: self.secrets.mask(&end.message),
            log_length,
            duration: self.started.elapsed(),
            timings: self.phases.clone(),
        }
    }

    /// Takes in an event from the lease, the pool or a timer. Returns true
    /// when the job must now be stopped (the first stop reason wins; a job
    /// gone overrides everything, as nothing may be reported then).
    fn on_event(&mut self, event: JobEvent, spool: &Spool) -> bool {
        let stop = match event {
            JobEvent::LeaseRenewed {
                cancel_requested: true,
            } => Stop::Cancelled(String::new()),
            JobEvent::CancelRequested { reason } => Stop::Cancelled(reason),
            JobEvent::DeadlineReached => Stop::TimedOut(self.spec.timeout.unwrap_or_default()),
            JobEvent::Shutdown => Stop::ShutDown,
            JobEvent::LogLimitReached => Stop::LogLimit(spool.limit()),
            JobEvent::JobGone { reason } => Stop::Gone(reason),
            JobEvent::LogLost { reason } => {
                tracing::error!(
                    reason,
                    "the job's log can no longer be shipped; failing the job"
                );
                self.log_lost.get_or_insert_with(|| reason.clone());
                Stop::LogLost(reason)
            }
            JobEvent::LeaseRenewed {
                cancel_requested: false,
            }
            | JobEvent::ProcessExited(_)
            | JobEvent::KillGraceExpired => return false,
        };
        match (&self.stop, &stop) {
            (None, _) => {}
            (Some(Stop::Gone(_)), _) => return false,
            (Some(_), Stop::Gone(_)) => {
                self.stop = Some(stop);
                return false;
            }
            (Some(_), _) => return false,
        }
        // The log says why once the job's processes are gone (`stopped`),
        // after the last thing they printed.
        tracing::info!(?stop, "stopping the job");
        self.stop = Some(stop);
        true
    }

    /// Writes an agent line to the job's log, masked.
    fn line(&self, spool: &Spool, text: &str) {
        spool.line(&self.secrets.mask(text));
    }

    fn failed(&self, spool: &Spool, message: String) -> WorkEnd {
        let message = self.secrets.mask(&message);
        spool.line(&message);
        WorkEnd {
            outcome: Outcome::Failed,
            exit_code: None,
            message,
        }
    }

    /// How a job the agent stopped ended. Its log ends with one line saying
    /// why, after everything its processes printed; it has no exit code:
    /// make did not end on its own, and what it exits with when stopped
    /// (2, or none when a signal ends it) says nothing about the job.
    fn stopped(&self, spool: &Spool) -> WorkEnd {
        let (outcome, message) = match &self.stop {
            Some(Stop::Cancelled(reason)) if reason.is_empty() => {
                (Outcome::Cancelled, "cancelled".to_owned())
            }
            Some(Stop::Cancelled(reason)) => (Outcome::Cancelled, format!("cancelled: {reason}")),
            Some(Stop::TimedOut(limit)) => (
                Outcome::TimedOut,
                format!("timed out after {}", human(*limit)),
            ),
            Some(Stop::ShutDown) => (Outcome::Cancelled, "agent shut down".to_owned()),
            Some(Stop::Gone(reason)) => (Outcome::Cancelled, reason.clone()),
            Some(Stop::LogLost(reason)) => (Outcome::Failed, reason.clone()),
            Some(Stop::LogLimit(limit)) => (Outcome::Failed, log_limit_message(*limit)),
            None => (Outcome::Failed, "stopped".to_owned()),
        };
        match &self.stop {
            Some(Stop::Cancelled(_) | Stop::TimedOut(_) | Stop::ShutDown) => {
                self.line(spool, &message);
            }
            // Nothing written now would reach the controller.
            Some(Stop::Gone(_) | Stop::LogLost(_)) | None => {}
            // The spool ended the log with the notice already.
            Some(Stop::LogLimit(_)) => {}
        }
        WorkEnd {
            outcome,
            exit_code: None,
            message,
        }
    }

    /// Prepares the work tree and runs make; the tree is returned for
    /// removal whatever happened.
    async fn work(&mut self, spool: &Arc<Spool>) -> (Option<WorkTree>, WorkEnd) {
        let commit: CommitSha = match self.spec.commit.parse() {
            Ok(commit) => commit,
            Err(error) => {
                let message = format!("invalid commit {:?}: {error}", self.spec.commit);
                return (None, self.failed(spool, message));
            }
        };
        if let Err(error) = validate::target("target", &self.spec.target) {
            return (None, self.failed(spool, format!("invalid {error}")));
        }
        if let Some(Err(error)) = self.spec.git_http_header.as_ref().map(|h| h.validate()) {
            return (None, self.failed(spool, error.to_string()));
        }

        // The sandbox is made while git checks the tree out, and waits.
        let sandbox_made = std::sync::Mutex::new(None);
        let tree = match self.prepare(&commit, spool, &sandbox_made).await {
            Ok(tree) => {
                self.phases.fetched_at = Some(tree.commit_ready_at);
                self.phases.fetch_ran = Some(tree.fetch_ran);
                self.phases.work_tree_ready_at = Some(Utc::now());
                tree
            }
            Err(WorkspaceError::Cancelled) => return (None, self.stopped(spool)),
            Err(error) => {
                let error = self.secrets.mask(&error.to_string());
                tracing::warn!(error, "preparing the work tree failed");
                return (None, self.failed(spool, error));
            }
        };
        // Dropped (a stop, or an error above), a waiting sandbox is killed.
        let sandbox_made = sandbox_made.into_inner().ok().flatten();
        if self.stop.is_some() {
            return (Some(tree), self.stopped(spool));
        }
        let end = self.run_make(&tree, spool, sandbox_made).await;
        (Some(tree), end)
    }

    /// Prepares the work tree; once its directories exist, starts the
    /// job's sandbox waiting at its gate into `sandbox_made` (not without
    /// a sandbox, nor when that fails: then make starts the usual way).
    async fn prepare(
        &mut self,
        commit: &CommitSha,
        spool: &Arc<Spool>,
        sandbox_made: &std::sync::Mutex<Option<Gated>>,
    ) -> Result<WorkTree, WorkspaceError> {
        let workspaces = self.context.workspaces.clone();
        let git_url = self.spec.git_url.clone();
        let http_header = self.spec.git_http_header.clone();
        let remote = Remote {
            url: &git_url,
            http_header: http_header.as_ref(),
        };
        let name = self.spec.key.to_string();
        let git_cancel = CancellationToken::new();
        let log_spool = spool.clone();
        let secrets = self.secrets.clone();
        let log = move |line: &str| log_spool.line(&secrets.mask(line));
        let sandbox = self.context.sandbox.clone();
        let job = self.spec.clone();
        let inherited_env = self.context.inherited_env.clone();
        let make_sandbox = move |dirs: &JobDirs| {
            let Some(sandbox) = sandbox else { return };
            let command = make_command(&job, &inherited_env, &dirs.tree);
            let paths = job_paths(&dirs.tree, &dirs.scratch, dirs.shared_objects.clone());
            // Here, on the runtime's worker thread, never on a blocking
            // thread: bubblewrap's --die-with-parent follows the thread that
            // forked it, and the runtime ends idle blocking threads after
            // 10 s, which would SIGKILL every longer job.
            match process::spawn_gated(&sandbox.wrap_gated(command, &paths)) {
                Ok(gated) => {
                    if let Ok(mut made) = sandbox_made.lock() {
                        *made = Some(gated);
                    }
                }
                Err(error) => tracing::warn!(%error, "could not start the sandbox early"),
            }
        };
        let prepare =
            workspaces.prepare_then(remote, commit, &name, &log, &git_cancel, make_sandbox);
        tokio::pin!(prepare);
        loop {
            tokio::select! {
                result = &mut prepare => return result,
                Some(event) = self.events_rx.recv() => {
                    if self.on_event(event, spool) {
                        git_cancel.cancel();
                    }
                }
            }
        }
    }

    /// Runs make in the work tree until it exits, copying its output
    /// (masked) to the spool. A job event that stops the job, or the job's
    /// deadline, sends SIGTERM to make's process group, and SIGKILL once the
    /// kill grace is over.
    ///
    /// With `sandbox_made`, make starts in it when its gate opens; a
    /// sandbox that failed meanwhile has written why to its output, which
    /// the log shows, and exits with an error as bubblewrap does.
    async fn run_make(
        &mut self,
        tree: &WorkTree,
        spool: &Arc<Spool>,
        sandbox_made: Option<Gated>,
    ) -> WorkEnd {
        let spawned = match sandbox_made {
            Some((group, pipe, gate)) => {
                self.phases.sandbox_ready_at = Some(Utc::now());
                if let Err(error) = gate.open() {
                    tracing::debug!(%error, "the sandbox was gone before its gate opened");
                }
                Ok((group, pipe))
            }
            None => {
                let command = self.sandboxed_make(tree, spool);
                self.phases.sandbox_ready_at = Some(Utc::now());
                process::spawn(&command)
            }
        };
        let (mut group, pipe) = match spawned {
            Ok(spawned) => spawned,
            Err(error) => return self.failed(spool, format!("could not start make: {error}")),
        };
        self.phases.make_spawned_at = Some(Utc::now());
        if let (Some(ready), Some(spawned)) =
            (self.phases.work_tree_ready_at, self.phases.make_spawned_at)
        {
            self.context
                .metrics
                .sandbox_ready((spawned - ready).to_std().unwrap_or_default());
        }
        tracing::info!(pgid = group.pgid(), "make started");
        let copy = logs::copy_output(pipe, self.secrets.masker(), spool.clone());
        tokio::pin!(copy);
        let mut copied: Option<io::Result<u64>> = None;
        let deadline = self.spec.timeout.map(|limit| Instant::now() + limit);
        let mut kill_at: Option<Instant> = None;

        let status = loop {
            let event = tokio::select! {
                status = group.wait() => JobEvent::ProcessExited(status),
                result = &mut copy, if copied.is_none() => {
                    copied = Some(result);
                    continue;
                }
                Some(event) = self.events_rx.recv() => event,
                () = sleep_until(deadline), if self.stop.is_none() => JobEvent::DeadlineReached,
                () = sleep_until(kill_at) => JobEvent::KillGraceExpired,
            };
            match event {
                JobEvent::ProcessExited(status) => {
                    self.phases.make_exited_at = Some(Utc::now());
                    break status;
                }
                JobEvent::KillGraceExpired => {
                    tracing::info!("grace period over; killing the process group");
                    group.kill();
                    kill_at = None;
                }
                event => {
                    if self.on_event(event, spool) {
                        group.terminate();
                        kill_at = Some(Instant::now() + self.timings.kill_grace);
                    }
                }
            }
        };

        let spool_error = self.finish_output(copy, copied, spool).await;
        let status: ExitStatus = match status {
            Ok(status) => status,
            Err(error) => return self.failed(spool, format!("waiting for make failed: {error}")),
        };
        let mut end = self.make_exited(status, spool);
        if let Some(suffix) = spool_error {
            end.message.push_str(&suffix);
        }
        end
    }

    /// `make <target>` for this job in `tree`, wrapped in the agent's
    /// sandbox; without one (`--isolation none`) the job's log says so.
    fn sandboxed_make(&self, tree: &WorkTree, spool: &Spool) -> CommandSpec {
        let command = make_command(&self.spec, &self.context.inherited_env, &tree.path);
        match &self.context.sandbox {
            Some(sandbox) => {
                let paths = job_paths(&tree.path, &tree.scratch, tree.shared_objects());
                sandbox.wrap(command, &paths)
            }
            None => {
                self.line(
                    spool,
                    "WARNING: this agent runs jobs without a sandbox (--isolation none): this job can \
                     read the agent's files and token and other jobs' work",
                );
                command
            }
        }
    }

    /// After make exited: unless `copied` holds the copy's result already,
    /// waits up to [`OUTPUT_CLOSE_TIMEOUT`] for the rest of its output, then
    /// drops what is still open with a line in the log. Returns what to add
    /// to the job's message when the output could not all be copied.
    async fn finish_output(
        &self,
        copy: Pin<&mut impl Future<Output = io::Result<u64>>>,
        mut copied: Option<io::Result<u64>>,
        spool: &Spool,
    ) -> Option<String> {
        if copied.is_none() {
            match tokio::time::timeout(OUTPUT_CLOSE_TIMEOUT, copy).await {
                Ok(result) => copied = Some(result),
                Err(_) => self.line(
                    spool,
                    "output still open after make exited (a process left its process group?); the rest is dropped",
                ),
            }
        }
        match copied {
            Some(Err(error)) => {
                tracing::error!(%error, "copying the output failed");
                Some(format!("; log incomplete: {error}"))
            }
            _ => None,
        }
    }

    /// How the work ended, from make's exit status: as the stop reason when
    /// the job was stopped, else succeeded on exit code 0 and failed
    /// otherwise.
    fn make_exited(&self, status: ExitStatus, spool: &Spool) -> WorkEnd {
        tracing::info!(
            exit_code = status.code(),
            signal = status.signal(),
            "make exited"
        );
        if self.stop.is_some() {
            self.stopped(spool)
        } else if status.success() {
            WorkEnd {
                outcome: Outcome::Succeeded,
                exit_code: Some(0),
                message: String::new(),
            }
        } else {
            let message = match (status.code(), status.signal()) {
                (Some(code), _) => format!("make {} exited with code {code}", self.spec.target),
                (None, Some(signal)) => {
                    format!("make {} was killed by signal {signal}", self.spec.target)
                }
                (None, None) => format!("make {} failed", self.spec.target),
            };
            WorkEnd {
                outcome: Outcome::Failed,
                exit_code: status.code(),
                message,
            }
        }
    }

    /// Waits until the controller acknowledged `log_length` bytes, then
    /// completes the job; retries until the controller has the result,
    /// unless the job is gone or the agent gives up (abandon). A job whose
    /// log was lost on the way is reported failed.
    async fn report(&mut self, shipper: Option<&ShipperHandle>, completion: Completion) {
        let mut acked = shipper.map(ShipperHandle::acked);
        let mut backoff = Backoff::default();
        loop {
            if let Some(acked) = acked.as_mut()
                && !self.wait_shipped(acked, completion.log_length).await
            {
                return;
            }
            let mut sent = self.with_lost_log(&completion);
            // A lost log was never all acknowledged: no reading then.
            if acked.is_some() && self.log_lost.is_none() {
                sent.timings.log_acked_at = Some(Utc::now());
            }
            sent.timings.completion_sent_at = Some(Utc::now());
            let controller = self.controller.clone();
            let Some(result) = self.listening(controller.complete(&sent)).await else {
                return;
            };
            match result {
                Ok(()) => {
                    self.context.metrics.job_finished(sent.outcome);
                    tracing::info!(
                        outcome = ?sent.outcome,
                        exit_code = sent.exit_code,
                        log_length = sent.log_length,
                        duration_ms = sent.duration.as_millis() as u64,
                        "job completed"
                    );
                    return;
                }
                Err(RpcError::LogIncomplete(message)) => {
                    let delay = backoff.next_delay();
                    let ask_again_at = Instant::now() + delay;
                    tracing::warn!(
                        message,
                        retry_in_ms = delay.as_millis() as u64,
                        "the controller's log is incomplete; shipping the rest"
                    );
                    if self.log_lost.is_none()
                        && let (Some(shipper), Some(acked)) = (shipper, acked.as_mut())
                    {
                        acked.borrow_and_update();
                        shipper.resync();
                        // The shipper announces the resync with a (lower)
                        // acknowledged length; wait for it. A shipper that
                        // ended returns at once; how it ended comes as an
                        // event.
                        if self.listening(acked.changed()).await.is_none() {
                            return;
                        }
                    }
                    // Never ask again at once: a controller that keeps
                    // answering ABORTED, or a shipper that ended, made this a
                    // tight loop of CompleteJob calls.
                    if self
                        .listening(tokio::time::sleep_until(ask_again_at))
                        .await
                        .is_none()
                    {
                        return;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "the controller refused the completion; dropping the job");
                    return;
                }
            }
        }
    }

    /// The completion to send: as the work ended, or failed when the log was
    /// lost on the way.
    fn with_lost_log(&self, completion: &Completion) -> Completion {
        let mut completion = completion.clone();
        if let Some(reason) = &self.log_lost {
            let reason = self.secrets.mask(reason);
            completion.message = if completion.message.is_empty() || completion.message == reason {
                reason
            } else {
                format!("{reason}; {}", completion.message)
            };
            completion.outcome = Outcome::Failed;
            // What the controller has is all the log there will be: a
            // length it may not have could only be answered ABORTED, again
            // and again.
            completion.log_length = 0;
        }
        completion
    }

    /// Takes in an event while the job is being reported; false when the
    /// job is gone (nothing may be reported any more).
    fn on_report_event(&mut self, event: JobEvent) -> bool {
        match event {
            JobEvent::JobGone { reason } => {
                tracing::warn!(reason, "the job is gone; not reporting it");
                self.stop = Some(Stop::Gone(reason));
                false
            }
            JobEvent::LogLost { reason } => {
                tracing::error!(
                    reason,
                    "the job's log can no longer be shipped; failing the job"
                );
                self.log_lost.get_or_insert(reason);
                true
            }
            // The work is over: a cancel or a deadline changes nothing now.
            _ => true,
        }
    }

    /// Waits for `future` while taking in job events; `None` when the job
    /// is gone or the agent gives up (abandon).
    async fn listening<T>(&mut self, future: impl Future<Output = T>) -> Option<T> {
        let abandon = self.context.abandon.clone();
        tokio::pin!(future);
        loop {
            tokio::select! {
                output = &mut future => return Some(output),
                Some(event) = self.events_rx.recv() => {
                    if !self.on_report_event(event) {
                        return None;
                    }
                }
                () = abandon.cancelled() => {
                    tracing::warn!("the agent stops; the job's result is not reported");
                    return None;
                }
            }
        }
    }

    /// Whether every byte up to `len` was acknowledged or the log was lost
    /// (false: the job is gone or the agent gave up).
    async fn wait_shipped(&mut self, acked: &mut watch::Receiver<u64>, len: u64) -> bool {
        let abandon = self.context.abandon.clone();
        // A shipper that ended dropped its sender; how it ended comes as an
        // event (`JobGone`, `LogLost`).
        let mut shipper_alive = true;
        loop {
            if self.log_lost.is_some() || *acked.borrow_and_update() >= len {
                return true;
            }
            tokio::select! {
                changed = acked.changed(), if shipper_alive => {
                    if changed.is_err() {
                        shipper_alive = false;
                    }
                }
                Some(event) = self.events_rx.recv() => {
                    if !self.on_report_event(event) {
                        return false;
                    }
                }
                () = abandon.cancelled() => {
                    tracing::warn!(acked = *acked.borrow(), len, "the agent stops; the rest of the log is not shipped");
                    return false;
                }
            }
        }
    }
}

/// Runs the job's shipper; when it ends before it was told to stop, tells
/// the supervisor how — even when it panics: otherwise the supervisor would
/// wait for acknowledgements that never come, with the lease renewed all
/// along, until the agent stops.
async fn ship_log<T: LogTransport>(
    shipper: Shipper<T>,
    stop: CancellationToken,
    events: mpsc::UnboundedSender<JobEvent>,
) {
    let _crash = CrashReport {
        events: events.clone(),
        event: || JobEvent::LogLost {
            reason: "the agent's log shipper crashed; the log is incomplete".to_owned(),
        },
    };
    let event = match shipper.run(stop.clone()).await {
        ShipperEnd::Stopped if stop.is_cancelled() => return,
        ShipperEnd::Stopped => JobEvent::LogLost {
            reason: "the agent's log shipper stopped early; the log is incomplete".to_owned(),
        },
        ShipperEnd::JobGone(error) => JobEvent::JobGone {
            reason: error.to_string(),
        },
        ShipperEnd::SpoolUnreadable(error) => JobEvent::LogLost {
            reason: format!(
                "the job's log could not be read from the agent's spool ({error}); the log is \
                 incomplete"
            ),
        },
    };
    let _ = events.send(event);
}

/// Sends `event` to the supervisor when dropped while a child task unwinds
/// from a panic (not when the task is merely dropped: the supervisor is gone
/// then). Without it a child's panic went unnoticed until the job ended.
struct CrashReport {
    events: mpsc::UnboundedSender<JobEvent>,
    event: fn() -> JobEvent,
}

impl Drop for CrashReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.events.send((self.event)());
        }
    }
}

/// `make <target>` in the work tree, with the job's environment: the agent's
/// base variables, the CI variables and the job's variables. Nothing of git's
/// (the URL, the HTTP header) is in it.
/// A sandbox made early, waiting at its gate (`process::spawn_gated`).
type Gated = (ProcessGroup, OutputPipe, Gate);

/// What a job's sandbox mounts: the tree, the scratch's `tmp/` and `home/`,
/// and the cache's objects the tree borrows, read-only.
fn job_paths(
    tree: &std::path::Path,
    scratch: &std::path::Path,
    shared_objects: PathBuf,
) -> JobPaths {
    JobPaths {
        tree: tree.to_owned(),
        tmp: scratch.join("tmp"),
        home: scratch.join("home"),
        shared_read_only: vec![shared_objects],
    }
}

fn make_command(
    spec: &JobSpec,
    inherited_env: &[(String, String)],
    tree: &std::path::Path,
) -> CommandSpec {
    let ci = CiVars {
        job_id: spec.key.id.0,
        attempt: spec.key.attempt,
        repo: &spec.repo,
        commit: &spec.commit,
        branch: &spec.branch,
        target: &spec.target,
        kind: &spec.kind,
    };
    let env = compose(inherited_env.iter().cloned(), &ci, &spec.env);
    CommandSpec {
        env,
        ..CommandSpec::new("make", tree).arg(&spec.target)
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `500ms`, `30s`, `10m`, `2h`.
fn human(duration: Duration) -> String {
    let millis = duration.as_millis();
    if !millis.is_multiple_of(1000) {
        return format!("{millis}ms");
    }
    let secs = duration.as_secs();
    if secs != 0 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs != 0 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hobotnica_common::ids::JobId;

    use super::*;
    use crate::job::JobKey;
    use crate::workspace::GitHttpHeader;

    #[test]
    fn make_never_gets_the_git_header() {
        let header = GitHttpHeader::new("Authorization: Bearer ghs_SecretToken123");
        let spec = JobSpec {
            key: JobKey {
                id: JobId(7),
                attempt: 1,
            },
            repo: "o/r".to_owned(),
            git_url: "https://github.com/o/r.git".to_owned(),
            commit: "0123456789abcdef0123456789abcdef01234567".to_owned(),
            branch: "main".to_owned(),
            target: "test".to_owned(),
            kind: "test".to_owned(),
            env: BTreeMap::from([("PROJECT_VAR".to_owned(), "1".to_owned())]),
            timeout: None,
            secrets: Vec::new(),
            git_http_header: Some(header.clone()),
            max_log_bytes: hobotnica_common::logs::DEFAULT_MAX_LOG_BYTES,
            timings: JobTimings::default(),
        };
        // Even when the agent itself runs with git configuration around.
        let inherited = [
            ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
            ("GIT_CONFIG_COUNT".to_owned(), "1".to_owned()),
            ("GIT_CONFIG_KEY_0".to_owned(), "http.extraHeader".to_owned()),
            (
                "GIT_CONFIG_VALUE_0".to_owned(),
                "Authorization: x".to_owned(),
            ),
        ];
        let command = make_command(&spec, &inherited, std::path::Path::new("/tmp/tree"));
        assert_eq!(command.args, ["test"]);
        assert!(
            command.env.keys().all(|name| !name.starts_with("GIT_")),
            "{:?}",
            command.env.keys()
        );
        for part in header.secret_parts() {
            assert!(!command.env.values().any(|v| v.contains(&part)));
            assert!(!command.env.keys().any(|v| v.contains(&part)));
        }
        assert_eq!(command.env["PROJECT_VAR"], "1");
    }

    #[test]
    fn durations_read_like_the_options() {
        assert_eq!(human(Duration::from_millis(1500)), "1500ms");
        assert_eq!(human(Duration::from_secs(5)), "5s");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_secs(600)), "10m");
        assert_eq!(human(Duration::from_secs(7200)), "2h");
        assert_eq!(human(Duration::ZERO), "0s");
    }
}

/// The report against a scripted controller: the test decides what
/// CompleteJob answers and how log streams behave, and time is paused, so
/// every wait is decided by the code under test, not by timing.
#[cfg(test)]
mod report_tests {
    use std::collections::{BTreeMap, VecDeque};
    use std::sync::Mutex;

    use hobotnica_common::ids::JobId;
    use hobotnica_common::private_fs::Secret;

    use super::*;
    use crate::connection::{AgentIdentity, LeaseStatus, LogAck, SendError, TlsOptions};
    use crate::job::JobKey;
    use crate::logs::LogChannel;
    use crate::workspace::Workspaces;

    /// Long enough for any back-off; the clock is paused, so it costs
    /// nothing, and a job that would hang fails the test when it passes.
    const DEADLINE: Duration = Duration::from_secs(600);

    #[derive(Clone, Copy)]
    enum Logs {
        /// Every chunk is acknowledged at once.
        AckAll,
        /// Opening a stream panics (a bug in the shipper or below).
        Panic,
    }

    #[derive(Clone)]
    struct Scripted {
        logs: Logs,
        /// RenewLease panics (a bug in the lease task or below) instead of
        /// never answering.
        renew_panics: bool,
        /// CompleteJob's answers, in order; `Ok` once they run out.
        answers: Arc<Mutex<VecDeque<Result<(), RpcError>>>>,
        /// Every CompleteJob, with the (paused) time it came.
        completions: Arc<Mutex<Vec<(Instant, Completion)>>>,
    }

    impl Scripted {
        fn new(logs: Logs, answers: impl IntoIterator<Item = Result<(), RpcError>>) -> Scripted {
            Scripted {
                logs,
                renew_panics: false,
                answers: Arc::new(Mutex::new(answers.into_iter().collect())),
                completions: Arc::new(Mutex::new(Vec::new())),
            }
        }

        fn completions(&self) -> Vec<(Instant, Completion)> {
            self.completions.lock().expect("lock").clone()
        }
    }

    struct ScriptedStream {
        acks: VecDeque<LogAck>,
        next_seq: u64,
    }

    impl LogTransport for Scripted {
        type Stream = ScriptedStream;

        async fn open(
            &self,
            _key: JobKey,
            offset: u64,
            data: Vec<u8>,
        ) -> Result<ScriptedStream, RpcError> {
            match self.logs {
                Logs::AckAll => {}
                Logs::Panic => panic!("the log transport crashed"),
            }
            Ok(ScriptedStream {
                acks: VecDeque::from([LogAck {
                    seq: 0,
                    committed: offset + data.len() as u64,
                }]),
                next_seq: 1,
            })
        }
    }

    impl LogChannel for ScriptedStream {
        fn try_send(&mut self, offset: u64, data: Vec<u8>) -> Result<u64, SendError> {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.acks.push_back(LogAck {
                seq,
                committed: offset + data.len() as u64,
            });
            Ok(seq)
        }

        async fn next_ack(&mut self) -> Result<LogAck, RpcError> {
            match self.acks.pop_front() {
                Some(ack) => Ok(ack),
                None => std::future::pending().await,
            }
        }
    }

    impl JobController for Scripted {
        async fn renew(&self, _key: JobKey) -> Result<LeaseStatus, RpcError> {
            if self.renew_panics {
                panic!("the lease renewal crashed");
            }
            std::future::pending().await
        }

        async fn complete(&self, completion: &Completion) -> Result<(), RpcError> {
            self.completions
                .lock()
                .expect("lock")
                .push((Instant::now(), completion.clone()));
            self.answers
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or(Ok(()))
        }
    }

    fn spec() -> JobSpec {
        JobSpec {
            key: JobKey {
                id: JobId(7),
                attempt: 1,
            },
            repo: "o/r".to_owned(),
            git_url: "https://github.com/o/r.git".to_owned(),
            commit: "0123456789abcdef0123456789abcdef01234567".to_owned(),
            branch: "main".to_owned(),
            target: "test".to_owned(),
            kind: "test".to_owned(),
            env: BTreeMap::new(),
            timeout: None,
            secrets: Vec::new(),
            git_http_header: None,
            max_log_bytes: hobotnica_common::logs::DEFAULT_MAX_LOG_BYTES,
            timings: JobTimings::default(),
        }
    }

    fn supervisor(controller: Scripted, dir: &std::path::Path) -> Supervisor<Scripted> {
        // Never called: the scripted controller answers every call.
        let connection = Connection::new(
            &["http://127.0.0.1:1".to_owned()],
            &Secret::new("t"),
            AgentIdentity {
                name: "a".to_owned(),
                labels: BTreeMap::new(),
                concurrency: 1,
            },
            &TlsOptions::default(),
            Duration::from_secs(15),
        )
        .expect("connection");
        let workspaces =
            Workspaces::new(&dir.join("work"), &[], Duration::from_secs(60)).expect("workspaces");
        let context = Arc::new(JobContext {
            connection,
            metrics: Arc::new(crate::metrics::AgentMetrics::new(dir.join("spool"))),
            workspaces: Arc::new(workspaces),
            spool_dir: dir.join("spool"),
            inherited_env: Arc::from([]),
            sandbox: None,
            abandon: CancellationToken::new(),
        });
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Supervisor::new(
            context,
            controller,
            spec(),
            LeaseTimings::from_millis(30_000, 10_000, 5_000),
            events_tx,
            events_rx,
        )
    }

    /// A closed spool holding `output`.
    fn spool(dir: &std::path::Path, output: &[u8]) -> Arc<Spool> {
        let spool = Arc::new(Spool::create(dir.join("7-1.log")).expect("spool"));
        spool.append(output).expect("append");
        spool.close();
        spool
    }

    fn succeeded() -> WorkEnd {
        WorkEnd {
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            message: String::new(),
        }
    }

    /// make succeeded, but its log cannot be read from the spool any more
    /// (the file is gone). Before the fix the shipper retried forever and the
    /// job stayed `running`, its lease renewed, until the agent stopped; now
    /// the shipper gives up and the job is reported failed, with a message
    /// that says why, and with the log the controller has.
    #[tokio::test(start_paused = true)]
    async fn a_spool_unreadable_for_good_fails_the_job() {
        let dir = tempfile::tempdir().expect("temp dir");
        let controller = Scripted::new(Logs::AckAll, []);
        let mut supervisor = supervisor(controller.clone(), dir.path());
        let spool = spool(dir.path(), b"hello\n");
        spool.remove();
        let handle = supervisor.spawn_shipper(&spool);
        let completion = supervisor.completion(succeeded(), 6);

        tokio::time::timeout(DEADLINE, supervisor.report(Some(&handle), completion))
            .await
            .expect("the job is reported");

        let completions = controller.completions();
        assert_eq!(completions.len(), 1, "{completions:?}");
        let sent = &completions[0].1;
        assert_eq!(sent.outcome, Outcome::Failed);
        assert_eq!(sent.exit_code, Some(0));
        assert_eq!(sent.log_length, 0);
        assert!(
            sent.message
                .starts_with("the job's log could not be read from the agent's spool"),
            "{}",
            sent.message
        );
        supervisor.stop_children().await;
    }

    fn aborted() -> Result<(), RpcError> {
        Err(RpcError::LogIncomplete("stored 0, expected 6".to_owned()))
    }

    /// The gaps between CompleteJob calls, each at least the back-off
    /// (100 ms, doubling).
    fn assert_spaced(completions: &[(Instant, Completion)]) {
        let mut expected = crate::connection::BACKOFF_INITIAL;
        for pair in completions.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(gap >= expected, "CompleteJob again after {gap:?}");
            expected = (expected * 2).min(crate::connection::BACKOFF_MAX);
        }
    }

    /// A controller keeps answering ABORTED (its log stays shorter than
    /// what it acknowledged). Before the fix each resync was followed by
    /// another CompleteJob at once, a tight loop against the controller; now
    /// the calls back off.
    #[tokio::test(start_paused = true)]
    async fn completing_again_after_aborted_backs_off() {
        let dir = tempfile::tempdir().expect("temp dir");
        let controller = Scripted::new(Logs::AckAll, (0..6).map(|_| aborted()));
        let mut supervisor = supervisor(controller.clone(), dir.path());
        let spool = spool(dir.path(), b"hello\n");
        let handle = supervisor.spawn_shipper(&spool);
        let completion = supervisor.completion(succeeded(), 6);

        tokio::time::timeout(DEADLINE, supervisor.report(Some(&handle), completion))
            .await
            .expect("the job is reported");

        let completions = controller.completions();
        assert_eq!(completions.len(), 7);
        assert_spaced(&completions);
        assert_eq!(completions[6].1.outcome, Outcome::Succeeded);
        supervisor.stop_children().await;
    }

    /// The same with the shipper already gone: its dropped sender made the
    /// wait for the resync return at once, and CompleteJob was called again
    /// in a tight loop.
    #[tokio::test(start_paused = true)]
    async fn completing_again_after_aborted_backs_off_without_a_shipper() {
        let dir = tempfile::tempdir().expect("temp dir");
        let controller = Scripted::new(Logs::AckAll, (0..6).map(|_| aborted()));
        let mut supervisor = supervisor(controller.clone(), dir.path());
        let spool = spool(dir.path(), b"");
        let (shipper, handle) = Shipper::new(controller.clone(), supervisor.spec.key, spool);
        drop(shipper);
        let completion = supervisor.completion(succeeded(), 0);

        tokio::time::timeout(DEADLINE, supervisor.report(Some(&handle), completion))
            .await
            .expect("the job is reported");

        let completions = controller.completions();
        assert_eq!(completions.len(), 7);
        assert_spaced(&completions);
    }

    /// The shipper panics. Before the fix nothing told the supervisor: it
    /// waited for acknowledgements that could never come, the lease renewed
    /// all along, until the agent stopped. Now the job is reported failed,
    /// saying why.
    #[tokio::test(start_paused = true)]
    async fn a_crashed_shipper_fails_the_job() {
        let dir = tempfile::tempdir().expect("temp dir");
        let controller = Scripted::new(Logs::Panic, []);
        let mut supervisor = supervisor(controller.clone(), dir.path());
        let spool = spool(dir.path(), b"hello\n");
        let handle = supervisor.spawn_shipper(&spool);
        let completion = supervisor.completion(succeeded(), 6);

        tokio::time::timeout(DEADLINE, supervisor.report(Some(&handle), completion))
            .await
            .expect("the job is reported");

        let completions = controller.completions();
        assert_eq!(completions.len(), 1, "{completions:?}");
        let sent = &completions[0].1;
        assert_eq!(sent.outcome, Outcome::Failed);
        assert_eq!(sent.log_length, 0);
        assert_eq!(
            sent.message,
            "the agent's log shipper crashed; the log is incomplete"
        );
        supervisor.stop_children().await;
    }

    /// A lost log while make runs stops make; the job fails with the reason.
    #[tokio::test]
    async fn a_lost_log_stops_the_work_and_fails_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut supervisor = supervisor(Scripted::new(Logs::AckAll, []), dir.path());
        let spool = spool(dir.path(), b"");
        let reason = "the agent's log shipper crashed; the log is incomplete";
        assert!(supervisor.on_event(
            JobEvent::LogLost {
                reason: reason.to_owned()
            },
            &spool
        ));
        let end = supervisor.stopped(&spool);
        assert_eq!(end.outcome, Outcome::Failed);
        assert_eq!(end.message, reason);
    }

    /// A cancel says so once, at the end of the log (after whatever make
    /// printed while it stopped), and the job has no exit code: how make
    /// exits when stopped says nothing about the job. A second cancel (the
    /// lease renewal's, after the session's) changes nothing.
    #[tokio::test]
    async fn a_cancel_ends_the_log_with_one_line_and_no_exit_code() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut supervisor = supervisor(Scripted::new(Logs::AckAll, []), dir.path());
        let path = dir.path().join("7-1.log");
        let spool = Spool::create(path.clone()).expect("spool");
        spool.append(b"sleeping\n").expect("append");
        assert!(supervisor.on_event(
            JobEvent::CancelRequested {
                reason: String::new()
            },
            &spool
        ));
        assert!(!supervisor.on_event(
            JobEvent::LeaseRenewed {
                cancel_requested: true
            },
            &spool
        ));
        spool
            .append(b"make: *** [Makefile:3: sleep] Terminated\n")
            .expect("append");
        let end = supervisor.stopped(&spool);
        spool.close();
        assert_eq!(end.outcome, Outcome::Cancelled);
        assert_eq!(end.exit_code, None);
        assert_eq!(end.message, "cancelled");
        assert_eq!(
            std::fs::read_to_string(&path).expect("the spool"),
            "sleeping\nmake: *** [Makefile:3: sleep] Terminated\n[hobotnica] cancelled\n"
        );
    }

    /// Output past the log limit stops make like a timeout does, writes
    /// nothing more (the spool ended the log with its notice), and the job
    /// fails with a message naming the limit.
    #[tokio::test]
    async fn output_past_the_log_limit_stops_the_work_and_fails_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut supervisor = supervisor(Scripted::new(Logs::AckAll, []), dir.path());
        let spool = Spool::with_limit(dir.path().join("7-1.log"), 2048).expect("spool");
        spool.append(&[b'y'; 4096]).expect("append");
        assert!(spool.is_full());
        let len = spool.progress().len;
        assert!(supervisor.on_event(JobEvent::LogLimitReached, &spool));
        // A later reason neither stops the job again nor writes a line.
        assert!(!supervisor.on_event(JobEvent::DeadlineReached, &spool));
        assert_eq!(spool.progress().len, len);
        let end = supervisor.stopped(&spool);
        assert_eq!(end.outcome, Outcome::Failed);
        assert_eq!(
            end.message,
            "the log reached its limit of 2.0 KiB (2048 bytes); output stopped and the job was stopped"
        );
    }

    /// The lease task panics. Before the fix nothing told the supervisor:
    /// the job ran on while its lease expired. Now the job is dropped as
    /// gone (the controller takes it back when the lease expires).
    #[tokio::test(start_paused = true)]
    async fn a_crashed_lease_renewal_drops_the_job() {
        let dir = tempfile::tempdir().expect("temp dir");
        let controller = Scripted {
            renew_panics: true,
            ..Scripted::new(Logs::AckAll, [])
        };
        let mut supervisor = supervisor(controller, dir.path());
        supervisor.spawn_lease();

        let event = tokio::time::timeout(DEADLINE, supervisor.events_rx.recv())
            .await
            .expect("the supervisor hears of the crash")
            .expect("an event");
        assert!(
            matches!(&event, JobEvent::JobGone { reason } if reason.contains("lease renewal crashed")),
            "{event:?}"
        );
        supervisor.stop_children().await;
    }
}
