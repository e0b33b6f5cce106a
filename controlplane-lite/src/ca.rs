//! The built-in Connect CA (sans-IO): root generation and leaf signing from a CSR.
//!
//! The root is ECDSA P-256, valid for ten years, with the URI SAN `spiffe://<cluster-id>.consul`
//! and deliberately **no** name constraints (rustls-webpki fails closed on URI constraints, so a
//! constrained root would reject every SPIFFE leaf). Leaves carry exactly one URI SAN, the
//! service's SPIFFE ID, both client and server auth, and live 72 hours by default. The private
//! key of a leaf never reaches us: sidecars send a CSR.

use std::time::Duration as StdDuration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::digest;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::spiffe::SpiffeId;

mod config;
mod intermediate;
mod rotate;
pub use config::{
    format_duration, parse_update, CaSettings, ConfigUpdate, SuppliedRoot, CA_SETTINGS_KEY,
    MIN_LEAF_TTL,
};
pub use intermediate::{
    check_intermediate, intermediate_csr, sign_intermediate, IntermediateCsr, INTERMEDIATE_TTL,
};
pub use rotate::{cross_sign, root_from_supplied, same_public_key};

/// Root lifetime (Consul's built-in provider: ten years).
pub const ROOT_TTL: StdDuration = StdDuration::from_secs(10 * 365 * 24 * 3600);
/// Default leaf lifetime (Consul's `LeafCertTTL` default, 72h).
pub const LEAF_TTL: StdDuration = StdDuration::from_secs(72 * 3600);
/// Longest leaf lifetime a client may ask for (Consul caps `LeafCertTTL` at one year).
pub const MAX_LEAF_TTL: StdDuration = StdDuration::from_secs(365 * 24 * 3600);
/// Leaves are backdated by a minute to absorb clock skew (Consul does the same).
pub(crate) const BACKDATE: time::Duration = time::Duration::minutes(1);

/// How far a leaf of lifetime `ttl` is backdated: [`BACKDATE`], but never more than a quarter
/// of the lifetime. Consul always backdates a minute, which is harmless for its 1h minimum;
/// a shorter leaf (the agent's `-ca-leaf-ttl-min`, or `TTL` on the sign endpoint) would
/// otherwise be issued already expired, or due for renewal at once.
pub(crate) fn backdate_for(ttl: StdDuration) -> time::Duration {
    let quarter = time::Duration::try_from(ttl / 4).unwrap_or(BACKDATE);
    quarter.min(BACKDATE)
}

/// A CA root in Consul's `/v1/connect/ca/roots` shape (public part only).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct CaRoot {
    /// Colon-hex SHA-1 fingerprint of the certificate.
    #[serde(rename = "ID")]
    pub id: String,
    /// Display name.
    pub name: String,
    /// Certificate serial number.
    pub serial_number: u64,
    /// Colon-hex key identifier of the signing key.
    #[serde(rename = "SigningKeyID")]
    pub signing_key_id: String,
    /// The trust domain this root signs for.
    pub external_trust_domain: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// PEM.
    pub root_cert: String,
    /// Intermediates: in a secondary, the active root lists that datacenter's intermediate.
    pub intermediate_certs: Option<Vec<String>>,
    /// Whether new leaves are signed by this root.
    pub active: bool,
    /// `ec`.
    pub private_key_type: String,
    /// 256.
    pub private_key_bits: u32,
    /// Raft index of creation.
    pub create_index: u64,
    /// Raft index of the last change.
    pub modify_index: u64,
    /// RFC 3339: when a rotation made this root inactive (Consul's `RotatedOutAt`). Inactive
    /// roots stay listed, so leaves they signed keep verifying until renewed, and are pruned
    /// at a later rotation once twice the leaf TTL has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_out_at: Option<String>,
}

/// The private key this datacenter signs leaves with, stored only in the local `ca_signing`
/// table: the root's key in the primary, an intermediate's key in a secondary.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SigningKey {
    /// The root ID this key belongs to (or chains to, for an intermediate).
    #[serde(rename = "RootID")]
    pub root_id: String,
    /// PKCS#8 PEM.
    pub private_key_pem: String,
    /// In a secondary: the intermediate certificate (signed by the root) that holds this key.
    /// Leaves are then issued by the intermediate and carry it as their chain.
    #[serde(
        default,
        rename = "IntermediatePEM",
        skip_serializing_if = "Option::is_none"
    )]
    pub intermediate_pem: Option<String>,
}

/// A freshly generated root.
pub struct GeneratedRoot {
    /// Public part.
    pub root: CaRoot,
    /// Private part.
    pub key: SigningKey,
    /// Expiry as Unix seconds (for the metric).
    pub not_after_unix: i64,
}

