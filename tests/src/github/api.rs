//! The REST API (`/api/v3`) and GraphQL endpoint of the fake GitHub, in
//! GitHub's shapes: the JSON objects carry the fields octocrab's models
//! require, answers carry GitHub's media-type and rate-limit headers, and
//! errors are GitHub's (`Bad credentials`, `Not Found`, `Validation Failed`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use super::{CommitStatus, Hook, Permission, RepoInfo, Shared, git_in, is_hex_sha};

/// REST documentation link in error answers.
const REST_DOCS: &str = "https://docs.github.com/rest";
/// GraphQL documentation link in error answers.
const GRAPHQL_DOCS: &str = "https://docs.github.com/graphql";
/// Requests per hour of an authenticated user.
const RATE_LIMIT_USER: u64 = 5000;
/// Requests per hour without a token.
const RATE_LIMIT_ANONYMOUS: u64 = 60;

/// Who calls.
enum Caller {
    Anonymous,
    User {
        login: String,
        id: u64,
        token: String,
    },
}

/// An answer before the headers are added.
struct Answer {
    status: StatusCode,
    /// `None`: no body (204).
    body: Option<Value>,
    location: Option<String>,
}

impl Answer {
    fn ok(body: Value) -> Answer {
        Answer {
            status: StatusCode::OK,
            body: Some(body),
            location: None,
        }
    }

    fn created(body: Value, location: String) -> Answer {
        Answer {
            status: StatusCode::CREATED,
            body: Some(body),
            location: Some(location),
        }
    }

    fn error(status: StatusCode, message: &str, docs: &str) -> Answer {
        Answer {
            status,
            body: Some(json!({ "message": message, "documentation_url": docs })),
            location: None,
        }
    }

    fn not_found() -> Answer {
        Answer::error(StatusCode::NOT_FOUND, "Not Found", REST_DOCS)
    }

    fn validation_failed(resource: &str, field: &str, code: &str, message: &str) -> Answer {
        let mut error = json!({ "resource": resource, "code": code, "field": field });
        if !message.is_empty() {
            error["message"] = json!(message);
        }
        Answer {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            body: Some(json!({
                "message": "Validation Failed",
                "errors": [error],
                "documentation_url": REST_DOCS,
            })),
            location: None,
        }
    }

    fn problems_parsing_json() -> Answer {
        Answer::error(StatusCode::BAD_REQUEST, "Problems parsing JSON", REST_DOCS)
    }
}

/// The rate-limit window of one answer.
struct Rate {
    limit: u64,
    used: u64,
    reset: i64,
    resource: &'static str,
}

/// Serves one API (or GraphQL) request; `path` is below `/api/v3`.
pub(super) async fn serve(shared: Arc<Shared>, path: &str, request: Request) -> Response {
    let method = request.method().clone();
    let token = api_token(request.headers());
    let body = match axum::body::to_bytes(request.into_body(), super::API_BODY_LIMIT_BYTES).await {
        Ok(body) => body,
        Err(_) => {
            let rate = anonymous_rate(&shared);
            return respond(
                &shared,
                Answer::error(StatusCode::PAYLOAD_TOO_LARGE, "Body too large", REST_DOCS),
                &rate,
            );
        }
    };
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let graphql = segments == ["graphql"];
    let docs = if graphql { GRAPHQL_DOCS } else { REST_DOCS };

    // Who calls, and their rate-limit window.
    let (caller, rate) = {
        let mut state = shared.lock();
        let reset = (shared.started_at + chrono::Duration::hours(1)).timestamp();
        let resource = if graphql { "graphql" } else { "core" };
        match &token {
            None => {
                let used = bump(&mut state.rate_used, "");
                let rate = Rate {
                    limit: RATE_LIMIT_ANONYMOUS,
                    used,
                    reset,
                    resource,
                };
                (Caller::Anonymous, rate)
            }
            Some(token) => match state.tokens.get(token).cloned() {
                None => {
                    let used = bump(&mut state.rate_used, "");
                    let rate = Rate {
                        limit: RATE_LIMIT_ANONYMOUS,
                        used,
                        reset,
                        resource,
                    };
                    drop(state);
                    let answer = Answer::error(StatusCode::UNAUTHORIZED, "Bad credentials", docs);
                    return respond(&shared, answer, &rate);
                }
                Some(login) => {
                    let id = state.user_id(&login);
                    if state.rate_limited.contains(token) {
                        let rate = Rate {
                            limit: RATE_LIMIT_USER,
                            used: RATE_LIMIT_USER,
                            reset: Utc::now().timestamp() + 60,
                            resource,
                        };
                        drop(state);
                        let message = format!(
                            "API rate limit exceeded for user ID {id}. If you reach out to \
                             GitHub Support for help, please include the request ID."
                        );
                        let answer = Answer::error(
                            StatusCode::FORBIDDEN,
                            &message,
                            "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
                        );
                        return respond(&shared, answer, &rate);
                    }
                    let used = bump(&mut state.rate_used, token);
                    let rate = Rate {
                        limit: RATE_LIMIT_USER,
                        used,
                        reset,
                        resource,
                    };
                    let caller = Caller::User {
                        login,
                        id,
                        token: token.clone(),
                    };
                    (caller, rate)
                }
            },
        }
    };

    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let answer = route(&shared, &method, &segments, &caller, &body).await;
    respond(&shared, answer, &rate)
}

