//! Intention endpoints (`/v1/connect/intentions`) and `/v1/agent/connect/authorize`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;

use super::{blocking_json, json_body, json_with_index, write, AgentState, Ctx};
use crate::acl::{require, Authorizer};
use crate::ca::rfc3339;
use crate::catalog::from_value;
use crate::error::{Error, Result};
use crate::intentions::{
    authorize as decide, evaluation_order, matches, Intention, IntentionRequest, MatchBy,
};
use crate::spiffe::SpiffeId;
use crate::store::{Table, Transaction};

/// Consul's text for an unknown intention (404).
const INTENTION_NOT_FOUND: &str = "Intention not found";

fn parse_request(body: &[u8]) -> Result<IntentionRequest> {
    from_value(crate::casing::normalize(json_body(body)?), "intention")
}

fn same_pair(a: &Intention, b: &Intention) -> bool {
    (
        &a.source_ns,
        &a.source_name,
        &a.destination_ns,
        &a.destination_name,
    ) == (
        &b.source_ns,
        &b.source_name,
        &b.destination_ns,
        &b.destination_name,
    )
}

fn ensure_unique(tx: &Transaction<'_>, candidate: &Intention) -> Result<()> {
    let all: Vec<Intention> = tx.list(Table::Intentions)?;
    if let Some(existing) = all
        .iter()
        .find(|i| i.id != candidate.id && same_pair(i, candidate))
    {
        return Err(Error::Conflict(format!(
            "duplicate intention found: {}/{} => {}/{} (ID: {})",
            existing.source_ns,
            existing.source_name,
            existing.destination_ns,
            existing.destination_name,
            existing.id
        )));
    }
    Ok(())
}

/// `POST /v1/connect/intentions`: creates; answers `{"ID": ...}`. Needs `intentions:write` on
/// the destination; a second intention for the same pair is a 409.
pub async fn create(State(agent): State<AgentState>, ctx: Ctx, body: Bytes) -> Result<Response> {
    let request = parse_request(&body)?;
    let mut intention = request.into_intention(
        uuid::Uuid::new_v4().to_string(),
        &rfc3339(OffsetDateTime::now_utc()),
    )?;
    let authorizer = ctx.authorizer(&agent)?;
    may_write(&authorizer, &intention.destination_name)?;
    let id = write(&agent, move |tx| {
        ensure_unique(tx, &intention)?;
        intention.create_index = tx.index();
        intention.modify_index = tx.index();
        tx.put(Table::Intentions, &intention.id, &intention)?;
        Ok(intention.id.clone())
    })
    .await?;
    Ok(json_with_index(
        agent.store.index(Table::Intentions),
        &json!({ "ID": id }),
    ))
}

/// `PUT /v1/connect/intentions/:id`: replaces the writable fields.
pub async fn update(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let request = parse_request(&body)?;
    if request
        .id
        .as_ref()
        .is_some_and(|body_id| !body_id.is_empty() && *body_id != id)
    {
        return Err(Error::bad_request("field `ID` does not match the URL"));
    }
    let mut updated = request.into_intention(id.clone(), &rfc3339(OffsetDateTime::now_utc()))?;
    let authorizer = ctx.authorizer(&agent)?;
    write(&agent, move |tx| {
        let existing: Intention = tx
            .get(Table::Intentions, &id)?
            .ok_or_else(|| Error::NotFound(INTENTION_NOT_FOUND.to_owned()))?;
        for destination in [&existing.destination_name, &updated.destination_name] {
            may_write(&authorizer, destination)?;
        }
        ensure_unique(tx, &updated)?;
        updated.created_at = existing.created_at;
        updated.create_index = existing.create_index;
        updated.modify_index = tx.index();
        tx.put(Table::Intentions, &id, &updated)
    })
    .await?;
    Ok(json_with_index(agent.store.index(Table::Intentions), &true))
}

/// `DELETE /v1/connect/intentions/:id`.
pub async fn delete(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    write(&agent, move |tx| {
        let existing: Intention = tx
            .get(Table::Intentions, &id)?
            .ok_or_else(|| Error::NotFound(INTENTION_NOT_FOUND.to_owned()))?;
        may_write(&authorizer, &existing.destination_name)?;
        tx.delete(Table::Intentions, &id)
    })
    .await?;
    Ok(json_with_index(agent.store.index(Table::Intentions), &true))
}

