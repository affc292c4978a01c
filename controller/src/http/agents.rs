//! EDGE: `/api/v1/agents` and `/api/v1/agent-tokens` — connected agents, and
//! per-agent tokens that can be revoked.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::{ApiError, ApiJson, ApiPath, Problem};
use super::schemas::{Labels, TokenName};
use crate::auth::Caller;
use crate::services::Services;

pub fn router() -> OpenApiRouter<Services> {
    OpenApiRouter::new()
        .routes(routes!(list_agents))
        .routes(routes!(create_agent_token, list_agent_tokens))
        .routes(routes!(revoke_agent_token))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentView {
    pub id: String,
    /// The name it registered with: letters, digits, `.`, `_`, `-`.
    #[schema(max_length = 100)]
    pub name: String,
    /// The labels it registered with: at most 64; keys are 1 to 64
    /// letters, digits, `.`, `_`, `-`; values at most 256 characters, with
    /// no control (C0, DEL, C1) or bidi control character.
    pub labels: BTreeMap<String, String>,
    pub concurrency: u32,
    /// Its build version: at most 64 printable ASCII characters.
    #[schema(max_length = 64)]
    pub version: String,
    /// Whether the agent was heard from within the last 30 seconds.
    pub connected: bool,
    /// Ids of the jobs it is running.
    pub running_jobs: Vec<u64>,
    pub last_seen: DateTime<Utc>,
    /// The public URL of the controller its session is on (the latest
    /// heard from); null before its first session.
    pub controller: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentList {
    pub items: Vec<AgentView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAgentTokenRequest {
    /// What the token is for, e.g. the build host's name.
    #[schema(value_type = TokenName)]
    pub name: String,
    /// The labels agents registering with this token may carry, e.g.
    /// `{"pool": "deploy"}`: an agent may register with these or some of
    /// them, never others, and the token vouches for them (a repository's
    /// `deploy_labels` are met only by a token that vouches for them).
    /// Default: none — any labels, vouching for none.
    #[schema(value_type = Option<Labels>)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// A new agent token. `token` is shown only in this response.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentTokenCreated {
    pub id: String,
    pub name: String,
    pub token: String,
    pub created_at: DateTime<Utc>,
    /// The labels agents registering with it may carry (and it vouches for).
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentTokenView {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// The labels agents registering with it may carry (and it vouches for).
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentTokenList {
    pub items: Vec<AgentTokenView>,
}

#[utoipa::path(get, path = "/api/v1/agents", tag = "agents",
    responses(
        (status = 200, body = AgentList),
    ),
    security(("token" = [])))]
async fn list_agents(
    caller: Caller,
    State(services): State<Services>,
) -> Result<Json<AgentList>, ApiError> {
    let items = services
        .agents_overview(&caller)
        .await?
        .into_iter()
        .map(|overview| {
            let agent = overview.agent;
            AgentView {
                running_jobs: overview.running_jobs.into_iter().map(|id| id.0).collect(),
                connected: overview.connected,
                id: agent.id.0,
                name: agent.name,
                labels: agent.labels,
                concurrency: agent.concurrency,
                version: agent.version,
                last_seen: agent.last_seen,
                controller: agent.controller,
            }
        })
        .collect();
    Ok(Json(AgentList { items }))
}

#[utoipa::path(post, path = "/api/v1/agent-tokens", tag = "agents",
    request_body = CreateAgentTokenRequest,
    responses(
        (status = 201, body = AgentTokenCreated),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = [])))]
async fn create_agent_token(
    caller: Caller,
    State(services): State<Services>,
    ApiJson(request): ApiJson<CreateAgentTokenRequest>,
) -> Result<(StatusCode, Json<AgentTokenCreated>), ApiError> {
    let (record, token) = services
        .create_agent_token(&caller, request.name, request.labels.unwrap_or_default())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(AgentTokenCreated {
            id: record.id,
            name: record.name,
            token,
            created_at: record.created_at,
            labels: record.labels,
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/agent-tokens", tag = "agents",
    responses(
        (status = 200, body = AgentTokenList),
    ),
    security(("token" = [])))]
async fn list_agent_tokens(
    caller: Caller,
    State(services): State<Services>,
) -> Result<Json<AgentTokenList>, ApiError> {
    let tokens = services.list_agent_tokens(&caller).await?;
    Ok(Json(AgentTokenList {
        items: tokens
            .into_iter()
            .map(|t| AgentTokenView {
                id: t.id,
                name: t.name,
                created_at: t.created_at,
                labels: t.labels,
            })
            .collect(),
    }))
}

#[utoipa::path(delete, path = "/api/v1/agent-tokens/{id}", tag = "agents",
    params(("id" = String, Path, description = "The token's id", pattern = "^[0-9a-f]{16}$")),
    responses(
        (status = 204, description = "Revoked: agents using it are disconnected"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = [])))]
async fn revoke_agent_token(
    caller: Caller,
    State(services): State<Services>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    services.revoke_agent_token(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
