//! `/metrics` of a real controller and agent after real jobs ran: what
//! `promtool check metrics` says of it, the numbers an operator would look
//! for, OpenMetrics content negotiation, bounded labels, and a real
//! Prometheus server scraping both and answering PromQL; the alerting
//! rules (`promtool check rules`, `promtool test rules`) and the Grafana
//! dashboard (every query names an exported metric).
//!
//! Needs `promtool` and `prometheus` (Debian's `prometheus`, installed by
//! `scripts/setup --tests`); without them each test prints "skipped: why",
//! and fails under `CI`.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::Duration;

use hobotnica_tests::git::makefile_with_test_recipe;
use hobotnica_tests::github::{GitHubUser, new_delivery_id, send_webhook};
use hobotnica_tests::net::free_addr;
use hobotnica_tests::prometheus::{self, PrometheusServer};
use hobotnica_tests::redis::RedisServer;
use hobotnica_tests::{
    Agent, AgentOpts, Api, Controller, ControllerOpts, FakeGitHub, GitRepo, JobState, Permission,
    wait_for,
};
use serde_json::json;

/// Deadline for an ordinary job (clone, make) to finish.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline for Prometheus to have scraped what the test expects.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(60);
const REPO: &str = "local/demo";
/// The branch whose `make test` fails.
const FAILING_BRANCH: &str = "feature-metrics-probe";

/// A controller and an agent, each serving `/metrics`, after three jobs
/// ran: `test` on `main` (succeeded), `test` on [`FAILING_BRANCH`]
/// (failed) and `deploy` on `main` (succeeded).
struct Ran {
    controller: Controller,
    agent: Agent,
    api: Api,
    controller_metrics: SocketAddr,
    agent_metrics: SocketAddr,
    repo: GitRepo,
    job_ids: Vec<u64>,
    /// The three jobs' log sizes, added up.
    log_bytes: u64,
}

async fn run_jobs(controller_opts: ControllerOpts) -> Ran {
    let controller_metrics = free_addr();
    let mut controller_opts = controller_opts;
    controller_opts.extra_args.extend([
        "--metrics-listen".to_owned(),
        controller_metrics.to_string(),
    ]);
    let controller = Controller::start(controller_opts).await;
    let agent_metrics = free_addr();
    let agent = Agent::start(
        &controller,
        AgentOpts {
            args: vec!["--metrics-listen".to_owned(), agent_metrics.to_string()],
            ..AgentOpts::default()
        },
    )
    .await;
    let repo = GitRepo::new();
    repo.create_branch(FAILING_BRANCH);
    repo.switch(FAILING_BRANCH);
    repo.commit(
        &[(
            "Makefile",
            &makefile_with_test_recipe(&["echo \"this branch fails\"", "exit 1"]),
        )],
        "a failing test",
    );
    repo.switch("main");
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;

    let passing = api.run_target(REPO, "test").await;
    let failing = api
        .run_job(REPO, json!({ "target": "test", "branch": FAILING_BRANCH }))
        .await;
    let deploy = api.deploy(REPO, json!({ "branch": "main" })).await;
    let mut job_ids = Vec::new();
    let mut log_bytes = 0;
    for (job, state) in [
        (&passing, JobState::Succeeded),
        (&failing, JobState::Failed),
        (&deploy, JobState::Succeeded),
    ] {
        let done = api.wait_for_end(job.id, JOB_TIMEOUT).await;
        assert_eq!(done.state, state, "job {} ({})", job.id, job.kind);
        job_ids.push(job.id);
        log_bytes += api.log(job.id).await.len() as u64;
    }
    Ran {
        controller,
        agent,
        api,
        controller_metrics,
        agent_metrics,
        repo,
        job_ids,
        log_bytes,
    }
}

/// `GET /metrics` at `addr` with `accept` (none: the default format);
/// the content type and the body.
async fn scrape(addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut request = reqwest::Client::new().get(format!("http://{addr}/metrics"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.expect("/metrics answers");
    assert_eq!(response.status(), 200, "/metrics at {addr}");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (content_type, response.text().await.expect("a body"))
}

/// Scrapes `addr` until `ready` holds for its samples (or the deadline
/// passes); the last scrape.
async fn settled(addr: SocketAddr, ready: impl Fn(&[Sample]) -> bool) -> (String, String) {
    let ready = &ready;
    wait_for(
        JOB_TIMEOUT,
        "the metrics to count every job",
        || async move {
            let (content_type, text) = scrape(addr, None).await;
            ready(&samples(&text)).then_some((content_type, text))
        },
    )
    .await
}

/// One sample of an exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// The samples of a text exposition (comments skipped). Label values are
/// unescaped (`\\`, `\"`, `\n`).
fn samples(exposition: &str) -> Vec<Sample> {
    exposition
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().unwrap_or(f64::NAN),
            }
        })
        .collect()
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                other => value.push(other),
            }
        }
        labels.push((key.trim_start_matches(',').to_owned(), value));
        rest = &after[end..];
    }
    labels
}

