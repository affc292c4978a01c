//! EDGE: who is calling. `Authorization: Bearer <token>` holding the admin
//! token ([`Admin`], or `Caller::Admin`), or a GitHub user's token with
//! `X-GitHub-Username` (`Caller::GitHub`, checked against GitHub by
//! `crate::auth`). Agent tokens are for gRPC only.

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts};
use hobotnica_common::token::{constant_time_eq, hash_token};

use super::problem::ApiError;
use crate::services::Services;

/// A caller holding the admin token.
pub struct Admin;

/// The bearer token of a request, if it has one.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

impl FromRequestParts<Services> for Admin {
    type Rejection = ApiError;

    /// The admin token only (agents and their tokens are the admin's).
    async fn from_request_parts(
        parts: &mut Parts,
        services: &Services,
    ) -> Result<Self, Self::Rejection> {
        match crate::auth::Caller::from_request_parts(parts, services).await? {
            crate::auth::Caller::Admin => Ok(Admin),
            crate::auth::Caller::GitHub { .. } => Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "this needs the admin token",
            )),
        }
    }
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
        if constant_time_eq(
            hash_token(token).as_bytes(),
            services.admin_token_hash.as_bytes(),
        ) {
            return Ok(crate::auth::Caller::Admin);
        }
        let Some(login) = parts
            .headers
            .get(GITHUB_USERNAME_HEADER)
            .and_then(|value| value.to_str().ok())
        else {
            return Err(ApiError::unauthorized(
                "the token is not valid (a GitHub token also needs X-GitHub-Username)",
            ));
        };
        if login.is_empty() || login.len() > 39 {
            return Err(ApiError::unauthorized(
                "X-GitHub-Username is not a GitHub login",
            ));
        }
        Ok(services
            .verify_github_user(crate::github::GitHubToken::new(token), login)
            .await?)
    }
}
