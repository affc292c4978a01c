//! Liveness of the controller's long waits: each test puts the controller
//! in a state where only one event can end a wait, fires that event, and
//! waits for the outcome with a deadline (never a bare sleep).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use clap::{Args as _, FromArgMatches as _};
use hobotnica_common::job::{JobKind, JobState, Trigger};
use hobotnica_common::proto::TailRequest;
use hobotnica_common::proto::log_service_client::LogServiceClient;
use hobotnica_controller::store::embedded::EmbeddedStore;
use hobotnica_controller::store::{NewJob, Store as _};
use hobotnica_controller::{Controller, ControllerConfig, Listeners, STOP_GRACE};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Longer than any graceful stop takes here; a stop that needs more hangs.
const DEADLINE: Duration = Duration::from_secs(10);
/// Scheduling slack on a busy machine, on top of a bound under test.
const SLACK: Duration = Duration::from_secs(5);

fn config(data_dir: &std::path::Path) -> ControllerConfig {
    let command = ControllerConfig::augment_args(clap::Command::new("t").no_binary_name(true));
    let data_dir = data_dir.to_str().unwrap();
    let matches = command
        .try_get_matches_from([
            "--data-dir",
            data_dir,
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ])
        .unwrap();
    ControllerConfig::from_arg_matches(&matches).unwrap()
}

/// A queued job in the embedded store under `data_dir` (no repository, no
/// agent: it stays queued, so its log can only be followed).
async fn queued_job(data_dir: &std::path::Path) -> u64 {
    hobotnica_controller::prepare_data_dir(data_dir).unwrap();
    let store = EmbeddedStore::open(data_dir).unwrap();
    let job = store
        .create_job(
            NewJob {
                repo: hobotnica_common::job::RepoRef::new("local", "demo"),
                git_url: "/nonexistent/demo.git".to_owned(),
                kind: JobKind::Test,
                target: "test".to_owned(),
                commit: "0123456789abcdef0123456789abcdef01234567".parse().unwrap(),
                branch: Some("main".to_owned()),
                env: BTreeMap::new(),
                trusted_labels: BTreeMap::new(),
                trigger: Trigger::Api,
                timeout_secs: 0,
                from_fork: false,
                requested_by: None,
            },
            Utc::now(),
        )
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Queued);
    job.id.0
}

/// `hobot logs -f` follows a job that has not ended; the controller is
/// asked to stop. Before the fix the tail's stream waited for log events
/// only, so its HTTP/2 connection never closed and the graceful stop waited
/// for it forever (SIGTERM did nothing while anyone followed a log). Now the
/// stream ends with UNAVAILABLE (the CLI resumes elsewhere) and the
/// controller stops.
#[tokio::test]
async fn a_followed_log_does_not_keep_a_stopping_controller_alive() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let job_id = queued_job(&data_dir).await;

    let config = config(&data_dir);
    let controller = Controller::open(config.clone()).await.unwrap();
    let admin_token = controller.admin_token().to_owned();
    let listeners = Listeners::bind(&config).await.unwrap();
    let grpc_addr = listeners.grpc.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(controller.serve(listeners, shutdown.clone()));

    let mut client = LogServiceClient::connect(format!("http://{grpc_addr}"))
        .await
        .unwrap();
    let mut request = tonic::Request::new(TailRequest {
        job_id,
        from_offset: 0,
        follow: true,
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {admin_token}").parse().unwrap(),
    );
    // The call returns once the controller answered with headers: the tail
    // is now waiting for the log to grow.
    let mut stream = client.tail(request).await.unwrap().into_inner();

    shutdown.cancel();
    let stopped = tokio::time::timeout(DEADLINE, serving).await;
    assert!(
        stopped.is_ok(),
        "the controller did not stop within {DEADLINE:?} while a log was followed"
    );
    stopped.unwrap().unwrap().unwrap();
    let end = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("the followed stream ends");
    let status = end.expect_err("the follower is told the controller went away");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An HPACK string literal (no Huffman; short strings only).
fn hpack_string(block: &mut Vec<u8>, value: &str) {
    block.push(u8::try_from(value.len()).unwrap());
    block.extend_from_slice(value.as_bytes());
}

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

/// The client preface, then the headers of a `LogService.Tail` call whose
/// body (the request message) never follows, then a PING.
fn unfinished_request() -> Vec<u8> {
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    block.push(0x04); // :path, literal value
    hpack_string(&mut block, "/hobotnica.v1.LogService/Tail");
    block.push(0x01); // :authority, literal value
    hpack_string(&mut block, "localhost");
    block.extend([0x0f, 0x10]); // content-type (static index 31), literal value
    hpack_string(&mut block, "application/grpc");
    block.push(0x00); // a new name
    hpack_string(&mut block, "te");
    hpack_string(&mut block, "trailers");
    // HEADERS with END_HEADERS and without END_STREAM: the body is due.
    bytes.extend(frame(0x1, 0x4, 1, &block));
    bytes.extend(frame(PING, 0, 0, b"hobotnic"));
    bytes
}

/// Reads frames (acknowledging the server's settings) until the PING is
/// acknowledged: the server handles frames in order, so by then it has
/// opened the stream.
async fn until_ping_acked(socket: &mut TcpStream) {
    loop {
        let mut header = [0_u8; 9];
        socket.read_exact(&mut header).await.unwrap();
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0; len];
        socket.read_exact(&mut payload).await.unwrap();
        match (header[3], header[4] & ACK) {
            (SETTINGS, 0) => socket
                .write_all(&frame(SETTINGS, ACK, 0, &[]))
                .await
                .unwrap(),
            (PING, ACK) => return,
            (GOAWAY, _) => panic!("the server refused the connection: {payload:?}"),
            _ => {}
        }
    }
}

/// A peer keeps a request open and stops reading: here a `Tail` call whose
/// request message never comes (an agent whose HTTP/2 window is full, or a
/// response stuck in a full socket, hold a stream open the same way). The
/// controller is asked to stop. Before the fix the graceful stop waited for
/// that connection with no limit (until HTTP/2 keepalive gave up on it, or
/// for good with a peer that answers pings); now in-flight work gets
/// `STOP_GRACE`, then the connection is cut and `serve` returns.
#[tokio::test]
async fn a_connection_that_never_finishes_does_not_hold_up_the_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let config = config(&data_dir);
    let controller = Controller::open(config.clone()).await.unwrap();
    let listeners = Listeners::bind(&config).await.unwrap();
    let grpc_addr = listeners.grpc.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(controller.serve(listeners, shutdown.clone()));

    let mut socket = TcpStream::connect(grpc_addr).await.unwrap();
    socket.write_all(&unfinished_request()).await.unwrap();
    tokio::time::timeout(DEADLINE, until_ping_acked(&mut socket))
        .await
        .expect("the server answers the PING");
    // From here on the socket is neither written nor read.

    shutdown.cancel();
    let stopped = tokio::time::timeout(STOP_GRACE + SLACK, serving).await;
    assert!(
        stopped.is_ok(),
        "the controller did not stop within {:?} while a request stayed open",
        STOP_GRACE + SLACK
    );
    stopped.unwrap().unwrap().unwrap();
    // The connection was closed, not left behind in a detached task.
    let closed = async {
        let mut buf = [0_u8; 4096];
        while let Ok(1..) = socket.read(&mut buf).await {}
    };
    tokio::time::timeout(DEADLINE, closed)
        .await
        .expect("the connection was cut");
}
