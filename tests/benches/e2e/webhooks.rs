//! Webhook intake: signed `push` deliveries to one controller (embedded
//! store), each checked (HMAC-SHA256) and queuing a job, sent by
//! [`SENDERS`] concurrent clients. No agent runs: the figure is the intake
//! path (signature, parse, redelivery check, job creation), not make.

use std::time::{Duration, Instant};

use hobotnica_tests::github::{FakeGitHub, GitHubUser, Permission, new_delivery_id, send_webhook};
use hobotnica_tests::{Controller, ControllerOpts};
use serde_json::json;
use tokio::task::JoinSet;

/// Deliveries in one run.
const DELIVERIES: usize = 1000;
/// Clients sending at once.
const SENDERS: usize = 4;

pub async fn webhook_intake() {
    let github = FakeGitHub::start().await;
    let token = format!("ghp_{}", hobotnica_common::token::random_hex(18));
    github.add_user("bench-user", &token);
    let repo = github.add_repo("bench-org", "widget", "main");
    github.grant(&token, "bench-org/widget", Permission::Admin);
    let controller = Controller::start(ControllerOpts {
        extra_args: github.controller_args(),
        ..ControllerOpts::default()
    })
    .await;
    let user = GitHubUser::new(controller.url(), "bench-user", &token);
    let registered = user.register("bench-org/widget", json!({})).await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let body = registered.json();
    let url = body["webhook_url"].as_str().unwrap().to_owned();
    let secret = body["webhook_secret"].as_str().unwrap().to_owned();
    let head = repo.head();
    let payload = github.push_payload(
        "bench-org/widget",
        "refs/heads/main",
        &head,
        &head,
        false,
        false,
    );

    let started = Instant::now();
    let mut senders = JoinSet::new();
    for _ in 0..SENDERS {
        let (url, secret, payload) = (url.clone(), secret.clone(), payload.clone());
        senders.spawn(async move {
            let mut latencies = Vec::with_capacity(DELIVERIES / SENDERS);
            for _ in 0..DELIVERIES / SENDERS {
                let sent = Instant::now();
                let answer =
                    send_webhook(&url, "push", &new_delivery_id(), &payload, Some(&secret)).await;
                assert_eq!(answer.status, 202, "{}", answer.text());
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
            latencies
        });
    }
    let mut latencies = Vec::with_capacity(DELIVERIES);
    while let Some(done) = senders.join_next().await {
        latencies.extend(done.unwrap());
    }
    let elapsed = started.elapsed();
    let queued = controller
        .api()
        .jobs("repo=bench-org/widget&state=queued&limit=200")
        .await
        .len();
    assert!(queued > 0, "the deliveries queued jobs");
    latencies.sort_by(f64::total_cmp);
    let rate = latencies.len() as f64 / elapsed.max(Duration::from_millis(1)).as_secs_f64();
    println!(
        "webhook intake (embedded): {} signed push deliveries from {SENDERS} clients in {:.2}s: {rate:.0} requests/s (each queues a job), latency p50={:.2}ms p99={:.2}ms",
        latencies.len(),
        elapsed.as_secs_f64(),
        super::percentile(&latencies, 50.0),
        super::percentile(&latencies, 99.0),
    );
}
