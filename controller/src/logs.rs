//! CORE: reading logs as streams — a byte range for REST, and a live tail
//! that follows the job until it ends (gRPC `LogService.Tail`). Neither holds
//! more than one piece of the log in memory.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use hobotnica_common::ids::JobId;
use hobotnica_common::job::Job;
use tokio::sync::broadcast::error::RecvError;

use crate::ansi::{SgrChange, SgrTracker};
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
    /// The SGR parameters in effect at `start` (empty: none), so that the
    /// page shows its first line in the colours the job set before it.
    pub colours: String,
}

/// Where a window of a stretch of log starts, found by [`find_window`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowStart {
    /// The window's first byte: the start of a line, or the stretch's
    /// start when no line starts in it before the window.
    pub start: u64,
    /// How many lines end between the stretch's start and `start`.
    pub lines: u64,
    /// What the log did to the colours between the two.
    pub colours: SgrChange,
}

/// The start of the window of at most about `window` bytes at the end of
/// the stretch of a log from `from` to `length`, read as `pieces` from
/// `from`: the first line that starts within the last `window` bytes, or,
/// when none does (one long last line), the start of that line (at the
/// latest `from`: the stretch's first line may have started before it).
pub async fn find_window<S>(
    pieces: S,
    from: u64,
    length: u64,
    window: u64,
) -> Result<WindowStart, std::io::Error>
where
    S: Stream<Item = Result<Bytes, std::io::Error>>,
{
    use futures_util::StreamExt as _;
    let cut = length.saturating_sub(window);
    let mut last_line = WindowStart {
        start: from,
        lines: 0,
        colours: SgrChange::default(),
    };
    if cut <= from {
        return Ok(last_line);
    }
    let mut pieces = std::pin::pin!(pieces);
    let (mut offset, mut lines) = (from, 0u64);
    let mut colours = SgrTracker::default();
    while let Some(piece) = pieces.next().await {
        let piece = piece?;
        let mut fed = 0;
        for index in memchr::memchr_iter(b'\n', &piece) {
            lines += 1;
            let next_line = offset + index as u64 + 1;
            if next_line >= length {
                break;
            }
            colours.feed(&piece[fed..=index]);
            fed = index + 1;
            let here = WindowStart {
                start: next_line,
                lines,
                colours: colours.change(),
            };
            if next_line >= cut {
                return Ok(here);
            }
            last_line = here;
        }
        colours.feed(&piece[fed..]);
        offset += piece.len() as u64;
    }
    Ok(last_line)
}

/// A jump ahead in a log for a viewer that fell behind: the bytes from
/// `from` to `to` are not sent (they hold `lines` line ends and the colour
/// change `colours`); the log goes on at `to`, a line's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub from: u64,
    pub to: u64,
    pub lines: u64,
    pub colours: SgrChange,
}

/// What [`tail_catching_up`] yields.
#[derive(Debug)]
pub enum ViewerItem {
    Log(TailItem),
    Skipped(Skip),
}

/// [`tail`] for a viewer that shows only a log's last part (the job page):
/// whenever it is more than `lag` bytes behind the log's end, it skips to
/// the window of the last `window` bytes instead of sending everything in
/// between. Nothing is lost: the viewer loads skipped parts on demand,
/// and every byte after a skip comes exactly once. The lag is looked at
/// when the tail starts and after each full piece (a short piece means it
/// had caught up), so a viewer that keeps up costs no extra store read;
/// with no `lag` it never skips and costs nothing over [`tail`].
pub fn tail_catching_up(
    store: Arc<dyn Store>,
    job: JobId,
    offset: u64,
    lag: Option<u64>,
    window: u64,
) -> impl Stream<Item = Result<ViewerItem, StoreError>> + Send + 'static {
    use futures_util::StreamExt as _;
    struct State<T> {
        store: Arc<dyn Store>,
        offset: u64,
        tail: std::pin::Pin<Box<T>>,
        look: bool,
    }
    let state = State {
        tail: Box::pin(tail(Arc::clone(&store), job, offset, true)),
        store,
        offset,
        look: lag.is_some(),
    };
    futures_util::stream::unfold(state, move |mut state| async move {
        if let Some(lag) = lag.filter(|_| std::mem::take(&mut state.look)) {
            match skip_ahead(&state.store, job, state.offset, lag, window).await {
                Ok(None) => {}
                Ok(Some(skip)) => {
                    state.offset = skip.to;
                    state.tail = Box::pin(tail(Arc::clone(&state.store), job, skip.to, true));
                    state.look = true;
                    return Some((Ok(ViewerItem::Skipped(skip)), state));
                }
                Err(err) => return Some((Err(err), state)),
            }
        }
        let item = state.tail.next().await?;
        if let Ok(TailItem::Chunk { data, .. }) = &item {
            state.offset += data.len() as u64;
            state.look = lag.is_some() && data.len() >= LOG_READ_BYTES;
        }
        Some((item.map(ViewerItem::Log), state))
    })
}

