//! A REST client for tests: raw requests for checking error answers, and
//! typed helpers for the usual steps (register a repository, run a job, read
//! its log, wait for a state).

use std::time::Duration;

use chrono::{DateTime, Utc};
use hobotnica_common::job::JobState;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::output::{OutputFilter, make_output};
use crate::wait::wait_for;

/// A job as `GET /api/v1/jobs/{id}` shows it.
#[derive(Clone, Debug, Deserialize)]
pub struct Job {
    pub id: u64,
    pub repo: String,
    pub kind: String,
    pub target: String,
    pub state: JobState,
    pub commit: String,
    #[serde(default)]
    pub branch: Option<String>,
    pub trigger: String,
    pub attempt: u32,
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub message: Option<String>,
    pub created_at: String,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
    /// Where the job's time went; `None` until an agent that reports
    /// phases completed it.
    #[serde(default)]
    pub timings: Option<JobTimings>,
}

/// A job's `timings`: one reading per phase, in the order they happen.
#[derive(Clone, Debug, Deserialize)]
pub struct JobTimings {
    pub accepted_at: DateTime<Utc>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub assignment_sent_at: Option<DateTime<Utc>>,
    pub received_at: Option<DateTime<Utc>>,
    pub fetched_at: Option<DateTime<Utc>>,
    pub fetch_ran: Option<bool>,
    pub work_tree_ready_at: Option<DateTime<Utc>>,
    pub sandbox_ready_at: Option<DateTime<Utc>>,
    pub make_spawned_at: Option<DateTime<Utc>>,
    pub make_exited_at: Option<DateTime<Utc>>,
    pub log_acked_at: Option<DateTime<Utc>>,
    pub completion_sent_at: Option<DateTime<Utc>>,
    pub recorded_at: Option<DateTime<Utc>>,
}

impl JobTimings {
    /// Every reading, named, in the order the phases happen (`None` where
    /// the job has none).
    pub fn phases(&self) -> [(&'static str, Option<DateTime<Utc>>); 12] {
        [
            ("accepted", Some(self.accepted_at)),
            ("assigned", self.assigned_at),
            ("sent", self.assignment_sent_at),
            ("received", self.received_at),
            ("fetched", self.fetched_at),
            ("work tree", self.work_tree_ready_at),
            ("sandbox", self.sandbox_ready_at),
            ("spawned", self.make_spawned_at),
            ("exited", self.make_exited_at),
            ("last byte acked", self.log_acked_at),
            ("completion sent", self.completion_sent_at),
            ("recorded", self.recorded_at),
        ]
    }
}

/// Any answer, whole.
#[derive(Clone, Debug)]
pub struct RawResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub location: Option<String>,
    /// Every header, names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Reads a whole answer (`what` names the request in panics).
    ///
    /// # Panics
    /// When the body cannot be read.
    pub async fn read(response: reqwest::Response, what: &str) -> RawResponse {
        RawResponse::try_read(response)
            .await
            .unwrap_or_else(|err| panic!("{what}: reading the answer: {err}"))
    }

    /// Reads a whole answer; a body cut short is an `Err`.
    pub async fn try_read(response: reqwest::Response) -> Result<RawResponse, reqwest::Error> {
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let status = response.status().as_u16();
        let content_type = header("content-type");
        let location = header("location");
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = response.bytes().await?.to_vec();
        Ok(RawResponse {
            status,
            content_type,
            location,
            headers,
            body,
        })
    }

    /// A header's value (`name` in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body as JSON.
    ///
    /// # Panics
    /// When it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "answer ({}) is not JSON: {err}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts a problem+json answer with `status`, and returns its body.
    pub fn assert_problem(&self, status: u16) -> Value {
        assert_eq!(
            self.status,
            status,
            "expected status {status}, got {}: {}",
            self.status,
            self.text()
        );
        assert!(
            self.content_type
                .as_deref()
                .is_some_and(|ct| ct.starts_with("application/problem+json")),
            "content type of a {status} answer is {:?}, not application/problem+json: {}",
            self.content_type,
            self.text()
        );
        let problem = self.json();
        assert_eq!(
            problem["status"].as_u64(),
            Some(u64::from(status)),
            "problem status: {problem}"
        );
        assert!(
            problem["title"].as_str().is_some_and(|t| !t.is_empty()),
            "problem without a title: {problem}"
        );
        problem
    }
}