fn anonymous_rate(shared: &Shared) -> Rate {
    let mut state = shared.lock();
    Rate {
        limit: RATE_LIMIT_ANONYMOUS,
        used: bump(&mut state.rate_used, ""),
        reset: (shared.started_at + chrono::Duration::hours(1)).timestamp(),
        resource: "core",
    }
}

fn bump(used: &mut std::collections::HashMap<String, u64>, key: &str) -> u64 {
    let count = used.entry(key.to_owned()).or_default();
    *count += 1;
    *count
}

/// `Authorization: Bearer <token>` or `token <token>`.
fn api_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token"))
        .then(|| token.trim().to_owned())
}

fn respond(shared: &Shared, answer: Answer, rate: &Rate) -> Response {
    let request_id = {
        let mut state = shared.lock();
        let id = state.next_id();
        format!("F4KE:{id:X}:{:X}", rate.used)
    };
    let mut builder = Response::builder()
        .status(answer.status)
        .header("server", "GitHub.com")
        .header("x-github-media-type", "github.v3; format=json")
        .header("x-github-api-version-selected", "2022-11-28")
        .header("x-github-request-id", request_id)
        .header("x-ratelimit-limit", rate.limit.to_string())
        .header(
            "x-ratelimit-remaining",
            rate.limit.saturating_sub(rate.used).to_string(),
        )
        .header("x-ratelimit-reset", rate.reset.to_string())
        .header("x-ratelimit-used", rate.used.min(rate.limit).to_string())
        .header("x-ratelimit-resource", rate.resource);
    if let Some(location) = answer.location {
        builder = builder.header(header::LOCATION, location);
    }
    let body = match answer.body {
        Some(body) => {
            builder = builder.header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            Body::from(serde_json::to_vec(&body).expect("JSON"))
        }
        None => Body::empty(),
    };
    builder.body(body).expect("a response")
}

