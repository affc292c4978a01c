//! A job's page (`/jobs/{id}`): its facts, Cancel and Retry for callers with
//! push access, and the log, shown from its last part and followed live
//! (`log.js` over `live.rs`'s events).

use askama::Template;
use axum::extract::{Path, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use hobotnica_common::ids::JobId;
use hobotnica_common::job::{Job, Trigger};
use serde::Serialize;

use super::PageError;
use super::assets::LOG_SCRIPT;
use super::pages::{CsrfForm, Layout, render, time_text};
use super::session::{Posted, Viewer};
use crate::error::CoreError;
use crate::services::Services;

/// How much of the end of a log the page loads at first; "Load earlier"
/// fetches the rest piece by piece.
pub const LOG_WINDOW_BYTES: u64 = 256 * 1024;

/// A job id from the path; a malformed one is a job that does not exist.
pub fn job_id(raw: &str) -> Result<JobId, PageError> {
    raw.parse()
        .map_err(|_| PageError::Core(CoreError::NotFound(format!("job {raw}"))))
}

/// What a job's facts look like on its page (and in the log's end event).
#[derive(Serialize)]
pub struct JobFacts {
    pub state: &'static str,
    pub terminal: bool,
    pub agent: String,
    pub started: String,
    pub started_iso: String,
    pub finished: String,
    pub finished_iso: String,
    pub duration: String,
    pub exit_code: String,
    pub message: String,
}

/// `1h 02m 03s`, `2m 05s`, `4.2s`.
pub fn duration_text(milliseconds: i64) -> String {
    let milliseconds = milliseconds.max(0);
    let seconds = milliseconds / 1000;
    match (seconds / 3600, seconds / 60 % 60, seconds % 60) {
        (0, 0, _) => format!("{:.1}s", milliseconds as f64 / 1000.0),
        (0, minutes, seconds) => format!("{minutes}m {seconds:02}s"),
        (hours, minutes, seconds) => format!("{hours}h {minutes:02}m {seconds:02}s"),
    }
}

fn optional_time(at: Option<DateTime<Utc>>) -> (String, String) {
    at.map(time_text).unwrap_or_default()
}

impl From<&Job> for JobFacts {
    fn from(job: &Job) -> JobFacts {
        let (started, started_iso) = optional_time(job.started_at);
        let (finished, finished_iso) = optional_time(job.finished_at);
        JobFacts {
            state: job.state.as_str(),
            terminal: job.state.is_terminal(),
            agent: job.agent_name.clone().unwrap_or_default(),
            started,
            started_iso,
            finished,
            finished_iso,
            duration: job
                .started_at
                .map(|started| {
                    duration_text(
                        (job.finished_at.unwrap_or_else(Utc::now) - started).num_milliseconds(),
                    )
                })
                .unwrap_or_default(),
            exit_code: job
                .exit_code
                .map(|code| code.to_string())
                .unwrap_or_default(),
            message: job.message.clone().unwrap_or_default(),
        }
    }
}

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage {
    layout: Layout,
    log_script: &'static str,
    id: u64,
    repo: String,
    commit: String,
    commit_short: String,
    commit_page: Option<String>,
    branch: Option<String>,
    target: String,
    kind: &'static str,
    trigger: &'static str,
    requested_by: String,
    created: String,
    created_iso: String,
    facts: JobFacts,
    may_change: bool,
    csrf_token: String,
    log_start: u64,
    log_lines_before: u64,
    log_colours: String,
    log_length: u64,
}

fn trigger_text(trigger: Trigger) -> &'static str {
    match trigger {
        Trigger::Api => "API",
        Trigger::Webhook => "GitHub webhook",
        Trigger::Retry => "retry",
    }
}

/// `GET /jobs/{id}`: the same authorisation as `GET /api/v1/jobs/{id}`.
pub async fn show(
    State(services): State<Services>,
    Viewer(session): Viewer,
    Path(id): Path<String>,
) -> Result<Html<String>, PageError> {
    let id = job_id(&id)?;
    let overview = services.job_overview(&session.caller, id).await?;
    let window = services
        .log_window(&session.caller, id, LOG_WINDOW_BYTES)
        .await?;
    let job = &overview.job;
    let (created, created_iso) = time_text(job.created_at);
    render(&JobPage {
        layout: Layout::new(&format!("Job #{id}"), "jobs", Some(&session)),
        log_script: &LOG_SCRIPT.url,
        id: id.0,
        repo: job.repo.to_string(),
        commit: job.commit.to_string(),
        commit_short: job.commit.to_string().chars().take(12).collect(),
        commit_page: overview.commit_page.clone(),
        branch: job.branch.clone(),
        target: job.target.clone(),
        kind: job.kind.as_str(),
        trigger: trigger_text(job.trigger),
        requested_by: job.requested_by.clone().unwrap_or_default(),
        created,
        created_iso,
        facts: JobFacts::from(job),
        may_change: overview.may_change,
        csrf_token: session.csrf_token().to_owned(),
        log_start: window.start,
        log_lines_before: window.lines_before,
        log_colours: window.colours,
        log_length: window.length,
    })
}

/// `POST /jobs/{id}/cancel`: as `POST /api/v1/jobs/{id}/cancel` (push
/// access), then back to the job's page.
pub async fn cancel(
    State(services): State<Services>,
    Path(id): Path<String>,
    Posted {
        session: web_session,
        ..
    }: Posted<CsrfForm>,
) -> Result<Response, PageError> {
    let id = job_id(&id)?;
    services.cancel(&web_session.caller, id).await?;
    Ok(see_other(id))
}

/// `POST /jobs/{id}/retry`: as `POST /api/v1/jobs/{id}/retry` (push
/// access), then to the new job's page.
pub async fn retry(
    State(services): State<Services>,
    Path(id): Path<String>,
    Posted {
        session: web_session,
        ..
    }: Posted<CsrfForm>,
) -> Result<Response, PageError> {
    let job = services.retry(&web_session.caller, job_id(&id)?).await?;
    Ok(see_other(job.id))
}

fn see_other(id: JobId) -> Response {
    Redirect::to(&format!("/jobs/{id}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::duration_text;

    #[test]
    fn durations_read_as_a_person_says_them() {
        assert_eq!(duration_text(0), "0.0s");
        assert_eq!(duration_text(4_249), "4.2s");
        assert_eq!(duration_text(125_000), "2m 05s");
        assert_eq!(duration_text(3_723_000), "1h 02m 03s");
        assert_eq!(duration_text(-5), "0.0s");
    }
}
