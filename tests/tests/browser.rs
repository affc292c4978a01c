//! The web dashboard in a real Chromium, against real controller and agent
//! processes: signing in (the admin token, a GitHub user of the fake
//! GitHub, a wrong token), what each sees, signing out, CSRF and
//! cross-site posts, sessions shared by two controllers on one Redis,
//! escaping, accessibility (axe-core on every page) and security headers.
//! Screenshots of every page go to `target/browser-screenshots/`.

#![allow(clippy::disallowed_methods)] // starts chromedriver and a cross-site page server

use std::time::Duration;

use hobotnica_tests::browser::Browser;
use hobotnica_tests::redis::RedisServer;
use hobotnica_tests::{Agent, Api, Controller, ControllerOpts, FakeGitHub, GitRepo, Permission};
use reqwest::Method;
use serde_json::json;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);
const XSS: &str = "<script>alert(1)</script>";
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// A client that does not follow redirects and sends `cookie`.
fn http(cookie: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(cookie) = cookie {
        headers.insert(
            reqwest::header::COOKIE,
            format!("hobotnica_session={cookie}")
                .parse()
                .expect("a cookie"),
        );
    }
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(headers)
        .build()
        .expect("a client")
}

async fn sign_in_with(browser: &Browser, base: &str, token: &str, login: &str) {
    browser.goto(&format!("{base}/sign-in")).await;
    browser.fill("#token", token).await;
    browser.fill("#login", login).await;
    browser.click("form[action='/sign-in'] button").await;
}

/// No script ran from the page's data: no dialog, and every script
/// element is the dashboard's own file.
async fn assert_no_injected_script(browser: &Browser, page: &str) {
    assert!(!browser.alert_open().await, "an alert opened on {page}");
    let inline = browser
        .script("return [...document.scripts].filter(s => !s.src).length;")
        .await;
    assert_eq!(inline, json!(0), "an inline script element on {page}");
}

/// The headers every page must carry.
fn assert_page_headers(response: &reqwest::Response, page: &str) {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(
        header("content-security-policy"),
        CSP.split_whitespace().collect::<Vec<_>>().join(" "),
        "{page}"
    );
    assert_eq!(header("x-content-type-options"), "nosniff", "{page}");
    assert_eq!(header("referrer-policy"), "same-origin", "{page}");
}

