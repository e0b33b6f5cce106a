//! Root rotation (sans-IO): a root from an operator's key (and certificate), and the
//! cross-signature that lets the old root vouch for the new one.
//!
//! As in Consul, the new root's `IntermediateCerts` holds the new root's subject and key
//! signed by the old root, and the primary appends it to every leaf it signs. A peer that
//! still trusts only the old root then verifies new leaves through it; a secondary accepts
//! the new root because of it (`replication::trust`).

use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair, SerialNumber};
use time::OffsetDateTime;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::BACKDATE;
use super::{colon_hex, internal, rfc3339, root_with_key, CaRoot, GeneratedRoot, SigningKey};
use crate::error::{Error, Result};
use rcgen::BasicConstraints;

/// The root an operator supplied: `PrivateKey` alone gets a root certificate made here;
/// with `RootCert`, that certificate is used as it is, once it is checked to be a CA
/// certificate for that key, valid now.
pub fn root_from_supplied(
    cluster_id: &str,
    now: OffsetDateTime,
    serial: u64,
    private_key_pem: &str,
    root_cert_pem: Option<&str>,
) -> Result<GeneratedRoot> {
    let key = KeyPair::from_pem(private_key_pem).map_err(|e| {
        Error::bad_request(format!(
            "invalid field `Config.PrivateKey`: not a PKCS#8 PEM key ({e}); make one with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`"
        ))
    })?;
    if !key.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256) {
        return Err(Error::bad_request(
            "invalid field `Config.PrivateKey`: must be an EC P-256 key",
        ));
    }
    let mut generated = root_with_key(cluster_id, now, serial, key)?;
    let Some(pem) = root_cert_pem else {
        return Ok(generated);
    };
    let der = pem_der(pem).ok_or_else(|| {
        Error::bad_request("invalid field `Config.RootCert`: not a PEM certificate")
    })?;
    let (_, certificate) = X509Certificate::from_der(&der).map_err(|e| {
        Error::bad_request(format!(
            "invalid field `Config.RootCert`: does not parse: {e}"
        ))
    })?;
    if !certificate.is_ca() {
        return Err(Error::bad_request(
            "invalid field `Config.RootCert`: not a CA certificate (basic constraints CA:TRUE)",
        ));
    }
    if !same_public_key(pem, &generated.root.root_cert) {
        return Err(Error::bad_request(
            "invalid field `Config.RootCert`: does not hold the public key of `Config.PrivateKey`",
        ));
    }
    copy_name(certificate.subject())?;
    let validity = certificate.validity();
    let (not_before, not_after) = (
        validity.not_before.to_datetime(),
        validity.not_after.to_datetime(),
    );
    if not_before > now + BACKDATE || not_after <= now {
        return Err(Error::bad_request(format!(
            "invalid field `Config.RootCert`: not valid now (valid from {} to {})",
            rfc3339(not_before),
            rfc3339(not_after)
        )));
    }
    let root = &mut generated.root;
    root.id =
        colon_hex(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &der).as_ref());
    root.serial_number = certificate
        .raw_serial()
        .iter()
        .fold(0u64, |acc, byte| acc.wrapping_shl(8) | u64::from(*byte));
    root.not_before = rfc3339(not_before);
    root.not_after = rfc3339(not_after);
    root.root_cert = pem.trim().to_owned() + "\n";
    generated.key.root_id = root.id.clone();
    generated.not_after_unix = not_after.unix_timestamp();
    Ok(generated)
}

/// The new root's subject and public key, signed by the old root: valid from now until the
/// old root expires (a cross-signature never outlives its issuer).
pub fn cross_sign(
    new_root: &CaRoot,
    old_root: &CaRoot,
    old_key: &SigningKey,
    now: OffsetDateTime,
    random_serial: [u8; 16],
) -> Result<String> {
    let der = pem_der(&new_root.root_cert).ok_or_else(|| internal("new root is not PEM"))?;
    let (_, parsed) = X509Certificate::from_der(&der).map_err(internal)?;
    let mut params = CertificateParams::default();
    // The copy must name the subject byte for byte as the root does, and carry its key
    // identifier: path builders match a leaf's issuer and authority key ID against them.
    params.distinguished_name = copy_name(parsed.subject())?;
    params.key_identifier_method =
        match parsed
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            }) {
            Some(id) => rcgen::KeyIdMethod::PreSpecified(id),
            None => rcgen::KeyIdMethod::Sha256,
        };
    params.is_ca = rcgen::IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let old_not_after = OffsetDateTime::parse(
        &old_root.not_after,
        &time::format_description::well_known::Rfc3339,
    )
    .map_err(internal)?;
    params.not_before = now - BACKDATE;
    params.not_after = old_not_after;
    let mut serial = random_serial;
    serial[0] = (serial[0] & 0x7f).max(1);
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.use_authority_key_identifier_extension = true;
    let new_public = PublicKeyOf::from_pem(&new_root.root_cert)?;
    let old_signing = KeyPair::from_pem(&old_key.private_key_pem).map_err(internal)?;
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&old_root.root_cert, old_signing).map_err(internal)?;
    let certificate = params.signed_by(&new_public, &issuer).map_err(internal)?;
    Ok(certificate.pem())
}

