//! The route snapshot: an immutable table from a normalised server name to an endpoint set.
//!
//! Built off the hot path (at start, on reload, or from the control plane) and published
//! whole; a worker reads one snapshot per connection decision. Lookups do not allocate.
//!
//! Contract (DESIGN.md "Routing semantics"): comparison is ASCII case-insensitive with one
//! trailing dot ignored (the ClientHello parser normalises the name); a route is an exact name
//! or `*.suffix`, which matches one or more labels before `suffix`; exact beats wildcard and
//! among wildcards the longest suffix wins.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::clienthello::ServerName;

/// Index of a cluster in [`RouteTable::clusters`].
pub type ClusterIndex = usize;

/// A route pattern, already validated and lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    /// `*.suffix`: holds `suffix` without the leading `*.`.
    Wildcard(String),
}

impl Pattern {
    /// Parse a route's `sni` value: a host name, or `*.` followed by one.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let (wildcard, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        match ServerName::parse(name.as_bytes()) {
            Ok(parsed) if wildcard => Ok(Pattern::Wildcard(parsed.as_str().to_owned())),
            Ok(parsed) => Ok(Pattern::Exact(parsed.as_str().to_owned())),
            Err(_) => Err(format!(
                "`{text}` is not a host name or `*.` followed by one (letters, digits, hyphens and dots; no IP literals)"
            )),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(name) => f.write_str(name),
            Pattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// One route's destination: its endpoints and the labels its metrics carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The route's pattern as configured (normalised).
    pub pattern: Pattern,
    pub endpoints: Vec<SocketAddr>,
    /// `destination_service` and `destination_datacenter` metric labels.
    pub labels: DestinationLabels,
}

/// Bounded metric labels derived from a route pattern. Consul names
/// (`<service>.<namespace>.<dc>.internal.<trust-domain>`) give service and datacenter; a
/// datacenter wildcard gives service `*`; any other name is its own service label.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DestinationLabels {
    pub service: String,
    pub datacenter: String,
}

impl DestinationLabels {
    pub fn for_pattern(pattern: &Pattern) -> DestinationLabels {
        let (name, wildcard) = match pattern {
            Pattern::Exact(name) => (name.as_str(), false),
            Pattern::Wildcard(suffix) => (suffix.as_str(), true),
        };
        let labels: Vec<&str> = name.split('.').collect();
        if let Some(internal) = labels.iter().position(|label| *label == "internal") {
            // `<dc>.internal.<td>` for a wildcard, `<svc>.<ns>.<dc>.internal.<td>` (or with a
            // subset in front) for an exact name.
            if wildcard && internal == 1 {
                return DestinationLabels {
                    service: "*".to_owned(),
                    datacenter: labels[0].to_owned(),
                };
            }
            if !wildcard && internal >= 3 {
                return DestinationLabels {
                    service: labels[internal - 3].to_owned(),
                    datacenter: labels[internal - 1].to_owned(),
                };
            }
        }
        DestinationLabels {
            service: pattern.to_string(),
            datacenter: String::new(),
        }
    }
}

/// What a route lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Matched(ClusterIndex),
    /// No route; the connection is closed without a byte.
    NoRoute,
}

/// An immutable routing table.
#[derive(Debug, Default)]
pub struct RouteTable {
    clusters: Vec<Cluster>,
    exact: HashMap<String, ClusterIndex>,
    wildcard: HashMap<String, ClusterIndex>,
    /// Used for a valid ClientHello that carries no server_name.
    no_sni: Option<ClusterIndex>,
}

/// A route as given by the configuration or the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub pattern: Pattern,
    pub endpoints: Vec<SocketAddr>,
}

impl RouteTable {
    /// Build a table. Duplicate patterns are refused: the later one would silently win.
    pub fn build(
        routes: Vec<RouteSpec>,
        no_sni_endpoints: Option<Vec<SocketAddr>>,
    ) -> Result<RouteTable, String> {
        let mut table = RouteTable::default();
        for route in routes {
            let index = table.clusters.len();
            let map = match &route.pattern {
                Pattern::Exact(name) => table.exact.entry(name.clone()),
                Pattern::Wildcard(suffix) => table.wildcard.entry(suffix.clone()),
            };
            match map {
                std::collections::hash_map::Entry::Occupied(_) => {
                    return Err(format!("route `{}` is listed twice", route.pattern));
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(index);
                }
            }
            table.clusters.push(Cluster {
                labels: DestinationLabels::for_pattern(&route.pattern),
                pattern: route.pattern,
                endpoints: route.endpoints,
            });
        }
        if let Some(endpoints) = no_sni_endpoints {
            table.no_sni = Some(table.clusters.len());
            table.clusters.push(Cluster {
                pattern: Pattern::Exact("default".to_owned()),
                labels: DestinationLabels {
                    service: "default_route".to_owned(),
                    datacenter: String::new(),
                },
                endpoints,
            });
        }
        Ok(table)
    }

    pub fn clusters(&self) -> &[Cluster] {
        &self.clusters
    }

