//! Prometheus's own tools against our `/metrics`: `promtool check metrics`
//! on a scrape, and a real Prometheus server (Debian's `prometheus`
//! package, installed by `scripts/setup --tests`) scraping test processes
//! on loopback, asked through its HTTP query API.
//!
//! Where the tools are missing, [`tools`] prints "skipped: why" and
//! returns `None`, except under `CI`, where that is a failure.

use std::ffi::OsString;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::daemon::{Daemon, Spec};
use crate::net::free_addr;
use crate::wait::wait_for;

/// How long Prometheus may take to answer `/-/ready`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where `promtool` and `prometheus` are.
#[derive(Clone, Debug)]
pub struct Tools {
    pub promtool: PathBuf,
    pub prometheus: PathBuf,
}

/// `promtool` and `prometheus` from PATH, or `None` (after "skipped: why")
/// where they are not installed.
///
/// # Panics
/// Under `CI`, when they are missing.
pub fn tools() -> Option<Tools> {
    let find = |name: &str| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
    };
    match (find("promtool"), find("prometheus")) {
        (Some(promtool), Some(prometheus)) => Some(Tools {
            promtool,
            prometheus,
        }),
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "the metrics tests must run in CI, but promtool or prometheus is missing (scripts/setup --tests installs them)"
            )
        }
        _ => {
            eprintln!(
                "skipped: metrics test: promtool or prometheus is missing (scripts/setup --tests installs Debian's prometheus)"
            );
            None
        }
    }
}

impl Tools {
    /// `promtool check metrics` on `exposition` (the Prometheus text
    /// format); its complaints when it fails.
    pub fn check_metrics(&self, exposition: &str) -> Result<(), String> {
        let mut child = Command::new(&self.promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool");
        child
            .stdin
            .take()
            .expect("promtool's stdin")
            .write_all(exposition.as_bytes())
            .expect("write to promtool");
        let output = child.wait_with_output().expect("promtool's answer");
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "promtool check metrics failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }
}

/// A Prometheus server on a free loopback port, with its data in a temp
/// dir, scraping `targets` every 250 ms.
pub struct PrometheusServer {
    pub addr: SocketAddr,
    http: reqwest::Client,
    daemon: Daemon,
    _dir: TempDir,
}

impl PrometheusServer {
    /// Starts it and waits until it is ready.
    pub async fn start(tools: &Tools, targets: &[SocketAddr]) -> PrometheusServer {
        let dir = tempfile::Builder::new()
            .prefix("hobotnica-prometheus-")
            .tempdir()
            .expect("temp dir");
        let addr = free_addr();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\n\
             scrape_configs:\n  - job_name: hobotnica\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let args: Vec<OsString> = vec![
            format!("--config.file={}", config_file.display()).into(),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()).into(),
            format!("--web.listen-address={addr}").into(),
            "--log.level=warn".into(),
        ];
        let spec = Spec {
            name: "prometheus".to_owned(),
            program: tools.prometheus.clone(),
            args,
            env: Vec::new(),
            cwd: Some(dir.path().to_path_buf()),
            log_dir: dir.path().to_path_buf(),
        };
        let mut server = PrometheusServer {
            addr,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("reqwest client"),
            daemon: Daemon::spawn(spec),
            _dir: dir,
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&mut self) {
        let url = format!("http://{}/-/ready", self.addr);
        let http = self.http.clone();
        wait_for(START_TIMEOUT, "Prometheus to be ready", || {
            let exited = self.daemon.try_exit();
            let request = http.get(&url).send();
            async move {
                if let Some(status) = exited {
                    panic!("prometheus exited ({status}) before it was ready");
                }
                request
                    .await
                    .ok()
                    .filter(|response| response.status().is_success())
                    .map(drop)
            }
        })
        .await;
    }

    /// `/api/v1/query` asking `promql` (percent-encoded).
    fn query_url(&self, promql: &str) -> String {
        let encoded: String = promql
            .bytes()
            .map(|byte| match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    char::from(byte).to_string()
                }
                _ => format!("%{byte:02X}"),
            })
            .collect();
        format!("http://{}/api/v1/query?query={encoded}", self.addr)
    }

    /// The value of an instant PromQL query whose answer is one sample;
    /// `None` while it has none (nothing scraped yet).
    pub async fn query_scalar(&self, promql: &str) -> Option<f64> {
        let answer: serde_json::Value = self
            .http
            .get(self.query_url(promql))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let result = answer["data"]["result"].as_array()?;
        let [sample] = result.as_slice() else {
            return None;
        };
        sample["value"][1].as_str()?.parse().ok()
    }

    /// `up` of each target, by instance, as Prometheus saw it last.
    pub async fn targets_up(&self) -> Vec<(String, f64)> {
        let answer: Option<serde_json::Value> = async {
            self.http
                .get(self.query_url("up"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()
        }
        .await;
        answer
            .as_ref()
            .and_then(|answer| answer["data"]["result"].as_array())
            .map(|samples| {
                samples
                    .iter()
                    .filter_map(|sample| {
                        Some((
                            sample["metric"]["instance"].as_str()?.to_owned(),
                            sample["value"][1].as_str()?.parse().ok()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Its stdout and stderr so far.
    pub fn output(&self) -> String {
        self.daemon.output()
    }
}
