//! CORE: who a caller is and what they may do. The admin token may do
//! everything. A GitHub user (`Authorization: Bearer <github token>` with
//! `X-GitHub-Username`) may read the GitHub repositories their token can
//! read and trigger jobs where it can push. Verifications are cached
//! briefly, keyed by a hash of the token, never the token itself; so are
//! GitHub's refusals of a token.
//!
//! Failed authentications are limited ([`FailedAttempts`]): a client
//! address, or a token, that has failed `--auth-failure-limit` times (20)
//! gets 429 (`Retry-After`) without GitHub being asked, regaining one
//! attempt every [`FAILURE_REFILL`] — on REST and gRPC. The admin token and
//! a GitHub token verified within the cache's lifetime still pass: others
//! sharing the address (a hostile job on the operators' host) cannot lock
//! them out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hobotnica_common::ids::JobId;
use hobotnica_common::job::{Job, Repo};
use hobotnica_common::token::{constant_time_eq, hash_token};

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
    /// Only the admin token may do this (agents, agent tokens, repositories
    /// registered by URL).
    pub fn require_admin(&self, what: &str) -> Result<(), CoreError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::GitHub { .. } => Err(CoreError::Forbidden(format!(
                "{what} needs the admin token"
            ))),
        }
    }

    /// Whether the caller holds the admin token (what the dashboard offers
    /// them; every core function still checks for itself).
    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Admin)
    }

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
    /// Run jobs and deploys, change variables and settings.
    Push,
    /// Manage the repository's webhook (its secret): GitHub's admin rights.
    Admin,
}

/// How long GitHub's refusal of a token (bad credentials) is remembered:
/// the token is refused meanwhile without asking GitHub again.
pub const REJECTION_CACHE_TTL: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct CredentialCache {
    logins: Mutex<HashMap<String, (String, Instant)>>,
    /// Hashes of tokens GitHub refused, and when.
    rejected: Mutex<HashMap<String, Instant>>,
    permissions: Mutex<HashMap<(String, String), (Permissions, Instant)>>,
}

impl CredentialCache {
    fn rejected(&self, token_hash: &str) -> bool {
        self.rejected.lock().is_ok_and(|rejected| {
            rejected
                .get(token_hash)
                .is_some_and(|at| at.elapsed() < REJECTION_CACHE_TTL)
        })
    }

    fn remember_rejection(&self, token_hash: String) {
        if let Ok(mut rejected) = self.rejected.lock() {
            if rejected.len() >= CREDENTIAL_CACHE_ENTRIES {
                rejected.retain(|_, at| at.elapsed() < REJECTION_CACHE_TTL);
            }
            if rejected.len() < CREDENTIAL_CACHE_ENTRIES {
                rejected.insert(token_hash, Instant::now());
            }
        }
    }

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

/// Failed authentications a client address or a token may make at once
/// by default (`--auth-failure-limit`)...
pub const DEFAULT_FAILURE_BURST: u32 = 20;
/// ...after which it regains one attempt per this interval.
pub const FAILURE_REFILL: Duration = Duration::from_secs(3);
/// Addresses and tokens tracked at most. When full, those whose failures
/// have all been forgiven are dropped (at most once a second, so that a
/// flood of failures does not rescan the table on every request); while it
/// is still full, new keys go untracked and those already there still count.
const FAILURE_ENTRIES: usize = 100_000;

/// Who failed: a client (an IPv6 client by its /64, which one host
/// usually holds whole) or a token (by its hash).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AttemptKey {
    Client(IpAddr),
    Token(String),
}

impl AttemptKey {
    pub fn client(addr: IpAddr) -> AttemptKey {
        match addr {
            IpAddr::V4(_) => AttemptKey::Client(addr),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AttemptKey::Client(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    AttemptKey::Client(IpAddr::V6(prefix.into()))
                }
            },
        }
    }
}

/// Recent failures per [`AttemptKey`], as a leaky bucket: each failure adds
/// one, one leaks out per [`FAILURE_REFILL`]; at `burst` the key is
/// refused until one has leaked out.
pub struct FailedAttempts {
    burst: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Default)]
struct Buckets {
    levels: HashMap<AttemptKey, (f64, Instant)>,
    pruned: Option<Instant>,
}

impl FailedAttempts {
    /// `burst` failures per key before it is refused.
    pub fn new(burst: u32) -> FailedAttempts {
        FailedAttempts {
            burst: f64::from(burst),
            buckets: Mutex::default(),
        }
    }

    fn level(at: Instant, level: f64, now: Instant) -> f64 {
        (level - now.duration_since(at).as_secs_f64() / FAILURE_REFILL.as_secs_f64()).max(0.0)
    }

