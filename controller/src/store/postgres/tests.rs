//! The conformance suite on PostgreSQL (a server of each test's own), and
//! what only this backend does: migrations, events through NOTIFY.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use hobotnica_tests::postgres::PostgresServer;

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
