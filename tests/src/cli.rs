//! Running `hobot` as a user would: against a test controller (through
//! `HOBOTNICA_URL`, `HOBOTNICA_GRPC_URL`, `HOBOTNICA_TOKEN` and, with TLS,
//! `HOBOTNICA_CA_CERT`) or in a directory where `hobot up` runs.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use crate::bins;
use crate::controller::Controller;

/// Starts `hobot up ARGS` in `<dir>/project` (its data dir is then
/// `<dir>/project/.hobotnica`), logging into `dir`, with `env` added to its
/// environment; returns the process and the project directory.
pub fn spawn_up(
    dir: &Path,
    name: &str,
    args: &[String],
    env: &[(&str, &str)],
) -> (crate::daemon::Daemon, PathBuf) {
    let cwd = dir.join("project");
    std::fs::create_dir_all(&cwd).expect("the project directory");
    let up = crate::daemon::Daemon::spawn(crate::daemon::Spec {
        name: name.to_owned(),
        program: bins::bin(bins::HOBOT),
        args: std::iter::once("up".into())
            .chain(args.iter().map(Into::into))
            .collect(),
        env: std::iter::once(("HOBOTNICA_LOG", "info"))
            .chain(env.iter().copied())
            .map(|(key, value)| (key.into(), value.into()))
            .collect(),
        cwd: Some(cwd.clone()),
        log_dir: dir.to_path_buf(),
    });
    (up, cwd)
}

/// How long one `hobot` command may take.
pub const HOBOT_TIMEOUT: Duration = Duration::from_secs(120);

/// What a `hobot` run printed and how it exited.
pub struct HobotOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl std::fmt::Debug for HobotOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HobotOutput")
            .field("status", &self.status)
            .field("stdout", &String::from_utf8_lossy(&self.stdout))
            .field("stderr", &self.stderr)
            .finish()
    }
}

impl HobotOutput {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Asserts exit code 0 and returns stdout as text.
    pub fn success(&self) -> String {
        assert_eq!(self.code(), Some(0), "hobot failed: {self:#?}");
        self.stdout_text()
    }
}

/// A `hobot` command with no `HOBOTNICA_*` variable of the test process;
/// pointed at `controller` through the environment when given.
pub fn command(controller: Option<&Controller>, cwd: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(bins::bin(bins::HOBOT));
    environment(&mut command, controller, cwd);
    command
}

/// `hobot args...` with its stdout on a pseudo-terminal, as an operator
/// runs it: under util-linux `script`, whose stdout is what the terminal
/// was given (with `\n` written as `\r\n`). Environment as [`command`].
pub fn in_terminal(
    controller: Option<&Controller>,
    cwd: &Path,
    args: &[&str],
) -> tokio::process::Command {
    let quote = |word: &str| format!("'{}'", word.replace('\'', r"'\''"));
    let hobot = bins::bin(bins::HOBOT);
    let line: Vec<String> = std::iter::once(quote(&hobot.to_string_lossy()))
        .chain(args.iter().map(|arg| quote(arg)))
        .collect();
    let mut command = tokio::process::Command::new("script");
    command
        .args(["-qec", &line.join(" "), "/dev/null"])
        .env("SHELL", "/bin/sh");
    environment(&mut command, controller, cwd);
    command
}

fn environment(command: &mut tokio::process::Command, controller: Option<&Controller>, cwd: &Path) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("HOBOTNICA_") {
            command.env_remove(name);
        }
    }
    if let Some(controller) = controller {
        command
            .env("HOBOTNICA_URL", controller.url())
            .env("HOBOTNICA_GRPC_URL", controller.grpc_url())
            .env("HOBOTNICA_TOKEN", &controller.admin_token);
        if let Some(pki) = &controller.pki {
            command.env("HOBOTNICA_CA_CERT", &pki.ca_cert);
        }
    }
    command
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
}

/// Runs `hobot args...` to completion.
///
/// # Panics
/// When it runs longer than [`HOBOT_TIMEOUT`].
pub async fn run(controller: Option<&Controller>, cwd: &Path, args: &[&str]) -> HobotOutput {
    let child = command(controller, cwd)
        .args(args)
        .spawn()
        .expect("start hobot");
    finish(child, args).await
}

/// Waits for a spawned `hobot` to finish and collects its output.
pub async fn finish(child: tokio::process::Child, args: &[&str]) -> HobotOutput {
    let output = tokio::time::timeout(HOBOT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("hobot {args:?} still runs after {HOBOT_TIMEOUT:?}"))
        .expect("hobot output");
    HobotOutput {
        status: output.status,
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Waits (up to [`HOBOT_TIMEOUT`]) for a spawned `hobot` whose stdout went
/// elsewhere (a `logs -f` writing to a file) to end: its exit status and
/// stderr.
///
/// # Panics
/// When it still runs after [`HOBOT_TIMEOUT`].
pub async fn wait_exit(child: &mut tokio::process::Child, what: &str) -> (ExitStatus, String) {
    use tokio::io::AsyncReadExt as _;
    let status = tokio::time::timeout(HOBOT_TIMEOUT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} still runs after {HOBOT_TIMEOUT:?}"))
        .expect("hobot's exit status");
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr).await;
    }
    (status, stderr)
}
