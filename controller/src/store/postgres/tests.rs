//! The conformance suite on PostgreSQL (a server of each test's own), and
//! what only this backend does: migrations, events through NOTIFY.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use hobotnica_tests::postgres::PostgresServer;

use chrono::Utc;

use super::*;
use crate::store::conformance::*;

async fn make() -> (Arc<dyn Store>, PostgresServer) {
    let server = PostgresServer::start().await;
    let store = PostgresStore::connect(&server.url(), None).await.unwrap();
    (Arc::new(store), server)
}

/// A second controller on the same database.
async fn make_pair() -> (Arc<dyn Store>, Arc<dyn Store>, PostgresServer) {
    let (store, server) = make().await;
    let peer = PostgresStore::connect(&server.url(), None)
        .await
        .expect("a second store on the same database");
    (store, Arc::new(peer), server)
}

mod suite {
    use super::*;
    conformance_suite!(make().await, make_pair().await);
}

/// Longer than anything here takes unless it hangs.
const DEADLINE: Duration = Duration::from_secs(30);

/// A plain client on the server, as an operator's `psql`.
async fn admin(server: &PostgresServer) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&server.url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

async fn next_event(
    events: &mut broadcast::Receiver<StoreEvent>,
    wanted: impl Fn(&StoreEvent) -> bool,
) -> StoreEvent {
    loop {
        match events.recv().await {
            Ok(event) if wanted(&event) => return event,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => panic!("the event feed closed"),
        }
    }
}

/// Controllers starting together migrate once: the advisory lock makes the
/// others wait, and they find the schema current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_starting_together_migrate_once() {
    let server = PostgresServer::start().await;
    let url = server.url();
    let stores =
        futures_util::future::join_all((0..4).map(|_| PostgresStore::connect(&url, None))).await;
    for store in &stores {
        store.as_ref().expect("every controller starts");
    }
    let versions: Vec<i32> = admin(&server)
        .await
        .query("SELECT version FROM schema_version ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let expected: Vec<i32> = (1..=i32::try_from(MIGRATIONS.len()).unwrap()).collect();
    assert_eq!(versions, expected, "each migration applied once");
}

/// A controller older than the database's schema refuses to start, and
/// says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_the_controller_is_refused() {
    let server = PostgresServer::start().await;
    drop(PostgresStore::connect(&server.url(), None).await.unwrap());
    admin(&server)
        .await
        .execute("INSERT INTO schema_version (version) VALUES (99)", &[])
        .await
        .unwrap();
    let Err(err) = PostgresStore::connect(&server.url(), None).await else {
        panic!("a controller started on a newer schema");
    };
    assert_eq!(
        format!("{err:#}"),
        format!(
            "the database's schema is version 99; this controller knows up to {}: upgrade the controller",
            MIGRATIONS.len()
        )
    );
}

/// An event too large for a NOTIFY payload still reaches every
/// controller, whole (through its row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_larger_than_a_notify_payload_arrive_whole() {
    let (store, peer, _server) = make_pair().await;
    let mut events = peer.subscribe();
    let event = StoreEvent::RepoDisabled {
        git_url: format!("https://example.com/{}.git", "x".repeat(20_000)),
    };
    store.announce(event.clone()).await;
    let arrived = tokio::time::timeout(
        DEADLINE,
        next_event(&mut events, |got| {
            matches!(got, StoreEvent::RepoDisabled { .. })
        }),
    )
    .await
    .expect("the large event arrives");
    assert_eq!(arrived, event);
}

/// The listening connection is cut (the server restarted it, a proxy
/// dropped it): the store says `Resync` (events were missed), listens
/// again, and events flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listener_says_resync_and_listens_again() {
    let (store, server) = make().await;
    let mut events = store.subscribe();
    let cut = admin(&server)
        .await
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&LISTENER_APPLICATION_NAME],
        )
        .await
        .unwrap();
    assert_eq!(cut.len(), 1, "one listening connection");
    tokio::time::timeout(
        DEADLINE,
        next_event(&mut events, |event| *event == StoreEvent::Resync),
    )
    .await
    .expect("the lost connection is noticed");
    // Events sent before the new LISTEN are missed (the `Resync` said so):
    // announce until one arrives.
    let flowing = async {
        for job in 1.. {
            let event = StoreEvent::JobQueued { job: JobId(job) };
            store.announce(event.clone()).await;
            let arrived = tokio::time::timeout(
                Duration::from_millis(200),
                next_event(&mut events, |got| *got == event),
            )
            .await;
            if arrived.is_ok() {
                return;
            }
        }
    };
    tokio::time::timeout(DEADLINE, flowing)
        .await
        .expect("events flow again");
}

