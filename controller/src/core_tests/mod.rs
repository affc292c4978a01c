//! The core's rules, tested in process: `Services` over the embedded store
//! in a temporary directory and the fake GitHub of `hobotnica-tests` (a
//! loopback HTTP server, no processes). Agents are the core's own session
//! and log intake driven through channels; the commit status sender runs as
//! it does in a controller. One file per area: `authorisation`,
//! `triggering`, `deploys`, `idempotency`, `dispatch`, `completion`,
//! `registration`.
//!
//! Waits are on conditions with a deadline. "Nothing else was assigned" is
//! shown by order, not by waiting: a session claims the oldest job it may
//! take, so a newer job assigned first proves the older one was held back.

mod authorisation;
mod completion;
mod deploys;
mod dispatch;
mod idempotency;
mod log_limit;
mod registration;
mod triggering;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args as _, FromArgMatches as _};
use hobotnica_common::ids::JobId;
use hobotnica_common::job::{EnvScope, Job, JobState, Outcome, Repo};
use hobotnica_tests::git::GitRepo;
use hobotnica_tests::github::{FakeGitHub, Permission};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::agents::{
    AgentError, AgentRecord, Completion, JobAssignment, LogPiece, Registration, SessionInput,
    SessionOutput,
};
use crate::auth::Caller;
use crate::config::ControllerConfig;
use crate::deliveries::{Delivery, DeliveryError, Received};
use crate::error::CoreError;
use crate::jobs::JobRequest;
use crate::repos::{NewGitHubRepo, NewRepo, NewRepository, Registered};
use crate::services::Services;
use crate::variables::SetEnv;

/// Longer than anything here takes.
const DEADLINE: Duration = Duration::from_secs(30);

/// Where the REST API is said to be (links, webhook URLs).
const PUBLIC_URL: &str = "http://hobotnica.test";

/// The owner of every GitHub repository here.
const OWNER: &str = "octo-org";

/// A GitHub user and their token.
#[derive(Clone, Copy, Debug)]
struct User {
    login: &'static str,
    token: &'static str,
}

/// Admin on every repository [`Core::github_repo`] makes; registers them.
const MAINTAINER: User = User {
    login: "maintainer",
    token: "ghp_core_tests_maintainer_0000000000001",
};
/// Push on every repository.
const WRITER: User = User {
    login: "writer",
    token: "ghp_core_tests_writer_00000000000000002",
};
/// Pull on every repository.
const READER: User = User {
    login: "reader",
    token: "ghp_core_tests_reader_00000000000000003",
};
/// No access to any repository.
const STRANGER: User = User {
    login: "stranger",
    token: "ghp_core_tests_stranger_000000000000004",
};

