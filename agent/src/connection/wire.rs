//! The two long-lived streams (Session, PushLogs) and every conversion
//! between proto messages and the agent's domain types.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hobotnica_common::ids::{AgentId, JobId};
use hobotnica_common::job::{JobTimings, Outcome};
use hobotnica_common::logs::DEFAULT_MAX_LOG_BYTES;
use hobotnica_common::proto::{self, agent_message, controller_message};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_stream::{Stream, StreamExt as _};

use super::{CALL_TIMEOUT, Client, Connection, RpcError};
use crate::job::{Completion, JobKey, JobSpec};
use crate::workspace::GitHttpHeader;

/// Messages the agent may queue on its Session before they are sent.
const SESSION_QUEUE: usize = 64;

/// Chunks queued on a PushLogs stream; the shipper never has more unacked
/// chunks than this in flight, so a send never waits.
pub const LOG_QUEUE_CHUNKS: usize = 32;

/// What the controller says on the Session.
#[derive(Debug)]
pub enum SessionCommand {
    /// Run this job (the agent now holds its lease).
    Assign(Box<JobSpec>),
    /// Stop this job.
    Cancel { key: JobKey, reason: String },
    /// Nothing but proof of life.
    Heartbeat,
    /// Access to this repository is gone: delete its cache clone and idle
    /// work trees (sent again at each session start while it lasts).
    ForgetRepository { git_url: String },
}

/// An open Session.
pub struct SessionStream {
    outbound: Outbound,
    inbound: tonic::Streaming<proto::ControllerMessage>,
    connection: Connection,
    controller: usize,
}

pub(super) async fn open_session(
    mut client: Client,
    connection: Connection,
    controller: usize,
    agent_id: &AgentId,
    free_slots: u32,
) -> Result<SessionStream, RpcError> {
    let (outbound, requests) = session_outbound(agent_id, free_slots);
    let response = tokio::time::timeout(CALL_TIMEOUT, client.session(requests))
        .await
        .map_err(|_| RpcError::Unavailable(format!("no session within {CALL_TIMEOUT:?}")))??;
    Ok(SessionStream {
        outbound,
        inbound: response.into_inner(),
        connection,
        controller,
    })
}

/// What the agent sends on a Session. Capacity is state, not an event: the
/// latest value waits in a watch and goes out as soon as the stream takes a
/// message, never dropped when the queue is full (a lost Capacity left the
/// controller believing the agent had no free slot until some other job
/// event). Only Heartbeats go through the bounded queue.
struct Outbound {
    queue: mpsc::Sender<proto::AgentMessage>,
    capacity: watch::Sender<proto::Capacity>,
}

/// The Session's outbound side, and the stream of messages for tonic:
/// Hello first (a controller may wait for it before it answers with
/// headers), then the capacity and the queue, merged.
fn session_outbound(
    agent_id: &AgentId,
    free_slots: u32,
) -> (
    Outbound,
    impl Stream<Item = proto::AgentMessage> + Send + 'static,
) {
    let (queue, queued) = mpsc::channel(SESSION_QUEUE);
    let (capacity, capacity_rx) = watch::channel(proto::Capacity {
        free_slots,
        assignments_received: 0,
    });
    let hello = proto::AgentMessage {
        kind: Some(agent_message::Kind::Hello(proto::Hello {
            agent_id: agent_id.0.clone(),
        })),
    };
    // `WatchStream::new` yields the current value first: the initial
    // Capacity follows Hello.
    let capacities = WatchStream::new(capacity_rx).map(|capacity| proto::AgentMessage {
        kind: Some(agent_message::Kind::Capacity(capacity)),
    });
    let requests = tokio_stream::once(hello).chain(ReceiverStream::new(queued).merge(capacities));
    (Outbound { queue, capacity }, requests)
}

impl Outbound {
    fn send_capacity(&self, free_slots: u32, assignments_received: u64) -> bool {
        self.capacity.send_replace(proto::Capacity {
            free_slots,
            assignments_received,
        });
        !self.capacity.is_closed()
    }

    fn send_heartbeat(&self) -> bool {
        self.queue
            .try_send(proto::AgentMessage {
                kind: Some(agent_message::Kind::Heartbeat(proto::Heartbeat {})),
            })
            .is_ok()
    }
}

impl SessionStream {
    /// Tells the controller how many jobs it may still assign (the latest
    /// value always reaches it); false when the stream is closed.
    pub fn send_capacity(&self, free_slots: u32, assignments_received: u64) -> bool {
        self.outbound
            .send_capacity(free_slots, assignments_received)
    }

