//! CORE: secrets at rest — the contexts that bind each sealed value to its
//! repository, opening a repository's stored GitHub token and webhook
//! secret, and re-sealing everything under a new key.

use hobotnica_common::job::{EnvValue, Repo};

use crate::github::GitHubToken;
use crate::services::Services;

/// Context strings that bind sealed secrets to their repository.
pub(crate) fn token_context(full_name: &str) -> String {
    format!("github-token:{full_name}")
}
pub(crate) fn webhook_secret_context(full_name: &str) -> String {
    format!("webhook-secret:{full_name}")
}

/// The context of a secret variable.
pub(crate) fn env_context(full_name: &str, key: &str) -> String {
    format!("env:{full_name}:{key}")
}

impl Services {
    /// The stored GitHub token of a repository.
    pub fn repo_token(&self, repo: &Repo) -> Option<GitHubToken> {
        let github = repo.github.as_ref()?;
        match self
            .secret_key
            .open(&github.token_sealed, &token_context(&repo.full_name()))
        {
            Ok(bytes) => String::from_utf8(bytes).ok().map(GitHubToken::new),
            Err(err) => {
                tracing::error!(repo = %repo.full_name(), error = %err, "cannot open the stored GitHub token (wrong --secret-key-file?)");
                None
            }
        }
    }

    /// The webhook secret of a GitHub repository.
    pub fn webhook_secret(&self, repo: &Repo) -> Option<Vec<u8>> {
        let github = repo.github.as_ref()?;
        self.secret_key
            .open(
                &github.webhook_secret_sealed,
                &webhook_secret_context(&repo.full_name()),
            )
            .ok()
    }
}

/// Re-seals one value from `old` to `new`; a value already sealed with `new`
/// (a rotation that was interrupted and run again) is kept.
fn reseal(
    sealed: &str,
    context: &str,
    old: &hobotnica_common::secrets::SecretKey,
    new: &hobotnica_common::secrets::SecretKey,
) -> anyhow::Result<String> {
    if new.open(sealed, context).is_ok() {
        return Ok(sealed.to_owned());
    }
    let plain = old.open(sealed, context).map_err(|_| {
        anyhow::anyhow!("a secret ({context}) opens with neither the old nor the new key")
    })?;
    Ok(new.seal(&plain, context))
}

/// Re-encrypts every secret at rest (GitHub tokens, webhook secrets, secret
/// variables, notification URLs and signing secrets) from `old` to `new`. Safe to run again after an interruption.
/// Returns how many repositories were rewritten.
pub async fn rotate_secret_key(
    store: &dyn crate::store::Store,
    old: &hobotnica_common::secrets::SecretKey,
    new: &hobotnica_common::secrets::SecretKey,
) -> anyhow::Result<usize> {
    let mut rewritten = 0;
    for old_repo in store.list_repos().await? {
        let mut repo = old_repo.clone();
        let full_name = repo.full_name();
        if let Some(github) = repo.github.as_mut() {
            github.token_sealed =
                reseal(&github.token_sealed, &token_context(&full_name), old, new)?;
            github.webhook_secret_sealed = reseal(
                &github.webhook_secret_sealed,
                &webhook_secret_context(&full_name),
                old,
                new,
            )?;
        }
        for var in &mut repo.env {
            if let EnvValue::Sealed(sealed) = &var.value {
                var.value = EnvValue::Sealed(reseal(
                    sealed,
                    &env_context(&full_name, &var.key),
                    old,
                    new,
                )?);
            }
        }
        for target in &mut repo.notifications {
            target.url_sealed = reseal(
                &target.url_sealed,
                &crate::notifications::url_context(&full_name, &target.id),
                old,
                new,
            )?;
            if let Some(secret) = target.secret_sealed.as_mut() {
                *secret = reseal(
                    secret,
                    &crate::notifications::secret_context(&full_name, &target.id),
                    old,
                    new,
                )?;
            }
        }
        anyhow::ensure!(
            store.update_repo(&old_repo, repo).await?,
            "repository {full_name} changed during the rotation; stop the controllers and run it again"
        );
        rewritten += 1;
    }
    Ok(rewritten)
}

#[cfg(test)]
mod rotation_tests {
    use chrono::Utc;
    use hobotnica_common::job::{EnvScope, EnvValue, EnvVar, Repo};
    use hobotnica_common::secrets::SecretKey;

    use super::{env_context, rotate_secret_key};
    use crate::store::Store as _;
    use crate::store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn rotation_reseals_every_secret_and_can_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let old = SecretKey::from_hex(&SecretKey::generate_hex()).unwrap();
        let new = SecretKey::from_hex(&SecretKey::generate_hex()).unwrap();
        let context = env_context("local/demo", "TOKEN");
        let url_context = crate::notifications::url_context("local/demo", "chat");
        let signing_context = crate::notifications::secret_context("local/demo", "chat");
        store
            .create_repo(Repo {
                owner: "local".into(),
                name: "demo".into(),
                git_url: "file:///srv/demo.git".into(),
                default_branch: "main".into(),
                timeout_secs: 60,
                created_at: Utc::now(),
                github: None,
                disabled: None,
                requeue_lost_tests: true,
                deploy_labels: std::collections::BTreeMap::new(),
                max_log_bytes: None,
                notifications: vec![hobotnica_common::notifications::NotificationTarget {
                    id: "chat".into(),
                    kind: hobotnica_common::notifications::NotificationKind::Webhook,
                    events: hobotnica_common::notifications::NotificationEvents::All,
                    url_sealed: old.seal(b"https://hooks.example.com/x", &url_context),
                    host: "hooks.example.com".into(),
                    secret_sealed: Some(old.seal(b"signing-secret", &signing_context)),
                    created_at: Utc::now(),
                    last_delivery: None,
                }],
                env: vec![EnvVar {
                    key: "TOKEN".into(),
                    scope: EnvScope::All,
                    value: EnvValue::Sealed(old.seal(b"s3cret-value", &context)),
                }],
            })
            .await
            .unwrap();
        assert_eq!(rotate_secret_key(&store, &old, &new).await.unwrap(), 1);
        // Again (an interrupted rotation is finished by running it again).
        assert_eq!(rotate_secret_key(&store, &old, &new).await.unwrap(), 1);
        let repo = store.get_repo("local", "demo").await.unwrap().unwrap();
        let EnvValue::Sealed(sealed) = &repo.env[0].value else {
            panic!("the secret is no longer sealed: {:?}", repo.env[0]);
        };
        assert_eq!(new.open(sealed, &context).unwrap(), b"s3cret-value");
        assert!(old.open(sealed, &context).is_err());
        let target = &repo.notifications[0];
        assert_eq!(
            new.open(&target.url_sealed, &url_context).unwrap(),
            b"https://hooks.example.com/x"
        );
        let secret = target.secret_sealed.as_deref().unwrap();
        assert_eq!(
            new.open(secret, &signing_context).unwrap(),
            b"signing-secret"
        );
        assert!(old.open(secret, &signing_context).is_err());
    }
}
