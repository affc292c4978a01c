//! Ships a job's spool to the controller over PushLogs: reads from the last
//! acknowledged offset, sends chunks of at most `MAX_CHUNK_BYTES` as soon as
//! bytes are written, keeps at most [`WINDOW_BYTES`] unacknowledged, and after
//! any error reconnects (maybe to another controller) and resends from what
//! the controller acknowledged. The controller appends idempotently, so
//! resending never duplicates a byte.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hobotnica_common::logs::MAX_CHUNK_BYTES;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::spool::{Spool, SpoolProgress, SpoolReader};
use crate::connection::{
    BACKOFF_INITIAL, BACKOFF_MAX, Backoff, Connection, LOG_QUEUE_CHUNKS, LogAck, LogStream,
    RpcError, SendError,
};
use crate::job::JobKey;

/// Where the shipper opens log streams: the controller, through
/// [`Connection`] (tests put an in-memory peer here to script exactly when a
/// stream closes).
pub trait LogTransport: Send + Sync + 'static {
    type Stream: LogChannel;

    /// Opens a stream whose first chunk (seq 0) is `data` at `offset`.
    fn open(
        &self,
        key: JobKey,
        offset: u64,
        data: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Self::Stream, RpcError>> + Send;
}

/// One open log stream.
pub trait LogChannel: Send {
    /// Queues a chunk without waiting; returns its sequence number.
    fn try_send(&mut self, offset: u64, data: Vec<u8>) -> Result<u64, SendError>;
    /// The next acknowledgement; the stream's end is an error. Cancel-safe.
    fn next_ack(&mut self) -> impl std::future::Future<Output = Result<LogAck, RpcError>> + Send;
}

impl LogTransport for Connection {
    type Stream = LogStream;

    async fn open(&self, key: JobKey, offset: u64, data: Vec<u8>) -> Result<LogStream, RpcError> {
        self.open_log_stream(key, offset, data).await
    }
}

impl LogChannel for LogStream {
    fn try_send(&mut self, offset: u64, data: Vec<u8>) -> Result<u64, SendError> {
        LogStream::try_send(self, offset, data)
    }

    async fn next_ack(&mut self) -> Result<LogAck, RpcError> {
        LogStream::next_ack(self).await
    }
}

/// Most log bytes sent and not yet acknowledged, per job.
pub const WINDOW_BYTES: u64 = 1024 * 1024;

/// How long the shipper waits for more output before sending less than a
/// full chunk: short enough for a live tail, long enough to batch chatty
/// output.
pub const COALESCE_DELAY: Duration = Duration::from_millis(10);

/// Waits up to [`COALESCE_DELAY`] for more output to send with what came,
/// but no longer than until the spool is closed (make's output ended: the
/// job waits for its last bytes) or holds a full chunk beyond `sent`.
/// Before, the whole delay was slept even when the spool closed just
/// after the last output, and every job's completion waited for it.
async fn coalesce(progress_rx: &mut watch::Receiver<SpoolProgress>, sent: u64) {
    let deadline = tokio::time::sleep(COALESCE_DELAY);
    tokio::pin!(deadline);
    loop {
        let progress = *progress_rx.borrow_and_update();
        if progress.closed || progress.len.saturating_sub(sent) >= MAX_CHUNK_BYTES as u64 {
            return;
        }
        tokio::select! {
            () = &mut deadline => return,
            changed = progress_rx.changed() => {
                if changed.is_err() {
                    // The spool is gone; the caller finds out next.
                    return;
                }
            }
        }
    }
}

/// How many times in a row the spool may fail to open or read (with
/// back-off, about 25 s in all) before the shipper gives up on it: a job
/// whose log can no longer be read must fail, not stay `running`.
pub const SPOOL_READ_ATTEMPTS: u32 = 10;