/// The value of the sample `name` whose labels include `labels`; 0 when
/// there is none (a counter never incremented).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.iter().any(|(k, v)| k == key && v == value))
        })
        .collect();
    assert!(
        found.len() <= 1,
        "more than one {name}{labels:?}: {found:?}"
    );
    found.first().map_or(0.0, |sample| sample.value)
}

/// The sum of every sample named `name`.
fn total(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|sample| sample.name == name)
        .map(|sample| sample.value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_the_jobs_that_ran() {
    let Some(tools) = prometheus::tools() else {
        return;
    };
    let ran = run_jobs(ControllerOpts::default()).await;

    // A transition is counted just after the store commits it, and an
    // agent counts a job once the controller answered its completion: wait
    // for the last of them.
    let (content_type, text) = settled(ran.controller_metrics, |samples| {
        total(samples, "hobotnica_jobs_finished_total") >= 3.0
    })
    .await;
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    tools.check_metrics(&text).unwrap();
    let controller = samples(&text);
    for (kind, outcome, expected) in [
        ("test", "succeeded", 1.0),
        ("test", "failed", 1.0),
        ("deploy", "succeeded", 1.0),
        ("deploy", "failed", 0.0),
    ] {
        assert_eq!(
            value(
                &controller,
                "hobotnica_jobs_finished_total",
                &[("kind", kind), ("outcome", outcome)]
            ),
            expected,
            "{kind} {outcome}"
        );
    }
    assert_eq!(total(&controller, "hobotnica_jobs_finished_total"), 3.0);
    assert_eq!(
        value(
            &controller,
            "hobotnica_jobs_created_total",
            &[("kind", "test")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &controller,
            "hobotnica_jobs_started_total",
            &[("kind", "deploy")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &controller,
            "hobotnica_job_queue_wait_seconds_count",
            &[("kind", "test")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &controller,
            "hobotnica_job_run_seconds_count",
            &[("kind", "deploy")]
        ),
        1.0
    );
    assert_eq!(
        total(&controller, "hobotnica_job_dispatch_seconds_count"),
        3.0
    );
    let received = total(&controller, "hobotnica_log_bytes_received_total");
    assert!(
        received >= ran.log_bytes as f64,
        "log bytes received {received} < the logs' {} bytes",
        ran.log_bytes
    );
    assert!(
        value(
            &controller,
            "hobotnica_log_chunks_total",
            &[("result", "appended")]
        ) >= 3.0
    );
    // The fleet: nothing waits or runs now, one agent is connected.
    assert_eq!(
        value(&controller, "hobotnica_jobs_queued", &[("scope", "fleet")]),
        0.0
    );
    assert_eq!(
        value(&controller, "hobotnica_jobs_running", &[("scope", "fleet")]),
        0.0
    );
    assert_eq!(
        value(
            &controller,
            "hobotnica_oldest_queued_job_age_seconds",
            &[("scope", "fleet")]
        ),
        0.0
    );
    assert_eq!(
        total(&controller, "hobotnica_agents_connected"),
        1.0,
        "one agent connected"
    );
    assert_eq!(
        total(&controller, "hobotnica_agent_sessions_opened_total"),
        1.0
    );
    // REST requests by route template: the job runs were POSTs to one
    // route, whatever the repository.
    assert!(
        value(
            &controller,
            "hobotnica_http_request_duration_seconds_count",
            &[
                ("route", "/api/v1/repos/{owner}/{name}/jobs"),
                ("method", "POST"),
                ("status", "2xx")
            ]
        ) >= 2.0,
        "{text}"
    );
    assert!(
        value(
            &controller,
            "hobotnica_store_operation_duration_seconds_count",
            &[("operation", "append_log")]
        ) >= 3.0
    );
    assert!(total(&controller, "hobotnica_process_resident_memory_bytes") > 0.0);
    assert!(total(&controller, "hobotnica_process_open_fds") > 0.0);

    let (_, text) = settled(ran.agent_metrics, |samples| {
        total(samples, "hobotnica_agent_jobs_finished_total") >= 3.0
            && value(samples, "hobotnica_agent_running_jobs", &[]) == 0.0
            && value(samples, "hobotnica_agent_spool_bytes", &[]) == 0.0
    })
    .await;
    tools.check_metrics(&text).unwrap();
    let agent = samples(&text);
    assert_eq!(
        value(
            &agent,
            "hobotnica_agent_jobs_finished_total",
            &[("outcome", "succeeded")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &agent,
            "hobotnica_agent_jobs_finished_total",
            &[("outcome", "failed")]
        ),
        1.0
    );
    assert_eq!(value(&agent, "hobotnica_agent_running_jobs", &[]), 0.0);
    let shipped = value(&agent, "hobotnica_agent_log_bytes_shipped_total", &[]);
    assert!(
        shipped >= ran.log_bytes as f64,
        "shipped {shipped} < {}",
        ran.log_bytes
    );
    assert_eq!(
        value(&agent, "hobotnica_agent_sandbox_setup_seconds_count", &[]),
        3.0
    );
    assert_eq!(
        value(&agent, "hobotnica_agent_spool_bytes", &[]),
        0.0,
        "spools are gone"
    );
    assert!(value(&agent, "hobotnica_process_resident_memory_bytes", &[]) > 0.0);
    drop(ran);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openmetrics_is_served_to_a_scraper_that_asks_for_it() {
    let Some(_tools) = prometheus::tools() else {
        return;
    };
    let ran = run_jobs(ControllerOpts::default()).await;
    for addr in [ran.controller_metrics, ran.agent_metrics] {
        let (content_type, text) = scrape(
            addr,
            Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
        )
        .await;
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{addr}: {content_type}"
        );
        assert!(text.ends_with("# EOF\n"), "{addr}: {text}");
        // A counter's family is named without `_total` in OpenMetrics.
        assert!(
            text.contains("# TYPE hobotnica_process_cpu_seconds counter\n"),
            "{text}"
        );
        let (content_type, text) = scrape(addr, Some("text/plain")).await;
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        assert!(!text.contains("# EOF"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_label_names_a_commit_branch_job_repository_or_token() {
    let Some(_tools) = prometheus::tools() else {
        return;
    };
    let ran = run_jobs(ControllerOpts::default()).await;
    let mut forbidden: Vec<String> = vec![
        FAILING_BRANCH.to_owned(),
        "main".to_owned(),
        REPO.to_owned(),
        "demo".to_owned(),
        ran.controller.admin_token.clone(),
        ran.controller.agent_token.clone(),
    ];
    for branch in ["main", FAILING_BRANCH] {
        let sha = ran.repo.rev_parse(branch);
        forbidden.push(sha[..12].to_owned());
        forbidden.push(sha);
    }
    let job_ids: Vec<String> = ran.job_ids.iter().map(u64::to_string).collect();
    for addr in [ran.controller_metrics, ran.agent_metrics] {
        let (_, text) = scrape(addr, None).await;
        for sample in samples(&text) {
            for (key, label) in &sample.labels {
                for bad in &forbidden {
                    assert!(
                        !label.contains(bad.as_str()),
                        "{}{{{key}={label:?}}} holds {bad:?}",
                        sample.name
                    );
                }
                // Bucket bounds are numbers like ids: only they may be.
                if key != "le" {
                    assert!(
                        !job_ids.contains(label),
                        "{}{{{key}={label:?}}} is a job id",
                        sample.name
                    );
                }
            }
        }
        let raw_paths = format!("/api/v1/jobs/{}", ran.job_ids[0]);
        assert!(!text.contains(&raw_paths), "a raw path in {text}");
    }
    drop(ran.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_server_scrapes_both_and_answers_promql() {
    let Some(tools) = prometheus::tools() else {
        return;
    };
    let ran = run_jobs(ControllerOpts::default()).await;
    let prometheus =
        PrometheusServer::start(&tools, &[ran.controller_metrics, ran.agent_metrics]).await;
    let expect = |promql: &'static str, expected: f64| {
        let prometheus = &prometheus;
        async move {
            wait_for(SCRAPE_TIMEOUT, promql, || async move {
                prometheus
                    .query_scalar(promql)
                    .await
                    .filter(|value| *value == expected)
            })
            .await
        }
    };
    expect("sum(hobotnica_jobs_finished_total)", 3.0).await;
    expect(
        "sum(hobotnica_jobs_finished_total{kind=\"test\",outcome=\"failed\"})",
        1.0,
    )
    .await;
    expect("sum(hobotnica_agent_jobs_finished_total)", 3.0).await;
    expect("max(hobotnica_jobs_queued{scope=\"fleet\"})", 0.0).await;
    expect("count(up == 1)", 2.0).await;
    assert!(
        prometheus
            .targets_up()
            .await
            .iter()
            .all(|(_, up)| *up == 1.0),
        "{}",
        prometheus.output()
    );
    drop(ran.api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_redis_mode_the_round_trip_and_the_fleet_come_from_redis() {
    let Some(tools) = prometheus::tools() else {
        return;
    };
    let redis = RedisServer::start().await;
    let ran = run_jobs(ControllerOpts {
        redis_url: Some(redis.url()),
        ..ControllerOpts::default()
    })
    .await;
    // A second controller on the same Redis sees the same fleet.
    let peer_metrics = free_addr();
    let mut peer_opts = ran.controller.peer_opts();
    peer_opts.extra_args = vec!["--metrics-listen".to_owned(), peer_metrics.to_string()];
    let peer = Controller::start(peer_opts).await;
    let (_, text) = settled(ran.controller_metrics, |samples| {
        total(samples, "hobotnica_jobs_finished_total") >= 3.0
    })
    .await;
    tools.check_metrics(&text).unwrap();
    let first = samples(&text);
    assert!(
        total(&first, "hobotnica_redis_round_trip_seconds_count") >= 1.0,
        "{text}"
    );
    assert_eq!(total(&first, "hobotnica_jobs_finished_total"), 3.0);
    let (_, text) = scrape(peer_metrics, None).await;
    tools.check_metrics(&text).unwrap();
    let second = samples(&text);
    assert_eq!(
        total(&second, "hobotnica_jobs_finished_total"),
        0.0,
        "counters are the process's own"
    );
    assert_eq!(
        total(&second, "hobotnica_agents_connected"),
        1.0,
        "the fleet's gauges are the same on every controller"
    );
    drop(peer);
}

/// Webhooks, GitHub calls and commit statuses as a fake GitHub sees them:
/// each delivery counted by event and outcome, the registration's calls
/// counted, the statuses of the job counted as posted, and no label holds
/// the repository's owner or name or a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_github_calls_and_commit_statuses_are_counted() {
    let Some(tools) = prometheus::tools() else {
        return;
    };
    let github = FakeGitHub::start().await;
    let token = hobotnica_common::token::new_token("ghp")[..40].to_owned();
    github.add_user("octocat", &token);
    let repo = github.add_repo("octo-org", "widget", "main");
    github.grant(&token, "octo-org/widget", Permission::Admin);
    let metrics_addr = free_addr();
    let mut extra_args = github.controller_args();
    extra_args.extend(["--metrics-listen".to_owned(), metrics_addr.to_string()]);
    let controller = Controller::start(ControllerOpts {
        extra_args,
        ..ControllerOpts::default()
    })
    .await;
    let _agent = Agent::start_default(&controller).await;
    let user = GitHubUser::new(controller.url(), "octocat", &token);
    let registered = user.register("octo-org/widget", json!({})).await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let body = registered.json();
    let webhook_url = body["webhook_url"].as_str().unwrap().to_owned();
    let secret = body["webhook_secret"].as_str().unwrap().to_owned();

    let before = repo.head();
    let pushed = repo.commit_version("metrics");
    let payload = github.push_payload(
        "octo-org/widget",
        "refs/heads/main",
        &before,
        &pushed,
        false,
        false,
    );
    let delivery = new_delivery_id();
    let queued = send_webhook(&webhook_url, "push", &delivery, &payload, Some(&secret)).await;
    assert_eq!(queued.status, 202, "{}", queued.text());
    let again = send_webhook(&webhook_url, "push", &delivery, &payload, Some(&secret)).await;
    assert_eq!(again.status, 200, "a redelivery: {}", again.text());
    let forged = send_webhook(
        &webhook_url,
        "push",
        &new_delivery_id(),
        &payload,
        Some("not the secret"),
    )
    .await;
    assert_eq!(forged.status, 401);
    let unknown = format!(
        "{}/webhooks/github/no-such-hook-0123456789",
        controller.url()
    );
    let refused = send_webhook(
        &unknown,
        "push",
        &new_delivery_id(),
        &payload,
        Some(&secret),
    )
    .await;
    assert_eq!(refused.status, 404);

    // The job runs, and its statuses (pending, success) are posted.
    let text = wait_for(
        JOB_TIMEOUT,
        "two commit statuses counted as posted",
        || async {
            let (_, text) = scrape(metrics_addr, None).await;
            let posted = total(&samples(&text), "hobotnica_commit_statuses_posted_total");
            (posted >= 2.0 && github.statuses("octo-org/widget", &pushed).len() >= 2)
                .then_some(text)
        },
    )
    .await;
    tools.check_metrics(&text).unwrap();
    let all = samples(&text);
    for (outcome, expected) in [
        ("queued", 1.0),
        ("duplicate", 1.0),
        ("bad_signature", 1.0),
        ("refused", 1.0),
        ("invalid", 0.0),
    ] {
        assert_eq!(
            value(
                &all,
                "hobotnica_webhooks_total",
                &[("event", "push"), ("outcome", outcome)]
            ),
            expected,
            "push {outcome}"
        );
    }
    assert_eq!(total(&all, "hobotnica_commit_statuses_failed_total"), 0.0);
    assert!(
        value(
            &all,
            "hobotnica_github_calls_total",
            &[("call", "viewer"), ("outcome", "ok")]
        ) >= 1.0
    );
    assert!(
        value(
            &all,
            "hobotnica_github_calls_total",
            &[("call", "create_status"), ("outcome", "ok")]
        ) >= 2.0
    );
    assert_eq!(
        value(
            &all,
            "hobotnica_jobs_finished_total",
            &[("kind", "test"), ("outcome", "succeeded")]
        ),
        1.0
    );
    // GitHub's answers said how many calls the token has left: a few of
    // its 5,000 an hour are spent.
    let remaining = value(
        &all,
        "hobotnica_github_rate_limit_remaining",
        &[("resource", "core")],
    );
    assert!(
        (4_900.0..5_000.0).contains(&remaining),
        "remaining rate limit {remaining}"
    );
    for sample in &all {
        for (key, label) in &sample.labels {
            for bad in [
                "octo-org",
                "widget",
                token.as_str(),
                secret.as_str(),
                pushed.as_str(),
                delivery.as_str(),
            ] {
                assert!(
                    !label.contains(bad),
                    "{}{{{key}={label:?}}} holds {bad:?}",
                    sample.name
                );
            }
        }
    }

    // The token's limit is spent: the next commit's status is refused, and
    // the gauge says nothing is left.
    github.set_rate_limited(&token, true);
    let later = repo.commit_version("metrics, rate limited");
    let payload = github.push_payload(
        "octo-org/widget",
        "refs/heads/main",
        &pushed,
        &later,
        false,
        false,
    );
    let queued = send_webhook(
        &webhook_url,
        "push",
        &new_delivery_id(),
        &payload,
        Some(&secret),
    )
    .await;
    assert_eq!(queued.status, 202, "{}", queued.text());
    wait_for(JOB_TIMEOUT, "the rate limit counted as spent", || async {
        let all = samples(&scrape(metrics_addr, None).await.1);
        let left = value(
            &all,
            "hobotnica_github_rate_limit_remaining",
            &[("resource", "core")],
        );
        let refused = value(
            &all,
            "hobotnica_github_calls_total",
            &[("call", "create_status"), ("outcome", "rate_limited")],
        );
        (left == 0.0 && refused >= 1.0).then_some(())
    })
    .await;
}

/// `deploy/<path>` of this checkout.
fn deploy_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// Runs `promtool args`; its output, or a panic with it when it fails.
fn promtool(tools: &prometheus::Tools, args: &[&str]) -> String {
    let output = std::process::Command::new(&tools.promtool)
        .args(args)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}: {text}");
    text
}

/// The alert names of `deploy/prometheus/alerts.yaml`.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .map(|name| name.trim().to_owned())
        .collect()
}

/// The alerting rules are valid, and their unit tests (synthetic series)
/// make every alert fire and resolve again.
#[test]
fn the_alerting_rules_pass_promtool_and_each_alert_fires_and_resolves() {
    let Some(tools) = prometheus::tools() else {
        return;
    };
    let rules = deploy_file("prometheus/alerts.yaml");
    let tests = deploy_file("prometheus/alerts.test.yaml");
    let checked = promtool(&tools, &["check", "rules", rules.to_str().unwrap()]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&tools, &["test", "rules", tests.to_str().unwrap()]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    promtool(
        &tools,
        &[
            "check",
            "config",
            deploy_file("prometheus/prometheus.yml").to_str().unwrap(),
        ],
    );

    // Each alert has a case where it fires and one where it does not.
    let rules = std::fs::read_to_string(rules).unwrap();
    let tests = std::fs::read_to_string(tests).unwrap();
    let names = alert_names(&rules);
    for required in [
        "HobotnicaNoAgentForQueuedJobs",
        "HobotnicaQueueWaitHigh",
        "HobotnicaJobsLost",
        "HobotnicaWebhookSignaturesFailing",
        "HobotnicaGitHubRateLimited",
        "HobotnicaStoreUnreachable",
        "HobotnicaControllerDown",
    ] {
        assert!(
            names.iter().any(|name| name == required),
            "{required} missing"
        );
    }
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for name in &names {
        let expectations: Vec<&str> = lines
            .windows(2)
            .filter(|pair| pair[0] == format!("alertname: {name}"))
            .map(|pair| pair[1])
            .collect();
        assert!(
            expectations.contains(&"exp_alerts: []"),
            "{name}: no case where it stays quiet or resolves"
        );
        assert!(
            expectations.contains(&"exp_alerts:"),
            "{name}: no case where it fires"
        );
    }
}

/// Every `hobotnica_*` name in `text` (a PromQL expression, or a file of
/// them).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("hobotnica_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// Every `expr` of the Grafana dashboard.
fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => dashboard_queries(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dashboard_queries(item, out);
            }
        }
        _ => {}
    }
}

/// The Grafana dashboard is valid JSON, and it and the alerting rules name
/// only metrics a controller (in Redis mode, so that its Redis figures
/// exist) and an agent that ran jobs export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_name_only_exported_metrics() {
    if prometheus::tools().is_none() {
        return;
    }
    let dashboard = std::fs::read_to_string(deploy_file("grafana/hobotnica.json")).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert_eq!(dashboard["title"], "Hobotnica");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() >= 20, "{queries:?}");
    let alerts = std::fs::read_to_string(deploy_file("prometheus/alerts.yaml")).unwrap();

    // Redis mode, and a GitHub repository registered (GitHub's calls are
    // counted once there is one).
    let redis = RedisServer::start().await;
    let github = FakeGitHub::start().await;
    let token = hobotnica_common::token::new_token("ghp")[..40].to_owned();
    github.add_user("octocat", &token);
    github.add_repo("octo-org", "widget", "main");
    github.grant(&token, "octo-org/widget", Permission::Admin);
    let ran = run_jobs(ControllerOpts {
        redis_url: Some(redis.url()),
        extra_args: github.controller_args(),
        ..ControllerOpts::default()
    })
    .await;
    let user = GitHubUser::new(ran.controller.url(), "octocat", &token);
    let registered = user.register("octo-org/widget", json!({})).await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let (_, controller) = settled(ran.controller_metrics, |samples| {
        total(samples, "hobotnica_jobs_finished_total") >= 3.0
            && total(samples, "hobotnica_github_calls_total") >= 1.0
    })
    .await;
    let (_, agent) = scrape(ran.agent_metrics, None).await;
    let exported: std::collections::BTreeSet<String> = samples(&controller)
        .into_iter()
        .chain(samples(&agent))
        .map(|sample| sample.name)
        .collect();

    let mut named = std::collections::BTreeSet::new();
    for query in &queries {
        for name in metric_names(query) {
            assert!(
                exported.contains(&name),
                "the dashboard's {query:?} names {name}, which nothing exports"
            );
            named.insert(name);
        }
    }
    for name in metric_names(&alerts) {
        assert!(
            exported.contains(&name),
            "alerts.yaml names {name}, which nothing exports"
        );
    }
    // What the dashboard is for: the queue, waits, durations, agents,
    // errors, logs and webhooks.
    for name in [
        "hobotnica_jobs_queued",
        "hobotnica_job_queue_wait_seconds_bucket",
        "hobotnica_job_run_seconds_bucket",
        "hobotnica_agents_connected",
        "hobotnica_store_errors_total",
        "hobotnica_log_bytes_received_total",
        "hobotnica_webhooks_total",
    ] {
        assert!(named.contains(name), "the dashboard shows no {name}");
    }
}
