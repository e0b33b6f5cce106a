//! The CA configuration (`/v1/connect/ca/configuration`), sans-IO: what is stored, and how a
//! `PUT` body is read and checked.
//!
//! Consul's built-in provider takes `LeafCertTTL` (default 72h, 1h to 8760h) and, to replace
//! the root, `PrivateKey` with an optional `RootCert`. A `PUT` replaces the whole
//! configuration, as in Consul: a missing `LeafCertTTL` goes back to 72h, and a missing
//! `PrivateKey` after a supplied one means "generate a new key" (a rotation).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{INTERMEDIATE_TTL, LEAF_TTL, MAX_LEAF_TTL, ROOT_TTL};
use crate::error::{Error, Result};

/// The `system` table key of this datacenter's [`CaSettings`] (local to the datacenter, as
/// Consul's CA configuration is: a secondary has its own leaf TTL).
pub const CA_SETTINGS_KEY: &str = "ca_config";

/// Consul's smallest `LeafCertTTL` (its `MinLeafCertTTL`). The agent's `-ca-leaf-ttl-min`
/// lowers it, for tests that watch renewals happen.
pub const MIN_LEAF_TTL: Duration = Duration::from_secs(3600);

/// The stored CA configuration of this datacenter.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct CaSettings {
    /// The lifetime of leaves signed without an explicit `TTL`.
    pub leaf_cert_ttl_seconds: u64,
    /// Whether the active root was made from an operator's `PrivateKey` (so that a later
    /// configuration without one rotates to a generated key, as Consul does).
    #[serde(default)]
    pub root_supplied: bool,
    /// Index of creation.
    pub create_index: u64,
    /// Index of the last change.
    pub modify_index: u64,
}

impl Default for CaSettings {
    fn default() -> CaSettings {
        CaSettings {
            leaf_cert_ttl_seconds: LEAF_TTL.as_secs(),
            root_supplied: false,
            create_index: 0,
            modify_index: 0,
        }
    }
}

impl CaSettings {
    /// The leaf lifetime.
    pub fn leaf_ttl(&self) -> Duration {
        Duration::from_secs(self.leaf_cert_ttl_seconds)
    }
}

/// A root an operator supplied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuppliedRoot {
    /// PKCS#8 PEM of a P-256 key.
    pub private_key_pem: String,
    /// The root certificate for that key; generated when absent.
    pub root_cert_pem: Option<String>,
}

/// A checked `PUT /v1/connect/ca/configuration` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigUpdate {
    /// The new leaf lifetime.
    pub leaf_cert_ttl: Duration,
    /// `PrivateKey` (and `RootCert`), if given.
    pub root: Option<SuppliedRoot>,
}

/// Top-level fields of the body. `ClusterID`, `State` and the indexes come back when a client
/// edits what `GET` returned; they are accepted and not applied (`ClusterID` must match).
const TOP_LEVEL: [&str; 7] = [
    "Provider",
    "Config",
    "ForceWithoutCrossSigning",
    "ClusterID",
    "State",
    "CreateIndex",
    "ModifyIndex",
];

