//! CORE: the web dashboard's sessions. Signing in checks the credentials
//! exactly as a REST call does (`authenticate`: the admin token, or a
//! GitHub login and token, with the same limits on failures) and keeps a
//! session in the store under the hash of its id; the id itself lives only
//! in the browser's cookie. A GitHub user's token is kept sealed with the
//! controller's secret key, bound to the session, so that every later
//! request is checked against GitHub like a REST call with that token. A
//! session ends at sign-out or after [`SESSION_LIFETIME`]; an admin session
//! also ends when the admin token changes. Sessions live in the store, so
//! every controller on one Redis knows them.

use std::net::IpAddr;
use std::time::Duration;

use chrono::Utc;
use hobotnica_common::token::{constant_time_eq, hash_token, random_hex};

use crate::auth::Caller;
use crate::error::CoreError;
use crate::services::Services;
use crate::store::{SessionPrincipal, SessionRecord};

/// How long a session lasts after sign-in (it is not extended by use).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// A session's id: the secret in the browser's cookie. Never logged.
pub struct SessionId(String);

impl SessionId {
    /// The id as the cookie carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionId([REDACTED])")
    }
}

/// A session that is valid now.
#[derive(Debug)]
pub struct WebSession {
    pub caller: Caller,
    csrf_token: String,
}

impl WebSession {
    /// The token every form of this session carries.
    pub fn csrf_token(&self) -> &str {
        &self.csrf_token
    }

    /// Whether `given` is this session's CSRF token (constant time).
    pub fn csrf_matches(&self, given: &str) -> bool {
        constant_time_eq(given.as_bytes(), self.csrf_token.as_bytes())
    }
}

/// The context that binds a session's sealed GitHub token to the session.
fn session_context(id_hash: &str) -> String {
    format!("session:{id_hash}")
}

impl Services {
    /// What an admin session remembers of the admin token: a hash of its
    /// hash, so that a new admin token ends the old sessions.
    fn admin_fingerprint(&self) -> String {
        hash_token(&format!("web-session:{}", self.admin_token_hash))
    }

    /// Checks `token` (with `github_login` for a GitHub user) as a REST call
    /// would and opens a session for whoever holds it.
    pub async fn sign_in(
        &self,
        token: &str,
        github_login: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<(SessionId, Caller), CoreError> {
        let caller = self.authenticate(token, github_login, client).await?;
        let id = SessionId(random_hex(32));
        let id_hash = hash_token(id.expose());
        let principal = match &caller {
            Caller::Admin => SessionPrincipal::Admin {
                fingerprint: self.admin_fingerprint(),
            },
            Caller::GitHub { login, token } => SessionPrincipal::GitHub {
                login: login.clone(),
                token_sealed: self
                    .secret_key
                    .seal(token.expose().as_bytes(), &session_context(&id_hash)),
            },
        };
        let now = Utc::now();
        let lifetime = chrono::Duration::from_std(SESSION_LIFETIME)
            .map_err(|_| CoreError::Unavailable("session lifetime out of range".to_owned()))?;
        self.store
            .create_session(
                &id_hash,
                SessionRecord {
                    principal,
                    csrf_token: random_hex(32),
                    created_at: now,
                    expires_at: now + lifetime,
                },
            )
            .await?;
        tracing::info!(who = %caller.name(), "signed in to the web dashboard");
        Ok((id, caller))
    }

    /// The session with cookie value `id`, if it is valid now. A GitHub
    /// user's token is checked again as for a REST call (cached briefly);
    /// a session whose credentials no longer hold is ended.
    pub async fn web_session(
        &self,
        id: &str,
        client: Option<IpAddr>,
    ) -> Result<Option<WebSession>, CoreError> {
        let id_hash = hash_token(id);
        let Some(record) = self.store.get_session(&id_hash, Utc::now()).await? else {
            return Ok(None);
        };
        let caller = match record.principal {
            SessionPrincipal::Admin { fingerprint } => {
                if !constant_time_eq(fingerprint.as_bytes(), self.admin_fingerprint().as_bytes()) {
                    self.store.delete_session(&id_hash).await?;
                    return Ok(None);
                }
                Caller::Admin
            }
            SessionPrincipal::GitHub {
                login,
                token_sealed,
            } => {
                let opened = self
                    .secret_key
                    .open(&token_sealed, &session_context(&id_hash))
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok());
                let Some(token) = opened else {
                    // Sealed under another secret key: sign in again.
                    self.store.delete_session(&id_hash).await?;
                    return Ok(None);
                };
                match self.authenticate(&token, Some(&login), client).await {
                    Ok(caller) => caller,
                    Err(CoreError::Unauthorized(_)) => {
                        self.store.delete_session(&id_hash).await?;
                        return Ok(None);
                    }
                    Err(err) => return Err(err),
                }
            }
        };
        Ok(Some(WebSession {
            caller,
            csrf_token: record.csrf_token,
        }))
    }

    /// Ends the session with cookie value `id` (on every controller).
    pub async fn sign_out(&self, id: &str) -> Result<(), CoreError> {
        Ok(self.store.delete_session(&hash_token(id)).await?)
    }
}
