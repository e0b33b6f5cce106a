//! The Connect CA: roots in Consul's shape, leaf signing from a CSR, chains verified with
//! rustls-webpki including the SPIFFE URI.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{csr, field, Agent, TempDir};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::json;
use webpki::{anchor_from_trusted_cert, EndEntityCert, KeyUsage};

fn der(pem_text: &str) -> Vec<u8> {
    let body: String = pem_text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    decode_base64(&body)
}

/// A small base64 decoder so the tests need no extra crate.
fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 {c}"),
    };
    let bytes: Vec<u8> = text.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= u32::from(value(*c)) << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    out
}

#[test]
fn leaf_chain_and_spiffe_id_verify_with_webpki() {
    let dir = TempDir::new("ca");
    let agent = Agent::start_in(dir.path(), "primary", &["-acl-default-policy", "deny"]);
    let management = agent.bootstrap();

    let roots = agent.get("/v1/connect/ca/roots", None);
    assert!(roots.index.is_some_and(|i| i > 0));
    let roots = roots.json();
    let td = roots["TrustDomain"].as_str().expect("td").to_owned();
    assert!(
        td.ends_with(".consul") && td.len() == 36 + ".consul".len(),
        "{td}"
    );
    let root = &roots["Roots"][0];
    assert_eq!(roots["ActiveRootID"], root["ID"]);
    assert_eq!(
        (
            root["Active"].as_bool(),
            root["PrivateKeyType"].as_str(),
            root["PrivateKeyBits"].as_u64()
        ),
        (Some(true), Some("ec"), Some(256))
    );
    assert_eq!(
        root["ID"].as_str().expect("id").len(),
        20 * 3 - 1,
        "colon-hex SHA-1"
    );
    let root_der = der(root["RootCert"].as_str().expect("pem"));

    // The root: a CA with the trust domain as its only URI SAN, ten years, no name constraints.
    let root_cert = x509_parser::parse_x509_certificate(&root_der)
        .expect("parse root")
        .1;
    assert!(root_cert.is_ca());
    let validity = root_cert.validity();
    let years =
        (validity.not_after.timestamp() - validity.not_before.timestamp()) / (365 * 24 * 3600);
    assert_eq!(years, 10);
    assert!(root_cert.name_constraints().expect("ext").is_none());
    let root_certificate = CertificateDer::from(root_der.as_slice());
    let root_end = webpki::EndEntityCert::try_from(&root_certificate).expect("root as cert");
    assert_eq!(
        root_end.valid_uri_names().collect::<Vec<_>>(),
        [format!("spiffe://{td}").as_str()]
    );

    // A service-identity token for socat signs socat's CSR.
    let out = agent.cli_ok(
        &[
            "acl",
            "token",
            "create",
            "-description",
            "socat",
            "-service-identity",
            "socat",
        ],
        Some(&management),
    );
    let socat_token = field(&out, "SecretID:");
    let spiffe = format!("spiffe://{td}/ns/default/dc/primary/svc/socat");
    let body = json!({"Service": "socat", "CSR": csr(&spiffe)}).to_string();
    let answer = agent.request(
        "POST",
        "/v1/connect/ca/leaf/sign",
        Some(&socat_token),
        Some(&body),
    );
    assert_eq!(answer.status, 200, "{}", answer.text);
    let leaf = answer.json();
    assert_eq!(leaf["ServiceURI"], spiffe);
    let leaf_der = der(leaf["CertPEM"].as_str().expect("pem"));

    let anchor = anchor_from_trusted_cert(&root_certificate).expect("anchor");
    let leaf_certificate = CertificateDer::from(leaf_der.as_slice());
    let end_entity = EndEntityCert::try_from(&leaf_certificate).expect("leaf");
    let now =
        UnixTime::since_unix_epoch(SystemTime::now().duration_since(UNIX_EPOCH).expect("clock"));
    for usage in [KeyUsage::client_auth(), KeyUsage::server_auth()] {
        end_entity
            .verify_for_usage(
                &[webpki::ring::ECDSA_P256_SHA256],
                std::slice::from_ref(&anchor),
                &[],
                now,
                usage,
                None,
                None,
            )
            .expect("leaf chains to the root");
    }
    assert_eq!(
        end_entity.valid_uri_names().collect::<Vec<_>>(),
        [spiffe.as_str()]
    );
    // 72 hours (the leaf is backdated a minute for clock skew).
    let parsed = x509_parser::parse_x509_certificate(&leaf_der)
        .expect("parse leaf")
        .1;
    let lifetime =
        parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp();
    assert_eq!(lifetime, 72 * 3600);
    assert!(!parsed.is_ca());
    // Expired after 72h + a bit: webpki must refuse it.
    let later = UnixTime::since_unix_epoch(
        SystemTime::now().duration_since(UNIX_EPOCH).expect("clock")
            + Duration::from_secs(73 * 3600),
    );
    assert!(end_entity
        .verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            &[anchor],
            &[],
            later,
            KeyUsage::client_auth(),
            None,
            None
        )
        .is_err());

    // Refusals: another service's identity, no token, garbage, wrong trust domain.
    let web = format!("spiffe://{td}/ns/default/dc/primary/svc/web");
    let cases = [
        (
            json!({"Service": "socat", "CSR": csr(&web)}),
            Some(socat_token.as_str()),
            403,
        ),
        (
            json!({"Service": "web", "CSR": csr(&web)}),
            Some(socat_token.as_str()),
            403,
        ),
        (json!({"Service": "socat", "CSR": csr(&spiffe)}), None, 403),
        (
            json!({"Service": "socat", "CSR": "not a csr"}),
            Some(socat_token.as_str()),
            400,
        ),
        (
            json!({"Service": "socat", "CSR": csr("spiffe://other.consul/ns/default/dc/primary/svc/socat")}),
            Some(socat_token.as_str()),
            403,
        ),
        (json!({"Service": "socat"}), Some(socat_token.as_str()), 400),
    ];
    for (body, token, status) in cases {
        let answer = agent.request(
            "POST",
            "/v1/connect/ca/leaf/sign",
            token,
            Some(&body.to_string()),
        );
        assert_eq!(answer.status, status, "{body}: {}", answer.text);
    }
    let metrics = agent.get("/metrics", None).text;
    assert!(
        metrics.contains("controlplane_leaf_certs_signed_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("controlplane_leaf_certs_signed_total{result=\"denied\"} 4"),
        "{metrics}"
    );
    assert!(metrics.contains("controlplane_ca_root_expiry_timestamp_seconds"));
}

