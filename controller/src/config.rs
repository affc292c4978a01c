//! The controller's configuration: every option is a flag and a
//! `HOBOTNICA_*` environment variable. `std::env` is read nowhere else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hobotnica_common::duration::parse_duration;

/// Options of `hobotnica-controller` (also embedded in `hobot up`).
#[derive(Clone, clap::Args)]
pub struct ControllerConfig {
    /// Where the embedded store, logs and generated tokens live.
    #[arg(long, env = "HOBOTNICA_DATA_DIR", default_value = ".hobotnica")]
    pub data_dir: PathBuf,

    /// Address of the REST API (and web hooks).
    #[arg(long, env = "HOBOTNICA_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address of the gRPC services (agents, log tailing).
    #[arg(long, env = "HOBOTNICA_GRPC_LISTEN", default_value = "127.0.0.1:8081")]
    pub grpc_listen: SocketAddr,

    /// The admin API token. Without it, one is generated once and kept in
    /// `<data-dir>/admin-token`.
    #[arg(long, env = "HOBOTNICA_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// A pool token agents may register with (per-agent tokens can also be
    /// created through the API).
    #[arg(long, env = "HOBOTNICA_AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<String>,

    /// A running job whose lease is not renewed within this time is lost.
    #[arg(long, env = "HOBOTNICA_LEASE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub lease_timeout: Duration,

    /// Time between SIGTERM and SIGKILL when a job is cancelled or times out.
    #[arg(long, env = "HOBOTNICA_KILL_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub kill_grace: Duration,

    /// Keep everything in Redis instead of the embedded store
    /// (`redis://host:6379/0`, or `rediss://` for TLS). Any number of
    /// controllers may share one Redis.
    #[arg(long = "redis", env = "HOBOTNICA_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// The URL users reach the REST API at (used in links); defaults to
    /// `http://<listen>`.
    #[arg(long, env = "HOBOTNICA_PUBLIC_URL")]
    pub public_url: Option<String>,
}

impl ControllerConfig {
    /// Cross-field checks, run before anything starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.lease_timeout >= Duration::from_millis(300),
            "--lease-timeout must be at least 300ms"
        );
        if let Some(token) = &self.admin_token {
            anyhow::ensure!(
                token.len() >= 16,
                "--admin-token must be at least 16 characters"
            );
        }
        if self.redis_url.is_some() {
            anyhow::ensure!(
                self.admin_token.is_some(),
                "with --redis, give the admin token (--admin-token or HOBOTNICA_ADMIN_TOKEN): controllers sharing one Redis must share it"
            );
        }
        if let Some(token) = &self.agent_token {
            anyhow::ensure!(
                token.len() >= 16,
                "--agent-token must be at least 16 characters"
            );
        }
        Ok(())
    }

    /// How often agents renew a lease: a third of its timeout.
    pub fn renew_interval(&self) -> Duration {
        self.lease_timeout / 3
    }
}

/// The variables the controller passes to the processes it spawns (git):
/// `PATH`, `HOME` and `LANG`, nothing else of its own environment.
#[allow(clippy::disallowed_methods)] // config.rs is where the environment is read
pub fn process_base_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(name, _)| matches!(name.as_str(), "PATH" | "HOME" | "LANG"))
        .collect()
}
