//! `hobot`'s command line: global connection options, the subcommands and
//! their arguments. Every option is a flag and, where it makes sense, a
//! `HOBOTNICA_*` environment variable; `std::env` is read nowhere else.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The Hobotnica operator CLI.
///
/// Without `--url`/`--token` it talks to the controller that `hobot up`
/// started in the data directory (`.hobotnica` by default).
#[derive(Parser)]
#[command(name = "hobot", version = hobotnica_common::VERSION, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// Where the controller is and how to authenticate; accepted before or after
/// the subcommand.
#[derive(Args, Clone)]
pub struct GlobalArgs {
    /// REST URL of the controller (default: from `<data-dir>/controller.json`).
    #[arg(long, global = true, env = "HOBOTNICA_URL")]
    pub url: Option<String>,

    /// gRPC URL of the controller, used by `logs` and `run --follow`
    /// (default: from `<data-dir>/controller.json`).
    #[arg(long, global = true, env = "HOBOTNICA_GRPC_URL")]
    pub grpc_url: Option<String>,

    /// API token (default: `<data-dir>/admin-token`).
    #[arg(long, global = true, env = "HOBOTNICA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Data directory of a local `hobot up`, where its URLs and admin token
    /// are found.
    #[arg(
        long,
        global = true,
        env = "HOBOTNICA_DATA_DIR",
        default_value = ".hobotnica"
    )]
    pub data_dir: PathBuf,

    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,

    /// PEM CA certificate(s) that an `https://` controller's certificate is
    /// verified against (REST and gRPC), instead of the system's roots.
    #[arg(long, global = true, env = "HOBOTNICA_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// Allow plaintext `http://` URLs on hosts other than loopback: the
    /// token then crosses the network unencrypted. (`hobot up`: serve
    /// plaintext on a non-loopback address.)
    #[arg(long, global = true, env = "HOBOTNICA_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a controller with local agents in this process (embedded store).
    Up(Box<UpArgs>),
    /// Register, list, show and remove repositories.
    #[command(subcommand)]
    Repos(ReposCommand),
    /// Run a make target of a repository.
    Run(RunArgs),
    /// List, show and cancel jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Print a job's log (`-f` follows it until the job ends).
    Logs(LogsArgs),
    /// Agents known to the controller.
    #[command(subcommand)]
    Agents(AgentsCommand),
}

/// Options of `hobot up`: the controller's own plus the local agents'.
#[derive(Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub controller: hobotnica_controller::ControllerConfig,

    /// Local agents to start.
    #[arg(long, env = "HOBOTNICA_AGENTS", default_value_t = 1)]
    pub agents: u32,

    /// Jobs each local agent runs at once.
    #[arg(long, env = "HOBOTNICA_AGENT_CONCURRENCY", default_value_t = 2)]
    pub agent_concurrency: u32,

    /// Labels of the local agents, as key=value pairs, comma-separated.
    #[arg(
        long,
        env = "HOBOTNICA_AGENT_LABELS",
        value_delimiter = ',',
        value_parser = hobotnica_common::validate::label
    )]
    pub agent_labels: Vec<(String, String)>,

    /// Where the local agents keep clones and work trees
    /// (default: `<data-dir>/agent`); agent i uses `<dir>/<i>`.
    #[arg(long, env = "HOBOTNICA_AGENT_WORK_DIR")]
    pub agent_work_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ReposCommand {
    /// Register a repository by git URL (owner `local`).
    Add {
        /// Repository name (letters, digits, `.`, `_`, `-`).
        name: String,
        /// Where to clone it from (`https://...`, `git@...`, `file:///...`).
        git_url: String,
        /// Branch built when a run names neither a commit nor a branch.
        #[arg(long)]
        branch: Option<String>,
    },
    /// List repositories.
    Ls,
    /// Show one repository.
    Show {
        /// `OWNER/NAME` or `NAME` (owner `local`).
        repo: String,
    },
    /// Unregister a repository.
    Rm {
        /// `OWNER/NAME` or `NAME` (owner `local`).
        repo: String,
    },
}

