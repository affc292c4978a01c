//! The web dashboard in a real Chromium, against real controller and agent
//! processes: signing in (the admin token, a GitHub user of the fake
//! GitHub, a wrong token), what each sees, signing out, CSRF and
//! cross-site posts, sessions shared by two controllers on one Redis,
//! escaping, accessibility (axe-core on every page) and security headers;
//! the jobs list: live, filtered, paged, and for a GitHub user only the
//! jobs of repositories they can read (live too; another's job not found);
//! a job's page: its live log through a controller restart, a hostile log
//! rendered as text, line links, the raw download, Cancel and Retry by
//! access; a repository's page: Deploy through its confirmation exactly
//! once (double click and resubmission included), variables and
//! write-only secrets, and what a reader may not do.
//! Every main page at a phone's width, and keyboard-only use (sign-in and
//! a job's Cancel with key actions).
//! Screenshots of every page go to `target/browser-screenshots/`.

#![allow(clippy::disallowed_methods)] // starts chromedriver and a cross-site page server

use std::time::Duration;

use hobotnica_tests::browser::{Browser, BrowserMemory, Setup, Site, http};
use hobotnica_tests::git::{BIG_OUTPUT_LINES, big_output_line};
use hobotnica_tests::redis::RedisServer;
use hobotnica_tests::{Agent, Controller, ControllerOpts, GitRepo, JobState, Permission};
use reqwest::Method;
use serde_json::json;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);
const XSS: &str = "<script>alert(1)</script>";
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

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
    let Some(site) = Setup::new().agent().repo("demo").start().await else {
        return;
    };
    let (browser, api, base, repo) = (&site.browser, site.api(), site.base(), &site.repo);
    let admin_token = &site.controller.admin_token;
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
    browser.assert_url_ends_with("/sign-in").await;
    browser.doc_screenshot("sign-in").await;
    browser.assert_accessible("/sign-in").await;

    // A wrong token: the sign-in page again, saying so.
    site.sign_in("hbt_admin_not-the-token", "").await;
    let text = browser.text().await;
    assert!(text.contains("Wrong credentials"), "{text}");
    assert!(text.contains("not the admin token"), "{text}");
    assert!(browser.cookie("hobotnica_session").await.is_none());
    browser.screenshot("sign-in-wrong-token").await;
    browser.assert_accessible("/sign-in with an error").await;

    // The admin token: the repositories.
    site.sign_in_as_admin().await;
    browser.assert_url_ends_with("/repos").await;
    let text = browser.text().await;
    assert!(text.contains("local/demo"), "{text}");
    assert!(text.contains("succeeded"), "the last test's result: {text}");
    assert!(text.contains(&format!("job #{}", job.id)), "{text}");
    assert!(text.contains(XSS), "the git URL shows as text: {text}");
    assert!(text.contains("Signed in as admin"), "{text}");
    assert_no_injected_script(browser, "/repos").await;
    browser.screenshot("repos-admin").await;
    browser.assert_accessible("/repos").await;

    // The agents.
    browser.click("a[href='/agents']").await;
    let text = browser.text().await;
    let agents = api.agents().await;
    let name = agents[0]["name"].as_str().expect("an agent name");
    assert!(text.contains(name), "{text}");
    assert!(text.contains("connected"), "{text}");
    assert_eq!(
        agents[0]["controller"],
        json!(base),
        "the controller its session is on"
    );
    assert!(text.contains(&base), "the agent's controller shown: {text}");
    browser.doc_screenshot("agents").await;
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
            !html.contains(admin_token.as_str()),
            "{page} shows the admin token"
        );
        weights.push((page, html.len()));
    }
    let mut asset_bytes = 0;
    for url in browser.asset_urls().await {
        let url = url.as_str();
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
        .body(format!("token={admin_token}&login="))
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
    site.open("/repos").await;
    browser
        .script("document.querySelector('form[action=\"/sign-out\"] input[name=csrf]').remove(); return true;")
        .await;
    browser.sign_out().await;
    let text = browser.text().await;
    assert!(text.contains("Request refused"), "{text}");
    assert!(text.contains("security token (CSRF)"), "{text}");
    browser.screenshot("refused-csrf").await;
    browser.assert_accessible("the refusal page").await;
    site.open("/repos").await;
    assert!(browser.url().await.ends_with("/repos"), "still signed in");

    // A cross-site form post (another origin: localhost, not 127.0.0.1).
    let evil = CrossSitePage::start(&format!("{base}/sign-out")).await;
    browser.goto(&evil.url).await;
    browser.click("button").await;
    let text = browser.text().await;
    assert!(text.contains("another site"), "{text}");
    site.open("/repos").await;
    assert!(
        browser.url().await.ends_with("/repos"),
        "the cross-site post did not sign out"
    );

    // Sign-out ends the session: the old cookie no longer works.
    browser.sign_out().await;
    browser.assert_url_ends_with("/sign-in").await;
    let old = signed_in
        .get(format!("{base}/repos"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(old.status(), 303);
    assert_eq!(old.headers()["location"], "/sign-in");
    site.open("/repos").await;
    assert!(browser.url().await.ends_with("/sign-in"));
    site.close().await;
}

/// A GitHub user sees only the repositories their token can read, with a
/// link to GitHub and the webhook URL but never the webhook secret, and
/// not the agents (admin only); a login with a script tag is shown as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_github_user_sees_only_their_repositories() {
    let Some(site) = Setup::new().github().start().await else {
        return;
    };
    let (browser, github) = (&site.browser, site.github());
    let alice = &site.github_user("alice");
    let bob = &site.github_user("bob");
    site.github_repo("mine", &[(alice, Permission::Admin)]);
    site.github_repo("theirs", &[(bob, Permission::Admin)]);
    let mut secrets = Vec::new();
    for (login, token, name) in [("alice", alice, "mine"), ("bob", bob, "theirs")] {
        let registered = site.register_github_repo(login, token, name).await;
        secrets.push(
            registered.json()["webhook_secret"]
                .as_str()
                .expect("a secret")
                .to_owned(),
        );
    }

    // A wrong token with a hostile login: a clear message, the login as text.
    site.sign_in("ghp_wrong", XSS).await;
    let text = browser.text().await;
    assert!(text.contains("Wrong credentials"), "{text}");
    let login_field = browser
        .script("return document.querySelector('#login').value;")
        .await;
    assert_eq!(login_field, json!(XSS));
    assert_no_injected_script(browser, "/sign-in").await;

    site.sign_in(alice, "alice").await;
    browser.assert_url_ends_with("/repos").await;
    let text = browser.text().await;
    assert!(text.contains("octo-org/mine"), "{text}");
    assert!(!text.contains("octo-org/theirs"), "{text}");
    assert!(
        text.contains("/webhooks/github/"),
        "the webhook URL: {text}"
    );
    assert!(text.contains("Signed in as alice"), "{text}");
    let link = browser
        .script("return document.querySelector('a[rel=noopener][href$=\"/octo-org/mine\"]').href;")
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
    assert!(
        !source.contains(alice.as_str()),
        "the user's token in the page"
    );
    assert!(
        !source.contains("href=\"/agents\""),
        "the agents are the admin's"
    );
    browser.screenshot("repos-github-user").await;
    browser.assert_accessible("/repos as a GitHub user").await;

    site.open("/agents").await;
    let text = browser.text().await;
    assert!(text.contains("needs the admin token"), "{text}");
    browser.assert_accessible("/agents refused").await;
    site.close().await;
}

/// Two controllers on one Redis: a session opened through one works through
/// the other; each agent's controller shows on either's agents page; and
/// signing out through the other ends the session on both.
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

    browser.sign_in(&first.url(), &first.admin_token, "").await;
    assert!(browser.url().await.ends_with("/repos"));
    browser.goto(&format!("{}/repos", second.url())).await;
    browser.assert_url_ends_with("/repos").await;
    let text = browser.text().await;
    assert!(text.contains("local/shared"), "{text}");
    assert!(text.contains("Signed in as admin"), "{text}");

    // An agent whose session is on the second controller: the first's
    // agents page names the second.
    let _agent = Agent::start_default(&second).await;
    let api = first.api();
    hobotnica_tests::wait_until(JOB_TIMEOUT, "the agent's controller recorded", || async {
        api.agents()
            .await
            .first()
            .map(|agent| agent["controller"].clone())
            == Some(json!(second.url()))
    })
    .await;
    browser.goto(&format!("{}/agents", first.url())).await;
    let text = browser.text().await;
    assert!(
        text.contains(&second.url()),
        "the agent's controller on the first controller's page: {text}"
    );

    browser.sign_out().await;
    browser.goto(&format!("{}/repos", first.url())).await;
    assert!(
        browser.url().await.ends_with("/sign-in"),
        "signed out on both"
    );
    browser.close().await;
}

