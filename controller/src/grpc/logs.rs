//! EDGE: `LogService.Tail` over `Services::tail_log`.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use hobotnica_common::ids::JobId;
use hobotnica_common::proto::log_service_server::LogService;
use hobotnica_common::proto::{JobEnd, TailChunk, TailRequest, TailResponse, tail_response};
use tonic::{Request, Response, Status};

use super::{core_status, require_admin};
use crate::logs::TailItem;
use crate::services::Services;

pub struct LogGrpc {
    services: Services,
}

impl LogGrpc {
    pub fn new(services: Services) -> LogGrpc {
        LogGrpc { services }
    }
}

type TailStream = Pin<Box<dyn Stream<Item = Result<TailResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LogService for LogGrpc {
    type TailStream = TailStream;

    async fn tail(&self, request: Request<TailRequest>) -> Result<Response<TailStream>, Status> {
        require_admin(&self.services, request.metadata())?;
        let request = request.into_inner();
        let stream = self
            .services
            .tail_log(JobId(request.job_id), request.from_offset, request.follow)
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
        Ok(Response::new(Box::pin(stream)))
    }
}
