#![allow(clippy::unwrap_used)]

use std::sync::Mutex as StdMutex;
use std::time::Instant;

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
        workspaces.prepare(&url, &first, "1-1", &log, &never),
        workspaces.prepare(&url, &second, "2-1", &log, &never),
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
        .prepare(&url, &first, "1-1", &noop, &never)
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
        .prepare(&url, &third, "2-1", &noop, &never)
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
        .prepare(&url, &missing, "1-1", &log, &CancellationToken::new())
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
            &url,
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
            "--upload-pack=touch /tmp/pwned",
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
            &url,
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
            &url,
            &first,
            "1-1",
            &|_: &str| {},
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    workspaces.remove(again).await;
}
