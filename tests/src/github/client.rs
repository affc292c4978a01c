//! A REST client of a controller that authenticates as a GitHub user:
//! `Authorization: Bearer <github token>` and `X-GitHub-Username: <login>`.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::api::RawResponse;

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A controller's REST API as a GitHub user.
#[derive(Clone)]
pub struct GitHubUser {
    pub base: String,
    pub login: String,
    token: String,
    http: reqwest::Client,
}

impl GitHubUser {
    /// `base` is the controller's URL (`http://127.0.0.1:P`).
    pub fn new(base: impl Into<String>, login: &str, token: &str) -> GitHubUser {
        crate::init();
        GitHubUser {
            base: base.into(),
            login: login.to_owned(),
            token: token.to_owned(),
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .expect("reqwest client"),
        }
    }

    /// The same token presented under another username.
    pub fn with_login(&self, login: &str) -> GitHubUser {
        GitHubUser {
            login: login.to_owned(),
            ..self.clone()
        }
    }

    /// Sends a request with an optional JSON body; any answer comes back.
    ///
    /// # Panics
    /// When the request cannot be sent.
    pub async fn raw(&self, method: Method, path: &str, body: Option<&Value>) -> RawResponse {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("x-github-username", &self.login);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|err| panic!("{method} {path}: {err}"));
        RawResponse::read(response, &format!("{method} {path}")).await
    }

    /// `POST /api/v1/repos {"owner", "name", "branch": "main", ...extra}`.
    pub async fn register(&self, repo: &str, extra: Value) -> RawResponse {
        let (owner, name) = repo.split_once('/').expect("owner/name");
        let mut body = json!({ "owner": owner, "name": name, "branch": "main" });
        if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
            body.extend(extra);
        }
        self.raw(Method::POST, "/api/v1/repos", Some(&body)).await
    }
}
