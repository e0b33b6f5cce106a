//! TLS for the agent's HTTP API (Consul's `-https-addr`, `-cert-file`, `-key-file`, `-ca-file`,
//! `-verify-incoming`), for its clients (the CLI, and a secondary talking to other datacenters),
//! and the certificates `tls ca create` / `tls cert create` make.
//!
//! The agent's certificates (the "agent CA") are separate from the Connect CA in `ca.rs`: they
//! authenticate agents to each other and to clients, as in Consul.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

use crate::error::{Error, Result};

/// Bound on a PEM file we read: certificates and keys are a few KiB.
const MAX_PEM_BYTES: u64 = 1 << 20;

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let bytes = fs::read(path)
        .map_err(|e| Error::Startup(format!("cannot read {what} {}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(Error::Startup(format!(
            "{what} {} is larger than {MAX_PEM_BYTES} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// The certificates in a PEM file (at least one).
pub fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = read_pem(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Startup(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Startup(format!(
            "{what} {} holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>> {
    let bytes = read_pem(path, what)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| Error::Startup(format!("{what} {}: {e}", path.display())))
}

fn root_store(ca_file: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca_file, "-ca-file")? {
        roots
            .add(cert)
            .map_err(|e| Error::Startup(format!("-ca-file {}: {e}", ca_file.display())))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent's HTTPS listener settings.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// `-cert-file`: the agent's certificate chain.
    pub cert_file: PathBuf,
    /// `-key-file`.
    pub key_file: PathBuf,
    /// `-ca-file`: trusted for client certificates (with `-verify-incoming`) and for the
    /// agents of other datacenters.
    pub ca_file: Option<PathBuf>,
    /// `-verify-incoming`: require a client certificate signed by `-ca-file`.
    pub verify_incoming: bool,
}

impl ServerTls {
    /// Builds the rustls server configuration (HTTP/1.1 only, like the plain listener).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let certs = load_certs(&self.cert_file, "-cert-file")?;
        let key = load_key(&self.key_file, "-key-file")?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Startup(format!("TLS: {e}")))?;
        let builder = if self.verify_incoming {
            let ca = self
                .ca_file
                .as_ref()
                .ok_or_else(|| Error::Startup("-verify-incoming needs -ca-file".to_owned()))?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(root_store(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| Error::Startup(format!("-ca-file {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| Error::Startup(format!("-cert-file/-key-file: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// What a client trusts and presents (the CLI's `-ca-file`, `-client-cert`, `-client-key`; an
/// agent's `-ca-file`, `-cert-file`, `-key-file` when it calls another datacenter).
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// Roots the server's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain, for servers that `-verify-incoming`.
    pub cert_file: Option<PathBuf>,
    /// Its key.
    pub key_file: Option<PathBuf>,
}

impl ClientTls {
    /// The ureq TLS configuration: only `ca_file`'s roots are trusted (never a system store),
    /// so a server with a certificate from another CA is refused. The files are read by
    /// `mesh-client` (the same rules `gateway mesh` and the sidecar follow).
    pub fn ureq_config(&self) -> Result<ureq::tls::TlsConfig> {
        let files = mesh_client::tls::ClientTls {
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        };
        let material = files.load().map_err(|e| Error::Startup(e.to_string()))?;
        let certificates =
            |ders: &[CertificateDer<'static>]| -> Vec<ureq::tls::Certificate<'static>> {
                ders.iter()
                    .map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned())
                    .collect()
            };
        let mut builder = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(provider())
            .root_certs(ureq::tls::RootCerts::new_with_certs(&certificates(
                &material.roots,
            )));
        if let Some(identity) = material.identity {
            let key = ureq::tls::PrivateKey::from_pem(&identity.key_pem)
                .map_err(|e| Error::Startup(format!("-client-key: {e}")))?;
            builder = builder.client_cert(Some(ureq::tls::ClientCert::new_with_certs(
                &certificates(&identity.chain),
                key,
            )));
        }
        Ok(builder.build())
    }
}

/// Writes `text` to a new file with `mode` (keys are 0600); refuses to overwrite, like Consul.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::bad_request(format!("cannot create {}: {e}", path.display())))?;
    file.write_all(text.as_bytes())
        .map_err(|e| Error::bad_request(format!("cannot write {}: {e}", path.display())))
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

/// File names `tls ca create` writes in `dir` (Consul's names).
pub fn ca_paths(dir: &Path, domain: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{domain}-agent-ca.pem")),
        dir.join(format!("{domain}-agent-ca-key.pem")),
    )
}

/// `tls ca create`: a self-signed P-256 CA for agent certificates, valid `days`.
pub fn create_ca(dir: &Path, domain: &str, days: i64) -> Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = ca_paths(dir, domain);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(internal)?;
    let mut params = crate::ca::ca_params(
        format!("{domain} Agent CA {}", uuid::Uuid::new_v4().simple()),
        BasicConstraints::Unconstrained,
    );
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(1);
    params.not_after = now + Duration::days(days);
    let certificate = params.self_signed(&key).map_err(internal)?;
    write_new(&cert_path, &certificate.pem(), 0o644)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    Ok((cert_path, key_path))
}

/// What `tls cert create` makes.
#[derive(Clone, Debug)]
pub struct CertRequest {
    /// `server`, `client` (or `cli`): Consul's roles; a server certificate also works as a
    /// client certificate (agents call each other).
    pub role: &'static str,
    /// The datacenter (`server.<dc>.<domain>` is the server's DNS name).
    pub datacenter: String,
    /// The domain (`consul`).
    pub domain: String,
    /// Extra DNS names.
    pub dns_names: Vec<String>,
    /// Extra IP addresses.
    pub ip_addresses: Vec<std::net::IpAddr>,
    /// Validity.
    pub days: i64,
}

/// `tls cert create`: a certificate signed by the CA in `ca_cert`/`ca_key`, written to
/// `<dc>-<role>-<domain>-<n>.pem` and `…-key.pem` (0600) in `dir` with the first free `n`.
pub fn create_cert(
    dir: &Path,
    ca_cert: &Path,
    ca_key: &Path,
    request: &CertRequest,
) -> Result<(PathBuf, PathBuf)> {
    let ca_pem = String::from_utf8_lossy(&read_pem(ca_cert, "-ca")?).into_owned();
    let ca_key_pem = String::from_utf8_lossy(&read_pem(ca_key, "-key")?).into_owned();
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| Error::bad_request(format!("CA key {}: {e}", ca_key.display())))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| Error::bad_request(format!("CA certificate {}: {e}", ca_cert.display())))?;
    let mut dns = match request.role {
        "server" => vec![
            format!("server.{}.{}", request.datacenter, request.domain),
            "localhost".to_owned(),
        ],
        _ => vec![format!(
            "{}.{}.{}",
            request.role, request.datacenter, request.domain
        )],
    };
    dns.extend(request.dns_names.iter().cloned());
    let mut params = CertificateParams::new(dns).map_err(|e| Error::bad_request(e.to_string()))?;
    let mut ips = request.ip_addresses.clone();
    if request.role == "server" {
        ips.push(std::net::IpAddr::from([127, 0, 0, 1]));
    }
    params
        .subject_alt_names
        .extend(ips.into_iter().map(SanType::IpAddress));
    let mut name = DistinguishedName::new();
    name.push(
        DnType::CommonName,
        format!("{}.{}.{}", request.role, request.datacenter, request.domain),
    );
    params.distinguished_name = name;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = match request.role {
        "server" => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(1);
    params.not_after = now + Duration::days(request.days);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(internal)?;
    let certificate = params.signed_by(&key, &issuer).map_err(internal)?;
    // Consul numbers certificates so that several servers of a datacenter get their own.
    for n in 0..1000 {
        let base = format!(
            "{}-{}-{}-{n}",
            request.datacenter, request.role, request.domain
        );
        let cert_path = dir.join(format!("{base}.pem"));
        let key_path = dir.join(format!("{base}-key.pem"));
        if cert_path.exists() || key_path.exists() {
            continue;
        }
        write_new(&cert_path, &certificate.pem(), 0o644)?;
        write_new(&key_path, &key.serialize_pem(), 0o600)?;
        return Ok((cert_path, key_path));
    }
    Err(Error::bad_request(format!(
        "{}: 1000 certificates exist already",
        dir.display()
    )))
}
