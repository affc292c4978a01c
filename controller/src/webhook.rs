//! EDGE: GitHub webhooks at `POST /webhooks/github/{hook_id}`: the body
//! (at most 25 MB) and headers go to `Services::receive_delivery`, and its
//! outcome becomes the answer GitHub records.

use axum::Json;
use axum::Router;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt as _;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::deliveries::{Delivery, DeliveryError, Received};
use crate::http::problem::{ApiError, ApiPath};
use crate::metrics::WebhookOutcome;
use crate::services::Services;

/// Largest webhook body accepted (GitHub caps payloads at 25 MB).
pub const MAX_WEBHOOK_BYTES: usize = 25 * 1024 * 1024;

pub fn router() -> Router<Services> {
    Router::new()
        .route("/webhooks/github/{hook_id}", post(receive))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BYTES))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Webhook bodies held in memory at once, all deliveries together, in KiB:
/// one delivery at GitHub's limit, or many ordinary ones (a few KiB each).
const BODY_BUDGET_KIB: usize = 32 * 1024;
/// The budget, shared by every delivery this process reads.
static BODY_BUDGET: Semaphore = Semaphore::const_new(BODY_BUDGET_KIB);
/// How long a delivery waits for room in the budget before it is turned
/// away with 503 (GitHub records the failure; it can be redelivered).
const BODY_BUDGET_WAIT: Duration = Duration::from_secs(10);
/// How long a delivery's body may take to arrive once its share is granted
/// (25 MB from GitHub takes well under a second).
const BODY_READ_DEADLINE: Duration = Duration::from_secs(30);

/// A delivery's body, read under the memory budget it holds a share of.
struct BudgetedBody {
    bytes: Bytes,
    _share: SemaphorePermit<'static>,
}

/// Reads a delivery's body: one declared over GitHub's limit is refused
/// without reading it; otherwise it waits for its share of the budget (the
/// declared length, or the whole limit when none is declared) and reads at
/// most that.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<BudgetedBody, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the webhook body is over {MAX_WEBHOOK_BYTES} bytes (GitHub's limit)"),
        )
    };
    let declared = header(headers, "content-length").and_then(|len| len.parse::<usize>().ok());
    if declared.is_some_and(|len| len > MAX_WEBHOOK_BYTES) {
        return Err(too_large());
    }
    let limit = declared.unwrap_or(MAX_WEBHOOK_BYTES);
    let kib = u32::try_from(limit.div_ceil(1024).max(1)).map_err(|_| too_large())?;
    let share = tokio::time::timeout(BODY_BUDGET_WAIT, BODY_BUDGET.acquire_many(kib))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many webhook deliveries are being read at once; retry later",
            )
        })?
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
    // Into one buffer, a piece at a time: memory is the body once, as
    // budgeted (collecting the pieces first would hold them, then a copy);
    // within a deadline, so a sender that stalls cannot keep its share.
    let bytes = tokio::time::timeout(BODY_READ_DEADLINE, collect(body, limit))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the webhook body did not arrive within {}s",
                    BODY_READ_DEADLINE.as_secs()
                ),
            )
        })?
        .map_err(|err| match (err, declared) {
            (BodyError::TooLong, None) => too_large(),
            (BodyError::TooLong, Some(_)) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "the webhook body is longer than its Content-Length",
            ),
            (BodyError::Broken, _) => {
                ApiError::new(StatusCode::BAD_REQUEST, "cannot read the webhook body")
            }
        })?;
    Ok(BudgetedBody {
        bytes,
        _share: share,
    })
}

/// Why a body could not be read.
enum BodyError {
    TooLong,
    Broken,
}

/// `body`'s bytes, at most `limit` of them, in one buffer sized for `limit`
/// up front only as far as they arrive.
async fn collect(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let mut bytes = Vec::new();
    let mut pieces = body.into_data_stream();
    while let Some(piece) = pieces.next().await {
        let piece = piece.map_err(|_| BodyError::Broken)?;
        if bytes.len() + piece.len() > limit {
            return Err(BodyError::TooLong);
        }
        if bytes.is_empty() {
            bytes.reserve_exact(limit);
        }
        bytes.extend_from_slice(&piece);
    }
    Ok(Bytes::from(bytes))
}

