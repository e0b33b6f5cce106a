//! The sidecar's two kinds of listener, as thin IO shells around the decisions in
//! `identity` and the configurations in `tls`.
//!
//! - An upstream listener accepts plaintext from the local application and opens mutual TLS
//!   to the destination (a sidecar, or a mesh gateway that passes the TLS through).
//! - The public listener terminates mutual TLS, authorizes the client's identity against the
//!   intentions in force, and forwards plaintext to the local application.
//!
//! Each connection reads the TLS state, configuration and intentions in force when it starts;
//! later changes apply to new connections only.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::identity::{authorize, leaf_identity};
use super::{Refusal, Shared};

/// Deadline of a TCP connect to an upstream endpoint or the local application.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of a TLS handshake, either side.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A proxied connection with no bytes either way for this long is closed (the gateway's
/// default `timeouts.idle`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Accept plaintext on one upstream's `local_bind` until the task is aborted (the upstream
/// was removed); connections already accepted run in their own tasks and continue.
pub async fn serve_upstream(shared: Arc<Shared>, local_bind: String, listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, %local_bind, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let local_bind = local_bind.clone();
        tokio::spawn(async move {
            shared
                .stats
                .upstream_accepted
                .fetch_add(1, Ordering::Relaxed);
            if let Err(refusal) = upstream_connection(&shared, &local_bind, stream).await {
                shared.stats.refused(refusal.kind);
                tracing::warn!(listener = %local_bind, reason = refusal.kind.label(), detail = %refusal.detail, "upstream connection refused");
            }
        });
    }
}

/// Why a connection was refused: a bounded kind (the metric label) and the details (the log).
pub struct Refused {
    pub kind: Refusal,
    pub detail: String,
}

fn refused(kind: Refusal, detail: impl std::fmt::Display) -> Refused {
    Refused {
        kind,
        detail: detail.to_string(),
    }
}

async fn upstream_connection(
    shared: &Shared,
    local_bind: &str,
    mut downstream: TcpStream,
) -> Result<(), Refused> {
    let config = shared.config.load_full();
    let upstream = config
        .upstreams
        .iter()
        .find(|upstream| upstream.local_bind == local_bind)
        .ok_or_else(|| refused(Refusal::NoUpstream, "upstream no longer configured"))?;
    if upstream.endpoints.is_empty() {
        return Err(refused(
            Refusal::NoEndpoints,
            format!(
                "no endpoints for {} (mode {})",
                upstream.sni, upstream.mesh_gateway_mode
            ),
        ));
    }
    let tls = shared.tls.load_full();
    let client_config = tls
        .client(&upstream.spiffe_id)
        .map_err(|error| refused(Refusal::Internal, error))?;
    let server_name = rustls::pki_types::ServerName::try_from(upstream.sni.clone())
        .map_err(|error| refused(Refusal::Internal, format!("SNI {}: {error}", upstream.sni)))?;

    // Round robin over the endpoints, trying the next one when a connect fails: nothing has
    // been sent yet, so a retry is safe.
    let start = shared.round_robin.fetch_add(1, Ordering::Relaxed);
    let count = upstream.endpoints.len();
    let mut last_error = String::new();
    let mut connected = None;
    for offset in 0..count {
        let endpoint = &upstream.endpoints[(start + offset) % count];
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint.as_str())).await {
            Ok(Ok(stream)) => {
                connected = Some(stream);
                break;
            }
            Ok(Err(error)) => last_error = format!("{endpoint}: {error}"),
            Err(_) => last_error = format!("{endpoint}: connect timeout"),
        }
    }
    let stream = connected.ok_or_else(|| refused(Refusal::UpstreamConnect, last_error))?;
    let _ = stream.set_nodelay(true);
    let connector = TlsConnector::from(client_config);
    let mut upstream_tls =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, stream)).await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                return Err(refused(
                    Refusal::UpstreamHandshake,
                    format!("{}: {error}", upstream.sni),
                ))
            }
            Err(_) => {
                return Err(refused(
                    Refusal::UpstreamHandshake,
                    format!("{}: handshake timeout", upstream.sni),
                ))
            }
        };
    tracing::debug!(sni = %upstream.sni, mode = %upstream.mesh_gateway_mode, "upstream connected");
    shared
        .stats
        .upstream_established
        .fetch_add(1, Ordering::Relaxed);
    relay(&mut downstream, &mut upstream_tls).await;
    Ok(())
}

