//! Repeats: a deploy with an `Idempotency-Key` and a webhook delivery each
//! queue their job once, however often they arrive.

use hobotnica_common::job::{JobKind, Trigger};

use super::*;
use crate::jobs::JobQuery;

fn deploy_with(pairs: &[(&str, &str)]) -> JobRequest {
    JobRequest {
        env: env(pairs),
        ..request("deploy")
    }
}

#[tokio::test]
async fn the_same_key_and_request_answer_with_the_first_job_and_create_nothing() {
    let core = Core::start().await;
    core.github_repo("widget", &[]).await;
    let writer = core.github_user(WRITER).await;
    let deploy = |request: JobRequest| {
        core.services
            .deploy(&writer, OWNER, "widget", request, Some("release-1"))
    };

    let (first, new) = deploy(deploy_with(&[("VERSION", "1")]))
        .await
        .expect("queued");
    assert!(new, "the first request creates the job");
    assert_eq!(first.kind, JobKind::Deploy);
    let (again, new) = deploy(deploy_with(&[("VERSION", "1")]))
        .await
        .expect("answered");
    assert!(!new, "a repeat is not new");
    assert_eq!(again.id, first.id);
    assert_eq!(again.env, first.env);
    assert_eq!(
        core.job_ids(&Caller::Admin, JobQuery::default()).await,
        [first.id],
        "one job"
    );

    // Still the first job once it has moved on.
    core.services
        .cancel(&writer, first.id)
        .await
        .expect("cancelled");
    let (later, new) = deploy(deploy_with(&[("VERSION", "1")]))
        .await
        .expect("answered");
    assert!(!new);
    assert_eq!(later.id, first.id);
    assert_state(&later, JobState::Cancelled);
    assert_eq!(
        core.job_ids(&Caller::Admin, JobQuery::default()).await,
        [first.id]
    );
}

#[tokio::test]
async fn the_same_key_with_another_request_is_invalid() {
    let core = Core::start().await;
    core.github_repo("widget", &[]).await;
    let writer = core.github_user(WRITER).await;
    let deploy = |request: JobRequest| {
        core.services
            .deploy(&writer, OWNER, "widget", request, Some("release-1"))
    };
    let (first, _) = deploy(deploy_with(&[("VERSION", "1")]))
        .await
        .expect("queued");

    assert_eq!(
        invalid_field(deploy(deploy_with(&[("VERSION", "2")])).await),
        "Idempotency-Key"
    );
    assert_eq!(
        invalid_field(
            deploy(JobRequest {
                branch: Some("main".to_owned()),
                ..deploy_with(&[("VERSION", "1")])
            })
            .await
        ),
        "Idempotency-Key"
    );
    assert_eq!(
        core.job_ids(&Caller::Admin, JobQuery::default()).await,
        [first.id],
        "nothing more was queued"
    );
}

#[tokio::test]
async fn a_key_whose_first_request_failed_can_be_used_again() {
    let core = Core::start().await;
    core.github_repo("widget", &[]).await;
    let writer = core.github_user(WRITER).await;
    let deploy = |request: JobRequest| {
        core.services
            .deploy(&writer, OWNER, "widget", request, Some("release-1"))
    };

    let on_missing_branch = JobRequest {
        branch: Some("nope".to_owned()),
        ..request("deploy")
    };
    assert_eq!(invalid_field(deploy(on_missing_branch).await), "branch");
    assert!(
        core.job_ids(&Caller::Admin, JobQuery::default())
            .await
            .is_empty()
    );

    let (job, new) = deploy(request("deploy"))
        .await
        .expect("the key is free again");
    assert!(new);
    let (again, new) = deploy(request("deploy")).await.expect("answered");
    assert!(!new);
    assert_eq!(again.id, job.id);
    assert_eq!(
        core.job_ids(&Caller::Admin, JobQuery::default()).await,
        [job.id]
    );
}

#[tokio::test]
async fn a_key_belongs_to_one_repository() {
    let core = Core::start().await;
    core.github_repo("widget", &[]).await;
    core.github_repo("gadget", &[]).await;
    let writer = core.github_user(WRITER).await;

    let (widget, new_widget) = core
        .services
        .deploy(&writer, OWNER, "widget", request("deploy"), Some("k"))
        .await
        .expect("queued");
    let (gadget, new_gadget) = core
        .services
        .deploy(&writer, OWNER, "gadget", request("deploy"), Some("k"))
        .await
        .expect("queued");
    assert!(new_widget && new_gadget);
    assert_ne!(widget.id, gadget.id);
    assert_eq!(gadget.repo.name, "gadget");
}

