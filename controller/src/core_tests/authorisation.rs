//! Who may do what: the admin everything; a GitHub user what their token
//! may do on GitHub (pull reads, push changes); repositories registered by
//! git URL, agents and agent tokens are the admin's only.

use futures_util::StreamExt as _;
use hobotnica_common::job::{EnvScope, JobKind, JobState, Repo};

use super::*;
use crate::auth::Access;
use crate::jobs::{JobQuery, Page};
use crate::notifications::SetNotification;
use crate::repos::RepoChange;

/// A Slack target named `chat`.
fn slack_target() -> SetNotification {
    SetNotification {
        id: "chat".to_owned(),
        kind: hobotnica_common::notifications::NotificationKind::Slack,
        url: "https://hooks.example.com/services/T/B/X".to_owned(),
        events: hobotnica_common::notifications::NotificationEvents::All,
        secret: None,
    }
}

/// One page, large enough for every test here.
fn page() -> Page {
    Page::new(None, None).expect("the default page")
}

/// The names of the repositories `caller` lists.
async fn listed(core: &Core, caller: &Caller) -> Vec<String> {
    core.services
        .visible_repos(caller)
        .await
        .expect("repositories list")
        .into_iter()
        .map(|overview| overview.repo.full_name())
        .collect()
}

fn assert_forbidden<T: std::fmt::Debug>(what: &str, result: Result<T, CoreError>) {
    assert!(
        matches!(result, Err(CoreError::Forbidden(_))),
        "{what}: expected Forbidden, got {result:?}"
    );
}

fn assert_not_found<T: std::fmt::Debug>(what: &str, result: Result<T, CoreError>) {
    assert!(
        matches!(result, Err(CoreError::NotFound(_))),
        "{what}: expected NotFound, got {result:?}"
    );
}

fn assert_unauthorized<T: std::fmt::Debug>(what: &str, result: Result<T, CoreError>) {
    assert!(
        matches!(result, Err(CoreError::Unauthorized(_))),
        "{what}: expected Unauthorized, got {result:?}"
    );
}

/// `octo-org/<name>` on GitHub, registered by the maintainer, that the
/// reader cannot see.
async fn hidden_repo(core: &Core, name: &str) -> Repo {
    let repo = core.github_repo(name, &[]).await.repo;
    core.github
        .revoke_access(READER.token, &format!("{OWNER}/{name}"));
    repo
}

#[tokio::test]
async fn the_admin_may_do_everything() {
    let core = Core::start().await;
    let admin = core.admin();
    let repo = core.github_repo("widget", &[]).await.repo;
    let local = core.git_repo("tools", &[]).await;
    let (owner, name) = (OWNER, "widget");

    assert_eq!(
        listed(&core, &admin).await,
        ["local/tools", "octo-org/widget"]
    );
    let job = core
        .services
        .trigger(&admin, owner, name, request("test"))
        .await
        .expect("the admin triggers");
    assert_eq!(job.requested_by.as_deref(), Some("admin"));
    let (deploy, new) = core
        .services
        .deploy(&admin, owner, name, request("deploy"), None)
        .await
        .expect("the admin deploys");
    assert!(new);
    core.services
        .trigger(
            &admin,
            "local",
            "tools",
            at_commit("test", &fake_sha("tools")),
        )
        .await
        .expect("the admin triggers on a repository registered by URL");
    let cancelled = core
        .services
        .cancel(&admin, deploy.id)
        .await
        .expect("the admin cancels");
    assert_state(&cancelled, JobState::Cancelled);
    let retried = core
        .services
        .retry(&admin, deploy.id)
        .await
        .expect("the admin retries");
    assert_eq!(retried.kind, JobKind::Deploy);
    core.set_variable(&repo, "REGION", "eu", EnvScope::All, false)
        .await;
    core.set_variable(&local, "TOKEN", "s3cret", EnvScope::Deploy, true)
        .await;
    assert_eq!(
        core.services
            .variables(&admin, owner, name)
            .await
            .expect("the admin reads variables")
            .len(),
        1
    );
    core.services
        .remove_variable(&admin, owner, name, "REGION", None)
        .await
        .expect("the admin removes a variable");
    core.services
        .change_settings(
            &admin,
            owner,
            name,
            RepoChange {
                deploy_labels: Some(labels(&[("env", "prod")])),
                max_log_bytes: None,
            },
        )
        .await
        .expect("the admin changes settings");
    core.services
        .read_log(&admin, job.id, 0, None)
        .await
        .expect("the admin reads a log");
    assert_eq!(core.job_ids(&admin, JobQuery::default()).await.len(), 4);
    core.services
        .agents_overview(&admin)
        .await
        .expect("the admin lists agents");
    core.services
        .remove_repo(&admin, owner, name)
        .await
        .expect("the admin removes a repository");
    assert_eq!(listed(&core, &admin).await, ["local/tools"]);
    assert_eq!(
        core.job(job.id).await.id,
        job.id,
        "the jobs of a removed repository stay, for the admin"
    );
}

