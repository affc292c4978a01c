//! CORE: registering, showing and removing repositories.

use std::collections::BTreeMap;

use chrono::Utc;
use hobotnica_common::job::{DEFAULT_JOB_TIMEOUT_SECS, EnvVar, GitHubLink, JobState, Repo};
use hobotnica_common::token::random_hex;
use hobotnica_common::validate;
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;
use crate::error::CoreError;
use crate::git::check_git_url;
use crate::github::{GitHubError, GitHubToken};
use crate::services::Services;
use crate::store::{JobFilter, StoreEvent};

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
}

impl Services {
    pub async fn register_repo(&self, new: NewRepo) -> Result<Repo, CoreError> {
        let owner = new.owner.unwrap_or_else(|| LOCAL_OWNER.to_owned());
        validate::repo_component("owner", &owner)?;
        validate::repo_component("name", &new.name)?;
        check_git_url(&new.git_url).map_err(|reason| CoreError::invalid("git_url", reason))?;
        let branch = new.branch.unwrap_or_else(|| "main".to_owned());
        validate::branch("branch", &branch)?;
        validate::labels("deploy_labels", &new.deploy_labels)?;
        let timeout_secs = new.timeout_secs.unwrap_or(DEFAULT_JOB_TIMEOUT_SECS);
        if timeout_secs == 0 || timeout_secs > MAX_TIMEOUT_SECS {
            return Err(CoreError::invalid(
                "timeout_secs",
                format!("must be between 1 and {MAX_TIMEOUT_SECS} seconds"),
            ));
        }
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
        };
        self.store.create_repo(repo.clone()).await?;
        tracing::info!(repo = %repo.full_name(), "repository registered");
        Ok(repo)
    }

    pub async fn repo(&self, owner: &str, name: &str) -> Result<Repo, CoreError> {
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

    /// Every registered repository (callers filter by access).
    pub async fn list_repos(&self) -> Result<Vec<Repo>, CoreError> {
        Ok(self.store.list_repos().await?)
    }

    pub async fn delete_repo(&self, owner: &str, name: &str) -> Result<(), CoreError> {
        self.repo(owner, name).await?;
        self.store.delete_repo(owner, name).await?;
        tracing::info!(repo = %format!("{owner}/{name}"), "repository removed");
        Ok(())
    }
}

/// Context strings that bind sealed secrets to their repository.
fn token_context(full_name: &str) -> String {
    format!("github-token:{full_name}")
}
fn webhook_secret_context(full_name: &str) -> String {
    format!("webhook-secret:{full_name}")
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
}

/// A GitHub repository just registered, with what is shown only now.
pub struct RegisteredGitHubRepo {
    pub repo: Repo,
    pub webhook_url: String,
    pub webhook_secret: String,
}

impl Services {
    /// Registers a GitHub repository with the caller's token, after checking
    /// that the token can read it; with `create_webhook`, also creates the
    /// webhook (needs admin rights on the repository).
    pub async fn register_github_repo(
        &self,
        caller: &Caller,
        new: NewGitHubRepo,
    ) -> Result<RegisteredGitHubRepo, CoreError> {
        let NewGitHubRepo {
            owner,
            name,
            branch,
            timeout_secs,
            create_webhook,
            deploy_labels,
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
        if create_webhook && !info.permissions.admin {
            return Err(CoreError::Forbidden(format!(
                "creating the webhook needs admin rights on {owner}/{name}; register without create_webhook and add the webhook by hand"
            )));
        }
        let branch = branch
            .or(info.default_branch)
            .unwrap_or_else(|| "main".to_owned());
        validate::branch("branch", &branch)?;
        let timeout_secs = timeout_secs.unwrap_or(DEFAULT_JOB_TIMEOUT_SECS);
        if timeout_secs == 0 || timeout_secs > MAX_TIMEOUT_SECS {
            return Err(CoreError::invalid(
                "timeout_secs",
                format!("must be between 1 and {MAX_TIMEOUT_SECS} seconds"),
            ));
        }
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
        };
        let webhook_url = format!("{}/webhooks/github/{hook_id}", self.public_url());
        // Nothing is made on GitHub for a repository already registered;
        // the insert below still decides a race between two registrations.
        if self.store.get_repo(owner, name).await?.is_some() {
            return Err(CoreError::Conflict(format!(
                "repository {full_name} is already registered"
            )));
        }
        let hook = if create_webhook {
            let id = self
                .github
                .create_hook(token, owner, name, &webhook_url, &webhook_secret)
                .await
                .map_err(crate::auth::caller_error)?;
            Some(id)
        } else {
            None
        };
        if let Err(err) = self.store.create_repo(repo.clone()).await {
            // Without the record the hook would only ever be answered 404.
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
            return Err(err.into());
        }
        tracing::info!(repo = %full_name, github.login = %login, "GitHub repository registered");
        Ok(RegisteredGitHubRepo {
            repo,
            webhook_url,
            webhook_secret,
        })
    }