/// The next chunk to send, as `(offset, len)`, or `None` when there is
/// nothing to send or the window is full.
///
/// `sent` is the offset the next chunk starts at, `available` the spool's
/// length, `acked` what the controller acknowledged, `chunks_in_flight` the
/// number of chunks sent and not yet acknowledged.
pub fn next_chunk(
    sent: u64,
    available: u64,
    acked: u64,
    chunks_in_flight: usize,
) -> Option<(u64, usize)> {
    if sent >= available || chunks_in_flight >= LOG_QUEUE_CHUNKS {
        return None;
    }
    let len = (available - sent).min(MAX_CHUNK_BYTES as u64);
    let unacked = sent.saturating_sub(acked);
    if unacked > 0 && unacked + len > WINDOW_BYTES {
        return None;
    }
    // `len` is at most MAX_CHUNK_BYTES, which is a usize.
    Some((sent, usize::try_from(len).unwrap_or(MAX_CHUNK_BYTES)))
}

/// What the supervisor sees of its shipper.
pub struct ShipperHandle {
    acked: watch::Receiver<u64>,
    resync: Arc<Notify>,
}

impl ShipperHandle {
    /// Follows the controller's acknowledged length.
    pub fn acked(&self) -> watch::Receiver<u64> {
        self.acked.clone()
    }

    /// The controller said its log is shorter than we thought (CompleteJob
    /// ABORTED): find out what it has and ship the rest.
    pub fn resync(&self) {
        self.resync.notify_one();
    }
}

/// Why a shipper stopped.
#[derive(Debug)]
pub enum ShipperEnd {
    /// Told to stop.
    Stopped,
    /// The controller no longer accepts logs for this attempt.
    JobGone(RpcError),
    /// The spool could not be opened or read [`SPOOL_READ_ATTEMPTS`] times
    /// in a row: the rest of the log cannot be shipped.
    SpoolUnreadable(io::Error),
}

/// Consecutive failures to open or read the spool, and the back-off
/// between attempts.
#[derive(Default)]
struct ReadFailures {
    count: u32,
    backoff: Backoff,
}

impl ReadFailures {
    /// Counts a failure: the delay before trying again, or the shipper's end
    /// when the spool stayed unreadable too long.
    fn failed(&mut self, error: io::Error) -> Result<Duration, ShipperEnd> {
        self.count += 1;
        if self.count >= SPOOL_READ_ATTEMPTS {
            tracing::error!(%error, attempts = self.count, "the log spool stays unreadable; giving up on the rest of the log");
            return Err(ShipperEnd::SpoolUnreadable(error));
        }
        let delay = self.backoff.next_delay();
        tracing::warn!(%error, attempts = self.count, retry_in_ms = delay.as_millis() as u64, "cannot read the log spool; retrying");
        Ok(delay)
    }

    fn succeeded(&mut self) {
        self.count = 0;
        self.backoff.reset();
    }
}

/// One job's shipper. Run it with [`Shipper::run`].
pub struct Shipper<T: LogTransport = Connection> {
    transport: T,
    key: JobKey,
    spool: Arc<Spool>,
    acked_tx: watch::Sender<u64>,
    resync: Arc<Notify>,
    /// Bytes sent, counted for the metrics (an atomic add per chunk).
    shipped: prometheus_client::metrics::counter::Counter,
}

struct InFlight {
    seq: u64,
    end: u64,
}

struct OpenStream<S> {
    stream: S,
    in_flight: VecDeque<InFlight>,
    /// Acknowledgements of chunks up to this seq predate a rewind.
    stale_through: Option<u64>,
    last_seq: u64,
}

/// What [`Shipper::ship`] keeps from one turn of its loop to the next.
struct ShipState<S> {
    /// The stream chunks go on, if one is open.
    open: Option<OpenStream<S>>,
    /// What the controller acknowledged (its committed length).
    acked: u64,
    /// Where the next chunk starts.
    sent: u64,
    /// Between attempts to open a stream, and after a stream broke or was
    /// found closed; reset by an acknowledgement.
    backoff: Backoff,
    read_failures: ReadFailures,
    /// Set after a failed read with a stream open: no read before then.
    read_again_at: Option<Instant>,
}

impl<S> ShipState<S> {
    fn new() -> ShipState<S> {
        ShipState {
            open: None,
            acked: 0,
            sent: 0,
            backoff: Backoff::default(),
            read_failures: ReadFailures::default(),
            read_again_at: None,
        }
    }
}