/// `GET /v1/connect/intentions/:id` (blocking).
pub async fn read(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    blocking_json(&agent, &ctx, &[Table::Intentions], |_| {
        let intention: Intention = agent
            .store
            .get(Table::Intentions, &id)?
            .ok_or_else(|| Error::NotFound(INTENTION_NOT_FOUND.to_owned()))?;
        may_read(&authorizer, &intention.destination_name)?;
        Ok(intention)
    })
    .await
}

/// `GET /v1/connect/intentions` (blocking): readable intentions in evaluation order.
pub async fn list(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    blocking_json(&agent, &ctx, &[Table::Intentions], |_| {
        let mut all: Vec<Intention> = agent.store.list(Table::Intentions)?;
        all.retain(|i| authorizer.intention_read(&i.destination_name));
        all.sort_by(evaluation_order);
        Ok(all)
    })
    .await
}

/// `GET /v1/connect/intentions/check?source=&destination=`: `{"Allowed": bool}`, with the ACL
/// default policy deciding when no intention matches.
pub async fn check(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let source = ctx.param("source")?.to_owned();
    let destination = ctx.param("destination")?.to_owned();
    let authorizer = ctx.authorizer(&agent)?;
    may_read(&authorizer, &destination)?;
    blocking_json(&agent, &ctx, &[Table::Intentions], |_| {
        let all: Vec<Intention> = agent.store.list(Table::Intentions)?;
        let decision = decide(&all, &source, &destination, agent.config.default_policy);
        Ok(json!({ "Allowed": decision.allowed }))
    })
    .await
}

