//! The agent's Prometheus metrics: the registry, every metric's
//! definition, and `/metrics` on `--metrics-listen` (plain HTTP/1.1, no
//! token: bind it to loopback or a private network).
//!
//! Recorded where the event happens: running jobs, finished jobs and the
//! sandbox set-up time in the job supervisor, log bytes shipped in the
//! shipper (an atomic add per chunk), reconnects in the pool. The spool's
//! size on disk and the process's figures are read when scraped. Labels
//! are bounded (an outcome); never a job id, commit or repository.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hobotnica_common::job::Outcome;
use hobotnica_common::metrics::{DurationHistogram, WAIT_BUCKETS};
use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a scraper may take to send its request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

type OutcomeLabels = [(&'static str, &'static str); 1];

pub struct AgentMetrics {
    registry: Registry,
    pub running_jobs: Gauge,
    jobs_finished: Family<OutcomeLabels, Counter>,
    /// Log bytes sent to a controller (resends included).
    pub log_bytes_shipped: Counter,
    reconnects: Counter,
    sandbox_setup: DurationHistogram,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl AgentMetrics {
    /// Every metric, registered; the spool's size is read from
    /// `spool_dir` when scraped.
    pub fn new(spool_dir: PathBuf) -> AgentMetrics {
        let mut registry = hobotnica_common::metrics::registry();
        let running_jobs = Gauge::default();
        registry.register(
            "agent_running_jobs",
            "Jobs this agent runs now (from assignment until reported)",
            running_jobs.clone(),
        );
        let jobs_finished: Family<OutcomeLabels, Counter> = Family::default();
        for outcome in ["succeeded", "failed", "cancelled", "timed_out", "dropped"] {
            jobs_finished.get_or_create_owned(&[("outcome", outcome)]);
        }
        registry.register(
            "agent_jobs_finished",
            "Jobs this agent reported, by outcome (succeeded, failed, cancelled, timed_out; dropped: the controller no longer held the job)",
            jobs_finished.clone(),
        );
        let log_bytes_shipped = Counter::default();
        registry.register(
            "agent_log_bytes_shipped",
            "Log bytes sent to controllers (resends after a reconnect included)",
            log_bytes_shipped.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "agent_reconnects",
            "Dispatch sessions that broke or were closed and were opened again",
            reconnects.clone(),
        );
        let sandbox_setup = DurationHistogram::new(WAIT_BUCKETS);
        registry.register(
            "agent_sandbox_setup_seconds",
            "How long a job waited for its sandbox once its work tree was ready (the sandbox is made during the checkout: near zero unless it had to be started afterwards)",
            sandbox_setup.clone(),
        );
        registry.register_collector(Box::new(SpoolCollector { spool_dir }));
        AgentMetrics {
            registry,
            running_jobs,
            jobs_finished,
            log_bytes_shipped,
            reconnects,
            sandbox_setup,
        }
    }

    /// A job was reported with `outcome`.
    pub fn job_finished(&self, outcome: Outcome) {
        self.jobs_finished
            .get_or_create(&[("outcome", outcome.state().as_str())])
            .inc();
    }

    /// A job was dropped: its controller no longer held it.
    pub fn job_dropped(&self) {
        self.jobs_finished
            .get_or_create(&[("outcome", "dropped")])
            .inc();
    }

    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    pub fn sandbox_ready(&self, setup: Duration) {
        self.sandbox_setup.observe(setup);
    }

    /// The registry in the format `accept` asks for.
    fn expose(
        &self,
        accept: Option<&str>,
    ) -> Result<hobotnica_common::metrics::Exposition, std::fmt::Error> {
        hobotnica_common::metrics::expose(&self.registry, accept)
    }
}

/// A running job counted in `agent_running_jobs` until dropped.
pub struct RunningJob(Gauge);

impl RunningJob {
    pub fn start(metrics: &AgentMetrics) -> RunningJob {
        metrics.running_jobs.inc();
        RunningJob(metrics.running_jobs.clone())
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The spool files' size on disk, read when scraped.
#[derive(Debug)]
struct SpoolCollector {
    spool_dir: PathBuf,
}

impl Collector for SpoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let bytes: u64 = std::fs::read_dir(&self.spool_dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|entry| entry.metadata().ok())
                    .filter(std::fs::Metadata::is_file)
                    .map(|meta| meta.len())
                    .sum()
            })
            .unwrap_or(0);
        let gauge = ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX));
        gauge.encode(encoder.encode_descriptor(
            "agent_spool_bytes",
            "Log bytes on disk waiting in spool files (kept until the controller acknowledged them)",
            None,
            gauge.metric_type(),
        )?)
    }
}

/// Binds `--metrics-listen`.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (metrics; choose another address with --metrics-listen)")
    })
}

/// Serves `/metrics` on `listener` until `shutdown`; each connection is a
/// task of its own, ended at `shutdown` too.
pub async fn serve(listener: TcpListener, metrics: Arc<AgentMetrics>, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener: cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&metrics, &request)) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection =
                builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// `GET /metrics` in the format the scraper asks for; anything else 404.
fn answer<B>(metrics: &AgentMetrics, request: &hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
    let status = |status: hyper::StatusCode| {
        let mut response = hyper::Response::new(Full::new(Bytes::new()));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return status(hyper::StatusCode::NOT_FOUND);
    }
    if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
        return status(hyper::StatusCode::METHOD_NOT_ALLOWED);
    }
    let accept = request
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|accept| accept.to_str().ok());
    match metrics.expose(accept) {
        Ok(exposition) => {
            let mut response = hyper::Response::new(Full::new(Bytes::from(exposition.body)));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(exposition.content_type),
            );
            response
        }
        Err(_) => status(hyper::StatusCode::INTERNAL_SERVER_ERROR),
    }
}
