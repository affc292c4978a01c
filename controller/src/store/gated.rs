//! A store for tests that holds chosen calls until the test lets them go:
//! it makes "a call is in flight while something else happens" a state a
//! test can reach on purpose instead of by timing. Every other call goes
//! straight to the wrapped store.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hobotnica_common::ids::{AgentId, JobId};
use hobotnica_common::job::{Job, Repo};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::snapshot;
use super::{
    AgentRecord, AgentTokenRecord, Finish, Finished, JobFilter, NewJob, NotificationDelivery,
    QueueStats, Retention, Store, StoreError, StoreEvent, StoreResult,
};

/// A held `create_repo`: told when the call arrives, let through by the
/// test.
struct HeldCreateRepo {
    entered: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

/// A held `get_agent`: told when the call arrives, answered by the test.
struct HeldGetAgent {
    entered: oneshot::Sender<()>,
    answer: oneshot::Receiver<Option<AgentRecord>>,
}

pub struct GatedStore {
    inner: Arc<dyn Store>,
    get_agent: Mutex<Option<HeldGetAgent>>,
    create_repo: Mutex<Option<HeldCreateRepo>>,
    /// A held job creation (`create_job` or `create_job_once`); it never
    /// goes on: the test ends the call by dropping it (a crash).
    create_job: Mutex<Option<oneshot::Sender<()>>>,
    /// While set, `get_repo` fails as an unreachable store does.
    get_repo_fails: AtomicBool,
    /// `claim_job` calls so far: what a crowd of idle sessions costs.
    claims: AtomicUsize,
}

impl GatedStore {
    pub fn new(inner: Arc<dyn Store>) -> GatedStore {
        GatedStore {
            inner,
            get_agent: Mutex::new(None),
            create_repo: Mutex::new(None),
            create_job: Mutex::new(None),
            get_repo_fails: AtomicBool::new(false),
            claims: AtomicUsize::new(0),
        }
    }

    /// How many times `claim_job` was called.
    pub fn claims(&self) -> usize {
        self.claims.load(Ordering::SeqCst)
    }

    /// Holds the next `create_repo`: the receiver resolves once it is in
    /// flight; it goes on to the wrapped store once the sender is used or
    /// dropped.
    pub fn hold_create_repo(&self) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (entered_tx, entered_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        *self.create_repo.lock().expect("not poisoned") = Some(HeldCreateRepo {
            entered: entered_tx,
            release: release_rx,
        });
        (entered_rx, release_tx)
    }

    /// Holds the next job creation for good: the receiver resolves once
    /// it is in flight, and the call never reaches the wrapped store. The
    /// test drops the caller's future there, as a controller crash would.
    pub fn hold_create_job(&self) -> oneshot::Receiver<()> {
        let (entered_tx, entered_rx) = oneshot::channel();
        *self.create_job.lock().expect("not poisoned") = Some(entered_tx);
        entered_rx
    }

    /// Stops here for good if the test holds the next job creation.
    async fn maybe_hold_create_job(&self) {
        let held = self.create_job.lock().expect("not poisoned").take();
        if let Some(entered) = held {
            let _ = entered.send(());
            std::future::pending::<()>().await;
        }
    }

    /// Makes every `get_repo` fail with `Unavailable` (`true`) or go to the
    /// wrapped store again (`false`).
    pub fn fail_get_repo(&self, fail: bool) {
        self.get_repo_fails.store(fail, Ordering::SeqCst);
    }

