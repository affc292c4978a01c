//! EDGE: every HTTP request's id, in one middleware over the whole router
//! (the REST API, webhook deliveries, the web dashboard). The id is the
//! client's `X-Request-Id` when it is well-formed (1 to 128 of
//! `[A-Za-z0-9._:-]`), else 16 random bytes in hex; a malformed one is never
//! echoed or logged. The answer carries it in `X-Request-Id`, a problem
//! document as its `request_id` member, and every line logged while the
//! request is handled in the `http_request` span's `request_id` field (with
//! the method and the route template, never the raw path or query). One line
//! is logged when the answer's head is ready.

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument as _;

use super::problem::Problem;

/// The request and response header that carries the id.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest id taken from a client, in characters.
const MAX_CLIENT_ID_LEN: usize = 128;

/// Random bytes in a generated id (shown as twice as many hex digits).
const GENERATED_ID_BYTES: usize = 16;

/// Routes asked often by probes, logged at `debug` so they do not drown
/// the log.
const PROBES: [&str; 2] = ["/healthz", "/readyz"];

/// The request's id, also put in the request's extensions for handlers.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Whether a client's id may be used as it is.
fn well_formed(id: &str) -> bool {
    (1..=MAX_CLIENT_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'-'))
}

/// The client's id when it is well-formed, else a new one.
fn request_id(request: &Request) -> String {
    request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| well_formed(id))
        .map_or_else(
            || hobotnica_common::token::random_hex(GENERATED_ID_BYTES),
            str::to_owned,
        )
}

/// The middleware: see the module's comment.
pub async fn with_request_id(mut request: Request, next: Next) -> Response {
    let id = request_id(&request);
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned());
    let span = tracing::info_span!(
        "http_request",
        request_id = %id,
        method = %request.method(),
        route = tracing::field::Empty,
    );
    if let Some(route) = &route {
        span.record("route", route.as_str());
    }
    request.extensions_mut().insert(RequestId(id.clone()));
    let started = std::time::Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    if let Some(mut problem) = response.extensions_mut().remove::<Problem>() {
        problem.request_id = Some(id.clone());
        if let Ok(body) = serde_json::to_vec(&problem) {
            response.headers_mut().remove(header::CONTENT_LENGTH);
            *response.body_mut() = Body::from(body);
        }
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    let status = response.status().as_u16();
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    span.in_scope(|| {
        if response.status().is_server_error() {
            tracing::warn!(status, duration_ms, "request answered");
        } else if route
            .as_deref()
            .is_some_and(|route| PROBES.contains(&route))
        {
            tracing::debug!(status, duration_ms, "request answered");
        } else {
            tracing::info!(status, duration_ms, "request answered");
        }
    });
    response
}

#[cfg(test)]
mod tests {
    use super::well_formed;

    #[test]
    fn client_ids_are_used_only_when_well_formed() {
        for id in ["abc-123", "a", "req:1.2_3", &"x".repeat(128)] {
            assert!(well_formed(id), "{id}");
        }
        for id in [
            "",
            "bad id with spaces",
            &"x".repeat(129),
            "a\nb",
            "é",
            "a/b",
            "<script>",
        ] {
            assert!(!well_formed(id), "{id:?}");
        }
    }
}
