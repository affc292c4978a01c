//! EDGE: `/api/v1/repos` — register, list, show and remove repositories, and
//! trigger jobs on them.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use hobotnica_common::job::Repo;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::jobs::JobView;
use super::problem::{ApiError, ApiJson, ApiPath, ApiQuery, Problem};
use super::schemas::{
    Branch, CommitSha, Cursor, GitUrl, IdempotencyKey, JobEnv, Labels, Owner, PageSize, RepoName,
    Target,
};
use crate::auth::Caller;
use crate::jobs::JobRequest;
use crate::repos::{NewGitHubRepo, NewRepo, NewRepository, RepoChange, RepoOverview};
use crate::services::Services;

pub fn router() -> OpenApiRouter<Services> {
    OpenApiRouter::new()
        .routes(routes!(register_repo, list_repos))
        .routes(routes!(show_repo, delete_repo, update_repo))
        .routes(routes!(run_job))
        .routes(routes!(deploy))
        .routes(routes!(list_deploys))
        .routes(routes!(rotate_webhook_secret))
}

/// Register a repository by git URL.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "demo", "git_url": "https://git.example.com/demo.git", "branch": "main"}))]
pub struct RegisterRepoRequest {
    /// Repository name: letters, digits, `.`, `_`, `-`.
    #[schema(value_type = RepoName)]
    pub name: String,
    /// Anything git can clone (admin token only). Leave it out to register
    /// the GitHub repository `owner/name`, with GitHub credentials
    /// (`Authorization: Bearer <github token>` and `X-GitHub-Username`) of
    /// a user with admin rights on it: the answer holds its webhook secret.
    #[schema(value_type = Option<GitUrl>)]
    pub git_url: Option<String>,
    /// With `git_url`: the owner to file it under (default `local`).
    /// Without: the GitHub owner (default: the caller's own login).
    #[schema(value_type = Option<Owner>)]
    pub owner: Option<String>,
    /// Also create the webhook on GitHub.
    pub create_webhook: Option<bool>,
    /// Default branch for jobs that name neither commit nor branch (`main`).
    #[schema(value_type = Option<Branch>)]
    pub branch: Option<String>,
    /// Wall-clock limit of each job in seconds (default 3600, at most 7 days).
    #[schema(minimum = 1, maximum = 604800)]
    #[serde(default, deserialize_with = "whole_number")]
    pub timeout_secs: Option<u64>,
    /// Queue a `test` job again, once, when its agent is lost (default
    /// true). Deploys are never queued again automatically.
    pub requeue_lost_tests: Option<bool>,
    /// Labels the token of an agent must vouch for to take a deploy of this
    /// repository (and its deploy secrets), e.g. `{"pool": "deploy"}`.
    /// Default: none, any agent.
    #[schema(value_type = Option<Labels>)]
    pub deploy_labels: Option<BTreeMap<String, String>>,
    /// The most a job's log may hold, in bytes (at least 1024, at most the
    /// controller's `--max-log-bytes`, which applies without one). Past it
    /// the job is stopped and fails, its log ending with a notice.
    #[schema(minimum = 1024)]
    #[serde(default, deserialize_with = "whole_number")]
    pub max_log_bytes: Option<u64>,
}

/// Change a repository's settings; fields left out stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"deploy_labels": {"pool": "deploy"}}))]
pub struct UpdateRepoRequest {
    /// Labels the token of an agent must vouch for to take a deploy queued
    /// from now on; `{}` lets any agent deploy.
    #[schema(value_type = Option<Labels>)]
    pub deploy_labels: Option<BTreeMap<String, String>>,
    /// The most a job's log may hold, in bytes (at least 1024, at most the
    /// controller's `--max-log-bytes`), for jobs that start from now on;
    /// `null`: the controller's limit.
    #[serde(default, deserialize_with = "present_whole_number")]
    #[schema(value_type = Option<u64>, minimum = 1024)]
    pub max_log_bytes: Option<Option<u64>>,
}

/// A number JSON Schema calls an integer — `7462.0` too, not only `7462` —
/// as a `u64`; `null` as `None`.
fn whole_number<'de, D>(deserializer: D) -> Result<Option<u64>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error as _;
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    if let Some(whole) = number.as_u64() {
        return Ok(Some(whole));
    }
    match number.as_f64() {
        // 2^64: the first float past u64::MAX.
        Some(float)
            if float.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&float) =>
        {
            Ok(Some(float as u64))
        }
        _ => Err(D::Error::custom(format!(
            "invalid value: {number}, expected a whole number from 0 to {}",
            u64::MAX
        ))),
    }
}

