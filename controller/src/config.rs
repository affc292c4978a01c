//! The controller's configuration: every option is a flag and a
//! `HOBOTNICA_*` environment variable. `std::env` is read nowhere else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hobotnica_common::duration::parse_duration;
use hobotnica_common::logs::MIN_MAX_LOG_BYTES;
use hobotnica_common::private_fs::{Secret, command_line_warning, read_secret_file};
use hobotnica_common::size::parse_size;

/// `--max-log-bytes`: a size of at least [`MIN_MAX_LOG_BYTES`].
fn parse_log_limit(input: &str) -> Result<u64, String> {
    let bytes = parse_size(input)?;
    if bytes < MIN_MAX_LOG_BYTES {
        return Err(format!("must be at least {MIN_MAX_LOG_BYTES} bytes"));
    }
    Ok(bytes)
}

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

    /// How the log (on stderr) is written: `text`, lines for a person
    /// (coloured on a terminal), or `json`, one object a line for a log
    /// shipper (`timestamp`, `level`, `target`, `message`, then the fields of
    /// the spans and of the event, such as `request_id` and `job_id`, at the
    /// top level). `HOBOTNICA_LOG` filters either (default `info`).
    #[arg(
        long,
        env = "HOBOTNICA_LOG_FORMAT",
        default_value = "text",
        value_name = "text|json"
    )]
    pub log_format: hobotnica_common::logging::LogFormat,

    /// Address of `/metrics` (Prometheus text, or OpenMetrics when asked),
    /// plain HTTP without a token: bind it to loopback or a private
    /// network that only Prometheus reaches. Off when not given.
    #[arg(long, env = "HOBOTNICA_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// The admin API token. Without it, one is generated once and kept in
    /// `<data-dir>/admin-token`. On the command line every process on the
    /// host can read it: prefer --admin-token-file or the environment.
    #[arg(long, env = "HOBOTNICA_ADMIN_TOKEN", hide_env_values = true, value_parser = Secret::parse)]
    pub admin_token: Option<Secret>,

    /// File holding the admin API token (mode 0600 or stricter), instead of
    /// --admin-token.
    #[arg(long, env = "HOBOTNICA_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// A pool token agents may register with (per-agent tokens can also be
    /// created through the API). Prefer --agent-token-file or the
    /// environment to the command line.
    #[arg(long, env = "HOBOTNICA_AGENT_TOKEN", hide_env_values = true, value_parser = Secret::parse)]
    pub agent_token: Option<Secret>,

    /// File holding the pool agent token (mode 0600 or stricter), instead of
    /// --agent-token.
    #[arg(long, env = "HOBOTNICA_AGENT_TOKEN_FILE", value_name = "FILE")]
    pub agent_token_file: Option<PathBuf>,

    /// A running job whose lease is not renewed within this time is lost.
    #[arg(long, env = "HOBOTNICA_LEASE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub lease_timeout: Duration,

    /// Time between SIGTERM and SIGKILL when a job is cancelled or times out.
    #[arg(long, env = "HOBOTNICA_KILL_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub kill_grace: Duration,

    /// Keep everything in Redis instead of the embedded store
    /// (`redis://host:6379/0`, or `rediss://` for TLS). Any number of
    /// controllers may share one Redis. A URL with a password belongs in
    /// HOBOTNICA_REDIS_URL or --redis-url-file, not on the command line.
    #[arg(long = "redis", env = "HOBOTNICA_REDIS_URL", hide_env_values = true, value_parser = Secret::parse)]
    pub redis_url: Option<Secret>,

    /// With the embedded store: how long to wait for another controller
    /// that has the data directory's store open to stop (the new controller
    /// of a blue-green switch, started while the old one still serves).
    /// Its listeners are bound meanwhile, so connections wait instead of
    /// being refused. 0: refuse to start at once.
    #[arg(long, env = "HOBOTNICA_STORE_WAIT", default_value = "0s", value_parser = parse_duration)]
    pub store_wait: Duration,

    /// File holding the Redis URL (mode 0600 or stricter), instead of
    /// --redis.
    #[arg(long, env = "HOBOTNICA_REDIS_URL_FILE", value_name = "FILE")]
    pub redis_url_file: Option<PathBuf>,

    /// The CA certificate (PEM) that signed Redis' certificate, for
    /// `rediss://` with a private CA (default: the system's roots).
    #[arg(long, env = "HOBOTNICA_REDIS_CA_CERT")]
    pub redis_ca_cert: Option<PathBuf>,

    /// Keep everything in PostgreSQL instead of the embedded store
    /// (`postgres://user@host:5432/hobotnica?sslmode=verify-full`; sslmode
    /// disable, prefer, require, verify-ca or verify-full). Any number of
    /// controllers may share one database. A URL with a password belongs
    /// in HOBOTNICA_POSTGRES_URL or --postgres-url-file, not on the command
    /// line.
    #[arg(long = "postgres", env = "HOBOTNICA_POSTGRES_URL", hide_env_values = true, value_parser = Secret::parse)]
    pub postgres_url: Option<Secret>,

    /// File holding the PostgreSQL URL (mode 0600 or stricter), instead of
    /// --postgres.
    #[arg(long, env = "HOBOTNICA_POSTGRES_URL_FILE", value_name = "FILE")]
    pub postgres_url_file: Option<PathBuf>,

    /// The CA certificate (PEM) that signed PostgreSQL's certificate, for
    /// sslmode verify-ca and verify-full with a private CA (default: the
    /// system's roots).
    #[arg(long, env = "HOBOTNICA_POSTGRES_CA_CERT")]
    pub postgres_ca_cert: Option<PathBuf>,

    /// Finished jobs and their logs are deleted after this long.
    #[arg(long, env = "HOBOTNICA_RETENTION", default_value = "90d", value_parser = parse_duration)]
    pub retention: Duration,

    /// The most a job's log may hold (e.g. 65536, 64KiB, 512MiB, 1GiB);
    /// a repository may set a lower limit. Past it the agent stops the job,
    /// which fails, and the controller discards what still comes.
    #[arg(long, env = "HOBOTNICA_MAX_LOG_BYTES", default_value = "1GiB", value_parser = parse_log_limit)]
    pub max_log_bytes: u64,

    /// Only the newest this many jobs of each repository are kept.
    #[arg(
        long,
        env = "HOBOTNICA_RETENTION_JOBS_PER_REPO",
        default_value_t = 1000
    )]
    pub retention_jobs_per_repo: usize,

    /// GitHub's web URL: clone URLs are `<github-url>/<owner>/<name>.git`.
    #[arg(
        long,
        env = "HOBOTNICA_GITHUB_URL",
        default_value = "https://github.com"
    )]
    pub github_url: String,

    /// GitHub's API URL (GitHub Enterprise: `https://<host>/api/v3`).
    #[arg(
        long,
        env = "HOBOTNICA_GITHUB_API_URL",
        default_value = "https://api.github.com"
    )]
    pub github_api_url: String,

    /// How often the stored GitHub credentials of each repository are
    /// checked again (a repository whose access is gone is disabled).
    #[arg(long, env = "HOBOTNICA_GITHUB_RECHECK_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub github_recheck_interval: Duration,

    /// The key that encrypts secrets at rest (a file of 64 hex characters).
    /// Without it, the embedded store generates one in `<data-dir>/secret-key`.
    #[arg(long, env = "HOBOTNICA_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,

    /// The URL users reach the REST API at (used in links); defaults to
    /// `http://<listen>` (`https://` with TLS).
    #[arg(long, env = "HOBOTNICA_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// PEM certificate chain (leaf first) for both listeners; with
    /// --tls-key, REST and gRPC speak TLS only.
    #[arg(long, env = "HOBOTNICA_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (keep it mode 0600).
    #[arg(long, env = "HOBOTNICA_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS for agents: PEM CA certificate(s) that agents' client
    /// certificates must be issued by. Agents without one are refused;
    /// `hobot logs` (admin token) needs none. Requires --tls-cert.
    #[arg(long, env = "HOBOTNICA_CLIENT_CA", value_name = "FILE")]
    pub client_ca: Option<PathBuf>,

    /// Allow plaintext (no --tls-cert) on a non-loopback address. Tokens
    /// and logs then cross the network unencrypted.
    #[arg(long, env = "HOBOTNICA_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,

    /// Failed authentications one address, or one token, may make before
    /// further attempts get 429 (one more is allowed every 3 s after).
    #[arg(long, env = "HOBOTNICA_AUTH_FAILURE_LIMIT", default_value_t = crate::auth::DEFAULT_FAILURE_BURST, value_parser = clap::value_parser!(u32).range(1..))]
    pub auth_failure_limit: u32,

    /// Connections each listener (REST, gRPC) holds open at most; past it,
    /// new connections wait until one closes.
    #[arg(long, env = "HOBOTNICA_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// A REST request whose headers have not all arrived within this time
    /// closes its connection.
    #[arg(long, env = "HOBOTNICA_HEADER_READ_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// A REST connection with no request under way for this long is closed.
    #[arg(long, env = "HOBOTNICA_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// systemd's notification socket, set by systemd for `Type=notify`
    /// units: the controller says READY=1 once it serves.
    #[arg(long, env = "NOTIFY_SOCKET", hide = true)]
    pub notify_socket: Option<std::ffi::OsString>,

    /// Secret options given on the command line
    /// ([`ControllerConfig::note_command_line`]).
    #[arg(skip)]
    pub secrets_on_command_line: Vec<CommandLineSecret>,
}

