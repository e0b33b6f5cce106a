//! What each control-plane fuzz target checks, beyond "no panic". Every parser here reads
//! untrusted input (an HTTP body, a file given to the CLI, a CSR from a client), and each check
//! asserts what the rest of the agent relies on:
//! - ACL rules: whatever parses, written back as JSON and as HCL, parses to the same rules, and
//!   merging a rule set with itself changes nothing (policies merge by `deny` over `write`);
//! - config entries, registrations, intentions, checks: whatever is accepted survives the
//!   store's JSON round trip unchanged (what is read back is what was acknowledged);
//! - CSRs: a signed leaf carries exactly the expected SPIFFE ID and is never a CA, whatever the
//!   request asked for;
//! - snapshots: whatever decodes re-encodes to a file that decodes to the same snapshot.
//!
//! The fuzz targets (`fuzz_targets/*.rs`) call these functions, and so does the replay test
//! `controlplane-lite/tests/fuzz_corpus.rs` (through `#[path]`) for every corpus file, so a
//! crasher kept in `corpus/` stays a regression test under plain `cargo test`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::OnceLock;

use controlplane_lite::acl::{hcl, json, Access, Rules};
use controlplane_lite::ca::{self, GeneratedRoot};
use controlplane_lite::casing::normalize;
use controlplane_lite::catalog::{
    from_value, parse_definitions, plan_registration, ServiceInstance,
};
use controlplane_lite::checks::{CheckDefinition, CheckTarget, HealthCheck};
use controlplane_lite::config_entries::ConfigEntry;
use controlplane_lite::http::json_body;
use controlplane_lite::intentions::IntentionRequest;
use controlplane_lite::snapshot;
use mesh_model::intention::Intention;
use mesh_model::spiffe::SpiffeId;
use serde_json::Value;

/// Inputs over this size are skipped: the HTTP layer bounds bodies long before, and the
/// fuzzer's time is better spent on shapes than on length.
const MAX_INPUT: usize = 64 * 1024;

fn text(data: &[u8]) -> Option<&str> {
    if data.len() > MAX_INPUT {
        return None;
    }
    std::str::from_utf8(data).ok()
}

fn body(data: &[u8]) -> Option<Value> {
    if data.len() > MAX_INPUT {
        return None;
    }
    json_body(data).ok()
}

fn access_word(access: Access) -> &'static str {
    match access {
        Access::Deny => "deny",
        Access::Read => "read",
        Access::Write => "write",
    }
}

/// The rules as one JSON document (Consul's JSON rule syntax).
pub fn rules_to_json(rules: &Rules) -> String {
    let mut out = serde_json::Map::new();
    if let Some(access) = rules.acl {
        out.insert("acl".into(), access_word(access).into());
    }
    if let Some(access) = rules.operator {
        out.insert("operator".into(), access_word(access).into());
    }
    for (key, map) in [
        ("service", &rules.service),
        ("service_prefix", &rules.service_prefix),
    ] {
        if map.is_empty() {
            continue;
        }
        let mut blocks = serde_json::Map::new();
        for (name, rule) in map {
            let mut block = serde_json::Map::new();
            if let Some(policy) = rule.policy {
                block.insert("policy".into(), access_word(policy).into());
            }
            if let Some(intentions) = rule.intentions {
                block.insert("intentions".into(), access_word(intentions).into());
            }
            blocks.insert(name.clone(), Value::Object(block));
        }
        out.insert(key.into(), Value::Object(blocks));
    }
    for (key, map) in [("node", &rules.node), ("node_prefix", &rules.node_prefix)] {
        if map.is_empty() {
            continue;
        }
        let mut blocks = serde_json::Map::new();
        for (name, policy) in map {
            blocks.insert(
                name.clone(),
                serde_json::json!({ "policy": access_word(*policy) }),
            );
        }
        out.insert(key.into(), Value::Object(blocks));
    }
    Value::Object(out).to_string()
}

fn hcl_string(value: &str) -> String {
    let mut out = String::from('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            other => out.push(other),
        }
    }
    out.push('"');
    out
}

