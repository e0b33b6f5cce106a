//! The Consul contract: everything controlplane-lite and its clients (`gateway mesh`, the
//! sidecar) must agree on, written once so the two sides cannot drift. IO-free: plain types and
//! functions, no sockets, no clock.
//!
//! - [`address`]: control-plane addresses (`-http-addr`, comma lists, http or https).
//! - [`blocking`]: Consul's blocking-query index rules and back-off.
//! - [`spiffe`]: the SPIFFE ID of a Connect service and its parser.
//! - [`cli`]: Consul's single-dash long flags, rewritten for clap.
//! - [`intention`]: the intention wire type.
//! - [`wire`]: the `/v1/internal/*` bodies `gateway mesh` and the sidecar read, and their paths.
//! - The crate root: Consul's intention model, which intention applies to a connection and in
//!   which order they are evaluated. controlplane-lite stores intentions and answers `check`
//!   and `match`; the sidecar enforces them on each client certificate.
#![forbid(unsafe_code)]

pub mod address;
pub mod blocking;
pub mod cli;
pub mod intention;
pub mod spiffe;
pub mod wire;

use std::cmp::Ordering;

/// A wildcard namespace or service name.
pub const WILDCARD: &str = "*";

/// The four names an intention is about, borrowed from whatever type holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Names<'a> {
    pub source_ns: &'a str,
    pub source_name: &'a str,
    pub destination_ns: &'a str,
    pub destination_name: &'a str,
}

/// Consul's precedence number, 9 for the most specific: exact destination beats wildcard
/// destination, then exact source beats wildcard source (consul-mesh-spec §4.2).
pub fn precedence(names: Names<'_>) -> u8 {
    let exact = |ns: &str, name: &str| u8::from(ns != WILDCARD) + u8::from(name != WILDCARD);
    let top = match exact(names.destination_ns, names.destination_name) {
        2 => 9,
        1 => 6,
        _ => 3,
    };
    top - (2 - exact(names.source_ns, names.source_name))
}

/// Evaluation order: precedence descending, then the names in lexicographic order (as Consul
/// sorts), so the first intention that applies decides.
pub fn evaluation_order(a: Names<'_>, b: Names<'_>) -> Ordering {
    precedence(b).cmp(&precedence(a)).then_with(|| {
        (
            a.source_ns,
            a.source_name,
            a.destination_ns,
            a.destination_name,
        )
            .cmp(&(
                b.source_ns,
                b.source_name,
                b.destination_ns,
                b.destination_name,
            ))
    })
}

/// A pattern (a name or `*`) matches a name.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    pattern == WILDCARD || pattern == name
}

/// Whether an intention applies to a connection from `source` to `destination`.
pub fn applies(intention: Names<'_>, source: (&str, &str), destination: (&str, &str)) -> bool {
    name_matches(intention.source_ns, source.0)
        && name_matches(intention.source_name, source.1)
        && name_matches(intention.destination_ns, destination.0)
        && name_matches(intention.destination_name, destination.1)
}

/// The intention that decides a connection from `source` to `destination` (each a
/// `(namespace, service)` pair): the first that applies in evaluation order, or `None` when the
/// default policy decides.
pub fn deciding<'a, T>(
    intentions: &'a [T],
    names: impl Fn(&T) -> Names<'_>,
    source: (&str, &str),
    destination: (&str, &str),
) -> Option<&'a T> {
    intentions
        .iter()
        .filter(|intention| applies(names(intention), source, destination))
        .min_by(|a, b| evaluation_order(names(a), names(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names<'a>(source: &'a str, destination: &'a str) -> Names<'a> {
        let split = |full: &'a str| full.split_once('/').unwrap_or(("default", full));
        let (source_ns, source_name) = split(source);
        let (destination_ns, destination_name) = split(destination);
        Names {
            source_ns,
            source_name,
            destination_ns,
            destination_name,
        }
    }

    /// Consul's precedence table (consul-mesh-spec §4.2).
    #[test]
    fn precedence_table() {
        for (source, destination, expected) in [
            ("web", "db", 9),
            ("*", "db", 8),
            ("*/*", "db", 7),
            ("web", "*", 6),
            ("*", "*", 5),
            ("*/*", "*", 4),
            ("web", "*/*", 3),
            ("*", "*/*", 2),
            ("*/*", "*/*", 1),
        ] {
            assert_eq!(
                precedence(names(source, destination)),
                expected,
                "{source} => {destination}"
            );
        }
    }

    #[test]
    fn the_most_specific_applicable_intention_decides() {
        let all = [
            names("*", "*"),
            names("web", "db"),
            names("*", "db"),
            names("api", "db"),
        ];
        let pick = |source, destination| {
            deciding(&all, |n| *n, ("default", source), ("default", destination)).copied()
        };
        assert_eq!(pick("web", "db"), Some(names("web", "db")));
        assert_eq!(pick("other", "db"), Some(names("*", "db")));
        assert_eq!(pick("web", "cache"), Some(names("*", "*")));
        let none: [Names<'_>; 0] = [];
        assert_eq!(
            deciding(&none, |n| *n, ("default", "web"), ("default", "db")),
            None
        );
    }

    #[test]
    fn ties_break_by_names() {
        let a = names("a", "*");
        let b = names("b", "*");
        assert_eq!(evaluation_order(a, b), Ordering::Less);
        assert_eq!(evaluation_order(b, a), Ordering::Greater);
    }
}
