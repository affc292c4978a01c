//! CORE: reading logs as streams — a byte range for REST, and a live tail
//! that follows the job until it ends (gRPC `LogService.Tail`). Neither holds
//! more than one piece of the log in memory.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use hobotnica_common::ids::JobId;
use hobotnica_common::job::Job;
use tokio::sync::broadcast::error::RecvError;

use crate::auth::{Access, Caller};
use crate::error::CoreError;
use crate::services::Services;
use crate::store::{Store, StoreError, StoreEvent};

/// Largest piece of log read from the store at once.
pub const LOG_READ_BYTES: usize = 256 * 1024;

/// The log bytes `[start, end)` as a stream of pieces.
pub fn read_range(
    store: Arc<dyn Store>,
    job: JobId,
    start: u64,
    end: u64,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(start, move |offset| {
        let store = Arc::clone(&store);
        async move {
            if offset >= end {
                return None;
            }
            let max = usize::try_from(end - offset)
                .unwrap_or(LOG_READ_BYTES)
                .min(LOG_READ_BYTES);
            match store.read_log(job, offset, max).await {
                Ok(bytes) if bytes.is_empty() => None,
                Ok(bytes) => {
                    let next = offset + bytes.len() as u64;
                    Some((Ok(bytes), next))
                }
                Err(err) => Some((Err(std::io::Error::other(err.to_string())), end)),
            }
        }
    })
}

/// What a tail yields.
#[derive(Debug)]
pub enum TailItem {
    Chunk {
        offset: u64,
        data: Bytes,
    },
    /// The job has finished and every byte was sent.
    End(Box<Job>),
}

