//! CORE: who a caller is and what they may do. The admin token may do
//! everything. A GitHub user (`Authorization: Bearer <github token>` with
//! `X-GitHub-Username`) may read the GitHub repositories their token can
//! read and trigger jobs where it can push. Verifications are cached
//! briefly, keyed by a hash of the token, never the token itself.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hobotnica_common::job::Repo;
use hobotnica_common::token::hash_token;

use crate::error::CoreError;
use crate::github::{GitHubError, GitHubToken, Permissions};
use crate::services::Services;

/// How long a verified login or permission is trusted without asking GitHub.
pub const CREDENTIAL_CACHE_TTL: Duration = Duration::from_secs(60);
/// Cached entries at most (older ones are dropped first when full).
const CREDENTIAL_CACHE_ENTRIES: usize = 10_000;

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    Admin,
    GitHub { login: String, token: GitHubToken },
}

impl Caller {
    /// How the caller is named in a job's `requested_by`.
    pub fn name(&self) -> String {
        match self {
            Caller::Admin => "admin".to_owned(),
            Caller::GitHub { login, .. } => login.clone(),
        }
    }
}

/// What a call needs on a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Push,
}

#[derive(Default)]
pub struct CredentialCache {
    logins: Mutex<HashMap<String, (String, Instant)>>,
    permissions: Mutex<HashMap<(String, String), (Permissions, Instant)>>,
}

impl CredentialCache {
    fn login(&self, token_hash: &str) -> Option<String> {
        let logins = self.logins.lock().ok()?;
        let (login, at) = logins.get(token_hash)?;
        (at.elapsed() < CREDENTIAL_CACHE_TTL).then(|| login.clone())
    }

    fn remember_login(&self, token_hash: String, login: String) {
        if let Ok(mut logins) = self.logins.lock() {
            if logins.len() >= CREDENTIAL_CACHE_ENTRIES {
                logins.retain(|_, (_, at)| at.elapsed() < CREDENTIAL_CACHE_TTL);
            }
            logins.insert(token_hash, (login, Instant::now()));
        }
    }

    fn permissions(&self, token_hash: &str, repo: &str) -> Option<Permissions> {
        let permissions = self.permissions.lock().ok()?;
        let (found, at) = permissions.get(&(token_hash.to_owned(), repo.to_owned()))?;
        (at.elapsed() < CREDENTIAL_CACHE_TTL).then_some(*found)
    }

    fn remember_permissions(&self, token_hash: String, repo: String, found: Permissions) {
        if let Ok(mut permissions) = self.permissions.lock() {
            if permissions.len() >= CREDENTIAL_CACHE_ENTRIES {
                permissions.retain(|_, (_, at)| at.elapsed() < CREDENTIAL_CACHE_TTL);
            }
            permissions.insert((token_hash, repo), (found, Instant::now()));
        }
    }
}

/// The one mapping of GitHub errors met while checking a caller.
pub fn caller_error(err: GitHubError) -> CoreError {
    match err {
        GitHubError::BadCredentials => {
            CoreError::Unauthorized("GitHub rejected the token (bad credentials)".to_owned())
        }
        GitHubError::NotFound => {
            CoreError::NotFound("repository (on GitHub, or not visible with this token)".to_owned())
        }
        GitHubError::Forbidden(message) => {
            CoreError::Forbidden(format!("GitHub refused: {message}"))
        }
        GitHubError::RateLimited { .. } => CoreError::RateLimited(
            "GitHub's rate limit for this token is exhausted; retry later".to_owned(),
        ),
        GitHubError::Unavailable(detail) => CoreError::Upstream(format!(
            "GitHub could not be reached; retry later ({detail})"
        )),
    }
}

impl Services {
    /// Checks that `token` belongs to `login` (GraphQL `viewer`).
    pub async fn verify_github_user(
        &self,
        token: GitHubToken,
        login: &str,
    ) -> Result<Caller, CoreError> {
        let token_hash = hash_token(token.expose());
        let viewer = match self.credentials.login(&token_hash) {
            Some(viewer) => viewer,
            None => {
                let viewer = self
                    .github
                    .viewer_login(&token)
                    .await
                    .map_err(caller_error)?;
                self.credentials.remember_login(token_hash, viewer.clone());
                viewer
            }
        };
        if !viewer.eq_ignore_ascii_case(login) {
            return Err(CoreError::Unauthorized(format!(
                "the token belongs to GitHub user {viewer}, not {login} (X-GitHub-Username)"
            )));
        }
        Ok(Caller::GitHub {
            login: viewer,
            token,
        })
    }

    /// The caller's permissions on a GitHub repository.
    pub async fn github_permissions(
        &self,
        token: &GitHubToken,
        owner: &str,
        name: &str,
    ) -> Result<Permissions, CoreError> {
        let token_hash = hash_token(token.expose());
        let full_name = format!("{owner}/{name}");
        if let Some(found) = self.credentials.permissions(&token_hash, &full_name) {
            return Ok(found);
        }
        let found = self
            .github
            .repository(token, owner, name)
            .await
            .map_err(caller_error)?
            .permissions;
        self.credentials
            .remember_permissions(token_hash, full_name, found);
        Ok(found)
    }

    /// Whether `caller` may do `access` on the repository of `job`.
    pub async fn require_job_access(
        &self,
        caller: &Caller,
        job: &hobotnica_common::job::Job,
        access: Access,
    ) -> Result<(), CoreError> {
        if matches!(caller, Caller::Admin) {
            return Ok(());
        }
        let not_found = || CoreError::NotFound(format!("job {}", job.id));
        let (owner, name) = job.repo.split_once('/').ok_or_else(not_found)?;
        let repo = self
            .store
            .get_repo(owner, name)
            .await?
            .ok_or_else(not_found)?;
        match self.require_access(caller, &repo, access).await {
            // Do not tell a stranger the job exists.
            Err(CoreError::NotFound(_) | CoreError::Forbidden(_)) if access == Access::Read => {
                Err(not_found())
            }
            other => other,
        }
    }

    /// Whether `caller` may do `access` on `repo`.
    pub async fn require_access(
        &self,
        caller: &Caller,
        repo: &Repo,
        access: Access,
    ) -> Result<(), CoreError> {
        let Caller::GitHub { token, .. } = caller else {
            return Ok(());
        };
        if repo.github.is_none() {
            return Err(CoreError::Forbidden(format!(
                "repository {} was registered by URL: only the admin token may use it",
                repo.full_name()
            )));
        }
        let permissions = self
            .github_permissions(token, &repo.owner, &repo.name)
            .await?;
        match access {
            Access::Read if permissions.pull || permissions.push => Ok(()),
            Access::Push if permissions.push => Ok(()),
            Access::Read => Err(CoreError::NotFound(format!(
                "repository {} (not visible with this token)",
                repo.full_name()
            ))),
            Access::Push => Err(CoreError::Forbidden(format!(
                "triggering jobs on {} needs push access on GitHub",
                repo.full_name()
            ))),
        }
    }
}