/// While the server is down every call fails as `Unavailable` (the API's
/// 503), and once it is back the store works again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_unavailable_while_the_server_is_down_and_recovers() {
    let (store, mut server) = make().await;
    let job = store.create_job(new_job("test"), Utc::now()).await.unwrap();
    server.kill9();
    let err = store.get_job(job.id).await.expect_err("the server is down");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    server.restart().await;
    let back = async {
        loop {
            if let Ok(Some(found)) = store.get_job(job.id).await {
                return found;
            }
            tokio::time::sleep(hobotnica_tests::wait::POLL_INTERVAL).await;
        }
    };
    let found = tokio::time::timeout(DEADLINE, back)
        .await
        .expect("the store works again");
    assert_eq!(
        found.state,
        JobState::Queued,
        "the job survived the restart"
    );
}

/// sslmode is read off the URL, libpq's names; a bad one is refused and
/// the error shows nothing of the URL.
#[test]
fn sslmode_is_taken_off_the_url() {
    let (config, mode) =
        parse_url("postgres://ci:secret@db:5433/ci?sslmode=verify-full&connect_timeout=2").unwrap();
    assert_eq!(mode, SslMode::VerifyFull);
    assert_eq!(config.get_dbname(), Some("ci"));
    assert_eq!(config.get_ports(), &[5433]);
    assert_eq!(parse_url("postgresql://db/ci").unwrap().1, SslMode::Prefer);
    for (value, mode) in [
        ("disable", SslMode::Disable),
        ("require", SslMode::Require),
        ("verify-ca", SslMode::VerifyCa),
    ] {
        let url = format!("postgres://db/ci?sslmode={value}");
        assert_eq!(parse_url(&url).unwrap().1, mode, "{value}");
    }
    let err = parse_url("postgres://ci:secret@db/ci?sslmode=maybe").unwrap_err();
    assert!(format!("{err:#}").contains("unknown sslmode"), "{err:#}");
    let err = parse_url("postgres://ci:secret@db:notaport/ci").unwrap_err();
    assert!(!format!("{err:#}").contains("secret"), "{err:#}");
    assert!(parse_url("mysql://db/ci").is_err());
}

/// Everything `store` exports, in order.
async fn export_all(store: &dyn Store) -> Vec<snapshot::Record> {
    let (sink, mut records) = mpsc::channel(16);
    let (exported, all) = tokio::join!(store.export(sink), async {
        let mut all = Vec::new();
        while let Some(record) = records.recv().await {
            all.push(record);
        }
        all
    });
    exported.expect("exported");
    all
}

