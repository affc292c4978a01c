//! A repository's page (`/repos/{owner}/{name}`): its recent jobs and
//! deploys, **Deploy** (the branch tip or a tested commit, through a
//! confirmation page) and its **variables** (list; set and remove for
//! callers with push access). Every action is the REST API's core call:
//! `Services::deploy` with an `Idempotency-Key`, `set_variable`,
//! `remove_variable`. A secret's value is never rendered: the page shows
//! only that it is set.

use std::time::Duration;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use hobotnica_common::ids::CommitSha;
use hobotnica_common::job::{EnvScope, EnvValue, EnvVar, Job};
use hobotnica_common::token::random_hex;
use serde::Deserialize;

use super::PageError;
use super::pages::{JobCell, Layout, render};
use super::session::{self, Posted, Viewer};
use crate::error::CoreError;
use crate::jobs::JobRequest;
use crate::repos::RepoDetails;
use crate::services::Services;
use crate::sessions::WebSession;
use crate::variables::SetEnv;

/// How long a deploy whose `Idempotency-Key` is still being handled by an
/// earlier submission of the same form (a double click) waits for it
/// before the page says so.
const REPEAT_WAIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How often such a deploy looks again.
const REPEAT_WAIT_INTERVAL: Duration = Duration::from_millis(100);

/// A job as a row of the repository's page.
pub struct JobRow {
    pub cell: JobCell,
    pub target: String,
    pub kind: &'static str,
    pub branch: String,
    pub commit_full: String,
}

impl From<&Job> for JobRow {
    fn from(job: &Job) -> JobRow {
        JobRow {
            cell: JobCell::from(job),
            target: job.target.clone(),
            kind: job.kind.as_str(),
            branch: job.branch.clone().unwrap_or_default(),
            commit_full: job.commit.to_string(),
        }
    }
}

/// A variable as the page lists it: a secret has no value here at all.
pub struct VariableRow {
    pub key: String,
    pub scope: &'static str,
    /// `None` for a secret.
    pub value: Option<String>,
}

pub fn scope_name(scope: EnvScope) -> &'static str {
    match scope {
        EnvScope::All => "all",
        EnvScope::Test => "test",
        EnvScope::Deploy => "deploy",
    }
}

fn parse_scope(raw: &str) -> Result<EnvScope, PageError> {
    match raw {
        "all" | "" => Ok(EnvScope::All),
        "test" => Ok(EnvScope::Test),
        "deploy" => Ok(EnvScope::Deploy),
        _ => Err(PageError::Core(CoreError::invalid(
            "scope",
            "must be all, test or deploy",
        ))),
    }
}

impl From<&EnvVar> for VariableRow {
    fn from(var: &EnvVar) -> VariableRow {
        VariableRow {
            key: var.key.clone(),
            scope: scope_name(var.scope),
            value: match &var.value {
                EnvValue::Plain(value) => Some(value.clone()),
                EnvValue::Sealed(_) => None,
            },
        }
    }
}