/// What the loop of [`Shipper::ship`] does after a step of its turn.
enum Step {
    /// Go on with this turn.
    Go,
    /// Start the next turn now (a back-off, if any, was waited already).
    Again,
    /// Stop shipping.
    End(ShipperEnd),
}

impl<T: LogTransport> Shipper<T> {
    /// Counts the bytes it sends in `shipped`.
    pub fn counting_in(
        mut self,
        shipped: prometheus_client::metrics::counter::Counter,
    ) -> Shipper<T> {
        self.shipped = shipped;
        self
    }

    pub fn new(transport: T, key: JobKey, spool: Arc<Spool>) -> (Shipper<T>, ShipperHandle) {
        let (acked_tx, acked) = watch::channel(0);
        let resync = Arc::new(Notify::new());
        (
            Shipper {
                transport,
                key,
                spool,
                acked_tx,
                resync: resync.clone(),
                shipped: prometheus_client::metrics::counter::Counter::default(),
            },
            ShipperHandle { acked, resync },
        )
    }

    /// Ships until `stop` is cancelled, the job is gone or the spool stays
    /// unreadable.
    pub async fn run(self, stop: CancellationToken) -> ShipperEnd {
        tokio::select! {
            end = self.open_and_ship() => end,
            () = stop.cancelled() => ShipperEnd::Stopped,
        }
    }

    async fn open_and_ship(&self) -> ShipperEnd {
        let mut failures = ReadFailures::default();
        let reader = loop {
            match self.spool.reader() {
                Ok(reader) => break reader,
                Err(error) => match failures.failed(error) {
                    Ok(delay) => tokio::time::sleep(delay).await,
                    Err(end) => return end,
                },
            }
        };
        self.ship(&reader).await
    }

    fn publish_acked(&self, acked: u64) {
        self.acked_tx.send_if_modified(|value| {
            let changed = *value != acked;
            *value = acked;
            changed
        });
    }

    /// Ships the spool through `reader` until the spool is gone (the job is
    /// over), the controller refuses the log or the spool stays unreadable.
    /// Each turn: open a stream when there is none, fill the window on it,
    /// then wait for the first wake-up (the branches of the `select!`).
    async fn ship(&self, reader: &SpoolReader) -> ShipperEnd {
        let mut progress_rx = self.spool.subscribe();
        let mut state = ShipState::new();
        loop {
            let progress = *progress_rx.borrow_and_update();

            if state.open.is_none() {
                match self.open_stream(reader, &mut state, progress.len).await {
                    Step::Go => {}
                    Step::Again => continue,
                    Step::End(end) => return end,
                }
            }
            match self.fill_window(reader, &mut state, progress.len).await {
                Step::Go => {}
                Step::Again => continue,
                Step::End(end) => return end,
            }

            tokio::select! {
                () = sleep_until(state.read_again_at) => state.read_again_at = None,
                changed = progress_rx.changed() => {
                    if changed.is_err() {
                        // The spool is gone: the job is over.
                        return ShipperEnd::Stopped;
                    }
                    coalesce(&mut progress_rx, state.sent).await;
                }
                ack = next_ack(&mut state.open) => {
                    if let Some(end) = self.take_ack(&mut state, ack).await {
                        return end;
                    }
                }
                () = self.resync.notified() => {
                    // Resend the last chunk on a new stream: its acknowledgement
                    // tells how much the controller really has.
                    state.open = None;
                    state.acked = self.spool.progress().len.saturating_sub(MAX_CHUNK_BYTES as u64).min(state.acked);
                    // Always notifies, even when the value did not move, so
                    // the supervisor knows the resync happened.
                    self.acked_tx.send_replace(state.acked);
                }
            }
        }
    }

