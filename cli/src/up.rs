//! `hobot up`: a controller (embedded store) and local agents in one process.
//!
//! Tasks, who stops them and in which order:
//! - the controller's `serve_with_local_grpc`, spawned here, owns the
//!   listeners (the public ones, TLS with `--tls-cert`, and a plaintext
//!   gRPC listener on 127.0.0.1 that only the local agents use) and the
//!   store; it ends when `controller_shutdown` is cancelled, which happens
//!   only after every agent has ended;
//! - one `hobotnica_agent::run` per local agent, spawned here into a
//!   `JoinSet`; each ends when its token (a child of `agents_shutdown`)
//!   is cancelled and its running jobs have drained (at most
//!   [`AGENT_DRAIN_TIMEOUT`]).
//!
//! Ctrl-C or SIGTERM stops the agents, which let running jobs finish (the
//! jobs waited for are printed), then stops the controller. A second signal
//! while the agents drain cancels their running jobs, which end
//! `cancelled` ("agent shut down"), not `lost` a lease later; a third, or a
//! second while the controller stops, stops everything at once (the tasks
//! are aborted).

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use hobotnica_agent::AgentConfig;
use hobotnica_common::private_fs::Secret;
use hobotnica_controller::store::embedded::OpenError;
use hobotnica_controller::{Controller, ControllerConfig, Listeners};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::config::UpArgs;

/// How long a local agent's running jobs may take to finish on shutdown.
const AGENT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// File holding the local agents' pool token in the data directory.
const AGENT_TOKEN_FILE: &str = "agent-token";

