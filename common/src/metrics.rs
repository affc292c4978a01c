//! What the controller's and the agent's `/metrics` share: the exposition
//! (the Prometheus text format by default, OpenMetrics when the scraper's
//! `Accept` asks for it), a duration histogram that records with atomic
//! adds only (no lock, no allocation: it sits on hot paths), and the
//! process's own figures read from `/proc` at scrape time.
//!
//! Every metric is built on `prometheus-client`; nothing here writes the
//! text format by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::MetricConstructor;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Every metric's name starts with this (and `_`).
pub const PREFIX: &str = "hobotnica";

/// The OpenMetrics text format's content type.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The Prometheus text format's (0.0.4) content type.
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A registry whose metrics are all named `hobotnica_*`, with the process
/// collector in it.
pub fn registry() -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(ProcessCollector));
    registry
}

/// A scrape's answer: its content type and body.
#[derive(Debug)]
pub struct Exposition {
    pub content_type: &'static str,
    pub body: String,
}

/// Whether an `Accept` header asks for OpenMetrics: it names
/// `application/openmetrics-text` without `q=0`. Anything else (no header,
/// `text/plain`, `*/*`) gets the Prometheus text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|accept| {
        accept.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            media.eq_ignore_ascii_case("application/openmetrics-text")
                && !parts.any(|param| {
                    param
                        .strip_prefix("q=")
                        .and_then(|q| q.parse::<f64>().ok())
                        .is_some_and(|q| q <= 0.0)
                })
        })
    })
}

/// `registry` in the format `accept` asks for (see [`wants_openmetrics`]).
pub fn expose(registry: &Registry, accept: Option<&str>) -> Result<Exposition, std::fmt::Error> {
    let mut body = String::with_capacity(16 * 1024);
    if wants_openmetrics(accept) {
        prometheus_client::encoding::text::encode(&mut body, registry)?;
        Ok(Exposition {
            content_type: OPENMETRICS_CONTENT_TYPE,
            body,
        })
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut body, registry)?;
        Ok(Exposition {
            content_type: PROMETHEUS_CONTENT_TYPE,
            body,
        })
    }
}

/// Bucket bounds (seconds) for fast operations: store calls, REST
/// requests, Redis round trips (100 µs to 10 s).
pub const FAST_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Bucket bounds (seconds) for waits a person notices: queue wait,
/// dispatch, sandbox set-up (1 ms to 1 h).
pub const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
];

/// Bucket bounds (seconds) for a job's run time (100 ms to 6 h).
pub const RUN_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
    21600.0,
];

/// A histogram of durations recorded with atomic adds only: one bucket
/// count and the sum (in nanoseconds). Cheap enough for a log append.
/// Clones share the counts.
#[derive(Debug, Clone)]
pub struct DurationHistogram {
    inner: Arc<HistogramCounts>,
}

#[derive(Debug)]
struct HistogramCounts {
    bounds: &'static [f64],
    /// One per bound, then the `+Inf` bucket (not cumulative).
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl DurationHistogram {
    /// A histogram with upper bounds `bounds` (seconds, ascending) and
    /// `+Inf`.
    pub fn new(bounds: &'static [f64]) -> DurationHistogram {
        DurationHistogram {
            inner: Arc::new(HistogramCounts {
                bounds,
                counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_nanos: AtomicU64::new(0),
            }),
        }
    }

    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let bucket = self.inner.bounds.partition_point(|bound| *bound < seconds);
        if let Some(count) = self.inner.counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.inner.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Records the time between two instants of a clock that may step
    /// (wall-clock timestamps): a negative span counts as zero.
    pub fn observe_span(
        &self,
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
    ) {
        self.observe((to - from).to_std().unwrap_or_default());
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.inner
            .counts
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let counts: Vec<u64> = self
            .inner
            .counts
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect();
        let buckets: Vec<(f64, u64)> = self
            .inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts.iter().copied())
            .collect();
        // The count is the buckets' total, so `_count` always equals the
        // `+Inf` bucket even while observations land during the scrape.
        let count = counts.iter().sum();
        let sum = self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Makes a family's histograms with the same bounds.
#[derive(Debug, Clone, Copy)]
pub struct Buckets(pub &'static [f64]);

impl MetricConstructor<DurationHistogram> for Buckets {
    fn new_metric(&self) -> DurationHistogram {
        DurationHistogram::new(self.0)
    }
}

/// The process's CPU time, memory, open files and start time, read from
/// `/proc/self` at each scrape (Linux; elsewhere nothing is reported).
#[derive(Debug)]
pub struct ProcessCollector;

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, fixed at 100
/// by the Linux ABI on every architecture we build for).
const USER_HZ: f64 = 100.0;

/// What `/proc` says about this process.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessFigures {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessFigures {
    /// Reads `/proc/self`; `None` where there is no such thing.
    pub fn read() -> Option<ProcessFigures> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let mut figures = parse_stat(&stat)?;
        figures.resident_bytes = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| parse_resident_bytes(&status))
            .unwrap_or(0);
        figures.open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|dir| dir.count() as u64)
            .unwrap_or(0);
        figures.max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| parse_max_open_files(&limits));
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| parse_boot_time(&stat));
        figures.start_time_seconds = figures
            .start_time_seconds
            .zip(boot_time)
            .map(|(since_boot, boot)| boot as f64 + since_boot);
        Some(figures)
    }
}

