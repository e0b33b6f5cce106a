//! One worker per core: its own monoio runtime (io_uring, or epoll where io_uring is not
//! allowed), its own `SO_REUSEPORT` listening sockets, its own counters and scratch buffer.
//! Nothing here is shared with other workers except read-only snapshots.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::cache::Cache;
use monoio::net::TcpListener;

use crate::access_log::AccessLogSender;
use crate::metrics::{self, Metrics, WorkerStats};
use crate::snapshot::{SharedSnapshot, Snapshot};

/// The worker's scratch buffer: every relay read lands here first. 64 KiB matches the
/// largest chunk a loopback TCP receive usually returns in one call and the ClientHello cap.
const SCRATCH_BYTES: usize = 64 * 1024;

/// io_uring submission queue entries per worker (monoio's minimum is 256). Each connection
/// has at most two poll requests in flight, and the queue is flushed every loop turn, so 1024
/// carries bursts of hundreds of new connections per turn.
const RING_ENTRIES: u32 = 1024;

/// How long accept pauses after EMFILE/ENFILE/ENOMEM before trying again: long enough for
/// connections to close and free descriptors, short enough not to overflow the backlog.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// What every worker shares (read-only on the hot path).
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub snapshot: SharedSnapshot,
    pub listener_names: Vec<String>,
    pub access_log: Option<AccessLogSender>,
    /// Per-worker cap on open downstream connections.
    pub max_connections_per_worker: usize,
}

/// The snapshot a connection works with, plus this worker's round-robin cursors for it.
pub struct WorkerSnapshot {
    pub snapshot: Arc<Snapshot>,
    cursors: Vec<Cell<usize>>,
}

pub struct Worker {
    pub id: usize,
    shared: Arc<Shared>,
    pub scratch: RefCell<Box<[u8]>>,
    cache: RefCell<Cache<SharedSnapshot, Arc<Snapshot>>>,
    current: RefCell<Rc<WorkerSnapshot>>,
    /// Endpoints that failed to connect, held out of round robin until the instant given
    /// (passive health). Keyed by address so that it survives snapshot changes.
    held_out: RefCell<HashMap<SocketAddr, Instant>>,
    pub access_log: Option<AccessLogSender>,
}

impl Worker {
    fn new(id: usize, shared: Arc<Shared>) -> Worker {
        let mut cache = Cache::new(Arc::clone(&shared.snapshot));
        let snapshot = Arc::clone(cache.load());
        Worker {
            id,
            scratch: RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice()),
            current: RefCell::new(Rc::new(WorkerSnapshot::new(snapshot))),
            cache: RefCell::new(cache),
            held_out: RefCell::new(HashMap::new()),
            access_log: shared.access_log.clone(),
            shared,
        }
    }

    pub fn stats(&self) -> &WorkerStats {
        &self.shared.metrics.workers[self.id]
    }

    pub fn listener_name(&self, index: usize) -> &str {
        &self.shared.listener_names[index]
    }

    pub fn access_log_enabled(&self) -> bool {
        self.access_log.is_some()
    }

    /// The current snapshot; checks for a newer one (one atomic load, no shared writes).
    pub fn snapshot(&self) -> Rc<WorkerSnapshot> {
        let mut cache = self.cache.borrow_mut();
        let latest = cache.load();
        let mut current = self.current.borrow_mut();
        if !Arc::ptr_eq(latest, &current.snapshot) {
            *current = Rc::new(WorkerSnapshot::new(Arc::clone(latest)));
        }
        Rc::clone(&current)
    }

    /// Endpoint indices to try, in order: healthy ones round robin from this worker's cursor,
    /// then held-out ones (used only when none of the healthy ones answered).
    pub fn endpoint_order(
        &self,
        snapshot: &WorkerSnapshot,
        cluster: usize,
        now: Instant,
    ) -> EndpointOrder {
        let endpoints = &snapshot.snapshot.table.cluster(cluster).endpoints;
        let cursor = &snapshot.cursors[cluster];
        let start = cursor.get();
        cursor.set(start.wrapping_add(1));
        let mut held_mask = 0u64;
        let mut held_out = self.held_out.borrow_mut();
        if !held_out.is_empty() {
            held_out.retain(|_, until| *until > now);
            for (index, address) in endpoints.iter().enumerate().take(64) {
                if held_out.contains_key(address) {
                    held_mask |= 1 << index;
                }
            }
        }
        EndpointOrder {
            count: endpoints.len(),
            start: start % endpoints.len().max(1),
            held_mask,
            step: 0,
        }
    }

    pub fn hold_out(&self, address: SocketAddr, until: Instant) {
        self.held_out.borrow_mut().insert(address, until);
    }

    pub fn mark_healthy(&self, address: SocketAddr) {
        let mut held_out = self.held_out.borrow_mut();
        if !held_out.is_empty() {
            held_out.remove(&address);
        }
    }
}