/// The GitHub users `alice`, who administers `octo-org/mine`, and
/// `reader`, who may only read it: their tokens.
fn admin_and_reader(site: &Site) -> (String, String) {
    let alice = site.github_user("alice");
    let reader = site.github_user("reader");
    site.github_repo(
        "mine",
        &[(&alice, Permission::Admin), (&reader, Permission::Pull)],
    );
    (alice, reader)
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

/// The fixture's Makefile with the targets a job page's tests run:
/// `stream` prints lines 1-5, waits for `$E2E_GATE`, prints 6-10, waits
/// for `$E2E_GATE2`, prints 11-40; `hostile` prints markup, an OSC 8
/// hyperlink and an SGR colour; `yellow` prints a line, waits for
/// `$E2E_GATE`, turns yellow (SGR 33, never reset) and prints what `big`
/// prints.
fn job_page_makefile() -> String {
    let wait = |gate: &str| {
        format!(
            "\t@n=0; while [ ! -e \"$${gate}\" ]; do n=$$((n+1)); if [ $$n -gt 2400 ]; then echo \"the gate never opened\" >&2; exit 9; fi; sleep 0.05; done\n"
        )
    };
    format!(
        "{makefile}\nstream:\n\
         \t@for i in 1 2 3 4 5; do echo \"line $$i\"; sleep 0.05; done\n\
         {gate1}\
         \t@for i in 6 7 8 9 10; do echo \"line $$i\"; sleep 0.05; done\n\
         {gate2}\
         \t@for i in $$(seq 11 40); do echo \"line $$i\"; sleep 0.02; done\n\
         \nhostile:\n\
         \t@printf '%s\\n' '<script>alert(1)</script>' '<img src=x onerror=alert(1)>'\n\
         \t@printf '\\033]8;;javascript:alert(1)\\033\\\\click\\033]8;;\\033\\\\\\n'\n\
         \t@printf 'plain \\033[31mred text\\033[0m plain\\n'\n\
         \nyellow:\n\
         \t@echo \"before the gate\"\n\
         {gate1}\
         \t@printf '\\033[33m'\n\
         \t@seq -f 'line %094.0f' 1 {big_lines}\n",
        makefile = hobotnica_tests::git::MAKEFILE,
        gate1 = wait("E2E_GATE"),
        gate2 = wait("E2E_GATE2"),
        big_lines = BIG_OUTPUT_LINES,
    )
}

/// An agent and `local/demo` with [`job_page_makefile`].
fn job_page_setup() -> Setup {
    Setup::new()
        .agent()
        .makefile(job_page_makefile())
        .repo("demo")
}

/// A running job's page shows its log lines as they are printed, keeps
/// them through a controller restart (each line once, in order) and shows
/// the final state when the job ends, without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_jobs_log_streams_live_through_a_controller_restart() {
    let Some(mut site) = job_page_setup().start().await else {
        return;
    };
    let api = site.api();
    let gates = site.controller.scratch_dir("gates");
    let (gate1, gate2) = (gates.join("one"), gates.join("two"));
    let job = api
        .run_job(
            "local/demo",
            json!({ "target": "stream", "env": {
                "E2E_GATE": gate1.to_string_lossy(),
                "E2E_GATE2": gate2.to_string_lossy(),
            } }),
        )
        .await;
    api.wait_for_log(job.id, "line 5", JOB_TIMEOUT).await;
    site.sign_in_as_admin().await;
    let browser = &site.browser;

    let opened = std::time::Instant::now();
    site.open(&format!("/jobs/{}", job.id)).await;
    browser.wait_for_log_line("line 1").await;
    println!(
        "time to the first log line of a running job: {} ms",
        opened.elapsed().as_millis()
    );
    browser.wait_for_log_line("line 5").await;
    let text = browser.text().await;
    assert!(text.contains("running"), "{text}");
    assert!(text.contains("make stream"), "{text}");
    assert_no_injected_script(browser, "a job's page").await;

    // More lines arrive while the job runs.
    std::fs::write(&gate1, b"").expect("gate one opened");
    browser.wait_for_log_line("line 10").await;
    assert_eq!(
        api.job(job.id).await.state,
        hobotnica_tests::JobState::Running
    );
    browser.doc_screenshot("job-running").await;
    browser.assert_accessible("a running job's page").await;

    // The controller restarts while the job prints the rest.
    std::fs::write(&gate2, b"").expect("gate two opened");
    site.controller.restart().await;
    let (browser, api) = (&site.browser, site.api());
    api.wait_for_success(job.id, JOB_TIMEOUT).await;
    browser.wait_for_job_state("succeeded").await;
    browser.wait_for_log_line("line 40").await;

    let log = String::from_utf8(api.log(job.id).await).expect("a text log");
    let expected: Vec<&str> = log.lines().collect();
    let shown = browser.log_lines().await;
    let texts: Vec<&str> = shown.iter().map(|(_, text)| text.as_str()).collect();
    assert_eq!(texts, expected, "every line once, in order");
    let numbers: Vec<String> = shown.iter().map(|(number, _)| number.clone()).collect();
    let counted: Vec<String> = (1..=shown.len()).map(|n| n.to_string()).collect();
    assert_eq!(numbers, counted);
    let printed: Vec<&str> = texts
        .iter()
        .copied()
        .filter(|line| line.starts_with("line "))
        .collect();
    let wanted: Vec<String> = (1..=40).map(|n| format!("line {n}")).collect();
    assert_eq!(printed, wanted);
    let text = browser.text().await;
    assert!(text.contains("The job ended: succeeded"), "{text}");
    let exit = browser
        .script("return document.querySelector('#job-exit').textContent;")
        .await;
    assert_eq!(exit, json!("0"));
    browser.screenshot("job-finished").await;
    browser.assert_accessible("a finished job's page").await;

    // The job page's weight: HTML + CSS + JS.
    let html = site.get_signed_in(&format!("/jobs/{}", job.id)).await;
    assert_page_headers(&html, "a job's page");
    let html = html.text().await.expect("its HTML").len();
    let mut asset_bytes = 0;
    for url in browser.asset_urls().await {
        let url = url.as_str();
        let response = http(None).get(url).send().await.expect("the asset");
        assert_eq!(response.status(), 200, "{url}");
        asset_bytes += response.bytes().await.expect("its bytes").len();
    }
    println!(
        "page weight: /jobs/{{id}}: {html} bytes HTML + {asset_bytes} bytes CSS and JS = {} bytes",
        html + asset_bytes
    );
    site.close().await;
}

