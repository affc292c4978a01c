//! A fake GitHub (Enterprise) for the end-to-end tests: an in-process axum
//! server on 127.0.0.1 that answers the REST and GraphQL calls Hobotnica
//! makes in GitHub's real shapes and headers, serves real git repositories
//! over smart HTTP (`git http-backend`) to holders of a token, records what it
//! is sent (commit statuses, hooks, every request with its headers), and
//! sends signed webhooks the way GitHub does ([`send_webhook`]).
//!
//! Layout (GitHub Enterprise's): web pages and git at `http://127.0.0.1:P/`
//! (clone URLs `http://127.0.0.1:P/{owner}/{name}.git`), the REST API at
//! `/api/v3`, GraphQL at `/api/v3/graphql` (where octocrab posts it) and at
//! `/api/graphql` (where GitHub Enterprise has it). Give a controller
//! [`FakeGitHub::controller_args`].
//!
//! Access is per token: [`FakeGitHub::grant`] gives a token `pull`, `push` or
//! `admin` on a repository; every repository is private, so a token without
//! access gets GitHub's 404, and an unknown (or revoked) token GitHub's 401
//! `Bad credentials`.

mod api;
mod client;
mod git_http;
mod webhooks;

pub use client::GitHubUser;
pub use webhooks::{ZERO_SHA, new_delivery_id, send_webhook, send_webhook_raw, signature};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::extract::{Request, State as AxumState};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use chrono::{DateTime, Utc};
use tempfile::TempDir;

use crate::git::GitRepo;

/// What a token may do with a repository (GitHub's `permissions`; each
/// level includes the ones below it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// The repository is invisible: 404.
    None,
    /// Read: clone, look up branches.
    Pull,
    /// Write: also commit statuses (and `git push`).
    Push,
    /// Also webhooks.
    Admin,
}

/// One request the fake received (API, GraphQL or git).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// Every header, in order (values lossily decoded).
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Whether the path or any header value contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.path.contains(needle) || self.headers.iter().any(|(_, value)| value.contains(needle))
    }
}

/// A commit status as it was posted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitStatus {
    pub id: u64,
    /// `owner/name`.
    pub repo: String,
    pub sha: String,
    /// `pending`, `success`, `failure` or `error`.
    pub state: String,
    pub target_url: Option<String>,
    pub description: Option<String>,
    /// `default` when none was given (GitHub's default).
    pub context: String,
    /// Login of the token's user.
    pub creator: String,
}

/// A repository webhook as it was created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    pub id: u64,
    /// `owner/name`.
    pub repo: String,
    pub name: String,
    pub active: bool,
    pub events: Vec<String>,
    /// `config.url`.
    pub url: String,
    /// `config.content_type` (`form` when none was given, GitHub's default).
    pub content_type: String,
    /// `config.secret`, in the clear (GitHub shows `********`).
    pub secret: Option<String>,
    /// `config.insecure_ssl`.
    pub insecure_ssl: String,
    /// Login of the token's user.
    pub creator: String,
}

/// A running fake GitHub. Dropping it stops the server.
pub struct FakeGitHub {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    _root: TempDir,
}

/// What the server's handlers share with the test.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// `GIT_PROJECT_ROOT`: `<owner>/<name>.git` symlinks to the repositories.
    project_root: PathBuf,
    /// `http://127.0.0.1:P`.
    web_url: String,
    /// `http://127.0.0.1:P/api/v3`.
    api_url: String,
    started_at: DateTime<Utc>,
}

#[derive(Default)]
struct State {
    /// login -> user id (repository owners are users too).
    users: BTreeMap<String, u64>,
    /// token -> login.
    tokens: HashMap<String, String>,
    /// `owner/name` -> repository.
    repos: BTreeMap<String, RepoEntry>,
    statuses: Vec<CommitStatus>,
    hooks: Vec<Hook>,
    requests: Vec<RecordedRequest>,
    /// Requests per rate-limit key (a token, or `""` for anonymous).
    rate_used: HashMap<String, u64>,
    rate_limited: HashSet<String>,
    /// `git http-backend`'s stderr, for failure messages.
    git_errors: Vec<String>,
    next_id: u64,
    /// How long every answer waits (a slow GitHub).
    latency: std::time::Duration,
}

struct RepoEntry {
    id: u64,
    owner: String,
    name: String,
    default_branch: String,
    git: Arc<GitRepo>,
    access: HashMap<String, Permission>,
    created_at: DateTime<Utc>,
}

/// What the handlers need of a repository, taken out of the lock.
#[derive(Clone, Debug)]
pub(crate) struct RepoInfo {
    pub id: u64,
    pub owner: String,
    pub owner_id: u64,
    pub name: String,
    pub default_branch: String,
    pub git_dir: PathBuf,
    pub created_at: DateTime<Utc>,
}

