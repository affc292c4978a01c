//! The EC2 build boxes (`deploy/aws`): the cloud-init user-data and the
//! CloudFormation stack are valid, and the user-data turns a clean Debian
//! system into a build box that registers with a controller and runs a job.
//!
//! No AWS account is involved. The one seam is the token's source:
//! `HOBOTNICA_TOKEN_SOURCE=file:/path` makes `install-agent` read the token
//! from a file instead of SSM Parameter Store; everything else (the package
//! download and install, the agent's configuration, the token file) runs as
//! on an instance. systemd does not run in the container, so the test starts
//! the agent the way `hobotnica-agent.service` would: its `ExecStart`, as its
//! `User`, in its `WorkingDirectory`, with its `EnvironmentFile`.

#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hobotnica_tests::docker::{Container, Docker, docker, repo_root};
use hobotnica_tests::{Controller, ControllerOpts, GitRepo, unique, wait_for};
use yaml_serde::Value;

/// EC2's limit on user-data, before base64.
const USER_DATA_LIMIT_BYTES: usize = 16 * 1024;
/// Where the user-data puts the install script.
const INSTALL_SCRIPT: &str = "/usr/local/sbin/hobotnica-install-agent";
/// Where the user-data puts the install script's settings.
const INSTALL_CONFIG: &str = "/etc/hobotnica/install-agent.conf";
/// Installing the package in a clean container: apt update, dependencies.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);
/// The installed agent connecting to the controller.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// An ordinary job (clone, make).
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

fn aws_dir() -> PathBuf {
    repo_root().join("deploy/aws")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Runs `program args...` in the checkout; its status and combined output.
fn run(program: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// `cloud-init schema` on a user-data file, asserting it is valid.
fn assert_valid_cloud_config(path: &Path) {
    let (ok, output) = run(
        Path::new("cloud-init"),
        &["schema", "--config-file", &path.display().to_string()],
    );
    assert!(
        ok && output.contains("Valid cloud-config"),
        "cloud-init schema refuses {}:\n{output}",
        path.display()
    );
}

fn get<'v>(value: &'v Value, path: &[&str]) -> &'v Value {
    path.iter().fold(value, |value, key| {
        value
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in {value:?} (path {path:?})"))
    })
}

/// The content of the `write_files` entry at `path` in a cloud-config.
fn written_file(cloud_config: &str, path: &str) -> String {
    let config: Value = yaml_serde::from_str(cloud_config).expect("the user-data is YAML");
    let entry = config["write_files"]
        .as_sequence()
        .expect("write_files is a list")
        .iter()
        .find(|entry| entry["path"].as_str() == Some(path))
        .unwrap_or_else(|| panic!("the user-data writes no {path}"));
    entry["content"].as_str().expect("content").to_owned()
}

/// The stack's parsed template.
fn template() -> Value {
    yaml_serde::from_str(&read(&aws_dir().join("agents.yaml"))).expect("agents.yaml is YAML")
}

