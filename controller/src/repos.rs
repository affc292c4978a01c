//! CORE: repositories — registering them (by git URL, or on GitHub with the
//! caller's token), reading them with the caller's access checked, changing
//! and removing them, and disabling them when GitHub access is lost.

use std::collections::BTreeMap;

use chrono::Utc;
use hobotnica_common::job::{DEFAULT_JOB_TIMEOUT_SECS, GitHubLink, Job, JobKind, JobState, Repo};
use hobotnica_common::logs::MIN_MAX_LOG_BYTES;
use hobotnica_common::size::human_size;
use hobotnica_common::token::random_hex;
use hobotnica_common::validate;
use tokio_util::sync::CancellationToken;

use crate::auth::{Access, Caller};
use crate::error::CoreError;
use crate::git::check_git_url;
use crate::github::{GitHubError, GitHubToken};
use crate::secrets::{token_context, webhook_secret_context};
use crate::services::Services;
use crate::store::{JobFilter, StoreEvent};

/// The job timeout a registration asks for (the default without one).
fn job_timeout(timeout_secs: Option<u64>) -> Result<u64, CoreError> {
    let timeout_secs = timeout_secs.unwrap_or(DEFAULT_JOB_TIMEOUT_SECS);
    if timeout_secs == 0 || timeout_secs > MAX_TIMEOUT_SECS {
        return Err(CoreError::invalid(
            "timeout_secs",
            format!("must be between 1 and {MAX_TIMEOUT_SECS} seconds"),
        ));
    }
    Ok(timeout_secs)
}

/// Owner of repositories registered by plain git URL.
pub const LOCAL_OWNER: &str = "local";
/// Longest accepted job timeout (one week).
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// What registering a plain git repository takes.
#[derive(Debug, Clone)]
pub struct NewRepo {
    pub owner: Option<String>,
    pub name: String,
    pub git_url: String,
    pub branch: Option<String>,
    pub timeout_secs: Option<u64>,
    pub requeue_lost_tests: Option<bool>,
    /// Labels an agent's token must vouch for to take a deploy.
    pub deploy_labels: BTreeMap<String, String>,
    /// A log limit below the controller's.
    pub max_log_bytes: Option<u64>,
}

/// A repository to register: by plain git URL (the admin only), or a
/// GitHub repository with the caller's token.
#[derive(Debug, Clone)]
pub enum NewRepository {
    Git(NewRepo),
    GitHub(NewGitHubRepo),
}

/// A repository just registered; a GitHub repository's webhook URL and
/// secret are shown now and never again.
pub struct Registered {
    pub repo: Repo,
    pub webhook: Option<Webhook>,
}

/// Where GitHub delivers a repository's events, and the secret it signs
/// them with.
pub struct Webhook {
    pub url: String,
    pub secret: String,
}

/// Never prints the secret.
impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// A repository with its latest successful deploy and its latest `test`
/// job on its default branch.
#[derive(Debug)]
pub struct RepoOverview {
    pub repo: Repo,
    pub last_deploy: Option<Job>,
    pub last_test: Option<Job>,
}

/// How many of a repository's newest `test` jobs are looked through for
/// the latest one on its default branch.
const LAST_TEST_LOOKBACK: usize = 50;

/// A repository's own page: its overview, its recent jobs and deploys, the
/// recent commits that ran `test` (the deploy candidates, each with its
/// latest test job), and whether the caller may deploy and change its
/// variables (push access, the rule of the REST endpoints).
#[derive(Debug)]
pub struct RepoDetails {
    pub overview: RepoOverview,
    pub may_push: bool,
    pub recent_jobs: Vec<Job>,
    pub deploys: Vec<Job>,
    pub tested_commits: Vec<Job>,
}

/// Jobs of any kind a repository's page lists.
pub const REPO_PAGE_JOBS: usize = 20;
/// Deploys a repository's page lists.
pub const REPO_PAGE_DEPLOYS: usize = 10;
/// Commits a repository's page offers to deploy.
pub const DEPLOY_CANDIDATES: usize = 10;
/// How many of a repository's newest `test` jobs are looked through for the
/// deploy candidates.
const CANDIDATE_LOOKBACK: usize = 200;