#[test]
fn cluster_id_survives_restart_and_secondary_has_no_ca_yet() {
    let dir = TempDir::new("ca-restart");
    let first = {
        let agent = Agent::start_in(dir.path(), "primary", &[]);
        agent.get("/v1/connect/ca/roots", None).json()
    };
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    assert_eq!(agent.get("/v1/connect/ca/roots", None).json(), first);

    let secondary_dir = TempDir::new("ca-secondary");
    let secondary = Agent::start_in(
        secondary_dir.path(),
        "secondary",
        &["-primary-datacenter", "primary"],
    );
    let answer = secondary.get("/v1/connect/ca/roots", None);
    assert_eq!(answer.status, 503);
    assert!(answer.text.contains("replication"), "{}", answer.text);
}

/// Verifies `leaf_pem` (with `intermediates`) against the single trust anchor `root_pem`.
fn chains_to(leaf_pem: &str, intermediates: &[String], root_pem: &str) -> bool {
    let root_der = der(root_pem);
    let root_certificate = CertificateDer::from(root_der.as_slice());
    let Ok(anchor) = anchor_from_trusted_cert(&root_certificate) else {
        return false;
    };
    let leaf_der = der(leaf_pem);
    let leaf_certificate = CertificateDer::from(leaf_der.as_slice());
    let Ok(end_entity) = EndEntityCert::try_from(&leaf_certificate) else {
        return false;
    };
    let intermediate_ders: Vec<Vec<u8>> = intermediates.iter().map(|p| der(p)).collect();
    let intermediate_certs: Vec<CertificateDer<'_>> = intermediate_ders
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let now =
        UnixTime::since_unix_epoch(SystemTime::now().duration_since(UNIX_EPOCH).expect("clock"));
    end_entity
        .verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            &[anchor],
            &intermediate_certs,
            now,
            KeyUsage::server_auth(),
            None,
            None,
        )
        .is_ok()
}

fn lifetime_seconds(leaf_pem: &str) -> i64 {
    let leaf_der = der(leaf_pem);
    let parsed = x509_parser::parse_x509_certificate(&leaf_der)
        .expect("parse leaf")
        .1;
    parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp()
}

