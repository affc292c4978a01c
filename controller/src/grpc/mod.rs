//! EDGE: the gRPC services — `AgentService` for agents, `LogService` for
//! operators — with authentication from metadata and the one mapping of
//! store errors to `tonic::Status`.

mod agent;
mod logs;

pub use agent::AgentGrpc;
pub use logs::LogGrpc;

use hobotnica_common::token::{constant_time_eq, hash_token};
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::services::Services;
use crate::store::StoreError;

/// The bearer token in `authorization` metadata.
fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    metadata
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty())
        .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token> metadata"))
}

/// Checks the admin token (operators tailing logs).
fn require_admin(services: &Services, metadata: &MetadataMap) -> Result<(), Status> {
    let token = bearer(metadata)?;
    if constant_time_eq(
        hash_token(token).as_bytes(),
        services.admin_token_hash.as_bytes(),
    ) {
        Ok(())
    } else {
        Err(Status::unauthenticated("the token is not valid"))
    }
}

/// The one mapping from store errors to gRPC statuses.
fn status(err: StoreError) -> Status {
    match err {
        StoreError::NotFound(what) => Status::not_found(format!("{what} not found")),
        StoreError::Conflict(detail) => Status::failed_precondition(detail),
        StoreError::LeaseLost { .. } => Status::failed_precondition(err.to_string()),
        StoreError::LogGap { .. } => Status::out_of_range(err.to_string()),
        StoreError::AgentNameTaken { name } => Status::permission_denied(format!(
            "agent name {name:?} is registered with another agent token: start this agent under another name (--name), or revoke the token that registered it (which frees the name) and register again"
        )),
        StoreError::Unavailable(cause) => {
            tracing::error!(error = %cause, "store unavailable");
            Status::unavailable("the store is unavailable; retry later")
        }
    }
}
