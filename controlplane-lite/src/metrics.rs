//! `controlplane_*` metrics in the Prometheus text format.
//!
//! The set is small and fixed: a few counters with bounded labels (route templates, never raw
//! paths or tokens), one histogram and a build-info gauge, written with the workspace's one
//! text writer (`prom_text`). Rendering happens only at scrape time, under one short-lived
//! lock per family.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prom_text::{Kind, Writer};

/// Upper bounds (seconds) of the commit-latency histogram: an fsync on SSDs takes 0.1–10 ms,
/// on spinning disks or busy CI machines up to a second.
const COMMIT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// All metrics of one agent.
#[derive(Default)]
pub struct Metrics {
    http_requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    acl_denied: Mutex<BTreeMap<String, u64>>,
    leaf_certs: Mutex<BTreeMap<&'static str, u64>>,
    commit_buckets: [AtomicU64; COMMIT_BUCKETS.len()],
    commit_count: AtomicU64,
    commit_sum_nanos: AtomicU64,
    blocking_active: AtomicI64,
    root_expiry: AtomicI64,
    replication: Mutex<BTreeMap<&'static str, ReplicationGauges>>,
    replication_resets: Mutex<BTreeMap<&'static str, u64>>,
    ca_changes_refused: Mutex<BTreeMap<&'static str, u64>>,
    forwarded: Mutex<BTreeMap<&'static str, u64>>,
    fenced_writes: AtomicU64,
    leader: std::sync::atomic::AtomicBool,
    store_corrupt: Mutex<BTreeMap<&'static str, u64>>,
    store_unhealthy: std::sync::atomic::AtomicBool,
    primary_contact_unix: Mutex<Option<f64>>,
}

/// A secondary whose last successful exchange with the primary is older than this reports its
/// replication as failing (status 0), whatever its streams last said: a blocking query can
/// hang on a silent partition for its whole `wait`. The heartbeat (`replication::runner`)
/// refreshes contact every few seconds, so only a real outage crosses it.
pub const CONTACT_STALE_AFTER: f64 = 10.0;

/// Seconds since the Unix epoch, as the replication gauges record them (0 if the clock is
/// before 1970).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The replication gauges of one stream (see `replication::machine::StreamStatus`).
#[derive(Clone, Copy, Debug, Default)]
struct ReplicationGauges {
    healthy: bool,
    index: u64,
    last_success_unix: Option<f64>,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    // A poisoned lock only means another thread panicked mid-increment; the counts are still
    // usable, so keep counting rather than losing metrics.
    let mut guard = map.lock().unwrap_or_else(|p| p.into_inner());
    *guard.entry(key).or_insert(0) += 1;
}

impl Metrics {
    /// Counts one HTTP request by method, route template and status code.
    pub fn count_request(&self, method: &str, route: &str, code: u16) {
        bump(
            &self.http_requests,
            (method.to_owned(), route.to_owned(), code),
        );
    }

    /// Counts one request refused by an ACL check.
    pub fn count_acl_denied(&self, route: &str) {
        bump(&self.acl_denied, route.to_owned());
    }

    /// Counts one leaf-signing outcome (`ok`, `denied`, `invalid`, `error`).
    pub fn count_leaf(&self, result: &'static str) {
        bump(&self.leaf_certs, result);
    }

    /// Records whether the store takes writes (false: read-only after a disk error).
    pub fn set_store_healthy(&self, healthy: bool) {
        self.store_unhealthy.store(!healthy, Ordering::Relaxed);
    }

    /// Counts one stored record whose checksum did not match (by table).
    pub fn count_corrupt_record(&self, table: &'static str) {
        bump(&self.store_corrupt, table);
    }

