//! ACL endpoints: bootstrap, policies, tokens.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;

use super::{blocking_json, json_body, json_with_index, write, AgentState, Ctx};
use crate::acl::{
    render_token, require, Authorizer, Policy, PolicyLink, Rules, ServiceIdentity, Token,
    ANONYMOUS_ACCESSOR_ID, MANAGEMENT_POLICY_ID,
};
use crate::agent::ACL_BOOTSTRAP_KEY;
use crate::ca::rfc3339;
use crate::catalog::{from_value, validate_name};
use crate::error::{Error, Result};
use crate::store::{Table, Transaction};

/// Consul's 404 texts for a missing token or policy (both end in its `ACL not found`, which
/// clients such as Terraform's provider look for).
const TOKEN_NOT_FOUND: &str = "Requested token does not exist: ACL not found";
const POLICY_NOT_FOUND: &str = "Requested policy does not exist: ACL not found";

fn acl_read(agent: &AgentState, ctx: &Ctx) -> Result<Authorizer> {
    let authorizer = ctx.authorizer(agent)?;
    require(authorizer.acl_read(), || "acl:read".to_owned())?;
    Ok(authorizer)
}

fn acl_write(agent: &AgentState, ctx: &Ctx) -> Result<Authorizer> {
    let authorizer = ctx.authorizer(agent)?;
    require(authorizer.acl_write(), || "acl:write".to_owned())?;
    Ok(authorizer)
}

/// `PUT /v1/acl/bootstrap`: creates the first management token, once.
pub async fn bootstrap(State(agent): State<AgentState>) -> Result<Response> {
    let now = rfc3339(OffsetDateTime::now_utc());
    let token = write(&agent, move |tx| {
        if let Some(index) = tx.get::<u64>(Table::System, ACL_BOOTSTRAP_KEY)? {
            return Err(Error::PermissionDenied(format!(
                "ACL bootstrap no longer allowed (reset index: {index})"
            )));
        }
        let token = Token {
            accessor_id: uuid::Uuid::new_v4().to_string(),
            secret_id: uuid::Uuid::new_v4().to_string(),
            description: "Bootstrap Token (Global Management)".to_owned(),
            policies: vec![PolicyLink {
                id: MANAGEMENT_POLICY_ID.to_owned(),
                name: String::new(),
            }],
            service_identities: Vec::new(),
            local: false,
            create_time: now.clone(),
            create_index: tx.index(),
            modify_index: tx.index(),
        };
        tx.put(Table::AclTokens, &token.accessor_id, &token)?;
        tx.put(Table::System, ACL_BOOTSTRAP_KEY, &tx.index())?;
        Ok(token)
    })
    .await?;
    // The caller has just become the holder of a management token, so it sees its secret.
    let token = render_token(with_policy_names(&agent, token)?, &Authorizer::management());
    Ok(json_with_index(agent.store.index(Table::AclTokens), &token))
}

/// A policy as Consul's `api.ACLPolicy` carries it. The read-only fields a client echoes
/// back (`Hash`, `CreateIndex`, `ModifyIndex`) are accepted and ignored; unknown fields are
/// still refused, so a typo is a 400 rather than a silently dropped setting.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct PolicyRequest {
    #[serde(default, rename = "ID")]
    id: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    rules: String,
    #[serde(default)]
    datacenters: Vec<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    partition: Option<String>,
    #[serde(default, rename = "Hash")]
    _hash: Option<IgnoredAny>,
    #[serde(default, rename = "CreateIndex")]
    _create_index: Option<IgnoredAny>,
    #[serde(default, rename = "ModifyIndex")]
    _modify_index: Option<IgnoredAny>,
}

/// Only the `default` namespace and partition exist here (Consul OSS).
fn default_only(value: &Option<String>, field: &str) -> Result<()> {
    match value.as_deref() {
        None | Some("") | Some("default") => Ok(()),
        Some(other) => Err(Error::bad_request(format!(
            "field `{field}`: {other:?} is not supported (only \"default\")"
        ))),
    }
}

