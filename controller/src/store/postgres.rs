//! The PostgreSQL backend: every controller sharing one database sees the
//! same repositories, jobs, queue, leases, logs, agents and tokens, and the
//! same events (`LISTEN/NOTIFY`). A controller keeps no state of its own.
//!
//! Transitions run in one transaction each: the job's row is read `FOR
//! UPDATE`, the state machine runs in Rust (`transitions`) and the new
//! record is written with the columns queries select on. Claims take the
//! queue's first rows `FOR UPDATE SKIP LOCKED`, so racing claimers never
//! wait on each other and every job runs once; a unique index on running
//! deploys keeps deploys of one repository one at a time. Log appends lock
//! the job's row and check its state and attempt (the fence), so a stale
//! attempt can never write. Events are sent with `pg_notify` inside the
//! transaction that made the change: a change that rolled back announces
//! nothing. Schema migrations are embedded and applied at start-up under an
//! advisory lock. See ARCHITECTURE.md ("Storage (PostgreSQL)").

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use hobotnica_common::ids::{AgentId, JobId};
use hobotnica_common::job::{Job, JobKind, JobState, Repo};
use hobotnica_common::logs::{AppendPlan, plan_append};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, NoTls, Socket};
use tokio_util::sync::CancellationToken;

use super::snapshot;
use super::{
    AgentRecord, AgentTokenRecord, Finish, Finished, JobFilter, NewJob, NotificationDelivery,
    QueueStats, Retention, SessionRecord, Store, StoreError, StoreEvent, StoreResult, transitions,
};

/// The schema migrations, in order: migration `i` brings the schema to
/// version `i + 1`. Applied ones are never edited; a change is a new file.
const MIGRATIONS: &[&str] = &[include_str!("postgres/migrations/0001_initial.sql")];
/// The advisory lock held while migrating (any constant, the same in every
/// controller: "hobotnic" in ASCII).
const MIGRATION_LOCK: i64 = 0x686f_626f_746e_6963;
/// The channel events are sent on.
const EVENT_CHANNEL: &str = "hobotnica_events";
/// The listening connection's `application_name` (the pool's is
/// `hobotnica-controller`): what `pg_stat_activity` shows.
const LISTENER_APPLICATION_NAME: &str = "hobotnica-controller events";
/// NOTIFY payloads must be shorter than 8000 bytes; an event whose JSON is
/// longer goes into `large_events` and the payload names its row.
const NOTIFY_PAYLOAD_LIMIT: usize = 7900;
/// How long a large event's row is kept (listeners read it at once).
const LARGE_EVENT_RETENTION: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// Capacity of the local event channel.
const EVENT_CAPACITY: usize = 4096;
/// Connections in the pool of one controller.
const POOL_SIZE: usize = 16;
/// Connecting (TCP, TLS and start-up) must be done within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Waiting for a free pooled connection longer fails (the API answers 503).
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// The server ends a statement that runs longer (`statement_timeout`).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(15);
/// TCP keepalive and `TCP_USER_TIMEOUT` on every connection: a connection
/// whose peer vanished is closed by the kernel (25 s idle, 20 s busy).
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const TCP_KEEPALIVE_RETRIES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a starting controller waits for an unreachable server to come
/// up (start order does not matter) before it gives up.
const STARTUP_WAIT: Duration = Duration::from_secs(120);
/// How many times a transaction is retried when it lost a race (a unique
/// index, a serialization failure).
const MAX_TRANSACTION_ATTEMPTS: usize = 64;
/// Queued jobs looked at per claim (oldest first).
const CLAIM_SCAN: i64 = 100;
/// Log rows fetched per round while reading a log.
const LOG_ROWS_PER_READ: i64 = 16;
/// Bytes of log per compressed archive segment.
const ARCHIVE_SEGMENT_BYTES: usize = 1024 * 1024;
/// Logs archived (or jobs pruned) per maintenance round.
const MAINTENANCE_BATCH: i64 = 200;

/// How the listener tells that its connection died without closing (the
/// server vanished, a NAT or proxy dropped the flow): an idle `LISTEN`
/// connection carries no traffic, so nothing else would notice.
#[derive(Debug, Clone, Copy)]
struct ListenerLiveness {
    /// How often the listener sends a query of its own.
    ping_interval: Duration,
    /// A query unanswered for this long ends the connection.
    ping_timeout: Duration,
}

/// A dead listening connection is noticed at most 15 s after it died; the
/// listener then sends `Resync` and reconnects.
const LISTENER_LIVENESS: ListenerLiveness = ListenerLiveness {
    ping_interval: Duration::from_secs(10),
    ping_timeout: Duration::from_secs(5),
};

/// TLS as the URL's `sslmode` asks.
#[derive(Clone)]
enum Tls {
    /// `sslmode=disable`.
    Off,
    /// Any other mode: rustls, verifying as the mode says.
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

/// What `sslmode` asks for (libpq's names and meanings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, unverified (libpq's default).
    Prefer,
    /// TLS, unverified.
    Require,
    /// TLS, the certificate signed by a trusted CA (any host name).
    VerifyCa,
    /// TLS, the certificate signed by a trusted CA and naming the host.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> anyhow::Result<SslMode> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => anyhow::bail!(
                "unknown sslmode {other:?} in the PostgreSQL URL: use disable, prefer, require, verify-ca or verify-full"
            ),
        })
    }
}

/// Splits `sslmode` off a `postgres://` URL (tokio-postgres knows only some
/// of its values) and parses the rest.
fn parse_url(url: &str) -> anyhow::Result<(tokio_postgres::Config, SslMode)> {
    use anyhow::Context as _;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        anyhow::bail!("the PostgreSQL URL must start with postgres:// or postgresql://");
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut mode = SslMode::Prefer;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", value)) => mode = SslMode::parse(value)?,
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    // The error names no part of the URL: it may hold a password.
    let config: tokio_postgres::Config = rest
        .parse()
        .map_err(|err: tokio_postgres::Error| anyhow::anyhow!("{err}"))
        .context("invalid PostgreSQL URL")?;
    Ok((config, mode))
}

/// The rustls client for `mode`, trusting `ca_pem` (or the system's roots).
fn rustls_config(mode: SslMode, ca_pem: Option<&[u8]>) -> anyhow::Result<rustls::ClientConfig> {
    use anyhow::Context as _;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let builder = rustls::ClientConfig::builder();
    if matches!(mode, SslMode::Prefer | SslMode::Require) {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::Unverified::new()))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots
                    .add(cert.context("unreadable PostgreSQL CA certificate")?)
                    .context("unusable PostgreSQL CA certificate")?;
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "the PostgreSQL CA certificate file holds no certificate"
            );
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
        .build()
        .context("cannot build the PostgreSQL certificate verifier")?;
    Ok(if mode == SslMode::VerifyCa {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::AnyName(verifier)))
            .with_no_client_auth()
    } else {
        builder.with_webpki_verifier(verifier).with_no_client_auth()
    })
}

/// Certificate verifiers for the `sslmode`s that do not check everything.
mod verify {
    use std::sync::Arc;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

    /// `require`: encrypted, any certificate (signatures still checked).
    #[derive(Debug)]
    pub struct Unverified(Arc<rustls::crypto::CryptoProvider>);

    impl Unverified {
        pub fn new() -> Unverified {
            Unverified(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        }
    }

