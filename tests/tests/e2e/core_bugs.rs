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
