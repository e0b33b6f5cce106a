//! Cross-datacenter reads (Consul forwards a query with `?dc=` to a server of that
//! datacenter; simplified here to one agent per datacenter). Decisions only, no IO: which
//! agent answers for a datacenter, which sidecar upstreams need another datacenter's
//! catalog, and how a forwarded `health/connect` answer becomes dialable endpoints.
//!
//! Every agent publishes its HTTP address in its federation state, and federation states
//! replicate everywhere, so each datacenter can reach every other; a secondary also knows
//! the primary from `-primary-address` before any state has arrived.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::catalog::join_host_port;
use crate::config_entries::MeshGatewayMode;
use crate::error::{Error, Result};
use crate::routes::{FederationState, SidecarConfig};

/// Longest a sidecar-config query blocks when it depends on another datacenter's catalog:
/// remote changes do not move the local index, so the answer is recomputed this often.
pub const REMOTE_POLL: Duration = Duration::from_secs(5);

/// The address to publish for this agent: the bound address, with an unspecified IP
/// (`0.0.0.0`, `::`) replaced by the node address, which other datacenters can dial.
pub fn advertised_address(bound: SocketAddr, node_address: &str) -> String {
    if bound.ip().is_unspecified() && !node_address.is_empty() {
        join_host_port(node_address, bound.port())
    } else {
        bound.to_string()
    }
}

/// The HTTP address of `target`'s agent, as seen from `local`. `None` for the local
/// datacenter itself, or a datacenter with no known path. The operator's
/// `-primary-address` wins for the primary; others come from their federation states.
pub fn remote_agent(
    local: &str,
    target: &str,
    primary: &str,
    primary_address: Option<&str>,
    federation: &[FederationState],
) -> Option<String> {
    if target == local {
        return None;
    }
    if target == primary {
        if let Some(address) = primary_address.filter(|a| !a.is_empty()) {
            return Some(address.to_owned());
        }
    }
    federation
        .iter()
        .find(|state| state.datacenter == target && !state.agent_address.is_empty())
        .map(|state| state.agent_address.clone())
}

/// Indices of the upstreams in mode `none` towards another datacenter: their endpoints are
/// that datacenter's sidecars, which only its agent knows.
pub fn remote_none_upstreams(config: &SidecarConfig) -> Vec<usize> {
    config
        .upstreams
        .iter()
        .enumerate()
        .filter(|(_, upstream)| {
            upstream.datacenter != config.datacenter
                && upstream.mesh_gateway_mode == MeshGatewayMode::None.as_str()
        })
        .map(|(i, _)| i)
        .collect()
}

/// The parts of a health row that say where to dial (the rest of the row is ignored).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthRow {
    node: HealthNode,
    service: HealthService,
    /// Its checks; an instance with a critical one is not dialled (as locally).
    #[serde(default)]
    checks: Vec<HealthCheckRow>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthCheckRow {
    status: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthService {
    #[serde(default)]
    address: String,
    port: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthNode {
    address: String,
}

/// Dialable endpoints (LAN addresses, sorted, deduplicated; critical instances left out)
/// from a `GET
/// /v1/health/connect/<svc>` answer of another datacenter.
pub fn health_endpoints(body: &[u8]) -> Result<Vec<String>> {
    let rows: Vec<HealthRow> = serde_json::from_slice(body)
        .map_err(|e| Error::Unavailable(format!("remote health/connect answer: {e}")))?;
    let mut endpoints: Vec<String> = rows
        .iter()
        .filter(|row| {
            row.checks
                .iter()
                .all(|c| c.status != crate::checks::CRITICAL)
        })
        .map(|row| {
            // The service address, else the node's (as `ServiceInstance::lan_address`).
            let host = if row.service.address.is_empty() {
                &row.node.address
            } else {
                &row.service.address
            };
            join_host_port(host, row.service.port)
        })
        .collect();
    endpoints.sort();
    endpoints.dedup();
    Ok(endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::UpstreamConfig;

    fn state(dc: &str, agent_address: &str) -> FederationState {
        FederationState {
            datacenter: dc.into(),
            mesh_gateways: Vec::new(),
            modify_index: 1,
            from_catalog: true,
            agent_address: agent_address.into(),
        }
    }

    #[test]
    fn remote_agents_come_from_the_primary_flag_then_federation_states() {
        let states = [state("primary", "10.0.0.1:8500"), state("third", "")];
        let states = [states.as_slice(), &[state("secondary", "10.0.0.2:8500")]].concat();
        // The secondary: the flag wins for the primary.
        let found = |local, target, flag| remote_agent(local, target, "primary", flag, &states);
        assert_eq!(
            found("secondary", "primary", Some("192.0.2.1:8500")).as_deref(),
            Some("192.0.2.1:8500")
        );
        assert_eq!(
            found("secondary", "primary", None).as_deref(),
            Some("10.0.0.1:8500")
        );
        // The primary reaches the secondary through its published state.
        assert_eq!(
            found("primary", "secondary", None).as_deref(),
            Some("10.0.0.2:8500")
        );
        assert_eq!(found("primary", "primary", None), None);
        assert_eq!(
            found("primary", "third", None),
            None,
            "no address published"
        );
        assert_eq!(found("primary", "unknown", None), None);
    }

    #[test]
    fn unspecified_bind_addresses_advertise_the_node_address() {
        let bound = "0.0.0.0:8500".parse().expect("addr");
        assert_eq!(advertised_address(bound, "10.0.0.5"), "10.0.0.5:8500");
        let bound = "127.0.0.1:8501".parse().expect("addr");
        assert_eq!(advertised_address(bound, "10.0.0.5"), "127.0.0.1:8501");
    }

    #[test]
    fn only_none_upstreams_to_other_datacenters_need_the_remote_catalog() {
        let upstream = |dc: &str, mode: &str| UpstreamConfig {
            destination_name: "socat".into(),
            datacenter: dc.into(),
            local_bind: "127.0.0.1:8181".into(),
            sni: String::new(),
            spiffe_id: String::new(),
            mesh_gateway_mode: mode.into(),
            endpoints: Vec::new(),
        };
        let config = SidecarConfig {
            generation: 1,
            proxy_id: "web-sidecar-proxy".into(),
            service: "web".into(),
            datacenter: "secondary".into(),
            trust_domain: "td.consul".into(),
            spiffe_id: String::new(),
            public_listener: String::new(),
            local_app: String::new(),
            upstreams: vec![
                upstream("primary", "local"),
                upstream("primary", "none"),
                upstream("secondary", "none"),
                upstream("primary", "remote"),
            ],
        };
        assert_eq!(remote_none_upstreams(&config), [1]);
    }

    #[test]
    fn health_rows_become_lan_endpoints() {
        let body = br#"[
            {"Node": {"Address": "10.0.0.9"}, "Service": {"ID": "b", "Service": "socat-sidecar-proxy", "Kind": "connect-proxy", "Port": 21001, "Address": ""}, "Checks": []},
            {"Node": {"Address": "10.0.0.9"}, "Service": {"ID": "a", "Service": "socat-sidecar-proxy", "Kind": "connect-proxy", "Port": 21000, "Address": "10.0.0.7"}, "Checks": []}
        ]"#;
        assert_eq!(
            health_endpoints(body).expect("parse"),
            ["10.0.0.7:21000", "10.0.0.9:21001"]
        );
        assert!(health_endpoints(b"{}").is_err());
    }
}
