//! The agent's configuration: every option is a flag and a `HOBOTNICA_*`
//! environment variable.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use hobotnica_common::duration::parse_duration;
use hobotnica_common::private_fs::{Secret, command_line_warning, read_secret_file};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::connection::{ClientIdentity, TlsOptions};
pub use crate::sandbox::Isolation;

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

    /// Agent token (the controller's pool token or a per-agent token). On
    /// the command line every process on the host can read it: prefer
    /// --token-file or HOBOTNICA_AGENT_TOKEN.
    #[arg(long, env = "HOBOTNICA_AGENT_TOKEN", hide_env_values = true, value_parser = Secret::parse)]
    pub token: Option<Secret>,

    /// File holding the agent token (mode 0600 or stricter), instead of
    /// --token.
    #[arg(long, env = "HOBOTNICA_AGENT_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Whether --token was given on the command line
    /// ([`AgentConfig::note_command_line`]).
    #[arg(skip)]
    pub token_on_command_line: bool,

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
    #[arg(long, env = "HOBOTNICA_AGENT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// On SIGTERM, how long running jobs may take to finish before they are
    /// cancelled.
    #[arg(long, env = "HOBOTNICA_DRAIN_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// How often an idle connection to a controller is pinged (HTTP/2). A
    /// controller that vanished without closing the connection (its host
    /// died, the route went away) is noticed within about twice this; the
    /// agent then fails over to the next controller.
    #[arg(long, env = "HOBOTNICA_KEEPALIVE", default_value = "15s", value_parser = parse_duration)]
    pub keepalive: Duration,

    /// Longest a single git command (fetch, work tree checkout) may take.
    #[arg(long, env = "HOBOTNICA_GIT_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub git_timeout: Duration,

    /// PEM CA certificate(s) that `https://` controllers' certificates are
    /// verified against, instead of the system's roots.
    #[arg(long, env = "HOBOTNICA_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// PEM client certificate for mutual TLS (a controller started with
    /// --client-ca).
    #[arg(long, env = "HOBOTNICA_CLIENT_CERT", value_name = "FILE")]
    pub client_cert: Option<PathBuf>,

    /// PEM private key of --client-cert (keep it mode 0600).
    #[arg(long, env = "HOBOTNICA_CLIENT_KEY", value_name = "FILE")]
    pub client_key: Option<PathBuf>,

    /// How jobs are isolated: `sandbox` runs every job in a bubblewrap
    /// sandbox (own PID, mount, IPC and UTS namespaces; no access to the
    /// agent's files or other jobs); `none` runs jobs as the agent's user,
    /// for agents whose every job is trusted.
    #[arg(long, env = "HOBOTNICA_ISOLATION", value_enum, default_value_t = Isolation::Sandbox)]
    pub isolation: Isolation,

    /// The bubblewrap program the sandbox uses.
    #[arg(
        long,
        env = "HOBOTNICA_BWRAP",
        value_name = "PROGRAM",
        default_value = "bwrap"
    )]
    pub bwrap: PathBuf,

    /// Host paths sandboxed jobs may read besides the system directories
    /// (/usr, /bin, /lib*, /etc), e.g. a toolchain in /opt; comma-separated.
    #[arg(
        long,
        env = "HOBOTNICA_SANDBOX_RO_BIND",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub sandbox_ro_bind: Vec<PathBuf>,

    /// Host directories sandboxed jobs may WRITE to, at the same path;
    /// comma-separated. Whatever one job leaves there, the next reads: never
    /// share one between untrusted and trusted (deploy) jobs.
    #[arg(
        long,
        env = "HOBOTNICA_SANDBOX_RW_BIND",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub sandbox_rw_bind: Vec<PathBuf>,

    /// Host paths sandboxed jobs must never see even where a visible
    /// directory holds them (a directory shows empty, a file empty);
    /// comma-separated. The work dir and the agent's key files are always
    /// hidden.
    #[arg(
        long,
        env = "HOBOTNICA_SANDBOX_HIDE",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub sandbox_hide: Vec<PathBuf>,

    /// Allow plaintext `http://` controller URLs on hosts other than
    /// loopback: the token and the logs then cross the network unencrypted.
    #[arg(long, env = "HOBOTNICA_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,

    /// systemd's notification socket, set by systemd for `Type=notify`
    /// units: the agent says READY=1 once it is set up and connecting.
    #[arg(long, env = "NOTIFY_SOCKET", hide = true)]
    pub notify_socket: Option<std::ffi::OsString>,
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
            hobotnica_common::transport::check_url("--controller", url, self.insecure)
                .map_err(anyhow::Error::msg)?;
        }
        match (&self.client_cert, &self.client_key) {
            (Some(_), None) => anyhow::bail!("--client-cert needs --client-key"),
            (None, Some(_)) => anyhow::bail!("--client-key needs --client-cert"),
            _ => {}
        }
        match (&self.token, &self.token_file) {
            (Some(token), None) => check_token("--token", token)?,
            (None, Some(_)) => {}
            (Some(_), Some(_)) => anyhow::bail!(
                "give the agent token once: --token-file (HOBOTNICA_AGENT_TOKEN_FILE) or --token (HOBOTNICA_AGENT_TOKEN), not both"
            ),
            (None, None) => anyhow::bail!(
                "the agent token is missing: give --token-file FILE (HOBOTNICA_AGENT_TOKEN_FILE) or HOBOTNICA_AGENT_TOKEN"
            ),
        }
        anyhow::ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        anyhow::ensure!(
            self.keepalive >= MIN_KEEPALIVE,
            "--keepalive must be at least {MIN_KEEPALIVE:?} (controllers would take more frequent pings for abuse)"
        );
        anyhow::ensure!(
            !self.git_timeout.is_zero(),
            "--git-timeout must be longer than zero"
        );
        Ok(())
    }
}