/// A store holding one of everything: a repository, a finished job with an
/// archived log and a line after it, a running job with a live log of
/// several pieces, a queued job made under a key, an agent and its token,
/// a session and a pending notification.
async fn fill(store: &dyn Store) {
    let now = Utc::now();
    store
        .create_repo(Repo {
            owner: "local".into(),
            name: "demo".into(),
            git_url: "file:///srv/demo.git".into(),
            default_branch: "main".into(),
            timeout_secs: 60,
            created_at: now,
            github: None,
            disabled: None,
            env: Vec::new(),
            requeue_lost_tests: true,
            deploy_labels: std::collections::BTreeMap::new(),
            max_log_bytes: None,
            notifications: Vec::new(),
        })
        .await
        .unwrap();
    let worker = store.register_agent(agent("a1")).await.unwrap();
    store
        .create_agent_token(AgentTokenRecord {
            id: "t1".into(),
            name: "ci".into(),
            token_hash: "ab".repeat(32),
            created_at: now,
            labels: std::collections::BTreeMap::new(),
        })
        .await
        .unwrap();
    let finished = store.create_job(new_job("test"), now).await.unwrap();
    let running = store.create_job(new_job("test"), now).await.unwrap();
    let lease = now + chrono::Duration::seconds(60);
    for expected in [finished.id, running.id] {
        let job = store.claim_job(&worker, now, lease).await.unwrap().unwrap();
        assert_eq!(job.id, expected);
    }
    let big: Vec<u8> = (0..(snapshot::LOG_PIECE + ARCHIVE_SEGMENT_BYTES + 7))
        .map(|i| (i % 251) as u8)
        .collect();
    for (id, data) in [(finished.id, &big[..]), (running.id, &big[..1000])] {
        for (n, piece) in data.chunks(300_000).enumerate() {
            store
                .append_log(id, 1, (n * 300_000) as u64, Bytes::copy_from_slice(piece))
                .await
                .unwrap();
        }
    }
    store
        .finish_job(
            finished.id,
            1,
            finish(hobotnica_common::job::Outcome::Succeeded, Some(0)),
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .archive_logs(Utc::now() + chrono::Duration::seconds(1))
            .await
            .unwrap(),
        1
    );
    store
        .append_controller_line(finished.id, "after the archive")
        .await
        .unwrap();
    let keyed = store
        .create_job_once(
            "d-1",
            &["d-1".into(), "d-1#f00d".into()],
            new_job("deploy"),
            now,
        )
        .await
        .unwrap()
        .unwrap();
    store
        .create_session(
            &"cd".repeat(32),
            SessionRecord {
                principal: super::super::SessionPrincipal::Admin {
                    fingerprint: "f".into(),
                },
                csrf_token: "c".into(),
                created_at: now,
                expires_at: now + chrono::Duration::hours(1),
            },
        )
        .await
        .unwrap();
    store
        .queue_notifications(vec![NotificationDelivery {
            id: "n1".into(),
            repo: keyed.repo.clone(),
            target: "ops".into(),
            job: keyed,
            attempt: 0,
            due_at: now,
            created_at: now,
        }])
        .await
        .unwrap();
    // Claimed once: the attempt and due time are the store's now.
    store
        .claim_notification(now, now + chrono::Duration::minutes(1))
        .await
        .unwrap()
        .unwrap();
}

/// An export read back by an import into an empty database exports the
/// same records; the imported store goes on from the exported next id, and
/// reads the same logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_imports_into_an_empty_store_as_it_was() {
    let (store, server) = make().await;
    assert!(store.is_empty().await.unwrap(), "a new store is empty");
    fill(store.as_ref()).await;
    assert!(!store.is_empty().await.unwrap());
    let exported = export_all(store.as_ref()).await;
    let kinds: Vec<&str> = exported
        .iter()
        .map(|record| match record {
            snapshot::Record::Repo { .. } => "repo",
            snapshot::Record::Job { .. } => "job",
            snapshot::Record::Log { .. } => "log",
            snapshot::Record::Agent { .. } => "agent",
            snapshot::Record::AgentToken { .. } => "agent_token",
            snapshot::Record::Key { .. } => "key",
            snapshot::Record::KeyJob { .. } => "key_job",
            snapshot::Record::Session { .. } => "session",
            snapshot::Record::Notification { .. } => "notification",
            snapshot::Record::NextJobId { .. } => "next_job_id",
            snapshot::Record::ImportStarted | snapshot::Record::ImportFinished => "marker",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "repo",
            "job",
            // 1.25 MiB + 7 bytes and a line: six pieces of 256 KiB at most.
            "log",
            "log",
            "log",
            "log",
            "log",
            "log",
            "job",
            "log",
            "job",
            "agent",
            "agent_token",
            "key",
            "key_job",
            "key_job",
            "session",
            "notification",
            "next_job_id"
        ]
    );
    assert_eq!(
        exported.last(),
        Some(&snapshot::Record::NextJobId { next: 4 })
    );

    admin(&server)
        .await
        .batch_execute("CREATE DATABASE copy")
        .await
        .unwrap();
    let copy_url = server.url().replace("/postgres?", "/copy?");
    let copy = PostgresStore::connect(&copy_url, None).await.unwrap();
    assert!(copy.is_empty().await.unwrap());
    for batch in exported.chunks(3) {
        copy.import(batch.to_vec()).await.unwrap();
    }
    assert_eq!(export_all(&copy).await, exported, "the same records");
    for id in [1, 2] {
        let id = JobId(id);
        let len = store.log_len(id).await.unwrap();
        assert_eq!(copy.log_len(id).await.unwrap(), len);
        assert_eq!(
            copy.read_log(id, 0, len as usize).await.unwrap(),
            store.read_log(id, 0, len as usize).await.unwrap(),
            "job {id}'s log reads the same"
        );
    }
    assert_eq!(copy.key_job("d-1#f00d").await.unwrap(), Some(JobId(3)));
    let next = copy.create_job(new_job("test"), Utc::now()).await.unwrap();
    assert_eq!(next.id, JobId(4), "ids go on from the snapshot's next id");
    // A repeated import is refused, not merged.
    let again = copy.import(exported[..1].to_vec()).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
}