impl WorkerSnapshot {
    fn new(snapshot: Arc<Snapshot>) -> WorkerSnapshot {
        let cursors = (0..snapshot.table.clusters().len())
            .map(|_| Cell::new(0))
            .collect();
        WorkerSnapshot { snapshot, cursors }
    }
}

/// Iterates endpoint indices without allocating: two passes over the ring starting at the
/// round-robin cursor, the first over endpoints healthy when the connection started, the
/// second over the held-out ones. Only the first 64 endpoints of a cluster can be held out.
pub struct EndpointOrder {
    count: usize,
    start: usize,
    held_mask: u64,
    step: usize,
}

impl EndpointOrder {
    pub fn iter(mut self) -> impl Iterator<Item = usize> {
        std::iter::from_fn(move || {
            while self.step < 2 * self.count {
                let second_pass = self.step >= self.count;
                let index = (self.start + self.step) % self.count;
                self.step += 1;
                let held = index < 64 && self.held_mask & (1 << index) != 0;
                if held == second_pass {
                    return Some(index);
                }
            }
            None
        })
    }
}

/// Runs a connection future and turns a panic inside it into an `Err`, so that one bad
/// connection cannot take down the worker and its other connections (monoio does not catch
/// task panics).
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(context))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(_panic) => Poll::Ready(Err(())),
        }
    }
}

/// Which io driver monoio will use on this kernel.
pub fn io_driver_name() -> &'static str {
    if monoio::utils::detect_uring() {
        "io_uring"
    } else {
        "epoll"
    }
}

/// The worker thread's body: build the runtime, take over the listening sockets, serve.
/// `started` is told once the worker is accepting (or why it could not start).
pub fn run(
    id: usize,
    shared: Arc<Shared>,
    listeners: Vec<std::net::TcpListener>,
    pin_to: Option<usize>,
    started: std::sync::mpsc::Sender<Result<usize, String>>,
) {
    if let Some(cpu) = pin_to {
        if let Err(error) = crate::sys::pin_current_thread(cpu) {
            tracing::warn!(worker = id, cpu, %error, "could not pin worker to its CPU");
        }
    }
    let runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .with_entries(RING_ENTRIES)
        .enable_timer()
        .build();
    let mut runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = started.send(Err(format!("worker {id}: cannot build runtime: {error}")));
            return;
        }
    };
    runtime.block_on(async move {
        let legacy = monoio::utils::is_legacy();
        let worker = Rc::new(Worker::new(id, shared));
        let mut accepting = Vec::new();
        for (index, listener) in listeners.into_iter().enumerate() {
            // The epoll driver needs non-blocking sockets; io_uring must not have them, or
            // accept would return EAGAIN instead of waiting.
            if let Err(error) = listener.set_nonblocking(legacy) {
                let _ = started.send(Err(format!("worker {id}: {error}")));
                return;
            }
            match TcpListener::from_std(listener) {
                Ok(listener) => accepting.push((index, listener)),
                Err(error) => {
                    let _ = started.send(Err(format!("worker {id}: {error}")));
                    return;
                }
            }
        }
        for (index, listener) in accepting {
            monoio::spawn(accept_loop(Rc::clone(&worker), index, listener));
        }
        let _ = started.send(Ok(id));
        loop {
            monoio::time::sleep(Duration::from_secs(1)).await;
            metrics::add(&worker.stats().heartbeat, 1);
        }
    });
}

