//! `hobotnica-controller`: parse the configuration, set up tracing, bind,
//! serve until SIGTERM or Ctrl-C. An error at start-up is one line on
//! stderr and exit status 1.

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use hobotnica_common::service_manager::{self, ServiceManager};
use hobotnica_controller::{Controller, ControllerConfig, Listeners};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "hobotnica-controller",
    version,
    about = "The Hobotnica controller"
)]
struct Cli {
    /// Ask the controller configured like this (the same options and
    /// environment) whether it is ready (`/readyz`), print the answer and
    /// exit 0 when it is, 1 when not: a health check for Docker or a
    /// monitor, with nothing else installed.
    #[arg(long)]
    health_check: bool,

    #[command(flatten)]
    config: ControllerConfig,
}

fn main() -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    cli.config.note_command_line(&matches);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hobotnica-controller: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if cli.health_check {
        return match runtime.block_on(hobotnica_controller::health_check::check(&cli.config)) {
            Ok(answer) => {
                println!("ready: {answer}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("not ready: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    hobotnica_controller::init_tracing(cli.config.log_format);
    match runtime.block_on(run(cli.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hobotnica-controller: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ControllerConfig) -> anyhow::Result<()> {
    let service_manager = ServiceManager::new(config.notify_socket.clone());
    // Listeners first: while the store opens (or, with --store-wait, waits
    // for the controller it takes over from), connections queue in the
    // kernel instead of being refused.
    let listeners = Listeners::bind(&config).await?;
    let controller = Controller::open(config.clone()).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(hobotnica_controller::shutdown_on_signal(shutdown.clone()));
    // The listeners are bound and the store is open: connections are
    // accepted from here on.
    notify(&service_manager, service_manager::READY);
    let stopping = shutdown.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        notify(&service_manager, service_manager::STOPPING);
    });
    controller.serve(listeners, shutdown).await
}

fn notify(service_manager: &ServiceManager, state: &str) {
    if let Err(error) = service_manager.notify(state) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}
