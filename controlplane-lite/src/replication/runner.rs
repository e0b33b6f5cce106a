//! The tokio shell around [`Replicator`] and the federation-state publisher. It performs the
//! state machine's actions (HTTP to the primary, store transactions) and feeds the outcomes
//! back; every protocol decision is made in `machine.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::client::PrimaryClient;
use super::federation::{local_gateways, needs_publish, state_for};
use super::machine::{Action, Config, Health, Replicator, RequestId};
use super::snapshot::{self, Entry, TableSnapshot};
use super::Kind;
use crate::agent::{Agent, CLUSTER_ID_KEY};
use crate::ca::{self, CaRoot, SigningKey};
use crate::catalog::ServiceInstance;
use crate::error::{Error, Result};
use crate::routes::FederationState;
use crate::store::{Index, Table};

/// How often a datacenter re-publishes its federation state even if nothing seems to have
/// changed (the primary may have lost it); Consul's anti-entropy runs on a similar timer.
const FEDERATION_RESYNC: Duration = Duration::from_secs(30);

/// Starts replication (secondary with a primary address) and the federation-state publisher
/// (every datacenter). Both stop when the agent shuts down; they are once-per-datacenter duties,
/// so the agent aborts the returned tasks when it stops leading ([`crate::leader`]).
pub fn spawn(agent: &Arc<Agent>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(client) = agent.primary.clone() {
        tasks.push(tokio::spawn(replicate(agent.clone(), client.clone())));
        tasks.push(tokio::spawn(heartbeat(agent.clone(), client)));
    }
    if agent.is_primary() || agent.primary.is_some() {
        tasks.push(tokio::spawn(publish_federation_state(agent.clone())));
    }
    tasks
}

