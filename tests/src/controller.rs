//! A `hobotnica-controller` process with its own data directory, ports and
//! tokens; it can be killed and started again on the same ports and data.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::api::Api;
use crate::bins;
use crate::daemon::{Daemon, Spec};
use crate::net::free_addr;
use crate::tls::TestPki;
use crate::wait::POLL_INTERVAL;

/// How long a controller may take to answer `/readyz` after it starts.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of a test controller.
#[derive(Clone, Debug)]
pub struct ControllerOpts {
    /// `--lease-timeout`: short, so lost agents are noticed quickly.
    pub lease_timeout: Duration,
    /// `--kill-grace`.
    pub kill_grace: Duration,
    /// More flags.
    pub extra_args: Vec<String>,
    /// Serve TLS with a certificate from a fresh test CA ([`Controller::pki`]).
    pub tls: bool,
    /// `--client-ca`: agents must present a client certificate of that CA.
    pub client_ca: bool,
    /// `--redis`: keep everything in this Redis.
    pub redis_url: Option<String>,
    /// `HOBOTNICA_POSTGRES_URL`: keep everything in this PostgreSQL
    /// database (the URL goes through the environment, as one with a
    /// password must).
    pub postgres_url: Option<String>,
    /// The admin and pool agent tokens (default: fresh ones). Controllers
    /// sharing one Redis share them: see [`Controller::peer_opts`].
    pub tokens: Option<(String, String)>,
    /// `--secret-key-file` contents (64 hex characters). With Redis, one is
    /// generated when not given, and peers share it.
    pub secret_key_hex: Option<String>,
    /// Pass the tokens as `--admin-token-file` and `--agent-token-file`
    /// (mode 0600, outside the data directory) instead of the environment.
    pub token_files: bool,
}

impl Default for ControllerOpts {
    fn default() -> Self {
        ControllerOpts {
            lease_timeout: Duration::from_secs(2),
            kill_grace: Duration::from_secs(1),
            extra_args: Vec::new(),
            tls: false,
            client_ca: false,
            redis_url: None,
            postgres_url: None,
            tokens: None,
            secret_key_hex: None,
            token_files: false,
        }
    }
}

/// A running controller.
pub struct Controller {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub admin_token: String,
    pub agent_token: String,
    pub opts: ControllerOpts,
    /// The test CA and certificates, when it serves TLS.
    pub pki: Option<TestPki>,
    daemon: Daemon,
    dir: TempDir,
}

