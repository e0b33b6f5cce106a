//! The secondary's HTTP client for the primary (blocking ureq calls, run on tokio's blocking
//! pool by the callers). Every call has a deadline.

use std::time::Duration;

use crate::error::{Error, Result};

/// Bound on a write forwarded to the primary or a federation-state push.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// An answer from the primary.
pub struct PrimaryAnswer {
    /// HTTP status.
    pub status: u16,
    /// `X-Consul-Index`, if any.
    pub index: Option<u64>,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// Talks to the primary datacenter's agent.
pub struct PrimaryClient {
    base: String,
    replication_token: Option<String>,
    http: ureq::Agent,
}

impl PrimaryClient {
    /// `address` is `host:port` or `http://host:port`.
    pub fn new(address: &str, replication_token: Option<String>) -> Result<PrimaryClient> {
        let address = address.trim_end_matches('/');
        let base = match address.strip_prefix("http://") {
            Some(rest) => format!("http://{rest}"),
            None if address.contains("://") => {
                return Err(Error::Startup(format!(
                    "-primary-address {address:?}: only http:// is supported"
                )))
            }
            None => format!("http://{address}"),
        };
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Ok(PrimaryClient {
            base,
            replication_token: replication_token.filter(|t| !t.is_empty()),
            http,
        })
    }

    /// The primary's base URL (for logs).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends one request. `token` is the caller's (forwarded writes) or, if `None`, the
    /// replication token. `timeout` bounds the whole exchange.
    pub fn send(
        &self,
        method: &str,
        path_and_query: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
        timeout: Option<Duration>,
    ) -> Result<PrimaryAnswer> {
        let url = format!("{}{}", self.base, path_and_query);
        let token = token.or(self.replication_token.as_deref());
        let unreachable =
            |e: ureq::Error| Error::Unavailable(format!("primary at {}: {e}", self.base));
        let timeout = Some(timeout.unwrap_or(WRITE_TIMEOUT));
        let mut response = match method {
            "GET" | "DELETE" => {
                let builder = if method == "GET" {
                    self.http.get(&url)
                } else {
                    self.http.delete(&url)
                };
                let builder = builder.config().timeout_global(timeout).build();
                match token {
                    Some(t) => builder.header("X-Consul-Token", t).call(),
                    None => builder.call(),
                }
            }
            "PUT" | "POST" => {
                let builder = if method == "PUT" {
                    self.http.put(&url)
                } else {
                    self.http.post(&url)
                };
                let builder = builder
                    .config()
                    .timeout_global(timeout)
                    .build()
                    .header("content-type", "application/json");
                let builder = match token {
                    Some(t) => builder.header("X-Consul-Token", t),
                    None => builder,
                };
                match body {
                    Some(body) => builder.send(&body[..]),
                    None => builder.send_empty(),
                }
            }
            other => return Err(Error::Internal(format!("cannot forward method {other}"))),
        }
        .map_err(unreachable)?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let index = header("x-consul-index").and_then(|v| v.parse().ok());
        let content_type = header("content-type");
        // Bounded: replicated tables are small; 64 MiB is far above anything sane.
        let body = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .map_err(unreachable)?;
        Ok(PrimaryAnswer {
            status,
            index,
            content_type,
            body,
        })
    }

    /// A GET with the replication token that must answer 200 with JSON; returns the index and
    /// the parsed body.
    pub fn get_json(
        &self,
        path_and_query: &str,
        timeout: Duration,
    ) -> Result<(u64, serde_json::Value)> {
        let answer = self.send("GET", path_and_query, None, None, Some(timeout))?;
        let body = answer.ok_json()?;
        Ok((answer.index.unwrap_or(0), body))
    }
}

impl PrimaryAnswer {
    /// The body as JSON if the status is 2xx, else an error carrying the primary's message.
    pub fn ok_json(&self) -> Result<serde_json::Value> {
        if !(200..300).contains(&self.status) {
            let message = String::from_utf8_lossy(&self.body);
            return Err(Error::Unavailable(format!(
                "primary answered {}: {}",
                self.status,
                message.trim()
            )));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::Unavailable(format!("primary sent invalid JSON: {e}")))
    }
}
