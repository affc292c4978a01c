//! `hobot`'s command line: global connection options, the subcommands and
//! their arguments. Every option is a flag and, where it makes sense, a
//! `HOBOTNICA_*` environment variable; `std::env` is read nowhere else.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hobotnica_common::private_fs::Secret;

/// What `hobot --help` says about exit statuses (kept in step with
/// `logs::job_exit_status` by a test).
pub const EXIT_STATUS_HELP: &str = "\
Exit status: 0 on success, 1 on an error. A command that follows a job to its end (run \
--follow, deploy --follow, logs -f) exits with the job's state: succeeded 0; failed: make's \
exit code (2 when a recipe fails), 1 without one; cancelled 130; timed_out 124; lost 1.";

/// The Hobotnica operator CLI.
///
/// Without `--url`/`--token` it talks to the controller that `hobot up`
/// started in the data directory (`.hobotnica` by default).
#[derive(Parser)]
#[command(
    name = "hobot",
    version = hobotnica_common::VERSION,
    about,
    long_about = None,
    after_help = EXIT_STATUS_HELP
)]
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

    /// API token (default: `<data-dir>/admin-token`). On the command line
    /// every process on the host can read it: prefer --token-file or
    /// HOBOTNICA_TOKEN.
    #[arg(long, global = true, env = "HOBOTNICA_TOKEN", hide_env_values = true, value_parser = Secret::parse)]
    pub token: Option<Secret>,

    /// File holding the API token (mode 0600 or stricter), instead of
    /// --token.
    #[arg(long, global = true, env = "HOBOTNICA_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

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

    /// How often `logs -f` and `run -f`/`deploy -f` ping an idle gRPC
    /// connection: a controller that vanished without closing it (its host
    /// died) is noticed within about twice this, and the tail reconnects.
    #[arg(long, global = true, env = "HOBOTNICA_KEEPALIVE", default_value = "15s", value_parser = parse_keepalive)]
    pub keepalive: Duration,

    /// Allow plaintext `http://` URLs on hosts other than loopback: the
    /// token then crosses the network unencrypted. (`hobot up`: serve
    /// plaintext on a non-loopback address.)
    #[arg(long, global = true, env = "HOBOTNICA_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
}

/// A `--keepalive` of at least a second (a controller may take more frequent
/// pings for abuse and close the connection).
fn parse_keepalive(input: &str) -> Result<Duration, String> {
    let keepalive = hobotnica_common::duration::parse_duration(input)?;
    if keepalive < Duration::from_secs(1) {
        return Err("must be at least 1s".to_owned());
    }
    Ok(keepalive)
}

impl Cli {
    /// Notes which secrets `hobot up`'s controller was given on the command
    /// line (it warns about them when it starts).
    pub fn note_command_line(&mut self, matches: &clap::ArgMatches) {
        if let (Command::Up(up), Some(("up", up_matches))) =
            (&mut self.command, matches.subcommand())
        {
            up.controller.note_command_line(up_matches);
        }
        if let (Command::Admin(admin), Some(("admin", admin_matches))) =
            (&mut self.command, matches.subcommand())
        {
            match (admin, admin_matches.subcommand()) {
                (AdminCommand::Export(args), Some((_, matches))) => {
                    args.store.note_command_line(matches);
                }
                (AdminCommand::Import(args), Some((_, matches))) => {
                    args.store.note_command_line(matches);
                }
                (AdminCommand::Migrate(args), Some((_, matches))) => {
                    args.from.note_command_line(matches);
                    args.to.note_command_line(matches);
                }
                _ => {}
            }
        }
    }
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
    /// Deploy a commit: `make deploy`, one deploy at a time per repository.
    Deploy(DeployArgs),
    /// Recent deploys of a repository, newest first.
    Deploys(DeploysArgs),
    /// A repository's environment variables and secrets.
    #[command(subcommand)]
    Env(EnvCommand),
    /// List, show, cancel and retry jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Print a job's log (`-f` follows it until the job ends).
    Logs(LogsArgs),
    /// Agents known to the controller.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Where a repository's finished jobs are told about (Slack, signed
    /// webhooks).
    #[command(subcommand)]
    Notifications(NotificationsCommand),
    /// Maintenance that works on the store directly.
    #[command(subcommand)]
    Admin(AdminCommand),
}

