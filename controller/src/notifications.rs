//! CORE: notifications when jobs finish. A repository's targets (a
//! Slack-compatible incoming webhook, or a JSON webhook signed with
//! HMAC-SHA256) are kept sealed with the repository; when a job ends, the
//! controller that ended it queues a delivery per matching target in the
//! store, and one task per controller claims due deliveries and sends them
//! with a timeout, retrying with backoff. A receiver never slows a job: the
//! completion path only writes the queue.
//!
//! Architecture invariant: a notification URL or signing secret is never
//! shown (API, page, log line or error); a target shows its host only.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use hobotnica_common::job::{Job, JobState, Repo};
use hobotnica_common::notifications::{
    DeliveryState, DeliveryStatus, NotificationEvents, NotificationKind, NotificationTarget,
};
use hobotnica_common::token::random_hex;
use hobotnica_common::transport::is_loopback_host;
use hobotnica_common::validate;
use serde_json::json;
use sha2::Sha256;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::{Access, Caller};
use crate::error::CoreError;
use crate::services::Services;
use crate::store::NotificationDelivery;

/// Most notification targets a repository may have.
pub const MAX_TARGETS: usize = 20;
/// Longest notification URL accepted.
pub const MAX_URL_LEN: usize = 2048;
/// Longest signing secret accepted (and shortest: a guessable secret signs
/// nothing).
pub const MAX_SECRET_LEN: usize = 256;
pub const MIN_SECRET_LEN: usize = 16;
/// How long one attempt may take, answer included.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per delivery before it is given up.
pub const MAX_ATTEMPTS: u32 = 5;
/// The wait before the second attempt; doubled before each next one
/// (1, 2, 4, 8 s).
pub const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
/// How long a claimed delivery is another controller's to leave alone: a
/// controller that dies while sending leaves it to others after this.
const CLAIM_LEASE: Duration = Duration::from_secs(60);
/// How often the sender looks for due deliveries when nothing woke it
/// (retries coming due, deliveries other controllers queued).
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Deliveries sent at once by one controller (a receiver that hangs holds
/// one of them until the timeout).
const MAX_IN_FLIGHT: usize = 16;
/// The `X-Hobotnica-Event` of a finished job.
pub const EVENT_JOB_FINISHED: &str = "job.finished";

/// A target to add or replace.
#[derive(Debug, Clone)]
pub struct SetNotification {
    pub id: String,
    pub kind: NotificationKind,
    pub url: String,
    pub events: NotificationEvents,
    /// The signing secret (`webhook` only).
    pub secret: Option<String>,
}

/// The host of a notification URL, when the URL may be used: `https://`,
/// or `http://` to a loopback host (a receiver on the controller's own
/// machine, e.g. a local relay).
fn checked_host(url: &str) -> Result<String, CoreError> {
    if url.len() > MAX_URL_LEN {
        return Err(CoreError::invalid(
            "url",
            format!("at most {MAX_URL_LEN} bytes"),
        ));
    }
    let parsed = reqwest::Url::parse(url).map_err(|_| CoreError::invalid("url", "not a URL"))?;
    let host = parsed
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| CoreError::invalid("url", "has no host"))?
        .to_owned();
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(CoreError::invalid(
            "url",
            "must not carry credentials before the host",
        ));
    }
    match parsed.scheme() {
        "https" => Ok(host),
        "http" if is_loopback_host(&host) => Ok(host),
        "http" => Err(CoreError::invalid(
            "url",
            "http:// only to a loopback host; use https://",
        )),
        _ => Err(CoreError::invalid("url", "must start with https://")),
    }
}

/// The sealing contexts of a target's URL and secret: bound to the
/// repository and the target.
pub(crate) fn url_context(full_name: &str, id: &str) -> String {
    format!("notification-url:{full_name}:{id}")
}
pub(crate) fn secret_context(full_name: &str, id: &str) -> String {
    format!("notification-secret:{full_name}:{id}")
}

