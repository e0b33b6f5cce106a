//! Intentions: who may connect to whom (sans-IO).
//!
//! Precedence follows Consul 1.6–1.8 (spec §4.2): count exact values in the destination
//! (namespace, name): 2 → 9, 1 → 6, 0 → 3; then subtract `2 - exact values in the source`.
//! Matches are ordered by precedence, ties by (SourceNS, SourceName, DestinationNS,
//! DestinationName); authorization takes the first whose source matches.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::Deserialize;

use crate::acl::DefaultPolicy;
use crate::error::{Error, Result};

// The intention type is the Consul contract shared with the sidecar that enforces it.
pub use mesh_model::intention::{Action, Intention, DEFAULT_NAMESPACE};
pub use mesh_model::WILDCARD;

/// The writable fields of an intention, as a client sends them.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct IntentionRequest {
    /// Ignored on create; must match the URL on update.
    #[serde(default, rename = "ID")]
    pub id: Option<String>,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Source namespace (default `default`).
    #[serde(default, rename = "SourceNS")]
    pub source_ns: String,
    /// Source service or `*`.
    #[serde(default)]
    pub source_name: String,
    /// Destination namespace (default `default`).
    #[serde(default, rename = "DestinationNS")]
    pub destination_ns: String,
    /// Destination service or `*`.
    #[serde(default)]
    pub destination_name: String,
    /// Must be `consul` if present.
    #[serde(default)]
    pub source_type: String,
    /// `allow` or `deny`.
    pub action: Option<Action>,
    /// Metadata.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Read-only fields clients may echo back from a GET; ignored.
    #[serde(default)]
    pub precedence: Option<serde_json::Value>,
    /// Ignored (read-only).
    #[serde(default)]
    pub created_at: Option<serde_json::Value>,
    /// Ignored (read-only).
    #[serde(default)]
    pub updated_at: Option<serde_json::Value>,
    /// Ignored (read-only).
    #[serde(default)]
    pub create_index: Option<serde_json::Value>,
    /// Ignored (read-only).
    #[serde(default)]
    pub modify_index: Option<serde_json::Value>,
    /// Ignored (replication hash).
    #[serde(default)]
    pub hash: Option<serde_json::Value>,
    /// Unused by Consul; accepted for compatibility.
    #[serde(default)]
    pub default_addr: Option<serde_json::Value>,
    /// Unused by Consul; accepted for compatibility.
    #[serde(default)]
    pub default_port: Option<serde_json::Value>,
    /// Consul Enterprise partitions and peering, and the legacy-ID fields `api.Intention`
    /// carries: accepted and ignored (one partition, no peering here).
    #[serde(default)]
    pub source_partition: Option<serde::de::IgnoredAny>,
    /// See `source_partition`.
    #[serde(default)]
    pub destination_partition: Option<serde::de::IgnoredAny>,
    /// See `source_partition`.
    #[serde(default)]
    pub source_peer: Option<serde::de::IgnoredAny>,
    /// See `source_partition`.
    #[serde(default)]
    pub source_sameness_group: Option<serde::de::IgnoredAny>,
    /// See `source_partition`.
    #[serde(default, rename = "LegacyID")]
    pub legacy_id: Option<serde::de::IgnoredAny>,
    /// See `source_partition`.
    #[serde(default)]
    pub legacy_meta: Option<serde::de::IgnoredAny>,
    /// See `source_partition`.
    #[serde(default)]
    pub legacy_create_time: Option<serde::de::IgnoredAny>,
    /// See `source_partition`.
    #[serde(default)]
    pub legacy_update_time: Option<serde::de::IgnoredAny>,
    /// L7 permissions: only an empty list is accepted (the gateway is L4 only).
    #[serde(default)]
    pub permissions: Vec<serde_json::Value>,
}

/// Bound on `Description` and metadata, after Consul's general metadata limits.
const MAX_DESCRIPTION: usize = 512;
const MAX_META_PAIRS: usize = 64;