#[tokio::test]
async fn a_github_user_lists_only_the_repositories_their_token_can_read() {
    let core = Core::start().await;
    core.github_repo("widget", &[]).await;
    hidden_repo(&core, "hidden").await;
    core.git_repo("tools", &[]).await;

    let reader = core.github_user(READER).await;
    assert_eq!(listed(&core, &reader).await, ["octo-org/widget"]);
    let maintainer = core.github_user(MAINTAINER).await;
    assert_eq!(
        listed(&core, &maintainer).await,
        ["octo-org/hidden", "octo-org/widget"],
        "a repository registered by git URL is listed to the admin only"
    );
    let stranger = core.github_user(STRANGER).await;
    assert!(listed(&core, &stranger).await.is_empty());
    assert_eq!(
        listed(&core, &core.admin()).await,
        ["local/tools", "octo-org/hidden", "octo-org/widget"]
    );
}

#[tokio::test]
async fn jobs_of_repositories_a_user_cannot_read_are_invisible_and_not_found() {
    let core = Core::start().await;
    let widget = core.github_repo("widget", &[]).await.repo;
    let hidden = hidden_repo(&core, "hidden").await;
    let local = core.git_repo("tools", &[]).await;
    let visible = core.queue(&widget, "test").await;
    let secret = core.queue(&hidden, "deploy").await;
    let admins = core.queue(&local, "test").await;

    let reader = core.github_user(READER).await;
    assert_eq!(
        core.job_ids(&reader, JobQuery::default()).await,
        [visible.id]
    );
    let only_hidden = JobQuery {
        repo: Some("octo-org/hidden".to_owned()),
        ..JobQuery::default()
    };
    assert!(
        core.job_ids(&reader, only_hidden).await.is_empty(),
        "filtering by a hidden repository shows nothing"
    );
    for job in [&secret, &admins] {
        let what = format!("job {} of {}", job.id, job.repo);
        assert_not_found(
            &what,
            core.services.job_for(&reader, job.id, Access::Read).await,
        );
        assert_not_found(
            &format!("the log of {what}"),
            core.services
                .read_log(&reader, job.id, 0, None)
                .await
                .map(|_| ()),
        );
        assert_not_found(
            &format!("the live log of {what}"),
            core.services
                .tail_log(&reader, job.id, 0, false)
                .await
                .map(|_| ()),
        );
    }
    assert_not_found(
        "cancelling a job of the hidden repository",
        core.services.cancel(&reader, secret.id).await,
    );
    assert_not_found(
        "the hidden repository",
        core.services
            .repo_overview(&reader, OWNER, "hidden")
            .await
            .map(|_| ()),
    );
    assert_not_found(
        "the deploys of the hidden repository",
        core.services
            .repo_deploys(&reader, OWNER, "hidden", page())
            .await
            .map(|_| ()),
    );
    assert_not_found(
        "the variables of the hidden repository",
        core.services.variables(&reader, OWNER, "hidden").await,
    );

    let stranger = core.github_user(STRANGER).await;
    assert!(
        core.job_ids(&stranger, JobQuery::default())
            .await
            .is_empty()
    );
    assert_not_found(
        "a job for a stranger",
        core.services
            .job_for(&stranger, visible.id, Access::Read)
            .await,
    );
    assert_eq!(
        core.job(secret.id).await.state,
        JobState::Queued,
        "nothing was cancelled"
    );
}

