#![allow(clippy::unwrap_used)]

use std::sync::Mutex as StdMutex;
use std::time::Instant;

use super::git_http_server::GitHttpServer;
use super::*;

/// A source repository with two commits; returns (dir, first, second).
async fn source_repo(root: &Path) -> (PathBuf, CommitSha, CommitSha) {
    let repo = root.join("src");
    std::fs::create_dir_all(&repo).unwrap();
    let never = CancellationToken::new();
    let git = |args: &[&str]| {
        let mut spec = CommandSpec::new("git", &repo)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", root.display().to_string())
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com");
        for arg in args {
            spec = spec.arg(*arg);
        }
        spec
    };
    let run = |spec: CommandSpec| {
        let never = never.clone();
        async move {
            let captured = process::run_captured(&spec, Duration::from_secs(30), &never)
                .await
                .unwrap();
            assert!(
                captured.status.success(),
                "{:?}: {}",
                spec.args,
                captured.output_text()
            );
            captured.output_text().trim().to_owned()
        }
    };
    run(git(&["init", "--quiet", "--initial-branch=main"])).await;
    std::fs::write(repo.join("version"), "one\n").unwrap();
    run(git(&["add", "version"])).await;
    run(git(&["commit", "--quiet", "-m", "one"])).await;
    let first = run(git(&["rev-parse", "HEAD"])).await.parse().unwrap();
    std::fs::write(repo.join("version"), "two\n").unwrap();
    run(git(&["commit", "--quiet", "-am", "two"])).await;
    let second = run(git(&["rev-parse", "HEAD"])).await.parse().unwrap();
    (repo, first, second)
}

fn workspaces(root: &Path) -> Workspaces {
    let env = vec![
        ("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned()),
        ("HOME".to_owned(), root.display().to_string()),
        ("SECRET".to_owned(), "not for git".to_owned()),
    ];
    Workspaces::new(&root.join("work"), &env, Duration::from_secs(60)).unwrap()
}

struct Lines(StdMutex<Vec<String>>);

impl Lines {
    fn new() -> Lines {
        Lines(StdMutex::new(Vec::new()))
    }
    fn push(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_owned());
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn two_work_trees_of_one_repository_at_different_commits() {
    let root = tempfile::tempdir().unwrap();
    let (repo, first, second) = source_repo(root.path()).await;
    let workspaces = workspaces(root.path());
    let url = repo.display().to_string();
    let never = CancellationToken::new();
    let lines = Lines::new();
    let log = |line: &str| lines.push(line);

    let (a, b) = tokio::join!(
        workspaces.prepare(Remote::plain(&url), &first, "1-1", &log, &never),
        workspaces.prepare(Remote::plain(&url), &second, "2-1", &log, &never),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.path, b.path);
    assert_eq!(
        std::fs::read_to_string(a.path.join("version")).unwrap(),
        "one\n"
    );
    assert_eq!(
        std::fs::read_to_string(b.path.join("version")).unwrap(),
        "two\n"
    );
    // One of them fetched; the other found the commit in the cache.
    assert_eq!(lines.all(), [format!("fetching {url}")]);

    // The URL is not stored in the cache's config.
    let config = std::fs::read_to_string(workspaces.cache_path(&url).join("config")).unwrap();
    assert!(!config.contains(&url), "{config}");

    let (a_path, b_path) = (a.path.clone(), b.path.clone());
    workspaces.remove(a).await;
    workspaces.remove(b).await;
    assert!(!a_path.exists());
    assert!(!b_path.exists());
    let registered = std::fs::read_dir(workspaces.cache_path(&url).join("worktrees"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(registered, 0, "work trees are forgotten by the cache");
}

#[tokio::test]
async fn a_later_commit_is_fetched_into_an_existing_cache() {
    let root = tempfile::tempdir().unwrap();
    let (repo, first, _) = source_repo(root.path()).await;
    let workspaces = workspaces(root.path());
    let url = repo.display().to_string();
    let never = CancellationToken::new();
    let noop = |_: &str| {};
    let tree = workspaces
        .prepare(Remote::plain(&url), &first, "1-1", &noop, &never)
        .await
        .unwrap();
    workspaces.remove(tree).await;

    // A new commit appears upstream.
    std::fs::write(repo.join("version"), "three\n").unwrap();
    let commit = |args: &[&str]| {
        let mut spec = CommandSpec::new("git", &repo)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com");
        for arg in args {
            spec = spec.arg(*arg);
        }
        spec
    };
    let never2 = never.clone();
    let out = process::run_captured(
        &commit(&["commit", "--quiet", "-am", "three"]),
        Duration::from_secs(30),
        &never2,
    )
    .await
    .unwrap();
    assert!(out.status.success(), "{}", out.output_text());
    let head = process::run_captured(
        &commit(&["rev-parse", "HEAD"]),
        Duration::from_secs(30),
        &never2,
    )
    .await
    .unwrap();
    let third: CommitSha = head.output_text().trim().parse().unwrap();

    let tree = workspaces
        .prepare(Remote::plain(&url), &third, "2-1", &noop, &never)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(tree.path.join("version")).unwrap(),
        "three\n"
    );
    workspaces.remove(tree).await;
}

#[tokio::test]
async fn a_missing_commit_fails_fast_with_commit_not_found() {
    let root = tempfile::tempdir().unwrap();
    let (repo, _, _) = source_repo(root.path()).await;
    let workspaces = workspaces(root.path());
    let url = repo.display().to_string();
    let missing: CommitSha = "0123456789abcdef0123456789abcdef01234567".parse().unwrap();
    let lines = Lines::new();
    let log = |line: &str| lines.push(line);
    let started = Instant::now();
    let error = workspaces
        .prepare(
            Remote::plain(&url),
            &missing,
            "1-1",
            &log,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(20));
    match &error {
        WorkspaceError::CommitNotFound { commit, repo } => {
            assert_eq!(commit, &missing);
            assert_eq!(repo, &url);
        }
        other => panic!("expected CommitNotFound, got {other:?}"),
    }
    assert_eq!(
        error.to_string(),
        format!("commit {missing} not found in {url}")
    );
    assert!(!workspaces.tree_path("1-1").exists());
}

#[tokio::test]
async fn an_unreachable_repository_fails_with_git_s_reason() {
    let root = tempfile::tempdir().unwrap();
    let workspaces = workspaces(root.path());
    let url = root.path().join("nowhere").display().to_string();
    let commit: CommitSha = "0123456789abcdef0123456789abcdef01234567".parse().unwrap();
    let error = workspaces
        .prepare(
            Remote::plain(&url),
            &commit,
            "1-1",
            &|_: &str| {},
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&error, WorkspaceError::Git { operation, .. } if operation == "git fetch"),
        "{error:?}"
    );
}

#[tokio::test]
async fn option_like_urls_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let workspaces = workspaces(root.path());
    let commit: CommitSha = "0123456789abcdef0123456789abcdef01234567".parse().unwrap();
    let error = workspaces
        .prepare(
            Remote::plain("--upload-pack=touch /tmp/pwned"),
            &commit,
            "1-1",
            &|_: &str| {},
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, WorkspaceError::InvalidUrl(_)), "{error:?}");
}