/// A secret option that can also come from a file or the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandLineSecret {
    AdminToken,
    AgentToken,
    /// `--redis` with a password in the URL.
    RedisPassword,
    /// `--postgres` with a password in the URL.
    PostgresPassword,
}

impl CommandLineSecret {
    /// The warning logged at start-up.
    fn warning(self) -> String {
        let (what, option, file_option, env) = match self {
            CommandLineSecret::AdminToken => (
                "the admin token",
                "--admin-token",
                "--admin-token-file",
                "HOBOTNICA_ADMIN_TOKEN",
            ),
            CommandLineSecret::AgentToken => (
                "the agent token",
                "--agent-token",
                "--agent-token-file",
                "HOBOTNICA_AGENT_TOKEN",
            ),
            CommandLineSecret::RedisPassword => (
                "the Redis password",
                "--redis",
                "--redis-url-file",
                "HOBOTNICA_REDIS_URL",
            ),
            CommandLineSecret::PostgresPassword => (
                "the PostgreSQL password",
                "--postgres",
                "--postgres-url-file",
                "HOBOTNICA_POSTGRES_URL",
            ),
        };
        command_line_warning(what, option, file_option, env)
    }
}

/// Secrets from files, and warnings about secrets on the command line.
impl ControllerConfig {
    /// Notes which secrets were given on the command line; `matches` are
    /// those of the command that flattens this configuration.
    pub fn note_command_line(&mut self, matches: &clap::ArgMatches) {
        let on_command_line =
            |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        self.secrets_on_command_line = [
            (
                on_command_line("admin_token"),
                CommandLineSecret::AdminToken,
            ),
            (
                on_command_line("agent_token"),
                CommandLineSecret::AgentToken,
            ),
            (
                on_command_line("redis_url")
                    && self
                        .redis_url
                        .as_ref()
                        .is_some_and(|url| url_has_password(url.expose())),
                CommandLineSecret::RedisPassword,
            ),
            (
                on_command_line("postgres_url")
                    && self
                        .postgres_url
                        .as_ref()
                        .is_some_and(|url| url_has_password(url.expose())),
                CommandLineSecret::PostgresPassword,
            ),
        ]
        .into_iter()
        .filter_map(|(given, secret)| given.then_some(secret))
        .collect();
    }