#[tokio::test]
async fn pull_access_reads_but_every_change_needs_push() {
    let core = Core::start().await;
    let repo = core.github_repo("widget", &[]).await.repo;
    core.set_variable(&repo, "REGION", "eu", EnvScope::All, false)
        .await;
    let queued = core.queue(&repo, "test").await;
    let finished = core.queue(&repo, "test").await;
    core.services
        .cancel(&core.admin(), finished.id)
        .await
        .expect("cancelled");
    let reader = core.github_user(READER).await;
    let (owner, name) = (OWNER, "widget");

    // Reading works.
    core.services
        .repo_overview(&reader, owner, name)
        .await
        .expect("the reader reads the repository");
    assert_eq!(
        core.services
            .variables(&reader, owner, name)
            .await
            .expect("the reader reads variables")
            .len(),
        1
    );
    core.services
        .job_for(&reader, queued.id, Access::Read)
        .await
        .expect("the reader reads a job");
    let log = core
        .services
        .read_log(&reader, queued.id, 0, None)
        .await
        .expect("the reader reads a log");
    assert_eq!(log.length, 0);
    assert!(log.body.collect::<Vec<_>>().await.is_empty());

    // Changing does not.
    assert_forbidden(
        "trigger",
        core.services
            .trigger(&reader, owner, name, request("test"))
            .await,
    );
    assert_forbidden(
        "deploy",
        core.services
            .deploy(&reader, owner, name, request("deploy"), Some("key-1"))
            .await,
    );
    assert_forbidden("cancel", core.services.cancel(&reader, queued.id).await);
    assert_forbidden("retry", core.services.retry(&reader, finished.id).await);
    assert_forbidden(
        "set a variable",
        core.services
            .set_variable(
                &reader,
                owner,
                name,
                SetEnv {
                    key: "REGION".to_owned(),
                    value: "us".to_owned(),
                    secret: false,
                    scope: EnvScope::All,
                },
            )
            .await,
    );
    assert_forbidden(
        "remove a variable",
        core.services
            .remove_variable(&reader, owner, name, "REGION", None)
            .await,
    );
    assert_forbidden(
        "set a notification target",
        core.services
            .set_notification(&reader, owner, name, slack_target())
            .await,
    );
    assert_forbidden(
        "remove a notification target",
        core.services
            .remove_notification(&reader, owner, name, "chat")
            .await,
    );
    assert_forbidden(
        "change settings",
        core.services
            .change_settings(
                &reader,
                owner,
                name,
                RepoChange {
                    deploy_labels: Some(labels(&[("env", "prod")])),
                    max_log_bytes: None,
                },
            )
            .await
            .map(|_| ()),
    );
    assert_forbidden(
        "remove the repository",
        core.services.remove_repo(&reader, owner, name).await,
    );

    // And nothing changed.
    let admin = core.admin();
    assert!(
        core.services
            .notification_targets(&reader, owner, name)
            .await
            .expect("the reader reads notification targets")
            .is_empty()
    );
    assert_eq!(
        core.job_ids(&admin, JobQuery::default()).await,
        [finished.id, queued.id]
    );
    assert_state(&core.job(queued.id).await, JobState::Queued);
    let overview = core
        .services
        .repo_overview(&admin, owner, name)
        .await
        .expect("still registered");
    assert!(overview.repo.deploy_labels.is_empty());
    assert_eq!(
        overview.repo.env[0].value,
        hobotnica_common::job::EnvValue::Plain("eu".to_owned())
    );
}

#[tokio::test]
async fn push_access_triggers_deploys_cancels_retries_and_sets_variables() {
    let core = Core::start().await;
    core.github_repo("widget", &[]).await;
    let writer = core.github_user(WRITER).await;
    let (owner, name) = (OWNER, "widget");

    let job = core
        .services
        .trigger(&writer, owner, name, request("test"))
        .await
        .expect("the writer triggers");
    assert_eq!(job.requested_by.as_deref(), Some("writer"));
    let (deploy, _) = core
        .services
        .deploy(&writer, owner, name, request("deploy"), None)
        .await
        .expect("the writer deploys");
    assert_eq!(deploy.requested_by.as_deref(), Some("writer"));
    let cancelled = core
        .services
        .cancel(&writer, job.id)
        .await
        .expect("the writer cancels");
    assert_state(&cancelled, JobState::Cancelled);
    let retried = core
        .services
        .retry(&writer, job.id)
        .await
        .expect("the writer retries");
    assert_eq!(retried.requested_by.as_deref(), Some("writer"));
    core.services
        .set_variable(
            &writer,
            owner,
            name,
            SetEnv {
                key: "API_KEY".to_owned(),
                value: "s3cret".to_owned(),
                secret: true,
                scope: EnvScope::Deploy,
            },
        )
        .await
        .expect("the writer sets a variable");
    let variables = core
        .services
        .variables(&writer, owner, name)
        .await
        .expect("variables");
    assert!(
        variables[0].is_secret(),
        "a secret variable is kept sealed: {:?}",
        variables[0].scope
    );
    core.services
        .remove_variable(&writer, owner, name, "API_KEY", Some(EnvScope::Deploy))
        .await
        .expect("the writer removes a variable");
    let target = core
        .services
        .set_notification(&writer, owner, name, slack_target())
        .await
        .expect("the writer sets a notification target");
    assert_eq!(target.host, "hooks.example.com");
    assert!(!target.url_sealed.contains("hooks.example.com"), "sealed");
    core.services
        .remove_notification(&writer, owner, name, "chat")
        .await
        .expect("the writer removes a notification target");
}

