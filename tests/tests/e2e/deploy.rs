//! Deploys, repository variables and secrets: `make deploy` at a branch's tip
//! or a chosen commit, one deploy of a repository at a time, idempotency keys,
//! lost deploys and explicit retries, the variables' precedence, secrets
//! masked in every log and absent from the API, the data directory and Redis,
//! and the 422s for invalid variables.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use hobotnica_tests::RawResponse;
use hobotnica_tests::git::makefile_with_test_recipe;
use hobotnica_tests::redis::RedisServer;

use super::*;

/// What `make deploy` prints without optional variables.
fn deploy_output(commit: &str) -> String {
    format!("deploying {commit}\ndeployed\n")
}

/// A file in the controller's scratch dir, as a variable value.
fn scratch_file(controller: &Controller, dir: &str, name: &str) -> PathBuf {
    controller.scratch_dir(dir).join(name)
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

/// One `start`/`end` pair `make deploy` wrote to `$E2E_DEPLOY_LOG`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeployRun {
    job: u64,
    attempt: u32,
    start_ns: u128,
    end_ns: Option<u128>,
}

/// The runs recorded in a deploy log, in the order they started.
fn deploy_runs(file: &Path) -> Vec<DeployRun> {
    let content = std::fs::read_to_string(file).unwrap_or_default();
    let mut runs: Vec<DeployRun> = Vec::new();
    for line in content.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [event, job, attempt, ns] = fields[..] else {
            panic!("a malformed deploy log line: {line:?}");
        };
        let (job, attempt, ns): (u64, u32, u128) = (
            job.parse().unwrap(),
            attempt.parse().unwrap(),
            ns.parse().unwrap(),
        );
        match event {
            "start" => runs.push(DeployRun {
                job,
                attempt,
                start_ns: ns,
                end_ns: None,
            }),
            "end" => {
                let run = runs
                    .iter_mut()
                    .find(|run| run.job == job && run.attempt == attempt)
                    .unwrap_or_else(|| panic!("an end without a start: {line:?}"));
                assert_eq!(run.end_ns, None, "two ends of one run: {content}");
                run.end_ns = Some(ns);
            }
            other => panic!("unknown deploy log event {other:?}"),
        }
    }
    runs.sort_by_key(|run| run.start_ns);
    runs
}

