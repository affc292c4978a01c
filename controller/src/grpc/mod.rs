//! EDGE: the gRPC services — `AgentService` for agents, `LogService` for
//! operators — with authentication from metadata and the one mapping of
//! core errors to `tonic::Status`.

mod agent;
mod logs;

pub use agent::AgentGrpc;
pub use logs::LogGrpc;

use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::agents::AgentError;
use crate::auth::Caller;
use crate::error::CoreError;
use crate::services::Services;

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

/// The operator calling (the admin token: operators tailing logs).
fn operator<T>(services: &Services, request: &tonic::Request<T>) -> Result<Caller, Status> {
    services
        .authenticate_admin(
            bearer(request.metadata())?,
            request.remote_addr().map(|addr| addr.ip()),
        )
        .map_err(core_status)
}

/// The one mapping from the agent protocol's errors to gRPC statuses (see
/// the status codes in `agent.proto`).
fn status(err: AgentError) -> Status {
    match err {
        AgentError::Unauthenticated(detail) => Status::unauthenticated(detail),
        AgentError::UnknownAgent(_) | AgentError::NotFound(_) => Status::not_found(err.to_string()),
        AgentError::Invalid(detail) => Status::invalid_argument(detail),
        AgentError::UnsupportedProtocol { .. } => Status::failed_precondition(err.to_string()),
        AgentError::NotHeld(detail) => Status::failed_precondition(detail),
        AgentError::NameTaken { .. } | AgentError::LabelNotAllowed { .. } => {
            Status::permission_denied(err.to_string())
        }
        AgentError::LogIncomplete { .. } => Status::aborted(err.to_string()),
        AgentError::OutOfRange(detail) => Status::out_of_range(detail),
        AgentError::Unavailable(cause) => unavailable(&cause),
    }
}

/// The one mapping from core errors (operators' calls: `LogService`) to gRPC
/// statuses.
fn core_status(err: CoreError) -> Status {
    match err {
        CoreError::NotFound(_) => Status::not_found(err.to_string()),
        CoreError::Conflict(detail) => Status::failed_precondition(detail),
        CoreError::Unauthorized(detail) => Status::unauthenticated(detail),
        CoreError::Forbidden(detail) => Status::permission_denied(detail),
        CoreError::Gone(detail) => Status::failed_precondition(detail),
        CoreError::RateLimited(detail) => Status::resource_exhausted(detail),
        CoreError::TooManyFailures { retry_after } => {
            let mut status = Status::resource_exhausted(err.to_string());
            status
                .metadata_mut()
                .insert("retry-after", retry_after.as_secs().max(1).into());
            status
        }
        CoreError::Invalid(invalid) => Status::invalid_argument(invalid.to_string()),
        CoreError::Upstream(detail) => Status::unavailable(detail),
        CoreError::Unavailable(cause) => unavailable(&cause),
    }
}

/// A 5xx-like status never carries the cause; it is logged once, here.
fn unavailable(cause: &str) -> Status {
    tracing::error!(error = %cause, "store unavailable");
    Status::unavailable("the store is unavailable; retry later")
}