/// A change to a repository's settings; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default)]
pub struct RepoChange {
    pub deploy_labels: Option<BTreeMap<String, String>>,
    /// `Some(None)`: back to the controller's limit.
    pub max_log_bytes: Option<Option<u64>>,
}

impl Services {
    /// Registers a repository for `caller`.
    pub async fn register(
        &self,
        caller: &Caller,
        new: NewRepository,
    ) -> Result<Registered, CoreError> {
        match new {
            NewRepository::Git(new) => {
                caller.require_admin("registering a repository by git_url")?;
                Ok(Registered {
                    repo: self.register_repo(new).await?,
                    webhook: None,
                })
            }
            NewRepository::GitHub(new) => self.register_github_repo(caller, new).await,
        }
    }

    /// The repositories `caller` may read, by name, each with its latest
    /// successful deploy.
    pub async fn visible_repos(&self, caller: &Caller) -> Result<Vec<RepoOverview>, CoreError> {
        let mut repos = Vec::new();
        for repo in self.store.list_repos().await? {
            if self
                .require_access(caller, &repo, Access::Read)
                .await
                .is_ok()
            {
                repos.push(repo);
            }
        }
        repos.sort_by_key(Repo::full_name);
        let mut overviews = Vec::with_capacity(repos.len());
        for repo in repos {
            overviews.push(self.overview(repo).await?);
        }
        Ok(overviews)
    }

    /// Repository `owner/name` with its latest successful deploy, when
    /// `caller` may read it.
    pub async fn repo_overview(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
    ) -> Result<RepoOverview, CoreError> {
        let repo = self.repo_for(caller, owner, name, Access::Read).await?;
        self.overview(repo).await
    }

    /// Repository `owner/name` as its page shows it, when `caller` may
    /// read it.
    pub async fn repo_details(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
    ) -> Result<RepoDetails, CoreError> {
        let repo = self.repo_for(caller, owner, name, Access::Read).await?;
        let may_push = self
            .require_access(caller, &repo, Access::Push)
            .await
            .is_ok();
        let jobs = |kind: Option<JobKind>, limit: usize| JobFilter {
            repo: Some(repo.reference()),
            kind,
            limit,
            ..JobFilter::default()
        };
        let recent_jobs = self.store.list_jobs(&jobs(None, REPO_PAGE_JOBS)).await?;
        let deploys = self
            .store
            .list_jobs(&jobs(Some(JobKind::Deploy), REPO_PAGE_DEPLOYS))
            .await?;
        let mut seen = std::collections::HashSet::new();
        let tested_commits = self
            .store
            .list_jobs(&jobs(Some(JobKind::Test), CANDIDATE_LOOKBACK))
            .await?
            .into_iter()
            .filter(|job| seen.insert(job.commit.clone()))
            .take(DEPLOY_CANDIDATES)
            .collect();
        Ok(RepoDetails {
            overview: self.overview(repo).await?,
            may_push,
            recent_jobs,
            deploys,
            tested_commits,
        })
    }

    async fn overview(&self, repo: Repo) -> Result<RepoOverview, CoreError> {
        let last_deploy = self.last_deploy(&repo).await?;
        let last_test = self
            .store
            .list_jobs(&JobFilter {
                repo: Some(repo.reference()),
                kind: Some(JobKind::Test),
                limit: LAST_TEST_LOOKBACK,
                ..JobFilter::default()
            })
            .await?
            .into_iter()
            .find(|job| job.branch.as_deref() == Some(repo.default_branch.as_str()));
        Ok(RepoOverview {
            repo,
            last_deploy,
            last_test,
        })
    }

    /// Where GitHub delivers a GitHub repository's events (never its
    /// secret); `None` for a repository registered by git URL.
    pub fn repo_webhook_url(&self, repo: &Repo) -> Option<String> {
        repo.github
            .as_ref()
            .map(|github| self.webhook_url(&github.hook_id))
    }

