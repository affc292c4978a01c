//! The end-to-end test harness: runs the real `hobotnica-controller`,
//! `hobotnica-agent` and `hobot` binaries as processes, with a fixture git
//! repository, a REST client and condition waits with deadlines.
//!
//! The binaries are not built here (no nested cargo): build them first with
//! `cargo build --workspace --bins` (`--release` for the benches), then run
//! `cargo test -p hobotnica-tests`. They are found next to the test
//! executable, or in `HOBOTNICA_BIN_DIR`.
//!
//! Every process a fixture starts is killed when the fixture is dropped, and
//! its output is printed when the test is failing.

// The harness starts processes and reads its environment by design.
#![allow(clippy::disallowed_methods)]

pub mod agent;
pub mod api;
pub mod bins;
pub mod browser;
pub mod chaos;
pub mod cli;
pub mod controller;
pub mod daemon;
pub mod docker;
pub mod git;
pub mod github;
pub mod net;
pub mod output;
pub mod postgres;
pub mod procs;
pub mod prometheus;
pub mod proxy;
pub mod redis;
pub mod tls;
pub mod wait;

pub use agent::{Agent, AgentOpts, AgentTarget, TokenPassing};
pub use api::{Api, Job, JobTimings, RawResponse};
pub use controller::{Controller, ControllerOpts};
pub use git::GitRepo;
pub use github::{FakeGitHub, Permission};
pub use hobotnica_common::job::JobState;
pub use proxy::{Link, Proxy};
pub use wait::{wait_for, wait_until};

use std::sync::Once;

/// Installs the process-wide rustls provider (aws-lc-rs) once; every fixture
/// calls it, so tests need not.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// The one host directory jobs of test agents may write to
/// (`--sandbox-rw-bind`): tests and jobs meet there (gates, sync files,
/// counters). Nothing else of the host is writable inside a job's sandbox.
pub fn shared_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hobotnica-e2e-shared-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the shared test directory");
        dir
    })
}

/// A string unique within this test run, for names and markers.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}
