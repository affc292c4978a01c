//! GitHub's side of webhooks: payloads in GitHub's documented shapes, built
//! from the fake's own repositories (so ids and URLs match its API), and a
//! sender that signs the exact body bytes with HMAC-SHA256 and sets the
//! headers GitHub's deliveries carry.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit as _, Mac as _};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::{FakeGitHub, Hook, is_hex_sha};
use crate::api::RawResponse;

/// The sha GitHub sends as `before` of a new branch and `after` of a deleted
/// one.
pub const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

/// How long a delivery may take (GitHub gives up after 10 s; the tests are
/// more patient on a loaded machine).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// `sha256=<hex HMAC-SHA256 of body keyed with secret>`, the value of
/// `X-Hub-Signature-256`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A fresh `X-GitHub-Delivery` value (UUID-shaped, random).
pub fn new_delivery_id() -> String {
    let seed = format!(
        "{}-{:?}",
        crate::unique("delivery"),
        std::time::SystemTime::now()
    );
    let hex = hex::encode(Sha256::digest(seed.as_bytes()));
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// Delivers `payload` the way GitHub does: the JSON (pretty-printed, so a
/// receiver that re-serializes before checking the signature fails) signed
/// with `secret` (no `X-Hub-Signature-256` when `None`), with
/// `X-GitHub-Event: <event>` and `X-GitHub-Delivery: <delivery_id>`, to the
/// absolute `webhook_url`.
pub async fn send_webhook(
    webhook_url: &str,
    event: &str,
    delivery_id: &str,
    payload: &Value,
    secret: Option<&str>,
) -> RawResponse {
    let body = serde_json::to_vec_pretty(payload).expect("JSON");
    let signature = secret.map(|secret| signature(secret, &body));
    send_webhook_raw(webhook_url, event, delivery_id, body, signature.as_deref()).await
}

/// Like [`send_webhook`] with any body bytes and any `X-Hub-Signature-256`
/// value (none when `None`).
///
/// # Panics
/// When the request cannot be sent or its answer read.
pub async fn send_webhook_raw(
    webhook_url: &str,
    event: &str,
    delivery_id: &str,
    body: Vec<u8>,
    signature: Option<&str>,
) -> RawResponse {
    let hook_id = hook_id_for(webhook_url);
    deliver_raw(webhook_url, hook_id, event, delivery_id, body, signature).await
}

/// A stable numeric hook id for a URL (GitHub's `X-GitHub-Hook-ID`).
fn hook_id_for(url: &str) -> u64 {
    let digest = Sha256::digest(url.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) % 1_000_000_000
}

async fn deliver_raw(
    url: &str,
    hook_id: u64,
    event: &str,
    delivery_id: &str,
    body: Vec<u8>,
    signature: Option<&str>,
) -> RawResponse {
    crate::init();
    let http = reqwest::Client::builder()
        .timeout(DELIVERY_TIMEOUT)
        .build()
        .expect("reqwest client");
    let target_id = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|payload| payload["repository"]["id"].as_u64())
        .unwrap_or_default();
    let mut request = http
        .post(url)
        .header("accept", "*/*")
        .header("content-type", "application/json")
        .header("user-agent", "GitHub-Hookshot/abc1234")
        .header("x-github-event", event)
        .header("x-github-delivery", delivery_id)
        .header("x-github-hook-id", hook_id.to_string())
        .header("x-github-hook-installation-target-type", "repository")
        .header(
            "x-github-hook-installation-target-id",
            target_id.to_string(),
        );
    if let Some(signature) = signature {
        request = request.header("x-hub-signature-256", signature);
    }
    let response = request
        .body(body)
        .send()
        .await
        .unwrap_or_else(|err| panic!("delivering {event} {delivery_id} to {url}: {err}"));
    crate::api::RawResponse::read(response, &format!("delivery {delivery_id}")).await
}

