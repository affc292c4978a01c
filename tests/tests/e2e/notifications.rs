//! Notifications when jobs finish, as their receivers see them: small HTTP
//! servers on 127.0.0.1 in the test stand for Slack and for a service that
//! takes signed webhooks. The Slack message names what a reader needs; the
//! signature verifies with the secret; a failing receiver is retried and a
//! hanging one delays no job; `failures` hears nothing of a success; the
//! URL and secret never come back through the API or the controller's log.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, KeyInit, Mac};
use hobotnica_tests::{Api, JobState, cli, wait_for};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Sha256;

use super::{JOB_TIMEOUT, REPO, setup};

/// How long a delivery may take to arrive (first attempt, or a retry 1 s
/// later).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

/// One request a receiver got.
#[derive(Clone, Debug)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
    /// When the receiver let go of it (answered, or the sender hung up).
    ended: Option<Instant>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// What a receiver answers.
#[derive(Clone, Copy)]
enum Behaviour {
    /// These statuses in turn; the last one from then on.
    Answer(&'static [u16]),
    /// Never: it holds every request until the sender gives up.
    Hang,
}

#[derive(Clone)]
struct ReceiverState {
    behaviour: Behaviour,
    seen: Arc<Mutex<Vec<Received>>>,
}

/// A receiver on 127.0.0.1; its URL has a path no one could guess, so
/// finding it in an answer or a log means the URL leaked.
struct Receiver {
    url: String,
    /// The part of the URL that is secret.
    path: String,
    seen: Arc<Mutex<Vec<Received>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Records when the receiver let go of a request, however it ended.
struct EndGuard {
    seen: Arc<Mutex<Vec<Received>>>,
    index: usize,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        if let Some(received) = self.seen.lock().unwrap().get_mut(self.index) {
            received.ended = Some(Instant::now());
        }
    }
}

async fn receive(
    State(state): State<ReceiverState>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let index = {
        let mut seen = state.seen.lock().unwrap();
        seen.push(Received {
            headers,
            body,
            ended: None,
        });
        seen.len() - 1
    };
    let _guard = EndGuard {
        seen: Arc::clone(&state.seen),
        index,
    };
    match state.behaviour {
        Behaviour::Answer(statuses) => {
            let status = statuses[index.min(statuses.len() - 1)];
            StatusCode::from_u16(status).unwrap()
        }
        Behaviour::Hang => std::future::pending().await,
    }
}

impl Receiver {
    async fn start(behaviour: Behaviour) -> Receiver {
        Receiver::start_at(behaviour, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_at(behaviour: Behaviour, addr: std::net::SocketAddr) -> Receiver {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = ReceiverState {
            behaviour,
            seen: Arc::clone(&seen),
        };
        let app = axum::Router::new()
            .fallback(axum::routing::post(receive))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let path = hobotnica_tests::unique("hook-path-secret");
        Receiver {
            url: format!("http://{addr}/services/{path}"),
            path,
            seen,
            server,
        }
    }

    fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until it has had `count` requests; returns them.
    async fn wait_for(&self, count: usize, what: &str) -> Vec<Received> {
        wait_for(DELIVERY_TIMEOUT, what, || {
            let seen = self.seen();
            async move { (seen.len() >= count).then_some(seen) }
        })
        .await
    }
}

async fn put_target(api: &Api, id: &str, body: &Value) -> Value {
    let answer = api
        .send_json(
            Method::PUT,
            &format!("/api/v1/repos/{REPO}/notifications/{id}"),
            body,
        )
        .await;
    assert_eq!(answer.status, 200, "PUT {id}: {}", answer.text());
    answer.json()
}

async fn target(api: &Api, id: &str) -> Value {
    api.get_json(&format!("/api/v1/repos/{REPO}/notifications/{id}"))
        .await
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_reach_slack_and_signed_webhooks_and_nothing_leaks() {
    let setup = setup().await;
    let api = &setup.api;
    let slack = Receiver::start(Behaviour::Answer(&[200])).await;
    let webhook = Receiver::start(Behaviour::Answer(&[204])).await;
    let failures = Receiver::start(Behaviour::Answer(&[200])).await;
    let secret = hobotnica_tests::unique("signing-secret-value");

    let shown = put_target(
        api,
        "team-chat",
        &json!({"kind": "slack", "url": slack.url, "events": "all"}),
    )
    .await;
    assert_eq!(shown["host"], "127.0.0.1");
    assert_eq!(shown["last_delivery"], Value::Null);
    put_target(
        api,
        "events",
        &json!({"kind": "webhook", "url": webhook.url, "events": "all", "secret": secret}),
    )
    .await;
    put_target(
        api,
        "on-call",
        &json!({"kind": "webhook", "url": failures.url, "events": "failures", "secret": secret}),
    )
    .await;
    // Plain http:// elsewhere than loopback is refused.
    api.send_json(
        Method::PUT,
        &format!("/api/v1/repos/{REPO}/notifications/outside"),
        &json!({"kind": "slack", "url": "http://hooks.example.com/x"}),
    )
    .await
    .assert_problem(422);

    let job = api.run_target(REPO, "test").await;
    let job = api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let short = &job.commit[..7];
    let link = format!("{}/jobs/{}", setup.controller.url(), job.id);

    // Slack: one message naming repository, target, commit, who asked,
    // outcome, duration, and linking to the job's page.
    let message = slack.wait_for(1, "the Slack message").await[0].json();
    let text = message["text"].as_str().expect("a text");
    for part in [
        REPO,
        "make test",
        "succeeded",
        short,
        "asked by admin",
        " in ",
        &format!("<{link}|Job {}>", job.id),
    ] {
        assert!(text.contains(part), "{part:?} in the Slack text {text:?}");
    }
    assert_eq!(message["blocks"][0]["text"]["text"], text);

    // The webhook: signed like GitHub signs, with the job's facts.
    let delivery = &webhook.wait_for(1, "the webhook").await[0];
    let signature = delivery
        .header("x-hobotnica-signature-256")
        .expect("a signature");
    assert_eq!(
        signature,
        format!("sha256={}", hmac_hex(&secret, &delivery.body))
    );
    assert_ne!(
        signature,
        format!("sha256={}", hmac_hex("another secret", &delivery.body))
    );
    assert_eq!(delivery.header("x-hobotnica-event"), Some("job.finished"));
    let delivery_id = delivery.header("x-hobotnica-delivery").expect("an id");
    let body = delivery.json();
    assert_eq!(body["delivery"], delivery_id);
    assert_eq!(body["job"]["id"], job.id);
    assert_eq!(body["job"]["repository"], REPO);
    assert_eq!(body["job"]["state"], "succeeded");
    assert_eq!(body["job"]["commit"], job.commit);
    assert_eq!(body["job"]["requested_by"], "admin");
    assert_eq!(body["job"]["url"], link);
    assert!(body["job"]["duration_ms"].is_u64(), "{body}");

    // `failures` heard nothing of the success: its first message is the
    // failure that follows.
    let failed = api.run_target(REPO, "fail").await;
    api.wait_for_state(failed.id, &[JobState::Failed], JOB_TIMEOUT)
        .await;
    let told = failures.wait_for(1, "the failure's webhook").await;
    assert_eq!(told[0].json()["job"]["id"], failed.id);
    assert_eq!(told[0].json()["job"]["state"], "failed");
    slack.wait_for(2, "the failure's Slack message").await;
    webhook.wait_for(2, "the failure's webhook").await;
    assert_eq!(failures.seen().len(), 1, "one message: the failure");

    // The API shows each target's last delivery, never its URL or secret.
    let on_call = wait_for(DELIVERY_TIMEOUT, "the delivery recorded", || async {
        let shown = target(api, "on-call").await;
        (shown["last_delivery"]["state"] == "delivered").then_some(shown)
    })
    .await;
    assert_eq!(on_call["last_delivery"]["attempts"], 1);
    assert_eq!(on_call["last_delivery"]["job"], failed.id);
    assert_eq!(on_call["last_delivery"]["response_status"], 200);
    assert_eq!(on_call["signed"], true);
    let list = api
        .raw(
            Method::GET,
            &format!("/api/v1/repos/{REPO}/notifications"),
            None,
        )
        .await;
    assert_eq!(list.status, 200);
    let listed = list.text();
    assert_eq!(list.json()["items"].as_array().unwrap().len(), 3);
    let log = setup.controller.whole_log();
    assert!(log.contains("notification delivered"), "{log}");
    for (what, text) in [
        ("the list", listed.as_str()),
        ("the controller's log", &log),
    ] {
        for receiver in [&slack, &webhook, &failures] {
            assert!(!text.contains(&receiver.path), "a URL is in {what}");
        }
        assert!(!text.contains(&secret), "the secret is in {what}");
    }

    // A removed target hears no more.
    let removed = api
        .raw(
            Method::DELETE,
            &format!("/api/v1/repos/{REPO}/notifications/team-chat"),
            None,
        )
        .await;
    assert_eq!(removed.status, 204);
    api.raw(
        Method::GET,
        &format!("/api/v1/repos/{REPO}/notifications/team-chat"),
        None,
    )
    .await
    .assert_problem(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_retried_and_a_hanging_one_delays_no_job() {
    let setup = setup().await;
    let api = &setup.api;
    let flaky = Receiver::start(Behaviour::Answer(&[500, 200])).await;
    let hanging = Receiver::start(Behaviour::Hang).await;
    put_target(
        api,
        "flaky",
        &json!({"kind": "slack", "url": flaky.url, "events": "failures"}),
    )
    .await;
    put_target(
        api,
        "hanging",
        &json!({"kind": "webhook", "url": hanging.url, "secret": "0123456789abcdef"}),
    )
    .await;

    let failed = api.run_target(REPO, "fail").await;
    api.wait_for_state(failed.id, &[JobState::Failed], JOB_TIMEOUT)
        .await;
    hanging.wait_for(1, "the hanging receiver's request").await;

    // While the receiver holds that request, the next job runs and
    // finishes as fast as ever.
    let queued_at = Instant::now();
    let next = api.run_target(REPO, "test").await;
    api.wait_for_success(next.id, JOB_TIMEOUT).await;
    let finished_at = Instant::now();
    let held = &hanging.seen()[0];
    assert!(
        held.ended.is_none_or(|ended| ended > finished_at),
        "the receiver still held the first job's request when the next one finished"
    );
    assert!(
        finished_at - queued_at < Duration::from_secs(8),
        "a job took {:?} while a receiver hung",
        finished_at - queued_at
    );

    // 500, then 200: delivered once, on the second attempt, and the API
    // says so.
    let shown = wait_for(DELIVERY_TIMEOUT, "the retried delivery", || async {
        let shown = target(api, "flaky").await;
        (shown["last_delivery"]["state"] == "delivered").then_some(shown)
    })
    .await;
    assert_eq!(shown["last_delivery"]["attempts"], 2, "{shown}");
    assert_eq!(shown["last_delivery"]["job"], failed.id, "{shown}");
    assert_eq!(shown["last_delivery"]["response_status"], 200, "{shown}");
    let requests = flaky.seen();
    assert_eq!(requests.len(), 2, "one failed attempt, one delivery");
    assert_eq!(requests[0].body, requests[1].body, "the same message again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_notification_survives_a_controller_restart() {
    let mut setup = setup().await;
    // A receiver that is not there yet: every attempt fails to connect.
    let addr = hobotnica_tests::net::free_addr();
    let url = format!("http://{addr}/services/later");
    put_target(&setup.api, "later", &json!({"kind": "slack", "url": url})).await;
    let job = setup.api.run_target(REPO, "test").await;
    setup.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let shown = wait_for(DELIVERY_TIMEOUT, "a failed attempt recorded", || async {
        let shown = target(&setup.api, "later").await;
        (shown["last_delivery"]["state"] == "pending").then_some(shown)
    })
    .await;
    assert_eq!(
        shown["last_delivery"]["error"], "cannot connect to the receiver",
        "{shown}"
    );

    setup.controller.restart().await;
    let receiver = Receiver::start_at(Behaviour::Answer(&[200]), addr).await;
    let told = receiver.wait_for(1, "the delivery after the restart").await;
    assert!(
        told[0].json()["text"]
            .as_str()
            .is_some_and(|text| text.contains(&format!("|Job {}>", job.id))),
        "{:?}",
        told[0].body
    );
    let shown = wait_for(DELIVERY_TIMEOUT, "the delivery recorded", || async {
        let shown = target(&setup.api, "later").await;
        (shown["last_delivery"]["state"] == "delivered").then_some(shown)
    })
    .await;
    assert!(
        shown["last_delivery"]["attempts"].as_u64() >= Some(2),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_on_one_redis_send_each_notification_once() {
    const JOBS: usize = 6;
    let cluster = super::redis_mode::cluster().await;
    let _agent = hobotnica_tests::Agent::start(&cluster.b, Default::default()).await;
    let receiver = Receiver::start(Behaviour::Answer(&[200])).await;
    let (a, b) = (cluster.a.api(), cluster.b.api());
    put_target(
        &a,
        "events",
        &json!({"kind": "webhook", "url": receiver.url, "secret": "0123456789abcdef"}),
    )
    .await;
    let mut jobs = Vec::new();
    for n in 0..JOBS {
        let api = if n % 2 == 0 { &a } else { &b };
        jobs.push(api.run_target(REPO, "test").await.id);
    }
    for id in &jobs {
        a.wait_for_success(*id, JOB_TIMEOUT).await;
    }
    let told = wait_for(DELIVERY_TIMEOUT, "every job's notification", || {
        let seen = receiver.seen();
        async move {
            let mut told: Vec<u64> = seen
                .iter()
                .map(|received| received.json()["job"]["id"].as_u64().unwrap())
                .collect();
            told.sort_unstable();
            told.dedup();
            (told.len() == JOBS).then_some(told)
        }
    })
    .await;
    jobs.sort_unstable();
    assert_eq!(told, jobs);
    let mut ids: Vec<String> = receiver
        .seen()
        .iter()
        .map(|received| received.header("x-hobotnica-delivery").unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), JOBS, "one request per job");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), JOBS, "one delivery id per job");
}

/// `hobot notifications` as an operator uses it: a URL on the command line
/// is refused (it is a secret), the URL goes in on stdin, a webhook
/// target's signing secret is printed once and signs what arrives, `ls`
/// shows the target's host and last delivery but never its URL, and `rm`
/// removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hobot_sets_lists_and_removes_targets_and_keeps_the_url_off_screen() {
    use tokio::io::AsyncWriteExt as _;

    let setup = setup().await;
    let controller = Some(&setup.controller);
    let receiver = Receiver::start(Behaviour::Answer(&[200])).await;
    let cwd = tempfile::tempdir().unwrap();
    let set = [
        "notifications",
        "set",
        REPO,
        "hooks",
        "--kind",
        "webhook",
        "--events",
        "failures",
    ];

    let mut on_the_line = set.to_vec();
    on_the_line.push(&receiver.url);
    let refused = cli::run(controller, cwd.path(), &on_the_line).await;
    assert_eq!(refused.code(), Some(1), "{refused:?}");
    assert!(refused.stderr.contains("read from stdin"), "{refused:?}");
    assert!(!refused.stderr.contains(&receiver.path), "{refused:?}");
    let listed = cli::run(controller, cwd.path(), &["notifications", "ls", REPO]).await;
    assert!(!listed.success().contains("hooks"), "refused, yet set");

    let mut child = cli::command(controller, cwd.path())
        .args(set)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("start hobot");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{}\n", receiver.url).as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let printed = cli::finish(child, &set).await.success();
    assert!(printed.contains("go to 127.0.0.1"), "{printed}");
    assert!(!printed.contains(&receiver.path), "{printed}");
    let secret = printed
        .lines()
        .find_map(|line| line.rsplit_once("with it): ").map(|(_, secret)| secret))
        .unwrap_or_else(|| panic!("no signing secret printed: {printed}"))
        .trim()
        .to_owned();

    let failed = setup.api.run_target(REPO, "fail").await;
    let told = &receiver.wait_for(1, "the failure's webhook").await[0];
    assert_eq!(told.json()["job"]["id"], failed.id);
    assert_eq!(
        told.header("x-hobotnica-signature-256"),
        Some(format!("sha256={}", hmac_hex(&secret, &told.body)).as_str())
    );

    let table = wait_for(DELIVERY_TIMEOUT, "`ls` to show the delivery", || async {
        let table = cli::run(controller, cwd.path(), &["notifications", "ls", REPO])
            .await
            .success();
        table.contains("delivered (1 attempts)").then_some(table)
    })
    .await;
    let row = table
        .lines()
        .find(|line| line.starts_with("hooks"))
        .unwrap_or_else(|| panic!("no row for the target: {table}"));
    for part in [
        "webhook",
        "failures",
        "127.0.0.1",
        "yes",
        &failed.id.to_string(),
        "HTTP 200",
    ] {
        assert!(row.contains(part), "{part:?} in {row:?}");
    }
    assert!(!table.contains(&receiver.path), "the URL is shown: {table}");
    assert!(!table.contains(&secret), "the secret is shown: {table}");

    let removed = cli::run(
        controller,
        cwd.path(),
        &["notifications", "rm", REPO, "hooks"],
    )
    .await;
    assert!(
        removed
            .success()
            .contains("removed notification target hooks")
    );
    let listed = cli::run(controller, cwd.path(), &["notifications", "ls", REPO]).await;
    assert!(!listed.success().contains("hooks"), "removed, yet listed");
}