    impl ServerCertVerifier for Unverified {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// `verify-ca`: the chain must lead to a trusted CA; the name is not
    /// checked.
    #[derive(Debug)]
    pub struct AnyName(pub Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for AnyName {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            match self.0.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

/// The connection settings and TLS for `url`, with keepalive, the user
/// timeout, the connect timeout and the statement timeout added.
fn settings(url: &str, ca_pem: Option<&[u8]>) -> anyhow::Result<(tokio_postgres::Config, Tls)> {
    let (mut config, mode) = parse_url(url)?;
    config
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(TCP_KEEPALIVE_IDLE)
        .keepalives_interval(TCP_KEEPALIVE_INTERVAL)
        .keepalives_retries(TCP_KEEPALIVE_RETRIES)
        .tcp_user_timeout(TCP_USER_TIMEOUT)
        .application_name("hobotnica-controller");
    // The server's side of the same keepalive: a session whose controller
    // vanished ends (and a listening one stops holding back the
    // notification queue) within 25 s, not the OS default of two hours.
    let statement_timeout = format!(
        "-c statement_timeout={} -c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={}",
        STATEMENT_TIMEOUT.as_millis(),
        TCP_KEEPALIVE_IDLE.as_secs(),
        TCP_KEEPALIVE_INTERVAL.as_secs(),
        TCP_KEEPALIVE_RETRIES,
    );
    let options = match config.get_options() {
        Some(options) => format!("{options} {statement_timeout}"),
        None => statement_timeout,
    };
    config.options(options);
    let tls = match mode {
        SslMode::Disable => {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            Tls::Off
        }
        mode => {
            config.ssl_mode(if mode == SslMode::Prefer {
                tokio_postgres::config::SslMode::Prefer
            } else {
                tokio_postgres::config::SslMode::Require
            });
            Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
                rustls_config(mode, ca_pem)?,
            ))
        }
    };
    Ok((config, tls))
}

/// The server's address for log lines (never the URL: it may hold a
/// password).
fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_default();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// Whether an error means the server could not be reached (retried at
/// start-up), rather than refusing us (a wrong password, TLS, no database).
fn unreachable(err: &tokio_postgres::Error) -> bool {
    err.as_db_error()
        .is_none_or(|db| db.code() == &SqlState::CANNOT_CONNECT_NOW)
        && !err.to_string().contains("TLS")
}

fn unavailable(err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

/// A database error as a store error: the server's message when it sent
/// one (the request may be retried).
fn db(err: tokio_postgres::Error) -> StoreError {
    match err.as_db_error() {
        Some(db) => StoreError::Unavailable(format!("PostgreSQL: {}", db.message())),
        None => StoreError::Unavailable(format!("PostgreSQL: {err}")),
    }
}

/// Whether a transaction lost a race it may retry.
fn lost_race(err: &tokio_postgres::Error) -> bool {
    err.code().is_some_and(|code| {
        code == &SqlState::UNIQUE_VIOLATION
            || code == &SqlState::T_R_SERIALIZATION_FAILURE
            || code == &SqlState::T_R_DEADLOCK_DETECTED
    })
}

fn encode<T: Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(unavailable)
}

fn decode<T: DeserializeOwned>(raw: &str) -> StoreResult<T> {
    serde_json::from_str(raw)
        .map_err(|err| StoreError::Unavailable(format!("corrupt record: {err}")))
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
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

/// Sends `event` to every listener when the surrounding transaction (if
/// any) commits.
async fn notify(client: &impl GenericClient, event: &StoreEvent) -> StoreResult<()> {
    let payload = encode(event)?;
    let payload = if payload.len() > NOTIFY_PAYLOAD_LIMIT {
        let row = client
            .query_one(
                "INSERT INTO large_events (event) VALUES ($1) RETURNING id",
                &[&payload],
            )
            .await
            .map_err(db)?;
        format!("#{}", row.get::<_, i64>(0))
    } else {
        payload
    };
    client
        .execute("SELECT pg_notify($1, $2)", &[&EVENT_CHANNEL, &payload])
        .await
        .map_err(db)?;
    Ok(())
}

/// Writes a changed job's record (`record`, its encoding) and the columns
/// beside it.
async fn write_job(
    client: &impl GenericClient,
    job: &Job,
    record: &str,
) -> Result<u64, tokio_postgres::Error> {
    let agent = job.agent.as_ref().map(|agent| agent.0.as_str());
    client
        .execute(
            "UPDATE jobs SET state = $2, attempt = $3, agent = $4, finished_at = $5, record = $6
             WHERE id = $1",
            &[
                &to_i64(job.id.0),
                &job.state.as_str(),
                &i64::from(job.attempt),
                &agent,
                &job.finished_at,
                &record,
            ],
        )
        .await
}

/// Inserts a new job's row.
async fn insert_job(client: &impl GenericClient, job: &Job) -> StoreResult<()> {
    let agent = job.agent.as_ref().map(|agent| agent.0.as_str());
    client
        .execute(
            "INSERT INTO jobs (id, repo, kind, state, attempt, agent, finished_at, record)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &to_i64(job.id.0),
                &job.repo.to_string(),
                &job.kind.as_str(),
                &job.state.as_str(),
                &i64::from(job.attempt),
                &agent,
                &job.finished_at,
                &encode(job)?,
            ],
        )
        .await
        .map_err(db)?;
    Ok(())
}

/// Brings the schema up to date, under an advisory lock so that
/// controllers starting together migrate once; refuses a schema newer than
/// this controller knows.
async fn migrate(client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    use anyhow::Context as _;
    // Waiting for another controller's migration, and a migration itself,
    // may take longer than an ordinary statement may.
    client
        .batch_execute("SET statement_timeout = 0")
        .await
        .context("cannot prepare the schema migration")?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("cannot take the schema migration lock")?;
    let result = migrate_locked(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result?;
    unlocked.context("cannot release the schema migration lock")?;
    Ok(())
}

async fn migrate_locked(client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    use anyhow::Context as _;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                version    integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .context("cannot create the schema_version table")?;
    let current: i32 = client
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await
        .context("cannot read the schema version")?
        .get(0);
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if current > known {
        anyhow::bail!(
            "the database's schema is version {current}; this controller knows up to {known}: upgrade the controller"
        );
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        let version = i32::try_from(index + 1).unwrap_or(i32::MAX);
        let tx = client
            .transaction()
            .await
            .context("cannot start a migration")?;
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("schema migration {version} failed"))?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&version],
        )
        .await
        .with_context(|| format!("cannot record schema version {version}"))?;
        tx.commit()
            .await
            .with_context(|| format!("schema migration {version} failed"))?;
        tracing::info!(version, "PostgreSQL schema migrated");
    }
    Ok(())
}

struct PgStore {
    pool: Pool,
    events: broadcast::Sender<StoreEvent>,
    /// Stops the listener when the store is dropped.
    stop_tasks: CancellationToken,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop_tasks.cancel();
    }
}

impl PgStore {
    /// The record (the JSON of the first column) of the row `sql` selects,
    /// if any.
    async fn record<T: DeserializeOwned>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> StoreResult<Option<T>> {
        let client = self.client().await?;
        client
            .query_opt(sql, params)
            .await
            .map_err(db)?
            .map(|row| decode(row.get(0)))
            .transpose()
    }

    /// The records (the JSON of the first column) of the rows `sql`
    /// selects, in its order.
    async fn records<T: DeserializeOwned>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> StoreResult<Vec<T>> {
        let client = self.client().await?;
        let rows = client.query(sql, params).await.map_err(db)?;
        rows.iter().map(|row| decode(row.get(0))).collect()
    }

    /// Connects to `url` (`postgres://`; TLS as its `sslmode` says, verified
    /// against `ca_pem` or the system's roots), migrates the schema and
    /// starts listening for events.
    async fn connect(url: &str, ca_pem: Option<Vec<u8>>) -> anyhow::Result<PgStore> {
        PgStore::connect_with(url, ca_pem, LISTENER_LIVENESS).await
    }

    async fn connect_with(
        url: &str,
        ca_pem: Option<Vec<u8>>,
        liveness: ListenerLiveness,
    ) -> anyhow::Result<PgStore> {
        use anyhow::Context as _;
        let (config, tls) = settings(url, ca_pem.as_deref())?;
        let mut client = match &tls {
            Tls::Off => connect_when_up(&config, NoTls).await?,
            Tls::Rustls(make) => connect_when_up(&config, make.clone()).await?,
        };
        migrate(&mut client).await?;
        drop(client);
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Tls::Off => Manager::from_config(config.clone(), NoTls, manager_config),
            Tls::Rustls(make) => Manager::from_config(config.clone(), make.clone(), manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT + CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .context("cannot make the PostgreSQL connection pool")?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let stop_tasks = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(run_listener(
            Listener {
                config,
                tls,
                pool: pool.clone(),
                events: events.clone(),
                stop: stop_tasks.clone(),
                liveness,
            },
            ready_tx,
        ));
        tokio::time::timeout(CONNECT_TIMEOUT + CONNECT_TIMEOUT, ready_rx)
            .await
            .context("cannot listen for PostgreSQL events")?
            .context("cannot listen for PostgreSQL events")?;
        Ok(PgStore {
            pool,
            events,
            stop_tasks,
        })
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|err| match err {
            deadpool_postgres::PoolError::Backend(err) => db(err),
            deadpool_postgres::PoolError::Timeout(_) => {
                StoreError::Unavailable("PostgreSQL: no connection within the timeout".into())
            }
            other => StoreError::Unavailable(format!("PostgreSQL: {other}")),
        })
    }

    async fn publish(&self, event: &StoreEvent) {
        let sent = async {
            let client = self.client().await?;
            notify(&**client, event).await
        };
        if let Err(err) = sent.await {
            // Listeners re-read on their own schedule (heartbeats, tails).
            tracing::warn!(error = %err, "cannot publish an event");
        }
    }

