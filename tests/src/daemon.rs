//! A long-running child process whose stdout and stderr go to files, that
//! can be signalled, killed and started again with the same command, and is
//! killed when dropped (printing its output if the test is failing).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::procs;
use crate::wait::wait_for;

/// How much of each output file is printed when a test fails, in bytes.
const PRINTED_OUTPUT_BYTES: u64 = 64 * 1024;

/// How a daemon is started.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Name used in output file names and messages.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Added to the inherited environment, after every `HOBOTNICA_*`
    /// variable of the test process was removed.
    pub env: Vec<(OsString, OsString)>,
    pub cwd: Option<PathBuf>,
    /// Where `<name>.stdout.log` and `<name>.stderr.log` go.
    pub log_dir: PathBuf,
}

/// A running (or stopped) child process.
pub struct Daemon {
    spec: Spec,
    child: Option<Child>,
    exit: Option<ExitStatus>,
    starts: u32,
}

impl Daemon {
    /// Starts the process.
    pub fn spawn(spec: Spec) -> Daemon {
        let mut daemon = Daemon {
            spec,
            child: None,
            exit: None,
            starts: 0,
        };
        daemon.start();
        daemon
    }

    /// Starts the process again (after it stopped), appending to the same
    /// output files.
    ///
    /// # Panics
    /// When it is still running.
    pub fn start(&mut self) {
        assert!(!self.is_running(), "{} is already running", self.spec.name);
        self.starts += 1;
        let stdout = self.open_log("stdout");
        let stderr = self.open_log("stderr");
        let mut command = Command::new(&self.spec.program);
        command
            .args(&self.spec.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("HOBOTNICA_") {
                command.env_remove(name);
            }
        }
        command.envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        if let Some(cwd) = &self.spec.cwd {
            command.current_dir(cwd);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", self.spec.program.display()));
        self.child = Some(child);
        self.exit = None;
    }

    fn log_path(&self, stream: &str) -> PathBuf {
        self.spec
            .log_dir
            .join(format!("{}.{stream}.log", self.spec.name))
    }

    fn open_log(&self, stream: &str) -> File {
        let path = self.log_path(stream);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|err| panic!("cannot open {}: {err}", path.display()));
        if self.starts > 1 {
            let _ = writeln!(file, "\n---- started again (start #{}) ----", self.starts);
        }
        file
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none() && self.child.is_some()
    }

    /// The exit status, once it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            self.exit = Some(status);
            self.child = None;
        }
        self.exit
    }

    /// Sends a signal (if it runs).
    pub fn signal(&mut self, signal: Signal) {
        if self.is_running()
            && let Some(pid) = self.pid()
        {
            procs::send(pid, signal);
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            self.exit = child.wait().ok();
        }
        self.exit
    }

    /// Waits for the process to exit.
    ///
    /// # Panics
    /// When it still runs after `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.spec.name);
        wait_for(timeout, &what, || {
            let exit = self.try_exit();
            async move { exit }
        })
        .await
    }

    /// SIGTERM, wait up to `timeout`, then SIGKILL.
    pub async fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        let deadline = std::time::Instant::now() + timeout;
        while self.is_running() && std::time::Instant::now() < deadline {
            tokio::time::sleep(crate::wait::POLL_INTERVAL).await;
        }
        if self.is_running() {
            self.kill9();
        }
        self.exit
    }

    /// The end of stdout and stderr, for failure messages.
    pub fn output(&self) -> String {
        let mut text = String::new();
        for stream in ["stdout", "stderr"] {
            let path = self.log_path(stream);
            text.push_str(&format!(
                "---- {} {stream} ({}) ----\n",
                self.spec.name,
                path.display()
            ));
            text.push_str(&tail_of_file(&path, PRINTED_OUTPUT_BYTES));
            text.push('\n');
        }
        text
    }

    /// The whole stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.log_path("stderr")).unwrap_or_default()
    }

    /// The whole stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.log_path("stdout")).unwrap_or_default()
    }
}

fn tail_of_file(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return "(no output file)".to_owned();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut prefix = String::new();
    if len > max {
        let _ = file.seek(SeekFrom::Start(len - max));
        prefix = format!("[... {} earlier bytes ...]\n", len - max);
    }
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    prefix + &String::from_utf8_lossy(&bytes)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.output());
        }
    }
}
