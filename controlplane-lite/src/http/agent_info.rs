//! The endpoints tools call first: `agent/self`, `status/leader|peers`, one agent service,
//! and the node catalog. One agent per datacenter is also its only server, so it is the
//! leader and its only peer.

use axum::extract::{Path, State};
use axum::response::Response;
use serde_json::{json, Value};

use super::catalog::node_json;
use super::{blocking_json, json_with_index, AgentState, Ctx};
use crate::acl::require;
use crate::agent::Agent;
use crate::catalog::ServiceInstance;
use crate::error::{Error, Result};
use crate::store::Table;

/// The address other agents and tools reach this one at (the advertised HTTP address).
fn own_address(agent: &Agent) -> String {
    agent.advertised_http_address()
}

/// A service in Consul's `api.AgentService` shape: the stored instance plus `Datacenter`.
pub fn agent_service_json(agent: &Agent, service: &ServiceInstance) -> Result<Value> {
    let mut value = serde_json::to_value(service).map_err(|e| Error::Internal(e.to_string()))?;
    if let Some(object) = value.as_object_mut() {
        object.insert("Datacenter".to_owned(), json!(agent.config.datacenter));
    }
    Ok(value)
}

/// This node as the catalog shows it ([`node_json`]), with its indexes.
fn node_row(agent: &Agent, index: u64) -> Value {
    let mut node = node_json(agent);
    if let Some(object) = node.as_object_mut() {
        object.insert("CreateIndex".to_owned(), json!(index));
        object.insert("ModifyIndex".to_owned(), json!(index));
    }
    node
}

/// `GET /v1/agent/self` (`node:read` on this node, as Consul's `agent:read`).
pub async fn agent_self(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    let node = agent.config.node_name.clone();
    require(authorizer.node_read(&node), || {
        format!("node:read on {node}")
    })?;
    let address = own_address(&agent);
    let (host, port) = address.rsplit_once(':').unwrap_or((address.as_str(), "0"));
    let version = env!("CARGO_PKG_VERSION");
    Ok(json_with_index(
        0,
        &json!({
            "Config": {
                "Datacenter": agent.config.datacenter,
                "PrimaryDatacenter": agent.config.primary_datacenter,
                "NodeName": node,
                "NodeID": "",
                "Server": true,
                "Revision": "",
                "Version": version,
                "BuildDate": "",
            },
            "DebugConfig": {},
            "Coord": null,
            "Member": {
                "Name": node,
                "Addr": host.trim_start_matches('[').trim_end_matches(']'),
                "Port": port.parse::<u16>().unwrap_or(0),
                "Tags": {"dc": agent.config.datacenter, "role": "consul", "build": version},
                "Status": 1,
            },
            "Meta": {},
            "Stats": {"store": store_stats(&agent), "replication": replication_stats(&agent)},
            "xDS": null,
        }),
    ))
}

/// The store's health in `agent/self`'s `Stats` (Consul's stats are maps of strings).
fn store_stats(agent: &Agent) -> Value {
    match agent.store.read_only() {
        None => json!({"healthy": "true", "read_only": "false"}),
        Some(cause) => json!({"healthy": "false", "read_only": "true", "error": cause}),
    }
}

/// A secondary's link to the primary in `agent/self`'s `Stats` (empty in the primary).
fn replication_stats(agent: &Agent) -> Value {
    if agent.primary.is_none() {
        return json!({});
    }
    let age = agent.metrics.primary_contact_age();
    let healthy = age.is_some_and(|a| a <= crate::metrics::CONTACT_STALE_AFTER);
    json!({
        "healthy": healthy.to_string(),
        "last_contact_seconds": age.map_or_else(|| "never".to_owned(), |a| format!("{a:.1}")),
    })
}

/// `GET /v1/status/leader`: the address of the agent that leads this datacenter (no ACL, like
/// Consul), or `""` when no agent can commit writes. With one agent that is this agent, `""`
/// while its store is read-only after a disk error (`agent/self` `Stats.store` says why). With
/// agents sharing an etcd cluster it is the holder of the election key, read from etcd, and
/// `""` when etcd does not answer (this agent cannot commit writes then either).
pub async fn status_leader(State(agent): State<AgentState>) -> Result<Response> {
    if agent.store.read_only().is_some() {
        return Ok(json_with_index(0, &""));
    }
    let Some(cluster) = &agent.cluster else {
        return Ok(json_with_index(0, &own_address(&agent)));
    };
    let mut client = cluster.client.clone();
    match crate::leader::leader_address(&mut client, &cluster.keys).await {
        Ok(address) => Ok(json_with_index(0, &address)),
        Err(error) => {
            tracing::debug!(%error, "status/leader: etcd did not answer");
            Ok(json_with_index(0, &""))
        }
    }
}

/// `GET /v1/status/peers`: the agents serving this datacenter: this agent alone, or every
/// agent registered in the shared etcd cluster (each under its lease, so a dead one leaves
/// within one TTL). 503 when etcd does not answer.
pub async fn status_peers(State(agent): State<AgentState>) -> Result<Response> {
    let Some(cluster) = &agent.cluster else {
        return Ok(json_with_index(0, &[own_address(&agent)]));
    };
    let mut client = cluster.client.clone();
    let peers = crate::leader::peer_addresses(&mut client, &cluster.keys)
        .await
        .map_err(|e| Error::Unavailable(format!("etcd: {e}")))?;
    Ok(json_with_index(0, &peers))
}

/// `GET /v1/agent/service/:id` (`service:read`); Consul's 404 text for an unknown ID.
pub async fn agent_service(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    blocking_json(&agent, &ctx, &[Table::Services], |_| {
        let service: ServiceInstance = agent
            .store
            .get(Table::Services, &id)?
            .ok_or_else(|| Error::NotFound(format!("unknown service ID: {id}")))?;
        require(authorizer.service_read(&service.service), || {
            format!("service:read on {}", service.service)
        })?;
        agent_service_json(&agent, &service)
    })
    .await
}

/// `GET /v1/catalog/nodes`: this agent's node, if `node:read` allows it.
pub async fn catalog_nodes(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    blocking_json(&agent, &ctx, &[Table::Services], |index| {
        let nodes: Vec<Value> = if authorizer.node_read(&agent.config.node_name) {
            vec![node_row(&agent, index)]
        } else {
            Vec::new()
        };
        Ok(nodes)
    })
    .await
}

/// `GET /v1/catalog/node/:node`: the node and its services (filtered by `service:read`);
/// `null` for an unknown or unreadable node, as Consul answers.
pub async fn catalog_node(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(node): Path<String>,
) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    blocking_json(&agent, &ctx, &[Table::Services], |index| {
        if node != agent.config.node_name || !authorizer.node_read(&node) {
            return Ok(Value::Null);
        }
        let mut services = serde_json::Map::new();
        for service in agent.store.list::<ServiceInstance>(Table::Services)? {
            if authorizer.service_read(&service.service) {
                services.insert(service.id.clone(), agent_service_json(&agent, &service)?);
            }
        }
        Ok(json!({"Node": node_row(&agent, index), "Services": services}))
    })
    .await
}