#[derive(Args)]
pub struct RunArgs {
    /// `OWNER/NAME` or `NAME` (owner `local`).
    pub repo: String,
    /// The make target.
    pub target: String,
    /// Build this commit (40 hex characters).
    #[arg(long, conflicts_with = "branch")]
    pub commit: Option<String>,
    /// Build the latest commit of this branch (default: the repository's).
    #[arg(long)]
    pub branch: Option<String>,
    /// One-time environment variable for this run, `KEY=VALUE` (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    pub env: Vec<(String, String)>,
    /// Follow the log and exit with the job's exit code.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    Ls {
        /// Only jobs of this repository (`OWNER/NAME` or `NAME`).
        #[arg(long)]
        repo: Option<String>,
        /// Only jobs in this state (queued, running, succeeded, failed,
        /// cancelled, timed_out, lost).
        #[arg(long)]
        state: Option<String>,
        /// Only jobs of this kind (test, deploy, custom).
        #[arg(long)]
        kind: Option<String>,
        /// At most this many jobs.
        #[arg(long)]
        limit: Option<u32>,
        /// Continue a previous listing (its `next_cursor`).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one job.
    Show {
        /// The job's id.
        id: u64,
    },
    /// Cancel a queued or running job.
    Cancel {
        /// The job's id.
        id: u64,
    },
}

#[derive(Args)]
pub struct LogsArgs {
    /// Follow the log until the job ends, then exit with its exit code.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Start at this byte offset.
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// The job's id.
    pub id: u64,
}

#[derive(Subcommand)]
pub enum AgentsCommand {
    /// List agents.
    Ls,
}

/// Parses `KEY=VALUE` (the value may contain `=`).
fn parse_env_pair(input: &str) -> Result<(String, String), String> {
    let (key, value) = input
        .split_once('=')
        .ok_or_else(|| format!("{input:?} must be KEY=VALUE"))?;
    hobotnica_common::validate::env_name("env", key).map_err(|err| err.to_string())?;
    Ok((key.to_owned(), value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn data_dir_is_shared_by_global_flag_and_up() {
        let cli = Cli::try_parse_from(["hobot", "--data-dir", "/tmp/x", "up"]).expect("parses");
        let Command::Up(up) = cli.command else {
            panic!("not up")
        };
        assert_eq!(up.controller.data_dir, PathBuf::from("/tmp/x"));

        let cli = Cli::try_parse_from(["hobot", "up", "--data-dir", "/tmp/y"]).expect("parses");
        assert_eq!(cli.global.data_dir, PathBuf::from("/tmp/y"));
    }

    #[test]
    fn tls_options_reach_up_and_the_clients() {
        let cli = Cli::try_parse_from([
            "hobot",
            "up",
            "--insecure",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--client-ca",
            "ca.pem",
        ])
        .expect("parses");
        assert!(cli.global.insecure);
        let Command::Up(up) = cli.command else {
            panic!("not up")
        };
        assert!(up.controller.insecure && up.controller.tls_enabled());
        assert_eq!(up.controller.client_ca, Some(PathBuf::from("ca.pem")));

        let cli =
            Cli::try_parse_from(["hobot", "repos", "ls", "--ca-cert", "ca.pem"]).expect("parses");
        assert_eq!(cli.global.ca_cert, Some(PathBuf::from("ca.pem")));
        assert!(!cli.global.insecure);
    }

    #[test]
    fn env_pairs_and_labels() {
        assert_eq!(
            parse_env_pair("A=b=c"),
            Ok(("A".to_owned(), "b=c".to_owned()))
        );
        assert!(parse_env_pair("A").is_err());
        assert!(parse_env_pair("1A=b").is_err());
    }
}