    /// Runs `change` on job `id` in a transaction holding its row, writes
    /// the job and sends what `event` makes of the result, all or nothing.
    async fn update_job<T: Send>(
        &self,
        id: JobId,
        change: impl FnOnce(&mut Job) -> StoreResult<T> + Send,
        event: impl FnOnce(&Job, &T) -> Option<StoreEvent> + Send,
    ) -> StoreResult<(Job, T)> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let row = tx
            .query_opt(
                "SELECT record FROM jobs WHERE id = $1 FOR UPDATE",
                &[&to_i64(id.0)],
            )
            .await
            .map_err(db)?
            .ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
        let mut job: Job = decode(row.get(0))?;
        let before = encode(&job)?;
        let result = change(&mut job)?;
        let record = encode(&job)?;
        if record != before {
            write_job(&*tx, &job, &record).await.map_err(db)?;
        }
        if let Some(event) = event(&job, &result) {
            notify(&*tx, &event).await?;
        }
        tx.commit().await.map_err(db)?;
        Ok((job, result))
    }

    async fn jobs_where(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> StoreResult<Vec<Job>> {
        let client = self.client().await?;
        let rows = client.query(sql, params).await.map_err(db)?;
        rows.iter().map(|row| decode(row.get(0))).collect()
    }

    /// Appends `data` at the log's end, in a transaction holding the job's
    /// row: for `fence` = `Some((attempt, offset))` only while that attempt
    /// runs, idempotently at `offset`; for `None` in any state (controller
    /// lines).
    async fn append(&self, id: JobId, fence: Option<(u32, u64)>, data: &[u8]) -> StoreResult<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let row = tx
            .query_opt(
                "SELECT state, attempt, log_len FROM jobs WHERE id = $1 FOR UPDATE",
                &[&to_i64(id.0)],
            )
            .await
            .map_err(db)?
            .ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
        let state: &str = row.get(0);
        let committed = to_u64(row.get(2));
        let skip = match fence {
            Some((attempt, offset)) => {
                if state != JobState::Running.as_str() || row.get::<_, i64>(1) != i64::from(attempt)
                {
                    return Err(StoreError::LeaseLost { job: id, attempt });
                }
                match plan_append(committed, offset, data.len()) {
                    AppendPlan::Duplicate => return Ok(committed),
                    AppendPlan::Gap => return Err(StoreError::LogGap { committed }),
                    AppendPlan::Append { skip } => skip,
                }
            }
            None => 0,
        };
        let data = &data[skip..];
        if data.is_empty() {
            return Ok(committed);
        }
        let len = committed + data.len() as u64;
        tx.execute(
            "INSERT INTO log_chunks (job, start, data) VALUES ($1, $2, $3)",
            &[&to_i64(id.0), &to_i64(committed), &data],
        )
        .await
        .map_err(db)?;
        tx.execute(
            "UPDATE jobs SET log_len = $2 WHERE id = $1",
            &[&to_i64(id.0), &to_i64(len)],
        )
        .await
        .map_err(db)?;
        notify(&*tx, &StoreEvent::LogAppended { job: id, len }).await?;
        tx.commit().await.map_err(db)?;
        Ok(len)
    }

    /// Up to `max` bytes from the live chunks of a log, from `offset`.
    async fn read_chunks(
        client: &impl GenericClient,
        id: JobId,
        offset: u64,
        max: usize,
    ) -> StoreResult<Vec<u8>> {
        let mut out = Vec::with_capacity(max.min(1 << 20));
        // The chunk holding `offset`: the last one starting at or before it.
        let mut from = match client
            .query_opt(
                "SELECT start FROM log_chunks WHERE job = $1 AND start <= $2
                 ORDER BY start DESC LIMIT 1",
                &[&to_i64(id.0), &to_i64(offset)],
            )
            .await
            .map_err(db)?
        {
            Some(row) => row.get::<_, i64>(0),
            None => to_i64(offset),
        };
        let mut position = offset;
        while out.len() < max {
            let rows = client
                .query(
                    "SELECT start, data FROM log_chunks WHERE job = $1 AND start >= $2
                     ORDER BY start LIMIT $3",
                    &[&to_i64(id.0), &from, &LOG_ROWS_PER_READ],
                )
                .await
                .map_err(db)?;
            let done = (rows.len() as i64) < LOG_ROWS_PER_READ;
            for row in &rows {
                let start = to_u64(row.get(0));
                let data: &[u8] = row.get(1);
                let end = start + data.len() as u64;
                from = to_i64(start) + 1;
                if end <= position {
                    continue;
                }
                let skip = usize::try_from(position.saturating_sub(start)).unwrap_or(usize::MAX);
                let take = (data.len() - skip).min(max - out.len());
                out.extend_from_slice(&data[skip..skip + take]);
                position += take as u64;
                if out.len() >= max {
                    break;
                }
            }
            if done {
                break;
            }
        }
        Ok(out)
    }

    async fn read_log_with(
        client: &impl GenericClient,
        id: JobId,
        offset: u64,
        max: usize,
    ) -> StoreResult<Bytes> {
        let archived = client
            .query_opt(
                "SELECT archived_len FROM jobs WHERE id = $1",
                &[&to_i64(id.0)],
            )
            .await
            .map_err(db)?
            .map_or(0, |row| to_u64(row.get(0)));
        let mut out = Vec::with_capacity(max.min(ARCHIVE_SEGMENT_BYTES));
        let mut position = offset;
        while out.len() < max && position < archived {
            let segment_index = position / ARCHIVE_SEGMENT_BYTES as u64;
            let Some(row) = client
                .query_opt(
                    "SELECT data FROM log_segments WHERE job = $1 AND segment = $2",
                    &[&to_i64(id.0), &to_i64(segment_index)],
                )
                .await
                .map_err(db)?
            else {
                break;
            };
            let segment = inflate(row.get(0))?;
            let from = usize::try_from(position - segment_index * ARCHIVE_SEGMENT_BYTES as u64)
                .unwrap_or(usize::MAX);
            if from >= segment.len() {
                break;
            }
            let take = (segment.len() - from).min(max - out.len());
            out.extend_from_slice(&segment[from..from + take]);
            position += take as u64;
        }
        if out.len() < max && position >= archived {
            out.extend_from_slice(&Self::read_chunks(client, id, position, max - out.len()).await?);
        }
        Ok(Bytes::from(out))
    }

    /// Rewrites a finished job's log as compressed segments, one segment in
    /// memory at a time, and drops its chunks, in one transaction holding
    /// the job's row (an append waits for it). `false` when another
    /// controller is at it (tried again later) or it was archived already.
    async fn archive_one(&self, id: JobId) -> StoreResult<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let Some(row) = tx
            .query_opt(
                "SELECT log_len FROM jobs WHERE id = $1 AND NOT archived
                 FOR UPDATE SKIP LOCKED",
                &[&to_i64(id.0)],
            )
            .await
            .map_err(db)?
        else {
            return Ok(false);
        };
        let total = to_u64(row.get(0));
        let mut offset = 0;
        let mut segment_index = 0_i64;
        while offset < total {
            let segment = Self::read_chunks(&*tx, id, offset, ARCHIVE_SEGMENT_BYTES).await?;
            if segment.is_empty() {
                break;
            }
            offset += segment.len() as u64;
            tx.execute(
                "INSERT INTO log_segments (job, segment, data) VALUES ($1, $2, $3)",
                &[&to_i64(id.0), &segment_index, &deflate(&segment)?],
            )
            .await
            .map_err(db)?;
            segment_index += 1;
        }
        tx.execute(
            "DELETE FROM log_chunks WHERE job = $1 AND start < $2",
            &[&to_i64(id.0), &to_i64(offset)],
        )
        .await
        .map_err(db)?;
        tx.execute(
            "UPDATE jobs SET archived = true, archived_len = $2 WHERE id = $1",
            &[&to_i64(id.0), &to_i64(offset)],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }
}

/// The first connection, retried with backoff while the server cannot be
/// reached (refused, reset, timed out, starting up) for up to
/// [`STARTUP_WAIT`]. Other errors (a wrong password, TLS, no such
/// database) end at once.
async fn connect_when_up<T>(
    config: &tokio_postgres::Config,
    tls: T,
) -> anyhow::Result<tokio_postgres::Client>
where
    T: MakeTlsConnect<Socket> + Clone + Send + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as tokio_postgres::tls::TlsConnect<Socket>>::Future: Send,
{
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, connection)) => {
                // Ends when the client is dropped.
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::debug!(error = %err, "a PostgreSQL connection ended");
                    }
                });
                return Ok(client);
            }
            Err(err) if unreachable(&err) && started.elapsed() + delay < STARTUP_WAIT => {
                tracing::warn!(
                    postgres = %describe(config),
                    error = %err,
                    retry_in = ?delay,
                    "PostgreSQL is not reachable yet; waiting for it"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(err) => {
                return Err(anyhow::anyhow!("{err}")).map_err(|err| {
                    err.context(format!(
                        "cannot connect to PostgreSQL at {}",
                        describe(config)
                    ))
                });
            }
        }
    }
}

/// What the listener task needs.
struct Listener {
    config: tokio_postgres::Config,
    tls: Tls,
    pool: Pool,
    events: broadcast::Sender<StoreEvent>,
    stop: CancellationToken,
    liveness: ListenerLiveness,
}

