//! Webhook intake: signed `push` deliveries to one controller (embedded
//! store), each checked (HMAC-SHA256) and queuing a job, sent by
//! [`SENDERS`] concurrent clients, each with one delivery at a time or
//! several in flight (GitHub sends deliveries concurrently). No agent runs:
//! the figure is the intake path (signature, parse, redelivery check, job
//! creation and its durable commit), not make. Beside each figure, the same
//! deliveries to a tag (ignored: no write) give the path's ceiling on this
//! machine, and a client that opens a connection per delivery (as the test
//! harness's `send_webhook` does) is compared with one keeping its
//! connections: on a small machine the client's own cost is part of what
//! is measured.

use std::time::{Duration, Instant};

use hobotnica_tests::github::{
    FakeGitHub, GitHubUser, Permission, new_delivery_id, send_webhook, signature,
};
use hobotnica_tests::{Controller, ControllerOpts};
use serde_json::json;
use tokio::task::JoinSet;

/// Deliveries in one run with one delivery in flight per client.
const DELIVERIES: usize = 1000;
/// Deliveries in one run with several in flight per client (more: it
/// takes less time, and its p99 needs the samples).
const DELIVERIES_IN_FLIGHT: usize = 6400;
/// Clients sending at once.
const SENDERS: usize = 4;

/// How a client sends its deliveries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Connections {
    /// A new client and connection per delivery (`send_webhook`).
    PerDelivery,
    /// One client per sender lane, its connection kept alive.
    KeptAlive,
}

/// The runs: (connections, deliveries in flight per client). One at a time
/// is a client waiting for each answer; 16 is GitHub sending deliveries
/// concurrently.
pub const RUNS: [(Connections, usize); 3] = [
    (Connections::PerDelivery, 1),
    (Connections::KeptAlive, 1),
    (Connections::KeptAlive, 16),
];

/// What the deliveries ask.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Deliveries {
    /// Pushes to a branch: each queues a job (a durable write).
    Queuing,
    /// Pushes to a tag: the same request, signature and parse, ignored
    /// without a write (the intake path's ceiling, for comparison).
    Ignored,
}

/// `in_flight` deliveries at a time from each of [`SENDERS`] clients.
pub async fn webhook_intake(
    connections: Connections,
    in_flight: usize,
    deliveries_are: Deliveries,
) {
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
        match deliveries_are {
            Deliveries::Queuing => "refs/heads/main",
            Deliveries::Ignored => "refs/tags/bench",
        },
        &head,
        &head,
        false,
        false,
    );
    let body = serde_json::to_vec_pretty(&payload).unwrap();
    let signed = signature(&secret, &body);

    let lanes = SENDERS * in_flight;
    let deliveries = if in_flight == 1 {
        DELIVERIES
    } else {
        DELIVERIES_IN_FLIGHT
    };
    let started = Instant::now();
    let mut senders = JoinSet::new();
    for _ in 0..lanes {
        let (url, secret, payload) = (url.clone(), secret.clone(), payload.clone());
        let (body, signed) = (body.clone(), signed.clone());
        senders.spawn(async move {
            let client = reqwest::Client::new();
            let mut latencies = Vec::with_capacity(deliveries / lanes);
            for _ in 0..deliveries / lanes {
                let sent = Instant::now();
                let status = match connections {
                    Connections::PerDelivery => {
                        let answer =
                            send_webhook(&url, "push", &new_delivery_id(), &payload, Some(&secret))
                                .await;
                        assert_eq!(answer.status, 202, "{}", answer.text());
                        answer.status
                    }
                    Connections::KeptAlive => client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("x-github-event", "push")
                        .header("x-github-delivery", new_delivery_id())
                        .header("x-hub-signature-256", &signed)
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16(),
                };
                assert_eq!(status, 202);
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
            latencies
        });
    }
    let mut latencies = Vec::with_capacity(deliveries);
    while let Some(done) = senders.join_next().await {
        latencies.extend(done.unwrap());
    }
    let elapsed = started.elapsed();
    let queued = controller
        .api()
        .jobs("repo=bench-org/widget&state=queued&limit=200")
        .await
        .len();
    match deliveries_are {
        Deliveries::Queuing => assert!(queued > 0, "the deliveries queued jobs"),
        Deliveries::Ignored => assert_eq!(queued, 0, "ignored deliveries queue nothing"),
    }
    latencies.sort_by(f64::total_cmp);
    let rate = latencies.len() as f64 / elapsed.max(Duration::from_millis(1)).as_secs_f64();
    println!(
        "webhook intake (embedded, {}): {} signed push deliveries from {SENDERS} clients x {in_flight} in flight in {:.2}s: {rate:.0} requests/s ({}), latency p50={:.2}ms p99={:.2}ms",
        match connections {
            Connections::PerDelivery => "a connection per delivery",
            Connections::KeptAlive => "connections kept alive",
        },
        latencies.len(),
        elapsed.as_secs_f64(),
        match deliveries_are {
            Deliveries::Queuing => "each queues a job",
            Deliveries::Ignored => "pushes to a tag: ignored, nothing written",
        },
        super::percentile(&latencies, 50.0),
        super::percentile(&latencies, 99.0),
    );
}
