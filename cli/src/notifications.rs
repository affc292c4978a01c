//! `hobot notifications`: where a repository's finished jobs are told about
//! (`/api/v1/repos/{owner}/{name}/notifications`). A target's URL is read
//! from stdin, never from the command line, and never shown again; a
//! webhook's signing secret is made here and printed once.

use std::io::{BufRead as _, IsTerminal as _, Read as _, Write as _};

use anyhow::Context as _;
use reqwest::Method;
use serde::Deserialize;
use serde_json::json;

use crate::client::{Client, encode_query, repo_path, typed};
use crate::config::{NotificationKindArg, NotificationsCommand};
use crate::output::{Table, print_json, time};

#[derive(Deserialize)]
struct TargetView {
    id: String,
    kind: String,
    events: String,
    host: String,
    signed: bool,
    last_delivery: Option<DeliveryView>,
}

#[derive(Deserialize)]
struct DeliveryView {
    job: u64,
    state: String,
    attempts: u32,
    at: Option<String>,
    response_status: Option<u16>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct TargetList {
    items: Vec<TargetView>,
}

pub async fn notifications(
    client: &Client,
    command: NotificationsCommand,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        NotificationsCommand::Ls { repo } => {
            let (owner, name) = repo_path(&repo)?;
            let list = client
                .get(&format!("/api/v1/repos/{owner}/{name}/notifications"))
                .await?;
            if json {
                print_json(&list);
                return Ok(());
            }
            let list: TargetList = typed(&list)?;
            table(list.items).print();
        }
        NotificationsCommand::Set {
            repo,
            id,
            kind,
            events,
            url_on_command_line,
        } => {
            let (owner, name) = repo_path(&repo)?;
            anyhow::ensure!(
                url_on_command_line.is_none(),
                "the URL is read from stdin, not taken from the command line (it is a secret: \
                 every user of this host can read a command line): \
                 `printf %s URL | hobot notifications set {repo} {id} --kind ...`"
            );
            // The repository first: a typo or an unreachable controller is
            // found before the URL is asked for.
            client.get(&format!("/api/v1/repos/{owner}/{name}")).await?;
            let target_url = read_url()?;
            let secret = matches!(kind, NotificationKindArg::Webhook)
                .then(|| hobotnica_common::token::new_token("hobwh"));
            let mut body = json!({ "kind": kind.as_str(), "url": target_url });
            if let Some(events) = events {
                body["events"] = json!(events.as_str());
            }
            if let Some(secret) = &secret {
                body["secret"] = json!(secret);
            }
            let target = client
                .json(
                    Method::PUT,
                    &format!(
                        "/api/v1/repos/{owner}/{name}/notifications/{}",
                        encode_query(&id)
                    ),
                    Some(&body),
                )
                .await?;
            if json {
                let mut shown = target;
                if let Some(secret) = &secret {
                    shown["secret"] = json!(secret);
                }
                print_json(&shown);
                return Ok(());
            }
            let view: TargetView = typed(&target)?;
            println!(
                "{} notifications of {} jobs of {owner}/{name} go to {} ({})",
                view.kind, view.events, view.host, view.id
            );
            if let Some(secret) = secret {
                println!(
                    "signing secret (shown once; the receiver checks X-Hobotnica-Signature-256 \
                     with it): {secret}"
                );
            }
        }
        NotificationsCommand::Rm { repo, id } => {
            let (owner, name) = repo_path(&repo)?;
            client
                .json(
                    Method::DELETE,
                    &format!(
                        "/api/v1/repos/{owner}/{name}/notifications/{}",
                        encode_query(&id)
                    ),
                    None,
                )
                .await?;
            if !json {
                println!("removed notification target {id} from {owner}/{name}");
            }
        }
    }
    Ok(())
}

fn table(targets: Vec<TargetView>) -> Table {
    let mut table = Table::new(vec![
        "ID", "KIND", "EVENTS", "HOST", "SIGNED", "LAST", "JOB", "AT", "DETAIL",
    ]);
    for target in targets {
        let (last, job, at, detail) = match target.last_delivery {
            None => (
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
            ),
            Some(delivery) => {
                let detail = match (delivery.response_status, delivery.error) {
                    (_, Some(error)) => error,
                    (Some(status), None) => format!("HTTP {status}"),
                    (None, None) => "-".to_owned(),
                };
                (
                    format!("{} ({} attempts)", delivery.state, delivery.attempts),
                    delivery.job.to_string(),
                    time(delivery.at.as_deref()),
                    detail,
                )
            }
        };
        table.row(vec![
            target.id,
            target.kind,
            target.events,
            target.host,
            if target.signed { "yes" } else { "no" }.to_owned(),
            last,
            job,
            at,
            detail,
        ]);
    }
    table
}

/// Reads the target's URL from stdin: all of it when piped, one line after
/// a prompt on a terminal; surrounding whitespace dropped.
fn read_url() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let mut input = String::new();
    if stdin.is_terminal() {
        eprint!("URL to POST notifications to (one line): ");
        let _ = std::io::stderr().flush();
        stdin
            .lock()
            .read_line(&mut input)
            .context("cannot read the URL from the terminal")?;
    } else {
        stdin
            .lock()
            .read_to_string(&mut input)
            .context("cannot read the URL from stdin (it must be UTF-8)")?;
    }
    let url = input.trim();
    anyhow::ensure!(
        !url.is_empty(),
        "no URL on stdin; give it there, e.g. `hobot notifications set REPO ID --kind slack < url-file`"
    );
    Ok(url.to_owned())
}
