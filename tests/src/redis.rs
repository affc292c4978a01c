//! A `redis-server` of the test's own on a free port, with AOF persistence in
//! a temp dir, that can be stopped, killed and started again on the same
//! port and data (the "Redis restarted" and "Redis unreachable" faults).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use tempfile::TempDir;

use crate::daemon::{Daemon, Spec};
use crate::net::free_addr;
use crate::tls::TestPki;
use crate::wait::wait_until;

/// How long redis-server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct RedisServer {
    pub addr: SocketAddr,
    tls: bool,
    daemon: Daemon,
    dir: TempDir,
}

impl RedisServer {
    /// Starts redis-server with `appendonly yes` and `noeviction`, and waits
    /// until it answers.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(None).await
    }

    /// The same, speaking only TLS with the test PKI's server certificate.
    pub async fn start_tls(pki: &TestPki) -> RedisServer {
        RedisServer::start_with(Some(pki)).await
    }

    async fn start_with(tls: Option<&TestPki>) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("hobotnica-redis-")
            .tempdir()
            .expect("temp dir");
        let addr = free_addr();
        let port = addr.port().to_string();
        let mut args: Vec<OsString> = match tls {
            None => vec!["--port".into(), port.into()],
            Some(pki) => vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.into(),
                "--tls-cert-file".into(),
                pki.server_cert.clone().into(),
                "--tls-key-file".into(),
                pki.server_key.clone().into(),
                "--tls-ca-cert-file".into(),
                pki.ca_cert.clone().into(),
                "--tls-auth-clients".into(),
                "no".into(),
            ],
        };
        args.extend(
            [
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--maxmemory-policy",
                "noeviction",
            ]
            .iter()
            .map(OsString::from),
        );
        args.extend([OsString::from("--dir"), dir.path().as_os_str().to_owned()]);
        let daemon = Daemon::spawn(Spec {
            name: format!("redis-{}", addr.port()),
            program: "redis-server".into(),
            args,
            env: Vec::new(),
            cwd: Some(dir.path().to_path_buf()),
            log_dir: dir.path().to_path_buf(),
        });
        let server = RedisServer {
            addr,
            tls: tls.is_some(),
            daemon,
            dir,
        };
        server.wait_accepting().await;
        server
    }

    /// `redis://127.0.0.1:<port>/` (`rediss://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://{}/", self.addr)
    }

    async fn wait_accepting(&self) {
        let addr = self.addr;
        wait_until(
            START_TIMEOUT,
            "redis-server to accept connections",
            || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
        )
        .await;
    }

    /// Its `--dir`: the append-only files.
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// SIGKILL: Redis is gone at once (what it had fsynced to the AOF stays).
    pub fn kill9(&mut self) {
        self.daemon.kill9();
    }

    /// SIGTERM and wait: a clean shutdown.
    pub async fn stop(&mut self) {
        self.daemon.stop(START_TIMEOUT).await;
    }

    /// Starts it again on the same port and data, and waits until it answers.
    pub async fn restart(&mut self) {
        self.daemon.start();
        self.wait_accepting().await;
    }
}