/// Follows a job's log from `offset`: pieces as they are appended and, once
/// the job has ended and everything was sent, `End`. Without `follow`, stops
/// after the bytes stored now (with `End` if the job already finished).
pub fn tail(
    store: Arc<dyn Store>,
    job: JobId,
    offset: u64,
    follow: bool,
) -> impl Stream<Item = Result<TailItem, StoreError>> + Send + 'static {
    struct State {
        store: Arc<dyn Store>,
        events: tokio::sync::broadcast::Receiver<StoreEvent>,
        offset: u64,
        done: bool,
    }
    let events = store.subscribe();
    let state = State {
        store,
        events,
        offset,
        done: false,
    };
    futures_util::stream::unfold(state, move |mut state| async move {
        if state.done {
            return None;
        }
        loop {
            // Read the state before the log: a job seen finished has its whole
            // log stored, so an empty read after it means the end.
            let current = match state.store.get_job(job).await {
                Ok(Some(current)) => current,
                Ok(None) => {
                    state.done = true;
                    return Some((Err(StoreError::NotFound(format!("job {job}"))), state));
                }
                Err(err) => {
                    state.done = true;
                    return Some((Err(err), state));
                }
            };
            match state
                .store
                .read_log(job, state.offset, LOG_READ_BYTES)
                .await
            {
                Ok(data) if !data.is_empty() => {
                    let offset = state.offset;
                    state.offset += data.len() as u64;
                    return Some((Ok(TailItem::Chunk { offset, data }), state));
                }
                Ok(_) => {}
                Err(err) => {
                    state.done = true;
                    return Some((Err(err), state));
                }
            }
            if current.state.is_terminal() {
                state.done = true;
                return Some((Ok(TailItem::End(Box::new(current))), state));
            }
            if !follow {
                return None;
            }
            // Wait for the log to grow or the job to end.
            loop {
                match state.events.recv().await {
                    Ok(
                        StoreEvent::LogAppended { job: id, .. }
                        | StoreEvent::JobFinished { job: id },
                    ) if id == job => {
                        break;
                    }
                    Ok(StoreEvent::Resync) | Err(RecvError::Lagged(_)) => break,
                    Ok(_) => {}
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    })
}

/// A job's stored log from an offset, as a caller reads it.
pub struct LogRead<S> {
    /// The job as it was when reading started.
    pub job: Job,
    /// The log's length when reading started: the body ends there.
    pub length: u64,
    pub body: S,
}

/// Where a log's page starts showing it: the last part only, so that a
/// big log does not load whole into a browser.
#[derive(Debug, Clone)]
pub struct LogWindow {
    /// The job as it was when the window was found.
    pub job: Job,
    /// The log's length then.
    pub length: u64,
    /// The first byte shown: the start of a line.
    pub start: u64,
    /// How many lines lie before `start` (the first line shown is this + 1).
    pub lines_before: u64,
}

/// The start of the window of at most about `window` bytes at the end of
/// a log of `length` bytes, and the lines before it, from the log's pieces
/// read from its start. The window starts at the first line that starts
/// within the last `window` bytes; when no line starts there (one long last
/// line), at the start of that line.
pub async fn find_window<S>(
    pieces: S,
    length: u64,
    window: u64,
) -> Result<(u64, u64), std::io::Error>
where
    S: Stream<Item = Result<Bytes, std::io::Error>>,
{
    use futures_util::StreamExt as _;
    let cut = length.saturating_sub(window);
    if cut == 0 {
        return Ok((0, 0));
    }
    let mut pieces = std::pin::pin!(pieces);
    let (mut offset, mut lines) = (0u64, 0u64);
    let mut last_line = (0u64, 0u64);
    while let Some(piece) = pieces.next().await {
        let piece = piece?;
        for (index, byte) in piece.iter().enumerate() {
            if *byte != b'\n' {
                continue;
            }
            lines += 1;
            let next_line = offset + index as u64 + 1;
            if next_line >= cut && next_line < length {
                return Ok((next_line, lines));
            }
            if next_line < length {
                last_line = (next_line, lines);
            }
        }
        offset += piece.len() as u64;
    }
    Ok(last_line)
}

impl Services {
    /// Job `id`'s log from `offset` to `end` (both clamped to its length
    /// now; no `end` is its length), when `caller` may read the job.
    pub async fn read_log(
        &self,
        caller: &Caller,
        id: JobId,
        offset: u64,
        end: Option<u64>,
    ) -> Result<
        LogRead<impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static>,
        CoreError,
    > {
        let job = self.job_for(caller, id, Access::Read).await?;
        let length = self.store.log_len(id).await?;
        let end = end.unwrap_or(length).min(length);
        let body = read_range(Arc::clone(&self.store), id, offset.min(end), end);
        Ok(LogRead { job, length, body })
    }

    /// Where job `id`'s page starts showing its log (the last `window`
    /// bytes or so, from a line's start), when `caller` may read the job.
    /// Counting the lines before it reads the log up to there once.
    pub async fn log_window(
        &self,
        caller: &Caller,
        id: JobId,
        window: u64,
    ) -> Result<LogWindow, CoreError> {
        let job = self.job_for(caller, id, Access::Read).await?;
        let length = self.store.log_len(id).await?;
        let pieces = read_range(Arc::clone(&self.store), id, 0, length);
        let (start, lines_before) = find_window(pieces, length, window)
            .await
            .map_err(|err| CoreError::Unavailable(err.to_string()))?;
        Ok(LogWindow {
            job,
            length,
            start,
            lines_before,
        })
    }

    /// [`tail`] of job `id` from `offset`, when `caller` may read the job.
    pub async fn tail_log(
        &self,
        caller: &Caller,
        id: JobId,
        offset: u64,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<TailItem, CoreError>> + Send + 'static, CoreError> {
        use futures_util::StreamExt as _;
        self.job_for(caller, id, Access::Read).await?;
        Ok(tail(Arc::clone(&self.store), id, offset, follow)
            .map(|item| item.map_err(CoreError::from)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn window_of(log: &[u8], piece: usize, window: u64) -> (u64, u64) {
        let pieces: Vec<Result<Bytes, std::io::Error>> = log
            .chunks(piece.max(1))
            .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
            .collect();
        find_window(futures_util::stream::iter(pieces), log.len() as u64, window)
            .await
            .unwrap()
    }

    /// The reference: the first line start at or after the cut (not the
    /// end), else the last line start before it; lines = newlines before.
    fn expected(log: &[u8], window: u64) -> (u64, u64) {
        let length = log.len() as u64;
        let cut = length.saturating_sub(window);
        if cut == 0 {
            return (0, 0);
        }
        let starts: Vec<u64> = std::iter::once(0)
            .chain(
                log.iter()
                    .enumerate()
                    .filter(|(_, byte)| **byte == b'\n')
                    .map(|(index, _)| index as u64 + 1),
            )
            .filter(|start| *start < length)
            .collect();
        let start = starts
            .iter()
            .copied()
            .find(|start| *start >= cut)
            .or_else(|| starts.iter().copied().rfind(|start| *start < cut))
            .unwrap();
        let lines = log[..start as usize]
            .iter()
            .filter(|b| **b == b'\n')
            .count() as u64;
        (start, lines)
    }

    #[tokio::test]
    async fn the_window_starts_at_a_line_and_counts_the_lines_before_it() {
        let logs: [&[u8]; 6] = [
            b"",
            b"one\ntwo\nthree\n",
            b"a very long single line without an end",
            b"short\na very long last line without an end",
            b"\n\n\n\n\n\n",
            b"x\nyy\nzzz\nwwww\nvvvvv\n",
        ];
        for log in logs {
            for window in 0..=log.len() as u64 + 1 {
                for piece in [1, 2, 3, 7, 64] {
                    assert_eq!(
                        window_of(log, piece, window).await,
                        expected(log, window),
                        "{:?} window {window} pieces {piece}",
                        String::from_utf8_lossy(log)
                    );
                }
            }
        }
    }
}
