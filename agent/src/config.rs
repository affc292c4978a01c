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
    #[arg(long, env = "HOBOTNICA_AGENT_LABELS", value_delimiter = ',', value_parser = parse_label)]
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
}

impl AgentConfig {
    pub fn labels_map(&self) -> BTreeMap<String, String> {
        self.labels.iter().cloned().collect()
    }
}

fn parse_label(input: &str) -> Result<(String, String), String> {
    let (key, value) = input
        .split_once('=')
        .ok_or_else(|| format!("label {input:?} must be key=value"))?;
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(format!(
            "label key {key:?} must be letters, digits, '_', '-' or '.'"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}