async fn route(
    shared: &Shared,
    method: &Method,
    segments: &[&str],
    caller: &Caller,
    body: &[u8],
) -> Answer {
    match (method.as_str(), segments) {
        ("POST", ["graphql"]) => graphql(shared, caller, body).await,
        ("GET", ["user"]) => match caller {
            Caller::Anonymous => Answer::error(
                StatusCode::UNAUTHORIZED,
                "Requires authentication",
                REST_DOCS,
            ),
            Caller::User { login, id, .. } => Answer::ok(shared.full_user_json(login, *id)),
        },
        ("GET", ["repos", owner, name]) => {
            match visible(shared, caller, owner, name, Permission::Pull) {
                Ok((repo, permission)) => Answer::ok(shared.repo_json(&repo, Some(permission))),
                Err(answer) => answer,
            }
        }
        (
            "GET",
            [
                "repos",
                owner,
                name,
                "git",
                "ref" | "refs",
                "heads",
                branch @ ..,
            ],
        ) if !branch.is_empty() => match visible(shared, caller, owner, name, Permission::Pull) {
            Ok((repo, _)) => git_ref(shared, &repo, &branch.join("/")).await,
            Err(answer) => answer,
        },
        ("GET", ["repos", owner, name, "git", "commits", sha]) => {
            match visible(shared, caller, owner, name, Permission::Pull) {
                Ok((repo, _)) => git_commit(shared, &repo, sha).await,
                Err(answer) => answer,
            }
        }
        ("GET", ["repos", owner, name, "branches", branch @ ..]) if !branch.is_empty() => {
            match visible(shared, caller, owner, name, Permission::Pull) {
                Ok((repo, _)) => branch_json(shared, &repo, &branch.join("/")).await,
                Err(answer) => answer,
            }
        }
        ("POST", ["repos", owner, name, "statuses", sha]) => {
            match visible(shared, caller, owner, name, Permission::Push) {
                Ok((repo, _)) => create_status(shared, caller, &repo, sha, body).await,
                Err(answer) => answer,
            }
        }
        ("GET", ["repos", owner, name, "commits", reference, "statuses"]) => {
            match visible(shared, caller, owner, name, Permission::Pull) {
                Ok((repo, _)) => list_statuses(shared, &repo, reference).await,
                Err(answer) => answer,
            }
        }
        ("POST", ["repos", owner, name, "hooks"]) => {
            match visible(shared, caller, owner, name, Permission::Admin) {
                Ok((repo, _)) => create_hook(shared, caller, &repo, body),
                Err(answer) => answer,
            }
        }
        ("GET", ["repos", owner, name, "hooks"]) => {
            match visible(shared, caller, owner, name, Permission::Admin) {
                Ok((repo, _)) => {
                    let full_name = repo.full_name();
                    let hooks: Vec<Value> = shared
                        .lock()
                        .hooks
                        .iter()
                        .filter(|hook| hook.repo == full_name)
                        .map(|hook| shared.hook_json(hook))
                        .collect();
                    Answer::ok(Value::Array(hooks))
                }
                Err(answer) => answer,
            }
        }
        ("GET" | "DELETE", ["repos", owner, name, "hooks", id]) => {
            match visible(shared, caller, owner, name, Permission::Admin) {
                Ok((repo, _)) => {
                    let full_name = repo.full_name();
                    let id: Option<u64> = id.parse().ok();
                    let mut state = shared.lock();
                    let position = state
                        .hooks
                        .iter()
                        .position(|hook| Some(hook.id) == id && hook.repo == full_name);
                    match position {
                        None => Answer::not_found(),
                        Some(index) if method == Method::DELETE => {
                            state.hooks.remove(index);
                            Answer {
                                status: StatusCode::NO_CONTENT,
                                body: None,
                                location: None,
                            }
                        }
                        Some(index) => Answer::ok(shared.hook_json(&state.hooks[index])),
                    }
                }
                Err(answer) => answer,
            }
        }
        _ => Answer::not_found(),
    }
}

/// The repository and the caller's permission, or GitHub's 404 when the
/// caller cannot see it or has less than `needed`.
fn visible(
    shared: &Shared,
    caller: &Caller,
    owner: &str,
    name: &str,
    needed: Permission,
) -> Result<(RepoInfo, Permission), Answer> {
    let full_name = format!("{owner}/{name}");
    let state = shared.lock();
    let repo = state.repo_info(&full_name).ok_or_else(Answer::not_found)?;
    let permission = match caller {
        // Every repository of the fake is private.
        Caller::Anonymous => Permission::None,
        Caller::User { token, .. } => state.permission(token, &full_name),
    };
    if permission < needed || permission == Permission::None {
        return Err(Answer::not_found());
    }
    Ok((repo, permission))
}

async fn resolve_branch(repo: &RepoInfo, branch: &str) -> Option<String> {
    let reference = format!("refs/heads/{branch}");
    git_in(
        &repo.git_dir,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{reference}^{{commit}}"),
        ],
    )
    .await
}

async fn git_ref(shared: &Shared, repo: &RepoInfo, branch: &str) -> Answer {
    let Some(sha) = resolve_branch(repo, branch).await else {
        return Answer::not_found();
    };
    let api = &shared.api_url;
    let full_name = repo.full_name();
    Answer::ok(json!({
        "ref": format!("refs/heads/{branch}"),
        "node_id": node_id("REF_", &format!("{full_name}:{branch}")),
        "url": format!("{api}/repos/{full_name}/git/refs/heads/{branch}"),
        "object": {
            "sha": sha,
            "type": "commit",
            "url": format!("{api}/repos/{full_name}/git/commits/{sha}"),
        },
    }))
}

