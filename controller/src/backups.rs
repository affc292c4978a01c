//! CORE: a snapshot of the whole store for a caller (the download behind
//! `GET /api/v1/admin/export` and `hobot admin export` without store
//! options). The file itself is `store::snapshot`'s.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::auth::Caller;
use crate::error::CoreError;
use crate::services::Services;
use crate::store::snapshot;

impl Services {
    /// The snapshot file's bytes, as they are written (admin only).
    pub fn export_snapshot(
        &self,
        caller: &Caller,
    ) -> Result<mpsc::Receiver<Result<Bytes, std::io::Error>>, CoreError> {
        caller.require_admin("exporting the store")?;
        let source = if self.config.redis_url.is_some() {
            "redis"
        } else {
            "embedded"
        };
        Ok(snapshot::export_stream(Arc::clone(&self.store), source))
    }
}
