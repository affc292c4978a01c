//! What an agent may say about itself. Everything it sends is shown to
//! operators (`GET /api/v1/agents`, `hobot agents ls`, a job's message):
//! a registration is bounded and holds no control or bidi characters, or it
//! is refused naming the field and the limit; a completion message is
//! stored as one bounded line.

use hobotnica_common::job::Outcome;

use super::*;

/// Registers `name` with a token of its own, carrying `version` and
/// `agent_labels`.
async fn register(
    core: &Core,
    name: &str,
    version: &str,
    agent_labels: BTreeMap<String, String>,
) -> Result<crate::agents::Registered, AgentError> {
    let (_, token) = core
        .services
        .create_agent_token(&Caller::Admin, format!("{name}-token"), BTreeMap::new())
        .await
        .expect("an agent token");
    core.services
        .register_agent(
            &token,
            Registration {
                name: name.to_owned(),
                labels: agent_labels,
                concurrency: 1,
                version: version.to_owned(),
                protocol_version: hobotnica_common::proto::PROTOCOL_VERSION,
            },
        )
        .await
}

/// The refusal's message, which must name `field` and say `limit`.
fn refused(result: Result<crate::agents::Registered, AgentError>, field: &str, limit: &str) {
    match result {
        Err(AgentError::Invalid(message)) => {
            assert!(message.starts_with(field), "{message}");
            assert!(message.contains(limit), "{message}");
            assert!(message.len() < 200, "the message is short: {message}");
        }
        other => panic!(
            "expected Invalid naming {field}, got {:?}",
            other.map(|r| r.agent)
        ),
    }
}

/// A 3 MB version was accepted, and `GET /api/v1/agents` then answered
/// 3 MB (and `hobot agents ls` panicked).
#[tokio::test]
async fn a_huge_or_unprintable_version_is_refused() {
    let core = Core::start().await;
    let huge = "v".repeat(3 * 1024 * 1024);
    refused(
        register(&core, "huge", &huge, BTreeMap::new()).await,
        "version",
        "64",
    );
    refused(
        register(
            &core,
            "esc",
            "1.0\u{1b}]52;c;cHduZWQ=\u{7}",
            BTreeMap::new(),
        )
        .await,
        "version",
        "printable ASCII",
    );
    let listed = core.services.agents_overview(&Caller::Admin).await.unwrap();
    assert!(
        listed.is_empty(),
        "nothing was registered: {} agents",
        listed.len()
    );

    register(&core, "fine", "0.1.0 (abc123)", BTreeMap::new())
        .await
        .expect("an ordinary version registers");
}

#[tokio::test]
async fn labels_are_bounded_and_printable() {
    let core = Core::start().await;
    refused(
        register(&core, "esc", "1", labels(&[("os", "linux\u{1b}[2J")])).await,
        "labels.os",
        "control",
    );
    refused(
        register(
            &core,
            "bidi",
            "1",
            labels(&[("owner", "evil\u{202e}lanigiro")]),
        )
        .await,
        "labels.owner",
        "bidi",
    );
    refused(
        register(&core, "long", "1", labels(&[("os", &"x".repeat(257))])).await,
        "labels.os",
        "256",
    );
    refused(
        register(&core, "key", "1", labels(&[("o s", "linux")])).await,
        "labels",
        "label key",
    );
    let many: BTreeMap<String, String> =
        (0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    refused(register(&core, "many", "1", many).await, "labels", "64");

    // What agents describe themselves with still registers.
    let registered = register(
        &core,
        "fine",
        "1",
        labels(&[
            ("cpu", "Intel(R) Xeon(R) 8 cores"),
            ("city", "Zürich"),
            ("gpu", ""),
        ]),
    )
    .await
    .expect("printable labels register");
    assert_eq!(registered.agent.labels["city"], "Zürich");
}

/// A job's message is shown on one line of a terminal: control characters
/// are replaced, bidi controls dropped, and it is bounded.
#[tokio::test]
async fn a_completion_message_is_stored_as_one_bounded_line() {
    let core = Core::start().await;
    let repo = core.git_repo("app", &[]).await;
    let job = core.queue(&repo, "test").await;
    let (agent, _session) = core.agent_running("builder", &job).await;
    let message = format!("failed\n\u{1b}]0;pwned\u{7}\u{202e}{}", "x".repeat(5000));
    core.services
        .complete_agent_job(
            &agent.record,
            Completion {
                job: job.id,
                attempt: 1,
                outcome: Some(Outcome::Failed),
                exit_code: Some(2),
                message,
                log_length: 0,
                duration_ms: 1,
                timings: None,
            },
        )
        .await
        .expect("the completion is recorded");
    let stored = core.job(job.id).await.message.expect("a message");
    assert!(
        stored.starts_with("failed \u{fffd}]0;pwned\u{fffd}xxx"),
        "{stored:?}"
    );
    assert_eq!(stored.chars().count(), 1000);
    assert!(!stored.chars().any(|c| c.is_control() || c == '\u{202e}'));
}
