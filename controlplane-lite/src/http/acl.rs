//! ACL endpoints: bootstrap, policies, tokens.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
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
            create_time: now,
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
    hash: Option<Value>,
    #[serde(default)]
    create_index: Option<Value>,
    #[serde(default)]
    modify_index: Option<Value>,
}

fn parse_policy(body: &[u8]) -> Result<PolicyRequest> {
    let request: PolicyRequest = from_value(crate::casing::normalize(json_body(body)?), "policy")?;
    validate_name(&request.name, "Name")?;
    Rules::parse(&request.rules).map_err(|e| Error::bad_request(format!("field `Rules`: {e}")))?;
    for (i, dc) in request.datacenters.iter().enumerate() {
        validate_name(dc, &format!("Datacenters[{i}]"))?;
    }
    let _ = (&request.hash, &request.create_index, &request.modify_index);
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
            name: request.name,
            description: request.description,
            rules: request.rules,
            datacenters: request.datacenters,
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
    if id == MANAGEMENT_POLICY_ID {
        return Err(Error::bad_request(
            "the global-management policy cannot be modified",
        ));
    }
    acl_write(&agent, &ctx)?;
    let policy = write(&agent, move |tx| {
        let existing: Policy = tx
            .get(Table::AclPolicies, &id)?
            .ok_or_else(|| Error::NotFound(format!("ACL policy {id:?} not found")))?;
        let policy = Policy {
            id: id.clone(),
            name: request.name,
            description: request.description,
            rules: request.rules,
            datacenters: request.datacenters,
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
            .ok_or_else(|| Error::NotFound(format!("ACL policy {id:?} not found")))
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
            .ok_or_else(|| Error::NotFound(format!("ACL policy {name:?} not found")))
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
    local: bool,
}

fn check_uuid(value: &Option<String>, field: &str) -> Result<Option<String>> {
    match value.as_deref() {
        None | Some("") => Ok(None),
        Some(text) => uuid::Uuid::parse_str(text)
            .map(|u| Some(u.to_string()))
            .map_err(|_| Error::bad_request(format!("invalid field `{field}`: must be a UUID"))),
    }
}

/// `PUT /v1/acl/token`: policies may be linked by `ID` or `Name`.
pub async fn create_token(
    State(agent): State<AgentState>,
    ctx: Ctx,
    body: Bytes,
) -> Result<Response> {
    let request: TokenRequest = from_value(crate::casing::normalize(json_body(&body)?), "token")?;
    if !request.roles.is_empty() {
        return Err(Error::bad_request(
            "field `Roles`: ACL roles are not implemented",
        ));
    }
    let accessor_id = check_uuid(&request.accessor_id, "AccessorID")?;
    let secret_id = check_uuid(&request.secret_id, "SecretID")?;
    for (i, identity) in request.service_identities.iter().enumerate() {
        validate_name(
            &identity.service_name,
            &format!("ServiceIdentities[{i}].ServiceName"),
        )?;
    }
    let authorizer = acl_write(&agent, &ctx)?;
    let now = rfc3339(OffsetDateTime::now_utc());
    let token = write(&agent, move |tx| {
        let policies: Vec<Policy> = tx.list(Table::AclPolicies)?;
        let mut links = Vec::new();
        for (i, link) in request.policies.iter().enumerate() {
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
        let tokens: Vec<Token> = tx.list(Table::AclTokens)?;
        let accessor_id = accessor_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let secret_id = secret_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
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
            description: request.description,
            policies: links,
            service_identities: request.service_identities,
            local: request.local,
            create_time: now,
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
                .ok_or_else(|| Error::NotFound(format!("ACL token {id:?} not found")))?;
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
        return Err(Error::NotFound("ACL token not found".to_owned()));
    }
    Ok(json_with_index(agent.store.index(Table::AclTokens), &true))
}
