//! CORE: jobs — triggering them (by a caller, a webhook, a retry), deploys
//! with idempotency keys, reading and paging them with the caller's access
//! checked, cancelling, and expiring lost ones. Dispatch to agents is in
//! `agents` (the session), built on `Store::claim_job`.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use hobotnica_common::env::is_reserved;
use hobotnica_common::ids::{CommitSha, JobId};
use hobotnica_common::job::{Job, JobKind, JobState, Repo, RepoRef, Trigger, format_labels};
use hobotnica_common::validate::{self, ValidationError};
use tokio_util::sync::CancellationToken;

use crate::agents::agent_connected;
use crate::auth::{Access, Caller};
use crate::error::CoreError;
use crate::git::{GitError, resolve_branch};
use crate::github::GitHubError;
use crate::services::Services;
pub use crate::store::JobFilter;
use crate::store::{NewJob, Retention};

/// Most one-time variables a trigger may carry.
pub const MAX_ENV_VARS: usize = 200;
/// Most jobs one page holds.
pub const MAX_PAGE_SIZE: usize = 200;
/// Jobs on a page when the caller does not say.
pub const DEFAULT_PAGE_SIZE: usize = 50;

/// What a caller asks to run: `make <target>` at a commit, or at a branch's
/// tip (resolved now), with one-time variables.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub target: String,
    pub commit: Option<String>,
    pub branch: Option<String>,
    pub env: BTreeMap<String, String>,
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
                hobotnica_common::env::RESERVED_NAMES,
            ));
        }
        validate::env_value(&field, value)?;
    }
    Ok(())
}

/// Which page of a job list: the jobs older than `before`, at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub before: Option<JobId>,
    pub limit: usize,
}

impl Page {
    /// The page a `cursor` from a previous page and a `limit` name (the
    /// default size without one). Errors name the query parameter.
    pub fn new(cursor: Option<&str>, limit: Option<usize>) -> Result<Page, ValidationError> {
        let before = cursor
            .map(|cursor| {
                // At most 19 digits, as the schema's `Cursor` says.
                cursor
                    .parse::<JobId>()
                    .ok()
                    .filter(|_| cursor.len() <= 19)
                    .ok_or_else(|| {
                        ValidationError::new("cursor", "not a cursor from a previous page")
                    })
            })
            .transpose()?;
        let limit = match limit {
            None => DEFAULT_PAGE_SIZE,
            Some(limit) if (1..=MAX_PAGE_SIZE).contains(&limit) => limit,
            Some(_) => {
                return Err(ValidationError::new(
                    "limit",
                    format!("must be 1 to {MAX_PAGE_SIZE}"),
                ));
            }
        };
        Ok(Page { before, limit })
    }
}

/// Which jobs a list shows (all of them when empty).
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    /// `owner/name`.
    pub repo: Option<String>,
    pub state: Option<JobState>,
    pub kind: Option<JobKind>,
}

/// A page of jobs, newest first, and the cursor of the next page when there
/// may be one.
#[derive(Debug, Clone)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    pub next_cursor: Option<JobId>,
}

/// What a live job list hears.
#[derive(Debug)]
pub enum JobChange {
    /// A job was queued, started, asked to cancel or ended.
    Changed(Box<Job>),
    /// Events may have been missed: read the list again.
    Resync,
}

/// A job as its page shows it: the job (as `GET /api/v1/jobs/{id}` gives
/// it), where its commit is on GitHub, and whether the caller may cancel
/// or retry it.
#[derive(Debug, Clone)]
pub struct JobOverview {
    pub job: Job,
    /// The commit's page on GitHub, for a job of a GitHub repository.
    pub commit_page: Option<String>,
    /// Push access: the rule of the cancel and retry endpoints.
    pub may_change: bool,
}

impl Services {
    /// Job `id` for `caller`, with the same authorisation as reading it
    /// through the REST API, and what its page offers.
    pub async fn job_overview(&self, caller: &Caller, id: JobId) -> Result<JobOverview, CoreError> {
        let job = self.job_for(caller, id, Access::Read).await?;
        let commit_page = match self.store.get_repo(&job.repo.owner, &job.repo.name).await? {
            Some(repo) => self
                .github_page(&repo)
                .map(|page| format!("{page}/commit/{}", job.commit)),
            None => None,
        };
        let may_change = self.may_change_job(caller, &job).await;
        Ok(JobOverview {
            job,
            commit_page,
            may_change,
        })
    }

