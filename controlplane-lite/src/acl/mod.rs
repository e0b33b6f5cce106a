//! ACLs: policies, tokens, and the authorizer that endpoints consult.
//!
//! Resolution is sans-IO: [`Authorizer::for_token`] takes a token and the policies it links to
//! (already read from the store) and the agent's default policy, and returns a value that
//! answers `service_write("web")` and friends. The HTTP layer only looks tokens up.

pub mod hcl;
pub mod json;
pub mod render;
pub mod rules;

use serde::{Deserialize, Serialize};

pub use rules::{Access, Rules};

impl Rules {
    /// Parses rules written in HCL or JSON (several JSON objects one after another are merged,
    /// as in the guide's `mesh-gateway-policy.json`). It lives here, above both syntaxes, so
    /// that `rules` (the model) depends on neither parser.
    pub fn parse(text: &str) -> Result<Rules> {
        if text.trim_start().starts_with('{') {
            json::parse(text)
        } else {
            hcl::parse(text)
        }
    }
}

use crate::error::{Error, Result};

/// The built-in management policy's ID (Consul's well-known value).
pub const MANAGEMENT_POLICY_ID: &str = "00000000-0000-0000-0000-000000000001";
/// The built-in management policy's name.
pub const MANAGEMENT_POLICY_NAME: &str = "global-management";
/// The anonymous token's accessor ID (Consul's well-known value).
pub const ANONYMOUS_ACCESSOR_ID: &str = "00000000-0000-0000-0000-000000000002";
/// The anonymous token's secret: requests without a token use it.
pub const ANONYMOUS_SECRET: &str = "anonymous";

/// What happens when no rule matches (`-acl-default-policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultPolicy {
    /// Everything not denied is allowed (except ACL management).
    Allow,
    /// Everything not granted is denied.
    Deny,
}

impl DefaultPolicy {
    /// Parses `allow` or `deny`.
    pub fn parse(value: &str) -> Result<DefaultPolicy> {
        match value {
            "allow" => Ok(DefaultPolicy::Allow),
            "deny" => Ok(DefaultPolicy::Deny),
            other => Err(Error::bad_request(format!(
                "acl-default-policy must be allow or deny, not {other:?}"
            ))),
        }
    }

    fn access(self) -> Access {
        match self {
            DefaultPolicy::Allow => Access::Write,
            DefaultPolicy::Deny => Access::Deny,
        }
    }
}

/// A stored ACL policy (Consul's shape).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Policy {
    /// UUID.
    #[serde(rename = "ID")]
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// The rules as the user wrote them (HCL or JSON); validated when written.
    #[serde(default)]
    pub rules: String,
    /// Datacenters the policy is valid in; empty means all.
    #[serde(default)]
    pub datacenters: Vec<String>,
    /// Raft index of creation.
    #[serde(default)]
    pub create_index: u64,
    /// Raft index of the last change.
    #[serde(default)]
    pub modify_index: u64,
}

/// A link from a token to a policy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "PascalCase")]
pub struct PolicyLink {
    /// Policy ID.
    #[serde(rename = "ID", default)]
    pub id: String,
    /// Policy name (refreshed from the policy when shown).
    #[serde(default)]
    pub name: String,
}

/// A service identity: the templated policy Consul generates for one service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceIdentity {
    /// The service the token acts as.
    pub service_name: String,
    /// Datacenters it is valid in; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datacenters: Vec<String>,
}

impl ServiceIdentity {
    /// The rules Consul synthesises for a service identity: write on the service and its
    /// sidecar, read on every service and node (for discovery).
    pub fn rules(&self) -> Rules {
        let text = format!(
            "service {name:?} {{ policy = \"write\" }}\nservice \"{name}-sidecar-proxy\" {{ policy = \"write\" }}\nservice_prefix \"\" {{ policy = \"read\" }}\nnode_prefix \"\" {{ policy = \"read\" }}",
            name = self.service_name
        );
        // The text is generated from a validated service name, so it always parses; an empty
        // rule set (deny everything) is the safe fallback should that ever change.
        Rules::parse(&text).unwrap_or_default()
    }
}

/// A stored ACL token (Consul's shape).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Token {
    /// Public identifier.
    #[serde(rename = "AccessorID")]
    pub accessor_id: String,
    /// The bearer secret.
    #[serde(rename = "SecretID")]
    pub secret_id: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Linked policies.
    #[serde(default)]
    pub policies: Vec<PolicyLink>,
    /// Service identities.
    #[serde(default)]
    pub service_identities: Vec<ServiceIdentity>,
    /// Local tokens stay in the datacenter that created them: the primary does not send them
    /// and a secondary's replication never deletes them.
    #[serde(default)]
    pub local: bool,
    /// RFC 3339 creation time.
    #[serde(default)]
    pub create_time: String,
    /// Raft index of creation.
    #[serde(default)]
    pub create_index: u64,
    /// Raft index of the last change.
    #[serde(default)]
    pub modify_index: u64,
}

