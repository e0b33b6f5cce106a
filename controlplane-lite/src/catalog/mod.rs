//! The service catalog: registration parsing, sidecar expansion and the stored instance type.
//!
//! Sans-IO: [`plan_registration`] (in `registration`) turns a definition plus the ports
//! already taken into the instances to store; the HTTP layer runs it inside a store
//! transaction.

mod registration;

pub use crate::names::validate_name;
pub use registration::{parse_definitions, plan_registration, RegistrationPlan};

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config_entries::MeshGatewayConfig;
use crate::error::{Error, Result};

/// The port range Consul assigns to sidecars that do not set one (`sidecar_min_port`,
/// `sidecar_max_port` defaults).
pub const SIDECAR_PORTS: std::ops::RangeInclusive<u16> = 21000..=21255;
/// Upstream listeners bind here unless told otherwise (Consul's default).
pub const DEFAULT_BIND_ADDRESS: &str = "127.0.0.1";

/// Service kinds we understand.
pub const KIND_TYPICAL: &str = "";
/// A Connect sidecar proxy.
pub const KIND_CONNECT_PROXY: &str = "connect-proxy";
/// A mesh gateway.
pub const KIND_MESH_GATEWAY: &str = "mesh-gateway";

/// An address and port (`TaggedAddresses` values).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ServiceAddress {
    /// IP or host name.
    #[serde(default)]
    pub address: String,
    /// Port; 0 means "the service's port".
    #[serde(default)]
    pub port: u16,
}

/// An upstream of a proxy.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Upstream {
    /// `service` (the default); prepared queries are not supported.
    #[serde(default)]
    pub destination_type: String,
    /// Always `default` in OSS.
    #[serde(default)]
    pub destination_namespace: String,
    /// The service to reach.
    #[serde(default)]
    pub destination_name: String,
    /// The datacenter of the service; empty means the proxy's own.
    #[serde(default)]
    pub datacenter: String,
    /// Where the local listener binds.
    #[serde(default)]
    pub local_bind_address: String,
    /// The local listener's port.
    #[serde(default)]
    pub local_bind_port: u16,
    /// Opaque configuration.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, Value>,
    /// Per-upstream mesh-gateway mode.
    #[serde(default)]
    pub mesh_gateway: MeshGatewayConfig,
}

/// The `Proxy` block of a connect-proxy or gateway.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Proxy {
    /// The service this proxy fronts.
    #[serde(default)]
    pub destination_service_name: String,
    /// The instance this proxy fronts.
    #[serde(default, rename = "DestinationServiceID")]
    pub destination_service_id: String,
    /// Where the proxied application listens.
    #[serde(default)]
    pub local_service_address: String,
    /// The application's port.
    #[serde(default)]
    pub local_service_port: u16,
    /// Opaque configuration.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, Value>,
    /// Upstreams.
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// The proxy's mesh-gateway mode.
    #[serde(default)]
    pub mesh_gateway: MeshGatewayConfig,
    /// Expose paths (stored, not acted on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose: Option<Value>,
}

/// The `Connect` block of a registration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ConnectDefinition {
    /// The service speaks Connect itself (no sidecar).
    #[serde(default)]
    pub native: bool,
    /// Register a sidecar proxy with these overrides.
    #[serde(default)]
    pub sidecar_service: Option<Box<ServiceDefinition>>,
}

/// `Weights` of a service.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Weights {
    /// Weight while passing.
    pub passing: u32,
    /// Weight while warning.
    pub warning: u32,
}