/// `GET /repos/{owner}/{repo}/git/commits/{sha}`: the commit object, or 404
/// when the repository has no such commit.
async fn git_commit(shared: &Shared, repo: &RepoInfo, sha: &str) -> Answer {
    let full = sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit());
    let object = format!("{sha}^{{commit}}");
    let found = if full {
        git_in(
            &repo.git_dir,
            &["rev-parse", "--verify", "--quiet", &object],
        )
        .await
    } else {
        None
    };
    let Some(sha) = found else {
        return Answer::not_found();
    };
    // One `git show` for every field; the message (which may hold newlines)
    // comes last.
    let shown = git_in(
        &repo.git_dir,
        &[
            "show",
            "--no-patch",
            "--format=%T%n%P%n%an%n%ae%n%aI%n%B",
            &sha,
        ],
    )
    .await
    .unwrap_or_default();
    let mut fields = shown.splitn(6, '\n');
    let mut field = || fields.next().unwrap_or_default().to_owned();
    let (tree, parents, author, email, date, message) =
        (field(), field(), field(), field(), field(), field());
    let api = &shared.api_url;
    let full_name = repo.full_name();
    let person = json!({"name": author, "email": email, "date": date});
    Answer::ok(json!({
        "sha": sha,
        "node_id": node_id("C_", &sha),
        "url": format!("{api}/repos/{full_name}/git/commits/{sha}"),
        "html_url": format!("{}/{full_name}/commit/{sha}", shared.web_url),
        "author": person,
        "committer": person,
        "tree": {"sha": tree, "url": format!("{api}/repos/{full_name}/git/trees/{tree}")},
        "message": message,
        "parents": parents.split_whitespace().map(|parent| json!({
            "sha": parent,
            "url": format!("{api}/repos/{full_name}/git/commits/{parent}"),
            "html_url": format!("{}/{full_name}/commit/{parent}", shared.web_url),
        })).collect::<Vec<_>>(),
        "verification": {"verified": false, "reason": "unsigned", "signature": null, "payload": null, "verified_at": null},
    }))
}

async fn branch_json(shared: &Shared, repo: &RepoInfo, branch: &str) -> Answer {
    let Some(sha) = resolve_branch(repo, branch).await else {
        return Answer::error(StatusCode::NOT_FOUND, "Branch not found", REST_DOCS);
    };
    let api = &shared.api_url;
    let web = &shared.web_url;
    let full_name = repo.full_name();
    Answer::ok(json!({
        "name": branch,
        "commit": {
            "sha": sha,
            "node_id": node_id("C_", &sha),
            "url": format!("{api}/repos/{full_name}/commits/{sha}"),
            "html_url": format!("{web}/{full_name}/commit/{sha}"),
        },
        "_links": {
            "self": format!("{api}/repos/{full_name}/branches/{branch}"),
            "html": format!("{web}/{full_name}/tree/{branch}"),
        },
        "protected": false,
        "protection": {
            "enabled": false,
            "required_status_checks": { "enforcement_level": "off", "contexts": [], "checks": [] },
        },
        "protection_url": format!("{api}/repos/{full_name}/branches/{branch}/protection"),
    }))
}