#[tokio::test]
async fn a_malformed_key_is_invalid() {
    let core = Core::start().await;
    core.github_repo("widget", &[]).await;
    let writer = core.github_user(WRITER).await;
    let too_long = "k".repeat(crate::jobs::MAX_IDEMPOTENCY_KEY_LEN + 1);
    for key in ["", "with space", "ключ", too_long.as_str()] {
        assert_eq!(
            invalid_field(
                core.services
                    .deploy(&writer, OWNER, "widget", request("deploy"), Some(key))
                    .await
            ),
            "Idempotency-Key",
            "key {key:?}"
        );
    }
    assert!(
        core.job_ids(&Caller::Admin, JobQuery::default())
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn the_same_webhook_delivery_twice_queues_one_job() {
    let core = Core::start().await;
    let registered = core.github_repo("widget", &[]).await;
    let (push, sha) = core.push_of_head("widget");

    let job = match core.deliver(&registered, "push", "delivery-1", &push).await {
        Ok(Received::Queued(job)) => job,
        other => panic!("expected a queued job, got {other:?}"),
    };
    assert_eq!(job.commit.as_str(), sha);
    assert_eq!(job.target, "test");
    assert_eq!(job.trigger, Trigger::Webhook);
    assert_eq!(job.branch.as_deref(), Some("main"));
    let again = core.deliver(&registered, "push", "delivery-1", &push).await;
    assert!(
        matches!(&again, Ok(Received::Duplicate(id)) if id == "delivery-1"),
        "{again:?}"
    );
    assert_eq!(
        core.job_ids(&Caller::Admin, JobQuery::default()).await,
        [job.id],
        "one job for one delivery"
    );

    // Another delivery of the same push is another job.
    let other = core.deliver(&registered, "push", "delivery-2", &push).await;
    assert!(matches!(other, Ok(Received::Queued(_))), "{other:?}");
    assert_eq!(
        core.job_ids(&Caller::Admin, JobQuery::default())
            .await
            .len(),
        2
    );
}

#[tokio::test]
async fn a_refused_delivery_does_not_use_up_its_id() {
    let core = Core::start().await;
    let registered = core.github_repo("widget", &[]).await;
    let (push, _) = core.push_of_head("widget");
    let webhook = registered.webhook.as_ref().expect("webhook");
    let hook_id = webhook.url.rsplit('/').next().expect("hook id");
    let body = serde_json::to_vec(&push).expect("JSON");
    let forged = hobotnica_tests::github::signature("not the secret", &body);
    let repo = core
        .services
        .delivery_target(hook_id)
        .await
        .expect("the hook is known");
    let refused = core
        .services
        .receive_delivery(
            &repo,
            Delivery {
                signature: Some(&forged),
                event: Some("push"),
                delivery_id: Some("delivery-1"),
                body: &body,
            },
        )
        .await;
    assert!(
        matches!(refused, Err(DeliveryError::BadSignature(_))),
        "{refused:?}"
    );
    assert!(
        core.job_ids(&Caller::Admin, JobQuery::default())
            .await
            .is_empty()
    );

    let delivered = core.deliver(&registered, "push", "delivery-1", &push).await;
    assert!(
        matches!(delivered, Ok(Received::Queued(_))),
        "{delivered:?}"
    );
}

/// Services of `core` whose store calls the test can hold.
fn gated(core: &Core) -> (Services, Arc<crate::store::gated::GatedStore>) {
    let gated = Arc::new(crate::store::gated::GatedStore::new(
        core.services.store.clone(),
    ));
    let mut services = core.services.clone();
    services.store = gated.clone();
    (services, gated)
}

#[tokio::test]
async fn a_delivery_cut_off_before_its_job_exists_is_queued_when_redelivered() {
    let core = Core::start().await;
    let registered = core.github_repo("widget", &[]).await;
    let (push, _) = core.push_of_head("widget");
    let webhook = registered.webhook.as_ref().expect("webhook");
    let hook_id = webhook.url.rsplit('/').next().expect("hook id").to_owned();
    let body = serde_json::to_vec(&push).expect("JSON");
    let signature = hobotnica_tests::github::signature(&webhook.secret, &body);

    // The controller dies while the job is being created: the request's
    // future is dropped there, and GitHub, without an answer, redelivers.
    let (services, gated) = gated(&core);
    let entered = gated.hold_create_job();
    let cut_off = tokio::spawn(async move {
        let repo = services.delivery_target(&hook_id).await?;
        services
            .receive_delivery(
                &repo,
                Delivery {
                    signature: Some(&signature),
                    event: Some("push"),
                    delivery_id: Some("delivery-1"),
                    body: &body,
                },
            )
            .await
    });
    tokio::time::timeout(DEADLINE, entered)
        .await
        .expect("the job creation began in time")
        .expect("the gate told");
    cut_off.abort();
    assert!(cut_off.await.expect_err("aborted").is_cancelled());
    assert!(
        core.job_ids(&Caller::Admin, JobQuery::default())
            .await
            .is_empty()
    );

    let redelivered = core.deliver(&registered, "push", "delivery-1", &push).await;
    assert!(
        matches!(redelivered, Ok(Received::Queued(_))),
        "the redelivery queues the job the first delivery did not: {redelivered:?}"
    );
    let again = core.deliver(&registered, "push", "delivery-1", &push).await;
    assert!(matches!(again, Ok(Received::Duplicate(_))), "{again:?}");
    assert_eq!(
        core.job_ids(&Caller::Admin, JobQuery::default())
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn a_deploy_cut_off_before_its_job_exists_runs_when_repeated() {
    let core = Core::start().await;
    core.github_repo("widget", &[]).await;
    let writer = core.github_user(WRITER).await;

    let (services, gated) = gated(&core);
    let entered = gated.hold_create_job();
    let cut_off = tokio::spawn({
        let writer = writer.clone();
        async move {
            services
                .deploy(
                    &writer,
                    OWNER,
                    "widget",
                    request("deploy"),
                    Some("release-1"),
                )
                .await
        }
    });
    tokio::time::timeout(DEADLINE, entered)
        .await
        .expect("the job creation began in time")
        .expect("the gate told");
    cut_off.abort();
    assert!(cut_off.await.expect_err("aborted").is_cancelled());

    let (job, new) = core
        .services
        .deploy(
            &writer,
            OWNER,
            "widget",
            request("deploy"),
            Some("release-1"),
        )
        .await
        .expect("the repeat runs the deploy the first request did not");
    assert!(new);
    let (again, new) = core
        .services
        .deploy(
            &writer,
            OWNER,
            "widget",
            request("deploy"),
            Some("release-1"),
        )
        .await
        .expect("answered");
    assert!(!new);
    assert_eq!(again.id, job.id);
    assert_eq!(
        core.job_ids(&Caller::Admin, JobQuery::default()).await,
        [job.id]
    );
}
