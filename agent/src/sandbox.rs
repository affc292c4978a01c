//! The job sandbox: every `make` runs under bubblewrap (`bwrap`), in PID,
//! mount, IPC, UTS and cgroup namespaces of its own (and a user namespace
//! when the agent is not root), with a new session (no controlling terminal).
//!
//! What a job sees:
//!
//! | path | what |
//! | --- | --- |
//! | `/usr`, `/bin`, `/sbin`, `/lib*`, `/etc` | the host's, read-only (symlinks kept as symlinks) |
//! | `--sandbox-ro-bind` paths | the host's, read-only (toolchains outside `/usr`) |
//! | `--sandbox-rw-bind` paths | the host's, read-write (shared between jobs: only for trusted ones) |
//! | its work tree | read-write, at the same path as on the host (the job's working directory) |
//! | the cache's object store | read-only, only its own repository's (the tree's `.git` borrows objects from it) |
//! | `/tmp`, `HOME` (`/home/job`) | private directories of this job, removed with its tree |
//! | `/proc` | of its own PID namespace: only its own processes |
//! | `/dev` | a minimal one (`null`, `zero`, `random`, `urandom`, `tty`, `pts`, `shm`) |
//! | the network | the host's (jobs download and deploy) |
//!
//! It does not see the agent's work dir (caches, spools, other jobs' trees),
//! its token or key files, any path given to `--sandbox-hide` (`hobot up`
//! hides the controller's data dir), or any other process.
//!
//! When the job's command exits, the sandbox's init exits and the kernel kills
//! every process left in its PID namespace, `setsid` and double forks
//! included. A SIGKILL to the process group kills bwrap and its init, and
//! with them the namespace. A graceful stop (SIGTERM) is sent to the
//! processes inside the sandbox, not to bwrap, which would otherwise die at
//! once and take the namespace with it ([`terminate_inside`]).
//!
//! As root, bwrap would keep every capability inside the sandbox: the agent
//! passes `--cap-drop ALL`, and bwrap sets `no_new_privs`, so setuid programs
//! cannot give them back.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

use crate::process::{self, CommandSpec};

/// How jobs are isolated from the host and from each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Isolation {
    /// Every job in a bubblewrap sandbox (the default).
    Sandbox,
    /// Jobs run as the agent's user, unisolated: only for agents whose every
    /// job is trusted.
    None,
}

/// The `HOME` a sandboxed job sees.
pub const SANDBOX_HOME: &str = "/home/job";

/// Host directories every job sees read-only, when they exist.
const SYSTEM_PATHS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
];

/// How long the start-up check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the sandbox cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "the job sandbox needs bubblewrap, and {bwrap} could not be run ({error}): install it \
         (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap), point \
         --bwrap at it, or run jobs unisolated with --isolation none"
    )]
    Missing { bwrap: String, error: String },
    #[error(
        "the job sandbox cannot be created: bubblewrap says {output:?}. {hint}Or run jobs \
         unisolated with --isolation none (only if every job is trusted)."
    )]
    Refused { output: String, hint: &'static str },
}

/// A job's own paths, bound into its sandbox.
#[derive(Debug, Clone)]
pub struct JobPaths {
    /// The work tree: read-write, the working directory.
    pub tree: PathBuf,
    /// Becomes `/tmp`.
    pub tmp: PathBuf,
    /// Becomes [`SANDBOX_HOME`].
    pub home: PathBuf,
    /// Read-only (the cache's object store the tree borrows from).
    pub shared_read_only: Vec<PathBuf>,
}

/// The sandbox every job of this agent runs in.
#[derive(Debug, Clone)]
pub struct Sandbox {
    bwrap: PathBuf,
    /// The agent runs as root: drop every capability inside.
    as_root: bool,
    /// The system paths, bound read-only (or symlinks).
    host_paths: Vec<HostPath>,
    /// `--sandbox-ro-bind`: after `/tmp` and `HOME`, so that a path below
    /// `/tmp` shows too.
    extra_read_only: Vec<HostPath>,
    /// Bound read-write (`--sandbox-rw-bind`), after `/tmp`.
    read_write: Vec<PathBuf>,
    /// Masked inside: the agent's work dir, its token and key files,
    /// `--sandbox-hide`; resolved once, at start-up.
    hidden: Vec<Hidden>,
}