    /// Refuses when any of `keys` has no attempt left.
    pub fn check(&self, keys: &[AttemptKey]) -> Result<(), CoreError> {
        let Ok(buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let now = Instant::now();
        let wait = keys
            .iter()
            .filter_map(|key| buckets.levels.get(key))
            .map(|(level, at)| Self::level(*at, *level, now) - (self.burst - 1.0))
            .fold(0.0_f64, f64::max);
        if wait > 0.0 {
            return Err(CoreError::TooManyFailures {
                retry_after: FAILURE_REFILL.mul_f64(wait),
            });
        }
        Ok(())
    }

    /// Counts one failure against each of `keys`.
    pub fn record(&self, keys: &[AttemptKey]) {
        let Ok(mut buckets) = self.buckets.lock() else {
            return;
        };
        let now = Instant::now();
        let Buckets { levels, pruned } = &mut *buckets;
        if levels.len() >= FAILURE_ENTRIES
            && pruned.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            levels.retain(|_, (level, at)| Self::level(*at, *level, now) > 0.0);
            *pruned = Some(now);
        }
        for key in keys {
            if levels.len() >= FAILURE_ENTRIES && !levels.contains_key(key) {
                continue;
            }
            let (level, at) = levels.entry(key.clone()).or_insert((0.0, now));
            *level = Self::level(*at, *level, now) + 1.0;
            *at = now;
        }
    }
}

