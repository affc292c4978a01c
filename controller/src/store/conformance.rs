//! The store conformance suite: the behaviour every `Store` backend must
//! have. Each test function takes a fresh store; `embedded_suite` runs them
//! against redb (the Redis backend adds its own runner).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{Duration, Utc};
use hobotnica_common::ids::AgentId;
use hobotnica_common::job::{JobKind, JobState, Outcome, Repo, RepoRef, Trigger};

use super::{AgentRecord, Finish, JobFilter, NewJob, Store, StoreError, StoreEvent};

fn repo(name: &str) -> Repo {
    Repo {
        owner: "local".into(),
        name: name.into(),
        git_url: format!("file:///srv/{name}.git"),
        default_branch: "main".into(),
        timeout_secs: 60,
        created_at: Utc::now(),
        github: None,
        disabled: None,
        env: Vec::new(),
        requeue_lost_tests: true,
        deploy_labels: BTreeMap::new(),
    }
}

/// A job of `local/demo` at a fixed commit (tests elsewhere in the crate use it too).
pub(crate) fn new_job(target: &str) -> NewJob {
    NewJob {
        repo: RepoRef::new("local", "demo"),
        git_url: "file:///srv/demo.git".into(),
        kind: JobKind::for_target(target),
        target: target.into(),
        commit: "0123456789abcdef0123456789abcdef01234567".parse().unwrap(),
        branch: Some("main".into()),
        env: BTreeMap::new(),
        trusted_labels: BTreeMap::new(),
        trigger: Trigger::Api,
        timeout_secs: 60,
        from_fork: false,
        requested_by: None,
    }
}

fn agent(name: &str) -> AgentRecord {
    AgentRecord {
        id: AgentId::generate(),
        name: name.into(),
        labels: BTreeMap::new(),
        concurrency: 1,
        version: "test".into(),
        token_id: "pool".into(),
        vouched_labels: BTreeMap::new(),
        registered_at: Utc::now(),
        last_seen: Utc::now(),
    }
}

/// Waits (up to 5 s) for `wanted` among the events; others are skipped
/// (events from earlier calls may still be on their way, e.g. over Redis
/// pub/sub).
async fn expect_event(
    events: &mut tokio::sync::broadcast::Receiver<StoreEvent>,
    wanted: StoreEvent,
) {
    let found = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match events.recv().await {
                Ok(event) if event == wanted => return,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    panic!("the event channel closed")
                }
            }
        }
    })
    .await;
    assert!(found.is_ok(), "no {wanted:?} within 5 s");
}

fn finish(outcome: Outcome, exit_code: Option<i32>) -> Finish {
    Finish {
        outcome,
        exit_code,
        message: None,
    }
}

