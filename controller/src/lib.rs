//! The Hobotnica controller: REST API, gRPC services for agents and log
//! tailing, the job store and queue.
//!
//! `Controller::open` prepares everything that can fail at start-up (data
//! directory, tokens, store); `Controller::serve` runs the servers and
//! background tasks until the shutdown token is cancelled. The binary and
//! `hobot up` compose the two.

mod agents;
mod ansi;
mod auth;
mod backups;
mod config;
mod connections;
#[cfg(test)]
mod core_tests;
mod deliveries;
mod error;
mod git;
pub(crate) mod github;
mod grpc;
pub mod health_check;
pub mod http;
mod jobs;
mod logs;
pub mod metrics;
mod notifications;
mod repos;
mod secrets;
mod services;
mod sessions;
mod statuses;
pub mod store;
mod tls;
mod variables;
mod wakeups;
pub mod web;
mod webhook;

pub use config::{CommandLineSecret, ControllerConfig};

/// The controller's parsers of outside input, for the fuzz targets
/// (`fuzz/`) and the property tests — not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::agents::Registration;
    pub use crate::deliveries::{WebhookEvent, parse_event, signature_matches};
    pub use crate::git::check_git_url;

    /// What the controller answers an agent registering with
    /// `registration`: `Err` with the refusal's words.
    pub fn validate_registration(registration: &Registration) -> Result<(), String> {
        crate::agents::validate_registration(registration).map_err(|err| err.to_string())
    }
}
pub use connections::STOP_GRACE;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use chrono::Utc;
use hobotnica_common::private_fs;
use hobotnica_common::proto::agent_service_server::AgentServiceServer;
use hobotnica_common::proto::log_service_server::LogServiceServer;
use hobotnica_common::token::{hash_token, new_token};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use hobotnica_common::secrets::SecretKey;

use crate::connections::{Connections, TrackedListener};
use crate::services::Services;

/// How often HTTP/2 pings keep idle agent connections alive; a ping
/// unanswered for as long ends the connection.
const HTTP2_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);

/// TCP keepalive probes on gRPC connections start after this much silence.
const TCP_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(60);
/// Concurrent gRPC streams per connection (an agent uses a handful).
const GRPC_MAX_STREAMS: u32 = 256;

/// The controller's bound sockets (tests bind `127.0.0.1:0`).
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
    /// `/metrics` (`--metrics-listen`), when asked for.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &ControllerConfig) -> anyhow::Result<Listeners> {
        let http = TcpListener::bind(config.listen).await.with_context(|| {
            format!(
                "cannot listen on {} (REST; choose another address with --listen)",
                config.listen
            )
        })?;
        let grpc = TcpListener::bind(config.grpc_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (gRPC; choose another address with --grpc-listen)",
                    config.grpc_listen
                )
            })?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "cannot listen on {addr} (metrics; choose another address with --metrics-listen)"
                )
            })?),
            None => None,
        };
        Ok(Listeners {
            http,
            grpc,
            metrics,
        })
    }
}

/// An opened controller: store, tokens and services, ready to serve.
pub struct Controller {
    services: Services,
    admin_token: String,
    statuses_rx: statuses::StatusReceiver,
}