    /// Logs a warning for each secret given on the command line.
    pub fn warn_about_command_line_secrets(&self) {
        for secret in &self.secrets_on_command_line {
            tracing::warn!("{}", secret.warning());
        }
    }

    /// Reads `--admin-token-file`, `--agent-token-file` and
    /// `--redis-url-file` and `--postgres-url-file` into the values they stand for (each file must be
    /// mode 0600 or stricter). A value given both ways is refused. Reading
    /// twice is harmless: a file read is forgotten.
    pub fn read_secret_files(&mut self) -> anyhow::Result<()> {
        fn read(
            value: &mut Option<Secret>,
            file: &mut Option<PathBuf>,
            file_option: &'static str,
            value_options: &str,
        ) -> anyhow::Result<()> {
            if let Some(path) = file.take() {
                anyhow::ensure!(
                    value.is_none(),
                    "give {file_option} or {value_options}, not both"
                );
                *value = Some(read_secret_file(file_option, &path)?);
            }
            Ok(())
        }
        read(
            &mut self.admin_token,
            &mut self.admin_token_file,
            "--admin-token-file",
            "--admin-token (HOBOTNICA_ADMIN_TOKEN)",
        )?;
        read(
            &mut self.agent_token,
            &mut self.agent_token_file,
            "--agent-token-file",
            "--agent-token (HOBOTNICA_AGENT_TOKEN)",
        )?;
        read(
            &mut self.redis_url,
            &mut self.redis_url_file,
            "--redis-url-file",
            "--redis (HOBOTNICA_REDIS_URL)",
        )?;
        read(
            &mut self.postgres_url,
            &mut self.postgres_url_file,
            "--postgres-url-file",
            "--postgres (HOBOTNICA_POSTGRES_URL)",
        )
    }
}

