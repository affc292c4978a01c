//! EDGE: who is calling, from `Authorization: Bearer <token>` and
//! `X-GitHub-Username`: the admin token (`Caller::Admin`) or a GitHub user's
//! token (`Caller::GitHub`); `crate::auth` decides, and the core functions
//! decide what each caller may do. Agent tokens are for gRPC only.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::{header, request::Parts};

use super::problem::ApiError;
use crate::services::Services;

/// The bearer token of a request, if it has one.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// The header naming the GitHub user whose token is the bearer token.
pub const GITHUB_USERNAME_HEADER: &str = "x-github-username";

impl FromRequestParts<Services> for crate::auth::Caller {
    type Rejection = ApiError;

    /// The admin token, or a GitHub token with `X-GitHub-Username`.
    async fn from_request_parts(
        parts: &mut Parts,
        services: &Services,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or_else(|| {
            ApiError::unauthorized("missing credentials: send Authorization: Bearer <token>")
        })?;
        let login = parts
            .headers
            .get(GITHUB_USERNAME_HEADER)
            .and_then(|value| value.to_str().ok());
        let client = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        Ok(services.authenticate(token, login, client).await?)
    }
}