/// A REST client of one controller.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one [`Api::try_raw`] may take before it counts as unanswered.
const TRY_TIMEOUT: Duration = Duration::from_secs(20);

impl Api {
    /// A client sending `Authorization: Bearer <token>`.
    pub fn new(base: impl Into<String>, token: Option<&str>) -> Api {
        Api::with_ca(base, token, None)
    }

    /// Like [`Api::new`], trusting only the CA in `ca_pem` for `https://`
    /// when given.
    pub fn with_ca(base: impl Into<String>, token: Option<&str>, ca_pem: Option<&[u8]>) -> Api {
        crate::init();
        let mut http = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
        if let Some(pem) = ca_pem {
            http = http.tls_certs_only([reqwest::Certificate::from_pem(pem).expect("CA PEM")]);
        }
        let http = http.build().expect("reqwest client");
        Api {
            base: base.into(),
            token: token.map(str::to_owned),
            http,
        }
    }

    /// The same controller with another token (or none).
    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api {
            base: self.base.clone(),
            token: token.map(str::to_owned),
            http: self.http.clone(),
        }
    }

    /// Sends a request with an optional raw body (sent as
    /// `application/json`), returning whatever comes back.
    pub async fn raw(&self, method: Method, path: &str, body: Option<&[u8]>) -> RawResponse {
        self.raw_with_headers(method, path, body, &[]).await
    }

    /// Like [`Api::raw`], with more request headers.
    pub async fn raw_with_headers(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> RawResponse {
        let response = self
            .request(method.clone(), path, body, headers)
            .send()
            .await
            .unwrap_or_else(|err| panic!("{method} {path}: {err}"));
        RawResponse::read(response, &format!("{method} {path}")).await
    }

    /// Like [`Api::raw_with_headers`], but a controller that cannot be
    /// reached, or dies before it has answered, is an `Err`, not a panic.
    pub async fn try_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<RawResponse, reqwest::Error> {
        let response = self
            .request(method, path, body, headers)
            .timeout(TRY_TIMEOUT)
            .send()
            .await?;
        RawResponse::try_read(response).await
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_vec());
        }
        request
    }

    /// Sends JSON and returns the raw answer.
    pub async fn send_json(&self, method: Method, path: &str, body: &Value) -> RawResponse {
        self.raw(method, path, Some(body.to_string().as_bytes()))
            .await
    }

    /// `GET path`, asserting a 2xx JSON answer.
    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.raw(Method::GET, path, None).await;
        assert!(
            (200..300).contains(&response.status),
            "GET {path}: {} {}",
            response.status,
            response.text()
        );
        response.json()
    }

    /// Registers `local/<name>` cloned from `git_url`.
    pub async fn register_repo(&self, name: &str, git_url: &str) -> Value {
        self.register_repo_with(json!({ "name": name, "git_url": git_url }))
            .await
    }

    /// `POST /api/v1/repos` with `body`, asserting 201.
    pub async fn register_repo_with(&self, body: Value) -> Value {
        let response = self.send_json(Method::POST, "/api/v1/repos", &body).await;
        assert_eq!(
            response.status,
            201,
            "registering {body}: {}",
            response.text()
        );
        response.json()
    }

    /// `POST /api/v1/repos/{repo}/jobs` with `body`, asserting 202 and a
    /// `Location` naming the job.
    pub async fn run_job(&self, repo: &str, body: Value) -> Job {
        let response = self
            .send_json(Method::POST, &format!("/api/v1/repos/{repo}/jobs"), &body)
            .await;
        assert_eq!(
            response.status,
            202,
            "running {body} on {repo}: {}",
            response.text()
        );
        let job: Job = serde_json::from_value(response.json()).expect("a job");
        assert_eq!(
            response.location.as_deref(),
            Some(format!("/api/v1/jobs/{}", job.id).as_str()),
            "Location of job {}",
            job.id
        );
        job
    }

    /// `POST /api/v1/repos/{repo}/deploy` with `body` and, when given, an
    /// `Idempotency-Key`; the raw answer.
    pub async fn deploy_raw(&self, repo: &str, body: &Value, key: Option<&str>) -> RawResponse {
        let headers: Vec<(&str, &str)> = key
            .map(|key| ("idempotency-key", key))
            .into_iter()
            .collect();
        self.raw_with_headers(
            Method::POST,
            &format!("/api/v1/repos/{repo}/deploy"),
            Some(body.to_string().as_bytes()),
            &headers,
        )
        .await
    }

    /// `POST /api/v1/repos/{repo}/deploy` with `body`, asserting 202 and a
    /// `Location` naming the job.
    pub async fn deploy(&self, repo: &str, body: Value) -> Job {
        let response = self.deploy_raw(repo, &body, None).await;
        assert_eq!(
            response.status,
            202,
            "deploying {body} on {repo}: {}",
            response.text()
        );
        let job: Job = serde_json::from_value(response.json()).expect("a job");
        assert_eq!(
            response.location.as_deref(),
            Some(format!("/api/v1/jobs/{}", job.id).as_str()),
            "Location of deploy {}",
            job.id
        );
        job
    }

    /// `POST /api/v1/jobs/{id}/retry`, asserting 202; the new job.
    pub async fn retry(&self, id: u64) -> Job {
        let response = self
            .raw(Method::POST, &format!("/api/v1/jobs/{id}/retry"), None)
            .await;
        assert_eq!(
            response.status,
            202,
            "retrying job {id}: {}",
            response.text()
        );
        let job: Job = serde_json::from_value(response.json()).expect("a job");
        assert_eq!(
            response.location.as_deref(),
            Some(format!("/api/v1/jobs/{}", job.id).as_str()),
            "Location of retry {}",
            job.id
        );
        job
    }

    /// `PUT /api/v1/repos/{repo}/env/{key}` with `body`; the raw answer
    /// (`key` is put in the path as given).
    pub async fn put_env(&self, repo: &str, key: &str, body: &Value) -> RawResponse {
        self.send_json(
            Method::PUT,
            &format!("/api/v1/repos/{repo}/env/{key}"),
            body,
        )
        .await
    }

    /// Sets a repository variable, asserting 200.
    pub async fn set_env(&self, repo: &str, key: &str, value: &str, scope: &str, secret: bool) {
        let body = json!({ "value": value, "scope": scope, "secret": secret });
        let response = self.put_env(repo, key, &body).await;
        assert_eq!(
            response.status,
            200,
            "setting {key} ({scope}) on {repo}: {}",
            response.text()
        );
    }

    /// `GET /api/v1/repos/{repo}/env` items.
    pub async fn env(&self, repo: &str) -> Vec<Value> {
        let list = self.get_json(&format!("/api/v1/repos/{repo}/env")).await;
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// Runs `target` at the repository's default branch.
    pub async fn run_target(&self, repo: &str, target: &str) -> Job {
        self.run_job(repo, json!({ "target": target })).await
    }

    /// `GET /api/v1/jobs/{id}`.
    pub async fn job(&self, id: u64) -> Job {
        serde_json::from_value(self.get_json(&format!("/api/v1/jobs/{id}")).await).expect("a job")
    }

    /// `POST /api/v1/jobs/{id}/cancel`, asserting 202.
    pub async fn cancel(&self, id: u64) -> Job {
        let response = self
            .raw(Method::POST, &format!("/api/v1/jobs/{id}/cancel"), None)
            .await;
        assert_eq!(
            response.status,
            202,
            "cancelling job {id}: {}",
            response.text()
        );
        serde_json::from_value(response.json()).expect("a job")
    }

    /// The job's whole log.
    pub async fn log(&self, id: u64) -> Vec<u8> {
        self.log_from(id, 0).await
    }

    /// The job's log from byte `offset`.
    pub async fn log_from(&self, id: u64, offset: u64) -> Vec<u8> {
        let path = format!("/api/v1/jobs/{id}/log?offset={offset}");
        let response = self.raw(Method::GET, &path, None).await;
        assert_eq!(response.status, 200, "GET {path}: {}", response.text());
        response.body
    }

    /// Make's output in the job's log (without Hobotnica's own lines).
    pub async fn output(&self, id: u64) -> String {
        String::from_utf8_lossy(&make_output(&self.log(id).await)).into_owned()
    }

    /// Length and hex SHA-256 of make's output in the job's log, streamed
    /// (not held in memory).
    pub async fn output_digest(&self, id: u64) -> (u64, String) {
        let mut request = self
            .http
            .get(format!("{}/api/v1/jobs/{id}/log", self.base))
            .timeout(Duration::from_secs(600));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let mut response = request.send().await.expect("GET log");
        assert_eq!(response.status().as_u16(), 200, "GET log of job {id}");
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        let mut filter = OutputFilter::default();
        let mut emit = |bytes: &[u8]| {
            len += bytes.len() as u64;
            hasher.update(bytes);
        };
        while let Some(chunk) = response.chunk().await.expect("log body") {
            filter.feed(&chunk, &mut emit);
        }
        filter.finish(&mut emit);
        (len, hex::encode(hasher.finalize()))
    }

    /// Waits until job `id` is in one of `states`, and returns it.
    ///
    /// # Panics
    /// After `timeout`, or as soon as the job ends in another state, showing
    /// the job and its log.
    pub async fn wait_for_state(&self, id: u64, states: &[JobState], timeout: Duration) -> Job {
        let what = format!("job {id} to become one of {states:?}");
        let job = wait_for(timeout, &what, || async move {
            let job = self.job(id).await;
            let done = states.contains(&job.state) || job.state.is_terminal();
            done.then_some(job)
        })
        .await;
        if !states.contains(&job.state) {
            let log = self.log(id).await;
            panic!(
                "job {id} ended {} while waiting for {states:?}: {job:#?}\n---- log ----\n{}",
                job.state,
                String::from_utf8_lossy(&log)
            );
        }
        job
    }

    /// Waits until job `id` has ended, and returns it.
    pub async fn wait_for_end(&self, id: u64, timeout: Duration) -> Job {
        let what = format!("job {id} to end");
        wait_for(timeout, &what, || async move {
            let job = self.job(id).await;
            job.state.is_terminal().then_some(job)
        })
        .await
    }

    /// Waits until job `id` has ended `succeeded`, and returns it.
    pub async fn wait_for_success(&self, id: u64, timeout: Duration) -> Job {
        self.wait_for_state(id, &[JobState::Succeeded], timeout)
            .await
    }

    /// Waits until the log of job `id` contains `needle`.
    pub async fn wait_for_log(&self, id: u64, needle: &str, timeout: Duration) {
        let what = format!("the log of job {id} to contain {needle:?}");
        crate::wait::wait_until(timeout, &what, || async move {
            String::from_utf8_lossy(&self.log(id).await).contains(needle)
        })
        .await;
    }

    /// `GET /api/v1/agents` items.
    pub async fn agents(&self) -> Vec<Value> {
        let list = self.get_json("/api/v1/agents").await;
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// `GET /api/v1/jobs?<query>` items (one page).
    pub async fn jobs(&self, query: &str) -> Vec<Job> {
        let list = self.get_json(&format!("/api/v1/jobs?{query}")).await;
        serde_json::from_value(list["items"].clone()).expect("a list of jobs")
    }

    /// Every job `GET /api/v1/jobs?<query>` lists, following `next_cursor`
    /// page by page (newest first).
    pub async fn all_jobs(&self, query: &str) -> Vec<Job> {
        let mut jobs = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page_query = match &cursor {
                Some(cursor) => format!("{query}&limit=200&cursor={cursor}"),
                None => format!("{query}&limit=200"),
            };
            let list = self.get_json(&format!("/api/v1/jobs?{page_query}")).await;
            let items: Vec<Job> =
                serde_json::from_value(list["items"].clone()).expect("a list of jobs");
            jobs.extend(items);
            match list["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return jobs,
            }
        }
    }
}

/// Sends one whole HTTP/1.1 request to `addr` and returns the connection
/// without reading the answer: drop it to hang up.
pub async fn send_without_reading(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        request.push_str("content-type: application/json\r\n");
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|err| panic!("connect to {addr}: {err}"));
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the head");
    stream.write_all(body).await.expect("send the body");
    stream.flush().await.expect("flush");
    stream
}