/// Reads a `PUT` body (keys already normalised to PascalCase, except inside `Config`, whose
/// keys Consul matches case-insensitively and also takes in snake_case). `min_leaf_ttl` is
/// [`MIN_LEAF_TTL`] unless the agent lowered it; `cluster_id` is this CA's.
pub fn parse_update(
    body: &Value,
    min_leaf_ttl: Duration,
    cluster_id: &str,
) -> Result<ConfigUpdate> {
    let object = body
        .as_object()
        .ok_or_else(|| Error::bad_request("request body must be a JSON object"))?;
    if let Some(unknown) = object.keys().find(|k| !TOP_LEVEL.contains(&k.as_str())) {
        return Err(Error::bad_request(format!(
            "unknown field `{unknown}` (expected Provider, Config, ForceWithoutCrossSigning)"
        )));
    }
    match object.get("Provider").and_then(Value::as_str) {
        Some("consul") => {}
        Some(other) => {
            return Err(Error::bad_request(format!(
                "invalid field `Provider` {other:?}: only the built-in \"consul\" provider is supported"
            )))
        }
        None => return Err(Error::bad_request("missing field `Provider` (\"consul\")")),
    }
    if let Some(given) = object.get("ClusterID").and_then(Value::as_str) {
        if !given.is_empty() && !given.eq_ignore_ascii_case(cluster_id) {
            return Err(Error::bad_request(format!(
                "invalid field `ClusterID` {given:?}: this CA's cluster is {cluster_id:?} and cannot change"
            )));
        }
    }
    if let Some(force) = object.get("ForceWithoutCrossSigning") {
        if !force.is_boolean() {
            return Err(Error::bad_request(
                "invalid field `ForceWithoutCrossSigning`: must be a boolean",
            ));
        }
    }
    let empty = serde_json::Map::new();
    let config = match object.get("Config") {
        None => &empty,
        Some(Value::Object(config)) => config,
        Some(_) => {
            return Err(Error::bad_request(
                "invalid field `Config`: must be an object",
            ))
        }
    };
    let mut update = ConfigUpdate {
        leaf_cert_ttl: LEAF_TTL,
        root: None,
    };
    let (mut private_key, mut root_cert) = (None, None);
    for (key, value) in config {
        let field = format!("Config.{key}");
        match key.to_ascii_lowercase().replace('_', "").as_str() {
            "leafcertttl" => {
                let ttl = duration(value, &field)?;
                if ttl < min_leaf_ttl || ttl > MAX_LEAF_TTL {
                    return Err(Error::bad_request(format!(
                        "invalid field `{field}` {}: must be between {} and {}",
                        format_duration(ttl),
                        format_duration(min_leaf_ttl),
                        format_duration(MAX_LEAF_TTL)
                    )));
                }
                update.leaf_cert_ttl = ttl;
            }
            "privatekey" => private_key = text(value, &field)?,
            "rootcert" => root_cert = text(value, &field)?,
            "privatekeytype" => {
                if text(value, &field)?.is_some_and(|t| t != "ec") {
                    return Err(Error::bad_request(format!(
                        "invalid field `{field}`: only \"ec\" (P-256) keys are supported"
                    )));
                }
            }
            "privatekeybits" => {
                let bits = match value {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => s.parse().ok(),
                    _ => None,
                };
                if bits != Some(256) {
                    return Err(Error::bad_request(format!(
                        "invalid field `{field}`: only 256 (P-256) is supported"
                    )));
                }
            }
            "intermediatecertttl" => fixed(value, &field, INTERMEDIATE_TTL)?,
            "rootcertttl" => fixed(value, &field, ROOT_TTL)?,
            _ => {
                return Err(Error::bad_request(format!(
                    "unsupported field `{field}` (supported: LeafCertTTL, PrivateKey, RootCert, PrivateKeyType, PrivateKeyBits, IntermediateCertTTL, RootCertTTL)"
                )))
            }
        }
    }
    update.root = match (private_key, root_cert) {
        (Some(private_key_pem), root_cert_pem) => Some(SuppliedRoot {
            private_key_pem,
            root_cert_pem,
        }),
        (None, Some(_)) => {
            return Err(Error::bad_request(
                "invalid field `Config.RootCert`: needs `Config.PrivateKey`, the root's key",
            ))
        }
        (None, None) => None,
    };
    Ok(update)
}

/// A non-empty string field (`""` reads as absent, as in Consul).
fn text(value: &Value, field: &str) -> Result<Option<String>> {
    match value {
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(Error::bad_request(format!(
            "invalid field `{field}`: must be a string"
        ))),
    }
}

/// A Go duration string (`"72h"`, `"90m"`).
fn duration(value: &Value, field: &str) -> Result<Duration> {
    let text = value.as_str().ok_or_else(|| {
        Error::bad_request(format!(
            "invalid field `{field}`: must be a duration string such as \"72h\""
        ))
    })?;
    crate::blocking::parse_duration(text)
        .map_err(|e| Error::bad_request(format!("invalid field `{field}` {text:?}: {e}")))
}

/// A setting this CA does not let change: accepted only at its fixed value.
fn fixed(value: &Value, field: &str, ours: Duration) -> Result<()> {
    // Compared as text first: the shared duration parser stops at a year, and the root's
    // ten years are past that.
    if value.as_str() == Some(format_duration(ours).as_str()) || duration(value, field)? == ours {
        Ok(())
    } else {
        Err(Error::bad_request(format!(
            "invalid field `{field}`: fixed at {} in controlplane-lite",
            format_duration(ours)
        )))
    }
}

