//! Git on the agent: one bare cache clone per repository under
//! `<work_dir>/cache`, and one detached work tree per job attempt under
//! `<work_dir>/jobs`, so concurrent jobs of one repository never share a
//! work tree. Git operations on one cache are serialised by a per-repository
//! async mutex.
//!
//! The repository URL reaches git through the environment
//! (`GIT_CONFIG_*` = `remote.origin.url`), never through argv or the cache's
//! config file, so credentials in a URL are not visible in `ps` or on disk.

mod redact;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hobotnica_common::ids::CommitSha;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub use redact::redact_url;

use crate::process::{self, Captured, CommandSpec, RunError};

/// Why a work tree could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("refusing git URL {0:?}")]
    InvalidUrl(String),
    /// The commit is in none of the repository's branches or tags, and the
    /// server does not serve it by id either.
    #[error("commit {commit} not found in {repo}")]
    CommitNotFound { commit: CommitSha, repo: String },
    #[error("{operation} failed: {detail}")]
    Git { operation: String, detail: String },
    #[error("{operation} timed out after {} s", timeout.as_secs())]
    TimedOut {
        operation: String,
        timeout: Duration,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> WorkspaceError {
    let context = context.into();
    move |source| WorkspaceError::Io { context, source }
}

/// A job's checked-out tree. Give it back with [`Workspaces::remove`].
#[derive(Debug)]
pub struct WorkTree {
    pub path: PathBuf,
    cache: PathBuf,
}

/// Receives progress lines meant for the job's log.
pub type LogLine<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// The agent's git caches and job work trees.
pub struct Workspaces {
    cache_dir: PathBuf,
    jobs_dir: PathBuf,
    /// PATH, HOME, LANG from the agent, and git settings.
    base_env: BTreeMap<String, String>,
    git_timeout: Duration,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

/// Variables git gets from the agent's environment.
const GIT_INHERITED_VARS: &[&str] = &["PATH", "HOME", "LANG"];

impl Workspaces {
    /// Uses (and creates) `<work_dir>/cache` and `<work_dir>/jobs`.
    /// `work_dir` must be absolute.
    pub fn new(
        work_dir: &Path,
        inherited_env: &[(String, String)],
        git_timeout: Duration,
    ) -> io::Result<Workspaces> {
        let cache_dir = work_dir.join("cache");
        let jobs_dir = work_dir.join("jobs");
        std::fs::create_dir_all(&cache_dir)?;
        std::fs::create_dir_all(&jobs_dir)?;
        let mut base_env: BTreeMap<String, String> = inherited_env
            .iter()
            .filter(|(name, _)| GIT_INHERITED_VARS.contains(&name.as_str()))
            .cloned()
            .collect();
        base_env
            .entry("PATH".to_owned())
            .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".to_owned());
        base_env.insert("GIT_TERMINAL_PROMPT".to_owned(), "0".to_owned());
        // No remote helpers that run commands (`ext::`), whatever the
        // user's git configuration says.
        base_env.insert(
            "GIT_ALLOW_PROTOCOL".to_owned(),
            "file:git:http:https:ssh".to_owned(),
        );
        Ok(Workspaces {
            cache_dir,
            jobs_dir,
            base_env,
            git_timeout,
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// The bare cache clone of `git_url`.
    pub fn cache_path(&self, git_url: &str) -> PathBuf {
        let digest = hex::encode(Sha256::digest(git_url.as_bytes()));
        self.cache_dir.join(format!("{}.git", &digest[..16]))
    }

    /// The work tree directory named `name`.
    pub fn tree_path(&self, name: &str) -> PathBuf {
        self.jobs_dir.join(name)
    }

    fn lock_for(&self, cache: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(cache.to_owned()).or_default().clone()
    }

    /// Removes work trees left by an earlier run of the agent (killed
    /// mid-job) and forgets them in every cache.
    pub async fn remove_leftovers(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.jobs_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                tracing::info!(path = %path.display(), "removing a work tree left by an earlier run");
                if let Err(error) = std::fs::remove_dir_all(&path) {
                    tracing::warn!(%error, path = %path.display(), "could not remove a leftover work tree");
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.cache_dir) {
            for entry in entries.flatten() {
                let cache = entry.path();
                let lock = self.lock_for(&cache);
                let _guard = lock.lock().await;
                let never = CancellationToken::new();
                if let Err(error) = self
                    .git(
                        &cache,
                        None,
                        "git worktree prune",
                        &never,
                        ["worktree", "prune"],
                    )
                    .await
                {
                    tracing::warn!(%error, cache = %cache.display(), "could not prune work trees");
                }
            }
        }
    }

    /// Makes a work tree named `name` at `commit` of `git_url`, fetching
    /// into the cache when the commit is not there yet. Progress lines go to
    /// `log`. Cancelling `cancel` kills git and returns
    /// [`WorkspaceError::Cancelled`].
    pub async fn prepare(
        &self,
        git_url: &str,
        commit: &CommitSha,
        name: &str,
        log: LogLine<'_>,
        cancel: &CancellationToken,
    ) -> Result<WorkTree, WorkspaceError> {
        let shown_url = redact_url(git_url);
        if git_url.is_empty() || git_url.starts_with('-') || git_url.contains(['\n', '\0']) {
            return Err(WorkspaceError::InvalidUrl(shown_url));
        }
        let cache = self.cache_path(git_url);
        let lock = self.lock_for(&cache);
        let _guard = tokio::select! {
            guard = lock.lock() => guard,
            () = cancel.cancelled() => return Err(WorkspaceError::Cancelled),
        };

        self.ensure_cache(&cache, cancel).await?;
        if !self.has_commit(&cache, commit, cancel).await? {
            log(&format!("fetching {shown_url}"));
            let fetched = self
                .git(
                    &cache,
                    Some(git_url),
                    "git fetch",
                    cancel,
                    [
                        "fetch",
                        "--prune",
                        "--no-tags",
                        "origin",
                        "+refs/heads/*:refs/heads/*",
                        "+refs/tags/*:refs/tags/*",
                    ],
                )
                .await;
            let fetch_error = match fetched {
                Ok(_) => None,
                Err(error @ (WorkspaceError::Cancelled | WorkspaceError::TimedOut { .. })) => {
                    return Err(error);
                }
                Err(error) => {
                    log(&error.to_string());
                    Some(error)
                }
            };
            if !self.has_commit(&cache, commit, cancel).await? {
                // Servers that allow it serve any reachable commit by id.
                match self
                    .git(
                        &cache,
                        Some(git_url),
                        "git fetch <commit>",
                        cancel,
                        ["fetch", "--no-tags", "origin", commit.as_str()],
                    )
                    .await
                {
                    Ok(_) => {}
                    Err(error @ (WorkspaceError::Cancelled | WorkspaceError::TimedOut { .. })) => {
                        return Err(error);
                    }
                    Err(_) => {}
                }
                if !self.has_commit(&cache, commit, cancel).await? {
                    if let Some(error) = fetch_error {
                        return Err(error);
                    }
                    return Err(WorkspaceError::CommitNotFound {
                        commit: commit.clone(),
                        repo: shown_url,
                    });
                }
            }
        }

        let path = self.tree_path(name);
        if path.exists() {
            // A previous attempt with this name did not clean up.
            std::fs::remove_dir_all(&path).map_err(io_error(format!(
                "removing the old work tree {}",
                path.display()
            )))?;
            let _ = self
                .git(
                    &cache,
                    None,
                    "git worktree prune",
                    cancel,
                    ["worktree", "prune"],
                )
                .await;
        }
        self.git(
            &cache,
            None,
            "git worktree add",
            cancel,
            [
                "worktree".as_ref(),
                "add".as_ref(),
                "--detach".as_ref(),
                "--force".as_ref(),
                "--".as_ref(),
                path.as_os_str(),
                commit.as_str().as_ref(),
            ],
        )
        .await?;
        Ok(WorkTree { path, cache })
    }

    /// Removes a work tree (never fails; problems are logged).
    pub async fn remove(&self, tree: WorkTree) {
        let lock = self.lock_for(&tree.cache);
        let _guard = lock.lock().await;
        let never = CancellationToken::new();
        let removed = self
            .git(
                &tree.cache,
                None,
                "git worktree remove",
                &never,
                [
                    "worktree".as_ref(),
                    "remove".as_ref(),
                    "--force".as_ref(),
                    "--".as_ref(),
                    tree.path.as_os_str(),
                ],
            )
            .await;
        if let Err(error) = removed {
            tracing::debug!(%error, "git worktree remove failed; removing the directory");
            if let Err(error) = std::fs::remove_dir_all(&tree.path)
                && error.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(%error, path = %tree.path.display(), "could not remove a work tree");
            }
            if let Err(error) = self
                .git(
                    &tree.cache,
                    None,
                    "git worktree prune",
                    &never,
                    ["worktree", "prune"],
                )
                .await
            {
                tracing::warn!(%error, "git worktree prune failed");
            }
        }
    }

    async fn ensure_cache(
        &self,
        cache: &Path,
        cancel: &CancellationToken,
    ) -> Result<(), WorkspaceError> {
        if cache.join("HEAD").is_file() {
            return Ok(());
        }
        if cache.exists() {
            // A clone interrupted by a crash.
            std::fs::remove_dir_all(cache).map_err(io_error(format!(
                "removing the broken cache {}",
                cache.display()
            )))?;
        }
        let spec = CommandSpec {
            env: self.base_env.clone(),
            ..CommandSpec::new("git", &self.cache_dir)
                .arg("init")
                .arg("--bare")
                .arg("--quiet")
                .arg("--")
                .arg(cache)
        };
        let captured = self.run(&spec, "git init", cancel).await?;
        check_success("git init", &captured)
    }

    async fn has_commit(
        &self,
        cache: &Path,
        commit: &CommitSha,
        cancel: &CancellationToken,
    ) -> Result<bool, WorkspaceError> {
        let object = format!("{}^{{commit}}", commit.as_str());
        let spec = self.git_spec(cache, None, ["cat-file", "-e", object.as_str()]);
        let captured = self.run(&spec, "git cat-file", cancel).await?;
        Ok(captured.status.success())
    }

    fn git_spec<I, S>(&self, cache: &Path, url: Option<&str>, args: I) -> CommandSpec
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut env = self.base_env.clone();
        env.insert("GIT_DIR".to_owned(), cache.display().to_string());
        let mut config: Vec<(&str, &str)> = vec![
            // Housekeeping runs inside the command (under the cache lock),
            // not in a background process racing the next job.
            ("gc.autoDetach", "false"),
            ("maintenance.autoDetach", "false"),
        ];
        if let Some(url) = url {
            config.push(("remote.origin.url", url));
        }
        env.insert("GIT_CONFIG_COUNT".to_owned(), config.len().to_string());
        for (i, (key, value)) in config.into_iter().enumerate() {
            env.insert(format!("GIT_CONFIG_KEY_{i}"), key.to_owned());
            env.insert(format!("GIT_CONFIG_VALUE_{i}"), value.to_owned());
        }
        CommandSpec {
            program: "git".into(),
            args: args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
            env,
            cwd: cache.to_owned(),
        }
    }

    async fn run(
        &self,
        spec: &CommandSpec,
        operation: &str,
        cancel: &CancellationToken,
    ) -> Result<Captured, WorkspaceError> {
        match process::run_captured(spec, self.git_timeout, cancel).await {
            Ok(captured) => Ok(captured),
            Err(RunError::Cancelled) => Err(WorkspaceError::Cancelled),
            Err(RunError::TimedOut(timeout)) => Err(WorkspaceError::TimedOut {
                operation: operation.to_owned(),
                timeout,
            }),
            Err(error) => Err(WorkspaceError::Git {
                operation: operation.to_owned(),
                detail: error.to_string(),
            }),
        }
    }

    /// Runs git on `cache` and fails unless it exits with 0.
    async fn git<I, S>(
        &self,
        cache: &Path,
        url: Option<&str>,
        operation: &str,
        cancel: &CancellationToken,
        args: I,
    ) -> Result<Captured, WorkspaceError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let spec = self.git_spec(cache, url, args);
        let captured = self.run(&spec, operation, cancel).await?;
        check_success(operation, &captured).map_err(|error| match (error, url) {
            (WorkspaceError::Git { operation, detail }, Some(url)) => WorkspaceError::Git {
                operation,
                detail: redact::scrub(&detail, url),
            },
            (error, _) => error,
        })?;
        Ok(captured)
    }
}

/// Lines of git's output kept in an error message.
const ERROR_LINES: usize = 5;

fn check_success(operation: &str, captured: &Captured) -> Result<(), WorkspaceError> {
    if captured.status.success() {
        return Ok(());
    }
    let text = captured.output_text();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(ERROR_LINES)..].join("; ");
    let status = match captured.status.code() {
        Some(code) => format!("exit code {code}"),
        None => "killed by a signal".to_owned(),
    };
    Err(WorkspaceError::Git {
        operation: operation.to_owned(),
        detail: if tail.is_empty() {
            status
        } else {
            format!("{status}: {tail}")
        },
    })
}

#[cfg(test)]
mod tests;
