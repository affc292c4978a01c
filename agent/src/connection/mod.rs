//! The agent's side of `AgentService`: tonic channels to the controllers,
//! the authorization metadata, fail-over between controllers, back-off, and
//! the one mapping from `tonic::Status` to [`RpcError`].
//!
//! Architecture invariant: only this module (and `wire`) names proto types;
//! the rest of the agent speaks in `JobSpec`, `JobKey` and `Completion`.

mod wire;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use hobotnica_common::ids::AgentId;
use hobotnica_common::private_fs::Secret;
use hobotnica_common::proto::agent_service_client::AgentServiceClient;
use hobotnica_common::proto::{self, AGENT_ID_METADATA, PROTOCOL_VERSION};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use crate::job::{Completion, JobKey, LeaseTimings};

pub use wire::{LOG_QUEUE_CHUNKS, LogAck, LogStream, SendError, SessionCommand, SessionStream};

/// Longest wait for the answer of a unary call (or a stream's headers).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for a TCP connection to a controller.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First delay before retrying a failed call.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest delay between retries.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a call to the controller failed, in the terms the agent acts on
/// (see the status codes in agent.proto).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// UNAUTHENTICATED: the token is wrong or revoked.
    #[error("the controller refused the agent token: {0}")]
    Unauthenticated(String),
    /// NOT_FOUND: the controller does not know this agent id; register again.
    #[error("the controller does not know this agent: {0}")]
    UnknownAgent(String),
    /// FAILED_PRECONDITION: a stale attempt or a job no longer running (at
    /// registration: a protocol mismatch).
    #[error("refused by the controller (failed precondition): {0}")]
    FailedPrecondition(String),
    /// ABORTED (CompleteJob): the controller's log is shorter than ours.
    #[error("the controller's log is incomplete: {0}")]
    LogIncomplete(String),
    /// A request the controller will never accept (invalid argument,
    /// permission denied, unimplemented, ...).
    #[error("refused by the controller ({code:?}): {message}")]
    Refused { code: Code, message: String },
    /// The controller is down, unreachable or overloaded: retry, possibly
    /// against another controller.
    #[error("controller unavailable: {0}")]
    Unavailable(String),
}

impl From<Status> for RpcError {
    fn from(status: Status) -> RpcError {
        let message = status.message().to_owned();
        match status.code() {
            Code::Unauthenticated => RpcError::Unauthenticated(message),
            Code::NotFound => RpcError::UnknownAgent(message),
            Code::FailedPrecondition => RpcError::FailedPrecondition(message),
            Code::Aborted => RpcError::LogIncomplete(message),
            code @ (Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unimplemented
            | Code::OutOfRange
            | Code::AlreadyExists) => RpcError::Refused { code, message },
            // Unavailable, DeadlineExceeded, Cancelled, Unknown, Internal,
            // ResourceExhausted, DataLoss, Ok: transport trouble or a
            // controller restarting; worth another try.
            code => RpcError::Unavailable(format!("{code:?}: {message}")),
        }
    }
}

impl RpcError {
    /// Whether trying again later (maybe elsewhere) can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, RpcError::Unavailable(_))
    }
}

/// Exponential back-off: 100 ms doubling up to 5 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_INITIAL,
        }
    }
}

impl Backoff {
    /// The delay to wait now; the next one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        delay
    }

    pub fn reset(&mut self) {
        self.next = BACKOFF_INITIAL;
    }
}

/// The agent's registration: its id and the lease timings.
#[derive(Debug, Clone)]
pub struct Registration {
    pub agent_id: AgentId,
    pub timings: LeaseTimings,
}

/// What RenewLease answered.
#[derive(Debug, Clone, Copy)]
pub struct LeaseStatus {
    pub cancel_requested: bool,
}

/// Who the agent is, as sent in Register.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub concurrency: u32,
}