/// Formats a duration the way Go's parser reads it, shortest first: `72h`, `1h30m`, `20s`.
pub fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if seconds == 0 {
        return "0s".to_owned();
    }
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    let mut out = String::new();
    for (value, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if value > 0 {
            out.push_str(&format!("{value}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CLUSTER: &str = "11111111-2222-3333-4444-555555555555";

    fn parse(body: Value) -> Result<ConfigUpdate> {
        parse_update(&body, MIN_LEAF_TTL, CLUSTER)
    }

    #[test]
    fn leaf_ttl_is_bounded_like_consul() {
        let ok =
            parse(json!({"Provider": "consul", "Config": {"LeafCertTTL": "24h"}})).expect("24h");
        assert_eq!(ok.leaf_cert_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(ok.root, None);
        let snake = parse(json!({"Provider": "consul", "Config": {"leaf_cert_ttl": "2h"}}))
            .expect("snake_case");
        assert_eq!(snake.leaf_cert_ttl, Duration::from_secs(7200));
        for bad in ["30m", "8761h", "soon", ""] {
            let err = parse(json!({"Provider": "consul", "Config": {"LeafCertTTL": bad}}))
                .expect_err(bad);
            assert_eq!(err.status(), 400);
            assert!(err.to_string().contains("Config.LeafCertTTL"), "{err}");
        }
        let err = parse(json!({"Provider": "consul", "Config": {"LeafCertTTL": "30m"}}))
            .expect_err("short");
        assert!(err.to_string().contains("between 1h and 8760h"), "{err}");
        // The agent's test-only floor admits shorter leaves.
        let short = parse_update(
            &json!({"Provider": "consul", "Config": {"LeafCertTTL": "20s"}}),
            Duration::from_secs(10),
            CLUSTER,
        )
        .expect("lowered floor");
        assert_eq!(short.leaf_cert_ttl, Duration::from_secs(20));
        // Missing means Consul's default, as a PUT replaces the whole configuration.
        let default = parse(json!({"Provider": "consul"})).expect("default");
        assert_eq!(default.leaf_cert_ttl, LEAF_TTL);
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let cases = [
            (json!({"Config": {}}), "Provider"),
            (json!({"Provider": "vault"}), "Provider"),
            (json!({"Provider": "consul", "Bogus": 1}), "Bogus"),
            (
                json!({"Provider": "consul", "ClusterID": "other"}),
                "ClusterID",
            ),
            (
                json!({"Provider": "consul", "Config": {"PrivateKeyType": "rsa"}}),
                "PrivateKeyType",
            ),
            (
                json!({"Provider": "consul", "Config": {"PrivateKeyBits": 384}}),
                "PrivateKeyBits",
            ),
            (
                json!({"Provider": "consul", "Config": {"RotationPeriod": "2160h"}}),
                "RotationPeriod",
            ),
            (
                json!({"Provider": "consul", "Config": {"RootCertTTL": "1h"}}),
                "RootCertTTL",
            ),
            (
                json!({"Provider": "consul", "Config": {"RootCert": "x"}}),
                "PrivateKey",
            ),
            (
                json!({"Provider": "consul", "Config": {"LeafCertTTL": 3600}}),
                "LeafCertTTL",
            ),
        ];
        for (body, field) in cases {
            let err = parse(body.clone()).expect_err(&body.to_string());
            assert_eq!(err.status(), 400);
            assert!(err.to_string().contains(field), "{body}: {err}");
        }
        // What GET shows goes back unchanged.
        let round_trip = parse(json!({"Provider": "consul", "ClusterID": CLUSTER,
            "Config": {"LeafCertTTL": "72h", "PrivateKeyType": "ec", "PrivateKeyBits": 256,
                "IntermediateCertTTL": "8760h", "RootCertTTL": "87600h"},
            "State": null, "ForceWithoutCrossSigning": false, "CreateIndex": 1, "ModifyIndex": 1}));
        assert_eq!(round_trip.expect("round trip").leaf_cert_ttl, LEAF_TTL);
        let key =
            parse(json!({"Provider": "consul", "Config": {"PrivateKey": "PEM"}})).expect("key");
        assert_eq!(
            key.root,
            Some(SuppliedRoot {
                private_key_pem: "PEM".to_owned(),
                root_cert_pem: None
            })
        );
    }

    #[test]
    fn durations_format_as_go_reads_them() {
        assert_eq!(format_duration(LEAF_TTL), "72h");
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(20)), "20s");
        assert_eq!(format_duration(ROOT_TTL), "87600h");
    }
}