/// `/proc/self/stat`: CPU time (utime + stime), virtual size and the start
/// time in seconds since boot (the caller adds the boot
/// time). The command name (field 2) may hold spaces and parentheses: the
/// fields after it start after the last `)`.
fn parse_stat(stat: &str) -> Option<ProcessFigures> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first here.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let ticks = field(14)? + field(15)?;
    Some(ProcessFigures {
        cpu_seconds: ticks as f64 / USER_HZ,
        virtual_bytes: field(23)?,
        resident_bytes: 0,
        open_fds: 0,
        max_fds: None,
        start_time_seconds: field(22).map(|ticks| ticks as f64 / USER_HZ),
    })
}

/// `VmRSS` in `/proc/self/status` (kB there), in bytes.
fn parse_resident_bytes(status: &str) -> Option<u64> {
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib.saturating_mul(1024))
}

/// The soft limit of open files in `/proc/self/limits`.
fn parse_max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `btime` in `/proc/stat`: when the machine booted (unix seconds).
fn parse_boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(figures) = ProcessFigures::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(figures.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time the process spent",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size",
                Some(figures.resident_bytes as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size",
                Some(figures.virtual_bytes as f64),
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                Some(figures.open_fds as f64),
            ),
            (
                "process_max_fds",
                "The soft limit of open file descriptors",
                figures.max_fds.map(|max| max as f64),
            ),
            (
                "process_start_time_seconds",
                "When the process started (unix seconds)",
                figures.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let Some(value) = value else { continue };
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_asked_for() {
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(wants_openmetrics(Some(
            "text/plain;q=0.3, application/openmetrics-text; version=0.0.1; q=0.5"
        )));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text;q=0, text/plain"
        )));
    }

    #[test]
    fn a_stat_line_with_a_strange_command_name_parses() {
        let stat = "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 4200 104857600 2560 18446744073709551615";
        let figures = parse_stat(stat).expect("parses");
        assert_eq!(figures.cpu_seconds, 3.0);
        assert_eq!(figures.virtual_bytes, 104_857_600);
        assert_eq!(
            parse_resident_bytes("Name:\tx\nVmRSS:\t   2560 kB\n"),
            Some(2560 * 1024)
        );
        assert_eq!(figures.start_time_seconds, Some(42.0));
    }

    #[test]
    fn limits_and_boot_time_parse() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \nMax open files            1024                 524288               files     \n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn histogram_counts_each_duration_in_one_bucket() {
        let histogram = DurationHistogram::new(&[0.1, 1.0]);
        histogram.observe(Duration::from_millis(50));
        histogram.observe(Duration::from_millis(100));
        histogram.observe(Duration::from_millis(500));
        histogram.observe(Duration::from_secs(5));
        let mut registry = Registry::default();
        registry.register("wait_seconds", "A wait", histogram.clone());
        let text = expose(&registry, None).expect("encodes").body;
        assert!(
            text.contains("wait_seconds_bucket{le=\"0.1\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("wait_seconds_bucket{le=\"1\"} 3\n"), "{text}");
        assert!(
            text.contains("wait_seconds_bucket{le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("wait_seconds_count 4\n"), "{text}");
        assert!(text.contains("wait_seconds_sum 5.65\n"), "{text}");
        assert_eq!(histogram.count(), 4);
    }

    #[test]
    fn the_process_figures_are_read_on_linux() {
        if cfg!(target_os = "linux") {
            let figures = ProcessFigures::read().expect("/proc/self is there");
            assert!(figures.resident_bytes > 0);
            assert!(figures.open_fds > 0);
            assert!(figures.start_time_seconds.is_some_and(|t| t > 1.0e9));
        }
    }
}
