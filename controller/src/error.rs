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
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A repository or other upstream could not be asked (git, GitHub).
    #[error("{0}")]
    Upstream(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CoreError {
    pub fn invalid(field: &str, reason: impl Into<String>) -> CoreError {
        CoreError::Invalid(ValidationError::new(field, reason))
    }
}
