//! The fake GitHub against real clients: octocrab (what the controller
//! uses), git over smart HTTP, and a webhook receiver that checks the
//! signature.

use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use base64::Engine as _;
use octocrab::Octocrab;
use octocrab::models::StatusState;
use octocrab::models::webhook_events::{WebhookEvent, WebhookEventPayload};
use octocrab::params::repos::Reference;
use serde_json::{Value, json};

use super::*;

const OWNER: &str = "octo-org";
const NAME: &str = "widget";
const REPO: &str = "octo-org/widget";
const LOGIN: &str = "octocat";
const TOKEN: &str = "ghp_fakefakefakefakefakefakefakefake0001";
const READER_TOKEN: &str = "ghp_fakefakefakefakefakefakefakefake0002";
const STRANGER_TOKEN: &str = "ghp_fakefakefakefakefakefakefakefake0003";

async fn fake() -> (FakeGitHub, Arc<GitRepo>) {
    let github = FakeGitHub::start().await;
    github.add_user(LOGIN, TOKEN);
    github.add_user("reader", READER_TOKEN);
    github.add_user("stranger", STRANGER_TOKEN);
    let repo = github.add_repo(OWNER, NAME, "main");
    github.grant(TOKEN, REPO, Permission::Admin);
    github.grant(READER_TOKEN, REPO, Permission::Pull);
    (github, repo)
}

fn octocrab(github: &FakeGitHub, token: &str) -> Octocrab {
    Octocrab::builder()
        .base_uri(github.api_url())
        .unwrap()
        .personal_token(token.to_owned())
        .build()
        .unwrap()
}