    /// The repository's page on GitHub, where it is a GitHub repository.
    pub fn github_page(&self, repo: &Repo) -> Option<String> {
        repo.github.as_ref().map(|_| {
            format!(
                "{}/{}/{}",
                self.config.github_url.trim_end_matches('/'),
                repo.owner,
                repo.name
            )
        })
    }

    /// Removes `owner/name` for `caller` (push access); its jobs stay.
    pub async fn remove_repo(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
    ) -> Result<(), CoreError> {
        self.repo_for(caller, owner, name, Access::Push).await?;
        self.store.delete_repo(owner, name).await?;
        tracing::info!(repo = %format!("{owner}/{name}"), "repository removed");
        Ok(())
    }

    /// Gives GitHub repository `owner/name` a new webhook secret, for
    /// `caller` with admin rights on it (or the admin token). The old
    /// secret stops working at once: deliveries signed with it get 401
    /// until the new one is set in the webhook's settings on GitHub. The
    /// secret is shown only now.
    pub async fn rotate_webhook_secret(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
    ) -> Result<Webhook, CoreError> {
        let repo = self.repo_for(caller, owner, name, Access::Admin).await?;
        let no_webhook = || {
            CoreError::Conflict(format!(
                "repository {} was registered by git URL: it has no webhook",
                repo.full_name()
            ))
        };
        if repo.github.is_none() {
            return Err(no_webhook());
        }
        let secret = random_hex(32);
        let sealed = self.secret_key.seal(
            secret.as_bytes(),
            &webhook_secret_context(&repo.full_name()),
        );
        let hook_id = self
            .change_repo(owner, name, |changed| {
                let github = changed.github.as_mut().ok_or_else(no_webhook)?;
                github.webhook_secret_sealed = sealed.clone();
                Ok(github.hook_id.clone())
            })
            .await?;
        tracing::info!(repo = %repo.full_name(), "webhook secret rotated");
        Ok(Webhook {
            url: self.webhook_url(&hook_id),
            secret,
        })
    }

    /// Where GitHub delivers the events of the repository with `hook_id`.
    fn webhook_url(&self, hook_id: &str) -> String {
        format!("{}/webhooks/github/{hook_id}", self.public_url())
    }

    /// Changes the settings of `owner/name` for `caller` (push access).
    pub async fn change_settings(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
        change: RepoChange,
    ) -> Result<RepoOverview, CoreError> {
        let mut repo = self.repo_for(caller, owner, name, Access::Push).await?;
        if let Some(deploy_labels) = change.deploy_labels {
            repo = self.set_deploy_labels(&repo, deploy_labels).await?;
        }
        if let Some(max_log_bytes) = change.max_log_bytes {
            let max_log_bytes = self.repo_log_limit(max_log_bytes)?;
            repo = self
                .change_repo(&repo.owner, &repo.name, |updated| {
                    updated.max_log_bytes = max_log_bytes;
                    Ok(updated.clone())
                })
                .await?;
        }
        self.overview(repo).await
    }

    async fn register_repo(&self, new: NewRepo) -> Result<Repo, CoreError> {
        let owner = new.owner.unwrap_or_else(|| LOCAL_OWNER.to_owned());
        validate::repo_component("owner", &owner)?;
        validate::repo_component("name", &new.name)?;
        check_git_url(&new.git_url).map_err(|reason| CoreError::invalid("git_url", reason))?;
        let branch = new.branch.unwrap_or_else(|| "main".to_owned());
        validate::branch("branch", &branch)?;
        validate::labels("deploy_labels", &new.deploy_labels)?;
        let timeout_secs = job_timeout(new.timeout_secs)?;
        let max_log_bytes = self.repo_log_limit(new.max_log_bytes)?;
        let repo = Repo {
            owner,
            name: new.name,
            git_url: new.git_url,
            default_branch: branch,
            timeout_secs,
            created_at: Utc::now(),
            github: None,
            disabled: None,
            env: Vec::new(),
            requeue_lost_tests: new.requeue_lost_tests.unwrap_or(true),
            deploy_labels: new.deploy_labels,
            max_log_bytes,
            notifications: Vec::new(),
        };
        self.store.create_repo(repo.clone()).await?;
        tracing::info!(repo = %repo.full_name(), "repository registered");
        Ok(repo)
    }

