//! CORE: triggering, cancelling and expiring jobs. Dispatch to agents is in
//! `agents` (the session), built on `Store::claim_job`.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use hobotnica_common::env::is_reserved;
use hobotnica_common::ids::{CommitSha, JobId};
use hobotnica_common::job::{Job, JobKind, JobState, Repo, Trigger, format_labels, missing_label};
use hobotnica_common::validate;
use tokio_util::sync::CancellationToken;

use crate::error::CoreError;
use crate::git::{GitError, resolve_branch};
use crate::github::GitHubError;
use crate::services::{Services, agent_connected};
pub use crate::store::JobFilter;
use crate::store::{NewJob, Retention};

/// Most one-time variables a trigger may carry.
pub const MAX_ENV_VARS: usize = 200;
/// Most jobs one list request returns.
pub const MAX_PAGE_SIZE: usize = 200;

/// What a trigger asks for.
#[derive(Debug, Clone)]
pub struct TriggerJob {
    pub target: String,
    pub commit: Option<String>,
    pub branch: Option<String>,
    pub env: BTreeMap<String, String>,
    pub trigger: Trigger,
    /// Who asked (`admin` or a GitHub login).
    pub requested_by: String,
}

/// Checks one-time (or any job-level) variables.
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), CoreError> {
    if env.len() > MAX_ENV_VARS {
        return Err(CoreError::invalid(
            "env",
            format!("at most {MAX_ENV_VARS} variables"),
        ));
    }
    for (name, value) in env {
        let field = format!("env.{name}");
        validate::env_name(&field, name)?;
        if is_reserved(name) {
            return Err(CoreError::invalid(
                &field,
                "PATH, HOME, CI and HOBOTNICA_* are set by Hobotnica and cannot be overridden",
            ));
        }
        validate::env_value(&field, value)?;
    }
    Ok(())
}

impl Services {
    /// The one mapping of GitHub errors met with a repository's stored
    /// token (not the caller's): they are the repository's problem. A token
    /// GitHub rejects means access is lost: the repository is disabled as
    /// the periodic re-check would, and the answer says what to do.
    async fn stored_token_error(&self, repo: &Repo, err: GitHubError) -> CoreError {
        let full_name = repo.full_name();
        match err {
            GitHubError::BadCredentials => {
                self.access_lost(repo, &err).await;
                CoreError::Gone(format!(
                    "the stored GitHub token of repository {full_name} was rejected by GitHub (revoked or expired); the repository is now disabled: remove it and register it again with a working token"
                ))
            }
            GitHubError::Forbidden(message) => CoreError::Upstream(format!(
                "GitHub refused the stored GitHub token of repository {full_name}: {message}"
            )),
            GitHubError::RateLimited { .. } => CoreError::RateLimited(format!(
                "GitHub's rate limit for the stored GitHub token of repository {full_name} is exhausted; retry later"
            )),
            GitHubError::NotFound => CoreError::Upstream(format!(
                "GitHub does not show repository {full_name} to its stored GitHub token"
            )),
            GitHubError::Unavailable(detail) => CoreError::Upstream(format!(
                "GitHub could not be reached; retry later ({detail})"
            )),
        }
    }

