//! Per-core counters, summed at scrape into Prometheus text.
//!
//! Each worker owns one [`WorkerStats`] and is its only writer, so an update is a relaxed load
//! and store on a cache line no other core writes: no locked instructions and no sharing on
//! the hot path. The control thread reads every worker's values when `/metrics` is scraped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::clienthello::Reject;
use crate::config::MAX_LISTENERS;
use crate::outcome::Close;
use crate::routes::DestinationLabels;
use crate::snapshot::Snapshot;

/// Destination label sets are capped so a control plane with a huge catalog cannot blow up
/// the scrape; values beyond the cap share the `__overflow__` slot, which is itself counted.
pub const MAX_DESTINATIONS: usize = 256;
const OVERFLOW_SLOT: usize = MAX_DESTINATIONS - 1;

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

/// Outcome of reading the first flight, beyond the parser's own rejections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloOutcome {
    SniFound,
    SniMissing,
    Rejected(Reject),
    /// The deadline passed before a whole ClientHello arrived.
    Timeout,
    /// The client closed before a whole ClientHello arrived.
    Eof,
    /// Reading from the client failed (reset).
    ReadError,
}

const HELLO_OUTCOMES: usize = Reject::ALL.len() + 5;

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

/// Append-only map from destination labels to a counter slot, so a reload never renumbers a
/// counter and counters stay monotonic when a destination leaves and comes back.
#[derive(Default)]
struct DestinationRegistry {
    slots: Vec<DestinationLabels>,
    overflowed: u64,
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
    /// The route source's own metrics (`gateway mesh`: the control-plane follower's), set
    /// once at start-up when routes do not come from the file.
    pub route_source: OnceLock<Arc<dyn crate::route_source::RouteSource>>,
}

impl ControlStats {
    pub fn reload(&self, source: ReloadSource, success: bool) {
        let index = usize::from(source == ReloadSource::Api) * 2 + usize::from(!success);
        self.reloads[index].fetch_add(1, Ordering::Relaxed);
    }
}

