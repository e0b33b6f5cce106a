//! A small HTTP/1.1 client for controlplane-lite's Consul-shaped API, and the blocking-query
//! bookkeeping both `gateway mesh` and `gateway sidecar` follow it with.
//!
//! One request per connection (`Connection: close`): the control plane is on the same host or
//! LAN, requests are rare (a blocking query holds one open for minutes), and a fresh
//! connection per request means a restarted control plane needs no reconnect logic. Every
//! wait has a deadline and every length read is capped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_model::blocking::Backoff;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Control-plane answers are small JSON documents; a route table of a few thousand services
/// stays far below this.
const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
/// How long a blocking query asks the server to hold (Consul's default is 5 minutes; a
/// shorter wait notices a silently dead control plane sooner).
pub const BLOCKING_WAIT: Duration = Duration::from_secs(60);
/// Added to `wait` for the client-side deadline: the server may add up to wait/16 of jitter.
const BLOCKING_SLACK: Duration = Duration::from_secs(15);
/// Deadline of a non-blocking request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control plane could not be reached or hung up (its fault or the network's).
    #[error("control plane at {address} unreachable: {error}")]
    Unreachable {
        address: String,
        error: std::io::Error,
    },
    /// The request did not complete before its deadline.
    #[error("control plane at {address}: no answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    /// The answer was not HTTP/1.1 as we read it (the control plane's fault).
    #[error("control plane at {address}: malformed answer: {reason}")]
    Malformed { address: String, reason: String },
    /// The control plane answered with an error status (often our token's fault).
    #[error("{method} {path}: HTTP {status}: {body}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
}

/// A control-plane address and the token sent with every request.
#[derive(Clone, Debug)]
pub struct Client {
    /// `host:port`.
    pub address: String,
    token: Option<String>,
}

/// A successful (2xx) answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// `X-Consul-Index`, if present.
    pub index: Option<u64>,
    pub body: Vec<u8>,
}

impl Client {
    /// `address` may carry an `http://` prefix, as `CONSUL_HTTP_ADDR` often does.
    pub fn new(address: &str, token: Option<String>) -> Client {
        let address = address
            .trim()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        Client {
            address,
            token: token.filter(|token| !token.is_empty()),
        }
    }

    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.request("GET", path, None, REQUEST_TIMEOUT).await
    }

    /// A blocking query: held by the server until the index passes `index` or `wait` ends.
    pub async fn get_blocking(&self, path: &str, index: u64) -> Result<Answer, ClientError> {
        let separator = if path.contains('?') { '&' } else { '?' };
        let path = format!(
            "{path}{separator}index={index}&wait={}s",
            BLOCKING_WAIT.as_secs()
        );
        self.request("GET", &path, None, BLOCKING_WAIT + BLOCKING_SLACK)
            .await
    }

    pub async fn put(&self, path: &str, body: &serde_json::Value) -> Result<Answer, ClientError> {
        let body = body.to_string();
        self.request("PUT", path, Some(body.as_bytes()), REQUEST_TIMEOUT)
            .await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<Answer, ClientError> {
        let body = body.to_string();
        self.request("POST", path, Some(body.as_bytes()), REQUEST_TIMEOUT)
            .await
    }

    async fn request(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let exchange = self.exchange(method, path, body);
        let raw = match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(ClientError::Timeout {
                    address: self.address.clone(),
                    timeout,
                })
            }
        };
        let answer = parse_response(&raw).map_err(|reason| ClientError::Malformed {
            address: self.address.clone(),
            reason,
        })?;
        if !(200..300).contains(&answer.status) {
            return Err(ClientError::Status {
                method,
                path: path.to_owned(),
                status: answer.status,
                body: String::from_utf8_lossy(&answer.body)
                    .chars()
                    .take(512)
                    .collect(),
            });
        }
        Ok(answer)
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Vec<u8>, ClientError> {
        let unreachable = |error| ClientError::Unreachable {
            address: self.address.clone(),
            error,
        };
        let mut stream = TcpStream::connect(&self.address)
            .await
            .map_err(unreachable)?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.address
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("X-Consul-Token: {token}\r\n"));
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() || method != "GET" {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(unreachable)?;
        stream.write_all(body).await.map_err(unreachable)?;
        let mut raw = Vec::new();
        let mut limited = (&mut stream).take(MAX_RESPONSE_BYTES as u64 + 1);
        limited.read_to_end(&mut raw).await.map_err(unreachable)?;
        if raw.len() > MAX_RESPONSE_BYTES {
            return Err(ClientError::Malformed {
                address: self.address.clone(),
                reason: format!("answer larger than {MAX_RESPONSE_BYTES} bytes"),
            });
        }
        Ok(raw)
    }
}