#[tokio::test]
async fn a_repository_registered_by_git_url_is_the_admins_only() {
    let core = Core::start().await;
    let local = core.git_repo("tools", &[]).await;
    let job = core.queue(&local, "test").await;
    // Admin rights on GitHub repositories count for nothing here: to a
    // GitHub user, the repository does not exist.
    let maintainer = core.github_user(MAINTAINER).await;

    assert!(listed(&core, &maintainer).await.is_empty());
    assert!(
        core.job_ids(&maintainer, JobQuery::default())
            .await
            .is_empty()
    );
    assert_not_found(
        "its job",
        core.services
            .job_for(&maintainer, job.id, Access::Read)
            .await,
    );
    assert_not_found(
        "trigger",
        core.services
            .trigger(
                &maintainer,
                "local",
                "tools",
                at_commit("test", &fake_sha("x")),
            )
            .await,
    );
    assert_not_found(
        "set a variable",
        core.services
            .set_variable(
                &maintainer,
                "local",
                "tools",
                SetEnv {
                    key: "A".to_owned(),
                    value: "b".to_owned(),
                    secret: false,
                    scope: EnvScope::All,
                },
            )
            .await,
    );
    assert_not_found(
        "remove it",
        core.services
            .remove_repo(&maintainer, "local", "tools")
            .await,
    );
    assert_eq!(listed(&core, &core.admin()).await, ["local/tools"]);
}

/// A GitHub user asking for a repository registered by git URL, or to
/// read or change a job of one, is told nothing exists, as for a GitHub
/// repository they cannot see: no GitHub user can probe the names of such
/// repositories or the ids of their jobs. (Before, a change was answered
/// "only the admin token may use it".)
#[tokio::test]
async fn a_github_user_cannot_tell_what_a_repository_registered_by_url_holds() {
    let core = Core::start().await;
    let local = core.git_repo("tools", &[]).await;
    let job = core.queue(&local, "test").await;
    core.services
        .cancel(&Caller::Admin, job.id)
        .await
        .expect("cancelled");
    let maintainer = core.github_user(MAINTAINER).await;
    assert_not_found(
        "a repository that does not exist",
        core.services
            .repo_overview(&maintainer, "local", "missing")
            .await
            .map(|_| ()),
    );
    assert_not_found(
        "a repository registered by URL",
        core.services
            .repo_overview(&maintainer, "local", "tools")
            .await
            .map(|_| ()),
    );
    assert_not_found(
        "cancelling a job that does not exist",
        core.services.cancel(&maintainer, JobId(job.id.0 + 1)).await,
    );
    assert_not_found(
        "cancelling a job of a repository registered by URL",
        core.services.cancel(&maintainer, job.id).await,
    );
    assert_not_found(
        "retrying a job of a repository registered by URL",
        core.services.retry(&maintainer, job.id).await,
    );
}