/// The key that seals secrets: from `--secret-key-file`, or (embedded store
/// only) generated once into `<data-dir>/secret-key`.
fn load_secret_key(config: &ControllerConfig) -> anyhow::Result<SecretKey> {
    let path = match &config.secret_key_file {
        Some(path) => path.clone(),
        None => {
            let path = config.data_dir.join("secret-key");
            if !path.exists() {
                tracing::warn!(
                    path = %path.display(),
                    "no --secret-key-file: generated a secret key in the data directory; back it up, or secrets at rest cannot be read"
                );
                write_private_file(&path, &format!("{}\n", SecretKey::generate_hex()))?;
            }
            path
        }
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the secret key {}", path.display()))?;
    SecretKey::from_hex(&text).with_context(|| format!("invalid secret key in {}", path.display()))
}

/// Writes `contents` to `path` readable by the owner only (mode 0600).
pub fn write_private_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    private_fs::write_private_file(path, contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// How many permission changes in the data directory are logged one by one.
const LOGGED_MODE_CHANGES: usize = 20;

/// Creates the data directory (0700), or takes the group and other bits off
/// it, off everything directly in it and off every log file, and logs what
/// was changed. Files the controller creates there are 0600 from the start;
/// this tightens what an older version or another umask left.
pub fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    let context = || {
        format!(
            "cannot set up the data directory {} (it must be writable by, or belong to, the user the controller runs as)",
            dir.display()
        )
    };
    let mut changes: Vec<_> = private_fs::create_private_dir(dir)
        .with_context(context)?
        .into_iter()
        .collect();
    for entry in std::fs::read_dir(dir).with_context(context)? {
        let path = entry.with_context(context)?.path();
        let changed = if path.file_name().is_some_and(|name| name == "logs") {
            private_fs::make_tree_private(&path)
        } else {
            private_fs::make_private(&path).map(|change| change.into_iter().collect())
        };
        changes.extend(changed.with_context(|| format!("cannot make {} private", path.display()))?);
    }
    for change in changes.iter().take(LOGGED_MODE_CHANGES) {
        tracing::warn!(
            path = %change.path.display(),
            old_mode = %format!("{:04o}", change.old_mode),
            new_mode = %format!("{:04o}", change.new_mode),
            "other users could reach this file in the data directory; made it private"
        );
    }
    if let Some(more) = changes
        .len()
        .checked_sub(LOGGED_MODE_CHANGES)
        .filter(|n| *n > 0)
    {
        tracing::warn!(more, "made more files in the data directory private");
    }
    Ok(())
}

/// Reads a token kept in `path`, or creates one there (mode 0600).
pub fn load_or_create_token(path: &Path, prefix: &str) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => Ok(token.trim().to_owned()),
        Ok(_) => anyhow::bail!("{} is empty", path.display()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let token = new_token(prefix);
            write_private_file(path, &format!("{token}\n"))?;
            Ok(token)
        }
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

impl Controller {
    /// Opens the store under the data directory and loads (or creates) the
    /// admin token.
    pub async fn open(mut config: ControllerConfig) -> anyhow::Result<Controller> {
        config.read_secret_files()?;
        config.validate()?;
        config.warn_about_command_line_secrets();
        prepare_data_dir(&config.data_dir)?;
        let admin_token = match &config.admin_token {
            Some(token) => token.expose().to_owned(),
            None => load_or_create_token(
                &config.data_dir.join("admin-token"),
                hobotnica_common::token::ADMIN_TOKEN_PREFIX,
            )?,
        };
        let metrics = Arc::new(metrics::Metrics::for_store(
            config.redis_url.is_some(),
            config.postgres_url.is_some(),
        ));
        let store: Arc<dyn store::Store> = Arc::new(store::metered::MeteredStore::new(
            open_store(&config).await?,
            metrics.clone(),
        ));
        // Agents of jobs that ran before a restart get a full lease (and
        // the time their reconnect backoff may take) to re-attach.
        store
            .extend_leases(services::lease_after_outage(
                Utc::now(),
                config.lease_timeout,
            ))
            .await
            .context("cannot extend running leases")?;
        let secret_key = load_secret_key(&config)?;
        let (statuses, statuses_rx) = statuses::channel();
        let services = Services {
            store,
            admin_token_hash: hash_token(&admin_token).into(),
            agent_pool_token_hash: config
                .agent_token
                .as_ref()
                .map(|token| hash_token(token.expose()).into()),
            secret_key,
            github: github::GitHub::new(&config.github_url, &config.github_api_url)
                .with_metrics(metrics.clone()),
            credentials: Arc::new(auth::CredentialCache::default()),
            failures: Arc::new(auth::FailedAttempts::new(config.auth_failure_limit)),
            statuses,
            public_url: Arc::new(std::sync::OnceLock::new()),
            idle_sessions: Arc::new(wakeups::IdleSessions::default()),
            session_events: tokio::sync::broadcast::channel(wakeups::SESSION_EVENT_CAPACITY).0,
            notifications_due: Arc::new(tokio::sync::Notify::new()),
            metrics,
            config: Arc::new(config),
        };
        Ok(Controller {
            services,
            admin_token,
            statuses_rx,
        })
    }

    /// The admin API token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.services.config.data_dir.clone()
    }

    /// Serves REST and gRPC until `shutdown` is cancelled, then lets
    /// in-flight requests finish for up to [`STOP_GRACE`] (10 s), cuts the
    /// connections still open, and returns. With `--tls-cert`, both
    /// listeners speak TLS only.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        self.serve_with_local_grpc(listeners, None, shutdown).await
    }

    /// Like [`Controller::serve`], plus plaintext gRPC on `local_grpc`, a
    /// loopback listener for the in-process agents of `hobot up`: they need
    /// no certificate when the public listeners speak TLS, and no client
    /// certificate under `--client-ca`.
    ///
    /// In order: check the transport (TLS, loopback), publish the
    /// endpoints, start the background tasks, start the servers, then wait
    /// for `shutdown` and drain within [`STOP_GRACE`].
    pub async fn serve_with_local_grpc(
        self,
        listeners: Listeners,
        local_grpc: Option<TcpListener>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let services = self.services;
        let tls = check_transport(&services.config, local_grpc.as_ref())?;
        let (http_addr, grpc_addr) = publish_endpoints(&services, tls.is_some(), &listeners)?;
        let tasks = spawn_background_tasks(&services, self.statuses_rx, tls.as_ref(), &shutdown);
        if let Some(listener) = listeners.metrics {
            tracing::info!(metrics_addr = %listener.local_addr()?, "serving /metrics (no token: keep it on loopback or a private network)");
            tasks.spawn(metrics::serve(listener, services.clone(), shutdown.clone()));
        }

        // Every accepted connection is tracked, so that the graceful stop
        // can be bounded (see `connections`).
        let servers = Servers {
            services,
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            connections: Connections::default(),
        };
        let grpc = servers.grpc(listeners.grpc, tls.as_ref());
        let local_grpc = servers.local_grpc(local_grpc);
        let http = servers.http(listeners.http, tls.as_ref());

        tracing::info!(%http_addr, %grpc_addr, tls = tls.is_some(), "controller serving");
        let serving = async { tokio::join!(http, grpc, local_grpc) };
        stop_within_grace(serving, &shutdown, &tasks, &servers.connections).await?;
        tracing::info!("controller stopped");
        Ok(())
    }
}

