//! EDGE: `/api/v1/repos` — register, list, show and remove repositories, and
//! trigger jobs on them.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use hobotnica_common::job::{Repo, Trigger};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Admin;
use super::jobs::JobView;
use super::problem::{ApiError, ApiJson, Problem};
use crate::jobs::TriggerJob;
use crate::projects::NewRepo;
use crate::services::Services;

pub fn router() -> OpenApiRouter<Services> {
    OpenApiRouter::new()
        .routes(routes!(register_repo, list_repos))
        .routes(routes!(show_repo, delete_repo))
        .routes(routes!(run_job))
}

/// Register a repository by git URL.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "demo", "git_url": "https://git.example.com/demo.git", "branch": "main"}))]
pub struct RegisterRepoRequest {
    /// Repository name: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// Anything git can clone: https://, ssh://, git://, file://, user@host:path.
    pub git_url: String,
    /// Owner; `local` when not given.
    pub owner: Option<String>,
    /// Default branch for jobs that name neither commit nor branch (`main`).
    pub branch: Option<String>,
    /// Wall-clock limit of each job in seconds (default 3600).
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RepoView {
    pub owner: String,
    pub name: String,
    /// `owner/name`
    pub full_name: String,
    pub git_url: String,
    pub default_branch: String,
    pub timeout_secs: u64,
    pub created_at: DateTime<Utc>,
}

impl From<Repo> for RepoView {
    fn from(repo: Repo) -> RepoView {
        RepoView {
            full_name: repo.full_name(),
            owner: repo.owner,
            name: repo.name,
            git_url: repo.git_url,
            default_branch: repo.default_branch,
            timeout_secs: repo.timeout_secs,
            created_at: repo.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RepoList {
    pub items: Vec<RepoView>,
}

/// Run a make target at a commit or at the tip of a branch.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"target": "test", "branch": "main", "env": {"GREETING": "hello"}}))]
pub struct RunJobRequest {
    /// The make target.
    pub target: String,
    /// A 40-hex commit sha. Give commit or branch, not both.
    pub commit: Option<String>,
    /// A branch, resolved to its current commit now. Default: the repository's branch.
    pub branch: Option<String>,
    /// One-time environment variables for this job.
    pub env: Option<BTreeMap<String, String>>,
}

#[utoipa::path(post, path = "/api/v1/repos", tag = "repos",
    request_body = RegisterRepoRequest,
    responses(
        (status = 201, description = "Registered", body = RepoView),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already registered", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = [])))]
async fn register_repo(
    _: Admin,
    State(services): State<Services>,
    ApiJson(request): ApiJson<RegisterRepoRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let repo = services
        .register_repo(NewRepo {
            owner: request.owner,
            name: request.name,
            git_url: request.git_url,
            branch: request.branch,
            timeout_secs: request.timeout_secs,
        })
        .await?;
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/api/v1/repos/{}", repo.full_name())) {
        headers.insert(header::LOCATION, location);
    }
    Ok((StatusCode::CREATED, headers, Json(RepoView::from(repo))))
}

#[utoipa::path(get, path = "/api/v1/repos", tag = "repos",
    responses(
        (status = 200, body = RepoList),
        (status = 401, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = [])))]
async fn list_repos(
    _: Admin,
    State(services): State<Services>,
) -> Result<Json<RepoList>, ApiError> {
    let mut repos = services.store.list_repos().await?;
    repos.sort_by_key(Repo::full_name);
    Ok(Json(RepoList {
        items: repos.into_iter().map(RepoView::from).collect(),
    }))
}

#[utoipa::path(get, path = "/api/v1/repos/{owner}/{name}", tag = "repos",
    params(("owner" = String, Path), ("name" = String, Path)),
    responses(
        (status = 200, body = RepoView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = [])))]
async fn show_repo(
    _: Admin,
    State(services): State<Services>,
    Path((owner, name)): Path<(String, String)>,
) -> Result<Json<RepoView>, ApiError> {
    Ok(Json(services.repo(&owner, &name).await?.into()))
}

#[utoipa::path(delete, path = "/api/v1/repos/{owner}/{name}", tag = "repos",
    params(("owner" = String, Path), ("name" = String, Path)),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = [])))]
async fn delete_repo(
    _: Admin,
    State(services): State<Services>,
    Path((owner, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    services.delete_repo(&owner, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/repos/{owner}/{name}/jobs", tag = "jobs",
    params(("owner" = String, Path), ("name" = String, Path)),
    request_body = RunJobRequest,
    responses(
        (status = 202, description = "Queued; `Location` names the job", body = JobView,
            headers(("Location" = String, description = "/api/v1/jobs/{id}"))),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The repository could not be read", body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = [])))]
async fn run_job(
    _: Admin,
    State(services): State<Services>,
    Path((owner, name)): Path<(String, String)>,
    ApiJson(request): ApiJson<RunJobRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let job = services
        .trigger_job(
            &owner,
            &name,
            TriggerJob {
                target: request.target,
                commit: request.commit,
                branch: request.branch,
                env: request.env.unwrap_or_default(),
                trigger: Trigger::Api,
            },
        )
        .await?;
    Ok(super::jobs::accepted(job))
}
