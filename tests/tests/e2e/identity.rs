//! Untrusted code never reaches a secret: an agent's name belongs to the
//! token that registered it, a revoked token's streams close at once, and a
//! deploy (with its secrets) goes only to an agent whose token vouches for
//! the repository's `deploy_labels`. The attacker is a hand-written gRPC
//! client holding a valid (stolen) agent token.

use hobotnica_common::proto::agent_service_client::AgentServiceClient;
use hobotnica_common::proto::{
    AGENT_ID_METADATA, AgentMessage, Assignment, Capacity, CompleteJobRequest, ControllerMessage,
    Hello, LogAck, LogChunk, Outcome, PROTOCOL_VERSION, RegisterRequest, RenewLeaseRequest,
    agent_message, controller_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use super::*;

/// How long a refused or closed stream may take to show it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A per-agent token created through the API (with `labels` unless they are
/// empty): `(id, token)`.
async fn create_token(api: &Api, name: &str, labels: Value) -> (String, String) {
    let mut body = json!({ "name": name });
    if labels != json!({}) {
        body["labels"] = labels.clone();
    }
    let created = api
        .send_json(Method::POST, "/api/v1/agent-tokens", &body)
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let created = created.json();
    if labels != json!({}) {
        assert_eq!(created["labels"], labels, "{created}");
    }
    (
        created["id"].as_str().unwrap().to_owned(),
        created["token"].as_str().unwrap().to_owned(),
    )
}

async fn revoke_token(api: &Api, id: &str) {
    let revoked = api
        .raw(Method::DELETE, &format!("/api/v1/agent-tokens/{id}"), None)
        .await;
    assert_eq!(revoked.status, 204, "{}", revoked.text());
}

/// A hand-written agent: the generated client, a token, and (once
/// registered) an agent id sent as metadata.
struct RawAgent {
    client: AgentServiceClient<Channel>,
    token: String,
    agent_id: Option<String>,
}

impl RawAgent {
    async fn connect(grpc_url: &str, token: &str) -> RawAgent {
        let channel = Channel::from_shared(grpc_url.to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap();
        RawAgent {
            client: AgentServiceClient::new(channel),
            token: token.to_owned(),
            agent_id: None,
        }
    }

    /// As a different agent: another token, maybe someone else's agent id.
    fn with(&self, token: &str, agent_id: Option<&str>) -> RawAgent {
        RawAgent {
            client: self.client.clone(),
            token: token.to_owned(),
            agent_id: agent_id.map(str::to_owned),
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert(
            "authorization",
            format!("Bearer {}", self.token).parse().unwrap(),
        );
        if let Some(id) = &self.agent_id {
            metadata.insert(AGENT_ID_METADATA, id.parse().unwrap());
        }
        request
    }

    async fn register(&mut self, name: &str, labels: &[(&str, &str)]) -> Result<String, Status> {
        let request = self.request(RegisterRequest {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            concurrency: 1,
            version: "raw-agent".to_owned(),
            protocol_version: PROTOCOL_VERSION,
        });
        let id = self.client.register(request).await?.into_inner().agent_id;
        self.agent_id = Some(id.clone());
        Ok(id)
    }

    /// Opens a Session with one free slot.
    async fn session(&mut self) -> (mpsc::Sender<AgentMessage>, Streaming<ControllerMessage>) {
        let (tx, rx) = mpsc::channel(8);
        let agent_id = self.agent_id.clone().unwrap();
        tx.send(AgentMessage {
            kind: Some(agent_message::Kind::Hello(Hello { agent_id })),
        })
        .await
        .unwrap();
        tx.send(AgentMessage {
            kind: Some(agent_message::Kind::Capacity(Capacity {
                free_slots: 1,
                assignments_received: 0,
            })),
        })
        .await
        .unwrap();
        let request = self.request(ReceiverStream::new(rx));
        let stream = self.client.session(request).await.unwrap().into_inner();
        (tx, stream)
    }

    /// Opens PushLogs.
    async fn push_logs(&mut self) -> Result<(mpsc::Sender<LogChunk>, Streaming<LogAck>), Status> {
        let (tx, rx) = mpsc::channel(8);
        let request = self.request(ReceiverStream::new(rx));
        let acks = self.client.push_logs(request).await?.into_inner();
        Ok((tx, acks))
    }

    async fn renew(&mut self, job_id: u64, attempt: u32) -> Result<(), Status> {
        let request = self.request(RenewLeaseRequest { job_id, attempt });
        self.client.renew_lease(request).await.map(|_| ())
    }

    async fn complete(&mut self, job_id: u64, attempt: u32) -> Result<(), Status> {
        let request = self.request(CompleteJobRequest {
            job_id,
            attempt,
            outcome: Outcome::Succeeded as i32,
            exit_code: Some(0),
            message: String::new(),
            log_length: 0,
            duration_ms: 1,
            // As an agent that reports no phases.
            timings: None,
        });
        self.client.complete_job(request).await.map(|_| ())
    }
}

/// The next assignment on a session (heartbeats skipped).
async fn next_assignment(session: &mut Streaming<ControllerMessage>) -> Assignment {
    tokio::time::timeout(JOB_TIMEOUT, async {
        loop {
            let message = session.message().await.unwrap().expect("the session ended");
            if let Some(controller_message::Kind::Assignment(assignment)) = message.kind {
                return assignment;
            }
        }
    })
    .await
    .expect("no assignment in time")
}

fn chunk(assignment: &Assignment, seq: u64, offset: u64, data: &[u8]) -> LogChunk {
    LogChunk {
        job_id: assignment.job_id,
        attempt: assignment.attempt,
        seq,
        offset,
        data: data.to_vec(),
    }
}

/// Waits until the acknowledgement stream is refused (UNAUTHENTICATED) or
/// ends; acks of chunks sent before that are allowed.
async fn expect_closed(acks: &mut Streaming<LogAck>, what: &str) {
    let closed = tokio::time::timeout(CLOSE_TIMEOUT, async {
        loop {
            match acks.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(status) => {
                    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
                    return;
                }
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: the log stream stayed open");
}

/// Waits until the session is refused or ends (messages before that are
/// skipped).
async fn expect_session_closed(session: &mut Streaming<ControllerMessage>, what: &str) {
    let closed = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Ok(Some(_)) = session.message().await {}
    })
    .await;
    assert!(closed.is_ok(), "{what}: the session stayed open");
}

/// What the API shows of agents, without the times that heartbeats move.
async fn agent_identities(api: &Api) -> Vec<Value> {
    api.agents()
        .await
        .into_iter()
        .map(|agent| {
            json!({
                "id": agent["id"],
                "name": agent["name"],
                "labels": agent["labels"],
                "version": agent["version"],
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_token_cannot_take_over_a_registered_agent() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    let repo = GitRepo::new();
    api.register_repo("demo", &repo.url()).await;
    let (_, owner_token) = create_token(&api, "owner-box", json!({})).await;
    let (_, stolen_token) = create_token(&api, "other-box", json!({})).await;

    let name = hobotnica_tests::unique("builder");
    let agent = Agent::start(
        &controller,
        AgentOpts {
            name: Some(name.clone()),
            env: vec![("HOBOTNICA_AGENT_TOKEN".to_owned(), owner_token.clone())],
            ..AgentOpts::default()
        },
    )
    .await;
    let job = api.run_target(REPO, "sleep").await;
    api.wait_for_log(job.id, "sleeping", JOB_TIMEOUT).await;
    let running = api.job(job.id).await;
    assert_eq!(running.state, JobState::Running);
    let real_id = running.agent_id.clone().unwrap();
    let listed_before = agent_identities(&api).await;

    // Registering the agent's name with another valid token is refused,
    // with the pool token too.
    for token in [&stolen_token, &controller.agent_token] {
        let mut impostor = RawAgent::connect(&controller.grpc_url(), token).await;
        let refused = impostor
            .register(&name, &[("pool", "deploy")])
            .await
            .expect_err("another token registered an existing agent's name");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(
            refused.message().contains("another agent token"),
            "{refused:?}"
        );
        assert!(!refused.message().contains(token.as_str()));
    }
    assert_eq!(
        agent_identities(&api).await,
        listed_before,
        "the agent is untouched"
    );

    // Nor may that token act as the agent: no renewal, no log line, no
    // completion.
    let mut impostor = RawAgent::connect(&controller.grpc_url(), &stolen_token)
        .await
        .with(&stolen_token, Some(&real_id));
    let renewed = impostor.renew(job.id, running.attempt).await.unwrap_err();
    assert_eq!(renewed.code(), Code::Unauthenticated, "{renewed:?}");
    let pushed = impostor.push_logs().await.map(|_| ()).unwrap_err();
    assert_eq!(pushed.code(), Code::Unauthenticated, "{pushed:?}");
    let completed = impostor
        .complete(job.id, running.attempt)
        .await
        .unwrap_err();
    assert_eq!(completed.code(), Code::Unauthenticated, "{completed:?}");

    let still = api.job(job.id).await;
    assert_eq!(still.state, JobState::Running, "{still:?}");
    assert_eq!(still.agent_id.as_deref(), Some(real_id.as_str()));
    assert!(!text(&api.log(job.id).await).contains("impostor"));

    // The owner's own token re-registers the name and keeps the id.
    let mut owner = RawAgent::connect(&controller.grpc_url(), &owner_token).await;
    assert_eq!(owner.register(&name, &[]).await.unwrap(), real_id);
    api.cancel(job.id).await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_tokens_open_log_stream_is_closed() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    let repo = GitRepo::new();
    api.register_repo("demo", &repo.url()).await;
    let (token_id, token) = create_token(&api, "box", json!({})).await;

    let mut agent = RawAgent::connect(&controller.grpc_url(), &token).await;
    agent
        .register(&hobotnica_tests::unique("raw"), &[])
        .await
        .unwrap();
    let (_session_tx, mut session) = agent.session().await;
    let job = api.run_target(REPO, "sleep").await;
    let assignment = next_assignment(&mut session).await;
    assert_eq!(assignment.job_id, job.id);

    let (chunks, mut acks) = agent.push_logs().await.unwrap();
    chunks
        .send(chunk(&assignment, 1, 0, b"line one\n"))
        .await
        .unwrap();
    let ack = acks.message().await.unwrap().unwrap();
    assert_eq!(ack.committed, 9);

    revoke_token(&api, &token_id).await;
    expect_closed(&mut acks, "after the revocation").await;
    // A chunk sent now is not written.
    let _ = chunks.send(chunk(&assignment, 2, 9, b"line two\n")).await;
    expect_session_closed(&mut session, "after the revocation").await;
    assert_eq!(api.log(job.id).await, b"line one\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_closed_on_every_controller_of_one_redis() {
    let super::redis_mode::Cluster { a, b, .. } = &super::redis_mode::cluster().await;
    let (token_id, token) = create_token(&a.api(), "box", json!({})).await;

    // Session on controller A, log stream on controller B.
    let mut on_a = RawAgent::connect(&a.grpc_url(), &token).await;
    let agent_id = on_a
        .register(&hobotnica_tests::unique("raw"), &[])
        .await
        .unwrap();
    let (_session_tx, mut session) = on_a.session().await;
    let job = a.api().run_target(REPO, "sleep").await;
    let assignment = next_assignment(&mut session).await;
    assert_eq!(assignment.job_id, job.id);
    let mut on_b = RawAgent::connect(&b.grpc_url(), &token)
        .await
        .with(&token, Some(&agent_id));
    let (chunks, mut acks) = on_b.push_logs().await.unwrap();
    chunks
        .send(chunk(&assignment, 1, 0, b"line one\n"))
        .await
        .unwrap();
    assert_eq!(acks.message().await.unwrap().unwrap().committed, 9);

    // Revoked through A: B closes its log stream, A its session.
    revoke_token(&a.api(), &token_id).await;
    expect_closed(&mut acks, "on the other controller").await;
    expect_session_closed(&mut session, "on the controller that revoked").await;
    let _ = chunks.send(chunk(&assignment, 2, 9, b"line two\n")).await;
    assert_eq!(b.api().log(job.id).await, b"line one\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_registers_only_the_labels_it_carries() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    let (_, test_token) = create_token(&api, "test-box", json!({"pool": "test"})).await;
    let listed = api.get_json("/api/v1/agent-tokens").await;
    assert_eq!(listed["items"][0]["labels"], json!({"pool": "test"}));

    let mut agent = RawAgent::connect(&controller.grpc_url(), &test_token).await;
    for labels in [
        &[("pool", "deploy")][..],
        &[("pool", "test"), ("gpu", "yes")][..],
    ] {
        let refused = agent
            .register(&hobotnica_tests::unique("raw"), labels)
            .await
            .expect_err("a label the token does not carry");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        let (key, value) = labels.last().unwrap();
        assert!(
            refused.message().contains(&format!("{key}={value}")),
            "the error names the label: {refused:?}"
        );
    }
    agent
        .register(&hobotnica_tests::unique("raw"), &[("pool", "test")])
        .await
        .unwrap();
    agent
        .register(&hobotnica_tests::unique("raw"), &[])
        .await
        .unwrap();

    let invalid = api
        .send_json(
            Method::POST,
            "/api/v1/agent-tokens",
            &json!({ "name": "bad", "labels": {"pool": "a b"} }),
        )
        .await;
    invalid.assert_problem(422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_and_their_secrets_go_only_to_agents_whose_token_vouches() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    let repo = GitRepo::new();
    let registered = api
        .register_repo_with(json!({
            "name": "demo",
            "git_url": repo.url(),
            "deploy_labels": {"pool": "deploy"},
        }))
        .await;
    assert_eq!(registered["deploy_labels"], json!({"pool": "deploy"}));
    let secret = hobotnica_tests::unique("deploy-secret");
    api.set_env(REPO, "P_DEPLOY_TOKEN", &secret, "deploy", true)
        .await;
    let (_, test_token) = create_token(&api, "test-pool", json!({"pool": "test"})).await;
    let (_, deploy_token) = create_token(&api, "deploy-pool", json!({"pool": "deploy"})).await;

    // The stolen test-pool token cannot claim the deploy pool's label...
    let mut thief = RawAgent::connect(&controller.grpc_url(), &test_token).await;
    let refused = thief
        .register(&hobotnica_tests::unique("thief"), &[("pool", "deploy")])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("pool=deploy"), "{refused:?}");
    // ...and as a test-pool agent it is given tests, never the deploy,
    // though the deploy was queued first.
    thief
        .register(&hobotnica_tests::unique("thief"), &[("pool", "test")])
        .await
        .unwrap();
    let (thief_tx, mut thief_session) = thief.session().await;
    let deploy = api
        .deploy(REPO, json!({"env": {"E2E_SHOW_ENV": "1"}}))
        .await;
    let test = api.run_target(REPO, "test").await;
    let assignment = next_assignment(&mut thief_session).await;
    assert_eq!(assignment.job_id, test.id, "{assignment:?}");
    assert!(!assignment.secrets.contains(&secret));
    assert!(!assignment.env.values().any(|value| value == &secret));
    thief
        .complete(assignment.job_id, assignment.attempt)
        .await
        .unwrap();
    thief_tx
        .send(AgentMessage {
            kind: Some(agent_message::Kind::Capacity(Capacity {
                free_slots: 1,
                assignments_received: 1,
            })),
        })
        .await
        .unwrap();
    assert_eq!(api.job(test.id).await.state, JobState::Succeeded);
    let waiting = api.job(deploy.id).await;
    assert_eq!(waiting.state, JobState::Queued, "{waiting:?}");
    assert!(
        waiting
            .message
            .as_deref()
            .is_some_and(|m| m.contains("pool=deploy")),
        "{waiting:?}"
    );

    // An agent whose token vouches for pool=deploy runs it, with its secret.
    let deploy_agent = Agent::start(
        &controller,
        AgentOpts {
            labels: vec![("pool".to_owned(), "deploy".to_owned())],
            env: vec![("HOBOTNICA_AGENT_TOKEN".to_owned(), deploy_token.clone())],
            ..AgentOpts::default()
        },
    )
    .await;
    let done = api.wait_for_success(deploy.id, JOB_TIMEOUT).await;
    assert_eq!(done.agent.as_deref(), Some(deploy_agent.name.as_str()));
    let output = api.output(deploy.id).await;
    assert!(output.contains("P_DEPLOY_TOKEN="), "{output}");
    assert!(!output.contains(&secret), "{output}");

    // A repository's deploy labels change where its settings do.
    let changed = api
        .send_json(
            Method::PATCH,
            "/api/v1/repos/local/demo",
            &json!({"deploy_labels": {}}),
        )
        .await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    assert_eq!(changed.json()["deploy_labels"], json!({}));
    let invalid = api
        .send_json(
            Method::PATCH,
            "/api/v1/repos/local/demo",
            &json!({"deploy_labels": {"pool;": "x"}}),
        )
        .await;
    invalid.assert_problem(422);
}

/// A 3 MB version was accepted, `GET /api/v1/agents` then answered 3 MB and
/// `hobot agents ls` panicked. What an agent says about itself is bounded
/// and printable now, or its registration is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_register_huge_or_unprintable_strings() {
    let controller = Controller::start_default().await;
    let api = controller.api();
    let mut raw = RawAgent::connect(&controller.grpc_url(), &controller.agent_token).await;
    let registration = |version: String, labels: &[(&str, &str)]| RegisterRequest {
        name: "rogue".to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        concurrency: 1,
        version,
        protocol_version: PROTOCOL_VERSION,
    };
    let attempts = [
        (registration("v".repeat(3 * 1024 * 1024), &[]), "version"),
        (
            registration("1.0\x1b]0;pwned\x07".to_owned(), &[]),
            "version",
        ),
        (
            registration("1.0".to_owned(), &[("os", "linux\x1b[2J")]),
            "labels.os",
        ),
        (
            registration("1.0".to_owned(), &[("owner", "a\u{202e}b")]),
            "labels.owner",
        ),
    ];
    for (request, field) in attempts {
        let refused = raw
            .client
            .register(raw.request(request))
            .await
            .expect_err("the registration is refused");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().starts_with(field),
            "{}",
            refused.message()
        );
        assert!(refused.message().len() < 200, "{}", refused.message());
    }
    let listed = api.raw(Method::GET, "/api/v1/agents", None).await;
    assert_eq!(listed.status, 200);
    assert!(listed.text().len() < 4096, "{}", listed.text());

    // An ordinary agent with labels in other scripts still registers, and
    // `hobot agents ls` lists it.
    raw.client
        .register(raw.request(registration(
            "1.0".to_owned(),
            &[("city", "Zürich"), ("cpu", "Xeon 8 cores")],
        )))
        .await
        .expect("an ordinary registration");
    let cwd = tempfile::tempdir().unwrap();
    let listed = cli::run(Some(&controller), cwd.path(), &["agents", "ls"]).await;
    let table = listed.success();
    assert!(table.contains("rogue"), "{table}");
    assert!(table.contains("city=Zürich"), "{table}");
}