/// A host path jobs must not see, as it was at start-up.
#[derive(Debug, Clone)]
enum Hidden {
    /// Shows as an empty directory.
    Dir(PathBuf),
    /// Shows as an empty file.
    File(PathBuf),
}

#[derive(Debug, Clone)]
enum HostPath {
    ReadOnly(PathBuf),
    Symlink { target: PathBuf, at: PathBuf },
}

impl Sandbox {
    /// A sandbox that shows jobs the system paths and `extra_read_only`, and
    /// hides `hidden` (directories become empty, files become empty files)
    /// wherever those are visible.
    pub fn new(
        bwrap: PathBuf,
        as_root: bool,
        extra_read_only: &[PathBuf],
        read_write: &[PathBuf],
        hidden: Vec<PathBuf>,
    ) -> Sandbox {
        let mut host_paths = host_paths(SYSTEM_PATHS.iter().map(PathBuf::from));
        // /etc/resolv.conf is often a link into /run (systemd-resolved):
        // bind what it points at, or name resolution breaks.
        if let Ok(resolv) = std::fs::canonicalize("/etc/resolv.conf")
            && !host_paths.iter().any(|p| match p {
                HostPath::ReadOnly(bound) => resolv.starts_with(bound),
                HostPath::Symlink { .. } => false,
            })
        {
            host_paths.push(HostPath::ReadOnly(resolv));
        }
        Sandbox {
            bwrap,
            as_root,
            host_paths,
            extra_read_only: extra_read_only
                .iter()
                .filter_map(|path| {
                    // Bound where it really is; a link to it stays a link.
                    let real = std::fs::canonicalize(path).ok()?;
                    let link = (&real != path
                        && !SYSTEM_PATHS.iter().any(|system| path.starts_with(system)))
                    .then(|| HostPath::Symlink {
                        target: real.clone(),
                        at: path.clone(),
                    });
                    Some(std::iter::once(HostPath::ReadOnly(real)).chain(link))
                })
                .flatten()
                .collect(),
            // bwrap wants absolute paths; a relative option is resolved
            // against the agent's working directory once, here.
            read_write: read_write
                .iter()
                .filter_map(|path| std::fs::canonicalize(path).ok())
                .collect(),
            hidden: hidden
                .iter()
                .filter_map(|path| {
                    let real = std::fs::canonicalize(path).ok()?;
                    Some(if real.is_dir() {
                        Hidden::Dir(real)
                    } else {
                        Hidden::File(real)
                    })
                })
                .collect(),
        }
    }

    /// `command` wrapped to run inside the sandbox with `paths`; `HOME` is
    /// [`SANDBOX_HOME`].
    pub fn wrap(&self, command: CommandSpec, paths: &JobPaths) -> CommandSpec {
        self.wrap_with(command, paths, false)
    }

    /// [`Sandbox::wrap`], bubblewrap waiting with the sandbox made until
    /// its gate opens (`--block-fd`, see [`process::spawn_gated`]): the
    /// namespaces and mounts, most of what bubblewrap costs, are made while
    /// the tree is checked out. `command` starts when the gate opens.
    pub fn wrap_gated(&self, command: CommandSpec, paths: &JobPaths) -> CommandSpec {
        self.wrap_with(command, paths, true)
    }

