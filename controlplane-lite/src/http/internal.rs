//! Internal endpoints for the gateway and sidecars (ours, not Consul's). All block like Consul
//! queries, with `generation` in the body equal to `X-Consul-Index`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;

use super::{
    blocking_json, json_body, json_with_index, remote, wait_blocking, write, AgentState, Ctx,
};
use crate::acl::require;
use crate::agent::Agent;
use crate::catalog::{from_value, validate_name, ServiceInstance, KIND_MESH_GATEWAY};
use crate::checks::{routable, HealthCheck};
use crate::config_entries::ConfigEntry;
use crate::error::{Error, Result};
use crate::remote_dc::{health_endpoints, remote_none_upstreams, REMOTE_POLL};
use crate::routes::{
    mesh_gateway_routes, sidecar_config, FederationState, MeshView, SidecarConfig,
};
use crate::store::{Index, Table};

const ROUTE_TABLES: [Table; 4] = [
    Table::Services,
    Table::Checks,
    Table::FederationStates,
    Table::System,
];
const SIDECAR_TABLES: [Table; 5] = [
    Table::Services,
    Table::Checks,
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
        let checks: Vec<HealthCheck> = agent.store.list(Table::Checks)?;
        // Critical instances leave the routes (their health checks say so).
        let services: Vec<ServiceInstance> = routable(
            agent.store.list::<ServiceInstance>(Table::Services)?,
            &checks,
            "",
        )
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

/// The instances a sidecar's configuration can name: the proxy itself, the Connect endpoints
/// of its upstreams and the mesh gateways, found through the store's indexes so that a sidecar
/// answer costs the size of its upstreams, not of the catalog.
fn sidecar_candidates(agent: &Agent, proxy_id: &str) -> Result<Vec<ServiceInstance>> {
    let Some(proxy) = agent
        .store
        .get::<ServiceInstance>(Table::Services, proxy_id)?
    else {
        return Ok(Vec::new());
    };
    let mut candidates = agent
        .store
        .list_by::<ServiceInstance>(Index::ServiceKind, KIND_MESH_GATEWAY)?;
    for upstream in proxy.proxy.iter().flat_map(|p| p.upstreams.iter()) {
        candidates.extend(
            agent
                .store
                .list_by::<ServiceInstance>(Index::ConnectEndpoint, &upstream.destination_name)?,
        );
    }
    candidates.push(proxy);
    candidates.sort_by(|a, b| a.id.cmp(&b.id));
    candidates.dedup_by(|a, b| a.id == b.id);
    Ok(candidates)
}

/// `GET /v1/internal/sidecar/:proxy_id`: listeners and upstreams of one sidecar. Needs
/// `service:write` on the service it fronts (the same right that signs its leaf).
///
/// An upstream in mode `none` towards another datacenter dials that datacenter's sidecars,
/// which only its agent knows: they are read from it (`health/connect`, the caller's token)
/// when answering. Remote changes do not move the local index, so such a query blocks at
/// most `REMOTE_POLL` and the sidecar picks up remote changes within that time.
pub async fn sidecar(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(proxy_id): Path<String>,
) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    let compute = |generation| -> Result<SidecarConfig> {
        let trust_domain = agent.require_trust_domain()?;
        let candidates = sidecar_candidates(&agent, &proxy_id)?;
        let checks = super::catalog::checks_of(&agent, &candidates)?;
        let services = routable(candidates, &checks, &proxy_id);
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
    };
    let before = compute(agent.store.max_index(&SIDECAR_TABLES))?;
    let cap = (!remote_none_upstreams(&before).is_empty()).then_some(REMOTE_POLL);
    let index = wait_blocking(&agent, &ctx, &SIDECAR_TABLES, cap).await?;
    let mut config = compute(index)?;
    for i in remote_none_upstreams(&config) {
        let (name, dc) = (
            config.upstreams[i].destination_name.clone(),
            config.upstreams[i].datacenter.clone(),
        );
        let path = format!("/v1/health/connect/{name}");
        let answer = remote::get(&agent, &dc, path, ctx.token(), remote::READ_TIMEOUT).await;
        let endpoints = answer.and_then(|answer| match answer.status {
            200 => health_endpoints(&answer.body),
            status => Err(Error::Unavailable(format!(
                "{dc} answered {status}: {}",
                String::from_utf8_lossy(&answer.body).trim()
            ))),
        });
        match endpoints {
            Ok(endpoints) => config.upstreams[i].endpoints = endpoints,
            // Left empty: the sidecar refuses new connections to it (`no_endpoints`) until
            // the next answer, rather than dialling addresses nobody vouches for.
            Err(error) => {
                tracing::warn!(%error, upstream = %name, datacenter = %dc, "cannot read the remote catalog")
            }
        }
    }
    Ok(json_with_index(index, &config))
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