/// The admin signs in, sees the repositories (with the last test result)
/// and the agents; a wrong token is explained; a repository whose git URL
/// holds a script tag shows it as text; a form without the CSRF token and
/// a cross-site post are refused; sign-out ends the session so that the
/// old cookie no longer works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_signs_in_sees_repositories_and_agents_and_signs_out() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let controller = Controller::start_default().await;
    let _agent = Agent::start_default(&controller).await;
    let api = controller.api();
    let base = controller.url();
    let repo = GitRepo::new();
    api.register_repo("demo", &repo.url()).await;
    let job = api.run_target("local/demo", "test").await;
    api.wait_for_success(job.id, JOB_TIMEOUT).await;
    // A git URL (a local path) with a script tag in it.
    let hostile = tempfile::tempdir().expect("a directory");
    let hostile_path = hostile.path().join(format!("x{XSS}"));
    std::fs::create_dir_all(&hostile_path).expect("the hostile directory");
    repo.git(&[
        "clone",
        "--quiet",
        "--bare",
        ".",
        &hostile_path.to_string_lossy(),
    ]);
    api.register_repo("hostile", &hostile_path.to_string_lossy())
        .await;

    // Not signed in: the sign-in page.
    browser.goto(&base).await;
    assert!(
        browser.url().await.ends_with("/sign-in"),
        "{}",
        browser.url().await
    );
    browser.screenshot("sign-in").await;
    browser.assert_accessible("/sign-in").await;

    // A wrong token: the sign-in page again, saying so.
    sign_in_with(&browser, &base, "hbt_admin_not-the-token", "").await;
    let text = browser.text().await;
    assert!(text.contains("Wrong credentials"), "{text}");
    assert!(text.contains("not the admin token"), "{text}");
    assert!(browser.cookie("hobotnica_session").await.is_none());
    browser.screenshot("sign-in-wrong-token").await;
    browser.assert_accessible("/sign-in with an error").await;

    // The admin token: the repositories.
    sign_in_with(&browser, &base, &controller.admin_token, "").await;
    assert!(
        browser.url().await.ends_with("/repos"),
        "{}",
        browser.url().await
    );
    let text = browser.text().await;
    assert!(text.contains("local/demo"), "{text}");
    assert!(text.contains("succeeded"), "the last test's result: {text}");
    assert!(text.contains(&format!("job #{}", job.id)), "{text}");
    assert!(text.contains(XSS), "the git URL shows as text: {text}");
    assert!(text.contains("Signed in as admin"), "{text}");
    assert_no_injected_script(&browser, "/repos").await;
    browser.screenshot("repos").await;
    browser.assert_accessible("/repos").await;

    // The agents.
    browser.click("a[href='/agents']").await;
    let text = browser.text().await;
    let agents = api.agents().await;
    let name = agents[0]["name"].as_str().expect("an agent name");
    assert!(text.contains(name), "{text}");
    assert!(text.contains("connected"), "{text}");
    browser.screenshot("agents").await;
    browser.assert_accessible("/agents").await;

    // Headers, cookie and page weights, seen by a plain client.
    let cookie = browser
        .cookie("hobotnica_session")
        .await
        .expect("the session cookie");
    let signed_in = http(Some(&cookie));
    let mut weights = Vec::new();
    for page in ["/sign-in", "/repos", "/agents"] {
        let client = if page == "/sign-in" {
            http(None)
        } else {
            signed_in.clone()
        };
        let response = client
            .get(format!("{base}{page}"))
            .send()
            .await
            .expect("the page");
        assert_eq!(response.status(), 200, "{page}");
        assert_page_headers(&response, page);
        let html = response.text().await.expect("the page's HTML");
        assert!(
            !html.contains(&controller.admin_token),
            "{page} shows the admin token"
        );
        weights.push((page, html.len()));
    }
    let assets = browser
        .script("return [...document.querySelectorAll('link[rel=stylesheet], script[src]')].map(e => e.href || e.src);")
        .await;
    let mut asset_bytes = 0;
    for url in assets.as_array().expect("asset URLs") {
        let url = url.as_str().expect("a URL");
        let response = http(None).get(url).send().await.expect("the asset");
        assert_eq!(response.status(), 200, "{url}");
        let caching = response.headers().get("cache-control").cloned();
        assert_eq!(
            caching.as_ref().and_then(|v| v.to_str().ok()),
            Some("public, max-age=31536000, immutable"),
            "{url}"
        );
        asset_bytes += response.bytes().await.expect("the asset's bytes").len();
    }
    for (page, html) in weights {
        println!(
            "page weight: {page}: {html} bytes HTML + {asset_bytes} bytes CSS and JS = {} bytes",
            html + asset_bytes
        );
    }
    let answer = http(None)
        .post(format!("{base}/sign-in"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}&login=", controller.admin_token))
        .send()
        .await
        .expect("a sign-in");
    assert_eq!(answer.status(), 303);
    let set_cookie = answer.headers()["set-cookie"]
        .to_str()
        .expect("a cookie")
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(
        !set_cookie.contains("Secure"),
        "no Secure without TLS: {set_cookie}"
    );

    // A form without this session's CSRF token is refused.
    browser.goto(&format!("{base}/repos")).await;
    browser
        .script("document.querySelector('form[action=\"/sign-out\"] input[name=csrf]').remove(); return true;")
        .await;
    browser.click("form[action='/sign-out'] button").await;
    let text = browser.text().await;
    assert!(text.contains("Request refused"), "{text}");
    assert!(text.contains("security token (CSRF)"), "{text}");
    browser.screenshot("refused-csrf").await;
    browser.assert_accessible("the refusal page").await;
    browser.goto(&format!("{base}/repos")).await;
    assert!(browser.url().await.ends_with("/repos"), "still signed in");

    // A cross-site form post (another origin: localhost, not 127.0.0.1).
    let evil = CrossSitePage::start(&format!("{base}/sign-out")).await;
    browser.goto(&evil.url).await;
    browser.click("button").await;
    let text = browser.text().await;
    assert!(text.contains("another site"), "{text}");
    browser.goto(&format!("{base}/repos")).await;
    assert!(
        browser.url().await.ends_with("/repos"),
        "the cross-site post did not sign out"
    );

    // Sign-out ends the session: the old cookie no longer works.
    browser.click("form[action='/sign-out'] button").await;
    assert!(
        browser.url().await.ends_with("/sign-in"),
        "{}",
        browser.url().await
    );
    let old = signed_in
        .get(format!("{base}/repos"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(old.status(), 303);
    assert_eq!(old.headers()["location"], "/sign-in");
    browser.goto(&format!("{base}/repos")).await;
    assert!(browser.url().await.ends_with("/sign-in"));
    browser.close().await;
}

/// A GitHub user sees only the repositories their token can read, with a
/// link to GitHub and the webhook URL but never the webhook secret, and
/// not the agents (admin only); a login with a script tag is shown as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_github_user_sees_only_their_repositories() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let github = FakeGitHub::start().await;
    github.add_repo("octo-org", "mine", "main");
    github.add_repo("octo-org", "theirs", "main");
    let alice = "ghp_alice0123456789";
    let bob = "ghp_bob0123456789";
    github.add_user("alice", alice);
    github.add_user("bob", bob);
    github.grant(alice, "octo-org/mine", Permission::Admin);
    github.grant(bob, "octo-org/theirs", Permission::Admin);
    let controller = Controller::start(ControllerOpts {
        extra_args: github.controller_args(),
        ..ControllerOpts::default()
    })
    .await;
    let base = controller.url();
    let mut secrets = Vec::new();
    for (login, token, name) in [("alice", alice, "mine"), ("bob", bob, "theirs")] {
        let registered = Api::new(base.clone(), Some(token))
            .raw_with_headers(
                Method::POST,
                "/api/v1/repos",
                Some(
                    json!({ "owner": "octo-org", "name": name })
                        .to_string()
                        .as_bytes(),
                ),
                &[
                    ("x-github-username", login),
                    ("content-type", "application/json"),
                ],
            )
            .await;
        assert_eq!(registered.status, 201, "{}", registered.text());
        secrets.push(
            registered.json()["webhook_secret"]
                .as_str()
                .expect("a secret")
                .to_owned(),
        );
    }

    // A wrong token with a hostile login: a clear message, the login as text.
    sign_in_with(&browser, &base, "ghp_wrong", XSS).await;
    let text = browser.text().await;
    assert!(text.contains("Wrong credentials"), "{text}");
    let login_field = browser
        .script("return document.querySelector('#login').value;")
        .await;
    assert_eq!(login_field, json!(XSS));
    assert_no_injected_script(&browser, "/sign-in").await;

    sign_in_with(&browser, &base, alice, "alice").await;
    assert!(
        browser.url().await.ends_with("/repos"),
        "{}",
        browser.url().await
    );
    let text = browser.text().await;
    assert!(text.contains("octo-org/mine"), "{text}");
    assert!(!text.contains("octo-org/theirs"), "{text}");
    assert!(
        text.contains("/webhooks/github/"),
        "the webhook URL: {text}"
    );
    assert!(text.contains("Signed in as alice"), "{text}");
    let link = browser
        .script("return document.querySelector('a[href$=\"/octo-org/mine\"]').href;")
        .await;
    assert_eq!(link, json!(format!("{}/octo-org/mine", github.url())));
    let source = browser
        .script("return document.documentElement.outerHTML;")
        .await;
    let source = source.as_str().unwrap_or_default();
    for secret in &secrets {
        assert!(
            !source.contains(secret.as_str()),
            "a webhook secret in the page"
        );
    }
    assert!(!source.contains(alice), "the user's token in the page");
    assert!(
        !source.contains("href=\"/agents\""),
        "the agents are the admin's"
    );
    browser.screenshot("repos-github-user").await;
    browser.assert_accessible("/repos as a GitHub user").await;

    browser.goto(&format!("{base}/agents")).await;
    let text = browser.text().await;
    assert!(text.contains("needs the admin token"), "{text}");
    browser.assert_accessible("/agents refused").await;
    browser.close().await;
}

/// Two controllers on one Redis: a session opened through one works through
/// the other, and signing out through the other ends it on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_works_across_controllers_sharing_redis() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let redis = RedisServer::start().await;
    let first = Controller::start(ControllerOpts {
        redis_url: Some(redis.url()),
        ..ControllerOpts::default()
    })
    .await;
    let second = Controller::start(first.peer_opts()).await;
    let repo = GitRepo::new();
    first.api().register_repo("shared", &repo.url()).await;

    sign_in_with(&browser, &first.url(), &first.admin_token, "").await;
    assert!(browser.url().await.ends_with("/repos"));
    browser.goto(&format!("{}/repos", second.url())).await;
    assert!(
        browser.url().await.ends_with("/repos"),
        "{}",
        browser.url().await
    );
    let text = browser.text().await;
    assert!(text.contains("local/shared"), "{text}");
    assert!(text.contains("Signed in as admin"), "{text}");

    browser.click("form[action='/sign-out'] button").await;
    browser.goto(&format!("{}/repos", first.url())).await;
    assert!(
        browser.url().await.ends_with("/sign-in"),
        "signed out on both"
    );
    browser.close().await;
}

/// A page on another origin (`localhost` rather than `127.0.0.1`) with a
/// form that posts to the dashboard: what a hostile site would serve.
struct CrossSitePage {
    url: String,
    _server: tokio::task::JoinHandle<()>,
}

impl CrossSitePage {
    async fn start(target: &str) -> CrossSitePage {
        let html = format!(
            "<!doctype html><html lang=en><title>elsewhere</title>\
             <form method=post action=\"{target}\"><input type=hidden name=csrf value=guess>\
             <button type=submit>Win a prize</button></form></html>"
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let port = listener.local_addr().expect("its address").port();
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || async move { axum::response::Html(html) }),
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        CrossSitePage {
            url: format!("http://localhost:{port}/"),
            _server: server,
        }
    }
}
