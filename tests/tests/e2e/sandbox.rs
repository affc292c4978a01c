//! Jobs as attackers. Every job may be a stranger's pull request: each test
//! here is a hostile `make test` written as its author would write it, and
//! asserts what it must not reach — the agent's caches (a planted hook that
//! later runs in a deploy), its token, files and processes, the controller's
//! data dir under `hobot up`, another job's tree — and that nothing it
//! starts outlives it. One test checks that an ordinary job still does its
//! work inside the sandbox (git, make, a compiler, /tmp, HOME, the network),
//! also under an agent that is not root.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;

use hobotnica_tests::agent::TokenPassing;

use super::*;

/// The fixture's Makefile plus targets that run the committed scripts.
fn makefile() -> String {
    format!(
        "{}\nattack:\n\t@sh ./attack.sh\n\nwork:\n\t@sh ./work.sh\n\nescape:\n\t@setsid sleep 3003 </dev/null >/dev/null 2>&1 &\n\t@echo escaped\n\nhang:\n\t@setsid sleep 3004 </dev/null >/dev/null 2>&1 &\n\t@echo escaped; n=0; while [ ! -e stop ] && [ $$n -lt 1200 ]; do n=$$((n+1)); sleep 0.05; done\n",
        hobotnica_tests::git::MAKEFILE
    )
}

/// Commits `attack.sh` (run by `make attack`) and returns the commit.
fn commit_attack(repo: &GitRepo, script: &str) -> String {
    repo.commit(
        &[("Makefile", &makefile()), ("attack.sh", script)],
        "a pull request",
    )
}

