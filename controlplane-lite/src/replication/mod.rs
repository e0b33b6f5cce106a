//! Federation: a secondary datacenter follows the primary.
//!
//! - [`machine`]: the replication protocol as a sans-IO state machine (one blocking-query stream
//!   per [`Kind`], back-off, request deadlines, index-reset detection). It takes `now` and
//!   returns [`machine::Action`]s; it never touches a socket, a clock or the store.
//! - [`snapshot`]: how a full snapshot from the primary is applied to a local table
//!   (idempotent: a diff by key and value, local-only rows left alone).
//! - [`federation`]: which mesh gateways this datacenter publishes (its federation state).
//! - [`client`]: the HTTP client for the primary (replication token, deadlines).
//! - [`runner`]: the tokio shell that performs the actions over HTTP and against the store.
//!
//! The middleware that sends a secondary's writes of replicated data to the primary is HTTP
//! plumbing and lives in `http::forward`.

pub mod client;
pub mod federation;
pub mod machine;
pub mod runner;
#[cfg(test)]
mod sim;
pub mod snapshot;
pub mod trust;

use crate::store::Table;

/// What a secondary replicates, one blocking-query stream each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// The primary's CA roots; applying them also makes sure this datacenter holds an
    /// intermediate signed by the active root.
    CaRoots,
    /// ACL policies.
    AclPolicies,
    /// Global ACL tokens (local tokens stay in their datacenter).
    AclTokens,
    /// Config entries.
    ConfigEntries,
    /// Intentions.
    Intentions,
    /// Every datacenter's mesh gateways.
    FederationStates,
}

impl Kind {
    /// Every kind, in the order streams start.
    pub const ALL: [Kind; 6] = [
        Kind::CaRoots,
        Kind::AclPolicies,
        Kind::AclTokens,
        Kind::ConfigEntries,
        Kind::Intentions,
        Kind::FederationStates,
    ];

    /// The metric label and the URL segment of `/v1/internal/replication/:kind`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::CaRoots => "ca-roots",
            Kind::AclPolicies => "acl-policies",
            Kind::AclTokens => "acl-tokens",
            Kind::ConfigEntries => "config-entries",
            Kind::Intentions => "intentions",
            Kind::FederationStates => "federation-states",
        }
    }

    /// Parses [`Kind::name`].
    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The store table the stream fills.
    pub fn table(self) -> Table {
        match self {
            Kind::CaRoots => Table::CaRoots,
            Kind::AclPolicies => Table::AclPolicies,
            Kind::AclTokens => Table::AclTokens,
            Kind::ConfigEntries => Table::ConfigEntries,
            Kind::Intentions => Table::Intentions,
            Kind::FederationStates => Table::FederationStates,
        }
    }

    /// Whether a row of this kind belongs to the local datacenter only and is neither sent by
    /// the primary nor touched by replication in a secondary (Consul's local tokens).
    pub fn is_local_only(self, value: &serde_json::Value) -> bool {
        self == Kind::AclTokens && value.get("Local").and_then(|v| v.as_bool()) == Some(true)
    }
}
