//! The jobs list (`/jobs`): filtered by repository, state and kind, paged
//! by cursor (`Services::visible_jobs`, as `GET /api/v1/jobs`), and kept
//! current by `/jobs/events` (`Services::job_changes`: the store's events,
//! only jobs the viewer may read) with `jobs.js`.

use std::convert::Infallible;

use askama::Template;
use axum::Extension;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures_util::StreamExt;
use hobotnica_common::job::{Job, JobKind, JobState};
use serde::{Deserialize, Serialize};

use super::PageError;
use super::assets::JOBS_SCRIPT;
use super::live::{EVENTS_KEEPALIVE_INTERVAL, EVENTS_RETRY, Shutdown, until_shutdown};
use super::pages::{Layout, render, time_text};
use super::session::Viewer;
use crate::error::CoreError;
use crate::jobs::{JobChange, JobQuery, Page};
use crate::services::Services;

/// The list's filters and page, as the filter form sends them (an empty
/// field is no filter).
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    repo: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    kind: String,
    cursor: Option<String>,
    limit: Option<usize>,
}

fn invalid(field: &'static str, why: &str) -> PageError {
    PageError::Core(CoreError::invalid(field, why))
}

impl ListQuery {
    fn jobs(&self) -> Result<JobQuery, PageError> {
        let state = match self.state.as_str() {
            "" => None,
            state => Some(
                state
                    .parse::<JobState>()
                    .map_err(|_| invalid("state", "not a job state"))?,
            ),
        };
        let kind = match self.kind.as_str() {
            "" => None,
            "test" => Some(JobKind::Test),
            "deploy" => Some(JobKind::Deploy),
            "custom" => Some(JobKind::Custom),
            _ => return Err(invalid("kind", "must be test, deploy or custom")),
        };
        let repo = self.repo.trim();
        Ok(JobQuery {
            repo: (!repo.is_empty()).then(|| repo.to_owned()),
            state,
            kind,
        })
    }
}

/// A job as a row of the list (and in a `job` event, as JSON).
#[derive(Serialize)]
pub struct JobRow {
    pub id: u64,
    pub repo: String,
    pub target: String,
    pub kind: &'static str,
    pub state: &'static str,
    pub commit: String,
    pub branch: String,
    pub who: String,
    pub created: String,
    pub created_iso: String,
}

impl From<&Job> for JobRow {
    fn from(job: &Job) -> JobRow {
        let (created, created_iso) = time_text(job.created_at);
        JobRow {
            id: job.id.0,
            repo: job.repo.to_string(),
            target: job.target.clone(),
            kind: job.kind.as_str(),
            state: job.state.as_str(),
            commit: job.commit.to_string().chars().take(12).collect(),
            branch: job.branch.clone().unwrap_or_default(),
            who: job.requested_by.clone().unwrap_or_default(),
            created,
            created_iso,
        }
    }
}

pub struct Choice {
    pub value: &'static str,
    pub selected: bool,
}

fn choices(values: &[&'static str], current: &str) -> Vec<Choice> {
    values
        .iter()
        .map(|value| Choice {
            value,
            selected: *value == current,
        })
        .collect()
}

#[derive(Template)]
#[template(path = "jobs.html")]
struct JobsPage {
    layout: Layout,
    jobs_script: &'static str,
    rows: Vec<JobRow>,
    repo: String,
    state: String,
    states: Vec<Choice>,
    kinds: Vec<Choice>,
    /// The link to the next (older) page.
    older: Option<String>,
    /// The first page: new jobs are added at the top live.
    first_page: bool,
    /// The query of the live events.
    events_query: String,
}

fn query_string(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, value)| format!("{name}={}", urlencoding(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes everything but unreserved characters.
fn urlencoding(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// `GET /jobs`: the jobs the viewer may read, newest first.
pub async fn list(
    State(services): State<Services>,
    Viewer(session): Viewer,
    Query(query): Query<ListQuery>,
) -> Result<Html<String>, PageError> {
    let jobs = query.jobs()?;
    let page = Page::new(query.cursor.as_deref(), query.limit)
        .map_err(|err| PageError::Core(CoreError::Invalid(err)))?;
    let found = services.visible_jobs(&session.caller, jobs, page).await?;
    let limit = page.limit.to_string();
    let filters = [
        ("repo", query.repo.trim()),
        ("state", query.state.as_str()),
        ("kind", query.kind.as_str()),
    ];
    let older = found.next_cursor.map(|cursor| {
        let cursor = cursor.to_string();
        let mut pairs = filters.to_vec();
        pairs.push(("cursor", &cursor));
        if query.limit.is_some() {
            pairs.push(("limit", &limit));
        }
        format!("/jobs?{}", query_string(&pairs))
    });
    render(&JobsPage {
        layout: Layout::new("Jobs", "jobs", Some(&session)),
        jobs_script: &JOBS_SCRIPT.url,
        rows: found.jobs.iter().map(JobRow::from).collect(),
        repo: query.repo.trim().to_owned(),
        state: query.state.clone(),
        states: choices(
            &[
                "queued",
                "running",
                "succeeded",
                "failed",
                "cancelled",
                "timed_out",
                "lost",
            ],
            &query.state,
        ),
        kinds: choices(&["test", "deploy", "custom"], &query.kind),
        older,
        first_page: query.cursor.is_none(),
        events_query: query_string(&filters),
    })
}

/// `GET /jobs/events`: a `job` event (the row as JSON) each time a job the
/// viewer may read and the filters match changes; `resync` when changes
/// may have been missed.
pub async fn events(
    State(services): State<Services>,
    Extension(Shutdown(shutdown)): Extension<Shutdown>,
    Viewer(session): Viewer,
    Query(query): Query<ListQuery>,
) -> Result<Response, PageError> {
    let changes = services.job_changes(session.caller, query.jobs()?)?;
    let first = futures_util::stream::once(async {
        Ok::<_, Infallible>(Event::default().retry(EVENTS_RETRY).comment("jobs"))
    });
    let events = changes.map(|change| {
        Ok::<_, Infallible>(match change {
            JobChange::Changed(job) => Event::default().event("job").data(
                serde_json::to_string(&JobRow::from(job.as_ref()))
                    .unwrap_or_else(|_| "{}".to_owned()),
            ),
            JobChange::Resync => Event::default().event("resync").data("{}"),
        })
    });
    Ok(Sse::new(until_shutdown(first.chain(events), shutdown))
        .keep_alive(KeepAlive::new().interval(EVENTS_KEEPALIVE_INTERVAL))
        .into_response())
}
