//! Config entry endpoints (`/v1/config`).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;

use super::{blocking_json, json_body, json_with_index, write, AgentState, Ctx};
use crate::acl::{require, Authorizer};
use crate::config_entries::{entry_key, ConfigEntry, KINDS};
use crate::error::{Error, Result};
use crate::store::Table;

/// Who may write an entry: `operator:write` for proxy-defaults, `service:write` on the service
/// for service-defaults (Consul's rules).
fn can_write(authorizer: &Authorizer, kind: &str, name: &str) -> Result<()> {
    match kind {
        "proxy-defaults" => require(authorizer.operator_write(), || "operator:write".to_owned()),
        _ => require(authorizer.service_write(name), || {
            format!("service:write on {name}")
        }),
    }
}

/// proxy-defaults is readable by every token (Consul: `CanRead` is always true);
/// service-defaults needs `service:read`.
fn can_read(authorizer: &Authorizer, entry: &ConfigEntry) -> bool {
    match entry {
        ConfigEntry::ProxyDefaults(_) => true,
        ConfigEntry::ServiceDefaults(e) => authorizer.service_read(&e.name),
    }
}

fn check_kind(kind: &str) -> Result<()> {
    if KINDS.contains(&kind) {
        Ok(())
    } else {
        Err(Error::bad_request(format!(
            "unsupported config entry kind {kind:?} (supported: {})",
            KINDS.join(", ")
        )))
    }
}

/// `PUT /v1/config[?cas=N]`: writes an entry; answers `true` (or `false` on a failed CAS).
pub async fn apply(State(agent): State<AgentState>, ctx: Ctx, body: Bytes) -> Result<Response> {
    let mut entry = ConfigEntry::parse(crate::casing::normalize(json_body(&body)?))?;
    let cas = match ctx.query.get("cas") {
        Some(text) => Some(
            text.parse::<u64>()
                .map_err(|_| Error::bad_request("invalid query parameter `cas`"))?,
        ),
        None => None,
    };
    let authorizer = ctx.authorizer(&agent)?;
    can_write(&authorizer, entry.kind(), entry.name())?;
    let applied = write(&agent, move |tx| {
        let key = entry.key();
        let existing: Option<ConfigEntry> = tx.get(Table::ConfigEntries, &key)?;
        if let Some(cas) = cas {
            let current = existing.as_ref().map_or(0, ConfigEntry::modify_index);
            if current != cas {
                return Ok(false);
            }
        }
        let create = existing
            .as_ref()
            .map_or(tx.index(), ConfigEntry::create_index);
        entry.set_indexes(create, tx.index());
        tx.put(Table::ConfigEntries, &key, &entry)?;
        Ok(true)
    })
    .await?;
    Ok(json_with_index(
        agent.store.index(Table::ConfigEntries),
        &applied,
    ))
}

/// `GET /v1/config/:kind/:name` (blocking).
pub async fn read(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Response> {
    check_kind(&kind)?;
    let authorizer = ctx.authorizer(&agent)?;
    blocking_json(&agent, &ctx, &[Table::ConfigEntries], |_| {
        let entry: ConfigEntry = agent
            .store
            .get(Table::ConfigEntries, &entry_key(&kind, &name))?
            .ok_or_else(|| {
                Error::NotFound(format!("Config entry not found for {kind:?} / {name:?}"))
            })?;
        require(can_read(&authorizer, &entry), || {
            format!("read on {kind}/{name}")
        })?;
        Ok(entry)
    })
    .await
}

/// `GET /v1/config/:kind` (blocking): entries of one kind the token may read.
pub async fn list(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path(kind): Path<String>,
) -> Result<Response> {
    check_kind(&kind)?;
    let authorizer = ctx.authorizer(&agent)?;
    blocking_json(&agent, &ctx, &[Table::ConfigEntries], |_| {
        let entries: Vec<ConfigEntry> = agent.store.list(Table::ConfigEntries)?;
        Ok(entries
            .into_iter()
            .filter(|e| e.kind() == kind && can_read(&authorizer, e))
            .collect::<Vec<_>>())
    })
    .await
}

/// `DELETE /v1/config/:kind/:name`: answers `true` (also when the entry did not exist).
pub async fn delete(
    State(agent): State<AgentState>,
    ctx: Ctx,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Response> {
    check_kind(&kind)?;
    let authorizer = ctx.authorizer(&agent)?;
    can_write(&authorizer, &kind, &name)?;
    write(&agent, move |tx| {
        tx.delete(Table::ConfigEntries, &entry_key(&kind, &name))
    })
    .await?;
    Ok(json_with_index(
        agent.store.index(Table::ConfigEntries),
        &true,
    ))
}
