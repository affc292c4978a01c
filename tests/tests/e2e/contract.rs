//! The REST contract at the edge: requests that change something are carried
//! out whole even when the client hangs up, unknown fields and out-of-range
//! parameters are refused naming the field, and every error is a problem
//! document (405 included).

use hobotnica_tests::api::send_without_reading;
use hobotnica_tests::github::ZERO_SHA;
use hobotnica_tests::{Permission, wait_for};

use super::github::{GH_REPO, GitHubSetup, LOGIN, github_setup};
use super::*;

/// How long a change sent by a client that hung up may take to show.
const SETTLE: Duration = Duration::from_secs(30);

/// Sends a request, waits until the controller is busy with it (it asked the
/// fake GitHub, which takes 300 ms per answer), then hangs up.
async fn hang_up_mid_way(
    s: &GitHubSetup,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) {
    let asked_before = s.github.requests().len();
    let connection = send_without_reading(
        s.controller.http_addr,
        method,
        path,
        headers,
        body.to_string().as_bytes(),
    )
    .await;
    wait_until(SETTLE, "the controller to ask GitHub", || async {
        s.github.requests().len() > asked_before
    })
    .await;
    drop(connection);
}

/// Register, run and deploy, each sent by a client that hangs up while the
/// controller is half-way through (waiting on a slow GitHub): each change is
/// made exactly once, and the deploy's Idempotency-Key then answers with its
/// one job, not "still being handled". A variable change and a cancel whose
/// client hangs up at once are made whole or not at all; sent again, each is
/// made once.
#[tokio::test]
async fn a_client_that_hangs_up_gets_its_change_made_exactly_once() {
    let s = github_setup(Permission::Admin, &[]).await;
    s.github.set_latency(Duration::from_millis(300));
    let bearer = format!("Bearer {}", s.token);
    let user = [
        ("authorization", bearer.as_str()),
        ("x-github-username", LOGIN),
    ];
    let repo_path = format!("/api/v1/repos/{GH_REPO}");

    let (owner, name) = GH_REPO.split_once('/').unwrap();
    let register = json!({"owner": owner, "name": name});
    hang_up_mid_way(&s, "POST", "/api/v1/repos", &user, &register).await;
    wait_until(SETTLE, "the repository to be registered", || async {
        s.api.raw(Method::GET, &repo_path, None).await.status == 200
    })
    .await;
    let repos = s.api.get_json("/api/v1/repos").await;
    assert_eq!(repos["items"].as_array().unwrap().len(), 1, "{repos}");

    let run = json!({"target": "test", "branch": "main"});
    hang_up_mid_way(&s, "POST", &format!("{repo_path}/jobs"), &user, &run).await;
    let tests = wait_for(SETTLE, "the test job to be queued", || async {
        let jobs = s.api.jobs(&format!("repo={GH_REPO}&kind=test")).await;
        (!jobs.is_empty()).then_some(jobs)
    })
    .await;
    assert_eq!(tests.len(), 1, "one request, one job: {tests:?}");
    assert_eq!(tests[0].commit, s.repo.head());

    let deploy = json!({"branch": "main"});
    let key = "deploy-after-hang-up";
    let mut with_key = user.to_vec();
    with_key.push(("idempotency-key", key));
    hang_up_mid_way(
        &s,
        "POST",
        &format!("{repo_path}/deploy"),
        &with_key,
        &deploy,
    )
    .await;
    let deploys = wait_for(SETTLE, "the deploy to be queued", || async {
        let jobs = s.api.jobs(&format!("repo={GH_REPO}&kind=deploy")).await;
        (!jobs.is_empty()).then_some(jobs)
    })
    .await;
    assert_eq!(deploys.len(), 1, "{deploys:?}");
    // The client retries with its key: the one job, not a second deploy and
    // not "still being handled".
    let retried = wait_for(SETTLE, "the retried deploy to answer", || async {
        let answer = s.api.deploy_raw(GH_REPO, &deploy, Some(key)).await;
        (answer.status != 409).then_some(answer)
    })
    .await;
    assert_eq!(retried.status, 200, "{}", retried.text());
    assert_eq!(retried.json()["id"], deploys[0].id);
    assert_eq!(
        s.api
            .jobs(&format!("repo={GH_REPO}&kind=deploy"))
            .await
            .len(),
        1
    );

    // Single writes: whole or nothing, then the client's retry.
    let variable = json!({"value": "https://api.example.com"});
    let env_path = format!("{repo_path}/env/API_URL");
    let body = variable.to_string();
    drop(
        send_without_reading(
            s.controller.http_addr,
            "PUT",
            &env_path,
            &user,
            body.as_bytes(),
        )
        .await,
    );
    let again = s.api.send_json(Method::PUT, &env_path, &variable).await;
    assert_eq!(again.status, 200, "{}", again.text());
    let vars = s.api.env(GH_REPO).await;
    assert_eq!(vars.len(), 1, "{vars:?}");
    assert_eq!(vars[0]["value"], "https://api.example.com");

    let cancel_path = format!("/api/v1/jobs/{}/cancel", tests[0].id);
    drop(send_without_reading(s.controller.http_addr, "POST", &cancel_path, &user, b"").await);
    let again = s.api.raw(Method::POST, &cancel_path, None).await;
    assert!(
        again.status == 202 || again.status == 409,
        "{}",
        again.text()
    );
    s.api
        .wait_for_state(tests[0].id, &[JobState::Cancelled], SETTLE)
        .await;
}

