//! EDGE: `/api/v1/jobs` — list, show, cancel jobs and read their logs.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use hobotnica_common::ids::JobId;
use hobotnica_common::job::{Job, JobKind, JobState, Trigger};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::{ApiError, ApiPath, ApiQuery, Problem};
use super::schemas::{self, Cursor, FullRepoName, PageSize};
use crate::auth::{Access, Caller};
use crate::jobs::{JobPage, JobQuery, Page};
use crate::services::Services;

pub fn router() -> OpenApiRouter<Services> {
    OpenApiRouter::new()
        .routes(routes!(list_jobs))
        .routes(routes!(show_job))
        .routes(routes!(cancel_job))
        .routes(routes!(retry_job))
        .routes(routes!(job_log))
}

/// A job and its status.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "id": 42, "repo": "local/demo", "kind": "deploy", "target": "deploy", "state": "running",
    "commit": "2f6f3c1f0a1b2c3d4e5f60718293a4b5c6d7e8f9", "branch": "main", "trigger": "api",
    "attempt": 1, "agent": "build-1", "agent_id": "5f0c7d2a9b1e4c3d8a6f2e1b0c9d8e7f",
    "exit_code": null, "message": null, "env_keys": ["RELEASE_NOTE"], "cancel_requested": false,
    "requested_by": "admin", "duration_ms": 5120, "created_at": "2026-11-28T12:00:00Z",
    "started_at": "2026-11-28T12:00:01Z", "finished_at": null,
    "url": "/api/v1/jobs/42", "log_url": "/api/v1/jobs/42/log"
}))]
pub struct JobView {
    pub id: u64,
    /// `owner/name`
    pub repo: String,
    pub kind: JobKind,
    pub target: String,
    pub state: JobState,
    /// The exact commit the job runs at.
    pub commit: String,
    /// The branch the commit was resolved from, if the job named one.
    pub branch: Option<String>,
    pub trigger: Trigger,
    /// How many times an agent took the job.
    pub attempt: u32,
    /// Name of the agent running (or that ran) the job.
    pub agent: Option<String>,
    pub agent_id: Option<String>,
    pub exit_code: Option<i32>,
    /// Why the job is in its state (failure reason, cancel, lost lease).
    pub message: Option<String>,
    /// Names of the one-time variables (values are not shown).
    pub env_keys: Vec<String>,
    pub cancel_requested: bool,
    /// Who asked for the job: `admin`, a GitHub login, or `webhook`.
    pub requested_by: Option<String>,
    /// How long it ran (so far, while running), in milliseconds.
    pub duration_ms: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Where the job's time went, phase by phase; null for a job no agent
    /// completed, or one whose agent does not report phases.
    pub timings: Option<JobTimingsView>,
    /// This job's URL.
    pub url: String,
    /// Its log's URL.
    pub log_url: String,
}

impl From<Job> for JobView {
    fn from(job: Job) -> JobView {
        JobView {
            url: format!("/api/v1/jobs/{}", job.id),
            log_url: format!("/api/v1/jobs/{}/log", job.id),
            id: job.id.0,
            repo: job.repo.to_string(),
            kind: job.kind,
            target: job.target,
            state: job.state,
            commit: job.commit.to_string(),
            branch: job.branch,
            trigger: job.trigger,
            attempt: job.attempt,
            agent: job.agent_name,
            agent_id: job.agent.map(|id| id.0),
            exit_code: job.exit_code,
            message: job.message,
            env_keys: job.env.into_keys().collect(),
            cancel_requested: job.cancel_requested,
            duration_ms: job.started_at.map(|started| {
                (job.finished_at.unwrap_or_else(Utc::now) - started).num_milliseconds()
            }),
            requested_by: job.requested_by,
            timings: job.timings.map(|timings| JobTimingsView {
                accepted_at: job.created_at,
                assigned_at: job.started_at,
                assignment_sent_at: timings.assignment_sent_at,
                received_at: timings.received_at,
                fetched_at: timings.fetched_at,
                fetch_ran: timings.fetch_ran,
                work_tree_ready_at: timings.work_tree_ready_at,
                sandbox_ready_at: timings.sandbox_ready_at,
                make_spawned_at: timings.make_spawned_at,
                make_exited_at: timings.make_exited_at,
                log_acked_at: timings.log_acked_at,
                completion_sent_at: timings.completion_sent_at,
                recorded_at: job.finished_at,
            }),
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
        }
    }
}