/// Whether a URL carries a password (`scheme://user:password@host`).
pub(crate) fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .is_some_and(|(_, password)| !password.is_empty())
}

impl ControllerConfig {
    /// Cross-field checks, run before anything starts (after
    /// [`ControllerConfig::read_secret_files`], or a token given as a file
    /// counts as missing).
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.lease_timeout >= Duration::from_millis(300),
            "--lease-timeout must be at least 300ms"
        );
        anyhow::ensure!(
            self.header_read_timeout >= Duration::from_millis(100)
                && self.idle_timeout >= Duration::from_millis(100),
            "--header-read-timeout and --idle-timeout must be at least 100ms"
        );
        if let Some(token) = &self.admin_token {
            anyhow::ensure!(
                token.expose().len() >= 16,
                "--admin-token must be at least 16 characters"
            );
        }
        anyhow::ensure!(
            self.redis_url.is_none() || self.postgres_url.is_none(),
            "give --redis or --postgres, not both: a controller keeps everything in one store"
        );
        for (given, option, store) in [
            (self.redis_url.is_some(), "--redis", "one Redis"),
            (
                self.postgres_url.is_some(),
                "--postgres",
                "one PostgreSQL database",
            ),
        ] {
            if !given {
                continue;
            }
            anyhow::ensure!(
                self.secret_key_file.is_some(),
                "with {option}, give the secret key (--secret-key-file or HOBOTNICA_SECRET_KEY_FILE): controllers sharing {store} must share it; make one with: openssl rand -hex 32"
            );
            anyhow::ensure!(
                self.admin_token.is_some(),
                "with {option}, give the admin token (--admin-token-file or HOBOTNICA_ADMIN_TOKEN): controllers sharing {store} must share it"
            );
        }
        if let Some(token) = &self.agent_token {
            anyhow::ensure!(
                token.expose().len() >= 16,
                "--agent-token must be at least 16 characters"
            );
        }
        self.validate_tls()?;
        // Read the certificate and key now, so that a bad file fails the
        // start before anything listens.
        crate::tls::ServerTls::load(self)?;
        Ok(())
    }

    /// Whether both listeners speak TLS (`--tls-cert` and `--tls-key`).
    pub fn tls_enabled(&self) -> bool {
        self.tls_cert.is_some() && self.tls_key.is_some()
    }

    /// The listen addresses that are not loopback (where plaintext needs
    /// `--insecure`).
    pub fn non_loopback_addrs(&self) -> Vec<SocketAddr> {
        [self.listen, self.grpc_listen]
            .into_iter()
            .filter(|addr| !addr.ip().to_canonical().is_loopback())
            .collect()
    }

    /// TLS options: a certificate and its key come together, client
    /// certificates need TLS, and plaintext stays on loopback unless
    /// `--insecure`.
    fn validate_tls(&self) -> anyhow::Result<()> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => anyhow::bail!(
                "--tls-cert needs --tls-key (HOBOTNICA_TLS_KEY): the certificate's private key"
            ),
            (None, Some(_)) => anyhow::bail!(
                "--tls-key needs --tls-cert (HOBOTNICA_TLS_CERT): the certificate chain of that key"
            ),
            _ => {}
        }
        anyhow::ensure!(
            self.client_ca.is_none() || self.tls_enabled(),
            "--client-ca needs --tls-cert and --tls-key: client certificates are checked in the TLS handshake"
        );
        if !self.tls_enabled()
            && !self.insecure
            && let Some(addr) = self.non_loopback_addrs().first()
        {
            anyhow::bail!(
                "refusing to serve plaintext on {addr}, which is not a loopback address: \
                 give --tls-cert and --tls-key (HOBOTNICA_TLS_CERT, HOBOTNICA_TLS_KEY), \
                 or --insecure (HOBOTNICA_INSECURE=true) to send tokens and logs unencrypted"
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

#[cfg(test)]
mod tls_tests {
    use clap::{Args as _, FromArgMatches as _};

    use super::ControllerConfig;

    fn parse(args: &[&str]) -> ControllerConfig {
        let command = ControllerConfig::augment_args(clap::Command::new("t").no_binary_name(true));
        let matches = command.try_get_matches_from(args).expect("parses");
        ControllerConfig::from_arg_matches(&matches).expect("parses")
    }

    /// The TLS option checks (the files named here do not exist).
    fn error(args: &[&str]) -> String {
        let config = parse(args);
        format!("{:#}", config.validate_tls().expect_err("must be refused"))
    }

    #[test]
    fn defaults_are_plaintext_on_loopback() {
        let config = parse(&[]);
        assert!(!config.tls_enabled());
        config.validate().expect("valid");
        parse(&["--listen", "[::1]:8080", "--grpc-listen", "127.0.0.2:8081"])
            .validate()
            .expect("loopback");
    }

    #[test]
    fn a_certificate_and_its_key_come_together() {
        let message = error(&["--tls-cert", "c.pem"]);
        assert!(message.contains("--tls-key"), "{message}");
        let message = error(&["--tls-key", "k.pem"]);
        assert!(message.contains("--tls-cert"), "{message}");
        let config = parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]);
        assert!(config.tls_enabled());
        config.validate_tls().expect("valid");
        let message = format!("{:#}", config.validate().expect_err("no such file"));
        assert!(
            message.contains("cannot read --tls-cert file c.pem"),
            "{message}"
        );
    }

    #[test]
    fn client_certificates_need_tls() {
        let message = error(&["--client-ca", "ca.pem"]);
        assert!(
            message.contains("--client-ca needs --tls-cert"),
            "{message}"
        );
        parse(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--client-ca",
            "ca.pem",
        ])
        .validate_tls()
        .expect("valid");
    }

    #[test]
    fn plaintext_off_loopback_needs_insecure() {
        for args in [
            &["--listen", "0.0.0.0:8080"][..],
            &["--grpc-listen", "10.1.2.3:8081"][..],
            &["--listen", "[::]:8080"][..],
        ] {
            let message = error(args);
            assert!(
                message.contains("refusing to serve plaintext")
                    && message.contains("--tls-cert")
                    && message.contains("--insecure"),
                "{args:?}: {message}"
            );
            let mut insecure = args.to_vec();
            insecure.push("--insecure");
            parse(&insecure)
                .validate()
                .expect("allowed with --insecure");
            let mut tls = args.to_vec();
            tls.extend(["--tls-cert", "c.pem", "--tls-key", "k.pem"]);
            parse(&tls).validate_tls().expect("allowed with TLS");
        }
    }
}

