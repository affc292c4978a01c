//! `hobotnica-controller --health-check`: asks the controller configured
//! like this process (same options, same environment) whether it is ready,
//! through its own REST listener's `/readyz`. A Docker `HEALTHCHECK` or a
//! monitor runs it where no curl is installed.
//!
//! An address the controller listens on for every interface (`0.0.0.0`,
//! `::`) is asked on loopback. Over TLS the served certificate must be the
//! one in `--tls-cert` (the first of the file): the check trusts exactly
//! what this host serves, whatever name the certificate is for.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::config::ControllerConfig;

/// How long the whole check may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The most of the answer read.
const MAX_ANSWER: u64 = 64 * 1024;

/// Asks `/readyz`; `Ok` with the answer's first line when it is 200.
///
/// # Errors
/// When the controller cannot be reached in [`TIMEOUT`] or is not ready,
/// saying which.
pub async fn check(config: &ControllerConfig) -> anyhow::Result<String> {
    let address = loopback_if_unspecified(config.listen);
    tokio::time::timeout(TIMEOUT, ask(config, address))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {address} within {TIMEOUT:?}"))?
}

async fn ask(config: &ControllerConfig, address: SocketAddr) -> anyhow::Result<String> {
    let tcp = TcpStream::connect(address)
        .await
        .with_context(|| format!("cannot connect to {address}"))?;
    let answer = match &config.tls_cert {
        None => get_readyz(tcp, address).await?,
        Some(cert_path) => {
            let served = crate::tls::load_certs(cert_path, "--tls-cert")?
                .into_iter()
                .next()
                .context("--tls-cert holds no certificate")?;
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let client = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .context("TLS protocol versions")?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned { served, provider }))
                .with_no_client_auth();
            let name = ServerName::IpAddress(address.ip().into());
            let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS handshake with {address} failed"))?;
            get_readyz(tls, address).await?
        }
    };
    let status_line = answer.lines().next().unwrap_or_default().to_owned();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim())
        .unwrap_or_default();
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(format!("{address}: {status_line}")),
        Some(_) => anyhow::bail!("{address} is not ready: {status_line} {body}"),
        None => anyhow::bail!("{address} did not answer HTTP"),
    }
}

/// One HTTP/1.1 `GET /readyz`, the whole answer (at most [`MAX_ANSWER`]).
async fn get_readyz<S>(mut stream: S, address: SocketAddr) -> anyhow::Result<String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let request = format!(
        "GET /readyz HTTP/1.1\r\nHost: {address}\r\nUser-Agent: hobotnica-health-check\r\n\
         Connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .with_context(|| format!("cannot send to {address}"))?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .await
        .with_context(|| format!("cannot read the answer of {address}"))?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn loopback_if_unspecified(address: SocketAddr) -> SocketAddr {
    let ip = match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, address.port())
}

/// Trusts exactly the certificate this controller serves.
#[derive(Debug)]
struct Pinned {
    served: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.served.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the served certificate is not the one in --tls-cert (renewed without SIGHUP?)"
                    .to_owned(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
