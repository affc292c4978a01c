//! A PostgreSQL server of the test's own: `initdb` into a temp dir, then
//! `postgres` on a free loopback port with trust authentication, that can be
//! stopped, killed and started again on the same port and data (the
//! "PostgreSQL restarted" and "PostgreSQL unreachable" faults). Never the
//! machine's own server.
//!
//! PostgreSQL refuses to run as root: as root the server runs as the
//! `postgres` user (Debian's package makes it), through `setpriv`. Debian
//! keeps the binaries in `/usr/lib/postgresql/<version>/bin`, off `PATH`;
//! the newest version there is used, else `PATH`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::daemon::{Daemon, Spec};
use crate::net::free_addr;
use crate::tls::TestPki;
use crate::wait::wait_until;

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The user the server runs as when the tests run as root.
const SERVER_USER: &str = "postgres";

pub struct PostgresServer {
    pub addr: SocketAddr,
    tls: bool,
    daemon: Daemon,
    data: PathBuf,
    _dir: TempDir,
}

/// The directory holding `initdb` and `postgres`.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn program(name: &str) -> PathBuf {
    bin_dir().map_or_else(|| PathBuf::from(name), |dir| dir.join(name))
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// `program args`, as the server user when we are root.
fn as_server_user(program: &Path, args: Vec<OsString>) -> (PathBuf, Vec<OsString>) {
    if !running_as_root() {
        return (program.to_path_buf(), args);
    }
    let mut wrapped: Vec<OsString> = [
        "--reuid",
        SERVER_USER,
        "--regid",
        SERVER_USER,
        "--init-groups",
        "--",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    wrapped.push(program.as_os_str().to_owned());
    wrapped.extend(args);
    (PathBuf::from("setpriv"), wrapped)
}

impl PostgresServer {
    /// Runs `initdb` in a temp dir, starts the server and waits until it
    /// accepts connections.
    pub async fn start() -> PostgresServer {
        PostgresServer::start_with(None).await
    }

    /// The same, also speaking TLS with the test PKI's server certificate
    /// (`127.0.0.1`, `localhost`).
    pub async fn start_tls(pki: &TestPki) -> PostgresServer {
        PostgresServer::start_with(Some(pki)).await
    }

    async fn start_with(tls: Option<&TestPki>) -> PostgresServer {
        let dir = tempfile::Builder::new()
            .prefix("hobotnica-postgres-")
            .tempdir()
            .expect("temp dir");
        // The server's certificate and key, in its own dir: the key must
        // be the server user's, mode 0600.
        let tls_files = tls.map(|pki| {
            let cert = dir.path().join("server.crt");
            let key = dir.path().join("server.key");
            std::fs::copy(&pki.server_cert, &cert).expect("copy the certificate");
            std::fs::copy(&pki.server_key, &key).expect("copy the key");
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod the key");
            (cert, key)
        });
        if running_as_root() {
            let user = nix::unistd::User::from_name(SERVER_USER)
                .ok()
                .flatten()
                .expect("a postgres user (scripts/setup --tests installs PostgreSQL)");
            let mut owned = vec![dir.path().to_path_buf()];
            if let Some((cert, key)) = &tls_files {
                owned.extend([cert.clone(), key.clone()]);
            }
            for path in owned {
                std::os::unix::fs::chown(&path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                    .expect("chown the server's files");
            }
        }
        let data = dir.path().join("data");
        let (initdb, args) = as_server_user(
            &program("initdb"),
            vec![
                "-D".into(),
                data.clone().into(),
                "-A".into(),
                "trust".into(),
                "-U".into(),
                "postgres".into(),
                "-E".into(),
                "UTF8".into(),
                "--no-sync".into(),
            ],
        );
        let output = Command::new(&initdb)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("initdb runs (scripts/setup --tests installs PostgreSQL)");
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let addr = free_addr();
        let mut server_args: Vec<OsString> = Vec::new();
        if let Some((cert, key)) = &tls_files {
            server_args.extend([
                "-c".into(),
                "ssl=on".into(),
                "-c".into(),
                format!("ssl_cert_file={}", cert.display()).into(),
                "-c".into(),
                format!("ssl_key_file={}", key.display()).into(),
            ]);
        }
        let (postgres, args) = as_server_user(
            &program("postgres"),
            vec![
                "-D".into(),
                data.clone().into(),
                "-p".into(),
                addr.port().to_string().into(),
                "-k".into(),
                dir.path().as_os_str().to_owned(),
                "-c".into(),
                "listen_addresses=127.0.0.1".into(),
                "-c".into(),
                "fsync=off".into(),
                "-c".into(),
                "shared_buffers=16MB".into(),
                "-c".into(),
                "max_connections=200".into(),
            ]
            .into_iter()
            .chain(server_args)
            .collect(),
        );
        let daemon = Daemon::spawn(Spec {
            name: format!("postgres-{}", addr.port()),
            program: postgres,
            args,
            env: Vec::new(),
            cwd: Some(dir.path().to_path_buf()),
            log_dir: dir.path().to_path_buf(),
        });
        let server = PostgresServer {
            addr,
            tls: tls.is_some(),
            daemon,
            data,
            _dir: dir,
        };
        server.wait_ready().await;
        server
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres?sslmode=disable`, or
    /// with TLS `sslmode=verify-full` (the test CA must be trusted).
    pub fn url(&self) -> String {
        let mode = if self.tls { "verify-full" } else { "disable" };
        format!("postgres://postgres@{}/postgres?sslmode={mode}", self.addr)
    }

    /// Waits until the server says it is ready (the status line of
    /// `postmaster.pid`) and accepts connections.
    async fn wait_ready(&self) {
        let pid_file = self.data.join("postmaster.pid");
        let addr = self.addr;
        wait_until(START_TIMEOUT, "postgres to accept connections", || {
            let ready = std::fs::read_to_string(&pid_file)
                .is_ok_and(|text| text.lines().any(|line| line.trim() == "ready"));
            async move { ready && tokio::net::TcpStream::connect(addr).await.is_ok() }
        })
        .await;
    }

    /// Whether it still runs.
    /// The server's (postmaster's) process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }

    /// SIGKILL of the whole server, the postmaster and every backend: it is
    /// gone at once, as with a host that died (what was committed stays).
    /// Killing the postmaster alone leaves its backends answering queries
    /// on their open connections until they notice.
    pub fn kill9(&mut self) {
        crate::procs::signal_all(
            &crate::procs::processes_in_dir(&self.data),
            nix::sys::signal::Signal::SIGKILL,
        );
        self.daemon.kill9();
    }

    /// SIGINT (fast shutdown) and wait.
    pub async fn stop(&mut self) {
        self.daemon.signal(nix::sys::signal::Signal::SIGINT);
        self.daemon.wait(START_TIMEOUT).await;
    }

    /// Starts it again on the same port and data, and waits until it is
    /// ready.
    pub async fn restart(&mut self) {
        // A killed postmaster leaves its backends for a moment, holding
        // the shared memory the new one needs: wait until the pid file's
        // owner is gone (the new postmaster then starts cleanly).
        let pid_file = self.data.join("postmaster.pid");
        wait_until(START_TIMEOUT, "the old postgres to be gone", || {
            let gone = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|text| text.lines().next().map(str::to_owned))
                .and_then(|pid| pid.trim().parse::<i32>().ok())
                .is_none_or(|pid| !Path::new(&format!("/proc/{pid}")).exists());
            async move { gone }
        })
        .await;
        self.daemon.start();
        self.wait_ready().await;
    }

    /// Runs `sql` with `psql` (what an operator, or another program, does
    /// behind the controllers' backs) and returns what it printed, unaligned
    /// and without headers.
    pub fn psql(&self, sql: &str) -> String {
        let output = Command::new(program("psql"))
            .arg(self.url().replace("verify-full", "require"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("psql runs (scripts/setup --tests installs PostgreSQL)");
        assert!(
            output.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// The server's output so far, for failure messages.
    pub fn output(&self) -> String {
        self.daemon.output()
    }
}