/// Loads the TLS settings (`None`: plaintext), refuses a local agents'
/// listener that is not on loopback, and warns about plaintext on every
/// non-loopback address.
fn check_transport(
    config: &ControllerConfig,
    local_grpc: Option<&TcpListener>,
) -> anyhow::Result<Option<tls::ServerTls>> {
    let tls = tls::ServerTls::load(config)?;
    if let Some(local) = local_grpc {
        let addr = local.local_addr()?;
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "the local agents' gRPC listener must be on loopback, not {addr}"
        );
    }
    if tls.is_none() {
        for addr in config.non_loopback_addrs() {
            tracing::warn!(
                %addr,
                "INSECURE: serving plaintext on a non-loopback address (--insecure); \
                 agent and admin tokens and logs cross the network unencrypted. \
                 Use --tls-cert and --tls-key."
            );
        }
    }
    Ok(tls)
}

/// Sets the public URL (`--public-url`, else the REST listener's address)
/// and writes it with the gRPC URL to `<data-dir>/controller.json`, where
/// `hobot` finds this controller. Returns the bound REST and gRPC addresses.
fn publish_endpoints(
    services: &Services,
    tls: bool,
    listeners: &Listeners,
) -> anyhow::Result<(std::net::SocketAddr, std::net::SocketAddr)> {
    let scheme = if tls { "https" } else { "http" };
    let http_addr = listeners.http.local_addr()?;
    let grpc_addr = listeners.grpc.local_addr()?;
    let public_url = services
        .config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{http_addr}"));
    let _ = services
        .public_url
        .set(public_url.trim_end_matches('/').to_owned());
    let endpoints = serde_json::json!({
        "url": public_url,
        "grpc_url": format!("{scheme}://{grpc_addr}"),
    });
    write_private_file(
        &services.config.data_dir.join("controller.json"),
        &format!("{endpoints:#}\n"),
    )?;
    Ok((http_addr, grpc_addr))
}

