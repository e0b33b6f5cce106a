//! The connection to an etcd cluster (`agent -store etcd -etcd-endpoints URL,URL,URL`).
//!
//! Endpoints are `unix://PATH` (etcd 3.4's `--listen-client-urls unix://NAME:1`, what
//! `scripts/etcd-cluster` starts: no TCP port has to be chosen) or `http://HOST:PORT`. The
//! `etcd-client` crate only dials `http(s)://` URLs itself, so the agent hands it a tonic
//! channel whose connector dials the endpoints itself (the crate's `raw-channel` feature): one
//! HTTP/2 connection at a time, to the first endpoint that answers, starting from the last one
//! that worked. When that member dies its connection breaks and the next request dials the
//! others, which is the failover the agent needs; etcd forwards writes to its raft leader, so
//! any member serves every request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;

/// The longest endpoint list the agent takes (a cluster has 3, 5 or 7 members).
pub const MAX_ENDPOINTS: usize = 16;
/// A unix socket path is at most 107 bytes on Linux.
const MAX_SOCKET_PATH: usize = 107;
/// Dialing one member gives up after this, so a dead member costs little before the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an HTTP/2 ping checks that the member is alive. etcd's server refuses pings
/// closer together than its `--grpc-keepalive-min-time` (5 s by default): after three such
/// pings on a connection with no traffic it sends GOAWAY and closes it, which broke an idle
/// agent's watch every 8 s and made it refuse reads until it reconnected. grpc-go clients
/// never ping more often than every 10 s, for the same reason; neither does the agent.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// A ping unanswered this long breaks the connection, so a member that hangs (rather than
/// dies, which closes its socket at once) is left within 15 s and the next request dials
/// another one. Every call also has its own deadline, so no request waits that long.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an endpoint list or a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// `-etcd-endpoints` is empty, too long, or has an entry that is not a URL we dial.
    #[error("-etcd-endpoints: {0}")]
    Endpoints(String),
    /// The client could not be built or the cluster did not answer.
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    /// The cluster did not answer within the deadline.
    #[error("etcd: no answer from {endpoints} within {timeout:?}")]
    Timeout {
        /// The endpoints tried.
        endpoints: String,
        /// How long we waited.
        timeout: Duration,
    },
}

/// One etcd member's client address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(std::path::PathBuf),
    /// `host:port` over plain TCP (the cluster's network is trusted, like etcd's own default).
    Tcp(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix://{}", path.display()),
            Endpoint::Tcp(address) => write!(f, "http://{address}"),
        }
    }
}

/// Parses `-etcd-endpoints`: comma-separated `unix://PATH` or `http://HOST:PORT` (a bare
/// `HOST:PORT` means http). `https://` is refused by name: the agent has no etcd TLS options.
pub fn parse_endpoints(list: &str) -> Result<Vec<Endpoint>, EtcdError> {
    let mut endpoints = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if endpoints.len() == MAX_ENDPOINTS {
            return Err(EtcdError::Endpoints(format!(
                "more than {MAX_ENDPOINTS} endpoints"
            )));
        }
        let endpoint = if let Some(path) = item.strip_prefix("unix://") {
            if path.is_empty() || path.len() > MAX_SOCKET_PATH {
                return Err(EtcdError::Endpoints(format!(
                    "{item:?}: a unix socket path has 1 to {MAX_SOCKET_PATH} bytes"
                )));
            }
            Endpoint::Unix(path.into())
        } else if item.starts_with("https://") {
            return Err(EtcdError::Endpoints(format!(
                "{item:?}: TLS to etcd is not supported; use unix:// or http:// on a trusted network"
            )));
        } else {
            let address = item.strip_prefix("http://").unwrap_or(item);
            let address = address.strip_suffix('/').unwrap_or(address);
            let port_ok = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(EtcdError::Endpoints(format!(
                    "{item:?} is neither unix://PATH nor http://HOST:PORT"
                )));
            }
            Endpoint::Tcp(address.to_owned())
        };
        endpoints.push(endpoint);
    }
    if endpoints.is_empty() {
        return Err(EtcdError::Endpoints("no endpoint given".to_owned()));
    }
    Ok(endpoints)
}