impl Services {
    /// The notification targets of `owner/name` (read access; URLs and
    /// secrets stay sealed and the edges never show them).
    pub async fn notification_targets(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
    ) -> Result<Vec<NotificationTarget>, CoreError> {
        Ok(self
            .repo_for(caller, owner, name, Access::Read)
            .await?
            .notifications)
    }

    /// One notification target of `owner/name` (read access).
    pub async fn notification_target(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
        id: &str,
    ) -> Result<NotificationTarget, CoreError> {
        self.notification_targets(caller, owner, name)
            .await?
            .into_iter()
            .find(|target| target.id == id)
            .ok_or_else(|| CoreError::NotFound(format!("notification target {id}")))
    }

    /// Adds or replaces a notification target of `owner/name` for `caller`
    /// (push access, as for variables).
    pub async fn set_notification(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
        set: SetNotification,
    ) -> Result<NotificationTarget, CoreError> {
        let repo = self.repo_for(caller, owner, name, Access::Push).await?;
        validate::repo_component("id", &set.id)?;
        let host = checked_host(&set.url)?;
        let secret = match (set.kind, set.secret) {
            (NotificationKind::Webhook, Some(secret)) => {
                if secret.len() < MIN_SECRET_LEN || secret.len() > MAX_SECRET_LEN {
                    return Err(CoreError::invalid(
                        "secret",
                        format!("{MIN_SECRET_LEN} to {MAX_SECRET_LEN} bytes"),
                    ));
                }
                Some(secret)
            }
            (NotificationKind::Webhook, None) => {
                return Err(CoreError::invalid(
                    "secret",
                    "a webhook target needs a signing secret",
                ));
            }
            (NotificationKind::Slack, Some(_)) => {
                return Err(CoreError::invalid(
                    "secret",
                    "only a webhook target is signed",
                ));
            }
            (NotificationKind::Slack, None) => None,
        };
        let full_name = repo.full_name();
        let target = NotificationTarget {
            id: set.id.clone(),
            kind: set.kind,
            events: set.events,
            url_sealed: self
                .secret_key
                .seal(set.url.as_bytes(), &url_context(&full_name, &set.id)),
            host,
            secret_sealed: secret.map(|secret| {
                self.secret_key
                    .seal(secret.as_bytes(), &secret_context(&full_name, &set.id))
            }),
            created_at: Utc::now(),
            last_delivery: None,
        };
        self.change_repo(&repo.owner, &repo.name, |updated| {
            updated.notifications.retain(|other| other.id != target.id);
            if updated.notifications.len() >= MAX_TARGETS {
                return Err(CoreError::invalid(
                    "id",
                    format!("a repository has at most {MAX_TARGETS} notification targets"),
                ));
            }
            updated.notifications.push(target.clone());
            updated.notifications.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(())
        })
        .await?;
        tracing::info!(repo = %full_name, target = %target.id, kind = ?target.kind, host = %target.host, "notification target set");
        Ok(target)
    }

    /// Removes a notification target of `owner/name` (push access); its
    /// pending deliveries are dropped when they come due.
    pub async fn remove_notification(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
        id: &str,
    ) -> Result<(), CoreError> {
        let repo = self.repo_for(caller, owner, name, Access::Push).await?;
        self.change_repo(&repo.owner, &repo.name, |updated| {
            let before = updated.notifications.len();
            updated.notifications.retain(|target| target.id != id);
            if updated.notifications.len() == before {
                return Err(CoreError::NotFound(format!("notification target {id}")));
            }
            Ok(())
        })
        .await?;
        tracing::info!(repo = %repo.full_name(), target = %id, "notification target removed");
        Ok(())
    }