/// What a commit payload says about a commit of a repository.
struct CommitInfo {
    tree: String,
    author_name: String,
    author_email: String,
    timestamp: String,
    message: String,
}

/// Reads a commit of `git_dir` (none when it is not there).
fn commit_info(git_dir: &Path, sha: &str) -> Option<CommitInfo> {
    if !is_hex_sha(sha) {
        return None;
    }
    let output = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(git_dir)
        .args([
            "log",
            "-1",
            "--format=%T%x00%an%x00%ae%x00%aI%x00%B",
            sha,
            "--",
        ])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut fields = text.splitn(5, '\0');
    Some(CommitInfo {
        tree: fields.next()?.to_owned(),
        author_name: fields.next()?.to_owned(),
        author_email: fields.next()?.to_owned(),
        timestamp: fields.next()?.to_owned(),
        message: fields.next()?.trim_end().to_owned(),
    })
}

impl FakeGitHub {
    /// The repository object of a payload: the fake's repository, or (for
    /// a fork the fake does not hold) one made up for `full_name`.
    fn payload_repo(&self, full_name: &str) -> Value {
        let state = self.shared.lock();
        if let Some(repo) = state.repo_info(full_name) {
            drop(state);
            return self.shared.repo_json(&repo, None);
        }
        let owner = full_name
            .split_once('/')
            .map_or(full_name, |(owner, _)| owner);
        let owner_id = state
            .users
            .get(owner)
            .copied()
            .unwrap_or_else(|| hook_id_for(owner));
        drop(state);
        self.shared.repo_json_for(
            full_name,
            hook_id_for(full_name),
            owner_id,
            "main",
            true,
            self.shared.started_at,
        )
    }

    fn git_dir(&self, repo: &str) -> Option<std::path::PathBuf> {
        self.shared.lock().repo_info(repo).map(|repo| repo.git_dir)
    }

    fn payload_user(&self, login: &str) -> Value {
        let id = self.shared.lock().user_id(login);
        self.shared.user_json(login, id)
    }

    fn payload_commit(&self, repo: &str, sha: &str) -> Value {
        let info = self
            .git_dir(repo)
            .and_then(|git_dir| commit_info(&git_dir, sha));
        let info = info.unwrap_or_else(|| CommitInfo {
            tree: ZERO_SHA.to_owned(),
            author_name: "Hobotnica Tests".to_owned(),
            author_email: "tests@hobotnica.invalid".to_owned(),
            timestamp: Utc::now().to_rfc3339(),
            message: "a commit the fake does not hold".to_owned(),
        });
        let owner = repo.split_once('/').map_or(repo, |(owner, _)| owner);
        let person = json!({
            "name": info.author_name,
            "email": info.author_email,
            "username": owner,
        });
        json!({
            "id": sha,
            "tree_id": info.tree,
            "distinct": true,
            "message": info.message,
            "timestamp": info.timestamp,
            "url": format!("{}/{repo}/commit/{sha}", self.shared.web_url),
            "author": person,
            "committer": person,
            "added": [],
            "removed": [],
            "modified": ["Makefile"],
        })
    }

