//! Health-check endpoints: register and deregister agent checks, TTL updates, and the check
//! reads (`agent/checks`, `health/checks/:service`, `health/state/:state`).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{blocking_json, json_body, write, AgentState, Ctx};
use crate::acl::{require, Authorizer};
use crate::catalog::{from_value, ServiceInstance};
use crate::checks::{
    effective_status, floor_char_boundary, transition, CheckDefinition, CheckTarget, HealthCheck,
    CRITICAL, MAX_OUTPUT, PASSING, WARNING,
};
use crate::checks_runner::now_ms;
use crate::error::{Error, Result};
use crate::store::{Table, Transaction};

/// Write access to a check: `service:write` on its service, `operator:write` for a node check
/// (Consul asks `node:write`, which this control plane's rules do not have).
fn require_check_write(authorizer: &Authorizer, check: &HealthCheck) -> Result<()> {
    if check.service_id.is_empty() {
        require(authorizer.operator_write(), || "operator:write".to_owned())
    } else {
        require(authorizer.service_write(&check.service_name), || {
            format!("service:write on {}", check.service_name)
        })
    }
}

fn unknown_check(id: &str) -> Error {
    Error::NotFound(format!(
        "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."
    ))
}

/// The stored check `id`, if `authorizer` may write it.
fn writable_check(tx: &Transaction<'_>, authorizer: &Authorizer, id: &str) -> Result<HealthCheck> {
    let check: HealthCheck = tx
        .get(Table::Checks, id)?
        .ok_or_else(|| unknown_check(id))?;
    require_check_write(authorizer, &check)?;
    Ok(check)
}

/// `PUT /v1/agent/check/register`: a check on this node, or on a local service (`ServiceID`).
pub async fn register(State(agent): State<AgentState>, ctx: Ctx, body: Bytes) -> Result<Response> {
    let definition = CheckDefinition::parse(crate::casing::normalize(json_body(&body)?))?;
    let name = definition
        .name()
        .ok_or_else(|| Error::bad_request("Missing check name"))?
        .to_owned();
    let authorizer = ctx.authorizer(&agent)?;
    let node = agent.config.node_name.clone();
    let now = now_ms();
    write(&agent, move |tx| {
        let service = match definition.service_id() {
            None => None,
            Some(id) => Some(
                tx.get::<ServiceInstance>(Table::Services, id)?
                    .ok_or_else(|| Error::NotFound(format!("ServiceID {id:?} does not exist")))?,
            ),
        };
        let target = service.as_ref().map(|s| CheckTarget {
            id: &s.id,
            name: &s.service,
            tags: &s.tags,
        });
        let mut check = definition.clone().build(&node, &name, target, now)?;
        require_check_write(&authorizer, &check)?;
        if let Some(old) = tx.get::<HealthCheck>(Table::Checks, &check.check_id)? {
            require_check_write(&authorizer, &old)?;
            check.create_index = old.create_index;
        } else {
            check.create_index = tx.index();
        }
        check.modify_index = tx.index();
        tx.put(Table::Checks, &check.check_id.clone(), &check)
    })
    .await?;
    Ok(().into_response())
}

/// `PUT /v1/agent/check/deregister/:id`.
pub async fn deregister(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    write(&agent, move |tx| {
        writable_check(tx, &authorizer, &id)?;
        tx.delete(Table::Checks, &id)
    })
    .await?;
    Ok(().into_response())
}

async fn update_ttl(
    agent: AgentState,
    ctx: Ctx,
    id: String,
    status: &'static str,
    output: String,
) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    let now = now_ms();
    write(&agent, move |tx| {
        let check = writable_check(tx, &authorizer, &id)?;
        if check.check_type != "ttl" {
            return Err(Error::bad_request(format!(
                "CheckID {id:?} does not have associated TTL"
            )));
        }
        if let Some(mut next) = transition(&check, status, &output, now) {
            next.modify_index = tx.index();
            tx.put(Table::Checks, &id, &next)?;
        }
        Ok(())
    })
    .await?;
    Ok(().into_response())
}

fn note(ctx: &Ctx) -> String {
    let mut note = ctx.query.get("note").cloned().unwrap_or_default();
    note.truncate(floor_char_boundary(&note, MAX_OUTPUT));
    note
}

/// `PUT /v1/agent/check/pass/:id?note=`.
pub async fn pass(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response> {
    let note = note(&ctx);
    update_ttl(agent, ctx, id, PASSING, note).await
}

/// `PUT /v1/agent/check/warn/:id?note=`.
pub async fn warn(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response> {
    let note = note(&ctx);
    update_ttl(agent, ctx, id, WARNING, note).await
}

/// `PUT /v1/agent/check/fail/:id?note=`.
pub async fn fail(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response> {
    let note = note(&ctx);
    update_ttl(agent, ctx, id, CRITICAL, note).await
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct UpdateRequest {
    status: String,
    #[serde(default)]
    output: String,
}

/// `PUT /v1/agent/check/update/:id` with `{"Status": ..., "Output": ...}`.
pub async fn update(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let request: UpdateRequest =
        from_value(crate::casing::normalize(json_body(&body)?), "check update")?;
    let status = match request.status.as_str() {
        PASSING => PASSING,
        WARNING => WARNING,
        CRITICAL => CRITICAL,
        other => {
            return Err(Error::bad_request(format!(
                "Invalid check status: \"{other}\""
            )))
        }
    };
    let mut output = request.output;
    output.truncate(floor_char_boundary(&output, MAX_OUTPUT));
    update_ttl(agent, ctx, id, status, output).await
}

/// The checks `authorizer` may read, with alias statuses resolved.
fn readable(agent: &AgentState, authorizer: &Authorizer) -> Result<Vec<HealthCheck>> {
    let all: Vec<HealthCheck> = agent.store.list(Table::Checks)?;
    Ok(all
        .iter()
        .filter(|c| {
            if c.service_id.is_empty() {
                authorizer.node_read(&c.node)
            } else {
                authorizer.service_read(&c.service_name)
            }
        })
        .map(|c| HealthCheck {
            status: effective_status(c, &all).to_owned(),
            ..c.clone()
        })
        .collect())
}

/// `GET /v1/agent/checks`: this agent's checks by ID.
pub async fn agent_checks(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    blocking_json(&agent, &ctx, &[Table::Checks], |_| {
        Ok(readable(&agent, &authorizer)?
            .into_iter()
            .map(|c| (c.check_id.clone(), c))
            .collect::<BTreeMap<_, _>>())
    })
    .await
}

/// `GET /v1/health/checks/:service`: the checks of every instance of `service`.
pub async fn service_checks(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(service): Path<String>,
) -> Result<Response> {
    crate::catalog::validate_name(&service, "service name")?;
    let authorizer = ctx.authorizer(&agent)?;
    blocking_json(&agent, &ctx, &[Table::Checks], |_| {
        let mut checks = readable(&agent, &authorizer)?;
        checks.retain(|c| c.service_name == service);
        Ok(checks)
    })
    .await
}

/// `GET /v1/health/state/:state` (`any`, `passing`, `warning` or `critical`).
pub async fn state(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(state): Path<String>,
) -> Result<Response> {
    if !matches!(state.as_str(), "any" | PASSING | WARNING | CRITICAL) {
        return Err(Error::bad_request(format!(
            "Invalid check state: {state:?}"
        )));
    }
    let authorizer = ctx.authorizer(&agent)?;
    blocking_json(&agent, &ctx, &[Table::Checks], |_| {
        let mut checks = readable(&agent, &authorizer)?;
        checks.retain(|c| state == "any" || c.status == state);
        Ok(checks)
    })
    .await
}
