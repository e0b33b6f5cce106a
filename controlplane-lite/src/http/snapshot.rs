//! `GET|PUT /v1/snapshot`: save and restore the whole store (see [`crate::snapshot`]).
//!
//! Consul requires a management token here; this agent asks for the two permissions a
//! management token holds that cover what a snapshot exposes or replaces: `acl:write` (token
//! secrets) and `operator:write` (the CA private keys, the whole datacenter's state).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};

use super::{AgentState, Ctx};
use crate::acl::require;
use crate::error::{Error, Result};
use crate::snapshot;

fn require_management(agent: &AgentState, ctx: &Ctx) -> Result<()> {
    let authorizer = ctx.authorizer(agent)?;
    require(
        authorizer.acl_write() && authorizer.operator_write(),
        || "acl:write and operator:write (a management token)".to_owned(),
    )
}

/// `GET /v1/snapshot`: the whole store as a checksummed snapshot file.
pub async fn save(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    require_management(&agent, &ctx)?;
    let worker = agent.clone();
    let (index, bytes) = tokio::task::spawn_blocking(move || {
        let snapshot = snapshot::capture(&worker.store, &worker.config.datacenter)?;
        Ok::<_, Error>((snapshot.index, snapshot::encode(&snapshot)?))
    })
    .await
    .map_err(|e| Error::Internal(format!("snapshot task: {e}")))??;
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert("x-consul-index", HeaderValue::from(index));
    Ok(response)
}

/// `PUT /v1/snapshot`: verifies the file (header, length, SHA-256) and replaces the whole store
/// with it in one transaction.
pub async fn restore(State(agent): State<AgentState>, ctx: Ctx, body: Bytes) -> Result<Response> {
    require_management(&agent, &ctx)?;
    let snapshot = snapshot::decode(&body)?;
    if snapshot.datacenter != agent.config.datacenter {
        tracing::warn!(
            from = %snapshot.datacenter,
            into = %agent.config.datacenter,
            "restoring a snapshot taken in another datacenter"
        );
    }
    let worker = agent.clone();
    let index = tokio::task::spawn_blocking(move || snapshot::restore(&worker.store, &snapshot))
        .await
        .map_err(|e| Error::Internal(format!("restore task: {e}")))??;
    tracing::info!(index, "restored a snapshot");
    let mut response = ().into_response();
    response
        .headers_mut()
        .insert("x-consul-index", HeaderValue::from(index));
    Ok(response)
}
