//! The secondary datacenter's intermediate CA (spec §5.5), sans-IO.
//!
//! A secondary makes its own P-256 key and a CSR whose only SAN is the signing ID
//! `spiffe://<trust-domain>`; the primary signs it with the root as a CA certificate with path
//! length zero; the secondary checks the answer holds its key and then issues leaves with it, so
//! every leaf in every datacenter chains to the one shared root.

use std::time::Duration as StdDuration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::{colon_hex, internal, CaRoot, SigningKey, BACKDATE};
use crate::error::{Error, Result};

/// Intermediate lifetime (Consul's `IntermediateCertTTL` default, 8760h).
pub const INTERMEDIATE_TTL: StdDuration = StdDuration::from_secs(8760 * 3600);

/// A fresh intermediate key and the CSR that asks the primary to certify it.
pub struct IntermediateCsr {
    /// PEM CSR to send to the primary.
    pub csr_pem: String,
    /// PKCS#8 PEM; stays in this datacenter's `ca_signing` table.
    pub private_key_pem: String,
}

/// Secondary: generates a key and a CSR for `spiffe://<trust_domain>`.
pub fn intermediate_csr(trust_domain: &str, datacenter: &str) -> Result<IntermediateCsr> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(internal)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(
        DnType::CommonName,
        format!("Consul CA intermediate {datacenter}"),
    );
    params.distinguished_name = name;
    params.subject_alt_names = vec![signing_uri(trust_domain)?];
    let csr = params.serialize_request(&key).map_err(internal)?;
    Ok(IntermediateCsr {
        csr_pem: csr.pem().map_err(internal)?,
        private_key_pem: key.serialize_pem(),
    })
}

/// Primary: signs a secondary's intermediate CSR with the root. The CSR must carry exactly one
/// SAN, the URI `spiffe://<trust_domain>` (Consul's `CanSign` for a signing ID).
pub fn sign_intermediate(
    root: &CaRoot,
    key: &SigningKey,
    csr_pem: &str,
    trust_domain: &str,
    now: OffsetDateTime,
    random_serial: [u8; 16],
) -> Result<String> {
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| Error::bad_request(format!("invalid field `CSR`: {e}")))?;
    let expected = format!("spiffe://{trust_domain}");
    let only_uri = match csr.params.subject_alt_names.as_slice() {
        [SanType::URI(uri)] => uri.as_str() == expected,
        _ => false,
    };
    if !only_uri {
        return Err(Error::PermissionDenied(format!(
            "intermediate CSR must carry exactly one SAN, the URI {expected}"
        )));
    }
    let mut serial = random_serial;
    serial[0] = (serial[0] & 0x7f).max(1); // RFC 5280 §4.1.2.2: a positive integer.
    let params = &mut csr.params;
    let mut name = DistinguishedName::new();
    // A distinct subject per intermediate keeps path building unambiguous across renewals.
    name.push(
        DnType::CommonName,
        format!("Consul CA intermediate {}", colon_hex(&serial[..4])),
    );
    params.distinguished_name = name;
    params.subject_alt_names = vec![signing_uri(trust_domain)?];
    // Spec §5.5 step 4: "CA cert with MaxPathLenZero, KeyUsage CertSign|CRLSign|DigitalSignature".
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.extended_key_usages.clear();
    params.not_before = now - BACKDATE;
    params.not_after = params.not_before + INTERMEDIATE_TTL;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.use_authority_key_identifier_extension = true;
    params.name_constraints = None;
    params.custom_extensions.clear();
    let signing_key = KeyPair::from_pem(&key.private_key_pem).map_err(internal)?;
    let issuer = Issuer::from_ca_cert_pem(&root.root_cert, signing_key).map_err(internal)?;
    Ok(csr.signed_by(&issuer).map_err(internal)?.pem())
}

/// Secondary: checks what the primary returned before using it (Consul's `SetIntermediate`):
/// it holds our key, it is a CA, and its only URI is our signing ID.
pub fn check_intermediate(cert_pem: &str, private_key_pem: &str, trust_domain: &str) -> Result<()> {
    let bad = |why: &str| Error::Internal(format!("intermediate from the primary: {why}"));
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|_| bad("not PEM"))?;
    let certificate = pem.parse_x509().map_err(|_| bad("not X.509"))?;
    let key = KeyPair::from_pem(private_key_pem).map_err(internal)?;
    if certificate.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(bad("does not hold our key"));
    }
    let is_ca = certificate
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|c| c.value.ca);
    if !is_ca {
        return Err(bad("is not a CA certificate"));
    }
    let expected = format!("spiffe://{trust_domain}");
    let uris: Vec<String> = certificate
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris != [expected] {
        return Err(bad("its URI SAN is not our signing ID"));
    }
    Ok(())
}

fn signing_uri(trust_domain: &str) -> Result<SanType> {
    Ok(SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(internal)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::super::{generate_root, sign_leaf, LEAF_TTL};
    use super::*;
    use crate::spiffe::SpiffeId;

    #[test]
    fn secondary_leaves_are_issued_by_the_intermediate() {
        let now = OffsetDateTime::now_utc();
        let generated =
            generate_root("aaaaaaaa-2222-3333-4444-555555555555", now, 1).expect("root");
        let td = generated.root.external_trust_domain.clone();
        let request = intermediate_csr(&td, "secondary").expect("csr");
        let pem = sign_intermediate(
            &generated.root,
            &generated.key,
            &request.csr_pem,
            &td,
            now,
            [9; 16],
        )
        .expect("sign intermediate");
        check_intermediate(&pem, &request.private_key_pem, &td).expect("check");
        // Someone else's key is refused.
        let other = intermediate_csr(&td, "secondary").expect("csr");
        assert!(check_intermediate(&pem, &other.private_key_pem, &td).is_err());
        // A CSR for another trust domain is refused.
        let foreign = intermediate_csr("other.consul", "secondary").expect("csr");
        let err = sign_intermediate(
            &generated.root,
            &generated.key,
            &foreign.csr_pem,
            &td,
            now,
            [9; 16],
        )
        .expect_err("foreign");
        assert_eq!(err.status(), 403);

        let key = SigningKey {
            root_id: generated.root.id.clone(),
            private_key_pem: request.private_key_pem,
            intermediate_pem: Some(pem.clone()),
        };
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let id = SpiffeId::service(&td, "secondary", "web");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().expect("uri"))];
        let csr = params
            .serialize_request(&leaf_key)
            .expect("csr")
            .pem()
            .expect("pem");
        let leaf =
            sign_leaf(&generated.root, &key, &csr, &id, now, LEAF_TTL, [3; 16]).expect("leaf");
        assert_eq!(leaf.intermediate_pems, vec![pem]);
    }
}