/// CloudFormation's `Fn::Sub` over `text`: `${Name}` from `values` (every
/// name must be there), `${!Literal}` as `${Literal}`.
fn substitute(text: &str, values: &BTreeMap<&str, &str>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        if let Some(literal) = after.strip_prefix('!') {
            out.push_str("${");
            rest = literal;
            continue;
        }
        let end = after.find('}').expect("a closed ${...}");
        let name = &after[..end];
        let value = values
            .get(name)
            .unwrap_or_else(|| panic!("the test gives no value for ${{{name}}}"));
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The user-data an instance of the stack receives, with example values
/// for the parameters.
fn stack_user_data() -> String {
    let template = template();
    let user_data = get(
        &template,
        &[
            "Resources",
            "AgentLaunchTemplate",
            "Properties",
            "LaunchTemplateData",
            "UserData",
            "Fn::Base64",
        ],
    );
    let Value::Tagged(sub) = user_data else {
        panic!("the UserData is not !Sub: {user_data:?}")
    };
    assert_eq!(sub.tag, "Sub", "the UserData is !Sub");
    let text = sub.value.as_str().expect("!Sub of a string");
    let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let ca_base64 = base64_encode(ca.as_bytes());
    let values = BTreeMap::from([
        ("AWS::StackName", "ci-agents"),
        ("AWS::Region", "eu-central-1"),
        ("ControllerUrl", "https://ci.example.com:7001"),
        ("TokenParameterName", "/hobotnica/agent-token"),
        (
            "AgentDebUrl",
            "https://downloads.example.com/hobotnica-agent_0.1.0-1_amd64.deb",
        ),
        ("AgentDebSha256", ""),
        ("AgentLabels", "cloud=aws"),
        ("AgentConcurrency", "2"),
        ("DrainMinutes", "10"),
        ("ControllerCaBase64", ca_base64.as_str()),
    ]);
    substitute(text, &values)
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn user_data_is_valid_cloud_config_and_carries_the_install_script() {
    let started = Instant::now();
    let (ok, output) = run(&aws_dir().join("embed-install-agent"), &["--check"]);
    assert!(
        ok,
        "the user-data does not carry the current install-agent:\n{output}"
    );

    let user_data = aws_dir().join("user-data.yaml");
    assert_valid_cloud_config(&user_data);
    let standalone = read(&user_data);

    let dir = tempfile::tempdir().expect("temp dir");
    let rendered = dir.path().join("stack-user-data.yaml");
    let stack = stack_user_data();
    std::fs::write(&rendered, &stack).expect("write the stack's user-data");
    assert_valid_cloud_config(&rendered);

    assert_eq!(
        written_file(&stack, INSTALL_SCRIPT),
        written_file(&standalone, INSTALL_SCRIPT),
        "the stack and the user-data install with the same script"
    );
    let config = written_file(&stack, INSTALL_CONFIG);
    for line in [
        "HOBOTNICA_CONTROLLER=https://ci.example.com:7001",
        "HOBOTNICA_TOKEN_PARAMETER=/hobotnica/agent-token",
        "HOBOTNICA_ASG_NAME=ci-agents-agents",
        "HOBOTNICA_LIFECYCLE_HOOK=hobotnica-drain",
        "HOBOTNICA_DRAIN_MINUTES=10",
    ] {
        assert!(
            config.lines().any(|l| l == line),
            "the stack's settings lack {line}:\n{config}"
        );
    }
    let all_settings = written_file(&standalone, INSTALL_CONFIG) + &config;
    assert!(!all_settings.contains("hbag_"), "no token in the user-data");

    eprintln!(
        "user-data: {} bytes standalone, {} bytes from the stack (EC2 takes {USER_DATA_LIMIT_BYTES}); checked in {:?}",
        standalone.len(),
        stack.len(),
        started.elapsed()
    );
    assert!(standalone.len() < USER_DATA_LIMIT_BYTES);
    assert!(stack.len() < USER_DATA_LIMIT_BYTES);
}

#[test]
fn stack_template_passes_cfn_lint_and_grants_only_what_the_agent_needs() {
    let started = Instant::now();
    let (ok, output) = run(&repo_root().join("scripts/python-tools"), &[]);
    assert!(ok, "scripts/python-tools failed:\n{output}");
    let installed = started.elapsed();
    let started = Instant::now();
    let (ok, output) = run(
        &repo_root().join(".tools/venv/bin/cfn-lint"),
        &["deploy/aws/agents.yaml"],
    );
    assert!(
        ok,
        "cfn-lint finds problems in deploy/aws/agents.yaml:\n{output}"
    );
    eprintln!(
        "cfn-lint: clean in {:?} (tools ready in {installed:?})",
        started.elapsed()
    );

    let template = template();
    let resources = &template["Resources"];
    // The role: three actions, each on one resource, none a wildcard.
    let statements = get(resources, &["AgentRole", "Properties", "Policies"])
        .as_sequence()
        .expect("policies")
        .iter()
        .flat_map(|policy| {
            get(policy, &["PolicyDocument", "Statement"])
                .as_sequence()
                .expect("statements")
                .clone()
        })
        .collect::<Vec<_>>();
    let actions: Vec<&str> = statements
        .iter()
        .map(|statement| {
            statement["Action"]
                .as_str()
                .expect("one action per statement")
        })
        .collect();
    assert_eq!(
        actions,
        [
            "ssm:GetParameter",
            "kms:Decrypt",
            "autoscaling:CompleteLifecycleAction"
        ]
    );
    for statement in &statements {
        assert_eq!(statement["Effect"].as_str(), Some("Allow"));
    }
    let kms = &statements[1]["Condition"]["StringEquals"];
    assert!(
        !kms["kms:ViaService"].is_null() && !kms["kms:EncryptionContext:PARAMETER_ARN"].is_null(),
        "kms:Decrypt only through SSM, for the token parameter: {kms:?}"
    );
    // Nothing may connect to a build box.
    let group = get(resources, &["AgentSecurityGroup", "Properties"]);
    assert!(group["SecurityGroupIngress"].is_null(), "no inbound rule");
    // Scale-in waits longer than the drain (and the unit's extra minute).
    let hook = &get(
        resources,
        &["AgentGroup", "Properties", "LifecycleHookSpecificationList"],
    )[0];
    assert_eq!(
        hook["LifecycleTransition"].as_str(),
        Some("autoscaling:EC2_INSTANCE_TERMINATING")
    );
    let drains = get(&template, &["Mappings", "Drain"])
        .as_mapping()
        .expect("drain mapping");
    for (minutes, entry) in drains {
        let minutes: u64 = minutes.as_str().expect("key").parse().expect("minutes");
        let heartbeat = entry["HeartbeatSeconds"].as_u64().expect("seconds");
        assert!(
            heartbeat >= (minutes + 2) * 60 && heartbeat <= 7200,
            "drain {minutes} min: heartbeat {heartbeat} s"
        );
    }
}

/// The `hobotnica-agent.service` settings the test starts the agent with.
#[derive(Debug, Default)]
struct Unit {
    user: String,
    working_directory: Option<String>,
    environment_files: Vec<String>,
    environment: Vec<String>,
    exec_start: Vec<String>,
}

impl Unit {
    fn parse(text: &str) -> Unit {
        let mut unit = Unit::default();
        for line in text.lines().map(str::trim) {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "User" => unit.user = value.to_owned(),
                "WorkingDirectory" => {
                    unit.working_directory = Some(value.trim_start_matches('-').to_owned());
                }
                "EnvironmentFile" => unit.environment_files.push(value.to_owned()),
                "Environment" => unit.environment.extend(
                    value
                        .split_whitespace()
                        .map(|pair| pair.trim_matches('"').to_owned()),
                ),
                "ExecStart" => {
                    unit.exec_start = value
                        .trim_start_matches(['-', '@', '+', '!', ':'])
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect();
                }
                _ => {}
            }
        }
        assert!(!unit.user.is_empty(), "the unit names its User:\n{text}");
        assert!(
            !unit.exec_start.is_empty(),
            "the unit has an ExecStart:\n{text}"
        );
        unit
    }
}

/// `KEY=value` lines of an environment file (systemd's `EnvironmentFile`).
fn environment_file(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#') && line.contains('='))
        .map(|line| {
            let (key, value) = line.split_once('=').expect("KEY=value");
            format!("{key}={}", value.trim_matches('"'))
        })
        .collect()
}

/// Replaces `KEY=...` lines of `settings`, asserting each key is there.
fn with_settings(settings: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for line in settings.lines() {
        let key = line.split_once('=').map(|(key, _)| key);
        match values.iter().find(|(name, _)| Some(*name) == key) {
            Some((name, value)) => out.push_str(&format!("{name}={value}\n")),
            None => out.push_str(&format!("{line}\n")),
        }
    }
    for (name, _) in values {
        assert!(
            settings
                .lines()
                .any(|line| line.starts_with(&format!("{name}="))),
            "the user-data's settings have no {name}"
        );
    }
    out
}

fn exec_ok(container: &Container, args: &[&str]) -> String {
    let output = container.exec(args);
    assert!(
        output.status.success(),
        "docker exec {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Every process's command line and environment in the container, as
/// bytes (read as root through /proc).
fn process_strings(container: &Container) -> Vec<u8> {
    let output = container.exec(&[
        "sh",
        "-c",
        "cat /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null; true",
    ]);
    output.stdout
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// The agent package `scripts/package-deb` built.
fn agent_package(docker: &Docker) -> PathBuf {
    docker.script("package-deb", &[]);
    let dir = repo_root().join("target/dist/deb");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .filter_map(|entry| Some(entry.ok()?.path()))
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| {
                    name.starts_with("hobotnica-agent_") && name.ends_with("_amd64.deb")
                })
        })
        .expect("scripts/package-deb made hobotnica-agent_*_amd64.deb")
}

fn sha256_hex(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).expect("read the package");
    hex::encode(Sha256::digest(&bytes))
}

