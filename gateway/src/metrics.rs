//! The gateway's metrics, by concern: this module holds the stats (per-core counters and
//! histograms, the outcome sets they count, the control thread's values), [`registry`] the
//! metric slots of listeners and destinations, and [`render`] the Prometheus text at scrape.
//!
//! Each worker owns one [`WorkerStats`] and is its only writer, so an update is a relaxed load
//! and store on a cache line no other core writes: no locked instructions and no sharing on
//! the hot path. The control thread reads every worker's values when `/metrics` is scraped.

pub mod registry;
mod render;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clienthello::Reject;
use crate::config::MAX_LISTENERS;
use crate::outcome::{Close, HelloOutcome};

pub use registry::{Registry, MAX_DESTINATIONS};

/// Add to a single-writer counter: the owning worker is the only writer, so a plain load and
/// store is exact and avoids a locked read-modify-write.
#[inline]
pub fn add(counter: &AtomicU64, amount: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(amount),
        Ordering::Relaxed,
    );
}

#[inline]
pub fn sub(counter: &AtomicU64, amount: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_sub(amount),
        Ordering::Relaxed,
    );
}

const HELLO_OUTCOMES: usize = Reject::ALL.len() + 5;

/// The metric index and label of each outcome (the type itself lives in `outcome`).
impl HelloOutcome {
    fn index(self) -> usize {
        match self {
            HelloOutcome::Rejected(reason) => reason.index(),
            HelloOutcome::SniFound => Reject::ALL.len(),
            HelloOutcome::SniMissing => Reject::ALL.len() + 1,
            HelloOutcome::Timeout => Reject::ALL.len() + 2,
            HelloOutcome::Eof => Reject::ALL.len() + 3,
            HelloOutcome::ReadError => Reject::ALL.len() + 4,
        }
    }

    fn label(index: usize) -> &'static str {
        match index.checked_sub(Reject::ALL.len()) {
            None => Reject::ALL[index].as_str(),
            Some(0) => "sni_found",
            Some(1) => "sni_missing",
            Some(2) => "timeout",
            Some(3) => "eof",
            _ => "read_error",
        }
    }
}

/// Why an upstream connect attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    Refused,
    Timeout,
    Unreachable,
    Other,
    /// Every endpoint was held out or failed: the client is closed (response flag UH/UF).
    NoHealthyEndpoint,
}

const CONNECT_FAILURES: [(&str, ConnectFailure); 5] = [
    ("refused", ConnectFailure::Refused),
    ("timeout", ConnectFailure::Timeout),
    ("unreachable", ConnectFailure::Unreachable),
    ("other", ConnectFailure::Other),
    ("no_healthy_endpoint", ConnectFailure::NoHealthyEndpoint),
];

/// Upper bounds (seconds) of the connection-duration histogram: milliseconds to an hour.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
];
/// Upper bounds (seconds) for upstream connects and ClientHello waits: 50 µs on loopback up
/// to the 5 s default connect timeout.
const LATENCY_BUCKETS: [f64; 15] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    5.0,
];

/// A fixed-bucket histogram with single-writer atomic buckets.
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound plus the +Inf bucket (non-cumulative; summed at render).
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let index = self
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds.len());
        add(&self.buckets[index], 1);
        add(
            &self.sum_nanos,
            u64::try_from(value.as_nanos()).unwrap_or(u64::MAX),
        );
    }
}

/// Why `accept(2)` failed, as a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// The process's descriptor limit (raise `LimitNOFILE`).
    Emfile,
    /// The system-wide descriptor limit.
    Enfile,
    /// Out of socket buffers or kernel memory.
    Enomem,
    Other,
}

const ACCEPT_ERRORS: [(&str, AcceptError); 4] = [
    ("emfile", AcceptError::Emfile),
    ("enfile", AcceptError::Enfile),
    ("enomem", AcceptError::Enomem),
    ("other", AcceptError::Other),
];

impl AcceptError {
    pub fn classify(error: &std::io::Error) -> AcceptError {
        match error.raw_os_error() {
            Some(libc::EMFILE) => AcceptError::Emfile,
            Some(libc::ENFILE) => AcceptError::Enfile,
            Some(libc::ENOBUFS | libc::ENOMEM) => AcceptError::Enomem,
            _ => AcceptError::Other,
        }
    }
}

#[derive(Default)]
pub struct ListenerStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub rejected_max_connections: AtomicU64,
    /// Listening sockets this worker accepts on for this listener (0 once closed).
    pub sockets_open: AtomicU64,
    accept_errors: [AtomicU64; ACCEPT_ERRORS.len()],
    pub route_matched: AtomicU64,
    pub route_no_route: AtomicU64,
    hello: [AtomicU64; HELLO_OUTCOMES],
}

impl ListenerStats {
    pub fn hello(&self, outcome: HelloOutcome) {
        add(&self.hello[outcome.index()], 1);
    }

