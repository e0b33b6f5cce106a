//! Config entries (`proxy-defaults`, `service-defaults`) and mesh-gateway mode resolution.
//!
//! Entries arrive as JSON in PascalCase or snake_case (see `casing`), are parsed into strict
//! types (unknown fields are rejected and named), and are stored in canonical form: a bare
//! `"MeshGateway": "local"` (the guide's spelling) is stored and returned as
//! `{"Mode": "local"}`.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::error::{Error, Result};

/// How a proxy reaches an upstream in another datacenter (Consul's `MeshGatewayMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MeshGatewayMode {
    /// Not set: defer to the next layer of configuration.
    #[default]
    Default,
    /// Dial the destination directly.
    None,
    /// Go through a gateway of the proxy's own datacenter.
    Local,
    /// Go through a gateway of the destination's datacenter.
    Remote,
}

impl MeshGatewayMode {
    /// Consul's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MeshGatewayMode::Default => "",
            MeshGatewayMode::None => "none",
            MeshGatewayMode::Local => "local",
            MeshGatewayMode::Remote => "remote",
        }
    }

    fn parse(value: &str) -> std::result::Result<MeshGatewayMode, String> {
        match value {
            "" | "default" => Ok(MeshGatewayMode::Default),
            "none" => Ok(MeshGatewayMode::None),
            "local" => Ok(MeshGatewayMode::Local),
            "remote" => Ok(MeshGatewayMode::Remote),
            other => Err(format!("invalid MeshGateway mode {other:?}: must be \"\", \"none\", \"local\" or \"remote\"")),
        }
    }
}

