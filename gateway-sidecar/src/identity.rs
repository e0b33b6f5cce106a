//! The sidecar's decisions, sans-IO: SPIFFE identities, intention evaluation, and when to
//! renew a leaf. Plain functions over values; no sockets, no clock (`now` is an argument).

use std::time::{Duration, SystemTime};

/// A Connect service identity, from the Consul contract shared with controlplane-lite.
pub use mesh_model::spiffe::SpiffeId;

/// The URI SANs of a DER certificate; `None` if it does not parse.
pub fn uri_sans(certificate_der: &[u8]) -> Option<Vec<String>> {
    use x509_parser::extensions::GeneralName;
    let (_, certificate) = x509_parser::parse_x509_certificate(certificate_der).ok()?;
    let mut uris = Vec::new();
    if let Ok(Some(extension)) = certificate.subject_alternative_name() {
        for name in &extension.value.general_names {
            if let GeneralName::URI(uri) = name {
                uris.push((*uri).to_owned());
            }
        }
    }
    Some(uris)
}

/// The one SPIFFE service identity a leaf carries. A leaf with no URI SAN, a malformed one, or
/// several is refused: a connection must be attributable to exactly one service.
pub fn leaf_identity(certificate_der: &[u8]) -> Result<SpiffeId, &'static str> {
    let uris = uri_sans(certificate_der).ok_or("certificate does not parse")?;
    match uris.as_slice() {
        [uri] => SpiffeId::parse(uri).map_err(|_| "URI SAN is not a SPIFFE service ID"),
        [] => Err("certificate has no URI SAN"),
        _ => Err("certificate has several URI SANs"),
    }
}

/// The intention wire type, shared with controlplane-lite.
pub use mesh_model::intention::{Action, Intention};

/// Consul's precedence (spec §4.2), from the shared intention model.
pub fn precedence(intention: &Intention) -> u8 {
    mesh_model::precedence(intention.names())
}

/// The default when no intention matches: Consul takes it from the ACL default policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultDecision {
    Allow,
    Deny,
}

/// The outcome of an authorization, with the reason that goes into the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

/// Whether `client` may connect to `destination` (Consul's `ConnectAuthorize`): the first
/// matching intention in precedence order decides (ties broken by names, as Consul sorts),
/// otherwise the default. The client's trust domain was already checked in the handshake
/// (`tls::TrustDomainClientVerifier`); its datacenter is not compared (intentions are global).
pub fn authorize(
    intentions: &[Intention],
    client: &SpiffeId,
    destination: &str,
    default: DefaultDecision,
) -> Decision {
    let deciding = mesh_model::deciding(
        intentions,
        Intention::names,
        (client.namespace.as_str(), client.service.as_str()),
        ("default", destination),
    );
    match deciding {
        Some(intention) => Decision {
            allowed: intention.action == Action::Allow,
            reason: format!(
                "intention {} {}/{} => {}/{} (ID {}, precedence {})",
                if intention.action == Action::Allow {
                    "ALLOW"
                } else {
                    "DENY"
                },
                intention.source_ns,
                intention.source_name,
                intention.destination_ns,
                intention.destination_name,
                intention.id,
                precedence(intention)
            ),
        },
        None => Decision {
            allowed: default == DefaultDecision::Allow,
            reason: format!(
                "no intention matches; default {} (ACL default policy)",
                if default == DefaultDecision::Allow {
                    "allow"
                } else {
                    "deny"
                }
            ),
        },
    }
}

/// When to renew a leaf valid from `not_before` to `not_after`: at `fraction` of its
/// lifetime, where the caller draws `fraction` uniformly from [0.6, 0.9] (Consul renews at a
/// random point in that window so that a fleet does not renew at once). Returns how long to
/// wait from `now` (zero if that point has passed).
pub fn renewal_delay(
    not_before: SystemTime,
    not_after: SystemTime,
    fraction: f64,
    now: SystemTime,
) -> Duration {
    let fraction = fraction.clamp(RENEW_AT_LEAST, RENEW_AT_MOST);
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let renew_at = not_before + lifetime.mul_f64(fraction);
    renew_at.duration_since(now).unwrap_or(Duration::ZERO)
}

