//! Write forwarding (spec §4.5): in a secondary, a write to replicated data (intentions, config
//! entries, ACL policies and global tokens, federation states) is sent to the primary with the
//! caller's own token, and the answer is returned as is. The secondary's copy then converges
//! through replication. Local ACL tokens stay local.

use axum::body::{to_bytes, Body};
use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::acl::Token;
use crate::error::Error;
use crate::http::AgentState;
use crate::store::Table;

/// Largest body forwarded (the same order as axum's default extractor limit).
const MAX_FORWARDED_BODY: usize = 2 << 20;

/// Whether `method` on the route template `route` writes replicated data.
pub fn is_replicated_write(method: &Method, route: &str) -> bool {
    let write = |m: &Method| m == Method::PUT || m == Method::POST || m == Method::DELETE;
    if !write(method) {
        return false;
    }
    matches!(
        route,
        "/v1/connect/intentions"
            | "/v1/connect/intentions/{id}"
            | "/v1/connect/intentions/exact"
            | "/v1/config"
            | "/v1/config/{kind}/{name}"
            | "/v1/acl/bootstrap"
            | "/v1/acl/policy"
            | "/v1/acl/policy/{id}"
            | "/v1/acl/token"
            | "/v1/acl/token/{id}"
            | "/v1/internal/federation-state/{dc}"
    )
}

/// The middleware (installed on every agent; a no-op without a primary to forward to).
pub async fn forward_writes(
    State(agent): State<AgentState>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let Some(client) = agent.primary.clone() else {
        return next.run(request).await;
    };
    let route = matched.as_ref().map_or("", |m| m.as_str()).to_owned();
    if !is_replicated_write(request.method(), &route) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let body = match to_bytes(body, MAX_FORWARDED_BODY).await {
        Ok(body) => body,
        Err(_) => {
            return Error::bad_request(format!(
                "request body over {MAX_FORWARDED_BODY} bytes or unreadable"
            ))
            .into_response()
        }
    };
    if stays_local(&agent, &parts.method, &route, parts.uri.path(), &body) {
        return next.run(Request::from_parts(parts, Body::from(body))).await;
    }
    let token = crate::http::request_token(&parts.headers);
    let method = parts.method.as_str().to_owned();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let body = (!body.is_empty()).then(|| body.to_vec());
    let answer = tokio::task::spawn_blocking(move || {
        // The caller's token, or the anonymous token (empty header) — never the replication
        // token, which would let anyone write with its rights.
        client.send(
            &method,
            &path,
            Some(token.as_deref().unwrap_or("")),
            body,
            None,
        )
    })
    .await;
    let answer = match answer {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) => {
            agent.metrics.count_forwarded("error");
            return Error::Unavailable(format!(
                "this write must go to the primary datacenter {:?}, which is unreachable: {error}",
                agent.config.primary_datacenter
            ))
            .into_response();
        }
        Err(error) => return Error::Internal(error.to_string()).into_response(),
    };
    agent.metrics.count_forwarded("ok");
    super::remote::passthrough(answer, &agent.config.primary_datacenter)
}

/// Local ACL tokens are created, updated and deleted in their own datacenter.
fn stays_local(agent: &AgentState, method: &Method, route: &str, path: &str, body: &[u8]) -> bool {
    match (method, route) {
        (&Method::PUT, "/v1/acl/token") => serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .map(crate::casing::normalize)
            .and_then(|v| v.get("Local").and_then(serde_json::Value::as_bool))
            .unwrap_or(false),
        (&Method::DELETE | &Method::PUT, "/v1/acl/token/{id}") => {
            let accessor = path.rsplit('/').next().unwrap_or("");
            agent
                .store
                .get::<Token>(Table::AclTokens, accessor)
                .ok()
                .flatten()
                .is_some_and(|t| t.local)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_writes_of_replicated_data_are_forwarded() {
        assert!(is_replicated_write(&Method::POST, "/v1/connect/intentions"));
        assert!(is_replicated_write(&Method::PUT, "/v1/config"));
        assert!(is_replicated_write(&Method::DELETE, "/v1/acl/token/{id}"));
        assert!(!is_replicated_write(&Method::GET, "/v1/connect/intentions"));
        assert!(!is_replicated_write(
            &Method::PUT,
            "/v1/agent/service/register"
        ));
        assert!(!is_replicated_write(
            &Method::POST,
            "/v1/connect/ca/leaf/sign"
        ));
    }
}