#[tokio::test]
async fn registering_by_git_url_needs_the_admin_and_by_github_a_github_user() {
    let core = Core::start().await;
    let maintainer = core.github_user(MAINTAINER).await;
    let by_url = |owner: Option<&str>| {
        NewRepository::Git(NewRepo {
            owner: owner.map(str::to_owned),
            name: "tools".to_owned(),
            git_url: "file:///srv/git/tools.git".to_owned(),
            branch: None,
            timeout_secs: None,
            requeue_lost_tests: None,
            deploy_labels: BTreeMap::new(),
            max_log_bytes: None,
        })
    };
    assert_forbidden(
        "a GitHub user registering by URL",
        core.services
            .register(&maintainer, by_url(None))
            .await
            .map(|registered| registered.repo),
    );
    assert_forbidden(
        "a GitHub user registering by URL under a GitHub owner",
        core.services
            .register(&maintainer, by_url(Some(OWNER)))
            .await
            .map(|registered| registered.repo),
    );
    assert!(listed(&core, &core.admin()).await.is_empty());

    core.add_github_repo("widget");
    let on_github = || {
        NewRepository::GitHub(NewGitHubRepo {
            owner: Some(OWNER.to_owned()),
            name: "widget".to_owned(),
            branch: None,
            timeout_secs: None,
            create_webhook: false,
            deploy_labels: BTreeMap::new(),
            max_log_bytes: None,
        })
    };
    assert_forbidden(
        "the admin registering a GitHub repository (no GitHub token)",
        core.services
            .register(&core.admin(), on_github())
            .await
            .map(|registered| registered.repo),
    );
    let stranger = core.github_user(STRANGER).await;
    assert_not_found(
        "a stranger registering a repository they cannot see",
        core.services
            .register(&stranger, on_github())
            .await
            .map(|registered| registered.repo),
    );
    // Reading or pushing is not enough: whoever registers a repository
    // receives its webhook secret, and with it the power to queue trusted
    // jobs that run with the repository's secrets.
    for (user, what) in [
        (READER, "a reader (pull) registering"),
        (WRITER, "a writer (push) registering"),
    ] {
        let caller = core.github_user(user).await;
        let refused = core
            .services
            .register(&caller, on_github())
            .await
            .map(|registered| registered.repo);
        assert_forbidden(what, refused);
    }
    assert!(listed(&core, &core.admin()).await.is_empty());

    core.services
        .register(&core.admin(), by_url(None))
        .await
        .expect("the admin registers by URL");
    core.services
        .register(&maintainer, on_github())
        .await
        .expect("the maintainer registers on GitHub");
    assert_eq!(
        listed(&core, &core.admin()).await,
        ["local/tools", "octo-org/widget"]
    );
}

#[tokio::test]
async fn agents_and_agent_tokens_need_the_admin() {
    let core = Core::start().await;
    let agent = core.agent("builder", &[], &[], 1).await;
    let maintainer = core.github_user(MAINTAINER).await;

    assert_forbidden(
        "list agents",
        core.services.agents_overview(&maintainer).await.map(|_| ()),
    );
    assert_forbidden(
        "create an agent token",
        core.services
            .create_agent_token(&maintainer, "mine".to_owned(), BTreeMap::new())
            .await
            .map(|(record, _)| record),
    );
    assert_forbidden(
        "list agent tokens",
        core.services.list_agent_tokens(&maintainer).await,
    );
    assert_forbidden(
        "revoke an agent token",
        core.services
            .revoke_agent_token(&maintainer, &agent.record.token_id)
            .await,
    );

    let admin = core.admin();
    let agents = core
        .services
        .agents_overview(&admin)
        .await
        .expect("the admin lists agents");
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].agent.name, "builder");
    let tokens = core
        .services
        .list_agent_tokens(&admin)
        .await
        .expect("the admin lists tokens");
    assert_eq!(tokens.len(), 1, "the maintainer created no token");
    core.services
        .revoke_agent_token(&admin, &agent.record.token_id)
        .await
        .expect("the admin revokes");
    assert!(
        core.services
            .agents_overview(&admin)
            .await
            .expect("agents")
            .is_empty(),
        "revoking forgets the token's agents"
    );
}