pub async fn repos_are_unique_and_removable(store: Arc<dyn Store>) {
    store.create_repo(repo("demo")).await.unwrap();
    assert!(matches!(
        store.create_repo(repo("demo")).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.list_repos().await.unwrap().len(), 1);
    assert!(store.get_repo("local", "demo").await.unwrap().is_some());
    store.delete_repo("local", "demo").await.unwrap();
    assert!(store.get_repo("local", "demo").await.unwrap().is_none());
    assert!(matches!(
        store.delete_repo("local", "demo").await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn jobs_are_claimed_once_in_order_and_fenced(store: Arc<dyn Store>) {
    let mut events = store.subscribe();
    let first = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let second = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    assert!(second.id > first.id);
    assert_eq!(first.state, JobState::Queued);
    expect_event(&mut events, StoreEvent::JobQueued { job: first.id }).await;

    let worker = store.register_agent(agent("a1")).await.unwrap();
    let lease = Utc::now() + Duration::seconds(30);
    let claimed = store
        .claim_job(&worker, Utc::now(), lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.id, first.id, "oldest first");
    assert_eq!(claimed.state, JobState::Running);
    assert_eq!(claimed.attempt, 1);
    assert_eq!(claimed.agent, Some(worker.id.clone()));
    let claimed_second = store
        .claim_job(&worker, Utc::now(), lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed_second.id, second.id);
    assert!(
        store
            .claim_job(&worker, Utc::now(), lease)
            .await
            .unwrap()
            .is_none()
    );

    // A stale attempt is refused everywhere.
    assert!(matches!(
        store.renew_lease(first.id, 7, lease).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        store
            .append_log(first.id, 7, 0, Bytes::from_static(b"x"))
            .await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        store
            .finish_job(first.id, 7, finish(Outcome::Succeeded, Some(0)), Utc::now())
            .await,
        Err(StoreError::LeaseLost { .. })
    ));

    let done = store
        .finish_job(first.id, 1, finish(Outcome::Failed, Some(3)), Utc::now())
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Failed);
    assert_eq!(done.exit_code, Some(3));
    // Completing twice is accepted and changes nothing.
    let again = store
        .finish_job(first.id, 1, finish(Outcome::Failed, Some(3)), Utc::now())
        .await
        .unwrap();
    assert_eq!(again.finished_at, done.finished_at);
    // A finished job cannot be renewed.
    assert!(matches!(
        store.renew_lease(first.id, 1, lease).await,
        Err(StoreError::LeaseLost { .. })
    ));
}

pub async fn leases_expire_into_lost(store: Arc<dyn Store>) {
    let job = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let worker = store.register_agent(agent("a1")).await.unwrap();
    let now = Utc::now();
    store
        .claim_job(&worker, now, now + Duration::seconds(1))
        .await
        .unwrap();
    assert!(store.expire_leases(now).await.unwrap().is_empty());
    store
        .renew_lease(job.id, 1, now + Duration::seconds(5))
        .await
        .unwrap();
    assert!(
        store
            .expire_leases(now + Duration::seconds(2))
            .await
            .unwrap()
            .is_empty(),
        "a renewed lease holds"
    );
    let lost = store
        .expire_leases(now + Duration::seconds(6))
        .await
        .unwrap();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].state, JobState::Lost);
    assert!(lost[0].message.as_deref().unwrap().contains("a1"));
    assert!(matches!(
        store
            .renew_lease(job.id, 1, now + Duration::seconds(60))
            .await,
        Err(StoreError::LeaseLost { .. })
    ));
}

pub async fn extending_leases_protects_running_jobs(store: Arc<dyn Store>) {
    let job = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let worker = store.register_agent(agent("a1")).await.unwrap();
    let now = Utc::now();
    store
        .claim_job(&worker, now, now + Duration::seconds(1))
        .await
        .unwrap();
    store
        .extend_leases(now + Duration::seconds(30))
        .await
        .unwrap();
    assert!(
        store
            .expire_leases(now + Duration::seconds(10))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.get_job(job.id).await.unwrap().unwrap().state,
        JobState::Running
    );
}

pub async fn cancel_depends_on_state(store: Arc<dyn Store>) {
    let queued = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let cancelled = store.request_cancel(queued.id, Utc::now()).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(matches!(
        store.request_cancel(queued.id, Utc::now()).await,
        Err(StoreError::Conflict(_))
    ));

    let running = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let worker = store.register_agent(agent("a1")).await.unwrap();
    let mut events = store.subscribe();
    let now = Utc::now();
    store
        .claim_job(&worker, now, now + Duration::seconds(30))
        .await
        .unwrap();
    let asked = store.request_cancel(running.id, Utc::now()).await.unwrap();
    assert_eq!(asked.state, JobState::Running);
    assert!(asked.cancel_requested);
    expect_event(
        &mut events,
        StoreEvent::CancelRequested {
            job: running.id,
            attempt: 1,
            agent: worker.id.clone(),
        },
    )
    .await;
    let renewed = store
        .renew_lease(running.id, 1, now + Duration::seconds(30))
        .await
        .unwrap();
    assert!(renewed.cancel_requested);
}

pub async fn log_appends_are_idempotent(store: Arc<dyn Store>) {
    let job = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let worker = store.register_agent(agent("a1")).await.unwrap();
    let now = Utc::now();
    store
        .claim_job(&worker, now, now + Duration::seconds(30))
        .await
        .unwrap();
    let append = |offset: u64, data: &'static [u8]| {
        let store = Arc::clone(&store);
        async move {
            store
                .append_log(job.id, 1, offset, Bytes::from_static(data))
                .await
        }
    };
    assert_eq!(append(0, b"hello ").await.unwrap(), 6);
    assert_eq!(
        append(0, b"hello ").await.unwrap(),
        6,
        "a resend is a no-op"
    );
    assert_eq!(
        append(3, b"lo world").await.unwrap(),
        11,
        "an overlap appends the rest"
    );
    assert!(matches!(
        append(20, b"gap").await,
        Err(StoreError::LogGap { committed: 11 })
    ));
    assert_eq!(store.log_len(job.id).await.unwrap(), 11);
    assert_eq!(
        store.read_log(job.id, 0, 100).await.unwrap(),
        Bytes::from_static(b"hello world")
    );
    assert_eq!(
        store.read_log(job.id, 6, 3).await.unwrap(),
        Bytes::from_static(b"wor")
    );
    assert!(store.read_log(job.id, 11, 10).await.unwrap().is_empty());
}