async fn create_status(
    shared: &Shared,
    caller: &Caller,
    repo: &RepoInfo,
    sha: &str,
    body: &[u8],
) -> Answer {
    let Caller::User { login, .. } = caller else {
        return Answer::not_found();
    };
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(body) else {
        return Answer::problems_parsing_json();
    };
    let text = |field: &str| {
        request
            .get(field)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let state_name = text("state").unwrap_or_default();
    if !["pending", "success", "failure", "error"].contains(&state_name.as_str()) {
        return Answer::validation_failed(
            "Status",
            "state",
            "custom",
            "state is not included in the list",
        );
    }
    if let Some(description) = text("description")
        && description.chars().count() > 140
    {
        return Answer::validation_failed(
            "Status",
            "description",
            "custom",
            "description is too long (maximum is 140 characters)",
        );
    }
    // The sha must name a commit of the repository.
    let full_sha = if is_hex_sha(sha) {
        git_in(
            &repo.git_dir,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{sha}^{{commit}}"),
            ],
        )
        .await
    } else {
        None
    };
    let Some(full_sha) = full_sha.filter(|full| full.starts_with(&sha.to_ascii_lowercase())) else {
        return Answer::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("No commit found for SHA: {sha}"),
            REST_DOCS,
        );
    };
    let full_name = repo.full_name();
    let status = {
        let mut state = shared.lock();
        let status = CommitStatus {
            id: state.next_id(),
            repo: full_name.clone(),
            sha: full_sha.clone(),
            state: state_name,
            target_url: text("target_url"),
            description: text("description"),
            context: text("context").unwrap_or_else(|| "default".to_owned()),
            creator: login.clone(),
        };
        state.statuses.push(status.clone());
        status
    };
    let creator_id = shared.lock().user_id(login);
    let location = format!("{}/repos/{full_name}/statuses/{full_sha}", shared.api_url);
    Answer::created(shared.status_json(&status, creator_id), location)
}

async fn list_statuses(shared: &Shared, repo: &RepoInfo, reference: &str) -> Answer {
    if reference.starts_with('-') {
        return Answer::not_found();
    }
    let Some(sha) = git_in(
        &repo.git_dir,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{reference}^{{commit}}"),
        ],
    )
    .await
    else {
        return Answer::not_found();
    };
    let full_name = repo.full_name();
    let mut state = shared.lock();
    let matching: Vec<CommitStatus> = state
        .statuses
        .iter()
        .rev()
        .filter(|status| status.repo == full_name && status.sha == sha)
        .cloned()
        .collect();
    let statuses: Vec<Value> = matching
        .iter()
        .map(|status| {
            let creator_id = state.user_id(&status.creator);
            shared.status_json(status, creator_id)
        })
        .collect();
    Answer::ok(Value::Array(statuses))
}

fn create_hook(shared: &Shared, caller: &Caller, repo: &RepoInfo, body: &[u8]) -> Answer {
    let Caller::User { login, .. } = caller else {
        return Answer::not_found();
    };
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(body) else {
        return Answer::problems_parsing_json();
    };
    let name = request
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("web")
        .to_owned();
    if name != "web" {
        return Answer::validation_failed("Hook", "name", "invalid", "");
    }
    let config = request.get("config").cloned().unwrap_or(Value::Null);
    let config_text = |field: &str| match config.get(field) {
        Some(Value::String(text)) => Some(text.clone()),
        Some(Value::Number(number)) => Some(number.to_string()),
        _ => None,
    };
    let Some(url) = config_text("url").filter(|url| !url.is_empty()) else {
        return Answer::validation_failed(
            "Hook",
            "",
            "custom",
            "Config must contain URL for webhooks",
        );
    };
    let events: Vec<String> = match request.get("events") {
        None => vec!["push".to_owned()],
        Some(Value::Array(events)) => events
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(_) => return Answer::validation_failed("Hook", "events", "invalid", ""),
    };
    let active = request
        .get("active")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let full_name = repo.full_name();
    let mut state = shared.lock();
    if state
        .hooks
        .iter()
        .any(|hook| hook.repo == full_name && hook.url == url)
    {
        return Answer::validation_failed(
            "Hook",
            "",
            "custom",
            "Hook already exists on this repository",
        );
    }
    let hook = Hook {
        id: state.next_id(),
        repo: full_name.clone(),
        name,
        active,
        events,
        url,
        content_type: config_text("content_type").unwrap_or_else(|| "form".to_owned()),
        secret: config_text("secret").filter(|secret| !secret.is_empty()),
        insecure_ssl: config_text("insecure_ssl").unwrap_or_else(|| "0".to_owned()),
        creator: login.clone(),
    };
    state.hooks.push(hook.clone());
    let location = format!("{}/repos/{full_name}/hooks/{}", shared.api_url, hook.id);
    Answer::created(shared.hook_json(&hook), location)
}