#[tokio::test]
async fn wrong_credentials_are_unauthorized() {
    let core = Core::start().await;
    let services = &core.services;

    assert!(matches!(
        services.authenticate(&core.admin_token, None, None).await,
        Ok(Caller::Admin)
    ));
    assert!(matches!(
        services.authenticate_admin(&core.admin_token, None),
        Ok(Caller::Admin)
    ));
    let wrong_admin = format!("{}x", core.admin_token);
    assert_unauthorized(
        "a wrong admin token",
        services.authenticate(&wrong_admin, None, None).await,
    );
    assert_unauthorized(
        "a wrong admin token with a login",
        services
            .authenticate(&wrong_admin, Some("writer"), None)
            .await,
    );
    assert_unauthorized(
        "a GitHub token as the admin's",
        services.authenticate_admin(WRITER.token, None),
    );
    assert_unauthorized(
        "a GitHub token without its login",
        services.authenticate(WRITER.token, None, None).await,
    );
    assert_unauthorized(
        "a GitHub token for another login",
        services
            .authenticate(WRITER.token, Some(MAINTAINER.login), None)
            .await,
    );
    assert_unauthorized(
        "a token GitHub does not know",
        services
            .authenticate(
                "ghp_core_tests_unknown_0000000000000000",
                Some("writer"),
                None,
            )
            .await,
    );
    assert_unauthorized(
        "an empty login",
        services.authenticate(WRITER.token, Some(""), None).await,
    );
    // GitHub logins are case-insensitive; the caller is named as GitHub
    // spells it.
    match services
        .authenticate(WRITER.token, Some("Writer"), None)
        .await
    {
        Ok(Caller::GitHub { login, .. }) => assert_eq!(login, "writer"),
        other => panic!("expected the writer, got {other:?}"),
    }
}

/// Guessing is throttled: after 20 failures a client address — or a token,
/// from any address — gets 429 with a Retry-After, without GitHub being
/// asked; the admin token still passes, and other clients are not affected. A token GitHub refused is not sent to GitHub again for a
/// while (before: every request asked GitHub, and 1000 wrong admin tokens
/// were all checked).
#[tokio::test]
async fn failed_authentications_are_limited_per_client_and_per_token() {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use crate::auth::{DEFAULT_FAILURE_BURST, FAILURE_REFILL};

    let core = Core::start().await;
    let services = &core.services;
    let guesser = Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)));
    let bystander = Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)));
    let burst = DEFAULT_FAILURE_BURST as usize;
    for attempt in 0..burst {
        assert_unauthorized(
            &format!("wrong admin token #{attempt}"),
            services
                .authenticate(&format!("guess-{attempt:04}-xxxxxxxx"), None, guesser)
                .await,
        );
    }
    let refused = |result: Result<Caller, CoreError>| match result {
        Err(CoreError::TooManyFailures { retry_after }) => retry_after,
        other => panic!("expected TooManyFailures, got {other:?}"),
    };
    let retry_after = refused(
        services
            .authenticate("guess-last-xxxxxxxx", None, guesser)
            .await,
    );
    assert!(
        retry_after > Duration::ZERO && retry_after <= FAILURE_REFILL,
        "{retry_after:?}"
    );
    // The admin token still passes from that address (REST and gRPC): a
    // hostile job sharing the operators' address cannot lock them out.
    assert!(matches!(
        services
            .authenticate(&core.admin_token, None, guesser)
            .await,
        Ok(Caller::Admin)
    ));
    assert!(matches!(
        services.authenticate_admin(&core.admin_token, guesser),
        Ok(Caller::Admin)
    ));
    refused(services.authenticate_admin("guess-grpc-xxxxxxxx", guesser));
    // Another address is not affected.
    assert!(matches!(
        services
            .authenticate(&core.admin_token, None, bystander)
            .await,
        Ok(Caller::Admin)
    ));
    assert_unauthorized(
        "a bystander's typo",
        services
            .authenticate("typo-xxxxxxxxxxxxxxxx", None, bystander)
            .await,
    );

    // One token from many addresses (an IPv6 client counts by its /64).
    let requests_before = core.github.requests().len();
    let unknown = "ghp_core_tests_throttled_00000000000000";
    for attempt in 0..burst {
        let client = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, attempt as u16, 0, 0, 0, 0, 1));
        assert_unauthorized(
            "an unknown GitHub token",
            services
                .authenticate(unknown, Some("writer"), Some(client))
                .await,
        );
    }
    // GitHub was asked once: its refusal is remembered.
    assert_eq!(
        core.github.requests().len() - requests_before,
        1,
        "GitHub is asked about a refused token once"
    );
    refused(
        services
            .authenticate(unknown, Some("writer"), bystander)
            .await,
    );
    // A /64 is one client.
    let same_net = |host: u16| {
        Some(IpAddr::V6(Ipv6Addr::new(
            0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, host,
        )))
    };
    for attempt in 0..burst {
        assert_unauthorized(
            "a wrong token from a /64",
            services
                .authenticate(
                    &format!("v6-guess-{attempt:04}-xxxx"),
                    None,
                    same_net(attempt as u16 + 1),
                )
                .await,
        );
    }
    refused(
        services
            .authenticate("v6-guess-last-xxxx", None, same_net(0xbeef))
            .await,
    );
}

