//! GitHub end to end: a fake GitHub (`hobotnica_tests::github`) holding a
//! private repository, a controller pointed at it (`--github-url`,
//! `--github-api-url`), agents that clone through the fake's smart HTTP with
//! the token. Signed webhooks in, commit statuses out, credentials checked,
//! access revoked, and the token looked for everywhere it must not be.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine as _;
use hobotnica_tests::RawResponse;
use hobotnica_tests::git::makefile_with_test_recipe;
use hobotnica_tests::github::{
    CommitStatus, FakeGitHub, GitHubUser, Permission, ZERO_SHA, new_delivery_id, send_webhook,
    send_webhook_raw, signature,
};

use super::*;

pub(super) const OWNER: &str = "octo-org";
pub(super) const NAME: &str = "widget";
/// The GitHub repository every test registers.
pub(super) const GH_REPO: &str = "octo-org/widget";
/// The user whose token registers it.
pub(super) const LOGIN: &str = "octocat";
/// How long the controller may take to notice revoked access (it re-checks
/// every second in these tests).
const REVOCATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long until a finished job's final commit status is posted.
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
/// A `test` recipe that prints the commit it runs at.
const PRINT_HEAD: &str = "echo \"tests passed at $$(git rev-parse HEAD)\"";

/// A token shaped like a classic GitHub personal access token (`ghp_` and
/// 36 characters), unique to the test.
fn github_token() -> String {
    hobotnica_common::token::new_token("ghp")[..40].to_owned()
}

/// A fake GitHub with `octo-org/widget` and user `octocat` (with `token`
/// and `permission` on it), and a controller pointed at it.
pub(super) struct GitHubSetup {
    pub(super) github: FakeGitHub,
    pub(super) repo: Arc<GitRepo>,
    pub(super) token: String,
    pub(super) controller: Controller,
    /// The admin token's client.
    pub(super) api: Api,
    /// `octocat`'s client.
    pub(super) user: GitHubUser,
}

pub(super) async fn github_setup(permission: Permission, controller_args: &[&str]) -> GitHubSetup {
    let github = FakeGitHub::start().await;
    let token = github_token();
    github.add_user(LOGIN, &token);
    let repo = github.add_repo(OWNER, NAME, "main");
    github.grant(&token, GH_REPO, permission);
    let mut extra_args = github.controller_args();
    extra_args.extend(controller_args.iter().map(ToString::to_string));
    let controller = Controller::start(ControllerOpts {
        extra_args,
        ..ControllerOpts::default()
    })
    .await;
    let api = controller.api();
    let user = GitHubUser::new(controller.url(), LOGIN, &token);
    GitHubSetup {
        github,
        repo,
        token,
        controller,
        api,
        user,
    }
}

/// What registering answered.
pub(super) struct Registered {
    pub(super) webhook_url: String,
    pub(super) secret: String,
    body: RawResponse,
}

