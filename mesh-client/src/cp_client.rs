//! A small HTTP/1.1 client for controlplane-lite's Consul-shaped API, and the blocking-query
//! bookkeeping both `gateway mesh` and `gateway sidecar` follow it with.
//!
//! One request per connection (`Connection: close`): the control plane is on the same host or
//! LAN, requests are rare (a blocking query holds one open for minutes), and a fresh
//! connection per request means a restarted control plane needs no reconnect logic. Every
//! wait has a deadline and every length read is capped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_model::address::{AddressError, ControlPlaneAddress, Scheme};
use mesh_model::blocking::Backoff;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::failover::{Failover, FailoverReason};
use crate::tls::{ClientTls, TlsError};

/// Control-plane answers are small JSON documents; a route table of a few thousand services
/// stays far below this.
const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
/// How long a blocking query asks the server to hold (Consul's default is 5 minutes; a
/// shorter wait notices a silently dead control plane sooner).
pub const BLOCKING_WAIT: Duration = Duration::from_secs(60);
/// How long a blocking query asks an agent to hold when that agent is not the one that
/// answered the index it carries (the client failed over). Agents on separate stores can be
/// at an equal index with different data, and the query would then wait out the full
/// [`BLOCKING_WAIT`] before the follower sees the new agent's state; a short wait bounds that.
/// Where agents share one store an equal index means nothing changed, and the short wait
/// costs one extra answer.
pub const FAILOVER_WAIT: Duration = Duration::from_secs(5);
/// Added to `wait` for the client-side deadline: the server may add up to wait/16 of jitter.
const BLOCKING_SLACK: Duration = Duration::from_secs(15);
/// Deadline of a non-blocking request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control-plane addresses given cannot be used (the user's fault).
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The CA file or client certificate given cannot be used (the user's fault).
    #[error(transparent)]
    TlsFiles(#[from] TlsError),
    /// The TLS handshake with the agent failed: a certificate from another CA, a name that
    /// does not match, or a client certificate the agent refused.
    #[error("control plane at {address}: TLS handshake failed: {error}")]
    Tls {
        address: String,
        error: std::io::Error,
    },
    /// The control plane could not be reached (its fault or the network's).
    #[error("control plane at {address} unreachable: {error}")]
    Unreachable {
        address: String,
        error: std::io::Error,
    },
    /// The connection broke before a complete answer arrived (the agent died or was cut off).
    #[error("control plane at {address} hung up: {reason}")]
    HungUp { address: String, reason: String },
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

impl ClientError {
    /// Whether this failure says the agent asked is gone (move to the next address), and
    /// why. A 4xx, or an answer we cannot read, is the agent's considered reply: another
    /// agent would say the same.
    pub fn failover_reason(&self) -> Option<FailoverReason> {
        match self {
            ClientError::Unreachable { .. } => Some(FailoverReason::Connect),
            ClientError::Tls { .. } => Some(FailoverReason::Tls),
            ClientError::HungUp { .. } => Some(FailoverReason::HungUp),
            ClientError::Timeout { .. } => Some(FailoverReason::Timeout),
            ClientError::Status { status, .. } if *status >= 500 => {
                Some(FailoverReason::ServerError)
            }
            ClientError::Address(_)
            | ClientError::TlsFiles(_)
            | ClientError::Malformed { .. }
            | ClientError::Status { .. } => None,
        }
    }
}

/// The control-plane addresses, the token sent with every request, and the failover state
/// they share. Clones share that state (and the failover counters).
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addresses: Vec<ControlPlaneAddress>,
    token: Option<String>,
    /// Set when an address is https.
    tls: Option<Arc<rustls::ClientConfig>>,
    failover: Mutex<Failover>,
    /// Failovers by reason, in [`FailoverReason::ALL`] order.
    failovers: [AtomicU64; FailoverReason::ALL.len()],
}

/// What makes a GET a blocking query.
struct Blocking<'a> {
    /// The index held.
    index: u64,
    /// The agent that answered it.
    answered_by: Option<&'a str>,
}