/// The rules in HCL, one item per line.
pub fn rules_to_hcl(rules: &Rules) -> String {
    let mut out = String::new();
    if let Some(access) = rules.acl {
        out += &format!("acl = \"{}\"\n", access_word(access));
    }
    if let Some(access) = rules.operator {
        out += &format!("operator = \"{}\"\n", access_word(access));
    }
    for (key, map) in [
        ("service", &rules.service),
        ("service_prefix", &rules.service_prefix),
    ] {
        for (name, rule) in map {
            out += &format!("{key} {} {{", hcl_string(name));
            if let Some(policy) = rule.policy {
                out += &format!(" policy = \"{}\"", access_word(policy));
            }
            if let Some(intentions) = rule.intentions {
                out += &format!(" intentions = \"{}\"", access_word(intentions));
            }
            out += " }\n";
        }
    }
    for (key, map) in [("node", &rules.node), ("node_prefix", &rules.node_prefix)] {
        for (name, policy) in map {
            out += &format!(
                "{key} {} {{ policy = \"{}\" }}\n",
                hcl_string(name),
                access_word(*policy)
            );
        }
    }
    out
}

/// ACL rules, HCL or JSON (as `Rules::parse` picks).
pub fn acl_rules(data: &[u8]) {
    let Some(text) = text(data) else { return };
    // Both parsers see every input, not only the one `Rules::parse` would pick.
    let _ = hcl::parse(text);
    let _ = json::parse(text);
    let Ok(rules) = Rules::parse(text) else {
        return;
    };
    let as_json = rules_to_json(&rules);
    let reparsed = json::parse(&as_json)
        .unwrap_or_else(|e| panic!("rules written as JSON do not parse: {e}\n{as_json}"));
    assert_eq!(
        reparsed, rules,
        "JSON round trip changed the rules\n{as_json}"
    );
    let as_hcl = rules_to_hcl(&rules);
    // An empty rule set has no HCL text to parse back; HCL accepts the empty text.
    let reparsed = hcl::parse(&as_hcl)
        .unwrap_or_else(|e| panic!("rules written as HCL do not parse: {e}\n{as_hcl}"));
    assert_eq!(
        reparsed, rules,
        "HCL round trip changed the rules\n{as_hcl}"
    );
    let mut merged = rules.clone();
    merged.merge(&rules);
    assert_eq!(merged, rules, "merging rules with themselves changed them");
}

/// A config entry, as `PUT /v1/config` reads it.
pub fn config_entry(data: &[u8]) {
    let Some(value) = body(data) else { return };
    let Ok(entry) = ConfigEntry::parse(normalize(value)) else {
        return;
    };
    // The store keeps the serialised entry; reading it back must give the same entry.
    let stored = serde_json::to_vec(&entry).expect("serialise a config entry");
    let read: ConfigEntry = serde_json::from_slice(&stored).unwrap_or_else(|e| {
        panic!(
            "a stored config entry does not read back: {e}\n{}",
            String::from_utf8_lossy(&stored)
        )
    });
    assert_eq!(read.to_json(), entry.to_json(), "config entry round trip");
    assert_eq!(read.kind(), entry.kind());
    assert_eq!(read.name(), entry.name());
}

/// Service registrations, as `PUT /v1/agent/service/register` and `services register` read them.
pub fn registration(data: &[u8]) {
    let Some(value) = body(data) else { return };
    let Ok(definitions) = parse_definitions(value) else {
        return;
    };
    let taken = BTreeSet::from([21000]);
    for definition in definitions {
        // A port the definition names is used as given (as Consul does); only a port the
        // agent picks must be free.
        let asked_port = definition
            .connect
            .as_ref()
            .and_then(|c| c.sidecar_service.as_ref())
            .and_then(|s| s.port);
        let Ok(plan) = plan_registration(definition, |port| taken.contains(&port), None) else {
            continue;
        };
        let mut instances = vec![plan.service];
        if let Some(sidecar) = plan.sidecar {
            match asked_port {
                Some(port) => assert_eq!(sidecar.port, port, "the sidecar port asked for"),
                None => assert!(
                    !taken.contains(&sidecar.port),
                    "a new sidecar got a taken port {}",
                    sidecar.port
                ),
            }
            instances.push(sidecar);
        }
        for instance in instances {
            assert!(!instance.id.is_empty() && !instance.service.is_empty());
            let stored = serde_json::to_vec(&instance).expect("serialise an instance");
            let read: ServiceInstance = serde_json::from_slice(&stored).unwrap_or_else(|e| {
                panic!(
                    "a stored instance does not read back: {e}\n{}",
                    String::from_utf8_lossy(&stored)
                )
            });
            assert_eq!(read, instance, "service instance round trip");
        }
    }
}