#[tokio::test]
async fn leftovers_of_a_killed_agent_are_removed() {
    let root = tempfile::tempdir().unwrap();
    let (repo, first, _) = source_repo(root.path()).await;
    let workspaces = workspaces(root.path());
    let url = repo.display().to_string();
    let tree = workspaces
        .prepare(
            Remote::plain(&url),
            &first,
            "1-1",
            &|_: &str| {},
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    // The agent dies here; the next run cleans up.
    let path = tree.path.clone();
    drop(tree);
    workspaces.remove_leftovers().await;
    assert!(!path.exists());
    let registered = std::fs::read_dir(workspaces.cache_path(&url).join("worktrees"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(registered, 0);
    // And the same name can be used again.
    let again = workspaces
        .prepare(
            Remote::plain(&url),
            &first,
            "1-1",
            &|_: &str| {},
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    workspaces.remove(again).await;
}

const TOKEN: &str = "ghp_T0kenForTests0123456789";

fn basic_header(user_password: &str) -> GitHttpHeader {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(user_password);
    GitHttpHeader::new(format!("Authorization: Basic {encoded}"))
}

/// Serves a bare clone of the source repository as `<base>/repo.git`,
/// demanding `header`.
async fn private_server(root: &Path, source: &Path, header: &GitHttpHeader) -> GitHttpServer {
    let served = root.join("served");
    std::fs::create_dir_all(&served).unwrap();
    let clone = CommandSpec::new("git", &served)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", root.display().to_string())
        .arg("clone")
        .arg("--bare")
        .arg("--quiet")
        .arg(source)
        .arg("repo.git");
    let done = process::run_captured(&clone, Duration::from_secs(30), &CancellationToken::new())
        .await
        .unwrap();
    assert!(done.status.success(), "{}", done.output_text());
    let value = header
        .as_config_value()
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .to_owned();
    GitHttpServer::start(served, value).await
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if std::fs::read(&path)
            .unwrap_or_default()
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
        {
            found.push(path);
        }
    }
    found
}

#[tokio::test]
async fn a_private_repository_is_fetched_with_the_header_in_the_environment_only() {
    let root = tempfile::tempdir().unwrap();
    let (source, first, _) = source_repo(root.path()).await;
    let header = basic_header(&format!("x-access-token:{TOKEN}"));
    let server = private_server(root.path(), &source, &header).await;
    let url = format!("{}/repo.git", server.base_url);
    let never = CancellationToken::new();

    // Without the header: refused.
    let workspaces = workspaces(root.path());
    let error = workspaces
        .prepare(Remote::plain(&url), &first, "1-1", &|_: &str| {}, &never)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, WorkspaceError::Git { operation, .. } if operation == "git fetch"),
        "{error:?}"
    );
    assert!(server.seen().iter().all(|r| r.authorization.is_none()));

    // With it: fetched and checked out.
    let lines = Lines::new();
    let log = |line: &str| lines.push(line);
    let remote = Remote {
        url: &url,
        http_header: Some(&header),
    };
    let tree = workspaces
        .prepare(remote, &first, "2-1", &log, &never)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(tree.path.join("version")).unwrap(),
        "one\n"
    );
    let with_header: Vec<_> = server
        .seen()
        .into_iter()
        .filter(|r| r.authorization.is_some())
        .collect();
    assert!(!with_header.is_empty());
    assert!(with_header.iter().all(|r| r.path.starts_with("/repo.git/")));

    // The header went through GIT_CONFIG_* only: never argv, never a file.
    let cache = workspaces.cache_path(&url);
    let spec = workspaces.git_spec(
        &cache,
        Some(&Origin::new(remote)),
        ["fetch", "origin", "+refs/heads/*:refs/heads/*"],
    );
    let encoded = header.secret_parts();
    for arg in &spec.args {
        let arg = arg.to_string_lossy();
        for part in &encoded {
            assert!(!arg.contains(part.as_str()), "{arg:?} holds a secret");
        }
    }
    let count: usize = spec.env["GIT_CONFIG_COUNT"].parse().unwrap();
    let config: Vec<(&str, &str)> = (0..count)
        .map(|i| {
            (
                spec.env[&format!("GIT_CONFIG_KEY_{i}")].as_str(),
                spec.env[&format!("GIT_CONFIG_VALUE_{i}")].as_str(),
            )
        })
        .collect();
    assert!(config.contains(&("remote.origin.url", url.as_str())));
    let scoped = format!("http.{url}.extraHeader");
    assert!(config.contains(&(scoped.as_str(), header.as_config_value())));
    assert!(
        config.iter().all(|(key, _)| *key != "http.extraHeader"),
        "the header is scoped to the repository's URL: {config:?}"
    );
    assert!(!spec.env.contains_key(&format!("GIT_CONFIG_KEY_{count}")));
    // Commands that do not talk to the remote do not get it.
    let local = workspaces.git_spec(&cache, None, ["worktree", "prune"]);
    assert!(
        !local
            .env
            .values()
            .any(|v| v.contains(TOKEN) || v.contains("Authorization"))
    );
    for part in [TOKEN, "Authorization"] {
        let found = files_containing(&root.path().join("work"), part);
        assert!(found.is_empty(), "{part} found in {found:?}");
    }
    assert_eq!(lines.all(), [format!("fetching {url}")]);
    workspaces.remove(tree).await;
}

