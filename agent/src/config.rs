//! The agent's configuration: every option is a flag and a `HOBOTNICA_*`
//! environment variable.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use hobotnica_common::duration::parse_duration;

/// Options of `hobotnica-agent` (also embedded in `hobot up`).
#[derive(Clone, clap::Args)]
pub struct AgentConfig {
    /// gRPC URL(s) of the controller(s), comma-separated; the agent fails over
    /// between them.
    #[arg(
        long = "controller",
        env = "HOBOTNICA_CONTROLLER",
        value_delimiter = ',',
        required = true
    )]
    pub controllers: Vec<String>,

    /// Agent token (the controller's pool token or a per-agent token).
    #[arg(long, env = "HOBOTNICA_AGENT_TOKEN", hide_env_values = true)]
    pub token: String,

    /// Name shown in the controller; re-registering under the same name keeps
    /// the agent's id. Defaults to the host name.
    #[arg(long, env = "HOBOTNICA_AGENT_NAME")]
    pub name: Option<String>,

    /// Labels as key=value pairs, comma-separated (jobs may require labels).
    #[arg(long, env = "HOBOTNICA_AGENT_LABELS", value_delimiter = ',', value_parser = hobotnica_common::validate::label)]
    pub labels: Vec<(String, String)>,

    /// Jobs run at once.
    #[arg(long, env = "HOBOTNICA_AGENT_CONCURRENCY", default_value_t = 1)]
    pub concurrency: u32,

    /// Where cache clones, work trees and log spools live.
    #[arg(long, env = "HOBOTNICA_WORK_DIR", default_value = ".hobotnica-agent")]
    pub work_dir: PathBuf,

    /// On SIGTERM, how long running jobs may take to finish before they are
    /// cancelled.
    #[arg(long, env = "HOBOTNICA_DRAIN_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Longest a single git command (fetch, work tree checkout) may take.
    #[arg(long, env = "HOBOTNICA_GIT_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub git_timeout: Duration,
}

impl AgentConfig {
    pub fn labels_map(&self) -> BTreeMap<String, String> {
        self.labels.iter().cloned().collect()
    }

    /// The name to register under: `--name`, else the host name from
    /// `/etc/hostname`, else `agent`.
    pub fn agent_name(&self) -> String {
        if let Some(name) = self
            .name
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            return name.to_owned();
        }
        std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|contents| contents.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "agent".to_owned())
    }

    /// Cross-field checks, run before anything starts. Error messages never
    /// contain the token.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.controllers.is_empty(),
            "at least one --controller URL is required"
        );
        for url in &self.controllers {
            anyhow::ensure!(
                url.starts_with("http://"),
                "controller URL {url:?} must start with http:// (TLS is not supported yet)"
            );
        }
        anyhow::ensure!(!self.token.trim().is_empty(), "--token must not be empty");
        anyhow::ensure!(
            self.token.bytes().all(|b| b.is_ascii_graphic()),
            "--token must be printable ASCII without spaces"
        );
        anyhow::ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        anyhow::ensure!(
            !self.git_timeout.is_zero(),
            "--git-timeout must be longer than zero"
        );
        Ok(())
    }
}

/// The agent's own environment, from which a job's base variables are taken
/// (see `hobotnica_common::env::compose`). Variables that are not valid UTF-8
/// are skipped.
#[allow(clippy::disallowed_methods)] // config.rs is where the environment is read
pub(crate) fn inherited_environment() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .collect()
}
