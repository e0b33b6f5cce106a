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
    let ttl = match &request.ttl {
        None => LEAF_TTL,
        Some(text) => crate::blocking::parse_duration(text)
            .map_err(|e| Error::bad_request(format!("invalid field `TTL`: {e}")))?,
    };
    let leaf = sign_for(agent, ctx, &request.service, Csr::Given(request.csr), ttl).await?;
    Ok(json_with_index(agent.store.index(Table::CaRoots), &leaf.0))
}

/// Where the leaf's key comes from.
enum Csr {
    /// The caller's CSR: its key never leaves it (our sidecar).
    Given(String),
    /// The agent makes the key, as Consul's agent does for its own clients.
    AgentMade,
}

/// Checks `service:write` on `service` and signs a leaf for it with this datacenter's key.
/// Returns the leaf and, when the agent made the key, its PEM.
async fn sign_for(
    agent: &AgentState,
    ctx: &Ctx,
    service: &str,
    csr: Csr,
    ttl: std::time::Duration,
) -> Result<(ca::SignedLeaf, Option<String>)> {
    validate_name(service, "Service")?;
    let authorizer = ctx.authorizer(agent)?;
    require(authorizer.service_write(service), || {
        format!("service:write on {service}")
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
    let expected = SpiffeId::service(&trust_domain, &agent.config.datacenter, service);
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| Error::Internal("no randomness for the serial".to_owned()))?;
    tokio::task::spawn_blocking(move || {
        let (csr, private_key) = match csr {
            Csr::Given(csr) => (csr, None),
            Csr::AgentMade => {
                let (csr, key) = ca::agent_csr(&expected)?;
                (csr, Some(key))
            }
        };
        let leaf = ca::sign_leaf(
            &root,
            &key,
            &csr,
            &expected,
            OffsetDateTime::now_utc(),
            ttl,
            serial,
        )?;
        Ok((leaf, private_key))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}

/// `GET /v1/agent/connect/ca/leaf/:service`: Consul's leaf endpoint for its own sidecars and
/// SDKs. The agent generates the key pair and returns it with the certificate
/// (`PrivateKeyPEM`); our sidecar uses the CSR endpoint instead, so its key never travels.
/// Each call signs a fresh leaf (Consul caches and blocks until renewal; not done here).
pub async fn agent_leaf(
    State(agent): State<AgentState>,
    ctx: Ctx,
    axum::extract::Path(service): axum::extract::Path<String>,
) -> Result<Response> {
    let result = sign_for(&agent, &ctx, &service, Csr::AgentMade, LEAF_TTL).await;
    agent.metrics.count_leaf(match &result {
        Ok(_) => "ok",
        Err(Error::PermissionDenied(_) | Error::AclNotFound) => "denied",
        Err(Error::BadRequest(_)) => "invalid",
        Err(_) => "error",
    });
    let (leaf, private_key) = result?;
    let index = agent.store.index(Table::CaRoots);
    let mut body = serde_json::to_value(&leaf).map_err(|e| Error::Internal(e.to_string()))?;
    if let Some(object) = body.as_object_mut() {
        object.insert(
            "PrivateKeyPEM".to_owned(),
            json!(private_key.unwrap_or_default()),
        );
        object.insert("CreateIndex".to_owned(), json!(index));
        object.insert("ModifyIndex".to_owned(), json!(index));
    }
    Ok(json_with_index(index, &body))
}

/// `GET /v1/connect/ca/configuration` (`operator:read`): the built-in provider's settings.
/// The private key is never shown; the settings cannot be changed (no `PUT`).
pub async fn configuration(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    require(authorizer.operator_read(), || "operator:read".to_owned())?;
    let trust_domain = agent.require_trust_domain()?;
    let cluster_id = trust_domain
        .strip_suffix(".consul")
        .unwrap_or(&trust_domain)
        .to_owned();
    let index = agent.store.index(Table::CaRoots);
    Ok(json_with_index(
        index,
        &json!({
            "Provider": "consul",
            "ClusterID": cluster_id,
            "Config": {
                "LeafCertTTL": format!("{}h", LEAF_TTL.as_secs() / 3600),
                "PrivateKeyType": "ec",
                "PrivateKeyBits": 256,
            },
            "State": null,
            "ForceWithoutCrossSigning": false,
            "CreateIndex": index,
            "ModifyIndex": index,
        }),
    ))
}
