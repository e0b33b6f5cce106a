//! The Consul endpoints tools call first, and the `exact` intention API, checked against
//! Consul's shapes, status codes and error texts on one agent (the py-consul suite covers them
//! too, but needs Python; this one always runs).

mod common;

use std::time::Duration;

use common::{eventually, Agent, TempDir};
use serde_json::json;

const SOCAT: &str = r#"{"Name": "socat", "Port": 8181, "Tags": ["v1"],
    "Connect": {"SidecarService": {}}}"#;

#[test]
fn agent_status_catalog_and_ca_endpoints() {
    let dir = TempDir::new("consul-endpoints");
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    assert_eq!(
        agent.put("/v1/agent/service/register", None, SOCAT).status,
        200
    );

    // On etcd the agent campaigns after it starts listening, so the leader may be "" for a
    // moment; it is this agent once the election is done.
    let mut leader = agent.get("/v1/status/leader", None);
    eventually(Duration::from_secs(20), "a leader is elected", || {
        leader = agent.get("/v1/status/leader", None);
        leader.status != 200 || leader.json() != json!("")
    });
    assert_eq!(leader.status, 200, "{}", leader.text);
    assert_eq!(leader.json(), json!(agent.address));
    let mut peers = agent.get("/v1/status/peers", None).json();
    eventually(Duration::from_secs(20), "the agent lists itself", || {
        peers = agent.get("/v1/status/peers", None).json();
        peers != json!([])
    });
    assert_eq!(peers, json!([agent.address]));
    let me = agent.get("/v1/agent/self", None).json();
    assert_eq!(me["Config"]["Datacenter"], "primary");
    assert_eq!(me["Config"]["Server"], true);
    let node = me["Config"]["NodeName"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!node.is_empty());

    let service = agent.get("/v1/agent/service/socat", None);
    assert_eq!(service.status, 200, "{}", service.text);
    let service = service.json();
    assert_eq!(service["Service"], "socat");
    assert_eq!(service["Datacenter"], "primary");
    let missing = agent.get("/v1/agent/service/nope", None);
    assert_eq!(missing.status, 404);
    assert_eq!(missing.text.trim(), "unknown service ID: nope");
    let services = agent.get("/v1/agent/services", None).json();
    assert_eq!(services["socat-sidecar-proxy"]["Datacenter"], "primary");

    let nodes = agent.get("/v1/catalog/nodes", None).json();
    assert_eq!(nodes[0]["Node"], node.as_str());
    let one = agent.get(&format!("/v1/catalog/node/{node}"), None).json();
    assert_eq!(one["Services"]["socat"]["Port"], 8181);
    assert_eq!(
        agent.get("/v1/catalog/node/other", None).json(),
        json!(null)
    );

    // ?tag= filters; every tag asked for must be there.
    let tagged = |query: &str| {
        agent
            .get(&format!("/v1/catalog/service/socat{query}"), None)
            .json()
            .as_array()
            .map_or(0, Vec::len)
    };
    assert_eq!(
        (tagged(""), tagged("?tag=v1"), tagged("?tag=v1&tag=v2")),
        (1, 1, 0)
    );

    let roots = agent.get("/v1/connect/ca/roots", None).json();
    let agent_roots = agent.get("/v1/agent/connect/ca/roots", None).json();
    assert_eq!(agent_roots["ActiveRootID"], roots["ActiveRootID"]);
    let leaf = agent.get("/v1/agent/connect/ca/leaf/socat", None);
    assert_eq!(leaf.status, 200, "{}", leaf.text);
    let leaf = leaf.json();
    assert!(leaf["CertPEM"]
        .as_str()
        .is_some_and(|p| p.contains("BEGIN CERTIFICATE")));
    assert!(leaf["PrivateKeyPEM"]
        .as_str()
        .is_some_and(|p| p.contains("PRIVATE KEY")));
    assert!(leaf["ServiceURI"]
        .as_str()
        .is_some_and(|u| u.ends_with("/dc/primary/svc/socat")));
    let config = agent.get("/v1/connect/ca/configuration", None).json();
    assert_eq!(config["Provider"], "consul");
}

