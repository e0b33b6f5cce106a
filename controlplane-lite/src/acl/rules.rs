//! ACL rules and their evaluation (sans-IO).
//!
//! A policy's rules grant `read`, `write` or `deny` on resources: `acl`, `operator`, `mesh`, services by
//! exact name (`service`) or name prefix (`service_prefix`), nodes likewise, and `intentions`
//! per service rule. Evaluation follows Consul: an exact rule beats any prefix rule, the longest
//! matching prefix beats shorter ones, and when several policies name the same resource their
//! rules merge with `deny` over `write` over `read`. No matching rule falls through to the
//! agent's default policy (except `acl`, which only management tokens or explicit rules get).

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// An access level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Nothing is allowed.
    Deny,
    /// Reads are allowed.
    Read,
    /// Reads and writes are allowed.
    Write,
}

impl Access {
    /// Parses `read`, `write` or `deny` (`list` is Consul's acl-only level; we treat it as read).
    pub fn parse(value: &str, field: &str) -> Result<Access> {
        match value {
            "read" | "list" => Ok(Access::Read),
            "write" => Ok(Access::Write),
            "deny" => Ok(Access::Deny),
            other => Err(Error::bad_request(format!(
                "invalid ACL rule: {field} = {other:?}: must be \"read\", \"write\" or \"deny\""
            ))),
        }
    }

    /// Combines two grants of the same resource from different policies: deny wins, then write.
    fn merge(self, other: Access) -> Access {
        match (self, other) {
            (Access::Deny, _) | (_, Access::Deny) => Access::Deny,
            (a, b) => a.max(b),
        }
    }

    /// Whether this level allows reading.
    pub fn allows_read(self) -> bool {
        matches!(self, Access::Read | Access::Write)
    }

    /// Whether this level allows writing.
    pub fn allows_write(self) -> bool {
        self == Access::Write
    }
}

/// The rule for one service name or prefix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceRule {
    /// The `policy` of the rule.
    pub policy: Option<Access>,
    /// The explicit `intentions` level; when absent it follows `policy` (read/write → read).
    pub intentions: Option<Access>,
}

impl ServiceRule {
    /// Combines two rules for the same name from different policies.
    pub fn merge(self, other: ServiceRule) -> ServiceRule {
        ServiceRule {
            policy: merge_option(self.policy, other.policy),
            intentions: merge_option(self.intentions, other.intentions),
        }
    }

    /// The intentions level this rule grants, explicit or derived from `policy` (Consul: a
    /// service `read` or `write` rule implies `intentions = "read"`).
    fn intentions_level(&self) -> Option<Access> {
        self.intentions.or(match self.policy {
            Some(Access::Write) | Some(Access::Read) => Some(Access::Read),
            Some(Access::Deny) => Some(Access::Deny),
            None => None,
        })
    }
}

fn merge_option(a: Option<Access>, b: Option<Access>) -> Option<Access> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.merge(b)),
        (a, b) => a.or(b),
    }
}

/// A parsed rule set (one policy, or several merged).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// `acl = "..."`.
    pub acl: Option<Access>,
    /// `operator = "..."`.
    pub operator: Option<Access>,
    /// `mesh = "..."` (mesh-wide resources such as mesh gateways; Consul falls back to
    /// `operator` when it is absent, and so does [`Rules::mesh_access`]).
    pub mesh: Option<Access>,
    /// `service "name" { ... }`.
    pub service: BTreeMap<String, ServiceRule>,
    /// `service_prefix "prefix" { ... }`.
    pub service_prefix: BTreeMap<String, ServiceRule>,
    /// `node "name" { policy = ... }`.
    pub node: BTreeMap<String, Access>,
    /// `node_prefix "prefix" { policy = ... }`.
    pub node_prefix: BTreeMap<String, Access>,
}

impl Rules {
    /// Folds `other` into `self` (the merge of two policies).
    pub fn merge(&mut self, other: &Rules) {
        self.acl = merge_option(self.acl, other.acl);
        self.operator = merge_option(self.operator, other.operator);
        self.mesh = merge_option(self.mesh, other.mesh);
        for (name, rule) in &other.service {
            let entry = self.service.entry(name.clone()).or_default();
            *entry = entry.merge(*rule);
        }
        for (name, rule) in &other.service_prefix {
            let entry = self.service_prefix.entry(name.clone()).or_default();
            *entry = entry.merge(*rule);
        }
        for (name, access) in &other.node {
            let entry = self.node.entry(name.clone()).or_insert(*access);
            *entry = entry.merge(*access);
        }
        for (name, access) in &other.node_prefix {
            let entry = self.node_prefix.entry(name.clone()).or_insert(*access);
            *entry = entry.merge(*access);
        }
    }

    /// The level granted on service `name`, if any rule matches.
    pub fn service_access(&self, name: &str) -> Option<Access> {
        lookup(&self.service, &self.service_prefix, name, |rule| {
            rule.policy
        })
    }