    /// Records one store commit.
    pub fn observe_commit(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bucket, bound) in self.commit_buckets.iter().zip(COMMIT_BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.commit_count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.commit_sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Adds `delta` to the number of blocking queries currently held open.
    pub fn blocking_queries(&self, delta: i64) {
        self.blocking_active.fetch_add(delta, Ordering::Relaxed);
    }

    /// Records when the active CA root expires (Unix seconds).
    pub fn set_root_expiry(&self, unix_seconds: i64) {
        self.root_expiry.store(unix_seconds, Ordering::Relaxed);
    }

    /// Records the state of one replication stream (`kind` is its metric label).
    pub fn set_replication(
        &self,
        kind: &'static str,
        healthy: bool,
        index: u64,
        last_success_unix: Option<f64>,
    ) {
        let mut guard = self.replication.lock().unwrap_or_else(|p| p.into_inner());
        guard.insert(
            kind,
            ReplicationGauges {
                healthy,
                index,
                last_success_unix,
            },
        );
    }

    /// Counts one CA change from the primary that the secondary refused (`reason`:
    /// `trust_domain` or `root`).
    pub fn count_ca_change_refused(&self, reason: &'static str) {
        bump(&self.ca_changes_refused, reason);
    }

    /// Records a successful exchange with the primary (a heartbeat or a replication fetch).
    pub fn record_primary_contact(&self) {
        self.record_primary_contact_at(unix_now());
    }

    fn record_primary_contact_at(&self, unix_seconds: f64) {
        let mut guard = self
            .primary_contact_unix
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *guard = Some(unix_seconds);
    }

    /// Seconds since the last successful exchange with the primary (`None`: never, or this
    /// agent does not replicate).
    pub fn primary_contact_age(&self) -> Option<f64> {
        let guard = self
            .primary_contact_unix
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        guard.map(|at| (unix_now() - at).max(0.0))
    }

    /// Counts one full resync after the primary's index went backwards.
    pub fn count_replication_reset(&self, kind: &'static str) {
        bump(&self.replication_resets, kind);
    }

    /// Records whether this agent runs the once-per-datacenter duties now.
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    /// Counts one leader-duty write the store refused because this agent no longer led.
    pub fn count_fenced_write(&self) {
        self.fenced_writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one write forwarded to the primary (`ok`: the primary answered; `error`: it could
    /// not be reached).
    pub fn count_forwarded(&self, result: &'static str) {
        bump(&self.forwarded, result);
    }

    fn render_replication(&self, w: &mut Writer<'_>) {
        let gauges = self
            .replication
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !gauges.is_empty() {
            let now = unix_now();
            let contact_age = self.primary_contact_age();
            w.single(
                "controlplane_replication_last_contact_seconds",
                Kind::Gauge,
                "Seconds since the last successful exchange with the primary (heartbeat or fetch); +Inf if never.",
                contact_age.unwrap_or(f64::INFINITY),
            );
            let contact_stale = contact_age.is_none_or(|age| age > CONTACT_STALE_AFTER);
            let families: [(&str, &str); 4] = [
                ("controlplane_replication_status", "1 if the last fetch and apply from the primary succeeded, else 0."),
                ("controlplane_replication_index", "The primary's index of the last applied snapshot."),
                ("controlplane_replication_last_success_timestamp_seconds", "When the last snapshot was applied (Unix seconds)."),
                ("controlplane_replication_lag_seconds", "How stale the local copy may be: 0 while healthy (a blocking query is open on an up-to-date copy), else the time since the last success."),
            ];
            for (name, help) in families {
                w.family(name, Kind::Gauge, help);
                for (kind, g) in &gauges {
                    // A stream that last said "healthy" is not, once the primary has been
                    // silent too long; its copy is then as stale as the last contact.
                    let mut g = *g;
                    if g.healthy && contact_stale {
                        g.healthy = false;
                        g.last_success_unix = contact_age.map(|age| now - age);
                    }
                    let value = match name {
                        "controlplane_replication_status" => f64::from(u8::from(g.healthy)),
                        "controlplane_replication_index" => g.index as f64,
                        "controlplane_replication_last_success_timestamp_seconds" => {
                            match g.last_success_unix {
                                Some(t) => t,
                                None => continue,
                            }
                        }
                        _ if g.healthy => 0.0,
                        _ => g
                            .last_success_unix
                            .map_or(f64::INFINITY, |t| (now - t).max(0.0)),
                    };
                    w.sample(name, &[("type", kind)], value);
                }
            }
        }
        let by_label: [(&str, &str, &str, &Counts); 3] = [
            (
                "controlplane_replication_resets_total",
                "Full resyncs after the primary's index went backwards.",
                "type",
                &self.replication_resets,
            ),
            (
                "controlplane_replication_ca_changes_refused_total",
                "CA changes from the primary the secondary refused (another trust domain, or a root that does not chain to the held one).",
                "reason",
                &self.ca_changes_refused,
            ),
            (
                "controlplane_forwarded_writes_total",
                "Writes a secondary forwarded to the primary.",
                "result",
                &self.forwarded,
            ),
        ];
        for (name, help, label, counts) in by_label {
            counter_family(w, name, help, label, counts);
        }
        w.single(
            "controlplane_leader_fenced_writes_total",
            Kind::Counter,
            "Leader-duty writes the store refused because this agent no longer held the leadership they depended on (a deposed leader).",
            self.fenced_writes.load(Ordering::Relaxed),
        );
        w.single(
            "controlplane_leader",
            Kind::Gauge,
            "1 while this agent runs its datacenter's once-per-datacenter duties (it leads), else 0.",
            self.leader.load(Ordering::Relaxed),
        );
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut w = Writer::new(&mut out);
        w.family(
            "controlplane_build_info",
            Kind::Gauge,
            "Build information; always 1.",
        );
        w.sample(
            "controlplane_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1u64,
        );

        w.family(
            "controlplane_http_requests_total",
            Kind::Counter,
            "HTTP API requests.",
        );
        for ((method, route, code), n) in self
            .http_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            w.sample(
                "controlplane_http_requests_total",
                &[
                    ("method", method),
                    ("route", route),
                    ("code", &code.to_string()),
                ],
                *n,
            );
        }

        w.family(
            "controlplane_acl_denied_total",
            Kind::Counter,
            "Requests refused by an ACL check.",
        );
        for (route, n) in self
            .acl_denied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            w.sample("controlplane_acl_denied_total", &[("route", route)], *n);
        }

        counter_family(
            &mut w,
            "controlplane_leaf_certs_signed_total",
            "Leaf CSR signing outcomes.",
            "result",
            &self.leaf_certs,
        );

        w.single(
            "controlplane_blocking_queries_active",
            Kind::Gauge,
            "Blocking queries held open.",
            self.blocking_active.load(Ordering::Relaxed),
        );

        let expiry = self.root_expiry.load(Ordering::Relaxed);
        if expiry > 0 {
            w.single(
                "controlplane_ca_root_expiry_timestamp_seconds",
                Kind::Gauge,
                "When the active CA root expires.",
                expiry,
            );
        }

        w.family(
            "controlplane_store_commit_duration_seconds",
            Kind::Histogram,
            "Durable store commit latency.",
        );
        // The buckets are counted cumulatively as commits are observed.
        w.histogram(
            "controlplane_store_commit_duration_seconds",
            &[],
            COMMIT_BUCKETS
                .iter()
                .zip(&self.commit_buckets)
                .map(|(bound, bucket)| (*bound, bucket.load(Ordering::Relaxed))),
            self.commit_count.load(Ordering::Relaxed),
            self.commit_sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        );
        w.single(
            "controlplane_store_healthy",
            Kind::Gauge,
            "1 if the store takes writes, 0 if it is read-only after a failed disk write.",
            !self.store_unhealthy.load(Ordering::Relaxed),
        );
        counter_family(
            &mut w,
            "controlplane_store_corrupt_records_total",
            "Stored records whose checksum did not match when read (never served).",
            "table",
            &self.store_corrupt,
        );
        self.render_replication(&mut w);
        out
    }
}

/// Counts by one bounded label value.
type Counts = Mutex<BTreeMap<&'static str, u64>>;

/// A counter family with one label, one series per key counted so far.
fn counter_family(w: &mut Writer<'_>, name: &str, help: &str, label: &str, counts: &Counts) {
    w.family(name, Kind::Counter, help);
    for (value, n) in counts.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        w.sample(name, &[(label, value)], *n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/metrics` is a contract (DESIGN.md "Observability"): `metrics_golden.prom` is what the
    /// hand-written renderer this one replaced wrote for these values, byte for byte (label
    /// escaping included).
    #[test]
    fn the_text_is_byte_compatible_with_the_contract() {
        let metrics = Metrics::default();
        metrics.count_request("GET", "/v1/catalog/\"x\"\\y\nz", 200);
        metrics.count_request("PUT", "/v1/kv", 403);
        metrics.count_acl_denied("/v1/acl/\"t\"");
        metrics.count_leaf("ok");
        metrics.count_leaf("ok");
        metrics.count_leaf("denied");
        metrics.observe_commit(Duration::from_micros(700));
        metrics.observe_commit(Duration::from_millis(30));
        metrics.blocking_queries(3);
        metrics.set_root_expiry(1_900_000_000);
        metrics.count_corrupt_record("catalog");
        metrics.count_replication_reset("intentions");
        metrics.count_ca_change_refused("root");
        metrics.count_forwarded("ok");
        metrics.count_fenced_write();
        metrics.set_replication("intentions", true, 12, Some(5.5));
        metrics.set_replication("ca-roots", false, 0, None);
        assert_eq!(metrics.render(), include_str!("metrics_golden.prom"));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let metrics = Metrics::default();
        metrics.observe_commit(Duration::from_micros(700));
        metrics.observe_commit(Duration::from_millis(30));
        let text = metrics.render();
        assert!(text.contains("controlplane_store_commit_duration_seconds_bucket{le=\"0.001\"} 1"));
        assert!(text.contains("controlplane_store_commit_duration_seconds_bucket{le=\"0.05\"} 2"));
        assert!(text.contains("controlplane_store_commit_duration_seconds_count 2"));
    }

    #[test]
    fn replication_lag_is_zero_while_healthy_and_grows_when_failing() {
        let metrics = Metrics::default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        metrics.record_primary_contact();
        metrics.set_replication("intentions", true, 12, Some(now));
        metrics.set_replication("acl-tokens", false, 3, Some(now - 30.0));
        metrics.set_replication("ca-roots", false, 0, None);
        let text = metrics.render();
        assert!(text.contains("controlplane_replication_status{type=\"intentions\"} 1"));
        assert!(text.contains("controlplane_replication_index{type=\"intentions\"} 12"));
        assert!(text.contains("controlplane_replication_lag_seconds{type=\"intentions\"} 0"));
        assert!(text.contains("controlplane_replication_lag_seconds{type=\"ca-roots\"} +Inf"));
        let lag: f64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("controlplane_replication_lag_seconds{type=\"acl-tokens\"} ")
            })
            .and_then(|v| v.parse().ok())
            .expect("acl-tokens lag");
        assert!((30.0..60.0).contains(&lag), "{lag}");
    }

    #[test]
    fn a_silent_primary_turns_healthy_streams_failing_with_the_contact_age_as_lag() {
        let metrics = Metrics::default();
        let now = unix_now();
        metrics.set_replication("intentions", true, 12, Some(now - 100.0));
        metrics.record_primary_contact_at(now - 25.0);
        let text = metrics.render();
        assert!(
            text.contains("controlplane_replication_status{type=\"intentions\"} 0"),
            "{text}"
        );
        let value = |prefix: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {prefix} in {text}"))
        };
        let contact = value("controlplane_replication_last_contact_seconds ");
        assert!((25.0..60.0).contains(&contact), "{contact}");
        let lag = value("controlplane_replication_lag_seconds{type=\"intentions\"} ");
        assert!(
            (25.0..60.0).contains(&lag),
            "the lag is since the last contact: {lag}"
        );
        // Fresh contact: healthy again, lag 0.
        metrics.record_primary_contact();
        let text = metrics.render();
        assert!(
            text.contains("controlplane_replication_status{type=\"intentions\"} 1"),
            "{text}"
        );
        assert!(text.contains("controlplane_replication_lag_seconds{type=\"intentions\"} 0"));
    }
}