/// Forwards the event channel to the local broadcast over one listening
/// connection; after a reconnect it sends `Resync` (events may have been
/// missed meanwhile). A connection that stops answering its own queries
/// counts as lost (see [`ListenerLiveness`]).
async fn run_listener(listener: Listener, ready: tokio::sync::oneshot::Sender<()>) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = match &listener.tls {
            Tls::Off => listen_once(&listener, NoTls, &mut ready).await,
            Tls::Rustls(make) => listen_once(&listener, make.clone(), &mut ready).await,
        };
        match outcome {
            ListenOutcome::Stopped => return,
            ListenOutcome::Lost { listened } => {
                if listened {
                    backoff = Duration::from_millis(100);
                }
            }
        }
        let _ = listener.events.send(StoreEvent::Resync);
        tokio::select! {
            () = listener.stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

enum ListenOutcome {
    Stopped,
    /// The connection failed or could not be made; `listened` when it had
    /// listened first.
    Lost {
        listened: bool,
    },
}

/// A step of setting the listener up (connecting, `LISTEN`), bounded by a
/// timeout: its value, or the outcome that makes the listener retry
/// (logged).
fn listen_step<T>(
    step: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
) -> Result<T, ListenOutcome> {
    match step {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "cannot listen for PostgreSQL events; retrying");
            Err(ListenOutcome::Lost { listened: false })
        }
        Err(_) => {
            tracing::warn!("cannot listen for PostgreSQL events: no answer; retrying");
            Err(ListenOutcome::Lost { listened: false })
        }
    }
}

async fn listen_once<T>(
    listener: &Listener,
    tls: T,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> ListenOutcome
where
    T: MakeTlsConnect<Socket> + Send + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as tokio_postgres::tls::TlsConnect<Socket>>::Future: Send,
{
    use futures_util::StreamExt as _;
    let mut config = listener.config.clone();
    config.application_name(LISTENER_APPLICATION_NAME);
    let connect = tokio::time::timeout(
        CONNECT_TIMEOUT + listener.liveness.ping_timeout,
        config.connect(tls),
    );
    let connected = tokio::select! {
        () = listener.stop.cancelled() => return ListenOutcome::Stopped,
        connected = connect => connected,
    };
    let (client, mut connection) = match listen_step(connected) {
        Ok(connected) => connected,
        Err(lost) => return lost,
    };
    // The connection is driven by a task of its own (the client's queries
    // need it polled while this one waits on them); it forwards
    // notifications and ends when the client is dropped or the
    // connection fails.
    let (notification_tx, mut notifications) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(notification) = message
                && notification_tx
                    .send(notification.payload().to_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let _driver = AbortOnDrop(driver);
    let listen_sql = format!("LISTEN {EVENT_CHANNEL}");
    let listen = tokio::time::timeout(
        listener.liveness.ping_timeout,
        client.batch_execute(&listen_sql),
    );
    if let Err(lost) = listen_step(listen.await) {
        return lost;
    }
    match ready.take() {
        Some(ready) => {
            let _ = ready.send(());
        }
        None => {
            tracing::info!("PostgreSQL event feed reconnected");
            let _ = listener.events.send(StoreEvent::Resync);
        }
    }
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + listener.liveness.ping_interval,
        listener.liveness.ping_interval,
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = listener.stop.cancelled() => return ListenOutcome::Stopped,
            payload = notifications.recv() => {
                let Some(payload) = payload else { break };
                forward(listener, &payload).await;
            }
            _ = ticker.tick() => {
                let ping = tokio::time::timeout(
                    listener.liveness.ping_timeout,
                    client.simple_query("SELECT 1"),
                );
                match ping.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => {
                        tracing::warn!(error = %err, "PostgreSQL event feed: query failed");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(
                            timeout = ?listener.liveness.ping_timeout,
                            "PostgreSQL event feed: no answer; the connection is dead"
                        );
                        break;
                    }
                }
            }
        }
    }
    tracing::warn!("PostgreSQL event feed lost; reconnecting");
    ListenOutcome::Lost { listened: true }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publishes one notification's event locally (reading a large one from