    /// A job ended (called once, by the controller that ended it): queues a
    /// delivery per matching target of its repository, durably, and wakes
    /// the sender. A store failure is logged; the job is not its problem.
    pub(crate) async fn queue_notifications(&self, job: &Job) {
        if !job.state.is_terminal() {
            return;
        }
        let repo = match self.store.get_repo(&job.repo.owner, &job.repo.name).await {
            Ok(Some(repo)) => repo,
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(job_id = job.id.0, error = %err, "notifications skipped: store unavailable");
                return;
            }
        };
        let now = Utc::now();
        let deliveries: Vec<NotificationDelivery> = repo
            .notifications
            .iter()
            .filter(|target| target.events.matches(job))
            .map(|target| NotificationDelivery {
                id: random_hex(16),
                repo: repo.reference(),
                target: target.id.clone(),
                job: job.clone(),
                attempt: 0,
                due_at: now,
                created_at: now,
            })
            .collect();
        if deliveries.is_empty() {
            return;
        }
        let count = deliveries.len();
        match self.store.queue_notifications(deliveries).await {
            Ok(()) => {
                tracing::debug!(job_id = job.id.0, count, "notifications queued");
                self.notifications_due.notify_one();
            }
            Err(err) => {
                tracing::warn!(job_id = job.id.0, error = %err, "notifications dropped: store unavailable");
            }
        }
    }
}

/// What one attempt came to.
enum Attempt {
    Delivered {
        status: u16,
    },
    Failed {
        status: Option<u16>,
        error: String,
    },
    /// The target was removed (or cannot be opened): nothing to send.
    Dropped,
}

/// Sends due notifications until `shutdown`: claims them from the store
/// (each claimed by one controller), at most [`MAX_IN_FLIGHT`] at once.
pub async fn send_notifications(services: Services, shutdown: CancellationToken) {
    let client = match reqwest::Client::builder()
        .timeout(SEND_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("Hobotnica/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(err) => {
            tracing::error!(error = %err, "cannot make the notifications' HTTP client: no notification will be sent");
            return;
        }
    };
    let mut in_flight = JoinSet::new();
    loop {
        // Claim while there is room and something is due.
        while in_flight.len() < MAX_IN_FLIGHT && !shutdown.is_cancelled() {
            let now = Utc::now();
            match services
                .store
                .claim_notification(now, now + CLAIM_LEASE)
                .await
            {
                Ok(Some(delivery)) => {
                    let services = services.clone();
                    let client = client.clone();
                    in_flight.spawn(async move { deliver(&services, &client, delivery).await });
                }
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot claim notifications: store unavailable");
                    break;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                // An attempt cut short is claimed again after its lease.
                in_flight.abort_all();
                return;
            }
            () = services.notifications_due.notified() => {}
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            () = tokio::time::sleep(POLL_INTERVAL) => {}
        }
    }
}

/// The wait before attempt `attempt + 1`.
fn retry_delay(attempt: u32) -> Duration {
    FIRST_RETRY_DELAY * 2u32.saturating_pow(attempt.saturating_sub(1).min(16))
}

/// One attempt of one delivery, and what follows it in the store.
async fn deliver(services: &Services, client: &reqwest::Client, delivery: NotificationDelivery) {
    let repo = match services
        .store
        .get_repo(&delivery.repo.owner, &delivery.repo.name)
        .await
    {
        Ok(repo) => repo,
        Err(err) => {
            // Claimed again after its lease.
            tracing::warn!(delivery = %delivery.id, error = %err, "notification waits: store unavailable");
            return;
        }
    };
    let target = repo.as_ref().and_then(|repo| {
        repo.notifications
            .iter()
            .find(|target| target.id == delivery.target)
    });
    let (kind, attempt) = match (repo.as_ref(), target) {
        (Some(repo), Some(target)) => (
            match target.kind {
                NotificationKind::Slack => "slack",
                NotificationKind::Webhook => "webhook",
            },
            send(services, client, repo, target, &delivery).await,
        ),
        _ => ("", Attempt::Dropped),
    };
    let now = Utc::now();
    let (state, status, error) = match attempt {
        Attempt::Dropped => {
            finish(services, &delivery).await;
            return;
        }
        Attempt::Delivered { status } => {
            tracing::info!(delivery = %delivery.id, job_id = delivery.job.id.0, target = %delivery.target, attempt = delivery.attempt, status, "notification delivered");
            finish(services, &delivery).await;
            services.metrics.notification_attempt(kind, "delivered");
            (DeliveryState::Delivered, Some(status), None)
        }
        Attempt::Failed { status, error } if delivery.attempt >= MAX_ATTEMPTS => {
            tracing::warn!(delivery = %delivery.id, job_id = delivery.job.id.0, target = %delivery.target, attempt = delivery.attempt, error = %error, "notification given up");
            finish(services, &delivery).await;
            services.metrics.notification_attempt(kind, "failed");
            (DeliveryState::Failed, status, Some(error))
        }
        Attempt::Failed { status, error } => {
            services.metrics.notification_attempt(kind, "retried");
            let delay = retry_delay(delivery.attempt);
            tracing::info!(delivery = %delivery.id, job_id = delivery.job.id.0, target = %delivery.target, attempt = delivery.attempt, error = %error, retry_in_ms = delay.as_millis(), "notification failed; retrying");
            let due = now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero());
            if let Err(err) = services
                .store
                .retry_notification(&delivery.id, delivery.attempt, due)
                .await
            {
                tracing::warn!(delivery = %delivery.id, error = %err, "cannot reschedule a notification; it is claimed again after its lease");
            }
            (DeliveryState::Pending, status, Some(error))
        }
    };
    let status = DeliveryStatus {
        delivery_id: delivery.id.clone(),
        job: delivery.job.id,
        state,
        attempts: delivery.attempt,
        at: now,
        response_status: status,
        error,
    };
    record_status(services, &delivery, status).await;
}