/// Adds `authorization` and, once registered, the agent id to every call.
#[derive(Clone)]
struct Auth {
    /// `Bearer <token>`, marked sensitive so that it is never printed.
    authorization: MetadataValue<Ascii>,
    agent_id: Arc<RwLock<Option<MetadataValue<Ascii>>>>,
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert("authorization", self.authorization.clone());
        let agent_id = self.agent_id.read().unwrap_or_else(|e| e.into_inner());
        if let Some(agent_id) = agent_id.as_ref() {
            metadata.insert(AGENT_ID_METADATA, agent_id.clone());
        }
        Ok(request)
    }
}

type Client = AgentServiceClient<InterceptedService<Channel, Auth>>;

struct Controller {
    url: String,
    channel: Channel,
}

struct Inner {
    controllers: Vec<Controller>,
    /// Index of the controller calls go to; moves on after a transient error.
    current: AtomicUsize,
    auth: Auth,
    identity: AgentIdentity,
}

/// A cheap, cloneable handle on the controllers.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

/// PEM client certificate and key for mutual TLS. No `Debug`: it holds a
/// private key.
#[derive(Clone)]
pub struct ClientIdentity {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

/// How `https://` controllers are verified, and what the agent presents.
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// PEM CA certificate(s) that replace the system roots.
    pub ca_cert: Option<Vec<u8>>,
    /// A client certificate (controllers started with `--client-ca`).
    pub identity: Option<ClientIdentity>,
}

