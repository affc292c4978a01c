//! EDGE: `/api/v1/repos/{owner}/{name}/notifications` — where a
//! repository's finished jobs are told about. A target's URL and signing
//! secret are write-only: an answer shows the URL's host and how the last
//! delivery went, never the URL or the secret.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use hobotnica_common::notifications::{
    DeliveryState, DeliveryStatus, NotificationEvents, NotificationKind, NotificationTarget,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::{ApiError, ApiJson, ApiPath, Problem};
use super::schemas::{Owner, RepoName};
use crate::auth::Caller;
use crate::notifications::SetNotification;
use crate::services::Services;

pub fn router() -> OpenApiRouter<Services> {
    OpenApiRouter::new()
        .routes(routes!(list_notifications))
        .routes(routes!(
            show_notification,
            set_notification,
            delete_notification
        ))
}

/// How the newest delivery to a target went.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    /// The delivery's id (the webhook's `X-Hobotnica-Delivery`).
    pub id: String,
    /// The job it told about.
    pub job: u64,
    /// `pending` (being sent, or waiting for a retry), `delivered` or
    /// `failed` (every attempt failed).
    pub state: DeliveryState,
    /// Attempts made so far (at most 5).
    pub attempts: u32,
    /// When the last attempt was made.
    pub at: DateTime<Utc>,
    /// The receiver's HTTP status at the last attempt, if it answered.
    pub response_status: Option<u16>,
    /// Why the last attempt failed.
    pub error: Option<String>,
}

impl From<DeliveryStatus> for DeliveryView {
    fn from(status: DeliveryStatus) -> DeliveryView {
        DeliveryView {
            id: status.delivery_id,
            job: status.job.0,
            state: status.state,
            attempts: status.attempts,
            at: status.at,
            response_status: status.response_status,
            error: status.error,
        }
    }
}

/// A notification target (its URL and secret are never shown).
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationView {
    pub id: String,
    pub kind: NotificationKind,
    pub events: NotificationEvents,
    /// The host of its URL.
    pub host: String,
    /// Whether deliveries are signed (a `webhook` target).
    pub signed: bool,
    pub created_at: DateTime<Utc>,
    /// The newest delivery; null before the first.
    pub last_delivery: Option<DeliveryView>,
}

impl From<NotificationTarget> for NotificationView {
    fn from(target: NotificationTarget) -> NotificationView {
        NotificationView {
            id: target.id,
            kind: target.kind,
            events: target.events,
            host: target.host,
            signed: target.secret_sealed.is_some(),
            created_at: target.created_at,
            last_delivery: target.last_delivery.map(DeliveryView::from),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationList {
    pub items: Vec<NotificationView>,
}

/// Add or replace a notification target.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"kind": "webhook", "url": "https://ci-events.example.com/hobotnica", "events": "failures", "secret": "a-long-random-signing-secret"}))]
pub struct SetNotificationRequest {
    /// `slack`: a Slack-compatible incoming webhook (a message). `webhook`:
    /// the job as JSON, signed (`X-Hobotnica-Signature-256`).
    pub kind: NotificationKind,
    /// Where to POST: `https://`, or `http://` to a loopback host only.
    /// Sealed at rest and never shown again.
    #[schema(max_length = 2048)]
    pub url: String,
    /// Which finished jobs: `deploys`, `failures` (failed, timed out or
    /// lost) or `all` (default).
    pub events: Option<NotificationEvents>,
    /// `webhook` only, and required there: the HMAC-SHA256 key of
    /// `X-Hobotnica-Signature-256` (16 to 256 bytes). Never shown again.
    #[schema(min_length = 16, max_length = 256)]
    pub secret: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/repos/{owner}/{name}/notifications", tag = "notifications",
    params(("owner" = Owner, Path), ("name" = RepoName, Path)),
    responses(
        (status = 200, body = NotificationList),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn list_notifications(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name)): ApiPath<(String, String)>,
) -> Result<Json<NotificationList>, ApiError> {
    let targets = services
        .notification_targets(&caller, &owner, &name)
        .await?;
    Ok(Json(NotificationList {
        items: targets.into_iter().map(NotificationView::from).collect(),
    }))
}

#[utoipa::path(get, path = "/api/v1/repos/{owner}/{name}/notifications/{id}", tag = "notifications",
    params(("owner" = Owner, Path), ("name" = RepoName, Path), ("id" = RepoName, Path, description = "The target's name")),
    responses(
        (status = 200, body = NotificationView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn show_notification(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name, id)): ApiPath<(String, String, String)>,
) -> Result<Json<NotificationView>, ApiError> {
    let target = services
        .notification_target(&caller, &owner, &name, &id)
        .await?;
    Ok(Json(target.into()))
}

#[utoipa::path(put, path = "/api/v1/repos/{owner}/{name}/notifications/{id}", tag = "notifications",
    params(("owner" = Owner, Path), ("name" = RepoName, Path), ("id" = RepoName, Path, description = "The target's name")),
    request_body = SetNotificationRequest,
    responses(
        (status = 200, body = NotificationView),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid name, URL or secret", body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn set_notification(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name, id)): ApiPath<(String, String, String)>,
    ApiJson(request): ApiJson<SetNotificationRequest>,
) -> Result<Json<NotificationView>, ApiError> {
    let set = SetNotification {
        id,
        kind: request.kind,
        url: request.url,
        events: request.events.unwrap_or(NotificationEvents::All),
        secret: request.secret,
    };
    let target = services
        .set_notification(&caller, &owner, &name, set)
        .await?;
    Ok(Json(target.into()))
}

#[utoipa::path(delete, path = "/api/v1/repos/{owner}/{name}/notifications/{id}", tag = "notifications",
    params(("owner" = Owner, Path), ("name" = RepoName, Path), ("id" = RepoName, Path, description = "The target's name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn delete_notification(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name, id)): ApiPath<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    services
        .remove_notification(&caller, &owner, &name, &id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