/// How often a secondary checks that the primary answers at all, and the bound on one check.
/// Replication's blocking queries can hang for their whole `wait` on a silent partition; this
/// keeps `controlplane_replication_last_contact_seconds` within a few seconds of the truth.
const HEARTBEAT: Duration = Duration::from_secs(2);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks the primary `GET /v1/status/leader` every [`HEARTBEAT`]; each answer is a contact.
async fn heartbeat(agent: Arc<Agent>, client: Arc<PrimaryClient>) {
    let mut shutdown = agent.shutdown.subscribe();
    loop {
        let task_client = client.clone();
        let answered = tokio::task::spawn_blocking(move || {
            task_client
                .send(
                    "GET",
                    "/v1/status/leader",
                    None,
                    None,
                    Some(HEARTBEAT_TIMEOUT),
                )
                .is_ok_and(|a| a.status == 200)
        })
        .await
        .unwrap_or(false);
        if answered {
            agent.metrics.record_primary_contact();
        }
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}

type Fetched = (RequestId, Kind, Result<(u64, Value), String>);

async fn replicate(agent: Arc<Agent>, client: Arc<PrimaryClient>) {
    tracing::info!(
        primary = client.base(),
        "replicating from the primary datacenter"
    );
    let mut machine = Replicator::new(&Kind::ALL, Config::default(), Instant::now());
    let (sender, mut receiver) = mpsc::unbounded_channel::<Fetched>();
    let mut shutdown = agent.shutdown.subscribe();
    loop {
        for action in machine.poll::<Value>(Instant::now()) {
            if let Action::Fetch {
                id,
                kind,
                index,
                wait,
            } = action
            {
                let client = client.clone();
                let sender = sender.clone();
                let metrics = agent.metrics.clone();
                tokio::task::spawn_blocking(move || {
                    let result = fetch(&client, kind, index, wait).map_err(|e| e.to_string());
                    if result.is_ok() {
                        metrics.record_primary_contact();
                    }
                    let _ = sender.send((id, kind, result));
                });
            }
        }
        publish_metrics(&agent, &machine);
        let wakeup = machine
            .next_wakeup()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        tokio::select! {
            Some((id, kind, result)) = receiver.recv() => {
                let Some(Action::Apply { kind: applied_kind, index, payload, reset }) =
                    machine.on_fetched(Instant::now(), id, result)
                else {
                    if let Some(status) = machine.status(kind).filter(|s| s.health == Health::Failing) {
                        tracing::warn!(kind = kind.name(), failures = status.failures,
                            error = status.last_error.as_deref().unwrap_or(""), "replication failing");
                    }
                    continue;
                };
                if reset {
                    agent.metrics.count_replication_reset(applied_kind.name());
                    tracing::warn!(kind = applied_kind.name(), index,
                        "the primary's index went backwards; resyncing fully");
                }
                let task_agent = agent.clone();
                let task_client = client.clone();
                let outcome = tokio::task::spawn_blocking(move || {
                    apply(&task_agent, &task_client, applied_kind, payload)
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
                if let Err(error) = &outcome {
                    tracing::warn!(kind = applied_kind.name(), %error, "applying a replicated snapshot failed");
                }
                machine.on_applied(Instant::now(), applied_kind, outcome);
            }
            () = tokio::time::sleep_until(wakeup.into()) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// Resolves once the agent shuts down (the guard `wait_for` returns is dropped here, before
/// any other await, so the loops stay `Send`).
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

/// One blocking query against the primary.
fn fetch(client: &PrimaryClient, kind: Kind, index: u64, wait: Duration) -> Result<(u64, Value)> {
    let wait_ms = wait.as_millis();
    let path = match kind {
        Kind::CaRoots => format!("/v1/connect/ca/roots?index={index}&wait={wait_ms}ms"),
        other => format!(
            "/v1/internal/replication/{}?index={index}&wait={wait_ms}ms",
            other.name()
        ),
    };
    // The primary holds the query up to `wait`; allow a little more for the answer itself.
    client.get_json(&path, wait + Duration::from_secs(10))
}

fn apply(agent: &Agent, client: &PrimaryClient, kind: Kind, payload: Value) -> Result<()> {
    if kind == Kind::CaRoots {
        return apply_ca_roots(agent, client, payload);
    }
    let snapshot: TableSnapshot = serde_json::from_value(payload)
        .map_err(|e| Error::Unavailable(format!("primary sent a malformed snapshot: {e}")))?;
    // Replication results, the CA from the primary and federation states are leader duties:
    // their writes are fenced on this agent's leadership (`Agent::duty_write`).
    let changed = agent.duty_write(|tx| snapshot::apply(tx, kind, &snapshot.entries))?;
    if changed > 0 {
        tracing::debug!(
            kind = kind.name(),
            changed,
            index = snapshot.index,
            "replicated"
        );
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RootsAnswer {
    #[serde(rename = "ActiveRootID")]
    active_root_id: String,
    trust_domain: String,
    roots: Vec<CaRoot>,
}

/// Spec §5.5: adopt the primary's roots and cluster id; if this datacenter holds no
/// intermediate for the active root, make a key and CSR, have the primary sign it, check the
/// answer, and store it. The active root then lists our intermediate in `IntermediateCerts`.
fn apply_ca_roots(agent: &Agent, client: &PrimaryClient, payload: Value) -> Result<()> {
    let answer: RootsAnswer = serde_json::from_value(payload)
        .map_err(|e| Error::Unavailable(format!("primary sent malformed CA roots: {e}")))?;
    let cluster_id = answer
        .trust_domain
        .split_once('.')
        .map(|(id, _)| id.to_owned())
        .filter(|id| !id.is_empty())
        .ok_or_else(|| Error::Unavailable("primary sent no trust domain".to_owned()))?;
    let trust_domain = answer.trust_domain.clone();
    let active = answer
        .roots
        .iter()
        .find(|r| r.active && r.id == answer.active_root_id)
        .cloned()
        .ok_or_else(|| Error::Unavailable("primary has no active CA root".to_owned()))?;
    // Never let one answer replace the trust this datacenter holds.
    let held_cluster: Option<String> = agent.store.get(Table::System, CLUSTER_ID_KEY)?;
    let held_active = agent.active_root()?;
    if let Err(refused) = super::trust::check_ca_change(
        held_cluster.as_deref(),
        &cluster_id,
        held_active.as_ref(),
        &active,
    ) {
        agent.metrics.count_ca_change_refused(refused.reason());
        tracing::error!(%refused, "refused a CA change from the primary");
        return Err(Error::Unavailable(refused.to_string()));
    }
    let existing: Option<SigningKey> = agent.store.get(Table::CaSigning, &active.id)?;
    let key = match existing.filter(|k| k.intermediate_pem.is_some()) {
        Some(key) => key,
        None => {
            let request = ca::intermediate_csr(&trust_domain, &agent.config.datacenter)?;
            let body = serde_json::to_vec(&serde_json::json!({"CSR": request.csr_pem}))
                .map_err(|e| Error::Internal(e.to_string()))?;
            let signed = client
                .send(
                    "POST",
                    "/v1/connect/ca/intermediate/sign",
                    None,
                    Some(body),
                    None,
                )?
                .ok_json()?;
            let pem = signed
                .get("CertPEM")
                .and_then(Value::as_str)
                .ok_or_else(|| Error::Unavailable("primary sent no CertPEM".to_owned()))?
                .to_owned();
            ca::check_intermediate(&pem, &request.private_key_pem, &trust_domain)?;
            tracing::info!(root = %active.id, "the primary signed this datacenter's intermediate CA");
            SigningKey {
                root_id: active.id.clone(),
                private_key_pem: request.private_key_pem,
                intermediate_pem: Some(pem),
            }
        }
    };
    let mut entries = Vec::with_capacity(answer.roots.len());
    for mut root in answer.roots {
        if root.id == active.id {
            root.intermediate_certs = key.intermediate_pem.clone().map(|pem| vec![pem]);
        }
        let value = serde_json::to_value(&root).map_err(|e| Error::Internal(e.to_string()))?;
        entries.push(Entry {
            key: root.id,
            value,
        });
    }
    agent.duty_write(|tx| {
        if tx.get::<String>(Table::System, CLUSTER_ID_KEY)?.as_deref() != Some(&cluster_id) {
            tx.put(Table::System, CLUSTER_ID_KEY, &cluster_id)?;
        }
        snapshot::apply(tx, Kind::CaRoots, &entries)?;
        let stored: Option<SigningKey> = tx.get(Table::CaSigning, &active.id)?;
        if stored.and_then(|k| k.intermediate_pem) != key.intermediate_pem {
            tx.put(Table::CaSigning, &active.id, &key)?;
        }
        // Keys for roots the primary no longer lists are useless; drop them.
        for (root_id, _) in tx.entries(Table::CaSigning)? {
            if !entries.iter().any(|e| e.key == root_id) {
                tx.delete(Table::CaSigning, &root_id)?;
            }
        }
        Ok(())
    })?;
    if let Ok(expiry) = OffsetDateTime::parse(
        &active.not_after,
        &time::format_description::well_known::Rfc3339,
    ) {
        agent.metrics.set_root_expiry(expiry.unix_timestamp());
    }
    Ok(())
}

fn publish_metrics(agent: &Agent, machine: &Replicator) {
    let now = Instant::now();
    let unix_now = crate::metrics::unix_now();
    for (kind, status) in machine.statuses() {
        let last_success = status
            .last_success
            .map(|at| unix_now - now.saturating_duration_since(at).as_secs_f64());
        agent.metrics.set_replication(
            kind.name(),
            status.health == Health::Healthy,
            status.index,
            last_success,
        );
    }
}

/// Keeps this datacenter's federation state equal to its catalog's mesh gateways: stored
/// directly in the primary, pushed to the primary (replication token) from a secondary.
async fn publish_federation_state(agent: Arc<Agent>) {
    let mut services = agent.store.subscribe(Table::Services);
    let mut states = agent.store.subscribe(Table::FederationStates);
    let mut shutdown = agent.shutdown.subscribe();
    let mut last_published: Option<Vec<crate::routes::GatewayAddresses>> = None;
    let mut failures: u32 = 0;
    loop {
        let task_agent = agent.clone();
        let published = last_published.clone();
        let outcome =
            tokio::task::spawn_blocking(move || publish_once(&task_agent, published.as_deref()))
                .await
                .map_err(|e| Error::Internal(e.to_string()))
                .and_then(|r| r);
        let pause = match outcome {
            Ok(Some(sent)) => {
                failures = 0;
                last_published = Some(sent);
                None
            }
            Ok(None) => {
                failures = 0;
                None
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                tracing::warn!(%error, failures, "publishing this datacenter's federation state failed");
                // Same back-off as replication: 250 ms doubling to 8 s.
                let config = Config::default();
                Some(
                    config
                        .backoff_base
                        .saturating_mul(1 << (failures - 1).min(16))
                        .min(config.backoff_max),
                )
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                () = tokio::time::sleep(pause) => continue,
                () = stopped(&mut shutdown) => return,
            }
        }
        tokio::select! {
            _ = services.changed() => {}
            _ = states.changed() => {}
            () = tokio::time::sleep(FEDERATION_RESYNC) => last_published = None,
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// One anti-entropy round. Returns what was published, if anything.
fn publish_once(
    agent: &Agent,
    last_published: Option<&[crate::routes::GatewayAddresses]>,
) -> Result<Option<Vec<crate::routes::GatewayAddresses>>> {
    let datacenter = &agent.config.datacenter;
    // Woken by every catalog write: read the mesh gateways through the index, not the catalog.
    let services: Vec<ServiceInstance> = agent
        .store
        .list_by(Index::ServiceKind, crate::catalog::KIND_MESH_GATEWAY)?;
    let desired = local_gateways(&services, &agent.config.node_address);
    let stored: Option<FederationState> = agent.store.get(Table::FederationStates, datacenter)?;
    // In a secondary the stored copy changes only once replication brings our push back, so
    // do not push the same value again in the meantime.
    let agent_address = agent.http_address.get().map_or("", String::as_str);
    if !needs_publish(&desired, agent_address, stored.as_ref())
        || last_published == Some(&desired[..])
    {
        return Ok(None);
    }
    match &agent.primary {
        None => {
            let state = state_for(datacenter, desired.clone(), agent_address);
            let key = datacenter.clone();
            agent.duty_write(move |tx| {
                if state.mesh_gateways.is_empty() {
                    tx.delete(Table::FederationStates, &key)?;
                } else {
                    let mut state = state.clone();
                    state.modify_index = tx.index();
                    tx.put(Table::FederationStates, &key, &state)?;
                }
                Ok(())
            })?;
        }
        Some(client) => {
            let path = format!("/v1/internal/federation-state/{datacenter}");
            let answer = if desired.is_empty() {
                client.send("DELETE", &path, None, None, None)?
            } else {
                let body =
                    serde_json::to_vec(&state_for(datacenter, desired.clone(), agent_address))
                        .map_err(|e| Error::Internal(e.to_string()))?;
                client.send("PUT", &path, None, Some(body), None)?
            };
            answer.ok_json()?;
        }
    }
    tracing::info!(
        gateways = desired.len(),
        "published this datacenter's federation state"
    );
    Ok(Some(desired))
}