impl GitHubSetup {
    /// Registers `octo-org/widget` as `octocat` (asserting 201).
    pub(super) async fn register(&self, extra: Value) -> Registered {
        let response = self.user.register(GH_REPO, extra).await;
        assert_eq!(response.status, 201, "registering: {}", response.text());
        let body = response.json();
        let webhook_url = body["webhook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("no webhook_url: {body}"))
            .to_owned();
        let secret = body["webhook_secret"]
            .as_str()
            .unwrap_or_else(|| panic!("no webhook_secret: {body}"))
            .to_owned();
        Registered {
            webhook_url,
            secret,
            body: response,
        }
    }

    /// The jobs of `octo-org/widget`, oldest first.
    async fn jobs(&self) -> Vec<hobotnica_tests::Job> {
        let mut jobs = self.api.jobs(&format!("repo={GH_REPO}&limit=100")).await;
        jobs.reverse();
        jobs
    }

    /// Waits until the repository has `count` jobs, and returns them
    /// (oldest first).
    pub(super) async fn wait_for_jobs(&self, count: usize) -> Vec<hobotnica_tests::Job> {
        let what = format!("{count} job(s) of {GH_REPO}");
        hobotnica_tests::wait_for(JOB_TIMEOUT, &what, || async move {
            let jobs = self.jobs().await;
            assert!(jobs.len() <= count, "more jobs than expected: {jobs:#?}");
            (jobs.len() == count).then_some(jobs)
        })
        .await
    }

    /// A signed push of `after` to `main`.
    pub(super) async fn push(&self, hook: &Registered, before: &str, after: &str) -> RawResponse {
        let payload =
            self.github
                .push_payload(GH_REPO, "refs/heads/main", before, after, false, false);
        send_webhook(
            &hook.webhook_url,
            "push",
            &new_delivery_id(),
            &payload,
            Some(&hook.secret),
        )
        .await
    }

    /// A new commit pushed to `main` (signed), and the job it queued: after
    /// a delivery that must queue nothing, this shows that the controller
    /// has handled the deliveries before it.
    async fn barrier(&self, hook: &Registered, jobs_before: usize) -> hobotnica_tests::Job {
        let before = self.repo.head();
        let after = self
            .repo
            .commit_version(&hobotnica_tests::unique("barrier"));
        let response = self.push(hook, &before, &after).await;
        assert_eq!(response.status, 202, "barrier push: {}", response.text());
        let jobs = self.wait_for_jobs(jobs_before + 1).await;
        let job = jobs.last().unwrap().clone();
        assert_eq!(job.commit, after, "the newest job is the barrier's");
        job
    }

    fn job_url(&self, id: u64) -> String {
        format!("{}/jobs/{id}", self.controller.url())
    }
}

/// Waits until a final (not `pending`) status of `sha` is posted, and
/// returns every status of `sha`.
pub(super) async fn wait_for_final_status(github: &FakeGitHub, sha: &str) -> Vec<CommitStatus> {
    let what = format!("a final commit status of {sha}");
    hobotnica_tests::wait_for(STATUS_TIMEOUT, &what, || {
        let statuses = github.statuses(GH_REPO, sha);
        let done = statuses.iter().any(|status| status.state != "pending");
        async move { done.then_some(statuses) }
    })
    .await
}

/// Asserts `pending` then `final_state` (a retried post may repeat a state),
/// all for context `hobotnica/test`, linking to the job, posted as `LOGIN`.
fn assert_statuses(statuses: &[CommitStatus], final_state: &str, target_url: &str) {
    let mut states: Vec<&str> = statuses
        .iter()
        .map(|status| status.state.as_str())
        .collect();
    states.dedup();
    assert_eq!(states, ["pending", final_state], "{statuses:#?}");
    for status in statuses {
        assert_eq!(status.context, "hobotnica/test", "{status:#?}");
        assert_eq!(
            status.target_url.as_deref(),
            Some(target_url),
            "{status:#?}"
        );
        assert_eq!(status.creator, LOGIN, "posted with the registered token");
    }
}

/// Asserts a webhook answer is one of `statuses`.
fn assert_status_in(response: &RawResponse, statuses: &[u16], what: &str) {
    assert!(
        statuses.contains(&response.status),
        "{what}: {} {}",
        response.status,
        response.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_push_runs_make_test_at_exactly_that_commit_and_posts_pending_then_success() {
    let s = github_setup(Permission::Admin, &[]).await;
    let _agent = Agent::start_default(&s.controller).await;
    let hook = s.register(json!({})).await;
    let hook_id = hook
        .webhook_url
        .strip_prefix(&format!("{}/webhooks/github/", s.controller.url()))
        .unwrap_or_else(|| panic!("webhook URL {} is not the controller's", hook.webhook_url));
    assert!(hook_id.len() >= 16, "a guessable hook id: {hook_id:?}");
    assert!(hook.secret.len() >= 16, "a weak webhook secret");
    assert!(s.github.hooks(GH_REPO).is_empty(), "no hook unless asked");

    // The branch moves on after the pushed commit: the job must still run
    // the pushed one.
    let before = s.repo.head();
    let pushed = s.repo.commit(
        &[("Makefile", &makefile_with_test_recipe(&[PRINT_HEAD]))],
        "make test prints the commit",
    );
    let later = s.repo.commit_version("later");

    let response = s.push(&hook, &before, &pushed).await;
    assert_eq!(response.status, 202, "push: {}", response.text());
    let job = s.wait_for_jobs(1).await.remove(0);
    assert_eq!(job.kind, "test");
    assert_eq!(job.target, "test");
    assert_eq!(job.commit, pushed);
    assert_eq!(job.branch.as_deref(), Some("main"));
    assert_eq!(job.trigger, "webhook");

    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    assert_eq!(
        s.api.output(job.id).await,
        format!("tests passed at {pushed}\n")
    );
    let statuses = wait_for_final_status(&s.github, &pushed).await;
    assert_statuses(&statuses, "success", &s.job_url(job.id));
    assert!(s.github.statuses(GH_REPO, &later).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_of_a_failing_commit_posts_pending_then_failure() {
    let s = github_setup(Permission::Admin, &[]).await;
    let _agent = Agent::start_default(&s.controller).await;
    let hook = s.register(json!({})).await;
    let before = s.repo.head();
    let failing = s.repo.commit(
        &[(
            "Makefile",
            &makefile_with_test_recipe(&["echo \"about to fail\"", "exit 3"]),
        )],
        "break the tests",
    );

    let response = s.push(&hook, &before, &failing).await;
    assert_eq!(response.status, 202, "push: {}", response.text());
    let job = s.wait_for_jobs(1).await.remove(0);
    assert_eq!(job.commit, failing);
    let done = s
        .api
        .wait_for_state(job.id, &[JobState::Failed], JOB_TIMEOUT)
        .await;
    assert_eq!(done.exit_code, Some(MAKE_FAILED));
    assert!(s.api.output(job.id).await.starts_with("about to fail\n"));
    let statuses = wait_for_final_status(&s.github, &failing).await;
    assert_statuses(&statuses, "failure", &s.job_url(job.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_with_a_bad_or_missing_signature_or_a_bad_body_queue_nothing() {
    let s = github_setup(Permission::Admin, &[]).await;
    let hook = s.register(json!({})).await;
    let before = s.repo.head();
    let after = s.repo.commit_version("2");
    let payload = s
        .github
        .push_payload(GH_REPO, "refs/heads/main", &before, &after, false, false);
    let body = serde_json::to_vec_pretty(&payload).unwrap();
    // Refused deliveries do not count as delivered: the same id, signed
    // properly at the end, still queues its job.
    let delivery = new_delivery_id();
    let url = hook.webhook_url.as_str();

    let problem = send_webhook(url, "push", &delivery, &payload, Some("not-the-secret"))
        .await
        .assert_problem(401);
    assert!(!problem.to_string().contains(&hook.secret));
    send_webhook(url, "push", &delivery, &payload, None)
        .await
        .assert_problem(401);
    // A signature of other bytes (the same JSON, compact): the check is
    // over the raw body.
    let compact = signature(&hook.secret, &serde_json::to_vec(&payload).unwrap());
    send_webhook_raw(url, "push", &delivery, body.clone(), Some(&compact))
        .await
        .assert_problem(401);
    for header in ["sha256=", "sha256=zz", "sha1=0123456789abcdef", "garbage"] {
        send_webhook_raw(url, "push", &delivery, body.clone(), Some(header))
            .await
            .assert_problem(401);
    }

    // An unknown hook id.
    let unknown = format!("{}/webhooks/github/{}", s.controller.url(), "0".repeat(32));
    let response = send_webhook(&unknown, "push", &delivery, &payload, Some(&hook.secret)).await;
    response.assert_problem(404);

    // Malformed JSON, correctly signed.
    let malformed = b"{\"ref\": \"refs/heads/main\", \"after\": ".to_vec();
    let malformed_signature = signature(&hook.secret, &malformed);
    send_webhook_raw(
        url,
        "push",
        &new_delivery_id(),
        malformed,
        Some(&malformed_signature),
    )
    .await
    .assert_problem(400);

    // Over GitHub's 25 MB cap: 413 from its Content-Length alone, before
    // a byte of the body is sent.
    assert_eq!(
        status_for_declared_length(url, 25 * 1024 * 1024 + 1).await,
        413,
        "a delivery declaring over 25 MB"
    );

    assert!(s.jobs().await.is_empty(), "a refused delivery queued a job");

    // The same delivery, signed: accepted.
    let response = send_webhook(url, "push", &delivery, &payload, Some(&hook.secret)).await;
    assert_eq!(response.status, 202, "{}", response.text());
    let jobs = s.wait_for_jobs(1).await;
    assert_eq!(jobs[0].commit, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_queues_one_job() {
    let s = github_setup(Permission::Admin, &[]).await;
    let hook = s.register(json!({})).await;
    let before = s.repo.head();
    let after = s.repo.commit_version("2");
    let payload = s
        .github
        .push_payload(GH_REPO, "refs/heads/main", &before, &after, false, false);
    let delivery = new_delivery_id();

    let first = send_webhook(
        &hook.webhook_url,
        "push",
        &delivery,
        &payload,
        Some(&hook.secret),
    )
    .await;
    assert_eq!(first.status, 202, "{}", first.text());
    let jobs = s.wait_for_jobs(1).await;
    assert_eq!(jobs[0].commit, after);

    // GitHub's "Redeliver": the same id and bytes.
    let again = send_webhook(
        &hook.webhook_url,
        "push",
        &delivery,
        &payload,
        Some(&hook.secret),
    )
    .await;
    assert_status_in(&again, &[200, 202], "a redelivery");

    let barrier = s.barrier(&hook, 1).await;
    let commits: Vec<String> = s.jobs().await.into_iter().map(|job| job.commit).collect();
    assert_eq!(commits, [after, barrier.commit], "one job per delivery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_branch_deletions_tag_pushes_and_other_events_queue_nothing() {
    let s = github_setup(Permission::Admin, &[]).await;
    let hook = s.register(json!({})).await;
    let url = hook.webhook_url.as_str();
    let secret = Some(hook.secret.as_str());
    let head = s.repo.head();

    let ping = s.github.ping_payload(GH_REPO, 4242);
    let response = send_webhook(url, "ping", &new_delivery_id(), &ping, secret).await;
    assert_eq!(response.status, 200, "ping: {}", response.text());

    let deleted =
        s.github
            .push_payload(GH_REPO, "refs/heads/feature", &head, ZERO_SHA, true, false);
    let response = send_webhook(url, "push", &new_delivery_id(), &deleted, secret).await;
    assert_status_in(&response, &[200, 202], "a branch deletion");

    s.repo.git(&["tag", "v1.0.0"]);
    let tag = s
        .github
        .push_payload(GH_REPO, "refs/tags/v1.0.0", ZERO_SHA, &head, false, false);
    let response = send_webhook(url, "push", &new_delivery_id(), &tag, secret).await;
    assert_status_in(&response, &[200, 202], "a tag push");

    let closed = s
        .github
        .pull_request_payload("closed", 3, &head, "feature", GH_REPO, GH_REPO);
    let response = send_webhook(url, "pull_request", &new_delivery_id(), &closed, secret).await;
    assert_eq!(
        response.status,
        202,
        "a closed pull request: {}",
        response.text()
    );

    let issue = json!({
        "action": "opened",
        "issue": { "number": 9, "title": "It is broken", "state": "open" },
        "repository": ping["repository"],
        "sender": ping["sender"],
    });
    let response = send_webhook(url, "issues", &new_delivery_id(), &issue, secret).await;
    assert_eq!(response.status, 202, "an issues event: {}", response.text());

    let barrier = s.barrier(&hook, 0).await;
    let jobs = s.jobs().await;
    assert_eq!(jobs.len(), 1, "only the barrier's job: {jobs:#?}");
    assert_eq!(jobs[0].id, barrier.id);
}

/// A `test` recipe line that shows the secret variable `DEPLOY_KEY`.
const PRINT_SECRET: &str = "echo \"secret: [$$DEPLOY_KEY]\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_from_a_fork_runs_a_test_job_at_its_head_without_secrets() {
    let s = github_setup(Permission::Admin, &[]).await;
    let _agent = Agent::start_default(&s.controller).await;
    let hook = s.register(json!({})).await;
    let secret_value = format!("deploy-{}", hobotnica_tests::unique("key"));
    let response = s
        .api
        .send_json(
            Method::PUT,
            &format!("/api/v1/repos/{GH_REPO}/env/DEPLOY_KEY"),
            &json!({ "value": secret_value, "secret": true }),
        )
        .await;
    assert_eq!(
        response.status,
        200,
        "setting a secret: {}",
        response.text()
    );

    // As on GitHub, a pull request's commits are in the base repository
    // under refs/pull/<n>/head, on no branch.
    let contribution = |number: u64, label: &str| {
        s.repo.create_branch("contribution");
        let sha = s.repo.commit(
            &[
                (
                    "Makefile",
                    &makefile_with_test_recipe(&[PRINT_HEAD, PRINT_SECRET]),
                ),
                ("version.txt", &format!("version {label}\n")),
            ],
            &format!("contribution {label}"),
        );
        s.repo.switch("main");
        s.repo.git(&["branch", "--quiet", "-D", "contribution"]);
        s.repo
            .git(&["update-ref", &format!("refs/pull/{number}/head"), &sha]);
        sha
    };
    let deliver = |payload: Value| {
        let url = hook.webhook_url.clone();
        let secret = hook.secret.clone();
        async move {
            let response = send_webhook(
                &url,
                "pull_request",
                &new_delivery_id(),
                &payload,
                Some(&secret),
            )
            .await;
            assert_eq!(response.status, 202, "{}", response.text());
        }
    };

    let first = contribution(7, "1");
    deliver(s.github.pull_request_payload(
        "opened",
        7,
        &first,
        "contribution",
        "forker/widget",
        GH_REPO,
    ))
    .await;
    let job = s.wait_for_jobs(1).await.remove(0);
    assert_eq!(job.kind, "test");
    assert_eq!(job.target, "test");
    assert_eq!(job.commit, first);
    assert_eq!(job.trigger, "webhook");
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    assert_eq!(
        s.api.output(job.id).await,
        format!("tests passed at {first}\nsecret: []\n"),
        "a fork's job runs without the repository's secrets"
    );
    let statuses = wait_for_final_status(&s.github, &first).await;
    assert_statuses(&statuses, "success", &s.job_url(job.id));

    // New commits on the fork's pull request: still no secrets.
    let second = contribution(7, "2");
    deliver(s.github.pull_request_payload(
        "synchronize",
        7,
        &second,
        "contribution",
        "forker/widget",
        GH_REPO,
    ))
    .await;
    let job = s.wait_for_jobs(2).await.remove(1);
    assert_eq!(job.commit, second);
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    assert_eq!(
        s.api.output(job.id).await,
        format!("tests passed at {second}\nsecret: []\n")
    );

    // A pull request from a branch of the repository itself gets them
    // (masked in the log).
    let third = contribution(8, "3");
    deliver(
        s.github
            .pull_request_payload("opened", 8, &third, "contribution", GH_REPO, GH_REPO),
    )
    .await;
    let job = s.wait_for_jobs(3).await.remove(2);
    assert_eq!(job.commit, third);
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let output = s.api.output(job.id).await;
    assert!(
        output.starts_with(&format!("tests passed at {third}\nsecret: [")),
        "{output:?}"
    );
    assert_ne!(
        output,
        format!("tests passed at {third}\nsecret: []\n"),
        "no secret"
    );
    assert!(
        !output.contains(&secret_value),
        "the secret is masked: {output:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_with_a_token_of_another_user_is_refused_with_401() {
    let s = github_setup(Permission::Admin, &[]).await;
    let impostor = s.user.with_login("someone-else");
    let problem = impostor
        .register(GH_REPO, json!({}))
        .await
        .assert_problem(401);
    assert!(!problem.to_string().contains(&s.token), "{problem}");

    // A token GitHub does not know.
    let unknown = GitHubUser::new(s.controller.url(), LOGIN, &github_token());
    unknown
        .register(GH_REPO, json!({}))
        .await
        .assert_problem(401);

    let response = s
        .api
        .raw(Method::GET, &format!("/api/v1/repos/{GH_REPO}"), None)
        .await;
    response.assert_problem(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_repository_the_token_cannot_see_is_refused_with_404() {
    let s = github_setup(Permission::None, &[]).await;
    let problem = s
        .user
        .register(GH_REPO, json!({}))
        .await
        .assert_problem(404);
    let detail = problem["detail"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        detail.contains("not visible") && detail.contains("token"),
        "the detail says the repository is not visible with this token: {problem}"
    );
    assert!(!problem.to_string().contains(&s.token), "{problem}");
    s.api
        .raw(Method::GET, &format!("/api/v1/repos/{GH_REPO}"), None)
        .await
        .assert_problem(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_needs_admin_rights_and_reading_is_not_running() {
    let s = github_setup(Permission::Admin, &[]).await;
    let _agent = Agent::start_default(&s.controller).await;
    let reader_token = github_token();
    s.github.add_user("reader", &reader_token);
    s.github.grant(&reader_token, GH_REPO, Permission::Pull);
    let reader = GitHubUser::new(s.controller.url(), "reader", &reader_token);
    let writer_token = github_token();
    s.github.add_user("writer", &writer_token);
    s.github.grant(&writer_token, GH_REPO, Permission::Push);
    let writer = GitHubUser::new(s.controller.url(), "writer", &writer_token);

    // Registering hands out the webhook secret, and with it the power to
    // queue trusted jobs that get the repository's secrets: reading or
    // pushing is not enough (before, a reader registered and sent signed
    // pushes of their own).
    for (user, who) in [(&reader, "a reader"), (&writer, "a writer")] {
        let refused = user.register(GH_REPO, json!({})).await;
        assert!(
            !refused.text().contains("webhook_secret"),
            "{}",
            refused.text()
        );
        let problem = refused.assert_problem(403);
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("admin rights"), "{who}: {problem}");
    }
    s.api
        .raw(Method::GET, &format!("/api/v1/repos/{GH_REPO}"), None)
        .await
        .assert_problem(404);
    s.register(json!({})).await;
    let user = &reader;

    // The reader sees the repository; a stranger does not.
    let shown = user
        .raw(Method::GET, &format!("/api/v1/repos/{GH_REPO}"), None)
        .await;
    assert_eq!(shown.status, 200, "{}", shown.text());
    let stranger_token = github_token();
    s.github.add_user("stranger", &stranger_token);
    let stranger = GitHubUser::new(s.controller.url(), "stranger", &stranger_token);
    let hidden = stranger
        .raw(Method::GET, &format!("/api/v1/repos/{GH_REPO}"), None)
        .await;
    assert_status_in(&hidden, &[403, 404], "a stranger reading the repository");
    let listed = stranger.raw(Method::GET, "/api/v1/repos", None).await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert!(!listed.text().contains(GH_REPO), "{}", listed.text());

    // Reading is not enough to run a job.
    let run = json!({ "target": "test" });
    let path = format!("/api/v1/repos/{GH_REPO}/jobs");
    user.raw(Method::POST, &path, Some(&run))
        .await
        .assert_problem(403);
    let refused = stranger.raw(Method::POST, &path, Some(&run)).await;
    assert_status_in(&refused, &[403, 404], "a stranger running a job");
    refused.assert_problem(refused.status);
    assert!(s.jobs().await.is_empty());

    // With push access it runs; the admin token works regardless.
    let response = writer.raw(Method::POST, &path, Some(&run)).await;
    assert_eq!(response.status, 202, "{}", response.text());
    let job: hobotnica_tests::Job = serde_json::from_value(response.json()).unwrap();
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;

    // The registering token is later left with read access only, so GitHub
    // refuses its commit statuses (404 to the write). That is not lost
    // access, nor are a stranger's 404s: the repository stays enabled and
    // the admin token still runs jobs.
    s.github.grant(&s.token, GH_REPO, Permission::Pull);
    let shown = s.api.get_json(&format!("/api/v1/repos/{GH_REPO}")).await;
    assert_eq!(shown["disabled"], Value::Null, "{shown}");
    let by_admin = s.api.run_target(GH_REPO, "test").await;
    s.api.wait_for_success(by_admin.id, JOB_TIMEOUT).await;
}

/// `POST /repos/{owner}/{name}/webhook-secret` issues a new webhook secret
/// to a user with admin rights on the repository (or the admin token): the
/// old secret no longer verifies deliveries and the new one does; a writer
/// may not rotate it (nor see it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_webhook_secret_retires_the_old_one() {
    let s = github_setup(Permission::Admin, &[]).await;
    let _agent = Agent::start_default(&s.controller).await;
    let hook = s.register(json!({})).await;
    let path = format!("/api/v1/repos/{GH_REPO}/webhook-secret");
    let writer_token = github_token();
    s.github.add_user("writer", &writer_token);
    s.github.grant(&writer_token, GH_REPO, Permission::Push);
    let writer = GitHubUser::new(s.controller.url(), "writer", &writer_token);
    let refused = writer.raw(Method::POST, &path, None).await;
    assert!(
        !refused.text().contains("webhook_secret"),
        "{}",
        refused.text()
    );
    refused.assert_problem(403);

    let rotated = s.user.raw(Method::POST, &path, None).await;
    assert_eq!(rotated.status, 200, "{}", rotated.text());
    let body = rotated.json();
    assert_eq!(body["webhook_url"], hook.webhook_url.as_str(), "{body}");
    let secret = body["webhook_secret"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(secret.len() >= 32 && secret != hook.secret, "{body}");

    let head = s.repo.head();
    s.push(&hook, ZERO_SHA, &head).await.assert_problem(401);
    let renewed = Registered {
        webhook_url: hook.webhook_url.clone(),
        secret,
        body: rotated,
    };
    let queued = s.push(&renewed, ZERO_SHA, &head).await;
    assert_eq!(queued.status, 202, "{}", queued.text());
    let by_admin = s.api.send_json(Method::POST, &path, &json!({})).await;
    assert_eq!(by_admin.status, 200, "{}", by_admin.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_webhook_makes_the_hook_on_github_and_its_deliveries_run_jobs() {
    let s = github_setup(Permission::Admin, &[]).await;
    let _agent = Agent::start_default(&s.controller).await;
    let hook = s.register(json!({ "create_webhook": true })).await;

    let hooks = s.github.hooks(GH_REPO);
    assert_eq!(hooks.len(), 1, "{hooks:#?}");
    let created = &hooks[0];
    assert_eq!(created.url, hook.webhook_url);
    assert_eq!(created.secret.as_deref(), Some(hook.secret.as_str()));
    assert_eq!(created.content_type, "json");
    assert!(created.active);
    let events: BTreeSet<&str> = created.events.iter().map(String::as_str).collect();
    assert_eq!(events, BTreeSet::from(["pull_request", "push"]));
    assert_eq!(created.creator, LOGIN);

    // GitHub pings a new hook, then delivers pushes.
    let ping = s.github.ping_payload(GH_REPO, created.id);
    let response = s.github.deliver(created, "ping", &ping).await;
    assert_eq!(response.status, 200, "{}", response.text());
    let before = s.repo.head();
    let after = s.repo.commit_version("2");
    let push = s
        .github
        .push_payload(GH_REPO, "refs/heads/main", &before, &after, false, false);
    let response = s.github.deliver(created, "push", &push).await;
    assert_eq!(response.status, 202, "{}", response.text());
    let job = s.wait_for_jobs(1).await.remove(0);
    assert_eq!(job.commit, after);
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
}

/// Directories in the agent's cache (one bare clone per repository).
fn cache_clones(agent: &Agent) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(agent.work_dir().join("cache"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Two agents each with a clone of the repository; `revoke` takes access
/// away on GitHub; the controller notices, disables the repository (its
/// webhooks get 410, nothing is queued) and both agents delete their clone.
async fn revocation(revoke: impl FnOnce(&FakeGitHub, &str)) {
    let s = github_setup(Permission::Admin, &["--github-recheck-interval", "1s"]).await;
    let one = AgentOpts {
        concurrency: 1,
        ..AgentOpts::default()
    };
    let first = Agent::start(&s.controller, one.clone()).await;
    let second = Agent::start(&s.controller, one).await;
    let hook = s.register(json!({})).await;

    // One job holds one agent, so the other takes the next: both clone.
    let gate = s.controller.scratch_dir("gate").join("open");
    let held = s
        .api
        .run_job(
            GH_REPO,
            json!({ "target": "gate", "env": { "E2E_GATE": gate.to_str().unwrap() } }),
        )
        .await;
    // (Not its log line: the agent holds back a token's length of output
    // for masking, so a quiet job's last line may not have arrived yet.)
    s.api
        .wait_for_state(held.id, &[JobState::Running], JOB_TIMEOUT)
        .await;
    let before = s.repo.head();
    let after = s.repo.commit_version("2");
    let response = s.push(&hook, &before, &after).await;
    assert_eq!(response.status, 202, "{}", response.text());
    let pushed = s.wait_for_jobs(2).await.remove(1);
    let pushed = s.api.wait_for_success(pushed.id, JOB_TIMEOUT).await;
    std::fs::write(&gate, "").unwrap();
    let held = s.api.wait_for_success(held.id, JOB_TIMEOUT).await;
    assert_ne!(held.agent, pushed.agent, "each agent ran one job");
    for agent in [&first, &second] {
        assert_eq!(
            cache_clones(agent).len(),
            1,
            "agent {} has a clone",
            agent.name
        );
    }

    revoke(&s.github, &s.token);

    // Pings never queue anything, so they can probe until the controller
    // has noticed.
    let ping = s.github.ping_payload(GH_REPO, 1);
    let (url, secret, ping) = (&hook.webhook_url, &hook.secret, &ping);
    let gone =
        hobotnica_tests::wait_for(REVOCATION_TIMEOUT, "webhooks to get 410", || async move {
            let response = send_webhook(url, "ping", &new_delivery_id(), ping, Some(secret)).await;
            (response.status == 410).then_some(response)
        })
        .await;
    gone.assert_problem(410);
    let shown = s.api.get_json(&format!("/api/v1/repos/{GH_REPO}")).await;
    assert!(shown["disabled"].is_string(), "not shown disabled: {shown}");
    let newer = s.repo.commit_version("3");
    let response = s.push(&hook, &after, &newer).await;
    response.assert_problem(410);
    assert_eq!(
        s.jobs().await.len(),
        2,
        "nothing queued for a disabled repository"
    );

    for agent in [&first, &second] {
        let what = format!("agent {} to delete its clone", agent.name);
        wait_until(REVOCATION_TIMEOUT, &what, || {
            let left = cache_clones(agent);
            async move { left.is_empty() }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_disables_the_repository_and_removes_every_clone() {
    revocation(|github, token| github.revoke(token)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_access_to_the_repository_disables_it_and_removes_every_clone() {
    revocation(|github, token| github.revoke_access(token, GH_REPO)).await;
}

/// The forms a token could leak in: itself, and its base64 inside an
/// `Authorization: Basic base64(<user>:<token>)` header whatever the length
/// of `<user>:` (the characters that depend on the token alone).
fn token_forms(token: &str) -> Vec<String> {
    let mut forms = vec![token.to_owned()];
    for prefix_len in 0..3 {
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("{}{token}", "x".repeat(prefix_len)));
        // Skip the characters that mix prefix bytes in, and the tail that
        // depends on what follows.
        let start = (prefix_len * 4).div_ceil(3) + 1;
        forms.push(encoded[start..encoded.len() - 4].to_owned());
    }
    forms
}

fn assert_no_token(forms: &[String], text: &[u8], what: &str) {
    for form in forms {
        assert!(
            !text
                .windows(form.len())
                .any(|window| window == form.as_bytes()),
            "the GitHub token (as {form:?}) leaked into {what}"
        );
    }
}

/// Every regular file below `dir`.
fn files_below(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    files
}

/// Watches every process's command line until stopped: panics on finding
/// the token, and notes whether a git process ran in the agent's work
/// directory.
struct ProcessWatch {
    stop: Arc<AtomicBool>,
    saw_git: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Option<String>>>,
}

impl ProcessWatch {
    fn start(forms: Vec<String>, work_dir: std::path::PathBuf) -> ProcessWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let saw_git = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            let saw_git = Arc::clone(&saw_git);
            std::thread::spawn(move || {
                let work_dir = work_dir.canonicalize().unwrap_or(work_dir);
                while !stop.load(Ordering::Relaxed) {
                    let Ok(entries) = std::fs::read_dir("/proc") else {
                        return Some("cannot read /proc".to_owned());
                    };
                    for entry in entries.filter_map(Result::ok) {
                        let proc_dir = entry.path();
                        let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
                            continue;
                        };
                        for form in &forms {
                            if cmdline.windows(form.len()).any(|w| w == form.as_bytes()) {
                                let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                                return Some(format!("{}: {shown}", proc_dir.display()));
                            }
                        }
                        let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
                        let program = String::from_utf8_lossy(program);
                        let is_git = program
                            .rsplit('/')
                            .next()
                            .is_some_and(|name| name == "git" || name.starts_with("git-"));
                        if is_git
                            && std::fs::read_link(proc_dir.join("cwd"))
                                .is_ok_and(|cwd| cwd.starts_with(&work_dir))
                        {
                            saw_git.store(true, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                None
            })
        };
        ProcessWatch {
            stop,
            saw_git,
            thread: Some(thread),
        }
    }

    /// Stops watching; panics if the token was seen.
    fn finish(mut self) -> bool {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(found) = self.thread.take().unwrap().join().unwrap() {
            panic!("the GitHub token is in a command line: {found}");
        }
        self.saw_git.load(Ordering::Relaxed)
    }
}

impl Drop for ProcessWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_github_token_never_leaks() {
    let s = github_setup(Permission::Admin, &[]).await;
    let forms = token_forms(&s.token);
    for user in ["x-access-token", "octocat", "ab"] {
        let header =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", s.token));
        assert!(
            forms.iter().any(|form| header.contains(form.as_str())),
            "the token's forms miss {header}"
        );
    }
    let agent = Agent::start_default(&s.controller).await;
    let watch = ProcessWatch::start(forms.clone(), agent.work_dir());

    let hook = s.register(json!({})).await;
    assert_no_token(&forms, &hook.body.body, "the registration answer");

    // `make test` takes a second after printing, while the watch runs: the
    // first job clones, the second fetches.
    let before = s.repo.head();
    let slow = s.repo.commit(
        &[(
            "Makefile",
            &makefile_with_test_recipe(&[
                "echo \"tests running\"",
                "sleep 1",
                "echo \"tests passed\"",
            ]),
        )],
        "slow tests",
    );
    let response = s.push(&hook, &before, &slow).await;
    assert_eq!(response.status, 202, "{}", response.text());
    assert_no_token(&forms, &response.body, "a webhook answer");
    let first = s.wait_for_jobs(1).await.remove(0);
    s.api.wait_for_success(first.id, JOB_TIMEOUT).await;
    let second_sha = s.repo.commit_version("2");
    let response = s.push(&hook, &slow, &second_sha).await;
    assert_eq!(response.status, 202, "{}", response.text());
    let second = s.wait_for_jobs(2).await.remove(1);
    s.api.wait_for_success(second.id, JOB_TIMEOUT).await;
    wait_for_final_status(&s.github, &second_sha).await;
    let saw_git = watch.finish();
    assert!(
        saw_git,
        "no git process of the agent was seen while watching"
    );

    // API answers, as the admin and as the user, and error answers.
    let mut answers: Vec<(String, RawResponse)> = Vec::new();
    for path in [
        format!("/api/v1/repos/{GH_REPO}"),
        "/api/v1/repos".to_owned(),
        format!("/api/v1/jobs?repo={GH_REPO}"),
        format!("/api/v1/jobs/{}", first.id),
        format!("/api/v1/jobs/{}/log", first.id),
        format!("/api/v1/jobs/{}/log", second.id),
        "/api/v1/agents".to_owned(),
        "/api/v1/jobs/999999".to_owned(),
    ] {
        answers.push((
            format!("admin GET {path}"),
            s.api.raw(Method::GET, &path, None).await,
        ));
        answers.push((
            format!("user GET {path}"),
            s.user.raw(Method::GET, &path, None).await,
        ));
    }
    answers.push((
        "registering again".to_owned(),
        s.user.register(GH_REPO, json!({})).await,
    ));
    answers.push((
        "registering as someone else".to_owned(),
        s.user
            .with_login("someone-else")
            .register(GH_REPO, json!({}))
            .await,
    ));
    answers.push((
        "a job at an unknown commit".to_owned(),
        s.user
            .raw(
                Method::POST,
                &format!("/api/v1/repos/{GH_REPO}/jobs"),
                Some(&json!({ "target": "test", "commit": "1".repeat(40) })),
            )
            .await,
    ));
    answers.push((
        "a job on an unknown branch".to_owned(),
        s.user
            .raw(
                Method::POST,
                &format!("/api/v1/repos/{GH_REPO}/jobs"),
                Some(&json!({ "target": "test", "branch": "no-such-branch" })),
            )
            .await,
    ));
    answers.push((
        "a badly signed webhook".to_owned(),
        send_webhook(
            &hook.webhook_url,
            "push",
            &new_delivery_id(),
            &json!({}),
            Some("wrong"),
        )
        .await,
    ));
    for (what, response) in &answers {
        assert_no_token(&forms, &response.body, what);
        if let Some(location) = &response.location {
            assert_no_token(&forms, location.as_bytes(), what);
        }
    }
    let job_log = s.api.log(first.id).await;
    assert!(
        String::from_utf8_lossy(&job_log).contains("tests passed"),
        "the log is real"
    );

    // Every file of the controller (output, data, logs) and of the agent
    // (output, clones, work trees).
    let controller_dir = s.controller.data_dir().parent().unwrap().to_path_buf();
    let agent_dir = agent.work_dir().parent().unwrap().to_path_buf();
    let mut checked = 0;
    for dir in [&controller_dir, &agent_dir] {
        for file in files_below(dir) {
            let Ok(bytes) = std::fs::read(&file) else {
                continue;
            };
            assert_no_token(&forms, &bytes, &file.display().to_string());
            checked += 1;
        }
    }
    assert!(checked > 5, "only {checked} files were checked");
    assert!(
        !s.controller.output().is_empty() && !agent.output().is_empty(),
        "both processes wrote output"
    );

    // The fake saw the token only where it belongs: the controller's API
    // calls and git's Authorization header.
    for request in s.github.requests() {
        for (name, value) in &request.headers {
            if !name.eq_ignore_ascii_case("authorization") {
                assert_no_token(
                    &forms,
                    value.as_bytes(),
                    &format!("header {name} to GitHub"),
                );
            }
        }
        assert_no_token(
            &forms,
            request.path.as_bytes(),
            "a URL requested from GitHub",
        );
    }
}

/// A GitHub repository's commit is checked when a job names it: one GitHub
/// does not have is refused at once with 422 naming `commit`, instead of
/// failing later on the agent; an older commit it has runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_github_does_not_have_is_refused_with_422() {
    let s = github_setup(Permission::Admin, &[]).await;
    let _agent = Agent::start_default(&s.controller).await;
    let older = s.repo.head();
    s.repo.commit_version("newer");
    s.register(json!({})).await;
    let deploy = format!("/api/v1/repos/{GH_REPO}/deploy");
    let run = format!("/api/v1/repos/{GH_REPO}/jobs");

    let missing = "0123456789abcdef0123456789abcdef01234567";
    for (path, body) in [
        (&deploy, json!({ "commit": missing })),
        (&run, json!({ "target": "test", "commit": missing })),
    ] {
        let answer = s.user.raw(Method::POST, path, Some(&body)).await;
        let problem = answer.assert_problem(422);
        assert_eq!(problem["errors"][0]["field"], "commit", "{problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains(missing),
            "{problem}"
        );
    }
    assert!(s.jobs().await.is_empty(), "nothing was queued");

    let answer = s
        .user
        .raw(
            Method::POST,
            &run,
            Some(&json!({ "target": "test", "commit": older })),
        )
        .await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    let job: hobotnica_tests::Job = serde_json::from_value(answer.json()).unwrap();
    assert_eq!(job.commit, older);
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
}

/// A GitHub user asks about a repository registered by URL, and about one of
/// its jobs. Before, reading it answered 403 "registered by URL" where a
/// missing one answered 404, and cancelling its job answered 403 naming the
/// repository where reading the job answered 404: any GitHub user could
/// probe names and job ids. Now "not there" and "not yours" are one answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_of_repositories_registered_by_url_do_not_leak_to_github_users() {
    let s = github_setup(Permission::Admin, &[]).await;
    let local = GitRepo::new();
    s.api.register_repo("sec", &local.url()).await;
    let job = s.api.run_target("local/sec", "test").await;

    let missing = s
        .user
        .raw(Method::GET, "/api/v1/repos/local/missing", None)
        .await
        .assert_problem(404);
    let hidden = s
        .user
        .raw(Method::GET, "/api/v1/repos/local/sec", None)
        .await
        .assert_problem(404);
    assert_eq!(
        hidden["detail"]
            .as_str()
            .map(|d| d.replace("local/sec", "X")),
        missing["detail"]
            .as_str()
            .map(|d| d.replace("local/missing", "X")),
        "one answer for a missing repository and one that is not theirs"
    );
    for (method, path) in [
        (Method::GET, format!("/api/v1/jobs/{}", job.id)),
        (Method::POST, format!("/api/v1/jobs/{}/cancel", job.id)),
        (Method::POST, format!("/api/v1/jobs/{}/retry", job.id)),
        (
            Method::POST,
            "/api/v1/repos/local/sec/webhook-secret".to_owned(),
        ),
    ] {
        let answer = s.user.raw(method.clone(), &path, None).await;
        assert!(
            !answer.text().contains("local/sec") || path.contains("local/sec"),
            "{method} {path}: {}",
            answer.text()
        );
        answer.assert_problem(404);
    }
}

/// Many large deliveries at once: 24 MB bodies, 30 at a time, to an unknown
/// hook id and then, badly signed, to a real one. Before, the controller
/// read every body whole before looking at the hook (50 such posts took it
/// from 72 to 887 MB). Now a delivery to an unknown hook is answered before
/// its body is read, a declared length over GitHub's limit gets 413 unread,
/// and the bodies being read share one budget (32 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_deliveries_cannot_exhaust_the_controllers_memory() {
    const BODY_BYTES: usize = 24 * 1024 * 1024;
    const AT_ONCE: usize = 30;
    let s = github_setup(Permission::Admin, &[]).await;
    let hook = s.register(json!({})).await;
    let pid = s.controller.pid().expect("the controller runs");
    let before = hobotnica_tests::procs::peak_rss_kib(pid).expect("peak RSS");
    let body = bytes::Bytes::from(vec![b' '; BODY_BYTES]);
    let http = reqwest::Client::new();
    let unknown = format!("{}/webhooks/github/{}", s.controller.url(), "0".repeat(32));
    for url in [unknown.as_str(), hook.webhook_url.as_str()] {
        let mut posts = tokio::task::JoinSet::new();
        for n in 0..AT_ONCE {
            let request = http
                .post(url)
                .header("content-type", "application/json")
                .header("x-github-event", "push")
                .header("x-github-delivery", format!("big-{n}"))
                .header("x-hub-signature-256", format!("sha256={}", "0".repeat(64)))
                .body(body.clone());
            posts.spawn(async move { request.send().await.map(|answer| answer.status().as_u16()) });
        }
        while let Some(answer) = posts.join_next().await {
            // The controller may answer and close before the body is sent.
            if let Ok(Ok(status)) = answer {
                assert!([401, 404, 503].contains(&status), "{url}: {status}");
            }
        }
        let peak = hobotnica_tests::procs::peak_rss_kib(pid).expect("peak RSS");
        println!(
            "after {AT_ONCE} deliveries to {url}: peak RSS {} MiB",
            peak / 1024
        );
    }
    assert_eq!(
        status_for_declared_length(&hook.webhook_url, 26 * 1024 * 1024).await,
        413
    );
    let after = hobotnica_tests::procs::peak_rss_kib(pid).expect("peak RSS");
    let grown_mib = after.saturating_sub(before) / 1024;
    println!(
        "controller peak RSS {} MiB -> {} MiB",
        before / 1024,
        after / 1024
    );
    // Reading them all at once would take 720 MB and more; the budget lets
    // one such body in at a time (the allocator keeps some freed buffers
    // per thread, hence the margin).
    assert!(
        grown_mib < 300,
        "the controller's peak RSS grew by {grown_mib} MiB under {AT_ONCE} x 24 MB deliveries"
    );
    // And it still works.
    let head = s.repo.head();
    let queued = s.push(&hook, ZERO_SHA, &head).await;
    assert_eq!(queued.status, 202, "{}", queued.text());
}

/// The status the controller answers to a webhook request head declaring a
/// body of `length` bytes, sent without the body: only an answer from the
/// head alone arrives.
async fn status_for_declared_length(url: &str, length: usize) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (addr, path) = rest.split_once('/').expect("a path");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /{path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nX-GitHub-Event: push\r\nContent-Length: {length}\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    let mut answer = vec![0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut answer))
        .await
        .expect("an answer to the head alone")
        .expect("read the answer");
    let status_line = String::from_utf8_lossy(&answer[..read]).into_owned();
    status_line
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {status_line:?}"))
}