/// An intention, as `POST /v1/connect/intentions` reads it.
pub fn intention(data: &[u8]) {
    let Some(value) = body(data) else { return };
    let Ok(request) = from_value::<IntentionRequest>(normalize(value), "intention") else {
        return;
    };
    let Ok(intention) = request.into_intention("id".into(), "2026-11-29T00:00:00Z") else {
        return;
    };
    let stored = serde_json::to_vec(&intention).expect("serialise an intention");
    let read: Intention = serde_json::from_slice(&stored).unwrap_or_else(|e| {
        panic!(
            "a stored intention does not read back: {e}\n{}",
            String::from_utf8_lossy(&stored)
        )
    });
    assert_eq!(read, intention, "intention round trip");
    assert!(!intention.source_name.is_empty() && !intention.destination_name.is_empty());
}

/// A health check definition, as `PUT /v1/agent/check/register` reads it.
pub fn check_definition(data: &[u8]) {
    let Some(value) = body(data) else { return };
    let Ok(definition) = CheckDefinition::parse(normalize(value)) else {
        return;
    };
    let tags = vec!["v1".to_owned()];
    let target = CheckTarget {
        id: "web",
        name: "web",
        tags: &tags,
    };
    let Ok(check) = definition.build("node", "service:web", Some(target), 1_000) else {
        return;
    };
    let stored = serde_json::to_vec(&check).expect("serialise a check");
    let read: HealthCheck = serde_json::from_slice(&stored).unwrap_or_else(|e| {
        panic!(
            "a stored check does not read back: {e}\n{}",
            String::from_utf8_lossy(&stored)
        )
    });
    assert_eq!(read, check, "check round trip");
}

fn root() -> &'static GeneratedRoot {
    static ROOT: OnceLock<GeneratedRoot> = OnceLock::new();
    ROOT.get_or_init(|| {
        ca::generate_root("11111111-2222-3333-4444-555555555555", now(), 1)
            .expect("generate a root")
    })
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(1_796_000_000).expect("a fixed time")
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(3).enumerate() {
        if i > 0 && i % 16 == 0 {
            out.push('\n');
        }
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A CSR from a client, as `POST /v1/agent/connect/ca/leaf`-style signing reads it: PEM text
/// as given, or raw DER (wrapped in PEM here, so the fuzzer mutates the ASN.1 itself).
pub fn csr(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let pem = match std::str::from_utf8(data) {
        Ok(text) if text.contains("-----BEGIN") => text.to_owned(),
        _ => format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64(data)
        ),
    };
    let generated = root();
    let trust_domain = "11111111-2222-3333-4444-555555555555.consul";
    let expected = SpiffeId::service(trust_domain, "dc1", "web");
    let Ok(leaf) = ca::sign_leaf(
        &generated.root,
        &generated.key,
        &pem,
        &expected,
        now(),
        std::time::Duration::from_secs(3600),
        [7; 16],
    ) else {
        return;
    };
    assert_eq!(leaf.service, "web");
    assert_eq!(leaf.service_uri, expected.to_string());
    let (_, der) = x509_parser::pem::parse_x509_pem(leaf.cert_pem.as_bytes()).expect("leaf PEM");
    let certificate = der.parse_x509().expect("leaf DER");
    let uris: Vec<String> = certificate
        .subject_alternative_name()
        .expect("SAN extension")
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri) => Ok(uri.to_string()),
                    other => Err(format!("{other:?}")),
                })
                .collect::<Result<Vec<_>, _>>()
                .expect("only URI SANs")
        })
        .unwrap_or_default();
    assert_eq!(uris, vec![expected.to_string()], "the leaf's SANs");
    assert!(!certificate.is_ca(), "a leaf signed from a CSR is a CA");
    assert_eq!(
        SpiffeId::parse(&uris[0]).as_ref(),
        Ok(&expected),
        "the leaf's URI parses back"
    );
}

/// A snapshot file, as `snapshot restore FILE` and `PUT /v1/snapshot` read it. The input is
/// tried as a whole file, and as a body behind a correct header (so the fuzzer reaches the
/// document past the checksum).
pub fn snapshot(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let mut candidates = vec![data.to_vec()];
    let digest: String = ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut framed = format!(
        "{} {} sha256={digest} length={}\n",
        snapshot::MAGIC,
        snapshot::VERSION,
        data.len()
    )
    .into_bytes();
    framed.extend_from_slice(data);
    candidates.push(framed);
    for file in candidates {
        let Ok(decoded) = snapshot::decode(&file) else {
            continue;
        };
        let encoded = snapshot::encode(&decoded).expect("re-encode a decoded snapshot");
        let again = snapshot::decode(&encoded).expect("decode a re-encoded snapshot");
        assert_eq!(again, decoded, "snapshot round trip");
    }
}
