//! The container tests' Docker engine, made ready once per test process:
//! the tests' own `dockerd` (`scripts/dockerd`: state under
//! `target/docker`, host networking only), the local `debian:bookworm-slim`
//! base image (`scripts/docker-base`: debootstrap, no registry needed) and
//! the shipped binaries (`scripts/dist`: release, stripped).
//!
//! A machine that cannot run them (no root, no dockerd) makes [`docker`]
//! print "skipped: why" and return `None`, except under `CI`, where CI must
//! run them and the test fails instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Debian's Docker client (package docker.io), which matches its engine and
/// builds with BuildKit without the buildx plugin.
const CLIENT: &str = "/usr/bin/docker";

/// A ready engine.
#[derive(Debug)]
pub struct Docker {
    host: String,
}

/// The engine, started and provisioned on first use; `None` (after saying
/// "skipped: why") where this machine cannot run containers.
///
/// # Panics
/// Under `CI` when the engine cannot be made ready, and when a script that
/// should work fails.
pub fn docker() -> Option<&'static Docker> {
    static ENGINE: OnceLock<Result<Docker, String>> = OnceLock::new();
    match ENGINE.get_or_init(start) {
        Ok(docker) => Some(docker),
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("the container tests must run in CI, but cannot: {why}")
        }
        Err(why) => {
            eprintln!("skipped: container test: {why}");
            None
        }
    }
}

fn start() -> Result<Docker, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("dockerd needs root and this test runs as another user".into());
    }
    if !Path::new(CLIENT).is_file() || !Path::new("/usr/sbin/dockerd").is_file() {
        return Err(
            "Debian's docker.io is not installed (./scripts/setup --tests installs it)".into(),
        );
    }
    let output = Command::new(repo_root().join("scripts/dockerd"))
        .arg("start")
        .output()
        .map_err(|err| format!("cannot run scripts/dockerd: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "dockerd did not start: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let host = stdout
        .lines()
        .find_map(|line| line.strip_prefix("DOCKER_HOST="))
        .ok_or("scripts/dockerd printed no DOCKER_HOST")?
        .to_owned();
    let docker = Docker { host };
    docker.script("docker-base", &[]);
    docker.script("dist", &[]);
    Ok(docker)
}

/// The checkout's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the checkout")
        .to_path_buf()
}

/// Where `scripts/dist` puts the shipped binaries (`bin/`) and their debug
/// info (`debug/`).
pub fn dist_dir() -> PathBuf {
    repo_root().join("target/dist")
}

impl Docker {
    /// `DOCKER_HOST` of the engine.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// A `docker` command talking to the engine.
    pub fn command(&self) -> Command {
        let mut command = Command::new(CLIENT);
        self.env(&mut command);
        command
    }

    /// Sets `DOCKER_HOST`, `DOCKER` (the client scripts should use) and
    /// `DOCKER_BUILDKIT` on any command that runs `docker`.
    pub fn env<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        command
            .env("DOCKER_HOST", &self.host)
            .env("DOCKER", CLIENT)
            .env("DOCKER_BUILDKIT", "1")
    }

    /// Runs `docker args...` and returns its stdout.
    ///
    /// # Panics
    /// When it fails, with its stderr.
    pub fn run(&self, args: &[&str]) -> String {
        succeeded(&self.try_run(args), &format!("docker {}", args.join(" ")))
    }

    /// Builds the test image `tests/docker/<dockerfile>` as `tag` (host
    /// network: there is no bridge), the context being `tests/docker`.
    ///
    /// # Panics
    /// When the build fails.
    pub fn build_test_image(&self, tag: &str, dockerfile: &str) {
        let context = repo_root().join("tests/docker");
        let file = context.join(dockerfile);
        let (file, context) = (file.to_string_lossy(), context.to_string_lossy());
        self.run(&[
            "build",
            "--network",
            "host",
            "--quiet",
            "--tag",
            tag,
            "--file",
            &file,
            &context,
        ]);
    }

    /// Runs `docker args...` and returns what it did.
    pub fn try_run(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .expect("the docker client runs")
    }

    /// Runs `scripts/<name> args...` against the engine and returns its
    /// stdout.
    ///
    /// # Panics
    /// When it fails, with its output.
    pub fn script(&self, name: &str, args: &[&str]) -> String {
        let mut command = Command::new(repo_root().join("scripts").join(name));
        let output = self
            .env(&mut command)
            .args(args)
            .current_dir(repo_root())
            .output()
            .unwrap_or_else(|err| panic!("cannot run scripts/{name}: {err}"));
        succeeded(&output, &format!("scripts/{name} {}", args.join(" ")))
    }

    /// An image's size in bytes, as `docker images` shows it.
    pub fn image_size(&self, image: &str) -> u64 {
        self.run(&["image", "inspect", "--format", "{{.Size}}", image])
            .trim()
            .parse()
            .expect("docker prints the size as a number")
    }
}

/// A container removed (`docker rm -f`) when dropped; its log is printed
/// then if the test is failing.
#[derive(Debug)]
pub struct Container {
    docker: &'static Docker,
    name: String,
}

impl Container {
    /// `docker run -d --name <name> --network host <args...>`.
    ///
    /// # Panics
    /// When docker refuses to start it.
    pub fn run(docker: &'static Docker, name: &str, args: &[&str]) -> Container {
        let _ = docker.try_run(&["rm", "-f", name]);
        let mut all = vec!["run", "-d", "--name", name, "--network", "host"];
        all.extend_from_slice(args);
        docker.run(&all);
        Container {
            docker,
            name: name.to_owned(),
        }
    }

    /// Adopts a container started some other way (by compose, say).
    pub fn adopt(docker: &'static Docker, name: &str) -> Container {
        Container {
            docker,
            name: name.to_owned(),
        }
    }

    /// The container's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `docker exec <name> args...`: what it did.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", self.name.as_str()];
        all.extend_from_slice(args);
        self.docker.try_run(&all)
    }

    /// The container's output so far (stdout and stderr).
    pub fn logs(&self) -> String {
        let output = self.docker.try_run(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// `docker inspect --format <format>`, trimmed; empty when the
    /// container is gone.
    pub fn inspect(&self, format: &str) -> String {
        let output = self
            .docker
            .try_run(&["inspect", "--format", format, &self.name]);
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- container {} ---\n{}", self.name, self.logs());
        }
        let _ = self.docker.try_run(&["rm", "-f", "-v", &self.name]);
    }
}

/// The stdout of a command that must have succeeded.
///
/// # Panics
/// When it failed, naming it (`what`) with everything it printed.
fn succeeded(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
