//! EDGE: `/api/v1/repos/{owner}/{name}/env` — repository variables. A
//! secret's value is write-only: it is never shown again.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use hobotnica_common::job::{EnvScope, EnvValue, EnvVar};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::{ApiError, ApiJson, ApiPath, ApiQuery, Problem};
use super::schemas::{EnvName, Owner, RepoName};
use crate::auth::Caller;
use crate::services::Services;
use crate::variables::SetEnv;

pub fn router() -> OpenApiRouter<Services> {
    OpenApiRouter::new()
        .routes(routes!(list_env))
        .routes(routes!(set_env, delete_env))
}

/// A repository variable; `value` is null for a secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnvVarView {
    pub key: String,
    pub scope: EnvScope,
    pub secret: bool,
    /// The value (null for a secret: it is write-only).
    pub value: Option<String>,
}

impl From<EnvVar> for EnvVarView {
    fn from(var: EnvVar) -> EnvVarView {
        let (secret, value) = match var.value {
            EnvValue::Plain(value) => (false, Some(value)),
            EnvValue::Sealed(_) => (true, None),
        };
        EnvVarView {
            key: var.key,
            scope: var.scope,
            secret,
            value,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EnvList {
    pub items: Vec<EnvVarView>,
}

/// Set a variable.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"value": "s3cr3t", "secret": true, "scope": "deploy"}))]
pub struct SetEnvRequest {
    /// At most 65536 bytes as UTF-8 (a longer variable would not fit the
    /// kernel's limit on one environment string), no NUL.
    #[schema(max_length = 65536, pattern = "^[^\\u0000]*$")]
    pub value: String,
    /// Encrypted at rest, write-only, masked in logs (default false).
    pub secret: Option<bool>,
    /// `all` (default), `test` or `deploy`.
    pub scope: Option<EnvScope>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ScopeQuery {
    /// Only this scope (default: every scope of the key).
    pub scope: Option<EnvScope>,
}

#[utoipa::path(get, path = "/api/v1/repos/{owner}/{name}/env", tag = "env",
    params(("owner" = Owner, Path), ("name" = RepoName, Path)),
    responses(
        (status = 200, body = EnvList),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn list_env(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name)): ApiPath<(String, String)>,
) -> Result<Json<EnvList>, ApiError> {
    let variables = services.variables(&caller, &owner, &name).await?;
    Ok(Json(EnvList {
        items: variables.into_iter().map(EnvVarView::from).collect(),
    }))
}

#[utoipa::path(put, path = "/api/v1/repos/{owner}/{name}/env/{key}", tag = "env",
    params(("owner" = Owner, Path), ("name" = RepoName, Path), ("key" = EnvName, Path)),
    request_body = SetEnvRequest,
    responses(
        (status = 200, body = EnvVarView),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid name or value", body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn set_env(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name, key)): ApiPath<(String, String, String)>,
    ApiJson(request): ApiJson<SetEnvRequest>,
) -> Result<Json<EnvVarView>, ApiError> {
    let set = SetEnv {
        key,
        value: request.value,
        secret: request.secret.unwrap_or(false),
        scope: request.scope.unwrap_or(EnvScope::All),
    };
    let var = services.set_variable(&caller, &owner, &name, set).await?;
    Ok(Json(var.into()))
}

#[utoipa::path(delete, path = "/api/v1/repos/{owner}/{name}/env/{key}", tag = "env",
    params(("owner" = Owner, Path), ("name" = RepoName, Path), ("key" = EnvName, Path), ScopeQuery),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn delete_env(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name, key)): ApiPath<(String, String, String)>,
    ApiQuery(query): ApiQuery<ScopeQuery>,
) -> Result<StatusCode, ApiError> {
    services
        .remove_variable(&caller, &owner, &name, &key, query.scope)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