#[cfg(test)]
mod secret_tests {
    use std::os::unix::fs::PermissionsExt as _;

    use clap::{Args as _, FromArgMatches as _};

    use super::{CommandLineSecret, ControllerConfig, url_has_password};

    fn parse(args: &[&str]) -> ControllerConfig {
        let command = ControllerConfig::augment_args(clap::Command::new("t").no_binary_name(true));
        let matches = command.try_get_matches_from(args).expect("parses");
        let mut config = ControllerConfig::from_arg_matches(&matches).expect("parses");
        config.note_command_line(&matches);
        config
    }

    fn private_file(dir: &std::path::Path, name: &str, contents: &str, mode: u32) -> String {
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path.to_str().expect("utf-8").to_owned()
    }

    #[test]
    fn tokens_and_the_redis_url_are_read_from_private_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let admin = private_file(dir.path(), "admin", "hbad_0123456789abcdef\n", 0o600);
        let agent = private_file(dir.path(), "agent", "hbag_0123456789abcdef\n", 0o400);
        let redis = private_file(dir.path(), "redis", "redis://:pw@127.0.0.1:6379/0\n", 0o600);
        let mut config = parse(&[
            "--admin-token-file",
            &admin,
            "--agent-token-file",
            &agent,
            "--redis-url-file",
            &redis,
        ]);
        assert!(config.secrets_on_command_line.is_empty());
        config.read_secret_files().expect("read");
        let expose = |secret: &Option<hobotnica_common::private_fs::Secret>| {
            secret.as_ref().map(|s| s.expose().to_owned())
        };
        assert_eq!(
            expose(&config.admin_token).as_deref(),
            Some("hbad_0123456789abcdef")
        );
        assert_eq!(
            expose(&config.agent_token).as_deref(),
            Some("hbag_0123456789abcdef")
        );
        assert_eq!(
            expose(&config.redis_url).as_deref(),
            Some("redis://:pw@127.0.0.1:6379/0")
        );
        config
            .read_secret_files()
            .expect("a second read changes nothing");