/// What every CA certificate here starts from: the common name `common_name`, a CA with
/// `constraints`, and the key usages a CA needs (cert sign, CRL sign, digital signature).
pub(crate) fn ca_params(common_name: String, constraints: BasicConstraints) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Generates the root for `cluster_id` at `now`, with a new key.
pub fn generate_root(cluster_id: &str, now: OffsetDateTime, serial: u64) -> Result<GeneratedRoot> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(internal)?;
    root_with_key(cluster_id, now, serial, key)
}

/// Makes the self-signed root for `cluster_id` at `now` with `key` (a generated key, or one
/// an operator supplied in the CA configuration's `PrivateKey`).
pub fn root_with_key(
    cluster_id: &str,
    now: OffsetDateTime,
    serial: u64,
    key: KeyPair,
) -> Result<GeneratedRoot> {
    let trust_domain = format!("{}.consul", cluster_id.to_ascii_lowercase());
    let mut params = ca_params(
        format!("Consul CA {serial}"),
        BasicConstraints::Unconstrained,
    );
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(internal)?,
    )];
    params.not_before = now - BACKDATE;
    params.not_after = now + ROOT_TTL;
    params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
    let certificate = params.self_signed(&key).map_err(internal)?;
    let id =
        colon_hex(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, certificate.der()).as_ref());
    let signing_key_id = colon_hex(&params.key_identifier(&key));
    Ok(GeneratedRoot {
        root: CaRoot {
            id: id.clone(),
            name: "Consul CA Root Cert".to_owned(),
            serial_number: serial,
            signing_key_id,
            external_trust_domain: trust_domain,
            not_before: rfc3339(params.not_before),
            not_after: rfc3339(params.not_after),
            root_cert: certificate.pem(),
            intermediate_certs: None,
            active: true,
            private_key_type: "ec".to_owned(),
            private_key_bits: 256,
            create_index: 0,
            modify_index: 0,
            rotated_out_at: None,
        },
        key: SigningKey {
            root_id: id,
            private_key_pem: key.serialize_pem(),
            intermediate_pem: None,
        },
        not_after_unix: params.not_after.unix_timestamp(),
    })
}

/// A signed leaf in the shape of Consul's leaf endpoint (without a private key).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct SignedLeaf {
    /// Colon-hex serial.
    pub serial_number: String,
    /// The leaf, PEM.
    #[serde(rename = "CertPEM")]
    pub cert_pem: String,
    /// Certificates between the leaf and the root: the datacenter's intermediate in a
    /// secondary; in the primary, the active root's `IntermediateCerts` (after a rotation,
    /// the new root cross-signed by the old one, so that peers which still trust only the
    /// old root accept new leaves, as Consul does). A sidecar presents `CertPEM` followed by
    /// these.
    #[serde(rename = "IntermediatePEMs")]
    pub intermediate_pems: Vec<String>,
    /// The service.
    pub service: String,
    /// The SPIFFE ID in the certificate.
    #[serde(rename = "ServiceURI")]
    pub service_uri: String,
    /// RFC 3339.
    pub valid_after: String,
    /// RFC 3339.
    pub valid_before: String,
}

