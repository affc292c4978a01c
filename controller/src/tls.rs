//! TLS for the controller's two listeners.
//!
//! [`ServerTls::load`] builds the rustls server configurations from
//! `--tls-cert`/`--tls-key` (ALPN `h2` + `http/1.1` for REST, `h2` for gRPC)
//! and, with `--client-ca`, asks gRPC clients for a certificate issued by
//! that CA. [`TlsListener`] accepts TCP connections and yields those whose
//! handshake completed; handshakes run concurrently, each with a deadline, so
//! a failed or stalled one costs its own task and never the listener.
//!
//! The certificate and key are read again on SIGHUP ([`CertFiles::reload`]):
//! a renewed certificate needs no restart, and one that cannot be read (a
//! renewal half-written) leaves the previous one in use.
//!
//! Mutual TLS is enforced per service: the handshake verifies any
//! certificate a client presents, and [`RequireClientCert`] refuses
//! `AgentService` calls made without one. `LogService` (operators, admin
//! token) stays open to clients without a certificate.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::Stream;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::Status;
use tonic::service::Interceptor;

use crate::config::ControllerConfig;

/// Longest a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress on one listener; further connections wait in
/// the kernel's accept queue.
const MAX_PENDING_HANDSHAKES: usize = 256;
/// Pause after an accept error that is not about one connection (such as
/// running out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The server configurations of both listeners.
pub struct ServerTls {
    /// REST: `h2` and `http/1.1`, no client certificates.
    pub rest: Arc<ServerConfig>,
    /// gRPC: `h2`; with `--client-ca`, client certificates are verified.
    pub grpc: Arc<ServerConfig>,
    /// Whether `AgentService` requires a client certificate (`--client-ca`).
    pub require_agent_cert: bool,
    /// The certificate both listeners present (reloadable).
    pub certs: Arc<CertFiles>,
}

/// The certificate and key of `--tls-cert`/`--tls-key`, as the listeners
/// present them, and where to read them again.
#[derive(Debug)]
pub struct CertFiles {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertFiles {
    fn open(
        cert_path: &Path,
        key_path: &Path,
        provider: Arc<CryptoProvider>,
    ) -> anyhow::Result<CertFiles> {
        let current = read_certified_key(cert_path, key_path, &provider)?;
        Ok(CertFiles {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            provider,
            current: RwLock::new(current),
        })
    }

    /// Reads the files again; new handshakes present what they hold. On an
    /// error the previous certificate stays in use.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = read_certified_key(&self.cert_path, &self.key_path, &self.provider)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

/// The chain in `cert_path` with the key in `key_path`, checked to fit.
fn read_certified_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = load_certs(cert_path, "--tls-cert")?;
    let key = load_key(key_path)?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|_| {
        anyhow::anyhow!(
            "the key in {} does not fit the certificate in {}",
            key_path.display(),
            cert_path.display()
        )
    })?;
    Ok(Arc::new(certified))
}

impl ServerTls {
    /// The TLS configuration of `config`, or `None` when it serves
    /// plaintext. Errors name the file, never its contents.
    pub fn load(config: &ControllerConfig) -> anyhow::Result<Option<ServerTls>> {
        let (Some(cert_path), Some(key_path)) = (&config.tls_cert, &config.tls_key) else {
            return Ok(None);
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certs = Arc::new(CertFiles::open(cert_path, key_path, provider.clone())?);

        let mut rest = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        rest.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let grpc_builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let grpc_builder = match &config.client_ca {
            None => grpc_builder.with_no_client_auth(),
            Some(ca_path) => {
                let mut roots = RootCertStore::empty();
                for cert in load_certs(ca_path, "--client-ca")? {
                    roots.add(cert).with_context(|| {
                        format!("{} holds an unusable CA certificate", ca_path.display())
                    })?;
                }
                // A certificate a client presents is always verified; one
                // that presents none is refused by `RequireClientCert` on
                // AgentService, so that `hobot logs` needs no certificate.
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .allow_unauthenticated()
                        .build()
                        .context("cannot build the client certificate verifier")?;
                grpc_builder.with_client_cert_verifier(verifier)
            }
        };
        let mut grpc = grpc_builder.with_cert_resolver(certs.clone());
        grpc.alpn_protocols = vec![b"h2".to_vec()];

        Ok(Some(ServerTls {
            rest: Arc::new(rest),
            grpc: Arc::new(grpc),
            require_agent_cert: config.client_ca.is_some(),
            certs,
        }))
    }
}

/// Reads the PEM certificates in `path` (at least one).
pub(crate) fn load_certs(
    path: &Path,
    option: &str,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read {option} file {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{option} file {} is not valid PEM", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{option} file {} holds no PEM certificate",
        path.display()
    );
    Ok(certs)
}

/// Reads the PEM private key in `path`. The error never shows the file's
/// contents.
fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read --tls-key file {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        anyhow::anyhow!(
            "--tls-key file {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        )
    })
}

