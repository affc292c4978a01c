//! What an agent's session hands out: jobs with their variables merged and
//! their secrets listed for masking (none for a fork's job), deploys only to
//! agents whose token vouches for the repository's deploy labels.

use base64::Engine as _;
use hobotnica_common::job::{EnvScope, JobState, Outcome};

use super::*;

#[tokio::test]
async fn an_agent_gets_its_job_with_the_variables_merged_and_the_secrets_to_mask() {
    let core = Core::start().await;
    let repo = core.github_repo("widget", &[]).await.repo;
    core.set_variable(&repo, "REGION", "eu", EnvScope::All, false)
        .await;
    core.set_variable(&repo, "REGION", "eu-prod", EnvScope::Deploy, false)
        .await;
    core.set_variable(&repo, "LEVEL", "all", EnvScope::All, false)
        .await;
    core.set_variable(&repo, "LEVEL", "deploy", EnvScope::Deploy, false)
        .await;
    core.set_variable(&repo, "ONLY_TESTS", "yes", EnvScope::Test, false)
        .await;
    core.set_variable(&repo, "API_KEY", "s3cret-value", EnvScope::All, true)
        .await;
    let (deploy, _) = core
        .services
        .deploy(
            &Caller::Admin,
            OWNER,
            "widget",
            JobRequest {
                env: env(&[("LEVEL", "one-time")]),
                ..request("deploy")
            },
            None,
        )
        .await
        .expect("queued");
    let test = core.queue(&repo, "test").await;
    // Variables are read when a job is handed out, not when it is queued.
    core.set_variable(&repo, "DB_PASSWORD", "deploy-pass", EnvScope::Deploy, true)
        .await;
    let agent = core.agent("builder", &[], &[], 2).await;
    let mut session = core.session(&agent).await;
    session.offer(2, 0).await;

    let assignment = session.assignment().await;
    assert_eq!(assignment.job.id, deploy.id);
    assert_eq!(
        assignment.env,
        env(&[
            ("API_KEY", "s3cret-value"),
            ("DB_PASSWORD", "deploy-pass"),
            ("LEVEL", "one-time"),
            ("REGION", "eu-prod"),
        ]),
        "all, then the job's kind, then one-time variables"
    );
    let base64 = base64::engine::general_purpose::STANDARD;
    for secret in [
        "s3cret-value".to_owned(),
        base64.encode("s3cret-value"),
        "deploy-pass".to_owned(),
        MAINTAINER.token.to_owned(),
    ] {
        assert!(assignment.secrets.contains(&secret), "{secret} is masked");
    }
    assert!(
        !assignment
            .secrets
            .iter()
            .any(|secret| secret.contains("eu-prod")),
        "plain values are not masked"
    );
    assert!(
        assignment
            .git_http_header
            .starts_with("Authorization: Basic "),
        "a GitHub repository is cloned with its token"
    );

    let assignment = session.assignment().await;
    assert_eq!(assignment.job.id, test.id);
    assert_eq!(
        assignment.env,
        env(&[
            ("API_KEY", "s3cret-value"),
            ("LEVEL", "all"),
            ("ONLY_TESTS", "yes"),
            ("REGION", "eu"),
        ])
    );
    assert!(!assignment.secrets.contains(&"deploy-pass".to_owned()));

    let stored = core.job(deploy.id).await;
    assert_eq!(
        stored.env,
        env(&[("LEVEL", "one-time")]),
        "no repository variable, and no secret, is kept in the job"
    );
}

