//! A `hobotnica-agent` process connected to a test controller, with its own
//! work directory. Dropping it kills the agent and anything still running
//! in its work directory (jobs of an agent killed with SIGKILL live on).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use tempfile::TempDir;

use crate::api::Api;
use crate::bins;
use crate::controller::{Controller, log_filter};
use crate::daemon::{Daemon, Spec};
use crate::procs;
use crate::tls::TestPki;
use crate::wait::wait_for;

/// How long an agent may take to show up as connected.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How a test agent is given its token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TokenPassing {
    /// `HOBOTNICA_AGENT_TOKEN` in its environment.
    #[default]
    Environment,
    /// `--token-file` naming a file of this mode, outside the work directory.
    File { mode: u32 },
    /// `--token-file` naming a 0600 file at this path (one a job could
    /// otherwise see).
    FileAt(PathBuf),
    /// `--token <token>` in argv (visible in /proc/<pid>/cmdline).
    CommandLine,
}

/// Options of a test agent.
#[derive(Clone, Debug)]
pub struct AgentOpts {
    /// How the agent gets the controller's pool token.
    pub token: TokenPassing,
    /// `--name` (default: a unique `e2e-agent-...`).
    pub name: Option<String>,
    /// `--concurrency`.
    pub concurrency: u32,
    /// `--labels`.
    pub labels: Vec<(String, String)>,
    /// `--drain-timeout`.
    pub drain_timeout: Duration,
    /// More variables in the agent's own environment.
    pub env: Vec<(String, String)>,
    /// With a TLS controller, verify it with the test CA (`--ca-cert`);
    /// without, the agent has only the system's roots.
    pub trust_controller_ca: bool,
    /// Present the test PKI's client certificate (`--client-cert`,
    /// `--client-key`).
    pub client_cert: bool,
    /// More controllers' gRPC URLs, after the one the agent is started with:
    /// it fails over between them.
    pub more_controllers: Vec<String>,
    /// More command-line options (`--isolation none`, ...).
    pub args: Vec<String>,
    /// The gRPC URLs to connect to instead of the controller's own and
    /// `more_controllers` (proxies in front of them, say).
    pub controller_urls: Option<Vec<String>>,
    /// Run as an unprivileged user (`nobody`, through `setpriv`) when the
    /// tests run as root; as the test's own user otherwise.
    pub unprivileged: bool,
    /// `--work-dir` (default: `work` in the agent's own temporary
    /// directory).
    pub work_dir: Option<PathBuf>,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts {
            token: TokenPassing::default(),
            name: None,
            concurrency: 2,
            labels: Vec::new(),
            drain_timeout: Duration::from_secs(30),
            env: Vec::new(),
            trust_controller_ca: true,
            client_cert: false,
            more_controllers: Vec::new(),
            args: Vec::new(),
            controller_urls: None,
            unprivileged: false,
            work_dir: None,
        }
    }
}

/// The uid and gid of `nobody`.
const NOBODY: u32 = 65534;

/// Where an agent connects, and with what.
pub struct AgentTarget<'a> {
    /// The gRPC URL it is started with (before `AgentOpts::more_controllers`).
    pub grpc_url: String,
    /// The pool token it registers with.
    pub agent_token: &'a str,
    /// The test CA of a TLS controller.
    pub pki: Option<&'a TestPki>,
}

/// A running agent.
pub struct Agent {
    pub name: String,
    daemon: Daemon,
    /// Holds the agent's temporary directory for as long as it lives.
    _dir: TempDir,
    work_dir: PathBuf,
}

impl Agent {
    /// Starts an agent with default options (concurrency 2).
    pub async fn start_default(controller: &Controller) -> Agent {
        Agent::start(controller, AgentOpts::default()).await
    }

    /// Starts an agent and waits until the controller lists it connected.
    pub async fn start(controller: &Controller, opts: AgentOpts) -> Agent {
        let mut agent = Agent::spawn(controller, opts);
        agent.wait_connected(&controller.api()).await;
        agent
    }

    /// Starts an agent without waiting for it to connect.
    pub fn spawn(controller: &Controller, opts: AgentOpts) -> Agent {
        Agent::spawn_for(
            &AgentTarget {
                grpc_url: controller.grpc_url(),
                agent_token: &controller.agent_token,
                pki: controller.pki.as_ref(),
            },
            opts,
        )
    }

