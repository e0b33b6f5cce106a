//! The secondary's HTTP client for the primary (blocking ureq calls, run on tokio's blocking
//! pool by the callers). Every call has a deadline.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::tls::ClientTls;

/// Bound on a write forwarded to the primary or a federation-state push: the primary answers
/// after one durable commit (milliseconds), so a silent partition surfaces within seconds
/// instead of holding the caller for half a minute.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on opening a connection to another datacenter's agent (TCP and TLS handshakes).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How this agent reaches the agents of other datacenters (replication, forwarded writes,
/// cross-datacenter reads). Tokens cross this link, the replication token included, so it is
/// HTTPS verified against `-ca-file` unless the operator explicitly accepts plain HTTP.
#[derive(Clone, Debug, Default)]
pub struct CrossDcTransport {
    /// Roots the other agent's certificate must chain to, and this agent's own certificate
    /// for peers that `-verify-incoming`.
    pub tls: ClientTls,
    /// `-primary-insecure-http`: plain `http://` is accepted (tokens cross in clear text).
    pub allow_insecure_http: bool,
}

impl CrossDcTransport {
    /// The base URL for another datacenter's agent at `address`: `https://` is used when
    /// asked for or when a CA file is configured; `http://` only with the insecure flag.
    pub fn base_url(&self, address: &str) -> Result<String> {
        let address = address.trim_end_matches('/');
        let refuse_http = |host: &str| {
            Error::Unavailable(format!(
                "refusing plain http to another datacenter's agent at {host}: tokens would cross in clear text; use https with -ca-file, or pass -primary-insecure-http"
            ))
        };
        if let Some(rest) = address.strip_prefix("https://") {
            if self.tls.ca_file.is_none() {
                return Err(Error::Unavailable(format!(
                    "https://{rest} needs -ca-file to verify the other agent"
                )));
            }
            return Ok(format!("https://{rest}"));
        }
        if let Some(rest) = address.strip_prefix("http://") {
            return if self.allow_insecure_http {
                Ok(format!("http://{rest}"))
            } else {
                Err(refuse_http(rest))
            };
        }
        if address.contains("://") {
            return Err(Error::Unavailable(format!(
                "{address:?}: only https:// (or http:// with -primary-insecure-http) is supported"
            )));
        }
        if self.tls.ca_file.is_some() {
            Ok(format!("https://{address}"))
        } else if self.allow_insecure_http {
            Ok(format!("http://{address}"))
        } else {
            Err(refuse_http(address))
        }
    }
}

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
    /// `address` is `host:port`, `https://host:port` or `http://host:port`. The scheme and
    /// trust follow [`CrossDcTransport::base_url`]: HTTPS verified against `-ca-file`, plain
    /// HTTP only with the explicit insecure flag.
    pub fn new(
        address: &str,
        replication_token: Option<String>,
        transport: &CrossDcTransport,
    ) -> Result<PrimaryClient> {
        let base = transport.base_url(address)?;
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT));
        if base.starts_with("https://") {
            config = config.tls_config(transport.tls.ureq_config()?);
        }
        let http = config.build().into();
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
        let bound = timeout.unwrap_or(WRITE_TIMEOUT);
        let unreachable = |e: ureq::Error| {
            match e {
            ureq::Error::Timeout(which) => Error::Unavailable(format!(
                "no answer from the agent at {} within {} ({which} timed out): the link between the datacenters may be partitioned",
                self.base,
                if matches!(which, ureq::Timeout::Connect) {
                    format!("{}s", CONNECT_TIMEOUT.as_secs())
                } else {
                    format!("{}s", bound.as_secs())
                }
            )),
            other => Error::Unavailable(format!("agent at {}: {other}", self.base)),
        }
        };
        let timeout = Some(bound);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_with_the_insecure_flag() {
        let none = CrossDcTransport::default();
        assert!(none.base_url("10.0.0.1:8500").is_err());
        assert!(none.base_url("http://10.0.0.1:8500").is_err());
        assert!(
            none.base_url("https://10.0.0.1:8500").is_err(),
            "https needs a CA"
        );
        let insecure = CrossDcTransport {
            allow_insecure_http: true,
            ..CrossDcTransport::default()
        };
        assert_eq!(
            insecure.base_url("10.0.0.1:8500").ok().as_deref(),
            Some("http://10.0.0.1:8500")
        );
        let tls = CrossDcTransport {
            tls: ClientTls {
                ca_file: Some("ca.pem".into()),
                ..ClientTls::default()
            },
            allow_insecure_http: false,
        };
        assert_eq!(
            tls.base_url("10.0.0.1:8500").ok().as_deref(),
            Some("https://10.0.0.1:8500")
        );
        assert!(tls.base_url("http://10.0.0.1:8500").is_err());
    }
}
