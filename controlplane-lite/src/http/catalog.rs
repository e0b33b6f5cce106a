//! Catalog, health and agent-service endpoints.

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{blocking_json, json_body, write, AgentState, Ctx};
use crate::acl::{require, Authorizer};
use crate::agent::Agent;
use crate::catalog::{
    parse_definitions, plan_registration, ServiceDefinition, ServiceInstance, KIND_CONNECT_PROXY,
};
use crate::checks::{
    service_status, shown_checks, sidecar_alias, CheckDefinition, CheckTarget, HealthCheck, PASSING,
};
use crate::error::{Error, Result};
use crate::routes::FederationState;
use crate::store::{Table, Transaction};

/// `GET /v1/catalog/datacenters`: this datacenter first, then the primary and every datacenter
/// with known gateways, by name. No ACL, like Consul.
pub async fn datacenters(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    blocking_json(&agent, &ctx, &[Table::FederationStates], |_| {
        let local = agent.config.datacenter.clone();
        let mut others = BTreeSet::from([agent.config.primary_datacenter.clone()]);
        for state in agent
            .store
            .list::<FederationState>(Table::FederationStates)?
        {
            others.insert(state.datacenter);
        }
        // Consul sorts by round-trip time, so the local datacenter always comes first.
        others.remove(&local);
        Ok(std::iter::once(local).chain(others).collect::<Vec<_>>())
    })
    .await
}

fn visible(agent: &Agent, ctx: &Ctx) -> Result<(Authorizer, Vec<ServiceInstance>)> {
    let authorizer = ctx.authorizer(agent)?;
    let services = agent.store.list::<ServiceInstance>(Table::Services)?;
    let services = services
        .into_iter()
        .filter(|s| authorizer.service_read(&s.service))
        .collect();
    Ok((authorizer, services))
}

/// `GET /v1/catalog/services`: names and tags, filtered by `service:read`.
pub async fn services(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    blocking_json(&agent, &ctx, &[Table::Services], |_| {
        let (_, services) = visible(&agent, &ctx)?;
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for service in services {
            out.entry(service.service).or_default().extend(service.tags);
        }
        Ok(out)
    })
    .await
}

/// This node in Consul's `structs.Node` shape (its only node: one agent per datacenter).
pub(super) fn node_json(agent: &Agent) -> Value {
    json!({
        "ID": "",
        "Node": agent.config.node_name,
        "Address": agent.config.node_address,
        "Datacenter": agent.config.datacenter,
        "TaggedAddresses": {"lan": agent.config.node_address, "wan": agent.config.node_address},
        "Meta": {},
    })
}

