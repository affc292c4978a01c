//! One agent per work dir. An agent starting up clears what an earlier run
//! left there (work trees, spools); if another agent were still running in
//! the same directory — the old one draining during an upgrade, a second
//! unit pointed at the same path — that would delete its running jobs'
//! trees and logs. So the agent holds an exclusive lock on
//! `<work_dir>/agent.lock` for as long as it runs, taken before it touches
//! anything else, and a second agent stops with a clear error instead.
//!
//! The lock is `flock(2)`: the kernel drops it when the process ends,
//! however it ends, so a crash never leaves a stale lock behind. The file
//! holds the owner's PID, for the error message only.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The lock file's name in the work dir.
pub const LOCK_FILE: &str = "agent.lock";

/// Why the work dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another agent{} is using the work directory {}: an agent clears what it finds \
         there when it starts, which would break that agent's running jobs. Give this \
         agent its own --work-dir (HOBOTNICA_WORK_DIR), or start it once the other \
         has drained and exited",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default(),
        dir.display()
    )]
    Busy { dir: PathBuf, holder: Option<u32> },
    #[error("locking the work directory ({}): {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The held lock; dropping it releases the work dir.
#[derive(Debug)]
pub struct WorkDirLock {
    _file: File,
}

impl WorkDirLock {
    /// Takes the lock on `work_dir` without waiting.
    ///
    /// # Errors
    /// [`LockError::Busy`] when another process holds it.
    pub fn acquire(work_dir: &Path) -> Result<WorkDirLock, LockError> {
        let path = work_dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let holder = file
                    .read_to_string(&mut pid)
                    .ok()
                    .and_then(|_| pid.trim().parse().ok());
                return Err(LockError::Busy {
                    dir: work_dir.to_owned(),
                    holder,
                });
            }
            Err(TryLockError::Error(error)) => return Err(io(error)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(WorkDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = WorkDirLock::acquire(dir.path()).expect("first lock");
        // flock locks belong to the open file description: a second open,
        // even in this process, conflicts as another process's would.
        let error = WorkDirLock::acquire(dir.path()).expect_err("second lock");
        let message = error.to_string();
        assert!(
            matches!(error, LockError::Busy { holder: Some(pid), .. } if pid == std::process::id()),
            "{message}"
        );
        assert!(message.contains("--work-dir"), "{message}");
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        drop(held);
        WorkDirLock::acquire(dir.path()).expect("free again once dropped");
    }

    #[test]
    fn a_link_planted_as_the_lock_file_is_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "keep").expect("write");
        std::os::unix::fs::symlink(&target, dir.path().join(LOCK_FILE)).expect("symlink");
        let error = WorkDirLock::acquire(dir.path()).expect_err("symlink refused");
        assert!(matches!(error, LockError::Io { .. }), "{error}");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep");
    }
}