/// The one mapping of refused deliveries to answers.
impl From<DeliveryError> for ApiError {
    fn from(err: DeliveryError) -> ApiError {
        match err {
            DeliveryError::UnknownHook => ApiError::new(StatusCode::NOT_FOUND, err.to_string()),
            DeliveryError::Disabled { .. } => ApiError::new(StatusCode::GONE, err.to_string()),
            DeliveryError::BadSignature(detail) => ApiError::unauthorized(detail),
            DeliveryError::Malformed(detail) => ApiError::new(StatusCode::BAD_REQUEST, detail),
            DeliveryError::SecretUnreadable => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
            DeliveryError::Core(err) => err.into(),
        }
    }
}

/// A delivery's way from its hook to the core; a refusal comes with what
/// it counts as in the metrics.
async fn handle_delivery(
    services: &Services,
    hook_id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Received, (WebhookOutcome, ApiError)> {
    let refused = |err: DeliveryError| {
        let outcome = match &err {
            DeliveryError::UnknownHook | DeliveryError::Disabled { .. } => WebhookOutcome::Refused,
            DeliveryError::BadSignature(_) => WebhookOutcome::BadSignature,
            DeliveryError::Malformed(_) => WebhookOutcome::Invalid,
            DeliveryError::SecretUnreadable | DeliveryError::Core(_) => WebhookOutcome::Error,
        };
        (outcome, ApiError::from(err))
    };
    // Who the delivery is for, before a byte of its body is read.
    let repo = services.delivery_target(hook_id).await.map_err(refused)?;
    // Too long, broken or too slow is the sender's; no room in the budget
    // (503) is ours.
    let body = read_body(headers, body).await.map_err(|err| {
        let outcome = if err.status.is_server_error() {
            WebhookOutcome::Error
        } else {
            WebhookOutcome::Invalid
        };
        (outcome, err)
    })?;
    let delivery = Delivery {
        signature: header(headers, "x-hub-signature-256"),
        event: header(headers, "x-github-event"),
        delivery_id: header(headers, "x-github-delivery"),
        body: &body.bytes,
    };
    services
        .receive_delivery(&repo, delivery)
        .await
        .map_err(refused)
}

/// GitHub delivers `push`, `pull_request` and `ping` events here.
#[utoipa::path(post, path = "/webhooks/github/{hook_id}", tag = "webhooks",
    params(
        ("hook_id" = String, Path, description = "The unguessable id from the registration's webhook_url"),
        ("X-Hub-Signature-256" = String, Header, description = "sha256=<hex HMAC-SHA256 of the raw body with the webhook secret>"),
        ("X-GitHub-Event" = String, Header, description = "push, pull_request, ping, ..."),
        ("X-GitHub-Delivery" = String, Header, description = "The delivery's GUID; a redelivery with the same id queues nothing new"),
    ),
    request_body(content = serde_json::Value, description = "GitHub's event payload (at most 25 MB)", content_type = "application/json"),
    responses(
        (status = 200, description = "ping answered, or a redelivery (nothing queued)", body = serde_json::Value),
        (status = 202, description = "A test job was queued (the job), or the event was ignored (`{\"ignored\": reason}`)", body = serde_json::Value),
        (status = 400, description = "Malformed JSON or a missing header", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong signature", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No webhook with this id", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 410, description = "The repository is disabled (access lost)", body = crate::http::problem::Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over 25 MB", body = crate::http::problem::Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn receive(
    State(services): State<Services>,
    ApiPath(hook_id): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let received = handle_delivery(&services, &hook_id, &headers, body).await;
    services.metrics.webhook(
        header(&headers, "x-github-event"),
        match &received {
            Ok(Received::Queued(_)) => WebhookOutcome::Queued,
            Ok(Received::Pong | Received::Ignored(_)) => WebhookOutcome::Ignored,
            Ok(Received::Duplicate(_)) => WebhookOutcome::Duplicate,
            Err((outcome, _)) => *outcome,
        },
    );
    Ok(match received.map_err(|(_, err)| err)? {
        Received::Pong => {
            (StatusCode::OK, Json(serde_json::json!({"message": "pong"}))).into_response()
        }
        Received::Ignored(reason) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "ignored": reason })),
        )
            .into_response(),
        Received::Queued(job) => crate::http::accepted(*job),
        Received::Duplicate(delivery) => (
            StatusCode::OK,
            Json(serde_json::json!({ "duplicate_delivery": delivery })),
        )
            .into_response(),
    })
}
