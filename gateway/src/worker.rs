//! One worker per core: its own monoio runtime (io_uring, or epoll where io_uring is not
//! allowed), its own `SO_REUSEPORT` listening sockets, its own counters and scratch buffer.
//! Nothing here is shared with other workers except read-only snapshots and flags.
//!
//! A worker never waits on the control thread. It sees the control thread's decisions only
//! as values it reads on its own schedule: the route snapshot (per connection), the
//! process-wide "accepting" flag (per accept-loop wake, at least every `TICK`), and listening
//! sockets to add or close (a channel it drains every `TICK`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::cache::Cache;
use monoio::net::TcpListener;

use crate::access_log::AccessLogSender;
use crate::metrics::{self, AcceptError, Metrics, WorkerStats};
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

/// At most one "out of descriptors" warning per worker this often; the repeats in between are
/// counted (`gateway_log_lines_suppressed_total`) and the next line says how many. Five
/// seconds is the kernel's own `printk_ratelimit` interval. Each pause is still counted in
/// `gateway_listener_accept_errors_total`.
const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(5);

/// The worker's housekeeping period, and the longest an accept loop waits for readiness
/// before it looks at the flags again: how quickly a worker notices "stop accepting", a
/// listener to add or close, and how often its heartbeat moves.
pub const TICK: Duration = Duration::from_millis(100);

/// Connections one accept loop takes off the queue per readiness event before it yields, so
/// that a connection storm cannot starve the worker's established connections.
const ACCEPT_BATCH: usize = 64;

/// What the control thread asks of a worker, outside the snapshot.
pub enum WorkerCommand {
    /// Accept on this socket for the listener in metric slot `slot`.
    Listen {
        slot: usize,
        socket: std::net::TcpListener,
    },
    /// Stop accepting on every socket of listener `slot` and close them.
    Close { slot: usize },
}

/// What every worker shares (read-only on the hot path).
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub snapshot: SharedSnapshot,
    pub access_log: Option<AccessLogSender>,
    /// Per-worker cap on open downstream connections.
    pub max_connections_per_worker: usize,
    /// Cleared once to stop accepting for good (drain or hand-over); every accept loop then
    /// closes its socket within one `TICK`.
    pub accepting: AtomicBool,
    /// `[access_log] redact_addresses`: no client address and no unrouted server name in any
    /// log line, at any level (the access log applies it to its own lines).
    pub redact_addresses: bool,
    /// `[workers] busy_poll`: how long the completion engine spins before it sleeps.
    pub busy_poll: Option<std::time::Duration>,
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
    /// Stop flags of this worker's accept loops, by listener slot.
    accept_loops: RefCell<Vec<(usize, Rc<Cell<bool>>)>>,
    /// The snapshot generation for which "no endpoint held out" was last published.
    health_clean_generation: Cell<Option<u64>>,
    /// Rate limit of the EMFILE/ENFILE/ENOMEM warning (a storm repeats it every pause).
    accept_warning: RefCell<crate::logging::Throttle>,
}

