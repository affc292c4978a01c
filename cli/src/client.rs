//! Finding the controller and talking to its REST API.
//!
//! The URLs and the token come from flags, files or `HOBOTNICA_*` variables, else
//! from the data directory of a local `hobot up` (`controller.json` and
//! `admin-token`). Every non-2xx answer becomes an [`ApiError`] built from
//! the problem+json body; a connection failure becomes an [`Unreachable`]
//! that says which URL and how to start a controller.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use hobotnica_common::private_fs::{Secret, read_secret_file};

use crate::config::GlobalArgs;

/// REST URL tried when nothing else names one (the controller's default).
const DEFAULT_URL: &str = "http://127.0.0.1:8080";
/// gRPC URL tried when nothing else names one (the controller's default).
const DEFAULT_GRPC_URL: &str = "http://127.0.0.1:8081";
/// File the controller writes into its data directory when it serves.
const CONTROLLER_FILE: &str = "controller.json";
/// File holding the admin token in the data directory.
const ADMIN_TOKEN_FILE: &str = "admin-token";

/// How to reach one controller.
#[derive(Clone, Debug)]
pub struct Connection {
    pub url: String,
    pub grpc_url: String,
    pub token: Option<Secret>,
    /// Where `token` came from, for error messages.
    pub token_source: String,
    /// Where `url` came from, for error messages.
    pub source: String,
    /// Where `grpc_url` came from, for error messages.
    pub grpc_source: String,
    /// PEM CA certificate(s) from `--ca-cert`; `None`: the system's roots.
    pub ca_cert: Option<Vec<u8>>,
    /// HTTP/2 ping interval of log tails (`--keepalive`).
    pub keepalive: std::time::Duration,
}

#[derive(Deserialize)]
struct ControllerFile {
    url: String,
    grpc_url: String,
}

impl Connection {
    /// Flags and env first, then `<data-dir>/controller.json` and
    /// `<data-dir>/admin-token`, then the controller's default addresses.
    pub fn discover(global: &GlobalArgs) -> anyhow::Result<Connection> {
        let file_path = global.data_dir.join(CONTROLLER_FILE);
        let from_file = read_controller_file(&file_path)?;
        // No flag and no `hobot up` here: say so, or a user in the wrong
        // directory only learns that a token is missing.
        let default = || {
            format!(
                "the default address: no {} here; run hobot where `hobot up` runs, or give \
                 --data-dir, or --url and --token-file",
                file_path.display()
            )
        };
        let source = match (&global.url, &from_file) {
            (Some(_), _) => "--url / HOBOTNICA_URL".to_owned(),
            (None, Some(_)) => file_path.display().to_string(),
            (None, None) => default(),
        };
        let grpc_source = match (&global.grpc_url, &from_file) {
            (Some(_), _) => "--grpc-url / HOBOTNICA_GRPC_URL".to_owned(),
            (None, Some(_)) => file_path.display().to_string(),
            (None, None) => default(),
        };
        let url = global
            .url
            .clone()
            .or_else(|| from_file.as_ref().map(|file| file.url.clone()))
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let grpc_url = global
            .grpc_url
            .clone()
            .or_else(|| from_file.as_ref().map(|file| file.grpc_url.clone()))
            .unwrap_or_else(|| DEFAULT_GRPC_URL.to_owned());
        for (what, url, source) in [("REST", &url, &source), ("gRPC", &grpc_url, &grpc_source)] {
            hobotnica_common::transport::check_url(
                &format!("the {what} URL from {source}"),
                url,
                global.insecure,
            )
            .map_err(anyhow::Error::msg)?;
        }
        let ca_cert =
            match &global.ca_cert {
                Some(path) => Some(std::fs::read(path).with_context(|| {
                    format!("cannot read the --ca-cert file {}", path.display())
                })?),
                None => None,
            };
        let admin_token_file = global.data_dir.join(ADMIN_TOKEN_FILE);
        let (token, token_source) = match (&global.token, &global.token_file) {
            (Some(_), Some(_)) => anyhow::bail!(
                "give --token-file (HOBOTNICA_TOKEN_FILE) or --token (HOBOTNICA_TOKEN), not both"
            ),
            (Some(token), None) => (Some(token.clone()), "--token / HOBOTNICA_TOKEN".to_owned()),
            (None, Some(path)) => (
                Some(read_secret_file("--token-file", path)?),
                format!("--token-file {}", path.display()),
            ),
            (None, None) => (
                read_token_file(&admin_token_file)?.map(Secret::new),
                admin_token_file.display().to_string(),
            ),
        };
        Ok(Connection {
            url: url.trim_end_matches('/').to_owned(),
            grpc_url: grpc_url.trim_end_matches('/').to_owned(),
            token,
            token_source,
            source,
            grpc_source,
            ca_cert,
            keepalive: global.keepalive,
        })
    }
}

