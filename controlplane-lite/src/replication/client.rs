//! The secondary's HTTP client for the primary (blocking ureq calls, run on tokio's blocking
//! pool by the callers). Every call has a deadline.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use mesh_client::failover::{Failover, FailoverReason};

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

/// The most addresses `-primary-address` may list: a primary datacenter runs a handful of
/// agents, and each one adds a connect timeout to the worst case of a request.
pub const MAX_PRIMARY_ADDRESSES: usize = 8;

/// Splits `-primary-address` into its addresses: one address, or a comma-separated list of at
/// most [`MAX_PRIMARY_ADDRESSES`], none empty and none repeated. Each is then checked by
/// [`CrossDcTransport::base_url`].
pub fn split_addresses(list: &str) -> Result<Vec<&str>> {
    let addresses: Vec<&str> = list.split(',').map(str::trim).collect();
    if addresses.len() > MAX_PRIMARY_ADDRESSES {
        return Err(Error::Unavailable(format!(
            "{} addresses; at most {MAX_PRIMARY_ADDRESSES} are accepted",
            addresses.len()
        )));
    }
    for (position, address) in addresses.iter().enumerate() {
        if address.is_empty() {
            return Err(Error::Unavailable(format!(
                "address {} of {list:?} is empty",
                position + 1
            )));
        }
        if addresses[..position].contains(address) {
            return Err(Error::Unavailable(format!("{address:?} is listed twice")));
        }
    }
    Ok(addresses)
}

/// Whether a failed exchange says "this agent is gone" (the failover policy moves to the next
/// address) rather than "this request is wrong" (every agent would refuse it alike).
fn failover_reason(error: &ureq::Error) -> Option<FailoverReason> {
    match error {
        ureq::Error::Timeout(_) => Some(FailoverReason::Timeout),
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => Some(FailoverReason::Connect),
        ureq::Error::Io(io) => Some(match io.kind() {
            std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::AddrNotAvailable
            | std::io::ErrorKind::NotConnected => FailoverReason::Connect,
            std::io::ErrorKind::TimedOut => FailoverReason::Timeout,
            _ => FailoverReason::HungUp,
        }),
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::TlsRequired => {
            Some(FailoverReason::Tls)
        }
        ureq::Error::Protocol(_) | ureq::Error::BodyStalled => Some(FailoverReason::HungUp),
        _ => None,
    }
}

/// Talks to the primary datacenter's agents: one address, or several agents of the primary
/// that share its store, asked in the order of mesh-client's failover policy (the one policy
/// of every client of controlplane-lite): the address that answered last, and the next one
/// on a connect error, TLS failure, timeout, hang-up or 5xx.
pub struct PrimaryClient {
    bases: Vec<String>,
    failover: Mutex<Failover>,
    replication_token: Option<String>,
    http: ureq::Agent,
}

