//! `/metrics`: every worker's stats summed into Prometheus text at scrape, written with the
//! workspace's one text writer (`prom_text`). The names, labels, HELP and TYPE lines are a
//! contract (DESIGN.md "Observability"); `golden.prom` pins them byte for byte.

use std::sync::atomic::{AtomicU64, Ordering};

use prom_text::{Kind, Writer};

use super::registry::OVERFLOW_SLOT;
use super::{
    DestinationStats, HelloOutcome, Histogram, ListenerStats, Metrics, WorkerStats, ACCEPT_ERRORS,
    CONNECT_FAILURES, HELLO_OUTCOMES,
};
use crate::outcome::Close;
use crate::routes::DestinationLabels;
use crate::snapshot::Snapshot;

const OVERFLOW_LABEL: &str = "__overflow__";

type ListenerCounter = fn(&ListenerStats) -> &AtomicU64;
type DestinationCounter = fn(&DestinationStats) -> &AtomicU64;
/// A label pair every series of a family carries besides its own.
type Extra = Option<(&'static str, &'static str)>;
/// A family's TYPE and HELP; `None` continues the family above.
type Header = Option<(Kind, &'static str)>;

impl Metrics {
    /// Render the Prometheus text exposition format (version 0.0.4). `snapshot` is the one in
    /// force, for endpoint membership; `extra` appends metrics from outside the gateway's own
    /// stats (the route source's, see `Control::render_metrics`), so that metrics needs to
    /// know nothing of who adds them.
    pub fn render(&self, snapshot: &Snapshot, extra: impl FnOnce(&mut Writer<'_>)) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let mut w = Writer::new(&mut out);
        let listeners = self.registry.named_listeners();
        let sum = |read: &dyn Fn(&WorkerStats) -> u64| -> u64 {
            self.workers.iter().map(read).fold(0u64, u64::wrapping_add)
        };
        let (destinations, overflowed) = self.registry.destinations();
        let mut destination_labels: Vec<(usize, [(&str, &str); 2])> = destinations
            .iter()
            .enumerate()
            .map(|(slot, labels)| (slot, destination_pairs(labels)))
            .collect();
        if overflowed > 0 {
            destination_labels.push((
                OVERFLOW_SLOT,
                [
                    ("destination_service", OVERFLOW_LABEL),
                    ("destination_datacenter", OVERFLOW_LABEL),
                ],
            ));
        }

        w.family(
            "gateway_build_info",
            Kind::Gauge,
            "Identity of the running binary.",
        );
        w.sample(
            "gateway_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("revision", crate::version::GIT_REVISION),
                ("rustc", crate::version::RUSTC_VERSION),
                ("io_driver", self.io_driver),
            ],
            1u64,
        );

        let listener_counters: [(&str, Kind, &str, Extra, ListenerCounter); 4] = [
            (
                "gateway_listener_connections_accepted_total",
                Kind::Counter,
                "Connections accepted.",
                None,
                |l| &l.accepted,
            ),
            (
                "gateway_listener_connections_active",
                Kind::Gauge,
                "Downstream connections open now.",
                None,
                |l| &l.active,
            ),
            (
                "gateway_listener_connections_rejected_total",
                Kind::Counter,
                "Connections closed right after accept.",
                Some(("reason", "max_connections")),
                |l| &l.rejected_max_connections,
            ),
            (
                "gateway_listener_sockets_open",
                Kind::Gauge,
                "Listening sockets accepting now (one per worker; 0 once the listener is closed).",
                None,
                |l| &l.sockets_open,
            ),
        ];
        for (name, kind, help, extra, read) in listener_counters {
            w.family(name, kind, help);
            for &(index, listener) in &listeners {
                let value = sum(&|w| read(&w.listeners[index]).load(Ordering::Relaxed));
                match extra {
                    Some(extra) => w.sample(name, &[("listener", listener), extra], value),
                    None => w.sample(name, &[("listener", listener)], value),
                }
            }
        }

        w.family(
            "gateway_listener_accept_errors_total",
            Kind::Counter,
            "accept(2) failures; emfile means the file-descriptor limit is too low.",
        );
        for &(index, listener) in &listeners {
            for (position, (reason, _)) in ACCEPT_ERRORS.iter().enumerate() {
                let value =
                    sum(&|w| w.listeners[index].accept_errors[position].load(Ordering::Relaxed));
                w.sample(
                    "gateway_listener_accept_errors_total",
                    &[("listener", listener), ("reason", reason)],
                    value,
                );
            }
        }

        w.family(
            "gateway_client_hello_total",
            Kind::Counter,
            "Outcome of reading the ClientHello.",
        );
        for &(index, listener) in &listeners {
            for outcome in 0..HELLO_OUTCOMES {
                let value = sum(&|w| w.listeners[index].hello[outcome].load(Ordering::Relaxed));
                w.sample(
                    "gateway_client_hello_total",
                    &[
                        ("listener", listener),
                        ("result", HelloOutcome::label(outcome)),
                    ],
                    value,
                );
            }
        }

        w.family(
            "gateway_route_lookups_total",
            Kind::Counter,
            "Routing decisions.",
        );
        for &(index, listener) in &listeners {
            for (result, read) in [
                ("matched", (|l| &l.route_matched) as ListenerCounter),
                ("no_route", |l| &l.route_no_route),
            ] {
                let value = sum(&|w| read(&w.listeners[index]).load(Ordering::Relaxed));
                w.sample(
                    "gateway_route_lookups_total",
                    &[("listener", listener), ("result", result)],
                    value,
                );
            }
        }

        // Both directions of `gateway_proxied_bytes_total` are one family: one header, then
        // every destination's `to_upstream` series before every `to_downstream` one.
        let destination_counters: [(&str, Header, Extra, DestinationCounter); 4] = [
            (
                "gateway_cluster_connections_total",
                Some((
                    Kind::Counter,
                    "Proxied connections started towards a destination.",
                )),
                None,
                |d| &d.connections,
            ),
            (
                "gateway_cluster_connections_active",
                Some((Kind::Gauge, "Proxied pairs open now.")),
                None,
                |d| &d.active,
            ),
            (
                "gateway_proxied_bytes_total",
                Some((Kind::Counter, "Bytes relayed.")),
                Some(("direction", "to_upstream")),
                |d| &d.bytes_to_upstream,
            ),
            (
                "gateway_proxied_bytes_total",
                None,
                Some(("direction", "to_downstream")),
                |d| &d.bytes_to_downstream,
            ),
        ];
        for (name, header, extra, read) in destination_counters {
            if let Some((kind, help)) = header {
                w.family(name, kind, help);
            }
            for (slot, labels) in &destination_labels {
                let value = sum(&|w| read(&w.destinations[*slot]).load(Ordering::Relaxed));
                match extra {
                    Some(extra) => w.sample(name, &[labels[0], labels[1], extra], value),
                    None => w.sample(name, labels, value),
                }
            }
        }

        w.family(
            "gateway_cluster_connect_failures_total",
            Kind::Counter,
            "Failed upstream connect attempts, and clients closed for want of a healthy endpoint.",
        );
        for (slot, labels) in &destination_labels {
            for (index, (reason, _)) in CONNECT_FAILURES.iter().enumerate() {
                let value =
                    sum(&|w| w.destinations[*slot].connect_failures[index].load(Ordering::Relaxed));
                w.sample(
                    "gateway_cluster_connect_failures_total",
                    &[labels[0], labels[1], ("reason", reason)],
                    value,
                );
            }
        }

        w.family(
            "gateway_connections_closed_total",
            Kind::Counter,
            "Why proxied pairs ended.",
        );
        for (slot, labels) in &destination_labels {
            for (index, reason) in Close::ALL.iter().enumerate() {
                let value = sum(&|w| w.destinations[*slot].closed[index].load(Ordering::Relaxed));
                w.sample(
                    "gateway_connections_closed_total",
                    &[labels[0], labels[1], ("reason", reason)],
                    value,
                );
            }
        }

        type PerListener = fn(&WorkerStats) -> &[Histogram];
        let listener_histograms: [(&str, &str, PerListener); 2] = [
            (
                "gateway_connection_duration_seconds",
                "Lifetime of proxied pairs.",
                |w| &w.connection_duration,
            ),
            (
                "gateway_client_hello_wait_seconds",
                "Time from accept to a complete ClientHello.",
                |w| &w.hello_wait,
            ),
        ];
        for (name, help, per_listener) in listener_histograms {
            w.family(name, Kind::Histogram, help);
            for &(index, listener) in &listeners {
                self.histogram(&mut w, name, &[("listener", listener)], |w| {
                    &per_listener(w)[index]
                });
            }
        }
        w.family(
            "gateway_cluster_connect_duration_seconds",
            Kind::Histogram,
            "Upstream TCP connect latency.",
        );
        for (slot, labels) in &destination_labels {
            self.histogram(
                &mut w,
                "gateway_cluster_connect_duration_seconds",
                labels,
                |w| &w.connect_duration[*slot],
            );
        }

        w.family(
            "gateway_worker_connections_active",
            Kind::Gauge,
            "Connections open per worker (balance across cores).",
        );
        for (index, worker) in self.workers.iter().enumerate() {
            w.sample(
                "gateway_worker_connections_active",
                &[("worker", &index.to_string())],
                worker.connections_active.load(Ordering::Relaxed),
            );
        }
        w.single(
            "gateway_connection_panics_total",
            Kind::Counter,
            "Panics contained at a connection boundary (always a bug; please report).",
            sum(&|w| w.connection_panics.load(Ordering::Relaxed)),
        );
        w.single(
            "gateway_relay_spliced_bytes_total",
            Kind::Counter,
            "Bytes relayed by splice(2) through a pipe (bulk flows), both engines.",
            sum(&|w| w.spliced_bytes.load(Ordering::Relaxed)),
        );
        w.single(
            "gateway_log_lines_suppressed_total",
            Kind::Counter,
            "Repeated warnings left out of the log by its rate limit.",
            sum(&|w| w.log_lines_suppressed.load(Ordering::Relaxed)),
        );
        w.single(
            "gateway_metrics_label_overflow_total",
            Kind::Counter,
            "Destinations beyond the label cap, counted under __overflow__.",
            overflowed,
        );

        let control = &self.control;
        w.single(
            "gateway_config_generation",
            Kind::Gauge,
            "Generation of the route snapshot in force.",
            control.config_generation.load(Ordering::Relaxed),
        );
        w.family(
            "gateway_config_reloads_total",
            Kind::Counter,
            "Reload attempts.",
        );
        for (index, value) in control.reloads.iter().enumerate() {
            let source = if index < 2 { "sighup" } else { "api" };
            let result = if index % 2 == 0 { "success" } else { "failure" };
            w.sample(
                "gateway_config_reloads_total",
                &[("source", source), ("result", result)],
                value.load(Ordering::Relaxed),
            );
        }
        w.single(
            "gateway_config_last_reload_success_timestamp_seconds",
            Kind::Gauge,
            "When the route snapshot in force was loaded.",
            control.last_reload_success_unix.load(Ordering::Relaxed),
        );
        w.single(
            "gateway_draining",
            Kind::Gauge,
            "1 from SIGTERM, POST /drain or a hand-over until the process exits.",
            control.draining.load(Ordering::Relaxed),
        );
        w.single(
            "gateway_connections_limit",
            Kind::Gauge,
            "The cap on open downstream connections (limits.max_connections).",
            control.max_connections.load(Ordering::Relaxed),
        );
        w.single(
            "gateway_access_log_dropped_total",
            Kind::Counter,
            "Access-log lines dropped because the writer could not keep up.",
            control.access_log_dropped.load(Ordering::Relaxed),
        );
        extra(&mut w);
        self.render_endpoints(&mut w, snapshot, &destinations);
        crate::process_metrics::render(&mut w, self.start_unix);
        out
    }

    /// `gateway_cluster_endpoints{state}`: endpoints of each destination in the snapshot in
    /// force; unhealthy ones are those some worker holds out of round robin after a failed
    /// connect (the union over workers, of the first 64 endpoints of a destination).
    fn render_endpoints(
        &self,
        w: &mut Writer<'_>,
        snapshot: &Snapshot,
        destinations: &[DestinationLabels],
    ) {
        w.family(
            "gateway_cluster_endpoints",
            Kind::Gauge,
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
            let [service, datacenter] = destination_pairs(labels);
            for (state, value) in [
                ("healthy", total.saturating_sub(unhealthy)),
                ("unhealthy", unhealthy),
            ] {
                w.sample(
                    "gateway_cluster_endpoints",
                    &[service, datacenter, ("state", state)],
                    value,
                );
            }
        }
    }

    /// One histogram series summed over workers (buckets are kept non-cumulative per worker).
    fn histogram(
        &self,
        w: &mut Writer<'_>,
        name: &str,
        labels: &[(&str, &str)],
        pick: impl Fn(&WorkerStats) -> &Histogram,
    ) {
        let first = pick(&self.workers[0]);
        let in_bucket = |index: usize| -> u64 {
            self.workers
                .iter()
                .map(|w| pick(w).buckets[index].load(Ordering::Relaxed))
                .sum()
        };
        let mut cumulative = 0u64;
        let buckets: Vec<(f64, u64)> = first
            .bounds
            .iter()
            .enumerate()
            .map(|(index, &bound)| {
                cumulative += in_bucket(index);
                (bound, cumulative)
            })
            .collect();
        let count = cumulative + in_bucket(first.bounds.len());
        let sum_nanos: u64 = self
            .workers
            .iter()
            .map(|w| pick(w).sum_nanos.load(Ordering::Relaxed))
            .sum();
        w.histogram(name, labels, buckets, count, sum_nanos as f64 / 1e9);
    }
}

fn destination_pairs(labels: &DestinationLabels) -> [(&'static str, &str); 2] {
    [
        ("destination_service", labels.service.as_str()),
        ("destination_datacenter", labels.datacenter.as_str()),
    ]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{add, AcceptError, ConnectFailure, HelloOutcome, Metrics, ReloadSource};
    use crate::clienthello::Reject;
    use crate::config::Config;
    use crate::outcome::{Close, Reason, Side};
    use crate::snapshot::Snapshot;
    use std::sync::atomic::Ordering;

    /// The text before the process metrics is pinned byte for byte (`golden.prom`, rendered by
    /// the hand-written renderer this one replaced), so a change of a name, label, HELP or
    /// TYPE line, or of their order, fails here before a dashboard notices.
    #[test]
    fn the_text_is_byte_compatible_with_the_contract() {
        let config = Config::parse(
            "[[listener]]\nname = \"pub\\\"lic\"\naddress = \"127.0.0.1:0\"\n\n\
             [[listener]]\nname = \"second\"\naddress = \"127.0.0.1:0\"\n\n\
             [[route]]\nsni = \"socat.default.dc1.internal.td.consul\"\n\
             endpoints = [\"127.0.0.1:21000\", \"127.0.0.1:21001\"]\n\n\
             [[route]]\nsni = \"*.dc2.internal.td.consul\"\nendpoints = [\"127.0.0.1:9444\"]\n",
        )
        .expect("config");
        let metrics = Metrics::new(2, "io_uring");
        for listener in &config.listeners {
            metrics.registry.listener_slot(&listener.name);
        }
        let table = config.route_table().expect("routes");
        let slots = metrics.registry.destination_slots(&table);
        let snapshot = Snapshot::new(table, slots, &config, 3);
        let w = &metrics.workers[1];
        w.listeners[0].hello(HelloOutcome::SniFound);
        w.listeners[1].hello(HelloOutcome::Eof);
        w.listeners[0].hello(HelloOutcome::Rejected(Reject::ALL[1]));
        add(&w.listeners[0].accepted, 7);
        add(&metrics.workers[0].listeners[0].accepted, 5);
        w.listeners[0].accept_error(AcceptError::Emfile);
        add(&w.listeners[1].route_no_route, 2);
        w.destinations[0].connect_failure(ConnectFailure::Timeout);
        w.destinations[1].closed(Close::new(Side::Gateway, Reason::Idle));
        add(&w.destinations[1].bytes_to_upstream, 1234);
        w.destinations[0]
            .endpoints_held_out
            .store(0b10, Ordering::Relaxed);
        w.health_generation.store(3, Ordering::Relaxed);
        w.connection_duration[0].observe(Duration::from_millis(7));
        metrics.workers[0].connection_duration[0].observe(Duration::from_secs(2));
        w.hello_wait[1].observe(Duration::from_micros(70));
        w.connect_duration[0].observe(Duration::from_micros(300));
        metrics.control.reload(ReloadSource::Api, false);
        metrics
            .control
            .config_generation
            .store(3, Ordering::Relaxed);

        let text = metrics.render(&snapshot, |_| {});
        let (ours, process) = text
            .split_once("# HELP process_")
            .expect("process metrics at the end");
        let expected = include_str!("golden.prom")
            .replace("VERSION", env!("CARGO_PKG_VERSION"))
            .replace("REVISION", crate::version::GIT_REVISION)
            .replace("RUSTC", crate::version::RUSTC_VERSION);
        if ours != expected {
            let first = ours
                .lines()
                .zip(expected.lines())
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("got      {a}\nexpected {b}"));
            panic!("the metrics text changed: {first:?}");
        }
        for family in [
            "process_cpu_seconds_total counter",
            "process_resident_memory_bytes gauge",
            "process_open_fds gauge",
            "process_max_fds gauge",
            "process_start_time_seconds gauge",
        ] {
            assert!(
                process.contains(&format!("# TYPE {family}\n")),
                "{family}: {process}"
            );
        }
    }
}