#[tokio::test]
async fn a_job_from_a_fork_gets_no_secrets_even_when_retried() {
    let core = Core::start().await;
    let registered = core.github_repo("widget", &[]).await;
    let repo = registered.repo.clone();
    core.set_variable(&repo, "PLAIN", "visible", EnvScope::All, false)
        .await;
    core.set_variable(&repo, "API_KEY", "s3cret-value", EnvScope::All, true)
        .await;
    let git = core.git("widget");
    git.create_branch("feature");
    let sha = git.commit_version("feature");
    let pull_request = |head_repo: &str| {
        core.github
            .pull_request_payload("opened", 7, &sha, "feature", head_repo, "octo-org/widget")
    };
    let queued = |received: Result<Received, DeliveryError>| match received {
        Ok(Received::Queued(job)) => job,
        other => panic!("expected a queued job, got {other:?}"),
    };
    let fork = queued(
        core.deliver(
            &registered,
            "pull_request",
            "d-1",
            &pull_request("forker/widget"),
        )
        .await,
    );
    assert!(fork.from_fork);
    let own = queued(
        core.deliver(
            &registered,
            "pull_request",
            "d-2",
            &pull_request("octo-org/widget"),
        )
        .await,
    );
    assert!(!own.from_fork);
    let agent = core.agent("builder", &[], &[], 2).await;
    let mut session = core.session(&agent).await;
    session.offer(2, 0).await;

    let from_fork = session.assignment().await;
    assert_eq!(from_fork.job.id, fork.id);
    assert_eq!(from_fork.env, env(&[("PLAIN", "visible")]));
    assert!(!from_fork.secrets.contains(&"s3cret-value".to_owned()));
    let from_branch = session.assignment().await;
    assert_eq!(from_branch.job.id, own.id);
    assert_eq!(
        from_branch.env,
        env(&[("API_KEY", "s3cret-value"), ("PLAIN", "visible")]),
        "a pull request from the repository itself gets its secrets"
    );

    core.complete(&agent, &fork, Outcome::Failed, 0)
        .await
        .expect("completed");
    let retried = core
        .services
        .retry(&core.github_user(WRITER).await, fork.id)
        .await
        .expect("retried");
    assert!(retried.from_fork, "a retry of a fork's job is a fork's job");
    session.offer(1, 2).await;
    let again = session.assignment().await;
    assert_eq!(again.job.id, retried.id);
    assert_eq!(again.env, env(&[("PLAIN", "visible")]));
}

#[tokio::test]
async fn deploy_labels_keep_a_deploy_from_an_agent_whose_token_does_not_vouch_for_them() {
    let core = Core::start().await;
    let repo = core.git_repo("app", &[("env", "prod")]).await;
    let deploy = core.queue(&repo, "deploy").await;
    assert_eq!(deploy.trusted_labels, labels(&[("env", "prod")]));
    let test = core.queue(&repo, "test").await;

    // It says it is a production agent; its token does not.
    let claims = core.agent("claims-prod", &[], &[("env", "prod")], 2).await;
    let mut session = core.session(&claims).await;
    session.offer(2, 0).await;
    assert_eq!(
        session.assignment().await.job.id,
        test.id,
        "the test job, newer than the deploy, is the first it gets"
    );
    let waiting = core.job(deploy.id).await;
    assert_state(&waiting, JobState::Queued);
    let message = waiting.message.unwrap_or_default();
    assert!(
        message.contains("no connected agent's token vouches for env=prod"),
        "{message:?}"
    );

    let vouched = core
        .agent("prod", &[("env", "prod")], &[("env", "prod")], 1)
        .await;
    let mut session = core.session(&vouched).await;
    session.offer(1, 0).await;
    assert_eq!(session.assignment().await.job.id, deploy.id);
}

#[tokio::test]
async fn a_job_whose_repository_was_removed_fails_instead_of_running() {
    let core = Core::start().await;
    let removed = core.git_repo("old", &[]).await;
    let kept = core.git_repo("app", &[]).await;
    let orphan = core.queue(&removed, "test").await;
    let later = core.queue(&kept, "test").await;
    core.services
        .remove_repo(&Caller::Admin, "local", "old")
        .await
        .expect("removed");

    let agent = core.agent("builder", &[], &[], 1).await;
    let mut session = core.session(&agent).await;
    session.offer(1, 0).await;
    assert_eq!(
        session.assignment().await.job.id,
        later.id,
        "the older job was not sent"
    );
    let failed = core.job(orphan.id).await;
    assert_state(&failed, JobState::Failed);
    assert!(
        failed
            .message
            .as_deref()
            .is_some_and(|message| message.contains("was removed")),
        "{:?}",
        failed.message
    );
}

#[tokio::test]
async fn revoking_an_agent_token_ends_its_session() {
    let core = Core::start().await;
    let agent = core.agent("builder", &[], &[], 1).await;
    let mut session = core.session(&agent).await;
    core.services
        .revoke_agent_token(&Caller::Admin, &agent.record.token_id)
        .await
        .expect("revoked");
    loop {
        match tokio::time::timeout(DEADLINE, session.hears.recv()).await {
            Ok(Some(Ok(SessionOutput::Heartbeat))) => {}
            Ok(Some(Err(AgentError::Unauthenticated(_)))) => break,
            Ok(Some(Err(err))) => panic!("the session ended otherwise: {err}"),
            _ => panic!("the session did not end as unauthenticated"),
        }
    }
    let again = core
        .services
        .attach_agent(&agent.token, &agent.record.id.0)
        .await;
    assert!(
        matches!(again, Err(AgentError::Unauthenticated(_))),
        "the token is refused from now on"
    );
}
