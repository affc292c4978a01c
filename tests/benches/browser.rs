//! The web dashboard's figures in a real Chromium (no assertions; one
//! printed line per figure), against a real controller and agent:
//!
//! - the job page's weight: its HTML, JavaScript and CSS, in bytes;
//! - time to the first log line: opening a running job's page until its
//!   first log line is shown, and a new line's trip from the job to the
//!   open page;
//! - while a 50 MiB log streams into an open job page: Chromium's resident
//!   memory (its largest renderer, and the sum over its processes from
//!   `/proc`), its CPU time (user + system of its processes, from
//!   `/proc/<pid>/stat`) over the stream, and the page's JavaScript heap
//!   (DevTools `Performance.getMetrics` through chromedriver).
//!
//! `cargo build --release --workspace --bins && cargo bench -p hobotnica-tests --bench browser`
//! needs Debian's `chromium` and `chromium-driver` and axe-core's folder as
//! the browser tests do (`./scripts/setup --tests`); without them it says
//! "skipped" and measures nothing.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use hobotnica_tests::JobState;
use hobotnica_tests::browser::{Browser, Setup, Site};
use hobotnica_tests::git::{BIG_OUTPUT_LINES, big_output_line};
use serde_json::json;

/// Deadline for one job, and for the 50 MiB log to reach the page.
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// The page's own bytes as the browser decoded them (the navigation and
/// each resource from the Resource Timing API): HTML, JS, CSS.
async fn page_weight(browser: &Browser) -> (u64, u64, u64) {
    let weights = browser
        .script(
            "const nav = performance.getEntriesByType('navigation')[0];
             const sum = ext => performance.getEntriesByType('resource')
               .filter(r => new URL(r.name).pathname.endsWith(ext))
               .reduce((total, r) => total + r.decodedBodySize, 0);
             return [nav ? nav.decodedBodySize : 0, sum('.js'), sum('.css')];",
        )
        .await;
    let at = |index: usize| weights[index].as_u64().unwrap_or(0);
    (at(0), at(1), at(2))
}

async fn run(site: Site) {
    let (browser, api) = (&site.browser, site.api());
    site.sign_in_as_admin().await;

    // A running job: its page's weight and its first line.
    // Where the job's sandbox can see it.
    let gate_dir = hobotnica_tests::shared_dir().join(hobotnica_tests::unique("browser-bench"));
    std::fs::create_dir_all(&gate_dir).unwrap();
    let gate = gate_dir.join("gate");
    let job = site.job_waiting_at("local/demo", &gate).await;
    // A first visit fills the cache; the second is what is measured.
    site.open(&format!("/jobs/{}", job.id)).await;
    site.open("/repos").await;
    let opened = Instant::now();
    site.open(&format!("/jobs/{}", job.id)).await;
    hobotnica_tests::wait_until(JOB_TIMEOUT, "the first log line", || async {
        browser
            .script("return !!document.querySelector('#log .line');")
            .await
            == json!(true)
    })
    .await;
    let first_line = opened.elapsed();
    // The page's own clock: from the navigation's start to the line being
    // in the page, with the harness's round trips left out.
    let in_page = browser
        .script("return performance.now();")
        .await
        .as_f64()
        .unwrap_or(0.0);
    let (html, js, css) = page_weight(browser).await;
    println!(
        "job page weight: {} bytes ({html} HTML + {js} JavaScript + {css} CSS, uncompressed)",
        html + js + css
    );
    println!(
        "time to the first log line of a running job: {} ms from asking for the page \
         (the page had been open {in_page:.0} ms when it was seen)",
        first_line.as_millis()
    );
    let asked = Instant::now();
    std::fs::write(&gate, b"").unwrap();
    hobotnica_tests::wait_until(JOB_TIMEOUT, "the new line in the page", || async {
        browser
            .script("return document.querySelector('#log').textContent.includes('gate opened');")
            .await
            == json!(true)
    })
    .await;
    println!(
        "a new log line from the job to the open page: {} ms",
        asked.elapsed().as_millis()
    );
    api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let _ = std::fs::remove_dir_all(&gate_dir);

    // A 50 MiB log streaming into an open page.
    let job = api.run_target("local/demo", "big").await;
    api.wait_for_state(job.id, &[JobState::Running], JOB_TIMEOUT)
        .await;
    site.open(&format!("/jobs/{}", job.id)).await;
    let cpu_before = browser.cpu_time();
    let started = Instant::now();
    let peak = std::cell::Cell::new(browser.memory());
    let last_line = big_output_line(BIG_OUTPUT_LINES);
    let last_line = last_line.trim_end();
    hobotnica_tests::wait_until(JOB_TIMEOUT, "the whole log shown", || {
        peak.set(peak.get().max(browser.memory()));
        async move { browser.last_log_line().await == last_line }
    })
    .await;
    let streamed = started.elapsed();
    let cpu = browser.cpu_time().saturating_sub(cpu_before);
    let peak = peak.get();
    println!(
        "a 50 MiB log streamed into the open page in {} ms",
        streamed.as_millis()
    );
    println!(
        "chromium while it streamed: renderer RSS at most {}, all its processes' RSS at most {} \
         (shared pages counted in each)",
        mib(peak.largest_renderer_bytes),
        mib(peak.total_bytes)
    );
    println!(
        "chromium's CPU time over the stream: {} ms user+system ({:.0}% of one core)",
        cpu.as_millis(),
        cpu.as_secs_f64() * 100.0 / streamed.as_secs_f64().max(0.001)
    );
    match browser.devtools_metrics().await {
        Some(metrics) => {
            let metric = |name: &str| {
                metrics
                    .iter()
                    .find(|(key, _)| key == name)
                    .map_or(0.0, |(_, value)| *value)
            };
            println!(
                "the page's JavaScript heap after the stream: {} used of {} (DevTools); \
                 {} DOM nodes",
                mib(metric("JSHeapUsedSize") as u64),
                mib(metric("JSHeapTotalSize") as u64),
                metric("Nodes")
            );
        }
        None => {
            println!("the page's JavaScript heap: not reachable (DevTools metrics unavailable)")
        }
    }
    let ran = api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let at = |time: Option<&str>| time.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
    if let (Some(from), Some(to)) = (
        at(ran.started_at.as_deref()),
        at(ran.finished_at.as_deref()),
    ) {
        println!(
            "the job itself ran {} ms (the page kept up when the two are close)",
            (to - from).num_milliseconds()
        );
    }

    // The same log, finished, opened afresh: the controller finds where
    // its last part starts (reading the log once), the page shows it.
    let opened = Instant::now();
    site.open(&format!("/jobs/{}", job.id)).await;
    browser.wait_for_log_line(last_line).await;
    println!(
        "opening the page of the finished 50 MiB log, to its last line shown: {} ms",
        opened.elapsed().as_millis()
    );
    site.close().await;
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs nothing.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    // `cargo bench -p hobotnica-tests -- NAME` runs this one only when
    // NAME is part of "browser".
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    if !filters.is_empty() && !filters.iter().any(|f| "browser".contains(f.as_str())) {
        return;
    }
    hobotnica_tests::init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let Some(site) = Setup::new().agent().repo("demo").start().await else {
            println!("SKIPPED: the browser benchmark needs Chromium (see the line above)");
            return;
        };
        run(site).await;
    });
}
