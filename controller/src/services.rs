//! The controller's shared state, handed to every edge: the store and the
//! configuration.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::config::ControllerConfig;
use crate::store::Store;

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