/// A controller's core with a fake GitHub. Dropping it stops the status
/// sender and the sessions it started.
struct Core {
    services: Services,
    github: FakeGitHub,
    admin_token: String,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Core {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Core {
    /// A fresh core: an empty store, the four users on the fake GitHub, and
    /// the commit status sender and the idle-session waker running.
    async fn start() -> Core {
        Core::start_with(&[]).await
    }

    /// A fresh core whose controller also has the options `extra`.
    async fn start_with(extra: &[&str]) -> Core {
        let github = FakeGitHub::start().await;
        for user in [MAINTAINER, WRITER, READER, STRANGER] {
            github.add_user(user.login, user.token);
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        let mut args = vec![
            "--data-dir".to_owned(),
            data_dir.to_str().expect("UTF-8 path").to_owned(),
        ];
        args.extend(github.controller_args());
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let command = ControllerConfig::augment_args(clap::Command::new("t").no_binary_name(true));
        let matches = command.try_get_matches_from(args).expect("controller args");
        let config = ControllerConfig::from_arg_matches(&matches).expect("controller config");
        let controller = crate::Controller::open(config)
            .await
            .expect("the controller opens");
        let admin_token = controller.admin_token().to_owned();
        let crate::Controller {
            services,
            statuses_rx,
            ..
        } = controller;
        let _ = services.public_url.set(PUBLIC_URL.to_owned());
        let shutdown = CancellationToken::new();
        tokio::spawn(crate::statuses::post_statuses(
            services.clone(),
            statuses_rx,
            shutdown.clone(),
        ));
        tokio::spawn(crate::wakeups::wake_idle_sessions(
            services.clone(),
            shutdown.clone(),
        ));
        Core {
            services,
            github,
            admin_token,
            shutdown,
            _dir: dir,
        }
    }

    fn admin(&self) -> Caller {
        Caller::Admin
    }

    /// `user`, authenticated as the REST API does it (token and login).
    async fn github_user(&self, user: User) -> Caller {
        self.services
            .authenticate(user.token, Some(user.login), None)
            .await
            .unwrap_or_else(|err| panic!("{} authenticates: {err}", user.login))
    }

    /// A repository `octo-org/<name>` on the fake GitHub (admin for the
    /// maintainer, push for the writer, pull for the reader), registered by
    /// the maintainer with `deploy_labels`.
    async fn github_repo(&self, name: &str, deploy_labels: &[(&str, &str)]) -> Registered {
        self.add_github_repo(name);
        let maintainer = self.github_user(MAINTAINER).await;
        self.services
            .register(
                &maintainer,
                NewRepository::GitHub(NewGitHubRepo {
                    owner: Some(OWNER.to_owned()),
                    name: name.to_owned(),
                    branch: None,
                    timeout_secs: None,
                    create_webhook: false,
                    deploy_labels: labels(deploy_labels),
                    max_log_bytes: None,
                }),
            )
            .await
            .unwrap_or_else(|err| panic!("{OWNER}/{name} registers: {err}"))
    }

    /// `octo-org/<name>` on the fake GitHub only, with the usual grants.
    fn add_github_repo(&self, name: &str) -> Arc<GitRepo> {
        let git = self.github.add_repo(OWNER, name, "main");
        let full_name = format!("{OWNER}/{name}");
        self.github
            .grant(MAINTAINER.token, &full_name, Permission::Admin);
        self.github
            .grant(WRITER.token, &full_name, Permission::Push);
        self.github
            .grant(READER.token, &full_name, Permission::Pull);
        git
    }

    /// GitHub's `push` payload for the tip of `main` of `octo-org/<name>`
    /// (a new branch), and that commit.
    fn push_of_head(&self, name: &str) -> (serde_json::Value, String) {
        let sha = self.git(name).head();
        let payload = self.github.push_payload(
            &format!("{OWNER}/{name}"),
            "refs/heads/main",
            hobotnica_tests::github::ZERO_SHA,
            &sha,
            false,
            false,
        );
        (payload, sha)
    }

    /// The ids of the jobs `caller` may see matching `query`, newest first
    /// (one page).
    async fn job_ids(&self, caller: &Caller, query: crate::jobs::JobQuery) -> Vec<JobId> {
        self.services
            .visible_jobs(
                caller,
                query,
                crate::jobs::Page::new(None, None).expect("page"),
            )
            .await
            .expect("jobs")
            .jobs
            .into_iter()
            .map(|job| job.id)
            .collect()
    }

    /// The git repository behind `octo-org/<name>`.
    fn git(&self, name: &str) -> Arc<GitRepo> {
        self.github.repo(&format!("{OWNER}/{name}"))
    }

    /// `local/<name>`, registered by the admin by git URL (never fetched
    /// here: its jobs name their commits).
    async fn git_repo(&self, name: &str, deploy_labels: &[(&str, &str)]) -> Repo {
        self.register_git(NewRepo {
            deploy_labels: labels(deploy_labels),
            ..new_git_repo(name)
        })
        .await
        .unwrap_or_else(|err| panic!("local/{name} registers: {err}"))
    }

    /// Registers `new` by git URL, as the admin.
    async fn register_git(&self, new: NewRepo) -> Result<Repo, CoreError> {
        self.services
            .register(&Caller::Admin, NewRepository::Git(new))
            .await
            .map(|registered| registered.repo)
    }

    /// Queues `make <target>` on `owner/name` at the tip of its default
    /// branch (GitHub) or at a made-up commit (a git URL), as the admin.
    async fn queue(&self, repo: &Repo, target: &str) -> Job {
        let request = if repo.github.is_some() {
            request(target)
        } else {
            at_commit(target, &fake_sha(target))
        };
        let job = if target == "deploy" {
            self.services
                .deploy(&Caller::Admin, &repo.owner, &repo.name, request, None)
                .await
                .map(|(job, _)| job)
        } else {
            self.services
                .trigger(&Caller::Admin, &repo.owner, &repo.name, request)
                .await
        };
        job.unwrap_or_else(|err| panic!("make {target} on {} queues: {err}", repo.full_name()))
    }

    /// Sets a variable on `repo` as the admin.
    async fn set_variable(
        &self,
        repo: &Repo,
        key: &str,
        value: &str,
        scope: EnvScope,
        secret: bool,
    ) {
        self.services
            .set_variable(
                &Caller::Admin,
                &repo.owner,
                &repo.name,
                SetEnv {
                    key: key.to_owned(),
                    value: value.to_owned(),
                    secret,
                    scope,
                },
            )
            .await
            .unwrap_or_else(|err| panic!("{key} is set: {err}"));
    }

    /// Job `id` as the admin reads it.
    async fn job(&self, id: JobId) -> Job {
        self.services
            .job_for(&Caller::Admin, id, crate::auth::Access::Read)
            .await
            .unwrap_or_else(|err| panic!("job {id} reads: {err}"))
    }

    /// An agent `name` registered with a token of its own that allows
    /// `token_labels` (none: any labels, vouching for none), carrying
    /// `agent_labels`, taking up to `concurrency` jobs.
    async fn agent(
        &self,
        name: &str,
        token_labels: &[(&str, &str)],
        agent_labels: &[(&str, &str)],
        concurrency: u32,
    ) -> TestAgent {
        let (_, token) = self
            .services
            .create_agent_token(
                &Caller::Admin,
                format!("{name}-token"),
                labels(token_labels),
            )
            .await
            .expect("an agent token");
        let registered = self
            .services
            .register_agent(
                &token,
                Registration {
                    name: name.to_owned(),
                    labels: labels(agent_labels),
                    concurrency,
                    version: "test".to_owned(),
                    protocol_version: hobotnica_common::proto::PROTOCOL_VERSION,
                },
            )
            .await
            .unwrap_or_else(|err| panic!("agent {name} registers: {err}"));
        TestAgent {
            token,
            record: registered.agent,
        }
    }

    /// Opens `agent`'s dispatch session.
    async fn session(&self, agent: &TestAgent) -> Session {
        let attached = self
            .services
            .attach_agent(&agent.token, &agent.record.id.0)
            .await
            .expect("the agent attaches");
        let (says, inbound) = mpsc::channel(16);
        let (outbound, hears) = mpsc::channel(64);
        tokio::spawn(crate::agents::run_session(
            self.services.clone(),
            attached,
            ReceiverStream::new(inbound),
            outbound,
            self.shutdown.child_token(),
        ));
        Session { says, hears }
    }

    /// An agent with one free slot that has taken `job` (queued last).
    async fn agent_running(&self, name: &str, job: &Job) -> (TestAgent, Session) {
        let agent = self.agent(name, &[], &[], 1).await;
        let mut session = self.session(&agent).await;
        session.offer(1, 0).await;
        let assignment = session.assignment().await;
        assert_eq!(assignment.job.id, job.id, "{name} takes job {}", job.id);
        (agent, session)
    }

    /// Ships `data` as the log of `job` (from offset 0) through the log
    /// intake, as `agent`; returns the committed length.
    async fn ship_log(&self, agent: &TestAgent, job: &Job, data: &[u8]) -> u64 {
        self.ship_pieces(agent, job, &[(0, data)]).await[0]
    }

    /// Ships `(offset, data)` pieces of the log of `job` on one stream
    /// through the log intake, as `agent`; returns each piece's
    /// acknowledged committed length.
    async fn ship_pieces(&self, agent: &TestAgent, job: &Job, pieces: &[(u64, &[u8])]) -> Vec<u64> {
        let attached = self
            .services
            .attach_agent(&agent.token, &agent.record.id.0)
            .await
            .expect("the agent attaches");
        let (sender, inbound) = mpsc::channel(1);
        let (outbound, mut acks) = mpsc::channel(1);
        let intake = tokio::spawn(crate::agents::run_log_intake(
            self.services.clone(),
            attached,
            ReceiverStream::new(inbound),
            outbound,
            self.shutdown.child_token(),
        ));
        let mut committed = Vec::new();
        for (seq, (offset, data)) in (0u64..).zip(pieces) {
            sender
                .send(LogPiece {
                    job: job.id,
                    attempt: job.attempt.max(1),
                    seq,
                    offset: *offset,
                    data: data.to_vec(),
                })
                .await
                .expect("the intake takes the piece");
            let ack = tokio::time::timeout(DEADLINE, acks.recv())
                .await
                .expect("the piece is answered")
                .expect("the intake answers")
                .unwrap_or_else(|err| panic!("the piece is refused: {err}"));
            committed.push(ack.committed);
        }
        drop(sender);
        tokio::time::timeout(DEADLINE, intake)
            .await
            .expect("the intake ends with its stream")
            .expect("the intake does not panic");
        committed
    }

    /// `agent` says attempt 1 of `job` ended with `outcome`, having sent
    /// `log_length` log bytes.
    async fn complete(
        &self,
        agent: &TestAgent,
        job: &Job,
        outcome: Outcome,
        log_length: u64,
    ) -> Result<(), AgentError> {
        self.services
            .complete_agent_job(
                &agent.record,
                Completion {
                    job: job.id,
                    attempt: 1,
                    outcome: Some(outcome),
                    exit_code: Some(match outcome {
                        Outcome::Succeeded => 0,
                        _ => 2,
                    }),
                    message: String::new(),
                    log_length,
                    duration_ms: 10,
                    timings: None,
                },
            )
            .await
    }

    /// Delivers `payload` as GitHub would deliver `event` to the webhook of
    /// `registered`: signed with its secret, as delivery `delivery_id`.
    async fn deliver(
        &self,
        registered: &Registered,
        event: &str,
        delivery_id: &str,
        payload: &serde_json::Value,
    ) -> Result<Received, DeliveryError> {
        let webhook = registered
            .webhook
            .as_ref()
            .expect("a GitHub repository has a webhook");
        let hook_id = webhook.url.rsplit('/').next().expect("the hook id");
        let body = serde_json::to_vec_pretty(payload).expect("JSON");
        let signature = hobotnica_tests::github::signature(&webhook.secret, &body);
        let repo = self.services.delivery_target(hook_id).await?;
        self.services
            .receive_delivery(
                &repo,
                Delivery {
                    signature: Some(&signature),
                    event: Some(event),
                    delivery_id: Some(delivery_id),
                    body: &body,
                },
            )
            .await
    }

    /// The commit statuses posted for `sha` of `octo-org/<name>`, once
    /// `count` of them were posted: `(state, context)` each, oldest first.
    async fn statuses(&self, name: &str, sha: &str, count: usize) -> Vec<(String, String)> {
        let full_name = format!("{OWNER}/{name}");
        hobotnica_tests::wait_until(DEADLINE, &format!("{count} statuses of {sha}"), || {
            let posted = self.github.statuses(&full_name, sha).len();
            async move { posted >= count }
        })
        .await;
        self.github
            .statuses(&full_name, sha)
            .into_iter()
            .map(|status| (status.state, status.context))
            .collect()
    }
}

/// A registered agent and its token.
struct TestAgent {
    token: String,
    record: AgentRecord,
}

/// An open dispatch session, from the agent's side.
struct Session {
    says: mpsc::Sender<SessionInput>,
    hears: mpsc::Receiver<Result<SessionOutput, AgentError>>,
}

impl Session {
    /// Tells the controller the agent has `free_slots` and has received
    /// `received` assignments so far.
    async fn offer(&self, free_slots: u32, received: u64) {
        self.says
            .send(SessionInput::Capacity {
                free_slots,
                assignments_received: received,
            })
            .await
            .expect("the session listens");
    }

    /// The next message that is not a heartbeat.
    async fn next(&mut self) -> SessionOutput {
        loop {
            match tokio::time::timeout(DEADLINE, self.hears.recv()).await {
                Ok(Some(Ok(SessionOutput::Heartbeat))) => {}
                Ok(Some(Ok(output))) => return output,
                Ok(Some(Err(err))) => panic!("the session ended: {err}"),
                Ok(None) => panic!("the session ended"),
                Err(_) => panic!("the session said nothing within {DEADLINE:?}"),
            }
        }
    }

    /// The next assignment (anything else on the way is a failure).
    async fn assignment(&mut self) -> Box<JobAssignment> {
        match self.next().await {
            SessionOutput::Assign(assignment) => assignment,
            SessionOutput::Cancel { job, .. } => panic!("expected an assignment, got cancel {job}"),
            SessionOutput::Forget { git_url } => {
                panic!("expected an assignment, got forget {git_url}")
            }
            SessionOutput::Heartbeat => unreachable!("heartbeats are skipped"),
        }
    }
}

/// `make <target>` at the tip of the default branch.
fn request(target: &str) -> JobRequest {
    JobRequest {
        target: target.to_owned(),
        commit: None,
        branch: None,
        env: BTreeMap::new(),
    }
}

/// `make <target>` at `commit`.
fn at_commit(target: &str, commit: &str) -> JobRequest {
    JobRequest {
        commit: Some(commit.to_owned()),
        ..request(target)
    }
}

/// A well-formed commit sha made from `seed`.
fn fake_sha(seed: &str) -> String {
    hobotnica_common::token::hash_token(seed)[..40].to_owned()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    labels(pairs)
}

/// The field an `Invalid` error names (a failure for any other result).
fn invalid_field<T: std::fmt::Debug>(result: Result<T, CoreError>) -> String {
    match result {
        Err(CoreError::Invalid(err)) => err.field,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// Asserts a job reached `state`.
fn assert_state(job: &Job, state: JobState) {
    assert_eq!(job.state, state, "job {}: {:?}", job.id, job.message);
}

/// `local/<name>` at a made-up git URL, every setting left to its default.
fn new_git_repo(name: &str) -> NewRepo {
    NewRepo {
        owner: None,
        name: name.to_owned(),
        git_url: format!("file:///srv/git/{name}.git"),
        branch: None,
        timeout_secs: None,
        requeue_lost_tests: None,
        deploy_labels: BTreeMap::new(),
        max_log_bytes: None,
    }
}