fn read_controller_file(path: &Path) -> anyhow::Result<Option<ControllerFile>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not valid", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn read_token_file(path: &PathBuf) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned()).filter(|token| !token.is_empty())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// An error answer of the API (problem+json, RFC 9457).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub title: String,
    pub detail: Option<String>,
    pub field_errors: Vec<(String, String)>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.title)?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        let detail = self.detail.as_deref().unwrap_or_default();
        for (field, message) in &self.field_errors {
            // Often the detail already says it.
            if !detail.contains(message.as_str()) {
                write!(f, "\n  {field}: {message}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    fn from_body(status: StatusCode, body: &[u8]) -> ApiError {
        let problem: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let text = |key: &str| problem.get(key).and_then(Value::as_str).map(str::to_owned);
        let title = text("title")
            .or_else(|| status.canonical_reason().map(str::to_owned))
            .unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
        let detail = text("detail").or_else(|| {
            // Not problem+json (a proxy's page, say): show a short excerpt.
            let body = String::from_utf8_lossy(body);
            let body = body.trim();
            (!body.is_empty() && problem.is_null())
                .then(|| body.chars().take(200).collect::<String>())
        });
        let field_errors = problem
            .get("errors")
            .and_then(Value::as_array)
            .map(|errors| {
                errors
                    .iter()
                    .filter_map(|error| {
                        Some((
                            error.get("field")?.as_str()?.to_owned(),
                            error.get("message")?.as_str()?.to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        ApiError {
            status,
            title,
            detail,
            field_errors,
        }
    }
}

/// The controller could not be reached at all.
#[derive(Debug)]
pub struct Unreachable {
    pub url: String,
    pub source_hint: String,
    /// The option that names this URL: `--url / HOBOTNICA_URL` (REST) or
    /// `--grpc-url / HOBOTNICA_GRPC_URL` (log tails).
    pub option: &'static str,
    pub cause: String,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cannot reach the controller at {} (from {}): {}",
            self.url, self.source_hint, self.cause
        )?;
        if self.cause.contains("certificate") {
            f.write_str(
                "hint: the controller's TLS certificate was not accepted; give the CA \
                 that issued it with --ca-cert / HOBOTNICA_CA_CERT",
            )
        } else {
            write!(
                f,
                "hint: start one with `hobot up`, or point {} (and --token-file / \
                 HOBOTNICA_TOKEN) at a running controller",
                self.option
            )
        }
    }
}

impl std::error::Error for Unreachable {}

/// The innermost cause of an error, which for reqwest is the useful part
/// ("Connection refused").
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// Longest silence of a controller in the middle of an answer (or before
/// it).
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What a 401 says: the controller's detail, which token was sent where,
/// and where a local controller keeps its admin token. `hobot` sends only
/// admin tokens (no `X-GitHub-Username`), so nothing here is about GitHub.
fn unauthorized_detail(connection: &Connection, detail: Option<String>) -> String {
    if connection.token.is_none() {
        let hint = format!(
            "no token was given: pass --token-file or set HOBOTNICA_TOKEN (the controller is {} \
             from {})",
            connection.url, connection.source
        );
        return match detail {
            Some(detail) => format!("{detail} ({hint})"),
            None => hint,
        };
    }
    let sent = format!(
        "the token from {}, sent to {}",
        connection.token_source, connection.url
    );
    let local = "A `hobot up` controller keeps its admin token in .hobotnica/admin-token; hobot \
                 reads it by itself when run in that directory without --token.";
    match detail {
        Some(detail) => format!("{detail} ({sent}). {local}"),
        None => format!("{sent}, was refused. {local}"),
    }
}

/// A REST client bound to one controller.
pub struct Client {
    http: reqwest::Client,
    pub connection: Connection,
}

impl Client {
    pub fn new(connection: Connection) -> anyhow::Result<Client> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("hobot/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            // A controller that accepted the connection and then says
            // nothing (hung, or its host vanished) must not hang hobot.
            .read_timeout(READ_TIMEOUT);
        if let Some(pem) = &connection.ca_cert {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .ok()
                .filter(|certs| !certs.is_empty())
                .context("the --ca-cert file holds no PEM certificate")?;
            builder = builder.tls_certs_only(certs);
        }
        let http = builder.build().context("cannot build the HTTP client")?;
        Ok(Client { http, connection })
    }

    /// Sends a request and returns the raw successful response.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<reqwest::Response> {
        self.send_with_headers(method, path_and_query, body, &[])
            .await
    }

    /// [`Client::send`] with extra request headers.
    pub async fn send_with_headers(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path_and_query}", self.connection.url);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.connection.token {
            request = request.bearer_auth(token.expose());
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|err| {
            if err.is_connect() || err.is_timeout() {
                let cause = if err.is_timeout() && !err.is_connect() {
                    format!("no answer within {}s", READ_TIMEOUT.as_secs())
                } else {
                    root_cause(&err)
                };
                anyhow::Error::new(Unreachable {
                    url: self.connection.url.clone(),
                    source_hint: self.connection.source.clone(),
                    option: "--url / HOBOTNICA_URL",
                    cause,
                })
            } else {
                anyhow::Error::new(err).context(format!("request to {url} failed"))
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        let mut error = ApiError::from_body(status, &body);
        if status == StatusCode::UNAUTHORIZED {
            error.detail = Some(unauthorized_detail(&self.connection, error.detail.take()));
        }
        Err(error.into())
    }

    /// Sends a request and returns the JSON body (`null` for 204).
    pub async fn json(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let response = self.send(method, path_and_query, body).await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let bytes = response
            .bytes()
            .await
            .context("the controller's answer was cut off")?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).context("the controller's answer is not JSON")
    }

    pub async fn get(&self, path_and_query: &str) -> anyhow::Result<Value> {
        self.json(Method::GET, path_and_query, None).await
    }
}

/// Converts an API JSON value into a typed view.
pub fn typed<T: DeserializeOwned>(value: &Value) -> anyhow::Result<T> {
    T::deserialize(value).context("unexpected answer from the controller")
}

/// Percent-encodes a query-string value.
pub fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `NAME` means `local/NAME`; `OWNER/NAME` is taken as is.
pub fn repo_path(repo: &str) -> anyhow::Result<(String, String)> {
    let (owner, name) = match repo.split_once('/') {
        Some((owner, name)) => (owner, name),
        None => ("local", repo),
    };
    anyhow::ensure!(
        !owner.is_empty() && !name.is_empty() && !name.contains('/'),
        "repository {repo:?} must be NAME or OWNER/NAME"
    );
    Ok((encode_query(owner), encode_query(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_file_must_be_private() {
        use clap::Parser as _;
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("token");
        std::fs::write(&file, "hbad_fromfile\n").expect("write");
        let path = file.to_str().expect("utf-8");
        let discover = |args: &[&str]| {
            let mut all = vec!["hobot", "--data-dir", dir.path().to_str().expect("utf-8")];
            all.extend_from_slice(args);
            let cli = crate::config::Cli::try_parse_from(all).expect("parses");
            Connection::discover(&cli.global).map_err(|error| format!("{error:#}"))
        };
        let chmod = |mode| {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };

        chmod(0o600);
        let connection = discover(&["--token-file", path, "jobs", "ls"]).expect("read");
        assert_eq!(
            connection.token.as_ref().map(Secret::expose),
            Some("hbad_fromfile")
        );
        let message =
            discover(&["--token-file", path, "--token", "hbad_x", "jobs", "ls"]).expect_err("both");
        assert!(message.contains("not both"), "{message}");

        chmod(0o644);
        let message = discover(&["--token-file", path, "jobs", "ls"]).expect_err("refused");
        assert!(
            message.contains("0644") && message.contains(&format!("chmod 600 {path}")),
            "{message}"
        );
        assert!(!message.contains("hbad_fromfile"), "{message}");
    }

    #[test]
    fn repo_names() {
        assert_eq!(
            repo_path("demo").ok(),
            Some(("local".to_owned(), "demo".to_owned()))
        );
        assert_eq!(
            repo_path("octo/demo").ok(),
            Some(("octo".to_owned(), "demo".to_owned()))
        );
        assert!(repo_path("a/b/c").is_err());
        assert!(repo_path("/b").is_err());
    }

    #[test]
    fn problems_are_printed_with_title_and_detail() {
        let body = br#"{"type":"about:blank","title":"Unprocessable Entity","status":422,
            "detail":"commit: invalid","errors":[{"field":"commit","message":"must be 40 hex"}]}"#;
        let error = ApiError::from_body(StatusCode::UNPROCESSABLE_ENTITY, body);
        assert_eq!(
            error.to_string(),
            "Unprocessable Entity: commit: invalid\n  commit: must be 40 hex"
        );
        let body = br#"{"title":"Unprocessable Entity","status":422,
            "detail":"commit: must be 40 hex","errors":[{"field":"commit","message":"must be 40 hex"}]}"#;
        let error = ApiError::from_body(StatusCode::UNPROCESSABLE_ENTITY, body);
        assert_eq!(
            error.to_string(),
            "Unprocessable Entity: commit: must be 40 hex"
        );
        let error = ApiError::from_body(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert_eq!(error.to_string(), "Bad Gateway: <html>bad gateway</html>");
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode_query("local/demo"), "local%2Fdemo");
        assert_eq!(encode_query("a b&c"), "a%20b%26c");
    }
}