#[derive(Template)]
#[template(path = "repo.html")]
struct RepoPage {
    layout: Layout,
    owner: String,
    name: String,
    full_name: String,
    default_branch: String,
    github_page: Option<String>,
    disabled: Option<String>,
    may_push: bool,
    csrf_token: String,
    recent_jobs: Vec<JobRow>,
    deploys: Vec<JobRow>,
    candidates: Vec<JobRow>,
    variables: Vec<VariableRow>,
    scopes: [&'static str; 3],
    /// Why the last variable change was refused, shown at its form.
    variable_error: Option<String>,
    /// The name the refused change was for (never its value).
    variable_key: String,
}

/// Renders the page of `owner/name` for the session, with an optional
/// refusal to show at the variables form.
async fn repo_page(
    services: &Services,
    session: &WebSession,
    owner: &str,
    name: &str,
    variable_error: Option<(String, String)>,
) -> Result<Html<String>, PageError> {
    let RepoDetails {
        overview,
        may_push,
        recent_jobs,
        deploys,
        tested_commits,
    } = services.repo_details(&session.caller, owner, name).await?;
    let variables = services.variables(&session.caller, owner, name).await?;
    let repo = &overview.repo;
    let (variable_key, variable_error) = match variable_error {
        Some((key, why)) => (key, Some(why)),
        None => (String::new(), None),
    };
    render(&RepoPage {
        layout: Layout::new(&repo.full_name(), "repos", Some(session)),
        owner: repo.owner.clone(),
        name: repo.name.clone(),
        full_name: repo.full_name(),
        default_branch: repo.default_branch.clone(),
        github_page: services.github_page(repo),
        disabled: repo.disabled.clone(),
        may_push,
        csrf_token: session.csrf_token().to_owned(),
        recent_jobs: recent_jobs.iter().map(JobRow::from).collect(),
        deploys: deploys.iter().map(JobRow::from).collect(),
        candidates: tested_commits.iter().map(JobRow::from).collect(),
        variables: variables.iter().map(VariableRow::from).collect(),
        scopes: ["all", "test", "deploy"],
        variable_error,
        variable_key,
    })
}

/// `GET /repos/{owner}/{name}`: the same authorisation as
/// `GET /api/v1/repos/{owner}/{name}`.
pub async fn show(
    State(services): State<Services>,
    Viewer(session): Viewer,
    Path((owner, name)): Path<(String, String)>,
) -> Result<Html<String>, PageError> {
    repo_page(&services, &session, &owner, &name, None).await
}

/// What the repository page's deploy form chose: a commit (with the branch
/// it ran on), or nothing for the default branch's tip.
#[derive(Deserialize)]
pub struct DeployChoice {
    #[serde(default)]
    commit: String,
}

#[derive(Template)]
#[template(path = "deploy_confirm.html")]
struct ConfirmPage {
    layout: Layout,
    owner: String,
    name: String,
    full_name: String,
    commit: String,
    commit_short: String,
    branch: String,
    test_state: Option<&'static str>,
    csrf_token: String,
    idempotency_key: String,
}

/// `GET /repos/{owner}/{name}/deploy?commit=`: the confirmation step. It
/// names repository, commit and branch, and carries a fresh
/// `Idempotency-Key` for this one deploy.
pub async fn confirm(
    State(services): State<Services>,
    Viewer(session): Viewer,
    Path((owner, name)): Path<(String, String)>,
    Query(choice): Query<DeployChoice>,
) -> Result<Html<String>, PageError> {
    let details = services
        .repo_details(&session.caller, &owner, &name)
        .await?;
    let repo = &details.overview.repo;
    if !details.may_push {
        return Err(PageError::Core(CoreError::Forbidden(format!(
            "deploying {} needs push access",
            repo.full_name()
        ))));
    }
    let (commit, branch, test_state) = if choice.commit.is_empty() {
        (String::new(), repo.default_branch.clone(), None)
    } else {
        let chosen = details
            .tested_commits
            .iter()
            .find(|job| job.commit.as_str() == choice.commit)
            .ok_or_else(|| {
                PageError::Core(CoreError::NotFound(format!(
                    "tested commit {}",
                    choice.commit
                )))
            })?;
        (
            chosen.commit.to_string(),
            chosen
                .branch
                .clone()
                .unwrap_or_else(|| repo.default_branch.clone()),
            Some(chosen.state.as_str()),
        )
    };
    render(&ConfirmPage {
        layout: Layout::new(
            &format!("Deploy {}", repo.full_name()),
            "repos",
            Some(&session),
        ),
        owner: repo.owner.clone(),
        name: repo.name.clone(),
        full_name: repo.full_name(),
        commit_short: commit.chars().take(12).collect(),
        commit,
        branch,
        test_state,
        csrf_token: session.csrf_token().to_owned(),
        idempotency_key: format!("web-{}", random_hex(16)),
    })
}

#[derive(Deserialize)]
pub struct DeployForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    commit: String,
    #[serde(default)]
    branch: String,
    #[serde(default)]
    idempotency_key: String,
}