impl Blocking<'_> {
    /// The request target and the client-side deadline for asking `address`.
    fn target(&self, path: &str, address: &ControlPlaneAddress) -> (String, Duration) {
        let same_agent = self
            .answered_by
            .is_none_or(|agent| agent == address.to_string());
        let wait = if same_agent {
            BLOCKING_WAIT
        } else {
            FAILOVER_WAIT
        };
        let separator = if path.contains('?') { '&' } else { '?' };
        (
            format!(
                "{path}{separator}index={}&wait={}s",
                self.index,
                wait.as_secs()
            ),
            wait + BLOCKING_SLACK,
        )
    }
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
    /// `addresses` is one address or a comma list, each `host:port` or `http://host:port`
    /// (as `CONSUL_HTTP_ADDR` often is).
    pub fn new(addresses: &str, token: Option<String>) -> Result<Client, ClientError> {
        let addresses = mesh_model::address::parse_list(&[addresses], false)?;
        Client::with_addresses(addresses, token, &ClientTls::default())
    }

    /// A client that fails over between `addresses`, in this order. `tls`'s files are read
    /// (now, so a bad file stops the start) when an address is https.
    pub fn with_addresses(
        addresses: Vec<ControlPlaneAddress>,
        token: Option<String>,
        tls: &ClientTls,
    ) -> Result<Client, ClientError> {
        if addresses.is_empty() {
            return Err(AddressError::Empty.into());
        }
        let tls = if addresses.iter().any(|a| a.scheme == Scheme::Https) {
            Some(tls.rustls_config()?)
        } else {
            None
        };
        Ok(Client {
            inner: Arc::new(Inner {
                tls,
                failover: Mutex::new(Failover::new(addresses.len())),
                addresses,
                token: token.filter(|token| !token.is_empty()),
                failovers: Default::default(),
            }),
        })
    }

    /// The address that answered last (`http://host:port`).
    pub fn address(&self) -> String {
        let current = self.failover().current();
        self.inner
            .addresses
            .get(current)
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    fn failover(&self) -> std::sync::MutexGuard<'_, Failover> {
        // The state is a few integers updated in one step: a panic elsewhere cannot leave it
        // half-written, so a poisoned lock is still usable.
        self.inner
            .failover
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.request("GET", path, None, None).await
    }

    /// A blocking query: held by the server until the index passes `index` or `wait` ends.
    /// `answered_by` is the agent (`http://host:port`) that answered `index`; any other agent
    /// is asked to hold only [`FAILOVER_WAIT`].
    pub async fn get_blocking(
        &self,
        path: &str,
        index: u64,
        answered_by: Option<&str>,
    ) -> Result<Answer, ClientError> {
        let blocking = Blocking { index, answered_by };
        self.request("GET", path, None, Some(blocking)).await
    }

    pub async fn put(&self, path: &str, body: &serde_json::Value) -> Result<Answer, ClientError> {
        let body = body.to_string();
        self.request("PUT", path, Some(body.as_bytes()), None).await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<Answer, ClientError> {
        let body = body.to_string();
        self.request("POST", path, Some(body.as_bytes()), None)
            .await
    }

    /// Ask the addresses in the failover policy's order until one gives an answer that is not
    /// a failover reason, each address at most once.
    async fn request(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&[u8]>,
        blocking: Option<Blocking<'_>>,
    ) -> Result<Answer, ClientError> {
        let count = self.inner.addresses.len();
        let mut asked = vec![false; count];
        let mut last_error = None;
        for _ in 0..count {
            let index = self.failover().next_attempt(Instant::now());
            let (Some(address), Some(false)) =
                (self.inner.addresses.get(index), asked.get(index).copied())
            else {
                break;
            };
            asked[index] = true;
            let (target, timeout) = match &blocking {
                None => (path.to_owned(), REQUEST_TIMEOUT),
                Some(blocking) => blocking.target(path, address),
            };
            let result = self
                .request_once(address, method, &target, body, timeout)
                .await;
            let reason = match &result {
                Ok(_) => None,
                Err(error) => error.failover_reason(),
            };
            let Some(reason) = reason else {
                if self.failover().succeeded(index) {
                    tracing::info!(address = %address, "control plane: now using this agent");
                }
                return result;
            };
            let next = {
                let mut failover = self.failover();
                failover.failed(index, Instant::now());
                failover.next_attempt(Instant::now())
            };
            if next != index {
                if let Some(counter) = FailoverReason::ALL
                    .iter()
                    .position(|known| *known == reason)
                    .and_then(|position| self.inner.failovers.get(position))
                {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                if let (Some(to), Err(error)) = (self.inner.addresses.get(next), &result) {
                    tracing::warn!(from = %address, to = %to, reason = reason.label(), %error, "control plane failover");
                }
            }
            last_error = result.err();
        }
        Err(last_error.unwrap_or(ClientError::Address(AddressError::Empty)))
    }

    async fn request_once(
        &self,
        address: &ControlPlaneAddress,
        method: &'static str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let exchange = self.exchange(address, method, path, body);
        let raw = match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(ClientError::Timeout {
                    address: address.to_string(),
                    timeout,
                })
            }
        };
        if raw.is_empty() {
            return Err(ClientError::HungUp {
                address: address.to_string(),
                reason: "the connection closed before any answer".to_owned(),
            });
        }
        let answer = parse_response(&raw).map_err(|reason| ClientError::Malformed {
            address: address.to_string(),
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
        address: &ControlPlaneAddress,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Vec<u8>, ClientError> {
        let stream = TcpStream::connect(&address.authority)
            .await
            .map_err(|error| ClientError::Unreachable {
                address: address.to_string(),
                error,
            })?;
        if address.scheme == Scheme::Http {
            return self.exchange_on(stream, address, method, path, body).await;
        }
        let tls_failed = |error: std::io::Error| ClientError::Tls {
            address: address.to_string(),
            error,
        };
        let config = self.inner.tls.as_ref().ok_or_else(|| {
            tls_failed(std::io::Error::other(
                "no TLS configuration (a client built without https addresses)",
            ))
        })?;
        let name = rustls::pki_types::ServerName::try_from(address.host().to_owned())
            .map_err(|e| tls_failed(std::io::Error::other(e)))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(config))
            .connect(name, stream)
            .await
            .map_err(tls_failed)?;
        self.exchange_on(stream, address, method, path, body).await
    }

    /// Write the request on a connected stream and read the whole answer.
    async fn exchange_on<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        address: &ControlPlaneAddress,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Vec<u8>, ClientError> {
        let hung_up = |error: std::io::Error| ClientError::HungUp {
            address: address.to_string(),
            reason: error.to_string(),
        };
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
            address.authority
        );
        if let Some(token) = &self.inner.token {
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
        stream.write_all(head.as_bytes()).await.map_err(hung_up)?;
        stream.write_all(body).await.map_err(hung_up)?;
        let mut raw = Vec::new();
        let mut limited = (&mut stream).take(MAX_RESPONSE_BYTES as u64 + 1);
        limited.read_to_end(&mut raw).await.map_err(hung_up)?;
        if raw.len() > MAX_RESPONSE_BYTES {
            return Err(ClientError::Malformed {
                address: address.to_string(),
                reason: format!("answer larger than {MAX_RESPONSE_BYTES} bytes"),
            });
        }
        Ok(raw)
    }

    /// Append the Prometheus text of the failover counters and of the agent in use.
    pub fn render_metrics(&self, w: &mut prom_text::Writer<'_>) {
        use prom_text::Kind;
        w.family(
            "gateway_control_plane_failovers_total",
            Kind::Counter,
            "Requests moved to the next control-plane address, by reason.",
        );
        for (reason, counter) in FailoverReason::ALL.iter().zip(&self.inner.failovers) {
            w.sample(
                "gateway_control_plane_failovers_total",
                &[("reason", reason.label())],
                counter.load(Ordering::Relaxed),
            );
        }
        let current = self.failover().current();
        w.family(
            "gateway_control_plane_agent",
            Kind::Gauge,
            "1 for the control-plane address in use, 0 for the others.",
        );
        for (index, address) in self.inner.addresses.iter().enumerate() {
            let address = address.to_string();
            w.sample(
                "gateway_control_plane_agent",
                &[("address", address.as_str())],
                u8::from(index == current),
            );
        }
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    fn addresses_accept_an_http_prefix_and_comma_lists() {
        let client = Client::new("http://127.0.0.1:8500/, 127.0.0.1:8501", None).expect("client");
        assert_eq!(client.address(), "http://127.0.0.1:8500");
        assert_eq!(client.inner.addresses.len(), 2);
        assert!(Client::new(" , ", None).is_err());
    }

    #[test]
    fn a_blocking_query_holds_briefly_on_an_agent_that_did_not_answer_its_index() {
        let agent = |text: &str| ControlPlaneAddress::parse(text, false).expect("address");
        let blocking = Blocking {
            index: 42,
            answered_by: Some("http://a:1"),
        };
        let (target, timeout) = blocking.target("/v1/x?dc=d", &agent("a:1"));
        assert_eq!(target, "/v1/x?dc=d&index=42&wait=60s");
        assert_eq!(timeout, BLOCKING_WAIT + BLOCKING_SLACK);
        let (target, timeout) = blocking.target("/v1/x", &agent("b:2"));
        assert_eq!(target, "/v1/x?index=42&wait=5s");
        assert_eq!(timeout, FAILOVER_WAIT + BLOCKING_SLACK);
    }

    /// An agent answering every request with `status`, returning its address.
    async fn agent_answering(status: u16) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            // Bounded: the test makes a handful of requests.
            for _ in 0..16 {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer).await;
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nX-Consul-Index: 3\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        address
    }

    /// Connect refused, then a 5xx, move on; the third address answers and stays in use; a
    /// 4xx does not move.
    #[test]
    fn requests_fail_over_on_refused_connects_and_5xx_but_not_4xx() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            // Bound by us and never listening: connects are refused, and no other process
            // can take the port while the test holds it.
            let dead = tokio::net::TcpSocket::new_v4().expect("socket");
            dead.bind("127.0.0.1:0".parse().expect("address"))
                .expect("bind");
            let dead = dead.local_addr().expect("address");
            let failing = agent_answering(503).await;
            let healthy = agent_answering(200).await;
            let client = Client::new(&format!("{dead},{failing},{healthy}"), None).expect("client");
            let answer = tokio::time::timeout(Duration::from_secs(10), client.get("/v1/x"))
                .await
                .expect("in time")
                .expect("the third address answers");
            assert_eq!(answer.index, Some(3));
            assert_eq!(client.address(), format!("http://{healthy}"));
            let mut metrics = String::new();
            client.render_metrics(&mut prom_text::Writer::new(&mut metrics));
            for line in [
                "gateway_control_plane_failovers_total{reason=\"connect\"} 1",
                "gateway_control_plane_failovers_total{reason=\"server_error\"} 1",
                "gateway_control_plane_failovers_total{reason=\"timeout\"} 0",
            ] {
                assert!(metrics.contains(line), "{line} missing from\n{metrics}");
            }
            assert!(metrics.contains(&format!(
                "gateway_control_plane_agent{{address=\"http://{healthy}\"}} 1"
            )));
            assert!(metrics.contains(&format!(
                "gateway_control_plane_agent{{address=\"http://{dead}\"}} 0"
            )));

            // A 4xx is an answer: the client stays where it is.
            let refusing = agent_answering(403).await;
            let client = Client::new(&format!("{refusing},{healthy}"), None).expect("client");
            let error = client.get("/v1/x").await.expect_err("403");
            assert!(
                matches!(error, ClientError::Status { status: 403, .. }),
                "{error}"
            );
            assert_eq!(client.address(), format!("http://{refusing}"));
        });
    }
}