    /// A repository's own log limit, checked: between
    /// [`MIN_MAX_LOG_BYTES`] and the controller's `--max-log-bytes` (a
    /// repository may lower the controller's limit, never raise it).
    fn repo_log_limit(&self, max_log_bytes: Option<u64>) -> Result<Option<u64>, CoreError> {
        let controller = self.config.max_log_bytes;
        match max_log_bytes {
            Some(bytes) if !(MIN_MAX_LOG_BYTES..=controller).contains(&bytes) => {
                Err(CoreError::invalid(
                    "max_log_bytes",
                    format!(
                        "must be between {MIN_MAX_LOG_BYTES} and {controller} bytes (this controller's limit, {})",
                        human_size(controller)
                    ),
                ))
            }
            other => Ok(other),
        }
    }

    /// The most a log of `repo`'s jobs may hold: its own limit, never above
    /// the controller's (which may have been lowered since it was set).
    pub fn log_limit(&self, repo: Option<&Repo>) -> u64 {
        let controller = self.config.max_log_bytes;
        repo.and_then(|repo| repo.max_log_bytes)
            .map_or(controller, |bytes| bytes.min(controller))
    }

    /// Repository `owner/name`, whoever asks: callers' requests go through
    /// `repo_for`, which checks their access.
    pub(crate) async fn repo(&self, owner: &str, name: &str) -> Result<Repo, CoreError> {
        validate::repo_component("owner", owner)?;
        validate::repo_component("name", name)?;
        self.store
            .get_repo(owner, name)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("repository {owner}/{name}")))
    }

    /// The GitHub repository whose webhook URL has `hook_id`.
    pub async fn repo_by_hook(&self, hook_id: &str) -> Result<Option<Repo>, CoreError> {
        Ok(self.store.find_repo_by_hook(hook_id).await?)
    }
}

/// What registering a GitHub repository takes (with the caller's token).
#[derive(Debug, Clone)]
pub struct NewGitHubRepo {
    /// Default: the caller's own login.
    pub owner: Option<String>,
    pub name: String,
    pub branch: Option<String>,
    pub timeout_secs: Option<u64>,
    pub create_webhook: bool,
    pub deploy_labels: BTreeMap<String, String>,
    /// A log limit below the controller's.
    pub max_log_bytes: Option<u64>,
}