/// `hobot admin ...`
#[derive(Subcommand)]
pub enum AdminCommand {
    /// Re-encrypt every secret at rest with a new key. Stop the controller
    /// first (embedded store), or restart every controller with the new key
    /// afterwards (Redis, PostgreSQL). Safe to run again if interrupted.
    RotateKey(Box<RotateKeyArgs>),
    /// Write everything a store holds (repositories, jobs, logs, agents,
    /// tokens, sessions...) into a snapshot file, from one consistent view.
    /// Secrets stay sealed: keep the controller's secret key with it. With
    /// store options, from the store itself (the embedded store must not be
    /// in use by a controller; Redis and PostgreSQL may be); without,
    /// through the running
    /// controller (`GET /api/v1/admin/export`, the admin token).
    Export(Box<ExportArgs>),
    /// Read a snapshot file into a new, empty store (ids and logs kept; a
    /// job that was running comes back lost).
    Import(Box<ImportArgs>),
    /// Copy everything from one store into a new, empty one (an export
    /// piped into an import, no file): e.g. from `hobot up`'s embedded
    /// store to Redis or PostgreSQL. Stop the controllers of the source
    /// first.
    Migrate(Box<MigrateArgs>),
}

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub store: hobotnica_controller::store::open::StoreArgs,
    /// The snapshot file to write (written as a temporary file beside it,
    /// mode 0600, then renamed).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace the file if it exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub store: hobotnica_controller::store::open::StoreArgs,
    /// The snapshot file (from `hobot admin export`).
    pub file: PathBuf,
}

#[derive(Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub from: hobotnica_controller::store::open::MigrateFrom,
    #[command(flatten)]
    pub to: hobotnica_controller::store::open::MigrateTo,
}

#[derive(Args)]
pub struct RotateKeyArgs {
    /// The store to rewrite: the controller's options (`--data-dir`, or
    /// `--redis` and `--redis-ca-cert`).
    #[command(flatten)]
    pub controller: hobotnica_controller::ControllerConfig,
    /// The key the secrets are sealed with now.
    #[arg(long)]
    pub old_key_file: PathBuf,
    /// The key to seal them with (64 hex characters; e.g. `openssl rand -hex 32`).
    #[arg(long)]
    pub new_key_file: PathBuf,
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
        /// The most a job's log may hold (e.g. 64KiB, 100MiB), at most the
        /// controller's `--max-log-bytes` (its limit applies without one).
        #[arg(long, value_name = "SIZE", value_parser = hobotnica_common::size::parse_size)]
        max_log_bytes: Option<u64>,
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
    /// Follow the log and exit with the job's status (see "Exit status" in
    /// `hobot --help`).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// With --follow, pass every escape sequence of the job's output to the
    /// terminal (by default only colours are kept on a terminal).
    #[arg(long, requires = "follow")]
    pub raw: bool,
}

#[derive(Args)]
pub struct DeployArgs {
    /// `OWNER/NAME` or `NAME` (owner `local`).
    pub repo: String,
    /// Deploy this commit (40 hex characters).
    #[arg(long, conflicts_with = "branch")]
    pub commit: Option<String>,
    /// Deploy the latest commit of this branch, resolved now (default: the
    /// repository's branch).
    #[arg(long)]
    pub branch: Option<String>,
    /// One-time environment variable for this deploy, `KEY=VALUE`
    /// (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    pub env: Vec<(String, String)>,
    /// Show progress, follow the log and exit with the job's status (see
    /// "Exit status" in `hobot --help`).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// With --follow, pass every escape sequence of the job's output to the
    /// terminal (by default only colours are kept on a terminal).
    #[arg(long, requires = "follow")]
    pub raw: bool,
    /// Sent as `Idempotency-Key`: a request repeated with the same key (and
    /// the same body) returns the first request's job instead of deploying
    /// again. Default: a fresh random key per invocation.
    #[arg(long, value_name = "KEY", value_parser = parse_idempotency_key)]
    pub idempotency_key: Option<String>,
}

#[derive(Args)]
pub struct DeploysArgs {
    /// `OWNER/NAME` or `NAME` (owner `local`).
    pub repo: String,
    /// At most this many deploys (1 to 200).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub limit: Option<u32>,
    /// Continue a previous listing (its `next_cursor`).
    #[arg(long)]
    pub cursor: Option<String>,
}

/// Which jobs a repository variable applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EnvScope {
    /// Every job.
    All,
    /// `test` jobs.
    Test,
    /// `deploy` jobs.
    Deploy,
}

impl EnvScope {
    /// The API's name of the scope.
    pub fn as_str(self) -> &'static str {
        match self {
            EnvScope::All => "all",
            EnvScope::Test => "test",
            EnvScope::Deploy => "deploy",
        }
    }
}