    /// The level granted on service `name` by an exact `service` rule alone: prefix rules do
    /// not count. A mesh gateway's registration trusts only a rule that names it.
    pub fn exact_service_access(&self, name: &str) -> Option<Access> {
        self.service.get(name).and_then(|rule| rule.policy)
    }

    /// The level granted on `mesh`: the `mesh` rule, or the `operator` rule when there is none
    /// (Consul's fallback).
    pub fn mesh_access(&self) -> Option<Access> {
        self.mesh.or(self.operator)
    }

    /// The intentions level granted for destination `name`, if any rule matches.
    pub fn intentions_access(&self, name: &str) -> Option<Access> {
        lookup(
            &self.service,
            &self.service_prefix,
            name,
            ServiceRule::intentions_level,
        )
    }

    /// The level granted on node `name`, if any rule matches.
    pub fn node_access(&self, name: &str) -> Option<Access> {
        lookup(&self.node, &self.node_prefix, name, |access| Some(*access))
    }
}

/// Exact rule first, then the longest prefix whose rule says something about this aspect.
fn lookup<R>(
    exact: &BTreeMap<String, R>,
    prefixes: &BTreeMap<String, R>,
    name: &str,
    aspect: impl Fn(&R) -> Option<Access>,
) -> Option<Access> {
    if let Some(access) = exact.get(name).and_then(&aspect) {
        return Some(access);
    }
    prefixes
        .iter()
        .filter(|(prefix, rule)| name.starts_with(prefix.as_str()) && aspect(rule).is_some())
        .max_by_key(|(prefix, _)| prefix.len())
        .and_then(|(_, rule)| aspect(rule))
}

/// The error for a rule kind these rules do not model (both syntaxes refuse the same set).
pub(super) fn unsupported(key: &str) -> Error {
    Error::bad_request(format!(
        "invalid ACL rules: unsupported rule {key:?} (supported: acl, operator, mesh, service, service_prefix, node, node_prefix)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_beats_prefix_and_longest_prefix_wins() {
        let rules = Rules::parse(
            r#"
            service_prefix "" { policy = "read" }
            service_prefix "we" { policy = "deny" }
            service_prefix "web" { policy = "write" }
            service "webhook" { policy = "deny" }
            "#,
        )
        .expect("parse");
        assert_eq!(rules.service_access("socat"), Some(Access::Read));
        assert_eq!(rules.service_access("weather"), Some(Access::Deny));
        assert_eq!(rules.service_access("web"), Some(Access::Write));
        assert_eq!(rules.service_access("webhook"), Some(Access::Deny));
        assert_eq!(rules.node_access("n1"), None);
    }

    #[test]
    fn merge_prefers_deny_then_write() {
        let mut a =
            Rules::parse(r#"service "x" { policy = "read" } operator = "read""#).expect("a");
        let b = Rules::parse(r#"service "x" { policy = "write" } operator = "deny""#).expect("b");
        a.merge(&b);
        assert_eq!(a.service_access("x"), Some(Access::Write));
        assert_eq!(a.operator, Some(Access::Deny));
    }

    #[test]
    fn mesh_rule_parses_merges_and_falls_back_to_operator() {
        let hcl = Rules::parse(r#"mesh = "write""#).expect("hcl");
        assert_eq!(hcl.mesh_access(), Some(Access::Write));
        let json = Rules::parse(r#"{"mesh": "read"}"#).expect("json");
        assert_eq!(json.mesh_access(), Some(Access::Read));
        let operator = Rules::parse(r#"operator = "write""#).expect("operator");
        assert_eq!(operator.mesh_access(), Some(Access::Write));
        let mut both = Rules::parse(r#"operator = "write" mesh = "deny""#).expect("both");
        assert_eq!(
            both.mesh_access(),
            Some(Access::Deny),
            "mesh beats operator"
        );
        both.merge(&hcl);
        assert_eq!(both.mesh, Some(Access::Deny), "deny wins a merge");
        assert_eq!(Rules::default().mesh_access(), None);
    }

    #[test]
    fn exact_service_access_ignores_prefixes() {
        let rules = Rules::parse(
            r#"service_prefix "" { policy = "write" }
               service "mesh-gateway" { policy = "write" }
               service "web" { policy = "read" }"#,
        )
        .expect("parse");
        assert_eq!(
            rules.exact_service_access("mesh-gateway"),
            Some(Access::Write)
        );
        assert_eq!(rules.exact_service_access("web"), Some(Access::Read));
        assert_eq!(rules.exact_service_access("other"), None);
        assert_eq!(rules.service_access("other"), Some(Access::Write));
    }

    #[test]
    fn intentions_follow_service_policy_unless_explicit() {
        let rules = Rules::parse(
            r#"service "web" { policy = "write" }
               service "db" { policy = "read" intentions = "write" }"#,
        )
        .expect("parse");
        assert_eq!(rules.intentions_access("web"), Some(Access::Read));
        assert_eq!(rules.intentions_access("db"), Some(Access::Write));
        assert_eq!(rules.intentions_access("other"), None);
    }
}