/// Starts the tasks that run beside the servers (lease reaper,
/// maintenance, commit statuses, idle-session wake-ups, GitHub access checks and the SIGHUP
/// handler, which reloads the TLS certificate), each ending at `shutdown`. The returned
/// tracker also takes the tasks the servers spawn; the stop waits for all.
fn spawn_background_tasks(
    services: &Services,
    statuses_rx: statuses::StatusReceiver,
    tls: Option<&tls::ServerTls>,
    shutdown: &CancellationToken,
) -> TaskTracker {
    let tasks = TaskTracker::new();
    tasks.spawn(jobs::lease_reaper(services.clone(), shutdown.clone()));
    tasks.spawn(jobs::maintenance(services.clone(), shutdown.clone()));
    tasks.spawn(statuses::post_statuses(
        services.clone(),
        statuses_rx,
        shutdown.clone(),
    ));
    tasks.spawn(notifications::send_notifications(
        services.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(wakeups::wake_idle_sessions(
        services.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(repos::recheck_github_access(
        services.clone(),
        shutdown.clone(),
    ));
    // Without TLS too: SIGHUP's default action would end the controller
    // (`systemctl reload` sends it), and systemd does not restart a service
    // that SIGHUP ended.
    tasks.spawn(reload_certificate_on_sighup(
        tls.map(|tls| tls.certs.clone()),
        shutdown.clone(),
    ));
    tasks
}

/// What the REST and gRPC servers share. Each server future it makes stops
/// accepting when `shutdown` is cancelled, then ends once its connections
/// have (the graceful stop); every connection it accepts is tracked in
/// `connections`, so that [`stop_within_grace`] can cut them.
struct Servers {
    services: Services,
    /// Request handlers and sessions that must outlive their request.
    tasks: TaskTracker,
    shutdown: CancellationToken,
    connections: Connections,
}

impl Servers {
    /// AgentService and LogService, one router per listener;
    /// `require_agent_cert` is mutual TLS for AgentService (`--client-ca`).
    fn grpc_router(&self, require_agent_cert: bool) -> tonic::transport::server::Router {
        let agent_service = AgentServiceServer::with_interceptor(
            grpc::AgentGrpc::new(
                self.services.clone(),
                self.shutdown.clone(),
                self.tasks.clone(),
            ),
            tls::RequireClientCert {
                required: require_agent_cert,
            },
        );
        let log_service = LogServiceServer::new(grpc::LogGrpc::new(
            self.services.clone(),
            self.shutdown.clone(),
        ));
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_INTERVAL))
            .tcp_keepalive(Some(TCP_KEEPALIVE))
            .max_concurrent_streams(Some(GRPC_MAX_STREAMS))
            .add_service(agent_service)
            .add_service(log_service)
    }

    /// Connections each listener holds open at most.
    fn max_connections(&self) -> usize {
        self.services.config.max_connections as usize
    }

    /// Resolves when `shutdown` is cancelled: the servers' stop signal.
    fn cancelled(&self) -> impl Future<Output = ()> + Send + 'static {
        let token = self.shutdown.clone();
        async move { token.cancelled().await }
    }

    /// The public gRPC server on `listener`, TLS only with `tls`.
    fn grpc(
        &self,
        listener: TcpListener,
        tls: Option<&tls::ServerTls>,
    ) -> BoxFuture<'static, Result<(), tonic::transport::Error>> {
        match tls {
            Some(tls) => Box::pin(
                self.grpc_router(tls.require_agent_cert)
                    .serve_with_incoming_shutdown(
                        self.connections.track_incoming(
                            tls::TlsListener::new(listener, tls.grpc.clone()).into_stream(),
                            self.max_connections(),
                        ),
                        self.cancelled(),
                    ),
            ),
            None => Box::pin(
                self.grpc_router(false).serve_with_incoming_shutdown(
                    self.connections
                        .track_incoming(no_delay(listener), self.max_connections()),
                    self.cancelled(),
                ),
            ),
        }
    }

    /// The local agents' plaintext gRPC server on `listener`; without one,
    /// a future that is done at once.
    async fn local_grpc(
        &self,
        listener: Option<TcpListener>,
    ) -> Result<(), tonic::transport::Error> {
        match listener {
            Some(listener) => {
                self.grpc_router(false)
                    .serve_with_incoming_shutdown(
                        self.connections
                            .track_incoming(no_delay(listener), self.max_connections()),
                        self.cancelled(),
                    )
                    .await
            }
            None => Ok(()),
        }
    }

    /// The REST server on `listener`, TLS only with `tls`.
    fn http(
        &self,
        listener: TcpListener,
        tls: Option<&tls::ServerTls>,
    ) -> BoxFuture<'static, std::io::Result<()>> {
        let router = http::router(
            self.services.clone(),
            self.tasks.clone(),
            web::router(self.services.clone(), self.shutdown.clone()),
        );
        let config = &self.services.config;
        let limits = http::server::Limits {
            max_connections: self.max_connections(),
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
        };
        match tls {
            Some(tls) => Box::pin(http::server::serve(
                TrackedListener {
                    inner: tls::TlsListener::new(listener, tls.rest.clone()),
                    connections: self.connections.clone(),
                },
                router,
                limits,
                self.shutdown.clone(),
            )),
            None => Box::pin(http::server::serve(
                TrackedListener {
                    inner: listener,
                    connections: self.connections.clone(),
                },
                router,
                limits,
                self.shutdown.clone(),
            )),
        }
    }
}