impl IntentionRequest {
    /// Validates the request and builds the intention (without ID, times and indexes).
    pub fn into_intention(self, id: String, now_rfc3339: &str) -> Result<Intention> {
        let source_ns = namespace(self.source_ns, "SourceNS")?;
        let destination_ns = namespace(self.destination_ns, "DestinationNS")?;
        name(&self.source_name, "SourceName")?;
        name(&self.destination_name, "DestinationName")?;
        if !self.permissions.is_empty() {
            return Err(Error::bad_request(
                "field `Permissions`: L7 intentions are not implemented (L4 `Action` only)",
            ));
        }
        if !matches!(self.source_type.as_str(), "" | "consul") {
            return Err(Error::bad_request(format!(
                "invalid field `SourceType` {:?}: must be \"consul\"",
                self.source_type
            )));
        }
        let action = self
            .action
            .ok_or_else(|| Error::bad_request("missing field `Action` (allow or deny)"))?;
        if self.description.len() > MAX_DESCRIPTION {
            return Err(Error::bad_request(format!(
                "field `Description`: longer than {MAX_DESCRIPTION} bytes"
            )));
        }
        if self.meta.len() > MAX_META_PAIRS {
            return Err(Error::bad_request(format!(
                "field `Meta`: more than {MAX_META_PAIRS} pairs"
            )));
        }
        let mut intention = Intention {
            id,
            description: self.description,
            source_ns,
            source_name: self.source_name,
            destination_ns,
            destination_name: self.destination_name,
            source_type: "consul".to_owned(),
            action,
            meta: self.meta,
            precedence: 0,
            created_at: now_rfc3339.to_owned(),
            updated_at: now_rfc3339.to_owned(),
            create_index: 0,
            modify_index: 0,
        };
        intention.precedence = precedence(&intention);
        Ok(intention)
    }
}

fn namespace(value: String, field: &str) -> Result<String> {
    match value.as_str() {
        "" | DEFAULT_NAMESPACE => Ok(DEFAULT_NAMESPACE.to_owned()),
        WILDCARD => Ok(WILDCARD.to_owned()),
        other => Err(Error::bad_request(format!(
            "invalid field `{field}` {other:?}: only \"default\" exists"
        ))),
    }
}

fn name(value: &str, field: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::bad_request(format!("missing field `{field}`")));
    }
    if value == WILDCARD {
        return Ok(());
    }
    if value.contains('*') {
        return Err(Error::bad_request(format!(
            "invalid field `{field}` {value:?}: '*' is only allowed as the whole value"
        )));
    }
    crate::catalog::validate_name(value, field)
}

/// Consul's precedence number (9 = most specific); the rule lives in `mesh-model`, shared with
/// the sidecars that enforce intentions.
pub fn precedence(intention: &Intention) -> u8 {
    mesh_model::precedence(intention.names())
}

/// Evaluation order: precedence descending, then lexicographic.
pub fn evaluation_order(a: &Intention, b: &Intention) -> Ordering {
    mesh_model::evaluation_order(a.names(), b.names())
}

/// Which side `/match` matches on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchBy {
    /// Intentions whose source matches the name.
    Source,
    /// Intentions whose destination matches the name.
    Destination,
}

/// The intentions that apply to `name` on one side, in evaluation order.
pub fn matches<'a>(all: &'a [Intention], by: MatchBy, name: &str) -> Vec<&'a Intention> {
    let mut out: Vec<&Intention> = all
        .iter()
        .filter(|i| {
            let (ns, n) = match by {
                MatchBy::Source => (&i.source_ns, &i.source_name),
                MatchBy::Destination => (&i.destination_ns, &i.destination_name),
            };
            (ns == DEFAULT_NAMESPACE || ns == WILDCARD) && (n == name || n == WILDCARD)
        })
        .collect();
    out.sort_by(|a, b| evaluation_order(a, b));
    out
}

/// The result of an authorization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the connection is allowed.
    pub allowed: bool,
    /// Why, in Consul's words.
    pub reason: String,
}