    pub async fn trigger_job(
        &self,
        owner: &str,
        name: &str,
        request: TriggerJob,
    ) -> Result<Job, CoreError> {
        let repo = self.repo(owner, name).await?;
        if let Some(reason) = &repo.disabled {
            return Err(CoreError::Gone(format!(
                "repository {} is disabled: {reason}",
                repo.full_name()
            )));
        }
        validate::target("target", &request.target)?;
        validate_env(&request.env)?;
        let (commit, branch) = match (request.commit, request.branch) {
            // A commit runs as given; a branch beside it is only recorded
            // (where the commit came from), not resolved.
            (Some(commit), branch) => {
                let sha: CommitSha = commit.parse().map_err(|_| {
                    CoreError::invalid("commit", "must be 40 hexadecimal characters")
                })?;
                if let Some(branch) = &branch {
                    validate::branch("branch", branch)?;
                }
                // GitHub can tell at once whether the commit exists; a plain
                // git remote cannot (the agent's fetch finds out).
                if let Some(token) = self.repo_token(&repo) {
                    let exists = match self
                        .github
                        .commit_exists(&token, &repo.owner, &repo.name, &sha)
                        .await
                    {
                        Ok(exists) => exists,
                        Err(err) => return Err(self.stored_token_error(&repo, err).await),
                    };
                    if !exists {
                        return Err(CoreError::invalid(
                            "commit",
                            format!("commit {sha} does not exist in {}", repo.full_name()),
                        ));
                    }
                }
                (sha, branch)
            }
            (None, branch) => {
                let branch = branch.unwrap_or_else(|| repo.default_branch.clone());
                validate::branch("branch", &branch)?;
                let sha =
                    match self.repo_token(&repo) {
                        Some(token) => match self
                            .github
                            .branch_head(&token, &repo.owner, &repo.name, &branch)
                            .await
                        {
                            Ok(sha) => sha,
                            Err(GitHubError::NotFound) => {
                                return Err(CoreError::invalid(
                                    "branch",
                                    format!("branch {branch:?} does not exist in the repository"),
                                ));
                            }
                            Err(err) => return Err(self.stored_token_error(&repo, err).await),
                        },
                        None => resolve_branch(&repo.git_url, &branch)
                            .await
                            .map_err(|err| match err {
                                GitError::NoSuchBranch { .. } => {
                                    CoreError::invalid("branch", err.to_string())
                                }
                                GitError::Unreachable(_) => CoreError::Upstream(err.to_string()),
                            })?,
                    };
                (sha, Some(branch))
            }
        };
        let job = self
            .store
            .create_job(
                NewJob {
                    repo: repo.full_name(),
                    git_url: repo.git_url.clone(),
                    kind: JobKind::for_target(&request.target),
                    trusted_labels: trusted_labels(&repo, JobKind::for_target(&request.target)),
                    target: request.target,
                    commit,
                    branch,
                    env: request.env,
                    labels: BTreeMap::new(),
                    trigger: request.trigger,
                    timeout_secs: repo.timeout_secs,
                    from_fork: false,
                    requested_by: Some(request.requested_by),
                },
                Utc::now(),
            )
            .await?;
        tracing::info!(job.id = %job.id, repo = %job.repo, target = %job.target, commit = %job.commit, "job queued");
        Ok(job)
    }

    /// Queues `make test` for a webhook delivery, once: `None` when the
    /// delivery was seen before (a redelivery).
    pub async fn queue_webhook_delivery(
        &self,
        repo: &Repo,
        delivery: &str,
        commit: CommitSha,
        branch: Option<String>,
        from_fork: bool,
    ) -> Result<Option<Job>, CoreError> {
        if !self.store.remember_delivery(delivery, Utc::now()).await? {
            return Ok(None);
        }
        match self
            .queue_webhook_job(repo, commit, branch, from_fork)
            .await
        {
            Ok(job) => Ok(Some(job)),
            Err(err) => {
                let _ = self.store.forget_delivery(delivery).await;
                Err(err)
            }
        }
    }

    /// Queues `make test` for a webhook delivery.
    pub async fn queue_webhook_job(
        &self,
        repo: &Repo,
        commit: CommitSha,
        branch: Option<String>,
        from_fork: bool,
    ) -> Result<Job, CoreError> {
        let job = self
            .store
            .create_job(
                NewJob {
                    repo: repo.full_name(),
                    git_url: repo.git_url.clone(),
                    kind: JobKind::Test,
                    target: "test".to_owned(),
                    commit,
                    branch,
                    env: BTreeMap::new(),
                    labels: BTreeMap::new(),
                    trusted_labels: trusted_labels(repo, JobKind::Test),
                    trigger: Trigger::Webhook,
                    timeout_secs: repo.timeout_secs,
                    from_fork,
                    requested_by: Some("webhook".to_owned()),
                },
                Utc::now(),
            )
            .await?;
        tracing::info!(job.id = %job.id, repo = %job.repo, commit = %job.commit, from_fork, "job queued by a webhook");
        Ok(job)
    }

    pub async fn job(&self, id: JobId) -> Result<Job, CoreError> {
        let mut job = self
            .store
            .get_job(id)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("job {id}")))?;
        self.explain_wait(&mut job).await;
        Ok(job)
    }

    /// Says in a queued job's message why no agent has taken it yet.
    async fn explain_wait(&self, job: &mut Job) {
        if job.state != JobState::Queued || job.message.is_some() {
            return;
        }
        let Ok(agents) = self.store.list_agents().await else {
            return;
        };
        let now = Utc::now();
        let connected: Vec<_> = agents
            .iter()
            .filter(|agent| agent_connected(agent.last_seen, now))
            .collect();
        if job.kind == JobKind::Deploy
            && let Ok(running) = self
                .store
                .list_jobs(&JobFilter {
                    repo: Some(job.repo.clone()),
                    state: Some(JobState::Running),
                    kind: Some(JobKind::Deploy),
                    limit: 1,
                    ..JobFilter::default()
                })
                .await
            && let Some(current) = running.first()
        {
            job.message = Some(format!(
                "waiting: deploy {} of this repository is running (one deploy at a time)",
                current.id
            ));
            return;
        }
        let reason = if connected.is_empty() {
            "waiting: no agent is connected".to_owned()
        } else if !connected
            .iter()
            .any(|agent| missing_label(&job.labels, &agent.labels).is_none())
        {
            format!(
                "waiting: no connected agent has labels {}",
                format_labels(&job.labels)
            )
        } else if !connected
            .iter()
            .any(|agent| job.claimable_by(&agent.labels, &agent.vouched_labels))
        {
            format!(
                "waiting: no connected agent's token vouches for {} (the repository's deploy_labels)",
                format_labels(&job.trusted_labels)
            )
        } else {
            "waiting for a free agent".to_owned()
        };
        job.message = Some(reason);
    }

    pub async fn list_jobs(&self, mut filter: JobFilter) -> Result<Vec<Job>, CoreError> {
        if let Some(repo) = &filter.repo {
            let (owner, name) = repo
                .split_once('/')
                .ok_or_else(|| CoreError::invalid("repo", "must be owner/name"))?;
            validate::repo_component("repo", owner)?;
            validate::repo_component("repo", name)?;
        }
        filter.limit = filter.limit.clamp(1, MAX_PAGE_SIZE);
        Ok(self.store.list_jobs(&filter).await?)
    }

    pub async fn cancel_job(&self, id: JobId) -> Result<Job, CoreError> {
        self.job(id).await?;
        let job = self.store.request_cancel(id, Utc::now()).await?;
        if job.state.is_terminal() {
            self.statuses.job_changed(&job);
        }
        tracing::info!(job.id = %id, state = %job.state, "cancel requested");
        Ok(job)
    }
}

