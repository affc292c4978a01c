//! The Redis backend: every controller sharing one Redis sees the same
//! repositories, jobs, queue, leases, logs, agents and tokens, and the same
//! events (Redis pub/sub). A controller keeps no state of its own.
//!
//! Transitions are read-modify-compare-and-set: the state machine runs in
//! Rust (`transitions`), and one Lua script (`CAS_JOB`) writes the new job
//! only if the stored JSON is still the one that was read, updating the
//! queue and running indexes and the job's fence (`state:attempt`) in the
//! same step. Log appends check the fence in a script too, so a stale
//! attempt can never write. See ARCHITECTURE.md for the key layout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use hobotnica_common::ids::{AgentId, JobId};
use hobotnica_common::job::{Job, JobKind, JobState, Repo};
use hobotnica_common::logs::{AppendPlan, plan_append};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionInfo, FromRedisValue, IntoConnectionInfo, RedisFuture, Script, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::snapshot;
use super::{
    AgentRecord, AgentTokenRecord, Finish, Finished, JobFilter, NewJob, NotificationDelivery,
    QueueStats, Retention, SessionRecord, Store, StoreError, StoreEvent, StoreResult, transitions,
};

/// Capacity of the local event channel.
const EVENT_CAPACITY: usize = 4096;
/// How many times a compare-and-set is retried under contention.
const MAX_CAS_ATTEMPTS: usize = 64;
/// Queued jobs looked at per claim (oldest first).
const CLAIM_SCAN: isize = 100;
/// Jobs fetched per round while listing with a filter.
const LIST_BATCH: usize = 200;
/// Stream entries fetched per round while reading a log.
const LOG_ENTRIES_PER_READ: usize = 16;
/// A Redis command that takes longer fails (the API answers 503).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// TCP keepalive on every Redis connection: an idle connection whose peer
/// vanished is closed by the kernel after `IDLE + RETRIES * INTERVAL`
/// (25 s), and the connection manager (or the subscriber) reconnects.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// `TCP_USER_TIMEOUT`: a connection whose sent data stays unacknowledged
/// this long is closed by the kernel (instead of retransmitting for ~15
/// minutes). Keepalive does not cover a busy connection; this does.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a starting controller waits for an unreachable Redis to come up
/// (start order does not matter) before it gives up.
const STARTUP_WAIT: Duration = Duration::from_secs(120);

/// The first connection, retried with backoff while Redis cannot be reached
/// (refused, reset, timed out) for up to [`STARTUP_WAIT`]. Other errors (a
/// wrong password, a TLS failure) end at once.
async fn connect_when_up(
    client: &redis::Client,
    config: ConnectionManagerConfig,
) -> anyhow::Result<ConnectionManager> {
    use anyhow::Context as _;
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
            Ok(conn) => return Ok(conn),
            Err(err)
                if (err.is_connection_refusal()
                    || err.is_io_error()
                    || err.is_timeout()
                    || err.is_connection_dropped())
                    && started.elapsed() + delay < STARTUP_WAIT =>
            {
                // The address only: the URL may hold a password.
                tracing::warn!(
                    redis = %client.get_connection_info().addr(),
                    error = %err,
                    retry_in = ?delay,
                    "Redis is not reachable yet; waiting for it"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(err) => return Err(err).context("cannot connect to Redis"),
        }
    }
}

/// Adds keepalive and `TCP_USER_TIMEOUT` to the connection settings, so the
/// kernel closes a connection whose peer went silent (plain and TLS alike:
/// the TLS client keeps these settings; the runtime applies them to every
/// socket it opens, for commands and pub/sub).
fn with_tcp_settings(info: ConnectionInfo) -> ConnectionInfo {
    use redis::io::tcp::socket2::TcpKeepalive;
    let keepalive = TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    let settings = info.tcp_settings().clone().set_keepalive(keepalive);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let settings = settings.set_user_timeout(TCP_USER_TIMEOUT);
    info.set_tcp_settings(settings)
}

/// The client for `url`, with [`with_tcp_settings`]; `ca_pem` verifies a
/// `rediss://` server (the system's roots otherwise).
fn client(url: &str, ca_pem: Option<Vec<u8>>) -> anyhow::Result<redis::Client> {
    use anyhow::Context as _;
    let info = with_tcp_settings(url.into_connection_info().context("invalid Redis URL")?);
    match ca_pem {
        Some(root_cert) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            },
        ),
        None => redis::Client::open(info),
    }
    .context("invalid Redis URL or CA certificate")
}

/// The main Redis connection, replaced when it stops answering.
///
/// The connection manager reconnects only when its connection is closed.
/// One whose path died without closing (the Redis host vanished, a proxy
/// went silent) stays: every command times out until the kernel gives up
/// on the socket. Keepalive and `TCP_USER_TIMEOUT` bound that to about
/// 25 s; this bounds it more tightly and where those options do not apply.
///
/// A command that times out while the connection answered nothing at all
/// since it was sent marks the connection dead, and a fresh connection
/// manager replaces it. Redis answers in order, so a response timeout with
/// no answer to anything meanwhile means the path is dead, or Redis is
/// stuck for a response timeout (a long script), where a new connection
/// costs nothing. One timeout is enough: waiting for a second would double
/// the outage for no better evidence. Commands in flight keep their
/// connection; the replacement is made by a task of its own (at most one
/// at a time), so no caller waits for it.
///
/// Bound: once Redis can be reached over a new connection, the first
/// command on the dead one times out after the response timeout (5 s),
/// and the replacement connects within [`CONNECT_TIMEOUT`] (3 s):
/// commands succeed again at most 8 s after the first command sent then
/// (the controller's own loops send some every few seconds). If the
/// replacement cannot connect, the next such timeout tries again.
#[derive(Clone)]
struct LiveConnection {
    shared: Arc<LiveShared>,
}

struct LiveShared {
    client: redis::Client,
    config: ConnectionManagerConfig,
    current: RwLock<Link>,
    /// A replacement is being connected.
    replacing: AtomicBool,
    stop: CancellationToken,
}

/// One connection manager and what it has answered.
#[derive(Clone)]
struct Link {
    conn: ConnectionManager,
    /// Counts replacements, so a late timeout on an old link does not
    /// replace its successor.
    generation: u64,
    /// Answers received (values and Redis errors alike).
    answers: Arc<AtomicU64>,
}

impl LiveConnection {
    fn new(
        conn: ConnectionManager,
        client: redis::Client,
        config: ConnectionManagerConfig,
        stop: CancellationToken,
    ) -> LiveConnection {
        LiveConnection {
            shared: Arc::new(LiveShared {
                client,
                config,
                current: RwLock::new(Link {
                    conn,
                    generation: 0,
                    answers: Arc::default(),
                }),
                replacing: AtomicBool::new(false),
                stop,
            }),
        }
    }

    fn link(&self) -> Link {
        // A poisoned lock still holds a whole `Link` (it is replaced in
        // one assignment).
        self.shared
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs a request on the current link and watches the outcome.
    async fn request<T>(
        &self,
        run: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let mut link = self.link();
        let answered_before = link.answers.load(Ordering::Acquire);
        let result = run(&mut link.conn).await;
        match &result {
            Ok(_) => {
                link.answers.fetch_add(1, Ordering::AcqRel);
            }
            Err(err) if err.is_timeout() => {
                if link.answers.load(Ordering::Acquire) == answered_before {
                    self.replace(link.generation);
                }
            }
            // Closed or refused: the connection manager reconnects itself.
            Err(err) if err.is_io_error() || err.is_connection_dropped() => {}
            // Redis answered, with an error.
            Err(_) => {
                link.answers.fetch_add(1, Ordering::AcqRel);
            }
        }
        result
    }

    /// Replaces link `generation` with a fresh connection, unless it has
    /// been replaced already or a replacement is under way.
    fn replace(&self, generation: u64) {
        if self.link().generation != generation
            || self.shared.replacing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        tracing::warn!(
            redis = %self.shared.client.get_connection_info().addr(),
            "the Redis connection answers nothing; replacing it"
        );
        let shared = Arc::clone(&self.shared);
        // Ends within CONNECT_TIMEOUT, or when the store is dropped.
        tokio::spawn(async move {
            let connect = tokio::time::timeout(
                CONNECT_TIMEOUT,
                ConnectionManager::new_with_config(shared.client.clone(), shared.config.clone()),
            );
            let connected = tokio::select! {
                () = shared.stop.cancelled() => None,
                connected = connect => Some(connected),
            };
            match connected {
                Some(Ok(Ok(conn))) => {
                    let mut current = shared
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    *current = Link {
                        conn,
                        generation: generation + 1,
                        answers: Arc::default(),
                    };
                    tracing::info!("the Redis connection was replaced");
                }
                Some(Ok(Err(err))) => {
                    tracing::warn!(error = %err, "cannot replace the Redis connection yet");
                }
                Some(Err(_)) => tracing::warn!(
                    timeout = ?CONNECT_TIMEOUT,
                    "cannot replace the Redis connection yet: no answer"
                ),
                None => {}
            }
            shared.replacing.store(false, Ordering::Release);
        });
    }
}

impl ConnectionLike for LiveConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.request(async |conn| conn.req_packed_command(cmd).await))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(
            self.request(async move |conn| conn.req_packed_commands(pipeline, offset, count).await),
        )
    }

    fn get_db(&self) -> i64 {
        self.link().conn.get_db()
    }
}

/// Sets a job's JSON only if it is still `old`, and keeps the indexes and the
/// fence in step. A job that has just finished enters the `finished` and
/// `unarchived` indexes (scored by its finish time in ms).
/// A deploy takes its repository's deploy lock when claimed (or the CAS
/// fails) and releases it when it ends: deploys of one repository run one at
/// a time.
/// KEYS: job, fence, queue, running, finished, unarchived, deploy lock.
/// ARGV: old, new, id, fence, index, finished_ms ('' unless it just finished),
/// lock ('acquire', 'release' or '').
const CAS_JOB: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[7] == 'acquire' and not redis.call('SET', KEYS[7], ARGV[3], 'NX') then return 0 end
if ARGV[7] == 'release' and redis.call('GET', KEYS[7]) == ARGV[3] then
  redis.call('DEL', KEYS[7])
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('SREM', KEYS[4], ARGV[3])
if ARGV[5] == 'queued' then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[3])
elseif ARGV[5] == 'running' then
  redis.call('SADD', KEYS[4], ARGV[3])
end
if ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[5], ARGV[6], ARGV[3])
  redis.call('ZADD', KEYS[6], ARGV[6], ARGV[3])
end
return 1
";

/// Replaces a log's archive with the freshly written one and drops its
/// stream — only if the log did not grow while it was being archived.
/// KEYS: length, stream, archive, new archive, archived length, unarchived, lock.
/// ARGV: length archived, id.
const FINISH_ARCHIVE: &str = r"
local current = redis.call('GET', KEYS[1]) or '0'
if current ~= ARGV[1] then
  redis.call('DEL', KEYS[4], KEYS[7])
  return 0