/// `GET /v1/connect/intentions/match?by=source|destination&name=...` (name repeatable):
/// `{"name": [intentions in evaluation order]}`.
pub async fn match_intentions(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let by = match ctx.param("by")? {
        "source" => MatchBy::Source,
        "destination" => MatchBy::Destination,
        other => {
            return Err(Error::bad_request(format!(
                "invalid query parameter `by` {other:?}: source or destination"
            )))
        }
    };
    let names: Vec<String> = ctx
        .query_all
        .iter()
        .filter(|(k, _)| k == "name")
        .map(|(_, v)| v.clone())
        .collect();
    if names.is_empty() {
        return Err(Error::bad_request("missing query parameter `name`"));
    }
    let authorizer = ctx.authorizer(&agent)?;
    for name in &names {
        may_read(&authorizer, name)?;
    }
    blocking_json(&agent, &ctx, &[Table::Intentions], |_| {
        let all: Vec<Intention> = agent.store.list(Table::Intentions)?;
        let out: BTreeMap<&String, Vec<&Intention>> =
            names.iter().map(|n| (n, matches(&all, by, n))).collect();
        serde_json::to_value(out).map_err(|e| Error::Internal(e.to_string()))
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct AuthorizeRequest {
    target: String,
    #[serde(rename = "ClientCertURI")]
    client_cert_uri: String,
    #[serde(default)]
    client_cert_serial: String,
}

/// `POST /v1/agent/connect/authorize`: what a destination sidecar asks after the handshake.
/// Needs `service:write` on the target. The client's trust domain and datacenter are not
/// compared (Consul does the same: intentions are global).
pub async fn authorize(State(agent): State<AgentState>, ctx: Ctx, body: Bytes) -> Result<Response> {
    let request: AuthorizeRequest = from_value(
        crate::casing::normalize(json_body(&body)?),
        "authorize request",
    )?;
    crate::catalog::validate_name(&request.target, "Target")?;
    let client = SpiffeId::parse(&request.client_cert_uri).map_err(|_| {
        Error::bad_request(format!(
            "invalid field `ClientCertURI` {:?}",
            request.client_cert_uri
        ))
    })?;
    let _ = request.client_cert_serial;
    let authorizer = ctx.authorizer(&agent)?;
    require(authorizer.service_write(&request.target), || {
        format!("service:write on {}", request.target)
    })?;
    let all: Vec<Intention> = agent.store.list(Table::Intentions)?;
    let decision = decide(
        &all,
        &client.service,
        &request.target,
        agent.config.default_policy,
    );
    Ok(json_with_index(
        agent.store.index(Table::Intentions),
        &json!({"Authorized": decision.allowed, "Reason": decision.reason}),
    ))
}

/// `intentions:write` on `destination`, the ACL every intention write needs.
fn may_write(authorizer: &Authorizer, destination: &str) -> Result<()> {
    require(authorizer.intention_write(destination), || {
        format!("intentions:write on {destination}")
    })
}

/// `intentions:read` on `destination`, the ACL every intention read needs.
fn may_read(authorizer: &Authorizer, destination: &str) -> Result<()> {
    require(authorizer.intention_read(destination), || {
        format!("intentions:read on {destination}")
    })
}

/// The `source` and `destination` query values of the `exact` endpoints.
fn exact_pair(ctx: &Ctx) -> Result<(String, String)> {
    Ok((exact_name(ctx, "source")?, exact_name(ctx, "destination")?))
}

/// A `source`/`destination` query value: `name` or `namespace/name` (only `default` exists).
fn exact_name(ctx: &Ctx, key: &str) -> Result<String> {
    let value = ctx.param(key)?;
    let name = match value.split_once('/') {
        None => value,
        Some(("default", name)) => name,
        Some(_) => {
            return Err(Error::bad_request(format!(
                "query parameter `{key}`: only the `default` namespace exists"
            )))
        }
    };
    if name != "*" {
        crate::catalog::validate_name(name, key)?;
    }
    Ok(name.to_owned())
}

fn find_exact<'a>(all: &'a [Intention], source: &str, destination: &str) -> Option<&'a Intention> {
    all.iter()
        .find(|i| i.source_name == source && i.destination_name == destination)
}

/// `GET /v1/connect/intentions/exact?source=&destination=` (Consul 1.9+, blocking).
pub async fn read_exact(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let (source, destination) = exact_pair(&ctx)?;
    let authorizer = ctx.authorizer(&agent)?;
    may_read(&authorizer, &destination)?;
    blocking_json(&agent, &ctx, &[Table::Intentions], |_| {
        let all: Vec<Intention> = agent.store.list(Table::Intentions)?;
        find_exact(&all, &source, &destination)
            .cloned()
            .ok_or_else(|| Error::NotFound(INTENTION_NOT_FOUND.to_owned()))
    })
    .await
}

/// `PUT /v1/connect/intentions/exact?source=&destination=`: creates or replaces the intention
/// for the pair; the names come from the query (the body's, if any, must agree).
pub async fn upsert_exact(
    State(agent): State<AgentState>,
    ctx: Ctx,
    body: Bytes,
) -> Result<Response> {
    let (source, destination) = exact_pair(&ctx)?;
    let mut request = parse_request(&body)?;
    for (field, given, wanted) in [
        ("SourceName", &mut request.source_name, &source),
        (
            "DestinationName",
            &mut request.destination_name,
            &destination,
        ),
    ] {
        if !given.is_empty() && given != wanted {
            return Err(Error::bad_request(format!(
                "field `{field}` does not match the query string"
            )));
        }
        *given = wanted.clone();
    }
    let now = rfc3339(OffsetDateTime::now_utc());
    let mut intention = request.into_intention(uuid::Uuid::new_v4().to_string(), &now)?;
    let authorizer = ctx.authorizer(&agent)?;
    may_write(&authorizer, &destination)?;
    write(&agent, move |tx| {
        let all: Vec<Intention> = tx.list(Table::Intentions)?;
        if let Some(existing) = all.iter().find(|i| same_pair(i, &intention)) {
            intention.id = existing.id.clone();
            intention.created_at = existing.created_at.clone();
            intention.create_index = existing.create_index;
        } else {
            intention.create_index = tx.index();
        }
        intention.modify_index = tx.index();
        tx.put(Table::Intentions, &intention.id, &intention)
    })
    .await?;
    Ok(json_with_index(agent.store.index(Table::Intentions), &true))
}

/// `DELETE /v1/connect/intentions/exact?source=&destination=`.
pub async fn delete_exact(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let (source, destination) = exact_pair(&ctx)?;
    let authorizer = ctx.authorizer(&agent)?;
    may_write(&authorizer, &destination)?;
    write(&agent, move |tx| {
        let all: Vec<Intention> = tx.list(Table::Intentions)?;
        let existing = find_exact(&all, &source, &destination)
            .ok_or_else(|| Error::NotFound(INTENTION_NOT_FOUND.to_owned()))?;
        tx.delete(Table::Intentions, &existing.id)
    })
    .await?;
    Ok(json_with_index(agent.store.index(Table::Intentions), &true))
}
