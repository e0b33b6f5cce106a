//! rustls configurations of a sidecar, rebuilt whole whenever its leaf or the trust roots
//! change (new connections take the new ones; established connections keep theirs).
//!
//! - Public listener: terminates mutual TLS with our leaf, and requires a client certificate
//!   that chains to the roots (rustls' webpki client verifier; the client sends its
//!   intermediates, so a secondary datacenter's leaves verify too) *and* whose SPIFFE trust
//!   domain is the cluster's ([`TrustDomainClientVerifier`]): a chain to a trusted
//!   intermediate is not enough, as in Consul, which checks the trust domain too.
//! - Upstreams: originate mutual TLS with our leaf, and accept the server only if its chain
//!   verifies to the roots *and* its one URI SAN is the SPIFFE ID we expect for the
//!   destination. Connect leaves carry no DNS name, so rustls' own verifier (which checks the
//!   server name) does not fit; [`SpiffeServerVerifier`] calls webpki directly instead. An
//!   expected identity outside the cluster's trust domain is refused before any connection.
//!
//! The cluster's trust domain is the one in our own leaf's SPIFFE ID.
//!
//! One crypto provider in the workspace: ring.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
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
    /// The cluster's trust domain (our leaf's): every peer must be in it.
    trust_domain: String,
    /// Client configurations by expected server identity, built on first use.
    clients: Mutex<HashMap<String, Arc<ClientConfig>>>,
}

impl TlsState {
    pub fn new(credentials: Credentials, roots: RootCertStore) -> Result<TlsState, String> {
        let roots = Arc::new(roots);
        let own = credentials
            .chain
            .first()
            .ok_or("our leaf chain is empty")
            .and_then(|leaf| leaf_identity(leaf))
            .map_err(|reason| format!("our leaf: {reason}"))?;
        let chain_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
                .build()
                .map_err(|error| format!("client verifier: {error}"))?;
        let verifier = Arc::new(TrustDomainClientVerifier {
            inner: chain_verifier,
            trust_domain: own.trust_domain.clone(),
        });
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
            trust_domain: own.trust_domain,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The client configuration for a destination whose certificate must carry `expected`.
    pub fn client(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, String> {
        if expected.trust_domain != self.trust_domain {
            return Err(format!(
                "upstream identity {expected} is outside the cluster's trust domain {}",
                self.trust_domain
            ));
        }
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

/// Verifies a client certificate: the chain to our roots (rustls' webpki verifier), then the
/// leaf's SPIFFE trust domain must be the cluster's. An intermediate that chains to our roots
/// but issues names of another trust domain (a cross-signed or misused CA) gets no access.
#[derive(Debug)]
pub struct TrustDomainClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let identity = leaf_identity(end_entity).map_err(|reason| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(std::io::Error::other(reason)),
            )))
        })?;
        if identity.trust_domain != self.trust_domain {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(std::io::Error::other(format!(
                    "client trust domain {} is not the cluster's {}",
                    identity.trust_domain, self.trust_domain
                )))),
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
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

    /// A root, an intermediate it signed, and leaves the intermediate signs (Connect leaves
    /// carry both TLS usages).
    struct Pki {
        root: CertificateDer<'static>,
        intermediate: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Pki {
        fn new() -> Pki {
            let (root, root_issuer) = ca("Consul CA 1");
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            let mut params = CertificateParams::default();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "Consul intermediate");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let intermediate = params
                .signed_by(&key, &root_issuer)
                .expect("sign")
                .der()
                .clone();
            Pki {
                root,
                intermediate,
                issuer: Issuer::new(params, key),
            }
        }

        fn credentials(&self, uri: &str) -> Credentials {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![SanType::URI(uri.to_owned().try_into().expect("ia5"))];
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let leaf = params.signed_by(&key, &self.issuer).expect("sign");
            Credentials {
                chain: vec![leaf.der().clone(), self.intermediate.clone()],
                key_pkcs8: key.serialize_der(),
            }
        }

        fn roots(&self) -> RootCertStore {
            let mut store = RootCertStore::empty();
            store.add(self.root.clone()).expect("root");
            store
        }
    }

    /// Run a TLS handshake between two configurations in memory.
    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("socat.default.primary.internal.td.consul").expect("name");
        let mut client = rustls::ClientConnection::new(client, name.to_owned())?;
        let mut server = rustls::ServerConnection::new(server)?;
        for _ in 0..20 {
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
            let mut bytes = Vec::new();
            client.write_tls(&mut bytes).expect("client write");
            let mut slice = bytes.as_slice();
            while !slice.is_empty() {
                server.read_tls(&mut slice).expect("server read");
            }
            server.process_new_packets()?;
            let mut bytes = Vec::new();
            server.write_tls(&mut bytes).expect("server write");
            let mut slice = bytes.as_slice();
            while !slice.is_empty() {
                client.read_tls(&mut slice).expect("client read");
            }
            client.process_new_packets()?;
        }
        Err(rustls::Error::General("handshake did not finish".into()))
    }

    /// A client of any identity that verifies the server properly (what an attacker holding
    /// a leaf from a trusted intermediate would run).
    fn client_as(pki: &Pki, credentials: &Credentials, server: &str) -> Arc<ClientConfig> {
        let verifier =
            SpiffeServerVerifier::new(Arc::new(pki.roots()), SpiffeId::parse(server).expect("id"));
        Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_client_auth_cert(credentials.chain.clone(), private_key(credentials))
                .expect("client auth"),
        )
    }

    #[test]
    fn the_public_side_refuses_a_client_of_another_trust_domain() {
        let pki = Pki::new();
        let ours = TlsState::new(pki.credentials(SOCAT), pki.roots()).expect("state");
        let web = "spiffe://td.consul/ns/default/dc/primary/svc/web";
        let same_domain = client_as(&pki, &pki.credentials(web), SOCAT);
        assert_eq!(handshake(same_domain, Arc::clone(&ours.server)), Ok(()));
        // Same intermediate, same chain to our root, another trust domain.
        let foreign = "spiffe://other.consul/ns/default/dc/primary/svc/web";
        let foreign_domain = client_as(&pki, &pki.credentials(foreign), SOCAT);
        let refused = handshake(foreign_domain, Arc::clone(&ours.server));
        assert!(
            matches!(refused, Err(rustls::Error::InvalidCertificate(_))),
            "{refused:?}"
        );
    }

    #[test]
    fn the_upstream_side_refuses_an_identity_of_another_trust_domain() {
        let pki = Pki::new();
        let web = "spiffe://td.consul/ns/default/dc/primary/svc/web";
        let ours = TlsState::new(pki.credentials(web), pki.roots()).expect("state");
        let foreign = "spiffe://other.consul/ns/default/dc/primary/svc/socat";
        // Even when the destination is configured with that identity, and its server holds a
        // leaf for it from a trusted intermediate.
        let server = TlsState::new(pki.credentials(SOCAT), pki.roots()).expect("server");
        assert!(ours
            .client(&SpiffeId::parse(SOCAT).expect("id"))
            .is_ok_and(|config| handshake(config, Arc::clone(&server.server)).is_ok()));
        let rogue = pki.credentials(foreign);
        let rogue_server = Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(rogue.chain.clone(), private_key(&rogue))
                .expect("rogue server"),
        );
        let refused = ours
            .client(&SpiffeId::parse(foreign).expect("id"))
            .map_err(rustls::Error::General)
            .and_then(|config| handshake(config, rogue_server));
        assert!(refused.is_err(), "a foreign trust domain was accepted");
    }
}
