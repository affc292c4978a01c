//! The controller's shared state, handed to every edge: the store and the
//! configuration.

use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use hobotnica_common::secrets::SecretKey;

use crate::config::ControllerConfig;
use crate::github::GitHub;
use crate::statuses::StatusSender;
use crate::store::Store;

#[derive(Clone)]
pub struct Services {
    pub store: Arc<dyn Store>,
    pub config: Arc<ControllerConfig>,
    /// Hash of the admin token.
    pub admin_token_hash: Arc<str>,
    /// Hash of the pool agent token, if one is configured.
    pub agent_pool_token_hash: Option<Arc<str>>,
    /// Seals and opens secrets at rest.
    pub secret_key: SecretKey,
    pub github: GitHub,
    /// Verified GitHub credentials, briefly.
    pub credentials: Arc<crate::auth::CredentialCache>,
    /// Recent failed authentications, per client address and per token.
    pub failures: Arc<crate::auth::FailedAttempts>,
    /// Commit statuses on their way to GitHub.
    pub statuses: StatusSender,
    /// Where users reach the REST API (known once the listener is bound).
    pub public_url: Arc<OnceLock<String>>,
    /// This controller's idle dispatch sessions, woken one per job.
    pub idle_sessions: Arc<crate::wakeups::IdleSessions>,
    /// The store events agents' sessions and log streams act on, relayed
    /// by `wakeups::wake_idle_sessions`.
    pub session_events: tokio::sync::broadcast::Sender<crate::store::StoreEvent>,
    /// Wakes this controller's notification sender: deliveries were queued.
    pub notifications_due: Arc<tokio::sync::Notify>,
    /// This controller's metrics (`/metrics` on `--metrics-listen`).
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Services {
    /// The REST API's base URL, for links.
    pub fn public_url(&self) -> &str {
        self.public_url.get().map_or("", String::as_str)
    }

    /// Whether the store answers (readiness).
    pub async fn ready(&self) -> Result<(), crate::error::CoreError> {
        Ok(self.store.ping().await?)
    }

    /// When a lease taken or renewed now ends.
    pub fn lease_until(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now + self.config.lease_timeout
    }

    /// When the leases of running jobs end that are given again after
    /// their agents could not reach the store (an outage, a restart).
    pub fn lease_after_outage(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        lease_after_outage(now, self.config.lease_timeout)
    }
}

/// How much longer than a lease a running job is given after an outage:
/// more than an agent's longest wait between two attempts to reach a
/// controller (5 s), so that its next renewal arrives in time however
/// short the lease.
pub const OUTAGE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A lease from `now` after an outage: the lease plus [`OUTAGE_GRACE`].
pub fn lease_after_outage(now: DateTime<Utc>, lease_timeout: std::time::Duration) -> DateTime<Utc> {
    now + lease_timeout + OUTAGE_GRACE
}