fn parse_policy(body: &[u8]) -> Result<PolicyRequest> {
    let request: PolicyRequest = from_value(crate::casing::normalize(json_body(body)?), "policy")?;
    validate_name(&request.name, "Name")?;
    Rules::parse(&request.rules).map_err(|e| Error::bad_request(format!("field `Rules`: {e}")))?;
    for (i, dc) in request.datacenters.iter().enumerate() {
        validate_name(dc, &format!("Datacenters[{i}]"))?;
    }
    default_only(&request.namespace, "Namespace")?;
    default_only(&request.partition, "Partition")?;
    Ok(request)
}

fn ensure_unique_policy_name(tx: &Transaction<'_>, name: &str, id: &str) -> Result<()> {
    let policies: Vec<Policy> = tx.list(Table::AclPolicies)?;
    if policies.iter().any(|p| p.name == name && p.id != id) {
        return Err(Error::Conflict(format!(
            "Invalid Policy: A Policy with Name {name:?} already exists"
        )));
    }
    Ok(())
}

/// `PUT /v1/acl/policy`.
pub async fn create_policy(
    State(agent): State<AgentState>,
    ctx: Ctx,
    body: Bytes,
) -> Result<Response> {
    let request = parse_policy(&body)?;
    if request.id.as_ref().is_some_and(|id| !id.is_empty()) {
        return Err(Error::bad_request(
            "field `ID`: cannot be set when creating a policy",
        ));
    }
    acl_write(&agent, &ctx)?;
    let policy = write(&agent, move |tx| {
        let policy = Policy {
            id: uuid::Uuid::new_v4().to_string(),
            name: request.name.clone(),
            description: request.description.clone(),
            rules: request.rules.clone(),
            datacenters: request.datacenters.clone(),
            create_index: tx.index(),
            modify_index: tx.index(),
        };
        ensure_unique_policy_name(tx, &policy.name, &policy.id)?;
        tx.put(Table::AclPolicies, &policy.id, &policy)?;
        Ok(policy)
    })
    .await?;
    Ok(json_with_index(
        agent.store.index(Table::AclPolicies),
        &policy,
    ))
}

/// `PUT /v1/acl/policy/:id`.
pub async fn update_policy(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let request = parse_policy(&body)?;
    if request
        .id
        .as_ref()
        .is_some_and(|body_id| !body_id.is_empty() && *body_id != id)
    {
        return Err(Error::bad_request(
            "Policy ID in URL and payload do not match",
        ));
    }
    if id == MANAGEMENT_POLICY_ID {
        return Err(Error::bad_request(
            "the global-management policy cannot be modified",
        ));
    }
    acl_write(&agent, &ctx)?;
    let policy = write(&agent, move |tx| {
        let existing: Policy = tx
            .get(Table::AclPolicies, &id)?
            .ok_or_else(|| Error::NotFound(POLICY_NOT_FOUND.to_owned()))?;
        let policy = Policy {
            id: id.clone(),
            name: request.name.clone(),
            description: request.description.clone(),
            rules: request.rules.clone(),
            datacenters: request.datacenters.clone(),
            create_index: existing.create_index,
            modify_index: tx.index(),
        };
        ensure_unique_policy_name(tx, &policy.name, &policy.id)?;
        tx.put(Table::AclPolicies, &id, &policy)?;
        Ok(policy)
    })
    .await?;
    Ok(json_with_index(
        agent.store.index(Table::AclPolicies),
        &policy,
    ))
}

