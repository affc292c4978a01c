//! What a service manager and a container engine see: `READY=1` and
//! `STOPPING=1` on systemd's notification socket (`Type=notify` units), the
//! agent's status line, and both binaries' `--health-check`, healthy and
//! not.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Output;

use hobotnica_tests::bins::{AGENT, CONTROLLER, bin};

use super::*;

/// How long a notification may take to arrive.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// A socket standing in for systemd's `NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket {
            socket,
            _dir: dir,
            path,
        }
    }

    fn path(&self) -> String {
        self.path.to_str().unwrap().to_owned()
    }

    /// Reads notifications until one has a line starting with `prefix`, and
    /// returns that line; the ones before it are returned too, for context.
    async fn wait_for(&self, prefix: &str) -> (String, Vec<String>) {
        let deadline = Instant::now() + NOTIFY_TIMEOUT;
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let socket = self.socket.try_clone().unwrap();
            let mut received = std::mem::take(&mut buf);
            let (result, returned) = tokio::task::spawn_blocking(move || {
                let result = socket.recv(&mut received);
                (result, received)
            })
            .await
            .unwrap();
            buf = returned;
            if let Ok(n) = result {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                if let Some(line) = message.lines().find(|line| line.starts_with(prefix)) {
                    return (line.to_owned(), seen);
                }
                seen.push(message);
            }
            assert!(
                Instant::now() < deadline,
                "no {prefix:?} within {NOTIFY_TIMEOUT:?}; received {seen:?}"
            );
        }
    }
}

fn run(binary: &Path, args: &[&str]) -> Output {
    std::process::Command::new(binary)
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap()
}

fn controller_health_check(controller: &Controller) -> Output {
    let listen = controller.http_addr.to_string();
    let mut args = vec!["--health-check", "--listen", &listen];
    let cert;
    if let Some(pki) = &controller.pki {
        cert = pki.server_cert.to_str().unwrap().to_owned();
        args.extend(["--tls-cert", &cert]);
    }
    run(&bin(CONTROLLER), &args)
}

#[tokio::test]
async fn the_controller_tells_systemd_it_is_ready_and_stopping_and_checks_its_own_health() {
    for tls in [false, true] {
        let notify = NotifySocket::new();
        let mut controller = Controller::start(ControllerOpts {
            tls,
            extra_args: vec!["--notify-socket".into(), notify.path()],
            ..ControllerOpts::default()
        })
        .await;
        let (ready, _) = notify.wait_for("READY=").await;
        assert_eq!(ready, "READY=1");

        let healthy = controller_health_check(&controller);
        let stdout = text(&healthy.stdout);
        assert!(
            healthy.status.success(),
            "tls {tls}: {healthy:?} {}",
            text(&healthy.stderr)
        );
        assert!(stdout.starts_with("ready: "), "{stdout:?}");
        assert!(stdout.contains("200"), "{stdout:?}");

        controller.stop().await;
        let (stopping, _) = notify.wait_for("STOPPING=").await;
        assert_eq!(stopping, "STOPPING=1");

        let unhealthy = controller_health_check(&controller);
        let stderr = text(&unhealthy.stderr);
        assert_eq!(unhealthy.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.starts_with("not ready: cannot connect to"),
            "{stderr:?}"
        );
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    }
}

#[tokio::test]
async fn the_agent_tells_systemd_where_it_stands_and_checks_its_own_health() {
    let controller = Controller::start_default().await;
    let notify = NotifySocket::new();
    let mut agent = Agent::start(
        &controller,
        AgentOpts {
            env: vec![("NOTIFY_SOCKET".into(), notify.path())],
            ..AgentOpts::default()
        },
    )
    .await;
    notify.wait_for("READY=1").await;
    let (status, _) = notify.wait_for("STATUS=connected").await;
    assert!(status.contains(&controller.grpc_url()), "{status}");

    let work_dir = agent.work_dir();
    let health_check = || {
        run(
            &bin(AGENT),
            &[
                "--health-check",
                "--controller",
                &controller.grpc_url(),
                "--token-file",
                "/nonexistent",
                "--work-dir",
                work_dir.to_str().unwrap(),
            ],
        )
    };
    let healthy = health_check();
    let stdout = text(&healthy.stdout);
    assert!(healthy.status.success(), "{healthy:?}");
    assert_eq!(
        stdout.trim_end(),
        format!(
            "healthy: connected to {}, 0 job(s) running",
            controller.grpc_url()
        )
    );

    // Stopped, it is unhealthy at once: the status file goes with it.
    agent.sigterm();
    notify.wait_for("STOPPING=1").await;
    assert!(agent.wait(Duration::from_secs(30)).await.success());
    let unhealthy = health_check();
    let stderr = text(&unhealthy.stderr);
    assert_eq!(unhealthy.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("unhealthy: no status in"), "{stderr:?}");
}