impl Worker {
    pub(crate) fn new(id: usize, shared: Arc<Shared>) -> Worker {
        let mut cache = Cache::new(Arc::clone(&shared.snapshot));
        let snapshot = Arc::clone(cache.load());
        Worker {
            id,
            scratch: RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice()),
            current: RefCell::new(Rc::new(WorkerSnapshot::new(snapshot))),
            cache: RefCell::new(cache),
            held_out: RefCell::new(HashMap::new()),
            access_log: shared.access_log.clone(),
            accept_loops: RefCell::new(Vec::new()),
            health_clean_generation: Cell::new(None),
            accept_warning: RefCell::new(crate::logging::Throttle::new(ACCEPT_WARNING_INTERVAL)),
            shared,
        }
    }

    pub fn stats(&self) -> &WorkerStats {
        &self.shared.metrics.workers[self.id]
    }

    pub fn listener_name(&self, index: usize) -> &str {
        self.shared.metrics.listener_name(index)
    }

    /// Whether log lines must leave out client addresses and client-sent names.
    pub fn redact_addresses(&self) -> bool {
        self.shared.redact_addresses
    }

    pub fn access_log_enabled(&self) -> bool {
        self.access_log.is_some()
    }

    /// Per-worker cap on open downstream connections.
    pub fn busy_poll(&self) -> Option<std::time::Duration> {
        self.shared.busy_poll
    }

    pub fn max_connections_per_worker(&self) -> usize {
        self.shared.max_connections_per_worker
    }

    /// Write a connection's access-log line, if there is an access log.
    pub fn log_access(&self, record: &crate::access_log::Record<'_>) {
        if let Some(log) = &self.access_log {
            log.log(record);
        }
    }

    /// Whether the process still accepts (cleared for good by a drain or a hand-over).
    pub fn accepting(&self) -> bool {
        self.shared.accepting.load(Ordering::Relaxed)
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
        let mut held_out = self.held_out.borrow_mut();
        if !held_out.is_empty() {
            held_out.retain(|_, until| *until > now);
        }
        EndpointOrder::new(endpoints, start, |address| held_out.contains_key(address))
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

    /// Publish which endpoints this worker holds out, as one bit mask per destination slot,
    /// for `gateway_cluster_endpoints`. Costs nothing while no endpoint is held out.
    pub(crate) fn publish_health(&self, now: Instant) {
        let current = self.snapshot();
        let snapshot = &current.snapshot;
        let mut held_out = self.held_out.borrow_mut();
        held_out.retain(|_, until| *until > now);
        if held_out.is_empty() && self.health_clean_generation.get() == Some(snapshot.generation) {
            return;
        }
        let stats = self.stats();
        for (slot, endpoints) in &snapshot.endpoints_by_slot {
            let mut mask = 0u64;
            for (index, address) in endpoints.iter().enumerate().take(64) {
                if held_out.contains_key(address) {
                    mask |= 1 << index;
                }
            }
            stats.destinations[*slot]
                .endpoints_held_out
                .store(mask, Ordering::Relaxed);
        }
        stats
            .health_generation
            .store(snapshot.generation, Ordering::Relaxed);
        self.health_clean_generation
            .set(held_out.is_empty().then_some(snapshot.generation));
    }

    fn listen(self: &Rc<Self>, slot: usize, socket: std::net::TcpListener) -> io::Result<()> {
        // Readiness, then non-blocking accept4: the socket must not block (both drivers).
        socket.set_nonblocking(true)?;
        let listener = TcpListener::from_std(socket)?;
        let stop = Rc::new(Cell::new(false));
        self.accept_loops
            .borrow_mut()
            .push((slot, Rc::clone(&stop)));
        monoio::spawn(accept_loop(Rc::clone(self), slot, listener, stop));
        Ok(())
    }

    fn close_listener(&self, slot: usize) {
        self.accept_loops.borrow_mut().retain(|(owner, stop)| {
            if *owner == slot {
                stop.set(true);
            }
            *owner != slot
        });
    }

    /// Take one accepted connection: refuse it over the limit, else serve it in its own task.
    fn admit(self: &Rc<Self>, slot: usize, stream: std::net::TcpStream, peer: SocketAddr) {
        let stats = self.stats();
        let listener_stats = &stats.listeners[slot];
        let max_connections = self.shared.max_connections_per_worker as u64;
        if stats.connections_active.load(Ordering::Relaxed) >= max_connections {
            metrics::add(&listener_stats.rejected_max_connections, 1);
            self.log_overflow(slot, &stream, peer);
            return;
        }
        let stream = match monoio::net::TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(error) => {
                listener_stats.accept_error(AcceptError::classify(&error));
                return;
            }
        };
        metrics::add(&listener_stats.accepted, 1);
        // TCP_NODELAY is inherited from the listening socket (set in `bind_reuseport`): Linux
        // copies it into every accepted socket, so there is no setsockopt per connection.
        // The task is the connection's future itself, wrapped: an `async` block around it would
        // keep a second copy of it (measured with -Zprint-type-sizes: 1528 → ~800 bytes).
        monoio::spawn(ContainPanics {
            inner: crate::connection::serve(Rc::clone(self), slot, stream, peer),
            worker: Rc::clone(self),
        });
    }

    /// Log an accept pause, at most once per `ACCEPT_WARNING_INTERVAL`; count the rest.
    pub(crate) fn warn_accept_pause(&self, error: &io::Error) {
        match self.accept_warning.borrow_mut().allow(Instant::now()) {
            Some(0) => {
                tracing::warn!(worker = self.id, %error, "accept: out of descriptors or memory; pausing");
            }
            Some(suppressed) => {
                tracing::warn!(
                    worker = self.id,
                    %error,
                    suppressed,
                    "accept: out of descriptors or memory; pausing (repeats since the last line counted in gateway_log_lines_suppressed_total)"
                );
            }
            None => metrics::add(&self.stats().log_lines_suppressed, 1),
        }
    }

    /// The access-log line of a connection refused for `limits.max_connections` (Envoy's UO).
    fn log_overflow(&self, slot: usize, stream: &std::net::TcpStream, peer: SocketAddr) {
        if self.access_log_enabled() {
            crate::connection::log_refused(
                self,
                slot,
                stream.local_addr().ok(),
                peer,
                crate::outcome::Close::new(
                    crate::outcome::Side::Gateway,
                    crate::outcome::Reason::MaxConnections,
                ),
            );
        }
    }
}

