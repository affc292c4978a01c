//! Queuing jobs: what a branch resolves to, what is refused (and which
//! field the refusal names), retries, and repositories that lost access.

use hobotnica_common::job::{EnvScope, JobKind, JobState, Trigger};

use super::*;
use crate::jobs::JobQuery;

#[tokio::test]
async fn a_branch_resolves_to_its_tip_on_github() {
    let core = Core::start().await;
    core.github_repo("widget", &[]).await;
    let git = core.git("widget");
    let writer = core.github_user(WRITER).await;
    let trigger = |request: JobRequest| core.services.trigger(&writer, OWNER, "widget", request);

    let first = trigger(request("test")).await.expect("queued");
    assert_eq!(
        first.commit.as_str(),
        git.head(),
        "the default branch's tip"
    );
    assert_eq!(first.branch.as_deref(), Some("main"));
    assert_eq!(first.kind, JobKind::Test);
    assert_eq!(first.trigger, Trigger::Api);

    git.create_branch("feature/x");
    let feature_tip = git.commit_version("feature");
    let feature = trigger(JobRequest {
        branch: Some("feature/x".to_owned()),
        ..request("build")
    })
    .await
    .expect("queued");
    assert_eq!(feature.commit.as_str(), feature_tip);
    assert_eq!(feature.branch.as_deref(), Some("feature/x"));
    assert_eq!(feature.kind, JobKind::Custom);

    git.switch("main");
    let new_tip = git.commit_version("3");
    let later = trigger(request("test")).await.expect("queued");
    assert_eq!(
        later.commit.as_str(),
        new_tip,
        "the tip now, not a cached one"
    );
    assert_eq!(
        core.job(first.id).await.commit,
        first.commit,
        "a queued job keeps its commit"
    );
}

#[tokio::test]
async fn a_commit_runs_as_given_and_a_branch_beside_it_is_recorded() {
    let core = Core::start().await;
    core.github_repo("widget", &[]).await;
    let git = core.git("widget");
    let first = git.head();
    git.commit_version("2");

    let job = core
        .services
        .trigger(
            &Caller::Admin,
            OWNER,
            "widget",
            JobRequest {
                branch: Some("release".to_owned()),
                ..at_commit("test", &first)
            },
        )
        .await
        .expect("queued");
    assert_eq!(job.commit.as_str(), first);
    assert_eq!(job.branch.as_deref(), Some("release"));

    // A plain git remote cannot say whether a commit exists: it runs.
    core.git_repo("tools", &[]).await;
    let sha = fake_sha("anything");
    let job = core
        .services
        .trigger(&Caller::Admin, "local", "tools", at_commit("test", &sha))
        .await
        .expect("queued");
    assert_eq!(job.commit.as_str(), sha);
    assert_eq!(job.branch, None);
}

#[tokio::test]
async fn an_unknown_branch_or_commit_is_invalid_and_names_the_field() {
    let core = Core::start().await;
    core.github_repo("widget", &[]).await;
    let writer = core.github_user(WRITER).await;
    let trigger = |request: JobRequest| core.services.trigger(&writer, OWNER, "widget", request);

    let on_branch = |branch: &str| JobRequest {
        branch: Some(branch.to_owned()),
        ..request("test")
    };
    assert_eq!(invalid_field(trigger(on_branch("nope")).await), "branch");
    assert_eq!(
        invalid_field(trigger(on_branch("with space")).await),
        "branch"
    );
    assert_eq!(
        invalid_field(trigger(at_commit("test", &fake_sha("missing"))).await),
        "commit",
        "a commit GitHub does not have"
    );
    assert_eq!(
        invalid_field(trigger(at_commit("test", "abc123")).await),
        "commit"
    );
    assert_eq!(
        invalid_field(trigger(request("no such target")).await),
        "target"
    );
    assert_eq!(
        invalid_field(
            core.services
                .deploy(&writer, OWNER, "widget", on_branch("nope"), None)
                .await
        ),
        "branch"
    );
    assert_eq!(
        core.job_ids(&Caller::Admin, JobQuery::default())
            .await
            .len(),
        0,
        "nothing was queued"
    );
}

