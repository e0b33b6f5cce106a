//! The primary's side of federation: snapshots of replicated tables for secondaries and the
//! signing of their intermediate CAs. Both answer only in the primary datacenter.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;

use super::{blocking_json, json_body, json_with_index, AgentState, Ctx};
use crate::acl::render::render_token;
use crate::acl::{require, Authorizer, Token};
use crate::ca;
use crate::catalog::from_value;
use crate::error::{Error, Result};
use crate::replication::snapshot::{Entry, TableSnapshot};
use crate::replication::Kind;
use crate::store::Table;

fn require_primary(agent: &AgentState) -> Result<()> {
    if agent.is_primary() {
        Ok(())
    } else {
        Err(Error::bad_request(format!(
            "this is datacenter {:?}; replication is served by the primary {:?}",
            agent.config.datacenter, agent.config.primary_datacenter
        )))
    }
}

/// `GET /v1/internal/replication/:kind` (blocking): the whole table, local-only rows left out.
/// ACL tables carry secrets, so they need `acl:write` (Consul's replication token has it); the
/// others need `operator:read`. CA roots replicate through `/v1/connect/ca/roots`.
pub async fn snapshot(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(kind): Path<String>,
) -> Result<Response> {
    require_primary(&agent)?;
    let kind = Kind::parse(&kind)
        .filter(|k| *k != Kind::CaRoots)
        .ok_or_else(|| Error::NotFound(format!("no replicated table {kind:?}")))?;
    let authorizer = ctx.authorizer(&agent)?;
    match kind {
        Kind::AclPolicies | Kind::AclTokens => {
            require(authorizer.acl_write(), || "acl:write".to_owned())?
        }
        _ => require(authorizer.operator_read(), || "operator:read".to_owned())?,
    }
    blocking_json(&agent, &ctx, &[kind.table()], |index| {
        let entries = agent
            .store
            .entries(kind.table())?
            .into_iter()
            .filter(|(_, value)| !kind.is_local_only(value))
            .map(|(key, value)| {
                let value = match kind {
                    Kind::AclTokens => render_token_value(value, &authorizer)?,
                    _ => value,
                };
                Ok(Entry { key, value })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TableSnapshot { index, entries })
    })
    .await
}

/// A stored token row as the caller may see it: through the one token renderer, like every
/// other answer that carries a token.
fn render_token_value(
    value: serde_json::Value,
    authorizer: &Authorizer,
) -> Result<serde_json::Value> {
    let token: Token = serde_json::from_value(value)
        .map_err(|e| Error::Internal(format!("stored token is not a token: {e}")))?;
    serde_json::to_value(render_token(token, authorizer))
        .map_err(|e| Error::Internal(format!("token does not serialize: {e}")))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct IntermediateRequest {
    #[serde(rename = "CSR")]
    csr: String,
}

/// `POST /v1/connect/ca/intermediate/sign` (`operator:write`, primary only): signs a
/// secondary's intermediate CSR with the active root. Answers `{"CertPEM", "RootID"}`.
pub async fn sign_intermediate(
    State(agent): State<AgentState>,
    ctx: Ctx,
    body: Bytes,
) -> Result<Response> {
    require_primary(&agent)?;
    let request: IntermediateRequest = from_value(
        crate::casing::normalize(json_body(&body)?),
        "intermediate request",
    )?;
    let authorizer = ctx.authorizer(&agent)?;
    require(authorizer.operator_write(), || "operator:write".to_owned())?;
    let trust_domain = agent.require_trust_domain()?;
    let (root, key) = agent.active_signer()?;
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| Error::Internal("no randomness for the serial".to_owned()))?;
    let root_id = root.id.clone();
    let pem = tokio::task::spawn_blocking(move || {
        ca::sign_intermediate(
            &root,
            &key,
            &request.csr,
            &trust_domain,
            OffsetDateTime::now_utc(),
            serial,
        )
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    tracing::info!(root = %root_id, "signed an intermediate CA for a secondary datacenter");
    Ok(json_with_index(
        agent.store.index(Table::CaRoots),
        &json!({"CertPEM": pem, "RootID": root_id}),
    ))
}