    /// False when the stream is closed or congested (the next beat will do).
    pub fn send_heartbeat(&self) -> bool {
        self.outbound.send_heartbeat()
    }

    /// The next command; `Ok(None)` when the controller ended the stream.
    /// Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<SessionCommand>, RpcError> {
        loop {
            let message = match self.inbound.message().await {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(None),
                Err(status) => {
                    let error = RpcError::from(status);
                    self.connection.note_failure(self.controller, &error);
                    return Err(error);
                }
            };
            match message.kind {
                Some(controller_message::Kind::Assignment(assignment)) => {
                    return Ok(Some(SessionCommand::Assign(Box::new(job_spec(assignment)))));
                }
                Some(controller_message::Kind::Cancel(cancel)) => {
                    return Ok(Some(SessionCommand::Cancel {
                        key: JobKey {
                            id: JobId(cancel.job_id),
                            attempt: cancel.attempt,
                        },
                        reason: cancel.reason,
                    }));
                }
                Some(controller_message::Kind::Heartbeat(_)) => {
                    return Ok(Some(SessionCommand::Heartbeat));
                }
                Some(controller_message::Kind::ForgetRepository(forget)) => {
                    return Ok(Some(SessionCommand::ForgetRepository {
                        git_url: forget.git_url,
                    }));
                }
                // A newer controller's message kind: ignore it.
                None => continue,
            }
        }
    }
}

fn job_spec(assignment: proto::Assignment) -> JobSpec {
    let timings = JobTimings {
        assignment_sent_at: assignment.sent_at_unix_us.and_then(from_unix_us),
        received_at: Some(Utc::now()),
        ..JobTimings::default()
    };
    JobSpec {
        key: JobKey {
            id: JobId(assignment.job_id),
            attempt: assignment.attempt,
        },
        repo: assignment.repo,
        git_url: assignment.git_url,
        commit: assignment.commit,
        branch: assignment.branch,
        target: assignment.target,
        kind: assignment.kind,
        env: assignment.env.into_iter().collect::<BTreeMap<_, _>>(),
        timeout: (assignment.timeout_ms > 0).then(|| Duration::from_millis(assignment.timeout_ms)),
        secrets: assignment.secrets,
        git_http_header: (!assignment.git_http_header.is_empty())
            .then(|| GitHttpHeader::new(assignment.git_http_header)),
        // An older controller sends none: the agent's own default.
        max_log_bytes: match assignment.max_log_bytes {
            0 => DEFAULT_MAX_LOG_BYTES,
            bytes => bytes,
        },
        timings,
    }
}

fn from_unix_us(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
}

fn unix_us(at: Option<DateTime<Utc>>) -> Option<i64> {
    at.map(|at| at.timestamp_micros())
}

fn timings_message(timings: &JobTimings) -> proto::JobTimings {
    proto::JobTimings {
        assignment_sent_at_unix_us: unix_us(timings.assignment_sent_at),
        received_at_unix_us: unix_us(timings.received_at),
        fetched_at_unix_us: unix_us(timings.fetched_at),
        fetch_ran: timings.fetch_ran,
        work_tree_ready_at_unix_us: unix_us(timings.work_tree_ready_at),
        sandbox_ready_at_unix_us: unix_us(timings.sandbox_ready_at),
        make_spawned_at_unix_us: unix_us(timings.make_spawned_at),
        make_exited_at_unix_us: unix_us(timings.make_exited_at),
        log_acked_at_unix_us: unix_us(timings.log_acked_at),
        completion_sent_at_unix_us: unix_us(timings.completion_sent_at),
    }
}

pub(super) fn complete_request(completion: &Completion) -> proto::CompleteJobRequest {
    let outcome = match completion.outcome {
        Outcome::Succeeded => proto::Outcome::Succeeded,
        Outcome::Failed => proto::Outcome::Failed,
        Outcome::Cancelled => proto::Outcome::Cancelled,
        Outcome::TimedOut => proto::Outcome::TimedOut,
    };
    proto::CompleteJobRequest {
        job_id: completion.key.id.0,
        attempt: completion.key.attempt,
        outcome: outcome as i32,
        exit_code: completion.exit_code,
        message: completion.message.clone(),
        log_length: completion.log_length,
        duration_ms: u64::try_from(completion.duration.as_millis()).unwrap_or(u64::MAX),
        timings: Some(timings_message(&completion.timings)),
    }
}

