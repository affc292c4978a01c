//! The embedded backend: an ACID redb database for state and one append-only
//! file per job for logs, under the data directory. No server to install.
//!
//! Log files are written before a chunk is acknowledged (a controller crash
//! loses no acknowledged byte) and synced to disk when the job finishes.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, mpsc};

use hobotnica_common::ids::{AgentId, JobId};
use hobotnica_common::job::{Job, JobKind, JobState, Repo, RepoRef};
use hobotnica_common::logs::{AppendPlan, plan_append};
use hobotnica_common::private_fs;

use super::snapshot;
use super::{
    AgentRecord, AgentTokenRecord, Finish, Finished, JobFilter, NewJob, NotificationDelivery,
    QueueStats, Retention, SessionRecord, Store, StoreError, StoreEvent, StoreResult, transitions,
};

const REPOS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("repos");
const JOBS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("jobs");
/// Queued job ids, oldest first.
const QUEUE: TableDefinition<'_, u64, ()> = TableDefinition::new("queue");
/// Running job ids (for lease expiry).
const RUNNING: TableDefinition<'_, u64, ()> = TableDefinition::new("running");
const AGENTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("agents");
const AGENT_TOKENS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("agent_tokens");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// Webhook delivery ids and idempotency keys → when they arrived (unix ms).
const DELIVERIES: TableDefinition<'_, &str, i64> = TableDefinition::new("deliveries");
/// Idempotency keys → the job they created.
/// Web sessions by the hash of their id: JSON `SessionRecord`s.
const SESSIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sessions");
/// Pending notification deliveries by id (delivered or given-up ones are
/// removed; the table holds only the backlog, so a claim scans it).
const NOTIFICATIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("notifications");
const KEY_JOBS: TableDefinition<'_, &str, u64> = TableDefinition::new("key_jobs");
const NEXT_JOB_ID: &str = "next_job_id";
/// In META while an import into the store is under way (or did not finish).
const IMPORT_UNFINISHED: &str = "import_unfinished";

/// Capacity of the event channel; a receiver further behind misses events.
const EVENT_CAPACITY: usize = 4096;

/// Most job creations one write transaction (and one fsync) holds.
const MAX_GROUP_COMMIT: usize = 1024;

pub struct EmbeddedStore {
    inner: Arc<Inner>,
    events: broadcast::Sender<StoreEvent>,
    /// The job writer; `None` only while the store is dropped.
    writer: Option<JobWriter>,
}

/// The thread that creates jobs (group commit): it takes every creation
/// queued while it was busy, writes them in one transaction, commits once
/// (one fsync), and only then answers each caller. Spawned by
/// [`EmbeddedStore::open`]; ends when the store is dropped (the drop waits
/// for it, so the database is closed when the drop returns).
struct JobWriter {
    requests: std::sync::mpsc::Sender<JobCreation>,
    thread: std::thread::JoinHandle<()>,
}

/// A job to create.
struct Creation {
    new: NewJob,
    now: DateTime<Utc>,
    /// Created once per key: the key, and the names recording the job.
    once: Option<(String, Vec<String>)>,
}

/// A job to create, and who waits for it.
struct JobCreation {
    creation: Creation,
    reply: tokio::sync::oneshot::Sender<StoreResult<Option<Job>>>,
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            // Closing the channel ends the thread once its group is answered.
            drop(writer.requests);
            if writer.thread.join().is_err() {
                tracing::error!("the store's job writer panicked");
            }
        }
    }
}

struct Inner {
    db: Database,
    logs_dir: PathBuf,
    /// Serialises log appends (state check + write).
    log_lock: Mutex<()>,
}

/// How long a controller waiting for the store (`--store-wait`) sleeps
/// between tries: the most it adds to a blue-green hand-over's pause.
const IN_USE_RETRY: Duration = Duration::from_millis(10);

/// Why the embedded store did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "another controller is using the store at {} (one controller per data directory \
         with the embedded store; several controllers share Redis instead). --store-wait \
         makes this one wait for it to stop",
        .0.display()
    )]
    InUse(PathBuf),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Creates the tables a new store lacks.
fn create_tables(db: &Database) -> anyhow::Result<()> {
    let txn = db.begin_write()?;
    txn.open_table(REPOS)?;
    txn.open_table(JOBS)?;
    txn.open_table(QUEUE)?;
    txn.open_table(RUNNING)?;
    txn.open_table(AGENTS)?;
    txn.open_table(AGENT_TOKENS)?;
    txn.open_table(META)?;
    txn.open_table(DELIVERIES)?;
    txn.open_table(KEY_JOBS)?;
    txn.open_table(SESSIONS)?;
    txn.open_table(NOTIFICATIONS)?;
    txn.commit()?;
    Ok(())
}