async fn finish(services: &Services, delivery: &NotificationDelivery) {
    if let Err(err) = services
        .store
        .finish_notification(&delivery.id, delivery.attempt)
        .await
    {
        tracing::warn!(delivery = %delivery.id, error = %err, "cannot forget a sent notification; it may be sent again");
    }
}

/// Records on the target how its newest delivery went (an older job's
/// delivery does not replace a newer one's).
async fn record_status(
    services: &Services,
    delivery: &NotificationDelivery,
    status: DeliveryStatus,
) {
    let result = services
        .change_repo(&delivery.repo.owner, &delivery.repo.name, |repo| {
            if let Some(target) = repo
                .notifications
                .iter_mut()
                .find(|target| target.id == delivery.target)
                && target.last_delivery.as_ref().is_none_or(|last| {
                    last.delivery_id == status.delivery_id || last.job <= status.job
                })
            {
                target.last_delivery = Some(status.clone());
            }
            Ok(())
        })
        .await;
    if let Err(err) = result {
        tracing::debug!(delivery = %delivery.id, error = %err, "delivery status not recorded");
    }
}

/// The job's page on the dashboard.
fn job_url(services: &Services, job: &Job) -> String {
    format!("{}/jobs/{}", services.public_url(), job.id)
}

/// How long the job took: from its start (or its creation, if it never
/// started) to its end.
fn duration_of(job: &Job) -> Option<chrono::Duration> {
    let finished: DateTime<Utc> = job.finished_at?;
    Some(finished - job.started_at.unwrap_or(job.created_at))
}

fn human_duration(duration: chrono::Duration) -> String {
    let secs = duration.num_seconds().max(0);
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min {} s", secs / 60, secs % 60),
        _ => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
    }
}

/// The Slack message of a finished job: one line of text (Slack's
/// `<url|label>` link form), the same in a section block.
pub fn slack_payload(job: &Job, job_url: &str) -> serde_json::Value {
    let short = job.commit.as_str().get(..7).unwrap_or(job.commit.as_str());
    let branch = job
        .branch
        .as_deref()
        .map(|branch| format!(" ({branch})"))
        .unwrap_or_default();
    let who = job.requested_by.as_deref().unwrap_or("unknown");
    let duration = duration_of(job).map_or_else(String::new, |duration| {
        format!(" in {}", human_duration(duration))
    });
    let outcome = match job.state {
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "was cancelled",
        JobState::TimedOut => "timed out",
        JobState::Lost => "was lost (its agent went away)",
        JobState::Queued | JobState::Running => "is unfinished",
    };
    let text = format!(
        "{repo}: make {target} {outcome}{duration} at {short}{branch}, asked by {who}. <{job_url}|Job {id}>",
        repo = job.repo,
        target = job.target,
        id = job.id,
    );
    json!({
        "text": text,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
    })
}