/// The permissions of one request, resolved from its token.
#[derive(Clone, Debug)]
pub struct Authorizer {
    management: bool,
    rules: Rules,
    default: Access,
}

impl Authorizer {
    /// Resolves a token: merges the rules of its policies (valid in `datacenter`) and service
    /// identities. `policies` are the policies the token links to that still exist.
    pub fn for_token(
        token: &Token,
        policies: &[Policy],
        datacenter: &str,
        default: DefaultPolicy,
    ) -> Result<Authorizer> {
        let mut rules = Rules::default();
        let mut management = false;
        for policy in policies {
            if !policy.datacenters.is_empty() && !policy.datacenters.iter().any(|d| d == datacenter)
            {
                continue;
            }
            if policy.id == MANAGEMENT_POLICY_ID {
                management = true;
                continue;
            }
            let parsed = Rules::parse(&policy.rules).map_err(|e| {
                Error::Internal(format!(
                    "stored policy {} has invalid rules: {e}",
                    policy.name
                ))
            })?;
            rules.merge(&parsed);
        }
        for identity in &token.service_identities {
            if identity.datacenters.is_empty()
                || identity.datacenters.iter().any(|d| d == datacenter)
            {
                rules.merge(&identity.rules());
            }
        }
        Ok(Authorizer {
            management,
            rules,
            default: default.access(),
        })
    }

    /// An authorizer with every permission (used for internal work and tests).
    pub fn management() -> Authorizer {
        Authorizer {
            management: true,
            rules: Rules::default(),
            default: Access::Write,
        }
    }

    fn level(&self, granted: Option<Access>) -> Access {
        if self.management {
            return Access::Write;
        }
        granted.unwrap_or(self.default)
    }

    /// `acl:read`. Only management tokens or explicit `acl` rules grant ACL access, whatever the
    /// default policy (Consul's allow-all authorizer does not manage ACLs either).
    pub fn acl_read(&self) -> bool {
        self.management || self.rules.acl.is_some_and(Access::allows_read)
    }

    /// `acl:write`.
    pub fn acl_write(&self) -> bool {
        self.management || self.rules.acl.is_some_and(Access::allows_write)
    }

    /// `operator:read`.
    pub fn operator_read(&self) -> bool {
        self.level(self.rules.operator).allows_read()
    }

    /// `operator:write`.
    pub fn operator_write(&self) -> bool {
        self.level(self.rules.operator).allows_write()
    }

    /// `mesh:write` (or `operator:write` when the token has no `mesh` rule, as in Consul).
    pub fn mesh_write(&self) -> bool {
        self.level(self.rules.mesh_access()).allows_write()
    }

    /// Whether this token may register, replace or deregister a mesh gateway named `name`,
    /// whose WAN address then reaches every datacenter's route table. Unlike Consul, plain
    /// `service:write` is not enough: it takes `mesh:write` (or `operator:write`), or
    /// `service:write` granted by an exact `service` rule (not `service_prefix`) on a name in
    /// `allowed_names` (the agent's `-mesh-gateway-names`), which keeps the guide's gateway
    /// policy working while a `web` token can no longer announce a `web` gateway.
    pub fn mesh_gateway_write(&self, name: &str, allowed_names: &[String]) -> bool {
        self.mesh_write()
            || (allowed_names.iter().any(|allowed| allowed == name)
                && (self.management
                    || self
                        .rules
                        .exact_service_access(name)
                        .is_some_and(Access::allows_write)))
    }

    /// `service:read` on `name`.
    pub fn service_read(&self, name: &str) -> bool {
        self.level(self.rules.service_access(name)).allows_read()
    }

    /// `service:write` on `name`.
    pub fn service_write(&self, name: &str) -> bool {
        self.level(self.rules.service_access(name)).allows_write()
    }

    /// `node:read` on `name`.
    pub fn node_read(&self, name: &str) -> bool {
        self.level(self.rules.node_access(name)).allows_read()
    }

    /// `intentions:read` on destination `name`.
    pub fn intention_read(&self, name: &str) -> bool {
        self.level(self.rules.intentions_access(name)).allows_read()
    }

    /// `intentions:write` on destination `name`.
    pub fn intention_write(&self, name: &str) -> bool {
        self.level(self.rules.intentions_access(name))
            .allows_write()
    }
}