async fn accept_loop(worker: Rc<Worker>, listener_index: usize, listener: TcpListener) {
    let max_connections = worker.shared.max_connections_per_worker as u64;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let stats = worker.stats();
                if stats.connections_active.load(Ordering::Relaxed) >= max_connections {
                    metrics::add(&stats.listeners[listener_index].rejected_max_connections, 1);
                    drop(stream);
                    continue;
                }
                metrics::add(&stats.listeners[listener_index].accepted, 1);
                let _ = stream.set_nodelay(true);
                let worker = Rc::clone(&worker);
                monoio::spawn(async move {
                    let panics = Rc::clone(&worker);
                    let serving = std::pin::pin!(crate::connection::serve(
                        worker,
                        listener_index,
                        stream,
                        peer
                    ));
                    if CatchUnwind(serving).await.is_err() {
                        metrics::add(&panics.stats().connection_panics, 1);
                        tracing::error!(
                            worker = panics.id,
                            "a connection panicked; it was closed and the worker goes on"
                        );
                    }
                });
            }
            Err(error) => {
                let stats = &worker.stats().listeners[listener_index];
                let exhausted = matches!(
                    error.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                if exhausted {
                    metrics::add(&stats.accept_errors_emfile, 1);
                    tracing::warn!(%error, "accept: out of descriptors or memory; pausing");
                    monoio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                } else {
                    metrics::add(&stats.accept_errors_other, 1);
                    tracing::debug!(%error, "accept failed");
                }
            }
        }
    }
}

/// Bind one `SO_REUSEPORT` socket per worker for a listener address. A probe bind without
/// `SO_REUSEPORT` first makes a port that another process listens on an error, instead of
/// silently joining its reuseport group.
pub fn bind_listener(
    address: SocketAddr,
    workers: usize,
    defer_accept_seconds: u32,
) -> io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let new_socket = || {
        Socket::new(
            Domain::for_address(address),
            Type::STREAM,
            Some(Protocol::TCP),
        )
    };
    let probe = new_socket()?;
    probe.set_reuse_address(true)?;
    probe.bind(&address.into()).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("cannot bind {address}: {error} (is another process listening there?)"),
        )
    })?;
    // Port 0 resolves to one port that all workers then share.
    let resolved = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listener address is not an IP socket"))?;
    drop(probe);
    (0..workers)
        .map(|_| {
            let socket = new_socket()?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nodelay(true)?;
            socket.bind(&resolved.into())?;
            // The kernel caps the backlog at net.core.somaxconn.
            socket.listen(4096)?;
            use std::os::fd::AsRawFd;
            crate::sys::set_defer_accept(socket.as_raw_fd(), defer_accept_seconds)?;
            Ok(socket.into())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(count: usize, start: usize, held_mask: u64) -> Vec<usize> {
        EndpointOrder {
            count,
            start,
            held_mask,
            step: 0,
        }
        .iter()
        .collect()
    }

    #[test]
    fn endpoint_order_puts_held_out_endpoints_last() {
        assert_eq!(order(3, 0, 0), vec![0, 1, 2]);
        assert_eq!(order(3, 1, 0), vec![1, 2, 0]);
        assert_eq!(order(3, 0, 0b010), vec![0, 2, 1]);
        assert_eq!(order(3, 2, 0b111), vec![2, 0, 1]);
        assert_eq!(order(0, 0, 0), Vec::<usize>::new());
    }
}