impl Services {
    /// Registers a GitHub repository with the caller's token, after checking
    /// that the token can read it; with `create_webhook`, also creates the
    /// webhook (needs admin rights on the repository).
    async fn register_github_repo(
        &self,
        caller: &Caller,
        new: NewGitHubRepo,
    ) -> Result<Registered, CoreError> {
        let NewGitHubRepo {
            owner,
            name,
            branch,
            timeout_secs,
            create_webhook,
            deploy_labels,
            max_log_bytes,
        } = new;
        let name = name.as_str();
        let Caller::GitHub { login, token } = caller else {
            return Err(CoreError::Forbidden(
                "registering a GitHub repository needs GitHub credentials: send Authorization: Bearer <github token> and X-GitHub-Username (or give git_url to register by URL)".to_owned(),
            ));
        };
        // Without an owner: the caller's own repository.
        let owner = owner.as_deref().unwrap_or(login);
        validate::repo_component("owner", owner)?;
        validate::repo_component("name", name)?;
        validate::labels("deploy_labels", &deploy_labels)?;
        let max_log_bytes = self.repo_log_limit(max_log_bytes)?;
        let info = self.registrable(login, token, owner, name).await?;
        let branch = branch
            .or(info.default_branch)
            .unwrap_or_else(|| "main".to_owned());
        validate::branch("branch", &branch)?;
        let timeout_secs = job_timeout(timeout_secs)?;
        let full_name = format!("{owner}/{name}");
        let hook_id = random_hex(16);
        let webhook_secret = random_hex(32);
        let repo = Repo {
            owner: owner.to_owned(),
            name: name.to_owned(),
            git_url: self.github.clone_url(owner, name),
            default_branch: branch,
            timeout_secs,
            created_at: Utc::now(),
            github: Some(GitHubLink {
                login: login.clone(),
                token_sealed: self
                    .secret_key
                    .seal(token.expose().as_bytes(), &token_context(&full_name)),
                hook_id: hook_id.clone(),
                webhook_secret_sealed: self.secret_key.seal(
                    webhook_secret.as_bytes(),
                    &webhook_secret_context(&full_name),
                ),
            }),
            disabled: None,
            env: Vec::new(),
            requeue_lost_tests: true,
            deploy_labels,
            max_log_bytes,
            notifications: Vec::new(),
        };
        let webhook_url = self.webhook_url(&hook_id);
        // Nothing is made on GitHub for a repository already registered;
        // the insert below still decides a race between two registrations.
        if self.store.get_repo(owner, name).await?.is_some() {
            return Err(CoreError::Conflict(format!(
                "repository {full_name} is already registered"
            )));
        }
        let webhook = Webhook {
            url: webhook_url,
            secret: webhook_secret,
        };
        self.store_with_webhook(&repo, token, create_webhook.then_some(&webhook))
            .await?;
        tracing::info!(repo = %full_name, github_login = %login, "GitHub repository registered");
        Ok(Registered {
            repo,
            webhook: Some(webhook),
        })
    }

    /// What GitHub says `login`'s token may do on `owner/name`, when that
    /// is enough to register it: admin rights (managing its webhooks).
    async fn registrable(
        &self,
        login: &str,
        token: &GitHubToken,
        owner: &str,
        name: &str,
    ) -> Result<crate::github::RepositoryInfo, CoreError> {
        let info = self
            .github
            .repository(token, owner, name)
            .await
            .map_err(crate::auth::caller_error)?;
        if !(info.permissions.pull || info.permissions.push) {
            return Err(CoreError::Forbidden(format!(
                "the token of {login} cannot read {owner}/{name}"
            )));
        }
        // Whoever registers a repository gets its webhook secret, and with
        // it the power to queue jobs that run with the repository's
        // secrets: that is GitHub's right to manage webhooks, not to read.
        if !info.permissions.admin {
            return Err(CoreError::Forbidden(format!(
                "registering {owner}/{name} needs admin rights on it on GitHub (the right to manage its webhooks): whoever registers a repository receives its webhook secret"
            )));
        }
        Ok(info)
    }

    /// Stores a GitHub repository's record, creating `webhook` on GitHub
    /// first when given. A hook made for a record that could not be stored
    /// is removed again: without the record it would only ever get 404.
    async fn store_with_webhook(
        &self,
        repo: &Repo,
        token: &GitHubToken,
        webhook: Option<&Webhook>,
    ) -> Result<(), CoreError> {
        let (owner, name, full_name) = (&repo.owner, &repo.name, repo.full_name());
        let hook = match webhook {
            Some(webhook) => Some(
                self.github
                    .create_hook(token, owner, name, &webhook.url, &webhook.secret)
                    .await
                    .map_err(crate::auth::caller_error)?,
            ),
            None => None,
        };
        let Err(err) = self.store.create_repo(repo.clone()).await else {
            return Ok(());
        };
        if let Some(id) = hook {
            match self.github.delete_hook(token, owner, name, id).await {
                Ok(()) => {
                    tracing::info!(repo = %full_name, hook = id, "webhook removed: the repository was not registered");
                }
                Err(cause) => {
                    tracing::warn!(repo = %full_name, hook = id, error = %cause, "cannot remove the webhook of a repository that was not registered; delete it on GitHub");
                }
            }
        }
        Err(err.into())
    }