/// Checks a permission, producing Consul's 403 message when it is missing.
pub fn require(allowed: bool, what: impl FnOnce() -> String) -> Result<()> {
    if allowed {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!(
            "token lacks permission '{}'",
            what()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(policies: &[&str], identities: &[&str]) -> Token {
        Token {
            accessor_id: "a".into(),
            secret_id: "s".into(),
            description: String::new(),
            policies: policies
                .iter()
                .map(|id| PolicyLink {
                    id: (*id).into(),
                    name: String::new(),
                })
                .collect(),
            service_identities: identities
                .iter()
                .map(|s| ServiceIdentity {
                    service_name: (*s).into(),
                    datacenters: vec![],
                })
                .collect(),
            local: false,
            create_time: String::new(),
            create_index: 0,
            modify_index: 0,
        }
    }

    fn policy(id: &str, rules: &str) -> Policy {
        Policy {
            id: id.into(),
            name: id.into(),
            description: String::new(),
            rules: rules.into(),
            datacenters: vec![],
            create_index: 0,
            modify_index: 0,
        }
    }

    #[test]
    fn default_deny_and_allow() {
        let anonymous = token(&[], &[]);
        let deny =
            Authorizer::for_token(&anonymous, &[], "dc1", DefaultPolicy::Deny).expect("resolve");
        assert!(!deny.service_read("web") && !deny.operator_write() && !deny.acl_read());
        let allow =
            Authorizer::for_token(&anonymous, &[], "dc1", DefaultPolicy::Allow).expect("resolve");
        assert!(
            allow.service_write("web") && allow.operator_write() && allow.intention_write("web")
        );
        assert!(
            !allow.acl_read(),
            "ACL management needs a management token even with default allow"
        );
    }

    #[test]
    fn gateway_policy_limits() {
        let p = policy(
            "p",
            r#"{"node_prefix":{"":{"policy":"read"}}} {"service_prefix":{"":{"policy":"read"}}} {"service":{"mesh-gateway":{"policy":"write"}}}"#,
        );
        let auth = Authorizer::for_token(&token(&["p"], &[]), &[p], "dc1", DefaultPolicy::Deny)
            .expect("resolve");
        assert!(auth.service_write("mesh-gateway"));
        assert!(auth.service_read("socat") && !auth.service_write("socat"));
        assert!(auth.node_read("n1"));
        assert!(auth.intention_read("socat") && !auth.intention_write("socat"));
        assert!(!auth.operator_write() && !auth.acl_read());
    }

    #[test]
    fn mesh_gateway_write_matrix() {
        let allowed = vec!["mesh-gateway".to_owned()];
        let resolve = |rules: &str, default: DefaultPolicy| {
            Authorizer::for_token(&token(&["p"], &[]), &[policy("p", rules)], "dc1", default)
                .expect("resolve")
        };
        let guide = resolve(
            r#"{"service_prefix":{"":{"policy":"read"}}} {"service":{"mesh-gateway":{"policy":"write"}}}"#,
            DefaultPolicy::Deny,
        );
        assert!(guide.mesh_gateway_write("mesh-gateway", &allowed));
        assert!(!guide.mesh_gateway_write("gateway-primary", &allowed));
        let web = resolve(r#"service "web" { policy = "write" }"#, DefaultPolicy::Deny);
        assert!(web.service_write("web") && !web.mesh_gateway_write("web", &allowed));
        let prefix = resolve(
            r#"service_prefix "" { policy = "write" }"#,
            DefaultPolicy::Deny,
        );
        assert!(!prefix.mesh_gateway_write("mesh-gateway", &allowed));
        assert!(!prefix.mesh_gateway_write("other", &allowed));
        for rules in [r#"mesh = "write""#, r#"operator = "write""#] {
            let auth = resolve(rules, DefaultPolicy::Deny);
            assert!(auth.mesh_gateway_write("any-name", &allowed), "{rules}");
        }
        let denied = resolve(
            r#"operator = "write" mesh = "read" service "mesh-gateway" { policy = "deny" }"#,
            DefaultPolicy::Allow,
        );
        assert!(!denied.mesh_gateway_write("mesh-gateway", &allowed));
        let identity = Authorizer::for_token(
            &token(&[], &["mesh-gateway"]),
            &[],
            "dc1",
            DefaultPolicy::Deny,
        )
        .expect("resolve");
        assert!(identity.mesh_gateway_write("mesh-gateway", &allowed));
        assert!(Authorizer::management().mesh_gateway_write("x", &allowed));
    }

    #[test]
    fn service_identity_grants_sidecar() {
        let auth = Authorizer::for_token(&token(&[], &["web"]), &[], "dc1", DefaultPolicy::Deny)
            .expect("resolve");
        assert!(auth.service_write("web") && auth.service_write("web-sidecar-proxy"));
        assert!(!auth.service_write("socat") && auth.service_read("socat"));
    }

    #[test]
    fn management_and_datacenter_scoping() {
        let management = policy(MANAGEMENT_POLICY_ID, "");
        let auth = Authorizer::for_token(
            &token(&[MANAGEMENT_POLICY_ID], &[]),
            &[management],
            "dc1",
            DefaultPolicy::Deny,
        )
        .expect("resolve");
        assert!(auth.acl_write() && auth.operator_write() && auth.service_write("x"));
        let mut scoped = policy("s", r#"operator = "write""#);
        scoped.datacenters = vec!["dc2".into()];
        let auth =
            Authorizer::for_token(&token(&["s"], &[]), &[scoped], "dc1", DefaultPolicy::Deny)
                .expect("resolve");
        assert!(!auth.operator_write());
    }
}