/// Signs `csr_pem` for `expected` if the CSR asks for exactly that identity.
///
/// `random_serial` must be 16 random bytes (the caller owns the randomness, keeping this pure).
pub fn sign_leaf(
    root: &CaRoot,
    key: &SigningKey,
    csr_pem: &str,
    expected: &SpiffeId,
    now: OffsetDateTime,
    ttl: StdDuration,
    random_serial: [u8; 16],
) -> Result<SignedLeaf> {
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| Error::bad_request(format!("invalid field `CSR`: {e}")))?;
    check_csr(&csr.params, expected)?;
    if ttl.is_zero() || ttl > MAX_LEAF_TTL {
        return Err(Error::bad_request(
            "invalid field `TTL`: must be between 1s and 8760h",
        ));
    }
    let mut serial = random_serial;
    serial[0] &= 0x7f; // RFC 5280 §4.1.2.2: "The serial number MUST be a positive integer".
    if serial[0] == 0 {
        serial[0] = 1; // Keep the encoding at 16 bytes so the serial never looks shorter.
    }
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, expected.service.clone());
    let params = &mut csr.params;
    params.distinguished_name = name;
    params.subject_alt_names = vec![SanType::URI(
        expected.to_string().try_into().map_err(internal)?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
        KeyUsagePurpose::DataEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = now - backdate_for(ttl);
    params.not_after = params.not_before + ttl;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.use_authority_key_identifier_extension = true;
    params.name_constraints = None;
    params.custom_extensions.clear();
    let signing_key = KeyPair::from_pem(&key.private_key_pem).map_err(internal)?;
    // A secondary signs with its intermediate (spec §5.5); the primary with the root itself.
    let issuer_pem = key.intermediate_pem.as_deref().unwrap_or(&root.root_cert);
    let issuer = Issuer::from_ca_cert_pem(issuer_pem, signing_key).map_err(internal)?;
    let certificate = csr.signed_by(&issuer).map_err(internal)?;
    Ok(SignedLeaf {
        serial_number: colon_hex(&serial),
        cert_pem: certificate.pem(),
        intermediate_pems: match &key.intermediate_pem {
            Some(intermediate) => vec![intermediate.clone()],
            None => root.intermediate_certs.clone().unwrap_or_default(),
        },
        service: expected.service.clone(),
        service_uri: expected.to_string(),
        valid_after: rfc3339(csr.params.not_before),
        valid_before: rfc3339(csr.params.not_after),
    })
}

/// A fresh P-256 key and a CSR for `identity`, for clients that let the agent make their key
/// (Consul's `agent/connect/ca/leaf`). Returns (CSR PEM, private key PEM).
pub fn agent_csr(identity: &SpiffeId) -> Result<(String, String)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(internal)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        identity.to_string().try_into().map_err(internal)?,
    )];
    let csr = params.serialize_request(&key).map_err(internal)?;
    Ok((csr.pem().map_err(internal)?, key.serialize_pem()))
}

/// The CSR policy: exactly one SAN, a URI equal to the expected SPIFFE ID, and not a CA.
pub fn check_csr(params: &CertificateParams, expected: &SpiffeId) -> Result<()> {
    let uris: Vec<&str> = params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    if params.subject_alt_names.len() != 1 || uris.len() != 1 {
        return Err(Error::bad_request(format!(
            "invalid field `CSR`: must carry exactly one SAN, the URI {expected}"
        )));
    }
    let requested = SpiffeId::parse(uris[0]).map_err(|_| {
        Error::bad_request(format!(
            "invalid field `CSR`: URI SAN {:?} is not a SPIFFE service ID",
            uris[0]
        ))
    })?;
    if &requested != expected {
        return Err(Error::PermissionDenied(format!(
            "CSR asks for {requested}, but this request may only sign {expected}"
        )));
    }
    if matches!(params.is_ca, IsCa::Ca(_)) {
        return Err(Error::bad_request(
            "invalid field `CSR`: must not request a CA certificate",
        ));
    }
    Ok(())
}

pub(crate) fn internal(error: impl std::fmt::Display) -> Error {
    Error::Internal(format!("ca: {error}"))
}

/// Formats a time as RFC 3339 (UTC).
pub fn rfc3339(time: OffsetDateTime) -> String {
    time.format(&Rfc3339).unwrap_or_default()
}

/// `aa:bb:cc` hex, Consul's spelling of fingerprints and key IDs.
pub fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(uri: &str) -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.to_owned().try_into().expect("ia5"))];
        params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem")
    }

    #[test]
    fn signs_only_the_requested_identity() {
        let now = OffsetDateTime::now_utc();
        let generated =
            generate_root("11111111-2222-3333-4444-555555555555", now, 1).expect("root");
        let td = &generated.root.external_trust_domain;
        let expected = SpiffeId::service(td, "primary", "socat");
        let leaf = sign_leaf(
            &generated.root,
            &generated.key,
            &csr_for(&expected.to_string()),
            &expected,
            now,
            LEAF_TTL,
            [0xff; 16],
        )
        .expect("sign");
        assert_eq!(leaf.service_uri, expected.to_string());
        assert!(leaf.serial_number.starts_with("7f:"));

        let other = SpiffeId::service(td, "primary", "web");
        let err = sign_leaf(
            &generated.root,
            &generated.key,
            &csr_for(&other.to_string()),
            &expected,
            now,
            LEAF_TTL,
            [1; 16],
        )
        .expect_err("wrong service");
        assert_eq!(err.status(), 403);
        let err = sign_leaf(
            &generated.root,
            &generated.key,
            "garbage",
            &expected,
            now,
            LEAF_TTL,
            [1; 16],
        )
        .expect_err("garbage");
        assert_eq!(err.status(), 400);
        let err = sign_leaf(
            &generated.root,
            &generated.key,
            &csr_for(&expected.to_string()),
            &expected,
            now,
            MAX_LEAF_TTL * 2,
            [1; 16],
        )
        .expect_err("ttl");
        assert!(err.to_string().contains("TTL"));
    }
}