fn unavailable(err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

fn encode<T: Serialize>(value: &T) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(unavailable)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|err| StoreError::Unavailable(format!("corrupt record: {err}")))
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, waiting up to `wait` for
    /// another controller that has it open to let it go (the blue-green
    /// hand-over: the new controller waits while the old one finishes its
    /// requests and exits).
    ///
    /// # Errors
    /// [`OpenError::InUse`] when it is still open elsewhere after `wait`.
    pub async fn open_waiting(dir: &Path, wait: Duration) -> Result<EmbeddedStore, OpenError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut said = false;
        loop {
            match EmbeddedStore::open(dir) {
                Err(OpenError::InUse(_)) if tokio::time::Instant::now() < deadline => {
                    if !said {
                        tracing::info!(
                            ?wait,
                            "another controller is using the store; waiting for it to stop"
                        );
                        said = true;
                    }
                    tokio::time::sleep(IN_USE_RETRY).await;
                }
                opened => return opened,
            }
        }
    }

    /// Opens (or creates) the store in `dir`.
    ///
    /// # Errors
    /// [`OpenError::InUse`] when another process has it open.
    pub fn open(dir: &Path) -> Result<EmbeddedStore, OpenError> {
        use anyhow::Context as _;
        let logs_dir = dir.join("logs");
        private_fs::create_private_dir(&logs_dir)
            .with_context(|| format!("cannot create {}", logs_dir.display()))?;
        let path = dir.join("hobotnica.redb");
        // Created 0600 before redb opens it: it holds one-time variables.
        private_fs::private_open_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot create the store at {}", path.display()))?;
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(OpenError::InUse(path)),
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("cannot open the store at {}", path.display()))
                    .into());
            }
        };
        create_tables(&db)?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let inner = Arc::new(Inner {
            db,
            logs_dir,
            log_lock: Mutex::new(()),
        });
        let (requests, received) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("store-job-writer".to_owned())
            .spawn({
                let inner = Arc::clone(&inner);
                let events = events.clone();
                move || run_job_writer(&inner, &received, &events)
            })
            .context("cannot start the store's job writer")?;
        Ok(EmbeddedStore {
            inner,
            events,
            writer: Some(JobWriter { requests, thread }),
        })
    }

    /// Hands a job creation to the job writer and waits for its commit.
    async fn create_job_grouped(
        &self,
        new: NewJob,
        now: DateTime<Utc>,
        once: Option<(String, Vec<String>)>,
    ) -> StoreResult<Option<Job>> {
        let stopped = || StoreError::Unavailable("the store's job writer stopped".to_owned());
        let writer = self.writer.as_ref().ok_or_else(stopped)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        writer
            .requests
            .send(JobCreation {
                creation: Creation { new, now, once },
                reply,
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn blocking<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> StoreResult<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(unavailable)?
    }

    fn publish(&self, event: StoreEvent) {
        // No receiver is fine: nobody is waiting.
        let _ = self.events.send(event);
    }
}

/// The job writer's loop: one group at a time, until the store is dropped.
fn run_job_writer(
    inner: &Inner,
    requests: &std::sync::mpsc::Receiver<JobCreation>,
    events: &broadcast::Sender<StoreEvent>,
) {
    while let Ok(first) = requests.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP_COMMIT
            && let Ok(next) = requests.try_recv()
        {
            group.push(next);
        }
        let (creations, replies): (Vec<_>, Vec<_>) = group
            .into_iter()
            .map(|request| (request.creation, request.reply))
            .unzip();
        match inner.create_jobs(creations) {
            Ok(answers) => {
                // Committed (and synced): now the jobs may be claimed and
                // the callers answered.
                for answer in &answers {
                    if let Ok(Some(job)) = answer {
                        // No receiver is fine: nobody is waiting.
                        let _ = events.send(StoreEvent::JobQueued { job: job.id });
                    }
                }
                for (reply, answer) in replies.into_iter().zip(answers) {
                    // A caller that went away is fine: its job is queued.
                    let _ = reply.send(answer);
                }
            }
            Err(err) => {
                // Nothing of the group was written.
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Unavailable(err.to_string())));
                }
            }
        }
    }
}

impl Inner {
    /// Creates `creations` in one write transaction, committed once and
    /// durably before it returns: each answer is the job created, `None`
    /// for a key seen before (also earlier in the same group), or why that
    /// creation alone was refused. Everything that can refuse one creation
    /// is checked before it writes anything, so a refusal leaves the
    /// transaction as the others need it; an error of the transaction
    /// itself fails the whole group, and none of it is written.
    fn create_jobs(&self, creations: Vec<Creation>) -> StoreResult<Vec<StoreResult<Option<Job>>>> {
        let mut txn = self.db.begin_write().map_err(unavailable)?;
        txn.set_durability(Durability::Immediate)
            .map_err(unavailable)?;
        let answers = {
            let mut meta = txn.open_table(META).map_err(unavailable)?;
            let mut jobs = txn.open_table(JOBS).map_err(unavailable)?;
            let mut queue = txn.open_table(QUEUE).map_err(unavailable)?;
            let mut deliveries = txn.open_table(DELIVERIES).map_err(unavailable)?;
            let mut key_jobs = txn.open_table(KEY_JOBS).map_err(unavailable)?;
            let mut next_id = meta
                .get(NEXT_JOB_ID)
                .map_err(unavailable)?
                .map_or(1, |v| v.value());
            let mut answers = Vec::with_capacity(creations.len());
            for Creation { new, now, once } in creations {
                if let Some((key, _)) = &once {
                    let seen = deliveries.get(key.as_str()).map_err(unavailable)?.is_some();
                    if seen {
                        answers.push(Ok(None));
                        continue;
                    }
                }
                let job = transitions::new_job(JobId(next_id), new, now);
                let encoded = match encode(&job) {
                    Ok(encoded) => encoded,
                    Err(err) => {
                        answers.push(Err(err));
                        continue;
                    }
                };
                jobs.insert(next_id, encoded.as_slice())
                    .map_err(unavailable)?;
                queue.insert(next_id, ()).map_err(unavailable)?;
                if let Some((key, names)) = &once {
                    deliveries
                        .insert(key.as_str(), now.timestamp_millis())
                        .map_err(unavailable)?;
                    for name in names {
                        key_jobs
                            .insert(name.as_str(), next_id)
                            .map_err(unavailable)?;
                    }
                }
                next_id += 1;
                answers.push(Ok(Some(job)));
            }
            meta.insert(NEXT_JOB_ID, next_id).map_err(unavailable)?;
            answers
        };
        txn.commit().map_err(unavailable)?;
        Ok(answers)
    }

    fn log_path(&self, id: JobId) -> PathBuf {
        self.logs_dir.join(format!("{id}.log"))
    }

    fn read_job(&self, id: JobId) -> StoreResult<Option<Job>> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let table = txn.open_table(JOBS).map_err(unavailable)?;
        let value = table.get(id.0).map_err(unavailable)?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// Runs `change` on a job inside a write transaction and stores the result.
    fn update_job<T>(
        &self,
        id: JobId,
        change: impl FnOnce(&mut Job) -> StoreResult<T>,
    ) -> StoreResult<(Job, T)> {
        let txn = self.db.begin_write().map_err(unavailable)?;
        let (job, result) = {
            let mut jobs = txn.open_table(JOBS).map_err(unavailable)?;
            let mut job: Job = match jobs.get(id.0).map_err(unavailable)? {
                Some(value) => decode(value.value())?,
                None => return Err(StoreError::NotFound(format!("job {id}"))),
            };
            let before = job.state;
            let result = change(&mut job)?;
            jobs.insert(id.0, encode(&job)?.as_slice())
                .map_err(unavailable)?;
            if before != job.state {
                let mut queue = txn.open_table(QUEUE).map_err(unavailable)?;
                let mut running = txn.open_table(RUNNING).map_err(unavailable)?;
                queue.remove(id.0).map_err(unavailable)?;
                running.remove(id.0).map_err(unavailable)?;
                match job.state {
                    JobState::Queued => {
                        queue.insert(id.0, ()).map_err(unavailable)?;
                    }
                    JobState::Running => {
                        running.insert(id.0, ()).map_err(unavailable)?;
                    }
                    _ => {}
                }
            }
            (job, result)
        };
        txn.commit().map_err(unavailable)?;
        Ok((job, result))
    }