/// The controller's acknowledgement of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogAck {
    pub seq: u64,
    /// The controller's log length after this chunk.
    pub committed: u64,
}

/// An open PushLogs stream for one job attempt.
pub struct LogStream {
    key: JobKey,
    outbound: mpsc::Sender<proto::LogChunk>,
    inbound: tonic::Streaming<proto::LogAck>,
    next_seq: u64,
    connection: Connection,
    controller: usize,
}

pub(super) async fn open_log_stream(
    mut client: Client,
    connection: Connection,
    controller: usize,
    key: JobKey,
    offset: u64,
    data: Vec<u8>,
) -> Result<LogStream, RpcError> {
    let (outbound, queue) = mpsc::channel(LOG_QUEUE_CHUNKS);
    // The first chunk is queued before the call: a controller may read it
    // (to learn the job) before it answers with headers.
    outbound
        .try_send(proto::LogChunk {
            job_id: key.id.0,
            attempt: key.attempt,
            seq: 0,
            offset,
            data,
        })
        .map_err(|_| RpcError::Unavailable("log queue closed".to_owned()))?;
    let response = tokio::time::timeout(CALL_TIMEOUT, client.push_logs(ReceiverStream::new(queue)))
        .await
        .map_err(|_| RpcError::Unavailable(format!("no log stream within {CALL_TIMEOUT:?}")))??;
    Ok(LogStream {
        key,
        outbound,
        inbound: response.into_inner(),
        next_seq: 1,
        connection,
        controller,
    })
}

/// Why a chunk was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The queue is full: wait for acknowledgements.
    Full,
    /// The stream is gone.
    Closed,
}

impl LogStream {
    /// Queues a chunk without waiting; returns its sequence number. The
    /// stream's first chunk (given when it was opened) has seq 0.
    pub fn try_send(&mut self, offset: u64, data: Vec<u8>) -> Result<u64, SendError> {
        let seq = self.next_seq;
        let chunk = proto::LogChunk {
            job_id: self.key.id.0,
            attempt: self.key.attempt,
            seq,
            offset,
            data,
        };
        match self.outbound.try_send(chunk) {
            Ok(()) => {
                self.next_seq += 1;
                Ok(seq)
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(SendError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
        }
    }

    /// The next acknowledgement. The controller ending the stream is an
    /// error too (the shipper reconnects). Cancel-safe.
    pub async fn next_ack(&mut self) -> Result<LogAck, RpcError> {
        let result = match self.inbound.message().await {
            Ok(Some(ack)) => Ok(LogAck {
                seq: ack.seq,
                committed: ack.committed,
            }),
            Ok(None) => Err(RpcError::Unavailable(
                "the controller closed the log stream".to_owned(),
            )),
            Err(status) => Err(RpcError::from(status)),
        };
        if let Err(error) = &result {
            self.connection.note_failure(self.controller, error);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller reads nothing for a while (a slow network): the queue
    /// fills with Heartbeats, and the agent's free slots change twice
    /// meanwhile. The latest value reaches the controller once it reads
    /// again. Before the fix a Capacity that found the queue full was
    /// dropped, never sent again: the controller could believe the agent had
    /// no free slot until some other job event.
    #[tokio::test]
    async fn the_latest_capacity_is_sent_even_when_the_queue_was_full() {
        let (outbound, requests) = session_outbound(&AgentId("agent-1".to_owned()), 0);
        let mut heartbeats = 0;
        while outbound.send_heartbeat() {
            heartbeats += 1;
        }
        outbound.send_capacity(1, 1);
        outbound.send_capacity(2, 1);
        drop(outbound);

        let kinds: Vec<_> = requests.filter_map(|message| message.kind).collect().await;
        assert!(
            matches!(kinds.first(), Some(agent_message::Kind::Hello(_))),
            "{kinds:?}"
        );
        let sent_heartbeats = kinds
            .iter()
            .filter(|kind| matches!(kind, agent_message::Kind::Heartbeat(_)))
            .count();
        assert_eq!(sent_heartbeats, heartbeats);
        let last_capacity = kinds.iter().rev().find_map(|kind| match kind {
            agent_message::Kind::Capacity(capacity) => Some(*capacity),
            _ => None,
        });
        assert_eq!(
            last_capacity,
            Some(proto::Capacity {
                free_slots: 2,
                assignments_received: 1,
            })
        );
    }
}
