//! A job's log on the agent's disk: an append-only file holding every byte
//! the job produced (masked), from which the shipper reads at any offset, so
//! a slow or absent controller never makes the agent buffer output in memory.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use tokio::sync::watch;

/// How much of the log exists, and whether more can come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolProgress {
    /// Bytes written so far; every byte below this offset can be read.
    pub len: u64,
    /// No byte will be appended any more: `len` is the final length.
    pub closed: bool,
}

/// The spool file of one job attempt. Appends are serialised; readers follow
/// progress through [`Spool::subscribe`].
pub struct Spool {
    path: PathBuf,
    file: Mutex<File>,
    progress: watch::Sender<SpoolProgress>,
}

impl Spool {
    /// Creates (or truncates) the spool file at `path`.
    pub fn create(path: PathBuf) -> io::Result<Spool> {
        let file = hobotnica_common::private_fs::private_open_options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        Ok(Spool {
            path,
            file: Mutex::new(file),
            progress: watch::Sender::new(SpoolProgress::default()),
        })
    }

    #[cfg(test)]
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Appends bytes and wakes the readers.
    pub fn append(&self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if self.progress.borrow().closed {
            return Err(io::Error::other("the log spool is closed"));
        }
        file.write_all(data)?;
        // Published under the lock, after the write, so that readers never
        // see a length whose bytes are not in the file yet.
        self.progress.send_modify(|p| p.len += data.len() as u64);
        Ok(())
    }

    /// Appends an agent line, `[hobotnica] <text>`, to the log (nothing once
    /// the log is closed).
    pub fn line(&self, text: &str) {
        if self.progress.borrow().closed {
            tracing::debug!(text, "not logged: the log is closed");
            return;
        }
        let line = format!("[hobotnica] {text}\n");
        if let Err(error) = self.append(line.as_bytes()) {
            tracing::warn!(%error, path = %self.path.display(), "could not write to the log spool");
        }
    }

    /// Marks the log complete and returns its final length.
    pub fn close(&self) -> u64 {
        let _file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        self.progress.send_modify(|p| p.closed = true);
        self.progress.borrow().len
    }

    pub fn progress(&self) -> SpoolProgress {
        *self.progress.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<SpoolProgress> {
        self.progress.subscribe()
    }

    /// Opens an independent reader.
    pub fn reader(&self) -> io::Result<SpoolReader> {
        Ok(SpoolReader {
            file: File::open(&self.path)?,
        })
    }

    /// Deletes the file (readers already open keep working until dropped).
    pub fn remove(&self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(%error, path = %self.path.display(), "could not delete a log spool");
            }
        }
    }
}

/// Reads a spool at arbitrary offsets.
pub struct SpoolReader {
    file: File,
}

impl SpoolReader {
    /// Reads exactly `len` bytes at `offset` (they must have been written).
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_are_readable_at_any_offset() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let spool = Spool::create(dir.path().join("1-1.log"))?;
        let mut progress = spool.subscribe();
        spool.append(b"hello ")?;
        spool.line("fetching x");
        assert!(progress.has_changed().unwrap_or(false));
        let reader = spool.reader()?;
        let len = progress.borrow_and_update().len;
        assert_eq!(len, 6 + "[hobotnica] fetching x\n".len() as u64);
        assert_eq!(reader.read_at(0, 5)?, b"hello");
        assert_eq!(reader.read_at(6, 11)?, b"[hobotnica]");
        assert_eq!(spool.close(), len);
        assert!(spool.progress().closed);
        assert!(spool.append(b"late").is_err());
        spool.remove();
        assert!(!spool.path().exists());
        Ok(())
    }
}