impl PrimaryClient {
    /// `address` is `host:port`, `https://host:port` or `http://host:port`, or a comma list of
    /// them ([`split_addresses`]). The scheme and trust follow [`CrossDcTransport::base_url`]:
    /// HTTPS verified against `-ca-file`, plain HTTP only with the explicit insecure flag.
    pub fn new(
        address: &str,
        replication_token: Option<String>,
        transport: &CrossDcTransport,
    ) -> Result<PrimaryClient> {
        let bases = split_addresses(address)?
            .into_iter()
            .map(|a| transport.base_url(a))
            .collect::<Result<Vec<String>>>()?;
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT));
        if bases.iter().any(|b| b.starts_with("https://")) {
            config = config.tls_config(transport.tls.ureq_config()?);
        }
        let http = config.build().into();
        Ok(PrimaryClient {
            failover: Mutex::new(Failover::new(bases.len())),
            bases,
            replication_token: replication_token.filter(|t| !t.is_empty()),
            http,
        })
    }

    fn failover(&self) -> std::sync::MutexGuard<'_, Failover> {
        // A few integers updated in one step: a panic elsewhere cannot leave them half-written,
        // so a poisoned lock is still usable.
        self.failover.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The base URL of the primary's agent in use (the one that answered last), for logs and
    /// for `?dc=` reads sent to the primary.
    pub fn base(&self) -> &str {
        let current = self.failover().current();
        self.bases.get(current).map_or("", String::as_str)
    }

    /// Sends one request. `token` is the caller's (forwarded writes) or, if `None`, the
    /// replication token. `timeout` bounds each exchange; with several addresses each is asked
    /// at most once, in the failover policy's order, until one answers with a status below
    /// 500. When every address fails, the last error (or 5xx answer) is returned.
    pub fn send(
        &self,
        method: &str,
        path_and_query: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
        timeout: Option<Duration>,
    ) -> Result<PrimaryAnswer> {
        let count = self.bases.len();
        let mut asked = vec![false; count];
        let mut last = None;
        for _ in 0..count {
            let index = self.failover().next_attempt(Instant::now());
            let (Some(base), Some(false)) = (self.bases.get(index), asked.get(index).copied())
            else {
                break;
            };
            asked[index] = true;
            let result = self.send_to(base, method, path_and_query, token, body.clone(), timeout);
            let reason = match &result {
                Ok(answer) if answer.status >= 500 => Some(FailoverReason::ServerError),
                Ok(_) => None,
                Err((_, reason)) => *reason,
            };
            let Some(reason) = reason else {
                if self.failover().succeeded(index) && count > 1 {
                    tracing::info!(primary = %base, "replication: now using this agent of the primary");
                }
                return result.map_err(|(error, _)| error);
            };
            let next = {
                let mut failover = self.failover();
                failover.failed(index, Instant::now());
                failover.next_attempt(Instant::now())
            };
            if next != index {
                if let Some(to) = self.bases.get(next) {
                    tracing::warn!(from = %base, %to, reason = reason.label(), "primary failover");
                }
            }
            last = Some(result.map_err(|(error, _)| error));
        }
        last.unwrap_or_else(|| Err(Error::Internal("no primary address".to_owned())))
    }

    /// One exchange with the agent at `base`; an error carries whether it is a failover reason.
    fn send_to(
        &self,
        base: &str,
        method: &str,
        path_and_query: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
        timeout: Option<Duration>,
    ) -> std::result::Result<PrimaryAnswer, (Error, Option<FailoverReason>)> {
        let url = format!("{base}{path_and_query}");
        let token = token.or(self.replication_token.as_deref());
        let bound = timeout.unwrap_or(WRITE_TIMEOUT);
        let unreachable = |e: ureq::Error| {
            let reason = failover_reason(&e);
            let error = match e {
            ureq::Error::Timeout(which) => Error::Unavailable(format!(
                "no answer from the agent at {base} within {} ({which} timed out): the link between the datacenters may be partitioned",
                if matches!(which, ureq::Timeout::Connect) {
                    format!("{}s", CONNECT_TIMEOUT.as_secs())
                } else {
                    format!("{}s", bound.as_secs())
                }
            )),
            other => Error::Unavailable(format!("agent at {base}: {other}")),
        };
            (error, reason)
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
            other => {
                return Err((
                    Error::Internal(format!("cannot forward method {other}")),
                    None,
                ))
            }
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
    #[test]
    fn primary_address_is_one_address_or_a_bounded_comma_list() {
        assert_eq!(
            split_addresses("10.0.0.1:8500").ok(),
            Some(vec!["10.0.0.1:8500"])
        );
        assert_eq!(
            split_addresses("a:1, b:2,c:3").ok(),
            Some(vec!["a:1", "b:2", "c:3"])
        );
        assert!(split_addresses("a:1,,b:2").is_err(), "an empty entry");
        assert!(split_addresses("a:1,").is_err(), "a trailing comma");
        assert!(split_addresses("a:1,a:1").is_err(), "a repeated address");
        let many = (0..=MAX_PRIMARY_ADDRESSES)
            .map(|i| format!("h{i}:1"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(split_addresses(&many).is_err(), "too many addresses");
        // Each address is checked like a single one: plain http needs the insecure flag.
        let none = CrossDcTransport::default();
        assert!(PrimaryClient::new("https://a:1,b:2", None, &none).is_err());
    }

    #[test]
    fn a_dead_address_fails_over_to_the_next_and_sticks_to_it() {
        // The first address refuses connections (a listener bound then closed); the second
        // answers. Bound to port 0 and closed, so nothing else is asked to pick a port.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.to_string());
        let live = std::net::TcpListener::bind("127.0.0.1:0");
        let (Ok(dead), Ok(live)) = (dead, live) else {
            panic!("cannot bind on loopback");
        };
        let Ok(live_address) = live.local_addr() else {
            panic!("no local address");
        };
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            // Two requests: both must reach the live agent (the second without retrying the
            // dead one first, which shows the client stuck to the address that answered).
            for _ in 0..2 {
                let Ok((mut stream, _)) = live.accept() else {
                    return;
                };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                );
            }
        });
        let insecure = CrossDcTransport {
            allow_insecure_http: true,
            ..CrossDcTransport::default()
        };
        let list = format!("{dead},{live_address}");
        let Ok(client) = PrimaryClient::new(&list, None, &insecure) else {
            panic!("a valid list");
        };
        assert_eq!(client.base(), format!("http://{dead}"));
        for _ in 0..2 {
            let answer = client.send(
                "GET",
                "/v1/status/leader",
                None,
                None,
                Some(Duration::from_secs(5)),
            );
            assert!(matches!(answer, Ok(ref a) if a.status == 200 && a.index == Some(7)));
            assert_eq!(client.base(), format!("http://{live_address}"));
        }
        let _ = server.join();
    }
}