/// A hostile log renders as text (no alert, no element, no link), an SGR
/// colour as a coloured span; `#L3` highlights line 3; the raw download is
/// the log's exact bytes, as an attachment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_log_renders_as_text_and_downloads_exactly() {
    let Some(site) = job_page_setup().start().await else {
        return;
    };
    let (browser, api, base) = (&site.browser, site.api(), site.base());
    let job = api.run_target("local/demo", "hostile").await;
    api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let log = api.log(job.id).await;
    assert!(
        log.windows(4).any(|w| w == b"\x1b]8;"),
        "make printed the OSC 8 link"
    );

    site.sign_in_as_admin().await;
    site.open(&format!("/jobs/{}#L3", job.id)).await;
    browser.wait_for_log_line("plain red text plain").await;
    assert_no_injected_script(browser, "a hostile log").await;
    let found = browser
        .script(
            "return {
               scripts: document.querySelectorAll('#log script').length,
               images: document.querySelectorAll('img').length,
               js_links: [...document.querySelectorAll('a')].filter(a => a.href.startsWith('javascript:')).length,
               red: [...document.querySelectorAll('#log span.fg-red')].map(s => s.textContent),
               highlighted: [...document.querySelectorAll('#log .line.hl')].map(l => l.id),
             };",
        )
        .await;
    assert_eq!(found["scripts"], json!(0), "{found}");
    assert_eq!(found["images"], json!(0), "{found}");
    assert_eq!(found["js_links"], json!(0), "{found}");
    assert_eq!(found["red"], json!(["red text"]), "{found}");
    assert_eq!(found["highlighted"], json!(["L3"]), "{found}");
    let texts: Vec<String> = browser
        .log_lines()
        .await
        .into_iter()
        .map(|(_, text)| text)
        .collect();
    assert!(texts.iter().any(|t| t == XSS), "{texts:?}");
    assert!(
        texts.iter().any(|t| t == "<img src=x onerror=alert(1)>"),
        "{texts:?}"
    );
    assert!(
        texts.iter().any(|t| t == "click"),
        "the link's text only: {texts:?}"
    );
    assert!(!browser.alert_open().await);
    browser.screenshot("job-hostile-log").await;
    browser
        .assert_accessible("a job's page with a hostile log")
        .await;

    // Another line by its link.
    browser
        .script("document.querySelector('#L1 .ln').click(); return true;")
        .await;
    hobotnica_tests::wait_until(JOB_TIMEOUT, "line 1 highlighted", || async {
        browser
            .script("return [...document.querySelectorAll('#log .line.hl')].map(l => l.id);")
            .await
            == json!(["L1"])
    })
    .await;

    // The raw download: the exact bytes, as an attachment.
    let raw = site
        .get_signed_in(&format!("/jobs/{}/log/raw", job.id))
        .await;
    assert_eq!(raw.status(), 200);
    assert_eq!(raw.headers()["content-type"], "text/plain");
    assert_eq!(
        raw.headers()["content-disposition"],
        format!("attachment; filename=\"job-{}.log\"", job.id).as_str()
    );
    assert_eq!(
        raw.bytes().await.expect("the bytes").as_ref(),
        log.as_slice()
    );
    let link = browser
        .script("return document.querySelector('a[download]').getAttribute('href');")
        .await;
    assert_eq!(link, json!(format!("/jobs/{}/log/raw", job.id)));
    // Without a session: no log.
    let anonymous = http(None)
        .get(format!("{base}/jobs/{}/log/raw", job.id))
        .send()
        .await
        .expect("an answer");
    assert_eq!(anonymous.status(), 303);
    site.close().await;
}

/// Cancel stops a running job; Retry makes a new job and shows its page; a
/// GitHub user who may only read the repository sees neither button, and
/// a forged cancel from them is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_retry_buttons_follow_push_access() {
    let Some(site) = Setup::new().github().agent().repo("demo").start().await else {
        return;
    };
    let (browser, api, github) = (&site.browser, site.api(), site.github());
    let (alice, reader) = &admin_and_reader(&site);

    // The admin cancels a running job with the button.
    let job = site.job_running_until_cancelled().await;
    site.sign_in_as_admin().await;
    site.open(&format!("/jobs/{}", job.id)).await;
    browser.wait_for_log_line("waiting for the gate").await;
    browser.screenshot("job-cancel-button").await;
    browser.click("#cancel-form button").await;
    let ended = api.wait_for_end(job.id, JOB_TIMEOUT).await;
    assert_eq!(ended.state, hobotnica_tests::JobState::Cancelled);
    browser.wait_for_job_state("cancelled").await;
    let hidden = browser
        .script("return [document.querySelector('#cancel-form').hidden, document.querySelector('#retry-form').hidden];")
        .await;
    assert_eq!(
        hidden,
        json!([true, false]),
        "Retry, not Cancel, once ended"
    );

    // Retry: a new job, and its page.
    browser.click("#retry-form button").await;
    let url = browser.url().await;
    let new_id: u64 = url
        .rsplit('/')
        .next()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("a job's page: {url}"));
    assert_ne!(new_id, job.id);
    let retried = api.job(new_id).await;
    assert_eq!(retried.target, "gate");
    assert_eq!(retried.trigger, "retry");
    api.cancel(new_id).await;

    // A reader of a GitHub repository: the job, no buttons; a forged post fails.
    site.register_github_repo("alice", alice, "mine").await;
    let queued = site
        .queue_github_job(
            "alice",
            alice,
            "octo-org/mine",
            &json!({ "target": "gate", "env": { "E2E_GATE": "/nonexistent/gate" } }),
        )
        .await;
    let github_job = queued.json()["id"].as_u64().expect("a job id");
    let commit = queued.json()["commit"]
        .as_str()
        .expect("a commit")
        .to_owned();
    browser.sign_out().await;
    site.sign_in(reader, "reader").await;
    site.open(&format!("/jobs/{github_job}")).await;
    let text = browser.text().await;
    assert!(text.contains("octo-org/mine"), "{text}");
    let found = browser
        .script(
            "return {
               cancel: document.querySelectorAll('#cancel-form').length,
               retry: document.querySelectorAll('#retry-form').length,
               commit: [...document.querySelectorAll('a')].map(a => a.href).filter(h => h.includes('/commit/')),
             };",
        )
        .await;
    assert_eq!(found["cancel"], json!(0), "{found}");
    assert_eq!(found["retry"], json!(0), "{found}");
    assert_eq!(
        found["commit"],
        json!([format!("{}/octo-org/mine/commit/{commit}", github.url())])
    );
    browser.screenshot("job-read-only").await;
    browser.assert_accessible("a job's page for a reader").await;
    // A forged cancel with the reader's own valid CSRF token.
    let forged = browser
        .client
        .execute_async(
            &format!(
                "const done = arguments[arguments.length - 1];
                 const csrf = document.querySelector('form[action=\"/sign-out\"] input[name=csrf]').value;
                 fetch('/jobs/{github_job}/cancel', {{ method: 'POST',
                   headers: {{ 'content-type': 'application/x-www-form-urlencoded' }},
                   body: 'csrf=' + encodeURIComponent(csrf), redirect: 'manual' }})
                   .then(r => r.text().then(t => done([r.status, t])))
                   .catch(e => done([0, String(e)]));"
            ),
            Vec::new(),
        )
        .await
        .expect("the forged post ran");
    assert_eq!(forged[0], json!(403), "{forged}");
    let after = api.job(github_job).await;
    assert!(
        matches!(
            after.state,
            hobotnica_tests::JobState::Queued | hobotnica_tests::JobState::Running
        ),
        "the reader's cancel changed nothing: {after:?}"
    );
    // The same answer as the REST API for a GitHub user who cannot read it.
    let stranger = &site.github_user("stranger");
    browser.sign_out().await;
    site.sign_in(stranger, "stranger").await;
    let page = site.get(&format!("/jobs/{github_job}")).await;
    assert_eq!(page.status(), 404);
    api.cancel(github_job).await;
    site.close().await;
}