impl crate::machine::Balance for Worker {
    fn endpoint_order(
        &self,
        snapshot: &WorkerSnapshot,
        cluster: usize,
        now: Instant,
    ) -> EndpointOrder {
        Worker::endpoint_order(self, snapshot, cluster, now)
    }

    fn hold_out(&self, address: SocketAddr, until: Instant) {
        Worker::hold_out(self, address, until);
    }

    fn mark_healthy(&self, address: SocketAddr) {
        Worker::mark_healthy(self, address);
    }
}

impl WorkerSnapshot {
    pub(crate) fn new(snapshot: Arc<Snapshot>) -> WorkerSnapshot {
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
    /// The order over `endpoints` from round-robin position `start`, `held` saying which
    /// endpoints are held out.
    pub fn new(
        endpoints: &[SocketAddr],
        start: usize,
        held: impl Fn(&SocketAddr) -> bool,
    ) -> EndpointOrder {
        let mut held_mask = 0u64;
        for (index, address) in endpoints.iter().enumerate().take(64) {
            if held(address) {
                held_mask |= 1 << index;
            }
        }
        EndpointOrder {
            count: endpoints.len(),
            start: start % endpoints.len().max(1),
            held_mask,
            step: 0,
        }
    }

    /// The next endpoint index to try, if any is left.
    pub fn next_index(&mut self) -> Option<usize> {
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
    }

    /// Every endpoint was held out when the connection started (Envoy's UH, "no healthy
    /// upstream", as opposed to UF, "upstream connect failure").
    pub fn none_healthy(&self) -> bool {
        let tracked = self.count.min(64);
        self.count <= 64 && tracked > 0 && self.held_mask.count_ones() as usize == tracked
    }

    pub fn iter(mut self) -> impl Iterator<Item = usize> {
        std::iter::from_fn(move || self.next_index())
    }
}

pin_project_lite::pin_project! {
    /// Runs a connection future and contains a panic inside it: the connection is dropped
    /// (closing its sockets), the panic is counted and logged, and the worker and its other
    /// connections go on (monoio does not catch task panics).
    struct ContainPanics<F> {
        #[pin]
        inner: F,
        worker: Rc<Worker>,
    }
}

impl<F: Future<Output = ()>> Future for ContainPanics<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let inner = this.inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(context))) {
            Ok(poll) => poll,
            Err(_panic) => {
                metrics::add(&this.worker.stats().connection_panics, 1);
                tracing::error!(
                    worker = this.worker.id,
                    "a connection panicked; it was closed and the worker goes on"
                );
                Poll::Ready(())
            }
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

/// How the worker's io_uring is set up. The default flags keep completions raised by another
/// CPU (the loopback softirq of a peer) from interrupting the worker: without them every poll
/// completion sends an inter-processor interrupt to run task work at once (perf/RESULTS.md,
/// issue 9: "Ring setup").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingSetup {
    /// `SINGLE_ISSUER|DEFER_TASKRUN` (Linux 6.1+): completions are only run when the worker
    /// itself waits on the ring, never by interrupt. Valid because a worker's ring is created,
    /// submitted to and dropped on the worker's own thread only.
    Defer,
    /// `COOP_TASKRUN|TASKRUN_FLAG` (Linux 5.19+): completion work waits for the worker's next
    /// transition into the kernel instead of interrupting it.
    Coop,
    /// No setup flags: what monoio does by default, and every io_uring kernel accepts.
    Plain,
}