    pub fn accept_error(&self, error: AcceptError) {
        if let Some(index) = ACCEPT_ERRORS.iter().position(|(_, e)| *e == error) {
            add(&self.accept_errors[index], 1);
        }
    }
}

#[derive(Default)]
pub struct DestinationStats {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub bytes_to_upstream: AtomicU64,
    pub bytes_to_downstream: AtomicU64,
    /// Bit i set: endpoint i of this destination (in `Snapshot::endpoints_by_slot` order) is
    /// held out of round robin on this worker after a failed connect (passive health).
    pub endpoints_held_out: AtomicU64,
    connect_failures: [AtomicU64; CONNECT_FAILURES.len()],
    closed: [AtomicU64; Close::ALL.len()],
}

impl DestinationStats {
    pub fn connect_failure(&self, failure: ConnectFailure) {
        if let Some(index) = CONNECT_FAILURES.iter().position(|(_, f)| *f == failure) {
            add(&self.connect_failures[index], 1);
        }
    }

    /// Count the close of a relayed pair (closes before relaying have no pair counter).
    pub fn closed(&self, close: Close) {
        if let Some(index) = close.label_index() {
            add(&self.closed[index], 1);
        }
    }
}

/// One worker's counters. Aligned so two workers never share a cache line.
#[repr(align(128))]
pub struct WorkerStats {
    /// Bumped by the worker every second; `/healthz` checks it advances.
    pub heartbeat: AtomicU64,
    pub connections_active: AtomicU64,
    /// The snapshot generation `endpoints_held_out` was computed for (0: none).
    pub health_generation: AtomicU64,
    /// Panics caught at a connection boundary (a bug, never a network condition).
    pub connection_panics: AtomicU64,
    /// Bytes relayed by splice(2) through a pipe (bulk flows), by either engine.
    pub spliced_bytes: AtomicU64,
    /// Warnings left out by a rate limit (`logging::Throttle`).
    pub log_lines_suppressed: AtomicU64,
    pub listeners: Box<[ListenerStats]>,
    pub destinations: Box<[DestinationStats]>,
    pub connection_duration: Box<[Histogram]>,
    pub hello_wait: Box<[Histogram]>,
    pub connect_duration: Box<[Histogram]>,
}

impl WorkerStats {
    fn new(listeners: usize) -> WorkerStats {
        WorkerStats {
            heartbeat: AtomicU64::new(0),
            connections_active: AtomicU64::new(0),
            health_generation: AtomicU64::new(0),
            connection_panics: AtomicU64::new(0),
            spliced_bytes: AtomicU64::new(0),
            log_lines_suppressed: AtomicU64::new(0),
            listeners: (0..listeners).map(|_| ListenerStats::default()).collect(),
            destinations: (0..MAX_DESTINATIONS)
                .map(|_| DestinationStats::default())
                .collect(),
            connection_duration: (0..listeners)
                .map(|_| Histogram::new(&DURATION_BUCKETS))
                .collect(),
            hello_wait: (0..listeners)
                .map(|_| Histogram::new(&LATENCY_BUCKETS))
                .collect(),
            connect_duration: (0..MAX_DESTINATIONS)
                .map(|_| Histogram::new(&LATENCY_BUCKETS))
                .collect(),
        }
    }
}

/// What triggered a reload (the `source` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadSource {
    Sighup,
    Api,
}

/// Values set by the control thread.
#[derive(Default)]
pub struct ControlStats {
    pub config_generation: AtomicU64,
    /// Indexed by `reload_index(source, success)`.
    reloads: [AtomicU64; 4],
    pub last_reload_success_unix: AtomicU64,
    /// Set from SIGTERM or `POST /drain` (or a hand-over) until exit.
    pub draining: AtomicBool,
    /// The process-wide cap on open downstream connections.
    pub max_connections: AtomicU64,
    /// Access-log lines dropped because the writer could not keep up (shared with it).
    pub access_log_dropped: Arc<AtomicU64>,
}

impl ControlStats {
    pub fn reload(&self, source: ReloadSource, success: bool) {
        let index = usize::from(source == ReloadSource::Api) * 2 + usize::from(!success);
        self.reloads[index].fetch_add(1, Ordering::Relaxed);
    }
}

pub struct Metrics {
    pub workers: Box<[WorkerStats]>,
    /// Listener and destination metric slots.
    pub registry: Registry,
    pub control: ControlStats,
    pub io_driver: &'static str,
    start_unix: f64,
}

impl Metrics {
    pub fn new(workers: usize, io_driver: &'static str) -> Metrics {
        Metrics {
            workers: (0..workers)
                .map(|_| WorkerStats::new(MAX_LISTENERS))
                .collect(),
            registry: Registry::default(),
            control: ControlStats::default(),
            io_driver,
            start_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |elapsed| elapsed.as_secs_f64()),
        }
    }

    /// The name of a listener slot (lock-free; empty for a slot never named).
    pub fn listener_name(&self, slot: usize) -> &str {
        self.registry.listener_name(slot)
    }
}
