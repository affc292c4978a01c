//! Registration and triggering against a fake GitHub where something goes
//! wrong half way: a repository registered twice, a stored token revoked.

use hobotnica_tests::github::Permission;

use super::github::{GH_REPO, github_setup};
use super::*;

/// Registering a repository that is already registered, with
/// `create_webhook`, is refused with 409. Before the fix the webhook was
/// created on GitHub before the record was found taken, so every refused
/// attempt left one more hook behind (posting to the same URL path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_repository_twice_leaves_one_webhook_on_github() {
    let s = github_setup(Permission::Admin, &[]).await;
    let body = json!({ "create_webhook": true });
    let first = s.user.register(GH_REPO, body.clone()).await;
    assert_eq!(first.status, 201, "{}", first.text());

    let again = s.user.register(GH_REPO, body).await;
    let problem = again.assert_problem(409);
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains(GH_REPO)),
        "{problem}"
    );
    let hooks = s.github.hooks(GH_REPO);
    assert_eq!(
        hooks.len(),
        1,
        "one hook, the first registration's: {hooks:#?}"
    );
    assert_eq!(
        Some(hooks[0].url.as_str()),
        first.json()["webhook_url"].as_str()
    );
}

/// The token a GitHub repository was registered with is revoked on GitHub;
/// the admin then runs a job and a deploy. Before the fix the stored
/// token's rejection was reported as the caller's (401 "GitHub rejected the
/// token"), though the admin's own token was fine, and the repository was
/// not marked as having lost access. Now the answer names the repository's
/// stored token and what to do, and the repository shows as disabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_stored_token_disables_the_repository_instead_of_blaming_the_caller() {
    let s = github_setup(Permission::Admin, &[]).await;
    let registered = s.user.register(GH_REPO, json!({})).await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    s.github.revoke(&s.token);

    let run = format!("/api/v1/repos/{GH_REPO}/jobs");
    let answer = s
        .api
        .send_json(Method::POST, &run, &json!({ "target": "test" }))
        .await;
    assert_ne!(answer.status, 401, "{}", answer.text());
    let problem = answer.assert_problem(410);
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(GH_REPO) && detail.contains("stored GitHub token"),
        "the detail names the repository's token: {problem}"
    );
    let shown = s.api.get_json(&format!("/api/v1/repos/{GH_REPO}")).await;
    assert!(
        shown["disabled"]
            .as_str()
            .is_some_and(|reason| reason.contains("access to GitHub lost")),
        "shown as having lost access: {shown}"
    );

    // A deploy now finds the repository disabled, as any later request.
    let deploy = format!("/api/v1/repos/{GH_REPO}/deploy");
    let answer = s.api.send_json(Method::POST, &deploy, &json!({})).await;
    answer.assert_problem(410);
    assert!(s.api.jobs(&format!("repo={GH_REPO}")).await.is_empty());
}