    /// Queues `make <target>` on `owner/name` for `caller`, who needs push
    /// access.
    pub async fn trigger(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
        request: JobRequest,
    ) -> Result<Job, CoreError> {
        let repo = self.repo_for(caller, owner, name, Access::Push).await?;
        self.queue_job(&repo, request, Trigger::Api, caller.name())
            .await
    }

    /// Queues a job of a working repository from a checked request.
    async fn queue_job(
        &self,
        repo: &Repo,
        request: JobRequest,
        trigger: Trigger,
        requested_by: String,
    ) -> Result<Job, CoreError> {
        let new = self
            .job_to_queue(repo, request, trigger, requested_by)
            .await?;
        let job = self.store.create_job(new, Utc::now()).await?;
        tracing::info!(job_id = job.id.0, repo = %job.repo, target = %job.target, commit = %job.commit, "job queued");
        Ok(job)
    }

    /// The job a request asks for, checked and with its commit resolved;
    /// nothing is written yet.
    async fn job_to_queue(
        &self,
        repo: &Repo,
        request: JobRequest,
        trigger: Trigger,
        requested_by: String,
    ) -> Result<NewJob, CoreError> {
        require_enabled(repo)?;
        validate::target("target", &request.target)?;
        validate_env(&request.env)?;
        let (commit, branch) = match request.commit {
            Some(commit) => (
                self.existing_commit(repo, &commit, request.branch.as_deref())
                    .await?,
                request.branch,
            ),
            None => {
                let branch = request
                    .branch
                    .unwrap_or_else(|| repo.default_branch.clone());
                (self.branch_tip(repo, &branch).await?, Some(branch))
            }
        };
        let mut new = NewJob::new(repo, request.target, commit, branch, trigger, requested_by);
        new.env = request.env;
        Ok(new)
    }

    /// A commit a caller named. It runs as given; a branch beside it is
    /// only recorded (where the commit came from), not resolved. GitHub can
    /// tell at once whether the commit exists; a plain git remote cannot
    /// (the agent's fetch finds out).
    async fn existing_commit(
        &self,
        repo: &Repo,
        commit: &str,
        branch: Option<&str>,
    ) -> Result<CommitSha, CoreError> {
        let sha: CommitSha = commit
            .parse()
            .map_err(|_| CoreError::invalid("commit", "must be 40 hexadecimal characters"))?;
        if let Some(branch) = branch {
            validate::branch("branch", branch)?;
        }
        if let Some(token) = self.repo_token(repo) {
            let exists = match self
                .github
                .commit_exists(&token, &repo.owner, &repo.name, &sha)
                .await
            {
                Ok(exists) => exists,
                Err(err) => return Err(self.stored_token_error(repo, err).await),
            };
            if !exists {
                return Err(CoreError::invalid(
                    "commit",
                    format!("commit {sha} does not exist in {}", repo.full_name()),
                ));
            }
        }
        Ok(sha)
    }

    /// The commit at the tip of `branch` now (GitHub's API, or the remote).
    async fn branch_tip(&self, repo: &Repo, branch: &str) -> Result<CommitSha, CoreError> {
        validate::branch("branch", branch)?;
        match self.repo_token(repo) {
            Some(token) => match self
                .github
                .branch_head(&token, &repo.owner, &repo.name, branch)
                .await
            {
                Ok(sha) => Ok(sha),
                Err(GitHubError::NotFound) => Err(CoreError::invalid(
                    "branch",
                    format!("branch {branch:?} does not exist in the repository"),
                )),
                Err(err) => Err(self.stored_token_error(repo, err).await),
            },
            None => resolve_branch(&repo.git_url, branch)
                .await
                .map_err(|err| match err {
                    GitError::NoSuchBranch { .. } => CoreError::invalid("branch", err.to_string()),
                    GitError::Unreachable(_) => CoreError::Upstream(err.to_string()),
                }),
        }
    }

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

    /// Queues `make test` for a webhook delivery, once: `None` when the
    /// delivery was seen before (a redelivery). The delivery id and the job
    /// are written together, so a delivery cut off before its job exists
    /// is not remembered, and GitHub's redelivery queues the job.
    pub async fn queue_webhook_delivery(
        &self,
        repo: &Repo,
        delivery: &str,
        commit: CommitSha,
        branch: Option<String>,
        from_fork: bool,
    ) -> Result<Option<Job>, CoreError> {
        let mut new = NewJob::new(
            repo,
            "test".to_owned(),
            commit,
            branch,
            Trigger::Webhook,
            "webhook".to_owned(),
        );
        new.from_fork = from_fork;
        let job = self
            .store
            .create_job_once(delivery, &[], new, Utc::now())
            .await?;
        if let Some(job) = &job {
            tracing::info!(job_id = job.id.0, repo = %job.repo, commit = %job.commit, from_fork, "job queued by a webhook");
        }
        Ok(job)
    }