    /// Starts an agent of a controller the harness did not start (behind a
    /// proxy, say), without waiting for it to connect.
    pub fn spawn_for(controller: &AgentTarget<'_>, opts: AgentOpts) -> Agent {
        crate::init();
        let dir = tempfile::Builder::new()
            .prefix("hobotnica-agent-")
            .tempdir()
            .expect("temp dir");
        let name = opts
            .name
            .clone()
            .unwrap_or_else(|| crate::unique("e2e-agent"));
        let work_dir = opts
            .work_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("work"));
        let controllers: Vec<String> = match &opts.controller_urls {
            Some(urls) => urls.clone(),
            None => std::iter::once(controller.grpc_url.clone())
                .chain(opts.more_controllers.iter().cloned())
                .collect(),
        };
        let mut args: Vec<OsString> = vec![
            "--controller".into(),
            controllers.join(",").into(),
            "--name".into(),
            name.clone().into(),
            "--concurrency".into(),
            opts.concurrency.to_string().into(),
            "--work-dir".into(),
            work_dir.clone().into(),
            "--drain-timeout".into(),
            format!("{}ms", opts.drain_timeout.as_millis()).into(),
            "--sandbox-rw-bind".into(),
            crate::shared_dir().into(),
        ];
        if let Some(pki) = controller.pki {
            if opts.trust_controller_ca {
                args.extend(["--ca-cert".into(), pki.ca_cert.clone().into()]);
            }
            if opts.client_cert {
                args.extend([
                    "--client-cert".into(),
                    pki.client_cert.clone().into(),
                    "--client-key".into(),
                    pki.client_key.clone().into(),
                ]);
            }
        }
        if !opts.labels.is_empty() {
            let labels: Vec<String> = opts
                .labels
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            args.push("--labels".into());
            args.push(labels.join(",").into());
        }
        // The token goes through the environment by default: never in
        // argv. The job environment test checks it does not leak into jobs.
        let mut env: Vec<(OsString, OsString)> =
            vec![("HOBOTNICA_LOG".into(), log_filter().into())];
        match opts.token {
            TokenPassing::Environment => env.push((
                "HOBOTNICA_AGENT_TOKEN".into(),
                controller.agent_token.to_owned().into(),
            )),
            TokenPassing::File { mode } => {
                let path = dir.path().join("agent-token");
                write_file_with_mode(&path, &format!("{}\n", controller.agent_token), mode);
                args.extend(["--token-file".into(), path.into()]);
            }
            TokenPassing::FileAt(path) => {
                write_file_with_mode(&path, &format!("{}\n", controller.agent_token), 0o600);
                args.extend(["--token-file".into(), path.into()]);
            }
            TokenPassing::CommandLine => {
                args.extend(["--token".into(), controller.agent_token.to_owned().into()]);
            }
        }
        env.extend(
            opts.env
                .iter()
                .map(|(key, value)| (key.into(), value.into())),
        );
        args.extend(opts.args.iter().map(OsString::from));
        let mut program = bins::bin(bins::AGENT);
        if opts.unprivileged && nix::unistd::geteuid().is_root() {
            use std::os::unix::fs::PermissionsExt as _;
            // nobody owns the agent's directory; HOME is there too.
            std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
                .expect("chmod");
            env.push(("HOME".into(), dir.path().into()));
            // The test's repositories belong to root: let nobody's git read
            // them.
            let gitconfig = dir.path().join(".gitconfig");
            std::fs::write(&gitconfig, "[safe]\n\tdirectory = *\n").expect("write .gitconfig");
            std::os::unix::fs::chown(&gitconfig, Some(NOBODY), Some(NOBODY)).expect("chown");
            let mut wrapped: Vec<OsString> = vec![
                format!("--reuid={NOBODY}").into(),
                format!("--regid={NOBODY}").into(),
                "--clear-groups".into(),
                "--".into(),
                program.into(),
            ];
            wrapped.append(&mut args);
            args = wrapped;
            program = "setpriv".into();
        }
        let spec = Spec {
            name: format!("agent-{name}"),
            program,
            args,
            env,
            cwd: Some(dir.path().to_path_buf()),
            log_dir: dir.path().to_path_buf(),
        };
        Agent {
            name,
            daemon: Daemon::spawn(spec),
            _dir: dir,
            work_dir,
        }
    }

    /// Starts the agent again (after it exited or was killed), with the same
    /// options, name and work directory.
    pub fn restart(&mut self) {
        self.daemon.start();
    }

    /// Waits until the controller lists this agent as connected, and
    /// returns that listing.
    pub async fn wait_connected(&mut self, api: &Api) -> Value {
        let what = format!("agent {} to connect", self.name);
        let name = self.name.clone();
        let daemon = &mut self.daemon;
        wait_for(CONNECT_TIMEOUT, &what, || {
            if let Some(status) = daemon.try_exit() {
                panic!("agent {name} exited ({status}) before it connected");
            }
            let name = name.clone();
            async move {
                api.agents().await.into_iter().find(|agent| {
                    agent["name"].as_str() == Some(name.as_str())
                        && agent["connected"].as_bool() == Some(true)
                })
            }
        })
        .await
    }

    /// The directory the agent keeps clones and work trees in.
    pub fn work_dir(&self) -> PathBuf {
        self.work_dir.clone()
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }

    /// Asks it to drain and exit.
    pub fn sigterm(&mut self) {
        self.daemon.signal(Signal::SIGTERM);
    }

    /// SIGKILL (sandboxed jobs die with it, bwrap's `--die-with-parent`;
    /// unsandboxed ones survive in their own process group and are killed
    /// when the fixture is dropped).
    pub fn kill9(&mut self) {
        self.daemon.kill9();
    }

    /// Waits for it to exit.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        self.daemon.wait(timeout).await
    }

    /// Its stdout and stderr so far.
    pub fn output(&self) -> String {
        self.daemon.output()
    }

    /// Its whole log (stderr) so far.
    pub fn stderr(&self) -> String {
        self.daemon.stderr()
    }

    /// Its whole stdout so far.
    pub fn stdout(&self) -> String {
        self.daemon.stdout()
    }

    /// The exit status, once it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.daemon.try_exit()
    }
}

/// Writes `contents` to `path` and gives it `mode`.
pub fn write_file_with_mode(path: &std::path::Path, contents: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, contents)
        .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|err| panic!("cannot chmod {}: {err}", path.display()));
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.daemon.kill9();
        // Orphaned `make`s of a killed agent.
        procs::signal_all(&procs::processes_in_dir(&self.work_dir()), Signal::SIGKILL);
    }
}