#[tokio::test(flavor = "multi_thread")]
async fn user_data_makes_a_clean_debian_a_build_box_that_runs_a_job() {
    let Some(docker) = docker() else { return };
    let total = Instant::now();

    let step = Instant::now();
    let deb = agent_package(docker);
    let deb_size = std::fs::metadata(&deb).expect("package").len();
    eprintln!(
        "step: agent package {} ({deb_size} bytes) ready in {:?}",
        deb.display(),
        step.elapsed()
    );

    let step = Instant::now();
    let controller = Controller::start(ControllerOpts {
        tls: true,
        ..ControllerOpts::default()
    })
    .await;
    let pki = controller.pki.clone().expect("a TLS controller");
    let api = controller.api();
    let repo = GitRepo::new();
    api.register_repo("demo", &repo.url()).await;
    eprintln!(
        "step: controller (TLS) and repository in {:?}",
        step.elapsed()
    );

    // What the instance would get: the token through the seam, the rest
    // from the user-data with this test's settings.
    let dir = tempfile::Builder::new()
        .prefix("hobotnica-aws-")
        .tempdir()
        .expect("temp dir");
    let token = controller.agent_token.clone();
    let token_path = dir.path().join("token");
    hobotnica_tests::agent::write_file_with_mode(&token_path, &format!("{token}\n"), 0o600);
    let user_data = read(&aws_dir().join("user-data.yaml"));
    let deb_url = format!("file://{}", deb.display());
    let deb_sha = sha256_hex(&deb);
    let settings = with_settings(
        &written_file(&user_data, INSTALL_CONFIG),
        &[
            ("HOBOTNICA_CONTROLLER", controller.grpc_url().as_str()),
            ("HOBOTNICA_AGENT_DEB_URL", deb_url.as_str()),
            ("HOBOTNICA_AGENT_DEB_SHA256", deb_sha.as_str()),
            ("HOBOTNICA_AGENT_LABELS", "cloud=aws,test=install"),
            // This container shares the host's network: leave its firewall.
            ("HOBOTNICA_BLOCK_IMDS", "no"),
        ],
    );
    let ca = read(&pki.ca_cert);

    let step = Instant::now();
    let dir_arg = format!("{0}:{0}:ro", dir.path().display());
    let deb_dir = deb.parent().expect("package dir");
    let deb_arg = format!("{0}:{0}:ro", deb_dir.display());
    let repo_parent = repo.path().parent().expect("repo parent");
    let repo_arg = format!("{0}:{0}:ro", repo_parent.display());
    let container = Container::run(
        docker,
        &unique("hobotnica-aws"),
        &[
            "-v",
            &dir_arg,
            "-v",
            &deb_arg,
            "-v",
            &repo_arg,
            // The agent's bubblewrap sandbox needs namespaces and a fresh
            // /proc, which Docker's default profile forbids.
            "--security-opt",
            "seccomp=unconfined",
            "--security-opt",
            "apparmor=unconfined",
            "--security-opt",
            "systempaths=unconfined",
            "debian:bookworm-slim",
            "sleep",
            "infinity",
        ],
    );
    eprintln!("step: clean container in {:?}", step.elapsed());

    // cloud-init's part: write_files, then runcmd.
    let config: Value = yaml_serde::from_str(&user_data).expect("user-data");
    let files = dir.path().join("files");
    std::fs::create_dir(&files).expect("files dir");
    for (n, entry) in config["write_files"]
        .as_sequence()
        .expect("write_files")
        .iter()
        .enumerate()
    {
        let path = entry["path"].as_str().expect("path");
        let content = match path {
            INSTALL_CONFIG => settings.clone(),
            "/etc/hobotnica/controller-ca.pem" => ca.clone(),
            _ => entry["content"].as_str().expect("content").to_owned(),
        };
        assert!(
            entry["encoding"].is_null(),
            "plain content in user-data.yaml"
        );
        let source = files.join(n.to_string());
        std::fs::write(&source, content).expect("write a file of the user-data");
        let owner = entry["owner"].as_str().unwrap_or("root:root");
        let (user, group) = owner.split_once(':').expect("owner user:group");
        let mode = entry["permissions"].as_str().expect("permissions");
        exec_ok(
            &container,
            &[
                "install",
                "-D",
                "-o",
                user,
                "-g",
                group,
                "-m",
                mode,
                &source.display().to_string(),
                path,
            ],
        );
    }
    let runcmd = config["runcmd"].as_sequence().expect("runcmd");
    assert_eq!(runcmd.len(), 1, "runcmd runs the install script only");
    let command: Vec<&str> = runcmd[0]
        .as_sequence()
        .expect("runcmd as an argument vector")
        .iter()
        .map(|arg| arg.as_str().expect("argument"))
        .collect();
    assert_eq!(command[0], INSTALL_SCRIPT);

    let step = Instant::now();
    let seam = format!("HOBOTNICA_TOKEN_SOURCE=file:{}", token_path.display());
    let mut install = docker.command();
    install
        .args(["exec", "--env", &seam, container.name()])
        .args(&command)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let install = install.spawn().expect("docker exec the install script");
    // While it runs, the token must never be on a command line.
    let waiter = std::thread::spawn(move || install.wait_with_output());
    let mut samples = 0;
    while !waiter.is_finished() {
        let seen = process_strings(&container);
        assert!(
            !contains(&seen, &token),
            "the token is on a command line or in an environment while installing"
        );
        samples += 1;
        assert!(
            step.elapsed() < INSTALL_TIMEOUT,
            "the install takes too long"
        );
    }
    let output = waiter
        .join()
        .expect("install thread")
        .expect("install output");
    let install_output = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!(
        "step: install-agent in {:?} ({samples} process list samples, none with the token)",
        step.elapsed()
    );
    assert!(
        output.status.success(),
        "install-agent failed:\n{install_output}"
    );
    assert!(
        !install_output.contains(&token),
        "install-agent printed the token"
    );

    // The token file and the agent's settings.
    let token_file = exec_ok(
        &container,
        &["stat", "-c", "%a %U %G", "/etc/hobotnica/agent-token"],
    );
    assert_eq!(token_file.trim(), "600 hobotnica hobotnica");
    let agent_env = exec_ok(&container, &["cat", "/etc/hobotnica/agent.env"]);
    assert!(!agent_env.contains(&token), "no token in agent.env");
    for line in [
        format!("HOBOTNICA_CONTROLLER={}", controller.grpc_url()),
        "HOBOTNICA_CA_CERT=/etc/hobotnica/controller-ca.pem".to_owned(),
        "HOBOTNICA_AGENT_TOKEN_FILE=/etc/hobotnica/agent-token".to_owned(),
        "HOBOTNICA_DRAIN_TIMEOUT=10m".to_owned(),
    ] {
        assert!(
            agent_env.lines().any(|l| l == line),
            "agent.env lacks {line}:\n{agent_env}"
        );
    }
    let dropin = exec_ok(
        &container,
        &[
            "cat",
            "/etc/systemd/system/hobotnica-agent.service.d/drain.conf",
        ],
    );
    assert!(dropin.contains("TimeoutStopSec=11min"), "{dropin}");

    // Start the agent the way its unit does.
    let unit_text = exec_ok(
        &container,
        &[
            "sh",
            "-c",
            "cat /etc/systemd/system/hobotnica-agent.service 2>/dev/null || cat /lib/systemd/system/hobotnica-agent.service",
        ],
    );
    let unit = Unit::parse(&unit_text);
    let mut environment = unit.environment.clone();
    for file in &unit.environment_files {
        let (optional, path) = match file.strip_prefix('-') {
            Some(path) => (true, path),
            None => (false, file.as_str()),
        };
        let output = container.exec(&["cat", path]);
        assert!(
            optional || output.status.success(),
            "EnvironmentFile {path}"
        );
        environment.extend(environment_file(&String::from_utf8_lossy(&output.stdout)));
    }
    // The fixture repository belongs to root on the host: let the unit's
    // user's git read it (as an administrator would a shared mirror).
    exec_ok(
        &container,
        &[
            "git",
            "config",
            "--system",
            "--add",
            "safe.directory",
            &repo.path().join(".git").display().to_string(),
        ],
    );
    let step = Instant::now();
    let log_path = dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).expect("agent log");
    let mut start = docker.command();
    start.args(["exec", "--user", &unit.user]);
    if let Some(cwd) = &unit.working_directory {
        start.args(["--workdir", cwd]);
    }
    for pair in &environment {
        start.args(["--env", pair]);
    }
    start
        .arg(container.name())
        .args(&unit.exec_start)
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    let mut agent = start.spawn().expect("docker exec the agent");
    let agents = wait_for(CONNECT_TIMEOUT, "the installed agent to connect", || {
        let api = &api;
        let exited = agent.try_wait().expect("agent status");
        if let Some(status) = exited {
            panic!(
                "the agent exited ({status}):\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        async move {
            let agents = api.agents().await;
            agents
                .iter()
                .any(|agent| agent["connected"].as_bool() == Some(true))
                .then_some(agents)
        }
    })
    .await;
    eprintln!(
        "step: agent connected over TLS in {:?}: {}",
        step.elapsed(),
        agents[0]["name"]
    );
    assert_eq!(agents[0]["labels"]["test"].as_str(), Some("install"));

    let step = Instant::now();
    let job = api.run_target("local/demo", "test").await;
    let done = api.wait_for_success(job.id, JOB_TIMEOUT).await;
    let output = api.output(job.id).await;
    eprintln!(
        "step: make test in {:?} on {:?}",
        step.elapsed(),
        done.agent
    );
    assert!(output.contains("tests passed"), "{output}");

    let seen = process_strings(&container);
    assert!(
        !contains(&seen, &token),
        "the running agent has the token on its command line or in its environment"
    );
    assert!(
        !std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains(&token),
        "the agent logged the token"
    );
    let _ = agent.kill();
    let _ = agent.wait();
    eprintln!("total: {:?}", total.elapsed());
}