/// Rebuilds a certificate's subject for rcgen: one attribute per RDN, in order, with the
/// same string types (what rcgen can express; anything else is refused, not approximated).
fn copy_name(name: &x509_parser::x509::X509Name<'_>) -> Result<DistinguishedName> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let refuse = || {
        Error::bad_request(
            "invalid field `Config.RootCert`: its subject cannot be reproduced for the cross-signature (use one attribute per RDN, each a UTF8, Printable or IA5 string, no type twice)",
        )
    };
    let mut dn = DistinguishedName::new();
    let mut seen = Vec::new();
    for rdn in name.iter() {
        let mut attributes = rdn.iter();
        let (Some(attribute), None) = (attributes.next(), attributes.next()) else {
            return Err(refuse());
        };
        let oid: Vec<u64> = attribute.attr_type().iter().ok_or_else(refuse)?.collect();
        let kind = DnType::from_oid(&oid);
        if seen.contains(&kind) {
            return Err(refuse());
        }
        seen.push(kind.clone());
        let text = std::str::from_utf8(attribute.attr_value().data).map_err(|_| refuse())?;
        let value = match attribute.attr_value().header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => {
                DnValue::PrintableString(text.try_into().map_err(|_| refuse())?)
            }
            Tag::Ia5String => DnValue::Ia5String(text.try_into().map_err(|_| refuse())?),
            _ => return Err(refuse()),
        };
        dn.push(kind, value);
    }
    Ok(dn)
}

/// Whether two PEM certificates carry the same public key.
pub fn same_public_key(a_pem: &str, b_pem: &str) -> bool {
    match (
        pem_der(a_pem).and_then(|der| spki(&der)),
        pem_der(b_pem).and_then(|der| spki(&der)),
    ) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

fn pem_der(pem: &str) -> Option<Vec<u8>> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .ok()
        .map(|(_, pem)| pem.contents)
}

fn spki(der: &[u8]) -> Option<Vec<u8>> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, certificate)| certificate.public_key().raw.to_vec())
}

/// A certificate's public key, to sign for without its private key.
struct PublicKeyOf {
    spki_der: Vec<u8>,
    raw: Vec<u8>,
}

impl PublicKeyOf {
    fn from_pem(pem: &str) -> Result<PublicKeyOf> {
        let der = pem_der(pem).ok_or_else(|| internal("root is not PEM"))?;
        let (_, certificate) = X509Certificate::from_der(&der).map_err(internal)?;
        let public_key = certificate.public_key();
        Ok(PublicKeyOf {
            spki_der: public_key.raw.to_vec(),
            raw: public_key.subject_public_key.data.to_vec(),
        })
    }
}

impl rcgen::PublicKeyData for PublicKeyOf {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }

    fn subject_public_key_info(&self) -> Vec<u8> {
        self.spki_der.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{generate_root, sign_leaf, LEAF_TTL};
    use crate::spiffe::SpiffeId;

    const CLUSTER: &str = "11111111-2222-3333-4444-555555555555";

    #[test]
    fn a_cross_signed_new_root_chains_to_the_old_one() {
        let now = OffsetDateTime::now_utc();
        let old = generate_root(CLUSTER, now, 1).expect("old");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut new =
            root_from_supplied(CLUSTER, now, 7, &key.serialize_pem(), None).expect("new root");
        assert_ne!(new.root.id, old.root.id);
        let cross = cross_sign(&new.root, &old.root, &old.key, now, [3; 16]).expect("cross");
        assert!(same_public_key(&cross, &new.root.root_cert));
        new.root.intermediate_certs = Some(vec![cross.clone()]);
        // A secondary holding the old root accepts the new one because of the cross-signature,
        // and would refuse it without.
        let accepted = crate::replication::trust::check_ca_change(
            Some(CLUSTER),
            CLUSTER,
            Some(&old.root),
            &new.root,
        );
        assert_eq!(accepted, Ok(()));
        let mut bare = new.root.clone();
        bare.intermediate_certs = None;
        assert!(crate::replication::trust::check_ca_change(
            Some(CLUSTER),
            CLUSTER,
            Some(&old.root),
            &bare
        )
        .is_err());
        // Leaves of the new root carry the cross-signature.
        let td = &new.root.external_trust_domain;
        let id = SpiffeId::service(td, "primary", "socat");
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names =
            vec![rcgen::SanType::URI(id.to_string().try_into().expect("ia5"))];
        let csr = params
            .serialize_request(&leaf_key)
            .expect("csr")
            .pem()
            .expect("pem");
        let leaf = sign_leaf(&new.root, &new.key, &csr, &id, now, LEAF_TTL, [9; 16]).expect("leaf");
        assert_eq!(leaf.intermediate_pems, vec![cross]);
    }

    #[test]
    fn a_supplied_root_certificate_must_hold_the_supplied_key() {
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let made = root_from_supplied(CLUSTER, now, 2, &key.serialize_pem(), None).expect("made");
        let again = root_from_supplied(
            CLUSTER,
            now,
            3,
            &key.serialize_pem(),
            Some(&made.root.root_cert),
        )
        .expect("the same certificate");
        assert_eq!(again.root.id, made.root.id);
        assert_eq!(again.root.root_cert, made.root.root_cert);
        let other = generate_root(CLUSTER, now, 4).expect("other");
        let err = root_from_supplied(
            CLUSTER,
            now,
            5,
            &key.serialize_pem(),
            Some(&other.root.root_cert),
        )
        .map(|_| ())
        .expect_err("foreign certificate");
        assert!(err.to_string().contains("public key"), "{err}");
        let err = root_from_supplied(CLUSTER, now, 6, "not a key", None)
            .map(|_| ())
            .expect_err("garbage");
        assert_eq!(err.status(), 400);
        assert!(err.to_string().contains("Config.PrivateKey"), "{err}");
    }
}
