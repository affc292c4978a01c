//! The controller's shared state, handed to every edge: the store and the
//! configuration.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::config::ControllerConfig;
use crate::store::Store;

/// An agent heard from within this time counts as connected (sessions
/// refresh it every heartbeat).
pub const AGENT_CONNECTED_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone)]
pub struct Services {
    pub store: Arc<dyn Store>,
    pub config: Arc<ControllerConfig>,
    /// Hash of the admin token.
    pub admin_token_hash: Arc<str>,
    /// Hash of the pool agent token, if one is configured.
    pub agent_pool_token_hash: Option<Arc<str>>,
}

impl Services {
    /// When a lease taken or renewed now ends.
    pub fn lease_until(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now + self.config.lease_timeout
    }
}

/// Whether an agent last seen at `last_seen` counts as connected at `now`.
pub fn agent_connected(last_seen: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    (now - last_seen)
        .to_std()
        .is_ok_and(|age| age < AGENT_CONNECTED_WITHIN)
        || last_seen >= now
}
