//! Registration forms, bad input, deregistration, config entries and metrics over HTTP.

mod common;

use common::{Agent, TempDir};
use serde_json::json;

#[test]
fn registration_forms_and_bad_input() {
    let dir = TempDir::new("catalog");
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    // PascalCase API form with a sidecar.
    let pascal = json!({"Name": "web", "ID": "web-1", "Port": 8080, "Tags": ["v1"],
        "Connect": {"SidecarService": {"Proxy": {"Upstreams": [{"DestinationName": "socat", "LocalBindPort": 9191,
            "MeshGateway": {"Mode": "remote"}, "Datacenter": "secondary"}]}}}});
    assert_eq!(
        agent
            .put("/v1/agent/service/register", None, &pascal.to_string())
            .status,
        200
    );
    let services = agent.get("/v1/agent/services", None).json();
    let sidecar = &services["web-1-sidecar-proxy"];
    assert_eq!(sidecar["Service"], "web-sidecar-proxy");
    assert_eq!(sidecar["Proxy"]["DestinationServiceID"], "web-1");
    assert_eq!(
        sidecar["Proxy"]["Upstreams"][0]["MeshGateway"],
        json!({"Mode": "remote"})
    );
    assert_eq!(sidecar["Tags"], json!(["v1"]));

    // Bad input: 400 naming the field, nothing stored.
    let before = agent.get("/v1/agent/services", None).json();
    for (body, field) in [
        (r#"{"Name": "x", "Port": 99999}"#, "Port"),
        (r#"{"Name": "x", "Prot": 1}"#, "Prot"),
        (
            r#"{"service": {"name": "x", "connect": {"sidecar_service": {"proxy": {"upstreams": [{"destination_name": "y"}]}}}}}"#,
            "LocalBindPort",
        ),
        (r#"{"Name": "x.y"}"#, "Name"),
        (
            r#"{"Kind": "terminating-gateway", "Name": "t", "Port": 1}"#,
            "Kind",
        ),
        (r#"[1, 2]"#, "object"),
        ("", "empty"),
        ("{", "JSON"),
    ] {
        let answer = agent.put("/v1/agent/service/register", None, body);
        assert_eq!(answer.status, 400, "{body}: {}", answer.text);
        assert!(answer.text.contains(field), "{body}: {}", answer.text);
    }
    // Several definitions are one transaction: one bad one stores none.
    let batch = r#"{"services": [{"name": "good", "port": 1}, {"name": "bad", "port": -1}]}"#;
    let answer = agent.put("/v1/agent/service/register", None, batch);
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert!(answer.text.contains("Port"), "{}", answer.text);
    assert_eq!(agent.get("/v1/agent/services", None).json(), before);

    // Re-registering without the sidecar removes it; deregistering removes both.
    assert_eq!(
        agent
            .put(
                "/v1/agent/service/register",
                None,
                r#"{"Name":"web","ID":"web-1","Port":8080}"#
            )
            .status,
        200
    );
    assert!(agent
        .get("/v1/agent/services", None)
        .json()
        .get("web-1-sidecar-proxy")
        .is_none());
    assert_eq!(
        agent
            .put("/v1/agent/service/register", None, &pascal.to_string())
            .status,
        200
    );
    assert_eq!(
        agent
            .put("/v1/agent/service/deregister/web-1", None, "")
            .status,
        200
    );
    assert_eq!(agent.get("/v1/agent/services", None).json(), json!({}));
    assert_eq!(
        agent
            .put("/v1/agent/service/deregister/web-1", None, "")
            .status,
        404
    );

    // Gateways: WAN tagged addresses, datacenters list.
    let gw = r#"{"service": {"kind": "mesh-gateway", "name": "mesh-gateway", "port": 8443,
        "tagged_addresses": {"lan": {"address": "10.0.0.5", "port": 8443}, "wan": {"address": "203.0.113.5", "port": 443}}}}"#;
    assert_eq!(
        agent.put("/v1/agent/service/register", None, gw).status,
        200
    );
    let rows = agent.get("/v1/catalog/service/mesh-gateway", None).json();
    assert_eq!(rows[0]["ServiceKind"], "mesh-gateway");
    assert_eq!(
        rows[0]["ServiceTaggedAddresses"]["wan"],
        json!({"Address": "203.0.113.5", "Port": 443})
    );
    let state =
        r#"{"MeshGateways": [{"Service": "mesh-gateway", "WanAddress": "192.0.2.10:8444"}]}"#;
    assert_eq!(
        agent
            .put("/v1/internal/federation-state/secondary", None, state)
            .status,
        200
    );
    assert_eq!(
        agent.get("/v1/catalog/datacenters", None).json(),
        json!(["primary", "secondary"])
    );
    let routes = agent.get("/v1/internal/mesh-gateway/routes", None).json();
    let td = agent.get("/v1/connect/ca/roots", None).json()["TrustDomain"]
        .as_str()
        .expect("td")
        .to_owned();
    assert_eq!(
        routes["routes"],
        json!([{"sni": format!("*.secondary.internal.{td}"), "endpoints": ["192.0.2.10:8444"]}])
    );
    assert_eq!(
        agent
            .get("/v1/internal/mesh-gateway/routes?datacenter=other", None)
            .status,
        400
    );
    assert_eq!(
        agent
            .put(
                "/v1/internal/federation-state/secondary",
                None,
                r#"{"MeshGateways": [{"WanAddress": "nope"}]}"#
            )
            .status,
        400
    );
}

#[test]
fn config_entries_and_mode_resolution() {
    let dir = TempDir::new("config");
    let agent = Agent::start_in(dir.path(), "secondary", &[]);
    // Bare string and object forms; the stored form is the object.
    assert_eq!(
        agent
            .put(
                "/v1/config",
                None,
                r#"{"Kind":"proxy-defaults","Name":"global","MeshGateway":"local"}"#
            )
            .text
            .trim(),
        "true"
    );
    let entry = agent.get("/v1/config/proxy-defaults/global", None);
    assert!(entry.index.is_some());
    let entry = entry.json();
    assert_eq!(entry["MeshGateway"], json!({"Mode": "local"}));
    assert!(entry["CreateIndex"].as_u64().is_some_and(|i| i > 0));
    assert_eq!(agent.put("/v1/config", None, r#"{"kind":"service-defaults","name":"web","protocol":"tcp","mesh_gateway":{"mode":"remote"}}"#).status, 200);
    assert_eq!(
        agent
            .get("/v1/config/service-defaults", None)
            .json()
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    for (body, field) in [
        (
            r#"{"Kind":"proxy-defaults","Name":"global","MeshGatway":"local"}"#,
            "MeshGatway",
        ),
        (
            r#"{"Kind":"proxy-defaults","Name":"global","MeshGateway":"sideways"}"#,
            "sideways",
        ),
        (r#"{"Kind":"proxy-defaults","Name":"local"}"#, "Name"),
        (r#"{"Kind":"service-resolver","Name":"web"}"#, "Kind"),
        (
            r#"{"Kind":"service-defaults","Name":"web","Protocol":"udp"}"#,
            "Protocol",
        ),
    ] {
        let answer = agent.put("/v1/config", None, body);
        assert_eq!(answer.status, 400, "{body}: {}", answer.text);
        assert!(answer.text.contains(field), "{body}: {}", answer.text);
    }
    assert_eq!(
        agent.get("/v1/config/proxy-defaults/global", None).json()["MeshGateway"],
        json!({"Mode": "local"})
    );

    // CAS.
    let modify = agent.get("/v1/config/service-defaults/web", None).json()["ModifyIndex"]
        .as_u64()
        .expect("index");
    let body = r#"{"Kind":"service-defaults","Name":"web","Protocol":"http"}"#;
    assert_eq!(
        agent
            .put(&format!("/v1/config?cas={}", modify + 100), None, body)
            .text
            .trim(),
        "false"
    );
    assert_eq!(
        agent
            .put(&format!("/v1/config?cas={modify}"), None, body)
            .text
            .trim(),
        "true"
    );

    // Mode resolution as the sidecar sees it: web's service-defaults (remote) beat
    // proxy-defaults (local); an upstream's own mode beats both.
    let web = r#"{"service": {"name": "web", "port": 8080, "connect": {"sidecar_service": {"proxy": {"upstreams": [
        {"destination_name": "socat", "datacenter": "primary", "local_bind_port": 8181},
        {"destination_name": "api", "datacenter": "primary", "local_bind_port": 8182, "mesh_gateway": {"mode": "local"}}]}}}}}"#;
    assert_eq!(
        agent.put("/v1/agent/service/register", None, web).status,
        200
    );
    assert_eq!(
        agent
            .put(
                "/v1/config",
                None,
                r#"{"Kind":"service-defaults","Name":"web","MeshGateway":"remote"}"#
            )
            .status,
        200
    );
    // This agent is its own primary (no -primary-datacenter), so it has a CA.
    let config = agent
        .get("/v1/internal/sidecar/web-sidecar-proxy", None)
        .json();
    assert_eq!(
        config["upstreams"][0]["mesh_gateway_mode"], "remote",
        "service-defaults of web beat proxy-defaults"
    );
    assert_eq!(
        config["upstreams"][1]["mesh_gateway_mode"], "local",
        "the upstream's own mode wins"
    );

    assert_eq!(
        agent
            .request("DELETE", "/v1/config/service-defaults/web", None, None)
            .status,
        200
    );
    assert_eq!(
        agent.get("/v1/config/service-defaults/web", None).status,
        404
    );
    assert_eq!(agent.get("/v1/config/nonsense/web", None).status, 400);
}

#[test]
fn sidecar_modes_in_the_primary() {
    let dir = TempDir::new("modes");
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    assert_eq!(
        agent
            .put(
                "/v1/config",
                None,
                r#"{"Kind":"proxy-defaults","Name":"global","MeshGateway":"local"}"#
            )
            .status,
        200
    );
    assert_eq!(
        agent
            .put(
                "/v1/config",
                None,
                r#"{"Kind":"service-defaults","Name":"web","MeshGateway":"remote"}"#
            )
            .status,
        200
    );
    let gw =
        r#"{"Kind": "mesh-gateway", "Name": "mesh-gateway", "Address": "10.0.0.1", "Port": 8443}"#;
    assert_eq!(
        agent.put("/v1/agent/service/register", None, gw).status,
        200
    );
    let state =
        r#"{"MeshGateways": [{"Service": "mesh-gateway", "WanAddress": "192.0.2.20:8444"}]}"#;
    assert_eq!(
        agent
            .put("/v1/internal/federation-state/secondary", None, state)
            .status,
        200
    );
    let web = r#"{"service": {"name": "web", "port": 8080, "connect": {"sidecar_service": {"proxy": {"upstreams": [
        {"destination_name": "socat", "datacenter": "secondary", "local_bind_port": 8181},
        {"destination_name": "api", "datacenter": "secondary", "local_bind_port": 8182, "mesh_gateway": {"mode": "local"}},
        {"destination_name": "db", "local_bind_port": 8183, "mesh_gateway": {"mode": "remote"}}]}}}}}"#;
    assert_eq!(
        agent.put("/v1/agent/service/register", None, web).status,
        200
    );
    let config = agent
        .get("/v1/internal/sidecar/web-sidecar-proxy", None)
        .json();
    let modes: Vec<(&str, &str)> = config["upstreams"]
        .as_array()
        .expect("upstreams")
        .iter()
        .map(|u| {
            (
                u["mesh_gateway_mode"].as_str().unwrap_or(""),
                u["endpoints"][0].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        modes,
        [("remote", "192.0.2.20:8444"), ("local", "10.0.0.1:8443"), ("none", "")],
        "service-defaults beat proxy-defaults; the upstream beats both; same datacenter never uses a gateway"
    );
}

#[test]
fn metrics_exposition() {
    let dir = TempDir::new("metrics");
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    assert_eq!(
        agent
            .put(
                "/v1/agent/service/register",
                None,
                r#"{"Name":"web","Port":80}"#
            )
            .status,
        200
    );
    let answer = agent.get("/metrics", None);
    assert_eq!(answer.status, 200);
    let text = answer.text;
    assert!(text.contains("controlplane_build_info{version=\""));
    assert!(text.contains("controlplane_http_requests_total{method=\"PUT\",route=\"/v1/agent/service/register\",code=\"200\"} 1"), "{text}");
    assert!(text.contains("# TYPE controlplane_store_commit_duration_seconds histogram"));
    let count: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("controlplane_store_commit_duration_seconds_count "))
        .and_then(|v| v.parse().ok())
        .expect("count");
    assert!(count >= 1, "the registration committed");
}
