//! rustls configurations of a sidecar, rebuilt whole whenever its leaf or the trust roots
//! change (new connections take the new ones; established connections keep theirs).
//!
//! - Public listener: terminates mutual TLS with our leaf, and requires a client certificate
//!   that chains to the roots (rustls' webpki client verifier; the client sends its
//!   intermediates, so a secondary datacenter's leaves verify too).
//! - Upstreams: originate mutual TLS with our leaf, and accept the server only if its chain
//!   verifies to the roots *and* its one URI SAN is the SPIFFE ID we expect for the
//!   destination. Connect leaves carry no DNS name, so rustls' own verifier (which checks the
//!   server name) does not fit; [`SpiffeServerVerifier`] calls webpki directly instead.
//!
//! One crypto provider in the workspace: ring.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig};

use super::identity::{leaf_identity, SpiffeId};

/// Our leaf: its chain (leaf first, then intermediates) and our private key (PKCS#8 DER).
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pkcs8: Vec<u8>,
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM text.
pub fn certificates_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|error| format!("bad PEM: {error:?}"))?;
    if certificates.is_empty() {
        return Err("no certificate in PEM".into());
    }
    Ok(certificates)
}

/// The trust anchors from the roots' PEM texts.
pub fn root_store(root_pems: &[String]) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for pem in root_pems {
        for certificate in certificates_from_pem(pem)? {
            store
                .add(certificate)
                .map_err(|error| format!("root certificate: {error}"))?;
        }
    }
    if store.is_empty() {
        return Err("the control plane returned no trust roots".into());
    }
    Ok(store)
}

/// What connections read: the configurations built from one leaf and one set of roots.
pub struct TlsState {
    pub server: Arc<ServerConfig>,
    credentials: Arc<Credentials>,
    roots: Arc<RootCertStore>,
    /// Client configurations by expected server identity, built on first use.
    clients: Mutex<HashMap<String, Arc<ClientConfig>>>,
}

impl TlsState {
    pub fn new(credentials: Credentials, roots: RootCertStore) -> Result<TlsState, String> {
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
            .build()
            .map_err(|error| format!("client verifier: {error}"))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(credentials.chain.clone(), private_key(&credentials))
            .map_err(|error| format!("our leaf: {error}"))?;
        Ok(TlsState {
            server: Arc::new(server),
            credentials: Arc::new(credentials),
            roots,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The client configuration for a destination whose certificate must carry `expected`.
    pub fn client(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, String> {
        let key = expected.to_string();
        let mut clients = match self.clients.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(config) = clients.get(&key) {
            return Ok(Arc::clone(config));
        }
        let provider = provider();
        let verifier = SpiffeServerVerifier::new(Arc::clone(&self.roots), expected.clone());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(
                self.credentials.chain.clone(),
                private_key(&self.credentials),
            )
            .map_err(|error| format!("our leaf: {error}"))?;
        let config = Arc::new(config);
        clients.insert(key, Arc::clone(&config));
        Ok(config)
    }
}

fn private_key(credentials: &Credentials) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(credentials.key_pkcs8.clone().into())
}

/// Verifies an upstream's certificate: chain to our roots (webpki, server-auth usage), then
/// the one URI SAN must be the expected SPIFFE ID (Consul's upstream SAN validation).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, expected: SpiffeId) -> SpiffeServerVerifier {
        SpiffeServerVerifier {
            roots,
            expected,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let certificate = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|error| certificate_error(&error))?;
        certificate
            .verify_for_usage(
                self.algorithms.all,
                &self.roots.roots,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .map_err(|error| certificate_error(&error))?;
        let identity = leaf_identity(end_entity).map_err(|reason| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(std::io::Error::other(reason)),
            )))
        })?;
        if identity != self.expected {
            tracing::warn!(expected = %self.expected, presented = %identity, "upstream presented another identity");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn certificate_error(error: &webpki::Error) -> rustls::Error {
    let kind = match error {
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(std::io::Error::other(
            other.to_string(),
        )))),
    };
    rustls::Error::InvalidCertificate(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

    const SOCAT: &str = "spiffe://td.consul/ns/default/dc/primary/svc/socat";

    fn ca(name: &str) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let certificate = params.self_signed(&key).expect("self-signed");
        (certificate.der().clone(), Issuer::new(params, key))
    }

    fn leaf(issuer: &Issuer<'static, KeyPair>, uris: &[&str]) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|uri| SanType::URI((*uri).to_owned().try_into().expect("ia5")))
            .collect();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.signed_by(&key, issuer).expect("sign").der().clone()
    }

    fn verify(
        roots: &CertificateDer<'static>,
        presented: &CertificateDer<'_>,
    ) -> Result<(), rustls::Error> {
        let mut store = RootCertStore::empty();
        store.add(roots.clone()).expect("root");
        let verifier =
            SpiffeServerVerifier::new(Arc::new(store), SpiffeId::parse(SOCAT).expect("id"));
        let name = ServerName::try_from("socat.default.primary.internal.td.consul").expect("name");
        verifier
            .verify_server_cert(presented, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn accepts_the_expected_identity_under_our_roots() {
        let (root, issuer) = ca("Consul CA 1");
        assert!(verify(&root, &leaf(&issuer, &[SOCAT])).is_ok());
    }

    #[test]
    fn refuses_another_identity_even_under_our_roots() {
        let (root, issuer) = ca("Consul CA 1");
        let web = "spiffe://td.consul/ns/default/dc/primary/svc/web";
        assert_eq!(
            verify(&root, &leaf(&issuer, &[web])),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure
            ))
        );
        assert!(verify(&root, &leaf(&issuer, &[SOCAT, web])).is_err());
        assert!(verify(&root, &leaf(&issuer, &[])).is_err());
    }

    #[test]
    fn refuses_the_expected_identity_from_another_ca() {
        let (root, _) = ca("Consul CA 1");
        let (_, foreign) = ca("Another CA");
        assert_eq!(
            verify(&root, &leaf(&foreign, &[SOCAT])),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        );
    }
}