/// GraphQL: `viewer { login }` and `repository(owner:, name:)`; anything
/// else is an error the fake does not support.
async fn graphql(shared: &Shared, caller: &Caller, body: &[u8]) -> Answer {
    let Caller::User { login, id, token } = caller else {
        return Answer::error(
            StatusCode::UNAUTHORIZED,
            "This endpoint requires you to be authenticated.",
            GRAPHQL_DOCS,
        );
    };
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return Answer::problems_parsing_json();
    };
    let query = request["query"].as_str().unwrap_or_default();
    let variables = &request["variables"];
    let wants_viewer = query.contains("viewer");
    let repository = query
        .find("repository(")
        .map(|at| graphql_repository_args(&query[at..], variables));
    if !wants_viewer && repository.is_none() {
        return Answer::ok(json!({ "errors": [{ "message": "unsupported by the fake" }] }));
    }
    let mut data = serde_json::Map::new();
    let mut errors = Vec::new();
    if wants_viewer {
        data.insert(
            "viewer".to_owned(),
            json!({
                "login": login,
                "databaseId": id,
                "id": node_id("U_", login),
                "name": login,
                "url": format!("{}/{login}", shared.web_url),
            }),
        );
    }
    if let Some(args) = repository {
        let (owner, name) = args.unwrap_or_default();
        let full_name = format!("{owner}/{name}");
        let found = {
            let state = shared.lock();
            let permission = state.permission(token, &full_name);
            state
                .repo_info(&full_name)
                .filter(|_| permission >= Permission::Pull)
                .map(|repo| (repo, permission))
        };
        match found {
            Some((repo, permission)) => {
                let head = resolve_branch(&repo, &repo.default_branch).await;
                let viewer_permission = match permission {
                    Permission::Admin => "ADMIN",
                    Permission::Push => "WRITE",
                    _ => "READ",
                };
                data.insert(
                    "repository".to_owned(),
                    json!({
                        "id": node_id("R_", &full_name),
                        "databaseId": repo.id,
                        "name": repo.name,
                        "nameWithOwner": full_name,
                        "owner": { "login": repo.owner },
                        "isPrivate": true,
                        "url": format!("{}/{full_name}", shared.web_url),
                        "viewerPermission": viewer_permission,
                        "defaultBranchRef": {
                            "name": repo.default_branch,
                            "target": { "oid": head },
                        },
                    }),
                );
            }
            None => {
                data.insert("repository".to_owned(), Value::Null);
                errors.push(json!({
                    "type": "NOT_FOUND",
                    "path": ["repository"],
                    "locations": [{ "line": 1, "column": 1 }],
                    "message": format!("Could not resolve to a Repository with the name '{full_name}'."),
                }));
            }
        }
    }
    let mut answer = json!({ "data": data });
    if !errors.is_empty() {
        answer["errors"] = Value::Array(errors);
    }
    Answer::ok(answer)
}

/// `owner` and `name` of `repository(owner: "o", name: $name)`, literal or
/// from the variables.
fn graphql_repository_args(text: &str, variables: &Value) -> Option<(String, String)> {
    let args = &text[..text.find(')')?];
    let value = |key: &str| -> Option<String> {
        let at = args.find(&format!("{key}:"))?;
        let rest = args[at + key.len() + 1..].trim_start();
        if let Some(rest) = rest.strip_prefix('"') {
            return Some(rest[..rest.find('"')?].to_owned());
        }
        let variable = rest.strip_prefix('$')?;
        let end = variable
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(variable.len());
        variables[&variable[..end]].as_str().map(str::to_owned)
    };
    Some((value("owner")?, value("name")?))
}

/// A GraphQL-style node id (opaque to clients).
fn node_id(prefix: &str, key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    format!("{prefix}{}", &hex::encode(digest)[..20])
}

