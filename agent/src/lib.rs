//! The Hobotnica agent: registers with a controller, takes jobs over a gRPC
//! stream, runs `make <target>` in a git work tree at the job's commit and
//! ships the output back.
//!
//! Tasks (all owned, none orphaned):
//!
//! | task | spawned by | ends when |
//! | --- | --- | --- |
//! | pool loop ([`run`]) | the caller | shutdown and jobs drained, or a fatal error |
//! | job supervisor | pool, per assignment (`JoinSet`) | job reported or dropped, cleaned up |
//! | lease renewal | supervisor (`JoinSet`) | supervisor stops it, or job gone |
//! | log shipper | supervisor (`JoinSet`) | supervisor stops it, or job gone |
//! | forget repository | pool, per ForgetRepository (`JoinSet`) | cache and idle trees deleted; aborted when the pool returns |
//!
//! On shutdown the pool sends `Capacity{free_slots: 0}`, waits for running
//! jobs up to the drain timeout, then cancels them ("agent shut down").

mod config;
mod connection;
mod health;
mod job;
mod logs;
mod metrics;
mod pool;
mod process;
mod sandbox;
mod work_dir_lock;
mod workspace;

use std::sync::Arc;

use anyhow::Context as _;
pub use config::AgentConfig;
use tracing::Instrument as _;

/// The agent's masker, for the fuzz targets (`fuzz/`) — not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::logs::{Masker, Secrets};
}

/// The agent's own client side of the protocol (registration, the dispatch
/// session, completions), for the benchmark that holds a thousand sessions
/// in one process — not an API.
#[doc(hidden)]
pub mod protocol {
    pub use crate::connection::{
        AgentIdentity, Connection, Registration, RpcError, SessionCommand, SessionStream,
        TlsOptions,
    };
    pub use crate::job::{Completion, JobKey, JobSpec};
    pub use crate::pool::HEARTBEAT_INTERVAL;
}
use tokio_util::sync::CancellationToken;

use crate::connection::{AgentIdentity, Connection};
use crate::job::JobContext;
use crate::workspace::Workspaces;

/// Runs the agent until `shutdown` is cancelled and running jobs have drained
/// (or the drain timeout passed). Returns an error when the agent cannot
/// work at all: invalid configuration, token refused, protocol mismatch.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with_stop_now(config, shutdown, CancellationToken::new()).await
}

/// Like [`run`]; cancelling `stop_now` (after `shutdown`) skips the rest of
/// the drain timeout: running jobs are cancelled at once, report, and the
/// agent returns.
pub async fn run_with_stop_now(
    config: AgentConfig,
    shutdown: CancellationToken,
    stop_now: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    let token = config.agent_token()?;
    for url in &config.controllers {
        if hobotnica_common::transport::check_url("--controller", url, false).is_err() {
            tracing::warn!(
                controller = %url,
                "INSECURE: plaintext to a non-loopback controller (--insecure); the agent \
                 token and job logs cross the network unencrypted"
            );
        }
    }
    let work_dir = private_work_dir(&config)?;
    // Before anything in the work dir is touched: the clean-up below would
    // break the jobs of another agent still running there.
    let _lock = work_dir_lock::WorkDirLock::acquire(&work_dir)?;
    let spool_dir = work_dir.join("spool");
    create_private_dir(&spool_dir).with_context(|| format!("creating {}", spool_dir.display()))?;
    remove_old_spools(&spool_dir);

    let inherited_env: Arc<[(String, String)]> = config::inherited_environment().into();
    let workspaces = Workspaces::new(&work_dir, &inherited_env, config.git_timeout)
        .with_context(|| format!("preparing {}", work_dir.display()))?;
    workspaces.remove_leftovers().await;
    let sandbox = job_sandbox(&config, &work_dir).await?;

    let name = config.agent_name();
    let identity = AgentIdentity {
        name: name.clone(),
        labels: config.labels_map(),
        concurrency: config.concurrency,
    };
    let connection = Connection::new(
        &config.controllers,
        &token,
        identity,
        &config.tls_options()?,
        config.keepalive,
    )?;
    tracing::info!(
        agent = %name,
        concurrency = config.concurrency,
        work_dir = %work_dir.display(),
        controllers = ?config.controllers,
        version = hobotnica_common::VERSION,
        "agent starting"
    );

    let metrics = Arc::new(metrics::AgentMetrics::new(spool_dir.clone()));
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let metrics_stop = CancellationToken::new();
    let metrics_server = metrics_listener.map(|listener| {
        tracing::info!(metrics_addr = ?listener.local_addr().ok(), "serving /metrics (no token: keep it on loopback or a private network)");
        tokio::spawn(metrics::serve(listener, metrics.clone(), metrics_stop.clone()))
    });
    let context = Arc::new(JobContext {
        connection: connection.clone(),
        metrics,
        workspaces: Arc::new(workspaces),
        spool_dir,
        inherited_env,
        sandbox,
        abandon: CancellationToken::new(),
    });
    let health = health::Reporter::new(
        &work_dir,
        hobotnica_common::service_manager::ServiceManager::new(config.notify_socket.clone()),
    );
    let result = pool::Pool::new(
        connection,
        context,
        config.concurrency,
        config.drain_timeout,
        health.clone(),
    )
    .run(shutdown, stop_now)
    .instrument(tracing::info_span!("agent", agent = %name))
    .await;
    health.stopped();
    // Served until the agent stops, so the last jobs' figures can be read.
    metrics_stop.cancel();
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    result
}