#[tokio::test]
async fn git_output_with_the_header_is_masked() {
    let root = tempfile::tempdir().unwrap();
    let (source, first, _) = source_repo(root.path()).await;
    let user_password = format!("x-access-token:{TOKEN}");
    let header = basic_header(&user_password);
    let server = private_server(root.path(), &source, &header).await;
    // The server repeats the Authorization header in its error, and the URL
    // holds the token too: both reach git's output and the log.
    let url = format!("{}/echo-auth/{TOKEN}/repo.git", server.base_url);
    let workspaces = workspaces(root.path());
    let lines = Lines::new();
    let log = |line: &str| lines.push(line);
    let error = workspaces
        .prepare(
            Remote {
                url: &url,
                http_header: Some(&header),
            },
            &first,
            "1-1",
            &log,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("remote error"), "{message}");
    assert!(message.contains("[MASKED]"), "{message}");
    let encoded = header
        .as_config_value()
        .rsplit_once(' ')
        .unwrap()
        .1
        .to_owned();
    let mut shown = lines.all();
    shown.push(message);
    shown.push(format!("{error:?}"));
    for text in &shown {
        for secret in [TOKEN, &user_password, &encoded, header.as_config_value()] {
            assert!(!text.contains(secret), "{secret:?} in {text:?}");
        }
    }
}