/// Lets an agent of another user (`nobody`) read the repository.
fn share(repo: &GitRepo) {
    use std::os::unix::fs::PermissionsExt as _;
    let parent = repo.path().parent().expect("the repository's temp dir");
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

/// The agent's bare caches.
fn caches(agent: &Agent) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(agent.work_dir().join("cache"))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Plants a post-checkout hook (and its siblings) and an fsmonitor command
/// in every git directory a job can name: its own, the one its objects come
/// from, and every cache under the agent's work dir; each writes to `$MARK`.
const PLANT_HOOKS: &str = r#"#!/bin/sh
dirs="$(git rev-parse --git-common-dir)"
if [ -f .git/objects/info/alternates ]; then
  for objects in $(cat .git/objects/info/alternates); do
    dirs="$dirs $(dirname "$objects")"
    if touch "$objects/planted" 2>/dev/null; then echo "wrote into $objects"; fi
  done
fi
for cache in "$WORK_DIR"/cache/*.git; do dirs="$dirs $cache"; done
for d in $dirs; do
  if mkdir -p "$d/hooks" 2>/dev/null && printf '#!/bin/sh\necho pwned >> %s\n' "$MARK" > "$d/hooks/post-checkout" 2>/dev/null; then
    chmod +x "$d/hooks/post-checkout"
    for hook in reference-transaction post-index-change pre-auto-gc post-merge; do cp "$d/hooks/post-checkout" "$d/hooks/$hook"; done
    echo "planted hooks in $d"
  fi
  if git config --file "$d/config" core.fsmonitor "echo pwned >> $MARK" 2>/dev/null; then echo "planted an fsmonitor in $d"; fi
done
echo "attack done"
"#;

async fn planted_hooks_never_run_in_a_later_deploy(isolation: &[&str]) {
    let s = setup_with(AgentOpts {
        args: isolation.iter().map(|a| (*a).to_owned()).collect(),
        ..AgentOpts::default()
    })
    .await;
    let mark = s.controller.scratch_dir("mark").join("pwned");
    let attack = commit_attack(&s.repo, PLANT_HOOKS);
    let job = s
        .api
        .run_job(
            REPO,
            json!({
                "target": "attack",
                "commit": attack,
                "env": { "MARK": path_str(&mark), "WORK_DIR": path_str(&s.agent.work_dir()) },
            }),
        )
        .await;
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let attack_log = s.api.output(job.id).await;
    assert!(attack_log.contains("attack done"), "{attack_log}");

    // A clean commit is deployed next, on the same agent and cache.
    let clean = s.repo.commit_version("clean");
    let deploy = s.api.deploy(REPO, json!({ "commit": clean })).await;
    s.api.wait_for_success(deploy.id, JOB_TIMEOUT).await;
    let test = s.api.run_job(REPO, json!({ "target": "test" })).await;
    s.api.wait_for_success(test.id, JOB_TIMEOUT).await;

    assert!(
        !mark.exists(),
        "a planted hook ran: {}\nattack log:\n{attack_log}",
        std::fs::read_to_string(&mark).unwrap_or_default()
    );
    let deploy_log = s.api.output(deploy.id).await;
    assert!(
        deploy_log.contains(&format!("deploying {clean}")),
        "{deploy_log}"
    );
    for cache in caches(&s.agent) {
        assert!(
            !cache.join("hooks").exists(),
            "{} has hooks after the deploy",
            cache.display()
        );
        let config = std::fs::read_to_string(cache.join("config")).unwrap();
        assert!(!config.contains("fsmonitor"), "{config}");
        // Unsandboxed, a job can write objects into the cache (it runs as
        // the agent's user); sandboxed, the object store is read-only.
        assert!(
            isolation.contains(&"none") || !cache.join("objects/planted").exists(),
            "the job wrote into the cache's objects"
        );
    }
}

#[tokio::test]
async fn a_hook_planted_by_a_test_job_never_runs_in_a_later_deploy() {
    planted_hooks_never_run_in_a_later_deploy(&[]).await;
}

#[tokio::test]
async fn a_hook_planted_by_an_unsandboxed_test_job_never_runs_either() {
    planted_hooks_never_run_in_a_later_deploy(&["--isolation", "none"]).await;
}

/// Looks for the agent: its processes, their arguments and environment, its
/// work dir, spools and caches. Prints `VISIBLE: <what>` for what it finds.
const SNOOP: &str = r#"#!/bin/sh
echo "processes: $(ls /proc | grep -c '^[0-9]')"
for f in /proc/[0-9]*/cmdline /proc/[0-9]*/environ; do tr '\0' '\n' < "$f" 2>/dev/null; done > /tmp/everything
grep -c . /tmp/everything
cat /tmp/everything
if [ -r "/proc/$AGENT_PID/environ" ]; then echo "VISIBLE: the agent's environment"; tr '\0' '\n' < "/proc/$AGENT_PID/environ"; fi
if [ -r "/proc/$AGENT_PID/cmdline" ]; then echo "VISIBLE: the agent's arguments"; tr '\0' ' ' < "/proc/$AGENT_PID/cmdline"; echo; fi
if [ -e "$WORK_DIR/spool" ]; then echo "VISIBLE: the spool"; ls -la "$WORK_DIR/spool"; fi
if [ -e "$WORK_DIR/cache" ] && ls "$WORK_DIR"/cache/*.git/HEAD >/dev/null 2>&1; then echo "VISIBLE: a cache"; fi
if [ -s "$TOKEN_FILE" ]; then echo "VISIBLE: the token file"; cat "$TOKEN_FILE"; fi
echo "snooping done"
"#;

async fn a_job_cannot_snoop(token: fn(&Controller) -> TokenPassing) {
    let controller = Controller::start_default().await;
    let token = token(&controller);
    let token_file = match &token {
        TokenPassing::FileAt(path) => path.clone(),
        _ => controller.scratch_dir("none").join("agent-token"),
    };
    let agent = Agent::start(
        &controller,
        AgentOpts {
            token,
            ..AgentOpts::default()
        },
    )
    .await;
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;
    let snoop = commit_attack(&repo, SNOOP);
    let job = api
        .run_job(
            REPO,
            json!({
                "target": "attack",
                "commit": snoop,
                "env": {
                    "AGENT_PID": agent.pid().unwrap().to_string(),
                    "WORK_DIR": path_str(&agent.work_dir()),
                    "TOKEN_FILE": path_str(&token_file),
                },
            }),
        )
        .await;
    api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let log = api.output(job.id).await;
    assert!(log.contains("snooping done"), "{log}");
    assert!(
        !log.contains(&controller.agent_token),
        "the token leaked:\n{log}"
    );
    assert!(!log.contains(&controller.admin_token), "{log}");
    assert!(!log.contains("VISIBLE: "), "{log}");
    let processes: usize = log
        .lines()
        .find_map(|line| line.strip_prefix("processes: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the count of processes");
    assert!(processes < 10, "the job sees {processes} processes:\n{log}");
}

#[tokio::test]
async fn a_job_cannot_read_the_agents_token_from_its_command_line_or_environment() {
    // The old README's form: the token on the agent's command line.
    a_job_cannot_snoop(|_| TokenPassing::CommandLine).await;
}

#[tokio::test]
async fn a_job_cannot_read_the_agents_token_file_even_where_it_could_see_it() {
    // The token file lies in a directory jobs may write to: the sandbox
    // hides it all the same.
    a_job_cannot_snoop(|c| TokenPassing::FileAt(c.scratch_dir("visible").join("agent-token")))
        .await;
}

#[tokio::test]
async fn a_job_under_hobot_up_cannot_read_the_controllers_data_dir() {
    hobotnica_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::new();
    let http = net::free_addr();
    let grpc = net::free_addr();
    let args = [
        "--listen",
        &http.to_string(),
        "--grpc-listen",
        &grpc.to_string(),
    ];
    let (mut up, cwd) = cli::spawn_up(dir.path(), "hobot-up", &args.map(str::to_owned), &[]);
    let data_dir = cwd.join(".hobotnica");
    let admin_file = data_dir.join("admin-token");
    wait_until(
        Duration::from_secs(30),
        "hobot up to write its admin token",
        || {
            let exists = admin_file.is_file() && data_dir.join("controller.json").is_file();
            async move { exists }
        },
    )
    .await;
    let admin_token = std::fs::read_to_string(&admin_file).unwrap();
    let admin_token = admin_token.trim();
    let agent_token = std::fs::read_to_string(data_dir.join("agent-token")).unwrap();
    let api = Api::new(format!("http://{http}"), Some(admin_token));
    api.register_repo("demo", &repo.url()).await;
    let script = r#"#!/bin/sh
for f in "$DATA_DIR/admin-token" "$DATA_DIR/agent-token" "$DATA_DIR/secret-key" "$DATA_DIR/hobotnica.redb" \
         ../../../../admin-token ../../../../agent-token ../../../../secret-key ../../../../../.hobotnica/admin-token; do
  if [ -s "$f" ]; then echo "READ $f"; cat "$f"; echo; fi
done
ls -la "$DATA_DIR" 2>&1
echo "reading done"
"#;
    let attack = commit_attack(&repo, script);
    let job = api
        .run_job(
            REPO,
            json!({ "target": "attack", "commit": attack, "env": { "DATA_DIR": path_str(&data_dir) } }),
        )
        .await;
    api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let log = api.output(job.id).await;
    assert!(log.contains("reading done"), "{log}");
    assert!(!log.contains("READ "), "{log}");
    assert!(!log.contains(admin_token), "{log}");
    assert!(!log.contains(agent_token.trim()), "{log}");
    up.signal(Signal::SIGTERM);
    up.wait(Duration::from_secs(60)).await;
}

#[tokio::test]
async fn hobot_up_without_a_sandbox_refuses_to_start_in_one_line() {
    hobotnica_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"].map(str::to_owned);
    let (mut up, _) = cli::spawn_up(
        dir.path(),
        "hobot-up-no-sandbox",
        &args,
        &[("HOBOTNICA_BWRAP", "/nonexistent/bwrap")],
    );
    let status = up.wait(Duration::from_secs(60)).await;
    assert!(!status.success());
    let output = up.output();
    let line = output
        .lines()
        .find(|line| line.contains("bubblewrap"))
        .unwrap_or_else(|| panic!("no line about bubblewrap in:\n{output}"));
    assert!(line.contains("--isolation none"), "{line}");
    assert!(!output.contains("Hobotnica is up"), "{output}");
}

/// No process carrying `marker` remains on the host.
async fn wait_until_gone(marker: &(String, String), what: &str) {
    let entry = marker_entry(marker);
    wait_until(Duration::from_secs(10), what, || {
        let left = processes_with_env(&entry);
        async move { left.is_empty() }
    })
    .await;
}

async fn setsid_children_die_with_the_job(agent_opts: AgentOpts) {
    let s = setup_with(agent_opts).await;
    share(&s.repo);
    let escape = s.repo.commit(&[("Makefile", &makefile())], "escapes");
    s.api
        .register_repo_with(json!({ "name": "slow", "git_url": s.repo.url(), "timeout_secs": 2 }))
        .await;

    // The job ends on its own.
    let ended = marker();
    let job = s
        .api
        .run_job(
            REPO,
            json!({ "target": "escape", "commit": escape, "env": { ended.0.clone(): ended.1.clone() } }),
        )
        .await;
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    wait_until_gone(&ended, "the setsid child of a finished job to be gone").await;

    // The job is cancelled.
    let cancelled = marker();
    let job = s
        .api
        .run_job(
            REPO,
            json!({ "target": "hang", "commit": escape, "env": { cancelled.0.clone(): cancelled.1.clone() } }),
        )
        .await;
    wait_for_processes(&cancelled).await;
    s.api.wait_for_log(job.id, "escaped", JOB_TIMEOUT).await;
    s.api.cancel(job.id).await;
    let job = s.api.wait_for_end(job.id, JOB_TIMEOUT).await;
    assert_eq!(job.state, JobState::Cancelled);
    wait_until_gone(&cancelled, "the setsid child of a cancelled job to be gone").await;

    // The job times out.
    let timed_out = marker();
    let job = s
        .api
        .run_job(
            "local/slow",
            json!({ "target": "hang", "commit": escape, "env": { timed_out.0.clone(): timed_out.1.clone() } }),
        )
        .await;
    let job = s.api.wait_for_end(job.id, JOB_TIMEOUT).await;
    assert_eq!(job.state, JobState::TimedOut);
    wait_until_gone(&timed_out, "the setsid child of a timed-out job to be gone").await;
}

#[tokio::test]
async fn setsid_children_die_when_their_job_ends_is_cancelled_or_times_out() {
    setsid_children_die_with_the_job(AgentOpts::default()).await;
}

#[tokio::test]
async fn a_job_cannot_touch_another_running_jobs_tree() {
    let s = setup().await;
    let attack = commit_attack(
        &s.repo,
        r#"#!/bin/sh
ls -la .. 2>&1
for d in ../*/; do
  if [ "$(cd "$d" && pwd)" != "$(pwd)" ] && echo 'test:; @echo pwned' >> "$d/Makefile" 2>/dev/null; then echo "wrote into $d"; fi
done
echo "attack done"
"#,
    );
    let victim = s
        .api
        .run_job(REPO, json!({ "target": "hang", "commit": attack }))
        .await;
    s.api.wait_for_log(victim.id, "escaped", JOB_TIMEOUT).await;
    let victim_tree = s
        .agent
        .work_dir()
        .join("jobs")
        .join(format!("{}-1", victim.id));
    let before = std::fs::read_to_string(victim_tree.join("Makefile")).unwrap();

    let attacker = s
        .api
        .run_job(REPO, json!({ "target": "attack", "commit": attack }))
        .await;
    s.api.wait_for_success(attacker.id, JOB_TIMEOUT).await;
    let log = s.api.output(attacker.id).await;
    assert!(log.contains("attack done"), "{log}");
    assert!(!log.contains("wrote into"), "{log}");
    assert!(!log.contains(&format!("{}-1", victim.id)), "{log}");
    assert_eq!(
        std::fs::read_to_string(victim_tree.join("Makefile")).unwrap(),
        before
    );

    std::fs::write(victim_tree.join("stop"), "").unwrap();
    s.api.wait_for_success(victim.id, JOB_TIMEOUT).await;
}

