//! `hobotnica-controller`: parse the configuration, set up tracing, bind,
//! serve until SIGTERM or Ctrl-C.

use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use hobotnica_controller::{Controller, ControllerConfig, Listeners};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "hobotnica-controller",
    version,
    about = "The Hobotnica controller"
)]
struct Cli {
    #[command(flatten)]
    config: ControllerConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    cli.config.note_command_line(&matches);
    hobotnica_controller::init_tracing();
    let controller = Controller::open(cli.config.clone()).await?;
    let listeners = Listeners::bind(&cli.config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(hobotnica_controller::shutdown_on_signal(shutdown.clone()));
    controller.serve(listeners, shutdown).await
}