        let loose = private_file(dir.path(), "loose", "hbad_0123456789abcdef\n", 0o640);
        let message = format!(
            "{:#}",
            parse(&["--admin-token-file", &loose])
                .read_secret_files()
                .expect_err("refused")
        );
        assert!(
            message.contains("0640") && message.contains(&format!("chmod 600 {loose}")),
            "{message}"
        );
        assert!(!message.contains("0123456789abcdef"), "{message}");

        let message = format!(
            "{:#}",
            parse(&[
                "--agent-token-file",
                &agent,
                "--agent-token",
                "hbag_fedcba9876543210"
            ])
            .read_secret_files()
            .expect_err("both")
        );
        assert!(message.contains("not both"), "{message}");
        assert!(!message.contains("fedcba"), "{message}");
    }

    #[test]
    fn secrets_on_the_command_line_are_noted() {
        let config = parse(&[
            "--admin-token",
            "hbad_0123456789abcdef",
            "--agent-token",
            "hbag_0123456789abcdef",
            "--redis",
            "redis://:pw@127.0.0.1/0",
        ]);
        assert_eq!(
            config.secrets_on_command_line,
            [
                CommandLineSecret::AdminToken,
                CommandLineSecret::AgentToken,
                CommandLineSecret::RedisPassword
            ]
        );
        let config = parse(&["--redis", "redis://127.0.0.1:6379/0"]);
        assert!(config.secrets_on_command_line.is_empty());
        let config = parse(&["--postgres", "postgres://ci:pw@127.0.0.1/ci"]);
        assert_eq!(
            config.secrets_on_command_line,
            [CommandLineSecret::PostgresPassword]
        );
        let config = parse(&["--postgres", "postgres://ci@127.0.0.1/ci"]);
        assert!(config.secrets_on_command_line.is_empty());
    }

    #[test]
    fn postgres_needs_the_shared_secrets_and_excludes_redis() {
        let dir = tempfile::tempdir().unwrap();
        let url = private_file(
            dir.path(),
            "postgres",
            "postgres://ci:pw@127.0.0.1:5432/ci\n",
            0o600,
        );
        let mut config = parse(&["--postgres-url-file", &url]);
        config.read_secret_files().unwrap();
        assert_eq!(
            config.postgres_url.as_ref().map(|url| url.expose()),
            Some("postgres://ci:pw@127.0.0.1:5432/ci")
        );
        let message = format!("{:#}", config.validate().unwrap_err());
        assert!(
            message.contains("with --postgres, give the secret key"),
            "{message}"
        );
        assert!(!message.contains("pw"), "{message}");

        let mut both = parse(&[
            "--redis",
            "redis://127.0.0.1:6379/0",
            "--postgres",
            "postgres://ci@127.0.0.1/ci",
        ]);
        both.read_secret_files().unwrap();
        let message = format!("{:#}", both.validate().unwrap_err());
        assert!(
            message.contains("give --redis or --postgres, not both"),
            "{message}"
        );
    }

    #[test]
    fn passwords_in_urls_are_found() {
        for (url, has) in [
            ("redis://:pw@host:6379/0", true),
            ("rediss://user:pw@host", true),
            ("redis://user@host", false),
            ("redis://user:@host", false),
            ("redis://host:6379/0", false),
            ("redis://host/0?x=a:b@c", false),
            ("redis://u:p@ss@host", true),
        ] {
            assert_eq!(url_has_password(url), has, "{url}");
        }
    }
}