/// What an ordinary job does: git, a compiler, /tmp, HOME, a local server.
const WORK: &str = r#"#!/bin/sh
set -e
test "$(git rev-parse HEAD)" = "$HOBOTNICA_COMMIT" && echo "git: at the job's commit"
test -z "$(git status --porcelain)" && echo "git: clean"
git log --oneline -1 >/dev/null && echo "git: log"
printf '#include <stdio.h>\nint main(void) { puts("compiled and ran"); return 0; }\n' > /tmp/hello.c
cc -o /tmp/hello /tmp/hello.c
/tmp/hello
echo "a note" > "$HOME/note" && echo "home: $(cat "$HOME/note")"
make --no-print-directory id
bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$E2E_PORT"; echo "hello from the job" >&3; read -r reply <&3; echo "server said: $reply"'
test "$(readlink /proc/$$/fd/0)" = /dev/null && echo "stdin: /dev/null"
test ! -e /proc/$$/fd/3 && echo "no gate: fd 3 closed"
"#;

async fn an_ordinary_job_works_in_the_sandbox(agent_opts: AgentOpts) {
    let s = setup_with(agent_opts).await;
    share(&s.repo);
    let work = s
        .repo
        .commit(&[("Makefile", &makefile()), ("work.sh", WORK)], "work");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        (&stream).write_all(b"hi job\n").unwrap();
        line
    });
    let job = s
        .api
        .run_job(
            REPO,
            json!({ "target": "work", "commit": work, "env": { "E2E_PORT": port.to_string() } }),
        )
        .await;
    let end = s.api.wait_for_end(job.id, JOB_TIMEOUT).await;
    let log = s.api.output(job.id).await;
    assert_eq!(end.state, JobState::Succeeded, "{log}");
    for line in [
        "git: at the job's commit",
        "git: clean",
        "compiled and ran",
        "home: a note",
        &format!("job {}", job.id),
        "server said: hi job",
        // The sandbox is made early and waits on a pipe (its gate): the
        // job gets neither that pipe nor anything but /dev/null as stdin.
        "stdin: /dev/null",
        "no gate: fd 3 closed",
    ] {
        assert!(log.contains(line), "{line:?} missing from:\n{log}");
    }
    assert_eq!(server.join().unwrap(), "hello from the job\n");
}