    fn wrap_with(&self, command: CommandSpec, paths: &JobPaths, gated: bool) -> CommandSpec {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |items: &[&std::ffi::OsStr]| args.extend(items.iter().map(|s| s.into()));
        if gated {
            let fd = process::GATE_FD.to_string();
            push(&["--block-fd".as_ref(), fd.as_ref()]);
        }
        push(&[
            "--die-with-parent".as_ref(),
            "--new-session".as_ref(),
            "--unshare-pid".as_ref(),
            "--unshare-ipc".as_ref(),
            "--unshare-uts".as_ref(),
            "--unshare-cgroup-try".as_ref(),
            "--hostname".as_ref(),
            "hobotnica-job".as_ref(),
        ]);
        if self.as_root {
            push(&["--cap-drop".as_ref(), "ALL".as_ref()]);
        } else {
            push(&["--unshare-user".as_ref()]);
        }
        for host in &self.host_paths {
            push(&host.args());
        }
        push(&[
            "--proc".as_ref(),
            "/proc".as_ref(),
            "--dev".as_ref(),
            "/dev".as_ref(),
            "--bind".as_ref(),
            paths.tmp.as_os_str(),
            "/tmp".as_ref(),
            "--bind".as_ref(),
            paths.home.as_os_str(),
            SANDBOX_HOME.as_ref(),
        ]);
        for host in &self.extra_read_only {
            push(&host.args());
        }
        for shared in &self.read_write {
            push(&["--bind".as_ref(), shared.as_os_str(), shared.as_os_str()]);
        }
        // After /tmp, so that a work dir under /tmp is hidden too; before
        // the tree, which lies in the work dir.
        for hidden in &self.hidden {
            match hidden {
                Hidden::Dir(dir) => push(&["--tmpfs".as_ref(), dir.as_os_str()]),
                Hidden::File(file) => {
                    push(&["--ro-bind".as_ref(), "/dev/null".as_ref(), file.as_os_str()]);
                }
            }
        }
        push(&[
            "--bind".as_ref(),
            paths.tree.as_os_str(),
            paths.tree.as_os_str(),
        ]);
        for shared in &paths.shared_read_only {
            push(&["--ro-bind".as_ref(), shared.as_os_str(), shared.as_os_str()]);
        }
        push(&[
            "--chdir".as_ref(),
            paths.tree.as_os_str(),
            "--".as_ref(),
            command.program.as_os_str(),
        ]);
        args.extend(command.args);
        let mut env = command.env;
        env.insert("HOME".to_owned(), SANDBOX_HOME.to_owned());
        CommandSpec {
            program: self.bwrap.clone().into_os_string(),
            args,
            env,
            cwd: command.cwd,
            sandboxed: true,
        }
    }

    /// Creates a sandbox like a job's under `scratch` and runs `true` in it:
    /// the agent refuses to start when this fails.
    pub async fn check(&self, scratch: &Path) -> Result<(), SandboxError> {
        let paths = JobPaths {
            tree: scratch.join("tree"),
            tmp: scratch.join("tmp"),
            home: scratch.join("home"),
            shared_read_only: Vec::new(),
        };
        for dir in [&paths.tree, &paths.tmp, &paths.home] {
            std::fs::create_dir_all(dir).map_err(|error| SandboxError::Refused {
                output: format!("cannot create {}: {error}", dir.display()),
                hint: "",
            })?;
        }
        let probe = CommandSpec::new("true", &paths.tree);
        let mut probe = self.wrap(probe, &paths);
        probe
            .env
            .insert("PATH".to_owned(), "/usr/bin:/bin".to_owned());
        let result = process::run_captured(&probe, CHECK_TIMEOUT, &CancellationToken::new()).await;
        let _ = std::fs::remove_dir_all(scratch);
        let captured = match result {
            Ok(captured) => captured,
            Err(process::RunError::Spawn(error)) => {
                return Err(SandboxError::Missing {
                    bwrap: self.bwrap.display().to_string(),
                    error: error.to_string(),
                });
            }
            Err(error) => {
                return Err(SandboxError::Refused {
                    output: error.to_string(),
                    hint: "",
                });
            }
        };
        if captured.status.success() {
            return Ok(());
        }
        let output = captured.output_text().trim().to_owned();
        let hint = if self.as_root {
            ""
        } else {
            "Jobs of an agent that is not root are sandboxed in a user namespace: allow \
             unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 on older \
             Debian kernels; kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor \
             profile for bwrap on Ubuntu 23.10+; user.max_user_namespaces > 0), or run the \
             agent as root (the sandbox then drops every capability). "
        };
        Err(SandboxError::Refused { output, hint })
    }
}

