//! The intention wire type, Consul's JSON shape: what controlplane-lite stores, replicates and
//! answers on `/v1/connect/intentions*`, and what the sidecar reads from
//! `/v1/connect/intentions/match` to enforce.
//!
//! Serialising writes every field. Deserialising defaults the fields a reader can do without
//! (the namespaces to `default`, as Consul OSS does, the rest to empty), so the sidecar accepts
//! the same answers it accepted with its own reduced copy of this struct; controlplane-lite
//! always writes every field, so its own reads see no difference.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Names;

/// The only namespace in Consul OSS.
pub const DEFAULT_NAMESPACE: &str = "default";

/// `allow` or `deny`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Connections are allowed.
    Allow,
    /// Connections are refused.
    Deny,
}

/// An intention (Consul's shape).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Intention {
    /// UUID.
    #[serde(rename = "ID", default)]
    pub id: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Source namespace.
    #[serde(rename = "SourceNS", default = "default_namespace")]
    pub source_ns: String,
    /// Source service or `*`.
    pub source_name: String,
    /// Destination namespace.
    #[serde(rename = "DestinationNS", default = "default_namespace")]
    pub destination_ns: String,
    /// Destination service or `*`.
    pub destination_name: String,
    /// Always `consul`.
    #[serde(default)]
    pub source_type: String,
    /// The decision.
    pub action: Action,
    /// Metadata.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Computed precedence (read-only).
    #[serde(default)]
    pub precedence: u8,
    /// RFC 3339.
    #[serde(default)]
    pub created_at: String,
    /// RFC 3339.
    #[serde(default)]
    pub updated_at: String,
    /// Raft index of creation.
    #[serde(default)]
    pub create_index: u64,
    /// Raft index of the last change.
    #[serde(default)]
    pub modify_index: u64,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

impl Intention {
    /// The names the intention model ([`crate::precedence`], [`crate::deciding`]) works on.
    pub fn names(&self) -> Names<'_> {
        Names {
            source_ns: &self.source_ns,
            source_name: &self.source_name,
            destination_ns: &self.destination_ns,
            destination_name: &self.destination_name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What controlplane-lite writes is what the sidecar reads, with Consul's key names.
    #[test]
    fn round_trips_with_consuls_keys() {
        let intention = Intention {
            id: "a-b".into(),
            description: "d".into(),
            source_ns: "default".into(),
            source_name: "web".into(),
            destination_ns: "*".into(),
            destination_name: "db".into(),
            source_type: "consul".into(),
            action: Action::Deny,
            meta: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
            precedence: 6,
            created_at: "2026-11-29T00:00:00Z".into(),
            updated_at: "2026-11-29T00:00:01Z".into(),
            create_index: 4,
            modify_index: 5,
        };
        let value = serde_json::to_value(&intention).expect("serialise");
        for key in [
            "ID",
            "SourceNS",
            "DestinationNS",
            "SourceName",
            "CreateIndex",
        ] {
            assert!(value.get(key).is_some(), "{key} in {value}");
        }
        assert_eq!(value["Action"], "deny");
        assert_eq!(
            serde_json::from_value::<Intention>(value).ok(),
            Some(intention)
        );
    }

    /// A reader needs only the names and the action; namespaces default to `default`.
    #[test]
    fn a_reader_needs_only_names_and_action() {
        let text = r#"{"SourceName":"web","DestinationName":"db","Action":"allow","New":1}"#;
        let intention: Intention = serde_json::from_str(text).expect("parse");
        assert_eq!(intention.source_ns, DEFAULT_NAMESPACE);
        assert_eq!(intention.destination_ns, DEFAULT_NAMESPACE);
        assert_eq!(intention.action, Action::Allow);
        assert!(serde_json::from_str::<Intention>(r#"{"SourceName":"web"}"#).is_err());
    }
}
