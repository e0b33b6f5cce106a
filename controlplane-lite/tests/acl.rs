//! ACL enforcement against the real binary: default deny, the gateway token's limits, tokens.

mod common;

use common::{field, testdata, Agent, TempDir};
use serde_json::json;

const SOCAT: &str =
    r#"{"service": {"name": "socat", "port": 8181, "connect": {"sidecar_service": {}}}}"#;

#[test]
fn default_deny_without_a_token() {
    let dir = TempDir::new("deny");
    let agent = Agent::start_in(dir.path(), "primary", &["-acl-default-policy", "deny"]);
    let management = agent.bootstrap();
    assert_eq!(
        agent
            .put("/v1/agent/service/register", Some(&management), SOCAT)
            .status,
        200
    );

    // Writes are refused with 403 and a message; nothing is stored.
    let answer = agent.put(
        "/v1/agent/service/register",
        None,
        r#"{"Name": "web", "Port": 1}"#,
    );
    assert_eq!(answer.status, 403);
    assert!(
        answer.text.contains("Permission denied") && answer.text.contains("service:write on web"),
        "{}",
        answer.text
    );
    let answer = agent.request(
        "POST",
        "/v1/connect/intentions",
        None,
        Some(r#"{"SourceName":"web","DestinationName":"socat","Action":"allow"}"#),
    );
    assert_eq!(answer.status, 403);
    assert_eq!(
        agent
            .put(
                "/v1/config",
                None,
                r#"{"Kind":"proxy-defaults","Name":"global"}"#
            )
            .status,
        403
    );
    assert_eq!(agent.get("/v1/acl/policies", None).status, 403);
    assert_eq!(
        agent
            .put("/v1/agent/service/deregister/socat", None, "")
            .status,
        403
    );
    let (code, _, stderr) = agent.cli(&["intention", "create", "web", "socat"], None);
    assert_eq!(code, 1);
    assert!(stderr.contains("403"), "{stderr}");

    // Reads are filtered, like Consul: the anonymous token sees nothing.
    assert_eq!(agent.get("/v1/catalog/services", None).json(), json!({}));
    assert_eq!(
        agent.get("/v1/health/connect/socat", None).json(),
        json!([])
    );
    assert_eq!(
        agent
            .get("/v1/catalog/services", Some(&management))
            .json()
            .as_object()
            .map(|o| o.len()),
        Some(2)
    );

    // An unknown secret is not the anonymous token.
    let answer = agent.get(
        "/v1/catalog/services",
        Some("00000000-1111-2222-3333-444444444444"),
    );
    assert_eq!((answer.status, answer.text.trim()), (403, "ACL not found"));

    // Bootstrap works once.
    let answer = agent.put("/v1/acl/bootstrap", None, "");
    assert_eq!(answer.status, 403);
    assert!(answer.text.contains("no longer allowed"), "{}", answer.text);

    // Denials are counted.
    let metrics = agent.get("/metrics", None).text;
    assert!(
        metrics.contains("controlplane_acl_denied_total{route=\"/v1/agent/service/register\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("controlplane_http_requests_total{method=\"PUT\",route=\"/v1/agent/service/register\",code=\"403\"} 1"));
}

#[test]
fn gateway_token_limits() {
    let dir = TempDir::new("gwtoken");
    let agent = Agent::start_in(dir.path(), "primary", &["-acl-default-policy", "deny"]);
    let management = agent.bootstrap();
    agent.cli_ok(
        &[
            "acl",
            "policy",
            "create",
            "-name",
            "mesh-gateway",
            "-rules",
            &format!("@{}", testdata("mesh-gateway-policy.json")),
        ],
        Some(&management),
    );
    let out = agent.cli_ok(
        &[
            "acl",
            "token",
            "create",
            "-description",
            "gw",
            "-policy-name",
            "mesh-gateway",
        ],
        Some(&management),
    );
    let gateway = field(&out, "SecretID:");
    assert_eq!(
        agent
            .put("/v1/agent/service/register", Some(&management), SOCAT)
            .status,
        200
    );

    // Allowed: register itself as mesh-gateway, read the catalog and its routes.
    let gw = r#"{"Kind": "mesh-gateway", "Name": "mesh-gateway", "Port": 8443}"#;
    assert_eq!(
        agent
            .put("/v1/agent/service/register", Some(&gateway), gw)
            .status,
        200
    );
    assert_eq!(
        agent
            .get("/v1/catalog/services", Some(&gateway))
            .json()
            .as_object()
            .map(|o| o.len()),
        Some(3)
    );
    assert_eq!(
        agent
            .get("/v1/internal/mesh-gateway/routes", Some(&gateway))
            .json()["routes"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        agent.get("/v1/connect/intentions", Some(&gateway)).status,
        200,
        "service read implies intentions read"
    );

    // Refused: anything else.
    let refused = [
        (
            "PUT",
            "/v1/agent/service/register",
            r#"{"Name": "socat", "Port": 1}"#,
        ),
        (
            "PUT",
            "/v1/agent/service/register",
            r#"{"Kind": "mesh-gateway", "Name": "gateway-primary", "Port": 8443}"#,
        ),
        (
            "POST",
            "/v1/connect/intentions",
            r#"{"SourceName":"web","DestinationName":"socat","Action":"allow"}"#,
        ),
        (
            "PUT",
            "/v1/config",
            r#"{"Kind":"proxy-defaults","Name":"global","MeshGateway":"local"}"#,
        ),
        (
            "PUT",
            "/v1/acl/policy",
            r#"{"Name":"x","Rules":"acl = \"write\""}"#,
        ),
        ("PUT", "/v1/acl/token", r#"{"Description":"x"}"#),
        (
            "POST",
            "/v1/connect/ca/leaf/sign",
            r#"{"Service":"socat","CSR":"x"}"#,
        ),
        ("PUT", "/v1/agent/service/deregister/socat", ""),
        ("GET", "/v1/internal/sidecar/socat-sidecar-proxy", ""),
        (
            "PUT",
            "/v1/internal/federation-state/secondary",
            r#"{"MeshGateways":[{"WanAddress":"1.2.3.4:443"}]}"#,
        ),
    ];
    for (method, path, body) in refused {
        let answer = agent.request(
            method,
            path,
            Some(&gateway),
            (!body.is_empty()).then_some(body),
        );
        assert_eq!(answer.status, 403, "{method} {path}: {}", answer.text);
    }
    assert_eq!(
        agent.get("/v1/acl/token/self", Some(&gateway)).json()["Description"],
        "gw"
    );
}

#[test]
fn hcl_rules_service_identities_and_default_allow() {
    let dir = TempDir::new("hcl");
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    // Default allow: anonymous may register, but not manage ACLs.
    assert_eq!(
        agent.put("/v1/agent/service/register", None, SOCAT).status,
        200
    );
    assert_eq!(agent.get("/v1/acl/policies", None).status, 403);
    let management = agent.bootstrap();

    let rules = "service_prefix \"\" { policy = \"deny\" }\nservice \"web\" { policy = \"write\" intentions = \"write\" }";
    let out = agent.cli_ok(
        &[
            "acl", "policy", "create", "-name", "web-only", "-rules", rules,
        ],
        Some(&management),
    );
    let policy_id = field(&out, "ID:");
    let out = agent.cli_ok(
        &[
            "acl",
            "token",
            "create",
            "-description",
            "w",
            "-policy-id",
            &policy_id[..8],
        ],
        Some(&management),
    );
    let web = field(&out, "SecretID:");
    assert_eq!(
        agent
            .put(
                "/v1/agent/service/register",
                Some(&web),
                r#"{"Name":"web","Port":1}"#
            )
            .status,
        200
    );
    assert_eq!(
        agent
            .put(
                "/v1/agent/service/register",
                Some(&web),
                r#"{"Name":"api","Port":1}"#
            )
            .status,
        403,
        "explicit deny beats default allow"
    );
    let create = r#"{"SourceName":"*","DestinationName":"web","Action":"deny"}"#;
    assert_eq!(
        agent
            .request("POST", "/v1/connect/intentions", Some(&web), Some(create))
            .status,
        200
    );

    let out = agent.cli_ok(
        &[
            "acl",
            "token",
            "create",
            "-description",
            "si",
            "-service-identity",
            "socat",
        ],
        Some(&management),
    );
    assert!(out.contains("socat (Datacenters: all)"), "{out}");
    let socat = field(&out, "SecretID:");
    let sidecar =
        r#"{"service": {"name": "socat", "port": 8181, "connect": {"sidecar_service": {}}}}"#;
    // A token for web cannot take over socat's instance ID.
    let hijack = r#"{"ID": "socat", "Name": "web", "Port": 1}"#;
    let answer = agent.put("/v1/agent/service/register", Some(&web), hijack);
    assert_eq!(answer.status, 403, "{}", answer.text);
    assert!(
        answer.text.contains("service:write on socat"),
        "{}",
        answer.text
    );
    assert_eq!(
        agent
            .put("/v1/agent/service/register", Some(&socat), sidecar)
            .status,
        200
    );

    // Bad rules are a 400 that names the problem, and nothing is stored.
    let answer = agent.put(
        "/v1/acl/policy",
        Some(&management),
        r#"{"Name":"bad","Rules":"service \"x\" { polcy = \"read\" }"}"#,
    );
    assert_eq!(answer.status, 400);
    assert!(answer.text.contains("polcy"), "{}", answer.text);
    assert_eq!(
        agent
            .get("/v1/acl/policy/name/bad", Some(&management))
            .status,
        404
    );
    let answer = agent.put(
        "/v1/acl/token",
        Some(&management),
        r#"{"Policies":[{"Name":"nope"}]}"#,
    );
    assert_eq!(answer.status, 400);
    assert!(answer.text.contains("Policies[0]"), "{}", answer.text);
}

/// What HashiCorp's Go client (`api.ACLPolicy`, `api.ACLToken`) puts on the wire: the whole
/// struct, read-only fields and nulls included.
#[test]
fn consul_client_shapes_and_token_update() {
    let dir = TempDir::new("shapes");
    let agent = Agent::start_in(dir.path(), "primary", &["-acl-default-policy", "deny"]);
    let management = agent.bootstrap();

    let policy = json!({
        "ID": "", "Name": "web-read", "Description": "", "Rules": "service \"web\" { policy = \"read\" }",
        "Datacenters": null, "Hash": null, "CreateIndex": 0, "ModifyIndex": 0,
    });
    let answer = agent.put("/v1/acl/policy", Some(&management), &policy.to_string());
    assert_eq!(answer.status, 200, "{}", answer.text);
    let policy_id = answer.json()["ID"].as_str().unwrap_or_default().to_owned();

    let token = json!({
        "CreateIndex": 0, "ModifyIndex": 0, "AccessorID": "", "SecretID": "",
        "Description": "web", "Policies": [{"ID": policy_id, "Name": ""}], "Local": false,
        "CreateTime": "0001-01-01T00:00:00Z", "Hash": null, "ExpirationTTL": 0,
    });
    let answer = agent.put("/v1/acl/token", Some(&management), &token.to_string());
    assert_eq!(answer.status, 200, "{}", answer.text);
    let created = answer.json();
    let accessor = created["AccessorID"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let secret = created["SecretID"].as_str().unwrap_or_default().to_owned();

    // Update: the Go client sends the token it read back, with a new description.
    let mut update = created.clone();
    update["Description"] = json!("web, updated");
    update["Policies"] = json!(null);
    let answer = agent.put(
        &format!("/v1/acl/token/{accessor}"),
        Some(&management),
        &update.to_string(),
    );
    assert_eq!(answer.status, 200, "{}", answer.text);
    let updated = answer.json();
    assert_eq!(updated["Description"], "web, updated");
    assert_eq!(updated["SecretID"], secret.as_str());
    assert_eq!(updated["Policies"], json!([]));
    assert_eq!(updated["CreateIndex"], created["CreateIndex"]);
    // An accessor in the body that differs from the URL is refused with Consul's text.
    let mut mismatched = update.clone();
    mismatched["AccessorID"] = json!(uuid_like(7));
    let answer = agent.put(
        &format!("/v1/acl/token/{accessor}"),
        Some(&management),
        &mismatched.to_string(),
    );
    assert_eq!(answer.status, 400);
    assert!(answer.text.contains("do not match"), "{}", answer.text);

    // Wrong types and non-JSON stay 400s that say what is wrong.
    let answer = agent.put(
        "/v1/acl/policy",
        Some(&management),
        r#"{"Name": "x", "Datacenters": "primary"}"#,
    );
    assert_eq!(answer.status, 400);
    assert!(answer.text.contains("Datacenters"), "{}", answer.text);
    let answer = agent.put("/v1/acl/token", Some(&management), "Description=x");
    assert_eq!(answer.status, 400);
    assert!(answer.text.contains("not valid JSON"), "{}", answer.text);
    let answer = agent.put(
        "/v1/acl/token",
        Some(&management),
        r#"{"Roles": [{"Name": "r"}]}"#,
    );
    assert_eq!(answer.status, 400);
    assert!(answer.text.contains("Roles"), "{}", answer.text);

    // A deleted token: using its secret is Consul's 403 "ACL not found"; reading it by accessor
    // is Consul's 404, whose text also ends in "ACL not found".
    let answer = agent.request(
        "DELETE",
        &format!("/v1/acl/token/{accessor}"),
        Some(&management),
        None,
    );
    assert_eq!(answer.status, 200, "{}", answer.text);
    let answer = agent.get("/v1/acl/token/self", Some(&secret));
    assert_eq!(answer.status, 403, "{}", answer.text);
    assert_eq!(answer.text.trim(), "ACL not found");
    let answer = agent.get(&format!("/v1/acl/token/{accessor}"), Some(&management));
    assert_eq!(answer.status, 404, "{}", answer.text);
    assert_eq!(
        answer.text.trim(),
        "Requested token does not exist: ACL not found"
    );
    let answer = agent.put(
        &format!("/v1/acl/token/{accessor}"),
        Some(&management),
        &update.to_string(),
    );
    assert_eq!(answer.status, 404, "{}", answer.text);
    assert!(answer.text.contains("Cannot find token"), "{}", answer.text);
    let answer = agent.request(
        "DELETE",
        &format!("/v1/acl/token/{accessor}"),
        Some(&management),
        None,
    );
    assert_eq!(answer.status, 404, "{}", answer.text);
    assert_eq!(answer.text.trim(), "Cannot find token to delete");
}

fn uuid_like(n: u8) -> String {
    format!("{n:08}-0000-4000-8000-000000000000")
}