impl RepoInfo {
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

impl State {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn user_id(&mut self, login: &str) -> u64 {
        if let Some(id) = self.users.get(login) {
            return *id;
        }
        let id = self.next_id();
        self.users.insert(login.to_owned(), id);
        id
    }

    fn repo_info(&self, full_name: &str) -> Option<RepoInfo> {
        let entry = self.repos.get(full_name)?;
        Some(RepoInfo {
            id: entry.id,
            owner: entry.owner.clone(),
            owner_id: self.users.get(&entry.owner).copied().unwrap_or_default(),
            name: entry.name.clone(),
            default_branch: entry.default_branch.clone(),
            git_dir: entry.git.path().join(".git"),
            created_at: entry.created_at,
        })
    }

    fn permission(&self, token: &str, full_name: &str) -> Permission {
        self.repos
            .get(full_name)
            .and_then(|entry| entry.access.get(token).copied())
            .unwrap_or(Permission::None)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How long a request body of the API may be, in bytes.
const API_BODY_LIMIT_BYTES: usize = 10 * 1024 * 1024;

impl FakeGitHub {
    /// Starts the server on a free port of 127.0.0.1.
    pub async fn start() -> FakeGitHub {
        crate::init();
        let root = tempfile::Builder::new()
            .prefix("hobotnica-github-")
            .tempdir()
            .expect("temp dir");
        let project_root = root.path().join("git");
        std::fs::create_dir(&project_root).expect("git project root");
        // Bound here, on a port the kernel picks: a port handed out first
        // and bound later can be taken meanwhile by another process's
        // outgoing connection.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake GitHub");
        let addr = listener.local_addr().expect("the fake GitHub's address");
        let web_url = format!("http://{addr}");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_id: 1000,
                ..State::default()
            }),
            project_root,
            api_url: format!("{web_url}/api/v3"),
            web_url,
            started_at: Utc::now(),
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeGitHub {
            shared,
            addr,
            server,
            _root: root,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:P`: web and git (`--github-url`).
    pub fn url(&self) -> String {
        self.shared.web_url.clone()
    }

    /// `http://127.0.0.1:P/api/v3`: the REST API (`--github-api-url`).
    pub fn api_url(&self) -> String {
        self.shared.api_url.clone()
    }

    /// `--github-url <url> --github-api-url <api url>`, for
    /// `ControllerOpts::extra_args`.
    pub fn controller_args(&self) -> Vec<String> {
        vec![
            "--github-url".to_owned(),
            self.url(),
            "--github-api-url".to_owned(),
            self.api_url(),
        ]
    }

    /// `http://127.0.0.1:P/{owner}/{name}.git`.
    pub fn clone_url(&self, repo: &str) -> String {
        format!("{}/{repo}.git", self.shared.web_url)
    }

    /// Adds a user with a token (a user may have several tokens).
    pub fn add_user(&self, login: &str, token: &str) {
        let mut state = self.shared.lock();
        state.user_id(login);
        state.tokens.insert(token.to_owned(), login.to_owned());
    }

    /// Adds a private repository `owner/name` backed by a fresh
    /// [`GitRepo`] fixture (the test Makefile, committed) whose current
    /// branch is `default_branch`; commits made on the returned repository
    /// are served at once. Nobody has access until [`FakeGitHub::grant`].
    pub fn add_repo(&self, owner: &str, name: &str, default_branch: &str) -> Arc<GitRepo> {
        let repo = GitRepo::new();
        if default_branch != "main" {
            repo.git(&["branch", "--quiet", "-m", "main", default_branch]);
        }
        self.add_existing_repo(owner, name, default_branch, repo)
    }

    /// Adds a private repository `owner/name` served from `repo`.
    ///
    /// # Panics
    /// When `owner/name` exists already.
    pub fn add_existing_repo(
        &self,
        owner: &str,
        name: &str,
        default_branch: &str,
        repo: GitRepo,
    ) -> Arc<GitRepo> {
        let full_name = format!("{owner}/{name}");
        let link = self
            .shared
            .project_root
            .join(owner)
            .join(format!("{name}.git"));
        std::fs::create_dir_all(link.parent().expect("owner dir")).expect("owner dir");
        std::os::unix::fs::symlink(repo.path().join(".git"), &link).expect("link the repository");
        let repo = Arc::new(repo);
        let mut state = self.shared.lock();
        assert!(
            !state.repos.contains_key(&full_name),
            "{full_name} exists already"
        );
        state.user_id(owner);
        let id = state.next_id();
        state.repos.insert(
            full_name,
            RepoEntry {
                id,
                owner: owner.to_owned(),
                name: name.to_owned(),
                default_branch: default_branch.to_owned(),
                git: Arc::clone(&repo),
                access: HashMap::new(),
                created_at: Utc::now(),
            },
        );
        repo
    }

    /// The git repository behind `owner/name`.
    pub fn repo(&self, repo: &str) -> Arc<GitRepo> {
        let state = self.shared.lock();
        let entry = state
            .repos
            .get(repo)
            .unwrap_or_else(|| panic!("no repository {repo}"));
        Arc::clone(&entry.git)
    }

    /// GitHub's numeric id of `owner/name`.
    pub fn repo_id(&self, repo: &str) -> u64 {
        self.shared
            .lock()
            .repos
            .get(repo)
            .unwrap_or_else(|| panic!("no repository {repo}"))
            .id
    }

    /// Sets what `token` may do with `owner/name`.
    pub fn grant(&self, token: &str, repo: &str, permission: Permission) {
        let mut state = self.shared.lock();
        let entry = state
            .repos
            .get_mut(repo)
            .unwrap_or_else(|| panic!("no repository {repo}"));
        entry.access.insert(token.to_owned(), permission);
    }

    /// Revokes the token: from now on it gets 401 `Bad credentials`
    /// everywhere (and 401 from git).
    pub fn revoke(&self, token: &str) {
        self.shared.lock().tokens.remove(token);
    }

    /// Takes `owner/name` away from the token: 404 from now on.
    pub fn revoke_access(&self, token: &str, repo: &str) {
        self.grant(token, repo, Permission::None);
    }

    /// Makes every API call with `token` answer GitHub's 403 "API rate limit
    /// exceeded" (with `X-RateLimit-Remaining: 0`), or stops doing so.
    /// Makes every answer (API, GraphQL and git) wait `latency` first.
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.shared.lock().latency = latency;
    }

    pub fn set_rate_limited(&self, token: &str, limited: bool) {
        let mut state = self.shared.lock();
        if limited {
            state.rate_limited.insert(token.to_owned());
        } else {
            state.rate_limited.remove(token);
        }
    }

    /// The statuses posted for `sha` of `owner/name`, oldest first.
    pub fn statuses(&self, repo: &str, sha: &str) -> Vec<CommitStatus> {
        self.shared
            .lock()
            .statuses
            .iter()
            .filter(|status| status.repo == repo && status.sha == sha)
            .cloned()
            .collect()
    }

    /// Every status posted, oldest first.
    pub fn all_statuses(&self) -> Vec<CommitStatus> {
        self.shared.lock().statuses.clone()
    }

    /// The hooks of `owner/name`, oldest first.
    pub fn hooks(&self, repo: &str) -> Vec<Hook> {
        self.shared
            .lock()
            .hooks
            .iter()
            .filter(|hook| hook.repo == repo)
            .cloned()
            .collect()
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// What `git http-backend` wrote on stderr so far.
    pub fn git_errors(&self) -> Vec<String> {
        self.shared.lock().git_errors.clone()
    }
}

impl Drop for FakeGitHub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Every request: record it, then route it to the API, GraphQL or git.
async fn handle(AxumState(shared): AxumState<Arc<Shared>>, request: Request) -> Response {
    let recorded = RecordedRequest {
        method: request.method().to_string(),
        path: request
            .uri()
            .path_and_query()
            .map_or_else(|| request.uri().path().to_owned(), ToString::to_string),
        headers: request
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let latency = {
        let mut state = shared.lock();
        state.requests.push(recorded);
        state.latency
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let path = request.uri().path().to_owned();
    if path == "/api/graphql" {
        return api::serve(shared, "/graphql", request).await;
    }
    if let Some(api_path) = path.strip_prefix("/api/v3")
        && (api_path.is_empty() || api_path.starts_with('/'))
    {
        return api::serve(shared, api_path, request).await;
    }
    if let Some((repo, rest)) = git_http::split_path(&path) {
        return git_http::serve(shared, repo, rest, request).await;
    }
    (StatusCode::NOT_FOUND, "Not Found").into_response()
}

/// Runs git in `git_dir` (argv only), returning its trimmed stdout when it
/// succeeds.
pub(crate) async fn git_in(git_dir: &Path, args: &[&str]) -> Option<String> {
    let output = tokio::process::Command::new("git")
        .arg("--git-dir")
        .arg(git_dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Whether `text` looks like a (possibly abbreviated) hex object name.
pub(crate) fn is_hex_sha(text: &str) -> bool {
    (4..=40).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests;
