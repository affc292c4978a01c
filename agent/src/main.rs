//! `hobotnica-agent`: parses the configuration, sets up tracing and signal
//! handling, and calls [`hobotnica_agent::run`].

use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Runs Hobotnica jobs: pulls them from a controller, runs make, ships logs.
#[derive(Parser)]
#[command(name = "hobotnica-agent", version = hobotnica_common::VERSION)]
struct Cli {
    /// Say whether the agent working in this work dir (the same options and
    /// environment) is connected to a controller, from the status file it
    /// keeps there, and exit 0 when it is, 1 when not: a health check for
    /// Docker or a monitor.
    #[arg(long)]
    health_check: bool,

    #[command(flatten)]
    agent: hobotnica_agent::AgentConfig,
}

fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    cli.agent.note_command_line(&matches);
    if cli.health_check {
        return match hobotnica_agent::health_check(&cli.agent) {
            Ok(line) => {
                println!("healthy: {line}");
                std::process::ExitCode::SUCCESS
            }
            Err(why) => {
                eprintln!("unhealthy: {why}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let filter = EnvFilter::try_from_env("HOBOTNICA_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    hobotnica_common::logging::init(cli.agent.log_format, filter);

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hobotnica-agent: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let stop_now = CancellationToken::new();
        let signals = tokio::spawn(cancel_on_signal(shutdown.clone(), stop_now.clone()));
        let result = hobotnica_agent::run_with_stop_now(cli.agent, shutdown, stop_now).await;
        signals.abort();
        result
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hobotnica-agent: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGTERM or Ctrl-C: the first drains (`shutdown`), the second cancels the
/// running jobs at once (`stop_now`), the third exits without waiting.
async fn cancel_on_signal(shutdown: CancellationToken, stop_now: CancellationToken) {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                return;
            }
        };
    for count in 0.. {
        tokio::select! {
            _ = terminate.recv() => {}
            result = tokio::signal::ctrl_c() => {
                if result.is_err() {
                    return;
                }
            }
        }
        match count {
            0 => {
                tracing::info!("signal received; draining (send again to cancel running jobs)");
                shutdown.cancel();
            }
            1 => {
                tracing::warn!(
                    "second signal; cancelling running jobs (send again to exit at once)"
                );
                stop_now.cancel();
            }
            _ => {
                tracing::error!("third signal; exiting without waiting for jobs");
                std::process::exit(130);
            }
        }
    }
}
