//! `hobot`, the Hobotnica operator CLI: repositories, runs, deploys,
//! environment variables, jobs, logs, agents and notification targets over the controller's REST
//! API and gRPC log tailing, and `hobot up`, which runs a controller with
//! local agents in one process.
//!
//! Exit statuses (also in `hobot --help`, [`config::EXIT_STATUS_HELP`]): 0
//! on success; 1 on an error (printed as `error: ...` on stderr). `run
//! --follow`, `deploy --follow` and `logs -f` exit with the state the job
//! ended in, however it got there (`logs::job_exit_status`): succeeded 0;
//! failed: make's exit code (GNU make exits 2 when a recipe fails), 1
//! without one; cancelled 130 (as a shell reports Ctrl-C); timed_out 124
//! (as timeout(1)); lost 1. A cancelled or timed-out job has no exit code of
//! its own: make was stopped, it did not end.

mod admin;
mod client;
mod commands;
mod config;
mod logs;
mod notifications;
mod output;
mod terminal;
mod up;

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};

use crate::client::{Client, Connection};
use crate::config::{Cli, Command};

fn main() -> ExitCode {
    // One TLS provider for reqwest and tonic, installed before either runs.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    cli.note_command_line(&matches);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let Cli { global, command } = cli;
    let command = match command {
        Command::Up(args) => {
            init_tracing(args.controller.log_format);
            return up::up(*args).await;
        }
        Command::Admin(config::AdminCommand::RotateKey(args)) => {
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            let rewritten = hobotnica_controller::rotate_secret_key(
                &args.controller,
                &args.old_key_file,
                &args.new_key_file,
            )
            .await?;
            eprintln!(
                "re-encrypted the secrets of {rewritten} repositories; start the controllers with --secret-key-file {}",
                args.new_key_file.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Admin(config::AdminCommand::Export(args)) => {
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            admin::export(*args, &global).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Admin(config::AdminCommand::Import(args)) => {
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            admin::import(*args).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Admin(config::AdminCommand::Migrate(args)) => {
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            admin::migrate(*args).await?;
            return Ok(ExitCode::SUCCESS);
        }
        command => command,
    };
    let client = Client::new(Connection::discover(&global)?)?;
    let json = global.json;
    match command {
        Command::Up(_) | Command::Admin(_) => unreachable!("handled above"),
        Command::Repos(command) => commands::repos(&client, command, json).await?,
        Command::Run(args) => return commands::run(&client, args, json).await,
        Command::Deploy(args) => return commands::deploy(&client, args, json).await,
        Command::Deploys(args) => commands::deploys(&client, args, json).await?,
        Command::Env(command) => commands::env(&client, command, json).await?,
        Command::Jobs(command) => commands::jobs(&client, command, json).await?,
        Command::Logs(args) => {
            return logs::tail(&client, args.id, args.offset, args.follow, args.raw).await;
        }
        Command::Agents(command) => commands::agents(&client, command, json).await?,
        Command::Notifications(command) => {
            notifications::notifications(&client, command, json).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Logs to stderr, filtered by `HOBOTNICA_LOG` (default `info`), in the
/// controller's `--log-format`.
fn init_tracing(format: hobotnica_common::logging::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOBOTNICA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    hobotnica_common::logging::init(format, filter);
}
