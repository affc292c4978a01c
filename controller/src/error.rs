//! Errors of the controller's core, which each edge (REST, gRPC) maps to its
//! wire form in exactly one place.

use hobotnica_common::validate::ValidationError;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Credentials missing or wrong.
    #[error("{0}")]
    Unauthorized(String),
    /// Known caller, not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// The repository's access was revoked; it is disabled.
    #[error("{0}")]
    Gone(String),
    /// An upstream's rate limit (GitHub): retry later.
    #[error("{0}")]
    RateLimited(String),
    /// Too many failed authentications from this client or with this
    /// token: refused without looking, until `retry_after` has passed.
    #[error(
        "too many failed authentications from this address or with this token; retry in {} s",
        retry_after.as_secs().max(1)
    )]
    TooManyFailures { retry_after: std::time::Duration },
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A repository or other upstream could not be asked (git, GitHub).
    #[error("{0}")]
    Upstream(String),
    /// The store cannot be reached or failed; the request may be retried.
    /// The cause is for the log, never for the caller.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Store errors in the core's terms: a missing record, a conflict (a lease
/// or log race included), or an unavailable store.
impl From<StoreError> for CoreError {
    fn from(err: StoreError) -> CoreError {
        match err {
            StoreError::NotFound(what) => CoreError::NotFound(what),
            StoreError::Conflict(detail) => CoreError::Conflict(detail),
            StoreError::LeaseLost { .. }
            | StoreError::LogGap { .. }
            | StoreError::AgentNameTaken { .. } => CoreError::Conflict(err.to_string()),
            StoreError::Unavailable(cause) => CoreError::Unavailable(cause),
        }
    }
}

impl CoreError {
    pub fn invalid(field: &str, reason: impl Into<String>) -> CoreError {
        CoreError::Invalid(ValidationError::new(field, reason))
    }
}