/// Accept mutual TLS on the public listener until the process stops.
pub async fn serve_public(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "public accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            shared.stats.public_accepted.fetch_add(1, Ordering::Relaxed);
            if let Err(refusal) = public_connection(&shared, stream).await {
                shared.stats.refused(refusal.kind);
                let reason = refusal.kind.label();
                let peer = crate::Peer::new(peer, shared.redact_addresses);
                if refusal.kind == Refusal::ClientClosed {
                    tracing::debug!(%peer, "client closed before the TLS handshake completed")
                } else {
                    tracing::warn!(%peer, reason, detail = %refusal.detail, "inbound connection refused")
                }
            }
        });
    }
}

async fn public_connection(shared: &Shared, stream: TcpStream) -> Result<(), Refused> {
    let _ = stream.set_nodelay(true);
    let acceptor = TlsAcceptor::from(Arc::clone(&shared.tls.load().server));
    let mut inbound = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(refused(Refusal::ClientClosed, error))
        }
        Ok(Err(error)) => return Err(refused(Refusal::ClientHandshake, error)),
        Err(_) => return Err(refused(Refusal::ClientHandshake, "handshake timeout")),
    };
    // rustls required a certificate that chains to the roots; now who is it?
    let identity = {
        let (_, connection) = inbound.get_ref();
        let leaf = connection
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or_else(|| refused(Refusal::ClientIdentity, "no client certificate"))?;
        leaf_identity(leaf).map_err(|reason| refused(Refusal::ClientIdentity, reason))?
    };
    let service = &shared.config.load().service;
    let authorization = shared.authz.load();
    let decision = authorize(
        &authorization.intentions,
        &identity,
        service,
        authorization.default,
    );
    if !decision.allowed {
        // The handshake is complete: say goodbye properly (close_notify) and hang up.
        let _ = inbound.shutdown().await;
        return Err(refused(
            Refusal::IntentionDenied,
            format!("{identity} → {service}: {}", decision.reason),
        ));
    }
    tracing::debug!(client = %identity, reason = %decision.reason, "inbound connection authorized");
    let local_app: SocketAddr = shared.config.load().local_app;
    let mut app = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(local_app)).await {
        Ok(Ok(app)) => app,
        Ok(Err(error)) => {
            let _ = inbound.shutdown().await;
            return Err(refused(
                Refusal::LocalAppConnect,
                format!("{local_app}: {error}"),
            ));
        }
        Err(_) => {
            let _ = inbound.shutdown().await;
            return Err(refused(
                Refusal::LocalAppConnect,
                format!("{local_app}: connect timeout"),
            ));
        }
    };
    let _ = app.set_nodelay(true);
    shared
        .stats
        .public_established
        .fetch_add(1, Ordering::Relaxed);
    relay(&mut inbound, &mut app).await;
    Ok(())
}

/// Copy both ways (half-close included) until both sides are done, an error, or
/// `IDLE_TIMEOUT` without a byte in either direction.
async fn relay<A, B>(a: &mut A, b: &mut B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let last = AtomicU64::new(0);
    let mut a = Tracked {
        inner: a,
        started,
        last: &last,
    };
    let mut b = Tracked {
        inner: b,
        started,
        last: &last,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    let idle = async {
        loop {
            let quiet_since = started + Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = quiet_since + IDLE_TIMEOUT;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    };
    tokio::select! {
        _ = copy => {}
        () = idle => tracing::debug!("idle timeout"),
    }
}

/// A stream that records when it last moved a byte (milliseconds since `started`).
struct Tracked<'a, S> {
    inner: &'a mut S,
    started: Instant,
    last: &'a AtomicU64,
}

impl<S> Tracked<'_, S> {
    fn touch(&self) {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(elapsed, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut *self.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