/// Parse a whole `Connection: close` HTTP/1.1 response (sans-IO).
pub fn parse_response(raw: &[u8]) -> Result<Answer, String> {
    let head_end = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("no status line")?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut index = None;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "x-consul-index" => index = value.parse().ok(),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "content-length" => length = value.parse::<usize>().ok(),
            _ => {}
        }
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        match length {
            Some(length) if length <= rest.len() => rest[..length].to_vec(),
            Some(_) => return Err("body shorter than Content-Length".into()),
            None => rest.to_vec(),
        }
    };
    Ok(Answer {
        status,
        index,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|window| window == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Consul's rule for following a blocking query (spec §7.5), shared with controlplane-lite's
/// replication: use the returned index next time, reset to 0 if it went backwards.
pub use mesh_model::blocking::next_index;

/// The back-off between failed control-plane requests: 250 ms doubling to 30 s.
pub const BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(250),
    max: Duration::from_secs(30),
};

/// The back-off before retry number `retries` (0 for the first retry after a failure).
pub fn backoff(retries: u32) -> Duration {
    BACKOFF.delay(retries.saturating_add(1))
}

/// What the control-plane follower reports for `/metrics`.
#[derive(Default)]
pub struct ControlPlaneStats {
    pub connected: AtomicBool,
    /// Unix seconds when the snapshot in force was received (0: none yet).
    pub snapshot_received_unix: AtomicU64,
    /// The control plane's generation of the snapshot in force.
    pub snapshot_generation: AtomicU64,
    pub watch_errors: AtomicU64,
    /// Whether this process follows a control plane at all (`gateway mesh`).
    pub enabled: AtomicBool,
}

impl ControlPlaneStats {
    pub fn received(&self, generation: u64) {
        self.snapshot_received_unix
            .store(unix_now(), Ordering::Relaxed);
        self.snapshot_generation
            .store(generation, Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
    }

    /// Append the Prometheus text of these gauges (nothing for a static gateway).
    pub fn render(&self, w: &mut prom_text::Writer<'_>) {
        use prom_text::Kind;
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let received = self.snapshot_received_unix.load(Ordering::Relaxed);
        let age = if received == 0 {
            0
        } else {
            unix_now().saturating_sub(received)
        };
        w.single(
            "gateway_control_plane_connected",
            Kind::Gauge,
            "1 while the last request to the control plane succeeded.",
            self.connected.load(Ordering::Relaxed),
        );
        w.single(
            "gateway_control_plane_snapshot_age_seconds",
            Kind::Gauge,
            "Time since the route snapshot in force was received from the control plane.",
            age,
        );
        w.single(
            "gateway_control_plane_snapshot_generation",
            Kind::Gauge,
            "The control plane's generation of the route snapshot in force.",
            self.snapshot_generation.load(Ordering::Relaxed),
        );
        w.single(
            "gateway_control_plane_watch_errors_total",
            Kind::Counter,
            "Failed requests to the control plane.",
            self.watch_errors.load(Ordering::Relaxed),
        );
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_index() {
        let raw = b"HTTP/1.1 200 OK\r\nX-Consul-Index: 42\r\nContent-Length: 2\r\n\r\n{}extra";
        let answer = parse_response(raw).expect("parse");
        assert_eq!(answer.status, 200);
        assert_eq!(answer.index, Some(42));
        assert_eq!(answer.body, b"{}");
    }

    #[test]
    fn parses_chunked_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).expect("parse").body, b"abcde");
        let truncated = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\nabc";
        assert!(parse_response(truncated).is_err());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(40), Duration::from_secs(30));
    }

    #[test]
    fn address_accepts_an_http_prefix() {
        assert_eq!(
            Client::new("http://127.0.0.1:8500/", None).address,
            "127.0.0.1:8500"
        );
    }
}