/// Runs `servers` (REST, gRPC, local gRPC) until they have stopped, or
/// until [`STOP_GRACE`] after `shutdown`: then the connections still open
/// are cut. The tracked `tasks` get what is left of the grace (or
/// [`AFTER_CUT`] after a cut); those still running are left behind and
/// logged. Returns the first server's error, once everything stopped.
async fn stop_within_grace(
    servers: impl Future<
        Output = (
            std::io::Result<()>,
            Result<(), tonic::transport::Error>,
            Result<(), tonic::transport::Error>,
        ),
    >,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
    connections: &Connections,
) -> anyhow::Result<()> {
    let grace_over = async {
        shutdown.cancelled().await;
        tokio::time::sleep(STOP_GRACE).await;
    };
    tokio::pin!(grace_over);
    let stopped = tokio::select! {
        results = servers => Some(results),
        () = &mut grace_over => None,
    };
    tasks.close();
    match stopped {
        Some((http_result, grpc_result, local_result)) => {
            // Changes whose clients went away run on, tracked: they get
            // what is left of the same grace.
            tokio::select! {
                () = tasks.wait() => {}
                () = &mut grace_over => abandon(tasks),
            }
            http_result.context("the REST server failed")?;
            grpc_result.context("the gRPC server failed")?;
            local_result.context("the local agents' gRPC server failed")?;
        }
        None => {
            // The servers (and their graceful stops) are dropped here;
            // the connection tasks they spawned end on the cut.
            let cut = connections.cut();
            tracing::warn!(
                connections = cut,
                grace = ?STOP_GRACE,
                "connections still open when the stop's grace ran out were cut"
            );
            if tokio::time::timeout(AFTER_CUT, tasks.wait()).await.is_err() {
                abandon(tasks);
            }
        }
    }
    Ok(())
}

/// After the stop's grace ran out and the connections were cut, how long
/// the controller's tasks get to notice (sessions and streams end on the
/// cut) before those still running are left behind.
const AFTER_CUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Logs the tasks (request handlers past the grace) the stop leaves behind.
fn abandon(tasks: &TaskTracker) {
    tracing::warn!(
        tasks = tasks.len(),
        grace = ?STOP_GRACE,
        "tasks still running when the stop's grace ran out were left behind (a request handler may not have finished)"
    );
}

/// A boxed server future (the TLS and plaintext servers differ in type).
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Tracing to stderr, filtered by `HOBOTNICA_LOG` (default `info`).
pub fn init_tracing(format: hobotnica_common::logging::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOBOTNICA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    hobotnica_common::logging::init(format, filter);
}

/// Reads the TLS certificate and key again on each SIGHUP (after a renewal),
/// until `shutdown`. A certificate that cannot be read leaves the previous
/// one in use. Without TLS (`certs` is `None`), SIGHUP only logs that there
/// is nothing to reload.
async fn reload_certificate_on_sighup(
    certs: Option<Arc<tls::CertFiles>>,
    shutdown: CancellationToken,
) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGHUP: the TLS certificate is read at start-up only");
            return;
        }
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            received = hangups.recv() => {
                if received.is_none() {
                    return;
                }
                let Some(certs) = &certs else {
                    tracing::info!("SIGHUP: no TLS certificate to reload");
                    continue;
                };
                match certs.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    Err(err) => tracing::error!(
                        error = %format!("{err:#}"),
                        "SIGHUP: the TLS certificate could not be read; the previous one stays in use"
                    ),
                }
            }
        }
    }
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
pub async fn shutdown_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut sigterm) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = sigterm.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    // Cancel first: logging may fail (a closed stderr) and must not stop it.
    shutdown.cancel();
    tracing::info!("shutting down");
}