/// The `P_*` lines of a job's output, as a map.
fn p_vars(output: &str) -> BTreeMap<String, String> {
    output
        .lines()
        .filter(|line| line.starts_with("P_"))
        .map(|line| {
            let (key, value) = line.split_once('=').unwrap();
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_runs_make_deploy_at_the_branch_tip_or_at_a_chosen_commit() {
    let s = setup().await;
    let first = s.repo.head();
    let second = s.repo.commit_version("2");

    let latest = s.api.deploy(REPO, json!({ "branch": "main" })).await;
    assert_eq!(latest.kind, "deploy");
    assert_eq!(latest.target, "deploy");
    assert_eq!(latest.trigger, "api");
    assert_eq!(latest.commit, second, "the branch resolves to its tip");
    assert_eq!(latest.branch.as_deref(), Some("main"));
    let older = s.api.deploy(REPO, json!({ "commit": first })).await;
    assert_eq!(older.kind, "deploy");
    assert_eq!(older.commit, first, "the chosen commit, not the tip");
    let by_default = s.api.deploy(REPO, json!({})).await;
    assert_eq!(
        by_default.commit, second,
        "default: the repository's branch"
    );

    for job in [&latest, &older, &by_default] {
        let done = s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
        assert_eq!(done.commit, job.commit, "the commit does not change");
        assert_eq!(done.exit_code, Some(0));
        assert_eq!(
            s.api.output(job.id).await,
            deploy_output(&job.commit),
            "`git rev-parse HEAD` of deploy {}",
            job.id
        );
    }

    // The tip is resolved when the deploy is asked for, not when it runs:
    // hold the repository's deploy slot, ask, then push a new commit.
    let gate = scratch_file(&s.controller, "gate", "open");
    let holder = s
        .api
        .deploy(
            REPO,
            json!({ "commit": first, "env": { "E2E_GATE": path_str(&gate) } }),
        )
        .await;
    s.api
        .wait_for_log(holder.id, "waiting for the gate", JOB_TIMEOUT)
        .await;
    let asked = s.api.deploy(REPO, json!({ "branch": "main" })).await;
    assert_eq!(asked.commit, second);
    let third = s.repo.commit_version("3");
    std::fs::write(&gate, b"").unwrap();
    s.api.wait_for_success(holder.id, JOB_TIMEOUT).await;
    let done = s.api.wait_for_success(asked.id, JOB_TIMEOUT).await;
    assert_eq!(done.commit, second);
    assert_eq!(s.api.output(asked.id).await, deploy_output(&second));

    let now = s.api.deploy(REPO, json!({ "branch": "main" })).await;
    assert_eq!(now.commit, third);
    s.api.wait_for_success(now.id, JOB_TIMEOUT).await;
    assert_eq!(s.api.output(now.id).await, deploy_output(&third));

    // Commit and branch together: the commit is deployed, the branch only
    // recorded (and still checked).
    let pinned = s
        .api
        .deploy(REPO, json!({ "commit": first, "branch": "main" }))
        .await;
    assert_eq!(
        (pinned.commit.as_str(), pinned.branch.as_deref()),
        (first.as_str(), Some("main"))
    );
    let response = s
        .api
        .deploy_raw(REPO, &json!({ "commit": first, "branch": "-main" }), None)
        .await;
    let problem = response.assert_problem(422);
    assert_eq!(problem["errors"][0]["field"], "branch", "{problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_of_one_repository_never_overlap_while_its_tests_run_alongside() {
    let s = setup_with(AgentOpts {
        concurrency: 3,
        ..AgentOpts::default()
    })
    .await;
    let deploy_log = scratch_file(&s.controller, "deploys", "log");
    let gate = scratch_file(&s.controller, "gate", "open");

    let first = s
        .api
        .deploy(
            REPO,
            json!({ "env": {
                "E2E_DEPLOY_LOG": path_str(&deploy_log),
                "E2E_GATE": path_str(&gate),
            } }),
        )
        .await;
    s.api
        .wait_for_log(first.id, "waiting for the gate", JOB_TIMEOUT)
        .await;

    // Two more deploys asked for at once, while the first runs.
    let body = json!({ "env": {
        "E2E_DEPLOY_LOG": path_str(&deploy_log),
        "E2E_DEPLOY_SECONDS": "0.3",
    } });
    let (a, b) = tokio::join!(
        s.api.deploy(REPO, body.clone()),
        s.api.deploy(REPO, body.clone())
    );
    let (second, third) = if a.id < b.id { (a, b) } else { (b, a) };

    // A test job of the same repository runs meanwhile on a free slot of
    // the same agent: the deploys wait for the first deploy, not for room.
    let test = s.api.run_target(REPO, "test").await;
    s.api.wait_for_success(test.id, JOB_TIMEOUT).await;
    let waiting = s.api.job(second.id).await;
    assert_eq!(
        waiting.state,
        JobState::Queued,
        "a second deploy started while the first runs: {waiting:#?}"
    );
    assert_eq!(s.api.job(third.id).await.state, JobState::Queued);
    assert_eq!(s.api.job(first.id).await.state, JobState::Running);
    assert_eq!(deploy_runs(&deploy_log).len(), 1, "only the first started");

    std::fs::write(&gate, b"").unwrap();
    for job in [&first, &second, &third] {
        let done = s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
        assert_eq!(done.attempt, 1);
    }

    let runs = deploy_runs(&deploy_log);
    assert_eq!(
        runs.iter().map(|run| run.job).collect::<Vec<_>>(),
        vec![first.id, second.id, third.id],
        "one run each, in request order: {runs:#?}"
    );
    for pair in runs.windows(2) {
        let end = pair[0]
            .end_ns
            .unwrap_or_else(|| panic!("deploy {} never ended: {runs:#?}", pair[0].job));
        assert!(
            end <= pair[1].start_ns,
            "deploys {} and {} overlap: {runs:#?}",
            pair[0].job,
            pair[1].job
        );
    }
    assert!(runs.iter().all(|run| run.end_ns.is_some()), "{runs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_queued_behind_another_says_so_in_its_status() {
    let s = setup().await;
    let gate = scratch_file(&s.controller, "gate", "open");
    let first = s
        .api
        .deploy(REPO, json!({ "env": { "E2E_GATE": path_str(&gate) } }))
        .await;
    s.api
        .wait_for_log(first.id, "waiting for the gate", JOB_TIMEOUT)
        .await;
    let second = s.api.deploy(REPO, json!({})).await;
    let waiting = s.api.job(second.id).await;
    assert_eq!(waiting.state, JobState::Queued, "{waiting:#?}");
    // The agent has a free slot: what the deploy waits for is the other.
    let message = waiting.message.clone().unwrap_or_default();
    std::fs::write(&gate, b"").unwrap();
    s.api.wait_for_success(first.id, JOB_TIMEOUT).await;
    s.api.wait_for_success(second.id, JOB_TIMEOUT).await;
    assert!(
        message.contains("deploy"),
        "the status of a deploy queued behind deploy {} does not say so: {message:?}",
        first.id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_makes_a_repeated_deploy_request_return_the_first_job() {
    let s = setup().await;
    let first = s.repo.head();
    s.api.register_repo("other", &s.repo.url()).await;
    let body = json!({ "commit": first });
    let key = hobotnica_tests::unique("deploy-key");

    let created = s.api.deploy_raw(REPO, &body, Some(&key)).await;
    assert_eq!(created.status, 202, "{}", created.text());
    let job = created.json();
    let again = s.api.deploy_raw(REPO, &body, Some(&key)).await;
    assert_eq!(again.status, 200, "a repeated key: {}", again.text());
    assert_eq!(again.json()["id"], job["id"], "the same job");

    let other_key = hobotnica_tests::unique("deploy-key");
    let another = s.api.deploy_raw(REPO, &body, Some(&other_key)).await;
    assert_eq!(another.status, 202, "{}", another.text());
    assert_ne!(another.json()["id"], job["id"], "another key, another job");

    // The key belongs to the repository.
    let elsewhere = s.api.deploy_raw("local/other", &body, Some(&key)).await;
    assert_eq!(elsewhere.status, 202, "{}", elsewhere.text());
    assert_ne!(elsewhere.json()["id"], job["id"]);

    // Without a key, every request deploys.
    let plain_a = s.api.deploy(REPO, body.clone()).await;
    let plain_b = s.api.deploy(REPO, body.clone()).await;
    assert_ne!(plain_a.id, plain_b.id);

    // The same new key sent five times at once: one job.
    let racing_key = hobotnica_tests::unique("deploy-key");
    let racing_id = race_one_key(std::slice::from_ref(&s.api), &body, &racing_key, 5).await;

    let ids: Vec<u64> = [
        job["id"].as_u64().unwrap(),
        another.json()["id"].as_u64().unwrap(),
        plain_a.id,
        plain_b.id,
        racing_id,
    ]
    .into();
    let deploys: Vec<u64> = s
        .api
        .jobs("repo=local/demo&kind=deploy&limit=200")
        .await
        .into_iter()
        .map(|job| job.id)
        .collect();
    let mut sorted = deploys.clone();
    sorted.sort_unstable();
    let mut expected = ids.clone();
    expected.sort_unstable();
    assert_eq!(
        sorted, expected,
        "no job beyond one per key or keyless request"
    );
    for id in ids {
        s.api.wait_for_success(id, JOB_TIMEOUT).await;
    }
}

/// Sends the same deploy request with the same new `key` `count` times at
/// once (round-robin over `apis`), and asserts exactly one job came of it:
/// one 202, the others 200 with that job or 409 (still being handled), and
/// the same request once settled answers 200 with it. Returns its id.
async fn race_one_key(apis: &[Api], body: &Value, key: &str, count: usize) -> u64 {
    let requests: Vec<_> = (0..count)
        .map(|n| {
            let api = apis[n % apis.len()].clone();
            let body = body.clone();
            let key = key.to_owned();
            tokio::spawn(async move { api.deploy_raw(REPO, &body, Some(&key)).await })
        })
        .collect();
    let mut answers: Vec<RawResponse> = Vec::new();
    for request in requests {
        answers.push(request.await.unwrap());
    }
    let summary: Vec<(u16, String)> = answers.iter().map(|r| (r.status, r.text())).collect();
    let created: Vec<&RawResponse> = answers.iter().filter(|r| r.status == 202).collect();
    assert_eq!(
        created.len(),
        1,
        "exactly one request creates the job: {summary:#?}"
    );
    let id = created[0].json()["id"].as_u64().unwrap();
    for answer in &answers {
        match answer.status {
            202 => {}
            200 => assert_eq!(answer.json()["id"], id, "{summary:#?}"),
            409 => {
                answer.assert_problem(409);
            }
            other => panic!("a request repeating the key got {other}: {summary:#?}"),
        }
    }
    // Asked again once things settled, through each controller: the job.
    for api in apis {
        let settled = api.deploy_raw(REPO, body, Some(key)).await;
        assert_eq!(settled.status, 200, "{}", settled.text());
        assert_eq!(settled.json()["id"], id);
    }
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_reused_with_another_body_is_refused() {
    let s = setup().await;
    let first = s.repo.head();
    let second = s.repo.commit_version("2");
    let key = hobotnica_tests::unique("deploy-key");

    let created = s
        .api
        .deploy_raw(REPO, &json!({ "commit": first }), Some(&key))
        .await;
    assert_eq!(created.status, 202, "{}", created.text());
    let id = created.json()["id"].as_u64().unwrap();
    // The issue: "the same key with a different body → 422".
    let reused = s
        .api
        .deploy_raw(REPO, &json!({ "commit": second }), Some(&key))
        .await;
    let problem = reused.assert_problem(422);
    assert!(
        problem.to_string().contains("Idempotency-Key"),
        "the problem names the header: {problem}"
    );
    s.api.wait_for_success(id, JOB_TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_holds_across_controllers_sharing_redis() {
    let redis = RedisServer::start().await;
    let a = Controller::start(ControllerOpts {
        redis_url: Some(redis.url()),
        ..ControllerOpts::default()
    })
    .await;
    let b = Controller::start(a.peer_opts()).await;
    let _agent = Agent::start_default(&b).await;
    let repo = GitRepo::new();
    a.api().register_repo("demo", &repo.url()).await;
    let apis = [a.api(), b.api()];
    let body = json!({ "commit": repo.head() });

    // A client retrying through a load balancer: ten copies, both
    // controllers, at once; several rounds with fresh keys.
    let mut ids = Vec::new();
    for _ in 0..5 {
        let key = hobotnica_tests::unique("deploy-key");
        ids.push(race_one_key(&apis, &body, &key, 10).await);
    }
    let mut deploys: Vec<u64> = apis[0]
        .jobs("repo=local/demo&kind=deploy&limit=200")
        .await
        .into_iter()
        .map(|job| job.id)
        .collect();
    deploys.sort_unstable();
    ids.sort_unstable();
    assert_eq!(deploys, ids, "one job per key");
    for id in ids {
        apis[1].wait_for_success(id, JOB_TIMEOUT).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_deploy_is_not_run_again_until_it_is_retried() {
    let mut s = setup().await;
    let deploy_log = scratch_file(&s.controller, "deploys", "log");
    let gate = scratch_file(&s.controller, "gate", "open");
    let marker = marker();
    let job = s
        .api
        .deploy(
            REPO,
            json!({ "env": {
                "E2E_DEPLOY_LOG": path_str(&deploy_log),
                "E2E_GATE": path_str(&gate),
                &marker.0: &marker.1,
            } }),
        )
        .await;
    s.api
        .wait_for_log(job.id, "waiting for the gate", JOB_TIMEOUT)
        .await;
    wait_for_processes(&marker).await;

    // Only a finished job can be retried.
    let early = s
        .api
        .raw(
            Method::POST,
            &format!("/api/v1/jobs/{}/retry", job.id),
            None,
        )
        .await;
    early.assert_problem(409);

    s.agent.kill9();
    let lease = s.controller.opts.lease_timeout;
    let lost = s
        .api
        .wait_for_state(job.id, &[JobState::Lost], lease + Duration::from_secs(8))
        .await;
    assert_eq!(lost.attempt, 1);
    kill_marked(&marker);
    wait_for_no_processes(&marker, Duration::from_secs(10)).await;
    std::fs::write(&gate, b"").unwrap();

    // An agent comes back and runs other work; the deploy stays lost.
    let agent = Agent::start_default(&s.controller).await;
    let test = s.api.run_target(REPO, "test").await;
    let done = s.api.wait_for_success(test.id, JOB_TIMEOUT).await;
    assert_eq!(done.agent.as_deref(), Some(agent.name.as_str()));
    let still = s.api.job(job.id).await;
    assert_eq!(still.state, JobState::Lost, "{still:#?}");
    assert_eq!(still.attempt, 1, "never taken again: {still:#?}");

    // An explicit retry is a new job at the same commit, and it runs.
    let retried = s.api.retry(job.id).await;
    assert_ne!(retried.id, job.id);
    assert_eq!(retried.kind, "deploy");
    assert_eq!(retried.target, "deploy");
    assert_eq!(retried.trigger, "retry");
    assert_eq!(retried.commit, job.commit);
    let done = s.api.wait_for_success(retried.id, JOB_TIMEOUT).await;
    assert_eq!(done.agent.as_deref(), Some(agent.name.as_str()));
    assert!(
        s.api
            .output(retried.id)
            .await
            .starts_with(&format!("deploying {}\n", job.commit))
    );
    let still = s.api.job(job.id).await;
    assert_eq!(still.state, JobState::Lost);
    assert_eq!(still.attempt, 1);

    let runs = deploy_runs(&deploy_log);
    assert_eq!(
        runs.iter()
            .map(|run| (run.job, run.attempt, run.end_ns.is_some()))
            .collect::<Vec<_>>(),
        vec![(job.id, 1, false), (retried.id, 1, true)],
        "the lost deploy ran once (killed), the retry once: {runs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variables_take_precedence_all_then_job_kind_then_one_time() {
    let s = setup().await;
    // `make test` prints the `P_*` variables too.
    s.repo.commit(
        &[(
            "Makefile",
            &makefile_with_test_recipe(&["env | grep '^P_' | sort"]),
        )],
        "test prints the P_ variables",
    );
    let api = &s.api;
    for (key, scope, value) in [
        ("P_ALL", "all", "all"),
        ("P_KIND", "all", "all"),
        ("P_KIND", "test", "test"),
        ("P_KIND", "deploy", "deploy"),
        ("P_ONCE", "all", "all"),
        ("P_ONCE", "test", "test"),
        ("P_ONCE", "deploy", "deploy"),
        ("P_TEST", "test", "test only"),
        ("P_DEPLOY", "deploy", "deploy only"),
        ("E2E_SHOW_ENV", "all", "1"),
    ] {
        api.set_env(REPO, key, value, scope, false).await;
    }
    let listed = api.env(REPO).await;
    assert_eq!(
        listed.len(),
        10,
        "one variable per key and scope: {listed:#?}"
    );
    assert!(
        listed.contains(
            &json!({ "key": "P_KIND", "scope": "deploy", "secret": false, "value": "deploy" })
        ),
        "{listed:#?}"
    );
    // Setting a key and scope again replaces the value.
    api.set_env(REPO, "P_ALL", "all", "all", false).await;
    assert_eq!(api.env(REPO).await.len(), 10);

    let once = json!({ "P_ONCE": "once", "P_NEW": "once" });
    let test = api.run_target(REPO, "test").await;
    let test_once = api
        .run_job(REPO, json!({ "target": "test", "env": once }))
        .await;
    let deploy = api.deploy(REPO, json!({})).await;
    let deploy_once = api.deploy(REPO, json!({ "env": once })).await;
    let custom = api.run_target(REPO, "penv").await;
    assert_eq!(custom.kind, "custom");

    let expected = [
        (
            &test,
            vars(&[
                ("P_ALL", "all"),
                ("P_KIND", "test"),
                ("P_ONCE", "test"),
                ("P_TEST", "test only"),
            ]),
        ),
        (
            &test_once,
            vars(&[
                ("P_ALL", "all"),
                ("P_KIND", "test"),
                ("P_NEW", "once"),
                ("P_ONCE", "once"),
                ("P_TEST", "test only"),
            ]),
        ),
        (
            &deploy,
            vars(&[
                ("P_ALL", "all"),
                ("P_DEPLOY", "deploy only"),
                ("P_KIND", "deploy"),
                ("P_ONCE", "deploy"),
            ]),
        ),
        (
            &deploy_once,
            vars(&[
                ("P_ALL", "all"),
                ("P_DEPLOY", "deploy only"),
                ("P_KIND", "deploy"),
                ("P_NEW", "once"),
                ("P_ONCE", "once"),
            ]),
        ),
        (
            &custom,
            vars(&[("P_ALL", "all"), ("P_KIND", "all"), ("P_ONCE", "all")]),
        ),
    ];
    for (job, expected_vars) in &expected {
        api.wait_for_success(job.id, JOB_TIMEOUT).await;
        assert_eq!(
            p_vars(&api.output(job.id).await),
            *expected_vars,
            "the variables of the {} job {} ({})",
            job.kind,
            job.id,
            job.target
        );
    }

    // Removing the deploy scope of a key uncovers the `all` value.
    let response = api
        .raw(
            Method::DELETE,
            "/api/v1/repos/local/demo/env/P_KIND?scope=deploy",
            None,
        )
        .await;
    assert_eq!(response.status, 204, "{}", response.text());
    let response = api
        .raw(Method::DELETE, "/api/v1/repos/local/demo/env/P_TEST", None)
        .await;
    assert_eq!(response.status, 204, "{}", response.text());
    let deploy = api.deploy(REPO, json!({})).await;
    let test = api.run_target(REPO, "test").await;
    api.wait_for_success(deploy.id, JOB_TIMEOUT).await;
    api.wait_for_success(test.id, JOB_TIMEOUT).await;
    assert_eq!(
        p_vars(&api.output(deploy.id).await),
        vars(&[
            ("P_ALL", "all"),
            ("P_DEPLOY", "deploy only"),
            ("P_KIND", "all"),
            ("P_ONCE", "deploy"),
        ])
    );
    assert_eq!(
        p_vars(&api.output(test.id).await),
        vars(&[("P_ALL", "all"), ("P_KIND", "test"), ("P_ONCE", "test")])
    );
}

/// The secrets `make secrets` prints, and every form of them that must never
/// be seen in plaintext.
struct TestSecrets {
    /// One line, short enough for one line of `base64`.
    value: String,
    /// Five lines, one of them shorter than 4 characters.
    lines: String,
    forbidden: Vec<String>,
}

/// Fresh test secrets, set on `local/demo` as `E2E_SECRET` and
/// `E2E_SECRET_LINES` (scope all); the API answers without their values.
async fn set_test_secrets(api: &Api) -> TestSecrets {
    let secrets = test_secrets();
    for (key, value) in [
        ("E2E_SECRET", &secrets.value),
        ("E2E_SECRET_LINES", &secrets.lines),
    ] {
        let response = api
            .put_env(
                REPO,
                key,
                &json!({ "value": value, "secret": true, "scope": "all" }),
            )
            .await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(
            response.json(),
            json!({ "key": key, "scope": "all", "secret": true, "value": null })
        );
    }
    secrets
}

fn test_secrets() -> TestSecrets {
    let value = format!("s3cr3t-{}-Qx7", hobotnica_tests::unique("v"));
    let tag = hobotnica_tests::unique("k");
    let lines = format!(
        "-----BEGIN E2E KEY {tag}-----\n{tag}-line-two\nxy\n{tag}-line-four\n-----END E2E KEY {tag}-----"
    );
    let base64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut forbidden = vec![value.clone(), base64(&value), lines.clone(), base64(&lines)];
    forbidden.extend(
        lines
            .lines()
            .filter(|line| line.len() >= 4)
            .map(str::to_owned),
    );
    TestSecrets {
        value,
        lines,
        forbidden,
    }
}

/// What `make secrets` prints with `$E2E_GATE` set, every secret masked.
const MASKED_SECRETS_OUTPUT: &str = "waiting for the gate\ngate opened\n\
whole: [MASKED]\nbytes: [MASKED]\nbase64: [MASKED]\n\
line: [MASKED]\nline: [MASKED]\nline: xy\nline: [MASKED]\nline: [MASKED]\n\
secrets done\n";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Asserts that no form of the secrets is in `haystack`.
fn assert_no_secret(haystack: &[u8], what: &str, secrets: &TestSecrets) {
    for (n, form) in secrets.forbidden.iter().enumerate() {
        assert!(
            !contains(haystack, form.as_bytes()),
            "{what} holds secret form #{n} in plaintext: {form:?}"
        );
    }
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_dir() {
                dirs.push(entry.path());
            } else if file_type.is_file() {
                files.push(entry.path());
            }
        }
    }
    files
}

/// Reads every file under `dir` raw and asserts no secret is in any;
/// returns how many files were read.
fn assert_no_secret_in_files(dir: &Path, secrets: &TestSecrets) -> usize {
    let mut read = 0;
    for file in files_under(dir) {
        // Files may go away while we look (spools, temp files).
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        read += 1;
        assert_no_secret(&bytes, &format!("file {}", file.display()), secrets);
    }
    read
}

/// Every Redis key with its value's bytes (read by type, never `DUMP`, whose
/// output may be compressed).
async fn redis_contents(url: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    fn flatten(value: &redis::Value, out: &mut Vec<u8>) {
        match value {
            redis::Value::BulkString(bytes) => {
                out.extend_from_slice(bytes);
                out.push(b'\n');
            }
            redis::Value::SimpleString(text) => {
                out.extend_from_slice(text.as_bytes());
                out.push(b'\n');
            }
            redis::Value::Array(items) | redis::Value::Set(items) => {
                for item in items {
                    flatten(item, out);
                }
            }
            redis::Value::Map(pairs) => {
                for (key, value) in pairs {
                    flatten(key, out);
                    flatten(value, out);
                }
            }
            _ => {}
        }
    }
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    let mut contents = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let (command, more): (&str, &[&str]) = match kind.as_str() {
            "string" => ("GET", &[]),
            "hash" => ("HGETALL", &[]),
            "list" => ("LRANGE", &["0", "-1"]),
            "set" => ("SMEMBERS", &[]),
            "zset" => ("ZRANGE", &["0", "-1", "WITHSCORES"]),
            "stream" => ("XRANGE", &["-", "+"]),
            // Deleted since the scan.
            "none" => continue,
            other => panic!("a Redis key of type {other}: {}", text(&key)),
        };
        let mut read = redis::cmd(command);
        read.arg(&key);
        for arg in more {
            read.arg(*arg);
        }
        let value: redis::Value = read.query_async(&mut conn).await.unwrap();
        let mut bytes = Vec::new();
        flatten(&value, &mut bytes);
        contents.push((key, bytes));
    }
    contents
}

/// Sets two secrets on `local/demo`, runs `make secrets` while `hobot logs
/// -f` follows it, and checks the secrets are masked in the stored log and
/// the tail, absent from every API answer and process log, and in plaintext
/// in no file of the controller or the agent, nor (with `redis`) in Redis.
async fn secrets_are_masked_and_never_stored_in_plaintext(
    controller: &Controller,
    redis: Option<&RedisServer>,
) {
    let agent = Agent::start_default(controller).await;
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    let secrets = set_test_secrets(&api).await;
    api.set_env(REPO, "E2E_PLAIN", "not a secret", "all", false)
        .await;
    let listed = api.env(REPO).await;
    assert_eq!(
        listed,
        vec![
            json!({ "key": "E2E_PLAIN", "scope": "all", "secret": false, "value": "not a secret" }),
            json!({ "key": "E2E_SECRET", "scope": "all", "secret": true, "value": null }),
            json!({ "key": "E2E_SECRET_LINES", "scope": "all", "secret": true, "value": null }),
        ]
    );

    let gate = scratch_file(controller, "gate", "open");
    let job = api
        .run_job(
            REPO,
            json!({ "target": "secrets", "env": { "E2E_GATE": path_str(&gate) } }),
        )
        .await;

    // An operator follows the log live.
    let cwd = tempfile::tempdir().unwrap();
    let followed_path = cwd.path().join("followed.log");
    let mut follower = cli::command(Some(controller), cwd.path())
        .args(["logs", "-f", &job.id.to_string()])
        .stdout(std::fs::File::create(&followed_path).unwrap())
        .spawn()
        .unwrap();
    wait_until(JOB_TIMEOUT, "`hobot logs -f` to print the log", || {
        let printed = std::fs::read_to_string(&followed_path).unwrap_or_default();
        async move { printed.contains("waiting for the gate") }
    })
    .await;
    std::fs::write(&gate, b"").unwrap();

    api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let (status, stderr) = cli::wait_exit(&mut follower, "`hobot logs -f`").await;
    assert_eq!(status.code(), Some(0), "hobot logs -f: {stderr}");

    // The stored log.
    let log = api.log(job.id).await;
    assert_no_secret(&log, "the stored log", &secrets);
    assert_eq!(text(&make_output(&log)), MASKED_SECRETS_OUTPUT);
    // The live tail.
    let tailed = std::fs::read(&followed_path).unwrap();
    assert_no_secret(&tailed, "the live tail", &secrets);
    assert_no_secret(stderr.as_bytes(), "hobot's stderr", &secrets);
    assert_eq!(text(&make_output(&tailed)), MASKED_SECRETS_OUTPUT);
    assert_eq!(tailed, log, "the tail is the stored log");

    // The API.
    for path in [
        format!("/api/v1/repos/{REPO}/env"),
        format!("/api/v1/repos/{REPO}"),
        format!("/api/v1/jobs/{}", job.id),
        "/api/v1/jobs".to_owned(),
        "/api/v1/repos".to_owned(),
    ] {
        let response = api.raw(Method::GET, &path, None).await;
        assert_eq!(response.status, 200, "GET {path}: {}", response.text());
        assert_no_secret(&response.body, &format!("GET {path}"), &secrets);
    }

    // The processes' own logs.
    assert_no_secret(
        controller.output().as_bytes(),
        "the controller's log",
        &secrets,
    );
    assert_no_secret(agent.output().as_bytes(), "the agent's log", &secrets);

    // The files, read raw.
    let read = assert_no_secret_in_files(&controller.data_dir(), &secrets);
    if redis.is_none() {
        assert!(read > 0, "no file in the controller's data dir");
    }
    assert_no_secret_in_files(&agent.work_dir(), &secrets);

    // Redis: every key and value, and its append-only files.
    if let Some(redis) = redis {
        let contents = redis_contents(&redis.url()).await;
        assert!(!contents.is_empty(), "nothing in Redis");
        for (key, value) in &contents {
            let what = format!("Redis key {}", text(key));
            assert_no_secret(key, &what, &secrets);
            assert_no_secret(value, &what, &secrets);
        }
        assert!(
            assert_no_secret_in_files(redis.data_dir(), &secrets) > 0,
            "no append-only file"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_masked_in_logs_and_absent_from_the_api_and_the_data_dir() {
    let controller = Controller::start_default().await;
    secrets_are_masked_and_never_stored_in_plaintext(&controller, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_masked_in_logs_and_absent_from_redis() {
    let redis = RedisServer::start().await;
    let controller = Controller::start(ControllerOpts {
        redis_url: Some(redis.url()),
        ..ControllerOpts::default()
    })
    .await;
    secrets_are_masked_and_never_stored_in_plaintext(&controller, Some(&redis)).await;
}

/// A job prints both secrets in base64 every way `make secret-encodings`
/// knows (after `echo`, behind a prefix, base64url, wrapped at 76 and 20
/// columns, with CRLF, unwrapped): decoding whatever base64 is left in the
/// stored log at every alignment yields neither secret nor any of its lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_base64_are_masked_at_every_alignment_wrapped_or_not() {
    let controller = Controller::start_default().await;
    let _agent = Agent::start_default(&controller).await;
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    let secrets = set_test_secrets(&api).await;
    let job = api
        .run_job(REPO, json!({ "target": "secret-encodings" }))
        .await;
    api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let log = api.log(job.id).await;
    let output = make_output(&log);
    assert!(
        text(&output).contains("encodings done"),
        "{}",
        text(&output)
    );
    let mut hidden: Vec<&str> = vec![&secrets.value, &secrets.lines];
    hidden.extend(secrets.lines.lines().filter(|line| line.len() >= 4));
    for decoded in hobotnica_common::mask_forms::base64_decodings(&output) {
        for secret in &hidden {
            assert!(
                !contains(&decoded, secret.as_bytes()),
                "the log hides {secret:?} in base64:\n{}",
                text(&output)
            );
        }
    }
    assert_no_secret(&log, "the stored log", &secrets);
}

/// Asserts a 422 problem that names `name`, in `errors[].field` as
/// `env.<name>` and in the detail.
fn assert_names_variable(response: &RawResponse, name: &str, what: &str) {
    assert_eq!(
        response.status,
        422,
        "{what}: expected 422, got {} {}",
        response.status,
        response.text()
    );
    let problem = response.assert_problem(422);
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains(name)),
        "{what}: the detail does not name {name:?}: {problem}"
    );
    assert_eq!(
        problem["errors"][0]["field"],
        format!("env.{name}"),
        "{what}: {problem}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_variable_names_and_values_are_refused_with_422_naming_the_variable() {
    let s = setup().await;
    let api = &s.api;
    let ok = json!({ "value": "x" });
    // (name, how it goes in a URL path)
    let bad_names = [
        ("9LIVES", "9LIVES"),
        ("A-B", "A-B"),
        ("A B", "A%20B"),
        ("A.B", "A.B"),
        ("PATH", "PATH"),
        ("HOME", "HOME"),
        ("CI", "CI"),
        // Accepted before, and silently dropped by the agent.
        ("HOBOTNICA", "HOBOTNICA"),
        ("HOBOTNICA_TOKEN", "HOBOTNICA_TOKEN"),
        ("HOBOTNICA_JOB_ID", "HOBOTNICA_JOB_ID"),
    ];
    for (name, in_path) in bad_names {
        let response = api.put_env(REPO, in_path, &ok).await;
        assert_names_variable(&response, name, &format!("PUT env/{in_path}"));
        let body = json!({ "target": "test", "env": { name: "x" } });
        let response = api
            .send_json(Method::POST, &format!("/api/v1/repos/{REPO}/jobs"), &body)
            .await;
        assert_names_variable(&response, name, &format!("a one-time {name:?} of a job"));
        let response = api
            .deploy_raw(REPO, &json!({ "env": { name: "x" } }), None)
            .await;
        assert_names_variable(&response, name, &format!("a one-time {name:?} of a deploy"));
    }

    // Values: at most 64 KiB, no NUL.
    let limit = 64 * 1024;
    let too_long = "v".repeat(limit + 1);
    let response = api
        .put_env(REPO, "BIG_VALUE", &json!({ "value": too_long }))
        .await;
    assert_names_variable(&response, "BIG_VALUE", "a value over 64 KiB");
    let response = api
        .put_env(
            REPO,
            "BIG_SECRET",
            &json!({ "value": too_long, "secret": true }),
        )
        .await;
    assert_names_variable(&response, "BIG_SECRET", "a secret over 64 KiB");
    let response = api
        .deploy_raw(REPO, &json!({ "env": { "BIG_ONCE": too_long } }), None)
        .await;
    assert_names_variable(&response, "BIG_ONCE", "a one-time value over 64 KiB");
    // The limit is in bytes: 65,536 characters of `€` (192 KiB) made the
    // job fail with E2BIG before.
    let wide = "€".repeat(limit / 3 + 1);
    let response = api
        .put_env(REPO, "WIDE_VALUE", &json!({ "value": wide }))
        .await;
    assert_names_variable(&response, "WIDE_VALUE", "a value over 64 KiB in bytes");
    let response = api
        .put_env(REPO, "NUL_VALUE", &json!({ "value": "a\u{0}b" }))
        .await;
    assert_names_variable(&response, "NUL_VALUE", "a value with NUL");

    // Nothing was stored, and nothing queued.
    assert_eq!(api.env(REPO).await, Vec::<Value>::new());
    assert!(api.jobs("repo=local/demo").await.is_empty());

    // The limits themselves are fine: exactly 64 KiB, `_` first, digits.
    let at_limit = "v".repeat(limit);
    api.set_env(REPO, "_AT_LIMIT9", &at_limit, "deploy", true)
        .await;
    let deploy = api
        .deploy(REPO, json!({ "env": { "_ONCE_AT_LIMIT": at_limit } }))
        .await;
    api.wait_for_success(deploy.id, JOB_TIMEOUT).await;
}

/// `hobot admin rotate-key` re-encrypts the secrets at rest: afterwards a
/// controller that has only the new key hands jobs the same secret, and
/// running the rotation again (as after an interruption) is safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_secret_key_keeps_every_secret_usable() {
    use sha2::{Digest, Sha256};
    let mut controller = Controller::start_default().await;
    let repo = GitRepo::new();
    // The job proves it got the secret without printing it.
    repo.commit(
        &[(
            "Makefile",
            &makefile_with_test_recipe(&[
                r#"test "$$(printf '%s' "$$E2E_SECRET" | sha256sum | cut -c1-64)" = "$$E2E_SECRET_SHA""#,
                "echo secret intact",
            ]),
        )],
        "check the secret",
    );
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    let secret = "rotate-me-8f1c2d9e";
    let digest = hex::encode(Sha256::digest(secret.as_bytes()));
    api.set_env(REPO, "E2E_SECRET", secret, "all", true).await;
    api.set_env(REPO, "E2E_SECRET_SHA", &digest, "all", false)
        .await;
    let _agent = Agent::start_default(&controller).await;
    let before = api.run_target(REPO, "test").await;
    api.wait_for_success(before.id, JOB_TIMEOUT).await;

    controller.stop().await;
    let data_dir = controller.data_dir();
    let key_file = data_dir.join("secret-key");
    let old_key = controller.scratch_dir("keys").join("old-key");
    let new_key = controller.scratch_dir("keys").join("new-key");
    std::fs::copy(&key_file, &old_key).unwrap();
    std::fs::write(
        &new_key,
        hobotnica_common::secrets::SecretKey::generate_hex(),
    )
    .unwrap();
    let rotate = [
        "admin",
        "rotate-key",
        "--data-dir",
        path_str(&data_dir),
        "--old-key-file",
        path_str(&old_key),
        "--new-key-file",
        path_str(&new_key),
    ];
    let cwd = controller.scratch_dir("cwd");
    let first = cli::run(None, &cwd, &rotate).await;
    assert!(first.status.success(), "{first:?}");
    assert!(
        first
            .stderr
            .contains("re-encrypted the secrets of 1 repositories"),
        "{first:?}"
    );
    let again = cli::run(None, &cwd, &rotate).await;
    assert!(
        again.status.success(),
        "running it again is safe: {again:?}"
    );

    // The controller now has the new key only.
    std::fs::copy(&new_key, &key_file).unwrap();
    controller.restart().await;
    let after = api.run_target(REPO, "test").await;
    api.wait_for_success(after.id, JOB_TIMEOUT).await;
    assert!(api.output(after.id).await.contains("secret intact"));
    assert!(!api.output(after.id).await.contains(secret));
}