impl RingSetup {
    /// The setups to try, best first. `GATEWAY_RING_SETUP=defer|coop|plain` starts the list
    /// elsewhere, for measurement and for the syscall regression guard (scripts/syscall-guard).
    pub(crate) fn preference() -> &'static [RingSetup] {
        const ALL: [RingSetup; 3] = [RingSetup::Defer, RingSetup::Coop, RingSetup::Plain];
        match std::env::var("GATEWAY_RING_SETUP").as_deref() {
            Ok("coop") => &ALL[1..],
            Ok("plain") => &ALL[2..],
            _ => &ALL,
        }
    }

    pub(crate) fn uring_builder(self) -> io_uring::Builder {
        let mut builder = io_uring::IoUring::builder();
        match self {
            RingSetup::Defer => {
                builder.setup_single_issuer().setup_defer_taskrun();
            }
            RingSetup::Coop => {
                builder.setup_coop_taskrun().setup_taskrun_flag();
            }
            RingSetup::Plain => {}
        }
        builder
    }

    /// The name used in logs and in `GATEWAY_RING_SETUP`.
    pub fn name(self) -> &'static str {
        match self {
            RingSetup::Defer => "defer",
            RingSetup::Coop => "coop",
            RingSetup::Plain => "plain",
        }
    }
}

type WorkerRuntime = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

/// Builds the worker's runtime: io_uring with the best ring setup this kernel accepts (a
/// kernel that does not know a flag refuses the whole setup with EINVAL, so the next one is
/// tried), or epoll where io_uring is unavailable.
fn build_runtime(id: usize) -> std::io::Result<WorkerRuntime> {
    let setups = RingSetup::preference();
    for (index, setup) in setups.iter().enumerate() {
        let built = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .with_entries(RING_ENTRIES)
            .uring_builder(setup.uring_builder())
            .enable_timer()
            .build();
        match built {
            Ok(runtime) => {
                if monoio::utils::detect_uring() {
                    tracing::info!(
                        worker = id,
                        ring_setup = setup.name(),
                        "io_uring ring set up"
                    );
                }
                return Ok(runtime);
            }
            Err(error)
                if error.raw_os_error() == Some(libc::EINVAL) && index + 1 < setups.len() =>
            {
                tracing::info!(worker = id, ring_setup = setup.name(), %error,
                    "io_uring setup refused; trying the next one");
            }
            Err(error) => return Err(error),
        }
    }
    Err(std::io::Error::other("no io_uring setup to try"))
}

/// The worker thread's body: build the runtime, take over the listening sockets (each with
/// its listener's metric slot), serve. `started` is told once the worker is accepting (or why
/// it could not start).
pub fn run(
    id: usize,
    shared: Arc<Shared>,
    listeners: Vec<(usize, std::net::TcpListener)>,
    commands: Receiver<WorkerCommand>,
    pin_to: Option<usize>,
    started: std::sync::mpsc::Sender<Result<usize, String>>,
) {
    if let Some(cpu) = pin_to {
        if let Err(error) = crate::sys::pin_current_thread(cpu) {
            tracing::warn!(worker = id, cpu, %error, "could not pin worker to its CPU");
        }
    }
    let (listeners, commands, started) =
        if crate::uring::Engine::current() == crate::uring::Engine::Completion {
            match crate::uring::run(id, Arc::clone(&shared), listeners, commands, started) {
                Ok(()) => return,
                Err((error, listeners, commands, started)) => {
                    tracing::warn!(worker = id, %error,
                    "the completion engine cannot start here; using the readiness engine");
                    (listeners, commands, started)
                }
            }
        } else {
            (listeners, commands, started)
        };
    let runtime = build_runtime(id);
    let mut runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = started.send(Err(format!("worker {id}: cannot build runtime: {error}")));
            return;
        }
    };
    runtime.block_on(async move {
        let worker = Rc::new(Worker::new(id, shared));
        for (slot, socket) in listeners {
            if let Err(error) = worker.listen(slot, socket) {
                let _ = started.send(Err(format!("worker {id}: {error}")));
                return;
            }
        }
        let _ = started.send(Ok(id));
        loop {
            monoio::time::sleep(TICK).await;
            metrics::add(&worker.stats().heartbeat, 1);
            while let Ok(command) = commands.try_recv() {
                match command {
                    WorkerCommand::Listen { slot, socket } => {
                        if let Err(error) = worker.listen(slot, socket) {
                            tracing::error!(worker = id, %error, "cannot accept on a new listener");
                        }
                    }
                    WorkerCommand::Close { slot } => worker.close_listener(slot),
                }
            }
            worker.publish_health(Instant::now());
            crate::relay::sweep_idle(Instant::now());
        }
    });
}

