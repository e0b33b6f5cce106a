//! SPIFFE IDs of Connect services: `spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<name>`.
//!
//! One parser for both sides: controlplane-lite checks CSRs and `authorize` requests with it,
//! the sidecar checks peer certificates with it, so the two cannot disagree on who a
//! certificate names.
//!
//! Consul's own parser (`agent/connect/uri.go`) matches the path with
//! `^(?:/ap/([^/]+))?/ns/([^/]+)/dc/([^/]+)/svc/([^/]+)$`: a segment is anything but `/`, so a
//! `.` in a service name is part of a valid ID, and Consul's catalog accepts such names (it
//! only warns that they are not discoverable over DNS). We therefore accept `.` in every
//! segment. We stay narrower than Consul elsewhere: segments are ASCII letters, digits, `-`,
//! `_` and `.` (no percent-escapes, no admin-partition prefix), and at most
//! [`MAX_SEGMENT_LEN`] bytes, so an ID read from a peer's certificate is bounded and printable.

use std::fmt;

/// The longest namespace, datacenter or service segment accepted, in bytes.
pub const MAX_SEGMENT_LEN: usize = 256;

/// The longest trust domain accepted, in bytes (a DNS name).
pub const MAX_TRUST_DOMAIN_LEN: usize = 253;

/// A parsed service identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// `<cluster-id>.consul`, lower case.
    pub trust_domain: String,
    /// Namespace (`default`).
    pub namespace: String,
    /// Datacenter.
    pub datacenter: String,
    /// Service name.
    pub service: String,
}

/// Why a URI is not a SPIFFE service ID. The caller decides who is at fault (a peer's
/// certificate, a request body, a configuration file) and names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    /// The scheme is not `spiffe://`.
    #[error("not a spiffe:// URI")]
    Scheme,
    /// The trust domain is empty, too long, not lower case, or carries a port.
    #[error("invalid trust domain")]
    TrustDomain,
    /// The path is not exactly `/ns/<ns>/dc/<dc>/svc/<name>` with valid segments.
    #[error("path is not /ns/<ns>/dc/<dc>/svc/<name>")]
    Path,
}

impl SpiffeId {
    /// The ID of `service` in `datacenter` (default namespace); the trust domain is lower-cased.
    pub fn service(trust_domain: &str, datacenter: &str, service: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.to_ascii_lowercase(),
            namespace: "default".to_owned(),
            datacenter: datacenter.to_owned(),
            service: service.to_owned(),
        }
    }

    /// Parses a service ID strictly: a lower-case trust domain of `[a-z0-9.-]`, no port,
    /// query or fragment, exactly the path `/ns/<ns>/dc/<dc>/svc/<name>`.
    pub fn parse(uri: &str) -> Result<SpiffeId, SpiffeError> {
        let rest = uri.strip_prefix("spiffe://").ok_or(SpiffeError::Scheme)?;
        let (host, path) = rest.split_once('/').ok_or(SpiffeError::Path)?;
        let host_ok = !host.is_empty()
            && host.len() <= MAX_TRUST_DOMAIN_LEN
            && host
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !host_ok {
            return Err(SpiffeError::TrustDomain);
        }
        let mut parts = path.split('/');
        let mut field = |label: &str| match (parts.next(), parts.next()) {
            (Some(found), Some(value)) if found == label && valid_segment(value) => Ok(value),
            _ => Err(SpiffeError::Path),
        };
        let namespace = field("ns")?;
        let datacenter = field("dc")?;
        let service = field("svc")?;
        if parts.next().is_some() {
            return Err(SpiffeError::Path);
        }
        Ok(SpiffeId {
            trust_domain: host.to_owned(),
            namespace: namespace.to_owned(),
            datacenter: datacenter.to_owned(),
            service: service.to_owned(),
        })
    }
}

fn valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= MAX_SEGMENT_LEN
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/dc/{}/svc/{}",
            self.trust_domain, self.namespace, self.datacenter, self.service
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_lower_cases_the_trust_domain() {
        let id = SpiffeId::service("ABC.consul", "primary", "web");
        let text = id.to_string();
        assert_eq!(text, "spiffe://abc.consul/ns/default/dc/primary/svc/web");
        assert_eq!(SpiffeId::parse(&text), Ok(id));
    }

    /// Consul's path regex takes any segment without a `/`, and its catalog accepts dotted
    /// service names, so an ID naming `web.v2` is valid. controlplane-lite's copy refused it.
    #[test]
    fn a_dot_in_a_service_name_is_accepted_as_consul_does() {
        let text = "spiffe://td.consul/ns/default/dc/dc.one/svc/web.v2";
        let id = SpiffeId::parse(text).expect("a dotted service name is a valid ID");
        assert_eq!(id.service, "web.v2");
        assert_eq!(id.datacenter, "dc.one");
        assert_eq!(id.to_string(), text);
    }

    #[test]
    fn refuses_everything_else() {
        let long = "a".repeat(MAX_SEGMENT_LEN + 1);
        let too_long = format!("spiffe://td.consul/ns/default/dc/primary/svc/{long}");
        for (bad, why) in [
            (
                "https://td.consul/ns/default/dc/primary/svc/web",
                SpiffeError::Scheme,
            ),
            ("spiffe://td.consul", SpiffeError::Path),
            (
                "spiffe:///ns/default/dc/primary/svc/web",
                SpiffeError::TrustDomain,
            ),
            (
                "spiffe://TD.consul/ns/default/dc/primary/svc/web",
                SpiffeError::TrustDomain,
            ),
            (
                "spiffe://td.consul:8443/ns/default/dc/primary/svc/web",
                SpiffeError::TrustDomain,
            ),
            (
                "spiffe://td.consul/ns/default/dc/primary/svc/",
                SpiffeError::Path,
            ),
            (
                "spiffe://td.consul/ns/default/dc/primary/svc/web/extra",
                SpiffeError::Path,
            ),
            (
                "spiffe://td.consul/ns/default/dc/primary/svc/web?x=1",
                SpiffeError::Path,
            ),
            (
                "spiffe://td.consul/ns/default/dc/primary/svc/web#f",
                SpiffeError::Path,
            ),
            (
                "spiffe://td.consul/ns/default/dc/primary/svc/we%2Fb",
                SpiffeError::Path,
            ),
            (
                "spiffe://td.consul/dc/primary/ns/default/svc/web",
                SpiffeError::Path,
            ),
            (
                "spiffe://td.consul/ap/p/ns/default/dc/primary/svc/web",
                SpiffeError::Path,
            ),
            (too_long.as_str(), SpiffeError::Path),
        ] {
            assert_eq!(SpiffeId::parse(bad), Err(why), "{bad}");
        }
    }
}
