//! EDGE: `LogService.Tail` over `logs::tail`.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use hobotnica_common::ids::JobId;
use hobotnica_common::proto::log_service_server::LogService;
use hobotnica_common::proto::{JobEnd, TailChunk, TailRequest, TailResponse, tail_response};
use tonic::{Request, Response, Status};

use super::{require_admin, status};
use crate::logs::{TailItem, tail};
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
        let id = JobId(request.job_id);
        if self
            .services
            .store
            .get_job(id)
            .await
            .map_err(status)?
            .is_none()
        {
            return Err(Status::not_found(format!("job {id} not found")));
        }
        let stream = tail(
            self.services.store.clone(),
            id,
            request.from_offset,
            request.follow,
        )
        .map(|item| {
            item.map_err(status).map(|item| TailResponse {
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