#[test]
fn exact_intentions() {
    let dir = TempDir::new("consul-exact");
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    let path = "/v1/connect/intentions/exact?source=web&destination=socat";
    let missing = agent.get(path, None);
    assert_eq!(missing.status, 404);
    assert_eq!(missing.text.trim(), "Intention not found");

    let put = agent.put(path, None, r#"{"SourceType": "consul", "Action": "allow"}"#);
    assert_eq!(put.status, 200, "{}", put.text);
    assert_eq!(put.json(), json!(true));
    let first = agent.get(path, None).json();
    assert_eq!(first["Action"], "allow");
    // A second PUT replaces the pair's intention in place (same ID), not a 409.
    assert_eq!(agent.put(path, None, r#"{"Action": "deny"}"#).status, 200);
    let second = agent.get(path, None).json();
    assert_eq!(
        (second["Action"].clone(), second["ID"].clone()),
        (json!("deny"), first["ID"].clone())
    );
    let check = agent.get(
        "/v1/connect/intentions/check?source=web&destination=socat",
        None,
    );
    assert_eq!(check.json()["Allowed"], false);
    // Names in the body must agree with the query string.
    let clash = agent.put(path, None, r#"{"SourceName": "api", "Action": "deny"}"#);
    assert_eq!(clash.status, 400, "{}", clash.text);

    let deleted = agent.request("DELETE", path, None, None);
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_eq!(agent.get(path, None).status, 404);
    let by_id = agent.get(
        "/v1/connect/intentions/00000000-0000-0000-0000-000000000000",
        None,
    );
    assert_eq!(by_id.status, 404);
    assert_eq!(by_id.text.trim(), "Intention not found");
}

/// Bodies as HashiCorp's Go client (`github.com/hashicorp/consul/api`) marshals its structs:
/// empty nested structs (`"MeshGateway": {}`, `"Expose": {}`), zero read-only fields and times,
/// `null` slices.
#[test]
fn go_client_request_shapes() {
    let dir = TempDir::new("consul-go-shapes");
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    let registration = json!({
        "ID": "web", "Name": "web", "Tags": ["v1"], "Port": 9090, "Address": "",
        "Meta": {"version": "1"}, "EnableTagOverride": false,
        "Weights": {"Passing": 1, "Warning": 1},
        "Check": {"CheckID": "web-ttl", "Name": "web ttl", "TTL": "30s",
                  "DeregisterCriticalServiceAfter": "1m"},
        "Checks": null,
        "Connect": {"SidecarService": {"Proxy": {"MeshGateway": {}, "Expose": {},
            "Upstreams": [{"DestinationType": "service", "DestinationName": "socat",
                           "LocalBindPort": 9191, "MeshGateway": {}, "Config": null}]}}},
    });
    let answer = agent.put(
        "/v1/agent/service/register",
        None,
        &registration.to_string(),
    );
    assert_eq!(answer.status, 200, "{}", answer.text);
    let checks = agent.get("/v1/agent/checks", None).json();
    assert_eq!(checks["web-ttl"]["Status"], "critical", "{checks}");
    assert_eq!(checks["web-ttl"]["ServiceID"], "web");

    let entry = json!({"Kind": "service-defaults", "Name": "socat", "Protocol": "tcp",
        "MeshGateway": {}, "Expose": {}, "CreateIndex": 0, "ModifyIndex": 0});
    let answer = agent.put("/v1/config", None, &entry.to_string());
    assert_eq!(answer.status, 200, "{}", answer.text);
    let entry = json!({"Kind": "proxy-defaults", "Name": "global", "Config": null,
        "MeshGateway": {"Mode": "local"}, "Expose": {}, "CreateIndex": 0, "ModifyIndex": 0});
    let answer = agent.put("/v1/config", None, &entry.to_string());
    assert_eq!(answer.status, 200, "{}", answer.text);

    let intention = json!({"ID": "", "SourceNS": "", "SourceName": "web",
        "DestinationNS": "", "DestinationName": "socat", "SourceType": "consul",
        "Action": "allow", "DefaultAddr": "", "DefaultPort": 0, "Meta": null, "Precedence": 0,
        "CreatedAt": "0001-01-01T00:00:00Z", "UpdatedAt": "0001-01-01T00:00:00Z",
        "Hash": null, "CreateIndex": 0, "ModifyIndex": 0});
    let answer = agent.put(
        "/v1/connect/intentions/exact?source=web&destination=socat",
        None,
        &intention.to_string(),
    );
    assert_eq!(answer.status, 200, "{}", answer.text);
    // Fields Consul has that are not implemented are refused, not dropped.
    let l7 = json!({"SourceName": "web", "DestinationName": "socat",
        "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]});
    let answer = agent.put(
        "/v1/connect/intentions/exact?source=web&destination=socat",
        None,
        &l7.to_string(),
    );
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert!(answer.text.contains("Permissions"), "{}", answer.text);
}
