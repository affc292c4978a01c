//! The store as the controller uses it: every call timed by operation, and
//! every job transition it commits counted (created, started, finished,
//! lost), in `crate::metrics`. The transitions are counted here, where they
//! are committed, so that none is missed whichever part of the controller
//! made it, and none is counted twice (a repeated completion is not a
//! transition). Calls go straight through otherwise.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hobotnica_common::ids::{AgentId, JobId};
use hobotnica_common::job::{Job, JobState, Repo};
use tokio::sync::{broadcast, mpsc};

use super::snapshot;
use super::{
    AgentRecord, AgentTokenRecord, Finish, Finished, JobFilter, NewJob, NotificationDelivery,
    QueueStats, Retention, SessionRecord, Store, StoreError, StoreEvent, StoreResult,
};
use crate::metrics::Metrics;

pub struct MeteredStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> MeteredStore {
        MeteredStore { inner, metrics }
    }

    /// Runs one store call, recording its duration and whether the store
    /// could not answer.
    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let started = Instant::now();
        let result = call.await;
        let unavailable = matches!(result, Err(StoreError::Unavailable(_)));
        self.metrics
            .store_call(operation, started.elapsed(), unavailable);
        result
    }
}

#[async_trait]
impl Store for MeteredStore {
    async fn ping(&self) -> StoreResult<()> {
        self.timed("ping", self.inner.ping()).await
    }
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.subscribe()
    }
    async fn announce(&self, event: StoreEvent) {
        let started = Instant::now();
        self.inner.announce(event).await;
        self.metrics
            .store_call("announce", started.elapsed(), false);
    }
    async fn create_repo(&self, repo: Repo) -> StoreResult<()> {
        self.timed("create_repo", self.inner.create_repo(repo))
            .await
    }
    async fn get_repo(&self, owner: &str, name: &str) -> StoreResult<Option<Repo>> {
        self.timed("get_repo", self.inner.get_repo(owner, name))
            .await
    }
    async fn list_repos(&self) -> StoreResult<Vec<Repo>> {
        self.timed("list_repos", self.inner.list_repos()).await
    }
    async fn delete_repo(&self, owner: &str, name: &str) -> StoreResult<()> {
        self.timed("delete_repo", self.inner.delete_repo(owner, name))
            .await
    }
    async fn update_repo(&self, old: &Repo, new: Repo) -> StoreResult<bool> {
        self.timed("update_repo", self.inner.update_repo(old, new))
            .await
    }
    async fn find_repo_by_hook(&self, hook_id: &str) -> StoreResult<Option<Repo>> {
        self.timed("find_repo_by_hook", self.inner.find_repo_by_hook(hook_id))
            .await
    }
    async fn key_job(&self, key: &str) -> StoreResult<Option<JobId>> {
        self.timed("key_job", self.inner.key_job(key)).await
    }
    async fn create_job(&self, job: NewJob, now: DateTime<Utc>) -> StoreResult<Job> {
        let job = self
            .timed("create_job", self.inner.create_job(job, now))
            .await?;
        self.metrics.job_created(&job);
        Ok(job)
    }
    async fn create_job_once(
        &self,
        key: &str,
        names: &[String],
        job: NewJob,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        let job = self
            .timed(
                "create_job_once",
                self.inner.create_job_once(key, names, job, now),
            )
            .await?;
        if let Some(job) = &job {
            self.metrics.job_created(job);
        }
        Ok(job)
    }
    async fn get_job(&self, id: JobId) -> StoreResult<Option<Job>> {
        self.timed("get_job", self.inner.get_job(id)).await
    }
    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<Job>> {
        self.timed("list_jobs", self.inner.list_jobs(filter)).await
    }
    async fn claim_job(
        &self,
        agent: &AgentRecord,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        let job = self
            .timed("claim_job", self.inner.claim_job(agent, now, lease_until))
            .await?;
        if let Some(job) = &job {
            self.metrics.job_started(job);
        }
        Ok(job)
    }
    async fn renew_lease(
        &self,
        id: JobId,
        attempt: u32,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Job> {
        self.timed(
            "renew_lease",
            self.inner.renew_lease(id, attempt, lease_until),
        )
        .await
    }
    async fn request_cancel(&self, id: JobId, now: DateTime<Utc>) -> StoreResult<Job> {
        let job = self
            .timed("request_cancel", self.inner.request_cancel(id, now))
            .await?;
        // A queued job ends at once; a running one ends when its agent
        // completes it (counted then). A finished job is a `Conflict`.
        if job.state == JobState::Cancelled {
            self.metrics.job_finished(&job);
        }
        Ok(job)
    }
    async fn finish_job(
        &self,
        id: JobId,
        attempt: u32,
        finish: Finish,
        now: DateTime<Utc>,
    ) -> StoreResult<Finished> {
        let finished = self
            .timed(
                "finish_job",
                self.inner.finish_job(id, attempt, finish, now),
            )
            .await?;
        if finished.first {
            self.metrics.job_finished(&finished.job);
        }
        Ok(finished)
    }
    async fn queue_stats(&self) -> StoreResult<QueueStats> {
        self.timed("queue_stats", self.inner.queue_stats()).await
    }
    async fn expire_leases(&self, now: DateTime<Utc>) -> StoreResult<Vec<Job>> {
        let lost = self
            .timed("expire_leases", self.inner.expire_leases(now))
            .await?;
        for job in &lost {
            self.metrics.lease_expired(job);
        }
        Ok(lost)
    }
    async fn extend_leases(&self, until: DateTime<Utc>) -> StoreResult<()> {
        self.timed("extend_leases", self.inner.extend_leases(until))
            .await
    }
    async fn append_log(
        &self,
        id: JobId,
        attempt: u32,
        offset: u64,
        data: Bytes,
    ) -> StoreResult<u64> {
        self.timed(
            "append_log",
            self.inner.append_log(id, attempt, offset, data),
        )
        .await
    }
    async fn append_controller_line(&self, id: JobId, line: &str) -> StoreResult<u64> {
        self.timed(
            "append_controller_line",
            self.inner.append_controller_line(id, line),
        )
        .await
    }
    async fn read_log(&self, id: JobId, offset: u64, max: usize) -> StoreResult<Bytes> {
        self.timed("read_log", self.inner.read_log(id, offset, max))
            .await
    }
    async fn log_len(&self, id: JobId) -> StoreResult<u64> {
        self.timed("log_len", self.inner.log_len(id)).await
    }
    async fn register_agent(&self, agent: AgentRecord) -> StoreResult<AgentRecord> {
        self.timed("register_agent", self.inner.register_agent(agent))
            .await
    }
    async fn get_agent(&self, id: &AgentId) -> StoreResult<Option<AgentRecord>> {
        self.timed("get_agent", self.inner.get_agent(id)).await
    }
    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        self.timed("list_agents", self.inner.list_agents()).await
    }
    async fn touch_agent(
        &self,
        id: &AgentId,
        now: DateTime<Utc>,
        controller: &str,
    ) -> StoreResult<()> {
        self.timed("touch_agent", self.inner.touch_agent(id, now, controller))
            .await
    }
    async fn create_agent_token(&self, token: AgentTokenRecord) -> StoreResult<()> {
        self.timed("create_agent_token", self.inner.create_agent_token(token))
            .await
    }
    async fn list_agent_tokens(&self) -> StoreResult<Vec<AgentTokenRecord>> {
        self.timed("list_agent_tokens", self.inner.list_agent_tokens())
            .await
    }
    async fn find_agent_token(&self, token_hash: &str) -> StoreResult<Option<AgentTokenRecord>> {
        self.timed("find_agent_token", self.inner.find_agent_token(token_hash))
            .await
    }
    async fn delete_agent_token(&self, id: &str) -> StoreResult<()> {
        self.timed("delete_agent_token", self.inner.delete_agent_token(id))
            .await
    }
    async fn create_session(&self, id_hash: &str, session: SessionRecord) -> StoreResult<()> {
        self.timed(
            "create_session",
            self.inner.create_session(id_hash, session),
        )
        .await
    }
    async fn get_session(
        &self,
        id_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<SessionRecord>> {
        self.timed("get_session", self.inner.get_session(id_hash, now))
            .await
    }
    async fn delete_session(&self, id_hash: &str) -> StoreResult<()> {
        self.timed("delete_session", self.inner.delete_session(id_hash))
            .await
    }
    async fn queue_notifications(&self, deliveries: Vec<NotificationDelivery>) -> StoreResult<()> {
        self.timed(
            "queue_notifications",
            self.inner.queue_notifications(deliveries),
        )
        .await
    }
    async fn claim_notification(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<NotificationDelivery>> {
        self.timed(
            "claim_notification",
            self.inner.claim_notification(now, lease_until),
        )
        .await
    }
    async fn retry_notification(
        &self,
        id: &str,
        attempt: u32,
        due_at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        self.timed(
            "retry_notification",
            self.inner.retry_notification(id, attempt, due_at),
        )
        .await
    }
    async fn finish_notification(&self, id: &str, attempt: u32) -> StoreResult<bool> {
        self.timed(
            "finish_notification",
            self.inner.finish_notification(id, attempt),
        )
        .await
    }
    async fn archive_logs(&self, finished_before: DateTime<Utc>) -> StoreResult<usize> {
        self.timed("archive_logs", self.inner.archive_logs(finished_before))
            .await
    }
    async fn prune(&self, policy: &Retention, now: DateTime<Utc>) -> StoreResult<usize> {
        self.timed("prune", self.inner.prune(policy, now)).await
    }

    async fn export(&self, sink: mpsc::Sender<snapshot::Record>) -> StoreResult<()> {
        self.inner.export(sink).await
    }

    async fn is_empty(&self) -> StoreResult<bool> {
        self.inner.is_empty().await
    }

    async fn import(&self, batch: Vec<snapshot::Record>) -> StoreResult<()> {
        self.inner.import(batch).await
    }

    async fn import_unfinished(&self) -> StoreResult<bool> {
        self.inner.import_unfinished().await
    }
}