/// The renewal window, as fractions of a leaf's lifetime (spec §5: "renew at 60–90 %").
pub const RENEW_AT_LEAST: f64 = 0.6;
pub const RENEW_AT_MOST: f64 = 0.9;

/// Map 32 random bits uniformly onto the renewal window.
pub fn renewal_fraction(random: u32) -> f64 {
    RENEW_AT_LEAST + (RENEW_AT_MOST - RENEW_AT_LEAST) * (f64::from(random) / f64::from(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(service: &str) -> SpiffeId {
        SpiffeId::parse(&format!(
            "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/secondary/svc/{service}"
        ))
        .expect("valid")
    }

    fn intention(source: &str, destination: &str, action: Action) -> Intention {
        Intention {
            id: format!("{source}->{destination}"),
            source_ns: "default".into(),
            source_name: source.into(),
            destination_ns: "default".into(),
            destination_name: destination.into(),
            action,
            description: String::new(),
            source_type: "consul".into(),
            meta: Default::default(),
            precedence: 0,
            created_at: String::new(),
            updated_at: String::new(),
            create_index: 0,
            modify_index: 0,
        }
    }

    #[test]
    fn no_intention_takes_the_default() {
        let deny = authorize(&[], &id("web"), "socat", DefaultDecision::Deny);
        assert!(!deny.allowed);
        assert!(deny.reason.contains("default deny"), "{}", deny.reason);
        assert!(authorize(&[], &id("web"), "socat", DefaultDecision::Allow).allowed);
    }

    #[test]
    fn exact_beats_wildcard_in_either_order() {
        let intentions = vec![
            intention("*", "socat", Action::Deny),
            intention("web", "socat", Action::Allow),
            intention("*", "*", Action::Deny),
        ];
        let decision = authorize(&intentions, &id("web"), "socat", DefaultDecision::Deny);
        assert!(decision.allowed, "{}", decision.reason);
        assert!(decision.reason.contains("precedence 9"));
        let other = authorize(&intentions, &id("api"), "socat", DefaultDecision::Allow);
        assert!(!other.allowed);
        assert!(other.reason.contains("precedence 8"), "{}", other.reason);
    }

    #[test]
    fn wildcard_destination_applies_and_other_destinations_do_not() {
        let intentions = vec![
            intention("web", "*", Action::Allow),
            intention("web", "db", Action::Deny),
        ];
        assert!(authorize(&intentions, &id("web"), "socat", DefaultDecision::Deny).allowed);
        assert!(!authorize(&intentions, &id("web"), "db", DefaultDecision::Allow).allowed);
        assert_eq!(precedence(&intentions[0]), 6);
    }

    #[test]
    fn deny_intention_beats_an_allow_default() {
        let intentions = vec![intention("web", "socat", Action::Deny)];
        assert!(!authorize(&intentions, &id("web"), "socat", DefaultDecision::Allow).allowed);
    }

    #[test]
    fn renewal_falls_between_sixty_and_ninety_percent() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(1000);
        assert_eq!(
            renewal_delay(start, end, renewal_fraction(0), start),
            Duration::from_secs(600)
        );
        assert_eq!(
            renewal_delay(start, end, renewal_fraction(u32::MAX), start),
            Duration::from_secs(900)
        );
        // Measured from `now`, and never negative.
        assert_eq!(
            renewal_delay(start, end, 0.6, start + Duration::from_secs(100)),
            Duration::from_secs(500)
        );
        assert_eq!(renewal_delay(start, end, 0.9, end), Duration::ZERO);
        // Out-of-window fractions are clamped.
        assert_eq!(
            renewal_delay(start, end, 0.1, start),
            Duration::from_secs(600)
        );
        let middle = renewal_fraction(u32::MAX / 2);
        assert!((0.74..0.76).contains(&middle));
    }
}