    /// A `push` payload (GitHub's documented shape) for `owner/name`:
    /// `git_ref` is `refs/heads/<branch>` or `refs/tags/<tag>`; a deletion
    /// has `after` = [`ZERO_SHA`] and no commits. The pusher and sender are
    /// the repository's owner.
    pub fn push_payload(
        &self,
        repo: &str,
        git_ref: &str,
        before: &str,
        after: &str,
        deleted: bool,
        forced: bool,
    ) -> Value {
        let owner = repo.split_once('/').map_or(repo, |(owner, _)| owner);
        let mut repository = self.payload_repo(repo);
        // Push payloads carry the owner's name and e-mail, and times as Unix
        // seconds.
        repository["owner"]["name"] = json!(owner);
        repository["owner"]["email"] = json!(format!("{owner}@users.noreply.github.invalid"));
        for field in ["created_at", "pushed_at"] {
            let seconds = repository[field]
                .as_str()
                .and_then(|time| DateTime::parse_from_rfc3339(time).ok())
                .map_or_else(|| Utc::now().timestamp(), |time| time.timestamp());
            repository[field] = json!(seconds);
        }
        repository["stargazers"] = json!(0);
        repository["watchers"] = json!(0);
        repository["master_branch"] = repository["default_branch"].clone();
        let head_commit = (!deleted).then(|| self.payload_commit(repo, after));
        let base_ref = git_ref.starts_with("refs/tags/").then(|| {
            format!(
                "refs/heads/{}",
                repository["default_branch"].as_str().unwrap_or("main")
            )
        });
        json!({
            "ref": git_ref,
            "before": before,
            "after": after,
            "repository": repository,
            "pusher": {
                "name": owner,
                "email": format!("{owner}@users.noreply.github.invalid"),
            },
            "sender": self.payload_user(owner),
            "created": before == ZERO_SHA,
            "deleted": deleted,
            "forced": forced,
            "base_ref": base_ref,
            "compare": format!(
                "{}/{repo}/compare/{}...{}",
                self.shared.web_url,
                &before[..before.len().min(12)],
                &after[..after.len().min(12)]
            ),
            "commits": head_commit.iter().cloned().collect::<Vec<Value>>(),
            "head_commit": head_commit,
        })
    }

    /// A `pull_request` payload (GitHub's documented shape): pull request
    /// `number` of `base_repo` (whose default branch is the base), from
    /// `head_ref` at `head_sha` of `head_repo` (a fork when it differs from
    /// `base_repo`). The sender is the head repository's owner.
    pub fn pull_request_payload(
        &self,
        action: &str,
        number: u64,
        head_sha: &str,
        head_ref: &str,
        head_repo: &str,
        base_repo: &str,
    ) -> Value {
        let web = &self.shared.web_url;
        let api = format!("{}/repos/{base_repo}", self.shared.api_url);
        let head_owner = head_repo
            .split_once('/')
            .map_or(head_repo, |(owner, _)| owner);
        let base_owner = base_repo
            .split_once('/')
            .map_or(base_repo, |(owner, _)| owner);
        let base = self.payload_repo(base_repo);
        let mut head = self.payload_repo(head_repo);
        head["fork"] = json!(head_repo != base_repo);
        let base_ref = base["default_branch"].as_str().unwrap_or("main").to_owned();
        let base_sha = self
            .git_dir(base_repo)
            .and_then(|git_dir| {
                let output = std::process::Command::new("git")
                    .arg("--git-dir")
                    .arg(git_dir)
                    .args(["rev-parse", "--verify", "--quiet"])
                    .arg(format!("refs/heads/{base_ref}^{{commit}}"))
                    .output()
                    .ok()?;
                output
                    .status
                    .success()
                    .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
            })
            .unwrap_or_else(|| ZERO_SHA.to_owned());
        let sender = self.payload_user(head_owner);
        let now = Utc::now().to_rfc3339();
        let pull = format!("{api}/pulls/{number}");
        let issue = format!("{api}/issues/{number}");
        let html = format!("{web}/{base_repo}/pull/{number}");
        let state = if action == "closed" { "closed" } else { "open" };
        let links = json!({
            "self": { "href": pull },
            "html": { "href": html },
            "issue": { "href": issue },
            "comments": { "href": format!("{issue}/comments") },
            "review_comments": { "href": format!("{pull}/comments") },
            "review_comment": { "href": format!("{api}/pulls/comments{{/number}}") },
            "commits": { "href": format!("{pull}/commits") },
            "statuses": { "href": format!("{api}/statuses/{head_sha}") },
        });
        let head = json!({
            "label": format!("{head_owner}:{head_ref}"),
            "ref": head_ref,
            "sha": head_sha,
            "user": self.payload_user(head_owner),
            "repo": head,
        });
        let base_side = json!({
            "label": format!("{base_owner}:{base_ref}"),
            "ref": base_ref,
            "sha": base_sha,
            "user": self.payload_user(base_owner),
            "repo": base.clone(),
        });
        let mut pull_request = json!({
            "url": pull,
            "id": hook_id_for(&pull),
            "node_id": format!("PR_{number}"),
            "html_url": html,
            "diff_url": format!("{html}.diff"),
            "patch_url": format!("{html}.patch"),
            "issue_url": issue,
            "number": number,
            "state": state,
            "locked": false,
            "title": format!("Pull request {number}"),
            "user": sender,
            "body": "Please test this.",
            "created_at": now,
            "updated_at": now,
            "closed_at": null,
            "merged_at": null,
            "merge_commit_sha": null,
            "assignee": null,
            "assignees": [],
            "requested_reviewers": [],
            "requested_teams": [],
            "labels": [],
            "milestone": null,
            "draft": false,
            "head": head,
            "base": base_side,
            "_links": links,
        });
        let more = json!({
            "commits_url": format!("{pull}/commits"),
            "review_comments_url": format!("{pull}/comments"),
            "review_comment_url": format!("{api}/pulls/comments{{/number}}"),
            "comments_url": format!("{issue}/comments"),
            "statuses_url": format!("{api}/statuses/{head_sha}"),
            "author_association": if head_repo == base_repo { "MEMBER" } else { "CONTRIBUTOR" },
            "auto_merge": null,
            "active_lock_reason": null,
            "merged": false,
            "mergeable": null,
            "rebaseable": null,
            "mergeable_state": "unknown",
            "merged_by": null,
            "comments": 0,
            "review_comments": 0,
            "maintainer_can_modify": false,
            "commits": 1,
            "additions": 1,
            "deletions": 0,
            "changed_files": 1,
        });
        if let (Value::Object(pull_request), Value::Object(more)) = (&mut pull_request, more) {
            pull_request.extend(more);
        }
        json!({
            "action": action,
            "number": number,
            "pull_request": pull_request,
            "repository": base,
            "sender": sender,
        })
    }

