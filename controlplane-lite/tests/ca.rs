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