fn github_error(err: octocrab::Error) -> octocrab::GitHubError {
    match err {
        octocrab::Error::GitHub { source, .. } => *source,
        other => panic!("not a GitHub error: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn octocrab_reads_users_repositories_and_refs() {
    let (github, repo) = fake().await;
    let client = octocrab(&github, TOKEN);

    let user = client.current().user().await.unwrap();
    assert_eq!(user.login, LOGIN);

    let viewer: Value = client
        .graphql(&json!({ "query": "query { viewer { login } }" }))
        .await
        .unwrap();
    // octocrab hands back `data`.
    assert_eq!(viewer["viewer"]["login"], LOGIN, "{viewer}");

    let query = "query($owner: String!, $name: String!) { repository(owner: $owner, name: $name) { viewerPermission } }";
    let found: Value = client
        .graphql(&json!({ "query": query, "variables": { "owner": OWNER, "name": NAME } }))
        .await
        .unwrap();
    assert_eq!(found["repository"]["viewerPermission"], "ADMIN");
    let reader: Value = octocrab(&github, READER_TOKEN)
        .graphql(&json!({ "query": format!("{{ repository(owner: \"{OWNER}\", name: \"{NAME}\") {{ viewerPermission }} }}") }))
        .await
        .unwrap();
    assert_eq!(reader["repository"]["viewerPermission"], "READ");
    let hidden: Value = octocrab(&github, STRANGER_TOKEN)
        .post(
            "/graphql",
            Some(&json!({ "query": query, "variables": { "owner": OWNER, "name": NAME } })),
        )
        .await
        .unwrap();
    assert_eq!(hidden["data"]["repository"], Value::Null, "{hidden}");
    assert_eq!(hidden["errors"][0]["type"], "NOT_FOUND", "{hidden}");
    let hidden: Result<Value, _> = octocrab(&github, STRANGER_TOKEN)
        .graphql(&json!({ "query": query, "variables": { "owner": OWNER, "name": NAME } }))
        .await;
    assert!(
        matches!(hidden, Err(octocrab::Error::Graphql { .. })),
        "{hidden:?}"
    );

    let found = client.repos(OWNER, NAME).get().await.unwrap();
    assert_eq!(found.name, NAME);
    assert_eq!(found.full_name.as_deref(), Some(REPO));
    assert_eq!(found.private, Some(true));
    assert_eq!(found.default_branch.as_deref(), Some("main"));
    assert_eq!(
        found.clone_url.map(|url| url.to_string()),
        Some(github.clone_url(REPO))
    );
    assert_eq!(found.owner.unwrap().login, OWNER);
    let permissions = found.permissions.unwrap();
    assert!(permissions.admin && permissions.push && permissions.pull);
    let read_only = octocrab(&github, READER_TOKEN)
        .repos(OWNER, NAME)
        .get()
        .await
        .unwrap()
        .permissions
        .unwrap();
    assert!(!read_only.admin && !read_only.push && read_only.pull);

    let reference = client
        .repos(OWNER, NAME)
        .get_ref(&Reference::Branch("main".to_owned()))
        .await
        .unwrap();
    match reference.object {
        octocrab::models::repos::Object::Commit { sha, .. } => assert_eq!(sha, repo.head()),
        other => panic!("not a commit: {other:?}"),
    }
    repo.create_branch("feature/x");
    let second = repo.commit_version("x");
    let reference = client
        .repos(OWNER, NAME)
        .get_ref(&Reference::Branch("feature/x".to_owned()))
        .await
        .unwrap();
    assert!(
        matches!(reference.object, octocrab::models::repos::Object::Commit { sha, .. } if sha == second)
    );
    let missing = client
        .repos(OWNER, NAME)
        .get_ref(&Reference::Branch("nope".to_owned()))
        .await
        .unwrap_err();
    assert_eq!(github_error(missing).status_code, 404);
    let branch: octocrab::models::repos::Branch = client
        .get(format!("/repos/{REPO}/branches/main"), None::<&()>)
        .await
        .unwrap();
    assert_eq!(branch.commit.sha, repo.rev_parse("main"));
    // The Git database's commit: its fields as GitHub names them; 404 for
    // a commit the repository does not have.
    let commit: Value = client
        .get(format!("/repos/{REPO}/git/commits/{second}"), None::<&()>)
        .await
        .unwrap();
    assert_eq!(commit["sha"], second, "{commit}");
    assert_eq!(
        commit["parents"][0]["sha"],
        repo.rev_parse("main"),
        "{commit}"
    );
    assert_eq!(
        commit["tree"]["sha"].as_str().map(str::len),
        Some(40),
        "{commit}"
    );
    assert!(
        commit["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{commit}"
    );
    let missing = client
        .get::<Value, _, _>(
            format!("/repos/{REPO}/git/commits/{}", "0".repeat(40)),
            None::<&()>,
        )
        .await
        .unwrap_err();
    assert_eq!(github_error(missing).status_code, 404);

    // Requests carry the token as octocrab sends it, and answers GitHub's
    // headers.
    let requests = github.requests();
    assert!(
        requests
            .iter()
            .any(|request| request.header("authorization") == Some(&format!("Bearer {TOKEN}"))),
        "{requests:?}"
    );
    let http = reqwest::Client::new();
    let response = http
        .get(format!("{}/repos/{REPO}", github.api_url()))
        .header("authorization", format!("token {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    assert_eq!(headers["content-type"], "application/json; charset=utf-8");
    assert!(
        headers["x-github-media-type"]
            .to_str()
            .unwrap()
            .starts_with("github.v3")
    );
    for name in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "x-ratelimit-used",
    ] {
        assert!(headers.contains_key(name), "{name} missing: {headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn octocrab_sees_githubs_errors() {
    let (github, _repo) = fake().await;

    let unknown = octocrab(&github, "ghp_unknown")
        .current()
        .user()
        .await
        .unwrap_err();
    let unknown = github_error(unknown);
    assert_eq!(unknown.status_code, 401);
    assert_eq!(unknown.message, "Bad credentials");

    let hidden = octocrab(&github, STRANGER_TOKEN)
        .repos(OWNER, NAME)
        .get()
        .await
        .unwrap_err();
    let hidden = github_error(hidden);
    assert_eq!(hidden.status_code, 404);
    assert_eq!(hidden.message, "Not Found");

    let response = reqwest::Client::new()
        .get(format!("{}/repos/{REPO}", github.api_url()))
        .header("authorization", "Bearer ghp_unknown")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({ "message": "Bad credentials", "documentation_url": "https://docs.github.com/rest" })
    );

    // Revocation: access first, then the token itself.
    let client = octocrab(&github, TOKEN);
    client.repos(OWNER, NAME).get().await.unwrap();
    github.revoke_access(TOKEN, REPO);
    let gone = github_error(client.repos(OWNER, NAME).get().await.unwrap_err());
    assert_eq!(gone.status_code, 404);
    assert_eq!(client.current().user().await.unwrap().login, LOGIN);
    github.revoke(TOKEN);
    let revoked = github_error(client.current().user().await.unwrap_err());
    assert_eq!(revoked.status_code, 401);

    // Rate limiting.
    let reader = octocrab(&github, READER_TOKEN);
    github.set_rate_limited(READER_TOKEN, true);
    let limited = github_error(reader.current().user().await.unwrap_err());
    assert_eq!(limited.status_code, 403);
    assert!(
        limited.message.contains("rate limit"),
        "{}",
        limited.message
    );
    github.set_rate_limited(READER_TOKEN, false);
    reader.current().user().await.unwrap();

    let unsupported: Value = reader
        .post(
            "/graphql",
            Some(&json!({ "query": "{ meta { gitIpAddresses } }" })),
        )
        .await
        .unwrap();
    assert_eq!(
        unsupported,
        json!({ "errors": [{ "message": "unsupported by the fake" }] })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn octocrab_posts_statuses_and_creates_hooks_with_the_right_permission() {
    let (github, repo) = fake().await;
    let sha = repo.head();
    let client = octocrab(&github, TOKEN);

    let status = client
        .repos(OWNER, NAME)
        .create_status(sha.clone(), StatusState::Pending)
        .context("hobotnica/test".to_owned())
        .target("http://127.0.0.1:1/api/v1/jobs/1".to_owned())
        .description("queued".to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(status.state, StatusState::Pending);
    assert_eq!(status.context.as_deref(), Some("hobotnica/test"));
    assert_eq!(status.creator.unwrap().login, LOGIN);
    client
        .repos(OWNER, NAME)
        .create_status(sha.clone(), StatusState::Success)
        .context("hobotnica/test".to_owned())
        .send()
        .await
        .unwrap();
    let recorded = github.statuses(REPO, &sha);
    let states: Vec<&str> = recorded
        .iter()
        .map(|status| status.state.as_str())
        .collect();
    assert_eq!(states, ["pending", "success"]);
    assert_eq!(
        recorded[0].target_url.as_deref(),
        Some("http://127.0.0.1:1/api/v1/jobs/1")
    );
    assert_eq!(recorded[0].context, "hobotnica/test");

    // A commit that does not exist: 422; read-only: 404.
    let missing = client
        .repos(OWNER, NAME)
        .create_status("1".repeat(40), StatusState::Success)
        .send()
        .await
        .unwrap_err();
    assert_eq!(github_error(missing).status_code, 422);
    let read_only = octocrab(&github, READER_TOKEN)
        .repos(OWNER, NAME)
        .create_status(sha.clone(), StatusState::Failure)
        .send()
        .await
        .unwrap_err();
    assert_eq!(github_error(read_only).status_code, 404);
    assert_eq!(github.statuses(REPO, &sha).len(), 2);

    // Hooks need admin.
    let body = json!({
        "name": "web",
        "active": true,
        "events": ["push", "pull_request"],
        "config": {
            "url": "http://127.0.0.1:1/webhooks/github/abc",
            "content_type": "json",
            "secret": "s3cret",
            "insecure_ssl": "0",
        },
    });
    let denied: Result<Value, _> = octocrab(&github, READER_TOKEN)
        .post(format!("/repos/{REPO}/hooks"), Some(&body))
        .await;
    assert_eq!(github_error(denied.unwrap_err()).status_code, 404);
    let hook: octocrab::models::hooks::Hook = client
        .post(format!("/repos/{REPO}/hooks"), Some(&body))
        .await
        .unwrap();
    assert_eq!(hook.config.url, "http://127.0.0.1:1/webhooks/github/abc");
    assert_eq!(hook.config.secret.as_deref(), Some("********"));
    let again: Result<Value, _> = client
        .post(format!("/repos/{REPO}/hooks"), Some(&body))
        .await;
    assert_eq!(github_error(again.unwrap_err()).status_code, 422);
    let recorded = github.hooks(REPO);
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].id, hook.id);
    assert_eq!(recorded[0].secret.as_deref(), Some("s3cret"));
    assert_eq!(recorded[0].content_type, "json");
    assert_eq!(recorded[0].events, ["push", "pull_request"]);
    let listed: Vec<octocrab::models::hooks::Hook> = client
        .get(format!("/repos/{REPO}/hooks"), None::<&()>)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
}

/// Runs git with an empty configuration and no prompts, plus `env`.
async fn git(dir: &Path, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    tokio::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "/bin/false")
        .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
        .output()
        .await
        .unwrap()
}

fn auth_env(token: &str) -> Vec<(&'static str, String)> {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
    vec![
        ("GIT_CONFIG_COUNT", "1".to_owned()),
        ("GIT_CONFIG_KEY_0", "http.extraHeader".to_owned()),
        (
            "GIT_CONFIG_VALUE_0",
            format!("Authorization: Basic {basic}"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clones_and_fetches_over_smart_http_only_with_a_token() {
    let (github, repo) = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let url = github.clone_url(REPO);

    let anonymous = git(dir.path(), &["clone", "--quiet", &url, "anonymous"], &[]).await;
    assert!(!anonymous.status.success());
    let stranger = git(
        dir.path(),
        &["clone", "--quiet", &url, "stranger"],
        &auth_env(STRANGER_TOKEN),
    )
    .await;
    assert!(!stranger.status.success());
    assert!(
        String::from_utf8_lossy(&stranger.stderr).contains("not found"),
        "{stranger:?}"
    );

    let clone = git(
        dir.path(),
        &["clone", "--quiet", "--bare", &url, "clone.git"],
        &auth_env(READER_TOKEN),
    )
    .await;
    assert!(
        clone.status.success(),
        "{clone:?} {:?}",
        github.git_errors()
    );
    let cache = dir.path().join("clone.git");
    let head = git(&cache, &["rev-parse", "main"], &[]).await;
    assert_eq!(String::from_utf8_lossy(&head.stdout).trim(), repo.head());

    // A commit on a branch the clone has not seen, fetched by its sha (what
    // an agent does for a pull request).
    repo.create_branch("topic");
    let topic = repo.commit_version("topic");
    repo.switch("main");
    let fetch = git(
        &cache,
        &["fetch", "--quiet", "origin", &topic],
        &auth_env(READER_TOKEN),
    )
    .await;
    assert!(
        fetch.status.success(),
        "{fetch:?} {:?}",
        github.git_errors()
    );
    let object = git(&cache, &["cat-file", "-t", &topic], &[]).await;
    assert_eq!(String::from_utf8_lossy(&object.stdout).trim(), "commit");

    let basic_requests: Vec<_> = github
        .requests()
        .into_iter()
        .filter(|request| request.path.starts_with(&format!("/{REPO}.git/")))
        .collect();
    assert!(!basic_requests.is_empty());

    github.revoke(READER_TOKEN);
    let revoked = git(
        &cache,
        &["fetch", "--quiet", "origin", "main"],
        &auth_env(READER_TOKEN),
    )
    .await;
    assert!(!revoked.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_over_the_exact_bytes_and_parse_as_githubs() {
    let (github, repo) = fake().await;
    let received: Arc<Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
    let sink = Arc::clone(&received);
    let app = Router::new().route(
        "/webhooks/github/{id}",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let sink = Arc::clone(&sink);
            async move {
                sink.lock().unwrap().push((headers, body));
                axum::http::StatusCode::ACCEPTED
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = format!("http://{addr}/webhooks/github/abc");

    let before = repo.head();
    let after = repo.commit_version("2");
    let push = github.push_payload(REPO, "refs/heads/main", &before, &after, false, false);
    let delivery = new_delivery_id();
    let response = send_webhook(&url, "push", &delivery, &push, Some("s3cret")).await;
    assert_eq!(response.status, 202);
    let unsigned = send_webhook(
        &url,
        "ping",
        &new_delivery_id(),
        &github.ping_payload(REPO, 7),
        None,
    )
    .await;
    assert_eq!(unsigned.status, 202);
    let pull = github.pull_request_payload("opened", 5, &after, "feature", "forker/widget", REPO);
    send_webhook(
        &url,
        "pull_request",
        &new_delivery_id(),
        &pull,
        Some("s3cret"),
    )
    .await;
    server.abort();

    let received = received.lock().unwrap().clone();
    let (headers, body) = &received[0];
    assert_eq!(headers["x-github-event"], "push");
    assert_eq!(headers["x-github-delivery"], delivery.as_str());
    assert_eq!(delivery.len(), 36);
    assert_eq!(headers["content-type"], "application/json");
    assert!(
        headers["user-agent"]
            .to_str()
            .unwrap()
            .starts_with("GitHub-Hookshot/")
    );
    assert!(headers.contains_key("x-github-hook-id"));
    assert_eq!(
        headers["x-hub-signature-256"].to_str().unwrap(),
        signature("s3cret", body)
    );
    assert!(!received[1].0.contains_key("x-hub-signature-256"));

    // Known answer (RFC 4231 test case 2).
    assert_eq!(
        signature("Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );

    // The payloads parse as octocrab's webhook events, with what the
    // controller reads.
    let event = WebhookEvent::try_from_header_and_body("push", body).unwrap();
    let WebhookEventPayload::Push(push) = event.specific else {
        panic!("not a push: {:?}", event.specific)
    };
    assert_eq!(push.r#ref, "refs/heads/main");
    assert_eq!(push.after, after);
    assert_eq!(push.head_commit.unwrap().message, "version 2");
    assert_eq!(event.repository.unwrap().full_name.as_deref(), Some(REPO));
    let event = WebhookEvent::try_from_header_and_body("ping", &received[1].1).unwrap();
    assert!(matches!(event.specific, WebhookEventPayload::Ping(_)));
    let event = WebhookEvent::try_from_header_and_body("pull_request", &received[2].1).unwrap();
    let WebhookEventPayload::PullRequest(pull) = event.specific else {
        panic!("not a pull request")
    };
    assert_eq!(pull.number, 5);
    assert_eq!(pull.pull_request.head.sha, after);
    let head_repo = pull.pull_request.head.repo.unwrap();
    assert_eq!(head_repo.full_name.as_deref(), Some("forker/widget"));
    assert_eq!(head_repo.fork, Some(true));
    assert_eq!(
        pull.pull_request.base.repo.unwrap().full_name.as_deref(),
        Some(REPO)
    );

    let deleted = github.push_payload(REPO, "refs/heads/gone", &after, ZERO_SHA, true, false);
    assert_eq!(deleted["head_commit"], Value::Null);
    let body = serde_json::to_vec(&deleted).unwrap();
    WebhookEvent::try_from_header_and_body("push", &body).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_can_have_another_default_branch() {
    let (github, _repo) = fake().await;
    let trunk = github.add_repo(OWNER, "trunk-based", "trunk");
    github.grant(TOKEN, "octo-org/trunk-based", Permission::Push);
    let client = octocrab(&github, TOKEN);
    let found = client.repos(OWNER, "trunk-based").get().await.unwrap();
    assert_eq!(found.default_branch.as_deref(), Some("trunk"));
    let permissions = found.permissions.unwrap();
    assert!(permissions.push && !permissions.admin);
    let reference = client
        .repos(OWNER, "trunk-based")
        .get_ref(&Reference::Branch("trunk".to_owned()))
        .await
        .unwrap();
    assert!(
        matches!(reference.object, octocrab::models::repos::Object::Commit { sha, .. } if sha == trunk.head())
    );
    assert_eq!(github.repo_id("octo-org/trunk-based"), *found.id);
}

#[test]
fn the_test_recipe_can_be_replaced() {
    let makefile = crate::git::makefile_with_test_recipe(&["echo one", "exit 3"]);
    assert!(
        makefile.contains("test:\n\t@echo one\n\t@exit 3\n"),
        "{makefile}"
    );
    assert!(!makefile.contains("hello from stdout"));
    assert!(makefile.contains("fail:\n"), "the other targets stay");
}