/// Decides whether `source` may connect to `destination` (Consul's `ConnectAuthorize`).
pub fn authorize(
    all: &[Intention],
    source: &str,
    destination: &str,
    default: DefaultPolicy,
) -> Decision {
    let deciding = mesh_model::deciding(
        all,
        Intention::names,
        (DEFAULT_NAMESPACE, source),
        (DEFAULT_NAMESPACE, destination),
    );
    if let Some(intention) = deciding {
        let allowed = intention.action == Action::Allow;
        return Decision {
            allowed,
            reason: format!(
                "Matched intention: {} {}/{} => {}/{} (ID: {}, Precedence: {})",
                if allowed { "ALLOW" } else { "DENY" },
                intention.source_ns,
                intention.source_name,
                intention.destination_ns,
                intention.destination_name,
                intention.id,
                intention.precedence
            ),
        };
    }
    Decision {
        allowed: default == DefaultPolicy::Allow,
        reason: "Default behavior configured by ACLs".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intention(source: &str, destination: &str, action: Action) -> Intention {
        IntentionRequest {
            id: None,
            description: String::new(),
            source_ns: String::new(),
            source_name: source.into(),
            destination_ns: String::new(),
            destination_name: destination.into(),
            source_type: String::new(),
            action: Some(action),
            meta: BTreeMap::new(),
            precedence: None,
            created_at: None,
            updated_at: None,
            create_index: None,
            modify_index: None,
            hash: None,
            default_addr: None,
            default_port: None,
            source_partition: None,
            destination_partition: None,
            source_peer: None,
            source_sameness_group: None,
            legacy_id: None,
            legacy_meta: None,
            legacy_create_time: None,
            legacy_update_time: None,
            permissions: Vec::new(),
        }
        .into_intention(format!("{source}->{destination}"), "t")
        .expect("valid")
    }

    #[test]
    fn precedence_table() {
        // (source ns, source, destination ns, destination) → precedence, from Consul's table.
        let table = [
            ("default", "web", "default", "db", 9),
            ("default", "*", "default", "db", 8),
            ("*", "*", "default", "db", 7),
            ("default", "web", "default", "*", 6),
            ("default", "*", "default", "*", 5),
            ("*", "*", "default", "*", 4),
            ("default", "web", "*", "*", 3),
            ("default", "*", "*", "*", 2),
            ("*", "*", "*", "*", 1),
        ];
        for (sns, s, dns, d, expected) in table {
            let mut i = intention(s, d, Action::Allow);
            i.source_ns = sns.into();
            i.destination_ns = dns.into();
            assert_eq!(precedence(&i), expected, "{sns}/{s} => {dns}/{d}");
        }
    }

    #[test]
    fn exact_beats_wildcard_and_default_applies() {
        let all = vec![
            intention("*", "db", Action::Deny),
            intention("web", "db", Action::Allow),
            intention("*", "*", Action::Allow),
        ];
        assert!(authorize(&all, "web", "db", DefaultPolicy::Deny).allowed);
        assert!(!authorize(&all, "api", "db", DefaultPolicy::Allow).allowed);
        assert!(
            authorize(&all, "api", "cache", DefaultPolicy::Deny).allowed,
            "*/* allow"
        );
        let none: Vec<Intention> = Vec::new();
        assert!(!authorize(&none, "a", "b", DefaultPolicy::Deny).allowed);
        assert!(authorize(&none, "a", "b", DefaultPolicy::Allow).allowed);
        let order: Vec<_> = matches(&all, MatchBy::Destination, "db")
            .iter()
            .map(|i| i.source_name.clone())
            .collect();
        assert_eq!(order, ["web", "*", "*"]);
    }

    #[test]
    fn validation() {
        let request = |source: &str, destination: &str| IntentionRequest {
            source_name: source.into(),
            destination_name: destination.into(),
            ..serde_json::from_value::<IntentionRequest>(serde_json::json!({"Action": "allow"}))
                .expect("base")
        };
        assert!(request("we*", "db")
            .into_intention("x".into(), "t")
            .is_err());
        assert!(request("", "db").into_intention("x".into(), "t").is_err());
        let err = request("web", "db.x")
            .into_intention("x".into(), "t")
            .expect_err("dot");
        assert!(err.to_string().contains("DestinationName"));
    }
}
