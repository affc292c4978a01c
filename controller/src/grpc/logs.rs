//! EDGE: `LogService.Tail` over `Services::tail_log`.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use hobotnica_common::ids::JobId;
use hobotnica_common::proto::log_service_server::LogService;
use hobotnica_common::proto::{JobEnd, TailChunk, TailRequest, TailResponse, tail_response};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{core_status, operator};
use crate::logs::TailItem;
use crate::services::Services;

pub struct LogGrpc {
    services: Services,
    /// Ends every tail: a following tail waits for log events only, and the
    /// server's graceful stop waits for every open stream.
    shutdown: CancellationToken,
}

impl LogGrpc {
    pub fn new(services: Services, shutdown: CancellationToken) -> LogGrpc {
        LogGrpc { services, shutdown }
    }
}

/// `stream` until `shutdown`, then UNAVAILABLE: a follower resumes from its
/// offset (on another controller, or this one restarted), and a reader of
/// the stored log learns that it did not get all of it.
fn until_shutdown<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<T, Status>> + Send + 'static {
    futures_util::stream::unfold(Some((Box::pin(stream), shutdown)), |state| async move {
        let (mut stream, shutdown) = state?;
        tokio::select! {
            biased;
            () = shutdown.cancelled() => Some((
                Err(Status::unavailable("the controller is shutting down")),
                None,
            )),
            item = stream.next() => item.map(|item| (item, Some((stream, shutdown)))),
        }
    })
}

type TailStream = Pin<Box<dyn Stream<Item = Result<TailResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LogService for LogGrpc {
    type TailStream = TailStream;

    async fn tail(&self, request: Request<TailRequest>) -> Result<Response<TailStream>, Status> {
        let caller = operator(&self.services, &request)?;
        let request = request.into_inner();
        let stream = self
            .services
            .tail_log(
                &caller,
                JobId(request.job_id),
                request.from_offset,
                request.follow,
            )
            .await
            .map_err(core_status)?
            .map(|item| {
                item.map_err(core_status).map(|item| TailResponse {
                    kind: Some(match item {
                        TailItem::Chunk { offset, data } => tail_response::Kind::Chunk(TailChunk {
                            offset,
                            data: data.to_vec(),
                        }),
                        TailItem::End(job) => tail_response::Kind::End(JobEnd {
                            state: job.state.as_str().to_owned(),
                            exit_code: job.exit_code,
                            message: job.message.unwrap_or_default(),
                        }),
                    }),
                })
            });
        Ok(Response::new(Box::pin(until_shutdown(
            stream,
            self.shutdown.clone(),
        ))))
    }
}
