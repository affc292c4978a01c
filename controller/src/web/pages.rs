//! The dashboard's pages: sign-in and sign-out, repositories, agents (a
//! job's page is in `job.rs`). Each
//! handler finds the caller (`Viewer`), calls the core as the REST API does,
//! and renders a template from plain view structs.

use askama::Template;
use axum::Form;
use axum::extract::{FromRequestParts, State};
use axum::http::{StatusCode, header, request::Parts};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use hobotnica_common::job::Job;
use serde::Deserialize;

use super::PageError;
use super::assets::{SCRIPT, STYLESHEET};
use super::session::{self, Posted, Viewer};
use crate::error::CoreError;
use crate::repos::RepoOverview;
use crate::services::Services;
use crate::sessions::WebSession;

/// What the layout (`base.html`) shows around every page.
pub struct Layout {
    pub title: String,
    /// The navigation entry of this page.
    pub current: &'static str,
    pub user: Option<UserView>,
    pub stylesheet: &'static str,
    pub script: &'static str,
}

/// The signed-in user, for the navigation and the sign-out form.
pub struct UserView {
    pub name: String,
    pub is_admin: bool,
    pub csrf_token: String,
}

impl Layout {
    pub fn new(title: &str, current: &'static str, session: Option<&WebSession>) -> Layout {
        Layout {
            title: title.to_owned(),
            current,
            user: session.map(|session| UserView {
                name: session.caller.name(),
                is_admin: session.caller.is_admin(),
                csrf_token: session.csrf_token().to_owned(),
            }),
            stylesheet: &STYLESHEET.url,
            script: &SCRIPT.url,
        }
    }
}

pub fn render(template: &impl Template) -> Result<Html<String>, PageError> {
    Ok(Html(template.render()?))
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    layout: Layout,
    message: &'a str,
}

/// A page that says what went wrong, with `status`.
pub fn error_page(status: StatusCode, title: &str, message: &str) -> Response {
    let page = ErrorPage {
        layout: Layout::new(title, "", None),
        message,
    };
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(_) => (status, message.to_owned()).into_response(),
    }
}

/// `GET /`: the repositories when signed in, else the sign-in page.
pub async fn home(viewer: Result<Viewer, PageError>) -> Response {
    match viewer {
        Ok(_) => Redirect::to("/repos").into_response(),
        Err(PageError::SignInFirst) => Redirect::to("/sign-in").into_response(),
        Err(err) => err.into_response(),
    }
}

#[derive(Template)]
#[template(path = "sign_in.html")]
struct SignInPage {
    layout: Layout,
    error: Option<String>,
    login: String,
}

/// `GET /sign-in`.
pub async fn sign_in_form(viewer: Result<Viewer, PageError>) -> Result<Response, PageError> {
    if viewer.is_ok() {
        return Ok(Redirect::to("/repos").into_response());
    }
    Ok(render(&SignInPage {
        layout: Layout::new("Sign in", "sign-in", None),
        error: None,
        login: String::new(),
    })?
    .into_response())
}

#[derive(Deserialize)]
pub struct SignInForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    login: String,
}

/// The request's parts, for the checks that read headers.
pub struct RequestParts(pub Parts);

impl<S: Send + Sync> FromRequestParts<S> for RequestParts {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(RequestParts(parts.clone()))
    }
}

/// `POST /sign-in`: the same credentials (and the same limits on failed
/// attempts) as the REST API; a session and its cookie on success.
pub async fn sign_in(
    State(services): State<Services>,
    RequestParts(parts): RequestParts,
    Form(form): Form<SignInForm>,
) -> Result<Response, PageError> {
    session::check_same_origin(&parts)?;
    let token = form.token.trim();
    let login = form.login.trim();
    let failed = |message: String, status: StatusCode| -> Result<Response, PageError> {
        let page = SignInPage {
            layout: Layout::new("Sign in", "sign-in", None),
            error: Some(message),
            login: login.to_owned(),
        };
        Ok((status, render(&page)?).into_response())
    };
    if token.is_empty() {
        return failed(
            "Enter a token.".to_owned(),
            StatusCode::UNPROCESSABLE_ENTITY,
        );
    }
    let github_login = (!login.is_empty()).then_some(login);
    match services
        .sign_in(token, github_login, session::client_ip(&parts))
        .await
    {
        Ok((id, _)) => {
            let tls = services.config.tls_enabled();
            Ok((
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, header::HeaderValue::from_static("/repos")),
                    (header::SET_COOKIE, session::set_cookie(&id, tls)),
                ],
            )
                .into_response())
        }
        Err(CoreError::Unauthorized(why)) => failed(
            format!(
                "Wrong credentials: {why}. Sign in with the admin token (GitHub username empty), or with a GitHub token and its username."
            ),
            StatusCode::UNAUTHORIZED,
        ),
        Err(err @ (CoreError::TooManyFailures { .. } | CoreError::RateLimited(_))) => {
            failed(format!("{err}."), StatusCode::TOO_MANY_REQUESTS)
        }
        Err(CoreError::Upstream(why)) => failed(why, StatusCode::BAD_GATEWAY),
        Err(err) => Err(err.into()),
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

