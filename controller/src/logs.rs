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

impl Services {
    /// Job `id`'s log from `offset` (clamped to its length) to its length
    /// now, when `caller` may read the job.
    pub async fn read_log(
        &self,
        caller: &Caller,
        id: JobId,
        offset: u64,
    ) -> Result<
        LogRead<impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static>,
        CoreError,
    > {
        let job = self.job_for(caller, id, Access::Read).await?;
        let length = self.store.log_len(id).await?;
        let body = read_range(Arc::clone(&self.store), id, offset.min(length), length);
        Ok(LogRead { job, length, body })
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