/// The shortest `--keepalive`.
pub const MIN_KEEPALIVE: Duration = Duration::from_secs(1);

/// Where the agent token comes from, and the rules it must follow.
impl AgentConfig {
    /// Notes whether the token was given on the command line; `matches` are
    /// those of the command that flattens this configuration.
    pub fn note_command_line(&mut self, matches: &clap::ArgMatches) {
        self.token_on_command_line =
            matches.value_source("token") == Some(clap::parser::ValueSource::CommandLine);
    }

    /// The agent token, from --token-file or --token / HOBOTNICA_AGENT_TOKEN
    /// (run [`AgentConfig::validate`] first). Warns when it was on the
    /// command line. Errors never contain the token.
    pub fn agent_token(&self) -> anyhow::Result<Secret> {
        if self.token_on_command_line {
            tracing::warn!(
                "{}",
                command_line_warning(
                    "the agent token",
                    "--token",
                    "--token-file",
                    "HOBOTNICA_AGENT_TOKEN"
                )
            );
        }
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => token.clone(),
            (None, Some(path)) => read_secret_file("--token-file", path)?,
            (None, None) => anyhow::bail!("the agent token is missing"),
        };
        let option = if self.token.is_some() {
            "--token"
        } else {
            "--token-file"
        };
        check_token(option, &token)?;
        Ok(token)
    }
}

/// The form of an agent token: printable ASCII without spaces (it goes into
/// a header).
fn check_token(option: &str, token: &Secret) -> anyhow::Result<()> {
    anyhow::ensure!(
        !token.expose().trim().is_empty(),
        "{option}: the agent token must not be empty"
    );
    anyhow::ensure!(
        token.expose().bytes().all(|b| b.is_ascii_graphic()),
        "{option}: the agent token must be printable ASCII without spaces"
    );
    Ok(())
}