impl session::CsrfCarrier for CsrfForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /sign-out`: ends the session everywhere and removes the cookie.
pub async fn sign_out(
    State(services): State<Services>,
    RequestParts(parts): RequestParts,
    Posted { .. }: Posted<CsrfForm>,
) -> Result<Response, PageError> {
    if let Some(id) = session::session_cookie(&parts.headers) {
        services.sign_out(id).await?;
    }
    let tls = services.config.tls_enabled();
    Ok((
        StatusCode::SEE_OTHER,
        [
            (
                header::LOCATION,
                header::HeaderValue::from_static("/sign-in"),
            ),
            (header::SET_COOKIE, session::clear_cookie(tls)),
        ],
    )
        .into_response())
}

/// A job as a table cell shows it.
pub struct JobCell {
    pub id: u64,
    pub state: &'static str,
    pub commit: String,
    pub who: String,
    pub when: String,
    pub when_iso: String,
}

pub fn time_text(at: DateTime<Utc>) -> (String, String) {
    (
        at.format("%Y-%m-%d %H:%M UTC").to_string(),
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

impl From<&Job> for JobCell {
    fn from(job: &Job) -> JobCell {
        let (when, when_iso) = time_text(job.finished_at.unwrap_or(job.created_at));
        JobCell {
            id: job.id.0,
            state: job.state.as_str(),
            commit: job.commit.to_string().chars().take(12).collect(),
            who: job
                .requested_by
                .clone()
                .unwrap_or_else(|| "unknown".to_owned()),
            when,
            when_iso,
        }
    }
}

pub struct RepoRow {
    pub full_name: String,
    pub default_branch: String,
    pub github_page: Option<String>,
    /// For a repository registered by git URL.
    pub git_url: Option<String>,
    pub webhook_url: Option<String>,
    pub disabled: Option<String>,
    pub last_test: Option<JobCell>,
    pub last_deploy: Option<JobCell>,
}

#[derive(Template)]
#[template(path = "repos.html")]
struct ReposPage {
    layout: Layout,
    is_admin: bool,
    repos: Vec<RepoRow>,
}

/// `GET /repos`: the repositories the caller may read.
pub async fn repos(
    State(services): State<Services>,
    Viewer(session): Viewer,
) -> Result<Html<String>, PageError> {
    let overviews = services.visible_repos(&session.caller).await?;
    let repos = overviews
        .iter()
        .map(
            |RepoOverview {
                 repo,
                 last_deploy,
                 last_test,
             }| RepoRow {
                full_name: repo.full_name(),
                default_branch: repo.default_branch.clone(),
                github_page: services.github_page(repo),
                git_url: repo.github.is_none().then(|| repo.git_url.clone()),
                webhook_url: services.repo_webhook_url(repo),
                disabled: repo.disabled.clone(),
                last_test: last_test.as_ref().map(JobCell::from),
                last_deploy: last_deploy.as_ref().map(JobCell::from),
            },
        )
        .collect();
    render(&ReposPage {
        is_admin: session.caller.is_admin(),
        layout: Layout::new("Repositories", "repos", Some(&session)),
        repos,
    })
}

pub struct AgentRow {
    pub name: String,
    pub connected: bool,
    pub labels: Vec<String>,
    pub concurrency: u32,
    pub running_jobs: String,
    pub last_seen: String,
    pub last_seen_iso: String,
    pub version: String,
    pub controller: Option<String>,
}

#[derive(Template)]
#[template(path = "agents.html")]
struct AgentsPage {
    layout: Layout,
    connected: usize,
    agents: Vec<AgentRow>,
}

/// `GET /agents`: every agent (the admin only, as in the REST API).
pub async fn agents(
    State(services): State<Services>,
    Viewer(session): Viewer,
) -> Result<Html<String>, PageError> {
    let overviews = services.agents_overview(&session.caller).await?;
    let agents: Vec<AgentRow> = overviews
        .into_iter()
        .map(|overview| {
            let (last_seen, last_seen_iso) = time_text(overview.agent.last_seen);
            AgentRow {
                name: overview.agent.name,
                connected: overview.connected,
                labels: overview
                    .agent
                    .labels
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect(),
                concurrency: overview.agent.concurrency,
                running_jobs: overview
                    .running_jobs
                    .iter()
                    .map(|id| format!("#{id}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                last_seen,
                last_seen_iso,
                version: overview.agent.version,
                controller: overview.agent.controller,
            }
        })
        .collect();
    render(&AgentsPage {
        connected: agents.iter().filter(|agent| agent.connected).count(),
        layout: Layout::new("Agents", "agents", Some(&session)),
        agents,
    })
}
