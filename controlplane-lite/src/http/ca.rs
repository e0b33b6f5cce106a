//! Connect CA endpoints.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;

use super::{blocking_json, json_body, json_with_index, write, AgentState, Ctx};
use crate::acl::require;
use crate::ca::{self, CaRoot, CaSettings, CA_SETTINGS_KEY};
use crate::catalog::{from_value, validate_name};
use crate::error::{Error, Result};
use crate::spiffe::SpiffeId;
use crate::store::{Table, Transaction};

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
        None => agent.ca_settings()?.leaf_ttl(),
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
    let (root, key) = agent.active_signer()?;
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
    let ttl = agent.ca_settings()?.leaf_ttl();
    let result = sign_for(&agent, &ctx, &service, Csr::AgentMade, ttl).await;
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
/// The private key is never shown.
pub async fn configuration(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    require(authorizer.operator_read(), || "operator:read".to_owned())?;
    let cluster_id = cluster_id(&agent)?;
    let settings = agent.ca_settings()?;
    let index = agent.store.max_index(&[Table::CaRoots, Table::System]);
    Ok(json_with_index(
        index,
        &json!({
            "Provider": "consul",
            "ClusterID": cluster_id,
            "Config": {
                "LeafCertTTL": ca::format_duration(settings.leaf_ttl()),
                "IntermediateCertTTL": ca::format_duration(ca::INTERMEDIATE_TTL),
                "RootCertTTL": ca::format_duration(ca::ROOT_TTL),
                "PrivateKeyType": "ec",
                "PrivateKeyBits": 256,
            },
            "State": null,
            "ForceWithoutCrossSigning": false,
            "CreateIndex": settings.create_index,
            "ModifyIndex": settings.modify_index,
        }),
    ))
}

fn cluster_id(agent: &AgentState) -> Result<String> {
    let trust_domain = agent.require_trust_domain()?;
    Ok(trust_domain
        .strip_suffix(".consul")
        .unwrap_or(&trust_domain)
        .to_owned())
}