/// A typo in a field is refused, naming it, instead of being ignored.
#[tokio::test]
async fn unknown_fields_are_refused_naming_the_field() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    let repo = GitRepo::new();
    api.register_repo("demo", &repo.url()).await;
    for (path, body) in [
        (
            "/api/v1/repos",
            json!({"name": "other", "git_url": repo.url(), "brnach": "main"}),
        ),
        (
            "/api/v1/repos/local/demo/jobs",
            json!({"target": "test", "brnach": "main"}),
        ),
        (
            "/api/v1/repos/local/demo/deploy",
            json!({"comit": ZERO_SHA}),
        ),
    ] {
        let answer = api.send_json(Method::POST, path, &body).await;
        let problem = answer.assert_problem(422);
        let field = &problem["errors"][0]["field"];
        assert!(field == "brnach" || field == "comit", "{path}: {problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains("unknown field")
                && (detail.contains("brnach") || detail.contains("comit")),
            "{path}: {detail}"
        );
    }
    let answer = api
        .send_json(
            Method::PUT,
            "/api/v1/repos/local/demo/env/A",
            &json!({"value": "x", "secrte": true}),
        )
        .await;
    assert!(
        answer.assert_problem(422)["detail"]
            .as_str()
            .unwrap()
            .contains("secrte")
    );
    let answer = api.raw(Method::GET, "/api/v1/jobs?limt=5", None).await;
    assert_eq!(answer.assert_problem(400)["errors"][0]["field"], "limt");
    let answer = api
        .send_json(
            Method::POST,
            "/api/v1/repos",
            &json!({"git_url": repo.url()}),
        )
        .await;
    let problem = answer.assert_problem(422);
    assert_eq!(problem["errors"][0]["field"], "name", "{problem}");
    // Nothing was registered or queued by the refused requests.
    assert_eq!(
        api.get_json("/api/v1/repos").await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(api.jobs("").await.is_empty());
}

/// Out-of-range and malformed parameters are refused naming them, and a
/// method a route does not have is a problem document with `Allow`.
#[tokio::test]
async fn parameters_out_of_range_and_wrong_methods_are_problems() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("cursor=0", "cursor"),
        ("cursor=012", "cursor"),
        ("repo=no-slash", "repo"),
    ] {
        let answer = api
            .raw(Method::GET, &format!("/api/v1/jobs?{query}"), None)
            .await;
        assert!(
            answer.status == 400 || answer.status == 422,
            "{query}: {}",
            answer.status
        );
        let problem = answer.json();
        assert_eq!(problem["errors"][0]["field"], field, "{query}: {problem}");
    }
    for id in ["0", "+1", "01", "x"] {
        let answer = api
            .raw(Method::GET, &format!("/api/v1/jobs/{id}"), None)
            .await;
        assert_eq!(
            answer.assert_problem(400)["errors"][0]["field"],
            "id",
            "{id}"
        );
    }
    let answer = api.raw(Method::PATCH, "/api/v1/repos", None).await;
    let problem = answer.assert_problem(405);
    assert!(problem["detail"].as_str().unwrap().contains("PATCH"));
    let allow = answer.header("allow").expect("an Allow header");
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
}

/// A deploy may name the commit and the branch it came from: the commit
/// runs, the branch is recorded.
#[tokio::test]
async fn a_commit_with_its_branch_runs_the_commit_and_records_the_branch() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    let repo = GitRepo::new();
    let first = repo.head();
    repo.commit_version("second");
    api.register_repo("demo", &repo.url()).await;
    let job = api
        .run_job(
            "local/demo",
            json!({"target": "test", "commit": first, "branch": "main"}),
        )
        .await;
    assert_eq!(job.commit, first);
    assert_eq!(job.branch.as_deref(), Some("main"));
}

/// Swagger UI is served from the binary (no internet needed) and loads the
/// controller's own document, which names every route.
#[tokio::test]
async fn swagger_ui_is_served_offline_with_the_document() {
    let controller = Controller::start_default().await;
    let api = controller.api().with_token(None);
    let page = api.raw(Method::GET, "/api/docs/", None).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("swagger-ui"), "{}", page.text());
    for asset in [
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "swagger-initializer.js",
    ] {
        let answer = api
            .raw(Method::GET, &format!("/api/docs/{asset}"), None)
            .await;
        assert_eq!(answer.status, 200, "{asset}");
        assert!(answer.body.len() > 100, "{asset}");
    }
    let initializer = api
        .raw(Method::GET, "/api/docs/swagger-initializer.js", None)
        .await;
    assert!(initializer.text().contains("/api/docs/openapi.json"));
    let document = api
        .raw(Method::GET, "/api/docs/openapi.json", None)
        .await
        .json();
    for path in [
        "/api/v1/repos/{owner}/{name}/deploy",
        "/api/v1/jobs/{id}/log",
        "/webhooks/github/{hook_id}",
    ] {
        assert!(document["paths"][path].is_object(), "{path}");
    }
    let schemes = &document["components"]["securitySchemes"];
    assert_eq!(schemes["github_login"]["name"], "X-GitHub-Username");
    assert_eq!(schemes["token"]["scheme"], "bearer");
}