    /// Job `id` as stored, with why it waits when it is queued.
    pub(crate) async fn job(&self, id: JobId) -> Result<Job, CoreError> {
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
            .any(|agent| job.claimable_by(&agent.vouched_labels))
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

    /// The jobs matching `query` that `caller` may read, one page, newest
    /// first. A GitHub user sees the jobs of repositories their token can
    /// read; the page may hold fewer jobs than its limit, and the next
    /// cursor continues after the last job read.
    pub async fn visible_jobs(
        &self,
        caller: &Caller,
        query: JobQuery,
        page: Page,
    ) -> Result<JobPage, CoreError> {
        let repo = match query.repo {
            Some(repo) => Some(parse_repo_filter(&repo)?),
            None => None,
        };
        self.job_page(
            caller,
            JobFilter {
                repo,
                state: query.state,
                kind: query.kind,
                ..JobFilter::default()
            },
            page,
        )
        .await
    }

    /// The deploys of `owner/name`, one page, newest first.
    pub async fn repo_deploys(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
        page: Page,
    ) -> Result<JobPage, CoreError> {
        let repo = self.repo_for(caller, owner, name, Access::Read).await?;
        self.job_page(
            caller,
            JobFilter {
                repo: Some(repo.reference()),
                kind: Some(JobKind::Deploy),
                ..JobFilter::default()
            },
            page,
        )
        .await
    }

    async fn job_page(
        &self,
        caller: &Caller,
        mut filter: JobFilter,
        page: Page,
    ) -> Result<JobPage, CoreError> {
        filter.before = page.before;
        filter.limit = page.limit.clamp(1, MAX_PAGE_SIZE);
        let jobs = self.store.list_jobs(&filter).await?;
        let next_cursor = (jobs.len() >= filter.limit)
            .then(|| jobs.last().map(|job| job.id))
            .flatten();
        let mut visible = Vec::with_capacity(jobs.len());
        let mut readable: BTreeMap<RepoRef, bool> = BTreeMap::new();
        for job in jobs {
            let may_read = match readable.get(&job.repo) {
                Some(may_read) => *may_read,
                None => {
                    let may_read = self.may_read_job(caller, &job).await;
                    readable.insert(job.repo.clone(), may_read);
                    may_read
                }
            };
            if may_read {
                visible.push(job);
            }
        }
        Ok(JobPage {
            jobs: visible,
            next_cursor,
        })
    }

    /// The jobs matching `query` (repository and kind) that `caller` may
    /// read, each time one is queued, starts, is asked to cancel or ends,
    /// as the store's events announce it (no polling); `Resync` when events
    /// may have been missed. The state filter is the reader's: a job that
    /// left the state is news too.
    pub fn job_changes(
        &self,
        caller: Caller,
        query: JobQuery,
    ) -> Result<impl futures_util::Stream<Item = JobChange> + Send + 'static, CoreError> {
        use tokio::sync::broadcast::error::RecvError;
        let repo = match query.repo {
            Some(repo) => Some(parse_repo_filter(&repo)?),
            None => None,
        };
        struct Watch {
            services: Services,
            caller: Caller,
            repo: Option<RepoRef>,
            kind: Option<JobKind>,
            events: tokio::sync::broadcast::Receiver<crate::store::StoreEvent>,
            /// Jobs already seen running (or not to be shown): their log
            /// growing is no news.
            settled: std::collections::HashSet<JobId>,
        }
        let watch = Watch {
            events: self.store.subscribe(),
            services: self.clone(),
            caller,
            repo,
            kind: query.kind,
            settled: std::collections::HashSet::new(),
        };
        Ok(futures_util::stream::unfold(
            watch,
            |mut watch| async move {
                use crate::store::StoreEvent;
                loop {
                    let id = match watch.events.recv().await {
                        Ok(
                            StoreEvent::JobQueued { job }
                            | StoreEvent::JobStarted { job }
                            | StoreEvent::CancelRequested { job, .. },
                        ) => job,
                        Ok(StoreEvent::JobFinished { job }) => {
                            watch.settled.remove(&job);
                            job
                        }
                        Ok(StoreEvent::LogAppended { job, .. })
                            if !watch.settled.contains(&job) =>
                        {
                            job
                        }
                        Ok(StoreEvent::Resync) | Err(RecvError::Lagged(_)) => {
                            return Some((JobChange::Resync, watch));
                        }
                        Ok(_) => continue,
                        Err(RecvError::Closed) => return None,
                    };
                    let Ok(Some(job)) = watch.services.store.get_job(id).await else {
                        continue;
                    };
                    let shown = watch.repo.as_ref().is_none_or(|repo| *repo == job.repo)
                        && watch.kind.is_none_or(|kind| kind == job.kind)
                        && watch.services.may_read_job(&watch.caller, &job).await;
                    if job.state == JobState::Running || !shown {
                        watch.settled.insert(id);
                    }
                    if job.state.is_terminal() {
                        watch.settled.remove(&id);
                    }
                    if shown {
                        return Some((JobChange::Changed(Box::new(job)), watch));
                    }
                }
            },
        ))
    }