fn timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `%XX` escapes of a path segment.
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && let Some(hex) = segment.get(index + 1..index + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Shared {
    /// GitHub's "simple user".
    pub(crate) fn user_json(&self, login: &str, id: u64) -> Value {
        let api = &self.api_url;
        let web = &self.web_url;
        let user = format!("{api}/users/{login}");
        json!({
            "login": login,
            "id": id,
            "node_id": node_id("U_", login),
            "avatar_url": format!("{web}/avatars/u/{id}?v=4"),
            "gravatar_id": "",
            "url": user,
            "html_url": format!("{web}/{login}"),
            "followers_url": format!("{user}/followers"),
            "following_url": format!("{user}/following{{/other_user}}"),
            "gists_url": format!("{user}/gists{{/gist_id}}"),
            "starred_url": format!("{user}/starred{{/owner}}{{/repo}}"),
            "subscriptions_url": format!("{user}/subscriptions"),
            "organizations_url": format!("{user}/orgs"),
            "repos_url": format!("{user}/repos"),
            "events_url": format!("{user}/events{{/privacy}}"),
            "received_events_url": format!("{user}/received_events"),
            "type": "User",
            "user_view_type": "public",
            "site_admin": false,
        })
    }

    /// `GET /user`: the private profile.
    fn full_user_json(&self, login: &str, id: u64) -> Value {
        let mut user = self.user_json(login, id);
        let created = timestamp(self.started_at);
        let extra = json!({
            "name": login,
            "company": null,
            "blog": "",
            "location": null,
            "email": null,
            "hireable": null,
            "bio": null,
            "twitter_username": null,
            "notification_email": null,
            "public_repos": 0,
            "public_gists": 0,
            "followers": 0,
            "following": 0,
            "created_at": created,
            "updated_at": created,
            "private_gists": 0,
            "total_private_repos": 1,
            "owned_private_repos": 1,
            "disk_usage": 1,
            "collaborators": 0,
            "two_factor_authentication": true,
            "plan": { "name": "pro", "space": 976_562_499, "collaborators": 0, "private_repos": 9999 },
        });
        if let (Value::Object(user), Value::Object(extra)) = (&mut user, extra) {
            user.extend(extra);
        }
        user
    }

    /// GitHub's full repository object; `permissions` for the caller when
    /// given.
    pub(crate) fn repo_json(&self, repo: &RepoInfo, permission: Option<Permission>) -> Value {
        let full_name = repo.full_name();
        let mut value = self.repo_json_for(
            &full_name,
            repo.id,
            repo.owner_id,
            &repo.default_branch,
            false,
            repo.created_at,
        );
        if let Some(permission) = permission {
            value["permissions"] = json!({
                "admin": permission >= Permission::Admin,
                "maintain": permission >= Permission::Admin,
                "push": permission >= Permission::Push,
                "triage": permission >= Permission::Push,
                "pull": permission >= Permission::Pull,
            });
        }
        value
    }

    /// A repository object for any `owner/name` (also one the fake does not
    /// hold, such as a fork in a pull request).
    pub(crate) fn repo_json_for(
        &self,
        full_name: &str,
        id: u64,
        owner_id: u64,
        default_branch: &str,
        fork: bool,
        created_at: DateTime<Utc>,
    ) -> Value {
        let (owner, name) = full_name.split_once('/').unwrap_or((full_name, full_name));
        let api = format!("{}/repos/{full_name}", self.api_url);
        let web = format!("{}/{full_name}", self.web_url);
        let host = self
            .web_url
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        let created = timestamp(created_at);
        let pushed = timestamp(Utc::now());
        let mut repo = json!({
            "id": id,
            "node_id": node_id("R_", full_name),
            "name": name,
            "full_name": full_name,
            "private": true,
            "owner": self.user_json(owner, owner_id),
            "html_url": web,
            "description": format!("{name}, served by the fake GitHub"),
            "fork": fork,
            "url": api,
        });
        let more = json!({
            "created_at": created,
            "updated_at": pushed,
            "pushed_at": pushed,
            "git_url": format!("git://{host}/{full_name}.git"),
            "ssh_url": format!("git@{host}:{full_name}.git"),
            "clone_url": format!("{web}.git"),
            "svn_url": web,
            "homepage": null,
            "size": 1,
            "stargazers_count": 0,
            "watchers_count": 0,
            "language": "Makefile",
            "has_issues": true,
            "has_projects": true,
            "has_downloads": true,
            "has_wiki": false,
            "has_pages": false,
            "has_discussions": false,
            "forks_count": 0,
            "mirror_url": null,
            "archived": false,
            "disabled": false,
            "open_issues_count": 0,
            "license": null,
            "allow_forking": true,
            "is_template": false,
            "web_commit_signoff_required": false,
            "topics": [],
            "visibility": "private",
            "forks": 0,
            "open_issues": 0,
            "watchers": 0,
            "default_branch": default_branch,
        });
        let urls = json!({
            "forks_url": format!("{api}/forks"),
            "keys_url": format!("{api}/keys{{/key_id}}"),
            "collaborators_url": format!("{api}/collaborators{{/collaborator}}"),
            "teams_url": format!("{api}/teams"),
            "hooks_url": format!("{api}/hooks"),
            "issue_events_url": format!("{api}/issues/events{{/number}}"),
            "events_url": format!("{api}/events"),
            "assignees_url": format!("{api}/assignees{{/user}}"),
            "branches_url": format!("{api}/branches{{/branch}}"),
            "tags_url": format!("{api}/tags"),
            "blobs_url": format!("{api}/git/blobs{{/sha}}"),
            "git_tags_url": format!("{api}/git/tags{{/sha}}"),
            "git_refs_url": format!("{api}/git/refs{{/sha}}"),
            "trees_url": format!("{api}/git/trees{{/sha}}"),
            "statuses_url": format!("{api}/statuses/{{sha}}"),
            "languages_url": format!("{api}/languages"),
            "stargazers_url": format!("{api}/stargazers"),
            "contributors_url": format!("{api}/contributors"),
            "subscribers_url": format!("{api}/subscribers"),
            "subscription_url": format!("{api}/subscription"),
            "commits_url": format!("{api}/commits{{/sha}}"),
            "git_commits_url": format!("{api}/git/commits{{/sha}}"),
            "comments_url": format!("{api}/comments{{/number}}"),
            "issue_comment_url": format!("{api}/issues/comments{{/number}}"),
            "contents_url": format!("{api}/contents/{{+path}}"),
            "compare_url": format!("{api}/compare/{{base}}...{{head}}"),
            "merges_url": format!("{api}/merges"),
            "archive_url": format!("{api}/{{archive_format}}{{/ref}}"),
            "downloads_url": format!("{api}/downloads"),
            "issues_url": format!("{api}/issues{{/number}}"),
            "pulls_url": format!("{api}/pulls{{/number}}"),
            "milestones_url": format!("{api}/milestones{{/number}}"),
            "notifications_url": format!("{api}/notifications{{?since,all,participating}}"),
            "labels_url": format!("{api}/labels{{/name}}"),
            "releases_url": format!("{api}/releases{{/id}}"),
            "deployments_url": format!("{api}/deployments"),
        });
        for part in [more, urls] {
            if let (Value::Object(repo), Value::Object(part)) = (&mut repo, part) {
                repo.extend(part);
            }
        }
        repo
    }

    fn status_json(&self, status: &CommitStatus, creator_id: u64) -> Value {
        let now = timestamp(Utc::now());
        json!({
            "url": format!("{}/repos/{}/statuses/{}", self.api_url, status.repo, status.sha),
            "avatar_url": format!("{}/avatars/u/{creator_id}?v=4", self.web_url),
            "id": status.id,
            "node_id": node_id("SC_", &status.id.to_string()),
            "state": status.state,
            "description": status.description,
            "target_url": status.target_url,
            "context": status.context,
            "created_at": now,
            "updated_at": now,
            "creator": self.user_json(&status.creator, creator_id),
        })
    }

    pub(crate) fn hook_json(&self, hook: &Hook) -> Value {
        let api = format!("{}/repos/{}/hooks/{}", self.api_url, hook.repo, hook.id);
        let created = timestamp(self.started_at);
        let mut config = json!({
            "content_type": hook.content_type,
            "insecure_ssl": hook.insecure_ssl,
            "url": hook.url,
        });
        if hook.secret.is_some() {
            config["secret"] = json!("********");
        }
        json!({
            "type": "Repository",
            "id": hook.id,
            "name": hook.name,
            "active": hook.active,
            "events": hook.events,
            "config": config,
            "updated_at": created,
            "created_at": created,
            "url": api,
            "test_url": format!("{api}/test"),
            "ping_url": format!("{api}/pings"),
            "deliveries_url": format!("{api}/deliveries"),
            "last_response": { "code": null, "status": "unused", "message": null },
        })
    }
}