/// bubblewrap's `--die-with-parent` follows the thread that started it, not
/// the agent: a sandbox started from a thread that ends (the runtime ends
/// idle blocking threads after 10 s) is killed with its job. A job that
/// outlives that must run to its end.
#[tokio::test]
async fn a_job_longer_than_an_idle_threads_life_runs_to_its_end() {
    let s = setup_with(AgentOpts::default()).await;
    let long = s.repo.commit(
        &[(
            "Makefile",
            &format!(
                "{}\nlong:\n\t@echo started; sleep 12; echo \"still running after 12 s\"\n",
                makefile()
            ),
        )],
        "a long job",
    );
    let job = s
        .api
        .run_job(REPO, json!({ "target": "long", "commit": long }))
        .await;
    let end = s.api.wait_for_end(job.id, JOB_TIMEOUT).await;
    let log = s.api.output(job.id).await;
    assert_eq!(end.state, JobState::Succeeded, "{log}");
    assert!(log.contains("still running after 12 s"), "{log}");
}

#[tokio::test]
async fn an_ordinary_job_does_its_work_in_the_sandbox() {
    an_ordinary_job_works_in_the_sandbox(AgentOpts::default()).await;
}

#[tokio::test]
async fn an_unprivileged_agent_sandboxes_its_jobs_too() {
    let opts = AgentOpts {
        unprivileged: true,
        ..AgentOpts::default()
    };
    an_ordinary_job_works_in_the_sandbox(opts.clone()).await;
    setsid_children_die_with_the_job(opts).await;
}