impl Default for Weights {
    fn default() -> Weights {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

/// A service definition as a client sends it (API body or the `service` block of a file).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ServiceDefinition {
    /// Instance ID; defaults to the name.
    #[serde(default, rename = "ID")]
    pub id: Option<String>,
    /// Service name.
    #[serde(default)]
    pub name: Option<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Service address; empty means the node's.
    #[serde(default)]
    pub address: Option<String>,
    /// `lan` / `wan` addresses.
    #[serde(default)]
    pub tagged_addresses: BTreeMap<String, ServiceAddress>,
    /// Metadata.
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
    /// Port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Kind: "", `connect-proxy` or `mesh-gateway`.
    #[serde(default)]
    pub kind: String,
    /// Proxy configuration (proxies and gateways).
    #[serde(default)]
    pub proxy: Option<Proxy>,
    /// Connect settings.
    #[serde(default)]
    pub connect: Option<ConnectDefinition>,
    /// A health check definition (run by the agent; see `checks.rs`).
    #[serde(default)]
    pub check: Option<Value>,
    /// Health check definitions (as `check`).
    #[serde(default)]
    pub checks: Option<Vec<Value>>,
    /// Tag override flag.
    #[serde(default)]
    pub enable_tag_override: bool,
    /// Weights.
    #[serde(default)]
    pub weights: Option<Weights>,
    /// The service's own ACL token (anti-entropy in Consul). Accepted and deliberately not
    /// stored: the catalog is readable with `service:read` and must not hold secrets.
    #[serde(default)]
    pub token: Option<String>,
    /// Namespace: only `default` exists in this OSS-shaped control plane.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Admin partition (Consul Enterprise); accepted as `api.AgentServiceRegistration`
    /// carries it, and ignored: only the default partition exists here.
    #[serde(default)]
    pub partition: Option<serde::de::IgnoredAny>,
    /// Locality (region/zone) from `api.AgentServiceRegistration`; accepted and ignored.
    #[serde(default)]
    pub locality: Option<serde::de::IgnoredAny>,
    /// Unix socket path; accepted and ignored (services are dialled over TCP only).
    #[serde(default)]
    pub socket_path: Option<serde::de::IgnoredAny>,
}

/// `Connect` as stored and shown.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ConnectInfo {
    /// Connect-native service.
    #[serde(default)]
    pub native: bool,
}

/// A registered service instance (stored in the `services` table, keyed by ID).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceInstance {
    /// Kind.
    pub kind: String,
    /// Instance ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    pub service: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Address ("" = node address).
    pub address: String,
    /// Tagged addresses.
    pub tagged_addresses: BTreeMap<String, ServiceAddress>,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// Port.
    pub port: u16,
    /// Weights.
    pub weights: Weights,
    /// Tag override flag.
    pub enable_tag_override: bool,
    /// Proxy block (proxies and gateways).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<Proxy>,
    /// Connect block.
    pub connect: ConnectInfo,
    /// Raft index of creation.
    pub create_index: u64,
    /// Raft index of the last change.
    pub modify_index: u64,
}

impl ServiceInstance {
    /// Whether this instance carries Connect traffic for `service` (a sidecar for it, or the
    /// service itself when Connect-native): what `/v1/health/connect/:service` returns.
    pub fn is_connect_endpoint_for(&self, service: &str) -> bool {
        match self.kind.as_str() {
            KIND_CONNECT_PROXY => self
                .proxy
                .as_ref()
                .is_some_and(|p| p.destination_service_name == service),
            KIND_TYPICAL => self.connect.native && self.service == service,
            _ => false,
        }
    }

    /// The address to dial from this datacenter (LAN): the service address, else the node's.
    pub fn lan_address(&self, node_address: &str) -> String {
        let host = if self.address.is_empty() {
            node_address
        } else {
            &self.address
        };
        join_host_port(host, self.port)
    }

    /// The address to dial from another datacenter: the `wan` tagged address (its port if set),
    /// else the LAN address (Consul's `BestAddress(wan=true)`).
    pub fn wan_address(&self, node_address: &str) -> String {
        match self.tagged_addresses.get("wan") {
            Some(wan) if !wan.address.is_empty() => join_host_port(
                &wan.address,
                if wan.port == 0 { self.port } else { wan.port },
            ),
            _ => self.lan_address(node_address),
        }
    }
}

/// `host:port`, with brackets for IPv6 literals.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Checks an instance ID (a path segment in the deregister URL).
pub(crate) fn validate_id(id: &str, field: &str) -> Result<()> {
    let valid = !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if valid {
        Ok(())
    } else {
        Err(Error::bad_request(format!(
            "invalid field `{field}` {id:?}: must be 1-256 characters of letters, digits, '-', '_', '.' or ':'"
        )))
    }
}

/// Deserialises a normalised JSON value, naming the path of the offending field on error.
pub fn from_value<T: DeserializeOwned>(value: Value, what: &str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            Error::bad_request(format!("{what}: {}", e.inner()))
        } else {
            Error::bad_request(format!("{what}: field `{path}`: {}", e.inner()))
        }
    })
}
