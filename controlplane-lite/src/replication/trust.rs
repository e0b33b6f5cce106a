//! What a secondary accepts from the primary about the CA (sans-IO).
//!
//! TLS authenticates the primary, but a secondary must also not let one answer replace the
//! trust it has: a different trust domain is never adopted, and a new active root only if it
//! chains to the root the secondary holds (signed by it, or cross-signed by it in the new
//! root's `IntermediateCerts`). Otherwise whoever controls the link or a rebuilt primary could
//! swap the mesh's identities at once.

use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::CaRoot;

/// Why a CA change from the primary was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaChangeRefused {
    /// The primary sent another trust domain than the one this datacenter adopted.
    #[error("the primary sent trust domain {new:?}, but this datacenter belongs to {held:?}; refusing (a rebuilt primary needs the secondary's data dir reset)")]
    TrustDomain {
        /// The adopted cluster id.
        held: String,
        /// The offered one.
        new: String,
    },
    /// The new active root neither is signed by nor is cross-signed by the held root.
    #[error("the primary's new active root {new:?} does not chain to the root {held:?} this datacenter trusts; refusing")]
    Root {
        /// The held active root's ID.
        held: String,
        /// The offered root's ID.
        new: String,
    },
}

impl CaChangeRefused {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            CaChangeRefused::TrustDomain { .. } => "trust_domain",
            CaChangeRefused::Root { .. } => "root",
        }
    }
}

/// Checks a CA-roots answer against what this datacenter holds. `held_*` are `None` before
/// the first adoption (anything is accepted then: trust on first use, over TLS).
pub fn check_ca_change(
    held_cluster_id: Option<&str>,
    new_cluster_id: &str,
    held_active: Option<&CaRoot>,
    new_active: &CaRoot,
) -> Result<(), CaChangeRefused> {
    if let Some(held) = held_cluster_id {
        if !held.eq_ignore_ascii_case(new_cluster_id) {
            return Err(CaChangeRefused::TrustDomain {
                held: held.to_owned(),
                new: new_cluster_id.to_owned(),
            });
        }
    }
    let Some(held) = held_active else {
        return Ok(());
    };
    if held.id == new_active.id && held.root_cert == new_active.root_cert {
        return Ok(());
    }
    let cross_signed = new_active
        .intermediate_certs
        .iter()
        .flatten()
        .any(|pem| same_key(pem, &new_active.root_cert) && signed_by(pem, &held.root_cert));
    if signed_by(&new_active.root_cert, &held.root_cert) || cross_signed {
        return Ok(());
    }
    Err(CaChangeRefused::Root {
        held: held.id.clone(),
        new: new_active.id.clone(),
    })
}

fn der(pem: &str) -> Option<Vec<u8>> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .ok()
        .map(|(_, pem)| pem.contents)
}

/// Whether `cert_pem`'s signature verifies with `issuer_pem`'s P-256 key (our roots' kind).
fn signed_by(cert_pem: &str, issuer_pem: &str) -> bool {
    let (Some(cert), Some(issuer)) = (der(cert_pem), der(issuer_pem)) else {
        return false;
    };
    let (Ok((_, cert)), Ok((_, issuer))) = (
        X509Certificate::from_der(&cert),
        X509Certificate::from_der(&issuer),
    ) else {
        return false;
    };
    let key = UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_ASN1,
        issuer.public_key().subject_public_key.data.as_ref(),
    );
    key.verify(
        cert.tbs_certificate.as_ref(),
        cert.signature_value.data.as_ref(),
    )
    .is_ok()
}

/// Whether two certificates carry the same public key.
fn same_key(a_pem: &str, b_pem: &str) -> bool {
    let (Some(a), Some(b)) = (der(a_pem), der(b_pem)) else {
        return false;
    };
    match (X509Certificate::from_der(&a), X509Certificate::from_der(&b)) {
        (Ok((_, a)), Ok((_, b))) => a.public_key().raw == b.public_key().raw,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    fn root(cluster: &str, serial: u64) -> CaRoot {
        let mut generated =
            crate::ca::generate_root(cluster, OffsetDateTime::now_utc(), serial).expect("root");
        generated.root.active = true;
        generated.root
    }

    #[test]
    fn signature_check_works() {
        let held = root("c1", 1);
        let other = root("c1", 2);
        assert!(signed_by(&held.root_cert, &held.root_cert), "self-signed");
        assert!(!signed_by(&other.root_cert, &held.root_cert));
        assert!(same_key(&held.root_cert, &held.root_cert));
        assert!(!same_key(&other.root_cert, &held.root_cert));
    }

    #[test]
    fn first_adoption_and_the_same_root_are_accepted() {
        let held = root("c1", 1);
        assert_eq!(check_ca_change(None, "c1", None, &held), Ok(()));
        assert_eq!(
            check_ca_change(Some("c1"), "c1", Some(&held), &held),
            Ok(())
        );
    }

    #[test]
    fn another_trust_domain_or_an_unrelated_root_is_refused() {
        let held = root("c1", 1);
        let rogue = root("c2", 1);
        assert_eq!(
            check_ca_change(Some("c1"), "c2", Some(&held), &rogue).map_err(|e| e.reason()),
            Err("trust_domain")
        );
        // Same trust domain, but a root from another key: refused.
        let unrelated = root("c1", 2);
        assert_eq!(
            check_ca_change(Some("c1"), "c1", Some(&held), &unrelated).map_err(|e| e.reason()),
            Err("root")
        );
    }
}