/// `--health-check`: whether the agent working in `config`'s work dir is
/// connected (a line saying so) or not (why), from the status file it keeps
/// there.
///
/// # Errors
/// When it is not running, hangs, or is not connected.
pub fn health_check(config: &AgentConfig) -> Result<String, String> {
    health::check(&config.work_dir)
}

/// Checks, before anything else starts, that this agent can run jobs as
/// configured: with `--isolation sandbox`, that a sandbox can be created.
/// `hobot up` calls it before it starts its controller, so that a missing
/// bubblewrap is one clear line instead of jobs that never start.
pub async fn preflight(config: &AgentConfig) -> anyhow::Result<()> {
    if config.isolation == config::Isolation::None {
        return Ok(());
    }
    let work_dir = private_work_dir(config)?;
    job_sandbox(config, &work_dir).await.map(drop)
}

/// The sandbox jobs run in, checked by creating one; `None` with
/// `--isolation none` (and a warning).
async fn job_sandbox(
    config: &AgentConfig,
    work_dir: &std::path::Path,
) -> anyhow::Result<Option<sandbox::Sandbox>> {
    if config.isolation == config::Isolation::None {
        tracing::warn!(
            "--isolation none: jobs run unsandboxed as the agent's user and can read its \
             files, its token and other jobs' work; use it only where every job is trusted"
        );
        return Ok(None);
    }
    let mut hidden = vec![work_dir.to_owned()];
    hidden.extend(config.token_file.iter().cloned());
    hidden.extend(config.client_key.iter().cloned());
    hidden.extend(config.sandbox_hide.iter().cloned());
    let sandbox = sandbox::Sandbox::new(
        config.bwrap.clone(),
        nix::unistd::geteuid().is_root(),
        &config.sandbox_ro_bind,
        &config.sandbox_rw_bind,
        hidden,
    );
    sandbox
        .check(&work_dir.join("scratch").join(".sandbox-check"))
        .await?;
    Ok(Some(sandbox))
}

/// The work dir, created (or tightened to) 0700, as an absolute path.
fn private_work_dir(config: &AgentConfig) -> anyhow::Result<std::path::PathBuf> {
    create_private_dir(&config.work_dir)
        .with_context(|| format!("creating the work directory {}", config.work_dir.display()))?;
    std::fs::canonicalize(&config.work_dir)
        .with_context(|| format!("resolving the work directory {}", config.work_dir.display()))
}

/// Creates `dir` with mode 0700, or takes the group and other bits off it
/// (and says so): jobs' code, logs and secrets are the agent's alone.
pub(crate) fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    if let Some(change) = hobotnica_common::private_fs::create_private_dir(dir)? {
        tracing::warn!(%change, "other users could reach this directory; made it private");
    }
    Ok(())
}

/// Spools of jobs an earlier run did not finish: those jobs are lost (their
/// leases expire), so their logs have nowhere to go.
fn remove_old_spools(spool_dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(spool_dir) {
        for entry in entries.flatten() {
            if let Err(error) = std::fs::remove_file(entry.path()) {
                tracing::warn!(%error, path = %entry.path().display(), "could not remove an old spool");
            }
        }
    }
}