#[derive(Subcommand)]
pub enum EnvCommand {
    /// List a repository's variables (a secret's value is never shown).
    Ls {
        /// `OWNER/NAME` or `NAME` (owner `local`).
        repo: String,
    },
    /// Set a variable; its value is read from stdin (one trailing newline is
    /// dropped), never from the command line.
    Set {
        /// `OWNER/NAME` or `NAME` (owner `local`).
        repo: String,
        /// The variable's name (`[A-Za-z_][A-Za-z0-9_]*`).
        key: String,
        /// Encrypt it at rest, never show it, mask it in logs.
        #[arg(long)]
        secret: bool,
        /// Which jobs see it (default: all).
        #[arg(long, value_enum)]
        scope: Option<EnvScope>,
        /// Refused: the value is read from stdin, never from the command
        /// line, where every user of the host can read it.
        #[arg(hide = true)]
        value: Option<String>,
    },
    /// Remove a variable.
    Rm {
        /// `OWNER/NAME` or `NAME` (owner `local`).
        repo: String,
        /// The variable's name.
        key: String,
        /// Only this scope (default: every scope of the key).
        #[arg(long, value_enum)]
        scope: Option<EnvScope>,
    },
}

#[derive(Subcommand)]
pub enum NotificationsCommand {
    /// List a repository's notification targets and how each one's last
    /// delivery went (a target's URL is never shown, only its host).
    Ls {
        /// `OWNER/NAME` or `NAME` (owner `local`).
        repo: String,
    },
    /// Add or replace a target; its URL is read from stdin, never from the
    /// command line. A `webhook` target gets a new signing secret, printed
    /// once.
    Set {
        /// `OWNER/NAME` or `NAME` (owner `local`).
        repo: String,
        /// The target's name within the repository (e.g. `chat`).
        id: String,
        #[arg(long, value_enum)]
        kind: NotificationKindArg,
        /// Which finished jobs (default: all).
        #[arg(long, value_enum)]
        events: Option<NotificationEventsArg>,
        /// Refused: the URL is read from stdin, never from the command
        /// line, where every user of the host can read it. (Not `url`:
        /// that is the global `--url`, whose value would land here.)
        #[arg(hide = true, value_name = "URL")]
        url_on_command_line: Option<String>,
    },
    /// Remove a target.
    Rm {
        /// `OWNER/NAME` or `NAME` (owner `local`).
        repo: String,
        /// The target's name.
        id: String,
    },
}

/// What a notification target is.
#[derive(Clone, Copy, ValueEnum)]
pub enum NotificationKindArg {
    /// A Slack-compatible incoming webhook (a message).
    Slack,
    /// The job as JSON, signed with HMAC-SHA256 (`X-Hobotnica-Signature-256`).
    Webhook,
}

impl NotificationKindArg {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKindArg::Slack => "slack",
            NotificationKindArg::Webhook => "webhook",
        }
    }
}

/// Which finished jobs a target hears about.
#[derive(Clone, Copy, ValueEnum)]
pub enum NotificationEventsArg {
    /// Every finished job.
    All,
    /// Deploys, whatever their outcome.
    Deploys,
    /// Jobs that failed, timed out or were lost.
    Failures,
}

impl NotificationEventsArg {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationEventsArg::All => "all",
            NotificationEventsArg::Deploys => "deploys",
            NotificationEventsArg::Failures => "failures",
        }
    }
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
        /// At most this many jobs (1 to 200).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=200))]
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
    /// Run a finished job again as a new job (same repository, commit,
    /// target and one-time variables).
    Retry {
        /// The job's id.
        id: u64,
    },
}

