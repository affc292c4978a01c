//! A job's log on the agent's disk: an append-only file holding every byte
//! the job produced (masked), from which the shipper reads at any offset, so
//! a slow or absent controller never makes the agent buffer output in memory.
//! It holds at most the job's log limit: what would go past it is dropped,
//! and the log ends with a notice saying so (not counted against the limit).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use hobotnica_common::logs::log_limit_message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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
    file: Mutex<Written>,
    progress: watch::Sender<SpoolProgress>,
    /// The most the log may hold, the notice aside.
    limit: u64,
    /// Cancelled when output went past `limit`.
    full: CancellationToken,
}

/// The file and what was last written to it.
struct Written {
    file: File,
    /// The last byte written was a newline (or nothing was written).
    at_line_start: bool,
}

impl Spool {
    /// Creates (or truncates) the spool file at `path`, without a limit.
    #[cfg(test)]
    pub fn create(path: PathBuf) -> io::Result<Spool> {
        Spool::with_limit(path, u64::MAX)
    }

    /// Creates (or truncates) the spool file at `path`, holding at most
    /// `limit` bytes of output (and then the notice that ends the log).
    pub fn with_limit(path: PathBuf, limit: u64) -> io::Result<Spool> {
        let file = hobotnica_common::private_fs::private_open_options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        Ok(Spool {
            path,
            file: Mutex::new(Written {
                file,
                at_line_start: true,
            }),
            progress: watch::Sender::new(SpoolProgress::default()),
            limit,
            full: CancellationToken::new(),
        })
    }

    /// The most the log may hold, the notice aside.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether output went past the limit (and was dropped).
    pub fn is_full(&self) -> bool {
        self.full.is_cancelled()
    }

    /// Cancelled once output goes past the limit.
    pub fn full_token(&self) -> CancellationToken {
        self.full.clone()
    }

    #[cfg(test)]
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Appends bytes and wakes the readers. Bytes that would take the log
    /// past its limit are dropped: what fits is written, then the notice
    /// that ends the log, and nothing more after it.
    pub fn append(&self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut written = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let progress = *self.progress.borrow();
        if progress.closed {
            return Err(io::Error::other("the log spool is closed"));
        }
        if self.is_full() {
            return Ok(());
        }
        let room = usize::try_from(self.limit.saturating_sub(progress.len)).unwrap_or(usize::MAX);
        if data.len() <= room {
            return self.write(&mut written, data);
        }
        self.write(&mut written, &data[..room])?;
        let mut notice = String::new();
        if !written.at_line_start {
            notice.push('\n');
        }
        notice.push_str(&format!("[hobotnica] {}\n", log_limit_message(self.limit)));
        let result = self.write(&mut written, notice.as_bytes());
        self.full.cancel();
        result
    }

    /// Writes under the lock and publishes the new length.
    fn write(&self, written: &mut Written, data: &[u8]) -> io::Result<()> {
        let Some(last) = data.last() else {
            return Ok(());
        };
        written.file.write_all(data)?;
        written.at_line_start = *last == b'\n';
        // Published under the lock, after the write, so that readers never
        // see a length whose bytes are not in the file yet.
        self.progress.send_modify(|p| p.len += data.len() as u64);
        Ok(())
    }

    /// Appends an agent line, `[hobotnica] <text>`, to the log (nothing once
    /// the log is closed or full).
    pub fn line(&self, text: &str) {
        if self.progress.borrow().closed || self.is_full() {
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

    /// Output past the limit is dropped: the log holds the limit's worth,
    /// on a line of its own the notice, and nothing after it; the
    /// notice does not count against the limit.
    #[test]
    fn output_past_the_limit_is_dropped_and_the_log_ends_with_a_notice() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let spool = Spool::with_limit(dir.path().join("1-1.log"), 1024)?;
        let full = spool.full_token();
        spool.append(&[b'y'; 1000])?;
        assert!(!full.is_cancelled());
        spool.append(&[b'z'; 100])?;
        assert!(full.is_cancelled());
        spool.append(b"more output")?;
        spool.line("timed out after 1s");
        let len = spool.close();
        let data = spool
            .reader()?
            .read_at(0, usize::try_from(len).unwrap_or(0))?;
        let notice = "\n[hobotnica] the log reached its limit of 1.0 KiB (1024 bytes); output stopped and the job was stopped\n";
        assert_eq!(&data[..1000], &[b'y'; 1000][..]);
        assert_eq!(&data[1000..1024], &[b'z'; 24][..]);
        assert_eq!(String::from_utf8_lossy(&data[1024..]), notice);
        Ok(())
    }

    /// Output that fits exactly is kept whole, without a notice.
    #[test]
    fn output_up_to_the_limit_is_kept_whole() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let spool = Spool::with_limit(dir.path().join("1-1.log"), 1024)?;
        spool.append(&[b'y'; 1023])?;
        spool.append(b"\n")?;
        assert!(!spool.is_full());
        assert_eq!(spool.close(), 1024);
        Ok(())
    }
}