end
redis.call('DEL', KEYS[3])
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('RENAME', KEYS[4], KEYS[3])
end
redis.call('SET', KEYS[5], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[7])
redis.call('ZREM', KEYS[6], ARGV[2])
return 1
";

/// Sets a repository's JSON only if it is still `old`, and moves its
/// webhook index entry in the same step when the hook id changes.
/// KEYS: repo, old hook, new hook.
/// ARGV: old, new, full name, 'drop' when the old hook's entry goes,
/// 'set' when the new hook's entry is written.
/// Returns 1, 0 (changed meanwhile) or -1 (gone).
const CAS_REPO: &str = r"
local current = redis.call('GET', KEYS[1])
if not current then return -1 end
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[4] == 'drop' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
if ARGV[5] == 'set' then
  redis.call('SET', KEYS[3], ARGV[3])
end
return 1
";

/// Registers an agent if its name still names the agent that was read (or
/// nobody, with ARGV[1] = '') and that agent's record is still the one read.
/// KEYS: agent name, agent, agents. ARGV: name's old id, agent's old JSON,
/// new JSON, id. Returns 1, or 0 when someone registered meanwhile.
const REGISTER_AGENT: &str = r"
local owner = redis.call('GET', KEYS[1]) or ''
if owner ~= ARGV[1] then return 0 end
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[4])
return 1
";

/// Revokes a token and forgets its agents (freeing their names).
/// KEYS: token, tokens by hash, agents, then per agent: agent, agent name.
/// ARGV: token hash, then the agents' ids.
const REVOKE_TOKEN: &str = r"
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
for i = 1, #ARGV - 1 do
  local id = ARGV[i + 1]
  redis.call('DEL', KEYS[2 + 2 * i])
  redis.call('SREM', KEYS[3], id)
  if redis.call('GET', KEYS[3 + 2 * i]) == id then
    redis.call('DEL', KEYS[3 + 2 * i])
  end
end
return 1
";

/// Remembers a key and creates a job with it, in one step, unless the key
/// was seen before: the key never exists without its job. The key's (and
/// each name's) record expires after the delivery retention.
/// KEYS: the key's delivery record, job, fence, jobs, repository's jobs,
/// queue, repositories with jobs, then each name's `key_job` record.
/// ARGV: retention (s), job JSON, fence, id, repository.
/// Returns 1, or 0 (nothing written) when the key was seen before.
const CREATE_JOB_ONCE: &str = r"
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[4])
redis.call('ZADD', KEYS[6], ARGV[4], ARGV[4])
redis.call('SADD', KEYS[7], ARGV[5])
for i = 8, #KEYS do
  redis.call('SET', KEYS[i], ARGV[4], 'EX', ARGV[1])
end
return 1
";

/// Bytes of log per compressed archive segment.
const ARCHIVE_SEGMENT_BYTES: usize = 1024 * 1024;
/// How long one controller may hold a log's archiving lock.
const ARCHIVE_LOCK_MS: u64 = 120_000;
/// Logs archived (or jobs pruned) per maintenance round.
const MAINTENANCE_BATCH: usize = 200;

/// Appends a log piece at the committed end, if the fence still says the
/// attempt runs and nothing was appended since the caller looked.
/// KEYS: fence, length, stream. ARGV: fence, committed, data.
/// Returns the new length, -1 for a lost lease, -2 for a moved end.
const APPEND_LOG: &str = r"
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local committed = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[2] ~= '' and committed ~= tonumber(ARGV[2]) then return -2 end
redis.call('XADD', KEYS[3], (committed + 1) .. '-0', 'd', ARGV[3])
return redis.call('INCRBY', KEYS[2], string.len(ARGV[3]))
";

/// Takes the pending notification due first, if one is due: it is not due
/// again before the lease's end and its attempt count grows.
/// KEYS: due, attempts. ARGV: now (ms), lease end (ms), record key prefix.
/// Returns {id, attempt, record JSON}, or nil.
const CLAIM_NOTIFICATION: &str = r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #ids == 0 then return false end
local id = ids[1]
local record = redis.call('GET', ARGV[3] .. id)
if not record then
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  return false
end
redis.call('ZADD', KEYS[1], ARGV[2], id)
local attempt = redis.call('HINCRBY', KEYS[2], id, 1)
return {id, attempt, record}
";

/// Makes a claimed notification due again, if still under the attempt.
/// KEYS: due, attempts. ARGV: id, attempt, due (ms). Returns 1 or 0.
const RETRY_NOTIFICATION: &str = r"
if tostring(redis.call('HGET', KEYS[2], ARGV[1])) ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
";

/// Forgets a claimed notification, if still under the attempt.
/// KEYS: due, attempts, record. ARGV: id, attempt. Returns 1 or 0.
const FINISH_NOTIFICATION: &str = r"
if tostring(redis.call('HGET', KEYS[2], ARGV[1])) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
";

/// Reads everything but the logs in one step (a script runs alone: the
/// view is consistent), for an export. KEYS: none (the keys are found
/// under the prefix). ARGV: prefix, prefix as a glob pattern.
/// Returns: repositories; jobs with their log lengths; agents; tokens;
/// keys with their remaining ms; key names with their job; sessions with
/// their id hashes; notifications with their attempt and due time (ms);
/// the last job id given; the time (s, us).
const EXPORT_STATE: &str = r"
local p = ARGV[1]
local glob = ARGV[2]
local function values(ids, prefix)
  local out = {}
  for _, id in ipairs(ids) do
    local v = redis.call('GET', p .. prefix .. id)
    if v then table.insert(out, v) end
  end
  return out
end
local repos = values(redis.call('SMEMBERS', p .. 'repos'), 'repo:')
local jobs = {}
for _, id in ipairs(redis.call('ZRANGE', p .. 'jobs', 0, -1)) do
  local v = redis.call('GET', p .. 'job:' .. id)
  if v then
    table.insert(jobs, v)
    table.insert(jobs, redis.call('GET', p .. 'log_len:' .. id) or '0')
  end