    /// The stored GitHub token of a repository.
    pub fn repo_token(&self, repo: &Repo) -> Option<GitHubToken> {
        let github = repo.github.as_ref()?;
        match self
            .secret_key
            .open(&github.token_sealed, &token_context(&repo.full_name()))
        {
            Ok(bytes) => String::from_utf8(bytes).ok().map(GitHubToken::new),
            Err(err) => {
                tracing::error!(repo = %repo.full_name(), error = %err, "cannot open the stored GitHub token (wrong --secret-key-file?)");
                None
            }
        }
    }

    /// The webhook secret of a GitHub repository.
    pub fn webhook_secret(&self, repo: &Repo) -> Option<Vec<u8>> {
        let github = repo.github.as_ref()?;
        self.secret_key
            .open(
                &github.webhook_secret_sealed,
                &webhook_secret_context(&repo.full_name()),
            )
            .ok()
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
                repo: Some(full_name.clone()),
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
            match services
                .github
                .repository(&token, &repo.owner, &repo.name)
                .await
            {
                Err(err @ (GitHubError::BadCredentials | GitHubError::NotFound)) => {
                    services.access_lost(&repo, &err).await;
                }
                Ok(info) if !(info.permissions.pull || info.permissions.push) => {
                    services.access_lost(&repo, &GitHubError::NotFound).await;
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(repo = %repo.full_name(), error = %err, "cannot re-check GitHub access");
                }
            }
        }
    }
}

/// Most variables a repository may have.
pub const MAX_REPO_VARS: usize = 200;
/// How many times a repository change is retried while others change it.
const MAX_REPO_CHANGE_ATTEMPTS: usize = 32;

fn env_context(full_name: &str, key: &str) -> String {
    format!("env:{full_name}:{key}")
}

/// The forms of a secret value the agent masks: the value, each of its
/// lines of 4 characters or more (a multi-line secret printed line by line),
/// and its base64 encoding.
pub fn mask_forms(value: &str) -> Vec<String> {
    use base64::Engine as _;
    let mut forms = vec![value.to_owned()];
    if value.contains('\n') {
        forms.extend(
            value
                .lines()
                .map(str::trim_end)
                .filter(|line| line.len() >= 4)
                .map(str::to_owned),
        );
    }
    forms.push(base64::engine::general_purpose::STANDARD.encode(value));
    forms.retain(|form| form.len() >= 4);
    forms.sort();
    forms.dedup();
    forms
}

/// A variable to set on a repository.
#[derive(Debug, Clone)]
pub struct SetEnv {
    pub key: String,
    pub value: String,
    pub secret: bool,
    pub scope: hobotnica_common::job::EnvScope,
}