/// Signs a leaf for `service` in `dc` with `token`: (CertPEM, IntermediatePEMs).
fn sign(agent: &Agent, token: &str, dc: &str, service: &str) -> (String, Vec<String>) {
    let td = agent.get("/v1/connect/ca/roots", None).json()["TrustDomain"]
        .as_str()
        .expect("td")
        .to_owned();
    let spiffe = format!("spiffe://{td}/ns/default/dc/{dc}/svc/{service}");
    let body = json!({"Service": service, "CSR": csr(&spiffe)}).to_string();
    let answer = agent.request("POST", "/v1/connect/ca/leaf/sign", Some(token), Some(&body));
    assert_eq!(answer.status, 200, "{}", answer.text);
    let leaf = answer.json();
    let intermediates = leaf["IntermediatePEMs"]
        .as_array()
        .expect("IntermediatePEMs")
        .iter()
        .map(|p| p.as_str().expect("pem").to_owned())
        .collect();
    (
        leaf["CertPEM"].as_str().expect("pem").to_owned(),
        intermediates,
    )
}

const CONFIGURATION: &str = "/v1/connect/ca/configuration";

#[test]
fn ca_configuration_put_sets_the_leaf_ttl_within_bounds_for_operators_only() {
    let dir = TempDir::new("ca-config");
    let agent = Agent::start_in(dir.path(), "primary", &["-acl-default-policy", "deny"]);
    let management = agent.bootstrap();
    let before = agent.get(CONFIGURATION, Some(&management)).json();
    assert_eq!(before["Config"]["LeafCertTTL"], "72h");

    // What GET shows is a valid PUT body: the round trip changes nothing.
    let same = agent.put(CONFIGURATION, Some(&management), &before.to_string());
    assert_eq!(same.status, 200, "{}", same.text);
    let roots_before = agent.get("/v1/connect/ca/roots", None).json();

    let answer = agent.put(
        CONFIGURATION,
        Some(&management),
        r#"{"Provider": "consul", "Config": {"LeafCertTTL": "2h"}}"#,
    );
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(
        agent.get(CONFIGURATION, Some(&management)).json()["Config"]["LeafCertTTL"],
        "2h"
    );
    let (leaf, intermediates) = sign(&agent, &management, "primary", "socat");
    assert_eq!(lifetime_seconds(&leaf), 2 * 3600);
    assert!(intermediates.is_empty(), "no rotation, no cross-signature");
    // The agent's own leaf endpoint follows the setting too.
    let agent_leaf = agent.get("/v1/agent/connect/ca/leaf/socat", Some(&management));
    assert_eq!(agent_leaf.status, 200, "{}", agent_leaf.text);
    assert_eq!(
        lifetime_seconds(agent_leaf.json()["CertPEM"].as_str().expect("pem")),
        2 * 3600
    );
    // A TTL change is no rotation.
    assert_eq!(agent.get("/v1/connect/ca/roots", None).json(), roots_before);

    let refusals = [
        (
            r#"{"Provider": "consul", "Config": {"LeafCertTTL": "30m"}}"#,
            "between 1h and 8760h",
        ),
        (
            r#"{"Provider": "consul", "Config": {"LeafCertTTL": "9000h"}}"#,
            "LeafCertTTL",
        ),
        (
            r#"{"Provider": "consul", "Config": {"LeafCertTTL": "soon"}}"#,
            "LeafCertTTL",
        ),
        (r#"{"Provider": "vault", "Config": {}}"#, "Provider"),
        (
            r#"{"Provider": "consul", "Config": {"PrivateKey": "garbage"}}"#,
            "PrivateKey",
        ),
        (r#"not json"#, "JSON"),
    ];
    for (body, message) in refusals {
        let answer = agent.put(CONFIGURATION, Some(&management), body);
        assert_eq!(answer.status, 400, "{body}: {}", answer.text);
        assert!(answer.text.contains(message), "{body}: {}", answer.text);
    }
    // operator:write is needed: the anonymous token and an operator:read token are refused.
    let reader = common::policy_token(&agent, &management, "operator-read", "operator = \"read\"");
    assert_eq!(agent.get(CONFIGURATION, Some(&reader)).status, 200);
    let body = r#"{"Provider": "consul", "Config": {"LeafCertTTL": "3h"}}"#;
    for token in [None, Some(reader.as_str())] {
        let answer = agent.put(CONFIGURATION, token, body);
        assert_eq!(answer.status, 403, "{}", answer.text);
    }
    assert_eq!(
        agent.get(CONFIGURATION, Some(&management)).json()["Config"]["LeafCertTTL"],
        "2h"
    );
    // The setting is durable.
    drop(agent);
    let agent = Agent::start_in(dir.path(), "primary", &["-acl-default-policy", "deny"]);
    assert_eq!(
        agent.get(CONFIGURATION, Some(&management)).json()["Config"]["LeafCertTTL"],
        "2h"
    );
}

/// A `PUT` with a new `PrivateKey` rotates the root: blocking queries on the roots wake, the
/// new root is active and cross-signed by the old one, which stays listed; new leaves chain
/// to the new root (and to the old one through the cross-signature); the secondary adopts
/// the new root and signs with a new intermediate.
#[test]
fn a_new_private_key_rotates_the_root_across_datacenters() {
    let federation = common::Federation::start("ca-rotate");
    let (primary, secondary) = (&federation.primary, &federation.secondary);
    let management = federation.management.as_str();
    let first = primary.get("/v1/connect/ca/roots", None);
    let (first_index, first) = (first.index.expect("index"), first.json());
    let old_id = first["ActiveRootID"].as_str().expect("id").to_owned();
    let old_pem = first["Roots"][0]["RootCert"]
        .as_str()
        .expect("pem")
        .to_owned();

    // A blocking query on the roots, held before the rotation.
    let blocking_url = format!("/v1/connect/ca/roots?index={first_index}&wait=60s");
    let woken = std::thread::scope(|scope| {
        let waiter = scope.spawn(|| primary.get(&blocking_url, None));
        // The rotation lands while the query is held or before it starts; either way the
        // answer must carry the new root, never the index it waited on.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let body = json!({"Provider": "consul",
            "Config": {"PrivateKey": key.serialize_pem(), "LeafCertTTL": "24h"}});
        let answer = primary.put(CONFIGURATION, Some(management), &body.to_string());
        assert_eq!(answer.status, 200, "{}", answer.text);
        waiter.join().expect("waiter")
    });
    assert!(woken.index.expect("index") > first_index);
    let roots = woken.json();
    let new_id = roots["ActiveRootID"].as_str().expect("id").to_owned();
    assert_ne!(new_id, old_id);
    let listed: Vec<(String, bool)> = roots["Roots"]
        .as_array()
        .expect("roots")
        .iter()
        .map(|r| {
            (
                r["ID"].as_str().expect("id").to_owned(),
                r["Active"] == true,
            )
        })
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.contains(&(old_id.clone(), false)), "{listed:?}");
    assert!(listed.contains(&(new_id.clone(), true)), "{listed:?}");
    let new_root = roots["Roots"]
        .as_array()
        .expect("roots")
        .iter()
        .find(|r| r["Active"] == true)
        .expect("active")
        .clone();
    let new_pem = new_root["RootCert"].as_str().expect("pem").to_owned();
    assert!(roots["Roots"]
        .as_array()
        .expect("roots")
        .iter()
        .any(|r| r["ID"] == old_id.as_str() && r["RotatedOutAt"].is_string()));

    // New leaves: signed by the new root, and through the cross-signature also by the old.
    let (leaf, intermediates) = sign(primary, management, "primary", "socat");
    assert_eq!(lifetime_seconds(&leaf), 24 * 3600);
    assert!(chains_to(&leaf, &[], &new_pem), "new root alone verifies");
    assert!(
        !chains_to(&leaf, &[], &old_pem),
        "not signed by the old root itself"
    );
    assert!(
        chains_to(&leaf, &intermediates, &old_pem),
        "the old root verifies it through the cross-signature"
    );

    // The secondary adopts the new root (it chains to the one it holds) and gets an
    // intermediate from it.
    common::eventually(
        Duration::from_secs(30),
        "the secondary adopts the new root",
        || secondary.get("/v1/connect/ca/roots", None).json()["ActiveRootID"] == new_id.as_str(),
    );
    common::eventually(
        Duration::from_secs(30),
        "a secondary leaf chains to the new root",
        || {
            let (leaf, intermediates) = sign(secondary, management, "secondary", "web");
            chains_to(&leaf, &intermediates, &new_pem)
        },
    );

    // Without a PrivateKey after a supplied one: a generated key replaces it (Consul's rule);
    // the same configuration again rotates nothing.
    let generated = json!({"Provider": "consul", "Config": {"LeafCertTTL": "24h"}}).to_string();
    assert_eq!(
        primary
            .put(CONFIGURATION, Some(management), &generated)
            .status,
        200
    );
    let third = primary.get("/v1/connect/ca/roots", None).json();
    assert_ne!(third["ActiveRootID"], new_id.as_str());
    assert_eq!(third["Roots"].as_array().expect("roots").len(), 3);
    assert_eq!(
        primary
            .put(CONFIGURATION, Some(management), &generated)
            .status,
        200
    );
    assert_eq!(primary.get("/v1/connect/ca/roots", None).json(), third);
}
