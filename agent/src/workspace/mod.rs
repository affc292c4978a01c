//! Git on the agent: one bare cache clone per repository under
//! `<work_dir>/cache`, and one work tree per job attempt under
//! `<work_dir>/jobs`, so concurrent jobs of one repository never share a
//! work tree, with the job's private `/tmp` and `HOME` under
//! `<work_dir>/scratch`. Git operations on one cache are serialised by a
//! per-repository async mutex.
//!
//! The cache is the agent's alone. A job's tree is a repository of its own
//! (`.git` is a directory, not a link into the cache) that borrows the
//! cache's objects through `objects/info/alternates`; the sandbox shows the
//! job that object store read-only and nothing else of the cache. A ref
//! `refs/hobotnica/trees/<name>` in the cache keeps the job's commit from
//! being pruned while the tree exists. The agent's own git never runs hooks
//! (`core.hooksPath=/dev/null`) or an fsmonitor, and the cache's `config` is
//! rewritten and its `hooks/` removed before every use, so a tree (or, with
//! `--isolation none`, a job) that wrote into them cannot make the next
//! job's git run anything.
//!
//! The repository URL, and the HTTP header of a private repository, reach
//! git through the environment (`GIT_CONFIG_*` = `remote.origin.url`,
//! `http.<url>.extraHeader`), never through argv or the cache's config file, so
//! credentials are not visible in `ps` or on disk. Git's output is scrubbed
//! of them before it becomes an error message.
//!
//! A repository the agent may no longer access is forgotten
//! ([`Workspaces::forget`]): its cache and idle work trees are deleted at
//! once; the trees of running jobs stay until those jobs end, and the cache
//! goes with the last of them (their trees share its object store).

mod http_header;
mod redact;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hobotnica_common::ids::CommitSha;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub use http_header::GitHttpHeader;
pub use redact::redact_url;

use crate::logs::Secrets;
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
    /// The job's private directories (`tmp/`, `home/`).
    pub scratch: PathBuf,
    cache: PathBuf,
    name: String,
    /// When the cache clone had the commit (cloned, fetched, or already
    /// there).
    pub commit_ready_at: DateTime<Utc>,
    /// Whether that took a `git fetch`.
    pub fetch_ran: bool,
}

impl WorkTree {
    /// The cache's object store, which the tree's `.git` borrows from
    /// (read-only in the sandbox).
    pub fn shared_objects(&self) -> PathBuf {
        self.cache.join("objects")
    }
}

/// Where a job's files are, before its tree is checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDirs {
    /// The work tree (see [`WorkTree::path`]).
    pub tree: PathBuf,
    /// The job's private directories (`tmp/`, `home/`).
    pub scratch: PathBuf,
    /// The cache's object store (see [`WorkTree::shared_objects`]).
    pub shared_objects: PathBuf,
}

/// Receives progress lines meant for the job's log.
pub type LogLine<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// Where a job's commit comes from.
#[derive(Debug, Clone, Copy)]
pub struct Remote<'a> {
    /// Anything git can fetch from.
    pub url: &'a str,
    /// Sent with every HTTP request to the remote (private repositories).
    pub http_header: Option<&'a GitHttpHeader>,
}

#[cfg(test)]
impl<'a> Remote<'a> {
    /// A remote that needs no header.
    pub fn plain(url: &'a str) -> Remote<'a> {
        Remote {
            url,
            http_header: None,
        }
    }
}

/// A remote as git commands see it, with what must be scrubbed from their
/// output.
struct Origin<'a> {
    url: &'a str,
    http_header: Option<&'a GitHttpHeader>,
    /// The header's secret parts.
    secrets: Secrets,
}

impl<'a> Origin<'a> {
    fn new(remote: Remote<'a>) -> Origin<'a> {
        Origin {
            url: remote.url,
            http_header: remote.http_header,
            secrets: Secrets::new(
                remote
                    .http_header
                    .map(GitHttpHeader::secret_parts)
                    .unwrap_or_default(),
            ),
        }
    }

    /// `text` without the URL's credentials and the header's secrets.
    fn scrub(&self, text: &str) -> String {
        self.secrets.mask(&redact::scrub(text, self.url))
    }
}

/// What [`Workspaces::forget`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Forgotten {
    /// The cache clone was deleted now.
    pub cache_removed: bool,
    /// Idle work trees deleted.
    pub trees_removed: Vec<PathBuf>,
    /// Work trees of running jobs, removed when their jobs end (and the
    /// cache with the last of them).
    pub trees_kept: Vec<PathBuf>,
}

