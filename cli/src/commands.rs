//! The REST subcommands: `repos`, `run`, `jobs` and `agents`. Each one is a
//! request, then a table (or the API's JSON with `--json`).

use std::collections::BTreeMap;
use std::process::ExitCode;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::{Client, encode_query, repo_path, typed};
use crate::config::{AgentsCommand, JobsCommand, ReposCommand, RunArgs};
use crate::logs;
use crate::output::{Table, duration, or_dash, print_fields, print_json, short_sha, time};

/// A repository as the API returns it.
#[derive(Deserialize)]
struct RepoView {
    full_name: String,
    git_url: String,
    default_branch: String,
    timeout_secs: Option<u64>,
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
        } => {
            let mut body = json!({ "name": name, "git_url": git_url });
            if let Some(branch) = branch {
                body["branch"] = Value::String(branch);
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
        let env: serde_json::Map<String, Value> = args
            .env
            .into_iter()
            .map(|(key, value)| (key, Value::String(value)))
            .collect();
        body["env"] = Value::Object(env);
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
        return logs::tail(client, view.id, 0, true).await;
    }
    if json {
        print_json(&job);
    } else {
        println!("{}", view.id);
    }
    Ok(ExitCode::SUCCESS)
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
            let list = client.get(&path).await?;
            if json {
                print_json(&list);
                return Ok(());
            }
            let next_cursor = list
                .get("next_cursor")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let list: Items<JobView> = typed(&list)?;
            let mut table = Table::new(vec![
                "ID", "REPO", "TARGET", "STATE", "EXIT", "COMMIT", "BRANCH", "AGENT", "CREATED",
                "DURATION",
            ]);
            for job in list.items {
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
