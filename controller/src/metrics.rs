//! The controller's Prometheus metrics: the registry, every metric's
//! definition, and `/metrics` on its own listener (`--metrics-listen`).
//!
//! Two kinds of figures:
//! - per-process counters and histograms (no `scope` label), recorded
//!   where the event happens: the store decorator (`store/metered.rs`) for
//!   job transitions and store calls, the REST middleware, agent sessions
//!   and log intake (`agents.rs`), webhooks (`deliveries.rs`), GitHub
//!   calls (`github.rs`), commit statuses (`statuses.rs`), notification
//!   attempts (`notifications.rs`). A dashboard
//!   sums them over controllers;
//! - fleet gauges (`scope="fleet"`): the queue, the running jobs and the
//!   connected agents, read from the shared store when scraped (at most
//!   once per [`FLEET_CACHE`]); every controller reports the same values,
//!   so a dashboard takes their `max`.
//!
//! Labels are bounded: kinds, outcomes, operations, route templates,
//! status classes, agents' label sets (capped). Never a job id, commit,
//! branch, repository or token: repositories are unbounded in number, and
//! each label value is a time series Prometheus keeps.
//!
//! Recording is an atomic add on a handle resolved once (counters, the
//! histograms of `hobotnica_common::metrics`): nothing on the log intake or
//! dispatch path allocates or takes a lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hobotnica_common::job::{Job, JobKind, JobState};
use hobotnica_common::metrics::{
    Buckets, DurationHistogram, FAST_BUCKETS, RUN_BUCKETS, WAIT_BUCKETS,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::services::Services;

/// Fleet gauges are read from the store at most this often; scrapes in
/// between get the last reading.
pub const FLEET_CACHE: Duration = Duration::from_secs(1);

/// Distinct agent label sets reported in `hobotnica_agents_connected`;
/// the rest are counted under `labels="other"`.
pub const MAX_AGENT_LABEL_SETS: usize = 32;

/// Every store operation, for their duration and error series (resolved
/// once, so that a call looks its handles up without a lock).
pub const STORE_OPERATIONS: &[&str] = &[
    "ping",
    "announce",
    "create_repo",
    "get_repo",
    "list_repos",
    "delete_repo",
    "update_repo",
    "find_repo_by_hook",
    "key_job",
    "create_job",
    "create_job_once",
    "get_job",
    "list_jobs",
    "claim_job",
    "renew_lease",
    "request_cancel",
    "finish_job",
    "queue_stats",
    "expire_leases",
    "extend_leases",
    "append_log",
    "append_controller_line",
    "read_log",
    "log_len",
    "register_agent",
    "get_agent",
    "list_agents",
    "touch_agent",
    "create_agent_token",
    "list_agent_tokens",
    "find_agent_token",
    "delete_agent_token",
    "create_session",
    "get_session",
    "delete_session",
    "archive_logs",
    "prune",
    "queue_notifications",
    "claim_notification",
    "retry_notification",
    "finish_notification",
];

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type RequestLabels = [(&'static str, String); 3];
type AgentSetLabels = [(&'static str, String); 2];

const FLEET: Labels1 = [("scope", "fleet")];

/// What a webhook delivery came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    Queued,
    Ignored,
    Duplicate,
    BadSignature,
    Invalid,
    /// No such hook, or its repository is disabled.
    Refused,
    /// The controller could not handle it (store, secret key).
    Error,
}

impl WebhookOutcome {
    const ALL: [WebhookOutcome; 7] = [
        WebhookOutcome::Queued,
        WebhookOutcome::Ignored,
        WebhookOutcome::Duplicate,
        WebhookOutcome::BadSignature,
        WebhookOutcome::Invalid,
        WebhookOutcome::Refused,
        WebhookOutcome::Error,
    ];

    fn as_str(self) -> &'static str {
        match self {
            WebhookOutcome::Queued => "queued",
            WebhookOutcome::Ignored => "ignored",
            WebhookOutcome::Duplicate => "duplicate",
            WebhookOutcome::BadSignature => "bad_signature",
            WebhookOutcome::Invalid => "invalid",
            WebhookOutcome::Refused => "refused",
            WebhookOutcome::Error => "error",
        }
    }
}

/// A webhook's event header as a bounded label value.
fn webhook_event(event: Option<&str>) -> &'static str {
    match event {
        Some("push") => "push",
        Some("pull_request") => "pull_request",
        Some("ping") => "ping",
        Some(_) => "other",
        None => "none",
    }
}

/// What became of a log piece an agent sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogChunk {
    /// New bytes were stored.
    Appended,
    /// Every byte was stored before (a resend): acknowledged, not stored.
    Repeated,
    /// Refused: it starts past the stored end (a gap), belongs to an
    /// attempt no longer running, or is past the job's log limit.
    Rejected,
}

/// A REST method as a bounded label value.
fn method_label(method: &axum::http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// `2xx`, `4xx`, ...
fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Store-call figures of one operation.
#[derive(Clone)]
struct OperationFigures {
    duration: DurationHistogram,
    errors: Counter,
}

pub struct Metrics {
    registry: Registry,
    /// The job figures of each kind (test, deploy, custom).
    kinds: [KindFigures; 3],
    dispatch: DurationHistogram,
    leases_expired: Counter,
    http_requests: Family<RequestLabels, DurationHistogram, Buckets>,
    store_operations: HashMap<&'static str, OperationFigures>,
    agent_sessions_opened: Counter,
    agent_sessions_lost: Counter,
    log_bytes_received: Counter,
    log_chunks_appended: Counter,
    log_chunks_repeated: Counter,
    log_chunks_rejected: Counter,
    webhooks: Family<Labels2, Counter>,
    github_calls: Family<Labels2, Counter>,
    github_rate_limit_remaining: Family<Labels1, Gauge>,
    statuses_posted: Counter,
    statuses_failed: Counter,
    notification_attempts: Family<Labels2, Counter>,
    /// Redis mode only: a PING's round trip, once per fleet reading.
    redis_round_trip: Option<DurationHistogram>,
    /// PostgreSQL mode only: a query's round trip, once per fleet reading.
    postgres_round_trip: Option<DurationHistogram>,
    jobs_queued: Family<Labels1, Gauge>,
    jobs_running: Family<Labels1, Gauge>,
    oldest_queued_age: Family<Labels1, Gauge<f64, AtomicU64>>,
    agents_connected: Family<AgentSetLabels, Gauge>,
    /// When the fleet gauges were last read from the store.
    fleet_read_at: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Every metric, registered; `redis` adds the Redis round trip.
    pub fn new(redis: bool) -> Metrics {
        Metrics::for_store(redis, false)
    }

    /// Every metric, registered; `redis` adds the Redis round trip,
    /// `postgres` the PostgreSQL one.
    pub fn for_store(redis: bool, postgres: bool) -> Metrics {
        let mut registry = hobotnica_common::metrics::registry();
        let jobs_created: Family<Labels1, Counter> = Family::default();
        registry.register(
            "jobs_created",
            "Jobs queued by this controller, by kind",
            jobs_created.clone(),
        );
        let jobs_started: Family<Labels1, Counter> = Family::default();
        registry.register(
            "jobs_started",
            "Jobs claimed by an agent through this controller, by kind",
            jobs_started.clone(),
        );
        let jobs_finished: Family<Labels2, Counter> = Family::default();
        registry.register(
            "jobs_finished",
            "Jobs that ended through this controller, by kind and outcome (succeeded, failed, cancelled, timed_out, lost)",
            jobs_finished.clone(),
        );
        let queue_wait: Family<Labels1, DurationHistogram, Buckets> =
            Family::new_with_constructor(Buckets(WAIT_BUCKETS));
        registry.register(
            "job_queue_wait_seconds",
            "Time from a job's creation to its claim by an agent, by kind",
            queue_wait.clone(),
        );
        let run_time: Family<Labels1, DurationHistogram, Buckets> =
            Family::new_with_constructor(Buckets(RUN_BUCKETS));
        registry.register(
            "job_run_seconds",
            "Time from a job's claim to its end, by kind",
            run_time.clone(),
        );
        let dispatch = DurationHistogram::new(WAIT_BUCKETS);
        registry.register(
            "job_dispatch_seconds",
            "Time from a job's creation to its assignment being handed to the agent's stream",
            dispatch.clone(),
        );
        let leases_expired = Counter::default();
        registry.register(
            "leases_expired",
            "Running jobs whose lease ran out (their agent stopped renewing): lost",
            leases_expired.clone(),
        );
        let http_requests = Family::new_with_constructor(Buckets(FAST_BUCKETS));
        registry.register(
            "http_request_duration_seconds",
            "REST and page requests until the answer's head, by route template, method and status class",
            http_requests.clone(),
        );
        let store_durations: Family<Labels1, DurationHistogram, Buckets> =
            Family::new_with_constructor(Buckets(FAST_BUCKETS));
        registry.register(
            "store_operation_duration_seconds",
            "Calls to the store, by operation (in Redis mode, Redis round trips and scripts)",
            store_durations.clone(),
        );
        let store_errors: Family<Labels1, Counter> = Family::default();
        registry.register(
            "store_errors",
            "Calls to the store that failed because it could not answer (Redis down or timing out, a disk error), by operation",
            store_errors.clone(),
        );
        let store_operations = STORE_OPERATIONS
            .iter()
            .map(|operation| {
                let labels = [("operation", *operation)];
                let handles = OperationFigures {
                    duration: store_durations.get_or_create_owned(&labels),
                    errors: store_errors.get_or_create_owned(&labels),
                };
                (*operation, handles)
            })
            .collect();
        let agent_sessions_opened = Counter::default();
        registry.register(
            "agent_sessions_opened",
            "Agent dispatch sessions opened on this controller",
            agent_sessions_opened.clone(),
        );
        let agent_sessions_lost = Counter::default();
        registry.register(
            "agent_sessions_lost",
            "Agent dispatch sessions that ended on this controller (the agent left or was cut off, its token was revoked, the controller stopped)",
            agent_sessions_lost.clone(),
        );
        let log_bytes_received = Counter::default();
        registry.register(
            "log_bytes_received",
            "Log bytes received from agents (resends included)",
            log_bytes_received.clone(),
        );
        let log_chunks: Family<Labels1, Counter> = Family::default();
        registry.register(
            "log_chunks",
            "Log pieces received from agents, by result (appended, repeated: a resend of stored bytes, rejected: a gap, a stale attempt or past the log limit)",
            log_chunks.clone(),
        );
        let webhooks: Family<Labels2, Counter> = Family::default();
        registry.register(
            "webhooks",
            "GitHub webhook deliveries, by event and outcome",
            webhooks.clone(),
        );
        let github_calls = Family::default();
        registry.register(
            "github_calls",
            "Calls to GitHub's API, by call and outcome",
            github_calls.clone(),
        );
        let github_rate_limit_remaining = Family::default();
        registry.register(
            "github_rate_limit_remaining",
            "Calls GitHub's API has left for the token of its latest answer, by rate-limit resource (core, graphql, ...); no series before the first answer",
            github_rate_limit_remaining.clone(),
        );
        let statuses_posted = Counter::default();
        registry.register(
            "commit_statuses_posted",
            "Commit statuses posted to GitHub",
            statuses_posted.clone(),
        );
        let statuses_failed = Counter::default();
        registry.register(
            "commit_statuses_failed",
            "Commit statuses given up on (refused, or still failing after the retries)",
            statuses_failed.clone(),
        );
        let notification_attempts: Family<Labels2, Counter> = Family::default();
        registry.register(
            "notification_attempts",
            "Attempts to deliver a notification, by kind (slack, webhook) and outcome (delivered, retried: failed and tried again later, failed: given up)",
            notification_attempts.clone(),
        );
        let redis_round_trip = redis.then(|| {
            let histogram = DurationHistogram::new(FAST_BUCKETS);
            registry.register(
                "redis_round_trip_seconds",
                "A PING's round trip to Redis, measured when the fleet gauges are read",
                histogram.clone(),
            );
            histogram
        });
        let postgres_round_trip = postgres.then(|| {
            let histogram = DurationHistogram::new(FAST_BUCKETS);
            registry.register(
                "postgres_round_trip_seconds",
                "A query's round trip to PostgreSQL, measured when the fleet gauges are read",
                histogram.clone(),
            );
            histogram
        });
        let jobs_queued = Family::default();
        registry.register(
            "jobs_queued",
            "Jobs waiting in the queue (scope=fleet: every controller reports the same)",
            jobs_queued.clone(),
        );
        let jobs_running = Family::default();
        registry.register(
            "jobs_running",
            "Jobs running (scope=fleet: every controller reports the same)",
            jobs_running.clone(),
        );
        let oldest_queued_age = Family::default();
        registry.register(
            "oldest_queued_job_age_seconds",
            "How long the job first in the queue has waited; 0 when the queue is empty (scope=fleet)",
            oldest_queued_age.clone(),
        );
        let agents_connected = Family::default();
        registry.register(
            "agents_connected",
            "Agents heard from within 30 s, by their vouched label set (scope=fleet)",
            agents_connected.clone(),
        );
        // Every bounded series exists from the start, at 0, so that a rate
        // or an alert has a value before the first event; the job figures
        // are resolved once, so recording them is an atomic add.
        let kinds = KINDS.map(|kind| {
            let labels = [("kind", kind.as_str())];
            KindFigures {
                created: jobs_created.get_or_create_owned(&labels),
                started: jobs_started.get_or_create_owned(&labels),
                finished: JobState::ALL
                    .into_iter()
                    .filter(|state| state.is_terminal())
                    .map(|state| {
                        let labels = [("kind", kind.as_str()), ("outcome", state.as_str())];
                        (state, jobs_finished.get_or_create_owned(&labels))
                    })
                    .collect(),
                queue_wait: queue_wait.get_or_create_owned(&labels),
                run_time: run_time.get_or_create_owned(&labels),
            }
        });
        for event in ["push", "pull_request", "ping"] {
            for outcome in WebhookOutcome::ALL {
                webhooks.get_or_create_owned(&[("event", event), ("outcome", outcome.as_str())]);
            }
        }
        Metrics {
            registry,
            kinds,
            dispatch,
            leases_expired,
            http_requests,
            store_operations,
            agent_sessions_opened,
            agent_sessions_lost,
            log_bytes_received,
            log_chunks_appended: log_chunks.get_or_create_owned(&[("result", "appended")]),
            log_chunks_repeated: log_chunks.get_or_create_owned(&[("result", "repeated")]),
            log_chunks_rejected: log_chunks.get_or_create_owned(&[("result", "rejected")]),
            webhooks,
            github_calls,
            github_rate_limit_remaining,
            statuses_posted,
            statuses_failed,
            notification_attempts,
            redis_round_trip,
            postgres_round_trip,
            jobs_queued,
            jobs_running,
            oldest_queued_age,
            agents_connected,
            fleet_read_at: tokio::sync::Mutex::new(None),
        }
    }

    fn kind(&self, kind: JobKind) -> &KindFigures {
        let index = match kind {
            JobKind::Test => 0,
            JobKind::Deploy => 1,
            JobKind::Custom => 2,
        };
        &self.kinds[index]
    }

    /// The Prometheus text exposition, as a scrape without `Accept` gets
    /// it (without reading the fleet's figures).
    #[cfg(test)]
    pub fn exposition(&self) -> String {
        hobotnica_common::metrics::expose(&self.registry, None)
            .map(|exposition| exposition.body)
            .unwrap_or_default()
    }

    /// A job was queued.
    pub fn job_created(&self, job: &Job) {
        self.kind(job.kind).created.inc();
    }

    /// An agent claimed `job` (now running).
    pub fn job_started(&self, job: &Job) {
        let figures = self.kind(job.kind);
        figures.started.inc();
        if let Some(started_at) = job.started_at {
            figures.queue_wait.observe_span(job.created_at, started_at);
        }
    }

    /// `job` reached its terminal state.
    pub fn job_finished(&self, job: &Job) {
        let figures = self.kind(job.kind);
        let Some((_, finished)) = figures
            .finished
            .iter()
            .find(|(state, _)| *state == job.state)
        else {
            return;
        };
        finished.inc();
        if let (Some(started_at), Some(finished_at)) = (job.started_at, job.finished_at) {
            figures.run_time.observe_span(started_at, finished_at);
        }
    }

    /// A running job's lease ran out: it is lost.
    pub fn lease_expired(&self, job: &Job) {
        self.leases_expired.inc();
        self.job_finished(job);
    }

    /// The assignment of `job` was handed to its agent's stream.
    pub fn job_dispatched(&self, job: &Job, at: chrono::DateTime<chrono::Utc>) {
        self.dispatch.observe_span(job.created_at, at);
    }

    /// A store call of `operation` took `elapsed`; `unavailable` when the
    /// store could not answer.
    pub fn store_call(&self, operation: &'static str, elapsed: Duration, unavailable: bool) {
        if let Some(handles) = self.store_operations.get(operation) {
            handles.duration.observe(elapsed);
            if unavailable {
                handles.errors.inc();
            }
        }
    }

    /// A REST or page request answered (its head) after `elapsed`.
    /// `route` is the route template (`None`: no route matched).
    pub fn http_request(
        &self,
        route: Option<&str>,
        method: &axum::http::Method,
        status: StatusCode,
        elapsed: Duration,
    ) {
        let labels = [
            ("route", route.unwrap_or("unmatched").to_owned()),
            ("method", method_label(method).to_owned()),
            ("status", status_class(status).to_owned()),
        ];
        self.http_requests.get_or_create(&labels).observe(elapsed);
    }

    pub fn agent_session_opened(&self) {
        self.agent_sessions_opened.inc();
    }

    pub fn agent_session_lost(&self) {
        self.agent_sessions_lost.inc();
    }

    /// A log piece of `bytes` bytes arrived and came to `result`.
    pub fn log_piece(&self, bytes: usize, result: LogChunk) {
        self.log_bytes_received.inc_by(bytes as u64);
        match result {
            LogChunk::Appended => self.log_chunks_appended.inc(),
            LogChunk::Repeated => self.log_chunks_repeated.inc(),
            LogChunk::Rejected => self.log_chunks_rejected.inc(),
        };
    }

    /// A webhook delivery with the `X-GitHub-Event` `event` came to
    /// `outcome`.
    pub fn webhook(&self, event: Option<&str>, outcome: WebhookOutcome) {
        self.webhooks
            .get_or_create(&[
                ("event", webhook_event(event)),
                ("outcome", outcome.as_str()),
            ])
            .inc();
    }

    /// A call to GitHub's API (`call`: what it asked) came to `outcome`.
    pub fn github_call(&self, call: &'static str, outcome: &'static str) {
        self.github_calls
            .get_or_create(&[("call", call), ("outcome", outcome)])
            .inc();
    }

    /// GitHub said `remaining` calls are left on its rate limit
    /// `resource` (already one of a bounded set).
    pub fn github_rate_limit(&self, resource: &'static str, remaining: u64) {
        self.github_rate_limit_remaining
            .get_or_create(&[("resource", resource)])
            .set(i64::try_from(remaining).unwrap_or(i64::MAX));
    }

    pub fn commit_status_posted(&self) {
        self.statuses_posted.inc();
    }

    pub fn commit_status_failed(&self) {
        self.statuses_failed.inc();
    }

    /// A notification attempt of `kind` (`slack`, `webhook`) came to
    /// `outcome` (`delivered`, `retried`, `failed`).
    pub fn notification_attempt(&self, kind: &'static str, outcome: &'static str) {
        self.notification_attempts
            .get_or_create(&[("kind", kind), ("outcome", outcome)])
            .inc();
    }

    /// Sets the fleet gauges from a reading of the store.
    fn set_fleet(&self, fleet: &crate::jobs::Fleet, now: chrono::DateTime<chrono::Utc>) {
        let as_gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.jobs_queued
            .get_or_create(&FLEET)
            .set(as_gauge(fleet.queue.queued));
        self.jobs_running
            .get_or_create(&FLEET)
            .set(as_gauge(fleet.queue.running));
        let age = fleet
            .queue
            .oldest_queued_at
            .and_then(|at| (now - at).to_std().ok())
            .map_or(0.0, |age| age.as_secs_f64());
        self.oldest_queued_age.get_or_create(&FLEET).set(age);
        self.agents_connected.clear();
        // Agents without vouched labels are always reported, 0 or not, so
        // that "no agent connected" is a value and not a missing series.
        let mut sets = fleet.agents_connected.clone();
        sets.entry(String::new()).or_insert(0);
        for (labels, count) in capped_label_sets(&sets) {
            self.agents_connected
                .get_or_create(&[("scope", "fleet".to_owned()), ("labels", labels)])
                .set(as_gauge(count));
        }
    }
}

/// Every kind of job, in the order of `Metrics::kinds`.
const KINDS: [JobKind; 3] = [JobKind::Test, JobKind::Deploy, JobKind::Custom];

/// The job figures of one kind, resolved once.
struct KindFigures {
    created: Counter,
    started: Counter,
    /// One per terminal state.
    finished: Vec<(JobState, Counter)>,
    queue_wait: DurationHistogram,
    run_time: DurationHistogram,
}

/// The label sets to report: the most common [`MAX_AGENT_LABEL_SETS`] as
/// they are, the rest summed under `other`.
fn capped_label_sets(sets: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut sets: Vec<(String, u64)> = sets.iter().map(|(k, v)| (k.clone(), *v)).collect();
    sets.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    if sets.len() > MAX_AGENT_LABEL_SETS {
        let other: u64 = sets.drain(MAX_AGENT_LABEL_SETS..).map(|(_, n)| n).sum();
        sets.push(("other".to_owned(), other));
    }
    sets
}

/// `/metrics`: the router served on `--metrics-listen`.
pub fn router(services: Services) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(services)
}

async fn scrape(State(services): State<Services>, headers: HeaderMap) -> Response {
    refresh_fleet(&services).await;
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok());
    match hobotnica_common::metrics::expose(&services.metrics.registry, accept) {
        Ok(exposition) => (
            [(header::CONTENT_TYPE, exposition.content_type)],
            exposition.body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Reads the fleet gauges from the store unless they were read within
/// [`FLEET_CACHE`]. A failed read keeps the last values (and is logged).
async fn refresh_fleet(services: &Services) {
    let metrics = &services.metrics;
    let mut read_at = metrics.fleet_read_at.lock().await;
    if read_at.is_some_and(|at| at.elapsed() < FLEET_CACHE) {
        return;
    }
    if let Some(round_trip) = metrics
        .redis_round_trip
        .as_ref()
        .or(metrics.postgres_round_trip.as_ref())
    {
        let started = Instant::now();
        if services.ready().await.is_ok() {
            round_trip.observe(started.elapsed());
        }
    }
    match services.fleet().await {
        Ok(fleet) => metrics.set_fleet(&fleet, chrono::Utc::now()),
        Err(err) => tracing::warn!(error = %err, "metrics: cannot read the fleet's figures"),
    }
    *read_at = Some(Instant::now());
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    services: Services,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let serving = axum::serve(listener, router(services))
        .with_graceful_shutdown(async move { shutdown.cancelled().await });
    if let Err(err) = serving.await {
        tracing::error!(error = %err, "the metrics listener failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_label_sets_are_capped() {
        let sets: BTreeMap<String, u64> = (0..40u64).map(|i| (format!("n={i}"), i + 1)).collect();
        let capped = capped_label_sets(&sets);
        assert_eq!(capped.len(), MAX_AGENT_LABEL_SETS + 1);
        assert_eq!(capped[0], ("n=39".to_owned(), 40));
        let other = capped.last().expect("other");
        assert_eq!(other.0, "other");
        assert_eq!(other.1, (1..=8).sum::<u64>());
    }

    #[test]
    fn status_classes_and_events_are_bounded() {
        assert_eq!(status_class(StatusCode::OK), "2xx");
        assert_eq!(status_class(StatusCode::NOT_FOUND), "4xx");
        assert_eq!(status_class(StatusCode::BAD_GATEWAY), "5xx");
        assert_eq!(webhook_event(Some("push")), "push");
        assert_eq!(webhook_event(Some("anything the sender likes")), "other");
        assert_eq!(
            method_label(&axum::http::Method::from_bytes(b"BREW").expect("a method")),
            "other"
        );
    }

    #[test]
    fn every_store_operation_has_its_series() {
        let metrics = Metrics::new(false);
        metrics.store_call("append_log", Duration::from_millis(1), false);
        metrics.store_call("get_job", Duration::from_millis(1), true);
        let text = hobotnica_common::metrics::expose(&metrics.registry, None)
            .expect("encodes")
            .body;
        assert!(text.contains(
            "hobotnica_store_operation_duration_seconds_count{operation=\"append_log\"} 1\n"
        ));
        assert!(text.contains("hobotnica_store_errors_total{operation=\"get_job\"} 1\n"));
        assert!(text.contains("hobotnica_store_errors_total{operation=\"prune\"} 0\n"));
    }
}