/// `hobot up`: prepares the data directory and the local agents'
/// configurations, starts the controller and the agents, prints where they
/// are, then runs until a signal or a task's end (see `run`).
pub async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let UpArgs {
        controller: mut config,
        agents,
        agent_concurrency,
        agent_labels,
        agent_work_dir,
    } = args;
    anyhow::ensure!(
        agent_concurrency >= 1,
        "--agent-concurrency must be at least 1"
    );

    config.read_secret_files()?;
    // The listeners first: a port in use must leave no half-made data
    // directory behind (a new token and no controller.json would send
    // other hobot commands there to whatever holds the port).
    let listeners = Listeners::bind(&config).await?;
    hobotnica_controller::prepare_data_dir(&config.data_dir)?;
    let agent_token = local_agent_token(&config)?;
    config.agent_token = Some(agent_token.clone());
    let agent_work_dir = agent_work_dir.unwrap_or_else(|| config.data_dir.join("agent"));
    let hidden = hidden_from_jobs(&config)?;

    // The local agents get a plaintext gRPC listener of their own on
    // loopback: they need neither the CA nor a client certificate when the
    // public listeners speak TLS, and their traffic never leaves the host.
    let local_grpc = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .context("cannot listen on 127.0.0.1 for the local agents")?;
    let local_grpc_addr = local_grpc.local_addr()?;
    let agent_configs = (1..=agents)
        .map(|i| {
            local_agent_config(LocalAgent {
                controller: format!("http://{local_grpc_addr}"),
                token: agent_token.clone(),
                name: format!("local-{i}"),
                labels: agent_labels.clone(),
                concurrency: agent_concurrency,
                work_dir: agent_work_dir.join(i.to_string()),
                hidden: hidden.clone(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Jobs run sandboxed: say now, in one line, when they cannot be.
    if let Some(first) = agent_configs.first() {
        hobotnica_agent::preflight(first).await?;
    }

    let controller = Controller::open(config.clone()).await.map_err(|error| {
        match error.downcast_ref::<OpenError>() {
            Some(OpenError::InUse(_)) => anyhow::anyhow!(
                "another hobot up (or controller) is using {}: stop it first, or give this \
                 one another --data-dir",
                config.data_dir.display()
            ),
            _ => error,
        }
    })?;
    let admin_token = controller.admin_token().to_owned();
    let http_addr = reachable(listeners.http.local_addr()?);
    let grpc_addr = reachable(listeners.grpc.local_addr()?);
    // Streams, not one-shot futures, kept from here to the end: a signal
    // between two waits is still delivered to the next. Installed before
    // anything serves: a SIGTERM as soon as /readyz answers must stop
    // hobot up in order, not kill it.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle Ctrl-C")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let running = Running::start(controller, listeners, local_grpc, agent_configs);
    print_banner(&config, agents, http_addr, grpc_addr, &admin_token);
    let client = self_client(&config, http_addr, grpc_addr, &admin_token);

    Ok(run(running, client.as_ref(), &mut sigint, &mut sigterm).await)
}

/// A REST client of this controller, to say which jobs a stop waits for;
/// `None` over TLS (its certificate may not chain to the system's roots).
fn self_client(
    config: &ControllerConfig,
    http_addr: SocketAddr,
    grpc_addr: SocketAddr,
    admin_token: &str,
) -> Option<crate::client::Client> {
    if config.tls_enabled() {
        return None;
    }
    crate::client::Client::new(crate::client::Connection {
        url: format!("http://{http_addr}"),
        grpc_url: format!("http://{grpc_addr}"),
        token: Some(Secret::new(admin_token)),
        token_source: "hobot up".to_owned(),
        source: "hobot up".to_owned(),
        grpc_source: "hobot up".to_owned(),
        ca_cert: None,
        keepalive: Duration::from_secs(15),
    })
    .ok()
}

/// `#id repo target` of each running job, or `None` when the controller
/// could not say.
async fn running_jobs(client: &crate::client::Client) -> Option<Vec<String>> {
    let page = client
        .get("/api/v1/jobs?state=running&limit=100")
        .await
        .ok()?;
    let items = page.get("items")?.as_array()?;
    Some(
        items
            .iter()
            .map(|job| {
                let field = |name: &str| job.get(name).and_then(|v| v.as_str()).unwrap_or("?");
                let id = job
                    .get("id")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
                format!("#{id} {} {}", field("repo"), field("target"))
            })
            .collect(),
    )
}

/// Tells the user, on the first signal, what the stop waits for and how to
/// cut it short.
async fn announce_stop(client: Option<&crate::client::Client>) {
    let jobs = match client {
        Some(client) => running_jobs(client).await,
        None => None,
    };
    let drain = AGENT_DRAIN_TIMEOUT.as_secs();
    let message = match jobs {
        Some(jobs) if jobs.is_empty() => "Stopping; no job is running.".to_owned(),
        Some(jobs) => format!(
            "Stopping: waiting up to {drain} s for {} running job{} to finish: {}.\n\
             Press Ctrl-C again to cancel {} now.",
            jobs.len(),
            if jobs.len() == 1 { "" } else { "s" },
            jobs.join(", "),
            if jobs.len() == 1 { "it" } else { "them" },
        ),
        None => format!(
            "Stopping: running jobs may finish for up to {drain} s. \
             Press Ctrl-C again to cancel them now."
        ),
    };
    eprintln!("{message}");
}

/// The local agents' pool token: `--agent-token`, or the one kept in the
/// data directory (created there the first time).
fn local_agent_token(config: &ControllerConfig) -> anyhow::Result<Secret> {
    Ok(match &config.agent_token {
        Some(token) => token.clone(),
        None => Secret::new(hobotnica_controller::load_or_create_token(
            &config.data_dir.join(AGENT_TOKEN_FILE),
            hobotnica_common::token::AGENT_TOKEN_PREFIX,
        )?),
    })
}

/// What jobs of the local agents must never see: the controller's data
/// directory (tokens, store, logs) and keys, wherever they are, as
/// canonical paths. Fails only when the data directory cannot be resolved.
fn hidden_from_jobs(config: &ControllerConfig) -> anyhow::Result<Vec<PathBuf>> {
    let data_dir = std::fs::canonicalize(&config.data_dir)
        .with_context(|| format!("cannot resolve {}", config.data_dir.display()))?;
    Ok(std::iter::once(data_dir)
        .chain(config.secret_key_file.iter().cloned())
        .chain(config.tls_key.iter().cloned())
        .filter_map(|path| std::fs::canonicalize(path).ok())
        .collect())
}

/// Tells the user on stdout where the controller serves and its admin
/// token. Errors writing to stdout are ignored.
fn print_banner(
    config: &ControllerConfig,
    agents: u32,
    http_addr: SocketAddr,
    grpc_addr: SocketAddr,
    admin_token: &str,
) {
    let scheme = if config.tls_enabled() {
        "https"
    } else {
        "http"
    };
    let url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{http_addr}"));
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "Hobotnica is up ({agents} local agent{}, data in {})\n\
         \x20 dashboard:   {url}/ (sign in with the admin token)\n\
         \x20 REST API:    {url}\n\
         \x20 gRPC:        {scheme}://{grpc_addr}\n\
         \x20 API docs:    {url}/api/docs\n\
         \x20 admin token: {admin_token}\n\
         `hobot` commands run from this directory use this controller. Ctrl-C stops it.",
        if agents == 1 { "" } else { "s" },
        config.data_dir.display(),
    );
    let _ = stdout.flush();
}

/// The controller's task and the local agents' tasks, with the tokens that
/// stop them.
struct Running {
    controller: JoinHandle<anyhow::Result<()>>,
    /// Stops the controller; cancelled only after every agent has ended.
    controller_shutdown: CancellationToken,
    agents: JoinSet<anyhow::Result<()>>,
    /// Stops the agents (each runs on a child of it).
    agents_shutdown: CancellationToken,
    /// Cancels the agents' running jobs while they drain.
    agents_stop_now: CancellationToken,
}

/// How serving ended.
enum Served {
    /// A signal (`failed: false`) or a local agent that ended (`true`):
    /// stop the rest in order.
    Stop { failed: bool },
    /// The controller ended: the agents were stopped at once.
    ControllerEnded,
}

/// How the local agents' stop ended.
struct AgentsStop {
    /// An agent failed, or its task did.
    failed: bool,
    /// A further signal came first: the agents were aborted.
    hurried: bool,
}

impl Running {
    /// Spawns the controller (its public `listeners` and `local_grpc`) and
    /// one task per local agent.
    fn start(
        controller: Controller,
        listeners: Listeners,
        local_grpc: TcpListener,
        agent_configs: Vec<AgentConfig>,
    ) -> Running {
        let agents_shutdown = CancellationToken::new();
        let agents_stop_now = CancellationToken::new();
        let controller_shutdown = CancellationToken::new();
        let controller = tokio::spawn(controller.serve_with_local_grpc(
            listeners,
            Some(local_grpc),
            controller_shutdown.clone(),
        ));
        let mut agents = JoinSet::new();
        for agent_config in agent_configs {
            agents.spawn(hobotnica_agent::run_with_stop_now(
                agent_config,
                agents_shutdown.child_token(),
                agents_stop_now.clone(),
            ));
        }
        Running {
            controller,
            controller_shutdown,
            agents,
            agents_shutdown,
            agents_stop_now,
        }
    }

    /// Serves until `signal` (Ctrl-C or SIGTERM), a local agent ends, or
    /// the controller ends.
    async fn serve(&mut self, signal: impl Future<Output = &'static str>) -> Served {
        tokio::select! {
            signal = signal => {
                tracing::info!("{signal}; stopping");
                Served::Stop { failed: false }
            }
            Some(result) = self.agents.join_next() => {
                // A local agent that cannot work (its token refused, say) must
                // not leave a controller whose jobs never start.
                let error = match result {
                    Ok(Ok(())) => "it stopped".to_owned(),
                    Ok(Err(err)) => format!("{err:#}"),
                    Err(err) => err.to_string(),
                };
                tracing::error!(error, "a local agent failed; stopping");
                Served::Stop { failed: true }
            }
            result = &mut self.controller => {
                match result {
                    Ok(Ok(())) => tracing::error!("the controller stopped unexpectedly"),
                    Ok(Err(err)) => tracing::error!(error = %format!("{err:#}"), "the controller failed"),
                    Err(err) => tracing::error!(error = %err, "the controller task failed"),
                }
                self.agents_shutdown.cancel();
                self.agents.shutdown().await;
                Served::ControllerEnded
            }
        }
    }

    /// Stops the local agents and waits for them (each within its own
    /// drain timeout). A signal meanwhile cancels their running jobs (they
    /// report, and end `cancelled`); a further one aborts the agents at
    /// once.
    async fn stop_agents(&mut self, sigint: &mut Signal, sigterm: &mut Signal) -> AgentsStop {
        self.agents_shutdown.cancel();
        let mut failed = false;
        let mut hurried = false;
        loop {
            tokio::select! {
                joined = self.agents.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(err))) => {
                        failed = true;
                        tracing::error!(error = %format!("{err:#}"), "a local agent failed");
                    }
                    Some(Err(err)) => {
                        failed = true;
                        tracing::error!(error = %err, "a local agent task failed");
                    }
                },
                signal = next_signal(sigint, sigterm) => {
                    if self.agents_stop_now.is_cancelled() {
                        tracing::warn!("{signal} again; not waiting for running jobs or the controller's stop");
                        self.agents.shutdown().await;
                        hurried = true;
                        break;
                    }
                    eprintln!(
                        "Cancelling the running jobs (they end cancelled). \
                         Press Ctrl-C once more to quit without waiting for them."
                    );
                    self.agents_stop_now.cancel();
                }
            }
        }
        AgentsStop { failed, hurried }
    }
}

