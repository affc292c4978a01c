//! Structured logs: a controller and an agent with `--log-format json` write
//! one JSON object a line with the documented fields and the ids of what
//! each line is about, and never a secret; every HTTP answer carries its
//! request id (the client's when well-formed), also in problem documents and
//! in the controller's log.

use hobotnica_tests::git::makefile_with_test_recipe;
use hobotnica_tests::github::Permission;

use super::github::{GH_REPO, github_setup, wait_for_final_status};
use super::*;

/// How long a line about a request may take to reach the log after the
/// answer (it is written when the answer's head is ready).
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

const JSON_LOGS: [&str; 2] = ["--log-format", "json"];

/// Every line of `log` as a JSON object, asserting the fields every line
/// has: `timestamp` (RFC 3339), `level`, `target` and `message`.
fn json_lines(log: &str, who: &str) -> Vec<Value> {
    let lines: Vec<Value> = log
        .lines()
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(object) if object.is_object() => object,
            other => panic!("{who}: a log line is not a JSON object ({other:?}): {line}"),
        })
        .collect();
    for line in &lines {
        let timestamp = line["timestamp"].as_str().unwrap_or_default();
        assert!(
            chrono::DateTime::parse_from_rfc3339(timestamp).is_ok(),
            "{who}: no RFC 3339 timestamp: {line:?}"
        );
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
                .contains(&line["level"].as_str().unwrap_or_default()),
            "{who}: no level: {line:?}"
        );
        assert!(
            line["target"]
                .as_str()
                .is_some_and(|target| !target.is_empty()),
            "{who}: no target: {line:?}"
        );
        assert!(line["message"].is_string(), "{who}: no message: {line:?}");
    }
    lines
}