end
local agents = values(redis.call('SMEMBERS', p .. 'agents'), 'agent:')
local tokens = values(redis.call('HVALS', p .. 'agent_tokens_by_hash'), 'agent_token:')
local function under(kind)
  local out = {}
  for _, key in ipairs(redis.call('KEYS', glob .. kind .. '*')) do
    table.insert(out, string.sub(key, #p + #kind + 1))
  end
  table.sort(out)
  return out
end
local keys = {}
for _, key in ipairs(under('delivery:')) do
  table.insert(keys, key)
  table.insert(keys, tostring(redis.call('PTTL', p .. 'delivery:' .. key)))
end
local names = {}
for _, name in ipairs(under('key_job:')) do
  local job = redis.call('GET', p .. 'key_job:' .. name)
  if job then
    table.insert(names, name)
    table.insert(names, job)
  end
end
local sessions = {}
for _, hash in ipairs(under('session:')) do
  local v = redis.call('GET', p .. 'session:' .. hash)
  if v then
    table.insert(sessions, hash)
    table.insert(sessions, v)
  end
end
local notifications = {}
local due = redis.call('ZRANGE', p .. 'notifications_due', 0, -1, 'WITHSCORES')
for i = 1, #due, 2 do
  local v = redis.call('GET', p .. 'notification:' .. due[i])
  if v then
    table.insert(notifications, v)
    table.insert(notifications, tostring(redis.call('HGET', p .. 'notification_attempts', due[i]) or '0'))
    table.insert(notifications, due[i + 1])
  end
end
local last_id = redis.call('GET', p .. 'next_job_id') or '0'
local time = redis.call('TIME')
return {repos, jobs, agents, tokens, keys, names, sessions, notifications, last_id, time}
";

/// Appends an imported log piece at ARGV[1], which must be the log's
/// length: anything else is an error (and writes nothing).
/// KEYS: length, stream. ARGV: offset, data.
const IMPORT_LOG: &str = r"
local committed = tonumber(redis.call('GET', KEYS[1]) or '0')
if committed ~= tonumber(ARGV[1]) then
  return redis.error_reply('the log holds ' .. committed .. ' bytes, not ' .. ARGV[1])
end
redis.call('XADD', KEYS[2], (committed + 1) .. '-0', 'd', ARGV[2])
return redis.call('INCRBY', KEYS[1], string.len(ARGV[2]))
";

/// Raises a counter to at least ARGV[1]. KEYS: the counter.
const RAISE_TO: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
";

/// `prefix` as a glob pattern that matches only itself.
fn glob_escape(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The state an export reads in one step ([`EXPORT_STATE`]).
type ExportState = (
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    String,
    (String, String),
);

/// Key names under one prefix.
#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn key(&self, name: impl std::fmt::Display) -> String {
        format!("{}{name}", self.prefix)
    }
    fn next_job_id(&self) -> String {
        self.key("next_job_id")
    }
    fn job(&self, id: JobId) -> String {
        self.key(format_args!("job:{id}"))
    }
    fn fence(&self, id: JobId) -> String {
        self.key(format_args!("fence:{id}"))
    }
    fn jobs(&self) -> String {
        self.key("jobs")
    }
    fn repo_jobs(&self, repo: impl std::fmt::Display) -> String {
        self.key(format_args!("repo_jobs:{repo}"))
    }
    fn queue(&self) -> String {
        self.key("queue")
    }
    fn running(&self) -> String {
        self.key("running")
    }
    fn repo(&self, full_name: &str) -> String {
        self.key(format_args!("repo:{full_name}"))
    }
    fn repos(&self) -> String {
        self.key("repos")
    }
    fn hook(&self, hook_id: &str) -> String {
        self.key(format_args!("hook:{hook_id}"))
    }
    fn delivery(&self, delivery_id: &str) -> String {
        self.key(format_args!("delivery:{delivery_id}"))
    }
    fn session(&self, id_hash: &str) -> String {
        self.key(format_args!("session:{id_hash}"))
    }
    fn key_job(&self, key: &str) -> String {
        self.key(format_args!("key_job:{key}"))
    }
    /// Every repository that has jobs (registered or not any more).
    fn repos_with_jobs(&self) -> String {
        self.key("repos_with_jobs")
    }
    fn agent(&self, id: &AgentId) -> String {
        self.key(format_args!("agent:{id}"))
    }
    fn agents(&self) -> String {
        self.key("agents")
    }
    fn agent_name(&self, name: &str) -> String {
        self.key(format_args!("agent_name:{name}"))
    }
    fn agent_token(&self, id: &str) -> String {
        self.key(format_args!("agent_token:{id}"))
    }
    fn agent_tokens(&self) -> String {
        self.key("agent_tokens_by_hash")
    }
    fn log(&self, id: JobId) -> String {
        self.key(format_args!("log:{id}"))
    }
    fn log_len(&self, id: JobId) -> String {
        self.key(format_args!("log_len:{id}"))
    }
    fn log_archive(&self, id: JobId) -> String {
        self.key(format_args!("log_archive:{id}"))
    }
    fn log_archive_new(&self, id: JobId) -> String {
        self.key(format_args!("log_archive_new:{id}"))
    }
    fn log_archived_len(&self, id: JobId) -> String {
        self.key(format_args!("log_archived_len:{id}"))
    }
    fn archive_lock(&self, id: JobId) -> String {
        self.key(format_args!("archive_lock:{id}"))
    }
    fn deploy_lock(&self, repo: impl std::fmt::Display) -> String {
        self.key(format_args!("deploy_lock:{repo}"))
    }
    fn finished(&self) -> String {
        self.key("finished")
    }
    fn unarchived(&self) -> String {
        self.key("unarchived")
    }
    fn events(&self) -> String {
        self.key("events")
    }
    /// A pending notification delivery's record (JSON, as queued).
    fn notification(&self, id: &str) -> String {
        self.key(format_args!("notification:{id}"))
    }
    /// Pending notification deliveries by when they are due (ms).
    fn notifications_due(&self) -> String {
        self.key("notifications_due")
    }
    /// Each pending delivery's attempts so far (its fencing token).
    fn notification_attempts(&self) -> String {
        self.key("notification_attempts")
    }
    /// Set while an import into this prefix is under way (or did not finish).
    fn import_unfinished(&self) -> String {
        self.key("import_unfinished")
    }
}

/// Commands that only read, and so may be retried.
const READ_COMMANDS: &[&[u8]] = &[
    b"GET",
    b"MGET",
    b"SMEMBERS",
    b"ZRANGE",
    b"ZRANGEBYSCORE",
    b"ZREVRANGEBYSCORE",
    b"ZCARD",
    b"HGET",
    b"HVALS",
    b"XRANGE",
    b"XREVRANGE",
    b"LINDEX",
    b"SCAN",
    b"EXISTS",
    b"PTTL",
    b"PING",
    b"CONFIG",
];

fn is_read(cmd: &redis::Cmd) -> bool {
    matches!(cmd.args_iter().next(), Some(redis::Arg::Simple(name)) if READ_COMMANDS.contains(&name))
}

fn fence(job: &Job) -> String {
    format!("{}:{}", job.state, job.attempt)
}

fn unavailable(err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

fn encode<T: Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(unavailable)
}

fn decode<T: DeserializeOwned>(raw: &str) -> StoreResult<T> {
    serde_json::from_str(raw)
        .map_err(|err| StoreError::Unavailable(format!("corrupt record: {err}")))
}

pub struct RedisStore {
    conn: LiveConnection,
    keys: Keys,
    events: broadcast::Sender<StoreEvent>,
    cas_job: Arc<Script>,
    append_log: Arc<Script>,
    finish_archive: Arc<Script>,
    cas_repo: Arc<Script>,
    register_agent: Arc<Script>,
    revoke_token: Arc<Script>,
    create_job_once: Arc<Script>,
    claim_notification: Arc<Script>,
    retry_notification: Arc<Script>,
    finish_notification: Arc<Script>,
    /// Stops the pub/sub task and a connection replacement under way when
    /// the store is dropped.
    stop_tasks: CancellationToken,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.stop_tasks.cancel();
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://` or `rediss://`, verified against `ca_pem`
    /// or the system's roots), subscribes to the event channel, and warns
    /// about settings that can lose jobs.
    pub async fn connect(
        url: &str,
        prefix: &str,
        ca_pem: Option<Vec<u8>>,
    ) -> anyhow::Result<RedisStore> {
        RedisStore::connect_with(url, prefix, ca_pem, RESPONSE_TIMEOUT, SUBSCRIBER_LIVENESS).await
    }

    /// [`RedisStore::connect`] with the response timeout and the
    /// subscriber's liveness timings (tests shorten them).
    async fn connect_with(
        url: &str,
        prefix: &str,
        ca_pem: Option<Vec<u8>>,
        response_timeout: Duration,
        liveness: SubscriberLiveness,
    ) -> anyhow::Result<RedisStore> {
        use anyhow::Context as _;
        let client = client(url, ca_pem)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let stop_tasks = CancellationToken::new();
        let conn = LiveConnection::new(
            connect_when_up(&client, config.clone()).await?,
            client.clone(),
            config,
            stop_tasks.clone(),
        );
        let keys = Keys {
            prefix: prefix.to_owned(),
        };
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(run_subscriber(
            client,
            keys.events(),
            events.clone(),
            ready_tx,
            stop_tasks.clone(),
            liveness,
        ));
        tokio::time::timeout(CONNECT_TIMEOUT, ready_rx)
            .await
            .context("cannot subscribe to Redis events")?
            .context("cannot subscribe to Redis events")?;
        let store = RedisStore {
            conn,
            keys,
            events,
            cas_job: Arc::new(Script::new(CAS_JOB)),
            append_log: Arc::new(Script::new(APPEND_LOG)),
            finish_archive: Arc::new(Script::new(FINISH_ARCHIVE)),
            cas_repo: Arc::new(Script::new(CAS_REPO)),
            register_agent: Arc::new(Script::new(REGISTER_AGENT)),
            revoke_token: Arc::new(Script::new(REVOKE_TOKEN)),
            create_job_once: Arc::new(Script::new(CREATE_JOB_ONCE)),
            claim_notification: Arc::new(Script::new(CLAIM_NOTIFICATION)),
            retry_notification: Arc::new(Script::new(RETRY_NOTIFICATION)),
            finish_notification: Arc::new(Script::new(FINISH_NOTIFICATION)),
            stop_tasks,
        };
        store.check_settings().await;
        Ok(store)
    }

    /// Warns about Redis settings that could lose jobs or logs.
    async fn check_settings(&self) {
        let policy: StoreResult<Vec<String>> = self
            .query(redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"))
            .await;
        match policy.as_deref() {
            Ok([_, policy]) if policy != "noeviction" => tracing::warn!(
                maxmemory_policy = %policy,
                "Redis may EVICT keys under memory pressure, which loses jobs and logs: set maxmemory-policy noeviction"
            ),
            Ok(_) => {}
            Err(err) => {
                tracing::info!(error = %err, "cannot read Redis' maxmemory-policy (CONFIG is disabled?)")
            }
        }
        let aof: StoreResult<Vec<String>> = self
            .query(redis::cmd("CONFIG").arg("GET").arg("appendonly"))
            .await;
        if let Ok([_, aof]) = aof.as_deref()
            && aof != "yes"
        {
            tracing::warn!(
                "Redis runs without AOF persistence (appendonly no): a Redis restart can lose accepted jobs; set appendonly yes"
            );
        }
    }

    /// Runs one command. A read that failed on a dropped connection (Redis
    /// restarted; the connection manager reconnects) is asked once more; a
    /// write is not, since it may have been carried out.
    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> StoreResult<T> {
        match cmd.query_async(&mut self.conn.clone()).await {
            Ok(value) => Ok(value),
            Err(err) if (err.is_connection_dropped() || err.is_io_error()) && is_read(cmd) => cmd
                .query_async(&mut self.conn.clone())
                .await
                .map_err(unavailable),
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn publish(&self, event: StoreEvent) {
        let payload = match serde_json::to_string(&event) {
            Ok(payload) => payload,
            Err(err) => {
                tracing::error!(error = %err, "cannot encode an event");
                return;
            }
        };
        let sent: StoreResult<i64> = self
            .query(redis::cmd("PUBLISH").arg(self.keys.events()).arg(payload))
            .await;
        if let Err(err) = sent {
            // Listeners re-read on their own schedule (heartbeats, tails).
            tracing::warn!(error = %err, "cannot publish an event");
        }
    }

    async fn get_raw(&self, key: &str) -> StoreResult<Option<String>> {
        self.query(redis::cmd("GET").arg(key)).await
    }

    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> StoreResult<Option<T>> {
        self.get_raw(key).await?.map(|raw| decode(&raw)).transpose()
    }

    /// The records stored under `keys`, skipping missing ones.
    async fn mget_json<T: DeserializeOwned>(
        &self,
        keys: &[String],
    ) -> StoreResult<Vec<(String, T)>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let raws: Vec<Option<String>> = self.query(redis::cmd("MGET").arg(keys)).await?;
        raws.into_iter()
            .flatten()
            .map(|raw| {
                let value = decode(&raw)?;
                Ok((raw, value))
            })
            .collect()
    }

    /// Writes `job` if the stored JSON is still `old`; `just_finished` says
    /// the change made it terminal.
    async fn cas(
        &self,
        old: &str,
        job: &Job,
        claiming: bool,
        just_finished: bool,
    ) -> StoreResult<bool> {
        let finished_ms = job
            .finished_at
            .filter(|_| just_finished)
            .map(|at| at.timestamp_millis().to_string())
            .unwrap_or_default();
        let index = match job.state {
            JobState::Queued => "queued",
            JobState::Running => "running",
            _ => "none",
        };
        let is_deploy = job.kind == hobotnica_common::job::JobKind::Deploy;
        let lock = match (is_deploy, claiming, just_finished) {
            (true, true, _) => "acquire",
            (true, false, true) => "release",
            _ => "",
        };
        let written: i64 = self
            .cas_job
            .key(self.keys.job(job.id))
            .key(self.keys.fence(job.id))
            .key(self.keys.queue())
            .key(self.keys.running())
            .key(self.keys.finished())
            .key(self.keys.unarchived())
            .key(self.keys.deploy_lock(&job.repo))
            .arg(old)
            .arg(encode(job)?)
            .arg(job.id.0)
            .arg(fence(job))
            .arg(index)
            .arg(finished_ms)
            .arg(lock)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(written == 1)
    }

    /// Read, change, compare-and-set; retried while others change the job.
    async fn update_job<T>(
        &self,
        id: JobId,
        mut change: impl FnMut(&mut Job) -> StoreResult<T>,
    ) -> StoreResult<(Job, T)> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let raw = self
                .get_raw(&self.keys.job(id))
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
            let mut job: Job = decode(&raw)?;
            let was_terminal = job.state.is_terminal();
            let result = change(&mut job)?;
            let just_finished = !was_terminal && job.state.is_terminal();
            if self.cas(&raw, &job, false, just_finished).await? {
                return Ok((job, result));
            }
        }
        Err(StoreError::Unavailable(format!(
            "job {id} kept changing under {MAX_CAS_ATTEMPTS} attempts"
        )))
    }

    async fn jobs_by_id(&self, ids: &[u64]) -> StoreResult<Vec<(String, Job)>> {
        let keys: Vec<String> = ids.iter().map(|id| self.keys.job(JobId(*id))).collect();
        self.mget_json(&keys).await
    }

    async fn running_ids(&self) -> StoreResult<Vec<u64>> {
        let ids: Vec<u64> = self
            .query(redis::cmd("SMEMBERS").arg(self.keys.running()))
            .await?;
        Ok(ids)
    }

    async fn all_of<T: DeserializeOwned>(
        &self,
        set: &str,
        key: impl Fn(&str) -> String,
    ) -> StoreResult<Vec<T>> {
        let members: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(set)).await?;
        let keys: Vec<String> = members.iter().map(|m| key(m)).collect();
        Ok(self
            .mget_json(&keys)
            .await?
            .into_iter()
            .map(|(_, value)| value)
            .collect())
    }

    /// Appends `data` at the committed end of the log; `fence` empty means
    /// "any state" (controller lines).
    async fn append_at_end(
        &self,
        id: JobId,
        fence: &str,
        committed: Option<u64>,
        data: &[u8],
    ) -> StoreResult<i64> {
        self.append_log
            .key(self.keys.fence(id))
            .key(self.keys.log_len(id))
            .key(self.keys.log(id))
            .arg(fence)
            .arg(committed.map(|c| c.to_string()).unwrap_or_default())
            .arg(data)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// Reads from the stream part of a log (offsets past the archive).
    async fn read_stream(&self, id: JobId, offset: u64, max: usize) -> StoreResult<Bytes> {
        let key = self.keys.log(id);
        // The entry holding `offset`: the last one starting at or before it.
        let first: Vec<StreamEntry> = self
            .query(
                redis::cmd("XREVRANGE")
                    .arg(&key)
                    .arg(format!("{}-0", offset + 1))
                    .arg("-")
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        let Some((first_id, (_, first_data))) = first.into_iter().next() else {
            return Ok(Bytes::new());
        };
        let start = entry_offset(&first_id).unwrap_or(0);
        let mut out = Vec::with_capacity(max.min(1 << 20));
        let skip = usize::try_from(offset - start).unwrap_or(usize::MAX);
        if skip < first_data.len() {
            let end = first_data.len().min(skip.saturating_add(max));
            out.extend_from_slice(&first_data[skip..end]);
        }
        let mut after = first_id;
        while out.len() < max {
            let entries: Vec<StreamEntry> = self
                .query(
                    redis::cmd("XRANGE")
                        .arg(&key)
                        .arg(format!("({after}"))
                        .arg("+")
                        .arg("COUNT")
                        .arg(LOG_ENTRIES_PER_READ),
                )
                .await?;
            let done = entries.len() < LOG_ENTRIES_PER_READ;
            for (entry_id, (_, data)) in entries {
                let room = max - out.len();
                out.extend_from_slice(&data[..data.len().min(room)]);
                after = entry_id;
                if out.len() >= max {
                    break;
                }
            }
            if done {
                break;
            }
        }
        Ok(Bytes::from(out))
    }

    /// Rewrites a finished job's log as compressed segments, one segment in
    /// memory at a time, and drops its stream. `Ok(false)` when another
    /// controller is at it or the log grew meanwhile (tried again later).
    async fn archive_one(&self, id: JobId) -> StoreResult<bool> {
        let locked: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(self.keys.archive_lock(id))
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ARCHIVE_LOCK_MS),
            )
            .await?;
        if locked.is_none() {
            return Ok(false);
        }
        let total = self.log_len(id).await?;
        let new_archive = self.keys.log_archive_new(id);
        let _: i64 = self.query(redis::cmd("DEL").arg(&new_archive)).await?;
        let mut offset = 0;
        while offset < total {
            let segment = self.read_log(id, offset, ARCHIVE_SEGMENT_BYTES).await?;
            if segment.is_empty() {
                break;
            }
            offset += segment.len() as u64;
            let _: i64 = self
                .query(
                    redis::cmd("RPUSH")
                        .arg(&new_archive)
                        .arg(deflate(&segment)?),
                )
                .await?;
        }
        let done: i64 = self
            .finish_archive
            .key(self.keys.log_len(id))
            .key(self.keys.log(id))
            .key(self.keys.log_archive(id))
            .key(&new_archive)
            .key(self.keys.log_archived_len(id))
            .key(self.keys.unarchived())
            .key(self.keys.archive_lock(id))
            .arg(offset)
            .arg(id.0)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(done == 1)
    }

    /// What a key being imported has left (ms; at most 0 when it expired
    /// already), from this import batch or the keys stored; `None` for a key
    /// the snapshot does not hold.
    async fn key_remaining(
        &self,
        batch: &std::collections::HashMap<String, i64>,
        key: &str,
    ) -> StoreResult<Option<i64>> {
        if let Some(remaining) = batch.get(key) {
            return Ok(Some(*remaining));
        }
        let remaining: i64 = self
            .query(redis::cmd("PTTL").arg(self.keys.delivery(key)))
            .await?;
        Ok((remaining >= 0).then_some(remaining))
    }

    /// Deletes a finished job and everything of it.
    async fn delete_job(&self, job: &Job) -> StoreResult<()> {
        let id = job.id;
        redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(self.keys.job(id))
            .arg(self.keys.fence(id))
            .arg(self.keys.log(id))
            .arg(self.keys.log_len(id))
            .arg(self.keys.log_archive(id))
            .arg(self.keys.log_archived_len(id))
            .ignore()
            .cmd("ZREM")
            .arg(self.keys.jobs())
            .arg(id.0)
            .ignore()
            .cmd("ZREM")
            .arg(self.keys.repo_jobs(&job.repo))
            .arg(id.0)
            .ignore()
            .cmd("ZREM")
            .arg(self.keys.finished())
            .arg(id.0)
            .ignore()
            .cmd("ZREM")
            .arg(self.keys.unarchived())
            .arg(id.0)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }
}

