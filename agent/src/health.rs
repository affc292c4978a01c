//! The agent's health, for `hobotnica-agent --health-check` (a Docker
//! `HEALTHCHECK`, a monitor) and for systemd (`Type=notify`, and the status
//! line `systemctl status` shows).
//!
//! The running agent keeps a small status file in its work dir, `status`,
//! rewritten (atomically) when its connection changes and on every
//! heartbeat; a job starting or ending changes only systemd's status line,
//! so the file's `jobs` is at most a heartbeat old. (Rewriting it for every
//! job, a new file each time, was a fifth of an idle-to-busy agent's CPU
//! on a trivial job.)
//!
//! ```text
//! state=connected
//! controller=https://ci.example.com:8081
//! jobs=1
//! updated=1765046400
//! ```
//!
//! `state` is `connecting`, `connected` or `draining`. The check is healthy
//! when the agent is connected (or draining its jobs) and wrote the file in
//! the last [`STALE_AFTER`]: a hung or dead agent stops writing it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hobotnica_common::service_manager::{self, ServiceManager};

/// The status file's name in the work dir.
pub const STATUS_FILE: &str = "status";

/// A status older than this is a dead or hung agent's: three heartbeats.
pub const STALE_AFTER: Duration =
    Duration::from_secs(3 * crate::pool::HEARTBEAT_INTERVAL.as_secs());

/// Where the agent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Connecting,
    Connected,
    Draining,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Draining => "draining",
        }
    }
}

/// What the running agent reports about itself.
#[derive(Debug, Clone)]
pub struct Reporter {
    path: PathBuf,
    service_manager: ServiceManager,
    /// The state and controller the status file says.
    written: Arc<Mutex<Option<(State, String)>>>,
}

impl Reporter {
    pub fn new(work_dir: &Path, service_manager: ServiceManager) -> Reporter {
        Reporter {
            path: work_dir.join(STATUS_FILE),
            service_manager,
            written: Arc::new(Mutex::new(None)),
        }
    }

    /// A job started or ended: systemd's status line says so at once; the
    /// status file is rewritten only when `state` or `controller` is not
    /// what it says (see the module's documentation).
    pub fn jobs_changed(&self, state: State, controller: &str, jobs: usize) {
        let unchanged = self.written.lock().ok().is_some_and(|written| {
            written
                .as_ref()
                .is_some_and(|(s, c)| *s == state && c == controller)
        });
        if unchanged {
            self.status_line(state, controller, jobs);
        } else {
            self.report(state, controller, jobs);
        }
    }

    /// Tells systemd the agent is ready: configured, its work dir usable,
    /// its sandbox checked, and connecting.
    pub fn ready(&self) {
        self.notify(service_manager::READY);
    }

    /// Records `state` in the status file and systemd's status line.
    pub fn report(&self, state: State, controller: &str, jobs: usize) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let contents = format!(
            "state={}\ncontroller={controller}\njobs={jobs}\nupdated={now}\n",
            state.as_str()
        );
        // Private like everything in the work dir (0600): only the agent's
        // user, which runs the health check, reads it; replaced atomically.
        let written =
            hobotnica_common::private_fs::write_private_file(&self.path, contents.as_bytes());
        match written {
            Ok(()) => {
                if let Ok(mut written) = self.written.lock() {
                    *written = Some((state, controller.to_owned()));
                }
            }
            Err(error) => {
                tracing::warn!(%error, path = %self.path.display(), "cannot write the status file");
            }
        }
        self.status_line(state, controller, jobs);
    }

    /// systemd's status line (and, draining, its STOPPING).
    fn status_line(&self, state: State, controller: &str, jobs: usize) {
        let line = match state {
            State::Connecting => format!("connecting to {controller}"),
            State::Connected => format!("connected to {controller}; {jobs} job(s) running"),
            State::Draining => format!("draining: waiting for {jobs} job(s)"),
        };
        if state == State::Draining {
            self.notify(service_manager::STOPPING);
        }
        self.notify(&service_manager::status_line(&line));
    }

    /// The agent stopped: its status file goes, so a check says so at once.
    pub fn stopped(&self) {
        if let Err(error) = std::fs::remove_file(&self.path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, path = %self.path.display(), "cannot remove the status file");
        }
    }

    fn notify(&self, state: &str) {
        if let Err(error) = self.service_manager.notify(state) {
            tracing::warn!(%error, "cannot notify systemd");
        }
    }
}