    /// Cancels job `id` for `caller` (push access): a queued job at once, a
    /// running one by telling its agent.
    pub async fn cancel(&self, caller: &Caller, id: JobId) -> Result<Job, CoreError> {
        self.job_for(caller, id, Access::Push).await?;
        let job = self.store.request_cancel(id, Utc::now()).await?;
        if job.state.is_terminal() {
            self.statuses.job_changed(&job);
            self.queue_notifications(&job).await;
        }
        tracing::info!(job_id = id.0, state = %job.state, "cancel requested");
        Ok(job)
    }
}

/// A repository that lost its access takes no new jobs.
fn require_enabled(repo: &Repo) -> Result<(), CoreError> {
    match &repo.disabled {
        Some(reason) => Err(CoreError::Gone(format!(
            "repository {} is disabled: {reason}",
            repo.full_name()
        ))),
        None => Ok(()),
    }
}

/// A `repo` filter: `owner/name` with valid parts.
fn parse_repo_filter(repo: &str) -> Result<RepoRef, CoreError> {
    let parsed: RepoRef = repo
        .parse()
        .map_err(|_| CoreError::invalid("repo", "must be owner/name"))?;
    validate::repo_component("repo", &parsed.owner)?;
    validate::repo_component("repo", &parsed.name)?;
    Ok(parsed)
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
                .extend_leases(services.lease_after_outage(Utc::now()))
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
                    services.queue_notifications(&job).await;
                    services.requeue_if_allowed(&job).await;
                    tracing::warn!(
                        job_id = job.id.0,
                        agent = job.agent_name.as_deref().unwrap_or("?"),
                        "lease expired: job lost"
                    );
                    let line = format!(
                        "job lost: {}",
                        job.message.as_deref().unwrap_or("lease expired")
                    );
                    if let Err(err) = services.store.append_controller_line(job.id, &line).await {
                        tracing::warn!(job_id = job.id.0, error = %err, "cannot note the loss in the log");
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

/// What the whole fleet looks like, read from the store.
#[derive(Debug, Default)]
pub struct Fleet {
    pub queue: crate::store::QueueStats,
    /// Connected agents by their vouched labels (`k=v,k=v`; `""`
    /// without).
    pub agents_connected: BTreeMap<String, u64>,
}

impl Services {
    /// The whole fleet at a glance, for the metrics' fleet gauges (no
    /// caller: `/metrics` is served on its own listener, without a token):
    /// the queue, and the connected agents by the labels their tokens
    /// vouch for (an operator's choice, so few; an agent's own labels on
    /// the pool token are whatever it says, and are left out).
    pub async fn fleet(&self) -> Result<Fleet, CoreError> {
        let queue = self.store.queue_stats().await?;
        let now = Utc::now();
        let mut agents_connected = BTreeMap::new();
        for agent in self.store.list_agents().await? {
            if agent_connected(agent.last_seen, now) {
                *agents_connected
                    .entry(format_labels(&agent.vouched_labels))
                    .or_default() += 1;
            }
        }
        Ok(Fleet {
            queue,
            agents_connected,
        })
    }
}

impl Services {
    /// Queues `make deploy` on `owner/name` for `caller` (push access), at a
    /// commit or a branch's tip (resolved now). A repeated
    /// `idempotency_key` answers with the job the first request created
    /// (`false`: not new).
    pub async fn deploy(
        &self,
        caller: &Caller,
        owner: &str,
        name: &str,
        request: JobRequest,
        idempotency_key: Option<&str>,
    ) -> Result<(Job, bool), CoreError> {
        let repo = self.repo_for(caller, owner, name, Access::Push).await?;
        let request = JobRequest {
            target: "deploy".to_owned(),
            ..request
        };
        let Some(key) = idempotency_key else {
            let job = self
                .queue_job(&repo, request, Trigger::Api, caller.name())
                .await?;
            return Ok((job, true));
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
        // A repeat is answered from the record, without resolving anything.
        if let Some(job) = self.repeated(&scoped, &scoped_request).await? {
            return Ok((job, false));
        }
        let new = self
            .job_to_queue(&repo, request, Trigger::Api, caller.name())
            .await?;
        // The key, the job and the records naming it (the request's
        // fingerprint, for a repeat to compare) are written together: a
        // request cut off before its job exists leaves no key behind.
        let names = [scoped_request.clone(), scoped.clone()];
        match self
            .store
            .create_job_once(&scoped, &names, new, Utc::now())
            .await?
        {
            Some(job) => {
                tracing::info!(job_id = job.id.0, repo = %job.repo, target = %job.target, commit = %job.commit, "job queued");
                Ok((job, true))
            }
            // Another request with the key created its job meanwhile.
            None => match self.repeated(&scoped, &scoped_request).await? {
                Some(job) => Ok((job, false)),
                None => Err(CoreError::Conflict(
                    "a request with this Idempotency-Key is still being handled; retry shortly"
                        .to_owned(),
                )),
            },
        }
    }

    /// The job an earlier request with key `scoped` created, when that
    /// request was `scoped_request` (the key and the request's
    /// fingerprint); an error when it asked for something else.
    async fn repeated(&self, scoped: &str, scoped_request: &str) -> Result<Option<Job>, CoreError> {
        let Some(id) = self.store.key_job(scoped).await? else {
            return Ok(None);
        };
        if self.store.key_job(scoped_request).await? != Some(id) {
            return Err(CoreError::invalid(
                "Idempotency-Key",
                "this key was already used with a different request",
            ));
        }
        Ok(Some(self.job(id).await?))
    }

    /// Runs finished job `id` again for `caller` (push access), as a new
    /// job: same repository, commit, branch, target and one-time variables.
    pub async fn retry(&self, caller: &Caller, id: JobId) -> Result<Job, CoreError> {
        let old = self.job_for(caller, id, Access::Push).await?;
        self.run_again(old, Trigger::Retry, caller.name()).await
    }

    /// A finished job, queued again as a new job.
    async fn run_again(
        &self,
        old: Job,
        trigger: Trigger,
        requested_by: String,
    ) -> Result<Job, CoreError> {
        if !old.state.is_terminal() {
            return Err(CoreError::Conflict(format!(
                "job {} is {}: only a finished job can be retried",
                old.id, old.state
            )));
        }
        let repo = self.repo(&old.repo.owner, &old.repo.name).await?;
        require_enabled(&repo)?;
        let mut new = NewJob::new(
            &repo,
            old.target,
            old.commit,
            old.branch,
            trigger,
            requested_by,
        );
        new.env = old.env;
        new.from_fork = old.from_fork;
        let job = self.store.create_job(new, Utc::now()).await?;
        tracing::info!(job_id = job.id.0, retry_of = %old.id, "job retried");
        Ok(job)
    }

    /// The latest successful deploy of a repository.
    pub(crate) async fn last_deploy(&self, repo: &Repo) -> Result<Option<Job>, CoreError> {
        Ok(self
            .store
            .list_jobs(&JobFilter {
                repo: Some(repo.reference()),
                kind: Some(JobKind::Deploy),
                state: Some(JobState::Succeeded),
                limit: 1,
                ..JobFilter::default()
            })
            .await?
            .into_iter()
            .next())
    }

    /// A lost `test` job is queued again, once, when its repository allows
    /// it. Deploys never are: they are not idempotent; a person retries them.
    async fn requeue_if_allowed(&self, lost: &Job) {
        if lost.kind != JobKind::Test
            || lost.requested_by.as_deref() == Some(hobotnica_common::job::AUTOMATIC_RETRY)
        {
            return;
        }
        let allowed = matches!(
            self.store.get_repo(&lost.repo.owner, &lost.repo.name).await,
            Ok(Some(repo)) if repo.requeue_lost_tests && repo.disabled.is_none()
        );
        if !allowed {
            return;
        }
        match self
            .run_again(
                lost.clone(),
                Trigger::Retry,
                hobotnica_common::job::AUTOMATIC_RETRY.to_owned(),
            )
            .await
        {
            Ok(job) => {
                tracing::info!(job_id = job.id.0, lost = %lost.id, "lost test job queued again")
            }
            Err(err) => {
                tracing::warn!(job_id = lost.id.0, error = %err, "cannot queue a lost test job again")
            }
        }
    }
}