/// Serves until a signal or a task's end, stops the agents (letting their
/// jobs finish), then the controller; a further signal cuts either stop
/// short. Fails when a task failed or a stop was cut short. `sigint` and
/// `sigterm` are streams kept throughout, so a signal between two waits is
/// not lost.
async fn run(
    mut running: Running,
    client: Option<&crate::client::Client>,
    sigint: &mut Signal,
    sigterm: &mut Signal,
) -> ExitCode {
    let mut failed = match running.serve(next_signal(sigint, sigterm)).await {
        Served::Stop { failed } => failed,
        Served::ControllerEnded => return ExitCode::FAILURE,
    };
    if !failed {
        announce_stop(client).await;
    }
    let agents = running.stop_agents(sigint, sigterm).await;
    failed |= agents.failed;
    let stop = if agents.hurried {
        running.controller_shutdown.cancel();
        running.controller.abort();
        ControllerStop::Abandoned
    } else {
        stop_controller(
            &mut running.controller,
            &running.controller_shutdown,
            next_signal(sigint, sigterm),
        )
        .await
    };
    if stop != ControllerStop::Stopped {
        failed = true;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, naming it for the log.
async fn next_signal(sigint: &mut Signal, sigterm: &mut Signal) -> &'static str {
    tokio::select! {
        _ = sigint.recv() => "interrupted",
        _ = sigterm.recv() => "SIGTERM",
    }
}

/// How the controller's stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ControllerStop {
    Stopped,
    Failed,
    /// Not waited for: a further signal came first.
    Abandoned,
}