/// Which work trees are handed out, and which caches wait for theirs to be
/// given back before they are deleted.
#[derive(Default)]
struct Trees {
    /// Work trees given out by [`Workspaces::prepare`] and not yet removed,
    /// by cache.
    in_use: HashMap<PathBuf, HashSet<PathBuf>>,
    /// Forgotten caches still used by a running job, with the repository's
    /// redacted URL (for the log).
    forgotten: HashMap<PathBuf, String>,
}

/// The agent's git caches and job work trees.
pub struct Workspaces {
    cache_dir: PathBuf,
    jobs_dir: PathBuf,
    scratch_dir: PathBuf,
    /// PATH, HOME, LANG from the agent, and git settings.
    base_env: BTreeMap<String, String>,
    git_timeout: Duration,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    trees: Mutex<Trees>,
}

/// Settings every git command of the agent runs with, above any
/// repository's configuration: no hooks, no fsmonitor (both run programs).
const HARDENING: &[(&str, &str)] = &[("core.hooksPath", "/dev/null"), ("core.fsmonitor", "false")];

/// Variables git gets from the agent's environment.
const GIT_INHERITED_VARS: &[&str] = &["PATH", "HOME", "LANG"];

impl Workspaces {
    /// Uses (and creates) `<work_dir>/cache`, `<work_dir>/jobs` and
    /// `<work_dir>/scratch`. `work_dir` must be absolute.
    pub fn new(
        work_dir: &Path,
        inherited_env: &[(String, String)],
        git_timeout: Duration,
    ) -> io::Result<Workspaces> {
        let cache_dir = work_dir.join("cache");
        let jobs_dir = work_dir.join("jobs");
        let scratch_dir = work_dir.join("scratch");
        for dir in [&cache_dir, &jobs_dir, &scratch_dir] {
            crate::create_private_dir(dir)?;
        }
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
            scratch_dir,
            base_env,
            git_timeout,
            locks: Mutex::new(HashMap::new()),
            trees: Mutex::new(Trees::default()),
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

    /// The directories of the job named `name` of the repository at
    /// `git_url`.
    pub fn job_dirs(&self, git_url: &str, name: &str) -> JobDirs {
        JobDirs {
            tree: self.tree_path(name),
            scratch: self.scratch_dir.join(name),
            shared_objects: self.cache_path(git_url).join("objects"),
        }
    }

    fn lock_for(&self, cache: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(cache.to_owned()).or_default().clone()
    }

    fn trees(&self) -> std::sync::MutexGuard<'_, Trees> {
        self.trees.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes work trees left by an earlier run of the agent (killed
    /// mid-job) and forgets them in every cache.
    pub async fn remove_leftovers(&self) {
        for dir in [&self.jobs_dir, &self.scratch_dir] {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
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
                if cache.extension().is_some_and(|e| e == FORGOTTEN_EXTENSION) {
                    // A forgotten cache whose deletion was interrupted.
                    if let Err(error) = std::fs::remove_dir_all(&cache) {
                        tracing::warn!(%error, path = %cache.display(), "could not remove a forgotten cache");
                    }
                    continue;
                }
                let lock = self.lock_for(&cache);
                let _guard = lock.lock().await;
                let never = CancellationToken::new();
                if let Err(error) = self.delete_tree_refs(&cache, &never).await {
                    tracing::warn!(%error, cache = %cache.display(), "could not delete the refs of old work trees");
                }
            }
        }
    }

    /// [`Workspaces::prepare_then`] with nothing to do once the
    /// directories exist.
    #[cfg(test)]
    pub async fn prepare(
        &self,
        remote: Remote<'_>,
        commit: &CommitSha,
        name: &str,
        log: LogLine<'_>,
        cancel: &CancellationToken,
    ) -> Result<WorkTree, WorkspaceError> {
        self.prepare_then(remote, commit, name, log, cancel, |_| {})
            .await
    }

    /// Makes a work tree named `name` at `commit` of `remote`, fetching
    /// into the cache when the commit is not there yet. Progress lines go to
    /// `log`. Cancelling `cancel` kills git and returns
    /// [`WorkspaceError::Cancelled`]. Nothing returned or logged contains the
    /// URL's credentials or the header's secrets.
    ///
    /// Under the cache's lock: clear the tree's directories and check the
    /// commit out; when that fails because the cache lacks the commit,
    /// fetch it and check it out again; then keep the commit with a ref.
    ///
    /// `dirs_made` is called once the job's directories exist (the tree
    /// still empty), before the checkout: what needs only the directories
    /// (a sandbox around them) can be made while git works. The tree and
    /// scratch directories keep their identity until the tree is removed
    /// (a checkout tried again empties the tree in place), so a mount of
    /// them stays valid.
    pub async fn prepare_then(
        &self,
        remote: Remote<'_>,
        commit: &CommitSha,
        name: &str,
        log: LogLine<'_>,
        cancel: &CancellationToken,
        dirs_made: impl FnOnce(&JobDirs),
    ) -> Result<WorkTree, WorkspaceError> {
        let origin = Origin::new(remote);
        let git_url = remote.url;
        let shown_url = origin.scrub(&redact_url(git_url));
        if git_url.is_empty() || git_url.starts_with('-') || git_url.contains(['\n', '\0']) {
            return Err(WorkspaceError::InvalidUrl(shown_url));
        }
        let cache = self.cache_path(git_url);
        let lock = self.lock_for(&cache);
        let _guard = tokio::select! {
            guard = lock.lock() => guard,
            () = cancel.cancelled() => return Err(WorkspaceError::Cancelled),
        };
        // A job of a forgotten repository: it is wanted again.
        self.trees().forgotten.remove(&cache);

        self.ensure_cache(&cache, cancel).await?;
        // The commit is usually in the cache already: check it out at once,
        // and look for it (and fetch it) only when that fails — one git
        // process less per job than asking first.
        let (path, scratch) = self.fresh_tree_dirs(name)?;
        dirs_made(&self.job_dirs(git_url, name));
        let prepared = self
            .check_out_or_fetch(&cache, &origin, commit, name, log, cancel)
            .await
            // Still under the cache's lock: nothing can prune the commit
            // before this ref keeps it.
            .and_then(|ready| keep_commit(&cache, name, commit).map(|()| ready));
        let (fetch_ran, commit_ready_at) = match prepared {
            Ok(ready) => ready,
            Err(error) => {
                for dir in [&path, &scratch] {
                    let _ = std::fs::remove_dir_all(dir);
                }
                return Err(error);
            }
        };
        self.trees()
            .in_use
            .entry(cache.clone())
            .or_default()
            .insert(path.clone());
        Ok(WorkTree {
            path,
            scratch,
            cache,
            name: name.to_owned(),
            commit_ready_at,
            fetch_ran,
        })
    }

    /// Makes sure `commit` is in `cache`: if it is not, fetches the
    /// remote's branches and tags, then (still missing) the commit by its
    /// id. When it is missing after both, fails with the error of the
    /// branches-and-tags fetch, or [`WorkspaceError::CommitNotFound`] when
    /// that fetch worked. A cancel or a timeout of either fetch ends it at
    /// once. Returns whether anything was fetched (false: the cache had the
    /// commit).
    async fn ensure_commit(
        &self,
        cache: &Path,
        origin: &Origin<'_>,
        commit: &CommitSha,
        shown_url: &str,
        log: LogLine<'_>,
        cancel: &CancellationToken,
    ) -> Result<bool, WorkspaceError> {
        if self.has_commit(cache, commit, cancel).await? {
            return Ok(false);
        }
        log(&format!("fetching {shown_url}"));
        let fetch_error = self
            .fetch_branches_and_tags(cache, origin, log, cancel)
            .await?;
        if self.has_commit(cache, commit, cancel).await? {
            return Ok(true);
        }
        self.fetch_by_id(cache, origin, commit, cancel).await?;
        if self.has_commit(cache, commit, cancel).await? {
            return Ok(true);
        }
        if let Some(error) = fetch_error {
            return Err(error);
        }
        Err(WorkspaceError::CommitNotFound {
            commit: commit.clone(),
            repo: shown_url.to_owned(),
        })
    }

    /// Fetches every branch and tag of the remote into `cache` (pruning
    /// those gone). A failed fetch is logged and returned as `Ok(Some)`: the
    /// commit may still come by its id. Only a cancel or a timeout is an
    /// error.
    async fn fetch_branches_and_tags(
        &self,
        cache: &Path,
        origin: &Origin<'_>,
        log: LogLine<'_>,
        cancel: &CancellationToken,
    ) -> Result<Option<WorkspaceError>, WorkspaceError> {
        let fetched = self
            .git(
                cache,
                Some(origin),
                "git fetch",
                cancel,
                [
                    "fetch",
                    "--no-write-fetch-head",
                    "--prune",
                    "--no-tags",
                    "origin",
                    "+refs/heads/*:refs/heads/*",
                    "+refs/tags/*:refs/tags/*",
                ],
            )
            .await;
        match fetched {
            Ok(_) => Ok(None),
            Err(error @ (WorkspaceError::Cancelled | WorkspaceError::TimedOut { .. })) => {
                Err(error)
            }
            Err(error) => {
                log(&error.to_string());
                Ok(Some(error))
            }
        }
    }

    /// Fetches `commit` by its id, which servers that allow it serve for
    /// any reachable commit. Its failure is ignored (the caller checks
    /// whether the commit came); only a cancel or a timeout is an error.
    async fn fetch_by_id(
        &self,
        cache: &Path,
        origin: &Origin<'_>,
        commit: &CommitSha,
        cancel: &CancellationToken,
    ) -> Result<(), WorkspaceError> {
        let fetched = self
            .git(
                cache,
                Some(origin),
                "git fetch <commit>",
                cancel,
                [
                    "fetch",
                    "--no-write-fetch-head",
                    "--no-tags",
                    "origin",
                    commit.as_str(),
                ],
            )
            .await;
        match fetched {
            Err(error @ (WorkspaceError::Cancelled | WorkspaceError::TimedOut { .. })) => {
                Err(error)
            }
            Ok(_) | Err(_) => Ok(()),
        }
    }

    /// The work tree and scratch directories of `name`, emptied: what a
    /// previous attempt with this name left is removed, the scratch's
    /// `tmp/` and `home/` are created private, and the tree empty (filled
    /// by [`Workspaces::check_out`]). Returns `(tree, scratch)`.
    fn fresh_tree_dirs(&self, name: &str) -> Result<(PathBuf, PathBuf), WorkspaceError> {
        let path = self.tree_path(name);
        let scratch = self.scratch_dir.join(name);
        for old in [&path, &scratch] {
            if old.exists() {
                // A previous attempt with this name did not clean up.
                std::fs::remove_dir_all(old).map_err(io_error(format!(
                    "removing the old work tree {}",
                    old.display()
                )))?;
            }
        }
        for dir in [scratch.clone(), scratch.join("tmp"), scratch.join("home")] {
            crate::create_private_dir(&dir)
                .map_err(io_error(format!("creating {}", dir.display())))?;
        }
        std::fs::create_dir(&path).map_err(io_error(format!("creating {}", path.display())))?;
        Ok((path, scratch))
    }

    /// Checks `commit` out into the tree `name` (its directories fresh);
    /// when that fails because the cache lacks the commit, fetches it and
    /// checks it out again. Returns whether it fetched and when the commit
    /// was in the cache.
    async fn check_out_or_fetch(
        &self,
        cache: &Path,
        origin: &Origin<'_>,
        commit: &CommitSha,
        name: &str,
        log: LogLine<'_>,
        cancel: &CancellationToken,
    ) -> Result<(bool, DateTime<Utc>), WorkspaceError> {
        let ready = Utc::now();
        let error = match self
            .check_out(cache, &self.tree_path(name), commit, cancel)
            .await
        {
            Ok(()) => return Ok((false, ready)),
            Err(error @ (WorkspaceError::Cancelled | WorkspaceError::TimedOut { .. })) => {
                return Err(error);
            }
            Err(error) => error,
        };
        if self.has_commit(cache, commit, cancel).await? {
            return Err(error);
        }
        let shown_url = origin.scrub(&redact_url(origin.url));
        let fetched = self
            .ensure_commit(cache, origin, commit, &shown_url, log, cancel)
            .await?;
        let ready = Utc::now();
        let path = self.tree_path(name);
        empty_dir(&path).map_err(io_error(format!("emptying {}", path.display())))?;
        self.check_out(cache, &path, commit, cancel).await?;
        Ok((fetched, ready))
    }

    /// Makes `tree` a repository of its own at `commit`, borrowing the
    /// cache's objects: nothing in it points back into the cache but the
    /// path of its object store.
    async fn check_out(
        &self,
        cache: &Path,
        tree: &Path,
        commit: &CommitSha,
        cancel: &CancellationToken,
    ) -> Result<(), WorkspaceError> {
        // The smallest repository git accepts, written directly (one git
        // process less per job than `git init`): HEAD, config, refs/,
        // objects/ with the cache's objects as alternates.
        let git_dir = tree.join(".git");
        let mut alternates = cache.join("objects").into_os_string();
        alternates.push("\n");
        let made = [
            git_dir.join("refs/heads"),
            git_dir.join("refs/tags"),
            git_dir.join("objects/info"),
        ]
        .iter()
        .try_for_each(std::fs::create_dir_all)
        .and_then(|()| std::fs::write(git_dir.join("HEAD"), "ref: refs/heads/main\n"))
        .and_then(|()| std::fs::write(git_dir.join("config"), TREE_CONFIG))
        .and_then(|()| {
            std::fs::write(
                git_dir.join("objects/info/alternates"),
                alternates.as_encoded_bytes(),
            )
        });
        made.map_err(io_error(format!("creating {}", git_dir.display())))?;
        let mut checkout = self.git_spec(
            &tree.join(".git"),
            None,
            ["checkout", "--quiet", "--detach", commit.as_str()],
        );
        checkout
            .env
            .insert("GIT_WORK_TREE".to_owned(), tree.display().to_string());
        checkout.cwd = tree.to_owned();
        let captured = self.run(&checkout, "git checkout", cancel).await?;
        check_success("git checkout", &captured)
    }

    /// Deletes the refs that keep work trees' commits (of an earlier run).
    async fn delete_tree_refs(
        &self,
        cache: &Path,
        cancel: &CancellationToken,
    ) -> Result<(), WorkspaceError> {
        self.harden(cache, true)
            .map_err(io_error(format!("resetting {}", cache.display())))?;
        let listed = self
            .git(
                cache,
                None,
                "git for-each-ref",
                cancel,
                ["for-each-ref", "--format=%(refname)", TREE_REFS],
            )
            .await?;
        for name in listed.output_text().lines().filter(|l| !l.is_empty()) {
            self.git(
                cache,
                None,
                "git update-ref -d",
                cancel,
                ["update-ref", "-d", name],
            )
            .await?;
        }
        Ok(())
    }

    /// Removes a work tree and its scratch directories (never fails;
    /// problems are logged).
    pub async fn remove(&self, tree: WorkTree) {
        let lock = self.lock_for(&tree.cache);
        let _guard = lock.lock().await;
        let never = CancellationToken::new();
        for dir in [&tree.path, &tree.scratch] {
            if let Err(error) = std::fs::remove_dir_all(dir)
                && error.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(%error, path = %dir.display(), "could not remove a work tree");
            }
        }
        let keep = tree_ref(&tree.name);
        // Normally still the loose file written by prepare; git may have
        // packed it meanwhile (gc), then git deletes it.
        if tree.cache.exists()
            && std::fs::remove_file(tree.cache.join(&keep)).is_err()
            && let Err(error) = self
                .git(
                    &tree.cache,
                    None,
                    "git update-ref -d",
                    &never,
                    ["update-ref", "-d", &keep],
                )
                .await
        {
            tracing::warn!(%error, "could not delete a work tree's ref");
        }
        let forgotten = {
            let mut trees = self.trees();
            if let Some(in_use) = trees.in_use.get_mut(&tree.cache) {
                in_use.remove(&tree.path);
                if in_use.is_empty() {
                    trees.in_use.remove(&tree.cache);
                }
            }
            if trees.in_use.contains_key(&tree.cache) {
                None
            } else {
                trees.forgotten.remove(&tree.cache)
            }
        };
        if let Some(repo) = forgotten {
            match self.delete_cache(&tree.cache) {
                Ok(true) => tracing::info!(
                    repo,
                    "removed the cache of a forgotten repository after its last job"
                ),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, repo, "could not remove the cache of a forgotten repository");
                }
            }
        }
    }

    /// Deletes the cache clone of `git_url` and every work tree of it that
    /// no running job uses; the trees of running jobs stay until their jobs
    /// end, and the cache is deleted with the last of them. Idempotent;
    /// waits for git work on the same repository (the per-repository lock).
    pub async fn forget(&self, git_url: &str) -> Forgotten {
        let cache = self.cache_path(git_url);
        let repo = redact_url(git_url);
        let lock = self.lock_for(&cache);
        let _guard = lock.lock().await;
        // Trees of running jobs are known without reading them: a running
        // job may have made any file of its tree a FIFO or a link.
        let (in_use, busy_anywhere): (HashSet<PathBuf>, HashSet<PathBuf>) = {
            let trees = self.trees();
            (
                trees.in_use.get(&cache).cloned().unwrap_or_default(),
                trees.in_use.values().flatten().cloned().collect(),
            )
        };
        let mut forgotten = Forgotten {
            trees_kept: in_use.iter().cloned().collect(),
            ..Forgotten::default()
        };
        forgotten.trees_kept.sort();
        if let Ok(entries) = std::fs::read_dir(&self.jobs_dir) {
            for entry in entries.flatten() {
                let tree = entry.path();
                if busy_anywhere.contains(&tree) || !is_tree_of(&tree, &cache) {
                    continue;
                }
                if let Some(name) = tree.file_name() {
                    let _ = std::fs::remove_dir_all(self.scratch_dir.join(name));
                }
                match std::fs::remove_dir_all(&tree) {
                    Ok(()) => forgotten.trees_removed.push(tree),
                    Err(error) => {
                        tracing::warn!(%error, path = %tree.display(), "could not remove a work tree of a forgotten repository");
                    }
                }
            }
        }
        if in_use.is_empty() {
            self.trees().forgotten.remove(&cache);
            match self.delete_cache(&cache) {
                Ok(removed) => forgotten.cache_removed = removed,
                Err(error) => {
                    tracing::warn!(%error, repo, "could not remove the cache of a forgotten repository");
                }
            }
        } else {
            self.trees().forgotten.insert(cache.clone(), repo.clone());
        }
        if forgotten == Forgotten::default() {
            tracing::debug!(repo, "forgetting a repository: nothing to remove");
        } else {
            tracing::info!(
                repo,
                cache_removed = forgotten.cache_removed,
                trees_removed = forgotten.trees_removed.len(),
                trees_kept_until_their_jobs_end = forgotten.trees_kept.len(),
                "forgot a repository"
            );
        }
        forgotten
    }

    /// Deletes a cache clone: renamed first, so that an interrupted deletion
    /// never leaves a half cache that looks usable. False when there was none.
    fn delete_cache(&self, cache: &Path) -> io::Result<bool> {
        if !cache.exists() {
            return Ok(false);
        }
        let mut trash = cache.as_os_str().to_owned();
        trash.push(".");
        trash.push(FORGOTTEN_EXTENSION);
        let trash = PathBuf::from(trash);
        if trash.exists() {
            std::fs::remove_dir_all(&trash)?;
        }
        std::fs::rename(cache, &trash)?;
        std::fs::remove_dir_all(&trash)?;
        Ok(true)
    }

    async fn ensure_cache(
        &self,
        cache: &Path,
        cancel: &CancellationToken,
    ) -> Result<(), WorkspaceError> {
        if cache.join("HEAD").is_file() {
            return self
                .harden(cache, true)
                .map_err(io_error(format!("resetting {}", cache.display())));
        }
        if cache.exists() {
            // A clone interrupted by a crash.
            std::fs::remove_dir_all(cache).map_err(io_error(format!(
                "removing the broken cache {}",
                cache.display()
            )))?;
        }
        let spec = CommandSpec {
            env: self.hardened_env(),
            ..CommandSpec::new("git", &self.cache_dir)
                .arg("init")
                .arg("--bare")
                // Objects, refs and config only the agent's user may read.
                .arg("--shared=0600")
                .arg("--quiet")
                .arg("--template=")
                .arg("--")
                .arg(cache)
        };
        let captured = self.run(&spec, "git init", cancel).await?;
        check_success("git init", &captured)?;
        self.harden(cache, false)
            .map_err(io_error(format!("resetting {}", cache.display())))
    }

    /// Puts back the cache's own `config` and removes `hooks/`, any
    /// `objects/info/alternates` and `worktrees/`: nothing a tree or a job wrote there
    /// survives into the agent's next git command.
    /// `warn`: say so when the config had been changed (not right after
    /// `git init`, whose own config may differ between git versions).
    fn harden(&self, cache: &Path, warn: bool) -> io::Result<()> {
        let config = cache.join("config");
        // Read only a small regular file: an unsandboxed job may have left a
        // FIFO or a link there.
        let current = std::fs::symlink_metadata(&config)
            .is_ok_and(|meta| meta.is_file() && meta.len() <= CACHE_CONFIG.len() as u64)
            .then(|| std::fs::read(&config).ok())
            .flatten();
        if current.as_deref() != Some(CACHE_CONFIG.as_bytes()) {
            if warn {
                tracing::warn!(cache = %cache.display(), "the cache's git config was changed; restoring it");
            }
            let temporary = cache.join("config.hobotnica-new");
            let _ = std::fs::remove_file(&temporary);
            hobotnica_common::private_fs::write_private_file(&temporary, CACHE_CONFIG.as_bytes())?;
            if std::fs::symlink_metadata(&config).is_ok_and(|meta| meta.is_dir()) {
                std::fs::remove_dir_all(&config)?;
            }
            std::fs::rename(&temporary, &config)?;
        }
        // `worktrees/`: what an older agent's `git worktree add` left.
        for planted in [
            cache.join("hooks"),
            cache.join("objects/info/alternates"),
            cache.join("worktrees"),
        ] {
            match std::fs::symlink_metadata(&planted) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&planted)?,
                Ok(_) => std::fs::remove_file(&planted)?,
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// The base environment, with git told to run no hooks and no
    /// fsmonitor whatever a repository's configuration says.
    fn hardened_env(&self) -> BTreeMap<String, String> {
        let mut env = self.base_env.clone();
        set_git_config(
            &mut env,
            HARDENING.iter().map(|(k, v)| ((*k).to_owned(), *v)),
        );
        env
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

    fn git_spec<I, S>(&self, cache: &Path, origin: Option<&Origin<'_>>, args: I) -> CommandSpec
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut env = self.base_env.clone();
        env.insert("GIT_DIR".to_owned(), cache.display().to_string());
        let mut config: Vec<(String, &str)> = HARDENING
            .iter()
            .map(|(key, value)| ((*key).to_owned(), *value))
            .collect();
        // Housekeeping runs inside the command (under the cache lock), not
        // in a background process racing the next job.
        config.push(("gc.autoDetach".to_owned(), "false"));
        config.push(("maintenance.autoDetach".to_owned(), "false"));
        if let Some(origin) = origin {
            config.push(("remote.origin.url".to_owned(), origin.url));
            if let Some(header) = origin.http_header {
                // Scoped to the repository's URL: a redirect or a submodule
                // on another host or path never receives the credentials.
                config.push((
                    format!("http.{}.extraHeader", origin.url),
                    header.as_config_value(),
                ));
            }
        }
        set_git_config(&mut env, config);
        CommandSpec {
            program: "git".into(),
            args: args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
            env,
            cwd: cache.to_owned(),
            sandboxed: false,
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

    /// Runs git on `cache` and fails unless it exits with 0; with `origin`,
    /// git may talk to the remote, and its output in the error is scrubbed.
    async fn git<I, S>(
        &self,
        cache: &Path,
        origin: Option<&Origin<'_>>,
        operation: &str,
        cancel: &CancellationToken,
        args: I,
    ) -> Result<Captured, WorkspaceError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let spec = self.git_spec(cache, origin, args);
        let captured = self.run(&spec, operation, cancel).await?;
        check_success(operation, &captured).map_err(|error| match (error, origin) {
            (WorkspaceError::Git { operation, detail }, Some(origin)) => WorkspaceError::Git {
                operation,
                detail: origin.scrub(&detail),
            },
            (error, _) => error,
        })?;
        Ok(captured)
    }
}

/// Added to a cache's name while it is being deleted.
const FORGOTTEN_EXTENSION: &str = "forgotten";

/// Whether the idle work tree at `tree` belongs to the cache clone `cache`
/// (its `.git` borrows the cache's objects). Reads only a small regular file:
/// a job may have left anything there.
/// Removes everything in `dir`, keeping the directory itself (a sandbox
/// may have it mounted).
fn empty_dir(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn is_tree_of(tree: &Path, cache: &Path) -> bool {
    let alternates = tree.join(".git/objects/info/alternates");
    let small_file = std::fs::symlink_metadata(&alternates)
        .is_ok_and(|meta| meta.is_file() && meta.len() <= ALTERNATES_MAX_BYTES);
    let Some(text) = small_file
        .then(|| std::fs::read_to_string(&alternates).ok())
        .flatten()
    else {
        return false;
    };
    let objects = cache.join("objects");
    text.lines().any(|line| Path::new(line) == objects)
}

/// A job tree's own `.git/config`.
const TREE_CONFIG: &str =
    "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n";

/// Puts `config` into git's environment (`GIT_CONFIG_COUNT`, `_KEY_n`,
/// `_VALUE_n`): above every configuration file, never in argv.
fn set_git_config<'a>(
    env: &mut BTreeMap<String, String>,
    config: impl IntoIterator<Item = (String, &'a str)>,
) {
    let mut count = 0;
    for (i, (key, value)) in config.into_iter().enumerate() {
        env.insert(format!("GIT_CONFIG_KEY_{i}"), key);
        env.insert(format!("GIT_CONFIG_VALUE_{i}"), value.to_owned());
        count = i + 1;
    }
    env.insert("GIT_CONFIG_COUNT".to_owned(), count.to_string());
}

/// The most of a tree's `objects/info/alternates` [`is_tree_of`] reads.
const ALTERNATES_MAX_BYTES: u64 = 64 * 1024;

/// Where the refs that keep work trees' commits live in a cache.
const TREE_REFS: &str = "refs/hobotnica/trees/";

fn tree_ref(name: &str) -> String {
    format!("{TREE_REFS}{name}")
}

/// Writes the ref that keeps `commit` in `cache` while the tree `name`
/// exists (the cache's lock held). A loose ref written directly: one git
/// process less per job than `git update-ref`.
fn keep_commit(cache: &Path, name: &str, commit: &CommitSha) -> Result<(), WorkspaceError> {
    let keep = cache.join(tree_ref(name));
    keep.parent()
        .map_or(Ok(()), |dir| {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
        })
        .and_then(|()| {
            hobotnica_common::private_fs::write_private_file(
                &keep,
                format!("{}\n", commit.as_str()).as_bytes(),
            )
        })
        .map_err(io_error(format!("writing {}", keep.display())))
}

/// A cache's `config`, rewritten before every use: whatever a job or a tree
/// may have written there is gone before the agent's git reads it.
const CACHE_CONFIG: &str = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = true\n\tsharedrepository = 0600\n[receive]\n\tdenyNonFastforwards = true\n";

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
mod git_http_server;
#[cfg(test)]
mod tests;