    fn has_claimable_job(&self, agent: &AgentRecord) -> StoreResult<bool> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let queue = txn.open_table(QUEUE).map_err(unavailable)?;
        let jobs = txn.open_table(JOBS).map_err(unavailable)?;
        let running = txn.open_table(RUNNING).map_err(unavailable)?;
        Ok(first_claimable(&queue, &jobs, &running, agent)?.is_some())
    }

    fn log_len(&self, id: JobId) -> StoreResult<u64> {
        match fs::metadata(self.log_path(id)) {
            Ok(meta) => Ok(meta.len()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(err) => Err(unavailable(err)),
        }
    }

    fn append_file(&self, id: JobId, data: &[u8]) -> StoreResult<u64> {
        let mut file = private_fs::private_open_options()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .map_err(unavailable)?;
        file.write_all(data).map_err(unavailable)?;
        file.metadata().map(|m| m.len()).map_err(unavailable)
    }

    /// Up to `max` bytes of job `id`'s log from `offset`.
    fn read_log(&self, id: JobId, offset: u64, max: usize) -> StoreResult<Bytes> {
        let mut file = match File::open(self.log_path(id)) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Bytes::new());
            }
            Err(err) => return Err(unavailable(err)),
        };
        file.seek(SeekFrom::Start(offset)).map_err(unavailable)?;
        let mut buf = Vec::with_capacity(max.min(1 << 20));
        file.take(max as u64)
            .read_to_end(&mut buf)
            .map_err(unavailable)?;
        Ok(Bytes::from(buf))
    }

    /// Sends everything to `sink` from one read transaction (logs read
    /// after it, through [`Inner::read_log`], a piece at a time). `false`
    /// when the receiver went away.
    fn export(&self, sink: &mpsc::Sender<snapshot::Record>) -> StoreResult<bool> {
        use snapshot::Record;
        let send = |record: Record| sink.blocking_send(record).is_ok();
        let txn = self.db.begin_read().map_err(unavailable)?;
        macro_rules! each_json {
            ($table:expr, |$key:ident, $value:ident: $ty:ty| $record:expr) => {{
                let table = txn.open_table($table).map_err(unavailable)?;
                for entry in table.iter().map_err(unavailable)? {
                    let (key, value) = entry.map_err(unavailable)?;
                    #[allow(unused_variables)]
                    let $key = key.value().to_owned();
                    let $value: $ty = decode(value.value())?;
                    if !send($record) {
                        return Ok(false);
                    }
                }
            }};
        }
        each_json!(REPOS, |_name, repo: Repo| Record::Repo { repo });
        {
            let jobs = txn.open_table(JOBS).map_err(unavailable)?;
            for entry in jobs.iter().map_err(unavailable)? {
                let (_, value) = entry.map_err(unavailable)?;
                let job: Job = decode(value.value())?;
                let id = job.id;
                if !send(Record::Job { job }) {
                    return Ok(false);
                }
                let length = self.log_len(id)?;
                let mut offset = 0;
                while offset < length {
                    let max = usize::try_from(length - offset)
                        .unwrap_or(usize::MAX)
                        .min(snapshot::LOG_PIECE);
                    let data = self.read_log(id, offset, max)?;
                    if data.is_empty() {
                        break;
                    }
                    let read = data.len() as u64;
                    if !send(Record::Log {
                        job: id,
                        offset,
                        data,
                    }) {
                        return Ok(false);
                    }
                    offset += read;
                }
            }
        }
        each_json!(AGENTS, |_id, agent: AgentRecord| Record::Agent { agent });
        each_json!(AGENT_TOKENS, |_id, token: AgentTokenRecord| {
            Record::AgentToken { token }
        });
        {
            let keys = txn.open_table(DELIVERIES).map_err(unavailable)?;
            for entry in keys.iter().map_err(unavailable)? {
                let (key, at) = entry.map_err(unavailable)?;
                let at = DateTime::from_timestamp_millis(at.value()).unwrap_or_default();
                if !send(Record::Key {
                    key: key.value().to_owned(),
                    at,
                }) {
                    return Ok(false);
                }
            }
            let names = txn.open_table(KEY_JOBS).map_err(unavailable)?;
            for entry in names.iter().map_err(unavailable)? {
                let (name, job) = entry.map_err(unavailable)?;
                if !send(Record::KeyJob {
                    name: name.value().to_owned(),
                    job: JobId(job.value()),
                }) {
                    return Ok(false);
                }
            }
        }
        each_json!(SESSIONS, |id_hash, session: SessionRecord| {
            Record::Session { id_hash, session }
        });
        each_json!(NOTIFICATIONS, |_id, delivery: NotificationDelivery| {
            Record::Notification { delivery }
        });
        let next = txn
            .open_table(META)
            .map_err(unavailable)?
            .get(NEXT_JOB_ID)
            .map_err(unavailable)?
            .map_or(1, |v| v.value());
        Ok(send(Record::NextJobId { next }))
    }

    /// Writes one import batch in one write transaction (log pieces to
    /// their files as they come).
    fn import(&self, batch: Vec<snapshot::Record>) -> StoreResult<()> {
        use snapshot::Record;
        // The logs this batch wrote, synced before it commits.
        let mut written_logs = std::collections::BTreeSet::new();
        let mut txn = self.db.begin_write().map_err(unavailable)?;
        txn.set_durability(Durability::Immediate)
            .map_err(unavailable)?;
        {
            let mut repos = txn.open_table(REPOS).map_err(unavailable)?;
            let mut jobs = txn.open_table(JOBS).map_err(unavailable)?;
            let mut queue = txn.open_table(QUEUE).map_err(unavailable)?;
            let mut running = txn.open_table(RUNNING).map_err(unavailable)?;
            let mut agents = txn.open_table(AGENTS).map_err(unavailable)?;
            let mut tokens = txn.open_table(AGENT_TOKENS).map_err(unavailable)?;
            let mut meta = txn.open_table(META).map_err(unavailable)?;
            let mut deliveries = txn.open_table(DELIVERIES).map_err(unavailable)?;
            let mut key_jobs = txn.open_table(KEY_JOBS).map_err(unavailable)?;
            let mut sessions = txn.open_table(SESSIONS).map_err(unavailable)?;
            let mut notifications = txn.open_table(NOTIFICATIONS).map_err(unavailable)?;
            let raise_next_id = |meta: &mut redb::Table<'_, &str, u64>, next: u64| {
                let current = meta
                    .get(NEXT_JOB_ID)
                    .map_err(unavailable)?
                    .map_or(1, |v| v.value());
                if next > current {
                    meta.insert(NEXT_JOB_ID, next).map_err(unavailable)?;
                }
                Ok::<(), StoreError>(())
            };
            for record in batch {
                match record {
                    Record::Repo { repo } => {
                        repos
                            .insert(repo.full_name().as_str(), encode(&repo)?.as_slice())
                            .map_err(unavailable)?;
                    }
                    Record::Job { job } => {
                        let id = job.id.0;
                        jobs.insert(id, encode(&job)?.as_slice())
                            .map_err(unavailable)?;
                        match job.state {
                            JobState::Queued => {
                                queue.insert(id, ()).map_err(unavailable)?;
                            }
                            JobState::Running => {
                                running.insert(id, ()).map_err(unavailable)?;
                            }
                            _ => {}
                        }
                        raise_next_id(&mut meta, id + 1)?;
                    }
                    Record::Log { job, offset, data } => {
                        let length = self.log_len(job)?;
                        if length != offset {
                            return Err(StoreError::LogGap { committed: length });
                        }
                        self.append_file(job, &data)?;
                        written_logs.insert(job);
                    }
                    Record::Agent { agent } => {
                        agents
                            .insert(agent.id.0.as_str(), encode(&agent)?.as_slice())
                            .map_err(unavailable)?;
                    }
                    Record::AgentToken { token } => {
                        tokens
                            .insert(token.id.as_str(), encode(&token)?.as_slice())
                            .map_err(unavailable)?;
                    }
                    Record::Key { key, at } => {
                        deliveries
                            .insert(key.as_str(), at.timestamp_millis())
                            .map_err(unavailable)?;
                    }
                    Record::KeyJob { name, job } => {
                        key_jobs.insert(name.as_str(), job.0).map_err(unavailable)?;
                    }
                    Record::Session { id_hash, session } => {
                        sessions
                            .insert(id_hash.as_str(), encode(&session)?.as_slice())
                            .map_err(unavailable)?;
                    }
                    Record::Notification { delivery } => {
                        notifications
                            .insert(delivery.id.as_str(), encode(&delivery)?.as_slice())
                            .map_err(unavailable)?;
                    }
                    Record::NextJobId { next } => raise_next_id(&mut meta, next)?,
                    Record::ImportStarted => {
                        meta.insert(IMPORT_UNFINISHED, 1).map_err(unavailable)?;
                    }
                    Record::ImportFinished => {
                        meta.remove(IMPORT_UNFINISHED).map_err(unavailable)?;
                    }
                }
            }
        }
        for job in written_logs {
            self.sync_log(job);
        }
        txn.commit().map_err(unavailable)
    }

    /// Nothing in any table and no log file.
    fn is_empty(&self) -> StoreResult<bool> {
        fn empty<K: redb::Key + 'static, V: redb::Value + 'static>(
            txn: &redb::ReadTransaction,
            table: TableDefinition<'_, K, V>,
        ) -> StoreResult<bool> {
            txn.open_table(table)
                .map_err(unavailable)?
                .is_empty()
                .map_err(unavailable)
        }
        let txn = self.db.begin_read().map_err(unavailable)?;
        let tables_empty = empty(&txn, REPOS)?
            && empty(&txn, JOBS)?
            && empty(&txn, QUEUE)?
            && empty(&txn, RUNNING)?
            && empty(&txn, AGENTS)?
            && empty(&txn, AGENT_TOKENS)?
            && empty(&txn, META)?
            && empty(&txn, DELIVERIES)?
            && empty(&txn, KEY_JOBS)?
            && empty(&txn, SESSIONS)?
            && empty(&txn, NOTIFICATIONS)?;
        if !tables_empty {
            return Ok(false);
        }
        let mut logs = fs::read_dir(&self.logs_dir).map_err(unavailable)?;
        Ok(logs.next().is_none())
    }

    fn sync_log(&self, id: JobId) {
        if let Ok(file) = File::open(self.log_path(id)) {
            let _ = file.sync_all();
        }
    }
}