/// `hobot admin rotate-key`: re-encrypts every secret at rest in the store
/// that `config` names (embedded: stop the controller first; Redis: restart
/// every controller with the new key afterwards) from the key in `old_key`
/// to the key in `new_key`. Returns how many repositories were rewritten.
pub async fn rotate_secret_key(
    config: &ControllerConfig,
    old_key: &Path,
    new_key: &Path,
) -> anyhow::Result<usize> {
    let read = |path: &Path| -> anyhow::Result<SecretKey> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the key {}", path.display()))?;
        SecretKey::from_hex(&text).with_context(|| format!("invalid key in {}", path.display()))
    };
    let (old, new) = (read(old_key)?, read(new_key)?);
    let mut config = config.clone();
    config.read_secret_files()?;
    let store = open_store(&config).await?;
    secrets::rotate_secret_key(store.as_ref(), &old, &new).await
}

/// The store `config` names: PostgreSQL with `--postgres`, Redis with
/// `--redis`, else the embedded store in the data directory
/// (`store::open`). One that holds the remains of an unfinished import is
/// refused.
async fn open_store(config: &ControllerConfig) -> anyhow::Result<Arc<dyn store::Store>> {
    let location = match (&config.postgres_url, &config.redis_url) {
        (Some(url), _) => store::open::StoreLocation::Postgres {
            url: url.clone(),
            ca_cert: config.postgres_ca_cert.clone(),
        },
        (None, Some(url)) => store::open::StoreLocation::Redis {
            url: url.clone(),
            ca_cert: config.redis_ca_cert.clone(),
        },
        (None, None) => store::open::StoreLocation::Embedded {
            data_dir: config.data_dir.clone(),
            wait: config.store_wait,
        },
    };
    store::open::open_to_serve(&location).await
}

/// The connections `listener` accepts, with Nagle's algorithm off (as the
/// TLS listener does): tonic sets `TCP_NODELAY` only on listeners it binds
/// itself. With it on, a log acknowledgement written right after another
/// small frame waited for the agent's delayed ACK, about 40 ms, before it
/// left: a job's completion waited that long for its last log byte.
fn no_delay(
    listener: TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    use futures_util::StreamExt as _;
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::{Args as _, FromArgMatches as _};
    use tokio::io::AsyncWriteExt as _;

    use super::*;
    use crate::store::Store as _;
    use crate::store::gated::GatedStore;

    /// Longer than anything here takes.
    const DEADLINE: Duration = Duration::from_secs(30);

    /// A repository is registered; its client goes away while the change
    /// is under way (the store's insert held), and the controller is asked
    /// to stop. Before the fix the change ran in a task nobody waited for:
    /// `serve` returned as soon as the connection closed, and a process
    /// exiting then lost the change half way. Now `serve` returns only once
    /// the change is complete.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serve_returns_only_once_a_change_whose_client_went_away_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let command = ControllerConfig::augment_args(clap::Command::new("t").no_binary_name(true));
        let matches = command
            .try_get_matches_from([
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "127.0.0.1:0",
            ])
            .unwrap();
        let config = ControllerConfig::from_arg_matches(&matches).unwrap();
        let mut controller = Controller::open(config).await.unwrap();
        let gated = Arc::new(GatedStore::new(controller.services.store.clone()));
        controller.services.store = gated.clone();
        let (entered, release) = gated.hold_create_repo();
        let listeners = Listeners::bind(&controller.services.config).await.unwrap();
        let addr = listeners.http.local_addr().unwrap();
        let token = controller.admin_token().to_owned();
        let shutdown = CancellationToken::new();
        let mut serving = tokio::spawn(controller.serve(listeners, shutdown.clone()));

        let body = r#"{"name":"demo","git_url":"file:///srv/demo.git"}"#;
        let request = format!(
            "POST /api/v1/repos HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(request.as_bytes()).await.unwrap();
        tokio::time::timeout(DEADLINE, entered)
            .await
            .expect("the request reaches the store")
            .unwrap();
        // The client goes away, then the controller is asked to stop.
        drop(client);
        shutdown.cancel();

        let early = tokio::time::timeout(STOP_GRACE / 4, &mut serving).await;
        assert!(
            early.is_err(),
            "serve returned while a change was under way: {early:?}"
        );
        let _ = release.send(());
        tokio::time::timeout(DEADLINE, serving)
            .await
            .expect("serve returns once the change is complete")
            .unwrap()
            .unwrap();
        assert!(
            gated.get_repo("local", "demo").await.unwrap().is_some(),
            "the repository was registered"
        );
    }
}