/// its row).
async fn forward(listener: &Listener, payload: &str) {
    let json = match payload.strip_prefix('#') {
        None => payload.to_owned(),
        Some(id) => {
            let Ok(id) = id.parse::<i64>() else {
                tracing::warn!("unreadable event reference");
                return;
            };
            let row = async {
                let client = listener.pool.get().await.map_err(unavailable)?;
                client
                    .query_opt("SELECT event FROM large_events WHERE id = $1", &[&id])
                    .await
                    .map_err(db)
            };
            match row.await {
                Ok(Some(row)) => row.get(0),
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read a large event");
                    let _ = listener.events.send(StoreEvent::Resync);
                    return;
                }
            }
        }
    };
    match serde_json::from_str::<StoreEvent>(&json) {
        Ok(event) => {
            let _ = listener.events.send(event);
        }
        Err(err) => tracing::warn!(error = %err, "unreadable event"),
    }
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> StoreResult<()> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map_err(db)?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    async fn announce(&self, event: StoreEvent) {
        self.publish(&event).await;
    }

    async fn create_repo(&self, repo: Repo) -> StoreResult<()> {
        let full_name = repo.full_name();
        let hook = repo.github.as_ref().map(|github| github.hook_id.as_str());
        let client = self.client().await?;
        let created = client
            .execute(
                "INSERT INTO repos (full_name, hook_id, record) VALUES ($1, $2, $3)
                 ON CONFLICT (full_name) DO NOTHING",
                &[&full_name, &hook, &encode(&repo)?],
            )
            .await
            .map_err(db)?;
        if created == 0 {
            return Err(StoreError::Conflict(format!(
                "repository {full_name} is already registered"
            )));
        }
        Ok(())
    }

    async fn get_repo(&self, owner: &str, name: &str) -> StoreResult<Option<Repo>> {
        self.record(
            "SELECT record FROM repos WHERE full_name = $1",
            &[&format!("{owner}/{name}")],
        )
        .await
    }

    async fn list_repos(&self) -> StoreResult<Vec<Repo>> {
        self.records("SELECT record FROM repos ORDER BY full_name", &[])
            .await
    }

    async fn delete_repo(&self, owner: &str, name: &str) -> StoreResult<()> {
        let full_name = format!("{owner}/{name}");
        let client = self.client().await?;
        let deleted = client
            .execute("DELETE FROM repos WHERE full_name = $1", &[&full_name])
            .await
            .map_err(db)?;
        if deleted == 0 {
            return Err(StoreError::NotFound(format!("repository {full_name}")));
        }
        Ok(())
    }

    async fn update_repo(&self, old: &Repo, new: Repo) -> StoreResult<bool> {
        let full_name = new.full_name();
        let hook = new.github.as_ref().map(|github| github.hook_id.as_str());
        let client = self.client().await?;
        // Records are written only by `encode`, which is deterministic: the
        // stored text of `old` is its encoding.
        let written = client
            .execute(
                "UPDATE repos SET hook_id = $2, record = $3 WHERE full_name = $1 AND record = $4",
                &[&full_name, &hook, &encode(&new)?, &encode(old)?],
            )
            .await
            .map_err(db)?;
        if written == 1 {
            return Ok(true);
        }
        let exists = client
            .query_opt("SELECT 1 FROM repos WHERE full_name = $1", &[&full_name])
            .await
            .map_err(db)?
            .is_some();
        if exists {
            Ok(false)
        } else {
            Err(StoreError::NotFound(format!("repository {full_name}")))
        }
    }

    async fn find_repo_by_hook(&self, hook_id: &str) -> StoreResult<Option<Repo>> {
        self.record(
            "SELECT record FROM repos WHERE hook_id = $1 LIMIT 1",
            &[&hook_id],
        )
        .await
    }

    async fn key_job(&self, key: &str) -> StoreResult<Option<JobId>> {
        let client = self.client().await?;
        Ok(client
            .query_opt("SELECT job FROM key_jobs WHERE name = $1", &[&key])
            .await
            .map_err(db)?
            .map(|row| JobId(to_u64(row.get(0)))))
    }

    async fn create_job(&self, new: NewJob, now: DateTime<Utc>) -> StoreResult<Job> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let id: i64 = tx
            .query_one("SELECT nextval('job_ids')", &[])
            .await
            .map_err(db)?
            .get(0);
        let job = transitions::new_job(JobId(to_u64(id)), new, now);
        insert_job(&*tx, &job).await?;
        notify(&*tx, &StoreEvent::JobQueued { job: job.id }).await?;
        tx.commit().await.map_err(db)?;
        Ok(job)
    }

    async fn create_job_once(
        &self,
        key: &str,
        names: &[String],
        new: NewJob,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        let expired = now
            - chrono::Duration::from_std(super::DELIVERY_RETENTION)
                .unwrap_or(chrono::Duration::MAX);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        // A key seen within the retention stays; an older one is new again.
        let fresh = tx
            .execute(
                "INSERT INTO seen_keys (key, at) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET at = excluded.at WHERE seen_keys.at < $3",
                &[&key, &now, &expired],
            )
            .await
            .map_err(db)?;
        if fresh == 0 {
            return Ok(None);
        }
        let id: i64 = tx
            .query_one("SELECT nextval('job_ids')", &[])
            .await
            .map_err(db)?
            .get(0);
        let job = transitions::new_job(JobId(to_u64(id)), new, now);
        insert_job(&*tx, &job).await?;
        for name in names {
            tx.execute(
                "INSERT INTO key_jobs (name, job, at) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET job = excluded.job, at = excluded.at",
                &[name, &id, &now],
            )
            .await
            .map_err(db)?;
        }
        notify(&*tx, &StoreEvent::JobQueued { job: job.id }).await?;
        tx.commit().await.map_err(db)?;
        Ok(Some(job))
    }

    async fn get_job(&self, id: JobId) -> StoreResult<Option<Job>> {
        self.record("SELECT record FROM jobs WHERE id = $1", &[&to_i64(id.0)])
            .await
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<Job>> {
        let repo = filter.repo.as_ref().map(ToString::to_string);
        let state = filter.state.map(JobState::as_str);
        let kind = filter.kind.map(JobKind::as_str);
        let agent = filter.agent.as_ref().map(|agent| agent.0.as_str());
        let before = filter.before.map(|id| to_i64(id.0));
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        let mut jobs = self
            .jobs_where(
                "SELECT record FROM jobs
                 WHERE ($1::text IS NULL OR repo = $1)
                   AND ($2::text IS NULL OR state = $2)
                   AND ($3::text IS NULL OR kind = $3)
                   AND ($4::text IS NULL OR agent = $4)
                   AND ($5::bigint IS NULL OR id < $5)
                 ORDER BY id DESC LIMIT $6",
                &[&repo, &state, &kind, &agent, &before, &limit],
            )
            .await?;
        // The columns mirror the record; the record decides.
        jobs.retain(|job| filter.matches(job));
        Ok(jobs)
    }

    async fn claim_job(
        &self,
        agent: &AgentRecord,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        for _ in 0..MAX_TRANSACTION_ATTEMPTS {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            // Rows another claimer holds are skipped, not waited for.
            let rows = tx
                .query(
                    "SELECT record FROM jobs WHERE state = 'queued'
                     ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                    &[&CLAIM_SCAN],
                )
                .await
                .map_err(db)?;
            let queued: Vec<Job> = rows
                .iter()
                .map(|row| decode::<Job>(row.get(0)))
                .collect::<StoreResult<Vec<Job>>>()?
                .into_iter()
                .filter(|job| transitions::may_claim(job, agent))
                .collect();
            if queued.is_empty() {
                return Ok(None);
            }
            let deploying: HashSet<String> = if queued.iter().any(|job| job.kind == JobKind::Deploy)
            {
                tx.query(
                    "SELECT repo FROM jobs WHERE kind = 'deploy' AND state = 'running'",
                    &[],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|row| row.get(0))
                .collect()
            } else {
                HashSet::new()
            };
            let candidate = queued.into_iter().find(|job| {
                transitions::claimable(job, agent, |repo| deploying.contains(&repo.to_string()))
            });
            let Some(mut job) = candidate else {
                return Ok(None);
            };
            transitions::claim(&mut job, agent, now, lease_until)?;
            match write_job(&*tx, &job, &encode(&job)?).await {
                Ok(_) => {}
                // A deploy of the repository started meanwhile: look again.
                Err(err) if lost_race(&err) => continue,
                Err(err) => return Err(db(err)),
            }
            notify(&*tx, &StoreEvent::JobStarted { job: job.id }).await?;
            match tx.commit().await {
                Ok(()) => return Ok(Some(job)),
                Err(err) if lost_race(&err) => continue,
                Err(err) => return Err(db(err)),
            }
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
            .update_job(
                id,
                |job| transitions::renew(job, attempt, lease_until),
                |_, _| None,
            )
            .await?;
        Ok(job)
    }

    async fn request_cancel(&self, id: JobId, now: DateTime<Utc>) -> StoreResult<Job> {
        let (job, ()) = self
            .update_job(
                id,
                |job| transitions::request_cancel(job, now),
                |job, ()| Some(transitions::cancel_event(job)),
            )
            .await?;
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
            .update_job(
                id,
                |job| transitions::finish(job, attempt, finish, now),
                |job, changed| changed.then_some(StoreEvent::JobFinished { job: job.id }),
            )
            .await?;
        Ok(Finished {
            job,
            first: changed,
        })
    }

    async fn queue_stats(&self) -> StoreResult<QueueStats> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM jobs WHERE state = 'queued'),
                        (SELECT count(*) FROM jobs WHERE state = 'running'),
                        (SELECT record FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1)",
                &[],
            )
            .await
            .map_err(db)?;
        let oldest: Option<&str> = row.get(2);
        Ok(QueueStats {
            queued: to_u64(row.get(0)),
            running: to_u64(row.get(1)),
            oldest_queued_at: oldest
                .map(decode::<Job>)
                .transpose()?
                .map(|job| job.created_at),
        })
    }

    async fn expire_leases(&self, now: DateTime<Utc>) -> StoreResult<Vec<Job>> {
        let running = self
            .jobs_where(
                "SELECT record FROM jobs WHERE state = 'running' ORDER BY id",
                &[],
            )
            .await?;
        let mut lost = Vec::new();
        for job in running {
            if job.lease_expires_at.is_none_or(|until| until >= now) {
                continue;
            }
            // Several controllers may race here; one wins the transition.
            let (job, expired) = self
                .update_job(
                    job.id,
                    |job| Ok(transitions::expire(job, now)),
                    |job, expired| expired.then_some(StoreEvent::JobFinished { job: job.id }),
                )
                .await?;
            if expired {
                lost.push(job);
            }
        }
        Ok(lost)
    }

    async fn extend_leases(&self, until: DateTime<Utc>) -> StoreResult<()> {
        let running = self
            .jobs_where("SELECT record FROM jobs WHERE state = 'running'", &[])
            .await?;
        for job in running {
            self.update_job(
                job.id,
                |job| Ok(transitions::extend(job, until)),
                |_, _| None,
            )
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
        self.append(id, Some((attempt, offset)), &data).await
    }

    async fn append_controller_line(&self, id: JobId, line: &str) -> StoreResult<u64> {
        let line = format!("[hobotnica] {line}\n");
        self.append(id, None, line.as_bytes()).await
    }

    async fn read_log(&self, id: JobId, offset: u64, max: usize) -> StoreResult<Bytes> {
        // One snapshot: an archive committed meanwhile is seen whole or not
        // at all.
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db)?;
        let out = Self::read_log_with(&*tx, id, offset, max).await?;
        tx.commit().await.map_err(db)?;
        Ok(out)
    }

    async fn log_len(&self, id: JobId) -> StoreResult<u64> {
        let client = self.client().await?;
        Ok(client
            .query_opt("SELECT log_len FROM jobs WHERE id = $1", &[&to_i64(id.0)])
            .await
            .map_err(db)?
            .map_or(0, |row| to_u64(row.get(0))))
    }

    async fn register_agent(&self, agent: AgentRecord) -> StoreResult<AgentRecord> {
        for _ in 0..MAX_TRANSACTION_ATTEMPTS {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let previous: Option<AgentRecord> = tx
                .query_opt(
                    "SELECT record FROM agents WHERE name = $1 FOR UPDATE",
                    &[&agent.name],
                )
                .await
                .map_err(db)?
                .map(|row| decode(row.get(0)))
                .transpose()?;
            let record = transitions::register_agent(previous.as_ref(), agent.clone())?;
            let written = tx
                .execute(
                    "INSERT INTO agents (id, name, token_id, record) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (id) DO UPDATE
                     SET name = excluded.name, token_id = excluded.token_id, record = excluded.record",
                    &[&record.id.0, &record.name, &record.token_id, &encode(&record)?],
                )
                .await;
            match written {
                Ok(_) => {}
                // Registered meanwhile under the same name: read again.
                Err(err) if lost_race(&err) => continue,
                Err(err) => return Err(db(err)),
            }
            match tx.commit().await {
                Ok(()) => return Ok(record),
                Err(err) if lost_race(&err) => continue,
                Err(err) => return Err(db(err)),
            }
        }
        Err(StoreError::Conflict(format!(
            "agent {} kept changing; retry",
            agent.name
        )))
    }

    async fn get_agent(&self, id: &AgentId) -> StoreResult<Option<AgentRecord>> {
        self.record("SELECT record FROM agents WHERE id = $1", &[&id.0])
            .await
    }

    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        self.records("SELECT record FROM agents ORDER BY name", &[])
            .await
    }

    async fn touch_agent(
        &self,
        id: &AgentId,
        now: DateTime<Utc>,
        controller: &str,
    ) -> StoreResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let mut agent: AgentRecord = tx
            .query_opt(
                "SELECT record FROM agents WHERE id = $1 FOR UPDATE",
                &[&id.0],
            )
            .await
            .map_err(db)?
            .map(|row| decode(row.get(0)))
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("agent {id}")))?;
        agent.last_seen = now;
        agent.controller = Some(controller.to_owned());
        tx.execute(
            "UPDATE agents SET record = $2 WHERE id = $1",
            &[&id.0, &encode(&agent)?],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn create_agent_token(&self, token: AgentTokenRecord) -> StoreResult<()> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO agent_tokens (id, token_hash, created_at, record) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE
                 SET token_hash = excluded.token_hash, created_at = excluded.created_at,
                     record = excluded.record",
                &[&token.id, &token.token_hash, &token.created_at, &encode(&token)?],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn list_agent_tokens(&self) -> StoreResult<Vec<AgentTokenRecord>> {
        self.records(
            "SELECT record FROM agent_tokens ORDER BY created_at, id",
            &[],
        )
        .await
    }

    async fn find_agent_token(&self, token_hash: &str) -> StoreResult<Option<AgentTokenRecord>> {
        self.record(
            "SELECT record FROM agent_tokens WHERE token_hash = $1",
            &[&token_hash],
        )
        .await
    }

    async fn delete_agent_token(&self, id: &str) -> StoreResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let deleted = tx
            .execute("DELETE FROM agent_tokens WHERE id = $1", &[&id])
            .await
            .map_err(db)?;
        if deleted == 0 {
            return Err(StoreError::NotFound(format!("agent token {id}")));
        }
        tx.execute("DELETE FROM agents WHERE token_id = $1", &[&id])
            .await
            .map_err(db)?;
        notify(
            &*tx,
            &StoreEvent::AgentTokenRevoked {
                token_id: id.to_owned(),
            },
        )
        .await?;
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn create_session(&self, id_hash: &str, session: SessionRecord) -> StoreResult<()> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO sessions (id_hash, expires_at, record) VALUES ($1, $2, $3)
                 ON CONFLICT (id_hash) DO UPDATE
                 SET expires_at = excluded.expires_at, record = excluded.record",
                &[&id_hash, &session.expires_at, &encode(&session)?],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn get_session(
        &self,
        id_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<SessionRecord>> {
        let client = self.client().await?;
        let session: Option<SessionRecord> = client
            .query_opt(
                "SELECT record FROM sessions WHERE id_hash = $1",
                &[&id_hash],
            )
            .await
            .map_err(db)?
            .map(|row| decode(row.get(0)))
            .transpose()?;
        Ok(session.filter(|session| session.expires_at > now))
    }

    async fn delete_session(&self, id_hash: &str) -> StoreResult<()> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM sessions WHERE id_hash = $1", &[&id_hash])
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn queue_notifications(&self, deliveries: Vec<NotificationDelivery>) -> StoreResult<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        for delivery in &deliveries {
            tx.execute(
                "INSERT INTO notifications (id, due_at, attempt, record) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE
                 SET due_at = excluded.due_at, attempt = excluded.attempt, record = excluded.record",
                &[
                    &delivery.id,
                    &delivery.due_at,
                    &i64::from(delivery.attempt),
                    &encode(delivery)?,
                ],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn claim_notification(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<NotificationDelivery>> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                "UPDATE notifications SET attempt = attempt + 1, due_at = $2
                 WHERE id = (SELECT id FROM notifications WHERE due_at <= $1
                             ORDER BY due_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING attempt, record",
                &[&now, &lease_until],
            )
            .await
            .map_err(db)?
        else {
            return Ok(None);
        };
        let mut delivery: NotificationDelivery = decode(row.get(1))?;
        delivery.attempt = u32::try_from(row.get::<_, i64>(0)).unwrap_or(u32::MAX);
        delivery.due_at = lease_until;
        Ok(Some(delivery))
    }

    async fn retry_notification(
        &self,
        id: &str,
        attempt: u32,
        due_at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let client = self.client().await?;
        let changed = client
            .execute(
                "UPDATE notifications SET due_at = $3 WHERE id = $1 AND attempt = $2",
                &[&id, &i64::from(attempt), &due_at],
            )
            .await
            .map_err(db)?;
        Ok(changed == 1)
    }

    async fn finish_notification(&self, id: &str, attempt: u32) -> StoreResult<bool> {
        let client = self.client().await?;
        let changed = client
            .execute(
                "DELETE FROM notifications WHERE id = $1 AND attempt = $2",
                &[&id, &i64::from(attempt)],
            )
            .await
            .map_err(db)?;
        Ok(changed == 1)
    }

    async fn archive_logs(&self, finished_before: DateTime<Utc>) -> StoreResult<usize> {
        let ids: Vec<i64> = {
            let client = self.client().await?;
            client
                .query(
                    "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND NOT archived
                       AND finished_at < $1
                     ORDER BY finished_at LIMIT $2",
                    &[&finished_before, &MAINTENANCE_BATCH],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|row| row.get(0))
                .collect()
        };
        let mut archived = 0;
        for id in ids {
            if self.archive_one(JobId(to_u64(id))).await? {
                archived += 1;
            }
        }
        Ok(archived)
    }

    async fn prune(&self, policy: &Retention, now: DateTime<Utc>) -> StoreResult<usize> {
        let cutoff =
            now - chrono::Duration::from_std(policy.max_age).unwrap_or(chrono::Duration::MAX);
        let keys_expired = now
            - chrono::Duration::from_std(super::DELIVERY_RETENTION)
                .unwrap_or(chrono::Duration::MAX);
        let keep = i64::try_from(policy.max_jobs_per_repo).unwrap_or(i64::MAX);
        let client = self.client().await?;
        // Only finished jobs go; a queued or running one is kept. Their
        // log rows go with them (ON DELETE CASCADE).
        let deleted = client
            .execute(
                "DELETE FROM jobs WHERE id IN (
                    (SELECT id FROM jobs
                     WHERE state NOT IN ('queued', 'running') AND finished_at < $1
                     LIMIT $3)
                    UNION
                    (SELECT id FROM (
                        SELECT id, state,
                               row_number() OVER (PARTITION BY repo ORDER BY id DESC) AS newer
                        FROM jobs
                     ) ranked
                     WHERE newer > $2 AND state NOT IN ('queued', 'running')
                     LIMIT $3)
                 )",
                &[&cutoff, &keep, &MAINTENANCE_BATCH],
            )
            .await
            .map_err(db)?;
        client
            .execute("DELETE FROM seen_keys WHERE at < $1", &[&keys_expired])
            .await
            .map_err(db)?;
        client
            .execute("DELETE FROM key_jobs WHERE at < $1", &[&keys_expired])
            .await
            .map_err(db)?;
        client
            .execute("DELETE FROM sessions WHERE expires_at <= $1", &[&now])
            .await
            .map_err(db)?;
        client
            .execute(
                "DELETE FROM large_events WHERE at < $1",
                &[&(now - LARGE_EVENT_RETENTION)],
            )
            .await
            .map_err(db)?;
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }

    async fn export(&self, sink: mpsc::Sender<snapshot::Record>) -> StoreResult<()> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db)?;
        match export_from(&tx, &sink).await {
            // The receiver is gone: stop, without error.
            Err(Exported::Stopped) => Ok(()),
            Err(Exported::Failed(err)) => Err(err),
            Ok(()) => tx.commit().await.map_err(db),
        }
    }

    async fn is_empty(&self) -> StoreResult<bool> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM repos)
                    AND NOT EXISTS (SELECT 1 FROM jobs)
                    AND NOT EXISTS (SELECT 1 FROM agents)
                    AND NOT EXISTS (SELECT 1 FROM agent_tokens)
                    AND NOT EXISTS (SELECT 1 FROM seen_keys)
                    AND NOT EXISTS (SELECT 1 FROM key_jobs)
                    AND NOT EXISTS (SELECT 1 FROM sessions)
                    AND NOT EXISTS (SELECT 1 FROM notifications)
                    AND NOT (SELECT is_called FROM job_ids)",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(row.get(0))
    }

    async fn import(&self, batch: Vec<snapshot::Record>) -> StoreResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        for record in batch {
            import_record(&tx, record).await?;
        }
        tx.commit().await.map_err(db)
    }

    async fn import_unfinished(&self) -> StoreResult<bool> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT EXISTS (SELECT 1 FROM import_unfinished)", &[])
            .await
            .map_err(db)?;
        Ok(row.get(0))
    }
}