fn is_generated_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_documented_fields_and_the_jobs_ids_and_no_secret() {
    let s = github_setup(Permission::Admin, &JSON_LOGS).await;
    let agent = Agent::start(
        &s.controller,
        AgentOpts {
            args: JSON_LOGS.map(str::to_owned).to_vec(),
            ..AgentOpts::default()
        },
    )
    .await;
    let hook = s.register(json!({})).await;
    let secret = hobotnica_tests::unique("sekrit-value");
    s.api
        .set_env(GH_REPO, "E2E_SECRET", &secret, "all", true)
        .await;
    let before = s.repo.head();
    let pushed = s.repo.commit(
        &[(
            "Makefile",
            &makefile_with_test_recipe(&["echo \"the secret is $$E2E_SECRET\""]),
        )],
        "make test prints a secret",
    );
    let response = s.push(&hook, &before, &pushed).await;
    assert_eq!(response.status, 202, "push: {}", response.text());
    let job = s.wait_for_jobs(1).await.remove(0);
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    assert!(
        s.api.output(job.id).await.starts_with("the secret is "),
        "the job ran its recipe"
    );
    wait_for_final_status(&s.github, &pushed).await;
    let delivery_id = response
        .header("x-request-id")
        .unwrap_or_else(|| panic!("the webhook's answer has no X-Request-Id"))
        .to_owned();
    let delivery_line =
        |line: &Value| line["request_id"] == delivery_id.as_str() && line.get("status").is_some();
    wait_until(LOG_TIMEOUT, "the delivery's line in the log", || {
        let logged = json_lines(&s.controller.stderr(), "controller")
            .iter()
            .any(delivery_line);
        async move { logged }
    })
    .await;

    let controller = json_lines(&s.controller.stderr(), "controller");
    let agent_lines = json_lines(&agent.stderr(), "agent");
    let delivery = controller.iter().find(|line| delivery_line(line)).unwrap();
    assert_eq!(
        delivery["route"], "/webhooks/github/{hook_id}",
        "{delivery:?}"
    );
    assert_eq!(delivery["method"], "POST", "{delivery:?}");
    assert_eq!(delivery["status"], 202, "{delivery:?}");
    // The delivery's lines say what it was and which job it queued.
    let of_delivery: Vec<&Value> = controller
        .iter()
        .filter(|line| line["request_id"] == delivery_id.as_str())
        .collect();
    assert!(
        of_delivery
            .iter()
            .any(|line| line["message"] == "webhook received"
                && line["event"] == "push"
                && line["delivery_id"].is_string()),
        "{of_delivery:#?}"
    );
    assert!(
        of_delivery
            .iter()
            .any(|line| line["job_id"] == json!(job.id) && line["repo"] == GH_REPO),
        "no line of the delivery names the job it queued: {of_delivery:#?}"
    );

    // The controller's lines about the job name it, and those of the
    // agent's session name the agent too.
    let about_job = |lines: &[Value]| -> Vec<Value> {
        lines
            .iter()
            .filter(|line| line.get("job_id") == Some(&json!(job.id)))
            .cloned()
            .collect()
    };
    let controller_job = about_job(&controller);
    assert!(
        controller_job
            .iter()
            .any(|line| line["message"] == "job assigned"
                && line["agent"] == agent.name.as_str()
                && line.get("agent_id").is_some()),
        "no line of the controller says which agent got job {}: {controller_job:#?}",
        job.id
    );
    assert!(
        controller_job
            .iter()
            .any(|line| line["message"] == "job finished"),
        "no line of the controller says job {} finished: {controller_job:#?}",
        job.id
    );
    // Every line the agent logs inside a job's span names the job, its
    // repository and the agent.
    let in_job_span: Vec<_> = agent_lines
        .iter()
        .filter(|line| line.get("span") == Some(&json!("job")))
        .collect();
    assert!(
        !in_job_span.is_empty(),
        "the agent logged nothing about the job"
    );
    for line in in_job_span {
        assert_eq!(line["job_id"], json!(job.id), "{line:?}");
        assert_eq!(line["repo"], GH_REPO, "{line:?}");
        assert_eq!(line["agent"], agent.name.as_str(), "{line:?}");
    }
    assert!(!about_job(&agent_lines).is_empty());

    // No secret in either process's output, byte for byte.
    let secrets = [
        ("the secret variable", secret.as_str()),
        ("the agent token", s.controller.agent_token.as_str()),
        ("the admin token", s.controller.admin_token.as_str()),
        ("the GitHub token", s.token.as_str()),
        ("the webhook secret", hook.secret.as_str()),
    ];
    for (who, output) in [
        ("the controller's log", s.controller.stderr()),
        ("the controller's stdout", s.controller.stdout()),
        ("the agent's log", agent.stderr()),
        ("the agent's stdout", agent.stdout()),
    ] {
        for (what, value) in secrets {
            assert!(!output.contains(value), "{what} is in {who}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_come_back_in_the_header_the_problem_and_the_log() {
    let controller = Controller::start(ControllerOpts {
        extra_args: JSON_LOGS.map(str::to_owned).to_vec(),
        ..ControllerOpts::default()
    })
    .await;
    let api = controller.api();
    let logged = |id: String| {
        let controller = &controller;
        async move {
            json_lines(&controller.stderr(), "controller")
                .iter()
                .any(|line| line["request_id"] == id.as_str() && line.get("status").is_some())
        }
    };

    // The client's id, when well-formed.
    let missing = "/api/v1/jobs/999999";
    let response = api
        .raw_with_headers(Method::GET, missing, None, &[("X-Request-Id", "abc-123")])
        .await;
    let problem = response.assert_problem(404);
    assert_eq!(response.header("x-request-id"), Some("abc-123"));
    assert_eq!(problem["request_id"], "abc-123", "{problem}");
    wait_until(LOG_TIMEOUT, "abc-123 in the controller's log", || {
        logged("abc-123".to_owned())
    })
    .await;
    let log = controller.stderr();
    assert!(log.contains(r#""request_id":"abc-123""#), "{log}");
    let line = json_lines(&log, "controller")
        .into_iter()
        .find(|line| line["request_id"] == "abc-123" && line.get("status").is_some())
        .unwrap();
    assert_eq!(line["route"], "/api/v1/jobs/{id}", "{line:?}");
    assert_eq!(line["method"], "GET", "{line:?}");
    assert_eq!(line["status"], 404, "{line:?}");

    // A malformed one is replaced, never echoed or logged.
    let too_long = "x".repeat(300);
    let mut generated = Vec::new();
    for bad in ["bad id with spaces", too_long.as_str(), "abc/123", ""] {
        let response = api
            .raw_with_headers(Method::GET, missing, None, &[("X-Request-Id", bad)])
            .await;
        let problem = response.assert_problem(404);
        let id = response
            .header("x-request-id")
            .unwrap_or_default()
            .to_owned();
        assert!(is_generated_id(&id), "{bad:?} was answered with id {id:?}");
        assert_eq!(problem["request_id"], id.as_str(), "{problem}");
        generated.push(id);
    }
    // Without one, each request gets its own: the API, a webhook delivery,
    // a dashboard page.
    for (method, path) in [
        (Method::GET, missing),
        (Method::POST, "/webhooks/github/no-such-hook"),
        (Method::GET, "/"),
        (Method::GET, "/healthz"),
    ] {
        let body = (method == Method::POST).then_some(b"{}".as_slice());
        let response = api.raw(method.clone(), path, body).await;
        let id = response
            .header("x-request-id")
            .unwrap_or_default()
            .to_owned();
        assert!(is_generated_id(&id), "{method} {path}: id {id:?}");
        if response.status >= 400 {
            assert_eq!(
                response.json()["request_id"],
                id.as_str(),
                "{method} {path}"
            );
        }
        generated.push(id);
    }
    let unique: std::collections::BTreeSet<&String> = generated.iter().collect();
    assert_eq!(unique.len(), generated.len(), "ids repeat: {generated:?}");
    let last_logged = generated[generated.len() - 2].clone();
    wait_until(LOG_TIMEOUT, "the dashboard's request in the log", || {
        logged(last_logged.clone())
    })
    .await;
    let log = controller.stderr();
    assert!(
        !log.contains("bad id with spaces"),
        "a malformed id was logged"
    );
    assert!(!log.contains(&too_long), "a malformed id was logged");
    assert!(!log.contains("abc/123"), "a malformed id was logged");
}
