//! The only place in the agent that starts processes: argument vectors only
//! (never a shell), a cleared environment, stdin from `/dev/null`, stdout and
//! stderr into one pipe, and a process group of its own so that a signal
//! reaches every descendant.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio_util::sync::CancellationToken;

/// What to run: a program, its arguments, its complete environment and its
/// working directory.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// The whole environment of the process; nothing else is inherited.
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    /// The program is bubblewrap running the job (see `sandbox`): a graceful
    /// stop signals the processes inside, not bwrap.
    pub sandboxed: bool,
}

impl CommandSpec {
    pub fn new(program: impl Into<OsString>, cwd: impl Into<PathBuf>) -> CommandSpec {
        CommandSpec {
            program: program.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            cwd: cwd.into(),
            sandboxed: false,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> CommandSpec {
        self.args.push(arg.into());
        self
    }

    #[cfg(test)]
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> CommandSpec {
        self.env.insert(name.into(), value.into());
        self
    }
}

/// A started process, leader of its own process group.
///
/// Dropping it without having waited for the process kills the whole group
/// with SIGKILL.
pub struct ProcessGroup {
    child: tokio::process::Child,
    pgid: Pid,
    sandboxed: bool,
    status: Option<ExitStatus>,
}

/// The read end of the pipe that receives the process's stdout and stderr.
pub struct OutputPipe(pipe::Receiver);

impl OutputPipe {
    /// Reads what the process wrote; `Ok(0)` once every writer has exited.
    /// Cancel-safe.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).await
    }
}

/// The file descriptor a gated process finds its gate on (see
/// [`spawn_gated`]): bubblewrap's `--block-fd`.
pub const GATE_FD: i32 = 3;

/// The agent's end of a gated process's gate: [`Gate::open`] lets it go on.
/// Dropped unopened, the process reads end-of-file (bubblewrap then goes on
/// too: drop the [`ProcessGroup`] first, which kills it).
#[derive(Debug)]
pub struct Gate(std::io::PipeWriter);

impl Gate {
    /// Lets the process go on.
    pub fn open(self) -> io::Result<()> {
        use std::io::Write as _;
        (&self.0).write_all(b"1")
    }
}

/// Starts `spec` in a new process group with stdout and stderr going, in the
/// order they are written, into one pipe.
pub fn spawn(spec: &CommandSpec) -> io::Result<(ProcessGroup, OutputPipe)> {
    start(spec, None)
}

/// [`spawn`], the process getting the read end of a pipe as [`GATE_FD`]:
/// a program that waits on it (bubblewrap with `--block-fd 3`) is made
/// ready now and goes on when the returned [`Gate`] is opened.
pub fn spawn_gated(spec: &CommandSpec) -> io::Result<(ProcessGroup, OutputPipe, Gate)> {
    let (gate_reader, gate_writer) = std::io::pipe()?;
    let (group, output) = start(spec, Some(OwnedFd::from(gate_reader)))?;
    Ok((group, output, Gate(gate_writer)))
}

#[allow(clippy::disallowed_methods)] // the agent's one place that spawns processes
fn start(spec: &CommandSpec, gate: Option<OwnedFd>) -> io::Result<(ProcessGroup, OutputPipe)> {
    let (reader, writer) = std::io::pipe()?;
    let child = {
        let mut command = tokio::process::Command::new(&spec.program);
        command
            .args(&spec.args)
            .env_clear()
            .envs(&spec.env)
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(writer.try_clone()?))
            .stderr(Stdio::from(writer))
            .process_group(0);
        if let Some(gate) = gate {
            use command_fds::{CommandFdExt as _, FdMapping};
            command
                .fd_mappings(vec![FdMapping {
                    parent_fd: gate,
                    child_fd: GATE_FD,
                }])
                .map_err(|_| io::Error::other("the gate's file descriptor is taken"))?;
        }
        command.spawn()?
        // `command` (holding our copies of the write end, and the gate's
        // read end) is dropped here, so the pipe reaches end-of-file once
        // the process group has exited.
    };
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("the process exited before its id was read"))?;
    let pgid = Pid::from_raw(
        i32::try_from(pid)
            .map_err(|_| io::Error::other(format!("process id {pid} out of range")))?,
    );
    let output = pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
    Ok((
        ProcessGroup {
            child,
            pgid,
            sandboxed: spec.sandboxed,
            status: None,
        },
        OutputPipe(output),
    ))
}

