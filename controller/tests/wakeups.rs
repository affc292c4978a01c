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
use hobotnica_controller::{Controller, ControllerConfig, Listeners};
use tokio_util::sync::CancellationToken;

/// Longer than any graceful stop takes here; a stop that needs more hangs.
const DEADLINE: Duration = Duration::from_secs(10);

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
                repo: "local/demo".to_owned(),
                git_url: "/nonexistent/demo.git".to_owned(),
                kind: JobKind::Test,
                target: "test".to_owned(),
                commit: "0123456789abcdef0123456789abcdef01234567".parse().unwrap(),
                branch: Some("main".to_owned()),
                env: BTreeMap::new(),
                labels: BTreeMap::new(),
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
