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