/// The check of `--health-check`: `Ok` with a line describing a healthy
/// agent working in `work_dir`, `Err` saying why it is not.
///
/// # Errors
/// When no agent wrote a status there lately, or it is not connected.
pub fn check(work_dir: &Path) -> Result<String, String> {
    let path = work_dir.join(STATUS_FILE);
    let contents = std::fs::read_to_string(&path).map_err(|error| {
        format!(
            "no status in {} ({error}): is the agent running with this work dir?",
            path.display()
        )
    })?;
    let field = |name: &str| {
        contents
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_default()
    };
    let updated: u64 = field("updated").parse().unwrap_or(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let age = now.saturating_sub(updated);
    if age > STALE_AFTER.as_secs() {
        return Err(format!(
            "the agent's status is {age} s old (more than {} s): the agent is not running or hangs",
            STALE_AFTER.as_secs()
        ));
    }
    let (state, controller, jobs) = (field("state"), field("controller"), field("jobs"));
    match state {
        "connected" => Ok(format!("connected to {controller}, {jobs} job(s) running")),
        "draining" => Ok(format!(
            "draining {jobs} job(s), last connected to {controller}"
        )),
        _ => Err(format!("{state} to {controller}: not connected")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connected_agent_is_healthy_and_a_connecting_one_is_not() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let reporter = Reporter::new(dir.path(), ServiceManager::default());
        assert!(check(dir.path()).unwrap_err().contains("no status"));
        reporter.report(State::Connecting, "http://127.0.0.1:1", 0);
        assert!(check(dir.path()).unwrap_err().contains("not connected"));
        reporter.report(State::Connected, "http://127.0.0.1:1", 2);
        let mode = std::fs::metadata(dir.path().join(STATUS_FILE))
            .expect("the status file")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert_eq!(
            check(dir.path()).unwrap(),
            "connected to http://127.0.0.1:1, 2 job(s) running"
        );
        reporter.report(State::Draining, "http://127.0.0.1:1", 1);
        assert!(check(dir.path()).is_ok());
        reporter.stopped();
        assert!(check(dir.path()).unwrap_err().contains("no status"));
    }

    #[test]
    fn a_job_starting_leaves_the_file_unless_the_connection_changed() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let reporter = Reporter::new(dir.path(), ServiceManager::default());
        let url = "http://127.0.0.1:1";
        // Nothing written yet: the first report of any kind writes it.
        reporter.jobs_changed(State::Connected, url, 1);
        assert!(check(dir.path()).unwrap().contains("1 job(s)"));
        // The same connection: the file keeps its count until a heartbeat.
        reporter.jobs_changed(State::Connected, url, 2);
        assert!(check(dir.path()).unwrap().contains("1 job(s)"));
        reporter.report(State::Connected, url, 2);
        assert!(check(dir.path()).unwrap().contains("2 job(s)"));
        // Another state is written at once.
        reporter.jobs_changed(State::Connecting, url, 1);
        assert!(check(dir.path()).unwrap_err().contains("not connected"));
    }

    #[test]
    fn a_stale_status_is_unhealthy() {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::write(
            dir.path().join(STATUS_FILE),
            "state=connected\ncontroller=x\njobs=0\nupdated=1\n",
        )
        .expect("write");
        assert!(
            check(dir.path())
                .unwrap_err()
                .contains("not running or hangs")
        );
    }
}
