//! The CLI's HTTP client: a small blocking ureq agent that talks to the local agent.

use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, Result};

/// Bound on one CLI request; the CLI never issues blocking queries.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for one agent address and token.
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// An HTTP answer the CLI may want to inspect.
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Body text.
    pub body: String,
}

impl Client {
    /// `address` is `host:port`, `http://host:port` or `https://host:port` (Consul's rules:
    /// no scheme means http unless `ssl`, i.e. `CONSUL_HTTP_SSL=true`). HTTPS trusts only
    /// `tls.ca_file`.
    pub fn new(
        address: &str,
        token: Option<String>,
        ssl: bool,
        tls: &crate::tls::ClientTls,
    ) -> Result<Client> {
        let address = address.trim_end_matches('/');
        let base = if address.starts_with("http://") || address.starts_with("https://") {
            address.to_owned()
        } else if address.contains("://") {
            return Err(Error::bad_request(format!(
                "-http-addr {address:?}: only http:// and https:// are supported"
            )));
        } else if ssl {
            format!("https://{address}")
        } else {
            format!("http://{address}")
        };
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT));
        if base.starts_with("https://") {
            config =
                config.tls_config(tls.ureq_config().map_err(|e| {
                    Error::bad_request(format!("{e} (set -ca-file or CONSUL_CACERT)"))
                })?);
        }
        Ok(Client {
            base,
            token: token.filter(|t| !t.is_empty()),
            agent: config.build().into(),
        })
    }

    /// Sends a request; `body` is JSON text.
    pub fn request(&self, method: &str, path: &str, body: Option<String>) -> Result<Answer> {
        let url = format!("{}{}", self.base, path);
        let unreachable = |e: ureq::Error| {
            Error::Unavailable(format!("cannot reach the agent at {}: {e}", self.base))
        };
        let mut response = match (method, body) {
            ("GET", _) => self.with_token(self.agent.get(&url)).call(),
            ("DELETE", _) => self.with_token(self.agent.delete(&url)).call(),
            ("PUT", Some(body)) => self
                .with_token(self.agent.put(&url))
                .header("content-type", "application/json")
                .send(body),
            ("PUT", None) => self.with_token(self.agent.put(&url)).send_empty(),
            ("POST", Some(body)) => self
                .with_token(self.agent.post(&url))
                .header("content-type", "application/json")
                .send(body),
            ("POST", None) => self.with_token(self.agent.post(&url)).send_empty(),
            (other, _) => return Err(Error::Internal(format!("unsupported method {other}"))),
        }
        .map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().map_err(unreachable)?;
        Ok(Answer { status, body })
    }

    /// Sends a request with a binary body and reads a binary answer of up to `limit` bytes
    /// (snapshots are larger than the JSON answers [`Client::request`] expects).
    pub fn bytes(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        limit: u64,
    ) -> Result<(u16, Vec<u8>)> {
        let url = format!("{}{}", self.base, path);
        let unreachable = |e: ureq::Error| {
            Error::Unavailable(format!("cannot reach the agent at {}: {e}", self.base))
        };
        let mut response = match (method, body) {
            ("GET", _) => self.with_token(self.agent.get(&url)).call(),
            ("PUT", Some(body)) => self
                .with_token(self.agent.put(&url))
                .header("content-type", "application/octet-stream")
                .send(body),
            (other, _) => return Err(Error::Internal(format!("unsupported method {other}"))),
        }
        .map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(unreachable)?;
        Ok((status, body))
    }

    fn with_token<B>(&self, builder: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => builder.header("X-Consul-Token", token),
            None => builder,
        }
    }

    /// Sends a request and parses a successful JSON answer; other statuses become errors that
    /// carry the agent's message.
    pub fn json(&self, method: &str, path: &str, body: Option<String>) -> Result<Value> {
        let answer = self.request(method, path, body)?;
        if !(200..300).contains(&answer.status) {
            return Err(Error::bad_request(format!(
                "Unexpected response code: {} ({})",
                answer.status,
                answer.body.trim()
            )));
        }
        if answer.body.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&answer.body)
            .map_err(|e| Error::Internal(format!("agent sent invalid JSON: {e}")))
    }
}

/// Percent-encodes a query or path value (RFC 3986 unreserved characters pass through).
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
