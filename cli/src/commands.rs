//! The REST subcommands: `repos`, `run`, `deploy`, `deploys`, `env`, `jobs`
//! and `agents`. Each one is a request, then a table (or the API's JSON with
//! `--json`); `run --follow` and `deploy --follow` then tail the log.

use std::collections::BTreeMap;
use std::io::{BufRead as _, IsTerminal as _, Read as _, Write as _};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hobotnica_common::size::human_size;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::{ApiError, Client, Unreachable, encode_query, repo_path, typed};
use crate::config::{
    AgentsCommand, DeployArgs, DeploysArgs, EnvCommand, JobsCommand, ReposCommand, RunArgs,
};
use crate::logs;
use crate::output::{
    Table, duration, or_dash, print_fields, print_json, printable, short_sha, time,
};

/// Attempts at sending one deploy request. Every attempt carries the same
/// `Idempotency-Key`, so however many reach the controller, one job results.
const DEPLOY_ATTEMPTS: u32 = 4;
/// Pause before the first retry of a deploy request; doubles after each.
const DEPLOY_RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// How often `deploy --follow` asks whether its queued job has started.
const START_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Random bytes in a generated `Idempotency-Key` (hex-encoded: twice as many
/// characters).
const IDEMPOTENCY_KEY_BYTES: usize = 16;

/// A repository as the API returns it.
#[derive(Deserialize)]
struct RepoView {
    full_name: String,
    git_url: String,
    default_branch: String,
    timeout_secs: Option<u64>,
    /// The repository's own log limit; `None`: the controller's.
    #[serde(default)]
    max_log_bytes: Option<u64>,
    created_at: Option<String>,
}

/// A job as the API returns it.
#[derive(Deserialize)]
pub struct JobView {
    pub id: u64,
    pub repo: String,
    #[serde(default)]
    pub kind: Option<String>,
    pub target: String,
    pub state: String,
    pub commit: String,
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub trigger: Option<String>,
    #[serde(default)]
    pub attempt: Option<u32>,
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
    /// Names of the job's one-time variables.
    #[serde(default)]
    pub env_keys: Vec<String>,
}

/// A repository variable as the API returns it (`value` is `None` for a
/// secret).
#[derive(Deserialize)]
pub struct EnvVarView {
    pub key: String,
    pub scope: String,
    pub secret: bool,
    #[serde(default)]
    pub value: Option<String>,
}

/// An agent as the API returns it.
#[derive(Deserialize)]
struct AgentView {
    id: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    concurrency: Option<u32>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    connected: bool,
    #[serde(default)]
    running_jobs: Vec<u64>,
    #[serde(default)]
    last_seen: Option<String>,
}

#[derive(Deserialize)]
struct Items<T> {
    items: Vec<T>,
}

pub async fn repos(client: &Client, command: ReposCommand, json: bool) -> anyhow::Result<()> {
    match command {
        ReposCommand::Add {
            name,
            git_url,
            branch,
            max_log_bytes,
        } => {
            let mut body = json!({ "name": name, "git_url": git_url });
            if let Some(branch) = branch {
                body["branch"] = Value::String(branch);
            }
            if let Some(max_log_bytes) = max_log_bytes {
                body["max_log_bytes"] = json!(max_log_bytes);
            }
            let repo = client
                .json(Method::POST, "/api/v1/repos", Some(&body))
                .await?;
            if json {
                print_json(&repo);
            } else {
                let view: RepoView = typed(&repo)?;
                println!(
                    "registered {} ({}, branch {})",
                    view.full_name, view.git_url, view.default_branch
                );
            }
        }
        ReposCommand::Ls => {
            let list = client.get("/api/v1/repos").await?;
            if json {
                print_json(&list);
                return Ok(());
            }
            let list: Items<RepoView> = typed(&list)?;
            let mut table = Table::new(vec!["REPO", "BRANCH", "TIMEOUT", "CREATED", "GIT URL"]);
            for repo in list.items {
                table.row(vec![
                    repo.full_name,
                    repo.default_branch,
                    or_dash(repo.timeout_secs.map(|secs| format!("{secs}s"))),
                    time(repo.created_at.as_deref()),
                    repo.git_url,
                ]);
            }
            table.print();
        }
        ReposCommand::Show { repo } => {
            let (owner, name) = repo_path(&repo)?;
            let repo = client.get(&format!("/api/v1/repos/{owner}/{name}")).await?;
            if json {
                print_json(&repo);
                return Ok(());
            }
            let view: RepoView = typed(&repo)?;
            print_fields(&[
                ("repo", view.full_name),
                ("git url", view.git_url),
                ("branch", view.default_branch),
                (
                    "timeout",
                    or_dash(view.timeout_secs.map(|secs| format!("{secs}s"))),
                ),
                (
                    "log limit",
                    view.max_log_bytes.map_or_else(
                        || "the controller's".to_owned(),
                        |bytes| format!("{} ({bytes} bytes)", human_size(bytes)),
                    ),
                ),
                ("created", time(view.created_at.as_deref())),
            ]);
        }
        ReposCommand::Rm { repo } => {
            let (owner, name) = repo_path(&repo)?;
            client
                .json(
                    Method::DELETE,
                    &format!("/api/v1/repos/{owner}/{name}"),
                    None,
                )
                .await?;
            if !json {
                println!("removed {owner}/{name}");
            }
        }
    }
    Ok(())
}

pub async fn run(client: &Client, args: RunArgs, json: bool) -> anyhow::Result<ExitCode> {
    let (owner, name) = repo_path(&args.repo)?;
    let mut body = json!({ "target": args.target });
    if let Some(commit) = args.commit {
        body["commit"] = Value::String(commit);
    }
    if let Some(branch) = args.branch {
        body["branch"] = Value::String(branch);
    }
    if !args.env.is_empty() {
        body["env"] = env_object(args.env);
    }
    let job = client
        .json(
            Method::POST,
            &format!("/api/v1/repos/{owner}/{name}/jobs"),
            Some(&body),
        )
        .await?;
    let view: JobView = typed(&job)?;
    if args.follow {
        // stdout carries the log's bytes unchanged; the id goes to stderr.
        eprintln!(
            "job {} queued: {} make {} at {}",
            view.id,
            view.repo,
            view.target,
            short_sha(&view.commit)
        );
        return logs::tail(client, view.id, 0, true, args.raw).await;
    }
    if json {
        print_json(&job);
    } else {
        print_queued(&view);
    }
    Ok(ExitCode::SUCCESS)
}

/// What `run` and `deploy` without `--follow` say they queued: the job on
/// stdout, how to follow it on stderr.
fn print_queued(view: &JobView) {
    println!(
        "job {} queued: {} make {} at {}",
        view.id,
        view.repo,
        view.target,
        short_sha(&view.commit)
    );
    eprintln!("follow it: hobot logs -f {}", view.id);
}

/// One-time variables as the API's `env` object.
fn env_object(env: Vec<(String, String)>) -> Value {
    Value::Object(
        env.into_iter()
            .map(|(key, value)| (key, Value::String(value)))
            .collect(),
    )
}

/// The body of `POST /repos/{owner}/{name}/deploy`.
fn deploy_body(
    commit: Option<String>,
    branch: Option<String>,
    env: Vec<(String, String)>,
) -> Value {
    let mut body = json!({});
    if let Some(commit) = commit {
        body["commit"] = Value::String(commit);
    }
    if let Some(branch) = branch {
        body["branch"] = Value::String(branch);
    }
    if !env.is_empty() {
        body["env"] = env_object(env);
    }
    body
}

/// `deploy of <sha> on <branch>`, for progress lines.
fn describe_deploy(job: &JobView) -> String {
    match &job.branch {
        Some(branch) => format!("deploy of {} on {branch}", job.commit),
        None => format!("deploy of {}", job.commit),
    }
}

pub async fn deploy(client: &Client, args: DeployArgs, json: bool) -> anyhow::Result<ExitCode> {
    let (owner, name) = repo_path(&args.repo)?;
    let body = deploy_body(args.commit, args.branch, args.env);
    let idempotency_key = args
        .idempotency_key
        .unwrap_or_else(|| hobotnica_common::token::random_hex(IDEMPOTENCY_KEY_BYTES));
    let path = format!("/api/v1/repos/{owner}/{name}/deploy");
    let (status, job) = send_deploy(client, &path, &body, &idempotency_key).await?;
    let view: JobView = typed(&job)?;
    // Progress goes to stderr: stdout is the id, the JSON or the log.
    if status == StatusCode::OK {
        eprintln!(
            "job {} was already requested with this idempotency key ({}, {})",
            view.id,
            describe_deploy(&view),
            view.state
        );
    } else {
        eprintln!("queued job {} ({})", view.id, describe_deploy(&view));
    }
    if args.follow {
        wait_until_started(client, &view).await?;
        return logs::tail(client, view.id, 0, true, args.raw).await;
    }
    if json {
        print_json(&job);
    } else {
        print_queued(&view);
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends a deploy request, retrying when the answer may not have arrived or
/// the controller asks to retry; returns the status (202 new job, 200 the
/// job an earlier request with this key created) and the job.
async fn send_deploy(
    client: &Client,
    path: &str,
    body: &Value,
    idempotency_key: &str,
) -> anyhow::Result<(StatusCode, Value)> {
    let mut pause = DEPLOY_RETRY_INTERVAL;
    let mut attempt = 1;
    loop {
        let result = async {
            let response = client
                .send_with_headers(
                    Method::POST,
                    path,
                    Some(body),
                    &[("Idempotency-Key", idempotency_key)],
                )
                .await?;
            let status = response.status();
            let bytes = response
                .bytes()
                .await
                .context("the controller's answer was cut off")?;
            let job: Value =
                serde_json::from_slice(&bytes).context("the controller's answer is not JSON")?;
            anyhow::Ok((status, job))
        }
        .await;
        match result {
            Err(err) if attempt < DEPLOY_ATTEMPTS && worth_retrying(&err) => {
                let first_line = format!("{err:#}");
                let first_line = first_line.lines().next().unwrap_or_default();
                eprintln!(
                    "deploy request failed ({first_line}); retrying with the same idempotency key"
                );
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Whether a request may succeed when sent again: the controller was not
/// reached, the answer was lost, or the controller said "later".
fn worth_retrying(err: &anyhow::Error) -> bool {
    if let Some(api) = err.downcast_ref::<ApiError>() {
        return matches!(
            api.status,
            StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        );
    }
    err.downcast_ref::<Unreachable>().is_some() || err.downcast_ref::<reqwest::Error>().is_some()
}

/// Polls a queued job until an agent takes it (or it ends), printing on
/// stderr why it waits and where it runs.
async fn wait_until_started(client: &Client, job: &JobView) -> anyhow::Result<()> {
    let path = format!("/api/v1/jobs/{}", job.id);
    let mut state = job.state.clone();
    let mut agent = job.agent.clone();
    let mut said = None;
    let mut failing_since: Option<Instant> = None;
    while state == "queued" {
        tokio::time::sleep(START_POLL_INTERVAL).await;
        let current: JobView = match client.get(&path).await {
            Ok(value) => {
                failing_since = None;
                typed(&value)?
            }
            Err(err) if worth_retrying(&err) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > logs::RECONNECT_TIMEOUT {
                    return Err(err);
                }
                continue;
            }
            Err(err) => return Err(err),
        };
        if current.state == "queued" && current.message.is_some() && current.message != said {
            eprintln!(
                "job {}: {}",
                current.id,
                printable(current.message.as_deref().unwrap_or_default())
            );
            said = current.message;
        }
        state = current.state;
        agent = current.agent;
    }
    if let Some(agent) = agent {
        if state == "running" {
            eprintln!("running on {}", printable(&agent));
        } else {
            eprintln!("ran on {}", printable(&agent));
        }
    }
    Ok(())
}

pub async fn deploys(client: &Client, args: DeploysArgs, json: bool) -> anyhow::Result<()> {
    let (owner, name) = repo_path(&args.repo)?;
    // The repository's own list: an unknown repository is a 404, as for
    // `hobot deploy`, not an empty list.
    let mut query = Vec::new();
    if let Some(limit) = args.limit {
        query.push(format!("limit={limit}"));
    }
    if let Some(cursor) = &args.cursor {
        query.push(format!("cursor={}", encode_query(cursor)));
    }
    let mut path = format!("/api/v1/repos/{owner}/{name}/deploys");
    if !query.is_empty() {
        path.push('?');
        path.push_str(&query.join("&"));
    }
    let Some((jobs, next_cursor)) = job_page(client, &path, json).await? else {
        return Ok(());
    };
    deploys_table(jobs).print();
    if let Some(cursor) = next_cursor {
        eprintln!(
            "more deploys: hobot deploys {} --cursor {cursor}",
            args.repo
        );
    }
    Ok(())
}

/// One page of jobs from `path` and the cursor of the next; with `json`, the
/// page is printed as it came and `None` returned.
async fn job_page(
    client: &Client,
    path: &str,
    json: bool,
) -> anyhow::Result<Option<(Vec<JobView>, Option<String>)>> {
    let page = client.get(path).await?;
    if json {
        print_json(&page);
        return Ok(None);
    }
    let next_cursor = page
        .get("next_cursor")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let items: Items<JobView> = typed(&page)?;
    Ok(Some((items.items, next_cursor)))
}

fn deploys_table(jobs: Vec<JobView>) -> Table {
    let mut table = Table::new(vec!["ID", "STATE", "COMMIT", "BRANCH", "AGENT", "FINISHED"]);
    for job in jobs {
        table.row(vec![
            job.id.to_string(),
            job.state,
            short_sha(&job.commit),
            or_dash(job.branch),
            or_dash(job.agent),
            time(job.finished_at.as_deref()),
        ]);
    }
    table
}

pub async fn env(client: &Client, command: EnvCommand, json: bool) -> anyhow::Result<()> {
    match command {
        EnvCommand::Ls { repo } => {
            let (owner, name) = repo_path(&repo)?;
            let list = client
                .get(&format!("/api/v1/repos/{owner}/{name}/env"))
                .await?;
            if json {
                print_json(&list);
                return Ok(());
            }
            let list: Items<EnvVarView> = typed(&list)?;
            env_table(list.items).print();
        }
        EnvCommand::Set {
            repo,
            key,
            secret,
            scope,
            value,
        } => {
            let (owner, name) = repo_path(&repo)?;
            anyhow::ensure!(
                value.is_none(),
                "the value is read from stdin, not taken from the command line (every user of \
                 this host can read a command line): `printf %s VALUE | hobot env set {repo} {key}`, \
                 or run it without a value and type it"
            );
            // The repository first: a typo or an unreachable controller is
            // found before the value is asked for.
            client.get(&format!("/api/v1/repos/{owner}/{name}")).await?;
            let value = read_value(&key)?;
            let mut body = json!({ "value": value, "secret": secret });
            if let Some(scope) = scope {
                body["scope"] = Value::String(scope.as_str().to_owned());
            }
            let variable = client
                .json(
                    Method::PUT,
                    &format!("/api/v1/repos/{owner}/{name}/env/{}", encode_query(&key)),
                    Some(&body),
                )
                .await?;
            if json {
                print_json(&variable);
            } else {
                let view: EnvVarView = typed(&variable)?;
                let kind = if view.secret { "secret" } else { "variable" };
                println!(
                    "set {kind} {} (scope {}) on {owner}/{name}",
                    view.key, view.scope
                );
            }
        }
        EnvCommand::Rm { repo, key, scope } => {
            let (owner, name) = repo_path(&repo)?;
            let mut path = format!("/api/v1/repos/{owner}/{name}/env/{}", encode_query(&key));
            if let Some(scope) = scope {
                path.push_str(&format!("?scope={}", scope.as_str()));
            }
            client.json(Method::DELETE, &path, None).await?;
            if !json {
                match scope {
                    Some(scope) => {
                        println!(
                            "removed {key} (scope {}) from {owner}/{name}",
                            scope.as_str()
                        );
                    }
                    None => println!("removed {key} from {owner}/{name}"),
                }
            }
        }
    }
    Ok(())
}

fn env_table(variables: Vec<EnvVarView>) -> Table {
    let mut table = Table::new(vec!["KEY", "SCOPE", "SECRET", "VALUE"]);
    for variable in variables {
        let value = match (variable.secret, variable.value) {
            (true, _) => "(secret)".to_owned(),
            (false, Some(value)) => escape_controls(&value),
            (false, None) => "-".to_owned(),
        };
        table.row(vec![
            variable.key,
            variable.scope,
            if variable.secret { "yes" } else { "no" }.to_owned(),
            value,
        ]);
    }
    table
}

/// A value on one table line: control characters (newlines, tabs, escape
/// sequences) written as escapes.
fn escape_controls(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Reads a variable's value from stdin: all of it when piped, one line after
/// a prompt on a terminal. Never from the command line, where other users
/// and shell history would see it.
fn read_value(key: &str) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let input = if stdin.is_terminal() {
        eprint!(
            "value of {key} (one line; what you type IS shown, pipe the value in to keep it \
             off the screen): "
        );
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("cannot read the value from the terminal")?;
        line
    } else {
        let mut bytes = Vec::new();
        stdin
            .lock()
            .read_to_end(&mut bytes)
            .context("cannot read the value from stdin")?;
        String::from_utf8(bytes).context("the value on stdin is not UTF-8")?
    };
    value_from_input(key, input)
}

/// Drops one trailing newline (`\n` or `\r\n`); refuses an empty value.
fn value_from_input(key: &str, mut input: String) -> anyhow::Result<String> {
    if input.ends_with('\n') {
        input.pop();
        if input.ends_with('\r') {
            input.pop();
        }
    }
    anyhow::ensure!(
        !input.is_empty(),
        "the value of {key} is empty; give it on stdin, e.g. `hobot env set REPO {key} < file`"
    );
    hobotnica_common::validate::env_value(key, &input).map_err(|err| anyhow::anyhow!("{err}"))?;
    Ok(input)
}

pub async fn jobs(client: &Client, command: JobsCommand, json: bool) -> anyhow::Result<()> {
    match command {
        JobsCommand::Ls {
            repo,
            state,
            kind,
            limit,
            cursor,
        } => {
            let mut query = Vec::new();
            if let Some(repo) = repo {
                let (owner, name) = repo_path(&repo)?;
                query.push(format!("repo={owner}%2F{name}"));
            }
            if let Some(state) = state {
                query.push(format!("state={}", encode_query(&state)));
            }
            if let Some(kind) = kind {
                query.push(format!("kind={}", encode_query(&kind)));
            }
            if let Some(limit) = limit {
                query.push(format!("limit={limit}"));
            }
            if let Some(cursor) = cursor {
                query.push(format!("cursor={}", encode_query(&cursor)));
            }
            let path = if query.is_empty() {
                "/api/v1/jobs".to_owned()
            } else {
                format!("/api/v1/jobs?{}", query.join("&"))
            };
            let Some((jobs, next_cursor)) = job_page(client, &path, json).await? else {
                return Ok(());
            };
            let mut table = Table::new(vec![
                "ID", "REPO", "TARGET", "STATE", "EXIT", "COMMIT", "BRANCH", "AGENT", "CREATED",
                "DURATION",
            ]);
            for job in jobs {
                table.row(vec![
                    job.id.to_string(),
                    job.repo,
                    job.target,
                    job.state,
                    or_dash(job.exit_code),
                    short_sha(&job.commit),
                    or_dash(job.branch),
                    or_dash(job.agent),
                    time(job.created_at.as_deref()),
                    duration(job.started_at.as_deref(), job.finished_at.as_deref()),
                ]);
            }
            table.print();
            if let Some(cursor) = next_cursor {
                eprintln!("more jobs: hobot jobs ls --cursor {cursor}");
            }
        }
        JobsCommand::Show { id } => {
            let job = client.get(&format!("/api/v1/jobs/{id}")).await?;
            if json {
                print_json(&job);
            } else {
                print_job(&typed(&job)?);
            }
        }
        JobsCommand::Cancel { id } => {
            let job = client
                .json(Method::POST, &format!("/api/v1/jobs/{id}/cancel"), None)
                .await?;
            if json {
                print_json(&job);
            } else {
                let view: JobView = typed(&job)?;
                println!("job {}: cancel requested (state {})", view.id, view.state);
            }
        }
        JobsCommand::Retry { id } => {
            let job = client
                .json(Method::POST, &format!("/api/v1/jobs/{id}/retry"), None)
                .await?;
            if json {
                print_json(&job);
            } else {
                let view: JobView = typed(&job)?;
                println!(
                    "job {} queued: retry of job {id} (make {} at {})",
                    view.id,
                    view.target,
                    short_sha(&view.commit)
                );
            }
        }
    }
    Ok(())
}

fn print_job(job: &JobView) {
    print_fields(&[
        ("id", job.id.to_string()),
        ("repo", job.repo.clone()),
        ("target", job.target.clone()),
        ("kind", or_dash(job.kind.as_ref())),
        ("state", job.state.clone()),
        ("exit code", or_dash(job.exit_code)),
        ("message", or_dash(job.message.as_ref())),
        ("commit", job.commit.clone()),
        ("branch", or_dash(job.branch.as_ref())),
        ("trigger", or_dash(job.trigger.as_ref())),
        (
            "one-time env",
            if job.env_keys.is_empty() {
                "-".to_owned()
            } else {
                job.env_keys.join(", ")
            },
        ),
        ("attempt", or_dash(job.attempt)),
        ("agent", or_dash(job.agent.as_ref())),
        ("created", time(job.created_at.as_deref())),
        ("started", time(job.started_at.as_deref())),
        ("finished", time(job.finished_at.as_deref())),
        (
            "duration",
            duration(job.started_at.as_deref(), job.finished_at.as_deref()),
        ),
    ]);
}

pub async fn agents(client: &Client, command: AgentsCommand, json: bool) -> anyhow::Result<()> {
    match command {
        AgentsCommand::Ls => {
            let list = client.get("/api/v1/agents").await?;
            if json {
                print_json(&list);
                return Ok(());
            }
            let list: Items<AgentView> = typed(&list)?;
            let mut table = Table::new(vec![
                "NAME",
                "ID",
                "CONNECTED",
                "BUSY",
                "RUNNING JOBS",
                "VERSION",
                "LAST SEEN",
                "LABELS",
            ]);
            for agent in list.items {
                let running: Vec<String> =
                    agent.running_jobs.iter().map(ToString::to_string).collect();
                let labels: Vec<String> = agent
                    .labels
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect();
                table.row(vec![
                    agent.name,
                    agent.id,
                    if agent.connected { "yes" } else { "no" }.to_owned(),
                    format!("{}/{}", running.len(), or_dash(agent.concurrency)),
                    if running.is_empty() {
                        "-".to_owned()
                    } else {
                        running.join(",")
                    },
                    or_dash(agent.version),
                    time(agent.last_seen.as_deref()),
                    if labels.is_empty() {
                        "-".to_owned()
                    } else {
                        labels.join(",")
                    },
                ]);
            }
            table.print();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(value: Value) -> JobView {
        serde_json::from_value(value).expect("a job")
    }

    #[test]
    fn deploys_are_a_table() {
        let finished = "2026-01-01T10:00:00Z";
        let jobs = vec![
            job(json!({
                "id": 12, "repo": "octo/app", "kind": "deploy", "target": "deploy",
                "state": "running", "commit": "2f6f3c1f0a1b2c3d4e5f60718293a4b5c6d7e8f9",
                "branch": "main", "agent": "build-1", "env_keys": ["A"],
            })),
            job(json!({
                "id": 9, "repo": "octo/app", "kind": "deploy", "target": "deploy",
                "state": "succeeded", "commit": "0123456789abcdef0123456789abcdef01234567",
                "branch": null, "agent": "build-22", "finished_at": finished,
            })),
        ];
        let expected = format!(
            "ID  STATE      COMMIT        BRANCH  AGENT     FINISHED\n\
             12  running    2f6f3c1f0a1b  main    build-1   -\n\
             9   succeeded  0123456789ab  -       build-22  {}\n",
            time(Some(finished))
        );
        assert_eq!(deploys_table(jobs).render(), expected);
    }

    #[test]
    fn env_table_never_shows_a_secret() {
        let variables: Items<EnvVarView> = serde_json::from_value(json!({ "items": [
            { "key": "API_TOKEN", "scope": "deploy", "secret": true, "value": null },
            { "key": "GREETING", "scope": "all", "secret": false, "value": "two\nlines" },
            { "key": "ODD", "scope": "test", "secret": true, "value": "leaked?" },
        ]}))
        .expect("a list");
        assert_eq!(
            env_table(variables.items).render(),
            "KEY        SCOPE   SECRET  VALUE\n\
             API_TOKEN  deploy  yes     (secret)\n\
             GREETING   all     no      two\\nlines\n\
             ODD        test    yes     (secret)\n"
        );
    }

    #[test]
    fn values_from_stdin() {
        let value =
            |input: &str| value_from_input("K", input.to_owned()).map_err(|e| e.to_string());
        assert_eq!(value("s3cr3t\n"), Ok("s3cr3t".to_owned()));
        assert_eq!(value("s3cr3t\r\n"), Ok("s3cr3t".to_owned()));
        assert_eq!(value("s3cr3t"), Ok("s3cr3t".to_owned()));
        assert_eq!(
            value("-----BEGIN\nkey\n\n"),
            Ok("-----BEGIN\nkey\n".to_owned())
        );
        assert_eq!(value(" padded \n"), Ok(" padded ".to_owned()));
        assert!(value("").unwrap_err().contains("empty"));
        assert!(value("\n").unwrap_err().contains("empty"));
        assert!(value("a\0b").is_err());
    }

    #[test]
    fn deploy_requests() {
        assert_eq!(deploy_body(None, None, Vec::new()), json!({}));
        assert_eq!(
            deploy_body(
                None,
                Some("main".to_owned()),
                vec![("A".to_owned(), "1".to_owned())]
            ),
            json!({ "branch": "main", "env": { "A": "1" } })
        );
        assert_eq!(
            deploy_body(Some("abc".to_owned()), None, Vec::new()),
            json!({ "commit": "abc" })
        );
        let mut view = job(json!({
            "id": 1, "repo": "a/b", "target": "deploy", "state": "queued",
            "commit": "2f6f3c1f0a1b2c3d4e5f60718293a4b5c6d7e8f9", "branch": "main",
        }));
        assert_eq!(
            describe_deploy(&view),
            "deploy of 2f6f3c1f0a1b2c3d4e5f60718293a4b5c6d7e8f9 on main"
        );
        view.branch = None;
        assert_eq!(
            describe_deploy(&view),
            "deploy of 2f6f3c1f0a1b2c3d4e5f60718293a4b5c6d7e8f9"
        );
    }

    #[test]
    fn which_deploy_failures_are_retried() {
        let api = |status: StatusCode| {
            anyhow::Error::new(ApiError {
                status,
                title: "t".to_owned(),
                detail: None,
                field_errors: Vec::new(),
            })
        };
        assert!(worth_retrying(&api(StatusCode::CONFLICT)));
        assert!(worth_retrying(&api(StatusCode::SERVICE_UNAVAILABLE)));
        assert!(!worth_retrying(&api(StatusCode::UNPROCESSABLE_ENTITY)));
        assert!(!worth_retrying(&api(StatusCode::NOT_FOUND)));
        assert!(!worth_retrying(&api(StatusCode::INTERNAL_SERVER_ERROR)));
        let unreachable = anyhow::Error::new(Unreachable {
            url: "http://127.0.0.1:1".to_owned(),
            source_hint: "test".to_owned(),
            option: "--url / HOBOTNICA_URL",
            cause: "Connection refused".to_owned(),
        });
        assert!(worth_retrying(&unreachable));
        assert!(!worth_retrying(&anyhow::anyhow!("not JSON")));
    }
}