fn deflate(data: &[u8]) -> StoreResult<Vec<u8>> {
    use std::io::Write as _;
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).map_err(unavailable)?;
    encoder.finish().map_err(unavailable)
}

fn inflate(data: &[u8]) -> StoreResult<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::with_capacity(ARCHIVE_SEGMENT_BYTES);
    flate2::read::DeflateDecoder::new(data)
        .take(ARCHIVE_SEGMENT_BYTES as u64)
        .read_to_end(&mut out)
        .map_err(|err| StoreError::Unavailable(format!("corrupt log archive: {err}")))?;
    Ok(out)
}

/// How the subscriber tells that its pub/sub connection died without
/// closing (the Redis host vanished, a NAT or proxy dropped the flow): such
/// a connection carries no traffic while idle, so nothing else would ever
/// notice, and the controller would hear no event again.
#[derive(Debug, Clone, Copy)]
struct SubscriberLiveness {
    /// How often PING is sent on the pub/sub connection.
    ping_interval: Duration,
    /// A PING unanswered for this long ends the connection.
    ping_timeout: Duration,
    /// Connecting and subscribing must be done within this (a SYN to a
    /// vanished host waits minutes for the kernel otherwise).
    subscribe_timeout: Duration,
}

/// A dead pub/sub connection is noticed at most `ping_interval +
/// ping_timeout` (15 s) after it died; the subscriber then sends `Resync`
/// and reconnects, as after a connection that closed.
const SUBSCRIBER_LIVENESS: SubscriberLiveness = SubscriberLiveness {
    ping_interval: Duration::from_secs(10),
    ping_timeout: RESPONSE_TIMEOUT,
    subscribe_timeout: CONNECT_TIMEOUT.saturating_add(RESPONSE_TIMEOUT),
};

/// Forwards the Redis event channel to the local broadcast; after a
/// reconnect it sends `Resync` (events may have been missed meanwhile).
/// A connection that stops answering PING counts as lost (see
/// [`SubscriberLiveness`]).
async fn run_subscriber(
    client: redis::Client,
    channel: String,
    events: broadcast::Sender<StoreEvent>,
    ready: tokio::sync::oneshot::Sender<()>,
    stop: CancellationToken,
    liveness: SubscriberLiveness,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let subscribed = tokio::time::timeout(liveness.subscribe_timeout, subscribed);
        match tokio::select! {
            () = stop.cancelled() => return,
            result = subscribed => result,
        } {
            Ok(Ok(pubsub)) => {
                match ready.take() {
                    Some(ready) => {
                        let _ = ready.send(());
                    }
                    None => {
                        tracing::info!("Redis event feed reconnected");
                        let _ = events.send(StoreEvent::Resync);
                    }
                }
                backoff = Duration::from_millis(100);
                let (mut sink, mut messages) = pubsub.split();
                // Pinned out here, not built in the select: its ticker must
                // survive the messages that wake the loop.
                let dead = connection_dead(&mut sink, liveness);
                tokio::pin!(dead);
                loop {
                    let message = tokio::select! {
                        () = stop.cancelled() => return,
                        () = &mut dead => break,
                        message = messages.next() => message,
                    };
                    let Some(message) = message else { break };
                    let Ok(payload) = message.get_payload::<String>() else {
                        continue;
                    };
                    match serde_json::from_str::<StoreEvent>(&payload) {
                        Ok(event) => {
                            let _ = events.send(event);
                        }
                        Err(err) => tracing::warn!(error = %err, "unreadable event"),
                    }
                }
                tracing::warn!("Redis event feed lost; reconnecting");
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot subscribe to Redis events; retrying");
            }
            Err(_) => tracing::warn!(
                timeout = ?liveness.subscribe_timeout,
                "cannot subscribe to Redis events: no answer; retrying"
            ),
        }
        let _ = events.send(StoreEvent::Resync);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Returns once the pub/sub connection stops answering PING (or fails).
async fn connection_dead(sink: &mut redis::aio::PubSubSink, liveness: SubscriberLiveness) {
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + liveness.ping_interval,
        liveness.ping_interval,
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // In subscribed mode Redis answers PING with ["pong", ""].
        match tokio::time::timeout(liveness.ping_timeout, sink.ping::<redis::Value>()).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "Redis event feed: PING failed");
                return;
            }
            Err(_) => {
                tracing::warn!(
                    timeout = ?liveness.ping_timeout,
                    "Redis event feed: no answer to PING; the connection is dead"
                );
                return;
            }
        }
    }
}

/// A stream entry id `N-0` names the log offset `N - 1`.
fn entry_offset(id: &str) -> Option<u64> {
    id.split_once('-')?.0.parse::<u64>().ok()?.checked_sub(1)
}

type StreamEntry = (String, (String, Vec<u8>));

#[async_trait]
impl Store for RedisStore {
    async fn ping(&self) -> StoreResult<()> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    async fn announce(&self, event: StoreEvent) {
        self.publish(event).await;
    }