/// An export whose receiver goes away stops without error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_stops_when_its_receiver_goes() {
    let (store, _server) = make().await;
    fill(store.as_ref()).await;
    let (sink, mut records) = mpsc::channel(1);
    let export = tokio::spawn({
        let store = Arc::clone(&store);
        async move { store.export(sink).await }
    });
    assert!(records.recv().await.is_some());
    drop(records);
    tokio::time::timeout(DEADLINE, export)
        .await
        .expect("the export ends")
        .unwrap()
        .expect("without error");
}

/// The path to the server of a pooled connection dies without closing (a
/// proxy or NAT that swallows packets; the kernel sees nothing wrong): the
/// call on it fails as `Unavailable` once [`OPERATION_TIMEOUT`] is up
/// (the API's 503) instead of hanging, the dead connection leaves the pool,
/// and the next call works on a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_on_a_silently_dead_connection_fails_in_time_and_the_next_works() {
    let server = PostgresServer::start().await;
    let proxy = hobotnica_tests::proxy::Proxy::start(server.addr).await;
    let through_proxy = format!(
        "postgres://postgres@{}/postgres?sslmode=disable",
        proxy.addr
    );
    let store = PostgresStore::connect(&through_proxy, None).await.unwrap();
    let job = store.create_job(new_job("test"), Utc::now()).await.unwrap();

    proxy.stall_open_connections();
    let asked = std::time::Instant::now();
    let err = store.get_job(job.id).await.expect_err("no answer");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        asked.elapsed() < OPERATION_TIMEOUT + Duration::from_secs(5),
        "failed after {:?}",
        asked.elapsed()
    );
    let found = tokio::time::timeout(DEADLINE, store.get_job(job.id))
        .await
        .expect("an answer")
        .expect("a fresh connection works");
    assert_eq!(found.map(|job| job.id), Some(job.id));
}

/// TLS by the URL's sslmode: `verify-full` trusts the given CA and checks
/// the host; without that CA the server's certificate is refused at once
/// (no waiting for a server that answers), and `require` encrypts without
/// checking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_follows_the_sslmode() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = hobotnica_tests::tls::TestPki::create(pki_dir.path());
    let server = PostgresServer::start_tls(&pki).await;
    let url = server.url();
    assert!(url.contains("sslmode=verify-full"), "{url}");

    let store = PostgresStore::connect(&url, Some(pki.ca_pem()))
        .await
        .expect("verified against the test CA");
    store.ping().await.unwrap();
    let encrypted = admin_tls_check(&server).await;
    assert!(encrypted, "the store's connections use TLS");

    let started = std::time::Instant::now();
    let Err(err) = PostgresStore::connect(&url, None).await else {
        panic!("a certificate of an unknown CA was accepted");
    };
    let message = format!("{err:#}");
    assert!(message.contains("TLS"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused at once"
    );

    let unverified = url.replace("verify-full", "require");
    PostgresStore::connect(&unverified, None)
        .await
        .expect("require does not check the certificate")
        .ping()
        .await
        .unwrap();
}

/// Whether every connection of the controller's application name uses TLS.
async fn admin_tls_check(server: &PostgresServer) -> bool {
    let output = server.psql(
        "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name LIKE 'hobotnica-controller%'",
    );
    output == "t"
}

/// Every session of the store runs with the statement timeout and the
/// server-side keepalive it asked for in its start-up options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_carry_the_statement_timeout_and_keepalive() {
    let server = PostgresServer::start().await;
    let store = PostgresStore::connect(&server.url(), None).await.unwrap();
    let client = store.inner.client().await.unwrap();
    for (setting, expected) in [
        ("statement_timeout", "15s"),
        ("tcp_keepalives_idle", "10"),
        ("tcp_keepalives_interval", "5"),
        ("tcp_keepalives_count", "3"),
    ] {
        let row = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), expected, "{setting}");
    }
}
