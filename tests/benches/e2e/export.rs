//! A snapshot of 1000 finished jobs with their logs (`make env`: the job's
//! environment, about 1.5 KiB a log), run on the embedded store: the size
//! of `hobot admin export`'s file beside the logs' bytes, and how long the
//! export, an import into a new embedded store, and migrations into
//! PostgreSQL and Redis take (release `hobot`, on stores no controller has
//! open).

use std::path::Path;
use std::time::Instant;

use hobotnica_tests::postgres::PostgresServer;
use hobotnica_tests::redis::RedisServer;
use hobotnica_tests::{Agent, AgentOpts, Controller, ControllerOpts, GitRepo, cli};
use tokio::task::JoinSet;

use super::{JOB_TIMEOUT, REPO};

/// Finished jobs in the snapshot.
const JOBS: usize = 1000;

pub async fn export_size() {
    let mut controller = Controller::start(ControllerOpts::default()).await;
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    let agent = Agent::start(
        &controller,
        AgentOpts {
            concurrency: 2,
            ..AgentOpts::default()
        },
    )
    .await;
    let mut posting = JoinSet::new();
    for client in 0..2 {
        let api = api.clone();
        posting.spawn(async move {
            let mut ids = Vec::new();
            for _ in (client..JOBS).step_by(2) {
                ids.push(api.run_target(REPO, "env").await.id);
            }
            ids
        });
    }
    let mut ids = Vec::with_capacity(JOBS);
    while let Some(posted) = posting.join_next().await {
        ids.extend(posted.unwrap());
    }
    let mut log_bytes = 0;
    for id in ids {
        api.wait_for_end(id, JOB_TIMEOUT).await;
        log_bytes += api.log(id).await.len();
    }
    drop(agent);
    controller.stop().await;

    let scratch = controller.scratch_dir("export");
    let file = scratch.join("snapshot.jsonl.gz");
    let data_dir = controller.data_dir();
    let took = hobot(
        &scratch,
        &[
            "admin",
            "export",
            "--data-dir",
            path(&data_dir),
            "--out",
            path(&file),
        ],
        &[],
    )
    .await;
    let size = std::fs::metadata(&file).unwrap().len();
    println!(
        "export: {JOBS} finished jobs with {} of logs: a file of {} ({:.0} bytes a job, {:.2}x the logs) in {:.2}s",
        human(log_bytes as u64),
        human(size),
        size as f64 / JOBS as f64,
        size as f64 / log_bytes as f64,
        took,
    );

    let imported_into = scratch.join("imported");
    let took = hobot(
        &scratch,
        &[
            "admin",
            "import",
            "--data-dir",
            path(&imported_into),
            path(&file),
        ],
        &[],
    )
    .await;
    println!("export: import of that file into a new embedded store: {took:.2}s");

    let postgres = PostgresServer::start().await;
    let took = hobot(
        &scratch,
        &["admin", "migrate", "--from-data-dir", path(&data_dir)],
        &[("HOBOTNICA_TO_POSTGRES_URL", &postgres.url())],
    )
    .await;
    println!("export: migrate embedded -> PostgreSQL: {took:.2}s");
    let redis = RedisServer::start().await;
    let took = hobot(
        &scratch,
        &["admin", "migrate"],
        &[
            ("HOBOTNICA_FROM_POSTGRES_URL", &postgres.url()),
            ("HOBOTNICA_TO_REDIS_URL", &redis.url()),
        ],
    )
    .await;
    println!("export: migrate PostgreSQL -> Redis: {took:.2}s");
}

fn path(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

/// Runs `hobot ARGS` (with `env` added, and none of this process'
/// `HOBOTNICA_*`) to success; the seconds it took.
async fn hobot(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> f64 {
    let started = Instant::now();
    let mut command = cli::command(None, cwd);
    command.args(args).envs(env.iter().copied());
    let output = cli::finish(command.spawn().expect("run hobot"), args).await;
    assert!(output.status.success(), "hobot {args:?}: {}", output.stderr);
    started.elapsed().as_secs_f64()
}

fn human(bytes: u64) -> String {
    hobotnica_common::size::human_size(bytes)
}
