//! SPIFFE IDs of Connect services: `spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<name>`.

use std::fmt;

use crate::error::{Error, Result};

/// A parsed service identity.
#[derive(Clone, Debug, PartialEq, Eq)]
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

impl SpiffeId {
    /// The ID of `service` in `datacenter` (default namespace).
    pub fn service(trust_domain: &str, datacenter: &str, service: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.to_ascii_lowercase(),
            namespace: "default".to_owned(),
            datacenter: datacenter.to_owned(),
            service: service.to_owned(),
        }
    }

    /// Parses a service ID strictly: trust domain of `[a-z0-9.-]`, no port, query or fragment,
    /// exactly the path `/ns/<ns>/dc/<dc>/svc/<name>` (Consul's regex).
    pub fn parse(uri: &str) -> Result<SpiffeId> {
        let bad = || Error::bad_request(format!("invalid SPIFFE service ID {uri:?}"));
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (host, path) = rest.split_once('/').ok_or_else(bad)?;
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        {
            return Err(bad());
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "dc", dc, "svc", svc] if [ns, dc, svc].iter().all(|p| valid_segment(p)) => {
                Ok(SpiffeId {
                    trust_domain: host.to_owned(),
                    namespace: (*ns).to_owned(),
                    datacenter: (*dc).to_owned(),
                    service: (*svc).to_owned(),
                })
            }
            _ => Err(bad()),
        }
    }
}

fn valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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
    fn round_trip_and_rejects() {
        let id = SpiffeId::service("ABC.consul", "primary", "web");
        let text = id.to_string();
        assert_eq!(text, "spiffe://abc.consul/ns/default/dc/primary/svc/web");
        assert_eq!(SpiffeId::parse(&text).expect("parse"), id);
        for bad in [
            "spiffe://abc.consul/ns/default/dc/primary/svc/",
            "spiffe://abc.consul:8/ns/default/dc/primary/svc/web",
            "spiffe://abc.consul/ns/default/dc/primary/svc/web?x",
            "spiffe://abc.consul/ns/default/dc/primary/svc/web/extra",
            "https://abc.consul/ns/default/dc/primary/svc/web",
            "spiffe://abc.consul",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
