//! PORT: GitHub, through octocrab — the only module that names it. Checks
//! credentials (GraphQL `viewer`), reads a repository and the caller's
//! permission on it, resolves branches, posts commit statuses and creates
//! webhooks. The base URLs are configurable (GitHub Enterprise, and the fake
//! GitHub of the tests).

use std::fmt;

use hobotnica_common::ids::CommitSha;
use octocrab::Octocrab;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

/// A GitHub token. `Debug` and `Display` never print it.
#[derive(Clone)]
pub struct GitHubToken(String);

impl GitHubToken {
    pub fn new(token: impl Into<String>) -> GitHubToken {
        GitHubToken(token.into())
    }
    /// The token itself, for the few places that must hand it on.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for GitHubToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GitHubToken([REDACTED])")
    }
}

/// Why a GitHub call failed, as callers act on it.
#[derive(Debug, thiserror::Error)]
pub enum GitHubError {
    /// 401: the token is wrong, expired or revoked.
    #[error("GitHub rejected the token (bad credentials)")]
    BadCredentials,
    /// 404: no such repository, or not visible with this token.
    #[error("not found on GitHub, or not visible with this token")]
    NotFound,
    /// 403 other than rate limiting: the token lacks a scope or permission.
    #[error("GitHub refused: {0}")]
    Forbidden(String),
    /// GitHub's rate limit: retry after `reset` (unix seconds), if known.
    #[error("GitHub's rate limit is exhausted")]
    RateLimited { reset: Option<u64> },
    /// GitHub could not be reached or answered something unexpected.
    #[error("GitHub did not answer as expected: {0}")]
    Unavailable(String),
}

/// The caller's permissions on a repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Permissions {
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub push: bool,
    #[serde(default)]
    pub pull: bool,
}

/// What the controller needs to know of a repository.
#[derive(Debug, Clone, Deserialize)]
pub struct RepositoryInfo {
    pub default_branch: Option<String>,
    #[serde(default)]
    pub private: bool,
    #[serde(default)]
    pub permissions: Permissions,
}

/// A commit status's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusState {
    Pending,
    Success,
    Failure,
    Error,
}

impl StatusState {
    fn as_str(self) -> &'static str {
        match self {
            StatusState::Pending => "pending",
            StatusState::Success => "success",
            StatusState::Failure => "failure",
            StatusState::Error => "error",
        }
    }
}

/// A commit status to post.
#[derive(Debug, Clone)]
pub struct CommitStatus {
    pub state: StatusState,
    pub context: String,
    pub description: String,
    pub target_url: String,
}

/// GitHub's web and API base URLs.
#[derive(Debug, Clone)]
pub struct GitHub {
    web_url: String,
    api_url: String,
    /// Where each call's outcome (`hobotnica_github_calls_total`) and
    /// GitHub's remaining rate limit (`x-ratelimit-remaining`, read off
    /// each REST answer) are recorded, if anywhere.
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

/// A call's outcome as a metrics label.
fn outcome<T>(result: &Result<T, GitHubError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(GitHubError::BadCredentials) => "bad_credentials",
        Err(GitHubError::NotFound) => "not_found",
        Err(GitHubError::Forbidden(_)) => "forbidden",
        Err(GitHubError::RateLimited { .. }) => "rate_limited",
        Err(GitHubError::Unavailable(_)) => "unavailable",
    }
}

fn map_error(err: octocrab::Error) -> GitHubError {
    match err {
        octocrab::Error::GitHub { source, .. } => match source.status_code.as_u16() {
            401 => GitHubError::BadCredentials,
            404 => GitHubError::NotFound,
            403 | 429
                if source.status_code.as_u16() == 429
                    || source.message.to_ascii_lowercase().contains("rate limit") =>
            {
                GitHubError::RateLimited {
                    reset: source.rate_limit_reset,
                }
            }
            403 => GitHubError::Forbidden(source.message),
            status => GitHubError::Unavailable(format!("HTTP {status}: {}", source.message)),
        },
        other => GitHubError::Unavailable(other.to_string()),
    }
}

/// The rate-limit resource and the calls left on it, from an answer's
/// `x-ratelimit-resource` and `x-ratelimit-remaining` (the resource is one
/// of GitHub's known names, or `other`: a bounded label).
fn rate_limit(headers: &axum::http::HeaderMap) -> Option<(&'static str, u64)> {
    let remaining = headers
        .get("x-ratelimit-remaining")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let resource = match headers
        .get("x-ratelimit-resource")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("core")
    {
        "core" => "core",
        "graphql" => "graphql",
        "search" => "search",
        "code_search" => "code_search",
        "integration_manifest" => "integration_manifest",
        _ => "other",
    };
    Some((resource, remaining))
}