impl session::CsrfCarrier for DeployForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /repos/{owner}/{name}/deploy`: `POST
/// /api/v1/repos/{owner}/{name}/deploy` with the form's `Idempotency-Key`
/// (push access), then to the deploy job's page. The same form sent again
/// (a double click, a resubmission) lands on the same job.
pub async fn deploy(
    State(services): State<Services>,
    Path((owner, name)): Path<(String, String)>,
    Posted {
        session: web_session,
        form,
    }: Posted<DeployForm>,
) -> Result<Response, PageError> {
    if form.idempotency_key.is_empty() {
        return Err(PageError::Refused(
            "The deploy form carried no Idempotency-Key.",
        ));
    }
    let commit = if form.commit.is_empty() {
        None
    } else {
        let sha: CommitSha = form
            .commit
            .parse()
            .map_err(|_| CoreError::invalid("commit", "not a 40-character commit sha"))?;
        Some(sha.to_string())
    };
    let request = JobRequest {
        target: "deploy".to_owned(),
        commit,
        branch: (!form.branch.is_empty()).then(|| form.branch.clone()),
        env: Default::default(),
    };
    let deadline = tokio::time::Instant::now() + REPEAT_WAIT_TIMEOUT;
    let job = loop {
        match services
            .deploy(
                &web_session.caller,
                &owner,
                &name,
                request.clone(),
                Some(&form.idempotency_key),
            )
            .await
        {
            Ok((job, _)) => break job,
            // The same form's earlier submission is still deploying: its
            // job is this one's too, once it is queued.
            Err(CoreError::Conflict(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(REPEAT_WAIT_INTERVAL).await;
            }
            Err(err) => return Err(err.into()),
        }
    };
    Ok(Redirect::to(&format!("/jobs/{}", job.id)).into_response())
}

#[derive(Deserialize)]
pub struct VariableForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    value: String,
    /// A checkbox: present when ticked.
    #[serde(default)]
    secret: Option<String>,
}

impl session::CsrfCarrier for VariableForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /repos/{owner}/{name}/variables`: `PUT
/// /api/v1/repos/{owner}/{name}/env/{key}` (push access). A refused name or
/// value shows the API's reason at the form, without the value.
pub async fn set_variable(
    State(services): State<Services>,
    Path((owner, name)): Path<(String, String)>,
    Posted {
        session: web_session,
        form,
    }: Posted<VariableForm>,
) -> Result<Response, PageError> {
    let set = SetEnv {
        key: form.key.trim().to_owned(),
        value: form.value,
        secret: form.secret.is_some(),
        scope: parse_scope(&form.scope)?,
    };
    let key = set.key.clone();
    match services
        .set_variable(&web_session.caller, &owner, &name, set)
        .await
    {
        Ok(_) => Ok(back_to_variables(&owner, &name)),
        Err(CoreError::Invalid(invalid)) => {
            let why = format!("{}: {}", invalid.field, invalid.reason);
            let page = repo_page(&services, &web_session, &owner, &name, Some((key, why))).await?;
            Ok((StatusCode::UNPROCESSABLE_ENTITY, page).into_response())
        }
        Err(err) => Err(err.into()),
    }
}

#[derive(Deserialize)]
pub struct RemoveVariableForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    scope: String,
}

impl session::CsrfCarrier for RemoveVariableForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /repos/{owner}/{name}/variables/remove`: `DELETE
/// /api/v1/repos/{owner}/{name}/env/{key}?scope=` (push access).
pub async fn remove_variable(
    State(services): State<Services>,
    Path((owner, name)): Path<(String, String)>,
    Posted {
        session: web_session,
        form,
    }: Posted<RemoveVariableForm>,
) -> Result<Response, PageError> {
    let scope = parse_scope(&form.scope)?;
    services
        .remove_variable(&web_session.caller, &owner, &name, &form.key, Some(scope))
        .await?;
    Ok(back_to_variables(&owner, &name))
}

fn back_to_variables(owner: &str, name: &str) -> Response {
    Redirect::to(&format!("/repos/{owner}/{name}#variables")).into_response()
}
