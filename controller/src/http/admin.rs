//! EDGE: `/api/v1/admin/export` — the snapshot file of the whole store,
//! streamed (admin token only).

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::{ApiError, Problem};
use crate::auth::Caller;
use crate::services::Services;

/// A snapshot file's bytes.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)] // a schema only
struct SnapshotFile(Vec<u8>);

pub fn router() -> OpenApiRouter<Services> {
    OpenApiRouter::new().routes(routes!(export_store))
}

#[utoipa::path(get, path = "/api/v1/admin/export", tag = "admin",
    responses(
        (status = 200, description = "A snapshot of everything the store holds (docs/snapshot-format.md): gzip of JSON lines, read from one consistent view, served as a plain download (`application/octet-stream`, saved as `hobotnica-snapshot.jsonl.gz`). A failure midway ends the body early, without the snapshot's last line: the file is then refused as truncated", body = SnapshotFile, content_type = "application/octet-stream"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = [])))]
async fn export_store(
    caller: Caller,
    State(services): State<Services>,
) -> Result<Response, ApiError> {
    let chunks = services.export_snapshot(&caller)?;
    let mut response = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(chunks),
    ));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        // A download, not gzip transfer coding (which clients undo).
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"hobotnica-snapshot.jsonl.gz\""),
    );
    Ok(response)
}
