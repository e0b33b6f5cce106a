//! What a client of the agent's HTTPS API trusts and presents, as Consul's CLI takes it:
//! `-ca-file` / `CONSUL_CACERT` (the only roots trusted: never a system store, so an agent
//! with a certificate from another CA is refused), and `-client-cert` / `CONSUL_CLIENT_CERT`
//! with `-client-key` / `CONSUL_CLIENT_KEY` for agents started with `-verify-incoming`.
//!
//! One home for reading these files: `gateway mesh` and the sidecar build a rustls
//! configuration from them here, and controlplane-lite's CLI builds its ureq configuration
//! from the same [`TrustMaterial`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Bound on a PEM file read: certificates and keys are a few KiB.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// A CA file, client certificate or key that cannot be used (the user's fault).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// https was asked for without a CA to verify the agent with.
    #[error("https needs a CA file (-ca-file or CONSUL_CACERT)")]
    NoCaFile,
    /// Only one of the client certificate and its key was given.
    #[error("a client certificate needs both -client-cert and -client-key")]
    HalfIdentity,
    /// A file could not be read, is too large, or holds no usable PEM.
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    /// rustls refused the material (a key that does not match its certificate, say).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The files named on the command line or in the environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// Roots the agent's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain, for agents that `-verify-incoming`.
    pub cert_file: Option<PathBuf>,
    /// Its key.
    pub key_file: Option<PathBuf>,
}

/// The parsed contents of a [`ClientTls`]'s files.
#[derive(Debug)]
pub struct TrustMaterial {
    /// The CA certificates (at least one).
    pub roots: Vec<CertificateDer<'static>>,
    /// The client certificate and its key, if given.
    pub identity: Option<Identity>,
}

/// A client certificate chain and its key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The key file as read (PEM), for TLS stacks that take a key only as PEM (ureq).
    pub key_pem: Vec<u8>,
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let failed = |reason: String| TlsError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| failed(e.to_string()))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_PEM_BYTES + 1),
        &mut bytes,
    )
    .map_err(|e| failed(e.to_string()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(failed(format!("larger than {MAX_PEM_BYTES} bytes")));
    }
    Ok(bytes)
}

fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem(path, what)?;
    let failed = |reason: String| TlsError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(e.to_string()))?;
    if certs.is_empty() {
        return Err(failed("holds no certificate".to_owned()));
    }
    Ok(certs)
}

impl ClientTls {
    /// The environment's defaults under the flags: `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`,
    /// `CONSUL_CLIENT_KEY` (an empty variable counts as unset).
    pub fn with_environment(self) -> ClientTls {
        let from = |name: &str| {
            std::env::var_os(name)
                .filter(|value| !value.is_empty())
                .map(PathBuf::from)
        };
        ClientTls {
            ca_file: self.ca_file.or_else(|| from("CONSUL_CACERT")),
            cert_file: self.cert_file.or_else(|| from("CONSUL_CLIENT_CERT")),
            key_file: self.key_file.or_else(|| from("CONSUL_CLIENT_KEY")),
        }
    }

    /// Read and parse the files.
    pub fn load(&self) -> Result<TrustMaterial, TlsError> {
        let ca_file = self.ca_file.as_deref().ok_or(TlsError::NoCaFile)?;
        let roots = certificates(ca_file, "-ca-file")?;
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = certificates(cert, "-client-cert")?;
                let bytes = read_pem(key, "-client-key")?;
                let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::File {
                    what: "-client-key",
                    path: key.display().to_string(),
                    reason: e.to_string(),
                })?;
                Some(Identity {
                    chain,
                    key,
                    key_pem: bytes,
                })
            }
            (None, None) => None,
            _ => return Err(TlsError::HalfIdentity),
        };
        Ok(TrustMaterial { roots, identity })
    }

    /// The rustls client configuration (HTTP/1.1): only the CA file's roots are trusted.
    pub fn rustls_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let material = self.load()?;
        let mut roots = rustls::RootCertStore::empty();
        for root in material.roots {
            roots
                .add(root)
                .map_err(|e| TlsError::Config(format!("-ca-file: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match material.identity {
            Some(identity) => builder
                .with_client_auth_cert(identity.chain, identity.key)
                .map_err(|e| TlsError::Config(format!("-client-cert/-client-key: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_needs_a_ca_and_a_whole_identity() {
        assert!(matches!(
            ClientTls::default().load(),
            Err(TlsError::NoCaFile)
        ));
        let dir = std::env::temp_dir().join(format!("mesh-client-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let no_cert = ClientTls {
            ca_file: Some(empty.clone()),
            ..ClientTls::default()
        };
        assert!(matches!(no_cert.load(), Err(TlsError::File { .. })));
        let half = ClientTls {
            ca_file: Some(empty.clone()),
            cert_file: Some(empty),
            key_file: None,
        };
        // The CA file is read first: an empty one is refused before the identity is looked at.
        assert!(half.load().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