pub async fn agents_keep_their_id_by_name_and_tokens_revoke(store: Arc<dyn Store>) {
    let first = store.register_agent(agent("builder")).await.unwrap();
    let again = store.register_agent(agent("builder")).await.unwrap();
    assert_eq!(first.id, again.id);
    assert_eq!(store.list_agents().await.unwrap().len(), 1);

    let token = super::AgentTokenRecord {
        id: "t1".into(),
        name: "box".into(),
        token_hash: hobotnica_common::token::hash_token("secret-token"),
        created_at: Utc::now(),
        labels: BTreeMap::from([("pool".into(), "test".into())]),
    };
    store.create_agent_token(token.clone()).await.unwrap();
    let found = store
        .find_agent_token(&hobotnica_common::token::hash_token("secret-token"))
        .await
        .unwrap();
    assert_eq!(found, Some(token));
    let mut events = store.subscribe();
    store.delete_agent_token("t1").await.unwrap();
    expect_event(
        &mut events,
        StoreEvent::AgentTokenRevoked {
            token_id: "t1".into(),
        },
    )
    .await;
    assert!(
        store
            .find_agent_token(&hobotnica_common::token::hash_token("secret-token"))
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn job_lists_filter_and_page_newest_first(store: Arc<dyn Store>) {
    let mut ids = Vec::new();
    for target in ["test", "deploy", "test", "lint", "test"] {
        ids.push(
            store
                .create_job(new_job(target), Utc::now())
                .await
                .unwrap()
                .id,
        );
    }
    let all = store
        .list_jobs(&JobFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.iter().map(|j| j.id).collect::<Vec<_>>(), {
        let mut rev = ids.clone();
        rev.reverse();
        rev
    });
    let tests = store
        .list_jobs(&JobFilter {
            kind: Some(JobKind::Test),
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        tests.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![ids[4], ids[2]]
    );
    let next = store
        .list_jobs(&JobFilter {
            kind: Some(JobKind::Test),
            limit: 2,
            before: Some(ids[2]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(next.iter().map(|j| j.id).collect::<Vec<_>>(), vec![ids[0]]);
}

pub async fn racing_claimers_take_each_job_exactly_once(store: Arc<dyn Store>) {
    const JOBS: usize = 60;
    const CLAIMERS: usize = 6;
    for _ in 0..JOBS {
        store.create_job(new_job("test"), Utc::now()).await.unwrap();
    }
    let mut claimers = tokio::task::JoinSet::new();
    for n in 0..CLAIMERS {
        let store = Arc::clone(&store);
        claimers.spawn(async move {
            let worker = store
                .register_agent(agent(&format!("racer-{n}")))
                .await
                .unwrap();
            let mut taken = Vec::new();
            loop {
                let now = Utc::now();
                match store
                    .claim_job(&worker, now, now + Duration::seconds(30))
                    .await
                    .unwrap()
                {
                    Some(job) => taken.push(job.id),
                    None => return taken,
                }
            }
        });
    }
    let mut all = Vec::new();
    while let Some(taken) = claimers.join_next().await {
        all.extend(taken.unwrap());
    }
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!(before, all.len(), "a job was claimed twice");
    assert_eq!(all.len(), JOBS, "every job was claimed");
}

pub async fn logs_read_back_from_any_offset(store: Arc<dyn Store>) {
    let job = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let worker = store.register_agent(agent("a1")).await.unwrap();
    let now = Utc::now();
    store
        .claim_job(&worker, now, now + Duration::seconds(30))
        .await
        .unwrap();
    let log: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let mut offset = 0;
    for size in [1usize, 7, 100, 1, 999, 3, 2000, 1889] {
        let end = offset + size;
        store
            .append_log(
                job.id,
                1,
                offset as u64,
                Bytes::copy_from_slice(&log[offset..end]),
            )
            .await
            .unwrap();
        offset = end;
    }
    assert_eq!(offset, log.len());
    for (from, max) in [
        (0, 5000),
        (0, 1),
        (1, 7),
        (5, 3000),
        (107, 1),
        (1108, 4000),
        (4999, 10),
        (5000, 10),
    ] {
        let read = store.read_log(job.id, from as u64, max).await.unwrap();
        let end = (from + max).min(log.len());
        assert_eq!(&read[..], &log[from..end], "from {from} max {max}");
    }
}

pub async fn archived_logs_read_the_same(store: Arc<dyn Store>) {
    let job = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let worker = store.register_agent(agent("a1")).await.unwrap();
    let now = Utc::now();
    store
        .claim_job(&worker, now, now + Duration::seconds(30))
        .await
        .unwrap();
    // Over two archive segments, in agent-sized chunks.
    let log: Vec<u8> = (0..2_600_000u32).map(|i| (i % 253) as u8).collect();
    for (n, chunk) in log.chunks(64 * 1024).enumerate() {
        store
            .append_log(
                job.id,
                1,
                (n * 64 * 1024) as u64,
                Bytes::copy_from_slice(chunk),
            )
            .await
            .unwrap();
    }
    store
        .finish_job(job.id, 1, finish(Outcome::Succeeded, Some(0)), Utc::now())
        .await
        .unwrap();
    store
        .archive_logs(Utc::now() + Duration::seconds(1))
        .await
        .unwrap();
    let check = |expected: Vec<u8>| {
        let store = Arc::clone(&store);
        async move {
            assert_eq!(store.log_len(job.id).await.unwrap(), expected.len() as u64);
            for (from, max) in [
                (0, 3_000_000),
                (1, 10),
                (1_048_570, 20),
                (2_000_000, 700_000),
                (2_599_999, 5),
            ] {
                let read = store.read_log(job.id, from as u64, max).await.unwrap();
                let end = (from + max).min(expected.len());
                assert_eq!(read.len(), end - from, "from {from} max {max}");
                assert!(read[..] == expected[from..end], "from {from} max {max}");
            }
        }
    };
    check(log.clone()).await;
    // A line written after the archive is read after it.
    store
        .append_controller_line(job.id, "after the end")
        .await
        .unwrap();
    let mut longer = log.clone();
    longer.extend_from_slice(b"[hobotnica] after the end\n");
    check(longer.clone()).await;
    store
        .archive_logs(Utc::now() + Duration::seconds(1))
        .await
        .unwrap();
    check(longer).await;
}

pub async fn retention_deletes_only_old_finished_jobs(store: Arc<dyn Store>) {
    let worker = store.register_agent(agent("a1")).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..5 {
        let job = store.create_job(new_job("test"), Utc::now()).await.unwrap();
        let now = Utc::now();
        store
            .claim_job(&worker, now, now + Duration::seconds(30))
            .await
            .unwrap();
        store
            .append_log(job.id, 1, 0, Bytes::from_static(b"output"))
            .await
            .unwrap();
        store
            .finish_job(job.id, 1, finish(Outcome::Succeeded, Some(0)), Utc::now())
            .await
            .unwrap();
        ids.push(job.id);
    }
    let running = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let now = Utc::now();
    store
        .claim_job(&worker, now, now + Duration::seconds(30))
        .await
        .unwrap();

    let keep_two = super::Retention {
        max_age: std::time::Duration::from_secs(3600),
        max_jobs_per_repo: 2,
    };
    assert_eq!(store.prune(&keep_two, Utc::now()).await.unwrap(), 4);
    for id in &ids[..4] {
        assert!(store.get_job(*id).await.unwrap().is_none(), "job {id} kept");
        assert_eq!(store.log_len(*id).await.unwrap(), 0, "log of {id} kept");
    }
    assert!(store.get_job(ids[4]).await.unwrap().is_some());

    let by_age = super::Retention {
        max_age: std::time::Duration::ZERO,
        max_jobs_per_repo: 1000,
    };
    assert_eq!(
        store
            .prune(&by_age, Utc::now() + Duration::seconds(1))
            .await
            .unwrap(),
        1
    );
    assert!(store.get_job(ids[4]).await.unwrap().is_none());
    assert_eq!(
        store.get_job(running.id).await.unwrap().unwrap().state,
        JobState::Running,
        "a running job is never pruned"
    );
}

pub async fn deploys_of_one_repository_run_one_at_a_time(store: Arc<dyn Store>) {
    let first = store
        .create_job(new_job("deploy"), Utc::now())
        .await
        .unwrap();
    let second = store
        .create_job(new_job("deploy"), Utc::now())
        .await
        .unwrap();
    let test = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let mut other_repo = new_job("deploy");
    other_repo.repo = RepoRef::new("local", "other");
    let other = store.create_job(other_repo, Utc::now()).await.unwrap();
    let worker = store.register_agent(agent("a1")).await.unwrap();
    let claim = || {
        let store = Arc::clone(&store);
        let worker = worker.clone();
        async move {
            let now = Utc::now();
            store
                .claim_job(&worker, now, now + Duration::seconds(2))
                .await
                .unwrap()
                .map(|job| job.id)
        }
    };
    assert_eq!(claim().await, Some(first.id));
    assert_eq!(claim().await, Some(test.id), "the second deploy waits");
    assert_eq!(
        claim().await,
        Some(other.id),
        "another repository's deploy does not"
    );
    assert_eq!(claim().await, None);
    store
        .finish_job(first.id, 1, finish(Outcome::Succeeded, Some(0)), Utc::now())
        .await
        .unwrap();
    assert_eq!(claim().await, Some(second.id));
    // A lost deploy frees the repository too, and is not run again.
    let third = store
        .create_job(new_job("deploy"), Utc::now())
        .await
        .unwrap();
    assert_eq!(claim().await, None);
    let lost = store
        .expire_leases(Utc::now() + Duration::seconds(10))
        .await
        .unwrap();
    assert!(lost.iter().any(|job| job.id == second.id));
    assert_eq!(claim().await, Some(third.id));
    assert_eq!(
        store.get_job(second.id).await.unwrap().unwrap().state,
        JobState::Lost
    );
}

pub async fn repository_updates_are_compare_and_set(store: Arc<dyn Store>) {
    let original = repo("demo");
    store.create_repo(original.clone()).await.unwrap();
    let mut first = original.clone();
    first.default_branch = "first".into();
    let mut second = original.clone();
    second.default_branch = "second".into();
    assert!(store.update_repo(&original, first.clone()).await.unwrap());
    assert!(
        !store.update_repo(&original, second).await.unwrap(),
        "a change made from a stale read is refused"
    );
    assert_eq!(
        store
            .get_repo("local", "demo")
            .await
            .unwrap()
            .unwrap()
            .default_branch,
        "first"
    );
    let mut gone = repo("gone");
    gone.default_branch = "x".into();
    assert!(matches!(
        store.update_repo(&repo("gone"), gone).await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn an_agent_name_belongs_to_the_token_that_registered_it(store: Arc<dyn Store>) {
    let mut owner = agent("builder");
    owner.token_id = "t-owner".into();
    let owner = store.register_agent(owner).await.unwrap();

    // Another token cannot take the name over; the record stays as it was.
    let mut impostor = agent("builder");
    impostor.token_id = "t-other".into();
    impostor.labels.insert("pool".into(), "deploy".into());
    match store.register_agent(impostor).await {
        Err(StoreError::AgentNameTaken { name }) => assert_eq!(name, "builder"),
        other => panic!("expected AgentNameTaken, got {other:?}"),
    }
    let mut pool = agent("builder");
    pool.token_id = "pool".into();
    assert!(matches!(
        store.register_agent(pool).await,
        Err(StoreError::AgentNameTaken { .. })
    ));
    assert_eq!(
        store.get_agent(&owner.id).await.unwrap(),
        Some(owner.clone())
    );
    assert_eq!(store.list_agents().await.unwrap(), vec![owner.clone()]);

    // The same token (an agent restart) keeps the id.
    let mut restarted = agent("builder");
    restarted.token_id = "t-owner".into();
    restarted.concurrency = 4;
    let restarted = store.register_agent(restarted).await.unwrap();
    assert_eq!(restarted.id, owner.id);
    assert_eq!(restarted.concurrency, 4);

    // Revoking the owner's token forgets its agents: the name is free.
    store
        .create_agent_token(super::AgentTokenRecord {
            id: "t-owner".into(),
            name: "box".into(),
            token_hash: hobotnica_common::token::hash_token("owner-token"),
            created_at: Utc::now(),
            labels: BTreeMap::new(),
        })
        .await
        .unwrap();
    let mut bystander = agent("bystander");
    bystander.token_id = "t-other".into();
    let bystander = store.register_agent(bystander).await.unwrap();
    store.delete_agent_token("t-owner").await.unwrap();
    assert_eq!(store.get_agent(&owner.id).await.unwrap(), None);
    assert!(matches!(
        store.touch_agent(&owner.id, Utc::now()).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.get_agent(&owner.id).await.unwrap(), None);
    assert_eq!(store.list_agents().await.unwrap(), vec![bystander]);
    let mut successor = agent("builder");
    successor.token_id = "t-other".into();
    let successor = store.register_agent(successor).await.unwrap();
    assert_ne!(successor.id, owner.id, "a new owner is a new agent");
}

pub async fn deploys_go_only_to_agents_whose_token_vouches(store: Arc<dyn Store>) {
    let mut deploy = new_job("deploy");
    deploy.trusted_labels.insert("pool".into(), "deploy".into());
    let deploy = store.create_job(deploy, Utc::now()).await.unwrap();
    let test = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let lease = Utc::now() + Duration::seconds(30);

    // Carrying the label is not enough: the token must vouch for it.
    let mut claims_it = agent("claims-it");
    claims_it.labels.insert("pool".into(), "deploy".into());
    let claims_it = store.register_agent(claims_it).await.unwrap();
    let mut test_pool = agent("test-pool");
    test_pool.token_id = "t-test".into();
    test_pool.labels.insert("pool".into(), "test".into());
    test_pool.vouched_labels = test_pool.labels.clone();
    let test_pool = store.register_agent(test_pool).await.unwrap();
    let taken = store
        .claim_job(&claims_it, Utc::now(), lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.id, test.id, "the deploy waits; the test runs");
    for agent in [&claims_it, &test_pool] {
        assert!(
            store
                .claim_job(agent, Utc::now(), lease)
                .await
                .unwrap()
                .is_none()
        );
    }

    let mut trusted = agent("deployer");
    trusted.token_id = "t-deploy".into();
    trusted.labels.insert("pool".into(), "deploy".into());
    trusted.vouched_labels = trusted.labels.clone();
    let trusted = store.register_agent(trusted).await.unwrap();
    let taken = store
        .claim_job(&trusted, Utc::now(), lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.id, deploy.id);
}

/// Runs every conformance test against fresh stores made by `make`.
macro_rules! conformance_suite {
    ($make:expr) => {
        conformance_suite!(@tests $make;
            repos_are_unique_and_removable,
            jobs_are_claimed_once_in_order_and_fenced,
            leases_expire_into_lost,
            extending_leases_protects_running_jobs,
            cancel_depends_on_state,
            log_appends_are_idempotent,
            agents_keep_their_id_by_name_and_tokens_revoke,
            an_agent_name_belongs_to_the_token_that_registered_it,
            deploys_go_only_to_agents_whose_token_vouches,
            job_lists_filter_and_page_newest_first,
            racing_claimers_take_each_job_exactly_once,
            logs_read_back_from_any_offset,
            archived_logs_read_the_same,
            retention_deletes_only_old_finished_jobs,
            deploys_of_one_repository_run_one_at_a_time,
            repository_updates_are_compare_and_set,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard) = $make;
                super::$name(store).await;
            }
        )*
    };
}

mod embedded_suite {
    use super::super::embedded::EmbeddedStore;
    use std::sync::Arc;

    fn make() -> (Arc<dyn super::Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        (Arc::new(store), dir)
    }

    conformance_suite!(make());

    /// Idempotency records go with their key once it is older than
    /// `DELIVERY_RETENTION` (Redis expires the same keys by TTL).
    #[tokio::test]
    async fn idempotency_records_are_pruned_with_their_key() {
        use chrono::{Duration, Utc};
        use hobotnica_common::ids::JobId;
        let (store, _dir) = make();
        let old = Utc::now() - Duration::days(8);
        let key = "idempotency:local/demo:a#b";
        assert!(store.remember_delivery(key, old).await.unwrap());
        store.set_key_job(key, JobId(1)).await.unwrap();
        store
            .set_key_job(&format!("{key}#f00d"), JobId(1))
            .await
            .unwrap();
        let fresh = "idempotency:local/demo:fresh";
        assert!(store.remember_delivery(fresh, Utc::now()).await.unwrap());
        store.set_key_job(fresh, JobId(2)).await.unwrap();
        store
            .set_key_job(&format!("{fresh}#beef"), JobId(2))
            .await
            .unwrap();

        let retention = super::super::Retention {
            max_age: std::time::Duration::from_secs(3600),
            max_jobs_per_repo: 1000,
        };
        store.prune(&retention, Utc::now()).await.unwrap();
        assert_eq!(store.key_job(key).await.unwrap(), None);
        assert_eq!(store.key_job(&format!("{key}#f00d")).await.unwrap(), None);
        assert_eq!(store.key_job(fresh).await.unwrap(), Some(JobId(2)));
        assert_eq!(
            store.key_job(&format!("{fresh}#beef")).await.unwrap(),
            Some(JobId(2))
        );
        // The key can be used again: it is new.
        assert!(store.remember_delivery(key, Utc::now()).await.unwrap());
    }
}

/// A `redis-server` of its own on a free port, killed on drop.
pub struct RedisServer {
    child: std::process::Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    #[allow(clippy::disallowed_methods)] // tests start their own redis-server
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/setup installs it)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
            _dir: dir,
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

mod redis_suite {
    use super::super::redis::RedisStore;
    use super::RedisServer;
    use std::sync::Arc;

    async fn make() -> (Arc<dyn super::Store>, RedisServer) {
        let server = RedisServer::start();
        let store = RedisStore::connect(&server.url, "test:", None)
            .await
            .unwrap();
        (Arc::new(store), server)
    }

    conformance_suite!(make().await);
}