impl fmt::Display for MeshGatewayMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `MeshGateway` block: `{"Mode": "local"}`, or the bare string `"local"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshGatewayConfig {
    /// The mode.
    pub mode: MeshGatewayMode,
}

impl Serialize for MeshGatewayConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry("Mode", self.mode.as_str())?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for MeshGatewayConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::String(mode) => Ok(MeshGatewayConfig {
                mode: MeshGatewayMode::parse(&mode).map_err(de::Error::custom)?,
            }),
            Value::Object(map) => {
                let mut mode = MeshGatewayMode::Default;
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("Mode" | "mode", Value::String(text)) => {
                            mode = MeshGatewayMode::parse(&text).map_err(de::Error::custom)?
                        }
                        ("Mode" | "mode", _) => {
                            return Err(de::Error::custom("MeshGateway.Mode must be a string"))
                        }
                        (other, _) => {
                            return Err(de::Error::custom(format!(
                                "unknown field `MeshGateway.{other}`"
                            )))
                        }
                    }
                }
                Ok(MeshGatewayConfig { mode })
            }
            Value::Null => Ok(MeshGatewayConfig::default()),
            _ => Err(de::Error::custom(
                "MeshGateway must be a string or an object with Mode",
            )),
        }
    }
}

/// `proxy-defaults` (the only valid name is `global`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ProxyDefaults {
    /// Always `proxy-defaults`.
    pub kind: String,
    /// Always `global`.
    pub name: String,
    /// Opaque proxy configuration.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, Value>,
    /// Default mesh-gateway mode for every proxy.
    #[serde(default)]
    pub mesh_gateway: MeshGatewayConfig,
    /// Expose paths (stored, not acted on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose: Option<Value>,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// Raft index of creation.
    #[serde(default)]
    pub create_index: u64,
    /// Raft index of the last change.
    #[serde(default)]
    pub modify_index: u64,
    /// Namespace and partition, as Consul's `api` structs carry them; accepted and ignored
    /// (only the defaults exist here), never stored.
    #[serde(default, skip_serializing)]
    pub namespace: Option<serde::de::IgnoredAny>,
    /// See `namespace`.
    #[serde(default, skip_serializing)]
    pub partition: Option<serde::de::IgnoredAny>,
}

/// `service-defaults` for one service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ServiceDefaults {
    /// Always `service-defaults`.
    pub kind: String,
    /// The service name.
    pub name: String,
    /// `tcp`, `http`, `http2` or `grpc` (stored; the gateway is L4 only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    /// The service's mesh-gateway mode.
    #[serde(default)]
    pub mesh_gateway: MeshGatewayConfig,
    /// Expose paths (stored, not acted on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose: Option<Value>,
    /// An SNI to use instead of Consul's naming (stored; mode resolution honours it).
    #[serde(
        default,
        rename = "ExternalSNI",
        skip_serializing_if = "String::is_empty"
    )]
    pub external_sni: String,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// Raft index of creation.
    #[serde(default)]
    pub create_index: u64,
    /// Raft index of the last change.
    #[serde(default)]
    pub modify_index: u64,
    /// Namespace and partition, as Consul's `api` structs carry them; accepted and ignored
    /// (only the defaults exist here), never stored.
    #[serde(default, skip_serializing)]
    pub namespace: Option<serde::de::IgnoredAny>,
    /// See `namespace`.
    #[serde(default, skip_serializing)]
    pub partition: Option<serde::de::IgnoredAny>,
}

/// One config entry of a supported kind.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigEntry {
    /// `proxy-defaults/global`.
    ProxyDefaults(ProxyDefaults),
    /// `service-defaults/<service>`.
    ServiceDefaults(ServiceDefaults),
}

/// The supported kinds.
pub const KINDS: [&str; 2] = ["proxy-defaults", "service-defaults"];

impl ConfigEntry {
    /// Parses and validates an entry from a (normalised, PascalCase) JSON value.
    pub fn parse(value: Value) -> Result<ConfigEntry> {
        let kind = value
            .get("Kind")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::bad_request("config entry: missing field `Kind`"))?
            .to_owned();
        let fail = |e: serde_json::Error| Error::bad_request(format!("config entry {kind}: {e}"));
        let entry = match kind.as_str() {
            "proxy-defaults" => {
                let entry: ProxyDefaults = serde_json::from_value(value.clone()).map_err(fail)?;
                if entry.name != "global" {
                    return Err(Error::bad_request(format!(
                        "config entry proxy-defaults: field `Name` must be \"global\", not {:?}",
                        entry.name
                    )));
                }
                ConfigEntry::ProxyDefaults(entry)
            }
            "service-defaults" => {
                let entry: ServiceDefaults = serde_json::from_value(value.clone()).map_err(fail)?;
                crate::names::validate_name(&entry.name, "Name")?;
                if !matches!(
                    entry.protocol.as_str(),
                    "" | "tcp" | "http" | "http2" | "grpc"
                ) {
                    return Err(Error::bad_request(format!(
                        "config entry service-defaults: invalid field `Protocol` {:?}",
                        entry.protocol
                    )));
                }
                ConfigEntry::ServiceDefaults(entry)
            }
            other => {
                return Err(Error::bad_request(format!(
                    "config entry: unsupported field `Kind` {other:?} (supported: {})",
                    KINDS.join(", ")
                )))
            }
        };
        Ok(entry)
    }

    /// `proxy-defaults` or `service-defaults`.
    pub fn kind(&self) -> &str {
        match self {
            ConfigEntry::ProxyDefaults(_) => "proxy-defaults",
            ConfigEntry::ServiceDefaults(_) => "service-defaults",
        }
    }

    /// The entry's name.
    pub fn name(&self) -> &str {
        match self {
            ConfigEntry::ProxyDefaults(e) => &e.name,
            ConfigEntry::ServiceDefaults(e) => &e.name,
        }
    }

    /// The store key, `kind/name`.
    pub fn key(&self) -> String {
        entry_key(self.kind(), self.name())
    }

    /// Sets the raft indexes.
    pub fn set_indexes(&mut self, create: u64, modify: u64) {
        let (c, m) = match self {
            ConfigEntry::ProxyDefaults(e) => (&mut e.create_index, &mut e.modify_index),
            ConfigEntry::ServiceDefaults(e) => (&mut e.create_index, &mut e.modify_index),
        };
        *c = create;
        *m = modify;
    }

    /// The raft index of creation.
    pub fn create_index(&self) -> u64 {
        match self {
            ConfigEntry::ProxyDefaults(e) => e.create_index,
            ConfigEntry::ServiceDefaults(e) => e.create_index,
        }
    }

    /// The raft index of the last change.
    pub fn modify_index(&self) -> u64 {
        match self {
            ConfigEntry::ProxyDefaults(e) => e.modify_index,
            ConfigEntry::ServiceDefaults(e) => e.modify_index,
        }
    }

    /// The entry as JSON (Consul's output shape).
    pub fn to_json(&self) -> Value {
        let result = match self {
            ConfigEntry::ProxyDefaults(e) => serde_json::to_value(e),
            ConfigEntry::ServiceDefaults(e) => serde_json::to_value(e),
        };
        result.unwrap_or(Value::Null)
    }
}

impl Serialize for ConfigEntry {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ConfigEntry::ProxyDefaults(e) => e.serialize(serializer),
            ConfigEntry::ServiceDefaults(e) => e.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for ConfigEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        ConfigEntry::parse(value).map_err(de::Error::custom)
    }
}

/// The store key of an entry.
pub fn entry_key(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

/// The mesh-gateway settings that apply to one upstream of one proxy.
#[derive(Clone, Copy, Debug, Default)]
pub struct ModeInputs {
    /// The upstream definition's `MeshGateway`.
    pub upstream: MeshGatewayMode,
    /// The proxy registration's `Proxy.MeshGateway`.
    pub proxy: MeshGatewayMode,
    /// `service-defaults` of the proxy's own (source) service.
    pub source_service_defaults: MeshGatewayMode,
    /// `proxy-defaults/global`.
    pub proxy_defaults: MeshGatewayMode,
    /// `service-defaults` of the destination service.
    pub destination_service_defaults: MeshGatewayMode,
}

/// Resolves the mode for an upstream in `target_dc` of a proxy in `local_dc`.
///
/// Precedence (Consul 1.8, spec §3.3): upstream > proxy registration > source
/// `service-defaults` > `proxy-defaults`; the destination's `service-defaults` only when nothing
/// on the source side is set. A same-datacenter target never uses a gateway (Consul's chain
/// compiler forces the mode to "" there), and an unset mode means "direct".
pub fn resolve_mesh_gateway_mode(
    local_dc: &str,
    target_dc: &str,
    inputs: ModeInputs,
) -> MeshGatewayMode {
    if local_dc == target_dc {
        return MeshGatewayMode::None;
    }
    [
        inputs.upstream,
        inputs.proxy,
        inputs.source_service_defaults,
        inputs.proxy_defaults,
        inputs.destination_service_defaults,
    ]
    .into_iter()
    .find(|mode| *mode != MeshGatewayMode::Default)
    .unwrap_or(MeshGatewayMode::None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use MeshGatewayMode::*;

    #[test]
    fn bare_string_and_object_forms_are_equal() {
        let a = ConfigEntry::parse(
            json!({"Kind": "proxy-defaults", "Name": "global", "MeshGateway": "local"}),
        )
        .expect("a");
        let b = ConfigEntry::parse(
            json!({"Kind": "proxy-defaults", "Name": "global", "MeshGateway": {"Mode": "local"}}),
        )
        .expect("b");
        assert_eq!(a, b);
        assert_eq!(a.to_json()["MeshGateway"], json!({"Mode": "local"}));
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let err = ConfigEntry::parse(
            json!({"Kind": "proxy-defaults", "Name": "global", "MeshGatway": "local"}),
        )
        .expect_err("typo");
        assert!(err.to_string().contains("MeshGatway"), "{err}");
        let err = ConfigEntry::parse(
            json!({"Kind": "proxy-defaults", "Name": "global", "MeshGateway": "sideways"}),
        )
        .expect_err("mode");
        assert!(err.to_string().contains("sideways"), "{err}");
        let err = ConfigEntry::parse(json!({"Kind": "proxy-defaults", "Name": "other"}))
            .expect_err("name");
        assert!(err.to_string().contains("Name"), "{err}");
        let err =
            ConfigEntry::parse(json!({"Kind": "service-router", "Name": "x"})).expect_err("kind");
        assert!(err.to_string().contains("Kind"), "{err}");
        assert!(ConfigEntry::parse(json!({"Name": "x"})).is_err());
    }

    #[test]
    fn mode_precedence() {
        let all = ModeInputs {
            upstream: Remote,
            proxy: None,
            source_service_defaults: Local,
            proxy_defaults: None,
            destination_service_defaults: Local,
        };
        assert_eq!(resolve_mesh_gateway_mode("a", "b", all), Remote);
        assert_eq!(
            resolve_mesh_gateway_mode(
                "a",
                "b",
                ModeInputs {
                    upstream: Default,
                    ..all
                }
            ),
            None
        );
        assert_eq!(
            resolve_mesh_gateway_mode(
                "a",
                "b",
                ModeInputs {
                    upstream: Default,
                    proxy: Default,
                    ..all
                }
            ),
            Local
        );
        let only_global = ModeInputs {
            proxy_defaults: Local,
            destination_service_defaults: Remote,
            ..ModeInputs::default()
        };
        assert_eq!(resolve_mesh_gateway_mode("a", "b", only_global), Local);
        let only_destination = ModeInputs {
            destination_service_defaults: Remote,
            ..ModeInputs::default()
        };
        assert_eq!(
            resolve_mesh_gateway_mode("a", "b", only_destination),
            Remote
        );
        assert_eq!(
            resolve_mesh_gateway_mode("a", "b", ModeInputs::default()),
            None
        );
        // Same datacenter: never a gateway, whatever is configured.
        assert_eq!(resolve_mesh_gateway_mode("a", "a", all), None);
    }
}
