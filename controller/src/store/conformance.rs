//! The store conformance suite: the behaviour every `Store` backend must
//! have. Each test function takes a fresh store; `embedded_suite` and
//! `redis_suite` run every one of them against their backend.
//!
//! Tests that also take a `peer` get a second store on the same data: a
//! second controller sharing the backend (Redis), or the same store where
//! a backend serves one controller only (embedded).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Duration, Utc};
use hobotnica_common::ids::{AgentId, JobId};
use hobotnica_common::job::{
    GitHubLink, Job, JobKind, JobState, JobTimings, Outcome, Repo, RepoRef, Trigger,
};

use super::{
    AgentRecord, AgentTokenRecord, Finish, JobFilter, NewJob, QueueStats, Retention,
    SessionPrincipal, SessionRecord, Store, StoreError, StoreEvent,
};

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
        max_log_bytes: None,
        notifications: Vec::new(),
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

pub(crate) fn agent(name: &str) -> AgentRecord {
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
        controller: None,
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

pub(crate) fn finish(outcome: Outcome, exit_code: Option<i32>) -> Finish {
    Finish {
        outcome,
        exit_code,
        message: None,
        timings: None,
    }
}

fn github_repo(name: &str, hook_id: &str) -> Repo {
    let mut repo = repo(name);
    repo.git_url = format!("https://github.com/local/{name}.git");
    repo.github = Some(GitHubLink {
        login: "octocat".into(),
        token_sealed: "sealed-token".into(),
        hook_id: hook_id.into(),
        webhook_secret_sealed: "sealed-secret".into(),
    });
    repo
}

/// A job of repository `repo` (`owner/name`).
fn job_of(repo: &str, target: &str) -> NewJob {
    let mut job = new_job(target);
    job.repo = repo.parse().expect("owner/name");
    job.git_url = format!("file:///srv/{repo}.git");
    job
}

fn agent_token(id: &str, secret: &str) -> AgentTokenRecord {
    AgentTokenRecord {
        id: id.into(),
        name: format!("{id} box"),
        token_hash: hobotnica_common::token::hash_token(secret),
        created_at: Utc::now(),
        labels: BTreeMap::new(),
    }
}

/// Queues `new`, has `worker` claim it (it must be the oldest job `worker`
/// may take), writes `output\n` to its log and finishes it at `finished_at`.
async fn run_job(
    store: &Arc<dyn Store>,
    worker: &AgentRecord,
    new: NewJob,
    finished_at: DateTime<Utc>,
) -> Job {
    let job = store
        .create_job(new, Utc::now())
        .await
        .expect("job created");
    let now = Utc::now();
    let claimed = store
        .claim_job(worker, now, now + Duration::seconds(30))
        .await
        .expect("claim answered")
        .expect("a job to claim");
    assert_eq!(claimed.id, job.id, "the new job is the one claimed");
    store
        .append_log(job.id, 1, 0, Bytes::from_static(b"output\n"))
        .await
        .expect("output appended");
    store
        .finish_job(job.id, 1, finish(Outcome::Succeeded, Some(0)), finished_at)
        .await
        .expect("job finished")
        .job
}

fn ids(jobs: &[Job]) -> Vec<JobId> {
    jobs.iter().map(|job| job.id).collect()
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
    assert!(done.first, "the first completion ends the job");
    let done = done.job;
    assert_eq!(done.state, JobState::Failed);
    assert_eq!(done.exit_code, Some(3));
    // Completing twice is accepted, changes nothing and says so.
    let again = store
        .finish_job(first.id, 1, finish(Outcome::Failed, Some(3)), Utc::now())
        .await
        .unwrap();
    assert!(!again.first, "a repeated completion is a repeat");
    assert_eq!(again.job.finished_at, done.finished_at);
    // A finished job cannot be renewed.
    assert!(matches!(
        store.renew_lease(first.id, 1, lease).await,
        Err(StoreError::LeaseLost { .. })
    ));
}

/// The queue at a glance: how many jobs wait and run, and when the one
/// that waited longest was queued (the metrics' fleet gauges).
pub async fn queue_stats_count_queued_and_running_jobs(store: Arc<dyn Store>) {
    let empty = store.queue_stats().await.unwrap();
    assert_eq!(empty, QueueStats::default(), "nothing queued or running");
    let first_at = Utc::now() - Duration::seconds(60);
    let first = store.create_job(new_job("test"), first_at).await.unwrap();
    let second = store
        .create_job(new_job("deploy"), Utc::now())
        .await
        .unwrap();
    let stats = store.queue_stats().await.unwrap();
    assert_eq!((stats.queued, stats.running), (2, 0));
    assert_eq!(stats.oldest_queued_at, Some(first.created_at));

    let worker = store.register_agent(agent("a1")).await.unwrap();
    let now = Utc::now();
    let claimed = store
        .claim_job(&worker, now, now + Duration::seconds(30))
        .await
        .unwrap()
        .expect("a job to claim");
    assert_eq!(claimed.id, first.id);
    let stats = store.queue_stats().await.unwrap();
    assert_eq!((stats.queued, stats.running), (1, 1));
    assert_eq!(stats.oldest_queued_at, Some(second.created_at));

    store
        .finish_job(first.id, 1, finish(Outcome::Succeeded, Some(0)), Utc::now())
        .await
        .unwrap();
    store.request_cancel(second.id, Utc::now()).await.unwrap();
    let stats = store.queue_stats().await.unwrap();
    assert_eq!(stats, QueueStats::default(), "finished jobs count nowhere");
}

/// The phase timings an agent reports with its completion are kept with
/// the job and read back as they were written; a repeated completion
/// leaves them alone.
pub async fn finished_jobs_keep_their_timings(store: Arc<dyn Store>) {
    let job = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let worker = store.register_agent(agent("a1")).await.unwrap();
    let now = Utc::now();
    store
        .claim_job(&worker, now, now + Duration::seconds(30))
        .await
        .unwrap()
        .unwrap();
    let timings = JobTimings {
        assignment_sent_at: Some(now),
        received_at: Some(now + Duration::milliseconds(1)),
        fetched_at: Some(now + Duration::milliseconds(2)),
        fetch_ran: Some(false),
        make_exited_at: Some(now + Duration::microseconds(2_500)),
        ..JobTimings::default()
    };
    let done = store
        .finish_job(
            job.id,
            1,
            Finish {
                timings: Some(timings.clone()),
                ..finish(Outcome::Succeeded, Some(0))
            },
            Utc::now(),
        )
        .await
        .unwrap();
    assert_eq!(done.job.timings.as_ref(), Some(&timings));
    let again = store
        .finish_job(job.id, 1, finish(Outcome::Succeeded, Some(0)), Utc::now())
        .await
        .unwrap();
    assert!(!again.first);
    let stored = store.get_job(job.id).await.unwrap().expect("the job");
    assert_eq!(stored.timings, Some(timings));
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

    let token = AgentTokenRecord {
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

    let keep_two = Retention {
        max_age: std::time::Duration::from_secs(3600),
        max_jobs_per_repo: 2,
    };
    assert_eq!(store.prune(&keep_two, Utc::now()).await.unwrap(), 4);
    for id in &ids[..4] {
        assert!(store.get_job(*id).await.unwrap().is_none(), "job {id} kept");
        assert_eq!(store.log_len(*id).await.unwrap(), 0, "log of {id} kept");
    }
    assert!(store.get_job(ids[4]).await.unwrap().is_some());

    let by_age = Retention {
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
        .create_agent_token(AgentTokenRecord {
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
        store
            .touch_agent(&owner.id, Utc::now(), "https://ci-a.example")
            .await,
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

pub async fn the_backend_answers_ping(store: Arc<dyn Store>) {
    store.ping().await.expect("a working store answers");
    store
        .create_job(new_job("test"), Utc::now())
        .await
        .expect("job created");
    store.ping().await.expect("and keeps answering");
}

pub async fn webhooks_find_their_repository(store: Arc<dyn Store>) {
    let alpha = github_repo("alpha", "hook-alpha");
    let beta = github_repo("beta", "hook-beta");
    store.create_repo(alpha.clone()).await.expect("alpha");
    store.create_repo(beta.clone()).await.expect("beta");
    store.create_repo(repo("plain")).await.expect("plain");
    let find = |hook_id: &'static str| {
        let store = Arc::clone(&store);
        async move {
            store
                .find_repo_by_hook(hook_id)
                .await
                .expect("lookup answered")
        }
    };
    assert_eq!(find("hook-alpha").await, Some(alpha.clone()));
    assert_eq!(find("hook-beta").await, Some(beta.clone()));
    assert_eq!(find("hook-gamma").await, None, "an unknown hook id");
    assert_eq!(find("hook-al").await, None, "a prefix is not the id");
    assert_eq!(find("").await, None, "a repository without GitHub has none");

    // A new hook id replaces the old one.
    let mut moved = alpha.clone();
    moved.github.as_mut().expect("linked").hook_id = "hook-alpha-2".into();
    assert!(
        store
            .update_repo(&alpha, moved.clone())
            .await
            .expect("update")
    );
    assert_eq!(find("hook-alpha-2").await, Some(moved.clone()));
    assert_eq!(find("hook-alpha").await, None, "the old hook id is gone");

    // A change from a stale read moves no hook.
    let mut stale = alpha.clone();
    stale.github.as_mut().expect("linked").hook_id = "hook-stale".into();
    assert!(!store.update_repo(&alpha, stale).await.expect("update"));
    assert_eq!(find("hook-stale").await, None);
    assert_eq!(find("hook-alpha-2").await, Some(moved.clone()));

    // Without its GitHub link a repository has no hook; with it, it has.
    let mut unlinked = moved.clone();
    unlinked.github = None;
    assert!(
        store
            .update_repo(&moved, unlinked.clone())
            .await
            .expect("update")
    );
    assert_eq!(find("hook-alpha-2").await, None);
    assert!(
        store
            .update_repo(&unlinked, moved.clone())
            .await
            .expect("update")
    );
    assert_eq!(find("hook-alpha-2").await, Some(moved.clone()));

    // A deleted repository's hook finds nothing; the others still work.
    store.delete_repo("local", "beta").await.expect("deleted");
    assert_eq!(find("hook-beta").await, None);
    assert_eq!(find("hook-alpha-2").await, Some(moved));
}

pub async fn deleting_a_repository_keeps_its_jobs(store: Arc<dyn Store>) {
    store.create_repo(repo("demo")).await.expect("demo");
    store.create_repo(repo("other")).await.expect("other");
    let job = store
        .create_job(new_job("test"), Utc::now())
        .await
        .expect("job of local/demo");
    store.delete_repo("local", "demo").await.expect("deleted");
    let names: Vec<String> = store
        .list_repos()
        .await
        .expect("repos")
        .iter()
        .map(Repo::full_name)
        .collect();
    assert_eq!(names, vec!["local/other".to_owned()]);
    assert_eq!(store.get_job(job.id).await.expect("job"), Some(job.clone()));
    let history = store
        .list_jobs(&JobFilter {
            repo: Some(RepoRef::new("local", "demo")),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("jobs");
    assert_eq!(ids(&history), vec![job.id], "its jobs stay, for history");
    // The name is free again.
    store
        .create_repo(repo("demo"))
        .await
        .expect("registered again");
    assert_eq!(store.list_repos().await.expect("repos").len(), 2);
}

pub async fn keys_are_remembered_through_maintenance(store: Arc<dyn Store>) {
    let once = |key: &'static str| {
        let store = Arc::clone(&store);
        async move {
            store
                .create_job_once(key, &[], new_job("test"), Utc::now())
                .await
                .expect("create_job_once answered")
                .is_some()
        }
    };
    assert!(once("d-1").await, "a new delivery");
    assert!(!once("d-1").await, "a redelivery");
    assert!(once("d-2").await, "another delivery is new");

    // Recent keys outlive maintenance.
    let retention = Retention {
        max_age: std::time::Duration::from_secs(3600),
        max_jobs_per_repo: 1000,
    };
    store.prune(&retention, Utc::now()).await.expect("pruned");
    assert!(!once("d-1").await);
    assert!(!once("d-2").await);
}

fn session(principal: SessionPrincipal, now: DateTime<Utc>) -> SessionRecord {
    SessionRecord {
        principal,
        csrf_token: "csrf-0123".into(),
        created_at: now,
        expires_at: now + Duration::hours(12),
    }
}

pub async fn sessions_are_found_until_they_expire_or_are_deleted(store: Arc<dyn Store>) {
    let now = Utc::now();
    let admin = session(
        SessionPrincipal::Admin {
            fingerprint: "f1".into(),
        },
        now,
    );
    let user = session(
        SessionPrincipal::GitHub {
            login: "octocat".into(),
            token_sealed: "sealed-token".into(),
        },
        now,
    );
    assert_eq!(store.get_session("h-admin", now).await.unwrap(), None);
    store
        .create_session("h-admin", admin.clone())
        .await
        .unwrap();
    store.create_session("h-user", user.clone()).await.unwrap();
    assert_eq!(
        store.get_session("h-admin", now).await.unwrap(),
        Some(admin.clone())
    );
    assert_eq!(
        store.get_session("h-user", now).await.unwrap(),
        Some(user.clone())
    );
    // Past its expiry a session is gone, whatever the backend still holds.
    let later = now + Duration::hours(13);
    assert_eq!(store.get_session("h-user", later).await.unwrap(), None);
    // Deleting one leaves the other; deleting twice is no error.
    store.delete_session("h-admin").await.unwrap();
    store.delete_session("h-admin").await.unwrap();
    assert_eq!(store.get_session("h-admin", now).await.unwrap(), None);
    assert_eq!(store.get_session("h-user", now).await.unwrap(), Some(user));
}

pub async fn sessions_are_shared_between_controllers(store: Arc<dyn Store>, peer: Arc<dyn Store>) {
    let now = Utc::now();
    let admin = session(
        SessionPrincipal::Admin {
            fingerprint: "f1".into(),
        },
        now,
    );
    store
        .create_session("h-shared", admin.clone())
        .await
        .unwrap();
    assert_eq!(
        peer.get_session("h-shared", now).await.unwrap(),
        Some(admin),
        "a session opened on one controller is found by the other"
    );
    peer.delete_session("h-shared").await.unwrap();
    assert_eq!(
        store.get_session("h-shared", now).await.unwrap(),
        None,
        "a sign-out on one controller ends the session on the other"
    );
}

pub async fn idempotency_keys_name_the_job_they_created(store: Arc<dyn Store>) {
    let key = "idempotency:local/demo:deploy-42";
    let request = format!("{key}#0123abcd");
    let key_job = |key: String| {
        let store = Arc::clone(&store);
        async move { store.key_job(&key).await.expect("key_job answered") }
    };
    assert_eq!(key_job(key.into()).await, None, "an unknown key");
    let job = store
        .create_job_once(
            key,
            &[request.clone(), key.to_owned()],
            new_job("deploy"),
            Utc::now(),
        )
        .await
        .expect("created")
        .expect("the first request with the key");
    assert_eq!(key_job(key.into()).await, Some(job.id));
    assert_eq!(key_job(request.clone()).await, Some(job.id));
    assert_eq!(
        key_job(format!("{key}#ffffffff")).await,
        None,
        "another request with the key"
    );
    assert_eq!(
        key_job("idempotency:local/demo:deploy-4".into()).await,
        None
    );

    // Records of recent keys outlive maintenance.
    let retention = Retention {
        max_age: std::time::Duration::from_secs(3600),
        max_jobs_per_repo: 1000,
    };
    store.prune(&retention, Utc::now()).await.expect("pruned");
    assert_eq!(key_job(key.into()).await, Some(job.id));
    assert_eq!(key_job(request.clone()).await, Some(job.id));
    assert_eq!(
        store
            .create_job_once(key, &[], new_job("deploy"), Utc::now())
            .await
            .expect("answered"),
        None,
        "a repeat after maintenance"
    );
}

pub async fn a_key_and_its_job_are_written_together_once(store: Arc<dyn Store>) {
    let mut events = store.subscribe();
    let key = "delivery-72d4";
    let names = vec![format!("{key}#request"), key.to_owned()];
    let job = store
        .create_job_once(key, &names, new_job("test"), Utc::now())
        .await
        .expect("created")
        .expect("a new key creates its job");
    expect_event(&mut events, StoreEvent::JobQueued { job: job.id }).await;
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(store.get_job(job.id).await.expect("job"), Some(job.clone()));
    for name in &names {
        assert_eq!(store.key_job(name).await.expect("key_job"), Some(job.id));
    }
    // The second time: nothing is written.
    let repeat = store
        .create_job_once(key, &[format!("{key}#other")], new_job("test"), Utc::now())
        .await
        .expect("answered");
    assert_eq!(repeat, None, "a key seen before creates nothing");
    assert_eq!(
        store
            .key_job(&format!("{key}#other"))
            .await
            .expect("key_job"),
        None,
        "a refused creation records no name"
    );
    let all = store
        .list_jobs(&JobFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("jobs");
    assert_eq!(ids(&all), vec![job.id], "one job for the key");

    // Keys and plain creations share one id sequence, oldest first.
    let plain = store
        .create_job(new_job("test"), Utc::now())
        .await
        .expect("job");
    let other = store
        .create_job_once("delivery-2", &[], new_job("test"), Utc::now())
        .await
        .expect("created")
        .expect("another key is new");
    assert!(job.id < plain.id && plain.id < other.id);
    assert_eq!(
        store.key_job("delivery-2").await.expect("key_job"),
        None,
        "no names, no records"
    );
}

pub async fn concurrent_creations_with_one_key_make_one_job(store: Arc<dyn Store>) {
    const CREATORS: usize = 16;
    let mut creators = tokio::task::JoinSet::new();
    for n in 0..CREATORS {
        let store = Arc::clone(&store);
        creators.spawn(async move {
            // Every key twice, and plain creations among them.
            let key = format!("delivery-{}", n / 2);
            let once = store
                .create_job_once(
                    &key,
                    std::slice::from_ref(&key),
                    new_job("test"),
                    Utc::now(),
                )
                .await
                .expect("answered");
            let plain = store
                .create_job(new_job("test"), Utc::now())
                .await
                .expect("created");
            (key, once, plain)
        });
    }
    let mut created: BTreeMap<String, Vec<Job>> = BTreeMap::new();
    let mut ids_seen = std::collections::BTreeSet::new();
    while let Some(done) = creators.join_next().await {
        let (key, once, plain) = done.expect("no panic");
        assert!(ids_seen.insert(plain.id), "ids are unique");
        let jobs = created.entry(key).or_default();
        if let Some(job) = once {
            assert!(ids_seen.insert(job.id), "ids are unique");
            jobs.push(job);
        }
    }
    assert_eq!(created.len(), CREATORS / 2);
    for (key, jobs) in &created {
        assert_eq!(jobs.len(), 1, "{key}: exactly one creation won");
        assert_eq!(
            store.key_job(key).await.expect("key_job"),
            Some(jobs[0].id),
            "{key} names the job that was created"
        );
    }
    let all = store
        .list_jobs(&JobFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("jobs");
    assert_eq!(
        all.len(),
        CREATORS + CREATORS / 2,
        "no job without its answer"
    );
    assert_eq!(
        all.iter()
            .map(|job| job.id)
            .collect::<std::collections::BTreeSet<_>>(),
        ids_seen,
        "every job stored is one a caller was told about"
    );
}

pub async fn agents_are_found_by_id_and_seen(store: Arc<dyn Store>) {
    assert_eq!(
        store
            .get_agent(&AgentId::generate())
            .await
            .expect("get_agent"),
        None,
        "an unknown id"
    );
    let builder = store
        .register_agent(agent("builder"))
        .await
        .expect("builder");
    let tester = store.register_agent(agent("tester")).await.expect("tester");
    assert_eq!(
        store.get_agent(&builder.id).await.expect("get_agent"),
        Some(builder.clone())
    );
    assert_eq!(
        store.get_agent(&tester.id).await.expect("get_agent"),
        Some(tester.clone())
    );

    let later = builder.last_seen + Duration::minutes(5);
    store
        .touch_agent(&builder.id, later, "https://ci-a.example")
        .await
        .expect("touched");
    let seen = AgentRecord {
        last_seen: later,
        controller: Some("https://ci-a.example".into()),
        ..builder.clone()
    };
    assert_eq!(
        store.get_agent(&builder.id).await.expect("get_agent"),
        Some(seen.clone()),
        "last_seen and the controller moved, nothing else"
    );
    assert_eq!(
        store.get_agent(&tester.id).await.expect("get_agent"),
        Some(tester.clone()),
        "the other agent is untouched"
    );
    let mut listed = store.list_agents().await.expect("agents");
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(listed, vec![seen, tester]);

    assert!(matches!(
        store
            .touch_agent(&AgentId::generate(), later, "https://ci-a.example")
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store.list_agents().await.expect("agents").len(),
        2,
        "touching an unknown agent registers nothing"
    );

    // Registering again (an agent restart) keeps the id and the first
    // registration time.
    let mut restarted = agent("builder");
    restarted.version = "next".into();
    restarted.registered_at = builder.registered_at + Duration::hours(1);
    let restarted = store.register_agent(restarted).await.expect("again");
    assert_eq!(restarted.id, builder.id);
    assert_eq!(restarted.registered_at, builder.registered_at);
    assert_eq!(restarted.version, "next");
    assert_eq!(
        store.get_agent(&builder.id).await.expect("get_agent"),
        Some(restarted)
    );
}

pub async fn agent_tokens_are_listed_found_and_revoked(store: Arc<dyn Store>) {
    assert!(store.list_agent_tokens().await.expect("tokens").is_empty());
    let first = agent_token("t1", "first-secret");
    let mut second = agent_token("t2", "second-secret");
    second.labels.insert("pool".into(), "deploy".into());
    store.create_agent_token(first.clone()).await.expect("t1");
    store.create_agent_token(second.clone()).await.expect("t2");
    let listed = |store: Arc<dyn Store>| async move {
        let mut tokens = store.list_agent_tokens().await.expect("tokens");
        tokens.sort_by(|a, b| a.id.cmp(&b.id));
        tokens
    };
    assert_eq!(
        listed(Arc::clone(&store)).await,
        vec![first.clone(), second.clone()]
    );
    let find = |secret: &'static str| {
        let store = Arc::clone(&store);
        async move {
            store
                .find_agent_token(&hobotnica_common::token::hash_token(secret))
                .await
                .expect("find answered")
        }
    };
    assert_eq!(find("first-secret").await, Some(first.clone()));
    assert_eq!(find("second-secret").await, Some(second.clone()));
    assert_eq!(find("third-secret").await, None, "an unknown token");

    let register = |name: &'static str, token_id: &'static str| {
        let store = Arc::clone(&store);
        async move {
            let mut record = agent(name);
            record.token_id = token_id.into();
            store.register_agent(record).await.expect("registered")
        }
    };
    let a = register("a", "t1").await;
    let b = register("b", "t1").await;
    let c = register("c", "t2").await;

    let mut events = store.subscribe();
    store.delete_agent_token("t1").await.expect("revoked");
    expect_event(
        &mut events,
        StoreEvent::AgentTokenRevoked {
            token_id: "t1".into(),
        },
    )
    .await;
    assert_eq!(listed(Arc::clone(&store)).await, vec![second.clone()]);
    assert_eq!(find("first-secret").await, None);
    assert_eq!(find("second-secret").await, Some(second.clone()));
    // Its agents are forgotten; the other token's stay.
    assert_eq!(store.get_agent(&a.id).await.expect("get_agent"), None);
    assert_eq!(store.get_agent(&b.id).await.expect("get_agent"), None);
    assert_eq!(
        store.get_agent(&c.id).await.expect("get_agent"),
        Some(c.clone())
    );
    assert_eq!(store.list_agents().await.expect("agents"), vec![c]);
    // Their names are free: another token's agent takes one, as a new agent.
    let taken = register("a", "t2").await;
    assert_ne!(taken.id, a.id);

    for gone in ["t1", "t9"] {
        assert!(
            matches!(
                store.delete_agent_token(gone).await,
                Err(StoreError::NotFound(_))
            ),
            "{gone}"
        );
    }
    assert_eq!(listed(Arc::clone(&store)).await, vec![second]);
}

pub async fn every_change_is_published(store: Arc<dyn Store>) {
    let mut events = store.subscribe();
    let worker = store.register_agent(agent("a1")).await.expect("agent");
    let job = store
        .create_job(new_job("test"), Utc::now())
        .await
        .expect("job");
    expect_event(&mut events, StoreEvent::JobQueued { job: job.id }).await;
    let now = Utc::now();
    store
        .claim_job(&worker, now, now + Duration::seconds(30))
        .await
        .expect("claim")
        .expect("claimed");
    expect_event(&mut events, StoreEvent::JobStarted { job: job.id }).await;
    store
        .append_log(job.id, 1, 0, Bytes::from_static(b"hello"))
        .await
        .expect("appended");
    expect_event(
        &mut events,
        StoreEvent::LogAppended {
            job: job.id,
            len: 5,
        },
    )
    .await;
    let len = store
        .append_controller_line(job.id, "note")
        .await
        .expect("line");
    assert_eq!(len, 5 + "[hobotnica] note\n".len() as u64);
    expect_event(&mut events, StoreEvent::LogAppended { job: job.id, len }).await;
    store
        .finish_job(job.id, 1, finish(Outcome::Succeeded, Some(0)), Utc::now())
        .await
        .expect("finished");
    expect_event(&mut events, StoreEvent::JobFinished { job: job.id }).await;

    // A queued job cancelled has finished too.
    let queued = store
        .create_job(new_job("test"), Utc::now())
        .await
        .expect("job");
    store
        .request_cancel(queued.id, Utc::now())
        .await
        .expect("cancelled");
    expect_event(&mut events, StoreEvent::JobFinished { job: queued.id }).await;

    // So has a job whose agent stopped renewing its lease.
    let lost = store
        .create_job(new_job("test"), Utc::now())
        .await
        .expect("job");
    let now = Utc::now();
    let claimed = store
        .claim_job(&worker, now, now + Duration::seconds(1))
        .await
        .expect("claim")
        .expect("claimed");
    assert_eq!(claimed.id, lost.id);
    let expired = store
        .expire_leases(now + Duration::seconds(10))
        .await
        .expect("expired");
    assert_eq!(ids(&expired), vec![lost.id]);
    expect_event(&mut events, StoreEvent::JobFinished { job: lost.id }).await;
}

pub async fn job_lists_filter_by_repository_state_and_agent(store: Arc<dyn Store>) {
    let create = |repo: &'static str, target: &'static str| {
        let store = Arc::clone(&store);
        async move {
            store
                .create_job(job_of(repo, target), Utc::now())
                .await
                .expect("job")
                .id
        }
    };
    let j1 = create("local/demo", "test").await;
    let j2 = create("local/demo", "test").await;
    let j3 = create("local/demo", "deploy").await;
    let j4 = create("local/other", "test").await;
    let j5 = create("local/other", "test").await;
    let a1 = store.register_agent(agent("a1")).await.expect("a1");
    let a2 = store.register_agent(agent("a2")).await.expect("a2");
    let lease = Utc::now() + Duration::seconds(30);
    for (worker, expected) in [(&a1, j1), (&a2, j2)] {
        let claimed = store
            .claim_job(worker, Utc::now(), lease)
            .await
            .expect("claim")
            .expect("claimed");
        assert_eq!(claimed.id, expected);
    }
    store
        .finish_job(j1, 1, finish(Outcome::Succeeded, Some(0)), Utc::now())
        .await
        .expect("finished");

    let list = |filter: JobFilter| {
        let store = Arc::clone(&store);
        async move { ids(&store.list_jobs(&filter).await.expect("jobs")) }
    };
    let limit = 100;
    let queued = Some(JobState::Queued);
    let running = Some(JobState::Running);
    assert_eq!(
        list(JobFilter {
            state: queued,
            limit,
            ..Default::default()
        })
        .await,
        vec![j5, j4, j3]
    );
    assert_eq!(
        list(JobFilter {
            state: queued,
            limit: 2,
            ..Default::default()
        })
        .await,
        vec![j5, j4],
        "the newest first, up to the limit"
    );
    assert_eq!(
        list(JobFilter {
            state: queued,
            before: Some(j5),
            limit,
            ..Default::default()
        })
        .await,
        vec![j4, j3]
    );
    assert_eq!(
        list(JobFilter {
            state: queued,
            repo: Some(RepoRef::new("local", "demo")),
            limit,
            ..Default::default()
        })
        .await,
        vec![j3]
    );
    assert_eq!(
        list(JobFilter {
            state: running,
            limit,
            ..Default::default()
        })
        .await,
        vec![j2]
    );
    assert_eq!(
        list(JobFilter {
            state: running,
            agent: Some(a1.id.clone()),
            limit,
            ..Default::default()
        })
        .await,
        Vec::<JobId>::new()
    );
    assert_eq!(
        list(JobFilter {
            state: Some(JobState::Succeeded),
            limit,
            ..Default::default()
        })
        .await,
        vec![j1]
    );
    assert_eq!(
        list(JobFilter {
            agent: Some(a1.id.clone()),
            limit,
            ..Default::default()
        })
        .await,
        vec![j1]
    );
    assert_eq!(
        list(JobFilter {
            agent: Some(a2.id.clone()),
            limit,
            ..Default::default()
        })
        .await,
        vec![j2]
    );
    assert_eq!(
        list(JobFilter {
            repo: Some(RepoRef::new("local", "other")),
            limit,
            ..Default::default()
        })
        .await,
        vec![j5, j4]
    );
    assert_eq!(
        list(JobFilter {
            repo: Some(RepoRef::new("local", "other")),
            limit: 1,
            ..Default::default()
        })
        .await,
        vec![j5]
    );
    assert_eq!(
        list(JobFilter {
            repo: Some(RepoRef::new("local", "demo")),
            kind: Some(JobKind::Deploy),
            limit,
            ..Default::default()
        })
        .await,
        vec![j3]
    );
    assert_eq!(
        list(JobFilter {
            repo: Some(RepoRef::new("local", "nothing")),
            limit,
            ..Default::default()
        })
        .await,
        Vec::<JobId>::new()
    );
}

pub async fn leases_are_extended_never_shortened(store: Arc<dyn Store>) {
    let worker = store.register_agent(agent("a1")).await.expect("agent");
    let now = Utc::now();
    let finished = run_job(&store, &worker, new_job("test"), now).await;
    let claim = |lease_until: DateTime<Utc>| {
        let store = Arc::clone(&store);
        let worker = worker.clone();
        async move {
            let job = store
                .create_job(new_job("test"), Utc::now())
                .await
                .expect("job");
            let claimed = store
                .claim_job(&worker, Utc::now(), lease_until)
                .await
                .expect("claim")
                .expect("claimed");
            assert_eq!(claimed.id, job.id);
            claimed
        }
    };
    let short = claim(now + Duration::seconds(1)).await;
    let long = claim(now + Duration::seconds(100)).await;
    let queued = store
        .create_job(new_job("test"), Utc::now())
        .await
        .expect("job");

    store
        .extend_leases(now + Duration::seconds(30))
        .await
        .expect("extended");
    let get = |id: JobId| {
        let store = Arc::clone(&store);
        async move { store.get_job(id).await.expect("get").expect("exists") }
    };
    let short_now = get(short.id).await;
    assert_eq!(short_now.state, JobState::Running);
    assert_eq!(
        short_now.lease_expires_at,
        Some(now + Duration::seconds(30)),
        "a shorter lease is extended"
    );
    assert_eq!(
        get(long.id).await.lease_expires_at,
        Some(now + Duration::seconds(100)),
        "a longer lease is not shortened"
    );
    let queued_now = get(queued.id).await;
    assert_eq!(queued_now.state, JobState::Queued);
    assert_eq!(queued_now.lease_expires_at, None, "a queued job gets none");
    assert_eq!(
        get(finished.id).await,
        finished,
        "a finished job is left alone"
    );

    // Only leases that ended expire, and a lost job is not lost again.
    let lost = store
        .expire_leases(now + Duration::seconds(60))
        .await
        .expect("expired");
    assert_eq!(ids(&lost), vec![short.id]);
    assert!(
        store
            .expire_leases(now + Duration::seconds(60))
            .await
            .expect("expired")
            .is_empty()
    );
    let lost = store
        .expire_leases(now + Duration::seconds(200))
        .await
        .expect("expired");
    assert_eq!(ids(&lost), vec![long.id]);
    assert_eq!(get(queued.id).await.state, JobState::Queued);
    assert_eq!(get(finished.id).await.state, JobState::Succeeded);
}

pub async fn controller_lines_are_appended_in_any_state(store: Arc<dyn Store>) {
    let line = |text: &str| format!("[hobotnica] {text}\n");
    let job = store
        .create_job(new_job("test"), Utc::now())
        .await
        .expect("job");
    let mut expected = line("queued by the API");
    assert_eq!(
        store
            .append_controller_line(job.id, "queued by the API")
            .await
            .expect("line"),
        expected.len() as u64,
        "the committed length"
    );
    assert_eq!(
        store.log_len(job.id).await.expect("len"),
        expected.len() as u64
    );

    let worker = store.register_agent(agent("a1")).await.expect("agent");
    let now = Utc::now();
    store
        .claim_job(&worker, now, now + Duration::seconds(30))
        .await
        .expect("claim")
        .expect("claimed");
    let committed = store.log_len(job.id).await.expect("len");
    store
        .append_log(job.id, 1, committed, Bytes::from_static(b"output\n"))
        .await
        .expect("output");
    expected.push_str("output\n");
    expected.push_str(&line("running"));
    assert_eq!(
        store
            .append_controller_line(job.id, "running")
            .await
            .expect("line"),
        expected.len() as u64
    );
    store
        .finish_job(job.id, 1, finish(Outcome::Failed, Some(2)), Utc::now())
        .await
        .expect("finished");
    expected.push_str(&line("finished"));
    assert_eq!(
        store
            .append_controller_line(job.id, "finished")
            .await
            .expect("line"),
        expected.len() as u64
    );
    assert_eq!(
        store.read_log(job.id, 0, 1000).await.expect("read"),
        Bytes::from(expected.clone())
    );
    assert_eq!(
        store.log_len(job.id).await.expect("len"),
        expected.len() as u64
    );

    let cancelled = store
        .create_job(new_job("test"), Utc::now())
        .await
        .expect("job");
    store
        .request_cancel(cancelled.id, Utc::now())
        .await
        .expect("cancelled");
    let only = line("cancelled before it started");
    assert_eq!(
        store
            .append_controller_line(cancelled.id, "cancelled before it started")
            .await
            .expect("line"),
        only.len() as u64
    );
    assert_eq!(
        store.read_log(cancelled.id, 0, 1000).await.expect("read"),
        Bytes::from(only)
    );
    assert_eq!(
        store.read_log(job.id, 0, 1000).await.expect("read"),
        Bytes::from(expected),
        "logs are per job"
    );
}

pub async fn unknown_jobs_are_not_found(store: Arc<dyn Store>) {
    let nobody = JobId(4242);
    assert_eq!(store.get_job(nobody).await.expect("get"), None);
    let lease = Utc::now() + Duration::seconds(30);
    assert!(matches!(
        store.renew_lease(nobody, 1, lease).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.request_cancel(nobody, Utc::now()).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .finish_job(nobody, 1, finish(Outcome::Succeeded, Some(0)), Utc::now())
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .append_log(nobody, 1, 0, Bytes::from_static(b"x"))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.log_len(nobody).await.expect("len"), 0);
    assert!(
        store
            .read_log(nobody, 0, 10)
            .await
            .expect("read")
            .is_empty()
    );
    assert!(
        store
            .list_jobs(&JobFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .expect("jobs")
            .is_empty()
    );
}

pub async fn archiving_leaves_unfinished_logs_alone(store: Arc<dyn Store>) {
    let worker = store.register_agent(agent("a1")).await.expect("agent");
    let t0 = Utc::now();
    let old = run_job(&store, &worker, new_job("test"), t0 - Duration::hours(1)).await;
    let recent = run_job(&store, &worker, new_job("test"), t0).await;
    let running = store
        .create_job(new_job("test"), Utc::now())
        .await
        .expect("job");
    store
        .claim_job(&worker, t0, t0 + Duration::seconds(30))
        .await
        .expect("claim")
        .expect("claimed");
    store
        .append_log(running.id, 1, 0, Bytes::from_static(b"still "))
        .await
        .expect("appended");
    let read_all = |id: JobId| {
        let store = Arc::clone(&store);
        async move { store.read_log(id, 0, 1000).await.expect("read") }
    };

    let archived = store
        .archive_logs(t0 - Duration::minutes(30))
        .await
        .expect("archived");
    assert!(archived <= 1, "only the job finished before: {archived}");
    assert_eq!(
        store
            .archive_logs(t0 - Duration::minutes(30))
            .await
            .expect("archived"),
        0,
        "a log is archived once"
    );
    for id in [old.id, recent.id] {
        assert_eq!(read_all(id).await, Bytes::from_static(b"output\n"));
        assert_eq!(store.log_len(id).await.expect("len"), 7);
    }
    assert_eq!(
        store
            .append_log(running.id, 1, 6, Bytes::from_static(b"running\n"))
            .await
            .expect("appended"),
        14
    );

    let archived = store
        .archive_logs(t0 + Duration::minutes(1))
        .await
        .expect("archived");
    assert!(
        archived <= 1,
        "a running job's log is not archived: {archived}"
    );
    assert_eq!(
        store
            .archive_logs(t0 + Duration::minutes(1))
            .await
            .expect("archived"),
        0
    );
    for id in [old.id, recent.id] {
        assert_eq!(read_all(id).await, Bytes::from_static(b"output\n"));
    }
    assert_eq!(
        read_all(running.id).await,
        Bytes::from_static(b"still running\n")
    );
    assert_eq!(
        store
            .append_log(running.id, 1, 14, Bytes::from_static(b"more\n"))
            .await
            .expect("appended"),
        19,
        "the running job's log still grows"
    );
    assert_eq!(
        store.read_log(running.id, 6, 1000).await.expect("read"),
        Bytes::from_static(b"running\nmore\n")
    );
}

pub async fn retention_counts_per_repository_and_keeps_queued_jobs(store: Arc<dyn Store>) {
    let worker = store.register_agent(agent("a1")).await.expect("agent");
    let t0 = Utc::now();
    // local/other: a queued job no agent here may take, then three finished
    // ones, the first long ago.
    let mut gpu = job_of("local/other", "test");
    gpu.trusted_labels.insert("gpu".into(), "yes".into());
    let waiting = store.create_job(gpu, Utc::now()).await.expect("job");
    let b1 = run_job(
        &store,
        &worker,
        job_of("local/other", "test"),
        t0 - Duration::days(10),
    )
    .await;
    let b2 = run_job(&store, &worker, job_of("local/other", "test"), t0).await;
    let b3 = run_job(&store, &worker, job_of("local/other", "test"), t0).await;
    // local/demo: three finished jobs and a queued one.
    let a1 = run_job(&store, &worker, new_job("test"), t0).await;
    let a2 = run_job(&store, &worker, new_job("test"), t0).await;
    let a3 = run_job(&store, &worker, new_job("test"), t0).await;
    let queued = store
        .create_job(new_job("test"), Utc::now())
        .await
        .expect("job");

    let policy = Retention {
        max_age: std::time::Duration::from_secs(24 * 3600),
        max_jobs_per_repo: 3,
    };
    // local/demo: its oldest is beyond the count. local/other: b1 is too
    // old; the queued job beyond the count stays.
    assert_eq!(
        store
            .prune(&policy, t0 + Duration::minutes(1))
            .await
            .expect("pruned"),
        2
    );
    for gone in [a1.id, b1.id] {
        assert_eq!(store.get_job(gone).await.expect("get"), None, "job {gone}");
        assert_eq!(store.log_len(gone).await.expect("len"), 0, "log of {gone}");
        assert!(store.read_log(gone, 0, 100).await.expect("read").is_empty());
    }
    let all = JobFilter {
        limit: 100,
        ..Default::default()
    };
    assert_eq!(
        ids(&store.list_jobs(&all).await.expect("jobs")),
        vec![queued.id, a3.id, a2.id, b3.id, b2.id, waiting.id]
    );
    assert_eq!(
        store
            .prune(&policy, t0 + Duration::minutes(1))
            .await
            .expect("pruned"),
        0,
        "nothing more to delete"
    );
    assert_eq!(
        store.read_log(a2.id, 0, 100).await.expect("read"),
        Bytes::from_static(b"output\n"),
        "kept jobs keep their logs"
    );

    // Two days later every finished job is too old; queued ones stay.
    assert_eq!(
        store
            .prune(&policy, t0 + Duration::days(2))
            .await
            .expect("pruned"),
        4
    );
    assert_eq!(
        ids(&store.list_jobs(&all).await.expect("jobs")),
        vec![queued.id, waiting.id]
    );
}

pub async fn announcements_and_changes_reach_every_controller(
    store: Arc<dyn Store>,
    peer: Arc<dyn Store>,
) {
    let mut mine = store.subscribe();
    let mut mine_too = store.subscribe();
    let mut theirs = peer.subscribe();
    let gone = StoreEvent::RepoDisabled {
        git_url: "file:///srv/gone.git".into(),
    };
    store.announce(gone.clone()).await;
    for events in [&mut mine, &mut mine_too, &mut theirs] {
        expect_event(events, gone.clone()).await;
    }
    let back = StoreEvent::RepoDisabled {
        git_url: "file:///srv/back.git".into(),
    };
    peer.announce(back.clone()).await;
    expect_event(&mut mine, back.clone()).await;
    expect_event(&mut theirs, back).await;

    // What one controller changes reaches the others' subscribers too.
    let job = store
        .create_job(new_job("test"), Utc::now())
        .await
        .expect("job");
    expect_event(&mut theirs, StoreEvent::JobQueued { job: job.id }).await;
    let worker = peer.register_agent(agent("a1")).await.expect("agent");
    let now = Utc::now();
    peer.claim_job(&worker, now, now + Duration::seconds(30))
        .await
        .expect("claim")
        .expect("claimed");
    peer.request_cancel(job.id, Utc::now())
        .await
        .expect("cancel requested");
    expect_event(
        &mut mine,
        StoreEvent::CancelRequested {
            job: job.id,
            attempt: 1,
            agent: worker.id.clone(),
        },
    )
    .await;
    store
        .finish_job(job.id, 1, finish(Outcome::Cancelled, None), Utc::now())
        .await
        .expect("finished");
    expect_event(&mut theirs, StoreEvent::JobFinished { job: job.id }).await;
}

pub async fn controllers_sharing_a_store_see_each_others_changes(
    store: Arc<dyn Store>,
    peer: Arc<dyn Store>,
) {
    let alpha = github_repo("alpha", "hook-alpha");
    store.create_repo(alpha.clone()).await.expect("repo");
    assert_eq!(
        peer.get_repo("local", "alpha").await.expect("get"),
        Some(alpha.clone())
    );
    assert_eq!(
        peer.find_repo_by_hook("hook-alpha").await.expect("find"),
        Some(alpha.clone())
    );
    assert!(matches!(
        peer.create_repo(alpha).await,
        Err(StoreError::Conflict(_))
    ));

    let worker = peer.register_agent(agent("a1")).await.expect("agent");
    assert_eq!(
        store.get_agent(&worker.id).await.expect("get"),
        Some(worker.clone())
    );
    let job = store
        .create_job(new_job("test"), Utc::now())
        .await
        .expect("job");
    let lease = Utc::now() + Duration::seconds(30);
    let claimed = peer
        .claim_job(&worker, Utc::now(), lease)
        .await
        .expect("claim")
        .expect("claimed");
    assert_eq!(claimed.id, job.id);
    assert!(
        store
            .claim_job(&worker, Utc::now(), lease)
            .await
            .expect("claim")
            .is_none(),
        "claimed once across controllers"
    );
    peer.append_log(job.id, 1, 0, Bytes::from_static(b"hello"))
        .await
        .expect("appended");
    assert_eq!(
        store.read_log(job.id, 0, 100).await.expect("read"),
        Bytes::from_static(b"hello")
    );
    store
        .finish_job(job.id, 1, finish(Outcome::Succeeded, Some(0)), Utc::now())
        .await
        .expect("finished");
    assert_eq!(
        peer.get_job(job.id).await.expect("get").expect("job").state,
        JobState::Succeeded
    );

    let keyed = store
        .create_job_once(
            "d-1",
            &["idempotency:local/alpha:k".to_owned()],
            new_job("test"),
            Utc::now(),
        )
        .await
        .expect("created")
        .expect("a new key");
    assert_eq!(
        peer.create_job_once("d-1", &[], new_job("test"), Utc::now())
            .await
            .expect("answered"),
        None,
        "a redelivery to another controller"
    );
    assert_eq!(
        peer.key_job("idempotency:local/alpha:k")
            .await
            .expect("key_job"),
        Some(keyed.id)
    );

    let token = agent_token("t1", "secret");
    store
        .create_agent_token(token.clone())
        .await
        .expect("token");
    assert_eq!(
        peer.find_agent_token(&token.token_hash)
            .await
            .expect("find"),
        Some(token.clone())
    );
    peer.delete_agent_token("t1").await.expect("revoked");
    assert_eq!(
        store
            .find_agent_token(&token.token_hash)
            .await
            .expect("find"),
        None
    );
}

fn notification(id: &str, job: &Job, due_at: DateTime<Utc>) -> super::NotificationDelivery {
    super::NotificationDelivery {
        id: id.into(),
        repo: job.repo.clone(),
        target: "ops".into(),
        job: job.clone(),
        attempt: 0,
        due_at,
        created_at: Utc::now(),
    }
}

pub async fn notifications_are_claimed_when_due_in_order_and_fenced(store: Arc<dyn Store>) {
    let job = store
        .create_job(new_job("deploy"), Utc::now())
        .await
        .unwrap();
    let now = Utc::now();
    let lease = now + Duration::seconds(60);
    assert_eq!(store.claim_notification(now, lease).await.unwrap(), None);
    store
        .queue_notifications(vec![
            notification("second", &job, now - Duration::seconds(1)),
            notification("first", &job, now - Duration::seconds(2)),
            notification("later", &job, now + Duration::seconds(30)),
        ])
        .await
        .unwrap();
    let first = store.claim_notification(now, lease).await.unwrap().unwrap();
    assert_eq!((first.id.as_str(), first.attempt), ("first", 1));
    assert_eq!(first.job, job, "the job travels with its delivery");
    assert_eq!(first.target, "ops");
    let second = store.claim_notification(now, lease).await.unwrap().unwrap();
    assert_eq!((second.id.as_str(), second.attempt), ("second", 1));
    // Claimed ones are under their lease; the third is not due yet.
    assert_eq!(store.claim_notification(now, lease).await.unwrap(), None);

    // A stale attempt changes nothing.
    assert!(!store.retry_notification("first", 2, now).await.unwrap());
    assert!(!store.finish_notification("first", 0).await.unwrap());
    assert!(store.retry_notification("first", 1, now).await.unwrap());
    let again = store.claim_notification(now, lease).await.unwrap().unwrap();
    assert_eq!((again.id.as_str(), again.attempt), ("first", 2));
    assert!(!store.finish_notification("first", 1).await.unwrap());
    assert!(store.finish_notification("first", 2).await.unwrap());
    assert!(
        !store.finish_notification("first", 2).await.unwrap(),
        "gone"
    );
    assert!(!store.retry_notification("missing", 1, now).await.unwrap());

    // Past the lease the unfinished one is claimed again, before the later
    // one (due first).
    let after = lease + Duration::seconds(1);
    let retaken = store
        .claim_notification(after, after + Duration::seconds(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((retaken.id.as_str(), retaken.attempt), ("later", 1));
    let retaken = store
        .claim_notification(after, after + Duration::seconds(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((retaken.id.as_str(), retaken.attempt), ("second", 2));
    assert!(store.finish_notification("second", 2).await.unwrap());
    assert!(store.finish_notification("later", 1).await.unwrap());
    assert_eq!(
        store
            .claim_notification(after + Duration::days(1), after + Duration::days(2))
            .await
            .unwrap(),
        None
    );
}

pub async fn controllers_claim_each_notification_once(store: Arc<dyn Store>, peer: Arc<dyn Store>) {
    const DELIVERIES: usize = 40;
    let job = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let now = Utc::now();
    store
        .queue_notifications(
            (0..DELIVERIES)
                .map(|n| notification(&format!("d-{n}"), &job, now))
                .collect(),
        )
        .await
        .unwrap();
    let mut claimers = tokio::task::JoinSet::new();
    for store in [Arc::clone(&store), peer, Arc::clone(&store), store] {
        claimers.spawn(async move {
            let mut taken = Vec::new();
            loop {
                let now = Utc::now();
                match store
                    .claim_notification(now, now + Duration::seconds(60))
                    .await
                    .unwrap()
                {
                    Some(delivery) => taken.push(delivery.id),
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
    assert_eq!(before, all.len(), "a delivery was claimed twice");
    assert_eq!(all.len(), DELIVERIES, "every delivery was claimed");
}

/// A store holding one of everything: repositories (one with a sealed
/// variable, one on GitHub), jobs in every state (a running deploy holding
/// its repository's deploy lock, a queued deploy waiting for it), logs live
/// and archived with bytes that are not UTF-8 and one longer than a
/// snapshot's log piece, agents, tokens, keys and their names, a session
/// and notifications (one claimed, one due).
pub async fn fill_with_everything(store: &Arc<dyn Store>) {
    use hobotnica_common::job::{EnvScope, EnvValue, EnvVar};
    let mut demo = repo("demo");
    demo.env.push(EnvVar {
        key: "TOKEN".into(),
        scope: EnvScope::All,
        value: EnvValue::Sealed("sealed-value".into()),
    });
    store.create_repo(demo).await.unwrap();
    store
        .create_repo(github_repo("hooked", "hook-1"))
        .await
        .unwrap();
    let worker = agent("worker");
    let worker = store.register_agent(worker).await.unwrap();
    store
        .create_agent_token(agent_token("tok-1", "secret-1"))
        .await
        .unwrap();

    // Finished, with an archived log (on Redis) that is not UTF-8.
    let done = run_job(store, &worker, new_job("test"), Utc::now()).await;
    store
        .append_controller_line(done.id, "finished \u{2713}")
        .await
        .unwrap();
    // Failed, with a log longer than one snapshot piece.
    let big = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    let now = Utc::now();
    store
        .claim_job(&worker, now, now + Duration::seconds(60))
        .await
        .unwrap()
        .unwrap();
    let long: Vec<u8> = (0..super::snapshot::LOG_PIECE + 4321)
        .map(|i| (i % 251) as u8)
        .collect();
    store
        .append_log(big.id, 1, 0, Bytes::from(long))
        .await
        .unwrap();
    store
        .finish_job(big.id, 1, finish(Outcome::Failed, Some(2)), Utc::now())
        .await
        .unwrap();
    store
        .archive_logs(Utc::now() + Duration::days(1))
        .await
        .unwrap();
    // Cancelled while queued.
    let cancelled = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    store
        .request_cancel(cancelled.id, Utc::now())
        .await
        .unwrap();
    // A deploy running (its log live, not UTF-8) and one queued behind it.
    let deploy = store
        .create_job(new_job("deploy"), Utc::now())
        .await
        .unwrap();
    let now = Utc::now();
    store
        .claim_job(&worker, now, now + Duration::seconds(600))
        .await
        .unwrap()
        .unwrap();
    store
        .append_log(deploy.id, 1, 0, Bytes::from_static(b"\xff\xfe deploying\n"))
        .await
        .unwrap();
    store
        .create_job(new_job("deploy"), Utc::now())
        .await
        .unwrap();
    // Queued once under a key, with names.
    store
        .create_job_once(
            "d-1",
            &["d-1".to_owned(), "d-1#f00d".to_owned()],
            job_of("local/hooked", "test"),
            Utc::now(),
        )
        .await
        .unwrap()
        .unwrap();
    store
        .create_session(
            "session-hash",
            session(
                SessionPrincipal::Admin {
                    fingerprint: "fp".into(),
                },
                Utc::now(),
            ),
        )
        .await
        .unwrap();
    let past = Utc::now() - Duration::seconds(10);
    store
        .queue_notifications(vec![
            notification("n-claimed", &done, past),
            notification("n-due", &done, past + Duration::seconds(1)),
        ])
        .await
        .unwrap();
    let claimed = store
        .claim_notification(Utc::now(), Utc::now() + Duration::seconds(600))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.id, "n-claimed");
}

/// Every record of `store`'s export, in order.
pub async fn export_all(store: &Arc<dyn Store>) -> Vec<super::snapshot::Record> {
    let (sink, mut records) = tokio::sync::mpsc::channel(8);
    let exporting = {
        let store = Arc::clone(store);
        tokio::spawn(async move { store.export(sink).await })
    };
    let mut all = Vec::new();
    while let Some(record) = records.recv().await {
        all.push(record);
    }
    exporting.await.unwrap().unwrap();
    all
}

/// Everything a store answers through the trait's reads, in a form to
/// compare (sets sorted).
async fn every_read(store: &Arc<dyn Store>, jobs: &[JobId]) -> Vec<String> {
    let mut out = Vec::new();
    let mut repos = store.list_repos().await.unwrap();
    repos.sort_by_key(Repo::full_name);
    out.push(format!("repos {repos:?}"));
    for repo in &repos {
        out.push(format!(
            "repo {:?}",
            store.get_repo(&repo.owner, &repo.name).await.unwrap()
        ));
    }
    out.push(format!(
        "hook {:?}",
        store.find_repo_by_hook("hook-1").await.unwrap()
    ));
    for filter in [
        JobFilter {
            limit: 100,
            ..JobFilter::default()
        },
        JobFilter {
            state: Some(JobState::Queued),
            limit: 100,
            ..JobFilter::default()
        },
        JobFilter {
            state: Some(JobState::Running),
            limit: 100,
            ..JobFilter::default()
        },
        JobFilter {
            repo: Some(RepoRef::new("local", "hooked")),
            limit: 100,
            ..JobFilter::default()
        },
    ] {
        out.push(format!(
            "jobs {:?}",
            store.list_jobs(&filter).await.unwrap()
        ));
    }
    for id in jobs {
        out.push(format!("job {:?}", store.get_job(*id).await.unwrap()));
        let len = store.log_len(*id).await.unwrap();
        let log = store.read_log(*id, 0, 1 << 20).await.unwrap();
        out.push(format!("log {id} {len} {log:?}"));
        out.push(format!(
            "log {id} from 7 {:?}",
            store.read_log(*id, 7, 100).await.unwrap()
        ));
    }
    out.push(format!("stats {:?}", store.queue_stats().await.unwrap()));
    let mut agents = store.list_agents().await.unwrap();
    agents.sort_by(|a, b| a.id.0.cmp(&b.id.0));
    out.push(format!("agents {agents:?}"));
    for agent in &agents {
        out.push(format!(
            "agent {:?}",
            store.get_agent(&agent.id).await.unwrap()
        ));
    }
    out.push(format!(
        "tokens {:?}",
        store.list_agent_tokens().await.unwrap()
    ));
    out.push(format!(
        "token {:?}",
        store
            .find_agent_token(&hobotnica_common::token::hash_token("secret-1"))
            .await
            .unwrap()
    ));
    for name in ["d-1", "d-1#f00d", "unknown"] {
        out.push(format!(
            "key {name} {:?}",
            store.key_job(name).await.unwrap()
        ));
    }
    out.push(format!(
        "session {:?}",
        store.get_session("session-hash", Utc::now()).await.unwrap()
    ));
    out
}

/// Exports a store holding everything, imports the records as they are
/// into an empty `target`, and checks the target answers every read as
/// the source does, claims what the source would claim, refuses what it
/// would refuse, and gives the next job the next id.
pub async fn an_import_answers_like_its_export(source: Arc<dyn Store>, target: Arc<dyn Store>) {
    fill_with_everything(&source).await;
    assert!(!source.is_empty().await.unwrap());
    assert!(target.is_empty().await.unwrap(), "the target starts empty");
    let records = export_all(&source).await;

    // The documented order: repositories, each job then its log, agents,
    // tokens, keys, names, sessions, notifications, the next id last.
    use super::snapshot::Record;
    let rank = |record: &Record| match record {
        Record::Repo { .. } => 0,
        Record::Job { .. } | Record::Log { .. } => 1,
        Record::Agent { .. } => 2,
        Record::AgentToken { .. } => 3,
        Record::Key { .. } => 4,
        Record::KeyJob { .. } => 5,
        Record::Session { .. } => 6,
        Record::Notification { .. } => 7,
        Record::NextJobId { .. } => 8,
        Record::ImportStarted | Record::ImportFinished => 9,
    };
    assert!(records.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])));
    assert!(matches!(records.last(), Some(Record::NextJobId { .. })));
    let jobs: Vec<JobId> = records
        .iter()
        .filter_map(|record| match record {
            Record::Job { job } => Some(job.id),
            _ => None,
        })
        .collect();
    assert_eq!(jobs.len(), 6, "every job is exported");
    assert!(records.iter().all(|record| match record {
        Record::Log { data, .. } => data.len() <= super::snapshot::LOG_PIECE,
        _ => true,
    }));

    for batch in records.chunks(5) {
        target.import(batch.to_vec()).await.unwrap();
    }
    assert!(!target.is_empty().await.unwrap());
    assert_eq!(
        every_read(&target, &jobs).await,
        every_read(&source, &jobs).await
    );

    // The same queued deploy waits behind the running one (the deploy
    // lock), the same test job is claimed next.
    let other = agent("other");
    let now = Utc::now();
    let claimed = |store: Arc<dyn Store>| {
        let other = other.clone();
        async move {
            store
                .claim_job(&other, now, now + Duration::seconds(30))
                .await
                .unwrap()
                .map(|job| job.id)
        }
    };
    assert_eq!(
        claimed(Arc::clone(&target)).await,
        claimed(Arc::clone(&source)).await
    );
    // Notifications: the claimed one is not due, the due one is, at the
    // same attempt.
    let notify = |store: Arc<dyn Store>| async move {
        store
            .claim_notification(Utc::now(), Utc::now() + Duration::seconds(600))
            .await
            .unwrap()
            .map(|delivery| (delivery.id, delivery.attempt))
    };
    assert_eq!(
        notify(Arc::clone(&target)).await,
        notify(Arc::clone(&source)).await
    );
    // The next job takes the next id; a key seen before is still seen.
    let next = |store: Arc<dyn Store>| async move {
        store
            .create_job(new_job("test"), Utc::now())
            .await
            .unwrap()
            .id
    };
    assert_eq!(
        next(Arc::clone(&target)).await,
        next(Arc::clone(&source)).await
    );
    assert!(
        target
            .create_job_once("d-1", &[], new_job("test"), Utc::now())
            .await
            .unwrap()
            .is_none()
    );
}

/// The import rules over a real pair of stores: a job running at export
/// comes in lost with a line saying why, a second import is refused, and
/// an import that did not finish is recognised.
pub async fn imports_follow_the_rules(source: Arc<dyn Store>, target: Arc<dyn Store>) {
    use super::snapshot::{SnapshotError, migrate};
    fill_with_everything(&source).await;
    let running = source
        .list_jobs(&JobFilter {
            state: Some(JobState::Running),
            limit: 10,
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(running.len(), 1);
    let running = &running[0];
    let before = source.log_len(running.id).await.unwrap();

    let done = migrate(source.as_ref(), target.as_ref(), |_| {})
        .await
        .unwrap();
    assert_eq!(done.jobs, 6);
    assert!(!target.import_unfinished().await.unwrap());
    let lost = target.get_job(running.id).await.unwrap().unwrap();
    assert_eq!(lost.state, JobState::Lost, "never running after an import");
    assert!(lost.finished_at.is_some());
    let log = target.read_log(running.id, 0, 1 << 20).await.unwrap();
    assert_eq!(
        &log[..usize::try_from(before).unwrap()],
        &source.read_log(running.id, 0, 1 << 20).await.unwrap()[..]
    );
    let line = String::from_utf8_lossy(&log[usize::try_from(before).unwrap()..]).into_owned();
    assert!(
        line.starts_with("[hobotnica] ") && line.contains("imported as lost"),
        "{line}"
    );
    assert_eq!(target.queue_stats().await.unwrap().running, 0);

    let again = migrate(source.as_ref(), target.as_ref(), |_| {}).await;
    assert!(
        matches!(again, Err(SnapshotError::TargetNotEmpty)),
        "{again:?}"
    );
    assert_eq!(
        again.unwrap_err().to_string(),
        "the target store is not empty: import only into a new store"
    );
}

/// Runs every conformance test against fresh stores: `$make` makes a store
/// (and what keeps it alive), `$make_pair` a store and its peer.
macro_rules! conformance_suite {
    ($make:expr, $make_pair:expr) => {
        conformance_suite!(@single $make;
            the_backend_answers_ping,
            repos_are_unique_and_removable,
            deleting_a_repository_keeps_its_jobs,
            repository_updates_are_compare_and_set,
            webhooks_find_their_repository,
            keys_are_remembered_through_maintenance,
            idempotency_keys_name_the_job_they_created,
            a_key_and_its_job_are_written_together_once,
            concurrent_creations_with_one_key_make_one_job,
            sessions_are_found_until_they_expire_or_are_deleted,
            jobs_are_claimed_once_in_order_and_fenced,
            queue_stats_count_queued_and_running_jobs,
            unknown_jobs_are_not_found,
            finished_jobs_keep_their_timings,
            leases_expire_into_lost,
            extending_leases_protects_running_jobs,
            leases_are_extended_never_shortened,
            cancel_depends_on_state,
            every_change_is_published,
            log_appends_are_idempotent,
            controller_lines_are_appended_in_any_state,
            agents_keep_their_id_by_name_and_tokens_revoke,
            agents_are_found_by_id_and_seen,
            agent_tokens_are_listed_found_and_revoked,
            an_agent_name_belongs_to_the_token_that_registered_it,
            deploys_go_only_to_agents_whose_token_vouches,
            job_lists_filter_and_page_newest_first,
            job_lists_filter_by_repository_state_and_agent,
            racing_claimers_take_each_job_exactly_once,
            logs_read_back_from_any_offset,
            archived_logs_read_the_same,
            archiving_leaves_unfinished_logs_alone,
            retention_deletes_only_old_finished_jobs,
            retention_counts_per_repository_and_keeps_queued_jobs,
            deploys_of_one_repository_run_one_at_a_time,
            notifications_are_claimed_when_due_in_order_and_fenced,
        );
        conformance_suite!(@pair $make_pair;
            announcements_and_changes_reach_every_controller,
            controllers_sharing_a_store_see_each_others_changes,
            sessions_are_shared_between_controllers,
            controllers_claim_each_notification_once,
        );
    };
    (@single $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard) = $make;
                super::$name(store).await;
            }
        )*
    };
    (@pair $make_pair:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, peer, _guard) = $make_pair;
                super::$name(store, peer).await;
            }
        )*
    };
}

/// For the suites of backends in modules of their own (`postgres`).
pub(crate) use conformance_suite;

mod embedded_suite {
    use super::super::embedded::EmbeddedStore;
    use std::sync::Arc;

    fn make() -> (Arc<dyn super::Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        (Arc::new(store), dir)
    }

    /// One process owns the database: its peer is the store itself.
    fn make_pair() -> (
        Arc<dyn super::Store>,
        Arc<dyn super::Store>,
        tempfile::TempDir,
    ) {
        let (store, dir) = make();
        (Arc::clone(&store), store, dir)
    }

    conformance_suite!(make(), make_pair());

    /// Idempotency records go with their key once it is older than
    /// `DELIVERY_RETENTION` (Redis expires the same keys by TTL).
    #[tokio::test]
    async fn idempotency_records_are_pruned_with_their_key() {
        use chrono::{Duration, Utc};
        let (store, _dir) = make();
        let old = Utc::now() - Duration::days(8);
        let key = "idempotency:local/demo:a#b";
        let created = |key: &str, names: &[String], at| {
            let store = Arc::clone(&store);
            let (key, names) = (key.to_owned(), names.to_vec());
            async move {
                store
                    .create_job_once(
                        &key,
                        &names,
                        super::super::conformance::new_job("deploy"),
                        at,
                    )
                    .await
                    .unwrap()
                    .map(|job| job.id)
            }
        };
        let first = created(key, &[key.to_owned(), format!("{key}#f00d")], old).await;
        let fresh = "idempotency:local/demo:fresh";
        let second = created(
            fresh,
            &[fresh.to_owned(), format!("{fresh}#beef")],
            Utc::now(),
        )
        .await;
        assert!(first.is_some() && second.is_some());

        let retention = super::super::Retention {
            max_age: std::time::Duration::from_secs(3600),
            max_jobs_per_repo: 1000,
        };
        store.prune(&retention, Utc::now()).await.unwrap();
        assert_eq!(store.key_job(key).await.unwrap(), None);
        assert_eq!(store.key_job(&format!("{key}#f00d")).await.unwrap(), None);
        assert_eq!(store.key_job(fresh).await.unwrap(), second);
        assert_eq!(
            store.key_job(&format!("{fresh}#beef")).await.unwrap(),
            second
        );
        // The key can be used again: it is new.
        assert!(created(key, &[], Utc::now()).await.is_some());
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
            .expect("redis-server runs (scripts/setup --tests installs it)");
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

    /// A second controller on the same Redis (and prefix).
    async fn make_pair() -> (Arc<dyn super::Store>, Arc<dyn super::Store>, RedisServer) {
        let (store, server) = make().await;
        let peer = RedisStore::connect(&server.url, "test:", None)
            .await
            .expect("a second store on the same Redis");
        (store, Arc::new(peer), server)
    }

    conformance_suite!(make().await, make_pair().await);

    /// Delivery ids, idempotency keys and the jobs they name expire after
    /// `DELIVERY_RETENTION` (the embedded store prunes the same records).
    #[tokio::test]
    async fn idempotency_records_expire_with_their_key() {
        use super::super::DELIVERY_RETENTION;
        use chrono::Utc;
        let (store, server) = make().await;
        let key = "idempotency:local/demo:a";
        let request = format!("{key}#f00d");
        for (key, names) in [
            ("d-1", vec![]),
            (key, vec![request.clone(), key.to_owned()]),
        ] {
            let created = store
                .create_job_once(
                    key,
                    &names,
                    super::super::conformance::new_job("deploy"),
                    Utc::now(),
                )
                .await
                .unwrap();
            assert!(created.is_some(), "{key} is new");
        }
        let mut redis = redis::Client::open(server.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let retention = i64::try_from(DELIVERY_RETENTION.as_secs()).unwrap();
        for record in [
            "test:delivery:d-1".to_owned(),
            format!("test:delivery:{key}"),
            format!("test:key_job:{key}"),
            format!("test:key_job:{request}"),
        ] {
            let ttl: i64 = redis::cmd("TTL")
                .arg(&record)
                .query_async(&mut redis)
                .await
                .unwrap();
            assert!(0 < ttl && ttl <= retention, "{record}: TTL {ttl}");
        }
    }
}

/// Export from one backend, import into another: every pair of backends
/// (a new backend is one more `make_*` and its arms).
mod snapshot_suite {
    use super::super::embedded::EmbeddedStore;
    use super::super::postgres::PostgresStore;
    use super::super::redis::RedisStore;
    use super::RedisServer;
    use hobotnica_tests::postgres::PostgresServer;
    use std::sync::Arc;

    /// What keeps a store alive.
    #[allow(dead_code)]
    enum Guard {
        Dir(tempfile::TempDir),
        Redis(Arc<RedisServer>),
        Postgres(Box<PostgresServer>),
    }

    fn embedded() -> (Arc<dyn super::Store>, Guard) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        (Arc::new(store), Guard::Dir(dir))
    }

    /// A store under `prefix` on `server` (a new server when `None`).
    async fn redis(
        server: Option<Arc<RedisServer>>,
        prefix: &str,
    ) -> (Arc<dyn super::Store>, Guard) {
        let server = server.unwrap_or_else(|| Arc::new(RedisServer::start()));
        let store = RedisStore::connect(&server.url, prefix, None)
            .await
            .unwrap();
        (Arc::new(store), Guard::Redis(server))
    }

    /// A store on a PostgreSQL server of its own.
    async fn postgres() -> (Arc<dyn super::Store>, Guard) {
        let server = PostgresServer::start().await;
        let store = PostgresStore::connect(&server.url(), None).await.unwrap();
        (Arc::new(store), Guard::Postgres(Box::new(server)))
    }

    macro_rules! arms {
        ($($name:ident: $test:ident($source:expr, $target:expr);)*) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (source, _source_guard) = $source;
                    let (target, _target_guard) = $target;
                    super::$test(source, target).await;
                }
            )*
        };
    }

    /// Two prefixes on one Redis: the source's keys do not make the target
    /// look full.
    async fn redis_pair() -> (
        (Arc<dyn super::Store>, Guard),
        (Arc<dyn super::Store>, Guard),
    ) {
        let server = Arc::new(RedisServer::start());
        (
            redis(Some(Arc::clone(&server)), "source:").await,
            redis(Some(server), "target:").await,
        )
    }

    arms! {
        embedded_to_embedded: an_import_answers_like_its_export(embedded(), embedded());
        embedded_to_redis: an_import_answers_like_its_export(embedded(), redis(None, "test:").await);
        redis_to_embedded: an_import_answers_like_its_export(redis(None, "test:").await, embedded());
        rules_embedded_to_embedded: imports_follow_the_rules(embedded(), embedded());
        rules_embedded_to_redis: imports_follow_the_rules(embedded(), redis(None, "test:").await);
        rules_redis_to_embedded: imports_follow_the_rules(redis(None, "test:").await, embedded());
        embedded_to_postgres: an_import_answers_like_its_export(embedded(), postgres().await);
        postgres_to_embedded: an_import_answers_like_its_export(postgres().await, embedded());
        redis_to_postgres: an_import_answers_like_its_export(redis(None, "test:").await, postgres().await);
        postgres_to_redis: an_import_answers_like_its_export(postgres().await, redis(None, "test:").await);
        postgres_to_postgres: an_import_answers_like_its_export(postgres().await, postgres().await);
        rules_embedded_to_postgres: imports_follow_the_rules(embedded(), postgres().await);
        rules_postgres_to_embedded: imports_follow_the_rules(postgres().await, embedded());
        rules_postgres_to_postgres: imports_follow_the_rules(postgres().await, postgres().await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_to_redis() {
        let ((source, _a), (target, _b)) = redis_pair().await;
        super::an_import_answers_like_its_export(source, target).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rules_redis_to_redis() {
        let ((source, _a), (target, _b)) = redis_pair().await;
        super::imports_follow_the_rules(source, target).await;
    }
}