/// Line numbers match the log: every shown `make big` line `line <m>` is
/// log line `m + header` (the agent's own lines come first). Returns the
/// first shown line number.
async fn assert_big_log_numbers(browser: &Browser) -> u64 {
    let shown = browser.log_lines().await;
    let mut header = None;
    for (number, text) in &shown {
        let number: u64 = number.parse().expect("a line number");
        let Some(printed) = text
            .strip_prefix("line ")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let offset = number - printed;
        assert_eq!(
            *header.get_or_insert(offset),
            offset,
            "line {number}: {text}"
        );
    }
    shown
        .first()
        .map(|(number, _)| number.parse().expect("a line number"))
        .expect("shown lines")
}

/// Clicks "Load earlier" and waits until the page shows lines before
/// line `first`, numbered as in the log.
async fn load_earlier_than(browser: &Browser, first: u64) {
    browser
        .script("document.querySelector('#log-earlier').click(); return true;")
        .await;
    let what = format!("lines before {first} loaded");
    hobotnica_tests::wait_until(JOB_TIMEOUT, &what, || async {
        browser
            .script("return Number(document.querySelector('#log .line .ln').textContent);")
            .await
            .as_u64()
            .is_some_and(|now| now < first)
    })
    .await;
    assert_big_log_numbers(browser).await;
}

/// A 50 MiB log streams into an open page without freezing it (the page
/// keeps answering scripts and holds a bounded number of lines); once it
/// ended, "Load earlier" brings back the part before, correctly numbered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_log_streams_into_the_page_and_loads_earlier_parts() {
    let Some(site) = Setup::new().agent().repo("demo").start().await else {
        return;
    };
    let (browser, api) = (&site.browser, site.api());
    site.sign_in_as_admin().await;
    let job = api.run_target("local/demo", "big").await;
    api.wait_for_state(job.id, &[JobState::Running], JOB_TIMEOUT)
        .await;
    site.open(&format!("/jobs/{}", job.id)).await;
    let started = std::time::Instant::now();
    let peak = std::cell::Cell::new(BrowserMemory::default());
    let slowest_answer = std::cell::Cell::new(Duration::ZERO);
    let heap = std::cell::Cell::new(0u64);
    let last_line = big_output_line(BIG_OUTPUT_LINES);
    let last_line = last_line.trim_end();
    hobotnica_tests::wait_until(Duration::from_secs(300), "the whole log shown", || {
        peak.set(peak.get().max(browser.memory()));
        let (slowest_answer, heap) = (&slowest_answer, &heap);
        async move {
            let asked = std::time::Instant::now();
            let seen = browser
                .script(
                    "const l = document.querySelector('#log .block:last-child .line:last-child .tx');
                     return [l ? l.textContent : '', performance.memory ? performance.memory.usedJSHeapSize : 0];",
                )
                .await;
            slowest_answer.set(slowest_answer.get().max(asked.elapsed()));
            heap.set(heap.get().max(seen[1].as_u64().unwrap_or(0)));
            seen[0] == json!(last_line)
        }
    })
    .await;
    let peak = peak.get();
    let ran = api.wait_for_success(job.id, JOB_TIMEOUT).await;
    println!(
        "the job ran from {:?} to {:?}; the page's JavaScript heap at most {} MiB",
        ran.started_at,
        ran.finished_at,
        heap.get() / (1 << 20)
    );
    println!(
        "a 50 MiB log streamed into the page in {} ms; the page answered a script within {} ms \
         at worst; chromium's resident memory at most {} MiB (all processes, shared pages \
         counted in each), its renderer's {} MiB",
        started.elapsed().as_millis(),
        slowest_answer.get().as_millis(),
        peak.total_bytes / (1 << 20),
        peak.largest_renderer_bytes / (1 << 20)
    );
    let asked = std::time::Instant::now();
    let events = site
        .get_signed_in(&format!("/jobs/{}/log/events?from=0", job.id))
        .await
        .bytes()
        .await
        .expect("all events");
    println!(
        "the whole log as events: {} bytes in {} ms",
        events.len(),
        asked.elapsed().as_millis()
    );
    let count = browser
        .script("return document.querySelectorAll('#log .line').length;")
        .await;
    assert!(
        count.as_u64().is_some_and(|count| count <= 20_500),
        "the page keeps about 20 000 lines (whole blocks of 500): {count}"
    );
    let first = assert_big_log_numbers(browser).await;
    assert!(first > 1, "older lines left the page");
    browser.screenshot("job-big-log").await;

    load_earlier_than(browser, first).await;
    site.close().await;
}

/// The jobs list's rows, newest first, each as `[id, state]`.
async fn job_rows(browser: &Browser) -> serde_json::Value {
    browser
        .script("return [...document.querySelectorAll('#jobs tbody tr')].map(r => [Number(r.dataset.id), r.querySelector('.state').textContent]);")
        .await
}