pub struct Metrics {
    pub workers: Box<[WorkerStats]>,
    /// Listener names by metric slot. A slot, once named, keeps its name for the life of the
    /// process, so a listener removed and added again by reloads keeps its counters.
    listener_slots: Box<[OnceLock<String>]>,
    listener_registry: Mutex<()>,
    registry: Mutex<DestinationRegistry>,
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
            listener_slots: (0..MAX_LISTENERS).map(|_| OnceLock::new()).collect(),
            listener_registry: Mutex::new(()),
            registry: Mutex::new(DestinationRegistry::default()),
            control: ControlStats::default(),
            io_driver,
            start_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |elapsed| elapsed.as_secs_f64()),
        }
    }

    /// The metric slot of a listener name, assigned on first sight; `None` once all
    /// `MAX_LISTENERS` slots are named.
    pub fn listener_slot(&self, name: &str) -> Option<usize> {
        let _assigning = match self.listener_registry.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (slot, cell) in self.listener_slots.iter().enumerate() {
            match cell.get() {
                Some(known) if known == name => return Some(slot),
                Some(_) => {}
                None => {
                    let _ = cell.set(name.to_owned());
                    return Some(slot);
                }
            }
        }
        None
    }

    /// The name of a listener slot (lock-free; empty for a slot never named).
    pub fn listener_name(&self, slot: usize) -> &str {
        self.listener_slots
            .get(slot)
            .and_then(OnceLock::get)
            .map_or("", String::as_str)
    }

    fn named_listeners(&self) -> Vec<(usize, &str)> {
        self.listener_slots
            .iter()
            .enumerate()
            .map_while(|(slot, cell)| cell.get().map(|name| (slot, name.as_str())))
            .collect()
    }

    /// The counter slot for a destination, assigned on first sight (off the hot path: when a
    /// snapshot is built).
    pub fn destination_slot(&self, labels: &DestinationLabels) -> usize {
        let mut registry = match self.registry.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(slot) = registry.slots.iter().position(|known| known == labels) {
            return slot;
        }
        if registry.slots.len() < OVERFLOW_SLOT {
            registry.slots.push(labels.clone());
            return registry.slots.len() - 1;
        }
        registry.overflowed += 1;
        OVERFLOW_SLOT
    }

    /// Render the Prometheus text exposition format (version 0.0.4). `snapshot` is the one in
    /// force, for endpoint membership.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let listeners = self.named_listeners();
        let sum = |read: &dyn Fn(&WorkerStats) -> u64| -> u64 {
            self.workers.iter().map(read).fold(0u64, u64::wrapping_add)
        };
        let (destinations, overflowed) = {
            let registry = match self.registry.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            (registry.slots.clone(), registry.overflowed)
        };
        let mut destination_labels: Vec<(usize, String)> = destinations
            .iter()
            .enumerate()
            .map(|(slot, labels)| {
                (
                    slot,
                    format!(
                        "destination_service=\"{}\",destination_datacenter=\"{}\"",
                        escape(&labels.service),
                        escape(&labels.datacenter)
                    ),
                )
            })
            .collect();
        if overflowed > 0 {
            destination_labels.push((
                OVERFLOW_SLOT,
                "destination_service=\"__overflow__\",destination_datacenter=\"__overflow__\""
                    .to_owned(),
            ));
        }

        header(
            &mut out,
            "gateway_build_info",
            "gauge",
            "Identity of the running binary.",
        );
        let _ = writeln!(
            out,
            "gateway_build_info{{version=\"{}\",revision=\"{}\",rustc=\"{}\",io_driver=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            escape(crate::version::GIT_REVISION),
            escape(crate::version::RUSTC_VERSION),
            self.io_driver
        );

        type ListenerCounter = fn(&ListenerStats) -> &AtomicU64;
        let listener_counters: [(&str, &str, &str, &str, ListenerCounter); 4] = [
            (
                "gateway_listener_connections_accepted_total",
                "counter",
                "Connections accepted.",
                "",
                |l| &l.accepted,
            ),
            (
                "gateway_listener_connections_active",
                "gauge",
                "Downstream connections open now.",
                "",
                |l| &l.active,
            ),
            (
                "gateway_listener_connections_rejected_total",
                "counter",
                "Connections closed right after accept.",
                "reason=\"max_connections\"",
                |l| &l.rejected_max_connections,
            ),
            (
                "gateway_listener_sockets_open",
                "gauge",
                "Listening sockets accepting now (one per worker; 0 once the listener is closed).",
                "",
                |l| &l.sockets_open,
            ),
        ];
        for (name, kind, help, extra, read) in listener_counters {
            header(&mut out, name, kind, help);
            for &(index, listener) in &listeners {
                let value = sum(&|w| read(&w.listeners[index]).load(Ordering::Relaxed));
                let extra = if extra.is_empty() {
                    String::new()
                } else {
                    format!(",{extra}")
                };
                let _ = writeln!(
                    out,
                    "{name}{{listener=\"{}\"{extra}}} {value}",
                    escape(listener)
                );
            }
        }

        header(
            &mut out,
            "gateway_listener_accept_errors_total",
            "counter",
            "accept(2) failures; emfile means the file-descriptor limit is too low.",
        );
        for &(index, listener) in &listeners {
            for (position, (reason, _)) in ACCEPT_ERRORS.iter().enumerate() {
                let value =
                    sum(&|w| w.listeners[index].accept_errors[position].load(Ordering::Relaxed));
                let _ = writeln!(
                    out,
                    "gateway_listener_accept_errors_total{{listener=\"{}\",reason=\"{reason}\"}} {value}",
                    escape(listener)
                );
            }
        }

        header(
            &mut out,
            "gateway_client_hello_total",
            "counter",
            "Outcome of reading the ClientHello.",
        );
        for &(index, listener) in &listeners {
            for outcome in 0..HELLO_OUTCOMES {
                let value = sum(&|w| w.listeners[index].hello[outcome].load(Ordering::Relaxed));
                let _ = writeln!(
                    out,
                    "gateway_client_hello_total{{listener=\"{}\",result=\"{}\"}} {value}",
                    escape(listener),
                    HelloOutcome::label(outcome)
                );
            }
        }

        header(
            &mut out,
            "gateway_route_lookups_total",
            "counter",
            "Routing decisions.",
        );
        for &(index, listener) in &listeners {
            for (result, read) in [
                (
                    "matched",
                    (|l: &ListenerStats| &l.route_matched) as ListenerCounter,
                ),
                ("no_route", |l: &ListenerStats| &l.route_no_route),
            ] {
                let value = sum(&|w| read(&w.listeners[index]).load(Ordering::Relaxed));
                let _ = writeln!(
                    out,
                    "gateway_route_lookups_total{{listener=\"{}\",result=\"{result}\"}} {value}",
                    escape(listener)
                );
            }
        }

        type DestinationCounter = fn(&DestinationStats) -> &AtomicU64;
        let destination_counters: [(&str, &str, &str, &str, DestinationCounter); 4] = [
            (
                "gateway_cluster_connections_total",
                "counter",
                "Proxied connections started towards a destination.",
                "",
                |d| &d.connections,
            ),
            (
                "gateway_cluster_connections_active",
                "gauge",
                "Proxied pairs open now.",
                "",
                |d| &d.active,
            ),
            (
                "gateway_proxied_bytes_total",
                "counter",
                "Bytes relayed.",
                "direction=\"to_upstream\"",
                |d| &d.bytes_to_upstream,
            ),
            (
                "gateway_proxied_bytes_total",
                "counter",
                "",
                "direction=\"to_downstream\"",
                |d| &d.bytes_to_downstream,
            ),
        ];
        for (name, kind, help, extra, read) in destination_counters {
            if !help.is_empty() {
                header(&mut out, name, kind, help);
            }
            for (slot, labels) in &destination_labels {
                let value = sum(&|w| read(&w.destinations[*slot]).load(Ordering::Relaxed));
                let extra = if extra.is_empty() {
                    String::new()
                } else {
                    format!(",{extra}")
                };
                let _ = writeln!(out, "{name}{{{labels}{extra}}} {value}");
            }
        }

        header(
            &mut out,
            "gateway_cluster_connect_failures_total",
            "counter",
            "Failed upstream connect attempts, and clients closed for want of a healthy endpoint.",
        );
        for (slot, labels) in &destination_labels {
            for (index, (reason, _)) in CONNECT_FAILURES.iter().enumerate() {
                let value =
                    sum(&|w| w.destinations[*slot].connect_failures[index].load(Ordering::Relaxed));
                let _ = writeln!(
                    out,
                    "gateway_cluster_connect_failures_total{{{labels},reason=\"{reason}\"}} {value}"
                );
            }
        }

        header(
            &mut out,
            "gateway_connections_closed_total",
            "counter",
            "Why proxied pairs ended.",
        );
        for (slot, labels) in &destination_labels {
            for (index, reason) in Close::ALL.iter().enumerate() {
                let value = sum(&|w| w.destinations[*slot].closed[index].load(Ordering::Relaxed));
                let _ = writeln!(
                    out,
                    "gateway_connections_closed_total{{{labels},reason=\"{reason}\"}} {value}"
                );
            }
        }

        header(
            &mut out,
            "gateway_connection_duration_seconds",
            "histogram",
            "Lifetime of proxied pairs.",
        );
        for &(index, listener) in &listeners {
            let labels = format!("listener=\"{}\"", escape(listener));
            self.render_histogram(
                &mut out,
                "gateway_connection_duration_seconds",
                &labels,
                |w| &w.connection_duration[index],
            );
        }
        header(
            &mut out,
            "gateway_client_hello_wait_seconds",
            "histogram",
            "Time from accept to a complete ClientHello.",
        );
        for &(index, listener) in &listeners {
            let labels = format!("listener=\"{}\"", escape(listener));
            self.render_histogram(
                &mut out,
                "gateway_client_hello_wait_seconds",
                &labels,
                |w| &w.hello_wait[index],
            );
        }
        header(
            &mut out,
            "gateway_cluster_connect_duration_seconds",
            "histogram",
            "Upstream TCP connect latency.",
        );
        for (slot, labels) in &destination_labels {
            self.render_histogram(
                &mut out,
                "gateway_cluster_connect_duration_seconds",
                labels,
                |w| &w.connect_duration[*slot],
            );
        }

        header(
            &mut out,
            "gateway_worker_connections_active",
            "gauge",
            "Connections open per worker (balance across cores).",
        );
        for (index, worker) in self.workers.iter().enumerate() {
            let _ = writeln!(
                out,
                "gateway_worker_connections_active{{worker=\"{index}\"}} {}",
                worker.connections_active.load(Ordering::Relaxed)
            );
        }
        header(
            &mut out,
            "gateway_connection_panics_total",
            "counter",
            "Panics contained at a connection boundary (always a bug; please report).",
        );
        let _ = writeln!(
            out,
            "gateway_connection_panics_total {}",
            sum(&|w| w.connection_panics.load(Ordering::Relaxed))
        );
        header(
            &mut out,
            "gateway_log_lines_suppressed_total",
            "counter",
            "Repeated warnings left out of the log by its rate limit.",
        );
        let _ = writeln!(
            out,
            "gateway_log_lines_suppressed_total {}",
            sum(&|w| w.log_lines_suppressed.load(Ordering::Relaxed))
        );
        header(
            &mut out,
            "gateway_metrics_label_overflow_total",
            "counter",
            "Destinations beyond the label cap, counted under __overflow__.",
        );
        let _ = writeln!(out, "gateway_metrics_label_overflow_total {overflowed}");

        let control = &self.control;
        header(
            &mut out,
            "gateway_config_generation",
            "gauge",
            "Generation of the route snapshot in force.",
        );
        let _ = writeln!(
            out,
            "gateway_config_generation {}",
            control.config_generation.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "gateway_config_reloads_total",
            "counter",
            "Reload attempts.",
        );
        for (index, value) in control.reloads.iter().enumerate() {
            let source = if index < 2 { "sighup" } else { "api" };
            let result = if index % 2 == 0 { "success" } else { "failure" };
            let _ = writeln!(
                out,
                "gateway_config_reloads_total{{source=\"{source}\",result=\"{result}\"}} {}",
                value.load(Ordering::Relaxed)
            );
        }
        header(
            &mut out,
            "gateway_config_last_reload_success_timestamp_seconds",
            "gauge",
            "When the route snapshot in force was loaded.",
        );
        let _ = writeln!(
            out,
            "gateway_config_last_reload_success_timestamp_seconds {}",
            control.last_reload_success_unix.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "gateway_draining",
            "gauge",
            "1 from SIGTERM, POST /drain or a hand-over until the process exits.",
        );
        let _ = writeln!(
            out,
            "gateway_draining {}",
            u8::from(control.draining.load(Ordering::Relaxed))
        );
        header(
            &mut out,
            "gateway_connections_limit",
            "gauge",
            "The cap on open downstream connections (limits.max_connections).",
        );
        let _ = writeln!(
            out,
            "gateway_connections_limit {}",
            control.max_connections.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "gateway_access_log_dropped_total",
            "counter",
            "Access-log lines dropped because the writer could not keep up.",
        );
        let _ = writeln!(
            out,
            "gateway_access_log_dropped_total {}",
            control.access_log_dropped.load(Ordering::Relaxed)
        );
        if let Some(source) = control.route_source.get() {
            source.render_metrics(&mut out);
        }
        self.render_endpoints(&mut out, snapshot, &destinations);
        crate::process_metrics::render(&mut out, self.start_unix);
        out
    }

    /// `gateway_cluster_endpoints{state}`: endpoints of each destination in the snapshot in
    /// force; unhealthy ones are those some worker holds out of round robin after a failed
    /// connect (the union over workers, of the first 64 endpoints of a destination).
    fn render_endpoints(
        &self,
        out: &mut String,
        snapshot: &Snapshot,
        destinations: &[DestinationLabels],
    ) {
        header(
            out,
            "gateway_cluster_endpoints",
            "gauge",
            "Endpoints per destination, by passive health state.",
        );
        for (slot, endpoints) in &snapshot.endpoints_by_slot {
            let Some(labels) = destinations.get(*slot) else {
                continue; // the overflow slot: its members are not one destination
            };
            let held_out = self
                .workers
                .iter()
                .filter(|w| w.health_generation.load(Ordering::Relaxed) == snapshot.generation)
                .map(|w| {
                    w.destinations[*slot]
                        .endpoints_held_out
                        .load(Ordering::Relaxed)
                })
                .fold(0u64, |union, mask| union | mask);
            let unhealthy = u64::from(held_out.count_ones());
            let total = endpoints.len() as u64;
            for (state, value) in [
                ("healthy", total.saturating_sub(unhealthy)),
                ("unhealthy", unhealthy),
            ] {
                let _ = writeln!(
                    out,
                    "gateway_cluster_endpoints{{destination_service=\"{}\",destination_datacenter=\"{}\",state=\"{state}\"}} {value}",
                    escape(&labels.service),
                    escape(&labels.datacenter)
                );
            }
        }
    }

    fn render_histogram(
        &self,
        out: &mut String,
        name: &str,
        labels: &str,
        pick: impl Fn(&WorkerStats) -> &Histogram,
    ) {
        let first = pick(&self.workers[0]);
        let mut cumulative = 0u64;
        for (index, bound) in first
            .bounds
            .iter()
            .map(|b| b.to_string())
            .chain(std::iter::once("+Inf".to_owned()))
            .enumerate()
        {
            cumulative += self
                .workers
                .iter()
                .map(|w| pick(w).buckets[index].load(Ordering::Relaxed))
                .sum::<u64>();
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let sum_nanos: u64 = self
            .workers
            .iter()
            .map(|w| pick(w).sum_nanos.load(Ordering::Relaxed))
            .sum();
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", sum_nanos as f64 / 1e9);
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escape a label value (Prometheus text format: backslash, double quote and newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