impl HostPath {
    /// bwrap's arguments for it.
    fn args(&self) -> [&std::ffi::OsStr; 3] {
        match self {
            HostPath::ReadOnly(path) => ["--ro-bind".as_ref(), path.as_os_str(), path.as_os_str()],
            HostPath::Symlink { target, at } => {
                ["--symlink".as_ref(), target.as_os_str(), at.as_os_str()]
            }
        }
    }
}

/// The existing ones of `paths`: symlinks stay symlinks, the rest is bound
/// read-only.
fn host_paths(paths: impl Iterator<Item = PathBuf>) -> Vec<HostPath> {
    paths
        .filter_map(|path| match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => std::fs::read_link(&path)
                .ok()
                .map(|target| HostPath::Symlink { target, at: path }),
            Ok(_) => Some(HostPath::ReadOnly(path)),
            Err(_) => None,
        })
        .collect()
}

/// Sends SIGTERM to every process inside the sandbox whose bwrap is
/// `leader`: the descendants of bwrap's init, but not bwrap itself nor its
/// init (bwrap dies of SIGTERM and would kill the namespace at once; its init
/// ignores it), and not a `make` that has children ([`spared_from_sigterm`]).
/// Processes that start meanwhile are caught by the SIGKILL after the grace
/// period, or die with the namespace when the command exits.
pub fn terminate_inside(leader: Pid) {
    let processes = process_table();
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, process) in &processes {
        children.entry(process.parent).or_default().push(pid);
    }
    let inits = children.get(&leader.as_raw()).cloned().unwrap_or_default();
    let mut stack: Vec<i32> = inits
        .iter()
        .flat_map(|init| children.get(init).cloned().unwrap_or_default())
        .collect();
    while let Some(pid) = stack.pop() {
        let own_children = children.get(&pid);
        let is_make = processes.get(&pid).is_some_and(|p| is_make(&p.name));
        if !spared_from_sigterm(is_make, own_children.is_some_and(|c| !c.is_empty())) {
            match kill(Pid::from_raw(pid), Signal::SIGTERM) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(error) => tracing::debug!(pid, %error, "could not signal a sandboxed process"),
            }
        }
        if let Some(grandchildren) = own_children {
            stack.extend(grandchildren);
        }
    }
}

/// Whether a graceful stop leaves this process alone: a `make` running
/// recipes. GNU make signalled together with its recipes races with them:
/// its SIGTERM handler waits for a child that its interrupted `wait` had
/// already reaped, and the log ends in `make: *** wait: No child processes.
/// Stop.`, twice (the error path waits again). Left alone, make sees its
/// recipe terminated, says so (`make: *** [Makefile:3: test] Terminated`)
/// and exits by itself, and the sandbox ends with it. A make without
/// children gets SIGTERM like every other process. Either way the SIGKILL
/// after the grace period still ends whatever is left.
fn spared_from_sigterm(is_make: bool, has_children: bool) -> bool {
    is_make && has_children
}

/// Whether a process's name (`comm`) is GNU make's.
fn is_make(name: &str) -> bool {
    matches!(name, "make" | "gmake")
}

/// What [`terminate_inside`] needs of a process.
struct ProcessInfo {
    parent: i32,
    /// `comm`: the executable's name, at most 15 bytes.
    name: String,
}

/// Every process's parent and name, from `/proc/<pid>/stat`.
fn process_table() -> HashMap<i32, ProcessInfo> {
    let mut processes = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return processes;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(process) = parse_stat(&stat) {
            processes.insert(pid, process);
        }
    }
    processes
}