/// A page that falls far behind a log it follows (here: its script
/// thread is busy while the job writes 50 MiB) skips to the log's last
/// part instead of drawing everything: the lines after the skip are
/// numbered as in the log and keep the colour set before it, "Load
/// earlier" brings back what was skipped, and a page opened afresh starts
/// in that colour too. The skip event itself says exactly what it jumped
/// over, and every byte after it comes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_far_behind_skips_ahead_in_the_jobs_colours_and_loads_what_it_skipped() {
    let Some(site) = job_page_setup().start().await else {
        return;
    };
    let (browser, api) = (&site.browser, site.api());
    site.sign_in_as_admin().await;
    let gate = site.controller.scratch_dir("gates").join("yellow");
    let job = api
        .run_job(
            "local/demo",
            json!({ "target": "yellow", "env": { "E2E_GATE": gate.to_string_lossy() } }),
        )
        .await;
    api.wait_for_log(job.id, "before the gate", JOB_TIMEOUT)
        .await;
    site.open(&format!("/jobs/{}", job.id)).await;
    browser.wait_for_log_line("before the gate").await;

    // Keep the page's script thread busy until the job has finished, so
    // that the stream falls tens of MiB behind.
    std::fs::write(&gate, b"").expect("the gate opens");
    let finished_while_busy = browser
        .script(&format!(
            "const until = Date.now() + 25000;
             for (;;) {{
               const page = new XMLHttpRequest();
               page.open('GET', '/jobs/{id}', false);
               page.send();
               if (page.responseText.includes('data-state=\"succeeded\"')) return true;
               if (Date.now() > until) return false;
             }}",
            id = job.id
        ))
        .await;
    assert_eq!(
        finished_while_busy,
        json!(true),
        "the job ended while the page was busy"
    );
    let last_line = big_output_line(BIG_OUTPUT_LINES);
    let last_line = last_line.trim_end();
    hobotnica_tests::wait_until(JOB_TIMEOUT, "the log's last line shown", || async {
        browser.last_log_line().await == last_line
    })
    .await;
    let shown = browser
        .script(
            "const lines = [...document.querySelectorAll('#log .line .tx')];
             return {
               count: lines.length,
               not_yellow: lines.filter(l => !l.querySelector('span.fg-yellow')).length,
               earlier: !document.querySelector('#log-earlier').hidden,
             };",
        )
        .await;
    assert!(
        shown["count"].as_u64().is_some_and(|count| count < 5_000),
        "the page skipped to the last 256 KiB instead of drawing 20 000 lines: {shown}"
    );
    assert_eq!(shown["not_yellow"], json!(0), "{shown}");
    assert_eq!(shown["earlier"], json!(true), "{shown}");
    let first = assert_big_log_numbers(browser).await;
    load_earlier_than(browser, first).await;

    // Opened afresh, the page starts yellow: the colour set before its
    // first line.
    site.open(&format!("/jobs/{}", job.id)).await;
    browser.wait_for_log_line(last_line).await;
    let first_line_yellow = browser
        .script("return !!document.querySelector('#log .line .tx span.fg-yellow');")
        .await;
    assert_eq!(first_line_yellow, json!(true));

    // The skip, as the stream sends it to a page at the log's start.
    let log = api.log(job.id).await;
    let events = site
        .get_signed_in(&format!("/jobs/{}/log/events?from=0&catch_up=true", job.id))
        .await
        .text()
        .await
        .expect("the events");
    let mut kinds = Vec::new();
    let mut sent = Vec::new();
    let mut skip = serde_json::Value::Null;
    for event in events.split("\n\n") {
        let field = |name: &str| {
            event
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim_start)
                .unwrap_or_default()
                .to_owned()
        };
        match field("event:").as_str() {
            "skip" => {
                skip = serde_json::from_str(&field("data:")).expect("a skip as JSON");
                kinds.push("skip");
            }
            "log" => {
                use base64::Engine as _;
                let piece = base64::engine::general_purpose::STANDARD
                    .decode(field("data:"))
                    .expect("base64");
                sent.extend_from_slice(&piece);
                kinds.push("log");
            }
            "end" => kinds.push("end"),
            _ => {}
        }
    }
    assert_eq!(kinds.first(), Some(&"skip"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"end"), "{kinds:?}");
    let to = skip["to"].as_u64().expect("where the skip ends") as usize;
    assert_eq!(skip["from"], json!(0), "{skip}");
    assert_eq!(
        log[to - 1],
        b'\n',
        "the skip ends at a line's start: {skip}"
    );
    assert!(log.len() - to <= 256 * 1024, "{skip}");
    let lines = log[..to].iter().filter(|byte| **byte == b'\n').count();
    assert_eq!(skip["lines"], json!(lines), "{skip}");
    assert_eq!(skip["colours"], json!("33"), "{skip}");
    assert!(sent == log[to..], "every byte after the skip, once");
    site.close().await;
}

/// The jobs list: new and finished jobs appear without a reload; it
/// filters by state, repository and kind, and pages with "Older jobs".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_list_filters_pages_and_updates_live() {
    let Some(site) = Setup::new()
        .agent()
        .repo("demo")
        .repo("other")
        .start()
        .await
    else {
        return;
    };
    let (browser, api) = (&site.browser, site.api());
    let first = api.run_target("local/demo", "test").await;
    api.wait_for_success(first.id, JOB_TIMEOUT).await;
    let failed = api.run_target("local/other", "fail").await;
    api.wait_for_end(failed.id, JOB_TIMEOUT).await;

    site.sign_in_as_admin().await;
    browser.click("a[href='/jobs']").await;
    let rows = || job_rows(browser);
    assert_eq!(
        rows().await,
        json!([[failed.id, "failed"], [first.id, "succeeded"]])
    );
    browser.doc_screenshot("jobs").await;
    browser.assert_accessible("/jobs").await;

    // A new job appears, then its end, without a reload.
    browser.mark_page().await;
    let gate = site.controller.scratch_dir("gates").join("list");
    let live = api
        .run_job(
            "local/demo",
            json!({ "target": "gate", "env": { "E2E_GATE": gate.to_string_lossy() } }),
        )
        .await;
    hobotnica_tests::wait_until(JOB_TIMEOUT, "the new job running in the list", || async {
        rows().await[0] == json!([live.id, "running"])
    })
    .await;
    std::fs::write(&gate, b"").expect("the gate opened");
    hobotnica_tests::wait_until(JOB_TIMEOUT, "the new job succeeded in the list", || async {
        rows().await[0] == json!([live.id, "succeeded"])
    })
    .await;
    browser.assert_not_reloaded().await;

    // Filters.
    site.open("/jobs?state=succeeded&repo=local%2Fdemo").await;
    assert_eq!(
        rows().await,
        json!([[live.id, "succeeded"], [first.id, "succeeded"]])
    );
    site.open("/jobs?kind=custom").await;
    assert_eq!(
        rows().await,
        json!([[live.id, "succeeded"], [failed.id, "failed"]])
    );

    // Pages.
    site.open("/jobs?limit=2").await;
    assert_eq!(
        rows().await,
        json!([[live.id, "succeeded"], [failed.id, "failed"]])
    );
    browser.click("#older-jobs").await;
    assert_eq!(rows().await, json!([[first.id, "succeeded"]]));
    site.close().await;
}