#[derive(Args)]
pub struct LogsArgs {
    /// Follow the log until the job ends, then exit with its status (see
    /// "Exit status" in `hobot --help`).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Start at this byte offset.
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// Pass every escape sequence of the job's output to the terminal. By
    /// default, when stdout is a terminal, only colours (SGR) are kept and
    /// other sequences (clipboard writes, title changes, screen clears) are
    /// dropped; output to a file or pipe is always unchanged.
    #[arg(long)]
    pub raw: bool,
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

/// An `Idempotency-Key`: visible ASCII, so that it fits in a header (the
/// controller checks the rest).
fn parse_idempotency_key(input: &str) -> Result<String, String> {
    if input.is_empty() || !input.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err("must be visible ASCII characters (no spaces)".to_owned());
    }
    Ok(input.to_owned())
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
    fn the_help_states_the_exit_statuses_hobot_returns() {
        use crate::logs::job_exit_status;
        let command = Cli::command();
        let after_help = command.get_after_help().map(ToString::to_string);
        assert_eq!(after_help.as_deref(), Some(EXIT_STATUS_HELP));
        let help = EXIT_STATUS_HELP;
        let said = [
            ("succeeded", job_exit_status("succeeded", Some(0))),
            ("cancelled", job_exit_status("cancelled", None)),
            ("timed_out", job_exit_status("timed_out", None)),
            ("lost", job_exit_status("lost", None)),
        ];
        for (state, status) in said {
            assert!(
                help.contains(&format!("{state} {status}")),
                "{state}: {help}"
            );
        }
        assert!(help.contains("make's exit code (2 when a recipe fails), 1 without one"));
        assert_eq!(job_exit_status("failed", Some(2)), 2);
        assert_eq!(job_exit_status("failed", None), 1);
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
    fn secrets_on_the_command_line_are_noted() {
        use clap::FromArgMatches as _;
        let parse = |args: &[&str]| {
            let matches = Cli::command().try_get_matches_from(args).expect("parses");
            let mut cli = Cli::from_arg_matches(&matches).expect("parses");
            cli.note_command_line(&matches);
            cli
        };
        let cli = parse(&["hobot", "repos", "ls", "--token-file", "/run/token"]);
        assert_eq!(cli.global.token_file, Some(PathBuf::from("/run/token")));

        let cli = parse(&["hobot", "up", "--admin-token", "hbad_0123456789abcdef"]);
        let Command::Up(up) = cli.command else {
            panic!("not up")
        };
        assert_eq!(
            up.controller.secrets_on_command_line,
            [hobotnica_controller::CommandLineSecret::AdminToken]
        );
    }

    /// The store options of `hobot admin export | import | migrate`.
    fn admin(args: &[&str]) -> anyhow::Result<Vec<String>> {
        let matches = Cli::command()
            .try_get_matches_from(std::iter::once("hobot").chain(args.iter().copied()))?;
        let mut cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
        cli.note_command_line(&matches);
        let Command::Admin(admin) = cli.command else {
            anyhow::bail!("not an admin command");
        };
        let locations = match admin {
            AdminCommand::Export(args) => vec![args.store.location()?],
            AdminCommand::Import(args) => vec![args.store.location()?],
            AdminCommand::Migrate(args) => vec![args.from.location()?, args.to.location()?],
            AdminCommand::RotateKey(_) => Vec::new(),
        };
        Ok(locations
            .iter()
            .map(|location| location.describe())
            .collect())
    }

    #[test]
    fn admin_commands_name_their_stores_and_refuse_passwords_in_argv() {
        assert_eq!(
            admin(&["admin", "export", "--data-dir", "/srv/h", "--out", "f"]).unwrap(),
            ["the embedded store in /srv/h"]
        );
        assert_eq!(
            admin(&["admin", "import", "--redis", "redis://r:6379/0", "f"]).unwrap(),
            ["Redis at r:6379"]
        );
        assert_eq!(
            admin(&[
                "admin",
                "migrate",
                "--from-data-dir",
                ".hobotnica",
                "--to-redis",
                "redis://r:6379/0",
            ])
            .unwrap(),
            ["the embedded store in .hobotnica", "Redis at r:6379"]
        );
        let refused = admin(&["admin", "import", "--redis", "redis://:pw@r:6379/0", "f"])
            .unwrap_err()
            .to_string();
        assert!(refused.contains("refused on the command line"), "{refused}");
        assert!(!refused.contains("pw"), "{refused}");
        let none = admin(&["admin", "export", "--out", "f"])
            .unwrap_err()
            .to_string();
        assert!(none.contains("name the store"), "{none}");
        let both = admin(&[
            "admin",
            "export",
            "--data-dir",
            "d",
            "--redis",
            "redis://r/",
            "--out",
            "f",
        ])
        .unwrap_err()
        .to_string();
        assert!(both.contains("not more"), "{both}");
        assert_eq!(
            admin(&[
                "admin",
                "migrate",
                "--from-redis",
                "redis://r:6379/0",
                "--to-postgres",
                "postgres://ci@db.internal:5432/hobotnica?sslmode=verify-full",
            ])
            .unwrap(),
            ["Redis at r:6379", "PostgreSQL at db.internal:5432"]
        );
        let refused = admin(&[
            "admin",
            "import",
            "--postgres",
            "postgres://ci:pw@db:5432/ci",
            "f",
        ])
        .unwrap_err()
        .to_string();
        assert!(refused.contains("HOBOTNICA_POSTGRES_URL"), "{refused}");
        assert!(!refused.contains("pw"), "{refused}");
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

    #[test]
    fn deploy_arguments() {
        let cli = Cli::try_parse_from([
            "hobot", "deploy", "octo/app", "--branch", "main", "-e", "A=1", "--env", "B=x=y",
            "--follow",
        ])
        .expect("parses");
        let Command::Deploy(deploy) = cli.command else {
            panic!("not deploy")
        };
        assert_eq!(deploy.repo, "octo/app");
        assert_eq!(deploy.branch.as_deref(), Some("main"));
        assert_eq!(deploy.commit, None);
        assert_eq!(
            deploy.env,
            vec![
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "x=y".to_owned())
            ]
        );
        assert!(deploy.follow);
        assert_eq!(deploy.idempotency_key, None);

        let cli =
            Cli::try_parse_from(["hobot", "deploy", "app", "--idempotency-key", "release-42"])
                .expect("parses");
        let Command::Deploy(deploy) = cli.command else {
            panic!("not deploy")
        };
        assert_eq!(deploy.idempotency_key.as_deref(), Some("release-42"));
        assert!(!deploy.follow);

        for bad in [
            &[
                "hobot", "deploy", "app", "--commit", "abc", "--branch", "main",
            ][..],
            &["hobot", "deploy", "app", "--idempotency-key", "has space"],
            &["hobot", "deploy", "app", "--idempotency-key", ""],
            &["hobot", "deploy", "app", "--env", "NOEQUALS"],
            &["hobot", "deploy"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_arguments_never_take_a_value() {
        let cli = Cli::try_parse_from([
            "hobot", "env", "set", "app", "TOKEN", "--secret", "--scope", "deploy",
        ])
        .expect("parses");
        let Command::Env(EnvCommand::Set {
            repo,
            key,
            secret,
            scope,
            ..
        }) = cli.command
        else {
            panic!("not env set")
        };
        assert_eq!((repo.as_str(), key.as_str()), ("app", "TOKEN"));
        assert!(secret);
        assert_eq!(scope, Some(EnvScope::Deploy));

        // A value after the key is taken only to be refused with how to
        // pass it (stdin): `env set` says so before it does anything.
        let cli = Cli::try_parse_from(["hobot", "env", "set", "app", "TOKEN", "s3cr3t"])
            .expect("parses, to be refused");
        let Command::Env(EnvCommand::Set { value, .. }) = cli.command else {
            panic!("not env set")
        };
        assert_eq!(value.as_deref(), Some("s3cr3t"));

        for bad in [
            &["hobot", "env", "set", "app", "TOKEN", "--value", "s3cr3t"][..],
            &["hobot", "env", "set", "app", "TOKEN", "s3cr3t", "extra"],
            &["hobot", "env", "set", "app", "TOKEN", "--scope", "prod"],
            &["hobot", "env", "ls", "app", "TOKEN"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }

        let cli = Cli::try_parse_from(["hobot", "env", "rm", "app", "TOKEN", "--scope", "test"])
            .expect("parses");
        let Command::Env(EnvCommand::Rm { scope, .. }) = cli.command else {
            panic!("not env rm")
        };
        assert_eq!(scope.map(EnvScope::as_str), Some("test"));
        let cli = Cli::try_parse_from(["hobot", "--json", "env", "ls", "app"]).expect("parses");
        assert!(cli.global.json);
        assert!(matches!(cli.command, Command::Env(EnvCommand::Ls { .. })));
    }

    #[test]
    fn retry_and_deploys_arguments() {
        let cli = Cli::try_parse_from(["hobot", "jobs", "retry", "12"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Jobs(JobsCommand::Retry { id: 12 })
        ));
        assert!(Cli::try_parse_from(["hobot", "jobs", "retry", "twelve"]).is_err());

        let cli = Cli::try_parse_from(["hobot", "deploys", "octo/app", "--json", "--limit", "5"])
            .expect("parses");
        assert!(cli.global.json);
        let Command::Deploys(deploys) = cli.command else {
            panic!("not deploys")
        };
        assert_eq!(
            (deploys.repo.as_str(), deploys.limit),
            ("octo/app", Some(5))
        );
        // A page holds 1 to 200: refused before asking the controller.
        assert!(Cli::try_parse_from(["hobot", "jobs", "ls", "--limit", "200"]).is_ok());
        for limit in ["0", "201"] {
            assert!(
                Cli::try_parse_from(["hobot", "deploys", "octo/app", "--limit", limit]).is_err()
            );
            assert!(Cli::try_parse_from(["hobot", "jobs", "ls", "--limit", limit]).is_err());
        }
    }
}