fn duration_flag(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

impl Controller {
    /// Starts a controller with default options and waits until it is ready.
    pub async fn start_default() -> Controller {
        Controller::start(ControllerOpts::default()).await
    }

    /// Starts a controller and waits until `/readyz` answers 200.
    pub async fn start(opts: ControllerOpts) -> Controller {
        crate::init();
        let dir = tempfile::Builder::new()
            .prefix("hobotnica-controller-")
            .tempdir()
            .expect("temp dir");
        let data_dir = dir.path().join("data");
        let http_addr = free_addr();
        let grpc_addr = free_addr();
        let (admin_token, agent_token) = opts.tokens.clone().unwrap_or_else(|| {
            (
                hobotnica_common::token::new_token("hbt_admin"),
                hobotnica_common::token::new_token("hbag_pool"),
            )
        });
        let mut args: Vec<OsString> = vec![
            "--data-dir".into(),
            data_dir.into(),
            "--listen".into(),
            http_addr.to_string().into(),
            "--grpc-listen".into(),
            grpc_addr.to_string().into(),
            "--lease-timeout".into(),
            duration_flag(opts.lease_timeout).into(),
            "--kill-grace".into(),
            duration_flag(opts.kill_grace).into(),
        ];
        let pki = opts.tls.then(|| TestPki::create(&dir.path().join("pki")));
        if let Some(pki) = &pki {
            args.extend([
                "--tls-cert".into(),
                pki.server_cert.clone().into(),
                "--tls-key".into(),
                pki.server_key.clone().into(),
            ]);
            if opts.client_ca {
                args.extend(["--client-ca".into(), pki.ca_cert.clone().into()]);
            }
        }
        let mut opts = opts;
        if let Some(url) = &opts.redis_url {
            args.extend(["--redis".into(), url.into()]);
        }
        if opts.redis_url.is_some() || opts.postgres_url.is_some() {
            let key = opts
                .secret_key_hex
                .get_or_insert_with(hobotnica_common::secrets::SecretKey::generate_hex);
            let key_file = dir.path().join("secret-key");
            std::fs::write(&key_file, format!("{key}\n")).expect("write the secret key");
            args.extend(["--secret-key-file".into(), key_file.into()]);
        }
        args.extend(opts.extra_args.iter().map(OsString::from));
        // Tokens through files or the environment: never in argv.
        let mut env: Vec<(OsString, OsString)> =
            vec![("HOBOTNICA_LOG".into(), log_filter().into())];
        if let Some(url) = &opts.postgres_url {
            env.push(("HOBOTNICA_POSTGRES_URL".into(), url.into()));
        }
        for (name, token, option) in [
            ("admin", &admin_token, "--admin-token-file"),
            ("agent", &agent_token, "--agent-token-file"),
        ] {
            if opts.token_files {
                let path = dir.path().join(format!("{name}-token"));
                crate::agent::write_file_with_mode(&path, &format!("{token}\n"), 0o600);
                args.extend([option.into(), path.into()]);
            } else {
                let variable = format!("HOBOTNICA_{}_TOKEN", name.to_uppercase());
                env.push((variable.into(), token.into()));
            }
        }
        let spec = Spec {
            name: "controller".to_owned(),
            program: bins::bin(bins::CONTROLLER),
            args,
            env,
            cwd: Some(dir.path().to_path_buf()),
            log_dir: dir.path().to_path_buf(),
        };
        let mut controller = Controller {
            http_addr,
            grpc_addr,
            admin_token,
            agent_token,
            opts,
            pki,
            daemon: Daemon::spawn(spec),
            dir,
        };
        controller.wait_ready().await;
        controller
    }

    async fn wait_ready(&mut self) {
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(2));
        if let Some(pki) = &self.pki {
            http = http.tls_certs_only([
                reqwest::Certificate::from_pem(&pki.ca_pem()).expect("CA certificate")
            ]);
        }
        let http = http.build().expect("reqwest client");
        let url = format!("{}/readyz", self.url());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.daemon.try_exit() {
                panic!("the controller exited ({status}) before it was ready");
            }
            let ready = http
                .get(&url)
                .send()
                .await
                .is_ok_and(|response| response.status().is_success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the controller was not ready after {READY_TIMEOUT:?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Options for another controller beside this one: the same Redis and
    /// tokens.
    pub fn peer_opts(&self) -> ControllerOpts {
        ControllerOpts {
            tokens: Some((self.admin_token.clone(), self.agent_token.clone())),
            ..self.opts.clone()
        }
    }

    /// `http` or, with TLS, `https`.
    pub fn scheme(&self) -> &'static str {
        if self.pki.is_some() { "https" } else { "http" }
    }

    /// `http(s)://<rest address>`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.http_addr)
    }

    /// `http(s)://<grpc address>`, what agents and `hobot logs` connect to.
    pub fn grpc_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.grpc_addr)
    }

    /// A REST client with the admin token (trusting the test CA with TLS).
    pub fn api(&self) -> Api {
        let ca_pem = self.pki.as_ref().map(TestPki::ca_pem);
        Api::with_ca(self.url(), Some(&self.admin_token), ca_pem.as_deref())
    }

    /// The data directory (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A scratch directory that jobs can write to too (under
    /// [`crate::shared_dir`]), for this controller's tests.
    pub fn scratch_dir(&self, name: &str) -> PathBuf {
        let controller = self.dir.path().file_name().unwrap_or_default();
        let path = crate::shared_dir().join(controller).join(name);
        std::fs::create_dir_all(&path).expect("scratch dir");
        path
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        self.daemon.kill9();
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }

    /// SIGTERM and wait for it to exit (SIGKILL after 30 s).
    pub async fn stop(&mut self) {
        self.daemon.stop(Duration::from_secs(30)).await;
    }

    /// Stops it if it runs (SIGTERM), then starts it again on the same
    /// ports, data directory and tokens, and waits until it is ready.
    pub async fn restart(&mut self) {
        if self.daemon.is_running() {
            self.stop().await;
        }
        self.daemon.start();
        self.wait_ready().await;
    }

    /// Its stdout and stderr so far.
    pub fn output(&self) -> String {
        self.daemon.output()
    }

    /// Its whole log (stderr) so far.
    pub fn stderr(&self) -> String {
        self.daemon.stderr()
    }

    /// Its whole stdout so far.
    pub fn stdout(&self) -> String {
        self.daemon.stdout()
    }

    /// Everything it logged so far (stdout and stderr, whole).
    pub fn whole_log(&self) -> String {
        format!("{}{}", self.daemon.stdout(), self.daemon.stderr())
    }
}

/// The log filter given to the processes under test.
pub(crate) fn log_filter() -> String {
    "info,hobotnica_controller=debug,hobotnica_agent=debug".to_owned()
}
