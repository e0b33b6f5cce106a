//! Internal endpoints for the gateway and sidecars (ours, not Consul's). All block like Consul
//! queries, with `generation` in the body equal to `X-Consul-Index`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;

use super::{blocking_json, json_body, json_with_index, write, AgentState, Ctx};
use crate::acl::require;
use crate::catalog::{from_value, validate_name, ServiceInstance};
use crate::config_entries::ConfigEntry;
use crate::error::{Error, Result};
use crate::routes::{mesh_gateway_routes, sidecar_config, FederationState, MeshView};
use crate::store::Table;

const ROUTE_TABLES: [Table; 3] = [Table::Services, Table::FederationStates, Table::System];
const SIDECAR_TABLES: [Table; 4] = [
    Table::Services,
    Table::FederationStates,
    Table::ConfigEntries,
    Table::System,
];

/// `GET /v1/internal/mesh-gateway/routes?datacenter=DC`: the route table of a mesh gateway in
/// this datacenter. Services the token cannot read are left out (a gateway token has
/// `service_prefix "" { policy = "read" }`).
pub async fn routes(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    if let Some(dc) = ctx.query.get("datacenter").filter(|d| !d.is_empty()) {
        if *dc != agent.config.datacenter {
            return Err(Error::bad_request(format!(
                "query parameter `datacenter`: this agent serves {:?}, not {dc:?}",
                agent.config.datacenter
            )));
        }
    }
    let authorizer = ctx.authorizer(&agent)?;
    blocking_json(&agent, &ctx, &ROUTE_TABLES, |generation| {
        let trust_domain = agent.require_trust_domain()?;
        let services: Vec<ServiceInstance> = agent
            .store
            .list::<ServiceInstance>(Table::Services)?
            .into_iter()
            .filter(|s| {
                let target = s
                    .proxy
                    .as_ref()
                    .map_or(s.service.as_str(), |p| p.destination_service_name.as_str());
                authorizer.service_read(&s.service) && authorizer.service_read(target)
            })
            .collect();
        let mut federation: Vec<FederationState> = agent.store.list(Table::FederationStates)?;
        for state in &mut federation {
            state
                .mesh_gateways
                .retain(|g| authorizer.service_read(&g.service));
        }
        Ok(mesh_gateway_routes(&MeshView {
            datacenter: &agent.config.datacenter,
            trust_domain: &trust_domain,
            node_address: &agent.config.node_address,
            services: &services,
            federation: &federation,
            config_entries: &[],
            generation,
        }))
    })
    .await
}

/// `GET /v1/internal/sidecar/:proxy_id`: listeners and upstreams of one sidecar. Needs
/// `service:write` on the service it fronts (the same right that signs its leaf).
pub async fn sidecar(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(proxy_id): Path<String>,
) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    blocking_json(&agent, &ctx, &SIDECAR_TABLES, |generation| {
        let trust_domain = agent.require_trust_domain()?;
        let services: Vec<ServiceInstance> = agent.store.list(Table::Services)?;
        let federation: Vec<FederationState> = agent.store.list(Table::FederationStates)?;
        let entries: Vec<ConfigEntry> = agent.store.list(Table::ConfigEntries)?;
        let config = sidecar_config(
            &MeshView {
                datacenter: &agent.config.datacenter,
                trust_domain: &trust_domain,
                node_address: &agent.config.node_address,
                services: &services,
                federation: &federation,
                config_entries: &entries,
                generation,
            },
            &proxy_id,
        )?;
        require(authorizer.service_write(&config.service), || {
            format!("service:write on {}", config.service)
        })?;
        Ok(config)
    })
    .await
}

/// `GET /v1/internal/federation-states` (`operator:read`).
pub async fn federation_states(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    require(authorizer.operator_read(), || "operator:read".to_owned())?;
    blocking_json(&agent, &ctx, &[Table::FederationStates], |_| {
        agent.store.list::<FederationState>(Table::FederationStates)
    })
    .await
}

/// `GET /v1/internal/federation-state/:dc` (`operator:read`).
pub async fn read_federation_state(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(dc): Path<String>,
) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    require(authorizer.operator_read(), || "operator:read".to_owned())?;
    blocking_json(&agent, &ctx, &[Table::FederationStates], |_| {
        agent
            .store
            .get::<FederationState>(Table::FederationStates, &dc)?
            .ok_or_else(|| Error::NotFound(format!("no federation state for {dc:?}")))
    })
    .await
}

/// `PUT /v1/internal/federation-state/:dc` (`operator:write`): sets the WAN addresses of a
/// datacenter's gateways. Normally written by the datacenters themselves (a secondary pushes its
/// own state here in the primary with the replication token; see `replication::runner`); an
/// operator may use it as an override. In a secondary the write is forwarded to the primary.
pub async fn write_federation_state(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(dc): Path<String>,
    body: Bytes,
) -> Result<Response> {
    validate_name(&dc, "datacenter")?;
    if dc == agent.config.datacenter {
        return Err(Error::bad_request(
            "the local datacenter's gateways come from its catalog; set remote datacenters only",
        ));
    }
    let mut state: FederationState = from_value(
        crate::casing::normalize(json_body(&body)?),
        "federation state",
    )?;
    if !state.datacenter.is_empty() && state.datacenter != dc {
        return Err(Error::bad_request(
            "field `Datacenter` does not match the URL",
        ));
    }
    state.validate()?;
    let authorizer = ctx.authorizer(&agent)?;
    require(authorizer.operator_write(), || "operator:write".to_owned())?;
    state.datacenter = dc.clone();
    write(&agent, move |tx| {
        state.modify_index = tx.index();
        tx.put(Table::FederationStates, &dc, &state)
    })
    .await?;
    Ok(json_with_index(
        agent.store.index(Table::FederationStates),
        &true,
    ))
}

/// `DELETE /v1/internal/federation-state/:dc` (`operator:write`).
pub async fn delete_federation_state(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(dc): Path<String>,
) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    require(authorizer.operator_write(), || "operator:write".to_owned())?;
    write(&agent, move |tx| tx.delete(Table::FederationStates, &dc)).await?;
    Ok(json_with_index(
        agent.store.index(Table::FederationStates),
        &true,
    ))
}
