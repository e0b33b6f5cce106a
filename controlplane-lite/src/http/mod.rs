//! The HTTP API: a thin axum shell over the sans-IO modules.
//!
//! Every handler: parse the request into typed values (400 naming the field on failure),
//! resolve the token into an [`Authorizer`] and check the one permission the endpoint needs
//! (403), call the core, and write through [`write`] (a durable commit on a blocking thread).
//! Reads that clients poll go through [`blocking_json`].

mod acl;
mod agent_info;
mod ca;
mod catalog;
mod checks;
pub use catalog::{deregister_service, register_local};
mod config;
mod forward;
mod intentions;
mod internal;
mod remote;
mod replication;
mod snapshot;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde::Serialize;
use serde_json::Value;

use crate::acl::Authorizer;
use crate::agent::Agent;
use crate::blocking::{wait_for_change, BlockingQuery};
use crate::error::{Error, Result};
use crate::store::{Table, Transaction};

/// Shared state of every handler.
pub type AgentState = Arc<Agent>;

/// Builds the router.
pub fn router(agent: AgentState) -> Router {
    let api =
        Router::new()
            .route("/v1/catalog/datacenters", get(catalog::datacenters))
            .route("/v1/catalog/services", get(catalog::services))
            .route("/v1/catalog/service/{name}", get(catalog::service_nodes))
            .route("/v1/catalog/connect/{name}", get(catalog::connect_nodes))
            .route("/v1/health/service/{name}", get(catalog::health_service))
            .route("/v1/health/connect/{name}", get(catalog::health_connect))
            .route("/v1/agent/services", get(catalog::agent_services))
            .route("/v1/agent/service/{id}", get(agent_info::agent_service))
            .route("/v1/agent/self", get(agent_info::agent_self))
            .route("/v1/agent/checks", get(checks::agent_checks))
            .route("/v1/agent/check/register", put(checks::register))
            .route("/v1/agent/check/deregister/{id}", put(checks::deregister))
            .route("/v1/agent/check/pass/{id}", put(checks::pass))
            .route("/v1/agent/check/warn/{id}", put(checks::warn))
            .route("/v1/agent/check/fail/{id}", put(checks::fail))
            .route("/v1/agent/check/update/{id}", put(checks::update))
            .route("/v1/health/checks/{name}", get(checks::service_checks))
            .route("/v1/health/state/{state}", get(checks::state))
            .route("/v1/status/leader", get(agent_info::status_leader))
            .route("/v1/status/peers", get(agent_info::status_peers))
            .route("/v1/catalog/nodes", get(agent_info::catalog_nodes))
            .route("/v1/catalog/node/{node}", get(agent_info::catalog_node))
            .route("/v1/agent/connect/ca/roots", get(ca::roots))
            .route("/v1/agent/connect/ca/leaf/{service}", get(ca::agent_leaf))
            .route(
                "/v1/connect/ca/configuration",
                get(ca::configuration).put(ca::set_configuration),
            )
            .route("/v1/agent/service/register", put(catalog::register))
            .route(
                "/v1/agent/service/deregister/{id}",
                put(catalog::deregister),
            )
            .route("/v1/agent/reload", put(catalog::reload))
            .route("/v1/agent/connect/authorize", post(intentions::authorize))
            .route("/v1/config", put(config::apply))
            .route("/v1/config/{kind}", get(config::list))
            .route(
                "/v1/config/{kind}/{name}",
                get(config::read).delete(config::delete),
            )
            .route(
                "/v1/connect/intentions",
                get(intentions::list).post(intentions::create),
            )
            .route("/v1/connect/intentions/check", get(intentions::check))
            .route(
                "/v1/connect/intentions/exact",
                get(intentions::read_exact)
                    .put(intentions::upsert_exact)
                    .delete(intentions::delete_exact),
            )
            .route(
                "/v1/connect/intentions/match",
                get(intentions::match_intentions),
            )
            .route(
                "/v1/connect/intentions/{id}",
                get(intentions::read)
                    .put(intentions::update)
                    .delete(intentions::delete),
            )
            .route("/v1/acl/bootstrap", put(acl::bootstrap))
            .route("/v1/acl/policy", put(acl::create_policy))
            .route("/v1/acl/policies", get(acl::list_policies))
            .route("/v1/acl/policy/name/{name}", get(acl::read_policy_by_name))
            .route(
                "/v1/acl/policy/{id}",
                get(acl::read_policy)
                    .put(acl::update_policy)
                    .delete(acl::delete_policy),
            )
            .route("/v1/acl/token", put(acl::create_token))
            .route("/v1/acl/tokens", get(acl::list_tokens))
            .route("/v1/acl/token/self", get(acl::token_self))
            .route(
                "/v1/acl/token/{id}",
                get(acl::read_token)
                    .put(acl::update_token)
                    .delete(acl::delete_token),
            )
            .route("/v1/connect/ca/roots", get(ca::roots))
            .route("/v1/connect/ca/leaf/sign", post(ca::sign).put(ca::sign))
            .route(
                mesh_model::wire::MESH_GATEWAY_ROUTES_PATH,
                get(internal::routes),
            )
            .route(
                mesh_model::wire::SIDECAR_CONFIG_ROUTE,
                get(internal::sidecar),
            )
            .route(
                "/v1/internal/federation-states",
                get(internal::federation_states),
            )
            .route(
                "/v1/internal/federation-state/{dc}",
                get(internal::read_federation_state)
                    .put(internal::write_federation_state)
                    .delete(internal::delete_federation_state),
            )
            .route(
                "/v1/internal/replication/{kind}",
                get(replication::snapshot),
            )
            .route(
                "/v1/connect/ca/intermediate/sign",
                post(replication::sign_intermediate),
            )
            .route(
                "/v1/snapshot",
                get(snapshot::save).put(snapshot::restore).layer(
                    axum::extract::DefaultBodyLimit::max(crate::snapshot::MAX_SNAPSHOT_BYTES),
                ),
            )
            .route("/metrics", get(metrics));
    api.route_layer(middleware::from_fn_with_state(
        agent.clone(),
        forward::forward_writes,
    ))
    .route_layer(middleware::from_fn_with_state(
        agent.clone(),
        remote::forward_dc_reads,
    ))
    .route_layer(middleware::from_fn_with_state(
        agent.clone(),
        count_requests,
    ))
    .with_state(agent)
}