#[tokio::test]
async fn reserved_variable_names_are_refused() {
    let core = Core::start().await;
    core.github_repo("widget", &[]).await;
    let writer = core.github_user(WRITER).await;

    for name in ["PATH", "HOME", "CI", "HOBOTNICA_JOB_ID"] {
        let with_env = JobRequest {
            env: env(&[("FINE", "yes"), (name, "x")]),
            ..request("test")
        };
        assert_eq!(
            invalid_field(
                core.services
                    .trigger(&writer, OWNER, "widget", with_env.clone())
                    .await
            ),
            format!("env.{name}")
        );
        assert_eq!(
            invalid_field(
                core.services
                    .deploy(&writer, OWNER, "widget", with_env, Some(name))
                    .await
            ),
            format!("env.{name}")
        );
        let set = SetEnv {
            key: name.to_owned(),
            value: "x".to_owned(),
            secret: false,
            scope: EnvScope::All,
        };
        assert_eq!(
            invalid_field(
                core.services
                    .set_variable(&writer, OWNER, "widget", set)
                    .await
            ),
            format!("env.{name}")
        );
    }
    assert_eq!(
        core.job_ids(&Caller::Admin, JobQuery::default())
            .await
            .len(),
        0,
        "nothing was queued"
    );
    assert!(
        core.services
            .repo(OWNER, "widget")
            .await
            .expect("repo")
            .env
            .is_empty()
    );

    let job = core
        .services
        .trigger(
            &writer,
            OWNER,
            "widget",
            JobRequest {
                env: env(&[("FINE", "yes")]),
                ..request("test")
            },
        )
        .await
        .expect("other names are fine");
    assert_eq!(job.env, env(&[("FINE", "yes")]));
}

#[tokio::test]
async fn a_repository_whose_stored_token_github_rejects_is_disabled_and_gone() {
    let core = Core::start().await;
    let registered = core.github_repo("widget", &[]).await;
    let repo = registered.repo.clone();
    let queued = core.queue(&repo, "test").await;
    let writer = core.github_user(WRITER).await;

    // The maintainer's token, which the repository was registered with,
    // is revoked on GitHub.
    core.github.revoke(MAINTAINER.token);
    let first = core
        .services
        .trigger(&writer, OWNER, "widget", request("test"))
        .await;
    assert!(
        matches!(&first, Err(CoreError::Gone(message)) if message.contains("register it again")),
        "{first:?}"
    );
    let disabled = core.services.repo(OWNER, "widget").await.expect("repo");
    assert!(disabled.disabled.is_some(), "the repository is disabled");
    assert_state(&core.job(queued.id).await, JobState::Cancelled);

    let gone = |result: Result<Job, CoreError>| {
        assert!(matches!(result, Err(CoreError::Gone(_))), "{result:?}");
    };
    gone(
        core.services
            .trigger(&writer, OWNER, "widget", request("test"))
            .await,
    );
    gone(
        core.services
            .trigger(
                &Caller::Admin,
                OWNER,
                "widget",
                at_commit("test", &core.git("widget").head()),
            )
            .await,
    );
    gone(
        core.services
            .deploy(&writer, OWNER, "widget", request("deploy"), Some("k"))
            .await
            .map(|(job, _)| job),
    );
    gone(core.services.retry(&writer, queued.id).await);

    let ping = serde_json::json!({ "zen": "Keep it logically awesome.", "hook_id": 1 });
    let delivered = core.deliver(&registered, "ping", "delivery-1", &ping).await;
    assert!(
        matches!(delivered, Err(DeliveryError::Disabled { .. })),
        "{delivered:?}"
    );
    assert_eq!(
        core.job_ids(&Caller::Admin, JobQuery::default())
            .await
            .len(),
        1,
        "only the first job exists"
    );
}

#[tokio::test]
async fn a_retry_runs_a_finished_job_again_as_a_new_job() {
    let core = Core::start().await;
    core.github_repo("widget", &[]).await;
    let writer = core.github_user(WRITER).await;
    let job = core
        .services
        .trigger(
            &writer,
            OWNER,
            "widget",
            JobRequest {
                env: env(&[("LEVEL", "3")]),
                ..request("build")
            },
        )
        .await
        .expect("queued");

    let early = core.services.retry(&writer, job.id).await;
    assert!(
        matches!(early, Err(CoreError::Conflict(_))),
        "a queued job is not retried: {early:?}"
    );
    core.services
        .cancel(&writer, job.id)
        .await
        .expect("cancelled");
    core.git("widget").commit_version("2");
    let retried = core.services.retry(&writer, job.id).await.expect("retried");
    assert_ne!(retried.id, job.id);
    assert_state(&retried, JobState::Queued);
    assert_eq!(retried.trigger, Trigger::Retry);
    assert_eq!(
        retried.commit, job.commit,
        "the same commit, not the new tip"
    );
    assert_eq!(
        (&retried.target, &retried.branch, &retried.env),
        (&job.target, &job.branch, &job.env)
    );
    assert_state(&core.job(job.id).await, JobState::Cancelled);
}
