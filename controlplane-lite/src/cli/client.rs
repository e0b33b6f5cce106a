//! The CLI's HTTP client: a small blocking ureq agent that talks to the local agent, or to
//! the first of several agents that answers (`-http-addr a,b`, with `mesh-client`'s failover
//! policy, the one `gateway mesh` and the sidecar use).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use mesh_client::failover::Failover;
use mesh_model::address::Scheme;

use serde_json::Value;

use crate::error::{Error, Result};

/// Bound on one CLI request; the CLI never issues blocking queries.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for one or several agent addresses and a token.
pub struct Client {
    /// `http://host:port` or `https://host:port`, in failover order.
    bases: Vec<String>,
    failover: Mutex<Failover>,
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
    /// Each of `addresses` is `host:port`, `http://host:port` or `https://host:port`, or a
    /// comma list of them (Consul's rules, from `mesh-model`: no scheme means http unless
    /// `ssl`, i.e. `CONSUL_HTTP_SSL=true`). HTTPS trusts only `tls.ca_file`.
    pub fn new(
        addresses: &[String],
        token: Option<String>,
        ssl: bool,
        tls: &crate::tls::ClientTls,
    ) -> Result<Client> {
        let addresses = mesh_model::address::parse_list(addresses, ssl)
            .map_err(|e| Error::bad_request(e.to_string()))?;
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT));
        if addresses.iter().any(|a| a.scheme == Scheme::Https) {
            config =
                config.tls_config(tls.ureq_config().map_err(|e| {
                    Error::bad_request(format!("{e} (set -ca-file or CONSUL_CACERT)"))
                })?);
        }
        Ok(Client {
            failover: Mutex::new(Failover::new(addresses.len())),
            bases: addresses.iter().map(ToString::to_string).collect(),
            token: token.filter(|t| !t.is_empty()),
            agent: config.build().into(),
        })
    }

    /// Run `attempt` against the agents in the failover policy's order, each at most once,
    /// until one answers with a status below 500; a connect error, timeout or 5xx moves on
    /// (a 4xx is the agent's answer). The last failure is returned when every agent failed.
    fn with_failover<T>(
        &self,
        attempt: impl Fn(&str) -> std::result::Result<(u16, T), ureq::Error>,
    ) -> Result<(u16, T)> {
        let lock = || self.failover.lock().unwrap_or_else(PoisonError::into_inner);
        let mut asked = vec![false; self.bases.len()];
        let mut last = None;
        for _ in 0..self.bases.len() {
            let index = lock().next_attempt(Instant::now());
            let (Some(base), Some(false)) = (self.bases.get(index), asked.get(index).copied())
            else {
                break;
            };
            asked[index] = true;
            match attempt(base) {
                Ok((status, body)) if status < 500 => {
                    lock().succeeded(index);
                    return Ok((status, body));
                }
                Ok((status, body)) => {
                    last = Some(Ok((status, body)));
                }
                Err(e) => {
                    last = Some(Err(Error::Unavailable(format!(
                        "cannot reach the agent at {base}: {e}"
                    ))));
                }
            }
            lock().failed(index, Instant::now());
            if self.bases.len() > 1 {
                eprintln!("agent at {base} failed; trying the next address");
            }
        }
        last.unwrap_or_else(|| Err(Error::Unavailable("no agent address".to_owned())))
    }

    /// Sends a request; `body` is JSON text.
    pub fn request(&self, method: &str, path: &str, body: Option<String>) -> Result<Answer> {
        let (status, body) =
            self.with_failover(|base| self.request_once(base, method, path, body.clone()))?;
        Ok(Answer { status, body })
    }

    fn request_once(
        &self,
        base: &str,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> std::result::Result<(u16, String), ureq::Error> {
        let url = format!("{base}{path}");
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
            (other, _) => return Err(ureq::Error::BadUri(format!("unsupported method {other}"))),
        }?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string()?;
        Ok((status, body))
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
        self.with_failover(|base| self.bytes_once(base, method, path, body, limit))
    }

    fn bytes_once(
        &self,
        base: &str,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        limit: u64,
    ) -> std::result::Result<(u16, Vec<u8>), ureq::Error> {
        let url = format!("{base}{path}");
        let mut response = match (method, body) {
            ("GET", _) => self.with_token(self.agent.get(&url)).call(),
            ("PUT", Some(body)) => self
                .with_token(self.agent.put(&url))
                .header("content-type", "application/octet-stream")
                .send(body),
            (other, _) => return Err(ureq::Error::BadUri(format!("unsupported method {other}"))),
        }?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()?;
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