async fn metrics(State(agent): State<AgentState>) -> Response {
    let mut response = agent.metrics.render().into_response();
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Counts every matched request by method, route template and status; 403s also as ACL denials.
async fn count_requests(
    State(agent): State<AgentState>,
    matched: Option<MatchedPath>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let method = request.method().as_str().to_owned();
    let route = matched
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let code = response.status().as_u16();
    agent.metrics.count_request(&method, &route, code);
    if code == 403 {
        agent.metrics.count_acl_denied(&route);
    }
    response
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "request failed");
        }
        (status, format!("{self}\n")).into_response()
    }
}

/// The parts of a request every handler needs: the query string and the token.
pub struct Ctx {
    /// Query parameters (last value wins).
    pub query: BTreeMap<String, String>,
    /// Repeated query parameters (for `/match?name=a&name=b`).
    pub query_all: Vec<(String, String)>,
    token: Option<String>,
}

impl FromRequestParts<AgentState> for Ctx {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &AgentState) -> Result<Ctx> {
        let Query(query_all) = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|e| Error::bad_request(format!("invalid query string: {e}")))?;
        let query: BTreeMap<String, String> = query_all.iter().cloned().collect();
        let token = token_from(&parts.headers).or_else(|| query.get("token").cloned());
        Ok(Ctx {
            query,
            query_all,
            token,
        })
    }
}

/// The token a request carries in its headers (`?token=` travels in the query string).
pub fn request_token(headers: &HeaderMap) -> Option<String> {
    token_from(headers)
}

fn token_from(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers.get("x-consul-token").and_then(|v| v.to_str().ok()) {
        return Some(value.trim().to_owned());
    }
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_owned())
}

impl Ctx {
    /// Resolves the request's token (anonymous when absent).
    pub fn authorizer(&self, agent: &Agent) -> Result<Authorizer> {
        agent.authorizer(self.token.as_deref())
    }

    /// The request's token, if any (forwarded as is to another datacenter).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// A required query parameter.
    pub fn param(&self, name: &str) -> Result<&str> {
        self.query
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Error::bad_request(format!("missing query parameter `{name}`")))
    }
}

/// Parses a JSON body, reporting where it is malformed.
pub fn json_body(body: &[u8]) -> Result<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::bad_request("request body is empty; expected JSON"));
    }
    serde_json::from_slice(body)
        .map_err(|e| Error::bad_request(format!("request body is not valid JSON: {e}")))
}