/// A GitHub user's jobs list holds only jobs of repositories their token
/// can read: another repository's job is not listed, and stays so while
/// the list updates live (their own new job appears without a reload, the
/// other repository's does not); that job's page is not found for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_github_user_sees_only_jobs_of_repositories_they_can_read() {
    let Some(site) = Setup::new().github().start().await else {
        return;
    };
    let browser = &site.browser;
    let alice = &site.github_user("alice");
    let bob = &site.github_user("bob");
    site.github_repo("mine", &[(alice, Permission::Admin)]);
    site.github_repo("theirs", &[(bob, Permission::Admin)]);
    site.register_github_repo("alice", alice, "mine").await;
    site.register_github_repo("bob", bob, "theirs").await;
    // Each job is queued by its repository's own user; with no agent, it
    // stays queued.
    let queue = async |login: &str, token: &str, repo: &str| {
        site.queue_github_job(login, token, repo, &json!({ "target": "test" }))
            .await
            .json()["id"]
            .as_u64()
            .expect("a job id")
    };
    let mine = queue("alice", alice, "octo-org/mine").await;
    let theirs = queue("bob", bob, "octo-org/theirs").await;

    site.sign_in(alice, "alice").await;
    browser.click("a[href='/jobs']").await;
    assert_eq!(
        job_rows(browser).await,
        json!([[mine, "queued"]]),
        "only the readable repository's job"
    );
    let text = browser.text().await;
    assert!(text.contains("octo-org/mine"), "{text}");
    assert!(!text.contains("octo-org/theirs"), "{text}");
    browser.screenshot("jobs-github-user").await;
    browser.assert_accessible("/jobs as a GitHub user").await;

    // New jobs while the list is open: the other repository's first, then
    // one of the user's own. The events come in order, so once the user's
    // job is shown the other's would have been too, had it been sent.
    browser.mark_page().await;
    let theirs_new = queue("bob", bob, "octo-org/theirs").await;
    let mine_new = queue("alice", alice, "octo-org/mine").await;
    hobotnica_tests::wait_until(JOB_TIMEOUT, "the user's new job in the list", || async {
        job_rows(browser).await[0][0] == json!(mine_new)
    })
    .await;
    assert_eq!(
        job_rows(browser).await,
        json!([[mine_new, "queued"], [mine, "queued"]]),
        "neither {theirs} nor {theirs_new} of the other repository"
    );
    let text = browser.text().await;
    assert!(!text.contains("octo-org/theirs"), "{text}");
    browser.assert_not_reloaded().await;

    // The other repository's job by its address: not found.
    site.open(&format!("/jobs/{theirs}")).await;
    let text = browser.text().await;
    assert!(text.contains("Not found"), "{text}");
    assert!(!text.contains("octo-org/theirs"), "{text}");
    let page = site.get(&format!("/jobs/{theirs}")).await;
    assert_eq!(page.status(), 404);
    site.close().await;
}

/// Submits `body` (a form's fields, URL-encoded) to `path` from the page,
/// `count` times at once; the URL each answer ends at, or its status when
/// it is not a page the browser was redirected to.
async fn post_from_page(browser: &Browser, path: &str, body: &str, count: usize) -> Vec<String> {
    let answers = browser
        .client
        .execute_async(
            &format!(
                "const done = arguments[arguments.length - 1];
                 const post = () => fetch({path}, {{ method: 'POST',
                   headers: {{ 'content-type': 'application/x-www-form-urlencoded' }},
                   body: {body} }})
                   .then(r => r.status === 200 ? r.url : 'status ' + r.status)
                   .catch(e => String(e));
                 Promise.all(Array.from({{ length: {count} }}, post)).then(done);",
                path = json!(path),
                body = json!(body),
            ),
            Vec::new(),
        )
        .await
        .expect("the posts ran");
    answers
        .as_array()
        .expect("answers")
        .iter()
        .map(|answer| answer.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A form's fields, URL-encoded as the browser would send them.
async fn form_body(browser: &Browser, form: &str) -> String {
    browser
        .script(&format!(
            "return new URLSearchParams(new FormData(document.querySelector({}))).toString();",
            json!(form)
        ))
        .await
        .as_str()
        .expect("the form's fields")
        .to_owned()
}

/// A repository's page lists its jobs and the commits that ran `test`;
/// Deploy goes through a confirmation page naming repository, commit and
/// branch, and lands on the deploy job's page. Two clicks at once on the
/// confirm button, the same form posted again and posted twice at once
/// make exactly one deploy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_a_chosen_commit_exactly_once_from_the_repository_page() {
    let Some(site) = Setup::new().agent().repo("demo").start().await else {
        return;
    };
    let (browser, api, base, repo) = (&site.browser, site.api(), site.base(), &site.repo);
    let first = repo.head();
    let tested_first = api.run_target("local/demo", "test").await;
    api.wait_for_success(tested_first.id, JOB_TIMEOUT).await;
    let second = repo.commit_version("2");
    let tested_second = api.run_target("local/demo", "test").await;
    assert_eq!(tested_second.commit, second);
    api.wait_for_success(tested_second.id, JOB_TIMEOUT).await;

    site.sign_in_as_admin().await;
    browser.click("a[href='/repos/local/demo']").await;
    assert!(browser.url().await.ends_with("/repos/local/demo"));
    let text = browser.text().await;
    for needle in [
        "local/demo",
        "Deploy",
        &first[..12],
        &second[..12],
        "succeeded",
        "Never deployed",
        &format!("#{}", tested_first.id),
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    let job_links = browser
        .script("return [...document.querySelectorAll('#recent-jobs a')].map(a => a.getAttribute('href'));")
        .await;
    assert_eq!(
        job_links,
        json!([
            format!("/jobs/{}", tested_second.id),
            format!("/jobs/{}", tested_first.id)
        ])
    );
    browser.doc_screenshot("repo").await;
    browser.assert_accessible("a repository's page").await;

    // The older commit, through the confirmation page.
    browser
        .script(&format!(
            "document.getElementById('deploy-{first}').checked = true; return true;"
        ))
        .await;
    browser.click("#deploy-form button").await;
    assert!(
        browser.url().await.contains("/repos/local/demo/deploy"),
        "{}",
        browser.url().await
    );
    let text = browser.text().await;
    assert!(text.contains("Deploy local/demo?"), "{text}");
    assert!(text.contains(&first[..12]), "{text}");
    assert!(text.contains("main"), "{text}");
    assert!(
        api.jobs("repo=local/demo&kind=deploy").await.is_empty(),
        "nothing is deployed before the confirmation"
    );
    browser.screenshot("deploy-confirm").await;
    browser.assert_accessible("the deploy confirmation").await;
    let form = form_body(browser, "#confirm-form").await;
    assert!(form.contains("idempotency_key=web-"), "{form}");

    // A double click: two clicks fired at once.
    browser
        .script_and_wait(
            "const button = document.querySelector('#confirm-form button');
             button.click(); button.click(); return true;",
        )
        .await;
    let deploys = api.jobs("repo=local/demo&kind=deploy").await;
    assert_eq!(deploys.len(), 1, "{deploys:?}");
    let deploy = &deploys[0];
    assert_eq!(deploy.commit, first);
    assert_eq!(deploy.branch.as_deref(), Some("main"));
    let job_page = format!("{base}/jobs/{}", deploy.id);
    assert_eq!(browser.url().await, job_page);
    let text = browser.text().await;
    assert!(text.contains("make deploy"), "{text}");

    // The same form posted again, and twice at once: the same job.
    let answers = post_from_page(browser, "/repos/local/demo/deploy", &form, 1).await;
    assert_eq!(answers, vec![job_page.clone()]);
    let answers = post_from_page(browser, "/repos/local/demo/deploy", &form, 2).await;
    assert_eq!(answers, vec![job_page.clone(), job_page.clone()]);
    let deploys = api.jobs("repo=local/demo&kind=deploy").await;
    assert_eq!(deploys.len(), 1, "exactly one deploy: {deploys:?}");
    api.wait_for_end(deploy.id, JOB_TIMEOUT).await;

    // A new confirmation is a new deploy, however many times it is first
    // sent at once; the repository page lists both deploys.
    site.open("/repos/local/demo").await;
    browser.click("#deploy-form button").await;
    let text = browser.text().await;
    assert!(text.contains("the tip of main"), "{text}");
    let tip_form = form_body(browser, "#confirm-form").await;
    assert_ne!(tip_form, form, "a fresh Idempotency-Key");
    let answers = post_from_page(browser, "/repos/local/demo/deploy", &tip_form, 3).await;
    let deploys = api.jobs("repo=local/demo&kind=deploy").await;
    assert_eq!(deploys.len(), 2, "{deploys:?}");
    assert_eq!(deploys[0].commit, second, "the tip of main");
    let tip_page = format!("{base}/jobs/{}", deploys[0].id);
    assert_eq!(answers, vec![tip_page.clone(); 3]);
    browser.click("#confirm-form button").await;
    assert_eq!(browser.url().await, tip_page);
    assert_eq!(api.jobs("repo=local/demo&kind=deploy").await.len(), 2);
    site.open("/repos/local/demo").await;
    let deploy_links = browser
        .script(
            "return [...document.querySelectorAll('#deploys a')].map(a => a.getAttribute('href'));",
        )
        .await;
    assert_eq!(
        deploy_links,
        json!([
            format!("/jobs/{}", deploys[0].id),
            format!("/jobs/{}", deploys[1].id)
        ])
    );
    // The repositories list shows the last deploy.
    api.wait_for_success(deploys[0].id, JOB_TIMEOUT).await;
    browser.click("a[href='/repos'][aria-current='page']").await;
    let last_deploy = browser
        .script("return document.querySelector('tbody tr td:nth-of-type(2)').innerText;")
        .await;
    let last_deploy = last_deploy.as_str().unwrap_or_default();
    assert!(last_deploy.contains("succeeded"), "{last_deploy}");
    assert!(last_deploy.contains(&second[..12]), "{last_deploy}");
    assert!(last_deploy.contains("by admin"), "{last_deploy}");
    browser.doc_screenshot("repos").await;
    browser.assert_accessible("/repos with a deploy").await;
    site.close().await;
}

/// A GitHub user who may only read a repository sees its page and
/// variables but no Deploy button and no variable forms; their forged
/// posts (with their own valid CSRF token) are refused and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_gets_no_deploy_or_variable_forms_and_forged_posts_fail() {
    let Some(site) = Setup::new().github().start().await else {
        return;
    };
    let (browser, api) = (&site.browser, site.api());
    let (alice, reader) = &admin_and_reader(&site);
    site.register_github_repo("alice", alice, "mine").await;
    api.set_env("octo-org/mine", "REGION", "eu-west", "all", false)
        .await;

    site.sign_in(reader, "reader").await;
    browser.click("a[href='/repos/octo-org/mine']").await;
    let text = browser.text().await;
    assert!(text.contains("REGION"), "{text}");
    assert!(text.contains("eu-west"), "{text}");
    assert!(text.contains("Deploying needs push access"), "{text}");
    let found = browser
        .script(
            "return {
               deploy: document.querySelectorAll('#deploy-form, #confirm-form').length,
               variables: document.querySelectorAll('#variable-form, .remove-variable').length,
               posts: document.querySelectorAll('main form[method=post]').length,
             };",
        )
        .await;
    assert_eq!(found, json!({ "deploy": 0, "variables": 0, "posts": 0 }));
    browser.screenshot("repo-read-only").await;
    browser
        .assert_accessible("a repository's page for a reader")
        .await;

    // Forged posts with the reader's own valid CSRF token.
    let csrf = browser
        .script(
            "return document.querySelector('form[action=\"/sign-out\"] input[name=csrf]').value;",
        )
        .await
        .as_str()
        .expect("the CSRF token")
        .to_owned();
    let deploy = format!("csrf={csrf}&commit=&branch=main&idempotency_key=web-forged");
    let set = format!("csrf={csrf}&key=REGION&scope=all&value=hijacked");
    let remove = format!("csrf={csrf}&key=REGION&scope=all");
    for (path, body) in [
        ("/repos/octo-org/mine/deploy", &deploy),
        ("/repos/octo-org/mine/variables", &set),
        ("/repos/octo-org/mine/variables/remove", &remove),
    ] {
        let answers = post_from_page(browser, path, body, 1).await;
        assert_eq!(answers, vec!["status 403".to_owned()], "{path}");
    }
    let confirm = site.get("/repos/octo-org/mine/deploy").await;
    assert_eq!(confirm.status(), 403);
    assert!(api.jobs("repo=octo-org/mine&kind=deploy").await.is_empty());
    let env = api.env("octo-org/mine").await;
    assert_eq!(env.len(), 1, "{env:?}");
    assert_eq!(env[0]["value"], json!("eu-west"));
    site.close().await;
}

