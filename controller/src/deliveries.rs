//! CORE: GitHub webhook deliveries — find the repository by its
//! unguessable hook id, check `X-Hub-Signature-256` (HMAC-SHA256 of the raw
//! body, constant-time), parse the event into our own enum, drop
//! redeliveries (`X-GitHub-Delivery`, remembered once) and queue a `test`
//! job. Nothing here waits on git or GitHub.

use hmac::{Hmac, KeyInit, Mac};
use hobotnica_common::ids::CommitSha;
use hobotnica_common::job::{Job, Repo};
use serde::Deserialize;
use sha2::Sha256;

use crate::error::CoreError;
use crate::services::Services;

/// Longest hook id looked up (ours are 32 hex characters).
const MAX_HOOK_ID_LEN: usize = 128;
/// Longest `X-GitHub-Delivery` accepted (GitHub's are GUIDs).
const MAX_DELIVERY_ID_LEN: usize = 100;

/// One delivery as it arrived: its headers and its raw body.
pub struct Delivery<'a> {
    /// `X-Hub-Signature-256`.
    pub signature: Option<&'a str>,
    /// `X-GitHub-Event`.
    pub event: Option<&'a str>,
    /// `X-GitHub-Delivery`.
    pub delivery_id: Option<&'a str>,
    pub body: &'a [u8],
}

/// What came of a delivery.
#[derive(Debug)]
pub enum Received {
    /// GitHub's `ping`.
    Pong,
    /// An event that runs nothing, and why.
    Ignored(String),
    /// A `test` job was queued.
    Queued(Box<Job>),
    /// This delivery id was seen before: nothing new was queued.
    Duplicate(String),
}

/// Why a delivery was refused; the webhook edge maps each to its answer.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("no webhook with this id")]
    UnknownHook,
    #[error("repository {repo} is disabled: {reason}")]
    Disabled { repo: String, reason: String },
    /// The signature is missing or does not match.
    #[error("{0}")]
    BadSignature(&'static str),
    /// A header is missing or the body does not parse.
    #[error("{0}")]
    Malformed(String),
    /// The stored webhook secret cannot be opened (a wrong secret key).
    #[error("cannot open the stored webhook secret")]
    SecretUnreadable,
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl Services {
    /// The repository a delivery to `hook_id` is for, found before its body
    /// is read: a delivery to an unknown hook, or for a disabled repository,
    /// is answered without reading it.
    pub async fn delivery_target(&self, hook_id: &str) -> Result<Repo, DeliveryError> {
        if hook_id.len() > MAX_HOOK_ID_LEN {
            return Err(DeliveryError::UnknownHook);
        }
        let repo = self
            .store
            .find_repo_by_hook(hook_id)
            .await
            .map_err(CoreError::from)?
            .ok_or(DeliveryError::UnknownHook)?;
        if let Some(reason) = &repo.disabled {
            return Err(DeliveryError::Disabled {
                repo: repo.full_name(),
                reason: reason.clone(),
            });
        }
        Ok(repo)
    }

    /// Handles one delivery to `repo` (from [`Services::delivery_target`]):
    /// whether GitHub signed it, what it asks, and the job it queues (once
    /// per delivery id).
    pub async fn receive_delivery(
        &self,
        repo: &Repo,
        delivery: Delivery<'_>,
    ) -> Result<Received, DeliveryError> {
        let secret = self.webhook_secret(repo).ok_or_else(|| {
            tracing::error!(repo = %repo.full_name(), "cannot open the stored webhook secret");
            DeliveryError::SecretUnreadable
        })?;
        let signature = delivery.signature.ok_or(DeliveryError::BadSignature(
            "missing X-Hub-Signature-256: set the webhook's secret on GitHub",
        ))?;
        if !signature_matches(&secret, delivery.body, signature) {
            return Err(DeliveryError::BadSignature(
                "X-Hub-Signature-256 does not match the body: check the webhook's secret",
            ));
        }
        let event = delivery
            .event
            .ok_or_else(|| DeliveryError::Malformed("missing X-GitHub-Event".to_owned()))?;
        let delivery_id = delivery
            .delivery_id
            .filter(|id| {
                !id.is_empty()
                    && id.len() <= MAX_DELIVERY_ID_LEN
                    && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
            .ok_or_else(|| {
                DeliveryError::Malformed("missing or invalid X-GitHub-Delivery".to_owned())
            })?;
        let parsed = parse_event(event, delivery.body)
            .map_err(|err| DeliveryError::Malformed(err.to_string()))?;
        tracing::info!(delivery_id, event, repo = %repo.full_name(), "webhook received");
        Ok(match parsed {
            WebhookEvent::Ping => Received::Pong,
            WebhookEvent::Ignored(reason) => Received::Ignored(reason),
            WebhookEvent::Test {
                commit,
                branch,
                from_fork,
            } => match self
                .queue_webhook_delivery(repo, delivery_id, commit, branch, from_fork)
                .await?
            {
                Some(job) => Received::Queued(Box::new(job)),
                None => Received::Duplicate(delivery_id.to_owned()),
            },
        })
    }
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
