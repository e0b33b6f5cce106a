//! The agent's HTTP server: plain and HTTPS listeners with resource limits.
//!
//! Anyone who can reach the agent can open connections before presenting a token, so the
//! server bounds what one peer can hold: a total and a per-client connection cap (Consul's
//! `limits.http_max_conns_per_client`), a deadline for the TLS handshake and for a request's
//! header (which also closes keep-alive connections that stay idle that long). A connection
//! over a cap is closed at once, before any byte is read.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// Limits of the HTTP server (agent flags).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections across all clients and listeners.
    pub max_conns: usize,
    /// Open connections from one client IP (`-http-max-conns-per-client`, Consul's default 200).
    pub max_conns_per_client: usize,
    /// A request's header, and the TLS handshake, must arrive within this; an idle keep-alive
    /// connection is closed after it.
    pub header_timeout: Duration,
    /// Blocking queries held open at once; more are answered 429.
    pub max_blocking_queries: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_conns: 4096,
            max_conns_per_client: 200,
            header_timeout: Duration::from_secs(10),
            max_blocking_queries: 2048,
        }
    }
}

/// Counts open connections per client; a [`Slot`] gives its place back when dropped.
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

#[derive(Clone, Debug)]
struct Tracker {
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
}

/// One admitted connection's place in the counts.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    client: IpAddr,
}

impl Tracker {
    /// Admits a connection from `client`, or `None` if a cap is reached. Sans-IO: pure counts.
    fn admit(&self, client: IpAddr) -> Option<Slot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mine = counts.per_client.get(&client).copied().unwrap_or(0);
        if counts.total >= self.limits.max_conns || mine >= self.limits.max_conns_per_client {
            return None;
        }
        counts.total += 1;
        counts.per_client.insert(client, mine + 1);
        Some(Slot {
            counts: self.counts.clone(),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_client.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_client.remove(&self.client);
            }
        }
    }
}

/// A bound listener; `tls` makes it HTTPS.
pub struct Listener {
    /// The socket.
    pub tcp: TcpListener,
    /// The TLS acceptor of an HTTPS listener.
    pub tls: Option<TlsAcceptor>,
}

/// Serves `router` on every listener until `shutdown` resolves, then lets open requests finish
/// (bounded by `drain`).
pub async fn serve(
    listeners: Vec<Listener>,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
    drain: Duration,
) {
    let tracker = Tracker {
        limits,
        counts: Arc::default(),
    };
    let graceful = Arc::new(GracefulShutdown::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut accept_loops = Vec::new();
    for listener in listeners {
        accept_loops.push(tokio::spawn(accept_loop(
            listener,
            router.clone(),
            tracker.clone(),
            graceful.clone(),
            stop_rx.clone(),
        )));
    }
    shutdown.await;
    stop_tx.send_replace(true);
    for handle in accept_loops {
        let _ = handle.await;
    }
    // Every accept loop has ended, so this is the only reference left.
    if let Ok(graceful) = Arc::try_unwrap(graceful) {
        if tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after {drain:?}; closing them");
        }
    }
}

async fn accept_loop(
    listener: Listener,
    router: Router,
    tracker: Tracker,
    graceful: Arc<GracefulShutdown>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.tcp.accept() => accepted,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning; the caps should keep
                // this from happening.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = tracker.admit(peer.ip()) else {
            tracing::debug!(%peer, "connection refused: connection cap reached");
            drop(stream);
            continue;
        };
        let router = router.clone();
        let timeout = tracker.limits.header_timeout;
        let tls = listener.tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            serve_connection(stream, peer, tls, router, timeout, watcher).await;
            drop(slot);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    router: Router,
    timeout: Duration,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let _ = stream.set_nodelay(true);
    let service = TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(64 << 10);
    let result = match tls {
        None => {
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            watcher.watch(connection).await
        }
        Some(acceptor) => {
            let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            watcher.watch(connection).await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_total_and_per_client() {
        let tracker = Tracker {
            limits: Limits {
                max_conns: 3,
                max_conns_per_client: 2,
                header_timeout: Duration::from_secs(1),
                max_blocking_queries: 1,
            },
            counts: Arc::default(),
        };
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let first = tracker.admit(a);
        let second = tracker.admit(a);
        assert!(first.is_some() && second.is_some());
        assert!(tracker.admit(a).is_none(), "per-client cap");
        let third = tracker.admit(b);
        assert!(third.is_some());
        assert!(tracker.admit(b).is_none(), "total cap");
        drop(first);
        assert!(
            tracker.admit(a).is_some(),
            "a closed connection gives its place back"
        );
    }
}