/// `PUT /v1/connect/ca/configuration` (`operator:write`), Consul's semantics for the built-in
/// provider: `LeafCertTTL` applies to leaves signed from now on; a new `PrivateKey` (with an
/// optional `RootCert`), or none after a supplied one, rotates the root. The new root becomes
/// active, cross-signed by the old one (its `IntermediateCerts`); the old root stays listed,
/// inactive, so leaves it signed keep verifying until their sidecars renew, which the moved
/// roots index tells them to do. Answers 200 with an empty body, as Consul does.
pub async fn set_configuration(
    State(agent): State<AgentState>,
    ctx: Ctx,
    body: Bytes,
) -> Result<Response> {
    let authorizer = ctx.authorizer(&agent)?;
    require(authorizer.operator_write(), || "operator:write".to_owned())?;
    let cluster_id = cluster_id(&agent)?;
    let update = ca::parse_update(
        &crate::casing::normalize(json_body(&body)?),
        agent.config.ca_leaf_ttl_min,
        &cluster_id,
    )?;
    let settings = agent.ca_settings()?;
    let primary = agent.is_primary();
    if !primary && update.root.is_some() {
        return Err(Error::bad_request(
            "invalid field `Config.PrivateKey`: the root is configured in the primary datacenter; a secondary sets only its LeafCertTTL",
        ));
    }
    let active = agent
        .active_root()?
        .ok_or_else(|| Error::Unavailable("no active CA root".to_owned()))?;
    let rotation = if !primary {
        None
    } else {
        match &update.root {
            // The same key (and, if given, the same certificate) as in force: nothing to do.
            Some(supplied)
                if settings.root_supplied
                    && supplied_matches(&supplied.private_key_pem, &active.root_cert)
                    && supplied
                        .root_cert_pem
                        .as_deref()
                        .is_none_or(|pem| pem.trim() == active.root_cert.trim()) =>
            {
                None
            }
            Some(supplied) => Some(Some(supplied.clone())),
            None if settings.root_supplied => Some(None),
            None => None,
        }
    };
    let leaf_ttl_seconds = update.leaf_cert_ttl.as_secs();
    let Some(supplied) = rotation else {
        if leaf_ttl_seconds != settings.leaf_cert_ttl_seconds {
            write(&agent, move |tx| put_settings(tx, leaf_ttl_seconds, None)).await?;
            tracing::info!(leaf_cert_ttl = %ca::format_duration(update.leaf_cert_ttl), "CA configuration changed");
        }
        return Ok(empty_ok(&agent));
    };
    let (active, old_key) = agent.active_signer()?;
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| Error::Internal("no randomness for the serial".to_owned()))?;
    let now = OffsetDateTime::now_utc();
    let root_serial = agent.store.max_index(&[Table::CaRoots]) + 1;
    let old_root = active.clone();
    let supplied_root = supplied.is_some();
    let mut generated = tokio::task::spawn_blocking(move || -> Result<ca::GeneratedRoot> {
        let mut generated = match &supplied {
            Some(root) => ca::root_from_supplied(
                &cluster_id,
                now,
                root_serial,
                &root.private_key_pem,
                root.root_cert_pem.as_deref(),
            )?,
            None => ca::generate_root(&cluster_id, now, root_serial)?,
        };
        let cross = ca::cross_sign(&generated.root, &old_root, &old_key, now, serial)?;
        generated.root.intermediate_certs = Some(vec![cross]);
        Ok(generated)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    if generated.root.id == active.id {
        return Err(Error::bad_request(
            "invalid field `Config.RootCert`: it is the active root already",
        ));
    }
    let new_id = generated.root.id.clone();
    let not_after_unix = generated.not_after_unix;
    let old_id = active.id.clone();
    write(&agent, move |tx| {
        // Two rotations at once: the second finds the root it meant to replace gone.
        let mut old = match tx.get::<CaRoot>(Table::CaRoots, &old_id)? {
            Some(root) if root.active => root,
            _ => {
                return Err(Error::Conflict(
                    "the active CA root changed during this request; read the configuration again and retry".to_owned(),
                ))
            }
        };
        let leaf_ttl = tx
            .get::<CaSettings>(Table::System, CA_SETTINGS_KEY)?
            .unwrap_or_default()
            .leaf_ttl();
        // Consul prunes an inactive root once twice the leaf TTL has passed since it was
        // rotated out: no leaf it signed can still be in use.
        let keep_for = time::Duration::try_from(leaf_ttl * 2).unwrap_or(time::Duration::MAX);
        for root in tx.list::<CaRoot>(Table::CaRoots)? {
            let expired = root
                .rotated_out_at
                .as_deref()
                .and_then(|at| OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok())
                .is_some_and(|at| at + keep_for < now);
            if !root.active && expired {
                tx.delete(Table::CaRoots, &root.id)?;
                tx.delete(Table::CaSigning, &root.id)?;
            }
        }
        old.active = false;
        old.rotated_out_at = Some(ca::rfc3339(now));
        old.modify_index = tx.index();
        tx.put(Table::CaRoots, &old.id, &old)?;
        // The old key signs nothing any more; do not keep it.
        tx.delete(Table::CaSigning, &old.id)?;
        generated.root.active = true;
        generated.root.create_index = tx.index();
        generated.root.modify_index = tx.index();
        tx.put(Table::CaRoots, &generated.root.id, &generated.root)?;
        tx.put(Table::CaSigning, &generated.root.id, &generated.key)?;
        put_settings(tx, leaf_ttl_seconds, Some(supplied_root))
    })
    .await?;
    agent.metrics.set_root_expiry(not_after_unix);
    tracing::info!(old = %active.id, new = %new_id, supplied = supplied_root, "rotated the CA root");
    Ok(empty_ok(&agent))
}

/// Stores this datacenter's CA settings: the leaf TTL and, at a rotation, whether the new
/// root's key was supplied.
fn put_settings(
    tx: &mut Transaction<'_>,
    leaf_ttl_seconds: u64,
    root_supplied: Option<bool>,
) -> Result<()> {
    let mut next = tx
        .get::<CaSettings>(Table::System, CA_SETTINGS_KEY)?
        .unwrap_or_default();
    next.leaf_cert_ttl_seconds = leaf_ttl_seconds;
    if let Some(supplied) = root_supplied {
        next.root_supplied = supplied;
    }
    if next.create_index == 0 {
        next.create_index = tx.index();
    }
    next.modify_index = tx.index();
    tx.put(Table::System, CA_SETTINGS_KEY, &next)
}

/// Whether `private_key_pem` is the key of `root_cert_pem`.
fn supplied_matches(private_key_pem: &str, root_cert_pem: &str) -> bool {
    rcgen::KeyPair::from_pem(private_key_pem).is_ok_and(|key| {
        // The key's public half in a throwaway certificate, to compare with the root's.
        rcgen::CertificateParams::default()
            .self_signed(&key)
            .is_ok_and(|probe| ca::same_public_key(&probe.pem(), root_cert_pem))
    })
}

fn empty_ok(agent: &AgentState) -> Response {
    let mut response = ().into_response();
    response.headers_mut().insert(
        "x-consul-index",
        HeaderValue::from(agent.store.max_index(&[Table::CaRoots, Table::System])),
    );
    response
}