/// The skip a viewer at `offset` needs, if it is more than `lag` bytes
/// behind the end of job `job`'s log.
async fn skip_ahead(
    store: &Arc<dyn Store>,
    job: JobId,
    offset: u64,
    lag: u64,
    window: u64,
) -> Result<Option<Skip>, StoreError> {
    let length = store.log_len(job).await?;
    if length.saturating_sub(offset) <= lag {
        return Ok(None);
    }
    let pieces = read_range(Arc::clone(store), job, offset, length);
    let found = find_window(pieces, offset, length, window)
        .await
        .map_err(|err| StoreError::Unavailable(err.to_string()))?;
    Ok((found.start > offset).then_some(Skip {
        from: offset,
        to: found.start,
        lines: found.lines,
        colours: found.colours,
    }))
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
        let found = find_window(pieces, 0, length, window)
            .await
            .map_err(|err| CoreError::Unavailable(err.to_string()))?;
        Ok(LogWindow {
            job,
            length,
            start: found.start,
            lines_before: found.lines,
            colours: found.colours.params(),
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

    /// [`tail_catching_up`] of job `id` from `offset`, when `caller` may
    /// read the job.
    pub async fn tail_log_catching_up(
        &self,
        caller: &Caller,
        id: JobId,
        offset: u64,
        lag: Option<u64>,
        window: u64,
    ) -> Result<impl Stream<Item = Result<ViewerItem, CoreError>> + Send + 'static, CoreError> {
        use futures_util::StreamExt as _;
        self.job_for(caller, id, Access::Read).await?;
        Ok(
            tail_catching_up(Arc::clone(&self.store), id, offset, lag, window)
                .map(|item| item.map_err(CoreError::from)),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn window_of(log: &[u8], from: usize, piece: usize, window: u64) -> WindowStart {
        let pieces: Vec<Result<Bytes, std::io::Error>> = log[from..]
            .chunks(piece.max(1))
            .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
            .collect();
        find_window(
            futures_util::stream::iter(pieces),
            from as u64,
            log.len() as u64,
            window,
        )
        .await
        .unwrap()
    }

    /// The reference: the first line start (after a newline at or after
    /// `from`) at or after the cut (not the end), else the last one before
    /// it, else `from`; lines = newlines between; the colours fed between.
    fn expected(log: &[u8], from: usize, window: u64) -> WindowStart {
        let length = log.len() as u64;
        let cut = length.saturating_sub(window);
        let starts: Vec<u64> = log
            .iter()
            .enumerate()
            .skip(from)
            .filter(|(_, byte)| **byte == b'\n')
            .map(|(index, _)| index as u64 + 1)
            .filter(|start| *start < length)
            .collect();
        let start = if cut <= from as u64 {
            from as u64
        } else {
            starts
                .iter()
                .copied()
                .find(|start| *start >= cut)
                .or_else(|| starts.iter().copied().rfind(|start| *start < cut))
                .unwrap_or(from as u64)
        };
        let stretch = &log[from..start as usize];
        let mut colours = SgrTracker::default();
        colours.feed(stretch);
        WindowStart {
            start,
            lines: stretch.iter().filter(|b| **b == b'\n').count() as u64,
            colours: colours.change(),
        }
    }

    #[tokio::test]
    async fn the_window_starts_at_a_line_and_counts_the_lines_before_it() {
        let logs: [&[u8]; 8] = [
            b"",
            b"\x1b[31mred\n\x1b[1mbold red\n\x1b[0mplain\n\x1b[4",
            b"\x1b[32mgreen line\nstill green\n\x1b]0;t\x1b[33m\x07\x1b[44m\nlast",
            b"one\ntwo\nthree\n",
            b"a very long single line without an end",
            b"short\na very long last line without an end",
            b"\n\n\n\n\n\n",
            b"x\nyy\nzzz\nwwww\nvvvvv\n",
        ];
        for log in logs {
            for from in 0..=log.len() {
                for window in 0..=log.len() as u64 + 1 {
                    for piece in [1, 2, 3, 7, 64] {
                        assert_eq!(
                            window_of(log, from, piece, window).await,
                            expected(log, from, window),
                            "{:?} from {from} window {window} pieces {piece}",
                            String::from_utf8_lossy(log)
                        );
                    }
                }
            }
        }
    }

    /// A log of `lines` numbered lines of 100 bytes, green from the start.
    fn numbered_log(lines: usize) -> Vec<u8> {
        let mut log = b"\x1b[32m".to_vec();
        for n in 1..=lines {
            log.extend_from_slice(format!("line {n:094}\n").as_bytes());
        }
        log
    }

    /// A viewer far behind skips to the log's last part and gets every
    /// byte after it exactly once; one that keeps up is sent everything.
    #[tokio::test]
    async fn a_viewer_far_behind_skips_ahead_and_misses_nothing_after() {
        use crate::store::conformance::{agent, finish, new_job};
        use futures_util::StreamExt as _;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap());
        let worker = store.register_agent(agent("a1")).await.unwrap();
        let job = store
            .create_job(new_job("big"), chrono::Utc::now())
            .await
            .unwrap();
        let now = chrono::Utc::now();
        store
            .claim_job(&worker, now, now + chrono::Duration::seconds(60))
            .await
            .unwrap()
            .unwrap();
        let log = numbered_log(30_000);
        let mut at = 0u64;
        for piece in log.chunks(100_000) {
            store
                .append_log(job.id, 1, at, Bytes::copy_from_slice(piece))
                .await
                .unwrap();
            at += piece.len() as u64;
        }
        store
            .finish_job(
                job.id,
                1,
                finish(hobotnica_common::job::Outcome::Succeeded, Some(0)),
                chrono::Utc::now(),
            )
            .await
            .unwrap();
        let (lag, window) = (1024 * 1024, 256 * 1024);

        let items: Vec<ViewerItem> =
            tail_catching_up(Arc::clone(&store), job.id, 1000, Some(lag), window)
                .map(Result::unwrap)
                .collect()
                .await;
        let ViewerItem::Skipped(skip) = &items[0] else {
            panic!("a skip first: {items:?}");
        };
        let to = usize::try_from(skip.to).unwrap();
        assert_eq!(skip.from, 1000);
        assert_eq!(log[to - 1], b'\n', "the skip ends at a line's start");
        assert!(log.len() - to <= window as usize, "{skip:?}");
        assert_eq!(
            skip.lines,
            log[1000..to].iter().filter(|b| **b == b'\n').count() as u64
        );
        assert_eq!(
            skip.colours.params(),
            "",
            "nothing changed colour after 1000"
        );
        let mut sent = Vec::new();
        for item in &items[1..items.len() - 1] {
            let ViewerItem::Log(TailItem::Chunk { offset, data }) = item else {
                panic!("pieces after the skip: {item:?}");
            };
            assert_eq!(*offset as usize, to + sent.len());
            sent.extend_from_slice(data);
        }
        assert_eq!(sent, log[to..], "every byte after the skip, once");
        assert!(matches!(
            items.last(),
            Some(ViewerItem::Log(TailItem::End(_)))
        ));

        // From the start, the colour set before the skip comes with it.
        let first = std::pin::pin!(tail_catching_up(
            Arc::clone(&store),
            job.id,
            0,
            Some(lag),
            window
        ))
        .next()
        .await
        .unwrap()
        .unwrap();
        let ViewerItem::Skipped(skip) = first else {
            panic!("a skip: {first:?}");
        };
        assert_eq!(skip.colours.params(), "32");

        // Within the lag, or asked not to skip: every byte.
        let behind = log.len() as u64 - lag;
        for (from, lag) in [(behind, Some(lag)), (0, None)] {
            let mut sent = 0u64;
            let mut stream = std::pin::pin!(tail_catching_up(
                Arc::clone(&store),
                job.id,
                from,
                lag,
                window
            ));
            while let Some(item) = stream.next().await {
                match item.unwrap() {
                    ViewerItem::Log(TailItem::Chunk { offset, data }) => {
                        assert_eq!(offset, from + sent);
                        sent += data.len() as u64;
                    }
                    ViewerItem::Log(TailItem::End(_)) => break,
                    ViewerItem::Skipped(skip) => panic!("no skip within the lag: {skip:?}"),
                }
            }
            assert_eq!(from + sent, log.len() as u64);
        }
    }
}