/// Asks the controller to stop and waits for its graceful stop, unless
/// `another_signal` comes first: then it is aborted at once. Without that
/// escape a stop that hung left `hobot up` deaf to every further Ctrl-C or
/// SIGTERM, and only SIGKILL ended it.
async fn stop_controller(
    controller_task: &mut JoinHandle<anyhow::Result<()>>,
    controller_shutdown: &CancellationToken,
    another_signal: impl Future<Output = &'static str>,
) -> ControllerStop {
    controller_shutdown.cancel();
    tokio::select! {
        result = &mut *controller_task => match result {
            Ok(Ok(())) => ControllerStop::Stopped,
            Ok(Err(err)) => {
                tracing::error!(error = %format!("{err:#}"), "the controller failed while stopping");
                ControllerStop::Failed
            }
            Err(err) => {
                tracing::error!(error = %err, "the controller task failed");
                ControllerStop::Failed
            }
        },
        signal = another_signal => {
            tracing::warn!("{signal} again; not waiting for the controller to stop");
            controller_task.abort();
            ControllerStop::Abandoned
        }
    }
}

/// What differs between local agents.
struct LocalAgent {
    controller: String,
    token: Secret,
    name: String,
    labels: Vec<(String, String)>,
    concurrency: u32,
    work_dir: PathBuf,
    /// Paths its jobs must not see (added to `--sandbox-hide`).
    hidden: Vec<PathBuf>,
}

/// The configuration of a local agent: the agent's defaults (options this
/// command does not set keep the agent binary's defaults, or its
/// `HOBOTNICA_*` variables), with the given values set.
fn local_agent_config(agent: LocalAgent) -> anyhow::Result<AgentConfig> {
    use clap::{Args as _, FromArgMatches as _};
    let command = AgentConfig::augment_args(clap::Command::new("local-agent").no_binary_name(true));
    let matches = command
        .try_get_matches_from(["--controller", &agent.controller])
        .context("local agent options")?;
    let mut config = AgentConfig::from_arg_matches(&matches).context("local agent options")?;
    config.controllers = vec![agent.controller];
    config.token = Some(agent.token);
    config.token_file = None;
    config.name = Some(agent.name);
    config.labels = agent.labels;
    config.concurrency = agent.concurrency;
    config.work_dir = agent.work_dir;
    config.sandbox_hide.extend(agent.hidden);
    config.drain_timeout = AGENT_DRAIN_TIMEOUT;
    // Local agents share the process: `--metrics-listen` is the controller's.
    config.metrics_listen = None;
    Ok(config)
}

