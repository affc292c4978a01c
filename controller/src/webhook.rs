//! EDGE: GitHub webhooks at `POST /webhooks/github/{hook_id}`: find the
//! repository by its unguessable hook id, check `X-Hub-Signature-256`
//! (HMAC-SHA256 of the raw body, constant-time), parse the event into our
//! own enum, drop redeliveries (`X-GitHub-Delivery`), queue a `test` job.
//! The response never waits on git or GitHub.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hmac::{Hmac, KeyInit, Mac};
use hobotnica_common::ids::CommitSha;
use serde::Deserialize;
use sha2::Sha256;

use crate::http::problem::ApiError;
use crate::services::Services;

/// Largest webhook body accepted (GitHub caps payloads at 25 MB).
pub const MAX_WEBHOOK_BYTES: usize = 25 * 1024 * 1024;

pub fn router() -> Router<Services> {
    Router::new()
        .route("/webhooks/github/{hook_id}", post(receive))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BYTES))
}

/// What a delivery asks of us.
#[derive(Debug, PartialEq)]
pub enum WebhookEvent {
    Ping,
    /// Run `make test` at `commit`.
    Test {
        commit: CommitSha,
        branch: Option<String>,
        /// A pull request from another repository: no secrets.
        from_fork: bool,
    },
    Ignored(String),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(String);

#[derive(Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    reference: String,
    after: String,
    #[serde(default)]
    deleted: bool,
}

#[derive(Deserialize)]
struct PullRequestPayload {
    action: String,
    pull_request: PullRequest,
}

#[derive(Deserialize)]
struct PullRequest {
    head: PullRequestRef,
    base: PullRequestRef,
}

#[derive(Deserialize)]
struct PullRequestRef {
    sha: String,
    #[serde(rename = "ref")]
    reference: String,
    repo: Option<PullRequestRepo>,
}

#[derive(Deserialize)]
struct PullRequestRepo {
    full_name: String,
}

fn parse_commit(sha: &str) -> Result<CommitSha, ParseError> {
    sha.parse()
        .map_err(|_| ParseError(format!("{sha:?} is not a commit sha")))
}