/// Runs a store write on a blocking thread (the commit waits for `fsync`).
pub async fn write<R: Send + 'static>(
    agent: &AgentState,
    body: impl FnMut(&mut Transaction<'_>) -> Result<R> + Send + 'static,
) -> Result<R> {
    let agent = agent.clone();
    tokio::task::spawn_blocking(move || agent.store.write(body))
        .await
        .map_err(|e| Error::Internal(format!("write task: {e}")))?
}

/// A JSON response carrying `X-Consul-Index`.
pub fn json_with_index<T: Serialize>(index: u64, value: &T) -> Response {
    let mut response = axum::Json(value).into_response();
    let headers = response.headers_mut();
    headers.insert("x-consul-index", HeaderValue::from(index));
    headers.insert("x-consul-knownleader", HeaderValue::from_static("true"));
    headers.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
    response
}

/// Decrements the active-blocking-queries gauge even when the client goes away mid-wait.
struct BlockingGuard(AgentState);

impl Drop for BlockingGuard {
    fn drop(&mut self) {
        self.0.metrics.blocking_queries(-1);
    }
}

/// Waits (per `?index=&wait=`, the wait capped at `cap` if given) until one of `tables`
/// moves past the client's index; returns the index to answer with.
pub async fn wait_blocking(
    agent: &AgentState,
    ctx: &Ctx,
    tables: &[Table],
    cap: Option<std::time::Duration>,
) -> Result<u64> {
    read_mode(agent, ctx).await?;
    let mut query = BlockingQuery::parse(
        ctx.query.get("index").map(String::as_str),
        ctx.query.get("wait").map(String::as_str),
    )?;
    if let Some(cap) = cap {
        query.wait = query.wait.min(cap);
    }
    if query.should_wait(agent.store.max_index(tables)) {
        // Each held query costs a connection and memory; past the cap, refuse rather than
        // answer at once (which would turn clients' watch loops into busy loops).
        let _slot = agent.blocking_slots.try_acquire().map_err(|_| {
            Error::TooManyRequests(format!(
                "too many blocking queries ({} held); retry later",
                agent.config.limits.max_blocking_queries
            ))
        })?;
        let receivers = tables.iter().map(|t| agent.store.subscribe(*t)).collect();
        agent.metrics.blocking_queries(1);
        let _guard = BlockingGuard(agent.clone());
        let mut shutdown = agent.shutdown.subscribe();
        tokio::select! {
            () = wait_for_change(receivers, query.index, query.wait) => {}
            _ = shutdown.wait_for(|stopping| *stopping) => {}
        }
    }
    Ok(agent.store.max_index(tables))
}

/// Consul's read modes. `?stale`: any agent answers from its memory, whatever its link to the
/// store. `?consistent`: memory first catches up with the store's current index, read with a
/// quorum (a linearizable read; fails when the agent cannot reach one). Default: answered
/// from memory, which follows the store; an agent sharing an etcd cluster that cannot reach
/// a quorum refuses it (Consul's "No cluster leader") rather than answer a state it cannot
/// vouch for. With one agent on redb, memory is the store and all three are the same.
async fn read_mode(agent: &AgentState, ctx: &Ctx) -> Result<()> {
    if ctx.query.contains_key("stale") {
        return Ok(());
    }
    if ctx.query.contains_key("consistent") {
        let agent = agent.clone();
        return tokio::task::spawn_blocking(move || agent.store.sync_consistent())
            .await
            .map_err(|e| Error::Internal(format!("consistent read: {e}")))?;
    }
    if agent.cluster.is_some() {
        if let Some(cause) = agent.store.read_only() {
            return Err(Error::Unavailable(format!(
                "No cluster leader: {cause}. Add ?stale to read this agent's last state"
            )));
        }
    }
    Ok(())
}

/// Answers a possibly-blocking read: waits (per `?index=&wait=`) until one of `tables` moves
/// past the client's index, then computes the body from current state.
pub async fn blocking_json<T: Serialize>(
    agent: &AgentState,
    ctx: &Ctx,
    tables: &[Table],
    compute: impl FnOnce(u64) -> Result<T>,
) -> Result<Response> {
    let index = wait_blocking(agent, ctx, tables, None).await?;
    let value = compute(index)?;
    Ok(json_with_index(index, &value))
}
