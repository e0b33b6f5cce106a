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

/// Bound on a plain forwarded read.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
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
    let client = PrimaryClient::new(&address, None, &agent.config.cross_dc)?;
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