/// `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
fn parse_stat(stat: &str) -> Option<ProcessInfo> {
    let (head, rest) = stat.rsplit_once(") ")?;
    let (_, name) = head.split_once(" (")?;
    let parent = rest.split(' ').nth(1)?.parse::<i32>().ok()?;
    Some(ProcessInfo {
        parent,
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> JobPaths {
        JobPaths {
            tree: PathBuf::from("/w/jobs/1-1"),
            tmp: PathBuf::from("/w/scratch/1-1/tmp"),
            home: PathBuf::from("/w/scratch/1-1/home"),
            shared_read_only: vec![PathBuf::from("/w/cache/a.git/objects")],
        }
    }

    fn args(sandbox: &Sandbox) -> Vec<String> {
        sandbox
            .wrap(
                CommandSpec::new("make", "/w/jobs/1-1").arg("test"),
                &paths(),
            )
            .args
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    fn position(args: &[String], window: &[&str]) -> usize {
        args.windows(window.len())
            .position(|w| w == window)
            .unwrap_or_else(|| panic!("{window:?} not in {args:?}"))
    }

    #[test]
    fn paths_are_absolute_and_bound_in_an_order_that_keeps_them_visible() {
        // Relative options (the test runs in the crate's directory) are
        // resolved once: bwrap needs absolute paths.
        let manifest = std::fs::canonicalize("Cargo.toml").expect("the crate's manifest");
        let src = std::fs::canonicalize("src").expect("the crate's sources");
        let sandbox = Sandbox::new(
            PathBuf::from("bwrap"),
            false,
            &[PathBuf::from("src")],
            &[],
            vec![
                PathBuf::from("Cargo.toml"),
                PathBuf::from("/nonexistent/key"),
            ],
        );
        let args = args(&sandbox);
        let manifest = manifest.to_string_lossy();
        let src = src.to_string_lossy();
        let hidden = position(&args, &["--ro-bind", "/dev/null", &manifest]);
        let shown = position(&args, &["--ro-bind", &src, &src]);
        let tmp = position(&args, &["--bind", "/w/scratch/1-1/tmp", "/tmp"]);
        let tree = position(&args, &["--bind", "/w/jobs/1-1", "/w/jobs/1-1"]);
        let objects = position(
            &args,
            &[
                "--ro-bind",
                "/w/cache/a.git/objects",
                "/w/cache/a.git/objects",
            ],
        );
        // /tmp first (a path below it would vanish under it), then what is
        // shown and hidden, then the tree and its objects (which lie in the
        // hidden work dir).
        assert!(
            tmp < shown && shown < hidden && hidden < tree && tree < objects,
            "{args:?}"
        );
        assert!(
            !args
                .iter()
                .any(|arg| arg == "Cargo.toml" || arg.contains("nonexistent")),
            "{args:?}"
        );
        assert!(
            args.contains(&"--unshare-user".to_owned()),
            "not root: a user namespace"
        );
        assert!(!args.contains(&"--cap-drop".to_owned()));
        assert_eq!(args[args.len() - 3..], ["--", "make", "test"]);
    }

    #[test]
    fn as_root_every_capability_is_dropped() {
        let sandbox = Sandbox::new(PathBuf::from("bwrap"), true, &[], &[], Vec::new());
        let args = args(&sandbox);
        position(&args, &["--cap-drop", "ALL"]);
        for flag in [
            "--unshare-pid",
            "--die-with-parent",
            "--new-session",
            "--unshare-ipc",
        ] {
            assert!(args.contains(&flag.to_owned()), "{flag} in {args:?}");
        }
    }

    #[test]
    fn a_process_stat_gives_its_parent_and_name() {
        let make = parse_stat("42 (make) S 7 42 7 0 -1 4194560 170").unwrap();
        assert_eq!((make.parent, make.name.as_str()), (7, "make"));
        // A name may hold spaces and parentheses.
        let odd = parse_stat("43 (a) b (c) R 42 43 7 0").unwrap();
        assert_eq!((odd.parent, odd.name.as_str()), (42, "a) b (c"));
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn only_a_make_running_recipes_is_spared_the_sigterm() {
        assert!(spared_from_sigterm(true, true));
        assert!(!spared_from_sigterm(true, false), "an idle make stops");
        assert!(
            !spared_from_sigterm(false, true),
            "a shell with children stops"
        );
        assert!(!spared_from_sigterm(false, false));
        assert!(is_make("make") && is_make("gmake") && !is_make("sh"));
    }
}