/// Accepts TCP connections and yields them once their TLS handshake is
/// done. Used by `axum::serve` (as an [`axum::serve::Listener`]) and by
/// tonic (through [`TlsListener::into_stream`]).
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsListener")
            .field("local_addr", &self.tcp.local_addr().ok())
            .field("pending_handshakes", &self.handshakes.len())
            .finish()
    }
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> TlsListener {
        TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(config),
            handshakes: JoinSet::new(),
        }
    }

    /// The next connection whose handshake succeeded. Cancel-safe: pending
    /// handshakes stay in the listener.
    pub async fn accept(&mut self) -> (TlsStream<TcpStream>, SocketAddr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_PENDING_HANDSHAKES => {
                    match accepted {
                        Ok((stream, peer)) => {
                            self.handshakes.spawn(handshake(self.acceptor.clone(), stream, peer));
                        }
                        Err(error) => accept_error(error).await,
                    }
                }
                Some(finished) = self.handshakes.join_next() => {
                    if let Ok(Some(connection)) = finished {
                        return connection;
                    }
                }
            }
        }
    }

    /// The accepted connections as the stream tonic serves.
    pub fn into_stream(
        self,
    ) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static {
        futures_util::stream::unfold(self, |mut listener| async move {
            let (stream, _peer) = listener.accept().await;
            Some((Ok(stream), listener))
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        TlsListener::accept(self).await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
    let _ = stream.set_nodelay(true);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some((stream, peer)),
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, timeout_ms = HANDSHAKE_TIMEOUT.as_millis() as u64, "TLS handshake timed out");
            None
        }
    }
}

/// Errors about one connection are skipped; others (out of file
/// descriptors, say) pause accepting for a moment.
async fn accept_error(error: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::error!(%error, "cannot accept connections; pausing");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

/// Refuses `AgentService` calls over TLS connections whose client presented
/// no certificate, when `--client-ca` asks for mutual TLS. (A certificate
/// that was presented has been verified in the handshake.)
#[derive(Clone, Copy, Debug)]
pub struct RequireClientCert {
    pub required: bool,
}

impl Interceptor for RequireClientCert {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if self.required && request.peer_certs().is_none_or(|certs| certs.is_empty()) {
            return Err(Status::permission_denied(
                "this controller requires agents to present a client certificate \
                 (mutual TLS): start the agent with --client-cert and --client-key",
            ));
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, cert: &str, key: &str) -> ControllerConfig {
        use clap::{Args as _, FromArgMatches as _};
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, cert).expect("write");
        std::fs::write(&key_path, key).expect("write");
        let command = ControllerConfig::augment_args(clap::Command::new("t").no_binary_name(true));
        let matches = command
            .try_get_matches_from([
                "--tls-cert".as_ref(),
                cert_path.as_os_str(),
                "--tls-key".as_ref(),
                key_path.as_os_str(),
            ])
            .expect("parses");
        ControllerConfig::from_arg_matches(&matches).expect("parses")
    }

    fn load_error(config: &ControllerConfig) -> String {
        match ServerTls::load(config) {
            Ok(_) => panic!("must fail"),
            Err(error) => format!("{error:#}"),
        }
    }

    #[test]
    fn plaintext_has_no_tls_configuration() {
        let command = {
            use clap::Args as _;
            ControllerConfig::augment_args(clap::Command::new("t").no_binary_name(true))
        };
        let matches = command
            .try_get_matches_from(Vec::<String>::new())
            .expect("parses");
        let config =
            <ControllerConfig as clap::FromArgMatches>::from_arg_matches(&matches).expect("parses");
        assert!(ServerTls::load(&config).expect("loads").is_none());
    }

    #[test]
    fn unusable_files_are_named_and_never_echoed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let secret =
            "-----BEGIN PRIVATE KEY-----\nU0VDUkVUS0VZTUFURVJJQUw=\n-----END PRIVATE KEY-----\n";

        let message = load_error(&config(dir.path(), "not a certificate", secret));
        assert!(message.contains("holds no PEM certificate"), "{message}");

        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let message = load_error(&config(dir.path(), cert, "SECRETKEYMATERIAL"));
        assert!(message.contains("holds no PEM private key"), "{message}");
        assert!(!message.contains("SECRETKEYMATERIAL"), "{message}");

        let mut missing = config(dir.path(), cert, secret);
        missing.tls_key = Some(dir.path().join("missing.pem"));
        let message = load_error(&missing);
        assert!(message.contains("missing.pem"), "{message}");
    }
}
