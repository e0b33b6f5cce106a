//! Cross-datacenter reads, the IO shell around `remote_dc`: a GET sent to another
//! datacenter's agent with the caller's own token (never the replication token), whose ACLs
//! then decide. Global tokens replicate, so the caller's token is valid there too.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AgentState;
use crate::error::{Error, Result};
use crate::remote_dc::remote_agent;
use crate::replication::client::{PrimaryAnswer, PrimaryClient};
use crate::routes::FederationState;
use crate::store::Table;

/// Bound on a plain forwarded read: a silent partition answers a clear 503 within seconds.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a forwarded blocking read: the remote may hold it for the longest wait
/// (10 minutes), plus slack.
pub const BLOCKING_READ_TIMEOUT: Duration = Duration::from_secs(630);

/// `GET path_and_query` at `dc`'s agent.
pub async fn get(
    agent: &AgentState,
    dc: &str,
    path_and_query: String,
    token: Option<&str>,
    timeout: Duration,
) -> Result<PrimaryAnswer> {
    let federation: Vec<FederationState> = agent.store.list(Table::FederationStates)?;
    let address = remote_agent(
        &agent.config.datacenter,
        dc,
        &agent.config.primary_datacenter,
        agent.config.primary_address.as_deref(),
        &federation,
    )
    .ok_or_else(|| {
        Error::Unavailable(format!(
            "no path to datacenter {dc:?}: no federation state with its agent address yet"
        ))
    })?;
    // A read for the primary goes through the secondary's own client of the primary, so it
    // fails over along `-primary-address`'s list like replication does.
    let client = match &agent.primary {
        Some(primary) if dc == agent.config.primary_datacenter => primary.clone(),
        _ => std::sync::Arc::new(PrimaryClient::new(&address, None, &agent.config.cross_dc)?),
    };
    // The anonymous token (empty) when the caller sent none.
    let token = token.unwrap_or("").to_owned();
    tokio::task::spawn_blocking(move || {
        client.send("GET", &path_and_query, Some(&token), None, Some(timeout))
    })
    .await
    .map_err(|e| Error::Internal(format!("forwarded read: {e}")))?
}

/// The remote answer as is (status, body, content type, index).
pub fn passthrough(answer: PrimaryAnswer, dc: &str) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, answer.body).into_response();
    let headers = response.headers_mut();
    if let Some(content_type) = answer
        .content_type
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        headers.insert("content-type", content_type);
    }
    if let Some(index) = answer.index {
        headers.insert("x-consul-index", HeaderValue::from(index));
    }
    if let Ok(dc) = HeaderValue::from_str(dc) {
        headers.insert("x-controlplane-forwarded-to", dc);
    }
    response
}

/// Whether a GET on route template `route` takes `?dc=` in Consul (the catalog, health,
/// config entries, intentions, the CA roots and ACL reads). Agent-local endpoints
/// (`/v1/agent/*`, `/v1/status/*`), `catalog/datacenters` and our internal ones do not.
pub fn takes_dc(route: &str) -> bool {
    let forwardable = [
        "/v1/catalog/",
        "/v1/health/",
        "/v1/config/",
        "/v1/connect/",
        "/v1/acl/",
    ];
    forwardable.iter().any(|prefix| route.starts_with(prefix))
        && route != "/v1/catalog/datacenters"
        && route != "/v1/acl/token/self"
}

/// Consul's answer when `?dc=` names a datacenter no agent knows a path to (status 500, as
/// Consul's `structs.ErrNoDCPath`).
pub const NO_PATH_TO_DATACENTER: &str = "No path to datacenter";

/// The middleware answering `GET ...?dc=<other>` from that datacenter's agent, with the
/// caller's token: Consul forwards such reads to a server of the named datacenter. The
/// forwarded query keeps `dc`, which the other agent sees as its own and answers locally,
/// so a request is forwarded at most once.
pub async fn forward_dc_reads(
    axum::extract::State(agent): axum::extract::State<AgentState>,
    matched: Option<axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = matched.as_ref().map_or("", |m| m.as_str());
    if request.method() != axum::http::Method::GET || !takes_dc(route) {
        return next.run(request).await;
    }
    let Ok(axum::extract::Query(query)) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(request.uri())
    else {
        return next.run(request).await;
    };
    let Some(dc) = query
        .iter()
        .rev()
        .find(|(key, _)| key == "dc")
        .map(|(_, value)| value.clone())
        .filter(|dc| !dc.is_empty() && *dc != agent.config.datacenter)
    else {
        return next.run(request).await;
    };
    let known = match agent.store.list::<FederationState>(Table::FederationStates) {
        Ok(states) => remote_agent(
            &agent.config.datacenter,
            &dc,
            &agent.config.primary_datacenter,
            agent.config.primary_address.as_deref(),
            &states,
        )
        .is_some(),
        Err(e) => return e.into_response(),
    };
    if !known {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{NO_PATH_TO_DATACENTER}\n"),
        )
            .into_response();
    }
    let blocking = query
        .iter()
        .any(|(key, value)| key == "index" && value != "0");
    let timeout = if blocking {
        BLOCKING_READ_TIMEOUT
    } else {
        READ_TIMEOUT
    };
    let path_and_query = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_owned(),
        |pq| pq.as_str().to_owned(),
    );
    let token = super::request_token(request.headers());
    match get(&agent, &dc, path_and_query, token.as_deref(), timeout).await {
        Ok(answer) => passthrough(answer, &dc),
        Err(e) => e.into_response(),
    }
}
