//! Cross-datacenter reads between two real agents: `health/connect/<svc>?dc=<other>` is
//! answered by the other datacenter's agent (the secondary reaches the primary through
//! `-primary-address`, the primary reaches the secondary through the agent address in its
//! federation state), and a sidecar upstream in mode `none` towards another datacenter gets
//! that datacenter's sidecars as endpoints.

mod common;

use std::time::Duration;

use common::{eventually, Agent, Federation};
use serde_json::{json, Value};

/// The bound on every wait here.
const LIMIT: Duration = Duration::from_secs(20);

fn ok(answer: common::Answer) -> Value {
    assert_eq!(answer.status, 200, "{}", answer.text);
    serde_json::from_str(&answer.text).unwrap_or(Value::Null)
}

fn register(agent: &Agent, token: &str, body: Value) {
    ok(agent.put("/v1/agent/service/register", Some(token), &body.to_string()));
}

fn gateway(wan_port: u16) -> Value {
    json!({"Kind": "mesh-gateway", "Name": "mesh-gateway", "Port": wan_port, "Address": "127.0.0.1"})
}

#[test]
fn reads_with_dc_are_answered_by_the_other_datacenter() {
    // Both directions run over HTTPS, verified against the agent CA made here; started, the
    // secondary knows the management token.
    let federation = Federation::start("xdc");
    let (primary, secondary) = (&federation.primary, &federation.secondary);
    let primary_https = primary.https();
    let token = federation.management.as_str();

    // socat and its sidecar in primary; web, whose upstream is socat in mode none, in
    // secondary; a gateway in each (a datacenter publishes its state, and with it its agent
    // address, once it has gateways).
    register(
        primary,
        token,
        json!({"Name": "socat", "Port": 8181, "Connect": {"SidecarService": {"Port": 21000}}}),
    );
    register(
        secondary,
        token,
        json!({"Name": "web", "Port": 8080, "Connect": {"SidecarService": {"Port": 21001,
            "Proxy": {"Upstreams": [{"DestinationName": "socat", "Datacenter": "primary",
                "LocalBindPort": 8181, "MeshGateway": {"Mode": "none"}}]}}}}),
    );
    register(primary, token, gateway(8443));
    register(secondary, token, gateway(8444));

    let socat_here = ok(primary.get("/v1/health/connect/socat", Some(token)));
    assert_eq!(socat_here.as_array().map(Vec::len), Some(1), "{socat_here}");
    let web_here = ok(secondary.get("/v1/health/connect/web", Some(token)));
    assert_eq!(web_here.as_array().map(Vec::len), Some(1), "{web_here}");

    // Secondary → primary (through -primary-address).
    let there = secondary.get("/v1/health/connect/socat?dc=primary", Some(token));
    assert_eq!(ok(there), socat_here);
    // Without a token the primary answers for the anonymous token (default deny: nothing),
    // never with the replication token's rights.
    assert_eq!(
        ok(secondary.get("/v1/health/connect/socat?dc=primary", None)),
        json!([])
    );

    // Primary → secondary, once the secondary's federation state carries its address.
    eventually(
        LIMIT,
        "the secondary's agent address in the primary",
        || {
            let state = primary.get("/v1/internal/federation-state/secondary", Some(token));
            state.status == 200 && state.json()["AgentAddress"] == json!(secondary.https())
        },
    );
    assert_eq!(
        ok(primary.get("/v1/health/connect/web?dc=secondary", Some(token))),
        web_here
    );
    // And the primary's own address reaches the secondary through replication.
    eventually(
        LIMIT,
        "the primary's agent address in the secondary",
        || {
            let state = secondary.get("/v1/internal/federation-state/primary", Some(token));
            state.status == 200 && state.json()["AgentAddress"] == json!(primary_https)
        },
    );

    // Every read Consul allows `?dc=` on is forwarded, not only health/connect: the catalog,
    // health and config reads of the primary, asked at the secondary.
    let services = ok(secondary.get("/v1/catalog/services?dc=primary", Some(token)));
    assert!(services.get("socat").is_some(), "{services}");
    let local = ok(secondary.get("/v1/catalog/services", Some(token)));
    assert!(local.get("socat").is_none(), "{local}");
    let rows = ok(secondary.get("/v1/health/service/socat?dc=primary", Some(token)));
    assert_eq!(rows[0]["Node"]["Datacenter"], "primary", "{rows}");
    let rows = ok(primary.get("/v1/catalog/service/web?dc=secondary", Some(token)));
    assert_eq!(rows[0]["Datacenter"], "secondary", "{rows}");
    // The caller's own token travels: without one, the remote's ACLs (default deny) decide.
    let anonymous = secondary.get("/v1/catalog/service/socat?dc=primary", None);
    assert_eq!(anonymous.status, 200, "{}", anonymous.text);
    assert_eq!(
        anonymous.json(),
        json!([]),
        "filtered by the primary's ACLs"
    );
    // Agent endpoints do not take `?dc=`: they describe the agent asked.
    let me = ok(secondary.get("/v1/agent/self?dc=primary", Some(token)));
    assert_eq!(me["Config"]["Datacenter"], "secondary");

    let unknown = secondary.get("/v1/health/connect/socat?dc=elsewhere", Some(token));
    // Consul's error for an unknown datacenter (structs.ErrNoDCPath), with its status.
    assert_eq!(unknown.status, 500, "{}", unknown.text);
    assert_eq!(unknown.text.trim(), "No path to datacenter");
    let unknown = primary.get("/v1/catalog/services?dc=elsewhere", Some(token));
    assert_eq!(unknown.status, 500, "{}", unknown.text);
    assert_eq!(unknown.text.trim(), "No path to datacenter");

    // Mode none across datacenters: the web sidecar dials socat's sidecar in primary.
    let sidecar = ok(secondary.get("/v1/internal/sidecar/web-sidecar-proxy", Some(token)));
    let upstream = &sidecar["upstreams"][0];
    assert_eq!(upstream["mesh_gateway_mode"], "none");
    let expected = format!(
        "{}:{}",
        socat_here[0]["Node"]["Address"]
            .as_str()
            .expect("node address"),
        21000
    );
    assert_eq!(upstream["endpoints"], json!([expected]));
}