/// Why an export stopped early.
enum Exported {
    /// The receiver was dropped.
    Stopped,
    Failed(StoreError),
}

impl From<StoreError> for Exported {
    fn from(err: StoreError) -> Exported {
        Exported::Failed(err)
    }
}

impl From<tokio_postgres::Error> for Exported {
    fn from(err: tokio_postgres::Error) -> Exported {
        Exported::Failed(db(err))
    }
}

/// Rows an export reads per query (its memory bound, with one log piece).
const EXPORT_BATCH: i64 = 100;

async fn send(
    sink: &mpsc::Sender<snapshot::Record>,
    record: snapshot::Record,
) -> Result<(), Exported> {
    sink.send(record).await.map_err(|_| Exported::Stopped)
}

/// Sends the record `record` makes of each row of `sql`, a page at a time:
/// `sql` selects rows keyed by their first column (text), `$1` the key to
/// start after and `$2` the page's size, in key order.
async fn export_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    sink: &mpsc::Sender<snapshot::Record>,
    sql: &str,
    record: impl Fn(&tokio_postgres::Row) -> StoreResult<snapshot::Record>,
) -> Result<(), Exported> {
    let mut after = String::new();
    loop {
        let rows = tx.query(sql, &[&after, &EXPORT_BATCH]).await?;
        for row in &rows {
            after = row.get(0);
            send(sink, record(row)?).await?;
        }
        if (rows.len() as i64) < EXPORT_BATCH {
            return Ok(());
        }
    }
}