    /// Asks GitHub whether `token` (the repository's stored one) still reads
    /// `repo`; when it does not, the repository is disabled (`access_lost`)
    /// and the answer is `false`. Other failures (GitHub unreachable, rate
    /// limits) decide nothing and are returned.
    pub(crate) async fn confirm_access(
        &self,
        repo: &Repo,
        token: &GitHubToken,
    ) -> Result<bool, GitHubError> {
        match self.github.repository(token, &repo.owner, &repo.name).await {
            Err(err @ (GitHubError::BadCredentials | GitHubError::NotFound)) => {
                self.access_lost(repo, &err).await;
                Ok(false)
            }
            Ok(info) if !(info.permissions.pull || info.permissions.push) => {
                self.access_lost(repo, &GitHubError::NotFound).await;
                Ok(false)
            }
            Ok(_) => Ok(true),
            Err(err) => Err(err),
        }
    }

    /// GitHub says the stored credentials no longer reach the repository:
    /// disable it, cancel its queued jobs, and have every agent delete its
    /// clones of it.
    pub async fn access_lost(&self, repo: &Repo, cause: &GitHubError) {
        let full_name = repo.full_name();
        let reason = format!("access to GitHub lost: {cause}");
        let disabled = self
            .change_repo(&repo.owner, &repo.name, |repo| {
                repo.disabled = Some(reason.clone());
                Ok(())
            })
            .await;
        if let Err(err) = disabled {
            tracing::warn!(repo = %full_name, error = %err, "cannot disable a repository");
            return;
        }
        tracing::warn!(repo = %full_name, cause = %cause, "repository disabled: access lost");
        let queued = self
            .store
            .list_jobs(&JobFilter {
                repo: Some(repo.reference()),
                state: Some(JobState::Queued),
                limit: usize::MAX,
                ..JobFilter::default()
            })
            .await
            .unwrap_or_default();
        for job in queued {
            let _ = self.store.request_cancel(job.id, Utc::now()).await;
        }
        self.store
            .announce(StoreEvent::RepoDisabled {
                git_url: repo.git_url.clone(),
            })
            .await;
    }
}

/// Checks every enabled GitHub repository's stored credentials every
/// `--github-recheck-interval`, until `shutdown`.
pub async fn recheck_github_access(services: Services, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(services.config.github_recheck_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Ok(repos) = services.store.list_repos().await else {
            continue;
        };
        for repo in repos {
            if repo.disabled.is_some() {
                continue;
            }
            let Some(token) = services.repo_token(&repo) else {
                continue;
            };
            if let Err(err) = services.confirm_access(&repo, &token).await {
                tracing::warn!(repo = %repo.full_name(), error = %err, "cannot re-check GitHub access");
            }
        }
    }
}

/// How many times a repository change is retried while others change it.
const MAX_REPO_CHANGE_ATTEMPTS: usize = 32;

impl Services {
    /// Reads a repository, applies `change` and writes it back if nobody
    /// changed it meanwhile; retried otherwise.
    pub async fn change_repo<T>(
        &self,
        owner: &str,
        name: &str,
        mut change: impl FnMut(&mut Repo) -> Result<T, CoreError>,
    ) -> Result<T, CoreError> {
        for _ in 0..MAX_REPO_CHANGE_ATTEMPTS {
            let old = self.repo(owner, name).await?;
            let mut new = old.clone();
            let result = change(&mut new)?;
            if self.store.update_repo(&old, new).await? {
                return Ok(result);
            }
        }
        Err(CoreError::Conflict(format!(
            "repository {owner}/{name} kept changing; retry"
        )))
    }

    /// Replaces the labels an agent's token must vouch for to take a deploy
    /// of `repo`. Deploys queued from now on require them.
    async fn set_deploy_labels(
        &self,
        repo: &Repo,
        deploy_labels: BTreeMap<String, String>,
    ) -> Result<Repo, CoreError> {
        validate::labels("deploy_labels", &deploy_labels)?;
        self.change_repo(&repo.owner, &repo.name, |updated| {
            updated.deploy_labels = deploy_labels.clone();
            Ok(updated.clone())
        })
        .await
    }
}