    async fn create_repo(&self, repo: Repo) -> StoreResult<()> {
        let full_name = repo.full_name();
        let created: bool = self
            .query(
                redis::cmd("SET")
                    .arg(self.keys.repo(&full_name))
                    .arg(encode(&repo)?)
                    .arg("NX"),
            )
            .await?;
        if !created {
            return Err(StoreError::Conflict(format!(
                "repository {full_name} is already registered"
            )));
        }
        let _: i64 = self
            .query(redis::cmd("SADD").arg(self.keys.repos()).arg(&full_name))
            .await?;
        if let Some(github) = &repo.github {
            let () = self
                .query(
                    redis::cmd("SET")
                        .arg(self.keys.hook(&github.hook_id))
                        .arg(&full_name),
                )
                .await?;
        }
        Ok(())
    }

    async fn update_repo(&self, old: &Repo, new: Repo) -> StoreResult<bool> {
        let full_name = new.full_name();
        // Records are written only by `encode`, which is deterministic: the
        // stored text of `old` is its encoding.
        let old_hook = old.github.as_ref().map(|github| github.hook_id.as_str());
        let new_hook = new.github.as_ref().map(|github| github.hook_id.as_str());
        let drop_old = old_hook.is_some() && old_hook != new_hook;
        let written: i64 = self
            .cas_repo
            .key(self.keys.repo(&full_name))
            .key(self.keys.hook(old_hook.unwrap_or_default()))
            .key(self.keys.hook(new_hook.unwrap_or_default()))
            .arg(encode(old)?)
            .arg(encode(&new)?)
            .arg(&full_name)
            .arg(if drop_old { "drop" } else { "" })
            .arg(if new_hook.is_some() { "set" } else { "" })
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        match written {
            -1 => Err(StoreError::NotFound(format!("repository {full_name}"))),
            written => Ok(written == 1),
        }
    }

    async fn find_repo_by_hook(&self, hook_id: &str) -> StoreResult<Option<Repo>> {
        let Some(full_name) = self.get_raw(&self.keys.hook(hook_id)).await? else {
            return Ok(None);
        };
        // The index entry may be older than the record (a repository
        // deleted or changed meanwhile): the record decides.
        let repo: Option<Repo> = self.get_json(&self.keys.repo(&full_name)).await?;
        Ok(repo.filter(|repo| {
            repo.github
                .as_ref()
                .is_some_and(|github| github.hook_id == hook_id)
        }))
    }

    async fn create_session(&self, id_hash: &str, session: SessionRecord) -> StoreResult<()> {
        let millis = (session.expires_at - session.created_at)
            .num_milliseconds()
            .max(1);
        let () = self
            .query(
                redis::cmd("SET")
                    .arg(self.keys.session(id_hash))
                    .arg(encode(&session)?)
                    .arg("PX")
                    .arg(millis),
            )
            .await?;
        Ok(())
    }

    async fn get_session(
        &self,
        id_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<SessionRecord>> {
        let session: Option<SessionRecord> = self.get_json(&self.keys.session(id_hash)).await?;
        Ok(session.filter(|session| session.expires_at > now))
    }

    async fn delete_session(&self, id_hash: &str) -> StoreResult<()> {
        let _: i64 = self
            .query(redis::cmd("DEL").arg(self.keys.session(id_hash)))
            .await?;
        Ok(())
    }

    async fn key_job(&self, key: &str) -> StoreResult<Option<JobId>> {
        let id: Option<u64> = self
            .query(redis::cmd("GET").arg(self.keys.key_job(key)))
            .await?;
        Ok(id.map(JobId))
    }

    async fn get_repo(&self, owner: &str, name: &str) -> StoreResult<Option<Repo>> {
        self.get_json(&self.keys.repo(&format!("{owner}/{name}")))
            .await
    }

    async fn list_repos(&self) -> StoreResult<Vec<Repo>> {
        self.all_of(&self.keys.repos(), |name| self.keys.repo(name))
            .await
    }

    async fn delete_repo(&self, owner: &str, name: &str) -> StoreResult<()> {
        let full_name = format!("{owner}/{name}");
        if let Some(Repo {
            github: Some(github),
            ..
        }) = self.get_json::<Repo>(&self.keys.repo(&full_name)).await?
        {
            let _: i64 = self
                .query(redis::cmd("DEL").arg(self.keys.hook(&github.hook_id)))
                .await?;
        }
        let (deleted, _): (i64, i64) = redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(self.keys.repo(&full_name))
            .cmd("SREM")
            .arg(self.keys.repos())
            .arg(&full_name)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if deleted == 0 {
            return Err(StoreError::NotFound(format!("repository {full_name}")));
        }
        Ok(())
    }

    async fn create_job(&self, new: NewJob, now: DateTime<Utc>) -> StoreResult<Job> {
        let id: u64 = self
            .query(redis::cmd("INCR").arg(self.keys.next_job_id()))
            .await?;
        let job = transitions::new_job(JobId(id), new, now);
        let () = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.keys.job(job.id))
            .arg(encode(&job)?)
            .ignore()
            .cmd("SET")
            .arg(self.keys.fence(job.id))
            .arg(fence(&job))
            .ignore()
            .cmd("ZADD")
            .arg(self.keys.jobs())
            .arg(id)
            .arg(id)
            .ignore()
            .cmd("ZADD")
            .arg(self.keys.repo_jobs(&job.repo))
            .arg(id)
            .arg(id)
            .ignore()
            .cmd("ZADD")
            .arg(self.keys.queue())
            .arg(id)
            .arg(id)
            .ignore()
            .cmd("SADD")
            .arg(self.keys.repos_with_jobs())
            .arg(job.repo.to_string())
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        self.publish(StoreEvent::JobQueued { job: job.id }).await;
        Ok(job)
    }

    async fn create_job_once(
        &self,
        key: &str,
        names: &[String],
        new: NewJob,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        // The id is taken first (the script writes the JSON that holds it):
        // a repeated key leaves a gap in the ids, as a failed write does.
        let id: u64 = self
            .query(redis::cmd("INCR").arg(self.keys.next_job_id()))
            .await?;
        let job = transitions::new_job(JobId(id), new, now);
        let mut script = self.create_job_once.prepare_invoke();
        script
            .key(self.keys.delivery(key))
            .key(self.keys.job(job.id))
            .key(self.keys.fence(job.id))
            .key(self.keys.jobs())
            .key(self.keys.repo_jobs(&job.repo))
            .key(self.keys.queue())
            .key(self.keys.repos_with_jobs());
        for name in names {
            script.key(self.keys.key_job(name));
        }
        let created: i64 = script
            .arg(super::DELIVERY_RETENTION.as_secs())
            .arg(encode(&job)?)
            .arg(fence(&job))
            .arg(id)
            .arg(job.repo.to_string())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if created != 1 {
            return Ok(None);
        }
        self.publish(StoreEvent::JobQueued { job: job.id }).await;
        Ok(Some(job))
    }

    async fn queue_stats(&self) -> StoreResult<QueueStats> {
        // One round trip for the indexes (consistent with each other), one
        // more for the first queued job when there is one.
        let (queued, running, first): (u64, u64, Vec<u64>) = redis::pipe()
            .atomic()
            .cmd("ZCARD")
            .arg(self.keys.queue())
            .cmd("SCARD")
            .arg(self.keys.running())
            .cmd("ZRANGE")
            .arg(self.keys.queue())
            .arg(0)
            .arg(0)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let oldest_queued_at = match first.first() {
            // Claimed or cancelled since: the queue moved on, and so
            // does the next look.
            Some(id) => self.get_job(JobId(*id)).await?.map(|job| job.created_at),
            None => None,
        };
        Ok(QueueStats {
            queued,
            running,
            oldest_queued_at,
        })
    }

    async fn get_job(&self, id: JobId) -> StoreResult<Option<Job>> {
        self.get_json(&self.keys.job(id)).await
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<Job>> {
        // Small indexes answer state filters directly.
        if matches!(filter.state, Some(JobState::Running | JobState::Queued)) {
            let ids: Vec<u64> = if filter.state == Some(JobState::Running) {
                self.running_ids().await?
            } else {
                self.query(redis::cmd("ZRANGE").arg(self.keys.queue()).arg(0).arg(-1))
                    .await?
            };
            let mut jobs: Vec<Job> = self
                .jobs_by_id(&ids)
                .await?
                .into_iter()
                .map(|(_, job)| job)
                .filter(|job| filter.matches(job))
                .collect();
            jobs.sort_by_key(|job| std::cmp::Reverse(job.id));
            jobs.truncate(filter.limit);
            return Ok(jobs);
        }
        let index = match &filter.repo {
            Some(repo) => self.keys.repo_jobs(repo),
            None => self.keys.jobs(),
        };
        let mut upper = filter
            .before
            .map_or_else(|| "+inf".to_owned(), |id| format!("({}", id.0));
        let mut out = Vec::new();
        loop {
            let ids: Vec<u64> = self
                .query(
                    redis::cmd("ZREVRANGEBYSCORE")
                        .arg(&index)
                        .arg(&upper)
                        .arg("-inf")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(LIST_BATCH),
                )
                .await?;
            let Some(last) = ids.last() else { break };
            upper = format!("({last}");
            for (_, job) in self.jobs_by_id(&ids).await? {
                if filter.matches(&job) {
                    out.push(job);
                    if out.len() >= filter.limit {
                        return Ok(out);
                    }
                }
            }
            if ids.len() < LIST_BATCH {
                break;
            }
        }
        Ok(out)
    }

    async fn claim_job(
        &self,
        agent: &AgentRecord,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let ids: Vec<u64> = self
                .query(
                    redis::cmd("ZRANGE")
                        .arg(self.keys.queue())
                        .arg(0)
                        .arg(CLAIM_SCAN - 1),
                )
                .await?;
            let queued: Vec<(String, Job)> = self
                .jobs_by_id(&ids)
                .await?
                .into_iter()
                .filter(|(_, job)| transitions::may_claim(job, agent))
                .collect();
            // Which repositories' deploys run, for the queued deploys.
            let lock_keys: Vec<String> = queued
                .iter()
                .filter(|(_, job)| job.kind == JobKind::Deploy)
                .map(|(_, job)| self.keys.deploy_lock(&job.repo))
                .collect();
            let holders: Vec<Option<String>> = if lock_keys.is_empty() {
                Vec::new()
            } else {
                self.query(redis::cmd("MGET").arg(&lock_keys)).await?
            };
            let locked: std::collections::HashSet<&String> = lock_keys
                .iter()
                .zip(&holders)
                .filter(|(_, holder)| holder.is_some())
                .map(|(key, _)| key)
                .collect();
            let candidate = queued.into_iter().find(|(_, job)| {
                transitions::claimable(job, agent, |repo| {
                    locked.contains(&self.keys.deploy_lock(repo))
                })
            });
            let Some((raw, mut job)) = candidate else {
                return Ok(None);
            };
            transitions::claim(&mut job, agent, now, lease_until)?;
            if self.cas(&raw, &job, true, false).await? {
                self.publish(StoreEvent::JobStarted { job: job.id }).await;
                return Ok(Some(job));
            }
            // Another agent took it first: look again.
        }
        Ok(None)
    }