/// [`whole_number`] for a field that may be `null`: `Some(None)` when it
/// is, `None` (by `#[serde(default)]`) when it is left out.
fn present_whole_number<'de, D>(deserializer: D) -> Result<Option<Option<u64>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    whole_number(deserializer).map(Some)
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
    /// `github` or `git`.
    pub source: String,
    /// Whether a lost `test` job is queued again once, automatically.
    pub requeue_lost_tests: bool,
    /// Labels the token of an agent must vouch for to take a deploy.
    pub deploy_labels: BTreeMap<String, String>,
    /// The repository's own log limit in bytes; `null`: the controller's
    /// (`--max-log-bytes`). The smaller of the two applies.
    pub max_log_bytes: Option<u64>,
    /// The commit of the latest successful deploy, if any.
    pub deployed_commit: Option<String>,
    /// When that deploy finished.
    pub deployed_at: Option<DateTime<Utc>>,
    /// Why the repository is disabled, if it is.
    pub disabled: Option<String>,
    /// GitHub repositories: where GitHub must send webhooks (only in the
    /// registration's answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// GitHub repositories: the webhook secret (only in the registration's
    /// answer; store it in the GitHub webhook's settings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
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
            source: if repo.github.is_some() {
                "github"
            } else {
                "git"
            }
            .to_owned(),
            deployed_commit: None,
            deployed_at: None,
            requeue_lost_tests: repo.requeue_lost_tests,
            deploy_labels: repo.deploy_labels,
            max_log_bytes: repo.max_log_bytes,
            disabled: repo.disabled,
            webhook_url: None,
            webhook_secret: None,
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
    #[schema(value_type = Target)]
    pub target: String,
    /// The commit to run at. With `branch` too, the branch is only recorded.
    #[schema(value_type = Option<CommitSha>)]
    pub commit: Option<String>,
    /// Without `commit`: a branch, resolved to its current commit now.
    /// Default: the repository's branch.
    #[schema(value_type = Option<Branch>)]
    pub branch: Option<String>,
    /// One-time environment variables for this job.
    #[schema(value_type = Option<JobEnv>)]
    pub env: Option<BTreeMap<String, String>>,
}