/// Sends every record of the snapshot `tx` sees, in the order
/// [`Store::export`] gives, a batch of rows at a time (keyset pages, so
/// memory stays bounded whatever the store holds).
async fn export_from(
    tx: &deadpool_postgres::Transaction<'_>,
    sink: &mpsc::Sender<snapshot::Record>,
) -> Result<(), Exported> {
    use snapshot::Record;
    export_rows(
        tx,
        sink,
        "SELECT full_name, record FROM repos WHERE full_name > $1 ORDER BY full_name LIMIT $2",
        |row| {
            Ok(Record::Repo {
                repo: decode(row.get(1))?,
            })
        },
    )
    .await?;
    let mut after_id = 0_i64;
    let mut next_job = 1_u64;
    loop {
        let rows = tx
            .query(
                "SELECT id, record, log_len FROM jobs WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after_id, &EXPORT_BATCH],
            )
            .await?;
        for row in &rows {
            after_id = row.get(0);
            let job: Job = decode(row.get(1))?;
            let id = job.id;
            next_job = next_job.max(id.0 + 1);
            let len = to_u64(row.get(2));
            send(sink, Record::Job { job }).await?;
            let mut offset = 0;
            while offset < len {
                let data = PgStore::read_log_with(&**tx, id, offset, snapshot::LOG_PIECE).await?;
                if data.is_empty() {
                    break;
                }
                let piece = data.len() as u64;
                send(
                    sink,
                    Record::Log {
                        job: id,
                        offset,
                        data,
                    },
                )
                .await?;
                offset += piece;
            }
        }
        if (rows.len() as i64) < EXPORT_BATCH {
            break;
        }
    }
    export_rows(
        tx,
        sink,
        "SELECT id, record FROM agents WHERE id > $1 ORDER BY id LIMIT $2",
        |row| {
            Ok(Record::Agent {
                agent: decode(row.get(1))?,
            })
        },
    )
    .await?;
    export_rows(
        tx,
        sink,
        "SELECT id, record FROM agent_tokens WHERE id > $1 ORDER BY id LIMIT $2",
        |row| {
            Ok(Record::AgentToken {
                token: decode(row.get(1))?,
            })
        },
    )
    .await?;
    export_rows(
        tx,
        sink,
        "SELECT key, at FROM seen_keys WHERE key > $1 ORDER BY key LIMIT $2",
        |row| {
            Ok(Record::Key {
                key: row.get(0),
                at: row.get(1),
            })
        },
    )
    .await?;
    export_rows(
        tx,
        sink,
        "SELECT name, job FROM key_jobs WHERE name > $1 ORDER BY name LIMIT $2",
        |row| {
            Ok(Record::KeyJob {
                name: row.get(0),
                job: JobId(to_u64(row.get(1))),
            })
        },
    )
    .await?;
    export_rows(
        tx,
        sink,
        "SELECT id_hash, record FROM sessions WHERE id_hash > $1 ORDER BY id_hash LIMIT $2",
        |row| {
            Ok(Record::Session {
                id_hash: row.get(0),
                session: decode(row.get(1))?,
            })
        },
    )
    .await?;
    export_rows(
        tx,
        sink,
        "SELECT id, record, attempt, due_at FROM notifications WHERE id > $1 ORDER BY id LIMIT $2",
        |row| {
            // The columns hold its claims since it was queued.
            let mut delivery: NotificationDelivery = decode(row.get(1))?;
            delivery.attempt = u32::try_from(row.get::<_, i64>(2)).unwrap_or(u32::MAX);
            delivery.due_at = row.get(3);
            Ok(Record::Notification { delivery })
        },
    )
    .await?;
    let sequence_next = next_from_sequence(&**tx).await?;
    send(
        sink,
        Record::NextJobId {
            next: next_job.max(sequence_next),
        },
    )
    .await
}

/// The id `nextval('job_ids')` would give.
async fn next_from_sequence(client: &impl GenericClient) -> StoreResult<u64> {
    let row = client
        .query_one("SELECT last_value, is_called FROM job_ids", &[])
        .await
        .map_err(db)?;
    let last = to_u64(row.get(0));
    Ok(if row.get::<_, bool>(1) {
        last + 1
    } else {
        last
    })
}

/// Writes one snapshot record as it is.
async fn import_record(
    tx: &deadpool_postgres::Transaction<'_>,
    record: snapshot::Record,
) -> StoreResult<()> {
    use snapshot::Record;
    let taken = |what: String| {
        move |err: tokio_postgres::Error| {
            if err.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                StoreError::Conflict(format!("{what} is already in the store"))
            } else {
                db(err)
            }
        }
    };
    match record {
        Record::Repo { repo } => {
            let hook = repo.github.as_ref().map(|github| github.hook_id.clone());
            tx.execute(
                "INSERT INTO repos (full_name, hook_id, record) VALUES ($1, $2, $3)",
                &[&repo.full_name(), &hook, &encode(&repo)?],
            )
            .await
            .map_err(taken(format!("repository {}", repo.full_name())))?;
        }
        Record::Job { job } => {
            insert_job(&**tx, &job).await?;
        }
        Record::Log { job, offset, data } => {
            if data.is_empty() {
                return Ok(());
            }
            let end = offset + data.len() as u64;
            tx.execute(
                "INSERT INTO log_chunks (job, start, data) VALUES ($1, $2, $3)",
                &[&to_i64(job.0), &to_i64(offset), &data.as_ref()],
            )
            .await
            .map_err(taken(format!("the log of job {job} at {offset}")))?;
            tx.execute(
                "UPDATE jobs SET log_len = greatest(log_len, $2) WHERE id = $1",
                &[&to_i64(job.0), &to_i64(end)],
            )
            .await
            .map_err(db)?;
        }
        Record::Agent { agent } => {
            tx.execute(
                "INSERT INTO agents (id, name, token_id, record) VALUES ($1, $2, $3, $4)",
                &[&agent.id.0, &agent.name, &agent.token_id, &encode(&agent)?],
            )
            .await
            .map_err(taken(format!("agent {}", agent.name)))?;
        }
        Record::AgentToken { token } => {
            tx.execute(
                "INSERT INTO agent_tokens (id, token_hash, created_at, record)
                 VALUES ($1, $2, $3, $4)",
                &[
                    &token.id,
                    &token.token_hash,
                    &token.created_at,
                    &encode(&token)?,
                ],
            )
            .await
            .map_err(taken(format!("agent token {}", token.id)))?;
        }
        Record::Key { key, at } => {
            tx.execute(
                "INSERT INTO seen_keys (key, at) VALUES ($1, $2)",
                &[&key, &at],
            )
            .await
            .map_err(taken("a key".to_owned()))?;
        }
        Record::KeyJob { name, job } => {
            // Kept as long as the key it was made with (a name is the key,
            // or the key and a hash).
            tx.execute(
                "INSERT INTO key_jobs (name, job, at)
                 VALUES ($1, $2, coalesce(
                     (SELECT max(at) FROM seen_keys
                      WHERE key = $1 OR starts_with($1, key || '#')),
                     now()))",
                &[&name, &to_i64(job.0)],
            )
            .await
            .map_err(taken("a key's job".to_owned()))?;
        }
        Record::Session { id_hash, session } => {
            tx.execute(
                "INSERT INTO sessions (id_hash, expires_at, record) VALUES ($1, $2, $3)",
                &[&id_hash, &session.expires_at, &encode(&session)?],
            )
            .await
            .map_err(taken("a session".to_owned()))?;
        }
        Record::Notification { delivery } => {
            tx.execute(
                "INSERT INTO notifications (id, due_at, attempt, record) VALUES ($1, $2, $3, $4)",
                &[
                    &delivery.id,
                    &delivery.due_at,
                    &i64::from(delivery.attempt),
                    &encode(&delivery)?,
                ],
            )
            .await
            .map_err(taken(format!("notification {}", delivery.id)))?;
        }
        Record::NextJobId { next } => {
            // Never lowered: ids already given stay unique.
            let wanted = next.max(next_from_sequence(&**tx).await?);
            if wanted > 1 {
                tx.execute("SELECT setval('job_ids', $1, true)", &[&to_i64(wanted - 1)])
                    .await
                    .map_err(db)?;
            }
        }
        Record::ImportStarted => {
            tx.execute(
                "INSERT INTO import_unfinished VALUES (true) ON CONFLICT DO NOTHING",
                &[],
            )
            .await
            .map_err(db)?;
        }
        Record::ImportFinished => {
            tx.execute("DELETE FROM import_unfinished", &[])
                .await
                .map_err(db)?;
        }
    }
    Ok(())
}