    pub fn cluster(&self, index: ClusterIndex) -> &Cluster {
        &self.clusters[index]
    }

    /// Route a normalised server name (or its absence).
    pub fn lookup(&self, server_name: Option<&str>) -> Lookup {
        let Some(name) = server_name else {
            return self.no_sni.map_or(Lookup::NoRoute, Lookup::Matched);
        };
        if let Some(&index) = self.exact.get(name) {
            return Lookup::Matched(index);
        }
        // `*.suffix` needs at least one label before `suffix`, so candidates are the tails
        // after each dot; the first dot gives the longest suffix, which wins.
        if !self.wildcard.is_empty() {
            let mut rest = name;
            while let Some(dot) = rest.find('.') {
                rest = &rest[dot + 1..];
                if let Some(&index) = self.wildcard.get(rest) {
                    return Lookup::Matched(index);
                }
            }
        }
        Lookup::NoRoute
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pattern: &str, port: u16) -> RouteSpec {
        RouteSpec {
            pattern: Pattern::parse(pattern).expect("valid pattern"),
            endpoints: vec![SocketAddr::from(([127, 0, 0, 1], port))],
        }
    }

    fn table() -> RouteTable {
        RouteTable::build(
            vec![
                spec("socat.default.dc1.internal.td.consul", 1),
                spec("*.dc2.internal.td.consul", 2),
                spec("*.internal.td.consul", 3),
                spec("*.example.com", 4),
                spec("exact.example.com", 5),
            ],
            None,
        )
        .expect("table builds")
    }

    fn port(lookup: Lookup, table: &RouteTable) -> Option<u16> {
        match lookup {
            Lookup::Matched(index) => Some(table.cluster(index).endpoints[0].port()),
            Lookup::NoRoute => None,
        }
    }

    #[test]
    fn exact_beats_wildcard_and_longest_suffix_wins() {
        let table = table();
        let cases = [
            ("socat.default.dc1.internal.td.consul", Some(1)),
            ("web.default.dc2.internal.td.consul", Some(2)),
            ("web.default.dc3.internal.td.consul", Some(3)),
            ("exact.example.com", Some(5)),
            ("other.example.com", Some(4)),
            ("a.b.c.example.com", Some(4)),
            // A wildcard needs at least one label in front of its suffix.
            ("example.com", None),
            ("dc2.internal.td.consul", Some(3)),
            ("unknown.test", None),
        ];
        for (name, expected) in cases {
            assert_eq!(port(table.lookup(Some(name)), &table), expected, "{name}");
        }
        assert_eq!(table.lookup(None), Lookup::NoRoute);
    }

    #[test]
    fn no_sni_goes_to_default_route_only_when_configured() {
        let table = RouteTable::build(
            vec![spec("a.test", 1)],
            Some(vec![SocketAddr::from(([127, 0, 0, 1], 9))]),
        )
        .expect("builds");
        assert_eq!(port(table.lookup(None), &table), Some(9));
        assert_eq!(table.lookup(Some("b.test")), Lookup::NoRoute);
        // The default route is a cluster of its own (the metrics list every cluster).
        assert_eq!(table.clusters().len(), 2);
    }

    #[test]
    fn patterns_normalise_and_reject_bad_names() {
        assert_eq!(
            Pattern::parse("Web.Example.COM."),
            Ok(Pattern::Exact("web.example.com".into()))
        );
        assert_eq!(
            Pattern::parse("*.Example.com"),
            Ok(Pattern::Wildcard("example.com".into()))
        );
        for bad in ["", "*", "*.", "a..b", "a_b.c", "10.0.0.1", "*.*.a", "a b"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn duplicate_routes_are_refused() {
        let error = RouteTable::build(vec![spec("a.test", 1), spec("A.test.", 2)], None)
            .expect_err("duplicate");
        assert!(error.contains("a.test"), "{error}");
    }

    #[test]
    fn consul_names_give_bounded_labels() {
        let labels = |p: &str| DestinationLabels::for_pattern(&Pattern::parse(p).expect("ok"));
        assert_eq!(
            labels("socat.default.dc1.internal.1111.consul"),
            DestinationLabels {
                service: "socat".into(),
                datacenter: "dc1".into()
            }
        );
        assert_eq!(
            labels("v1.socat.default.dc1.internal.1111.consul"),
            DestinationLabels {
                service: "socat".into(),
                datacenter: "dc1".into()
            }
        );
        assert_eq!(
            labels("*.dc2.internal.1111.consul"),
            DestinationLabels {
                service: "*".into(),
                datacenter: "dc2".into()
            }
        );
        assert_eq!(labels("*.example.com").service, "*.example.com");
        // Neither Consul shape (a wildcard over a whole service name, an exact datacenter
        // name): each keeps its own name, so a mixed-up shape test shows here.
        for name in [
            "*.socat.default.dc1.internal.1111.consul",
            "dc1.internal.1111.consul",
        ] {
            assert_eq!(
                labels(name),
                DestinationLabels {
                    service: name.into(),
                    datacenter: String::new()
                }
            );
        }
    }
}