/// When each phase of the job's last attempt ended, in the order they
/// happen: one wall-clock reading each, taken by the controller (accepted,
/// assigned, sent, recorded) or the agent (the rest). A reading is null
/// when unknown: a phase the attempt never reached (no make when the
/// commit was not found), or an agent that does not take it. Readings from
/// an agent on another host include the two clocks' skew.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "accepted_at": "2026-11-28T12:00:00.000000Z",
    "assigned_at": "2026-11-28T12:00:00.001200Z",
    "assignment_sent_at": "2026-11-28T12:00:00.001900Z",
    "received_at": "2026-11-28T12:00:00.002300Z",
    "fetched_at": "2026-11-28T12:00:00.004100Z", "fetch_ran": false,
    "work_tree_ready_at": "2026-11-28T12:00:00.009800Z",
    "sandbox_ready_at": "2026-11-28T12:00:00.009900Z",
    "make_spawned_at": "2026-11-28T12:00:00.010600Z",
    "make_exited_at": "2026-11-28T12:00:00.019700Z",
    "log_acked_at": "2026-11-28T12:00:00.020500Z",
    "completion_sent_at": "2026-11-28T12:00:00.020600Z",
    "recorded_at": "2026-11-28T12:00:00.021800Z"
}))]
pub struct JobTimingsView {
    /// The job was queued (its `created_at`).
    pub accepted_at: DateTime<Utc>,
    /// An agent claimed it (its `started_at`).
    pub assigned_at: Option<DateTime<Utc>>,
    /// The controller wrote the assignment to the agent's session stream.
    pub assignment_sent_at: Option<DateTime<Utc>>,
    /// The agent read the assignment.
    pub received_at: Option<DateTime<Utc>>,
    /// The agent's cache clone had the commit (cloned, fetched, or already
    /// there).
    pub fetched_at: Option<DateTime<Utc>>,
    /// Whether that took a `git fetch` (false: the commit was cached, or
    /// came with a first clone).
    pub fetch_ran: Option<bool>,
    /// The job's work tree was checked out.
    pub work_tree_ready_at: Option<DateTime<Utc>>,
    /// make's command was wrapped in the agent's sandbox, ready to start.
    pub sandbox_ready_at: Option<DateTime<Utc>>,
    /// make (in its sandbox) was started.
    pub make_spawned_at: Option<DateTime<Utc>>,
    /// make exited.
    pub make_exited_at: Option<DateTime<Utc>>,
    /// The controller had acknowledged the last byte of the log.
    pub log_acked_at: Option<DateTime<Utc>>,
    /// The agent sent the completion.
    pub completion_sent_at: Option<DateTime<Utc>>,
    /// The controller recorded the completion (the job's `finished_at`).
    pub recorded_at: Option<DateTime<Utc>>,
}

/// 202 with the job and its `Location`.
pub fn accepted(job: Job) -> Response {
    let location = format!("/api/v1/jobs/{}", job.id);
    let mut response = (StatusCode::ACCEPTED, Json(JobView::from(job))).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub items: Vec<JobView>,
    /// Pass as `cursor` to get the next (older) page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobsQuery {
    /// Only jobs of this repository (`owner/name`).
    #[param(value_type = Option<FullRepoName>)]
    pub repo: Option<String>,
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs of this kind.
    pub kind: Option<JobKind>,
    #[param(value_type = Option<PageSize>)]
    pub limit: Option<usize>,
    #[param(value_type = Option<Cursor>)]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Byte offset to start from (default 0); past the end gives an empty
    /// body.
    #[param(minimum = 0, maximum = 9223372036854775807_u64, format = Int64)]
    pub offset: Option<u64>,
}