#[tokio::test]
async fn forgetting_removes_the_cache_and_idle_trees_and_keeps_busy_ones() {
    let root = tempfile::tempdir().unwrap();
    let (repo, first, second) = source_repo(root.path()).await;
    let url = repo.display().to_string();
    let never = CancellationToken::new();
    let noop = |_: &str| {};

    // An earlier run of the agent left a tree of the repository behind.
    let earlier = workspaces(root.path());
    let idle = earlier
        .prepare(Remote::plain(&url), &first, "1-1", &noop, &never)
        .await
        .unwrap();
    let idle_path = idle.path.clone();
    drop(earlier);

    // This run has a job of it running, and a job of another repository.
    let workspaces = workspaces(root.path());
    let busy = workspaces
        .prepare(Remote::plain(&url), &second, "2-1", &noop, &never)
        .await
        .unwrap();
    let other_root = root.path().join("other");
    std::fs::create_dir_all(&other_root).unwrap();
    let (other_repo, other_commit, _) = source_repo(&other_root).await;
    let other_url = other_repo.display().to_string();
    let other = workspaces
        .prepare(
            Remote::plain(&other_url),
            &other_commit,
            "3-1",
            &noop,
            &never,
        )
        .await
        .unwrap();

    let forgotten = workspaces.forget(&url).await;
    assert_eq!(forgotten.trees_removed, std::slice::from_ref(&idle_path));
    assert_eq!(forgotten.trees_kept, std::slice::from_ref(&busy.path));
    assert!(!forgotten.cache_removed, "the running job still uses it");
    assert!(!idle_path.exists());
    assert_eq!(
        std::fs::read_to_string(busy.path.join("version")).unwrap(),
        "two\n"
    );
    // Sent again (next session): nothing more goes.
    let again = workspaces.forget(&url).await;
    assert!(again.trees_removed.is_empty() && !again.cache_removed);
    assert_eq!(again.trees_kept, std::slice::from_ref(&busy.path));

    // The job ends: its tree goes, and the cache with it.
    let busy_path = busy.path.clone();
    workspaces.remove(busy).await;
    assert!(!busy_path.exists());
    assert!(!workspaces.cache_path(&url).exists());
    assert_eq!(workspaces.forget(&url).await, Forgotten::default());

    // The other repository is untouched.
    assert!(other.path.join("version").exists());
    assert!(workspaces.cache_path(&other_url).join("HEAD").is_file());
    workspaces.remove(other).await;
}

#[tokio::test]
async fn forgetting_an_idle_repository_removes_its_cache_at_once() {
    let root = tempfile::tempdir().unwrap();
    let (repo, first, _) = source_repo(root.path()).await;
    let url = repo.display().to_string();
    let never = CancellationToken::new();
    let workspaces = workspaces(root.path());
    let tree = workspaces
        .prepare(Remote::plain(&url), &first, "1-1", &|_: &str| {}, &never)
        .await
        .unwrap();
    workspaces.remove(tree).await;
    assert!(workspaces.cache_path(&url).exists());

    let forgotten = workspaces.forget(&url).await;
    assert!(forgotten.cache_removed);
    assert!(!workspaces.cache_path(&url).exists());
    let cache_dir = root.path().join("work").join("cache");
    assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 0);

    // Forgetting and fetching the same repository at once: the lock orders
    // them, and the job gets a complete tree either way.
    let (forgotten, tree) = tokio::join!(
        workspaces.forget(&url),
        workspaces.prepare(Remote::plain(&url), &first, "2-1", &|_: &str| {}, &never),
    );
    let tree = tree.unwrap();
    assert_eq!(
        std::fs::read_to_string(tree.path.join("version")).unwrap(),
        "one\n"
    );
    assert!(forgotten.trees_removed.is_empty());
    workspaces.remove(tree).await;
}

/// A running job owns its tree, `.git` included: it can turn any file there
/// into a FIFO. Forgetting its repository must not read from it (a blocking
/// read would hang the agent under the cache lock).
#[test]
fn forgetting_never_reads_a_running_jobs_tree() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let root = tempfile::tempdir().unwrap();
            let (repo, first, _) = source_repo(root.path()).await;
            let url = repo.display().to_string();
            let workspaces = workspaces(root.path());
            let busy = workspaces
                .prepare(
                    Remote::plain(&url),
                    &first,
                    "1-1",
                    &|_: &str| {},
                    &CancellationToken::new(),
                )
                .await
                .unwrap();
            let alternates = busy.path.join(".git/objects/info/alternates");
            std::fs::remove_file(&alternates).unwrap();
            nix::unistd::mkfifo(&alternates, nix::sys::stat::Mode::S_IRWXU).unwrap();
            let forgotten = workspaces.forget(&url).await;
            let _ = done_tx.send(forgotten.trees_kept == [busy.path.clone()]);
            // Unblock a reader that may still hang, then clean up.
            std::fs::remove_file(&alternates).unwrap();
        });
    });
    let kept = done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("forget returns although the tree holds a FIFO");
    assert!(kept, "the running job's tree is kept");
}