    /// With no stream open: starts again from what the controller
    /// acknowledged and, when `available` (the spool's length) goes beyond
    /// it, opens a stream with the first chunk. A failed read or open waits
    /// its back-off and says [`Step::Again`]; a refused open, or a spool
    /// unreadable too long, ends the shipper.
    async fn open_stream(
        &self,
        reader: &SpoolReader,
        state: &mut ShipState<T::Stream>,
        available: u64,
    ) -> Step {
        state.sent = state.acked;
        state.read_again_at = None;
        let Some((offset, len)) = next_chunk(state.sent, available, state.acked, 0) else {
            return Step::Go;
        };
        let data = match reader.read_at(offset, len) {
            Ok(data) => {
                state.read_failures.succeeded();
                data
            }
            Err(error) => {
                return match state.read_failures.failed(error) {
                    Ok(delay) => {
                        tokio::time::sleep(delay).await;
                        Step::Again
                    }
                    Err(end) => Step::End(end),
                };
            }
        };
        match self.transport.open(self.key, offset, data).await {
            Ok(stream) => {
                tracing::debug!(offset, "log stream open");
                self.shipped.inc_by(len as u64);
                state.sent = offset + len as u64;
                state.open = Some(OpenStream {
                    stream,
                    in_flight: VecDeque::from([InFlight {
                        seq: 0,
                        end: state.sent,
                    }]),
                    stale_through: None,
                    last_seq: 0,
                });
                Step::Go
            }
            Err(error) => {
                if let Some(end) = self.gone(&error) {
                    return Step::End(end);
                }
                let delay = state.backoff.next_delay();
                if delay == BACKOFF_INITIAL || delay == BACKOFF_MAX {
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot open the log stream");
                } else {
                    tracing::debug!(%error, retry_in_ms = delay.as_millis() as u64, "cannot open the log stream");
                }
                tokio::time::sleep(delay).await;
                Step::Again
            }
        }
    }

    /// With a stream open and no read waiting for its back-off: sends
    /// chunks of the spool up to `available` until the window or the
    /// stream's queue is full. A failed read keeps the stream and sets when
    /// to read again. A stream found closed is dropped and, after a
    /// back-off, [`Step::Again`]: the next turn opens another.
    async fn fill_window(
        &self,
        reader: &SpoolReader,
        state: &mut ShipState<T::Stream>,
        available: u64,
    ) -> Step {
        let mut closed_on_send = false;
        if let Some(open) = state.open.as_mut()
            && state.read_again_at.is_none()
        {
            while let Some((offset, len)) =
                next_chunk(state.sent, available, state.acked, open.in_flight.len())
            {
                let data = match reader.read_at(offset, len) {
                    Ok(data) => {
                        state.read_failures.succeeded();
                        data
                    }
                    Err(error) => {
                        // Try again after a back-off, keeping the stream:
                        // waiting in `ship` for spool progress or
                        // acknowledgements alone would wait forever once
                        // make has exited and the chunks in flight are
                        // acknowledged — a job stuck `running`.
                        match state.read_failures.failed(error) {
                            Ok(delay) => state.read_again_at = Some(Instant::now() + delay),
                            Err(end) => return Step::End(end),
                        }
                        break;
                    }
                };
                match open.stream.try_send(offset, data) {
                    Ok(seq) => {
                        self.shipped.inc_by(len as u64);
                        state.sent = offset + len as u64;
                        open.last_seq = seq;
                        open.in_flight.push_back(InFlight {
                            seq,
                            end: state.sent,
                        });
                    }
                    Err(SendError::Full) => break,
                    Err(SendError::Closed) => {
                        closed_on_send = true;
                        break;
                    }
                }
            }
        }
        if closed_on_send {
            // Open a new stream now: waiting in `ship` would wait for spool
            // progress (none comes once make has exited) or for an
            // acknowledgement on no stream at all — a job stuck `running`
            // forever.
            state.open = None;
            let delay = state.backoff.next_delay();
            tracing::warn!(
                acked = state.acked,
                retry_in_ms = delay.as_millis() as u64,
                "log stream closed; resending from the acknowledged offset"
            );
            tokio::time::sleep(delay).await;
            return Step::Again;
        }
        Step::Go
    }

