//! What other users and processes on the host can see: the controller's data
//! directory and the agent's work directory hold nothing their group or other
//! users may open, a token file others may read is refused, and tokens given
//! as the README shows (files) never appear in a process's command line.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use hobotnica_tests::TokenPassing;

use super::*;

/// How long a refused agent may take to exit.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(30);

/// Every file and directory under `root` (itself included) that its group
/// or other users have any permission on, as `mode path`. Symbolic links
/// are not followed; a path removed during the walk is skipped.
fn open_to_others(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let metadata = match std::fs::symlink_metadata(&path) {
            Ok(metadata) => metadata,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => panic!("cannot stat {}: {err}", path.display()),
        };
        if metadata.file_type().is_symlink() {
            continue;
        }
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            found.push(format!("{mode:04o} {}", path.display()));
        }
        if metadata.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            pending.extend(entries.flatten().map(|entry| entry.path()));
        }
    }
    found
}

/// The command line of a running process, arguments separated by NULs.
fn cmdline(pid: Option<u32>) -> Vec<u8> {
    let pid = pid.expect("the process runs");
    std::fs::read(format!("/proc/{pid}/cmdline")).expect("/proc/<pid>/cmdline")
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none())
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|err| panic!("cannot chmod {}: {err}", path.display()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_work_dirs_are_private_and_token_files_keep_tokens_off_argv() {
    let mut controller = Controller::start(ControllerOpts {
        token_files: true,
        ..ControllerOpts::default()
    })
    .await;
    let agent = Agent::start(
        &controller,
        AgentOpts {
            token: TokenPassing::File { mode: 0o600 },
            ..AgentOpts::default()
        },
    )
    .await;
    let repo = GitRepo::new();
    let api = controller.api();
    api.register_repo("demo", &repo.url()).await;

    // A one-time value is kept in the job's record in hobotnica.redb.
    let one_time = hobotnica_tests::unique("one-time-value");
    let job = api
        .run_job(
            REPO,
            json!({ "target": "env", "env": { "E2E_ONE_TIME": one_time } }),
        )
        .await;
    api.wait_for_success(job.id, JOB_TIMEOUT).await;
    assert!(
        api.output(job.id).await.contains(&one_time),
        "the job saw its one-time value"
    );
    let work_dir = agent.work_dir();
    wait_until(JOB_TIMEOUT, "the job's work tree and spool to go", || {
        let gone = is_empty_dir(&work_dir.join("jobs")) && is_empty_dir(&work_dir.join("spool"));
        async move { gone }
    })
    .await;

    let data_dir = controller.data_dir();
    let log = format!("logs/{}.log", job.id);
    for kept in [
        "hobotnica.redb",
        "logs",
        &log,
        "controller.json",
        "secret-key",
    ] {
        assert!(data_dir.join(kept).exists(), "{kept} is in the data dir");
    }
    assert!(
        !data_dir.join("admin-token").exists(),
        "the admin token came from --admin-token-file"
    );
    assert!(
        !is_empty_dir(&work_dir.join("cache")),
        "the agent keeps a cache clone"
    );
    let open = [open_to_others(&data_dir), open_to_others(&work_dir)].concat();
    assert!(
        open.is_empty(),
        "other users may open these:\n{}",
        open.join("\n")
    );

    let tokens = [&controller.admin_token, &controller.agent_token];
    for (what, command_line, option) in [
        (
            "controller",
            cmdline(controller.pid()),
            "--admin-token-file",
        ),
        ("agent", cmdline(agent.pid()), "--token-file"),
    ] {
        assert!(contains(&command_line, option), "{what} got {option}");
        for token in tokens {
            assert!(
                !contains(&command_line, token),
                "a token is in the {what}'s /proc/<pid>/cmdline"
            );
        }
    }
    for output in [controller.output(), agent.output()] {
        assert!(
            !output.contains("/proc/<pid>/cmdline"),
            "no warning about the command line: {output}"
        );
        for token in tokens {
            assert!(!output.contains(token.as_str()), "a token is in the output");
        }
    }

    // A data directory that an older version (or another umask) left open
    // is made private again when the controller starts.
    controller.stop().await;
    chmod(&data_dir, 0o755);
    chmod(&data_dir.join("logs"), 0o775);
    for file in ["hobotnica.redb", &log, "controller.json", "secret-key"] {
        chmod(&data_dir.join(file), 0o644);
    }
    controller.restart().await;
    let open = open_to_others(&data_dir);
    assert!(
        open.is_empty(),
        "still open after a restart:\n{}",
        open.join("\n")
    );
    let output = controller.output();
    assert!(
        output.contains("made it private") && output.contains("hobotnica.redb"),
        "the controller says what it tightened: {output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_token_file_others_may_read_and_warns_about_a_token_in_argv() {
    let controller = Controller::start_default().await;

    let mut refused = Agent::spawn(
        &controller,
        AgentOpts {
            token: TokenPassing::File { mode: 0o644 },
            ..AgentOpts::default()
        },
    );
    let status = refused.wait(REFUSAL_TIMEOUT).await;
    assert!(!status.success(), "the agent refused to start: {status}");
    let token_file = refused
        .work_dir()
        .parent()
        .expect("the agent's dir")
        .join("agent-token");
    let expected = format!(
        "hobotnica-agent: refusing the --token-file file {path}: its mode 0644 lets other users \
         read it; run: chmod 600 {path}",
        path = token_file.display()
    );
    let output = refused.output();
    assert!(
        output.lines().any(|line| line == expected),
        "one clear line, {expected:?}, in: {output}"
    );
    assert!(
        !output.contains(&controller.agent_token),
        "the token is not in the output"
    );
    assert!(
        !refused.work_dir().exists(),
        "nothing was created before the refusal"
    );

    let on_argv = Agent::start(
        &controller,
        AgentOpts {
            token: TokenPassing::CommandLine,
            ..AgentOpts::default()
        },
    )
    .await;
    let output = on_argv.output();
    assert!(
        output.contains("--token on the command line")
            && output.contains("/proc/<pid>/cmdline")
            && output.contains("--token-file"),
        "a token in argv still works, with a warning: {output}"
    );
    assert!(
        !output.contains(&controller.agent_token),
        "the warning does not repeat the token"
    );
}