/// The keys one authentication attempt counts against.
fn attempt_keys(client: Option<IpAddr>, token_hash: &str) -> Vec<AttemptKey> {
    let mut keys = vec![AttemptKey::Token(token_hash.to_owned())];
    keys.extend(client.map(AttemptKey::client));
    keys
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

/// Longest GitHub login.
const MAX_GITHUB_LOGIN_LEN: usize = 39;

impl Services {
    /// Whether the token hashed to `token_hash` is the admin token
    /// (compared in constant time).
    fn is_admin_token(&self, token_hash: &str) -> bool {
        constant_time_eq(token_hash.as_bytes(), self.admin_token_hash.as_bytes())
    }

    /// Who holds `token`, presented from `client`: the admin, or the GitHub
    /// user `github_login` names (checked against GitHub). For a client or
    /// token with too many recent failures, only what needs no outside call
    /// is checked (see [`Services::verify_without_asking`]).
    pub async fn authenticate(
        &self,
        token: &str,
        github_login: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<Caller, CoreError> {
        let token_hash = hash_token(token);
        let keys = attempt_keys(client, &token_hash);
        if let Err(throttled) = self.failures.check(&keys) {
            return self.verify_without_asking(token, &token_hash, github_login, throttled);
        }
        let verified = self.verify(token, &token_hash, github_login).await;
        if let Err(CoreError::Unauthorized(_)) = &verified {
            self.failures.record(&keys);
        }
        verified
    }

    /// For a throttled client or token: the admin token, or a GitHub token
    /// verified moments ago, still passes — a hostile job sharing the
    /// operators' address cannot lock them out — while anything else is
    /// refused with `throttled`, without asking GitHub or counting it.
    fn verify_without_asking(
        &self,
        token: &str,
        token_hash: &str,
        github_login: Option<&str>,
        throttled: CoreError,
    ) -> Result<Caller, CoreError> {
        if self.is_admin_token(token_hash) {
            return Ok(Caller::Admin);
        }
        match (github_login, self.credentials.login(token_hash)) {
            (Some(login), Some(viewer)) if viewer.eq_ignore_ascii_case(login) => {
                Ok(Caller::GitHub {
                    login: viewer,
                    token: GitHubToken::new(token),
                })
            }
            _ => Err(throttled),
        }
    }

    async fn verify(
        &self,
        token: &str,
        token_hash: &str,
        github_login: Option<&str>,
    ) -> Result<Caller, CoreError> {
        if self.is_admin_token(token_hash) {
            return Ok(Caller::Admin);
        }
        // Without X-GitHub-Username the caller means the admin token: the
        // answer does not send them looking for a GitHub token.
        let Some(login) = github_login else {
            return Err(CoreError::Unauthorized(
                "the token is not the admin token".to_owned(),
            ));
        };
        if login.is_empty() || login.len() > MAX_GITHUB_LOGIN_LEN {
            return Err(CoreError::Unauthorized(
                "X-GitHub-Username is not a GitHub login".to_owned(),
            ));
        }
        self.verify_github_user(GitHubToken::new(token), token_hash, login)
            .await
    }

    /// The admin, holding `token` (operators' gRPC calls), with the same
    /// limit on failures as [`Services::authenticate`].
    pub fn authenticate_admin(
        &self,
        token: &str,
        client: Option<IpAddr>,
    ) -> Result<Caller, CoreError> {
        let token_hash = hash_token(token);
        if self.is_admin_token(&token_hash) {
            return Ok(Caller::Admin);
        }
        let keys = attempt_keys(client, &token_hash);
        self.failures.check(&keys)?;
        self.failures.record(&keys);
        Err(CoreError::Unauthorized("the token is not valid".to_owned()))
    }

    /// Checks that `token` (hashed to `token_hash`) belongs to `login`
    /// (GraphQL `viewer`).
    async fn verify_github_user(
        &self,
        token: GitHubToken,
        token_hash: &str,
        login: &str,
    ) -> Result<Caller, CoreError> {
        let viewer = match self.credentials.login(token_hash) {
            Some(viewer) => viewer,
            None if self.credentials.rejected(token_hash) => {
                return Err(caller_error(GitHubError::BadCredentials));
            }
            None => match self.github.viewer_login(&token).await {
                Ok(viewer) => {
                    self.credentials
                        .remember_login(token_hash.to_owned(), viewer.clone());
                    viewer
                }
                Err(GitHubError::BadCredentials) => {
                    self.credentials.remember_rejection(token_hash.to_owned());
                    return Err(caller_error(GitHubError::BadCredentials));
                }
                Err(err) => return Err(caller_error(err)),
            },
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
    async fn github_permissions(
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

    /// The repository `owner/name`, when `caller` may do `access` on it.
    /// Every core function on a repository starts here.
    pub async fn repo_for(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
        access: Access,
    ) -> Result<Repo, CoreError> {
        let repo = self.repo(owner, name).await?;
        self.require_access(caller, &repo, access).await?;
        Ok(repo)
    }

    /// Job `id`, when `caller` may do `access` on its repository.
    pub async fn job_for(
        &self,
        caller: &Caller,
        id: JobId,
        access: Access,
    ) -> Result<Job, CoreError> {
        let job = self.job(id).await?;
        self.require_job_access(caller, &job, access).await?;
        Ok(job)
    }

    /// Whether `caller` may read `job` (listing jobs).
    pub(crate) async fn may_read_job(&self, caller: &Caller, job: &Job) -> bool {
        self.require_job_access(caller, job, Access::Read)
            .await
            .is_ok()
    }

    /// Whether `caller` may change `job` (cancel, retry): push access to its
    /// repository, the rule the REST endpoints apply.
    pub(crate) async fn may_change_job(&self, caller: &Caller, job: &Job) -> bool {
        self.require_job_access(caller, job, Access::Push)
            .await
            .is_ok()
    }

    /// Whether `caller` may do `access` on the repository of `job`. A job
    /// whose repository is gone is the admin's only.
    async fn require_job_access(
        &self,
        caller: &Caller,
        job: &Job,
        access: Access,
    ) -> Result<(), CoreError> {
        if matches!(caller, Caller::Admin) {
            return Ok(());
        }
        let not_found = || CoreError::NotFound(format!("job {}", job.id));
        let repo = self
            .store
            .get_repo(&job.repo.owner, &job.repo.name)
            .await?
            .ok_or_else(not_found)?;
        match self.require_access(caller, &repo, access).await {
            // Do not tell a stranger the job exists (nor its repository);
            // one who may read it learns that they may not change it.
            Err(CoreError::NotFound(_)) => Err(not_found()),
            Err(CoreError::Forbidden(_)) if access == Access::Read => Err(not_found()),
            other => other,
        }
    }

    /// Whether `caller` may do `access` on `repo`.
    pub(crate) async fn require_access(
        &self,
        caller: &Caller,
        repo: &Repo,
        access: Access,
    ) -> Result<(), CoreError> {
        let Caller::GitHub { token, .. } = caller else {
            return Ok(());
        };
        if repo.github.is_none() {
            // A repository registered by URL is the admin's only: to a
            // GitHub user it does not exist.
            return Err(CoreError::NotFound(format!(
                "repository {}",
                repo.full_name()
            )));
        }
        let permissions = self
            .github_permissions(token, &repo.owner, &repo.name)
            .await?;
        match access {
            Access::Read if permissions.pull || permissions.push => Ok(()),
            Access::Push if permissions.push => Ok(()),
            Access::Admin if permissions.admin => Ok(()),
            Access::Read => Err(CoreError::NotFound(format!(
                "repository {} (not visible with this token)",
                repo.full_name()
            ))),
            Access::Push => Err(CoreError::Forbidden(format!(
                "triggering jobs on {} needs push access on GitHub",
                repo.full_name()
            ))),
            Access::Admin => Err(CoreError::Forbidden(format!(
                "managing the webhook of {} needs admin rights on it on GitHub",
                repo.full_name()
            ))),
        }
    }
}