    async fn renew_lease(
        &self,
        id: JobId,
        attempt: u32,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Job> {
        let (job, ()) = self
            .update_job(id, |job| transitions::renew(job, attempt, lease_until))
            .await?;
        Ok(job)
    }

    async fn request_cancel(&self, id: JobId, now: DateTime<Utc>) -> StoreResult<Job> {
        let (job, ()) = self
            .update_job(id, |job| transitions::request_cancel(job, now))
            .await?;
        self.publish(transitions::cancel_event(&job)).await;
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
            .update_job(id, |job| {
                transitions::finish(job, attempt, finish.clone(), now)
            })
            .await?;
        if changed {
            self.publish(StoreEvent::JobFinished { job: id }).await;
        }
        Ok(Finished {
            job,
            first: changed,
        })
    }

    async fn expire_leases(&self, now: DateTime<Utc>) -> StoreResult<Vec<Job>> {
        let ids = self.running_ids().await?;
        let mut lost = Vec::new();
        for (_, job) in self.jobs_by_id(&ids).await? {
            if job.lease_expires_at.is_none_or(|until| until >= now) {
                continue;
            }
            // Several controllers may race here; one wins the transition.
            let (job, expired) = self
                .update_job(job.id, |job| Ok(transitions::expire(job, now)))
                .await?;
            if expired {
                self.publish(StoreEvent::JobFinished { job: job.id }).await;
                lost.push(job);
            }
        }
        Ok(lost)
    }

    async fn extend_leases(&self, until: DateTime<Utc>) -> StoreResult<()> {
        for id in self.running_ids().await? {
            self.update_job(JobId(id), |job| Ok(transitions::extend(job, until)))
                .await?;
        }
        Ok(())
    }

    async fn append_log(
        &self,
        id: JobId,
        attempt: u32,
        offset: u64,
        data: Bytes,
    ) -> StoreResult<u64> {
        let expected_fence = format!("{}:{attempt}", JobState::Running);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (current_fence, committed): (Option<String>, Option<u64>) = self
                .query(
                    redis::cmd("MGET")
                        .arg(self.keys.fence(id))
                        .arg(self.keys.log_len(id)),
                )
                .await?;
            if current_fence.as_deref() != Some(expected_fence.as_str()) {
                if current_fence.is_none() {
                    return Err(StoreError::NotFound(format!("job {id}")));
                }
                return Err(StoreError::LeaseLost { job: id, attempt });
            }
            let committed = committed.unwrap_or(0);
            let skip = match plan_append(committed, offset, data.len()) {
                AppendPlan::Duplicate => return Ok(committed),
                AppendPlan::Gap => return Err(StoreError::LogGap { committed }),
                AppendPlan::Append { skip } => skip,
            };
            match self
                .append_at_end(id, &expected_fence, Some(committed), &data[skip..])
                .await?
            {
                -1 => return Err(StoreError::LeaseLost { job: id, attempt }),
                -2 => continue, // appended meanwhile: plan again
                len => {
                    let len = u64::try_from(len).unwrap_or(0);
                    self.publish(StoreEvent::LogAppended { job: id, len }).await;
                    return Ok(len);
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "the log of job {id} kept changing"
        )))
    }

    async fn append_controller_line(&self, id: JobId, line: &str) -> StoreResult<u64> {
        let line = format!("[hobotnica] {line}\n");
        let len = self.append_at_end(id, "", None, line.as_bytes()).await?;
        let len = u64::try_from(len).unwrap_or(0);
        self.publish(StoreEvent::LogAppended { job: id, len }).await;
        Ok(len)
    }

    async fn read_log(&self, id: JobId, offset: u64, max: usize) -> StoreResult<Bytes> {
        let archived: Option<u64> = self
            .query(redis::cmd("GET").arg(self.keys.log_archived_len(id)))
            .await?;
        let archived = archived.unwrap_or(0);
        if offset >= archived {
            return self.read_stream(id, offset, max).await;
        }
        let mut out = Vec::with_capacity(max.min(ARCHIVE_SEGMENT_BYTES));
        let mut position = offset;
        while out.len() < max && position < archived {
            let index = position / ARCHIVE_SEGMENT_BYTES as u64;
            let compressed: Option<Vec<u8>> = self
                .query(
                    redis::cmd("LINDEX")
                        .arg(self.keys.log_archive(id))
                        .arg(index),
                )
                .await?;
            let Some(compressed) = compressed else { break };
            let segment = inflate(&compressed)?;
            let from = usize::try_from(position - index * ARCHIVE_SEGMENT_BYTES as u64)
                .unwrap_or(usize::MAX);
            if from >= segment.len() {
                break;
            }
            let take = (segment.len() - from).min(max - out.len());
            out.extend_from_slice(&segment[from..from + take]);
            position += take as u64;
        }
        if out.len() < max && position >= archived {
            out.extend_from_slice(&self.read_stream(id, position, max - out.len()).await?);
        }
        Ok(Bytes::from(out))
    }

    async fn log_len(&self, id: JobId) -> StoreResult<u64> {
        let len: Option<u64> = self
            .query(redis::cmd("GET").arg(self.keys.log_len(id)))
            .await?;
        Ok(len.unwrap_or(0))
    }