/// Parses one delivery (`X-GitHub-Event` and the body).
pub fn parse_event(event: &str, body: &[u8]) -> Result<WebhookEvent, ParseError> {
    let malformed =
        |err: serde_json::Error| ParseError(format!("malformed {event} payload: {err}"));
    match event {
        "ping" => Ok(WebhookEvent::Ping),
        "push" => {
            let push: PushPayload = serde_json::from_slice(body).map_err(malformed)?;
            let Some(branch) = push.reference.strip_prefix("refs/heads/") else {
                return Ok(WebhookEvent::Ignored(format!(
                    "push to {} (only branches run)",
                    push.reference
                )));
            };
            if push.deleted || push.after.bytes().all(|b| b == b'0') {
                return Ok(WebhookEvent::Ignored(format!(
                    "branch {branch} was deleted"
                )));
            }
            if hobotnica_common::validate::branch("ref", branch).is_err() {
                return Ok(WebhookEvent::Ignored(format!(
                    "branch name {branch:?} is not supported"
                )));
            }
            Ok(WebhookEvent::Test {
                commit: parse_commit(&push.after)?,
                branch: Some(branch.to_owned()),
                from_fork: false,
            })
        }
        "pull_request" => {
            let pull: PullRequestPayload = serde_json::from_slice(body).map_err(malformed)?;
            if !matches!(pull.action.as_str(), "opened" | "synchronize" | "reopened") {
                return Ok(WebhookEvent::Ignored(format!(
                    "pull_request action {}",
                    pull.action
                )));
            }
            let head = pull.pull_request.head;
            let base_repo = pull.pull_request.base.repo.map(|repo| repo.full_name);
            let head_repo = head.repo.map(|repo| repo.full_name);
            let from_fork = head_repo.is_none() || head_repo != base_repo;
            let branch = hobotnica_common::validate::branch("ref", &head.reference)
                .ok()
                .map(|()| head.reference);
            let _ = pull.pull_request.base.sha;
            Ok(WebhookEvent::Test {
                commit: parse_commit(&head.sha)?,
                branch,
                from_fork,
            })
        }
        other => {
            // Still must be JSON: a malformed body is an error whatever the event.
            serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(malformed)?;
            Ok(WebhookEvent::Ignored(format!("event {other}")))
        }
    }
}

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body`.
pub fn signature_matches(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(hex_digest) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&expected).is_ok()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
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
    Path(hook_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            format!("cannot read the webhook body (at most {MAX_WEBHOOK_BYTES} bytes)"),
        )
    })?;
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "no webhook with this id");
    if hook_id.len() > 128 {
        return Err(not_found());
    }
    let repo = services
        .repo_by_hook(&hook_id)
        .await?
        .ok_or_else(not_found)?;
    if let Some(reason) = &repo.disabled {
        return Err(ApiError::new(
            StatusCode::GONE,
            format!("repository {} is disabled: {reason}", repo.full_name()),
        ));
    }
    let secret = services.webhook_secret(&repo).ok_or_else(|| {
        tracing::error!(repo = %repo.full_name(), "cannot open the stored webhook secret");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    })?;
    let signature = header(&headers, "x-hub-signature-256").ok_or_else(|| {
        ApiError::unauthorized("missing X-Hub-Signature-256: set the webhook's secret on GitHub")
    })?;
    if !signature_matches(&secret, &body, signature) {
        return Err(ApiError::unauthorized(
            "X-Hub-Signature-256 does not match the body: check the webhook's secret",
        ));
    }
    let event = header(&headers, "x-github-event")
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "missing X-GitHub-Event"))?;
    let delivery = header(&headers, "x-github-delivery")
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 100
                && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing or invalid X-GitHub-Delivery",
            )
        })?;
    let parsed = parse_event(event, &body)
        .map_err(|err| ApiError::new(StatusCode::BAD_REQUEST, err.to_string()))?;
    tracing::info!(webhook.delivery_id = delivery, webhook.event = event, repo = %repo.full_name(), "webhook received");
    match parsed {
        WebhookEvent::Ping => {
            Ok((StatusCode::OK, Json(serde_json::json!({"message": "pong"}))).into_response())
        }
        WebhookEvent::Ignored(reason) => Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "ignored": reason })),
        )
            .into_response()),
        WebhookEvent::Test {
            commit,
            branch,
            from_fork,
        } => {
            match services
                .queue_webhook_delivery(&repo, delivery, commit, branch, from_fork)
                .await?
            {
                Some(job) => Ok(crate::http::accepted(job)),
                None => Ok((
                    StatusCode::OK,
                    Json(serde_json::json!({ "duplicate_delivery": delivery })),
                )
                    .into_response()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn pushes_to_branches_run_tests() {
        let body = format!(
            r#"{{"ref":"refs/heads/main","before":"{SHA}","after":"{SHA}","deleted":false,"repository":{{"full_name":"o/r"}}}}"#
        );
        assert_eq!(
            parse_event("push", body.as_bytes()).unwrap(),
            WebhookEvent::Test {
                commit: SHA.parse().unwrap(),
                branch: Some("main".into()),
                from_fork: false
            }
        );
    }

    #[test]
    fn deletions_and_tags_are_ignored() {
        let zeros = "0".repeat(40);
        let deleted = format!(r#"{{"ref":"refs/heads/x","after":"{zeros}","deleted":true}}"#);
        assert!(matches!(
            parse_event("push", deleted.as_bytes()).unwrap(),
            WebhookEvent::Ignored(_)
        ));
        let tag = format!(r#"{{"ref":"refs/tags/v1","after":"{SHA}"}}"#);
        assert!(matches!(
            parse_event("push", tag.as_bytes()).unwrap(),
            WebhookEvent::Ignored(_)
        ));
    }

    #[test]
    fn pull_requests_from_forks_are_marked() {
        let body = |action: &str, head_repo: &str| {
            format!(
                r#"{{"action":"{action}","pull_request":{{"head":{{"sha":"{SHA}","ref":"feature","repo":{{"full_name":"{head_repo}"}}}},"base":{{"sha":"{SHA}","ref":"main","repo":{{"full_name":"o/r"}}}}}}}}"#
            )
        };
        assert_eq!(
            parse_event("pull_request", body("opened", "fork/r").as_bytes()).unwrap(),
            WebhookEvent::Test {
                commit: SHA.parse().unwrap(),
                branch: Some("feature".into()),
                from_fork: true
            }
        );
        assert!(matches!(
            parse_event("pull_request", body("synchronize", "o/r").as_bytes()).unwrap(),
            WebhookEvent::Test {
                from_fork: false,
                ..
            }
        ));
        assert!(matches!(
            parse_event("pull_request", body("closed", "o/r").as_bytes()).unwrap(),
            WebhookEvent::Ignored(_)
        ));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert!(parse_event("push", b"{not json").is_err());
        assert!(parse_event("issues", b"{not json").is_err());
        assert!(parse_event("push", br#"{"ref":"refs/heads/x","after":"nope"}"#).is_err());
    }

    #[test]
    fn signatures() {
        let secret = b"It's a Secret to Everybody";
        let body = b"Hello, World!";
        // GitHub's documented example.
        let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(signature_matches(secret, body, good));
        assert!(!signature_matches(secret, b"Hello, World?", good));
        assert!(!signature_matches(b"other", body, good));
        assert!(!signature_matches(secret, body, "sha1=abc"));
        assert!(!signature_matches(secret, body, "sha256=zz"));
    }
}