    /// Holds the next `get_agent`: the first receiver resolves once it is
    /// in flight; it then returns what is sent on the sender (a dropped
    /// sender: the wrapped store's answer).
    pub fn hold_get_agent(&self) -> (oneshot::Receiver<()>, oneshot::Sender<Option<AgentRecord>>) {
        let (entered_tx, entered_rx) = oneshot::channel();
        let (answer_tx, answer_rx) = oneshot::channel();
        *self.get_agent.lock().expect("not poisoned") = Some(HeldGetAgent {
            entered: entered_tx,
            answer: answer_rx,
        });
        (entered_rx, answer_tx)
    }
}

#[async_trait]
impl Store for GatedStore {
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.subscribe()
    }
    async fn announce(&self, event: StoreEvent) {
        self.inner.announce(event).await;
    }
    async fn create_repo(&self, repo: Repo) -> StoreResult<()> {
        let held = self.create_repo.lock().expect("not poisoned").take();
        if let Some(held) = held {
            let _ = held.entered.send(());
            let _ = held.release.await;
        }
        self.inner.create_repo(repo).await
    }
    async fn get_repo(&self, owner: &str, name: &str) -> StoreResult<Option<Repo>> {
        if self.get_repo_fails.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "the test made get_repo fail".to_owned(),
            ));
        }
        self.inner.get_repo(owner, name).await
    }
    async fn list_repos(&self) -> StoreResult<Vec<Repo>> {
        self.inner.list_repos().await
    }
    async fn delete_repo(&self, owner: &str, name: &str) -> StoreResult<()> {
        self.inner.delete_repo(owner, name).await
    }
    async fn update_repo(&self, old: &Repo, new: Repo) -> StoreResult<bool> {
        self.inner.update_repo(old, new).await
    }
    async fn find_repo_by_hook(&self, hook_id: &str) -> StoreResult<Option<Repo>> {
        self.inner.find_repo_by_hook(hook_id).await
    }
    async fn key_job(&self, key: &str) -> StoreResult<Option<JobId>> {
        self.inner.key_job(key).await
    }
    async fn create_session(
        &self,
        id_hash: &str,
        session: super::SessionRecord,
    ) -> StoreResult<()> {
        self.inner.create_session(id_hash, session).await
    }
    async fn get_session(
        &self,
        id_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<super::SessionRecord>> {
        self.inner.get_session(id_hash, now).await
    }
    async fn delete_session(&self, id_hash: &str) -> StoreResult<()> {
        self.inner.delete_session(id_hash).await
    }
    async fn create_job(&self, job: NewJob, now: DateTime<Utc>) -> StoreResult<Job> {
        self.maybe_hold_create_job().await;
        self.inner.create_job(job, now).await
    }
    async fn create_job_once(
        &self,
        key: &str,
        names: &[String],
        job: NewJob,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        self.maybe_hold_create_job().await;
        self.inner.create_job_once(key, names, job, now).await
    }
    async fn get_job(&self, id: JobId) -> StoreResult<Option<Job>> {
        self.inner.get_job(id).await
    }
    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<Job>> {
        self.inner.list_jobs(filter).await
    }
    async fn claim_job(
        &self,
        agent: &AgentRecord,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        self.inner.claim_job(agent, now, lease_until).await
    }
    async fn renew_lease(
        &self,
        id: JobId,
        attempt: u32,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Job> {
        self.inner.renew_lease(id, attempt, lease_until).await
    }
    async fn request_cancel(&self, id: JobId, now: DateTime<Utc>) -> StoreResult<Job> {
        self.inner.request_cancel(id, now).await
    }
    async fn finish_job(
        &self,
        id: JobId,
        attempt: u32,
        finish: Finish,
        now: DateTime<Utc>,
    ) -> StoreResult<Finished> {
        self.inner.finish_job(id, attempt, finish, now).await
    }
    async fn queue_stats(&self) -> StoreResult<QueueStats> {
        self.inner.queue_stats().await
    }
    async fn expire_leases(&self, now: DateTime<Utc>) -> StoreResult<Vec<Job>> {
        self.inner.expire_leases(now).await
    }
    async fn extend_leases(&self, until: DateTime<Utc>) -> StoreResult<()> {
        self.inner.extend_leases(until).await
    }
    async fn append_log(
        &self,
        id: JobId,
        attempt: u32,
        offset: u64,
        data: Bytes,
    ) -> StoreResult<u64> {
        self.inner.append_log(id, attempt, offset, data).await
    }
    async fn append_controller_line(&self, id: JobId, line: &str) -> StoreResult<u64> {
        self.inner.append_controller_line(id, line).await
    }
    async fn read_log(&self, id: JobId, offset: u64, max: usize) -> StoreResult<Bytes> {
        self.inner.read_log(id, offset, max).await
    }
    async fn log_len(&self, id: JobId) -> StoreResult<u64> {
        self.inner.log_len(id).await
    }
    async fn register_agent(&self, agent: AgentRecord) -> StoreResult<AgentRecord> {
        self.inner.register_agent(agent).await
    }
    async fn get_agent(&self, id: &AgentId) -> StoreResult<Option<AgentRecord>> {
        let held = self.get_agent.lock().expect("not poisoned").take();
        match held {
            Some(held) => {
                let _ = held.entered.send(());
                match held.answer.await {
                    Ok(answer) => Ok(answer),
                    Err(_) => self.inner.get_agent(id).await,
                }
            }
            None => self.inner.get_agent(id).await,
        }
    }
    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        self.inner.list_agents().await
    }
    async fn touch_agent(
        &self,
        id: &AgentId,
        now: DateTime<Utc>,
        controller: &str,
    ) -> StoreResult<()> {
        self.inner.touch_agent(id, now, controller).await
    }
    async fn create_agent_token(&self, token: AgentTokenRecord) -> StoreResult<()> {
        self.inner.create_agent_token(token).await
    }
    async fn list_agent_tokens(&self) -> StoreResult<Vec<AgentTokenRecord>> {
        self.inner.list_agent_tokens().await
    }
    async fn find_agent_token(&self, token_hash: &str) -> StoreResult<Option<AgentTokenRecord>> {
        self.inner.find_agent_token(token_hash).await
    }
    async fn delete_agent_token(&self, id: &str) -> StoreResult<()> {
        self.inner.delete_agent_token(id).await
    }
    async fn queue_notifications(&self, deliveries: Vec<NotificationDelivery>) -> StoreResult<()> {
        self.inner.queue_notifications(deliveries).await
    }
    async fn claim_notification(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<NotificationDelivery>> {
        self.inner.claim_notification(now, lease_until).await
    }
    async fn retry_notification(
        &self,
        id: &str,
        attempt: u32,
        due_at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        self.inner.retry_notification(id, attempt, due_at).await
    }
    async fn finish_notification(&self, id: &str, attempt: u32) -> StoreResult<bool> {
        self.inner.finish_notification(id, attempt).await
    }
    async fn archive_logs(&self, finished_before: DateTime<Utc>) -> StoreResult<usize> {
        self.inner.archive_logs(finished_before).await
    }
    async fn prune(&self, policy: &Retention, now: DateTime<Utc>) -> StoreResult<usize> {
        self.inner.prune(policy, now).await
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