/// A webhook secret is rotated by whoever may register the repository (admin
/// rights on GitHub) or the admin token; from then on only the new secret
/// verifies deliveries, and a repository registered by URL has none.
#[tokio::test]
async fn rotating_the_webhook_secret_needs_admin_rights_and_retires_the_old_one() {
    let core = Core::start().await;
    let registered = core.github_repo("widget", &[]).await;
    let (push, _) = core.push_of_head("widget");
    let writer = core.github_user(WRITER).await;
    assert_forbidden(
        "a writer rotating the webhook secret",
        core.services
            .rotate_webhook_secret(&writer, OWNER, "widget")
            .await,
    );
    let stranger = core.github_user(STRANGER).await;
    assert_not_found(
        "a stranger rotating the webhook secret",
        core.services
            .rotate_webhook_secret(&stranger, OWNER, "widget")
            .await,
    );

    let maintainer = core.github_user(MAINTAINER).await;
    let rotated = core
        .services
        .rotate_webhook_secret(&maintainer, OWNER, "widget")
        .await
        .expect("the maintainer rotates the webhook secret");
    let old = registered.webhook.as_ref().expect("a webhook");
    assert_eq!(rotated.url, old.url, "the webhook URL stays");
    assert_ne!(rotated.secret, old.secret);
    let with_old = core.deliver(&registered, "push", "d-old", &push).await;
    assert!(
        matches!(with_old, Err(DeliveryError::BadSignature(_))),
        "a delivery signed with the old secret: {with_old:?}"
    );
    let renewed = Registered {
        repo: registered.repo.clone(),
        webhook: Some(rotated),
    };
    let with_new = core.deliver(&renewed, "push", "d-new", &push).await;
    assert!(
        matches!(with_new, Ok(Received::Queued(_))),
        "a delivery signed with the new secret: {with_new:?}"
    );

    core.services
        .rotate_webhook_secret(&core.admin(), OWNER, "widget")
        .await
        .expect("the admin token rotates it too");
    core.git_repo("tools", &[]).await;
    let by_url = core
        .services
        .rotate_webhook_secret(&core.admin(), "local", "tools")
        .await;
    assert!(
        matches!(by_url, Err(CoreError::Conflict(_))),
        "a repository registered by URL has no webhook: {by_url:?}"
    );
}

#[tokio::test]
async fn a_repositorys_page_offers_deploys_and_variable_changes_only_with_push_access() {
    let core = Core::start().await;
    let repo = core.github_repo("widget", &[]).await.repo;
    let older_test = core.queue(&repo, "test").await;
    let newer_test = core.queue(&repo, "test").await;
    let deploy = core.queue(&repo, "deploy").await;
    let (owner, name) = (OWNER, "widget");

    let reader = core.github_user(READER).await;
    let details = core
        .services
        .repo_details(&reader, owner, name)
        .await
        .expect("the reader reads the repository's page");
    assert!(!details.may_push, "a reader may not deploy");
    let ids = |jobs: &[Job]| jobs.iter().map(|job| job.id).collect::<Vec<_>>();
    assert_eq!(
        ids(&details.recent_jobs),
        vec![deploy.id, newer_test.id, older_test.id]
    );
    assert_eq!(ids(&details.deploys), vec![deploy.id]);
    // One candidate per commit: its newest test.
    assert_eq!(older_test.commit, newer_test.commit);
    assert_eq!(ids(&details.tested_commits), vec![newer_test.id]);

    let writer = core.github_user(WRITER).await;
    let details = core
        .services
        .repo_details(&writer, owner, name)
        .await
        .expect("the writer reads the repository's page");
    assert!(details.may_push, "a writer may deploy");
    assert!(
        core.services
            .repo_details(&core.admin(), owner, name)
            .await
            .expect("the admin reads it")
            .may_push
    );

    let stranger = core.github_user(STRANGER).await;
    assert_not_found(
        "a stranger's repository page",
        core.services.repo_details(&stranger, owner, name).await,
    );
}
