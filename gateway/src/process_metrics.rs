//! The standard `process_*` metrics, read from /proc/self (Prometheus client guidelines).

use prom_text::{Kind, Writer};

/// Clock ticks per second for /proc/self/stat times. Linux has reported USER_HZ = 100 to
/// userspace on every architecture since 2.6.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;
const PAGE_SIZE: u64 = 4096;

pub fn render(w: &mut Writer<'_>, start_unix: f64) {
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15,
        // rss is field 24 (proc(5)).
        if let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
            if let (Some(utime), Some(stime)) = (field(14), field(15)) {
                w.single(
                    "process_cpu_seconds_total",
                    Kind::Counter,
                    "Total user and system CPU time spent in seconds.",
                    (utime + stime) as f64 / CLOCK_TICKS_PER_SECOND,
                );
            }
            if let Some(rss) = field(24) {
                w.single(
                    "process_resident_memory_bytes",
                    Kind::Gauge,
                    "Resident memory size in bytes.",
                    rss * PAGE_SIZE,
                );
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        w.single(
            "process_open_fds",
            Kind::Gauge,
            "Number of open file descriptors.",
            entries.count() as u64,
        );
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        if let Some(max) = limits
            .lines()
            .find(|line| line.starts_with("Max open files"))
            .and_then(|line| line.split_whitespace().nth(3))
            .and_then(|value| value.parse::<u64>().ok())
        {
            w.single(
                "process_max_fds",
                Kind::Gauge,
                "Maximum number of open file descriptors.",
                max,
            );
        }
    }
    w.single(
        "process_start_time_seconds",
        Kind::Gauge,
        "Start time of the process since unix epoch in seconds.",
        start_unix,
    );
}