/// Marks jobs whose lease ran out as `lost`, until `shutdown`.
pub async fn lease_reaper(services: Services, shutdown: CancellationToken) {
    let period = (services.config.lease_timeout / 4).max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut store_was_down = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // After the store was unreachable, agents could not renew: give every
        // running job a fresh lease before expiring any.
        if store_was_down {
            match services
                .store
                .extend_leases(services.lease_until(Utc::now()))
                .await
            {
                Ok(()) => {
                    tracing::info!("store reachable again: running leases extended");
                    store_was_down = false;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "store still unreachable");
                    continue;
                }
            }
        }
        match services.store.expire_leases(Utc::now()).await {
            Ok(lost) => {
                for job in lost {
                    services.statuses.job_changed(&job);
                    services.requeue_if_allowed(&job).await;
                    tracing::warn!(job.id = %job.id, agent = job.agent_name.as_deref().unwrap_or("?"), "lease expired: job lost");
                    let line = format!(
                        "job lost: {}",
                        job.message.as_deref().unwrap_or("lease expired")
                    );
                    if let Err(err) = services.store.append_controller_line(job.id, &line).await {
                        tracing::warn!(job.id = %job.id, error = %err, "cannot note the loss in the log");
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "lease expiry check failed");
                store_was_down = true;
            }
        }
    }
}

/// How often finished jobs' logs are archived.
pub const ARCHIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How often the retention policy is applied.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// Archives finished logs and applies the retention policy, until
/// `shutdown`. Every controller runs it; the store makes each step safe to
/// run concurrently.
pub async fn maintenance(services: Services, shutdown: CancellationToken) {
    let retention = Retention {
        max_age: services.config.retention,
        max_jobs_per_repo: services.config.retention_jobs_per_repo,
    };
    let mut archive = tokio::time::interval(ARCHIVE_INTERVAL);
    let mut prune = tokio::time::interval(PRUNE_INTERVAL);
    archive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = archive.tick() => {
                let finished_before = Utc::now() - ARCHIVE_INTERVAL;
                match services.store.archive_logs(finished_before).await {
                    Ok(0) => {}
                    Ok(count) => tracing::debug!(count, "logs archived"),
                    Err(err) => tracing::warn!(error = %err, "archiving logs failed"),
                }
            }
            _ = prune.tick() => {
                match services.store.prune(&retention, Utc::now()).await {
                    Ok(0) => {}
                    Ok(count) => tracing::info!(count, "old jobs deleted (retention)"),
                    Err(err) => tracing::warn!(error = %err, "applying the retention policy failed"),
                }
            }
        }
    }
}

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