/// `DELETE /v1/acl/policy/:id`.
pub async fn delete_policy(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response> {
    if id == MANAGEMENT_POLICY_ID {
        return Err(Error::bad_request(
            "the global-management policy cannot be deleted",
        ));
    }
    acl_write(&agent, &ctx)?;
    let existed = write(&agent, move |tx| tx.delete(Table::AclPolicies, &id)).await?;
    if !existed {
        return Err(Error::NotFound("ACL policy not found".to_owned()));
    }
    Ok(json_with_index(
        agent.store.index(Table::AclPolicies),
        &true,
    ))
}

/// `GET /v1/acl/policy/:id`.
pub async fn read_policy(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response> {
    acl_read(&agent, &ctx)?;
    blocking_json(&agent, &ctx, &[Table::AclPolicies], |_| {
        agent
            .store
            .get::<Policy>(Table::AclPolicies, &id)?
            .ok_or_else(|| Error::NotFound(POLICY_NOT_FOUND.to_owned()))
    })
    .await
}

/// `GET /v1/acl/policy/name/:name`.
pub async fn read_policy_by_name(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(name): Path<String>,
) -> Result<Response> {
    acl_read(&agent, &ctx)?;
    blocking_json(&agent, &ctx, &[Table::AclPolicies], |_| {
        agent
            .store
            .list::<Policy>(Table::AclPolicies)?
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::NotFound(POLICY_NOT_FOUND.to_owned()))
    })
    .await
}

/// `GET /v1/acl/policies`.
pub async fn list_policies(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    acl_read(&agent, &ctx)?;
    blocking_json(&agent, &ctx, &[Table::AclPolicies], |_| {
        agent.store.list::<Policy>(Table::AclPolicies)
    })
    .await
}

/// A token as Consul's `api.ACLToken` carries it. Read-only fields (`CreateIndex`,
/// `ModifyIndex`, `CreateTime`, `Hash`) are accepted and ignored; features this control plane
/// does not have (roles, node identities, templated policies, expiry, auth methods, legacy
/// rules) are accepted only when empty, so a client never believes they took effect.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct TokenRequest {
    #[serde(default, rename = "AccessorID")]
    accessor_id: Option<String>,
    #[serde(default, rename = "SecretID")]
    secret_id: Option<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    policies: Vec<PolicyLink>,
    #[serde(default)]
    service_identities: Vec<ServiceIdentity>,
    #[serde(default)]
    roles: Vec<Value>,
    #[serde(default)]
    node_identities: Vec<Value>,
    #[serde(default)]
    templated_policies: Vec<Value>,
    #[serde(default)]
    local: bool,
    #[serde(default)]
    auth_method: String,
    #[serde(default)]
    auth_method_namespace: String,
    #[serde(default, rename = "ExpirationTTL")]
    expiration_ttl: Option<Value>,
    #[serde(default)]
    expiration_time: Option<Value>,
    #[serde(default)]
    rules: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    partition: Option<String>,
    #[serde(default, rename = "CreateTime")]
    _create_time: Option<IgnoredAny>,
    #[serde(default, rename = "Hash")]
    _hash: Option<IgnoredAny>,
    #[serde(default, rename = "CreateIndex")]
    _create_index: Option<IgnoredAny>,
    #[serde(default, rename = "ModifyIndex")]
    _modify_index: Option<IgnoredAny>,
}

/// Go's client sends a zero `ExpirationTTL` as `0` and no `ExpirationTime` when unset.
fn is_unset(value: &Option<Value>) -> bool {
    match value {
        None => true,
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(Value::String(s)) => s.is_empty() || s == "0s" || s == "0",
        Some(_) => false,
    }
}

fn parse_token(body: &[u8]) -> Result<TokenRequest> {
    let request: TokenRequest = from_value(crate::casing::normalize(json_body(body)?), "token")?;
    let unsupported = [
        ("Roles", !request.roles.is_empty(), "ACL roles"),
        (
            "NodeIdentities",
            !request.node_identities.is_empty(),
            "node identities",
        ),
        (
            "TemplatedPolicies",
            !request.templated_policies.is_empty(),
            "templated policies",
        ),
        (
            "AuthMethod",
            !request.auth_method.is_empty(),
            "auth methods",
        ),
        (
            "AuthMethodNamespace",
            !request.auth_method_namespace.is_empty(),
            "auth methods",
        ),
        (
            "ExpirationTTL",
            !is_unset(&request.expiration_ttl),
            "token expiry",
        ),
        (
            "ExpirationTime",
            !is_unset(&request.expiration_time),
            "token expiry",
        ),
        ("Rules", !request.rules.is_empty(), "legacy token rules"),
    ];
    if let Some((field, _, what)) = unsupported.iter().find(|(_, set, _)| *set) {
        return Err(Error::bad_request(format!(
            "field `{field}`: {what} are not implemented"
        )));
    }
    default_only(&request.namespace, "Namespace")?;
    default_only(&request.partition, "Partition")?;
    for (i, identity) in request.service_identities.iter().enumerate() {
        validate_name(
            &identity.service_name,
            &format!("ServiceIdentities[{i}].ServiceName"),
        )?;
    }
    Ok(request)
}

