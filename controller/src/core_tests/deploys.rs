//! Deploys of one repository run one at a time, in order; other work (tests,
//! deploys of other repositories) is not held back by them.

use hobotnica_common::job::{JobState, Outcome};

use super::*;

/// Asserts that queued job `id` says it waits for deploy `running`.
async fn assert_waits_for(core: &Core, id: JobId, running: JobId) {
    let waiting = core.job(id).await;
    assert_state(&waiting, JobState::Queued);
    let message = waiting.message.unwrap_or_default();
    assert!(
        message.contains(&format!("deploy {running} of this repository is running")),
        "job {id} says why it waits: {message:?}"
    );
}

#[tokio::test]
async fn a_second_deploy_waits_for_the_first_and_runs_once_it_finished() {
    let core = Core::start().await;
    let repo = core.git_repo("app", &[]).await;
    let first = core.queue(&repo, "deploy").await;
    let second = core.queue(&repo, "deploy").await;
    let test = core.queue(&repo, "test").await;
    let agent = core.agent("builder", &[], &[], 3).await;
    let mut session = core.session(&agent).await;

    session.offer(3, 0).await;
    assert_eq!(session.assignment().await.job.id, first.id);
    // The oldest job the agent may take comes first: the test job, newer
    // than the second deploy, shows the deploy was held back.
    assert_eq!(session.assignment().await.job.id, test.id);
    assert_waits_for(&core, second.id, first.id).await;

    core.complete(&agent, &first, Outcome::Succeeded, 0)
        .await
        .expect("the first deploy completes");
    session.offer(2, 2).await;
    let next = session.assignment().await;
    assert_eq!(next.job.id, second.id, "the second deploy runs now");
    assert_state(&core.job(second.id).await, JobState::Running);
}

#[tokio::test]
async fn a_cancelled_deploy_lets_the_next_one_run() {
    let core = Core::start().await;
    let repo = core.git_repo("app", &[]).await;
    let first = core.queue(&repo, "deploy").await;
    let second = core.queue(&repo, "deploy").await;
    let (agent, mut session) = core.agent_running("builder", &first).await;
    assert_waits_for(&core, second.id, first.id).await;

    core.services
        .cancel(&Caller::Admin, first.id)
        .await
        .expect("cancel requested");
    match session.next().await {
        SessionOutput::Cancel { job, attempt } => assert_eq!((job, attempt), (first.id, 1)),
        _ => panic!("the agent is told to cancel the running deploy"),
    }
    core.complete(&agent, &first, Outcome::Cancelled, 0)
        .await
        .expect("the cancelled deploy completes");
    assert_state(&core.job(first.id).await, JobState::Cancelled);
    session.offer(1, 1).await;
    assert_eq!(session.assignment().await.job.id, second.id);
}

#[tokio::test]
async fn a_deploy_of_another_repository_is_not_held_back() {
    let core = Core::start().await;
    let app = core.git_repo("app", &[]).await;
    let site = core.git_repo("site", &[]).await;
    let app_first = core.queue(&app, "deploy").await;
    let app_second = core.queue(&app, "deploy").await;
    let site_deploy = core.queue(&site, "deploy").await;
    let agent = core.agent("builder", &[], &[], 3).await;
    let mut session = core.session(&agent).await;

    session.offer(3, 0).await;
    assert_eq!(session.assignment().await.job.id, app_first.id);
    assert_eq!(
        session.assignment().await.job.id,
        site_deploy.id,
        "the other repository's deploy runs beside the first"
    );
    assert_waits_for(&core, app_second.id, app_first.id).await;
}