/// What a job gets at assignment: its variables (repository, kind, one-time;
/// secrets opened) and the values the agent must mask.
#[derive(Debug, Default)]
pub struct JobEnvironment {
    pub env: std::collections::BTreeMap<String, String>,
    pub secrets: Vec<String>,
}

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

    /// Adds or replaces a repository variable.
    pub async fn set_env(&self, repo: &Repo, set: SetEnv) -> Result<EnvVar, CoreError> {
        let field = format!("env.{}", set.key);
        validate::env_name(&field, &set.key)?;
        if hobotnica_common::env::is_reserved(&set.key) {
            return Err(CoreError::invalid(
                &field,
                "PATH, HOME, CI and HOBOTNICA_* are set by Hobotnica and cannot be overridden",
            ));
        }
        validate::env_value(&field, &set.value)?;
        let var = if set.secret {
            EnvVar {
                key: set.key.clone(),
                scope: set.scope,
                secret: true,
                value: None,
                sealed: Some(self.secret_key.seal(
                    set.value.as_bytes(),
                    &env_context(&repo.full_name(), &set.key),
                )),
            }
        } else {
            EnvVar {
                key: set.key.clone(),
                scope: set.scope,
                secret: false,
                value: Some(set.value),
                sealed: None,
            }
        };
        self.change_repo(&repo.owner, &repo.name, |updated| {
            updated
                .env
                .retain(|other| !(other.key == var.key && other.scope == var.scope));
            if updated.env.len() >= MAX_REPO_VARS {
                return Err(CoreError::invalid(
                    "env",
                    format!("a repository has at most {MAX_REPO_VARS} variables"),
                ));
            }
            updated.env.push(var.clone());
            updated
                .env
                .sort_by(|a, b| (&a.key, a.scope as u8).cmp(&(&b.key, b.scope as u8)));
            Ok(())
        })
        .await?;
        tracing::info!(repo = %repo.full_name(), key = %var.key, secret = var.secret, "variable set");
        Ok(var)
    }

    /// Replaces the labels an agent's token must vouch for to take a deploy
    /// of `repo`. Deploys queued from now on require them.
    pub async fn set_deploy_labels(
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

    /// Removes a repository variable (of every scope, or of one).
    pub async fn delete_env(
        &self,
        repo: &Repo,
        key: &str,
        scope: Option<hobotnica_common::job::EnvScope>,
    ) -> Result<(), CoreError> {
        self.change_repo(&repo.owner, &repo.name, |updated| {
            let before = updated.env.len();
            updated
                .env
                .retain(|var| !(var.key == key && scope.is_none_or(|scope| var.scope == scope)));
            if updated.env.len() == before {
                return Err(CoreError::NotFound(format!("variable {key}")));
            }
            Ok(())
        })
        .await
    }

    /// The variables of `job`: the repository's (scope `all`, then the job's
    /// kind), then the job's one-time ones; secrets opened (none for a pull
    /// request from a fork), with their mask forms.
    pub fn job_environment(&self, repo: &Repo, job: &hobotnica_common::job::Job) -> JobEnvironment {
        use hobotnica_common::job::EnvScope;
        let mut out = JobEnvironment::default();
        let layers = [
            |scope: EnvScope| scope == EnvScope::All,
            |scope: EnvScope| scope != EnvScope::All,
        ];
        for in_layer in layers {
            for var in repo
                .env
                .iter()
                .filter(|var| in_layer(var.scope) && var.scope.applies_to(job.kind))
            {
                let value = match (&var.value, &var.sealed) {
                    (Some(value), _) => value.clone(),
                    (None, Some(_)) if job.from_fork => continue,
                    (None, Some(sealed)) => {
                        match self
                            .secret_key
                            .open(sealed, &env_context(&repo.full_name(), &var.key))
                        {
                            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                            Err(err) => {
                                tracing::error!(repo = %repo.full_name(), key = %var.key, error = %err, "cannot open a secret variable");
                                continue;
                            }
                        }
                    }
                    (None, None) => continue,
                };
                if var.secret {
                    out.secrets.extend(mask_forms(&value));
                }
                out.env.insert(var.key.clone(), value);
            }
        }
        out.env
            .extend(job.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }
}

#[cfg(test)]
mod env_tests {
    use super::mask_forms;

    #[test]
    fn mask_forms_cover_lines_and_base64() {
        let forms = mask_forms("-----BEGIN KEY-----\nabcdefgh\nxy\n-----END KEY-----");
        assert!(forms.contains(&"abcdefgh".to_owned()));
        assert!(forms.contains(&"-----BEGIN KEY-----".to_owned()));
        assert!(
            !forms.contains(&"xy".to_owned()),
            "short lines are not masked"
        );
        assert!(forms.iter().any(|f| f.starts_with("LS0tLS1CRUdJTi")));
        assert_eq!(
            mask_forms("hunter2"),
            vec!["aHVudGVyMg==".to_owned(), "hunter2".to_owned()]
        );
    }
}

/// Re-seals one value from `old` to `new`; a value already sealed with `new`
/// (a rotation that was interrupted and run again) is kept.
fn reseal(
    sealed: &str,
    context: &str,
    old: &hobotnica_common::secrets::SecretKey,
    new: &hobotnica_common::secrets::SecretKey,
) -> anyhow::Result<String> {
    if new.open(sealed, context).is_ok() {
        return Ok(sealed.to_owned());
    }
    let plain = old.open(sealed, context).map_err(|_| {
        anyhow::anyhow!("a secret ({context}) opens with neither the old nor the new key")
    })?;
    Ok(new.seal(&plain, context))
}

/// Re-encrypts every secret at rest (GitHub tokens, webhook secrets, secret
/// variables) from `old` to `new`. Safe to run again after an interruption.
/// Returns how many repositories were rewritten.
pub async fn rotate_secret_key(
    store: &dyn crate::store::Store,
    old: &hobotnica_common::secrets::SecretKey,
    new: &hobotnica_common::secrets::SecretKey,
) -> anyhow::Result<usize> {
    let mut rewritten = 0;
    for old_repo in store.list_repos().await? {
        let mut repo = old_repo.clone();
        let full_name = repo.full_name();
        if let Some(github) = repo.github.as_mut() {
            github.token_sealed =
                reseal(&github.token_sealed, &token_context(&full_name), old, new)?;
            github.webhook_secret_sealed = reseal(
                &github.webhook_secret_sealed,
                &webhook_secret_context(&full_name),
                old,
                new,
            )?;
        }
        for var in &mut repo.env {
            if let Some(sealed) = &var.sealed {
                var.sealed = Some(reseal(
                    sealed,
                    &env_context(&full_name, &var.key),
                    old,
                    new,
                )?);
            }
        }
        anyhow::ensure!(
            store.update_repo(&old_repo, repo).await?,
            "repository {full_name} changed during the rotation; stop the controllers and run it again"
        );
        rewritten += 1;
    }
    Ok(rewritten)
}

#[cfg(test)]
mod rotation_tests {
    use chrono::Utc;
    use hobotnica_common::job::{EnvScope, EnvVar, Repo};
    use hobotnica_common::secrets::SecretKey;

    use super::{env_context, rotate_secret_key};
    use crate::store::Store as _;
    use crate::store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn rotation_reseals_every_secret_and_can_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let old = SecretKey::from_hex(&SecretKey::generate_hex()).unwrap();
        let new = SecretKey::from_hex(&SecretKey::generate_hex()).unwrap();
        let context = env_context("local/demo", "TOKEN");
        store
            .create_repo(Repo {
                owner: "local".into(),
                name: "demo".into(),
                git_url: "file:///srv/demo.git".into(),
                default_branch: "main".into(),
                timeout_secs: 60,
                created_at: Utc::now(),
                github: None,
                disabled: None,
                requeue_lost_tests: true,
                deploy_labels: std::collections::BTreeMap::new(),
                env: vec![EnvVar {
                    key: "TOKEN".into(),
                    scope: EnvScope::All,
                    secret: true,
                    value: None,
                    sealed: Some(old.seal(b"s3cret-value", &context)),
                }],
            })
            .await
            .unwrap();
        assert_eq!(rotate_secret_key(&store, &old, &new).await.unwrap(), 1);
        // Again (an interrupted rotation is finished by running it again).
        assert_eq!(rotate_secret_key(&store, &old, &new).await.unwrap(), 1);
        let repo = store.get_repo("local", "demo").await.unwrap().unwrap();
        let sealed = repo.env[0].sealed.as_deref().unwrap();
        assert_eq!(new.open(sealed, &context).unwrap(), b"s3cret-value");
        assert!(old.open(sealed, &context).is_err());
    }
}