/// Longest wait for a connection to GitHub's API.
pub const GITHUB_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest wait for GitHub's API to send anything on an open connection.
pub const GITHUB_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl GitHub {
    pub fn new(web_url: &str, api_url: &str) -> GitHub {
        GitHub {
            web_url: web_url.trim_end_matches('/').to_owned(),
            api_url: api_url.trim_end_matches('/').to_owned(),
            metrics: None,
        }
    }

    /// Counts every call's outcome in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> GitHub {
        self.metrics = Some(metrics);
        self
    }

    /// Counts `result` as the outcome of `call`.
    fn counted<T>(
        &self,
        call: &'static str,
        result: Result<T, GitHubError>,
    ) -> Result<T, GitHubError> {
        if let Some(metrics) = &self.metrics {
            metrics.github_call(call, outcome(&result));
        }
        result
    }

    /// Records the rate limit an answer's headers report.
    fn note_rate_limit(&self, headers: &axum::http::HeaderMap) {
        if let (Some(metrics), Some((resource, remaining))) = (&self.metrics, rate_limit(headers)) {
            metrics.github_rate_limit(resource, remaining);
        }
    }

    /// One REST call (`body`: a POST's, else a GET) to `path` of the API,
    /// its JSON answer parsed. The answer's rate-limit headers are recorded
    /// first, also on a refusal (a 403 for the limit says 0 left).
    async fn rest<R: DeserializeOwned>(
        &self,
        token: &GitHubToken,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<R, GitHubError> {
        let client = self.client(token)?;
        let uri = format!("{}{path}", self.api_url);
        let response = match body {
            Some(body) => client._post(uri, Some(body)).await,
            None => client._get(uri).await,
        }
        .map_err(map_error)?;
        self.note_rate_limit(response.headers());
        let response = octocrab::map_github_error(response)
            .await
            .map_err(map_error)?;
        let text = client.body_to_string(response).await.map_err(map_error)?;
        serde_json::from_str(&text).map_err(|err| {
            GitHubError::Unavailable(format!(
                "GitHub answered {path} with unexpected JSON: {err}"
            ))
        })
    }

    /// The URL git clones a repository from.
    pub fn clone_url(&self, owner: &str, name: &str) -> String {
        format!("{}/{owner}/{name}.git", self.web_url)
    }

    fn client(&self, token: &GitHubToken) -> Result<Octocrab, GitHubError> {
        Octocrab::builder()
            .base_uri(self.api_url.as_str())
            .map_err(|err| GitHubError::Unavailable(format!("invalid GitHub API URL: {err}")))?
            .personal_token(token.expose().to_owned())
            // octocrab waits forever by default: a GitHub (or proxy) that
            // never answers would hang the access re-check, requests that
            // ask GitHub, and with them the controller's graceful stop.
            .set_connect_timeout(Some(GITHUB_CONNECT_TIMEOUT))
            .set_read_timeout(Some(GITHUB_READ_TIMEOUT))
            .build()
            .map_err(|err| GitHubError::Unavailable(err.to_string()))
    }

    /// The login of the token's owner (GraphQL `viewer`).
    pub async fn viewer_login(&self, token: &GitHubToken) -> Result<String, GitHubError> {
        let result = async {
            #[derive(Deserialize)]
            struct Data {
                viewer: Viewer,
            }
            #[derive(Deserialize)]
            struct Viewer {
                login: String,
            }
            let data: Data = self
                .client(token)?
                .graphql(&json!({ "query": "query { viewer { login } }" }))
                .await
                .map_err(map_error)?;
            Ok(data.viewer.login)
        }
        .await;
        self.counted("viewer", result)
    }

    /// The repository as the token sees it.
    pub async fn repository(
        &self,
        token: &GitHubToken,
        owner: &str,
        name: &str,
    ) -> Result<RepositoryInfo, GitHubError> {
        let result = async {
            self.rest(token, &format!("/repos/{owner}/{name}"), None)
                .await
        }
        .await;
        self.counted("repository", result)
    }

    /// The commit a branch points at.
    pub async fn branch_head(
        &self,
        token: &GitHubToken,
        owner: &str,
        name: &str,
        branch: &str,
    ) -> Result<CommitSha, GitHubError> {
        let result =
            async {
                #[derive(Deserialize)]
                struct Ref {
                    object: Object,
                }
                #[derive(Deserialize)]
                struct Object {
                    sha: String,
                }
                let reference: Ref = self
                    .rest(
                        token,
                        &format!("/repos/{owner}/{name}/git/ref/heads/{branch}"),
                        None,
                    )
                    .await?;
                reference.object.sha.parse().map_err(|_| {
                    GitHubError::Unavailable("GitHub answered an invalid sha".to_owned())
                })
            }
            .await;
        self.counted("branch_head", result)
    }

    /// Whether the repository has commit `sha` (the Git database API, whose
    /// answer is small). The caller has just been checked for access, so a
    /// 404 means the commit.
    pub async fn commit_exists(
        &self,
        token: &GitHubToken,
        owner: &str,
        name: &str,
        sha: &CommitSha,
    ) -> Result<bool, GitHubError> {
        let result = async {
            #[derive(Deserialize)]
            struct Commit {
                sha: String,
            }
            let answer: Result<Commit, _> = self
                .rest(
                    token,
                    &format!("/repos/{owner}/{name}/git/commits/{}", sha.as_str()),
                    None,
                )
                .await;
            match answer {
                Ok(commit) => Ok(commit.sha.eq_ignore_ascii_case(sha.as_str())),
                Err(GitHubError::NotFound) => Ok(false),
                Err(err) => Err(err),
            }
        }
        .await;
        self.counted("commit", result)
    }

    pub async fn create_status(
        &self,
        token: &GitHubToken,
        owner: &str,
        name: &str,
        sha: &CommitSha,
        status: &CommitStatus,
    ) -> Result<(), GitHubError> {
        let result = async {
            let _: serde_json::Value = self
                .rest(
                    token,
                    &format!("/repos/{owner}/{name}/statuses/{sha}"),
                    Some(&json!({
                        "state": status.state.as_str(),
                        "target_url": status.target_url,
                        "description": status.description,
                        "context": status.context,
                    })),
                )
                .await?;
            Ok(())
        }
        .await;
        self.counted("create_status", result)
    }

    /// Creates the repository's push + pull_request webhook pointing at
    /// `url`; returns its id on GitHub.
    pub async fn create_hook(
        &self,
        token: &GitHubToken,
        owner: &str,
        name: &str,
        url: &str,
        secret: &str,
    ) -> Result<u64, GitHubError> {
        let result = async {
            #[derive(Deserialize)]
            struct Hook {
                id: u64,
            }
            let hook: Hook = self
                .rest(
                    token,
                    &format!("/repos/{owner}/{name}/hooks"),
                    Some(&json!({
                        "name": "web",
                        "active": true,
                        "events": ["push", "pull_request"],
                        "config": {
                            "url": url,
                            "content_type": "json",
                            "secret": secret,
                            "insecure_ssl": "0",
                        },
                    })),
                )
                .await?;
            Ok(hook.id)
        }
        .await;
        self.counted("create_hook", result)
    }

    /// Deletes a webhook; one already gone counts as deleted.
    pub async fn delete_hook(
        &self,
        token: &GitHubToken,
        owner: &str,
        name: &str,
        id: u64,
    ) -> Result<(), GitHubError> {
        let result = async {
            let client = self.client(token)?;
            let answer = client
                ._delete(
                    format!("{}/repos/{owner}/{name}/hooks/{id}", self.api_url),
                    None::<&()>,
                )
                .await
                .map_err(map_error)?;
            self.note_rate_limit(answer.headers());
            match octocrab::map_github_error(answer).await.map_err(map_error) {
                Ok(_) | Err(GitHubError::NotFound) => Ok(()),
                Err(err) => Err(err),
            }
        }
        .await;
        self.counted("delete_hook", result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GitHub API that accepts connections and never answers (a hung
    /// proxy, a half-open connection). Every call must fail in bounded
    /// time: before the fix it waited forever, and with it the access
    /// re-check (never again re-checking any repository), a webhook or API
    /// request that asked GitHub, and the controller's graceful stop, which
    /// waits for both.
    #[tokio::test(start_paused = true)]
    async fn a_github_that_never_answers_fails_the_call() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        // Holds every connection open without reading or writing.
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });

        let github = GitHub::new(&url, &url);
        // Paused time: the runtime jumps to the next timer whenever it waits
        // for the network only, so this checks that some timer ends the
        // call, without waiting for it in real time. octocrab tries a call
        // up to four times.
        let answer = tokio::time::timeout(
            5 * (GITHUB_CONNECT_TIMEOUT + GITHUB_READ_TIMEOUT),
            github.repository(&GitHubToken::new("ghp_test"), "o", "r"),
        )
        .await;
        silent.abort();
        let answer = answer.expect("the call ends although GitHub never answers");
        assert!(
            matches!(answer, Err(GitHubError::Unavailable(_))),
            "{answer:?}"
        );
    }
}
