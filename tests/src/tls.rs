//! Certificates made at run time with rcgen: a CA, a server certificate for
//! `127.0.0.1` and `localhost`, and a client certificate for agents, both
//! issued by that CA. (rustls refuses a self-signed certificate used
//! directly as a CA, so there is always a CA and a leaf.)

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA and the certificates it issued, as PEM files in one directory.
#[derive(Clone, Debug)]
pub struct TestPki {
    /// The CA certificate (`--ca-cert`, `--client-ca`).
    pub ca_cert: PathBuf,
    /// The controller's certificate (`--tls-cert`): `127.0.0.1`, `localhost`.
    pub server_cert: PathBuf,
    /// Its private key (`--tls-key`).
    pub server_key: PathBuf,
    /// An agent's client certificate (`--client-cert`).
    pub client_cert: PathBuf,
    /// Its private key (`--client-key`).
    pub client_key: PathBuf,
}

impl TestPki {
    /// Generates a CA, a server and a client certificate into `dir`.
    pub fn create(dir: &Path) -> TestPki {
        std::fs::create_dir_all(dir).expect("pki dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Hobotnica test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |names: Vec<String>, common_name: &str, usage: ExtendedKeyUsagePurpose| {
            let mut params = CertificateParams::new(names).expect("leaf params");
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            "hobotnica test controller",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            vec!["e2e-agent".to_owned()],
            "hobotnica test agent",
            ExtendedKeyUsagePurpose::ClientAuth,
        );

        let write = |name: &str, contents: &str| {
            let path = dir.join(name);
            std::fs::write(&path, contents).expect("write pki file");
            path
        };
        TestPki {
            ca_cert: write("ca.pem", &ca_cert.pem()),
            server_cert: write("controller.pem", &server_cert),
            server_key: write("controller-key.pem", &server_key),
            client_cert: write("agent.pem", &client_cert),
            client_key: write("agent-key.pem", &client_key),
        }
    }

    /// The CA certificate's PEM.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca_cert).expect("read the CA certificate")
    }
}