impl ProcessGroup {
    /// The process group id (the leader's pid).
    pub fn pgid(&self) -> i32 {
        self.pgid.as_raw()
    }

    /// Waits for the leader to exit, then SIGKILLs whatever is left in its
    /// group (leftover children would hold the output pipe open). Cancel-safe;
    /// after the first return it returns the same status again.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = self.child.wait().await?;
        self.signal(Signal::SIGKILL);
        self.status = Some(status);
        Ok(status)
    }

    /// Asks every process of the group to stop (SIGTERM); in a sandbox,
    /// every process inside it.
    pub fn terminate(&self) {
        if self.status.is_none() {
            if self.sandboxed {
                crate::sandbox::terminate_inside(self.pgid);
            } else {
                self.signal(Signal::SIGTERM);
            }
        }
    }

    /// Kills every process of the group (SIGKILL).
    pub fn kill(&self) {
        if self.status.is_none() {
            self.signal(Signal::SIGKILL);
        }
    }

    fn signal(&self, signal: Signal) {
        match killpg(self.pgid, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(error) => {
                tracing::warn!(pgid = self.pgid.as_raw(), %signal, %error, "could not signal a process group");
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // Once the leader was reaped and the group killed, the id may be
        // reused: never signal it again.
        if self.status.is_none() {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// Bytes of output [`run_captured`] keeps (the end of the output).
pub const CAPTURED_OUTPUT_BYTES: usize = 64 * 1024;

/// How long output may stay open after a process exited before the rest is
/// dropped (a descendant that left the process group could hold it forever).
pub const OUTPUT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The end of a short command's run.
#[derive(Debug)]
pub struct Captured {
    pub status: ExitStatus,
    /// The last [`CAPTURED_OUTPUT_BYTES`] of stdout and stderr, interleaved.
    pub output: Vec<u8>,
}

impl Captured {
    pub fn output_text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

/// Why [`run_captured`] has no exit status to give.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("could not start: {0}")]
    Spawn(#[source] io::Error),
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    #[error("cancelled")]
    Cancelled,
    #[error("reading its output failed: {0}")]
    Io(#[source] io::Error),
}

/// Runs a short command (git) to completion and returns its status and the
/// end of its output. The process group is killed on timeout, on `cancel`,
/// or when the returned future is dropped.
pub async fn run_captured(
    spec: &CommandSpec,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Captured, RunError> {
    let (mut group, mut output) = spawn(spec).map_err(RunError::Spawn)?;
    let collect = async {
        let mut captured = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let mut status = None;
        let mut eof = false;
        // Fixed when the leader exits: a timer made anew on each turn would
        // restart with every byte a detached writer sends, and never fire.
        let mut close_by: Option<tokio::time::Instant> = None;
        while !(eof && status.is_some()) {
            tokio::select! {
                read = output.read(&mut buf), if !eof => match read.map_err(RunError::Io)? {
                    0 => eof = true,
                    n => {
                        captured.extend_from_slice(&buf[..n]);
                        if captured.len() > 2 * CAPTURED_OUTPUT_BYTES {
                            captured.drain(..captured.len() - CAPTURED_OUTPUT_BYTES);
                        }
                    }
                },
                exited = group.wait(), if status.is_none() => {
                    status = Some(exited.map_err(RunError::Io)?);
                    close_by = Some(tokio::time::Instant::now() + OUTPUT_CLOSE_TIMEOUT);
                }
                () = sleep_until(close_by) => break,
            }
        }
        if captured.len() > CAPTURED_OUTPUT_BYTES {
            captured.drain(..captured.len() - CAPTURED_OUTPUT_BYTES);
        }
        match status {
            Some(status) => Ok(Captured {
                status,
                output: captured,
            }),
            None => Err(RunError::Io(io::Error::other("no exit status"))),
        }
    };
    tokio::select! {
        result = tokio::time::timeout(timeout, collect) => {
            result.unwrap_or(Err(RunError::TimedOut(timeout)))
        }
        () = cancel.cancelled() => Err(RunError::Cancelled),
    }
    // `group` is dropped here: a process still running is killed.
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;
    use std::time::Instant;

    use super::*;

    fn sh(script: &str) -> CommandSpec {
        CommandSpec::new("/bin/sh", std::env::temp_dir())
            .arg("-c")
            .arg(script)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
    }

    async fn read_all(output: &mut OutputPipe) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match output.read(&mut buf).await.expect("read output") {
                0 => return all,
                n => all.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Whether a process is gone: no longer exists, or a zombie waiting to
    /// be reaped by whoever adopted it.
    fn is_gone(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        }
    }

    async fn wait_until(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            if condition() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        condition()
    }

    #[tokio::test]
    async fn sigterm_reaches_every_process_of_the_group() {
        // The grandchild prints its pid, then both sleep.
        let spec = sh("sleep 300 & echo $!; sleep 300");
        let (mut group, mut output) = spawn(&spec).expect("spawn");
        let leader = group.pgid();
        let mut line = Vec::new();
        let mut buf = [0u8; 64];
        while !line.contains(&b'\n') {
            let n = output.read(&mut buf).await.expect("read");
            assert_ne!(n, 0, "no pid printed");
            line.extend_from_slice(&buf[..n]);
        }
        let grandchild: i32 = String::from_utf8_lossy(&line)
            .trim()
            .parse()
            .expect("a pid");
        assert!(!is_gone(grandchild));

        group.terminate();
        let status = tokio::time::timeout(Duration::from_secs(2), group.wait())
            .await
            .expect("the leader exits within 2 s")
            .expect("wait");
        assert_eq!(status.code(), None, "killed by a signal");
        assert!(
            wait_until(Duration::from_secs(2), || is_gone(grandchild)).await,
            "grandchild {grandchild} survived"
        );
        assert!(is_gone(leader));
        // Every writer is gone, so the pipe ends.
        tokio::time::timeout(Duration::from_secs(2), read_all(&mut output))
            .await
            .expect("the pipe closes");
    }

    #[tokio::test]
    async fn sigkill_stops_a_group_that_ignores_sigterm() {
        let spec = sh("trap '' TERM; echo ready; sleep 300 & wait");
        let (mut group, mut output) = spawn(&spec).expect("spawn");
        let mut buf = [0u8; 16];
        let n = output.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"ready\n");
        group.terminate();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), group.wait())
                .await
                .is_err(),
            "SIGTERM is ignored"
        );
        group.kill();
        let status = tokio::time::timeout(Duration::from_secs(2), group.wait())
            .await
            .expect("SIGKILL stops it")
            .expect("wait");
        assert_eq!(status.signal(), Some(9));
    }

    #[tokio::test]
    async fn stdout_and_stderr_interleave_in_order() {
        let spec = sh("for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done");
        let (mut group, mut output) = spawn(&spec).expect("spawn");
        let all = read_all(&mut output).await;
        assert!(group.wait().await.expect("wait").success());
        let expected: String = (1..=5).map(|i| format!("out{i}\nerr{i}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&all), expected);
    }

    #[tokio::test]
    async fn the_environment_is_exactly_the_given_one() {
        let spec = CommandSpec::new("/usr/bin/env", std::env::temp_dir())
            .env("ONLY_THIS", "1")
            .env("AND_THIS", "two words");
        let (mut group, mut output) = spawn(&spec).expect("spawn");
        let all = read_all(&mut output).await;
        assert!(group.wait().await.expect("wait").success());
        let mut lines: Vec<_> = String::from_utf8_lossy(&all)
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        assert_eq!(lines, ["AND_THIS=two words", "ONLY_THIS=1"]);
    }

    #[tokio::test]
    async fn stdin_is_empty() {
        let (mut group, mut output) = spawn(&sh("cat; echo done")).expect("spawn");
        let all = tokio::time::timeout(Duration::from_secs(5), read_all(&mut output))
            .await
            .expect("cat does not wait for input");
        assert!(group.wait().await.expect("wait").success());
        assert_eq!(all, b"done\n");
    }

    #[tokio::test]
    async fn captured_runs_report_status_and_output() {
        let never = CancellationToken::new();
        let done = run_captured(
            &sh("echo hello; echo oops >&2; exit 3"),
            Duration::from_secs(10),
            &never,
        )
        .await
        .expect("ran");
        assert_eq!(done.status.code(), Some(3));
        assert_eq!(done.output_text(), "hello\noops\n");

        let started = Instant::now();
        let timed_out = run_captured(&sh("sleep 300"), Duration::from_millis(200), &never).await;
        assert!(matches!(timed_out, Err(RunError::TimedOut(_))));
        assert!(started.elapsed() < Duration::from_secs(5));

        let cancel = CancellationToken::new();
        cancel.cancel();
        let cancelled = run_captured(&sh("sleep 300"), Duration::from_secs(60), &cancel).await;
        assert!(matches!(cancelled, Err(RunError::Cancelled)));

        let missing = CommandSpec::new("/nonexistent/program", std::env::temp_dir());
        assert!(matches!(
            run_captured(&missing, Duration::from_secs(5), &never).await,
            Err(RunError::Spawn(_))
        ));
    }

    #[tokio::test]
    async fn a_detached_descendant_does_not_hang_a_captured_run() {
        // setsid-like escape is not possible from sh portably; a background
        // job that closes nothing keeps the pipe open until the group is
        // killed, which happens right after the leader exits.
        let started = Instant::now();
        let done = run_captured(
            &sh("sleep 300 & echo started"),
            Duration::from_secs(30),
            &CancellationToken::new(),
        )
        .await
        .expect("ran");
        assert!(done.status.success());
        assert_eq!(done.output_text(), "started\n");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    /// A descendant that left the process group (setsid: the group's kill
    /// does not reach it) keeps the output open and writes to it every
    /// 100 ms. The run must end [`OUTPUT_CLOSE_TIMEOUT`] after the leader
    /// exited. Before the fix every byte read restarted that grace, so the
    /// run lasted until the git timeout and failed as timed out (a fetch
    /// that succeeded failed the job ten minutes later).
    #[tokio::test]
    async fn a_detached_writer_does_not_keep_a_captured_run_going() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pid_file = dir.path().join("writer.pid");
        // The leader exits only once the writer has left the group.
        let script = format!(
            "setsid sh -c 'echo $$ > {pid}; i=0; while [ $i -lt 400 ]; do echo tick; sleep 0.1; i=$((i+1)); done' & \
             while [ ! -s {pid} ]; do sleep 0.01; done; echo started",
            pid = pid_file.display()
        );
        let limit = OUTPUT_CLOSE_TIMEOUT * 4;
        let started = Instant::now();
        let done = run_captured(&sh(&script), limit, &CancellationToken::new()).await;
        let elapsed = started.elapsed();

        // The writer is in a session of its own: stop it whatever happened.
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|pid| pid.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }

        let done = done.expect("the run ends with make's status, not a timeout");
        assert!(done.status.success());
        assert!(done.output_text().contains("started\n"));
        assert!(
            elapsed < OUTPUT_CLOSE_TIMEOUT * 3,
            "took {elapsed:?}; the output grace is {OUTPUT_CLOSE_TIMEOUT:?}"
        );
    }
}