/// Variables in the page: a secret set there is in no page, no page source
/// and no REST answer; a plain variable is set, changed (the new value
/// shows) and removed; a name the API refuses gets the API's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variables_are_set_changed_and_removed_and_secrets_never_shown() {
    let Some(site) = Setup::new().repo("demo").start().await else {
        return;
    };
    let (browser, api) = (&site.browser, site.api());
    let secret = "s3cr3t-deploy-token-7f1e9a";
    let replaced = "s3cr3t-deploy-token-replaced-42ab";
    let refused_value = "value-of-a-refused-name-93cd";

    site.sign_in_as_admin().await;
    site.open("/repos/local/demo").await;
    let set_variable = move |key: &'static str,
                             scope: &'static str,
                             value: &'static str,
                             secret: bool| {
        async move {
            browser.fill("#variable-key", key).await;
            browser.fill("#variable-value", value).await;
            browser
                .script(&format!(
                    "document.getElementById('variable-scope').value = '{scope}';
                     document.getElementById('variable-secret').checked = {secret};
                     return true;"
                ))
                .await;
            browser.click("#variable-form button").await;
        }
    };

    // A secret, set and then replaced.
    set_variable("DEPLOY_TOKEN", "deploy", secret, true).await;
    let text = browser.text().await;
    assert!(text.contains("DEPLOY_TOKEN"), "{text}");
    assert!(text.contains("secret (set)"), "{text}");
    set_variable("DEPLOY_TOKEN", "deploy", replaced, true).await;
    browser.doc_screenshot("repo-variables").await;
    browser.assert_accessible("a repository's variables").await;

    // A plain variable: set, changed, shown.
    set_variable("GREETING", "all", "hello", false).await;
    assert!(browser.text().await.contains("hello"));
    set_variable("GREETING", "all", "bonjour", false).await;
    let text = browser.text().await;
    assert!(text.contains("bonjour"), "{text}");
    assert!(!text.contains("hello"), "the old value is gone: {text}");

    // A name the API refuses: the same reason on the page, no value echoed.
    let api_answer = api
        .put_env("local/demo", "1BAD-NAME", &json!({ "value": "x" }))
        .await;
    let detail = api_answer.assert_problem(422)["detail"]
        .as_str()
        .expect("a detail")
        .to_owned();
    set_variable("1BAD-NAME", "all", refused_value, true).await;
    let shown = browser
        .script("return document.getElementById('variable-error').textContent;")
        .await;
    assert_eq!(shown, json!(detail));
    browser.screenshot("repo-variable-refused").await;
    browser.assert_accessible("a refused variable").await;

    // Removing one.
    site.open("/repos/local/demo").await;
    browser
        .click("button[aria-label='Remove GREETING (all)']")
        .await;
    assert!(!browser.text().await.contains("GREETING"));
    let env = api.env("local/demo").await;
    let keys: Vec<_> = env.iter().map(|var| var["key"].clone()).collect();
    assert_eq!(keys, vec![json!("DEPLOY_TOKEN")]);

    // The secrets in no page, no page source, no REST answer.
    let source = browser
        .script("return document.documentElement.outerHTML;")
        .await;
    let mut sources = vec![(
        "the page in the browser".to_owned(),
        source.as_str().unwrap_or_default().to_owned(),
    )];
    for page in [
        "/repos",
        "/repos/local/demo",
        "/repos/local/demo/deploy",
        "/jobs",
    ] {
        let response = site.get(page).await;
        assert_eq!(response.status(), 200, "{page}");
        sources.push((page.to_owned(), response.text().await.expect("its HTML")));
    }
    for path in [
        "/api/v1/repos/local/demo/env",
        "/api/v1/repos/local/demo",
        "/api/v1/repos",
    ] {
        let answer = api.raw(Method::GET, path, None).await;
        assert_eq!(answer.status, 200, "{path}");
        sources.push((path.to_owned(), answer.text()));
    }
    for (where_, text) in &sources {
        for value in [secret, replaced, refused_value] {
            assert!(!text.contains(value), "{value} in {where_}");
        }
    }
    let value_field = browser
        .script("return document.getElementById('variable-value').value;")
        .await;
    assert_eq!(value_field, json!(""));
    site.close().await;
}