    /// A `ping` payload for hook `hook_id` of `owner/name` (the recorded
    /// hook's configuration when the fake created it).
    pub fn ping_payload(&self, repo: &str, hook_id: u64) -> Value {
        let recorded = self.hooks(repo).into_iter().find(|hook| hook.id == hook_id);
        let hook = match &recorded {
            Some(hook) => self.shared.hook_json(hook),
            None => self.shared.hook_json(&Hook {
                id: hook_id,
                repo: repo.to_owned(),
                name: "web".to_owned(),
                active: true,
                events: vec!["push".to_owned(), "pull_request".to_owned()],
                url: "https://hobotnica.invalid/webhooks/github/unknown".to_owned(),
                content_type: "json".to_owned(),
                secret: Some(String::new()),
                insecure_ssl: "0".to_owned(),
                creator: String::new(),
            }),
        };
        let owner = repo.split_once('/').map_or(repo, |(owner, _)| owner);
        json!({
            "zen": "Design for failure.",
            "hook_id": hook_id,
            "hook": hook,
            "repository": self.payload_repo(repo),
            "sender": self.payload_user(owner),
        })
    }

    /// Delivers `payload` to a hook the fake recorded, as GitHub would: to
    /// its URL, signed with its secret, with its id in `X-GitHub-Hook-ID`.
    pub async fn deliver(&self, hook: &Hook, event: &str, payload: &Value) -> RawResponse {
        let body = serde_json::to_vec_pretty(payload).expect("JSON");
        let signature = hook
            .secret
            .as_deref()
            .map(|secret| signature(secret, &body));
        deliver_raw(
            &hook.url,
            hook.id,
            event,
            &new_delivery_id(),
            body,
            signature.as_deref(),
        )
        .await
    }
}