fn check_uuid(value: &Option<String>, field: &str) -> Result<Option<String>> {
    match value.as_deref() {
        None | Some("") => Ok(None),
        Some(text) => uuid::Uuid::parse_str(text)
            .map(|u| Some(u.to_string()))
            .map_err(|_| Error::bad_request(format!("invalid field `{field}`: must be a UUID"))),
    }
}

/// Resolves policy links given by `ID` or `Name` to stored policies (deduplicated).
fn resolve_links(tx: &Transaction<'_>, requested: &[PolicyLink]) -> Result<Vec<PolicyLink>> {
    let policies: Vec<Policy> = tx.list(Table::AclPolicies)?;
    let mut links = Vec::new();
    for (i, link) in requested.iter().enumerate() {
        let found = policies
            .iter()
            .find(|p| {
                (!link.id.is_empty() && p.id == link.id)
                    || (link.id.is_empty() && p.name == link.name)
            })
            .ok_or_else(|| {
                Error::bad_request(format!(
                    "field `Policies[{i}]`: no policy with {}",
                    if link.id.is_empty() {
                        format!("name {:?}", link.name)
                    } else {
                        format!("ID {:?}", link.id)
                    }
                ))
            })?;
        if !links.iter().any(|l: &PolicyLink| l.id == found.id) {
            links.push(PolicyLink {
                id: found.id.clone(),
                name: found.name.clone(),
            });
        }
    }
    Ok(links)
}

/// `PUT /v1/acl/token`: policies may be linked by `ID` or `Name`.
pub async fn create_token(
    State(agent): State<AgentState>,
    ctx: Ctx,
    body: Bytes,
) -> Result<Response> {
    let request = parse_token(&body)?;
    let accessor_id = check_uuid(&request.accessor_id, "AccessorID")?;
    let secret_id = check_uuid(&request.secret_id, "SecretID")?;
    let authorizer = acl_write(&agent, &ctx)?;
    let now = rfc3339(OffsetDateTime::now_utc());
    let token = write(&agent, move |tx| {
        let links = resolve_links(tx, &request.policies)?;
        let tokens: Vec<Token> = tx.list(Table::AclTokens)?;
        let accessor_id = accessor_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let secret_id = secret_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if tokens
            .iter()
            .any(|t| t.accessor_id == accessor_id || t.secret_id == secret_id)
        {
            return Err(Error::Conflict(
                "a token with this AccessorID or SecretID already exists".to_owned(),
            ));
        }
        let token = Token {
            accessor_id,
            secret_id,
            description: request.description.clone(),
            policies: links,
            service_identities: request.service_identities.clone(),
            local: request.local,
            create_time: now.clone(),
            create_index: tx.index(),
            modify_index: tx.index(),
        };
        tx.put(Table::AclTokens, &token.accessor_id, &token)?;
        Ok(token)
    })
    .await?;
    let token = render_token(token, &authorizer);
    Ok(json_with_index(agent.store.index(Table::AclTokens), &token))
}

