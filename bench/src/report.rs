//! The result of one run, as a human table or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::Outcome;
use crate::procfs::CpuUsage;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Option<Percentiles> {
        if histogram.is_empty() {
            return None;
        }
        let micros = |nanos: u64| nanos as f64 / 1000.0;
        Some(Percentiles {
            count: histogram.len(),
            mean: histogram.mean() / 1000.0,
            p50: micros(histogram.value_at_quantile(0.50)),
            p90: micros(histogram.value_at_quantile(0.90)),
            p99: micros(histogram.value_at_quantile(0.99)),
            p999: micros(histogram.value_at_quantile(0.999)),
            max: micros(histogram.max()),
        })
    }
}

/// Memory of idle proxied connections (the idle mode).
#[derive(Debug, Clone, Serialize, Default)]
pub struct MemoryReport {
    pub connections: u64,
    pub proxy_pss_before_bytes: u64,
    pub proxy_pss_after_bytes: u64,
    /// ΔPSS of the `--pid` processes / connections.
    pub proxy_pss_per_connection: f64,
    /// Δ of /proc/net/sockstat TCP `mem` pages, in bytes.
    pub kernel_tcp_buffer_delta_bytes: i64,
    /// Δ of the socket-related slab caches (all sockets on the machine: client, proxy, backend).
    pub kernel_slab_delta_bytes: i64,
    pub kernel_per_connection: f64,
    pub slab_deltas: BTreeMap<String, i64>,
    pub sample_checked: u64,
    pub sample_ok: u64,
}

/// CPU used during the measurement window and what it means per operation.
#[derive(Debug, Clone, Serialize)]
pub struct CpuReport {
    #[serde(flatten)]
    pub usage: CpuUsage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_us_per_operation: Option<f64>,
    pub system_us_per_operation: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_seconds_per_gb: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_seconds_per_gb: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: String,
    pub target: String,
    pub labels: BTreeMap<String, String>,
    pub parameters: BTreeMap<String, serde_json::Value>,
    pub window_seconds: f64,
    pub operations: u64,
    pub operations_per_second: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbit_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Percentiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_us: Option<Percentiles>,
    pub errors_total: u64,
    pub errors: BTreeMap<String, u64>,
    pub cpu: CpuReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryReport>,
}

impl Report {
    pub fn new(
        mode: &str,
        target: String,
        labels: BTreeMap<String, String>,
        parameters: BTreeMap<String, serde_json::Value>,
        outcome: Outcome,
        cpu: CpuUsage,
    ) -> Report {
        let window = outcome.window.as_secs_f64();
        let per_second = |value: f64| if window > 0.0 { value / window } else { 0.0 };
        let operations = outcome.operations as f64;
        let bulk = mode == "bulk";
        // A bulk "operation" is a whole stream; its CPU is reported per GB instead.
        let per_operation =
            |seconds: f64| (outcome.operations > 0 && !bulk).then(|| seconds * 1e6 / operations);
        let gigabytes = (outcome.bytes_received as f64) / 1e9;
        let per_gb = |seconds: f64| (bulk && gigabytes > 0.0).then(|| seconds / gigabytes);
        let cpu = CpuReport {
            proxy_us_per_operation: cpu.proxy_seconds.and_then(per_operation),
            system_us_per_operation: per_operation(cpu.system_seconds),
            proxy_seconds_per_gb: cpu.proxy_seconds.and_then(per_gb),
            system_seconds_per_gb: per_gb(cpu.system_seconds),
            usage: cpu,
        };
        Report {
            mode: mode.to_owned(),
            target,
            labels,
            parameters,
            window_seconds: window,
            operations: outcome.operations,
            operations_per_second: per_second(operations),
            bytes_sent: outcome.bytes_sent,
            bytes_received: outcome.bytes_received,
            gbit_per_second: bulk.then(|| per_second(outcome.bytes_received as f64 * 8.0 / 1e9)),
            latency_us: Percentiles::of(&outcome.latency),
            connect_us: Percentiles::of(&outcome.connect),
            errors_total: outcome.errors.values().sum(),
            errors: outcome.errors,
            cpu,
            memory: outcome.memory,
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "mode        {}  → {}", self.mode, self.target);
        for (key, value) in &self.labels {
            let _ = writeln!(out, "label       {key}={value}");
        }
        let _ = writeln!(
            out,
            "window      {:.2} s   operations {}   {:.1}/s",
            self.window_seconds, self.operations, self.operations_per_second
        );
        let _ = writeln!(
            out,
            "bytes       sent {}   received {}",
            self.bytes_sent, self.bytes_received
        );
        if let Some(gbit) = self.gbit_per_second {
            let _ = writeln!(out, "throughput  {gbit:.3} Gbit/s (echoed bytes received)");
        }
        let _ = writeln!(
            out,
            "{:<11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency µs", "count", "mean", "p50", "p90", "p99", "p99.9", "max"
        );
        for (name, percentiles) in [
            ("exchange", &self.latency_us),
            ("connect", &self.connect_us),
        ] {
            if let Some(p) = percentiles {
                let _ = writeln!(
                    out,
                    "{:<11} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                    name, p.count, p.mean, p.p50, p.p90, p.p99, p.p999, p.max
                );
            }
        }
        let errors = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(out, "errors      {}  ({errors})", self.errors_total);
        let cpu = &self.cpu;
        let _ = write!(
            out,
            "cpu s       system {:.2}  client {:.2}",
            cpu.usage.system_seconds, cpu.usage.client_seconds
        );
        if let Some(proxy) = cpu.usage.proxy_seconds {
            let _ = write!(out, "  proxy {proxy:.2}");
        }
        let _ = writeln!(out);
        if let Some(system) = cpu.system_us_per_operation {
            let _ = write!(out, "cpu µs/op   system {system:.2}");
            if let Some(proxy) = cpu.proxy_us_per_operation {
                let _ = write!(out, "  proxy {proxy:.2}");
            }
            let _ = writeln!(out);
        }
        if let Some(system) = cpu.system_seconds_per_gb {
            let _ = write!(out, "cpu s/GB    system {system:.3}");
            if let Some(proxy) = cpu.proxy_seconds_per_gb {
                let _ = write!(out, "  proxy {proxy:.3}");
            }
            let _ = writeln!(out);
        }
        if let Some(memory) = &self.memory {
            let _ = writeln!(
                out,
                "memory      {} idle connections: proxy PSS {} → {} bytes = {:.0} B/conn; kernel Δtcp-mem {} B, Δslab {} B = {:.0} B/conn",
                memory.connections,
                memory.proxy_pss_before_bytes,
                memory.proxy_pss_after_bytes,
                memory.proxy_pss_per_connection,
                memory.kernel_tcp_buffer_delta_bytes,
                memory.kernel_slab_delta_bytes,
                memory.kernel_per_connection
            );
            let _ = writeln!(
                out,
                "sample      {}/{} idle connections still echo",
                memory.sample_ok, memory.sample_checked
            );
        }
        out
    }
}