/// The order in which a dial tries the endpoints: from `last_good` round the list. Sans-IO.
pub fn dial_order(count: usize, last_good: usize) -> impl Iterator<Item = usize> {
    let start = if count == 0 { 0 } else { last_good % count };
    (0..count).map(move |i| (start + i) % count)
}

/// A stream to one member, unix or TCP, for tonic's HTTP/2.
enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

async fn dial_one(endpoint: &Endpoint) -> std::io::Result<Stream> {
    let dial = async {
        match endpoint {
            Endpoint::Unix(path) => tokio::net::UnixStream::connect(path)
                .await
                .map(Stream::Unix),
            Endpoint::Tcp(address) => {
                let stream = tokio::net::TcpStream::connect(address.as_str()).await?;
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, dial)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Dials the first member that accepts, starting from the last one that did.
async fn dial(
    endpoints: Arc<[Endpoint]>,
    last_good: Arc<AtomicUsize>,
) -> std::io::Result<TokioIo<Stream>> {
    let mut last_error = None;
    for i in dial_order(endpoints.len(), last_good.load(Ordering::Relaxed)) {
        match dial_one(&endpoints[i]).await {
            Ok(stream) => {
                last_good.store(i, Ordering::Relaxed);
                return Ok(TokioIo::new(stream));
            }
            Err(error) => {
                tracing::debug!(endpoint = %endpoints[i], %error, "etcd member did not accept");
                last_error = Some(error);
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no etcd endpoint")))
}

/// A client for the cluster. The channel is lazy: nothing is dialed until the first request,
/// so callers bound their first request with a deadline ([`connect`] does).
pub async fn client(endpoints: &[Endpoint]) -> Result<etcd_client::Client, EtcdError> {
    let endpoints: Arc<[Endpoint]> = endpoints.into();
    let last_good = Arc::new(AtomicUsize::new(0));
    // The URI only names the HTTP/2 authority; the connector ignores it and dials the members.
    let channel = tonic::transport::Endpoint::from_static("http://etcd.invalid")
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            dial(endpoints.clone(), last_good.clone())
        }));
    let options = etcd_client::ConnectOptions::new().with_require_leader(true);
    Ok(
        etcd_client::Client::from_channel(etcd_client::Channel::Tonic(channel), Some(options))
            .await?,
    )
}

/// A client that has seen the cluster answer (a status call) within `timeout`.
pub async fn connect(
    endpoints: &[Endpoint],
    timeout: Duration,
) -> Result<etcd_client::Client, EtcdError> {
    let mut client = client(endpoints).await?;
    let names = || {
        endpoints
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    match tokio::time::timeout(timeout, client.status()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(error)) => Err(EtcdError::Client(error)),
        Err(_) => Err(EtcdError::Timeout {
            endpoints: names(),
            timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp_endpoints() {
        let parsed =
            parse_endpoints("unix:///tmp/e/m1.client:1, http://127.0.0.1:2379,localhost:2380")
                .expect("valid list");
        assert_eq!(
            parsed,
            vec![
                Endpoint::Unix("/tmp/e/m1.client:1".into()),
                Endpoint::Tcp("127.0.0.1:2379".into()),
                Endpoint::Tcp("localhost:2380".into()),
            ]
        );
        assert_eq!(parsed[0].to_string(), "unix:///tmp/e/m1.client:1");
    }

    #[test]
    fn refuses_bad_endpoints() {
        for bad in [
            "",
            ",",
            "https://127.0.0.1:2379",
            "127.0.0.1",
            "http://:2379",
            "unix://",
        ] {
            assert!(parse_endpoints(bad).is_err(), "{bad:?} must be refused");
        }
        let long = format!("unix:///{}", "a".repeat(200));
        assert!(parse_endpoints(&long).is_err());
        let many = vec!["127.0.0.1:1"; MAX_ENDPOINTS + 1].join(",");
        assert!(parse_endpoints(&many).is_err());
    }

    #[test]
    fn dials_from_the_last_good_member_round_the_list() {
        assert_eq!(dial_order(3, 0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(dial_order(3, 2).collect::<Vec<_>>(), vec![2, 0, 1]);
        assert_eq!(dial_order(3, 7).collect::<Vec<_>>(), vec![1, 2, 0]);
        assert_eq!(dial_order(0, 5).count(), 0);
    }
}