#[utoipa::path(post, path = "/api/v1/repos", tag = "repos",
    request_body = RegisterRepoRequest,
    responses(
        (status = 201, description = "Registered; `Location` names the repository", body = RepoView,
            headers(("Location" = String, description = "/api/v1/repos/{owner}/{name}"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Registering a GitHub repository needs admin rights on it on GitHub (its webhook secret is shown to whoever registers it)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not on GitHub, or not visible with this token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already registered", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "GitHub's rate limit is exhausted", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "GitHub could not be reached", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn register_repo(
    caller: Caller,
    State(services): State<Services>,
    ApiJson(request): ApiJson<RegisterRepoRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let new = match request.git_url {
        Some(git_url) => NewRepository::Git(NewRepo {
            owner: request.owner,
            name: request.name,
            git_url,
            branch: request.branch,
            timeout_secs: request.timeout_secs,
            requeue_lost_tests: request.requeue_lost_tests,
            deploy_labels: request.deploy_labels.unwrap_or_default(),
            max_log_bytes: request.max_log_bytes,
        }),
        None => NewRepository::GitHub(NewGitHubRepo {
            owner: request.owner,
            name: request.name,
            branch: request.branch,
            timeout_secs: request.timeout_secs,
            create_webhook: request.create_webhook.unwrap_or(false),
            deploy_labels: request.deploy_labels.unwrap_or_default(),
            max_log_bytes: request.max_log_bytes,
        }),
    };
    let registered = services.register(&caller, new).await?;
    let mut view = RepoView::from(registered.repo);
    if let Some(webhook) = registered.webhook {
        view.webhook_url = Some(webhook.url);
        view.webhook_secret = Some(webhook.secret);
    }
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/api/v1/repos/{}", view.full_name)) {
        headers.insert(header::LOCATION, location);
    }
    Ok((StatusCode::CREATED, headers, Json(view)))
}

#[utoipa::path(get, path = "/api/v1/repos", tag = "repos",
    responses(
        (status = 200, body = RepoList),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn list_repos(
    caller: Caller,
    State(services): State<Services>,
) -> Result<Json<RepoList>, ApiError> {
    let items = services
        .visible_repos(&caller)
        .await?
        .into_iter()
        .map(RepoView::from)
        .collect();
    Ok(Json(RepoList { items }))
}

#[utoipa::path(get, path = "/api/v1/repos/{owner}/{name}", tag = "repos",
    params(("owner" = Owner, Path), ("name" = RepoName, Path)),
    responses(
        (status = 200, body = RepoView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn show_repo(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name)): ApiPath<(String, String)>,
) -> Result<Json<RepoView>, ApiError> {
    let overview = services.repo_overview(&caller, &owner, &name).await?;
    Ok(Json(overview.into()))
}

#[utoipa::path(delete, path = "/api/v1/repos/{owner}/{name}", tag = "repos",
    params(("owner" = Owner, Path), ("name" = RepoName, Path)),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn delete_repo(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    services.remove_repo(&caller, &owner, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(patch, path = "/api/v1/repos/{owner}/{name}", tag = "repos",
    params(("owner" = Owner, Path), ("name" = RepoName, Path)),
    request_body = UpdateRepoRequest,
    responses(
        (status = 200, description = "Changed", body = RepoView),
        (status = 403, description = "Needs push access on GitHub", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The repository kept changing; retry", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn update_repo(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<UpdateRepoRequest>,
) -> Result<Json<RepoView>, ApiError> {
    let change = RepoChange {
        deploy_labels: request.deploy_labels,
        max_log_bytes: request.max_log_bytes,
    };
    let overview = services
        .change_settings(&caller, &owner, &name, change)
        .await?;
    Ok(Json(overview.into()))
}

#[utoipa::path(post, path = "/api/v1/repos/{owner}/{name}/jobs", tag = "jobs",
    params(("owner" = Owner, Path), ("name" = RepoName, Path)),
    request_body = RunJobRequest,
    responses(
        (status = 202, description = "Queued; `Location` names the job", body = JobView,
            headers(("Location" = String, description = "/api/v1/jobs/{id}"))),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs push access on GitHub", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The repository is disabled (access lost)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "GitHub's rate limit is exhausted", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The repository could not be read", body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn run_job(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<RunJobRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let request = JobRequest {
        target: request.target,
        commit: request.commit,
        branch: request.branch,
        env: request.env.unwrap_or_default(),
    };
    let job = services.trigger(&caller, &owner, &name, request).await?;
    Ok(super::jobs::accepted(job))
}

/// Deploy the tip of a branch (resolved now) or a chosen commit.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"commit": "2f6f3c1f0a1b2c3d4e5f60718293a4b5c6d7e8f9"}))]
pub struct DeployRequest {
    /// The commit to deploy. With `branch` too, the branch is only recorded.
    #[schema(value_type = Option<CommitSha>)]
    pub commit: Option<String>,
    /// Without `commit`: a branch whose current commit is deployed.
    /// Default: the repository's branch.
    #[schema(value_type = Option<Branch>)]
    pub branch: Option<String>,
    /// One-time environment variables for this deploy.
    #[schema(value_type = Option<JobEnv>)]
    pub env: Option<BTreeMap<String, String>>,
}

#[utoipa::path(post, path = "/api/v1/repos/{owner}/{name}/deploy", tag = "jobs",
    params(("owner" = Owner, Path), ("name" = RepoName, Path),
        ("Idempotency-Key" = Option<IdempotencyKey>, Header, description = "Makes the request safe to retry: the same key with the same body returns the first request's job (200) instead of deploying twice")),
    request_body = DeployRequest,
    responses(
        (status = 202, description = "Queued `make deploy`; `Location` names the job", body = JobView,
            headers(("Location" = String, description = "/api/v1/jobs/{id}"))),
        (status = 200, description = "A repeated Idempotency-Key: the first request's job", body = JobView),
        (status = 403, description = "Needs push access on GitHub", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The first request with this Idempotency-Key is still being handled", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The repository is disabled (access lost)", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The repository could not be read", body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn deploy(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<DeployRequest>,
) -> Result<Response, ApiError> {
    let idempotency_key = match headers.get("idempotency-key") {
        Some(value) => Some(value.to_str().map_err(|_| {
            ApiError::field(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Idempotency-Key",
                "must be visible ASCII characters",
            )
        })?),
        None => None,
    };
    let request = JobRequest {
        target: "deploy".to_owned(),
        commit: request.commit,
        branch: request.branch,
        env: request.env.unwrap_or_default(),
    };
    let (job, new) = services
        .deploy(&caller, &owner, &name, request, idempotency_key)
        .await?;
    let mut response = super::jobs::accepted(job);
    if !new {
        *response.status_mut() = StatusCode::OK;
    }
    Ok(response)
}

/// A repository with its currently deployed commit.
impl From<RepoOverview> for RepoView {
    fn from(overview: RepoOverview) -> RepoView {
        let mut view = RepoView::from(overview.repo);
        if let Some(job) = overview.last_deploy {
            view.deployed_commit = Some(job.commit.to_string());
            view.deployed_at = job.finished_at;
        }
        view
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeploysQuery {
    #[param(value_type = Option<PageSize>)]
    pub limit: Option<usize>,
    #[param(value_type = Option<Cursor>)]
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/repos/{owner}/{name}/deploys", tag = "jobs",
    params(("owner" = Owner, Path), ("name" = RepoName, Path), DeploysQuery),
    responses(
        (status = 200, description = "The repository's deploys, newest first", body = super::jobs::JobList),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn list_deploys(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<DeploysQuery>,
) -> Result<Json<super::jobs::JobList>, ApiError> {
    let page = super::jobs::page(query.cursor.as_deref(), query.limit)?;
    let deploys = services.repo_deploys(&caller, &owner, &name, page).await?;
    Ok(Json(deploys.into()))
}

/// A GitHub repository's webhook: where GitHub delivers its events, and the
/// secret that signs them (shown only in this answer).
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookSecret {
    pub webhook_url: String,
    pub webhook_secret: String,
}

#[utoipa::path(post, path = "/api/v1/repos/{owner}/{name}/webhook-secret", tag = "repos",
    params(("owner" = Owner, Path), ("name" = RepoName, Path)),
    responses(
        (status = 200, description = "A new webhook secret, shown only now; the old one no longer verifies deliveries. Set it in the webhook's settings on GitHub.", body = WebhookSecret),
        (status = 403, description = "Needs admin rights on the repository on GitHub (or the admin token)", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The repository was registered by git URL: it has no webhook", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn rotate_webhook_secret(
    caller: Caller,
    State(services): State<Services>,
    ApiPath((owner, name)): ApiPath<(String, String)>,
) -> Result<Json<WebhookSecret>, ApiError> {
    let webhook = services
        .rotate_webhook_secret(&caller, &owner, &name)
        .await?;
    Ok(Json(WebhookSecret {
        webhook_url: webhook.url,
        webhook_secret: webhook.secret,
    }))
}

#[cfg(test)]
mod tests {
    /// JSON Schema's integers include `7462.0`: Schemathesis sends them,
    /// and they are taken; a fraction is refused naming the field.
    #[test]
    fn whole_numbers_written_as_floats_are_integers() {
        let update: super::UpdateRepoRequest =
            serde_json::from_str(r#"{"max_log_bytes": 7462.0}"#).unwrap();
        assert_eq!(update.max_log_bytes, Some(Some(7462)));
        let update: super::UpdateRepoRequest =
            serde_json::from_str(r#"{"max_log_bytes": null}"#).unwrap();
        assert_eq!(update.max_log_bytes, Some(None));
        let update: super::UpdateRepoRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(update.max_log_bytes, None);
        let register: super::RegisterRepoRequest = serde_json::from_str(
            r#"{"name": "demo", "git_url": "/srv/demo.git", "timeout_secs": 60.0}"#,
        )
        .unwrap();
        assert_eq!(register.timeout_secs, Some(60));
        for bad in ["7462.5", "-1", "1e30", "\"7462\""] {
            let err = serde_json::from_str::<super::UpdateRepoRequest>(&format!(
                r#"{{"max_log_bytes": {bad}}}"#
            ))
            .unwrap_err();
            assert!(
                err.to_string().contains("whole number")
                    || err.to_string().contains("invalid type"),
                "{bad}: {err}"
            );
        }
    }

    /// Limits the schema states as literals (utoipa takes no constants in
    /// its attributes) are the ones the controller enforces.
    #[test]
    fn literal_limits_in_the_schema_are_the_enforced_ones() {
        let document = serde_json::to_value(crate::http::openapi()).unwrap();
        let schemas = &document["components"]["schemas"];
        let timeout = &schemas["RegisterRepoRequest"]["properties"]["timeout_secs"];
        assert_eq!(
            timeout["maximum"],
            crate::repos::MAX_TIMEOUT_SECS,
            "{timeout}"
        );
        assert_eq!(timeout["minimum"], 1, "{timeout}");
        let value = &schemas["SetEnvRequest"]["properties"]["value"];
        assert_eq!(
            value["maxLength"],
            hobotnica_common::validate::MAX_ENV_VALUE_LEN,
            "{value}"
        );
    }
}