/// `PUT /v1/acl/token/:accessor`: replaces the description, policies and service identities
/// (Consul's update). The secret and locality cannot change; Consul's texts for both.
pub async fn update_token(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let request = parse_token(&body)?;
    let body_id = check_uuid(&request.accessor_id, "AccessorID")?;
    let id = check_uuid(&Some(id), "AccessorID")?.unwrap_or_default();
    if body_id.as_ref().is_some_and(|b| *b != id) {
        return Err(Error::bad_request(
            "Token Accessor ID in URL and payload do not match",
        ));
    }
    let secret_id = check_uuid(&request.secret_id, "SecretID")?;
    let authorizer = acl_write(&agent, &ctx)?;
    let token = write(&agent, move |tx| {
        // Consul's text; its status is a 500, ours a 404 (the client's mistake, not ours).
        let existing: Token = tx
            .get(Table::AclTokens, &id)?
            .ok_or_else(|| Error::NotFound(format!("Cannot find token {id:?}")))?;
        if secret_id.as_ref().is_some_and(|s| *s != existing.secret_id) {
            return Err(Error::bad_request(
                "Changing a tokens SecretID is not allowed",
            ));
        }
        if request.local != existing.local {
            return Err(Error::bad_request(format!(
                "Cannot toggle local mode of {}",
                existing.accessor_id
            )));
        }
        let links = resolve_links(tx, &request.policies)?;
        let token = Token {
            description: request.description.clone(),
            policies: links,
            service_identities: request.service_identities.clone(),
            modify_index: tx.index(),
            ..existing
        };
        tx.put(Table::AclTokens, &token.accessor_id, &token)?;
        Ok(token)
    })
    .await?;
    let token = render_token(with_policy_names(&agent, token)?, &authorizer);
    Ok(json_with_index(agent.store.index(Table::AclTokens), &token))
}

/// Refreshes the policy names shown in a token's links.
fn with_policy_names(agent: &AgentState, mut token: Token) -> Result<Token> {
    for link in &mut token.policies {
        if let Some(policy) = agent.store.get::<Policy>(Table::AclPolicies, &link.id)? {
            link.name = policy.name;
        }
    }
    Ok(token)
}

/// `GET /v1/acl/token/:accessor`.
pub async fn read_token(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response> {
    let authorizer = acl_read(&agent, &ctx)?;
    blocking_json(
        &agent,
        &ctx,
        &[Table::AclTokens, Table::AclPolicies],
        |_| {
            let token = agent
                .store
                .get::<Token>(Table::AclTokens, &id)?
                .ok_or_else(|| Error::NotFound(TOKEN_NOT_FOUND.to_owned()))?;
            Ok(render_token(with_policy_names(&agent, token)?, &authorizer))
        },
    )
    .await
}

/// `GET /v1/acl/token/self`: the caller's own token.
pub async fn token_self(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    // Resolving proves the secret is valid (403 "ACL not found" otherwise).
    let authorizer = ctx.authorizer(&agent)?;
    let secret = ctx
        .token
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| crate::acl::ANONYMOUS_SECRET.to_owned());
    let token = agent
        .store
        .list::<Token>(Table::AclTokens)?
        .into_iter()
        .find(|t| t.secret_id == secret)
        .ok_or(Error::AclNotFound)?;
    Ok(json_with_index(
        agent.store.index(Table::AclTokens),
        &render_token(with_policy_names(&agent, token)?, &authorizer),
    ))
}

/// `GET /v1/acl/tokens`: secrets are shown only to `acl:write` holders ([`render_token`]).
pub async fn list_tokens(State(agent): State<AgentState>, ctx: Ctx) -> Result<Response> {
    let authorizer = acl_read(&agent, &ctx)?;
    blocking_json(
        &agent,
        &ctx,
        &[Table::AclTokens, Table::AclPolicies],
        |_| {
            let mut tokens = Vec::new();
            for token in agent.store.list::<Token>(Table::AclTokens)? {
                tokens.push(render_token(with_policy_names(&agent, token)?, &authorizer));
            }
            Ok(tokens)
        },
    )
    .await
}

/// `DELETE /v1/acl/token/:accessor`.
pub async fn delete_token(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response> {
    if id == ANONYMOUS_ACCESSOR_ID {
        return Err(Error::bad_request("the anonymous token cannot be deleted"));
    }
    acl_write(&agent, &ctx)?;
    let existed = write(&agent, move |tx| tx.delete(Table::AclTokens, &id)).await?;
    if !existed {
        return Err(Error::NotFound("Cannot find token to delete".to_owned()));
    }
    Ok(json_with_index(agent.store.index(Table::AclTokens), &true))
}
