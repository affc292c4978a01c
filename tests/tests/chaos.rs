//! The fault-injection suite over real processes (see
//! `hobotnica_tests::chaos`): a short pass with fixed seeds, one run per
//! topology. `scripts/chaos` runs it longer with random seeds;
//! `HOBOTNICA_CHAOS_SEEDS`, `HOBOTNICA_CHAOS_SECONDS` and
//! `HOBOTNICA_CHAOS_JOBS` choose the runs. Build the binaries first:
//! `cargo build --workspace --bins`.

use hobotnica_tests::chaos::{self, Settings, Topology};

async fn run_all(topology: Topology, default_seed: u64) {
    for settings in Settings::from_env(topology, default_seed) {
        chaos::run(&settings).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded() {
    run_all(Topology::Embedded, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis() {
    run_all(Topology::Redis, 2).await;
}
