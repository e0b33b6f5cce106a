//! Consul accepts request bodies in PascalCase (`DestinationName`) and snake_case
//! (`destination_name`), because Go's JSON decoder matches keys case-insensitively and the agent
//! translates snake_case keys. We normalise every key to PascalCase before deserialising into
//! strict (`deny_unknown_fields`) types, so the rest of the code sees one spelling.
//!
//! A key whose value is `null` is dropped: Go's decoder treats `null` as the zero value, so
//! clients (HashiCorp's own `api` package among them) send `"Datacenters": null` meaning
//! "none". Dropping it lets every `#[serde(default)]` field read null as absent.
//!
//! Opaque maps keep their keys untouched: `Meta` and `Config` (user data), and the keys of
//! `TaggedAddresses` (`lan`, `wan`) whose values are still normalised.

use serde_json::{Map, Value};

/// Words Consul spells in capitals inside PascalCase names.
const INITIALISMS: [(&str, &str); 10] = [
    ("id", "ID"),
    ("ttl", "TTL"),
    ("http", "HTTP"),
    ("tcp", "TCP"),
    ("grpc", "GRPC"),
    ("tls", "TLS"),
    ("sni", "SNI"),
    ("ns", "NS"),
    ("csr", "CSR"),
    ("uri", "URI"),
];

/// Multi-word keys, as Consul spells them. Go's decoder matches keys case-insensitively, so
/// clients also send `serviceid` or `enabletagoverride` (py-consul does); those are mapped
/// back through this list.
const MULTI_WORD: [&str; 44] = [
    "AccessorID",
    "AliasNode",
    "AliasService",
    "CheckID",
    "ClientCertURI",
    "CreateIndex",
    "CreateTime",
    "DeregisterCriticalServiceAfter",
    "DestinationName",
    "DestinationNamespace",
    "DestinationNS",
    "DestinationServiceID",
    "DestinationServiceName",
    "DestinationType",
    "DockerContainerID",
    "EnableTagOverride",
    "ExpirationTime",
    "ExpirationTTL",
    "ExternalSNI",
    "FailuresBeforeCritical",
    "FailuresBeforeWarning",
    "LocalBindAddress",
    "LocalBindPort",
    "LocalServiceAddress",
    "LocalServicePort",
    "MeshGateway",
    "ModifyIndex",
    "NodeIdentities",
    "NodeMeta",
    "ScriptArgs",
    "SecretID",
    "ServiceID",
    "ServiceIdentities",
    "ServiceName",
    "SidecarService",
    "SocketPath",
    "SourceName",
    "SourceNS",
    "SourceType",
    "SuccessBeforePassing",
    "TaggedAddresses",
    "TLSServerName",
    "TLSSkipVerify",
    "TemplatedPolicies",
];

/// Converts one key to PascalCase: `destination_name` → `DestinationName`, `id` → `ID`,
/// `serviceid` → `ServiceID`, `Name` stays `Name`.
pub fn pascal_case(key: &str) -> String {
    if !key.contains('_') {
        if let Some(known) = MULTI_WORD.iter().find(|k| k.eq_ignore_ascii_case(key)) {
            return (*known).to_owned();
        }
        if let Some((_, upper)) = INITIALISMS.iter().find(|(lower, _)| *lower == key) {
            return (*upper).to_owned();
        }
        let mut chars = key.chars();
        return match chars.next() {
            Some(first) => first.to_uppercase().chain(chars).collect(),
            None => String::new(),
        };
    }
    key.split('_')
        .map(
            |part| match INITIALISMS.iter().find(|(lower, _)| *lower == part) {
                Some((_, upper)) => (*upper).to_owned(),
                None => {
                    let mut chars = part.chars();
                    match chars.next() {
                        Some(first) => first.to_uppercase().chain(chars).collect(),
                        None => String::new(),
                    }
                }
            },
        )
        .collect()
}

/// Rewrites every object key below `value` to PascalCase, leaving opaque maps alone.
pub fn normalize(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::with_capacity(map.len());
            for (key, inner) in map {
                if inner.is_null() {
                    continue;
                }
                let key = pascal_case(&key);
                let inner = match key.as_str() {
                    "Meta" | "Config" | "NodeMeta" => inner,
                    "TaggedAddresses" => normalize_values(inner),
                    _ => normalize(inner),
                };
                out.insert(key, inner);
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(normalize).collect()),
        other => other,
    }
}

/// Keeps the keys of a map but normalises each value.
fn normalize_values(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, normalize(v))).collect())
        }
        other => normalize(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn snake_and_pascal_converge() {
        let snake = normalize(
            json!({"service": {"name": "web", "tagged_addresses": {"wan": {"address": "1.2.3.4"}},
            "meta": {"some_key": "v"}, "connect": {"sidecar_service": {"proxy": {"upstreams": [{"destination_name": "socat", "local_bind_port": 1}]}}}}}),
        );
        assert_eq!(
            snake,
            json!({"Service": {"Name": "web", "TaggedAddresses": {"wan": {"Address": "1.2.3.4"}},
                "Meta": {"some_key": "v"}, "Connect": {"SidecarService": {"Proxy": {"Upstreams": [{"DestinationName": "socat", "LocalBindPort": 1}]}}}}})
        );
        assert_eq!(
            pascal_case("destination_service_id"),
            "DestinationServiceID"
        );
        assert_eq!(pascal_case("id"), "ID");
        assert_eq!(pascal_case("serviceid"), "ServiceID");
        assert_eq!(pascal_case("enabletagoverride"), "EnableTagOverride");
        assert_eq!(
            normalize(json!({"Datacenters": null, "Meta": {"k": null}, "Name": "x"})),
            json!({"Meta": {"k": null}, "Name": "x"})
        );
        assert_eq!(pascal_case("ID"), "ID");
    }
}