fn parse_job_id(raw: &str) -> Result<JobId, ApiError> {
    raw.parse()
        .map_err(|err: hobotnica_common::ids::InvalidId| {
            ApiError::field(StatusCode::BAD_REQUEST, "id", err.to_string())
        })
}

#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs",
    params(JobsQuery),
    responses(
        (status = 200, body = JobList),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn list_jobs(
    caller: Caller,
    State(services): State<Services>,
    ApiQuery(query): ApiQuery<JobsQuery>,
) -> Result<Json<JobList>, ApiError> {
    let page = page(query.cursor.as_deref(), query.limit)?;
    let jobs = JobQuery {
        repo: query.repo,
        state: query.state,
        kind: query.kind,
    };
    Ok(Json(
        services.visible_jobs(&caller, jobs, page).await?.into(),
    ))
}

/// The page the query parameters `cursor` and `limit` name; a bad one is
/// the request's fault (400).
pub fn page(cursor: Option<&str>, limit: Option<usize>) -> Result<Page, ApiError> {
    Page::new(cursor, limit)
        .map_err(|invalid| ApiError::field(StatusCode::BAD_REQUEST, &invalid.field, invalid.reason))
}

impl From<JobPage> for JobList {
    fn from(page: JobPage) -> JobList {
        JobList {
            items: page.jobs.into_iter().map(JobView::from).collect(),
            next_cursor: page.next_cursor.map(|id| id.to_string()),
        }
    }
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = schemas::JobId, Path)),
    responses(
        (status = 200, body = JobView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn show_job(
    caller: Caller,
    State(services): State<Services>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = services
        .job_for(&caller, parse_job_id(&id)?, Access::Read)
        .await?;
    Ok(Json(job.into()))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = schemas::JobId, Path)),
    responses(
        (status = 202, description = "Cancelled (queued job) or cancel sent to the agent (running job)", body = JobView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job has already finished", body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn cancel_job(
    caller: Caller,
    State(services): State<Services>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    Ok(accepted(
        services.cancel(&caller, parse_job_id(&id)?).await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/retry", tag = "jobs",
    params(("id" = schemas::JobId, Path)),
    responses(
        (status = 202, description = "A new job: same repository, commit, target and one-time variables", body = JobView,
            headers(("Location" = String, description = "/api/v1/jobs/{id} of the new job"))),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job has not finished", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The repository is disabled", body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn retry_job(
    caller: Caller,
    State(services): State<Services>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    Ok(accepted(services.retry(&caller, parse_job_id(&id)?).await?))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}/log", tag = "jobs",
    params(("id" = schemas::JobId, Path), LogQuery),
    responses(
        (status = 200, description = "The log's bytes from `offset` (stdout and stderr interleaved as produced)", body = String, content_type = "text/plain",
            headers(("X-Log-Length" = u64, description = "The log's length when the response started"),
                    ("X-Job-State" = String, description = "The job's state when the response started"))),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("token" = []), ("github_token" = [], "github_login" = [])))]
async fn job_log(
    caller: Caller,
    State(services): State<Services>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<LogQuery>,
) -> Result<Response, ApiError> {
    let id = parse_job_id(&id)?;
    let offset = query.offset.unwrap_or(0);
    if offset > i64::MAX as u64 {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "offset",
            "must be 0 to 9223372036854775807",
        ));
    }
    let log = services.read_log(&caller, id, offset, None).await?;
    let mut response = Response::new(Body::from_stream(log.body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert("x-log-length", HeaderValue::from(log.length));
    headers.insert(
        "x-job-state",
        HeaderValue::from_static(log.job.state.as_str()),
    );
    Ok(response)
}