impl AgentConfig {
    /// Reads the TLS files named by `--ca-cert`, `--client-cert` and
    /// `--client-key`. Errors name the file, never its contents.
    pub fn tls_options(&self) -> anyhow::Result<TlsOptions> {
        let read = |option: &str, path: &PathBuf| {
            std::fs::read(path)
                .with_context(|| format!("cannot read {option} file {}", path.display()))
        };
        let ca_cert = match &self.ca_cert {
            Some(path) => {
                let pem = read("--ca-cert", path)?;
                let certs = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .ok()
                    .filter(|certs| !certs.is_empty());
                anyhow::ensure!(
                    certs.is_some(),
                    "--ca-cert file {} holds no PEM certificate",
                    path.display()
                );
                Some(pem)
            }
            None => None,
        };
        let identity = match (&self.client_cert, &self.client_key) {
            (Some(cert_path), Some(key_path)) => {
                let cert = read("--client-cert", cert_path)?;
                anyhow::ensure!(
                    CertificateDer::pem_slice_iter(&cert)
                        .next()
                        .is_some_and(|c| c.is_ok()),
                    "--client-cert file {} holds no PEM certificate",
                    cert_path.display()
                );
                let key = read("--client-key", key_path)?;
                anyhow::ensure!(
                    PrivateKeyDer::from_pem_slice(&key).is_ok(),
                    "--client-key file {} holds no PEM private key",
                    key_path.display()
                );
                Some(ClientIdentity { cert, key })
            }
            _ => None,
        };
        Ok(TlsOptions { ca_cert, identity })
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

#[cfg(test)]
mod tests {
    use clap::{Args as _, FromArgMatches as _};

    use super::AgentConfig;

    fn parse(args: &[&str]) -> AgentConfig {
        let command = AgentConfig::augment_args(clap::Command::new("t").no_binary_name(true));
        let mut all = vec!["--token", "hbag_0123456789abcdef"];
        all.extend_from_slice(args);
        let matches = command.try_get_matches_from(all).expect("parses");
        let mut config = AgentConfig::from_arg_matches(&matches).expect("parses");
        config.note_command_line(&matches);
        config
    }

    fn error(args: &[&str]) -> String {
        format!("{:#}", parse(args).validate().expect_err("must be refused"))
    }

    fn parse_without_token(args: &[&str]) -> Result<AgentConfig, String> {
        let command = AgentConfig::augment_args(clap::Command::new("t").no_binary_name(true));
        let matches = command
            .try_get_matches_from(args)
            .map_err(|e| e.to_string())?;
        let mut config = AgentConfig::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        config.note_command_line(&matches);
        Ok(config)
    }

    #[test]
    fn the_token_comes_from_a_private_file_or_the_command_line() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("agent-token");
        std::fs::write(&file, "hbag_fromfile0123456789\n").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let path = file.to_str().expect("utf-8");
        let base = ["--controller", "http://127.0.0.1:8081"];

        let config =
            parse_without_token(&[&base[..], &["--token-file", path]].concat()).expect("parses");
        config.validate().expect("valid");
        assert!(!config.token_on_command_line);
        let token = config.agent_token().expect("read");
        assert_eq!(token.expose(), "hbag_fromfile0123456789");

        let config = parse(&base);
        assert!(
            config.token_on_command_line,
            "--token is on the command line"
        );
        assert_eq!(
            config.agent_token().expect("given").expose(),
            "hbag_0123456789abcdef"
        );

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let config =
            parse_without_token(&[&base[..], &["--token-file", path]].concat()).expect("parses");
        let message = format!("{:#}", config.agent_token().expect_err("refused"));
        assert!(
            message.contains(path) && message.contains("0644") && message.contains("chmod 600"),
            "{message}"
        );
        assert!(!message.contains("fromfile"), "{message}");

        std::fs::write(&file, "hbag with spaces\n").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let config =
            parse_without_token(&[&base[..], &["--token-file", path]].concat()).expect("parses");
        let message = format!("{:#}", config.agent_token().expect_err("refused"));
        assert!(message.contains("printable ASCII"), "{message}");
        assert!(
            !message.contains("spaces\n") && !message.contains("hbag "),
            "{message}"
        );
    }

    #[test]
    fn exactly_one_token_source_is_required() {
        let base = ["--controller", "http://127.0.0.1:8081"];
        let config = parse_without_token(&base).expect("parses");
        let message = format!("{:#}", config.validate().expect_err("no token"));
        assert!(
            message.contains("--token-file") && message.contains("HOBOTNICA_AGENT_TOKEN"),
            "{message}"
        );
        let message = error(&[&base[..], &["--token-file", "/nonexistent"]].concat());
        assert!(message.contains("not both"), "{message}");
        assert!(!message.contains("hbag_0123456789abcdef"), "{message}");
    }

    #[test]
    fn plaintext_only_to_loopback_unless_insecure() {
        parse(&["--controller", "http://127.0.0.1:8081"])
            .validate()
            .expect("loopback");
        parse(&["--controller", "https://ci.example.com:8081"])
            .validate()
            .expect("TLS");
        let message = error(&[
            "--controller",
            "https://ci.example.com,http://10.0.0.2:8081",
        ]);
        assert!(
            message.contains("10.0.0.2") && message.contains("--insecure"),
            "{message}"
        );
        parse(&["--controller", "http://10.0.0.2:8081", "--insecure"])
            .validate()
            .expect("allowed with --insecure");
        let message = error(&["--controller", "ftp://ci.example.com"]);
        assert!(message.contains("https://"), "{message}");
    }

    #[test]
    fn a_client_certificate_and_its_key_come_together() {
        let base = ["--controller", "https://ci.example.com"];
        let message = error(&[&base[..], &["--client-cert", "a.pem"]].concat());
        assert!(message.contains("--client-key"), "{message}");
        let message = error(&[&base[..], &["--client-key", "k.pem"]].concat());
        assert!(message.contains("--client-cert"), "{message}");
    }

    #[test]
    fn tls_files_are_checked_and_keys_never_echoed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "no certificate here").expect("write");
        let config = parse(&[
            "--controller",
            "https://ci.example.com",
            "--ca-cert",
            ca.to_str().expect("utf-8"),
        ]);
        let message = format!("{:#}", config.tls_options().err().expect("refused"));
        assert!(message.contains("holds no PEM certificate"), "{message}");

        let key = dir.path().join("key.pem");
        std::fs::write(&key, "SECRETKEYMATERIAL").expect("write");
        let cert = dir.path().join("cert.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let config = parse(&[
            "--controller",
            "https://ci.example.com",
            "--client-cert",
            cert.to_str().expect("utf-8"),
            "--client-key",
            key.to_str().expect("utf-8"),
        ]);
        let message = format!("{:#}", config.tls_options().err().expect("refused"));
        assert!(message.contains("holds no PEM private key"), "{message}");
        assert!(!message.contains("SECRETKEYMATERIAL"), "{message}");
    }
}