/// The address to connect to for a bound address (`0.0.0.0` means this
/// host: use loopback).
fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        let ip = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// Longer than anything here takes unless it hangs.
    const DEADLINE: Duration = Duration::from_secs(10);

    /// The controller's stop hangs; a further signal must end the wait at
    /// once and abort the controller. (Before the fix `hobot up` awaited
    /// the controller's task with no signal listened to.)
    #[tokio::test]
    async fn another_signal_ends_a_controller_stop_that_hangs() {
        let mut controller_task = tokio::spawn(std::future::pending::<anyhow::Result<()>>());
        let controller_shutdown = CancellationToken::new();
        let (signal, signalled) = tokio::sync::oneshot::channel::<()>();
        let stop = {
            let stopping = stop_controller(&mut controller_task, &controller_shutdown, async {
                let _ = signalled.await;
                "SIGTERM"
            });
            tokio::pin!(stopping);
            // Without a signal it waits for the controller.
            tokio::select! {
                biased;
                stop = &mut stopping => panic!("stopped without the controller or a signal: {stop:?}"),
                () = std::future::ready(()) => {}
            }
            assert!(controller_shutdown.is_cancelled());

            signal.send(()).expect("the stop is waiting");
            tokio::time::timeout(DEADLINE, stopping)
                .await
                .expect("a further signal ends the wait at once")
        };
        assert_eq!(stop, ControllerStop::Abandoned);
        let aborted = tokio::time::timeout(DEADLINE, controller_task)
            .await
            .expect("the aborted task ends");
        assert!(aborted.expect_err("aborted").is_cancelled());
    }

    /// A controller that stops gracefully is waited for.
    #[tokio::test]
    async fn a_controller_that_stops_is_waited_for() {
        let controller_shutdown = CancellationToken::new();
        let token = controller_shutdown.clone();
        let mut controller_task = tokio::spawn(async move {
            token.cancelled().await;
            Ok(())
        });
        let stop = tokio::time::timeout(
            DEADLINE,
            stop_controller(
                &mut controller_task,
                &controller_shutdown,
                std::future::pending(),
            ),
        )
        .await
        .expect("the controller stops");
        assert_eq!(stop, ControllerStop::Stopped);
    }

    #[test]
    fn agent_token_is_created_once_and_private() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(AGENT_TOKEN_FILE);
        let first = hobotnica_controller::load_or_create_token(&path, "hbag").expect("created");
        assert!(first.starts_with("hbag_"));
        let mode = std::fs::metadata(&path)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            hobotnica_controller::load_or_create_token(&path, "hbag").expect("read"),
            first
        );
    }

    #[test]
    fn local_agents_get_the_given_options() {
        let config = local_agent_config(LocalAgent {
            controller: "http://127.0.0.1:8081".to_owned(),
            token: Secret::new("hbag_0123456789abcdef"),
            name: "local-1".to_owned(),
            labels: vec![("os".to_owned(), "linux".to_owned())],
            concurrency: 3,
            work_dir: PathBuf::from("/tmp/agent/1"),
            hidden: vec![PathBuf::from("/srv/ci/.hobotnica")],
        })
        .expect("valid");
        assert_eq!(config.sandbox_hide, [PathBuf::from("/srv/ci/.hobotnica")]);
        assert_eq!(config.controllers, ["http://127.0.0.1:8081"]);
        assert_eq!(config.name.as_deref(), Some("local-1"));
        assert_eq!(config.concurrency, 3);
        assert_eq!(config.drain_timeout, AGENT_DRAIN_TIMEOUT);
        assert_eq!(config.work_dir, PathBuf::from("/tmp/agent/1"));
    }

    #[test]
    fn unspecified_addresses_become_loopback() {
        let addr: SocketAddr = "0.0.0.0:8081".parse().expect("addr");
        assert_eq!(reachable(addr).to_string(), "127.0.0.1:8081");
        let addr: SocketAddr = "10.1.2.3:8081".parse().expect("addr");
        assert_eq!(reachable(addr), addr);
    }
}