fn service_node_row(agent: &Agent, s: &ServiceInstance) -> Value {
    json!({
        "ID": "",
        "Node": agent.config.node_name,
        "Address": agent.config.node_address,
        "Datacenter": agent.config.datacenter,
        "TaggedAddresses": {"lan": agent.config.node_address, "wan": agent.config.node_address},
        "NodeMeta": {},
        "ServiceKind": s.kind,
        "ServiceID": s.id,
        "ServiceName": s.service,
        "ServiceTags": s.tags,
        "ServiceAddress": s.address,
        "ServiceTaggedAddresses": s.tagged_addresses,
        "ServiceWeights": s.weights,
        "ServiceMeta": s.meta,
        "ServicePort": s.port,
        "ServiceEnableTagOverride": s.enable_tag_override,
        "ServiceProxy": s.proxy,
        "ServiceConnect": s.connect,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

fn health_row(agent: &Agent, s: &ServiceInstance, checks: &[HealthCheck]) -> Value {
    json!({"Node": node_json(agent), "Service": s, "Checks": shown_checks(&s.id, checks)})
}

fn catalog_row(agent: &Agent, s: &ServiceInstance, _checks: &[HealthCheck]) -> Value {
    service_node_row(agent, s)
}

/// The tables a health or catalog read depends on (checks move `passing`).
const HEALTH_TABLES: [Table; 2] = [Table::Services, Table::Checks];

async fn rows(
    agent: AgentState,
    ctx: Ctx,
    name: String,
    keep: fn(&ServiceInstance, &str) -> bool,
    shape: fn(&Agent, &ServiceInstance, &[HealthCheck]) -> Value,
) -> Result<Response> {
    crate::catalog::validate_name(&name, "service name")?;
    // `?tag=` may repeat; an instance must carry every tag asked for (Consul's semantics).
    let tags: Vec<String> = ctx
        .query_all
        .iter()
        .filter(|(key, _)| key == "tag")
        .map(|(_, value)| value.clone())
        .collect();
    // `?passing` (any value but `false`, as Consul): only instances whose checks all pass.
    let passing = ctx
        .query
        .get("passing")
        .is_some_and(|v| v != "false" && v != "0");
    blocking_json(&agent, &ctx, &HEALTH_TABLES, |_| {
        let (_, services) = visible(&agent, &ctx)?;
        let checks: Vec<HealthCheck> = agent.store.list(Table::Checks)?;
        Ok(services
            .iter()
            .filter(|s| keep(s, &name))
            .filter(|s| tags.iter().all(|tag| s.tags.contains(tag)))
            .filter(|s| !passing || service_status(&s.id, &checks) == PASSING)
            .map(|s| shape(&agent, s, &checks))
            .collect::<Vec<_>>())
    })
    .await
}

fn by_name(s: &ServiceInstance, name: &str) -> bool {
    s.service == name
}

fn connect_for(s: &ServiceInstance, name: &str) -> bool {
    s.is_connect_endpoint_for(name)
}

/// `GET /v1/catalog/service/:name`.
pub async fn service_nodes(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(name): Path<String>,
) -> Result<Response> {
    rows(agent, ctx, name, by_name, catalog_row).await
}

/// `GET /v1/catalog/connect/:name`: Connect-capable instances (sidecars) of `name`.
pub async fn connect_nodes(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(name): Path<String>,
) -> Result<Response> {
    rows(agent, ctx, name, connect_for, catalog_row).await
}

/// `GET /v1/health/service/:name`.
pub async fn health_service(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(name): Path<String>,
) -> Result<Response> {
    rows(agent, ctx, name, by_name, health_row).await
}

/// `GET /v1/health/connect/:name`: what gateways route `name`'s SNI to. With `?dc=` naming
/// another datacenter, that datacenter's agent answers (`remote::forward_dc_reads`).
pub async fn health_connect(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(name): Path<String>,
) -> Result<Response> {
    rows(agent, ctx, name, connect_for, health_row).await
}

/// `GET /v1/agent/services`: this agent's instances by ID.
pub async fn agent_services(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    blocking_json(&agent, &ctx, &[Table::Services], |_| {
        let (_, services) = visible(&agent, &ctx)?;
        let mut out = BTreeMap::new();
        for service in services {
            out.insert(
                service.id.clone(),
                super::agent_info::agent_service_json(&agent, &service)?,
            );
        }
        Ok(out)
    })
    .await
}

/// Stores one registration inside a transaction, checking `service:write` on every name it
/// creates. Returns the IDs written.
fn store_registration(
    tx: &mut Transaction<'_>,
    definition: ServiceDefinition,
    authorizer: &Authorizer,
    node: &str,
    now_ms: u64,
) -> Result<Vec<String>> {
    let service_checks = check_definitions(definition.check.clone(), definition.checks.clone())?;
    let sidecar_checks = match definition
        .connect
        .as_ref()
        .and_then(|c| c.sidecar_service.as_ref())
    {
        Some(sidecar) => check_definitions(sidecar.check.clone(), sidecar.checks.clone())?,
        None => Vec::new(),
    };
    let services: Vec<ServiceInstance> = tx.list(Table::Services)?;
    let parent_id = definition
        .id
        .clone()
        .or_else(|| definition.name.clone())
        .unwrap_or_default();
    let previous_sidecar = services
        .iter()
        .find(|s| {
            s.kind == KIND_CONNECT_PROXY
                && s.proxy
                    .as_ref()
                    .is_some_and(|p| p.destination_service_id == parent_id)
        })
        .cloned();
    let taken: BTreeSet<u16> = services
        .iter()
        .filter(|s| {
            s.kind == KIND_CONNECT_PROXY && previous_sidecar.as_ref().is_none_or(|p| p.id != s.id)
        })
        .map(|s| s.port)
        .collect();
    let plan = plan_registration(
        definition,
        &taken,
        previous_sidecar.as_ref().map(|s| s.port),
    )?;
    let mut planned_checks = build_checks(&plan.service, service_checks, node, now_ms)?;
    if let Some(sidecar) = &plan.sidecar {
        planned_checks.extend(build_checks(sidecar, sidecar_checks, node, now_ms)?);
        planned_checks.push(sidecar_alias(
            node,
            CheckTarget {
                id: &sidecar.id,
                name: &sidecar.service,
                tags: &sidecar.tags,
            },
            &plan.service.id,
        ));
    }
    let mut instances = vec![plan.service];
    instances.extend(plan.sidecar);
    // Replacing an instance (same ID) or dropping the old sidecar also needs write on what is
    // replaced; otherwise a token for `web` could overwrite the instance `socat`.
    let replaced = services
        .iter()
        .filter(|s| instances.iter().any(|i| i.id == s.id))
        .chain(previous_sidecar.iter());
    for existing in replaced {
        require(authorizer.service_write(&existing.service), || {
            format!("service:write on {}", existing.service)
        })?;
    }
    for instance in &instances {
        require(authorizer.service_write(&instance.service), || {
            format!("service:write on {}", instance.service)
        })?;
        if let Some(proxy) = &instance.proxy {
            if instance.kind == KIND_CONNECT_PROXY {
                require(
                    authorizer.service_write(&proxy.destination_service_name),
                    || format!("service:write on {}", proxy.destination_service_name),
                )?;
            }
        }
    }
    if let Some(previous) = previous_sidecar {
        if instances.iter().all(|i| i.id != previous.id) {
            deregister_service(tx, &previous.id)?;
        }
    }
    replace_checks(tx, &instances, planned_checks)?;
    let mut ids = Vec::new();
    for mut instance in instances {
        let existing = services.iter().find(|s| s.id == instance.id);
        instance.create_index = existing.map_or(tx.index(), |e| e.create_index);
        instance.modify_index = tx.index();
        tx.put(Table::Services, &instance.id, &instance)?;
        ids.push(instance.id);
    }
    Ok(ids)
}

/// The check definitions of a registration (`Check` and `Checks`).
fn check_definitions(
    check: Option<Value>,
    checks: Option<Vec<Value>>,
) -> Result<Vec<CheckDefinition>> {
    check
        .into_iter()
        .chain(checks.unwrap_or_default())
        .map(CheckDefinition::parse)
        .collect()
}

/// Builds an instance's checks; IDs default to Consul's `service:<id>` (`:<n>` when several).
fn build_checks(
    instance: &ServiceInstance,
    definitions: Vec<CheckDefinition>,
    node: &str,
    now_ms: u64,
) -> Result<Vec<HealthCheck>> {
    let several = definitions.len() > 1;
    definitions
        .into_iter()
        .enumerate()
        .map(|(i, definition)| {
            let default_id = if several {
                format!("service:{}:{}", instance.id, i + 1)
            } else {
                format!("service:{}", instance.id)
            };
            definition.build(
                node,
                &default_id,
                Some(CheckTarget {
                    id: &instance.id,
                    name: &instance.service,
                    tags: &instance.tags,
                }),
                now_ms,
            )
        })
        .collect()
}

/// Replaces the checks of `instances` with `planned`. A check re-registered unchanged keeps
/// its status, so re-registering a service does not flap it to critical.
fn replace_checks(
    tx: &mut Transaction<'_>,
    instances: &[ServiceInstance],
    planned: Vec<HealthCheck>,
) -> Result<()> {
    let existing: Vec<HealthCheck> = tx.list(Table::Checks)?;
    for old in existing
        .iter()
        .filter(|c| instances.iter().any(|i| i.id == c.service_id))
    {
        tx.delete(Table::Checks, &old.check_id)?;
    }
    for mut check in planned {
        if let Some(old) = existing.iter().find(|c| c.check_id == check.check_id) {
            if old.definition == check.definition && old.check_type == check.check_type {
                check.status = old.status.clone();
                check.output = old.output.clone();
                check.critical_since_ms = old.critical_since_ms;
                check.ttl_deadline_ms = old.ttl_deadline_ms;
            }
            check.create_index = old.create_index;
        } else {
            check.create_index = tx.index();
        }
        check.modify_index = tx.index();
        tx.put(Table::Checks, &check.check_id.clone(), &check)?;
    }
    Ok(())
}

/// Removes instance `id`, the sidecars that front it, and their checks (no ACL check: the
/// caller has done it, or is the agent itself). Returns the removed instance.
pub fn deregister_service(tx: &mut Transaction<'_>, id: &str) -> Result<Option<ServiceInstance>> {
    let instance = tx.get::<ServiceInstance>(Table::Services, id)?;
    let services: Vec<ServiceInstance> = tx.list(Table::Services)?;
    let mut removed: Vec<String> = services
        .iter()
        .filter(|s| {
            s.kind == KIND_CONNECT_PROXY
                && s.proxy
                    .as_ref()
                    .is_some_and(|p| p.destination_service_id == id)
        })
        .map(|s| s.id.clone())
        .collect();
    removed.push(id.to_owned());
    let checks: Vec<HealthCheck> = tx.list(Table::Checks)?;
    for check in checks.iter().filter(|c| removed.contains(&c.service_id)) {
        tx.delete(Table::Checks, &check.check_id)?;
    }
    for service in &removed {
        tx.delete(Table::Services, service)?;
    }
    // Checks of an instance that is already gone are removed too, so the check runner never
    // asks again for the same deregistration.
    Ok(instance)
}

/// Registers definitions from the agent's own config dir (trusted: management rights).
pub async fn register_local(agent: &AgentState, definitions: Vec<ServiceDefinition>) -> Result<()> {
    let node = agent.config.node_name.clone();
    let now = crate::checks_runner::now_ms();
    write(agent, move |tx| {
        let authorizer = Authorizer::management();
        for definition in definitions.clone() {
            store_registration(tx, definition, &authorizer, &node, now)?;
        }
        Ok(())
    })
    .await
}

/// `PUT /v1/agent/service/register`: the API form (PascalCase or snake_case) or the file form
/// `{"service": {...}}` / `{"services": [...]}`. All definitions are stored in one transaction.
pub async fn register(State(agent): State<AgentState>, ctx: Ctx, body: Bytes) -> Result<Response> {
    let definitions = parse_definitions(json_body(&body)?)?;
    let authorizer = ctx.authorizer(&agent)?;
    let node = agent.config.node_name.clone();
    let now = crate::checks_runner::now_ms();
    write(&agent, move |tx| {
        for definition in definitions.clone() {
            store_registration(tx, definition, &authorizer, &node, now)?;
        }
        Ok(())
    })
    .await?;
    Ok(().into_response())
}

/// `PUT /v1/agent/service/deregister/:id`: removes the instance, its managed sidecar and
/// their checks.
pub async fn deregister(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    write(&agent, move |tx| {
        let instance: ServiceInstance = tx
            .get(Table::Services, &id)?
            .ok_or_else(|| Error::NotFound(format!(
                    "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
                )))?;
        require(authorizer.service_write(&instance.service), || {
            format!("service:write on {}", instance.service)
        })?;
        deregister_service(tx, &id)?;
        Ok(())
    })
    .await?;
    Ok(().into_response())
}

/// `PUT /v1/agent/reload`: registers the config dir's definitions again (`operator:write`).
/// Definitions removed from the directory stay registered until deregistered.
pub async fn reload(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    require(authorizer.operator_write(), || "operator:write".to_owned())?;
    let reader = agent.clone();
    let definitions = tokio::task::spawn_blocking(move || reader.read_config_dir())
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    register_local(&agent, definitions).await?;
    Ok(().into_response())
}