/// The oldest queued job `agent` may take now (`transitions::claimable`).
fn first_claimable(
    queue: &impl ReadableTable<u64, ()>,
    jobs: &impl ReadableTable<u64, &'static [u8]>,
    running: &impl ReadableTable<u64, ()>,
    agent: &AgentRecord,
) -> StoreResult<Option<Job>> {
    // The repositories with a running deploy, read at the first queued deploy.
    let mut deploying: Option<std::collections::HashSet<RepoRef>> = None;
    for entry in queue.iter().map_err(unavailable)? {
        let (id, _) = entry.map_err(unavailable)?;
        let Some(value) = jobs.get(id.value()).map_err(unavailable)? else {
            continue;
        };
        let job: Job = decode(value.value())?;
        if job.kind == JobKind::Deploy && deploying.is_none() {
            deploying = Some(deploying_repos(jobs, running)?);
        }
        if transitions::claimable(&job, agent, |repo| {
            deploying.as_ref().is_some_and(|repos| repos.contains(repo))
        }) {
            return Ok(Some(job));
        }
    }
    Ok(None)
}

/// The repositories whose deploy is running.
fn deploying_repos(
    jobs: &impl ReadableTable<u64, &'static [u8]>,
    running: &impl ReadableTable<u64, ()>,
) -> StoreResult<std::collections::HashSet<RepoRef>> {
    let mut repos = std::collections::HashSet::new();
    for entry in running.iter().map_err(unavailable)? {
        let (id, _) = entry.map_err(unavailable)?;
        if let Some(value) = jobs.get(id.value()).map_err(unavailable)? {
            let other: Job = decode(value.value())?;
            if other.kind == JobKind::Deploy {
                repos.insert(other.repo);
            }
        }
    }
    Ok(repos)
}

/// The queued delivery `id` when its attempt is `attempt` (the fencing
/// token of the controller that claimed it); `None` when it is gone or
/// claimed again since.
fn delivery_at(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
    attempt: u32,
) -> StoreResult<Option<NotificationDelivery>> {
    let current: Option<NotificationDelivery> = table
        .get(id)
        .map_err(unavailable)?
        .map(|value| decode(value.value()))
        .transpose()?;
    Ok(current.filter(|current| current.attempt == attempt))
}

fn get_json<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<'_, &str, &[u8]>,
    key: &str,
) -> StoreResult<Option<T>> {
    let txn = db.begin_read().map_err(unavailable)?;
    let table = txn.open_table(table).map_err(unavailable)?;
    let value = table.get(key).map_err(unavailable)?;
    value.map(|v| decode(v.value())).transpose()
}

fn all_json<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<'_, &str, &[u8]>,
) -> StoreResult<Vec<T>> {
    let txn = db.begin_read().map_err(unavailable)?;
    let table = txn.open_table(table).map_err(unavailable)?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(unavailable)? {
        let (_, value) = entry.map_err(unavailable)?;
        out.push(decode(value.value())?);
    }
    Ok(out)
}

