//! Snapshots: `hobot admin migrate` from the embedded store to Redis, and
//! `hobot admin export` / `import` through a file, checked through the REST
//! API of a controller on the new store; and the refusals (a store that is
//! not empty, a truncated file, a data directory in use).

use std::path::Path;

use super::*;
use hobotnica_tests::postgres::PostgresServer;
use hobotnica_tests::redis::RedisServer;

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

/// Runs `hobot ARGS` on stores directly (no controller), with `env` added.
async fn hobot(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> cli::HobotOutput {
    let mut command = cli::command(None, cwd);
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    cli::finish(command.spawn().expect("start hobot"), args).await
}

/// What a user sees of an installation through the REST API: repositories,
/// variables, every job (JSON) with its log, and the agent tokens.
#[derive(Debug, PartialEq)]
struct Installation {
    repos: Value,
    env: Value,
    jobs: BTreeMap<u64, (Value, Vec<u8>)>,
    tokens: Value,
}

async fn installation(api: &Api) -> Installation {
    let mut jobs = BTreeMap::new();
    for job in api.all_jobs("").await {
        let json = api.get_json(&format!("/api/v1/jobs/{}", job.id)).await;
        jobs.insert(job.id, (json, api.log(job.id).await));
    }
    Installation {
        repos: api.get_json("/api/v1/repos").await,
        env: api.get_json(&format!("/api/v1/repos/{REPO}/env")).await,
        jobs,
        tokens: api.get_json("/api/v1/agent-tokens").await,
    }
}

/// A per-agent token created through the API: `(id, token)`.
async fn create_token(api: &Api) -> (String, String) {
    let created = api
        .send_json(
            Method::POST,
            "/api/v1/agent-tokens",
            &json!({ "name": "moved-box" }),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let created = created.json();
    (
        created["id"].as_str().unwrap().to_owned(),
        created["token"].as_str().unwrap().to_owned(),
    )
}

const SECRET: &str = "moved-secret-5d1e9a";

/// An embedded controller that ran jobs (succeeded, failed, one printing
/// a secret) and has one running behind a gate that never opens; the
/// running job's id. The controller is stopped.
async fn used_controller(opts: ControllerOpts) -> (Controller, GitRepo, u64) {
    let mut controller = Controller::start(opts).await;
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    api.set_env(REPO, "E2E_SECRET", SECRET, "all", true).await;
    api.set_env(REPO, "E2E_PLAIN", "plain value", "all", false)
        .await;
    let agent = Agent::start_default(&controller).await;
    for target in ["test", "fail", "secret-whole", "big"] {
        let job = api.run_target(REPO, target).await;
        api.wait_for_end(job.id, JOB_TIMEOUT).await;
    }
    let gate = controller.scratch_dir("gate").join("never");
    let running = api
        .run_job(
            REPO,
            json!({ "target": "gate", "env": { "E2E_GATE": path_str(&gate) } }),
        )
        .await;
    api.wait_for_log(running.id, "waiting for the gate", JOB_TIMEOUT)
        .await;
    controller.stop().await;
    drop(agent);
    (controller, repo, running.id)
}

/// Checks `after` holds everything `before` held: the same repositories,
/// variables, tokens, jobs (ids) and log bytes, except that the job
/// `running` at the export came back lost, its log followed by one
/// controller line saying so.
fn assert_moved(before: &Installation, after: &Installation, running: u64) {
    assert_eq!(after.repos, before.repos);
    assert_eq!(after.env, before.env);
    assert_eq!(after.tokens, before.tokens);
    assert_eq!(
        after.jobs.keys().collect::<Vec<_>>(),
        before.jobs.keys().collect::<Vec<_>>(),
        "the same job ids"
    );
    for (id, (job, log)) in &before.jobs {
        let (moved, moved_log) = &after.jobs[id];
        if *id == running {
            assert_eq!(job["state"], "running");
            assert_eq!(moved["state"], "lost", "never running: {moved}");
            assert!(moved_log.starts_with(log), "job {id}: the log is kept");
            let line = text(&moved_log[log.len()..]);
            assert!(
                line.starts_with("[hobotnica] ") && line.contains("imported as lost"),
                "{line}"
            );
        } else {
            assert_eq!(moved, job, "job {id}");
            assert_eq!(moved_log, log, "job {id}: every log byte");
        }
    }
}

/// An embedded installation moved by `hobot admin migrate`: the stopped
/// embedded controller, what it held, the job running at the move, a
/// per-agent token made on it, and its secret key (hex).
struct Moved {
    embedded: Controller,
    _repo: GitRepo,
    before: Installation,
    running: u64,
    token: String,
    key: String,
}

impl Moved {
    /// An embedded installation that ran jobs, moved with `hobot admin
    /// migrate --from-data-dir` into the store `to` (`HOBOTNICA_TO_*_URL`
    /// and its value) names.
    async fn from_embedded(to: (&str, &str)) -> Moved {
        let (mut embedded, repo, running) = used_controller(ControllerOpts::default()).await;
        embedded.restart().await;
        let (_, token) = create_token(&embedded.api()).await;
        let before = installation(&embedded.api()).await;
        embedded.stop().await;
        let migrated = hobot(
            &embedded.scratch_dir("cwd"),
            &[
                "admin",
                "migrate",
                "--from-data-dir",
                path_str(&embedded.data_dir()),
            ],
            &[to],
        )
        .await;
        assert!(migrated.status.success(), "{migrated:?}");
        assert!(migrated.stderr.contains("copied "), "{}", migrated.stderr);
        assert!(migrated.stderr.contains(" jobs, "), "{}", migrated.stderr);
        let key = std::fs::read_to_string(embedded.data_dir().join("secret-key")).unwrap();
        Moved {
            key: key.trim().to_owned(),
            embedded,
            _repo: repo,
            before,
            running,
            token,
        }
    }

    /// A controller on the new store `opts` names, with the old secret key
    /// and tokens.
    async fn controller(&self, opts: ControllerOpts) -> Controller {
        Controller::start(ControllerOpts {
            secret_key_hex: Some(self.key.clone()),
            tokens: Some((
                self.embedded.admin_token.clone(),
                self.embedded.agent_token.clone(),
            )),
            ..opts
        })
        .await
    }

    /// `moved_to` shows everything the old controller held (the running
    /// job lost); the per-agent token made on the old store lets an agent
    /// in; a new job gets a higher id, reads the secret (sealed under the
    /// same key) and masks it.
    async fn check(&self, moved_to: &Controller) {
        let api = moved_to.api();
        assert_moved(&self.before, &installation(&api).await, self.running);
        let _agent = Agent::start(
            moved_to,
            AgentOpts {
                env: vec![("HOBOTNICA_AGENT_TOKEN".into(), self.token.clone())],
                ..AgentOpts::default()
            },
        )
        .await;
        let job = api.run_target(REPO, "secret-whole").await;
        assert!(
            job.id > *self.before.jobs.keys().max().unwrap(),
            "new ids follow the old"
        );
        api.wait_for_success(job.id, JOB_TIMEOUT).await;
        let output = api.output(job.id).await;
        assert!(output.contains("whole: [MASKED]"), "{output}");
        assert!(!output.contains(SECRET), "{output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_from_the_embedded_store_to_redis_keeps_everything() {
    let redis = RedisServer::start().await;
    let moved = Moved::from_embedded(("HOBOTNICA_TO_REDIS_URL", &redis.url())).await;
    let on_redis = moved
        .controller(ControllerOpts {
            redis_url: Some(redis.url()),
            ..ControllerOpts::default()
        })
        .await;
    moved.check(&on_redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_import_through_a_file_and_what_is_refused() {
    let (mut embedded, _repo, running) = used_controller(ControllerOpts::default()).await;
    embedded.restart().await;
    let before = installation(&embedded.api()).await;

    // The data directory of a running controller is refused, at once.
    let cwd = embedded.scratch_dir("cwd");
    let file = cwd.join("snapshot.jsonl.gz");
    let data_dir = embedded.data_dir();
    let export = |force: bool| {
        let mut args = vec![
            "admin".to_owned(),
            "export".to_owned(),
            "--data-dir".to_owned(),
            path_str(&data_dir).to_owned(),
            "--out".to_owned(),
            path_str(&file).to_owned(),
        ];
        if force {
            args.push("--force".to_owned());
        }
        args
    };
    let args = export(false);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let in_use = hobot(&cwd, &args, &[]).await;
    assert_eq!(in_use.code(), Some(1), "{in_use:?}");
    assert!(
        in_use
            .stderr
            .contains("the data directory is in use by a running controller: stop it first"),
        "{}",
        in_use.stderr
    );
    assert!(!file.exists());

    embedded.stop().await;
    let exported = hobot(&cwd, &args, &[]).await;
    assert!(exported.status.success(), "{exported:?}");
    assert!(exported.stderr.contains("exported "), "{}", exported.stderr);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the snapshot is private");
    let again = hobot(&cwd, &args, &[]).await;
    assert_eq!(again.code(), Some(1), "{again:?}");
    assert!(again.stderr.contains("--force"), "{}", again.stderr);
    let forced = export(true);
    let forced: Vec<&str> = forced.iter().map(String::as_str).collect();
    assert!(hobot(&cwd, &forced, &[]).await.status.success());

    // Into a new embedded store: a controller on it (with the same key)
    // shows the same installation.
    let mut target = Controller::start(ControllerOpts {
        tokens: Some((embedded.admin_token.clone(), embedded.agent_token.clone())),
        ..ControllerOpts::default()
    })
    .await;
    target.stop().await;
    std::fs::copy(
        embedded.data_dir().join("secret-key"),
        target.data_dir().join("secret-key"),
    )
    .unwrap();
    let import = |dir: &Path, file: &Path| {
        vec![
            "admin".to_owned(),
            "import".to_owned(),
            "--data-dir".to_owned(),
            path_str(dir).to_owned(),
            path_str(file).to_owned(),
        ]
    };
    let args = import(&target.data_dir(), &file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let imported = hobot(&cwd, &args, &[]).await;
    assert!(imported.status.success(), "{imported:?}");
    assert!(imported.stderr.contains("imported "), "{}", imported.stderr);
    // Once is enough: the store is not empty any more.
    let twice = hobot(&cwd, &args, &[]).await;
    assert_eq!(twice.code(), Some(1), "{twice:?}");
    assert!(
        twice
            .stderr
            .contains("the target store is not empty: import only into a new store"),
        "{}",
        twice.stderr
    );
    target.restart().await;
    assert_moved(&before, &installation(&target.api()).await, running);

    // A truncated file is refused, and the store it was cut into says so:
    // a controller does not start on it.
    let bytes = std::fs::read(&file).unwrap();
    let truncated = cwd.join("truncated.jsonl.gz");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let fresh = cwd.join("fresh");
    let args = import(&fresh, &truncated);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cut = hobot(&cwd, &args, &[]).await;
    assert_eq!(cut.code(), Some(1), "{cut:?}");
    assert!(cut.stderr.contains("truncated"), "{}", cut.stderr);
    let args = import(&fresh, &file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let after_cut = hobot(&cwd, &args, &[]).await;
    assert_eq!(after_cut.code(), Some(1), "{after_cut:?}");
    assert!(
        after_cut
            .stderr
            .contains("an earlier import into this store did not finish"),
        "{}",
        after_cut.stderr
    );
    let controller = tokio::process::Command::new(hobotnica_tests::bins::bin(
        hobotnica_tests::bins::CONTROLLER,
    ))
    .args(["--data-dir", path_str(&fresh)])
    .args(["--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"])
    .env_clear()
    .kill_on_drop(true)
    .output();
    let refused = tokio::time::timeout(Duration::from_secs(60), controller)
        .await
        .expect("the controller exits")
        .unwrap();
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let said = text(&refused.stderr);
    assert!(
        said.contains("an earlier import into this store did not finish"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_store_exports_into_a_file_an_embedded_store_imports() {
    let redis = RedisServer::start().await;
    let source = Controller::start(ControllerOpts {
        redis_url: Some(redis.url()),
        ..ControllerOpts::default()
    })
    .await;
    let repo = GitRepo::new();
    let api = source.api();
    api.register_repo("demo", &repo.url()).await;
    api.set_env(REPO, "E2E_SECRET", SECRET, "all", true).await;
    let agent = Agent::start_default(&source).await;
    for target in ["test", "fail", "secret-whole"] {
        let job = api.run_target(REPO, target).await;
        api.wait_for_end(job.id, JOB_TIMEOUT).await;
    }
    drop(agent);
    let before = installation(&api).await;

    // Redis may be exported while its controllers run.
    let cwd = source.scratch_dir("cwd");
    let file = cwd.join("redis.jsonl.gz");
    let exported = hobot(
        &cwd,
        &["admin", "export", "--out", path_str(&file)],
        &[("HOBOTNICA_REDIS_URL", &redis.url())],
    )
    .await;
    assert!(exported.status.success(), "{exported:?}");

    let mut target = Controller::start(ControllerOpts {
        tokens: Some((source.admin_token.clone(), source.agent_token.clone())),
        ..ControllerOpts::default()
    })
    .await;
    target.stop().await;
    let imported = hobot(
        &cwd,
        &[
            "admin",
            "import",
            "--data-dir",
            path_str(&target.data_dir()),
            path_str(&file),
        ],
        &[],
    )
    .await;
    assert!(imported.status.success(), "{imported:?}");
    target.restart().await;
    assert_moved(&before, &installation(&target.api()).await, 0);

    // Without store options, hobot downloads the same from the running
    // controller (admin token).
    let downloaded = cwd.join("downloaded.jsonl.gz");
    let mut command = cli::command(Some(&source), &cwd);
    command.args(["admin", "export", "--out", path_str(&downloaded)]);
    let args = ["admin", "export"];
    let over_rest = cli::finish(command.spawn().unwrap(), &args).await;
    assert!(over_rest.status.success(), "{over_rest:?}");
    assert!(
        over_rest.stderr.contains("from the controller"),
        "{}",
        over_rest.stderr
    );
    let mut second = Controller::start(ControllerOpts {
        tokens: Some((source.admin_token.clone(), source.agent_token.clone())),
        ..ControllerOpts::default()
    })
    .await;
    second.stop().await;
    let imported = hobot(
        &cwd,
        &[
            "admin",
            "import",
            "--data-dir",
            path_str(&second.data_dir()),
            path_str(&downloaded),
        ],
        &[],
    )
    .await;
    assert!(imported.status.success(), "{imported:?}");
    second.restart().await;
    assert_moved(&before, &installation(&second.api()).await, 0);
    // Only the admin token may download it.
    let stranger = source.api().with_token(Some("not-the-admin-token"));
    let refused = stranger
        .raw(Method::GET, "/api/v1/admin/export", None)
        .await;
    assert_eq!(refused.status, 401, "{}", refused.text());
}

/// PostgreSQL both ways: `hobot admin migrate` from the embedded store into
/// PostgreSQL keeps everything (as into Redis above); then PostgreSQL,
/// exported into a file while its controller runs, imports into Redis as
/// it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_into_postgresql_and_out_of_it_keeps_everything() {
    let postgres = PostgresServer::start().await;
    let moved = Moved::from_embedded(("HOBOTNICA_TO_POSTGRES_URL", &postgres.url())).await;
    let on_postgres = moved
        .controller(ControllerOpts {
            postgres_url: Some(postgres.url()),
            ..ControllerOpts::default()
        })
        .await;
    moved.check(&on_postgres).await;
    let api = on_postgres.api();
    let cwd = moved.embedded.scratch_dir("cwd");

    // Out of PostgreSQL, while its controller runs, into Redis.
    let on_postgres_now = installation(&api).await;
    let file = cwd.join("postgres.jsonl.gz");
    let exported = hobot(
        &cwd,
        &["admin", "export", "--out", path_str(&file)],
        &[("HOBOTNICA_POSTGRES_URL", &postgres.url())],
    )
    .await;
    assert!(exported.status.success(), "{exported:?}");
    let redis = RedisServer::start().await;
    let imported = hobot(
        &cwd,
        &["admin", "import", path_str(&file)],
        &[("HOBOTNICA_REDIS_URL", &redis.url())],
    )
    .await;
    assert!(imported.status.success(), "{imported:?}");
    let on_redis = moved
        .controller(ControllerOpts {
            redis_url: Some(redis.url()),
            ..ControllerOpts::default()
        })
        .await;
    assert_moved(&on_postgres_now, &installation(&on_redis.api()).await, 0);
}
