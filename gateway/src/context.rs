//! What every part of a worker's data path needs from the worker, and nothing else: its id and
//! counters, the current route snapshot, endpoint choice, the scratch buffer, the access log,
//! the process-wide flags. The worker (`worker` for the readiness engine, `uring` for the
//! completion engine) creates one [`WorkerContext`] per thread and lends it to its
//! connections; `connection` and `relay` never see the worker itself, so the worker sits at the
//! top of the data path and nothing below it imports it (ARCHITECTURE.md, "Module
//! dependencies").

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::cache::Cache;

use crate::access_log::{AccessLogSender, Record};
use crate::balance::{Balancer, EndpointOrder, WorkerSnapshot};
use crate::logging::Throttle;
use crate::metrics::{self, Metrics, WorkerStats};
use crate::outcome::Close;
use crate::relay::Scratch;
use crate::snapshot::{SharedSnapshot, Snapshot};

/// The worker's housekeeping period, and the longest an accept loop waits for readiness
/// before it looks at the flags again: how quickly a worker notices "stop accepting", a
/// listener to add or close, and how often its heartbeat moves.
pub const TICK: Duration = Duration::from_millis(100);

/// At most one "out of descriptors" warning per worker this often; the repeats in between are
/// counted (`gateway_log_lines_suppressed_total`) and the next line says how many. Five
/// seconds is the kernel's own `printk_ratelimit` interval. Each pause is still counted in
/// `gateway_listener_accept_errors_total`.
const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(5);

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

/// One worker thread's state as its connections see it. Nothing in it is shared with other
/// workers except the read-only `Shared`.
pub struct WorkerContext {
    pub id: usize,
    shared: Arc<Shared>,
    /// The copy buffer the readiness engine's connections read into (see `relay::Scratch`).
    pub scratch: Scratch,
    cache: RefCell<Cache<SharedSnapshot, Arc<Snapshot>>>,
    current: RefCell<Rc<WorkerSnapshot>>,
    /// Round robin and passive health.
    balance: Balancer,
    pub access_log: Option<AccessLogSender>,
    /// Rate limit of the EMFILE/ENFILE/ENOMEM warning (a storm repeats it every pause).
    accept_warning: RefCell<Throttle>,
}

impl WorkerContext {
    pub(crate) fn new(id: usize, shared: Arc<Shared>) -> WorkerContext {
        let mut cache = Cache::new(Arc::clone(&shared.snapshot));
        let snapshot = Arc::clone(cache.load());
        WorkerContext {
            id,
            scratch: Scratch::new(),
            current: RefCell::new(Rc::new(WorkerSnapshot::new(snapshot))),
            cache: RefCell::new(cache),
            balance: Balancer::new(),
            access_log: shared.access_log.clone(),
            accept_warning: RefCell::new(Throttle::new(ACCEPT_WARNING_INTERVAL)),
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

    /// How long the completion engine spins before it sleeps (`[workers] busy_poll`).
    pub fn busy_poll(&self) -> Option<std::time::Duration> {
        self.shared.busy_poll
    }

    /// Per-worker cap on open downstream connections.
    pub fn max_connections_per_worker(&self) -> usize {
        self.shared.max_connections_per_worker
    }

    /// Write a connection's access-log line, if there is an access log.
    pub fn log_access(&self, record: &Record<'_>) {
        if let Some(log) = &self.access_log {
            log.log(record);
        }
    }

    /// The access-log record of a connection this worker accepted on listener
    /// `listener_index` at `started` (`started_wall` on the wall clock).
    pub fn access_record(
        &self,
        listener_index: usize,
        local: Option<SocketAddr>,
        peer: SocketAddr,
        started: Instant,
        started_wall: SystemTime,
    ) -> Record<'_> {
        Record::new(
            self.listener_name(listener_index),
            self.id,
            peer,
            local,
            started,
            started_wall,
        )
    }

    /// The access-log line of a connection refused right after accept (e.g. `max_connections`,
    /// Envoy's UO): the same record as every other connection, so the fields cannot drift
    /// apart.
    pub fn log_refused(
        &self,
        listener_index: usize,
        local: Option<SocketAddr>,
        peer: SocketAddr,
        close: Close,
    ) {
        if self.access_log.is_some() {
            let mut record = self.access_record(
                listener_index,
                local,
                peer,
                Instant::now(),
                SystemTime::now(),
            );
            record.end(close);
            self.log_access(&record);
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

    /// Publish which endpoints this worker holds out, for `gateway_cluster_endpoints` (see
    /// [`Balancer::publish_health`]). Called on the worker's tick.
    pub(crate) fn publish_health(&self, now: Instant) {
        let current = self.snapshot();
        self.balance
            .publish_health(&current.snapshot, self.stats(), now);
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
}

/// Both engines choose endpoints through this worker's balancer: the completion engine's
/// machines and the readiness engine's connections (`connection.rs`) alike.
impl crate::machine::Balance for WorkerContext {
    fn endpoint_order(
        &self,
        snapshot: &WorkerSnapshot,
        cluster: usize,
        now: Instant,
    ) -> EndpointOrder {
        self.balance.endpoint_order(snapshot, cluster, now)
    }

    fn hold_out(&self, address: SocketAddr, until: Instant) {
        self.balance.hold_out(address, until);
    }

    fn mark_healthy(&self, address: SocketAddr) {
        self.balance.mark_healthy(address);
    }
}