    /// Takes in what the open stream answered: an acknowledgement is
    /// applied and published; a broken stream is dropped, after a back-off,
    /// and the next turn resends from the acknowledged offset. `Some` when
    /// the controller no longer accepts this job's log.
    async fn take_ack(
        &self,
        state: &mut ShipState<T::Stream>,
        ack: Result<LogAck, RpcError>,
    ) -> Option<ShipperEnd> {
        match ack {
            Ok(ack) => {
                state.backoff.reset();
                if let Some(open) = state.open.as_mut() {
                    state.acked = on_ack(open, ack, &mut state.sent);
                    self.publish_acked(state.acked);
                }
            }
            Err(error) => {
                if let Some(end) = self.gone(&error) {
                    return Some(end);
                }
                state.open = None;
                let delay = state.backoff.next_delay();
                tracing::warn!(%error, acked = state.acked, retry_in_ms = delay.as_millis() as u64, "log stream broken; resending from the acknowledged offset");
                tokio::time::sleep(delay).await;
            }
        }
        None
    }

    fn gone(&self, error: &RpcError) -> Option<ShipperEnd> {
        match error {
            RpcError::FailedPrecondition(_) | RpcError::Refused { .. } => {
                Some(ShipperEnd::JobGone(error.clone()))
            }
            _ => None,
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn next_ack<S: LogChannel>(open: &mut Option<OpenStream<S>>) -> Result<LogAck, RpcError> {
    match open {
        Some(state) => state.stream.next_ack().await,
        None => std::future::pending().await,
    }
}

/// Applies an acknowledgement; returns the controller's committed length and
/// moves `sent` back when the controller has less than what was sent.
fn on_ack<S>(state: &mut OpenStream<S>, ack: LogAck, sent: &mut u64) -> u64 {
    let mut acknowledged = None;
    while state.in_flight.front().is_some_and(|c| c.seq <= ack.seq) {
        acknowledged = state.in_flight.pop_front();
    }
    let stale = state.stale_through.is_some_and(|seq| ack.seq <= seq);
    if !stale
        && let Some(chunk) = acknowledged
        && ack.committed < chunk.end
    {
        // A gap (the controller lost bytes or missed a chunk): resend from
        // what it has. Acks of chunks already queued are stale now.
        tracing::info!(
            committed = ack.committed,
            chunk_end = chunk.end,
            "the controller has less than was sent; resending"
        );
        *sent = ack.committed;
        state.in_flight.clear();
        state.stale_through = Some(state.last_seq);
    }
    if ack.committed > *sent {
        *sent = ack.committed;
    }
    ack.committed
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = MAX_CHUNK_BYTES as u64;

    #[test]
    fn chunks_are_cut_at_the_maximum_size() {
        assert_eq!(next_chunk(0, 10, 0, 0), Some((0, 10)));
        assert_eq!(next_chunk(0, 3 * MAX, 0, 0), Some((0, MAX_CHUNK_BYTES)));
        assert_eq!(next_chunk(MAX, 3 * MAX, 0, 1), Some((MAX, MAX_CHUNK_BYTES)));
        assert_eq!(
            next_chunk(3 * MAX - 5, 3 * MAX, 0, 2),
            Some((3 * MAX - 5, 5))
        );
    }

    #[test]
    fn nothing_to_send_when_everything_was_sent() {
        assert_eq!(next_chunk(10, 10, 0, 1), None);
        assert_eq!(next_chunk(0, 0, 0, 0), None);
    }

    #[test]
    fn the_window_bounds_unacknowledged_bytes() {
        // Exactly a window in flight: wait.
        assert_eq!(next_chunk(WINDOW_BYTES, 10 * WINDOW_BYTES, 0, 16), None);
        // One chunk acknowledged: room for one more.
        assert_eq!(
            next_chunk(WINDOW_BYTES, 10 * WINDOW_BYTES, MAX, 15),
            Some((WINDOW_BYTES, MAX_CHUNK_BYTES))
        );
        // A small tail fits where a full chunk would not.
        assert_eq!(
            next_chunk(WINDOW_BYTES - 10, WINDOW_BYTES, 0, 16),
            Some((WINDOW_BYTES - 10, 10))
        );
        // Too many chunks in flight, even small ones.
        assert_eq!(next_chunk(0, 10, 0, LOG_QUEUE_CHUNKS), None);
    }

    #[test]
    fn simulated_shipping_sends_every_byte_once_with_bounded_window() {
        // Ship 10 MB with acks arriving two chunks late.
        let total = 10 * 1024 * 1024 + 123;
        let (mut sent, mut acked) = (0u64, 0u64);
        let mut in_flight: VecDeque<(u64, u64)> = VecDeque::new();
        let mut received = 0u64;
        while acked < total {
            while let Some((offset, len)) = next_chunk(sent, total, acked, in_flight.len()) {
                assert_eq!(offset, sent);
                assert!(len <= MAX_CHUNK_BYTES);
                sent += len as u64;
                in_flight.push_back((offset, sent));
                assert!(sent - acked <= WINDOW_BYTES);
            }
            let (offset, end) = in_flight.pop_front().expect("something in flight");
            assert_eq!(offset, received, "in order, no gap");
            received = end;
            acked = end;
        }
        assert_eq!(received, total);
    }
}

/// The shipper against an in-memory peer whose streams the test closes at
/// exactly the moment it wants: no timing to hope for.
#[cfg(test)]
mod stream_tests {
    use std::time::Duration;

    use hobotnica_common::ids::JobId;
    use tokio::sync::mpsc;

    use super::*;

    const MAX: u64 = MAX_CHUNK_BYTES as u64;
    const DEADLINE: Duration = Duration::from_secs(10);

    /// The controller's side of one stream.
    struct Peer {
        first_offset: u64,
        chunks: mpsc::Receiver<(u64, u64, usize)>,
        acks: mpsc::UnboundedSender<Result<LogAck, RpcError>>,
    }

    struct Memory {
        opened: mpsc::UnboundedSender<Peer>,
    }

    struct MemoryStream {
        chunks: mpsc::Sender<(u64, u64, usize)>,
        acks: mpsc::UnboundedReceiver<Result<LogAck, RpcError>>,
        next_seq: u64,
    }

    impl LogTransport for Memory {
        type Stream = MemoryStream;

        async fn open(
            &self,
            _key: JobKey,
            offset: u64,
            _data: Vec<u8>,
        ) -> Result<MemoryStream, RpcError> {
            let (chunks_tx, chunks) = mpsc::channel(LOG_QUEUE_CHUNKS);
            let (acks, acks_rx) = mpsc::unbounded_channel();
            self.opened
                .send(Peer {
                    first_offset: offset,
                    chunks,
                    acks,
                })
                .map_err(|_| RpcError::Unavailable("the test ended".to_owned()))?;
            Ok(MemoryStream {
                chunks: chunks_tx,
                acks: acks_rx,
                next_seq: 1,
            })
        }
    }

    impl LogChannel for MemoryStream {
        fn try_send(&mut self, offset: u64, data: Vec<u8>) -> Result<u64, SendError> {
            let seq = self.next_seq;
            match self.chunks.try_send((seq, offset, data.len())) {
                Ok(()) => {
                    self.next_seq += 1;
                    Ok(seq)
                }
                Err(mpsc::error::TrySendError::Full(_)) => Err(SendError::Full),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
            }
        }

        async fn next_ack(&mut self) -> Result<LogAck, RpcError> {
            self.acks
                .recv()
                .await
                .unwrap_or_else(|| Err(RpcError::Unavailable("closed".to_owned())))
        }
    }

    async fn next_peer(opened: &mut mpsc::UnboundedReceiver<Peer>) -> Peer {
        tokio::time::timeout(DEADLINE, opened.recv())
            .await
            .expect("the shipper opens a stream")
            .expect("a stream")
    }

    /// The job's output is all spooled (make exited) and more than a window
    /// long. The controller acknowledges the first chunk, but its stream's
    /// send side is already closed (the controller died, or shut down with
    /// acknowledgements still in flight): the shipper's next send finds it
    /// closed. It must open a new stream and ship the rest — before the fix
    /// it waited for spool progress that never came, and the job stayed
    /// `running` forever.
    #[tokio::test]
    async fn a_stream_found_closed_on_send_is_reopened_after_make_exited() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool = Arc::new(Spool::create(dir.path().join("spool")).expect("spool"));
        let total = WINDOW_BYTES + 3 * MAX;
        spool
            .append(&vec![b'x'; usize::try_from(total).expect("size")])
            .expect("append");
        spool.close();

        let (opened_tx, mut opened) = mpsc::unbounded_channel();
        let key = JobKey {
            id: JobId(1),
            attempt: 1,
        };
        let (shipper, handle) = Shipper::new(Memory { opened: opened_tx }, key, spool.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(shipper.run(stop.clone()));

        // The first stream: a full window is sent (seq 0 with the opening,
        // then the rest), and the shipper waits for acknowledgements.
        let mut first = next_peer(&mut opened).await;
        assert_eq!(first.first_offset, 0);
        let mut window = MAX;
        while window < WINDOW_BYTES {
            let (_, offset, len) = tokio::time::timeout(DEADLINE, first.chunks.recv())
                .await
                .expect("a window's worth of chunks")
                .expect("a chunk");
            assert_eq!(offset, window);
            window += len as u64;
        }
        // The send side closes, then the first chunk's acknowledgement comes.
        drop(first.chunks);
        first
            .acks
            .send(Ok(LogAck {
                seq: 0,
                committed: MAX,
            }))
            .expect("ack");

        // A new stream resends from what was acknowledged, and the rest
        // arrives.
        let mut second = next_peer(&mut opened).await;
        assert_eq!(second.first_offset, MAX);
        let mut committed = MAX + MAX; // its first chunk
        second
            .acks
            .send(Ok(LogAck { seq: 0, committed }))
            .expect("ack");
        while committed < total {
            let (seq, offset, len) = tokio::time::timeout(DEADLINE, second.chunks.recv())
                .await
                .expect("the rest of the log")
                .expect("a chunk");
            assert_eq!(offset, committed);
            committed += len as u64;
            second
                .acks
                .send(Ok(LogAck { seq, committed }))
                .expect("ack");
        }
        let mut acked = handle.acked();
        tokio::time::timeout(DEADLINE, acked.wait_for(|acked| *acked == total))
            .await
            .expect("every byte acknowledged")
            .expect("the shipper runs");
        stop.cancel();
        task.await.expect("the shipper ends");
        drop(first.acks);
    }

    /// Truncates the spool file under the shipper: its reads past the new
    /// end fail, as when the file is damaged or cut short.
    fn truncate(spool: &Spool) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(spool.path())
            .and_then(|file| file.set_len(0))
            .expect("truncate the spool");
    }

    /// A stream is open with 10 bytes in flight; make then writes 20 more
    /// and exits, but the spool cannot be read any more. Returns the
    /// shipper's task, its handle, and the stream's peer after the first
    /// chunk was acknowledged: nothing is in flight, no spool progress will
    /// come.
    async fn unreadable_after_the_first_chunk(
        spool: &Arc<Spool>,
    ) -> (tokio::task::JoinHandle<ShipperEnd>, ShipperHandle, Peer) {
        spool.append(&[b'a'; 10]).expect("append");
        let (opened_tx, mut opened) = mpsc::unbounded_channel();
        let key = JobKey {
            id: JobId(1),
            attempt: 1,
        };
        let (shipper, handle) = Shipper::new(Memory { opened: opened_tx }, key, spool.clone());
        let task = tokio::spawn(shipper.run(CancellationToken::new()));
        let peer = next_peer(&mut opened).await;
        assert_eq!(peer.first_offset, 0);
        // No await between these: the shipper next runs with the spool
        // closed at 30 bytes, none of which can be read.
        spool.append(&[b'b'; 20]).expect("append");
        spool.close();
        truncate(spool);
        peer.acks
            .send(Ok(LogAck {
                seq: 0,
                committed: 10,
            }))
            .expect("ack");
        // `opened` is dropped: a second stream would fail to open.
        (task, handle, peer)
    }

    /// The spool cannot be read for a moment while a stream is open, after
    /// make exited: the shipper reads again after a back-off and ships the
    /// rest. Before the fix it gave up reading and waited for spool progress
    /// or acknowledgements, neither of which could come: the job stayed
    /// `running` forever while its lease was renewed.
    /// make prints its last line and exits: the line is shipped as soon as
    /// the spool is closed, not after the coalescing delay (which every
    /// job's completion waited for, 10 ms, before the fix).
    #[tokio::test(start_paused = true)]
    async fn the_last_output_is_shipped_once_the_spool_closes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool = Arc::new(Spool::create(dir.path().join("spool")).expect("spool"));
        spool.append(b"first\n").expect("append");
        let (opened_tx, mut opened) = mpsc::unbounded_channel();
        let key = JobKey {
            id: JobId(1),
            attempt: 1,
        };
        let (shipper, _handle) = Shipper::new(Memory { opened: opened_tx }, key, spool.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(shipper.run(stop.clone()));
        let mut peer = next_peer(&mut opened).await;

        // More output: the shipper waits for more to batch with it...
        spool.append(b"last\n").expect("append");
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // ...until make's output ends.
        let closed_at = Instant::now();
        spool.close();
        let (_, offset, len) = tokio::time::timeout(DEADLINE, peer.chunks.recv())
            .await
            .expect("the last chunk")
            .expect("a chunk");
        assert_eq!((offset, len), (6, 5));
        assert!(
            closed_at.elapsed() < COALESCE_DELAY,
            "shipped {:?} after the spool closed",
            closed_at.elapsed()
        );
        stop.cancel();
        task.await.expect("the shipper ends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_spool_read_error_with_a_stream_open_is_retried() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool = Arc::new(Spool::create(dir.path().join("spool")).expect("spool"));
        let (task, handle, mut peer) = unreadable_after_the_first_chunk(&spool).await;

        // The clock is paused and only moves when every task waits: 50 ms
        // on, the shipper has failed its read and waits for its first
        // back-off (100 ms) to end. Then the spool comes back.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(spool.path())
            .expect("open the spool");
        std::os::unix::fs::FileExt::write_all_at(&file, &[b'a'; 10], 0).expect("write");
        std::os::unix::fs::FileExt::write_all_at(&file, &[b'b'; 20], 10).expect("write");

        let (seq, offset, len) = tokio::time::timeout(DEADLINE, peer.chunks.recv())
            .await
            .expect("the rest of the log is sent on the open stream")
            .expect("a chunk");
        assert_eq!((offset, len), (10, 20));
        peer.acks
            .send(Ok(LogAck { seq, committed: 30 }))
            .expect("ack");
        let mut acked = handle.acked();
        tokio::time::timeout(DEADLINE, acked.wait_for(|acked| *acked == 30))
            .await
            .expect("every byte acknowledged")
            .expect("the shipper runs");
        task.abort();
    }

    /// The spool stays unreadable: the shipper ends with `SpoolUnreadable`
    /// (which fails the job) instead of waiting forever.
    #[tokio::test(start_paused = true)]
    async fn a_spool_unreadable_for_good_ends_the_shipper() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool = Arc::new(Spool::create(dir.path().join("spool")).expect("spool"));
        let (task, _handle, peer) = unreadable_after_the_first_chunk(&spool).await;

        let end = tokio::time::timeout(Duration::from_secs(600), task)
            .await
            .expect("the shipper gives up within minutes")
            .expect("the shipper does not panic");
        assert!(matches!(end, ShipperEnd::SpoolUnreadable(_)), "{end:?}");
        drop(peer);
    }

    /// The spool file is gone before the shipper opens it: same verdict.
    #[tokio::test(start_paused = true)]
    async fn a_spool_that_cannot_be_opened_ends_the_shipper() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool = Arc::new(Spool::create(dir.path().join("spool")).expect("spool"));
        spool.append(b"output").expect("append");
        spool.remove();
        let (opened_tx, _opened) = mpsc::unbounded_channel();
        let key = JobKey {
            id: JobId(1),
            attempt: 1,
        };
        let (shipper, _handle) = Shipper::new(Memory { opened: opened_tx }, key, spool.clone());
        let end = tokio::time::timeout(
            Duration::from_secs(600),
            shipper.run(CancellationToken::new()),
        )
        .await
        .expect("the shipper gives up within minutes");
        assert!(matches!(end, ShipperEnd::SpoolUnreadable(_)), "{end:?}");
    }
}