#[tokio::test]
async fn a_toolchain_outside_usr_is_shown_read_only_when_asked() {
    use std::os::unix::fs::PermissionsExt as _;

    // A "toolchain" in a directory of its own: invisible to jobs unless the
    // agent shows it with --sandbox-ro-bind, and then read-only.
    let toolchain = tempfile::tempdir().unwrap();
    let tool = toolchain.path().join("hello-tool");
    std::fs::write(&tool, "#!/bin/sh\necho \"the toolchain ran\"\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = setup_with(AgentOpts {
        args: vec![
            "--sandbox-ro-bind".to_owned(),
            path_str(toolchain.path()).to_owned(),
        ],
        ..AgentOpts::default()
    })
    .await;
    let attack = commit_attack(
        &s.repo,
        r#"#!/bin/sh
"$TOOL"
if echo pwned > "$TOOL" 2>/dev/null; then echo "rewrote the toolchain"; fi
echo "done"
"#,
    );
    let job = s
        .api
        .run_job(
            REPO,
            json!({ "target": "attack", "commit": attack, "env": { "TOOL": path_str(&tool) } }),
        )
        .await;
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let log = s.api.output(job.id).await;
    assert!(log.contains("the toolchain ran"), "{log}");
    assert!(!log.contains("rewrote the toolchain"), "{log}");
    assert!(
        std::fs::read_to_string(&tool)
            .unwrap()
            .contains("the toolchain ran")
    );
}

#[tokio::test]
async fn an_agent_that_cannot_sandbox_refuses_to_start_and_says_how_to_fix_it() {
    let controller = Controller::start_default().await;
    let mut agent = Agent::spawn(
        &controller,
        AgentOpts {
            args: vec!["--bwrap".to_owned(), "/nonexistent/bwrap".to_owned()],
            ..AgentOpts::default()
        },
    );
    let status = agent.wait(Duration::from_secs(30)).await;
    assert!(!status.success());
    let output = agent.output();
    let line = output
        .lines()
        .find(|line| line.contains("bubblewrap"))
        .unwrap_or_else(|| panic!("no line about bubblewrap in:\n{output}"));
    assert!(line.contains("apt-get install bubblewrap"), "{line}");
    assert!(line.contains("--isolation none"), "{line}");
    assert!(!output.contains(&controller.agent_token), "{output}");
}

#[tokio::test]
async fn an_unsandboxed_agent_warns_at_start_and_in_every_jobs_log() {
    let s = setup_with(AgentOpts {
        args: vec!["--isolation".to_owned(), "none".to_owned()],
        ..AgentOpts::default()
    })
    .await;
    let output = s.agent.output();
    assert!(
        output.contains("--isolation none: jobs run unsandboxed"),
        "{output}"
    );
    let job = s.api.run_job(REPO, json!({ "target": "test" })).await;
    s.api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let log = text(&s.api.log(job.id).await);
    assert!(
        log.contains("without a sandbox (--isolation none)"),
        "{log}"
    );
}