impl TlsOptions {
    /// The tonic client configuration: the given CA or the system roots;
    /// verification is never off.
    fn client_config(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new();
        let config = match &self.ca_cert {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        match &self.identity {
            Some(identity) => config.identity(Identity::from_pem(&identity.cert, &identity.key)),
            None => config,
        }
    }
}

/// The one place where a controller endpoint is configured: timeouts,
/// keep-alive, and TLS for `https://` URLs. An unanswered ping (`keepalive`
/// after it was sent) closes the connection, failing every call on it.
fn endpoint(url: &str, tls: &TlsOptions, keepalive: Duration) -> anyhow::Result<Endpoint> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("invalid controller URL {url:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(keepalive)
        .keep_alive_while_idle(true);
    if endpoint.uri().scheme_str() == Some("https") {
        let roots = match tls.ca_cert {
            Some(_) => "the --ca-cert certificates",
            None => "the system's root certificates (give --ca-cert for a private CA)",
        };
        endpoint = endpoint
            .tls_config(tls.client_config())
            .with_context(|| format!("cannot set up TLS for {url} with {roots}"))?;
    }
    Ok(endpoint)
}

impl Connection {
    /// Channels to `urls` (connected lazily, reconnecting on their own),
    /// pinged every `keepalive`.
    pub fn new(
        urls: &[String],
        token: &Secret,
        identity: AgentIdentity,
        tls: &TlsOptions,
        keepalive: Duration,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!urls.is_empty(), "no controller URL given");
        let controllers = urls
            .iter()
            .map(|url| {
                Ok(Controller {
                    url: url.clone(),
                    channel: endpoint(url, tls, keepalive)?.connect_lazy(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut authorization: MetadataValue<Ascii> =
            format!("Bearer {}", token.expose()).parse().map_err(|_| {
                anyhow::anyhow!("the agent token contains characters not allowed in a header")
            })?;
        authorization.set_sensitive(true);
        Ok(Connection {
            inner: Arc::new(Inner {
                controllers,
                current: AtomicUsize::new(0),
                auth: Auth {
                    authorization,
                    agent_id: Arc::new(RwLock::new(None)),
                },
                identity,
            }),
        })
    }

    fn client(&self) -> (usize, Client) {
        let count = self.inner.controllers.len();
        let index = self.inner.current.load(Ordering::Relaxed) % count;
        let channel = self.inner.controllers[index].channel.clone();
        let client = AgentServiceClient::with_interceptor(channel, self.inner.auth.clone())
            .max_decoding_message_size(16 * 1024 * 1024);
        (index, client)
    }

    /// After a transient error on controller `index`, the next call goes to
    /// the next controller (once, however many calls failed at once).
    fn note_failure(&self, index: usize, error: &RpcError) {
        let count = self.inner.controllers.len();
        if !error.is_transient() || count < 2 {
            return;
        }
        let next = (index + 1) % count;
        if self
            .inner
            .current
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::info!(
                from = %self.inner.controllers[index].url,
                to = %self.inner.controllers[next].url,
                "failing over to another controller"
            );
        }
    }

    /// The URL calls go to now (for logs).
    pub fn current_url(&self) -> &str {
        let index = self.inner.current.load(Ordering::Relaxed) % self.inner.controllers.len();
        &self.inner.controllers[index].url
    }

    async fn unary<T, F, Fut>(&self, call: F) -> Result<T, RpcError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let (index, client) = self.client();
        let result = match tokio::time::timeout(CALL_TIMEOUT, call(client)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(RpcError::from(status)),
            Err(_) => Err(RpcError::Unavailable(format!(
                "no answer within {CALL_TIMEOUT:?}"
            ))),
        };
        if let Err(error) = &result {
            self.note_failure(index, error);
        }
        result
    }

    /// Registers (or re-registers) the agent; later calls carry its id.
    pub async fn register(&self) -> Result<Registration, RpcError> {
        let identity = &self.inner.identity;
        let request = proto::RegisterRequest {
            name: identity.name.clone(),
            labels: identity.labels.clone().into_iter().collect(),
            concurrency: identity.concurrency,
            version: hobotnica_common::VERSION.to_owned(),
            protocol_version: PROTOCOL_VERSION,
        };
        let response = self
            .unary(|mut client| async move { client.register(request).await })
            .await?;
        let agent_id: MetadataValue<Ascii> =
            response.agent_id.parse().map_err(|_| RpcError::Refused {
                code: Code::Internal,
                message: "the controller sent an agent id that is not a valid header".to_owned(),
            })?;
        *self
            .inner
            .auth
            .agent_id
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(agent_id);
        Ok(Registration {
            agent_id: AgentId(response.agent_id),
            timings: LeaseTimings::from_millis(
                response.lease_timeout_ms,
                response.renew_interval_ms,
                response.kill_grace_ms,
            ),
        })
    }

    /// Opens the dispatch stream: Hello, then Capacity.
    pub async fn open_session(
        &self,
        agent_id: &AgentId,
        free_slots: u32,
    ) -> Result<SessionStream, RpcError> {
        let (index, client) = self.client();
        let result = wire::open_session(client, self.clone(), index, agent_id, free_slots).await;
        if let Err(error) = &result {
            self.note_failure(index, error);
        }
        result
    }

    /// Opens a PushLogs stream whose first chunk is `data` at `offset`.
    pub async fn open_log_stream(
        &self,
        key: JobKey,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<LogStream, RpcError> {
        let (index, client) = self.client();
        let result = wire::open_log_stream(client, self.clone(), index, key, offset, data).await;
        if let Err(error) = &result {
            self.note_failure(index, error);
        }
        result
    }

    pub async fn renew_lease(&self, key: JobKey) -> Result<LeaseStatus, RpcError> {
        let request = proto::RenewLeaseRequest {
            job_id: key.id.0,
            attempt: key.attempt,
        };
        let response = self
            .unary(|mut client| async move { client.renew_lease(request).await })
            .await?;
        Ok(LeaseStatus {
            cancel_requested: response.cancel_requested,
        })
    }

    pub async fn complete_job(&self, completion: &Completion) -> Result<(), RpcError> {
        let request = wire::complete_request(completion);
        self.unary(|mut client| async move { client.complete_job(request).await })
            .await?;
        Ok(())
    }
}

/// Calls `call` until it succeeds or fails for a reason other than an
/// unavailable controller: transient errors are retried with back-off (and
/// fail-over), a refused token is retried slowly (the session notices it and
/// stops the agent), and NOT_FOUND re-registers and retries once; a second
/// NOT_FOUND after a successful registration means the job itself is unknown
/// and is returned.
pub async fn retry<T, F, Fut>(
    connection: &Connection,
    what: &str,
    mut call: F,
) -> Result<T, RpcError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RpcError>>,
{
    let mut backoff = Backoff::default();
    let mut failures = 0u32;
    let mut registered_again = false;
    loop {
        let error = match call().await {
            Ok(value) => {
                if failures > 0 {
                    tracing::info!(what, failures, "call succeeded after retrying");
                }
                return Ok(value);
            }
            Err(error) => error,
        };
        failures += 1;
        let delay = match &error {
            RpcError::Unavailable(_) => backoff.next_delay(),
            RpcError::UnknownAgent(_) if registered_again => return Err(error),
            RpcError::UnknownAgent(_) => {
                tracing::info!(what, %error, "registering again");
                match connection.register().await {
                    Ok(_) => registered_again = true,
                    Err(error) => tracing::warn!(what, %error, "registering again failed"),
                }
                backoff.next_delay()
            }
            RpcError::Unauthenticated(_) => BACKOFF_MAX,
            _ => return Err(error),
        };
        if failures == 1 || failures.is_multiple_of(10) {
            tracing::warn!(what, %error, failures, retry_in_ms = delay.as_millis() as u64, controller = connection.current_url(), "call failed; retrying");
        } else {
            tracing::debug!(what, %error, failures, "call failed; retrying");
        }
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_seconds() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..9)
            .map(|_| backoff.next_delay().as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), BACKOFF_INITIAL);
    }

    #[test]
    fn status_codes_map_to_what_the_agent_does() {
        let cases = [
            (Code::Unauthenticated, "Unauthenticated"),
            (Code::NotFound, "UnknownAgent"),
            (Code::FailedPrecondition, "FailedPrecondition"),
            (Code::Aborted, "LogIncomplete"),
            (Code::InvalidArgument, "Refused"),
            (Code::PermissionDenied, "Refused"),
            (Code::Unavailable, "Unavailable"),
            (Code::Unknown, "Unavailable"),
            (Code::Internal, "Unavailable"),
            (Code::DeadlineExceeded, "Unavailable"),
        ];
        for (code, expected) in cases {
            let error = RpcError::from(Status::new(code, "x"));
            let name = format!("{error:?}");
            assert!(name.starts_with(expected), "{code:?} -> {name}");
        }
    }

    #[tokio::test]
    async fn the_token_is_sent_but_never_printed() -> anyhow::Result<()> {
        let connection = Connection::new(
            &["http://127.0.0.1:1".to_owned()],
            &Secret::new("hbt_supersecret"),
            AgentIdentity {
                name: "a".to_owned(),
                labels: Default::default(),
                concurrency: 1,
            },
            &TlsOptions::default(),
            Duration::from_secs(15),
        )?;
        let mut auth = connection.inner.auth.clone();
        let request = auth.call(tonic::Request::new(()))?;
        let header = request
            .metadata()
            .get("authorization")
            .context("authorization header")?;
        assert_eq!(header.to_str()?, "Bearer hbt_supersecret");
        assert!(!format!("{:?}", request.metadata()).contains("supersecret"));
        assert!(request.metadata().get(AGENT_ID_METADATA).is_none());
        Ok(())
    }

    #[tokio::test]
    async fn an_unreachable_controller_is_unavailable() -> anyhow::Result<()> {
        // Port 1 on localhost refuses connections.
        let connection = Connection::new(
            &[
                "http://127.0.0.1:1".to_owned(),
                "http://127.0.0.1:2".to_owned(),
            ],
            &Secret::new("t"),
            AgentIdentity {
                name: "a".to_owned(),
                labels: Default::default(),
                concurrency: 1,
            },
            &TlsOptions::default(),
            Duration::from_secs(15),
        )?;
        let error = connection.register().await.err().context("must fail")?;
        assert!(error.is_transient(), "{error:?}");
        assert_eq!(connection.current_url(), "http://127.0.0.1:2");
        Ok(())
    }
}