/// How long one store call may take before it fails as `Unavailable` (the
/// API answers 503). Server-side, `statement_timeout` ends a slow
/// statement; this ends a call whose connection died without closing (a
/// proxy or NAT that swallows packets), which nothing else notices before
/// the kernel does. Exports, imports and maintenance are not bounded: they
/// take as long as what they move (their statements are).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// The PostgreSQL store: the backend, each call bounded by
/// [`OPERATION_TIMEOUT`].
pub struct PostgresStore {
    inner: PgStore,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://`; TLS as its `sslmode` says, verified
    /// against `ca_pem` or the system's roots), migrates the schema and
    /// starts listening for events.
    pub async fn connect(url: &str, ca_pem: Option<Vec<u8>>) -> anyhow::Result<PostgresStore> {
        Ok(PostgresStore {
            inner: PgStore::connect(url, ca_pem).await?,
        })
    }

    /// A call that ran out of time may have left its connection dead in the
    /// pool: the idle connections are dropped (fresh ones are made as
    /// needed), as the Redis store replaces a connection that answers
    /// nothing.
    fn timed_out(&self, operation: &str) {
        tracing::warn!(
            operation,
            timeout = ?OPERATION_TIMEOUT,
            "a PostgreSQL call got no answer; dropping the idle connections"
        );
        self.inner.pool.retain(|_, _| false);
    }

    async fn bounded<T>(
        &self,
        operation: &str,
        call: impl std::future::Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(OPERATION_TIMEOUT, call).await {
            Ok(result) => result,
            Err(_) => {
                self.timed_out(operation);
                Err(StoreError::Unavailable(format!(
                    "PostgreSQL: no answer within {OPERATION_TIMEOUT:?}"
                )))
            }
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> StoreResult<()> {
        self.bounded("ping", self.inner.ping()).await
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.subscribe()
    }

    async fn announce(&self, event: StoreEvent) {
        if tokio::time::timeout(OPERATION_TIMEOUT, self.inner.announce(event))
            .await
            .is_err()
        {
            self.timed_out("announce");
        }
    }

    async fn create_repo(&self, repo: Repo) -> StoreResult<()> {
        self.bounded("create_repo", self.inner.create_repo(repo))
            .await
    }

    async fn get_repo(&self, owner: &str, name: &str) -> StoreResult<Option<Repo>> {
        self.bounded("get_repo", self.inner.get_repo(owner, name))
            .await
    }

    async fn list_repos(&self) -> StoreResult<Vec<Repo>> {
        self.bounded("list_repos", self.inner.list_repos()).await
    }

    async fn delete_repo(&self, owner: &str, name: &str) -> StoreResult<()> {
        self.bounded("delete_repo", self.inner.delete_repo(owner, name))
            .await
    }

    async fn update_repo(&self, old: &Repo, new: Repo) -> StoreResult<bool> {
        self.bounded("update_repo", self.inner.update_repo(old, new))
            .await
    }

    async fn find_repo_by_hook(&self, hook_id: &str) -> StoreResult<Option<Repo>> {
        self.bounded("find_repo_by_hook", self.inner.find_repo_by_hook(hook_id))
            .await
    }

    async fn key_job(&self, key: &str) -> StoreResult<Option<JobId>> {
        self.bounded("key_job", self.inner.key_job(key)).await
    }

    async fn create_job(&self, job: NewJob, now: DateTime<Utc>) -> StoreResult<Job> {
        self.bounded("create_job", self.inner.create_job(job, now))
            .await
    }

    async fn create_job_once(
        &self,
        key: &str,
        names: &[String],
        job: NewJob,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        self.bounded(
            "create_job_once",
            self.inner.create_job_once(key, names, job, now),
        )
        .await
    }

    async fn get_job(&self, id: JobId) -> StoreResult<Option<Job>> {
        self.bounded("get_job", self.inner.get_job(id)).await
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<Job>> {
        self.bounded("list_jobs", self.inner.list_jobs(filter))
            .await
    }

    async fn claim_job(
        &self,
        agent: &AgentRecord,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<Job>> {
        self.bounded("claim_job", self.inner.claim_job(agent, now, lease_until))
            .await
    }

    async fn renew_lease(
        &self,
        id: JobId,
        attempt: u32,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Job> {
        self.bounded(
            "renew_lease",
            self.inner.renew_lease(id, attempt, lease_until),
        )
        .await
    }

    async fn request_cancel(&self, id: JobId, now: DateTime<Utc>) -> StoreResult<Job> {
        self.bounded("request_cancel", self.inner.request_cancel(id, now))
            .await
    }

    async fn finish_job(
        &self,
        id: JobId,
        attempt: u32,
        finish: Finish,
        now: DateTime<Utc>,
    ) -> StoreResult<Finished> {
        self.bounded(
            "finish_job",
            self.inner.finish_job(id, attempt, finish, now),
        )
        .await
    }

    async fn queue_stats(&self) -> StoreResult<QueueStats> {
        self.bounded("queue_stats", self.inner.queue_stats()).await
    }

    async fn expire_leases(&self, now: DateTime<Utc>) -> StoreResult<Vec<Job>> {
        self.bounded("expire_leases", self.inner.expire_leases(now))
            .await
    }

    async fn extend_leases(&self, until: DateTime<Utc>) -> StoreResult<()> {
        self.bounded("extend_leases", self.inner.extend_leases(until))
            .await
    }

    async fn append_log(
        &self,
        id: JobId,
        attempt: u32,
        offset: u64,
        data: Bytes,
    ) -> StoreResult<u64> {
        self.bounded(
            "append_log",
            self.inner.append_log(id, attempt, offset, data),
        )
        .await
    }

    async fn append_controller_line(&self, id: JobId, line: &str) -> StoreResult<u64> {
        self.bounded(
            "append_controller_line",
            self.inner.append_controller_line(id, line),
        )
        .await
    }

    async fn read_log(&self, id: JobId, offset: u64, max: usize) -> StoreResult<Bytes> {
        self.bounded("read_log", self.inner.read_log(id, offset, max))
            .await
    }

    async fn log_len(&self, id: JobId) -> StoreResult<u64> {
        self.bounded("log_len", self.inner.log_len(id)).await
    }

    async fn register_agent(&self, agent: AgentRecord) -> StoreResult<AgentRecord> {
        self.bounded("register_agent", self.inner.register_agent(agent))
            .await
    }

    async fn get_agent(&self, id: &AgentId) -> StoreResult<Option<AgentRecord>> {
        self.bounded("get_agent", self.inner.get_agent(id)).await
    }

    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        self.bounded("list_agents", self.inner.list_agents()).await
    }

    async fn touch_agent(
        &self,
        id: &AgentId,
        now: DateTime<Utc>,
        controller: &str,
    ) -> StoreResult<()> {
        self.bounded("touch_agent", self.inner.touch_agent(id, now, controller))
            .await
    }

    async fn create_agent_token(&self, token: AgentTokenRecord) -> StoreResult<()> {
        self.bounded("create_agent_token", self.inner.create_agent_token(token))
            .await
    }

    async fn list_agent_tokens(&self) -> StoreResult<Vec<AgentTokenRecord>> {
        self.bounded("list_agent_tokens", self.inner.list_agent_tokens())
            .await
    }

    async fn find_agent_token(&self, token_hash: &str) -> StoreResult<Option<AgentTokenRecord>> {
        self.bounded("find_agent_token", self.inner.find_agent_token(token_hash))
            .await
    }

    async fn delete_agent_token(&self, id: &str) -> StoreResult<()> {
        self.bounded("delete_agent_token", self.inner.delete_agent_token(id))
            .await
    }

    async fn create_session(&self, id_hash: &str, session: SessionRecord) -> StoreResult<()> {
        self.bounded(
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
        self.bounded("get_session", self.inner.get_session(id_hash, now))
            .await
    }

    async fn delete_session(&self, id_hash: &str) -> StoreResult<()> {
        self.bounded("delete_session", self.inner.delete_session(id_hash))
            .await
    }

    async fn queue_notifications(&self, deliveries: Vec<NotificationDelivery>) -> StoreResult<()> {
        self.bounded(
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
        self.bounded(
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
        self.bounded(
            "retry_notification",
            self.inner.retry_notification(id, attempt, due_at),
        )
        .await
    }

    async fn finish_notification(&self, id: &str, attempt: u32) -> StoreResult<bool> {
        self.bounded(
            "finish_notification",
            self.inner.finish_notification(id, attempt),
        )
        .await
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
        self.bounded("is_empty", self.inner.is_empty()).await
    }

    async fn import(&self, batch: Vec<snapshot::Record>) -> StoreResult<()> {
        self.inner.import(batch).await
    }

    async fn import_unfinished(&self) -> StoreResult<bool> {
        self.bounded("import_unfinished", self.inner.import_unfinished())
            .await
    }
}

#[cfg(test)]
mod tests;
