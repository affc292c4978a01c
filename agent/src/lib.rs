//! The Hobotnica agent: registers with a controller, takes jobs over a gRPC
//! stream, runs `make <target>` in a git work tree at the job's commit and
//! ships the output back.

mod config;

pub use config::AgentConfig;

use tokio_util::sync::CancellationToken;

/// Runs the agent until `shutdown` is cancelled and running jobs have drained.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = config;
    shutdown.cancelled().await;
    Ok(())
}
