//! Connect CA endpoints.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;

use super::{blocking_json, json_body, json_with_index, AgentState, Ctx};
use crate::acl::require;
use crate::ca::{self, CaRoot, SigningKey, LEAF_TTL};
use crate::catalog::{from_value, validate_name};
use crate::error::{Error, Result};
use crate::spiffe::SpiffeId;
use crate::store::Table;

/// `GET /v1/connect/ca/roots` (blocking; `?pem=true` for a PEM bundle). Public, like Consul.
pub async fn roots(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let trust_domain = agent.require_trust_domain()?;
    if ctx
        .query
        .get("pem")
        .is_some_and(|v| v == "true" || v.is_empty())
    {
        let roots: Vec<CaRoot> = agent.store.list(Table::CaRoots)?;
        let bundle: String = roots.iter().map(|r| r.root_cert.clone()).collect();
        let mut response = bundle.into_response();
        response.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("application/pem-certificate-chain"),
        );
        return Ok(response);
    }
    blocking_json(&agent, &ctx, &[Table::CaRoots], |_| {
        let roots: Vec<CaRoot> = agent.store.list(Table::CaRoots)?;
        let active = roots
            .iter()
            .find(|r| r.active)
            .map(|r| r.id.clone())
            .unwrap_or_default();
        Ok(json!({"ActiveRootID": active, "TrustDomain": trust_domain, "Roots": roots}))
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct SignRequest {
    service: String,
    #[serde(rename = "CSR")]
    csr: String,
    #[serde(default, rename = "TTL")]
    ttl: Option<String>,
}

/// `POST /v1/connect/ca/leaf/sign` (our own endpoint): signs a CSR for `Service` in this
/// datacenter. Needs `service:write` on the service. The CSR's only SAN must be the service's
/// SPIFFE ID; the private key stays with the caller.
pub async fn sign(State(agent): State<AgentState>, ctx: Ctx, body: Bytes) -> Result<Response> {
    let result = sign_inner(&agent, &ctx, &body).await;
    agent.metrics.count_leaf(match &result {
        Ok(_) => "ok",
        Err(Error::PermissionDenied(_) | Error::AclNotFound) => "denied",
        Err(Error::BadRequest(_)) => "invalid",
        Err(_) => "error",
    });
    result
}

async fn sign_inner(agent: &AgentState, ctx: &Ctx, body: &[u8]) -> Result<Response> {
    let request: SignRequest =
        from_value(crate::casing::normalize(json_body(body)?), "sign request")?;
    validate_name(&request.service, "Service")?;
    let ttl = match &request.ttl {
        None => LEAF_TTL,
        Some(text) => crate::blocking::parse_duration(text)
            .map_err(|e| Error::bad_request(format!("invalid field `TTL`: {e}")))?,
    };
    let authorizer = ctx.authorizer(agent)?;
    require(authorizer.service_write(&request.service), || {
        format!("service:write on {}", request.service)
    })?;
    let trust_domain = agent.require_trust_domain()?;
    let root = agent
        .active_root()?
        .ok_or_else(|| Error::Unavailable("no active CA root".to_owned()))?;
    let key: SigningKey = agent
        .store
        .get(Table::CaSigning, &root.id)?
        .ok_or_else(|| {
            Error::Unavailable(
                "this datacenter holds no signing key for the active root".to_owned(),
            )
        })?;
    let expected = SpiffeId::service(&trust_domain, &agent.config.datacenter, &request.service);
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| Error::Internal("no randomness for the serial".to_owned()))?;
    let csr = request.csr;
    let leaf = tokio::task::spawn_blocking(move || {
        ca::sign_leaf(
            &root,
            &key,
            &csr,
            &expected,
            OffsetDateTime::now_utc(),
            ttl,
            serial,
        )
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    Ok(json_with_index(agent.store.index(Table::CaRoots), &leaf))
}