    async fn register_agent(&self, agent: AgentRecord) -> StoreResult<AgentRecord> {
        let name_key = self.keys.agent_name(&agent.name);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let owner: Option<String> = self.get_raw(&name_key).await?;
            let previous_raw = match &owner {
                Some(id) => self.get_raw(&self.keys.agent(&AgentId(id.clone()))).await?,
                None => None,
            };
            let previous: Option<AgentRecord> = previous_raw.as_deref().map(decode).transpose()?;
            let record = transitions::register_agent(previous.as_ref(), agent.clone())?;
            let written: i64 = self
                .register_agent
                .key(&name_key)
                .key(self.keys.agent(&record.id))
                .key(self.keys.agents())
                .arg(owner.unwrap_or_default())
                .arg(previous_raw.unwrap_or_default())
                .arg(encode(&record)?)
                .arg(&record.id.0)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?;
            if written == 1 {
                return Ok(record);
            }
            // Registered or touched meanwhile: read again.
        }
        Err(StoreError::Conflict(format!(
            "agent {} kept changing; retry",
            agent.name
        )))
    }

    async fn get_agent(&self, id: &AgentId) -> StoreResult<Option<AgentRecord>> {
        self.get_json(&self.keys.agent(id)).await
    }

    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        self.all_of(&self.keys.agents(), |id| {
            self.keys.agent(&AgentId(id.to_owned()))
        })
        .await
    }

    async fn touch_agent(
        &self,
        id: &AgentId,
        now: DateTime<Utc>,
        controller: &str,
    ) -> StoreResult<()> {
        let mut agent: AgentRecord = self
            .get_json(&self.keys.agent(id))
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("agent {id}")))?;
        agent.last_seen = now;
        agent.controller = Some(controller.to_owned());
        // XX: an agent forgotten meanwhile (its token revoked) stays gone.
        let _: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(self.keys.agent(id))
                    .arg(encode(&agent)?)
                    .arg("XX"),
            )
            .await?;
        Ok(())
    }

    async fn create_agent_token(&self, token: AgentTokenRecord) -> StoreResult<()> {
        let () = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.keys.agent_token(&token.id))
            .arg(encode(&token)?)
            .ignore()
            .cmd("HSET")
            .arg(self.keys.agent_tokens())
            .arg(&token.token_hash)
            .arg(&token.id)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn list_agent_tokens(&self) -> StoreResult<Vec<AgentTokenRecord>> {
        let ids: Vec<String> = self
            .query(redis::cmd("HVALS").arg(self.keys.agent_tokens()))
            .await?;
        let keys: Vec<String> = ids.iter().map(|id| self.keys.agent_token(id)).collect();
        let mut tokens: Vec<AgentTokenRecord> = self
            .mget_json(&keys)
            .await?
            .into_iter()
            .map(|(_, token)| token)
            .collect();
        tokens.sort_by_key(|token| token.created_at);
        Ok(tokens)
    }

    async fn find_agent_token(&self, token_hash: &str) -> StoreResult<Option<AgentTokenRecord>> {
        // Looked up by hash: the hash of a guess reveals nothing about others.
        let id: Option<String> = self
            .query(
                redis::cmd("HGET")
                    .arg(self.keys.agent_tokens())
                    .arg(token_hash),
            )
            .await?;
        match id {
            Some(id) => self.get_json(&self.keys.agent_token(&id)).await,
            None => Ok(None),
        }
    }

    async fn delete_agent_token(&self, id: &str) -> StoreResult<()> {
        let token: AgentTokenRecord = self
            .get_json(&self.keys.agent_token(id))
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("agent token {id}")))?;
        let agents: Vec<AgentRecord> = self
            .list_agents()
            .await?
            .into_iter()
            .filter(|agent| agent.token_id == id)
            .collect();
        let mut revoke = self.revoke_token.prepare_invoke();
        revoke
            .key(self.keys.agent_token(id))
            .key(self.keys.agent_tokens())
            .key(self.keys.agents())
            .arg(&token.token_hash);
        for agent in &agents {
            revoke
                .key(self.keys.agent(&agent.id))
                .key(self.keys.agent_name(&agent.name))
                .arg(&agent.id.0);
        }
        let _: i64 = revoke
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        self.publish(StoreEvent::AgentTokenRevoked {
            token_id: id.to_owned(),
        })
        .await;
        Ok(())
    }

    async fn queue_notifications(&self, deliveries: Vec<NotificationDelivery>) -> StoreResult<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for delivery in &deliveries {
            pipe.cmd("SET")
                .arg(self.keys.notification(&delivery.id))
                .arg(encode(delivery)?)
                .ignore()
                .cmd("HSET")
                .arg(self.keys.notification_attempts())
                .arg(&delivery.id)
                .arg(delivery.attempt)
                .ignore()
                .cmd("ZADD")
                .arg(self.keys.notifications_due())
                .arg(delivery.due_at.timestamp_millis())
                .arg(&delivery.id)
                .ignore();
        }
        let () = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn claim_notification(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<NotificationDelivery>> {
        let claimed: Option<(String, u32, String)> = self
            .claim_notification
            .key(self.keys.notifications_due())
            .key(self.keys.notification_attempts())
            .arg(now.timestamp_millis())
            .arg(lease_until.timestamp_millis())
            .arg(self.keys.notification(""))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let Some((_, attempt, record)) = claimed else {
            return Ok(None);
        };
        let mut delivery: NotificationDelivery = decode(&record)?;
        delivery.attempt = attempt;
        delivery.due_at = lease_until;
        Ok(Some(delivery))
    }

    async fn retry_notification(
        &self,
        id: &str,
        attempt: u32,
        due_at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let changed: i64 = self
            .retry_notification
            .key(self.keys.notifications_due())
            .key(self.keys.notification_attempts())
            .arg(id)
            .arg(attempt)
            .arg(due_at.timestamp_millis())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(changed == 1)
    }

    async fn finish_notification(&self, id: &str, attempt: u32) -> StoreResult<bool> {
        let changed: i64 = self
            .finish_notification
            .key(self.keys.notifications_due())
            .key(self.keys.notification_attempts())
            .key(self.keys.notification(id))
            .arg(id)
            .arg(attempt)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(changed == 1)
    }

    async fn archive_logs(&self, finished_before: DateTime<Utc>) -> StoreResult<usize> {
        let ids: Vec<u64> = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.keys.unarchived())
                    .arg("-inf")
                    .arg(finished_before.timestamp_millis())
                    .arg("LIMIT")
                    .arg(0)
                    .arg(MAINTENANCE_BATCH),
            )
            .await?;
        let mut archived = 0;
        for id in ids {
            if self.archive_one(JobId(id)).await? {
                archived += 1;
            }
        }
        Ok(archived)
    }

    async fn prune(&self, policy: &Retention, now: DateTime<Utc>) -> StoreResult<usize> {
        let cutoff =
            now - chrono::Duration::from_std(policy.max_age).unwrap_or(chrono::Duration::MAX);
        let mut victims: Vec<u64> = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.keys.finished())
                    .arg("-inf")
                    .arg(format!("({}", cutoff.timestamp_millis()))
                    .arg("LIMIT")
                    .arg(0)
                    .arg(MAINTENANCE_BATCH),
            )
            .await?;
        let repos: Vec<String> = self
            .query(redis::cmd("SMEMBERS").arg(self.keys.repos_with_jobs()))
            .await?;
        for repo in repos {
            let index = self.keys.repo_jobs(&repo);
            let count: usize = self.query(redis::cmd("ZCARD").arg(&index)).await?;
            if count > policy.max_jobs_per_repo {
                let excess = (count - policy.max_jobs_per_repo).min(MAINTENANCE_BATCH);
                let oldest: Vec<u64> = self
                    .query(redis::cmd("ZRANGE").arg(&index).arg(0).arg(excess - 1))
                    .await?;
                victims.extend(oldest);
            }
        }
        victims.sort_unstable();
        victims.dedup();
        let mut deleted = 0;
        for (_, job) in self.jobs_by_id(&victims).await? {
            // Only finished jobs go; a queued or running one is kept.
            if job.state.is_terminal() {
                self.delete_job(&job).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    async fn export(&self, sink: mpsc::Sender<snapshot::Record>) -> StoreResult<()> {
        use snapshot::Record;
        let (repos, jobs, agents, tokens, keys, names, sessions, notifications, last_id, time): ExportState =
            redis::cmd("EVAL")
                .arg(EXPORT_STATE)
                .arg(0)
                .arg(&self.keys.prefix)
                .arg(glob_escape(&self.keys.prefix))
                .query_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?;
        let now = time
            .0
            .parse::<i64>()
            .ok()
            .and_then(|secs| {
                DateTime::from_timestamp(secs, time.1.parse::<u32>().unwrap_or(0) * 1000)
            })
            .unwrap_or_else(Utc::now);
        // A receiver that went away ends the export early, without error.
        macro_rules! send {
            ($record:expr) => {
                if sink.send($record).await.is_err() {
                    return Ok(());
                }
            };
        }
        for raw in &repos {
            send!(Record::Repo { repo: decode(raw)? });
        }
        for pair in jobs.chunks_exact(2) {
            let job: Job = decode(&pair[0])?;
            let id = job.id;
            // The log up to the length seen with the job; it is read after
            // (archived logs through their segments, as any reader does).
            let length: u64 = pair[1].parse().unwrap_or(0);
            send!(Record::Job { job });
            let mut offset = 0;
            while offset < length {
                let max = usize::try_from(length - offset)
                    .unwrap_or(usize::MAX)
                    .min(snapshot::LOG_PIECE);
                let data = self.read_log(id, offset, max).await?;
                if data.is_empty() {
                    break;
                }
                let read = data.len() as u64;
                send!(Record::Log {
                    job: id,
                    offset,
                    data
                });
                offset += read;
            }
        }
        for raw in &agents {
            send!(Record::Agent {
                agent: decode(raw)?
            });
        }
        for raw in &tokens {
            send!(Record::AgentToken {
                token: decode(raw)?
            });
        }
        let retention =
            chrono::Duration::from_std(super::DELIVERY_RETENTION).unwrap_or(chrono::Duration::MAX);
        for pair in keys.chunks_exact(2) {
            let remaining: i64 = pair[1].parse().unwrap_or(-1);
            // Kept for the retention from when it arrived.
            let at = if remaining < 0 {
                now
            } else {
                now - (retention - chrono::Duration::milliseconds(remaining))
            };
            send!(Record::Key {
                key: pair[0].clone(),
                at
            });
        }
        for pair in names.chunks_exact(2) {
            let Ok(job) = pair[1].parse::<u64>() else {
                continue;
            };
            send!(Record::KeyJob {
                name: pair[0].clone(),
                job: JobId(job)
            });
        }
        for pair in sessions.chunks_exact(2) {
            send!(Record::Session {
                id_hash: pair[0].clone(),
                session: decode(&pair[1])?
            });
        }
        for triple in notifications.chunks_exact(3) {
            let mut delivery: NotificationDelivery = decode(&triple[0])?;
            delivery.attempt = triple[1].parse().unwrap_or(delivery.attempt);
            if let Some(due) = triple[2]
                .parse::<f64>()
                .ok()
                .and_then(|ms| DateTime::from_timestamp_millis(ms as i64))
            {
                delivery.due_at = due;
            }
            send!(Record::Notification { delivery });
        }
        let last: u64 = last_id.parse().unwrap_or(0);
        send!(Record::NextJobId { next: last + 1 });
        Ok(())
    }

    async fn is_empty(&self) -> StoreResult<bool> {
        let pattern = format!("{}*", glob_escape(&self.keys.prefix));
        let mut cursor: u64 = 0;
        loop {
            let (next, found): (u64, Vec<String>) = self
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000),
                )
                .await?;
            if !found.is_empty() {
                return Ok(false);
            }
            if next == 0 {
                return Ok(true);
            }
            cursor = next;
        }
    }

    async fn import(&self, batch: Vec<snapshot::Record>) -> StoreResult<()> {
        use snapshot::Record;
        let now = Utc::now();
        let retention_ms = i64::try_from(super::DELIVERY_RETENTION.as_millis()).unwrap_or(i64::MAX);
        let keys = &self.keys;
        // What the keys of this batch will have left (ms), for their names.
        let mut batch_keys: std::collections::HashMap<String, i64> =
            std::collections::HashMap::new();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for record in batch {
            match record {
                Record::Repo { repo } => {
                    let full_name = repo.full_name();
                    pipe.cmd("SET")
                        .arg(keys.repo(&full_name))
                        .arg(encode(&repo)?)
                        .ignore()
                        .cmd("SADD")
                        .arg(keys.repos())
                        .arg(&full_name)
                        .ignore();
                    if let Some(github) = &repo.github {
                        pipe.cmd("SET")
                            .arg(keys.hook(&github.hook_id))
                            .arg(&full_name)
                            .ignore();
                    }
                }
                Record::Job { job } => {
                    let id = job.id.0;
                    pipe.cmd("SET")
                        .arg(keys.job(job.id))
                        .arg(encode(&job)?)
                        .ignore()
                        .cmd("SET")
                        .arg(keys.fence(job.id))
                        .arg(fence(&job))
                        .ignore()
                        .cmd("ZADD")
                        .arg(keys.jobs())
                        .arg(id)
                        .arg(id)
                        .ignore()
                        .cmd("ZADD")
                        .arg(keys.repo_jobs(&job.repo))
                        .arg(id)
                        .arg(id)
                        .ignore()
                        .cmd("SADD")
                        .arg(keys.repos_with_jobs())
                        .arg(job.repo.to_string())
                        .ignore()
                        .cmd("EVAL")
                        .arg(RAISE_TO)
                        .arg(1)
                        .arg(keys.next_job_id())
                        .arg(id)
                        .ignore();
                    match job.state {
                        JobState::Queued => {
                            pipe.cmd("ZADD").arg(keys.queue()).arg(id).arg(id).ignore();
                        }
                        JobState::Running => {
                            pipe.cmd("SADD").arg(keys.running()).arg(id).ignore();
                            if job.kind == JobKind::Deploy {
                                pipe.cmd("SET")
                                    .arg(keys.deploy_lock(&job.repo))
                                    .arg(id)
                                    .ignore();
                            }
                        }
                        _ => {}
                    }
                    if let (true, Some(finished)) = (job.state.is_terminal(), job.finished_at) {
                        let ms = finished.timestamp_millis();
                        pipe.cmd("ZADD")
                            .arg(keys.finished())
                            .arg(ms)
                            .arg(id)
                            .ignore()
                            .cmd("ZADD")
                            .arg(keys.unarchived())
                            .arg(ms)
                            .arg(id)
                            .ignore();
                    }
                }
                Record::Log { job, offset, data } => {
                    if data.is_empty() {
                        continue;
                    }
                    // The stream's entry ids name the offsets (`N-0` is
                    // offset N - 1); a piece that does not continue the
                    // log is refused, writing nothing.
                    pipe.cmd("EVAL")
                        .arg(IMPORT_LOG)
                        .arg(2)
                        .arg(keys.log_len(job))
                        .arg(keys.log(job))
                        .arg(offset)
                        .arg(data.as_ref())
                        .ignore();
                }
                Record::Agent { agent } => {
                    pipe.cmd("SET")
                        .arg(keys.agent(&agent.id))
                        .arg(encode(&agent)?)
                        .ignore()
                        .cmd("SADD")
                        .arg(keys.agents())
                        .arg(&agent.id.0)
                        .ignore()
                        .cmd("SET")
                        .arg(keys.agent_name(&agent.name))
                        .arg(&agent.id.0)
                        .ignore();
                }
                Record::AgentToken { token } => {
                    pipe.cmd("SET")
                        .arg(keys.agent_token(&token.id))
                        .arg(encode(&token)?)
                        .ignore()
                        .cmd("HSET")
                        .arg(keys.agent_tokens())
                        .arg(&token.token_hash)
                        .arg(&token.id)
                        .ignore();
                }
                Record::Key { key, at } => {
                    let remaining = retention_ms - (now - at).num_milliseconds();
                    batch_keys.insert(key.clone(), remaining);
                    if remaining > 0 {
                        pipe.cmd("SET")
                            .arg(keys.delivery(&key))
                            .arg(1)
                            .arg("PX")
                            .arg(remaining)
                            .ignore();
                    }
                }
                Record::KeyJob { name, job } => {
                    // Kept as long as its key is remembered (the key, or
                    // the part before '#' of a request's fingerprint).
                    let mut remaining = self.key_remaining(&batch_keys, &name).await?;
                    if remaining.is_none()
                        && let Some((base, _)) = name.rsplit_once('#')
                    {
                        remaining = self.key_remaining(&batch_keys, base).await?;
                    }
                    // A name whose key is forgotten already goes with it; one
                    // without a key is kept for the retention.
                    let remaining = remaining.unwrap_or(retention_ms);
                    if remaining <= 0 {
                        continue;
                    }
                    pipe.cmd("SET")
                        .arg(keys.key_job(&name))
                        .arg(job.0)
                        .arg("PX")
                        .arg(remaining.max(1))
                        .ignore();
                }
                Record::Session { id_hash, session } => {
                    let remaining = (session.expires_at - now).num_milliseconds();
                    if remaining > 0 {
                        pipe.cmd("SET")
                            .arg(keys.session(&id_hash))
                            .arg(encode(&session)?)
                            .arg("PX")
                            .arg(remaining)
                            .ignore();
                    }
                }
                Record::Notification { delivery } => {
                    pipe.cmd("SET")
                        .arg(keys.notification(&delivery.id))
                        .arg(encode(&delivery)?)
                        .ignore()
                        .cmd("HSET")
                        .arg(keys.notification_attempts())
                        .arg(&delivery.id)
                        .arg(delivery.attempt)
                        .ignore()
                        .cmd("ZADD")
                        .arg(keys.notifications_due())
                        .arg(delivery.due_at.timestamp_millis())
                        .arg(&delivery.id)
                        .ignore();
                }
                Record::NextJobId { next } => {
                    // Redis keeps the last id given.
                    pipe.cmd("EVAL")
                        .arg(RAISE_TO)
                        .arg(1)
                        .arg(keys.next_job_id())
                        .arg(next.saturating_sub(1))
                        .ignore();
                }
                Record::ImportStarted => {
                    pipe.cmd("SET")
                        .arg(keys.import_unfinished())
                        .arg(1)
                        .ignore();
                }
                Record::ImportFinished => {
                    pipe.cmd("DEL").arg(keys.import_unfinished()).ignore();
                }
            }
        }
        let () = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn import_unfinished(&self) -> StoreResult<bool> {
        let exists: i64 = self
            .query(redis::cmd("EXISTS").arg(self.keys.import_unfinished()))
            .await?;
        Ok(exists == 1)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;
    use tokio::task::JoinSet;

    use super::*;
    use crate::store::conformance::RedisServer;

    /// Longer than anything here takes unless it hangs.
    const DEADLINE: Duration = Duration::from_secs(20);
    /// Scheduling slack on a busy machine, on top of a bound under test.
    const SLACK: Duration = Duration::from_secs(5);

    /// A TCP forwarder to Redis whose paths can die without closing: it
    /// then forwards nothing and keeps the sockets open, as a Redis host
    /// that vanished (or a proxy that went silent) looks from here.
    /// `set_silent(true)` kills every path, present and future (a
    /// connection made while silent is accepted and never answered);
    /// `cut_existing` kills only the paths open now, and new connections
    /// are forwarded (a path that died while a new one works).
    struct Forwarder {
        addr: SocketAddr,
        state: watch::Sender<PathState>,
        task: tokio::task::JoinHandle<()>,
    }

    #[derive(Debug, Clone, Copy, Default)]
    struct PathState {
        silent: bool,
        /// Bumped by `cut_existing`: a path opened before the bump is dead.
        cuts: u64,
    }

    impl Forwarder {
        async fn start(upstream: SocketAddr) -> Forwarder {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (state, watching) = watch::channel(PathState::default());
            let task = tokio::spawn(async move {
                let mut connections = JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    connections.spawn(forward(client, upstream, watching.clone()));
                }
            });
            Forwarder { addr, state, task }
        }

        fn set_silent(&self, silent: bool) {
            self.state.send_modify(|state| state.silent = silent);
        }

        fn cut_existing(&self) {
            self.state.send_modify(|state| state.cuts += 1);
        }
    }

    impl Drop for Forwarder {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn forward(
        client: TcpStream,
        upstream: SocketAddr,
        mut state: watch::Receiver<PathState>,
    ) {
        let opened = *state.borrow_and_update();
        if opened.silent {
            return hold(client, None).await;
        }
        let Ok(mut server) = TcpStream::connect(upstream).await else {
            return;
        };
        let mut client = client;
        let dies = |now: &PathState| now.silent || now.cuts != opened.cuts;
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
            _ = async { state.wait_for(dies).await.map(|_| ()) } => {
                hold(client, Some(server)).await;
            }
        }
    }

    /// Keeps the sockets open and moves nothing, for good.
    async fn hold(_client: TcpStream, _server: Option<TcpStream>) {
        std::future::pending::<()>().await;
    }

    fn redis_addr(server: &RedisServer) -> SocketAddr {
        server
            .url
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .parse()
            .unwrap()
    }

    /// Every connection the client opens (commands, pub/sub; plain or TLS)
    /// gets keepalive and `TCP_USER_TIMEOUT`: the redis runtime applies a
    /// client's settings to each socket it connects.
    #[test]
    fn connections_get_keepalive_and_a_user_timeout() {
        for url in ["redis://127.0.0.1:6379/", "rediss://redis.example:6380/"] {
            let client = client(url, None).unwrap();
            let settings = client.get_connection_info().tcp_settings();
            assert!(settings.keepalive().is_some(), "{url}: no keepalive");
            assert_eq!(settings.user_timeout(), Some(TCP_USER_TIMEOUT), "{url}");
        }
    }

    /// The path to Redis of the main connection dies without closing (the
    /// Redis host vanished and came back elsewhere, a proxy went silent),
    /// while a new connection would work. Before the fix every command
    /// timed out until the kernel gave up on the socket (~15 minutes) and
    /// the API answered 503 all along; now the connection is replaced after
    /// the first command that nothing answered, and commands succeed again
    /// within `response timeout + CONNECT_TIMEOUT`.
    #[tokio::test]
    async fn a_silently_dead_main_connection_is_replaced() {
        let server = RedisServer::start();
        let forwarder = Forwarder::start(redis_addr(&server)).await;
        let response_timeout = Duration::from_millis(500);
        let store = RedisStore::connect_with(
            &format!("redis://{}/", forwarder.addr),
            "test:",
            None,
            response_timeout,
            SUBSCRIBER_LIVENESS,
        )
        .await
        .unwrap();
        store
            .ping()
            .await
            .expect("Redis answers through the forwarder");

        forwarder.cut_existing();
        let bound = response_timeout + CONNECT_TIMEOUT;
        let recovered = async {
            // Each failed attempt takes a response timeout: no busy loop.
            while store.ping().await.is_err() {}
        };
        tokio::time::timeout(bound + SLACK, recovered)
            .await
            .expect("the dead connection is replaced within its bound");
        let job = store.get_job(JobId(1)).await;
        assert!(
            matches!(job, Ok(None)),
            "store operations work again: {job:?}"
        );
    }

    /// A log piece that does not continue its log is refused by Redis
    /// (the stream's entry ids name the offsets), and the import says so.
    #[tokio::test]
    async fn an_import_out_of_order_fails() {
        use crate::store::snapshot::Record;
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url, "test:", None)
            .await
            .unwrap();
        let piece = |offset: u64| Record::Log {
            job: JobId(1),
            offset,
            data: Bytes::from_static(b"0123456789"),
        };
        store.import(vec![piece(0)]).await.unwrap();
        let refused = store.import(vec![piece(0)]).await;
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(store.log_len(JobId(1)).await.unwrap(), 10);
    }

    async fn next_event(
        events: &mut broadcast::Receiver<StoreEvent>,
        wanted: impl Fn(&StoreEvent) -> bool,
    ) {
        loop {
            match events.recv().await {
                Ok(event) if wanted(&event) => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("the event feed closed"),
            }
        }
    }

    /// The Redis host of the pub/sub connection vanishes without closing
    /// it. Before the fix nothing noticed: that controller heard no event
    /// again (sessions claimed only on heartbeats, follows stalled). Now the
    /// subscriber notices within its bound (PING interval + PING timeout),
    /// announces `Resync`, gives up attempts to subscribe that nothing
    /// answers, and once Redis can be reached again events flow.
    #[tokio::test]
    async fn a_silently_dead_event_connection_is_noticed_and_replaced() {
        let server = RedisServer::start();
        let forwarder = Forwarder::start(redis_addr(&server)).await;
        let liveness = SubscriberLiveness {
            ping_interval: Duration::from_millis(200),
            ping_timeout: Duration::from_millis(500),
            subscribe_timeout: Duration::from_millis(500),
        };
        let store = RedisStore::connect_with(
            &format!("redis://{}/", forwarder.addr),
            "test:",
            None,
            RESPONSE_TIMEOUT,
            liveness,
        )
        .await
        .unwrap();
        let mut events = store.subscribe();
        // Published straight to Redis, as another controller would.
        let mut publisher = redis::Client::open(server.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let channel = store.keys.events();
        let publish = |job: u64| {
            let payload =
                serde_json::to_string(&StoreEvent::JobQueued { job: JobId(job) }).unwrap();
            redis::cmd("PUBLISH").arg(&channel).arg(payload).clone()
        };
        let queued =
            |id: u64| move |event: &StoreEvent| *event == StoreEvent::JobQueued { job: JobId(id) };

        let _: i64 = publish(1).query_async(&mut publisher).await.unwrap();
        tokio::time::timeout(DEADLINE, next_event(&mut events, queued(1)))
            .await
            .expect("events flow through the forwarder");

        forwarder.set_silent(true);
        let bound = liveness.ping_interval + liveness.ping_timeout;
        tokio::time::timeout(
            bound + SLACK,
            next_event(&mut events, |event| *event == StoreEvent::Resync),
        )
        .await
        .expect("the dead connection is noticed within its bound");

        // An attempt to subscribe while the host is still gone gives up in
        // time (it is answered by nothing), and says so with another
        // `Resync`; it does not wait for the kernel.
        tokio::time::timeout(
            liveness.subscribe_timeout + Duration::from_secs(5) + SLACK,
            next_event(&mut events, |event| *event == StoreEvent::Resync),
        )
        .await
        .expect("a subscription answered by nothing is given up");

        // Redis can be reached again: a new subscription is made. Events
        // published before it is in place are missed (that is what the
        // `Resync`s say), so publish until one arrives.
        forwarder.set_silent(false);
        let flowing = async {
            for attempt in 2.. {
                let _: i64 = publish(attempt).query_async(&mut publisher).await.unwrap();
                let arrived = tokio::time::timeout(
                    Duration::from_millis(200),
                    next_event(&mut events, queued(attempt)),
                )
                .await;
                if arrived.is_ok() {
                    return;
                }
            }
        };
        tokio::time::timeout(DEADLINE, flowing)
            .await
            .expect("events flow again over a new connection");
    }
}