/// Accept by readiness: wait (at most one `TICK`) until the listening socket is readable,
/// then take connections with non-blocking `accept4` until the queue is empty or the batch
/// cap. The wait is a poll request, which is safe to cancel; an io_uring accept op is not (a
/// cancelled accept can complete in the kernel and lose the connection), and cancelling is
/// exactly what stopping for a drain or a hand-over needs. Connections left in the queue stay
/// there for whoever else holds the socket (the new process after a hand-over).
async fn accept_loop(worker: Rc<Worker>, slot: usize, listener: TcpListener, stop: Rc<Cell<bool>>) {
    let sockets_open = &worker.stats().listeners[slot].sockets_open;
    metrics::add(sockets_open, 1);
    let fd = listener.as_raw_fd();
    while worker.shared.accepting.load(Ordering::Relaxed) && !stop.get() {
        match monoio::time::timeout(TICK, listener.readable(false)).await {
            Err(_elapsed) => continue,
            Ok(Err(error)) => {
                tracing::debug!(worker = worker.id, %error, "waiting for a connection failed");
                monoio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
            Ok(Ok(())) => {}
        }
        for _ in 0..ACCEPT_BATCH {
            if stop.get() || !worker.shared.accepting.load(Ordering::Relaxed) {
                break;
            }
            match crate::sys::accept(fd) {
                Ok((stream, peer)) => worker.admit(slot, stream, peer),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                // The client gave up between the handshake and accept; take the next one.
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(error) => {
                    let reason = AcceptError::classify(&error);
                    worker.stats().listeners[slot].accept_error(reason);
                    if reason == AcceptError::Other {
                        tracing::debug!(%error, "accept failed");
                    } else {
                        worker.warn_accept_pause(&error);
                        monoio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                    break;
                }
            }
        }
    }
    drop(listener);
    metrics::sub(sockets_open, 1);
}

/// Bind one `SO_REUSEPORT` socket per worker for a listener address. A probe bind without
/// `SO_REUSEPORT` first makes a port that another process listens on an error, instead of
/// silently joining its reuseport group.
pub fn bind_listener(
    address: SocketAddr,
    workers: usize,
    defer_accept_seconds: u32,
) -> io::Result<Vec<std::net::TcpListener>> {
    let probe = new_socket(address)?;
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
        .map(|_| bind_reuseport(resolved, defer_accept_seconds))
        .collect()
}

/// One more socket in the `SO_REUSEPORT` group of `address` (no probe: the caller knows the
/// group is ours, e.g. sockets inherited in a hand-over). Non-blocking: workers accept by
/// readiness.
pub fn bind_reuseport(
    address: SocketAddr,
    defer_accept_seconds: u32,
) -> io::Result<std::net::TcpListener> {
    let socket = new_socket(address)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    // The kernel caps the backlog at net.core.somaxconn.
    socket.listen(4096)?;
    crate::sys::set_defer_accept(socket.as_raw_fd(), defer_accept_seconds)?;
    Ok(socket.into())
}

fn new_socket(address: SocketAddr) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )
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

    #[test]
    fn none_healthy_only_when_every_endpoint_is_held_out() {
        let order = |count, held_mask| EndpointOrder {
            count,
            start: 0,
            held_mask,
            step: 0,
        };
        assert!(order(3, 0b111).none_healthy());
        assert!(!order(3, 0b011).none_healthy());
        assert!(!order(0, 0).none_healthy());
    }
}