/// The generic webhook's body: the job's facts (never its variables).
pub fn webhook_payload(delivery_id: &str, job: &Job, job_url: &str) -> serde_json::Value {
    json!({
        "event": EVENT_JOB_FINISHED,
        "delivery": delivery_id,
        "job": {
            "id": job.id,
            "url": job_url,
            "repository": job.repo.to_string(),
            "kind": job.kind,
            "target": job.target,
            "commit": job.commit,
            "branch": job.branch,
            "state": job.state,
            "exit_code": job.exit_code,
            "message": job.message,
            "requested_by": job.requested_by,
            "trigger": job.trigger,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "duration_ms": duration_of(job).map(|duration| duration.num_milliseconds()),
        },
    })
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `secret`, as GitHub's
/// `X-Hub-Signature-256`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// One attempt: the request, and what the answer (or its absence) means.
async fn send(
    services: &Services,
    client: &reqwest::Client,
    repo: &Repo,
    target: &NotificationTarget,
    delivery: &NotificationDelivery,
) -> Attempt {
    let full_name = repo.full_name();
    let Ok(url) = services
        .secret_key
        .open(&target.url_sealed, &url_context(&full_name, &target.id))
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    else {
        tracing::error!(repo = %full_name, target = %target.id, "cannot open a notification URL (wrong --secret-key-file?)");
        return Attempt::Dropped;
    };
    let link = job_url(services, &delivery.job);
    let mut request = client
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    let body = match target.kind {
        NotificationKind::Slack => slack_payload(&delivery.job, &link).to_string(),
        NotificationKind::Webhook => {
            let Some(secret) = target.secret_sealed.as_ref().and_then(|sealed| {
                services
                    .secret_key
                    .open(sealed, &secret_context(&full_name, &target.id))
                    .ok()
            }) else {
                tracing::error!(repo = %full_name, target = %target.id, "cannot open a notification's signing secret");
                return Attempt::Dropped;
            };
            let body = webhook_payload(&delivery.id, &delivery.job, &link).to_string();
            request = request
                .header("X-Hobotnica-Event", EVENT_JOB_FINISHED)
                .header("X-Hobotnica-Delivery", &delivery.id)
                .header(
                    "X-Hobotnica-Signature-256",
                    signature(&secret, body.as_bytes()),
                );
            body
        }
    };
    match request.body(body).send().await {
        Ok(answer) if answer.status().is_success() => Attempt::Delivered {
            status: answer.status().as_u16(),
        },
        Ok(answer) => Attempt::Failed {
            status: Some(answer.status().as_u16()),
            error: format!("the receiver answered {}", answer.status().as_u16()),
        },
        // reqwest's error text names the URL: only its kind is kept.
        Err(err) => Attempt::Failed {
            status: None,
            error: if err.is_timeout() {
                format!("no answer within {} s", SEND_TIMEOUT.as_secs())
            } else if err.is_connect() {
                "cannot connect to the receiver".to_owned()
            } else {
                "the request failed".to_owned()
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_or_loopback_http() {
        assert_eq!(
            checked_host("https://hooks.example.com/services/T/B/X").unwrap(),
            "hooks.example.com"
        );
        assert_eq!(checked_host("http://127.0.0.1:9/x").unwrap(), "127.0.0.1");
        assert_eq!(checked_host("http://localhost/x").unwrap(), "localhost");
        for refused in [
            "http://hooks.example.com/x",
            "ftp://example.com/",
            "https://user:pw@example.com/",
            "not a url",
            "https://",
        ] {
            assert!(checked_host(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn signature_is_githubs() {
        // The example in GitHub's "Validating webhook deliveries".
        assert_eq!(
            signature(b"It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn retries_back_off() {
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(2), Duration::from_secs(2));
        assert_eq!(retry_delay(4), Duration::from_secs(8));
    }
}