impl Services {
    /// Queues `make deploy` at a commit or a branch's tip (resolved now). A
    /// repeated `idempotency_key` answers with the job the first request
    /// created (`false`: not new).
    pub async fn deploy(
        &self,
        owner: &str,
        name: &str,
        request: TriggerJob,
        idempotency_key: Option<&str>,
    ) -> Result<(Job, bool), CoreError> {
        let Some(key) = idempotency_key else {
            return Ok((self.trigger_job(owner, name, request).await?, true));
        };
        if key.is_empty()
            || key.len() > MAX_IDEMPOTENCY_KEY_LEN
            || !key.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(CoreError::invalid(
                "Idempotency-Key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"),
            ));
        }
        let scoped = format!("idempotency:{owner}/{name}:{key}");
        // What the request asked for: the same key with another request is
        // a client's mistake, not a retry.
        let fingerprint = hobotnica_common::token::hash_token(&format!(
            "{:?}|{:?}|{:?}|{:?}",
            request.target, request.commit, request.branch, request.env,
        ));
        let scoped_request = format!("{scoped}#{}", &fingerprint[..32]);
        if !self.store.remember_delivery(&scoped, Utc::now()).await? {
            // A repeat: only the first request writes anything, so repeats
            // cannot race each other or it.
            let Some(id) = self.store.key_job(&scoped).await? else {
                return Err(CoreError::Conflict(
                    "a request with this Idempotency-Key is still being handled; retry shortly"
                        .to_owned(),
                ));
            };
            if self.store.key_job(&scoped_request).await? != Some(id) {
                return Err(CoreError::invalid(
                    "Idempotency-Key",
                    "this key was already used with a different request",
                ));
            }
            return Ok((self.job(id).await?, false));
        }
        match self.trigger_job(owner, name, request).await {
            Ok(job) => {
                // The request's fingerprint first: once the key names the
                // job, a repeat can compare.
                self.store.set_key_job(&scoped_request, job.id).await?;
                self.store.set_key_job(&scoped, job.id).await?;
                Ok((job, true))
            }
            Err(err) => {
                let _ = self.store.forget_delivery(&scoped).await;
                Err(err)
            }
        }
    }
}

/// The labels the token of an agent taking a job of `kind` must vouch for: a
/// deploy's are its repository's `deploy_labels`, recorded in the job when
/// it is queued.
pub fn trusted_labels(repo: &Repo, kind: JobKind) -> BTreeMap<String, String> {
    if kind == JobKind::Deploy {
        repo.deploy_labels.clone()
    } else {
        BTreeMap::new()
    }
}

impl Services {
    /// Runs a finished job again as a new job: same repository, commit,
    /// branch, target and one-time variables.
    pub async fn retry_job(&self, id: JobId, requested_by: String) -> Result<Job, CoreError> {
        let old = self.job(id).await?;
        if !old.state.is_terminal() {
            return Err(CoreError::Conflict(format!(
                "job {id} is {}: only a finished job can be retried",
                old.state
            )));
        }
        let (owner, name) = old
            .repo
            .split_once('/')
            .ok_or_else(|| CoreError::NotFound(format!("repository {}", old.repo)))?;
        let repo = self.repo(owner, name).await?;
        if let Some(reason) = &repo.disabled {
            return Err(CoreError::Gone(format!(
                "repository {} is disabled: {reason}",
                repo.full_name()
            )));
        }
        let job = self
            .store
            .create_job(
                NewJob {
                    repo: old.repo,
                    git_url: repo.git_url.clone(),
                    kind: old.kind,
                    target: old.target,
                    commit: old.commit,
                    branch: old.branch,
                    env: old.env,
                    labels: old.labels,
                    trusted_labels: trusted_labels(&repo, old.kind),
                    trigger: Trigger::Retry,
                    timeout_secs: repo.timeout_secs,
                    from_fork: old.from_fork,
                    requested_by: Some(requested_by),
                },
                Utc::now(),
            )
            .await?;
        tracing::info!(job.id = %job.id, retry_of = %id, "job retried");
        Ok(job)
    }
}

impl Services {
    /// The latest successful deploy of a repository.
    pub async fn last_deploy(&self, repo: &str) -> Result<Option<Job>, CoreError> {
        Ok(self
            .store
            .list_jobs(&JobFilter {
                repo: Some(repo.to_owned()),
                kind: Some(JobKind::Deploy),
                state: Some(JobState::Succeeded),
                limit: 1,
                ..JobFilter::default()
            })
            .await?
            .into_iter()
            .next())
    }
}

impl Services {
    /// A lost `test` job is queued again, once, when its repository allows
    /// it. Deploys never are: they are not idempotent; a person retries them.
    async fn requeue_if_allowed(&self, lost: &Job) {
        if lost.kind != JobKind::Test
            || lost.requested_by.as_deref() == Some(hobotnica_common::job::AUTOMATIC_RETRY)
        {
            return;
        }
        let allowed = match lost.repo.split_once('/') {
            Some((owner, name)) => matches!(
                self.store.get_repo(owner, name).await,
                Ok(Some(repo)) if repo.requeue_lost_tests && repo.disabled.is_none()
            ),
            None => false,
        };
        if !allowed {
            return;
        }
        match self
            .retry_job(lost.id, hobotnica_common::job::AUTOMATIC_RETRY.to_owned())
            .await
        {
            Ok(job) => {
                tracing::info!(job.id = %job.id, lost = %lost.id, "lost test job queued again")
            }
            Err(err) => {
                tracing::warn!(job.id = %lost.id, error = %err, "cannot queue a lost test job again")
            }
        }
    }
}