/// What a phone's width must give on a page: nothing wider than the
/// viewport, and each of `reachable` (the nav's links, the page's main
/// actions) shown and inside the viewport's width.
async fn assert_fits_a_phone(browser: &Browser, page: &str, reachable: &[&str]) {
    let widths = browser
        .script("return [document.documentElement.scrollWidth, window.innerWidth];")
        .await;
    let (scroll, inner) = (widths[0].as_u64(), widths[1].as_u64());
    assert!(
        scroll.is_some() && scroll <= inner,
        "{page} overflows a phone's width: scrollWidth and innerWidth {widths}"
    );
    for css in reachable {
        let found = browser
            .script(&format!(
                "const all = [...document.querySelectorAll({css})];
                 return all.map(e => {{ const r = e.getBoundingClientRect();
                   return r.width > 0 && r.height > 0 && r.left >= 0 && r.right <= window.innerWidth; }});",
                css = json!(css)
            ))
            .await;
        let found = found.as_array().cloned().unwrap_or_default();
        assert!(!found.is_empty(), "{page}: nothing at {css}");
        assert!(
            found.iter().all(|fits| fits == &json!(true)),
            "{page}: {css} is hidden or outside a phone's width: {found:?}"
        );
    }
}

/// Every main page at a phone's width (390x844): nothing overflows
/// sideways, the nav and the main actions (sign in, Deploy, Filter,
/// Cancel, sign out) are on screen, axe-core passes; a screenshot of each
/// goes to `target/browser-screenshots/phone-*.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_main_page_fits_a_phone() {
    let Some(site) = Setup::new().agent().repo("demo").start().await else {
        return;
    };
    let (browser, api) = (&site.browser, site.api());
    browser
        .set_viewport(hobotnica_tests::browser::PHONE_VIEWPORT)
        .await;
    let done = api.run_target("local/demo", "test").await;
    api.wait_for_success(done.id, JOB_TIMEOUT).await;
    let running = site.job_running_until_cancelled().await;

    site.open("/sign-in").await;
    assert_fits_a_phone(
        browser,
        "/sign-in",
        &["#token", "#login", "form[action='/sign-in'] button"],
    )
    .await;
    browser.screenshot("phone-sign-in").await;
    browser
        .assert_accessible("/sign-in at a phone's width")
        .await;

    site.sign_in_as_admin().await;
    let nav = "header.top a, header.top button";
    let pages = [
        ("repos", "/repos".to_owned(), vec![nav]),
        (
            "repo",
            "/repos/local/demo".to_owned(),
            vec![nav, "#deploy-form button", "#variable-form button"],
        ),
        ("jobs", "/jobs".to_owned(), vec![nav, "form.filters button"]),
        (
            "job",
            format!("/jobs/{}", running.id),
            vec![nav, "#cancel-form button"],
        ),
        ("agents", "/agents".to_owned(), vec![nav]),
    ];
    for (name, path, reachable) in pages {
        site.open(&path).await;
        if name == "job" {
            browser.wait_for_log_line("waiting for the gate").await;
        }
        assert_fits_a_phone(browser, &path, &reachable).await;
        browser.screenshot(&format!("phone-{name}")).await;
        browser
            .assert_accessible(&format!("{path} at a phone's width"))
            .await;
    }
    api.cancel(running.id).await;
    site.close().await;
}

/// Keyboard only: the sign-in form is filled and sent with keys (type,
/// Tab, Enter), and Tab reaches a running job's Cancel button, which
/// shows a visible focus ring, and Enter on it cancels the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keyboard_alone_signs_in_and_cancels_a_job() {
    use fantoccini::key::Key;
    let Some(site) = Setup::new().agent().repo("demo").start().await else {
        return;
    };
    let (browser, api) = (&site.browser, site.api());
    let job = site.job_running_until_cancelled().await;

    site.open("/sign-in").await;
    browser
        .script("document.querySelector('#token').focus(); return true;")
        .await;
    browser.type_text(&site.controller.admin_token).await;
    browser.press(&[Key::Tab.into()]).await;
    let focused = browser.script("return document.activeElement.id;").await;
    assert_eq!(
        focused,
        json!("login"),
        "Tab goes from the token to the login"
    );
    browser.press_and_wait(&[Key::Enter.into()]).await;
    assert!(
        browser.url().await.ends_with("/repos"),
        "signed in with the keyboard: {}",
        browser.url().await
    );

    site.open(&format!("/jobs/{}", job.id)).await;
    browser.wait_for_log_line("waiting for the gate").await;
    let presses = browser.tab_to("#cancel-form button", 60).await;
    assert!(presses.is_some(), "Tab never reached the Cancel button");
    let outline = browser
        .script(
            "const s = getComputedStyle(document.activeElement);
             return [s.outlineStyle, parseFloat(s.outlineWidth)];",
        )
        .await;
    assert_ne!(
        outline[0],
        json!("none"),
        "a focus ring on Cancel: {outline}"
    );
    assert!(
        outline[1].as_f64().is_some_and(|width| width >= 2.0),
        "a focus ring on Cancel at least 2px wide: {outline}"
    );
    browser.screenshot("keyboard-cancel-focused").await;
    browser.press_and_wait(&[Key::Enter.into()]).await;
    let ended = api.wait_for_end(job.id, JOB_TIMEOUT).await;
    assert_eq!(ended.state, hobotnica_tests::JobState::Cancelled);
    site.close().await;
}