fn put_json<T: Serialize>(
    db: &Database,
    table: TableDefinition<'_, &str, &[u8]>,
    key: &str,
    value: &T,
    durability: Durability,
) -> StoreResult<()> {
    let mut txn = db.begin_write().map_err(unavailable)?;
    txn.set_durability(durability).map_err(unavailable)?;
    {
        let mut table = txn.open_table(table).map_err(unavailable)?;
        table
            .insert(key, encode(value)?.as_slice())
            .map_err(unavailable)?;
    }
    txn.commit().map_err(unavailable)
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn ping(&self) -> StoreResult<()> {
        self.blocking(|inner| {
            inner.db.begin_read().map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    async fn announce(&self, event: StoreEvent) {
        self.publish(event);
    }

    async fn create_repo(&self, repo: Repo) -> StoreResult<()> {
        self.blocking(move |inner| {
            let key = repo.full_name();
            let txn = inner.db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(REPOS).map_err(unavailable)?;
                if table.get(key.as_str()).map_err(unavailable)?.is_some() {
                    return Err(StoreError::Conflict(format!(
                        "repository {key} is already registered"
                    )));
                }
                table
                    .insert(key.as_str(), encode(&repo)?.as_slice())
                    .map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn get_repo(&self, owner: &str, name: &str) -> StoreResult<Option<Repo>> {
        let key = format!("{owner}/{name}");
        self.blocking(move |inner| get_json(&inner.db, REPOS, &key))
            .await
    }

    async fn list_repos(&self) -> StoreResult<Vec<Repo>> {
        self.blocking(|inner| all_json(&inner.db, REPOS)).await
    }

    async fn delete_repo(&self, owner: &str, name: &str) -> StoreResult<()> {
        let key = format!("{owner}/{name}");
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(unavailable)?;
            let existed = {
                let mut table = txn.open_table(REPOS).map_err(unavailable)?;
                table.remove(key.as_str()).map_err(unavailable)?.is_some()
            };
            txn.commit().map_err(unavailable)?;
            if existed {
                Ok(())
            } else {
                Err(StoreError::NotFound(format!("repository {key}")))
            }
        })
        .await
    }

    async fn update_repo(&self, old: &Repo, new: Repo) -> StoreResult<bool> {
        let old = old.clone();
        self.blocking(move |inner| {
            let key = new.full_name();
            let txn = inner.db.begin_write().map_err(unavailable)?;
            let written = {
                let mut table = txn.open_table(REPOS).map_err(unavailable)?;
                let stored: Repo = match table.get(key.as_str()).map_err(unavailable)? {
                    Some(value) => decode(value.value())?,
                    None => return Err(StoreError::NotFound(format!("repository {key}"))),
                };
                if stored != old {
                    false
                } else {
                    table
                        .insert(key.as_str(), encode(&new)?.as_slice())
                        .map_err(unavailable)?;
                    true
                }
            };
            txn.commit().map_err(unavailable)?;
            Ok(written)
        })
        .await
    }

    async fn find_repo_by_hook(&self, hook_id: &str) -> StoreResult<Option<Repo>> {
        let hook_id = hook_id.to_owned();
        self.blocking(move |inner| {
            let repos: Vec<Repo> = all_json(&inner.db, REPOS)?;
            Ok(repos.into_iter().find(|repo| {
                repo.github.as_ref().is_some_and(|github| {
                    hobotnica_common::token::constant_time_eq(
                        github.hook_id.as_bytes(),
                        hook_id.as_bytes(),
                    )
                })
            }))
        })
        .await
    }

    async fn create_session(&self, id_hash: &str, session: SessionRecord) -> StoreResult<()> {
        let id_hash = id_hash.to_owned();
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(SESSIONS).map_err(unavailable)?;
                // Expired sessions go when a new one comes: the table stays
                // as small as the sessions in use.
                let mut expired = Vec::new();
                for entry in table.iter().map_err(unavailable)? {
                    let (key, value) = entry.map_err(unavailable)?;
                    let old: SessionRecord = decode(value.value())?;
                    if old.expires_at <= session.created_at {
                        expired.push(key.value().to_owned());
                    }
                }
                for key in expired {
                    table.remove(key.as_str()).map_err(unavailable)?;
                }
                table
                    .insert(id_hash.as_str(), encode(&session)?.as_slice())
                    .map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn get_session(
        &self,
        id_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<SessionRecord>> {
        let id_hash = id_hash.to_owned();
        self.blocking(move |inner| {
            let session: Option<SessionRecord> = get_json(&inner.db, SESSIONS, &id_hash)?;
            Ok(session.filter(|session| session.expires_at > now))
        })
        .await
    }

    async fn delete_session(&self, id_hash: &str) -> StoreResult<()> {
        let id_hash = id_hash.to_owned();
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(unavailable)?;
            txn.open_table(SESSIONS)
                .map_err(unavailable)?
                .remove(id_hash.as_str())
                .map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn queue_stats(&self) -> StoreResult<QueueStats> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read().map_err(unavailable)?;
            let queue = txn.open_table(QUEUE).map_err(unavailable)?;
            let running = txn.open_table(RUNNING).map_err(unavailable)?;
            let jobs = txn.open_table(JOBS).map_err(unavailable)?;
            let oldest_queued_at = match queue.first().map_err(unavailable)? {
                Some((id, _)) => match jobs.get(id.value()).map_err(unavailable)? {
                    Some(value) => Some(decode::<Job>(value.value())?.created_at),
                    None => None,
                },
                None => None,
            };
            Ok(QueueStats {
                queued: queue.len().map_err(unavailable)?,
                running: running.len().map_err(unavailable)?,
                oldest_queued_at,
            })
        })
        .await
    }

    async fn key_job(&self, key: &str) -> StoreResult<Option<JobId>> {
        let key = key.to_owned();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(KEY_JOBS).map_err(unavailable)?;
            let value = table.get(key.as_str()).map_err(unavailable)?;
            Ok(value.map(|v| JobId(v.value())))
        })
        .await
    }

    async fn create_job(&self, new: NewJob, now: DateTime<Utc>) -> StoreResult<Job> {
        self.create_job_grouped(new, now, None)
            .await?
            .ok_or_else(|| {
                StoreError::Unavailable("a job without a key was not created".to_owned())
            })
    }

    async fn create_job_once(
        &self,
        key: &str,
        names: &[String],
        new: NewJob,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        self.create_job_grouped(new, now, Some((key.to_owned(), names.to_vec())))
            .await
    }

    async fn get_job(&self, id: JobId) -> StoreResult<Option<Job>> {
        self.blocking(move |inner| inner.read_job(id)).await
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<Job>> {
        let filter = filter.clone();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(JOBS).map_err(unavailable)?;
            let upper = filter.before.map_or(u64::MAX, |id| id.0);
            let mut out = Vec::new();
            for entry in table.range(..upper).map_err(unavailable)?.rev() {
                let (_, value) = entry.map_err(unavailable)?;
                let job: Job = decode(value.value())?;
                if filter.matches(&job) {
                    out.push(job);
                    if out.len() >= filter.limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn claim_job(
        &self,
        agent: &AgentRecord,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        let agent = agent.clone();
        let claimed = self
            .blocking(move |inner| {
                // A read transaction first: most calls find nothing to take, and
                // a write transaction costs a sync to disk.
                if !inner.has_claimable_job(&agent)? {
                    return Ok(None);
                }
                let txn = inner.db.begin_write().map_err(unavailable)?;
                let claimed = {
                    let mut queue = txn.open_table(QUEUE).map_err(unavailable)?;
                    let mut jobs = txn.open_table(JOBS).map_err(unavailable)?;
                    let found = {
                        let running = txn.open_table(RUNNING).map_err(unavailable)?;
                        first_claimable(&queue, &jobs, &running, &agent)?
                    };
                    match found {
                        None => None,
                        Some(mut job) => {
                            transitions::claim(&mut job, &agent, now, lease_until)?;
                            queue.remove(job.id.0).map_err(unavailable)?;
                            let mut running = txn.open_table(RUNNING).map_err(unavailable)?;
                            running.insert(job.id.0, ()).map_err(unavailable)?;
                            jobs.insert(job.id.0, encode(&job)?.as_slice())
                                .map_err(unavailable)?;
                            Some(job)
                        }
                    }
                };
                txn.commit().map_err(unavailable)?;
                Ok(claimed)
            })
            .await?;
        if let Some(job) = &claimed {
            self.publish(StoreEvent::JobStarted { job: job.id });
        }
        Ok(claimed)
    }

    async fn renew_lease(
        &self,
        id: JobId,
        attempt: u32,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Job> {
        self.blocking(move |inner| {
            let current = inner
                .read_job(id)?
                .ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
            // Check before taking the write lock: a refused renewal is common.
            transitions::check_lease(&current, attempt)?;
            let (job, ()) =
                inner.update_job(id, |job| transitions::renew(job, attempt, lease_until))?;
            Ok(job)
        })
        .await
    }

    async fn request_cancel(&self, id: JobId, now: DateTime<Utc>) -> StoreResult<Job> {
        let job = self
            .blocking(move |inner| {
                let (job, ()) =
                    inner.update_job(id, |job| transitions::request_cancel(job, now))?;
                Ok(job)
            })
            .await?;
        self.publish(transitions::cancel_event(&job));
        Ok(job)
    }

    async fn finish_job(
        &self,
        id: JobId,
        attempt: u32,
        finish: Finish,
        now: DateTime<Utc>,
    ) -> StoreResult<Finished> {
        let (job, changed) = self
            .blocking(move |inner| {
                inner.sync_log(id);
                inner.update_job(id, |job| transitions::finish(job, attempt, finish, now))
            })
            .await?;
        if changed {
            self.publish(StoreEvent::JobFinished { job: id });
        }
        Ok(Finished {
            job,
            first: changed,
        })
    }

    async fn expire_leases(&self, now: DateTime<Utc>) -> StoreResult<Vec<Job>> {
        let lost = self
            .blocking(move |inner| {
                let running: Vec<u64> = {
                    let txn = inner.db.begin_read().map_err(unavailable)?;
                    let table = txn.open_table(RUNNING).map_err(unavailable)?;
                    let mut ids = Vec::new();
                    for entry in table.iter().map_err(unavailable)? {
                        ids.push(entry.map_err(unavailable)?.0.value());
                    }
                    ids
                };
                let mut lost = Vec::new();
                for id in running {
                    let Some(job) = inner.read_job(JobId(id))? else {
                        continue;
                    };
                    if job.lease_expires_at.is_some_and(|until| until < now) {
                        let (job, expired) =
                            inner.update_job(JobId(id), |job| Ok(transitions::expire(job, now)))?;
                        if expired {
                            lost.push(job);
                        }
                    }
                }
                Ok(lost)
            })
            .await?;
        for job in &lost {
            self.publish(StoreEvent::JobFinished { job: job.id });
        }
        Ok(lost)
    }

    async fn extend_leases(&self, until: DateTime<Utc>) -> StoreResult<()> {
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(unavailable)?;
            {
                let running = txn.open_table(RUNNING).map_err(unavailable)?;
                let mut jobs = txn.open_table(JOBS).map_err(unavailable)?;
                let mut ids = Vec::new();
                for entry in running.iter().map_err(unavailable)? {
                    ids.push(entry.map_err(unavailable)?.0.value());
                }
                for id in ids {
                    let Some(value) = jobs.get(id).map_err(unavailable)? else {
                        continue;
                    };
                    let mut job: Job = decode(value.value())?;
                    drop(value);
                    if transitions::extend(&mut job, until) {
                        jobs.insert(id, encode(&job)?.as_slice())
                            .map_err(unavailable)?;
                    }
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn append_log(
        &self,
        id: JobId,
        attempt: u32,
        offset: u64,
        data: Bytes,
    ) -> StoreResult<u64> {
        let (len, grew) = self
            .blocking(move |inner| {
                let _guard = inner.log_lock.lock().map_err(unavailable)?;
                let job = inner
                    .read_job(id)?
                    .ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
                transitions::check_lease(&job, attempt)?;
                let committed = inner.log_len(id)?;
                match plan_append(committed, offset, data.len()) {
                    AppendPlan::Duplicate => Ok((committed, false)),
                    AppendPlan::Gap => Err(StoreError::LogGap { committed }),
                    AppendPlan::Append { skip } => {
                        Ok((inner.append_file(id, &data[skip..])?, true))
                    }
                }
            })
            .await?;
        if grew {
            self.publish(StoreEvent::LogAppended { job: id, len });
        }
        Ok(len)
    }

    async fn append_controller_line(&self, id: JobId, line: &str) -> StoreResult<u64> {
        let line = format!("[hobotnica] {line}\n");
        let len = self
            .blocking(move |inner| {
                let _guard = inner.log_lock.lock().map_err(unavailable)?;
                inner.append_file(id, line.as_bytes())
            })
            .await?;
        self.publish(StoreEvent::LogAppended { job: id, len });
        Ok(len)
    }

    async fn read_log(&self, id: JobId, offset: u64, max: usize) -> StoreResult<Bytes> {
        self.blocking(move |inner| inner.read_log(id, offset, max))
            .await
    }

    async fn log_len(&self, id: JobId) -> StoreResult<u64> {
        self.blocking(move |inner| inner.log_len(id)).await
    }

    async fn register_agent(&self, agent: AgentRecord) -> StoreResult<AgentRecord> {
        self.blocking(move |inner| {
            // One write transaction: the name's owner cannot change between
            // the check and the write.
            let txn = inner.db.begin_write().map_err(unavailable)?;
            let agent = {
                let mut agents = txn.open_table(AGENTS).map_err(unavailable)?;
                let mut previous: Option<AgentRecord> = None;
                for entry in agents.iter().map_err(unavailable)? {
                    let (_, value) = entry.map_err(unavailable)?;
                    let record: AgentRecord = decode(value.value())?;
                    if record.name == agent.name {
                        previous = Some(record);
                        break;
                    }
                }
                let agent = transitions::register_agent(previous.as_ref(), agent)?;
                agents
                    .insert(agent.id.0.as_str(), encode(&agent)?.as_slice())
                    .map_err(unavailable)?;
                agent
            };
            txn.commit().map_err(unavailable)?;
            Ok(agent)
        })
        .await
    }

    async fn get_agent(&self, id: &AgentId) -> StoreResult<Option<AgentRecord>> {
        let id = id.clone();
        self.blocking(move |inner| get_json(&inner.db, AGENTS, &id.0))
            .await
    }

    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        self.blocking(|inner| all_json(&inner.db, AGENTS)).await
    }

    async fn touch_agent(
        &self,
        id: &AgentId,
        now: DateTime<Utc>,
        controller: &str,
    ) -> StoreResult<()> {
        let id = id.clone();
        let controller = controller.to_owned();
        self.blocking(move |inner| {
            let mut txn = inner.db.begin_write().map_err(unavailable)?;
            // Losing a last-seen time in a crash is harmless: skip the fsync.
            txn.set_durability(Durability::None).map_err(unavailable)?;
            {
                let mut agents = txn.open_table(AGENTS).map_err(unavailable)?;
                let mut agent: AgentRecord = match agents.get(id.0.as_str()).map_err(unavailable)? {
                    Some(value) => decode(value.value())?,
                    None => return Err(StoreError::NotFound(format!("agent {id}"))),
                };
                agent.last_seen = now;
                agent.controller = Some(controller);
                agents
                    .insert(id.0.as_str(), encode(&agent)?.as_slice())
                    .map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn create_agent_token(&self, token: AgentTokenRecord) -> StoreResult<()> {
        self.blocking(move |inner| {
            put_json(
                &inner.db,
                AGENT_TOKENS,
                &token.id,
                &token,
                Durability::Immediate,
            )
        })
        .await
    }

    async fn list_agent_tokens(&self) -> StoreResult<Vec<AgentTokenRecord>> {
        self.blocking(|inner| all_json(&inner.db, AGENT_TOKENS))
            .await
    }

    async fn find_agent_token(&self, token_hash: &str) -> StoreResult<Option<AgentTokenRecord>> {
        let token_hash = token_hash.to_owned();
        self.blocking(move |inner| {
            let tokens: Vec<AgentTokenRecord> = all_json(&inner.db, AGENT_TOKENS)?;
            Ok(tokens.into_iter().find(|t| {
                hobotnica_common::token::constant_time_eq(
                    t.token_hash.as_bytes(),
                    token_hash.as_bytes(),
                )
            }))
        })
        .await
    }

    async fn delete_agent_token(&self, id: &str) -> StoreResult<()> {
        let key = id.to_owned();
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(unavailable)?;
            let existed = {
                let mut table = txn.open_table(AGENT_TOKENS).map_err(unavailable)?;
                table.remove(key.as_str()).map_err(unavailable)?.is_some()
            };
            if existed {
                // Its agents go with it: their names are free again.
                let mut agents = txn.open_table(AGENTS).map_err(unavailable)?;
                agents
                    .retain(|_, value| {
                        decode::<AgentRecord>(value).map_or(true, |agent| agent.token_id != key)
                    })
                    .map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)?;
            if existed {
                Ok(())
            } else {
                Err(StoreError::NotFound(format!("agent token {key}")))
            }
        })
        .await?;
        self.publish(StoreEvent::AgentTokenRevoked {
            token_id: id.to_owned(),
        });
        Ok(())
    }

    async fn queue_notifications(&self, deliveries: Vec<NotificationDelivery>) -> StoreResult<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(NOTIFICATIONS).map_err(unavailable)?;
                for delivery in &deliveries {
                    table
                        .insert(delivery.id.as_str(), encode(delivery)?.as_slice())
                        .map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn claim_notification(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<NotificationDelivery>> {
        self.blocking(move |inner| {
            // Every controller asks every second: a read first, so an empty
            // backlog never takes the writer.
            {
                let txn = inner.db.begin_read().map_err(unavailable)?;
                let table = txn.open_table(NOTIFICATIONS).map_err(unavailable)?;
                let mut any_due = false;
                for entry in table.iter().map_err(unavailable)? {
                    let (_, value) = entry.map_err(unavailable)?;
                    let delivery: NotificationDelivery = decode(value.value())?;
                    if delivery.due_at <= now {
                        any_due = true;
                        break;
                    }
                }
                if !any_due {
                    return Ok(None);
                }
            }
            let txn = inner.db.begin_write().map_err(unavailable)?;
            let claimed = {
                let mut table = txn.open_table(NOTIFICATIONS).map_err(unavailable)?;
                let mut first: Option<NotificationDelivery> = None;
                for entry in table.iter().map_err(unavailable)? {
                    let (_, value) = entry.map_err(unavailable)?;
                    let delivery: NotificationDelivery = decode(value.value())?;
                    if delivery.due_at <= now
                        && first.as_ref().is_none_or(|first| {
                            (delivery.due_at, &delivery.id) < (first.due_at, &first.id)
                        })
                    {
                        first = Some(delivery);
                    }
                }
                match first {
                    Some(mut delivery) => {
                        delivery.attempt += 1;
                        delivery.due_at = lease_until;
                        table
                            .insert(delivery.id.as_str(), encode(&delivery)?.as_slice())
                            .map_err(unavailable)?;
                        Some(delivery)
                    }
                    None => None,
                }
            };
            if claimed.is_some() {
                txn.commit().map_err(unavailable)?;
            } else {
                txn.abort().map_err(unavailable)?;
            }
            Ok(claimed)
        })
        .await
    }

    async fn retry_notification(
        &self,
        id: &str,
        attempt: u32,
        due_at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let id = id.to_owned();
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(NOTIFICATIONS).map_err(unavailable)?;
                let Some(mut delivery) = delivery_at(&table, &id, attempt)? else {
                    return Ok(false);
                };
                delivery.due_at = due_at;
                table
                    .insert(id.as_str(), encode(&delivery)?.as_slice())
                    .map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)?;
            Ok(true)
        })
        .await
    }

    async fn finish_notification(&self, id: &str, attempt: u32) -> StoreResult<bool> {
        let id = id.to_owned();
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(NOTIFICATIONS).map_err(unavailable)?;
                if delivery_at(&table, &id, attempt)?.is_none() {
                    return Ok(false);
                }
                table.remove(id.as_str()).map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)?;
            Ok(true)
        })
        .await
    }

    async fn archive_logs(&self, _finished_before: DateTime<Utc>) -> StoreResult<usize> {
        // Log files are already their own archive.
        Ok(0)
    }

    async fn prune(&self, policy: &Retention, now: DateTime<Utc>) -> StoreResult<usize> {
        let policy = *policy;
        self.blocking(move |inner| {
            let victims: Vec<JobId> = {
                let txn = inner.db.begin_read().map_err(unavailable)?;
                let jobs = txn.open_table(JOBS).map_err(unavailable)?;
                let mut per_repo: std::collections::HashMap<RepoRef, usize> =
                    std::collections::HashMap::new();
                let mut victims = Vec::new();
                for entry in jobs.iter().map_err(unavailable)?.rev() {
                    let (_, value) = entry.map_err(unavailable)?;
                    let job: Job = decode(value.value())?;
                    let newer = per_repo.entry(job.repo.clone()).or_insert(0);
                    *newer += 1;
                    let beyond_count = *newer > policy.max_jobs_per_repo;
                    if job.state.is_terminal() && (beyond_count || policy.too_old(&job, now)) {
                        victims.push(job.id);
                    }
                }
                victims
            };
            let delivery_cutoff = (now
                - chrono::Duration::from_std(super::DELIVERY_RETENTION)
                    .unwrap_or(chrono::Duration::MAX))
            .timestamp_millis();
            let txn = inner.db.begin_write().map_err(unavailable)?;
            {
                let mut jobs = txn.open_table(JOBS).map_err(unavailable)?;
                for id in &victims {
                    jobs.remove(id.0).map_err(unavailable)?;
                }
                let mut deliveries = txn.open_table(DELIVERIES).map_err(unavailable)?;
                deliveries
                    .retain(|_, at| at >= delivery_cutoff)
                    .map_err(unavailable)?;
                // A key's job (and its request's fingerprint, `<key>#<hash>`)
                // is kept as long as the key is remembered, as in Redis.
                let mut key_jobs = txn.open_table(KEY_JOBS).map_err(unavailable)?;
                let mut forgotten = Vec::new();
                for entry in key_jobs.iter().map_err(unavailable)? {
                    let (key, _) = entry.map_err(unavailable)?;
                    let key = key.value().to_owned();
                    let remembered = |k: &str| -> StoreResult<bool> {
                        Ok(deliveries.get(k).map_err(unavailable)?.is_some())
                    };
                    let kept = remembered(&key)?
                        || match key.rsplit_once('#') {
                            Some((base, _)) => remembered(base)?,
                            None => false,
                        };
                    if !kept {
                        forgotten.push(key);
                    }
                }
                for key in &forgotten {
                    key_jobs.remove(key.as_str()).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)?;
            let _guard = inner.log_lock.lock().map_err(unavailable)?;
            for id in &victims {
                let _ = fs::remove_file(inner.log_path(*id));
            }
            Ok(victims.len())
        })
        .await
    }

    async fn export(&self, sink: mpsc::Sender<snapshot::Record>) -> StoreResult<()> {
        // A receiver that went away ends the export early, without error.
        self.blocking(move |inner| inner.export(&sink).map(|_| ()))
            .await
    }

    async fn is_empty(&self) -> StoreResult<bool> {
        self.blocking(|inner| inner.is_empty()).await
    }

    async fn import(&self, batch: Vec<snapshot::Record>) -> StoreResult<()> {
        self.blocking(move |inner| inner.import(batch)).await
    }

    async fn import_unfinished(&self) -> StoreResult<bool> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read().map_err(unavailable)?;
            let meta = txn.open_table(META).map_err(unavailable)?;
            Ok(meta.get(IMPORT_UNFINISHED).map_err(unavailable)?.is_some())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One group: a key seen earlier in the same group is refused without
    /// failing the others, and the ids stay in order without gaps.
    #[test]
    fn a_group_refuses_only_its_repeated_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let new = || super::super::conformance::new_job("test");
        let now = Utc::now();
        let plain = || Creation {
            new: new(),
            now,
            once: None,
        };
        let once = |key: &str| Creation {
            new: new(),
            now,
            once: Some((key.to_owned(), vec![key.to_owned()])),
        };
        let answers = store
            .inner
            .create_jobs(vec![once("d-1"), plain(), once("d-1"), once("d-2")])
            .expect("committed");
        let ids: Vec<Option<u64>> = answers
            .iter()
            .map(|answer| {
                answer
                    .as_ref()
                    .expect("answered")
                    .as_ref()
                    .map(|job| job.id.0)
            })
            .collect();
        assert_eq!(ids, [Some(1), Some(2), None, Some(3)]);
        let next = store
            .inner
            .create_jobs(vec![once("d-2"), plain()])
            .expect("committed");
        assert!(
            matches!(next[0], Ok(None)),
            "remembered from the last group"
        );
        assert!(matches!(&next[1], Ok(Some(job)) if job.id.0 == 4));
    }

    #[tokio::test]
    async fn a_store_in_use_is_refused_at_once_without_a_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _open = EmbeddedStore::open(dir.path()).expect("open");
        let refused = EmbeddedStore::open_waiting(dir.path(), Duration::ZERO)
            .await
            .err()
            .expect("in use");
        assert!(matches!(refused, OpenError::InUse(_)), "{refused}");
        let message = refused.to_string();
        assert!(message.contains("--store-wait"), "{message}");
        assert!(message.contains("hobotnica.redb"), "{message}");
    }

    #[tokio::test]
    async fn a_waiting_controller_opens_the_store_once_the_other_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = EmbeddedStore::open(dir.path()).expect("open");
        let waiting = tokio::spawn({
            let dir = dir.path().to_owned();
            async move { EmbeddedStore::open_waiting(&dir, Duration::from_secs(30)).await }
        });
        // The waiter has tried and is waiting while the first holds the store.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        waiting.await.expect("join").expect("opened once released");
    }
}
