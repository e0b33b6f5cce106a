//! Readings from /proc: CPU time of processes and of the whole system, and memory (PSS of
//! processes, kernel socket and slab memory).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use serde::Serialize;

use crate::sys;

/// The given processes plus all their descendants (nginx's workers, HAProxy's master-worker
/// children). Threads are covered by the process-level files, which aggregate them.
pub fn with_descendants(roots: &[u32]) -> Vec<u32> {
    let mut parents: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1).and_then(|p| p.parse().ok()))
            {
                parents.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut all = BTreeSet::new();
    let mut stack: Vec<u32> = roots.to_vec();
    while let Some(pid) = stack.pop() {
        if all.insert(pid) {
            stack.extend(parents.get(&pid).into_iter().flatten());
        }
    }
    all.into_iter().collect()
}

/// The fields of /proc/PID/stat after the command name, starting with `state` (field 3).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of a process, all its threads included, in clock ticks.
fn process_ticks(pid: u32) -> Option<u64> {
    let fields = stat_fields(pid)?;
    // After the name: state(3) ppid(4) ... utime(14) stime(15) → indexes 11 and 12 here.
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(user + system)
}

/// Busy ticks of the whole system: user + nice + system + irq + softirq from /proc/stat.
fn system_ticks() -> u64 {
    let Ok(text) = fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = text.lines().next() else {
        return 0;
    };
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // Columns: user nice system idle iowait irq softirq steal ...
    [0, 1, 2, 5, 6].iter().filter_map(|&i| values.get(i)).sum()
}

/// A snapshot of CPU counters, taken at the start and at the end of a measurement.
#[derive(Debug, Clone)]
pub struct CpuSnapshot {
    processes: BTreeMap<u32, u64>,
    system: u64,
    own: u64,
}

impl CpuSnapshot {
    pub fn take(pids: &[u32]) -> CpuSnapshot {
        CpuSnapshot {
            processes: pids
                .iter()
                .filter_map(|&pid| process_ticks(pid).map(|t| (pid, t)))
                .collect(),
            system: system_ticks(),
            own: process_ticks(std::process::id()).unwrap_or(0),
        }
    }
}

/// CPU seconds spent between two snapshots.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUsage {
    /// The `--pid` processes and their descendants; absent without `--pid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_seconds: Option<f64>,
    /// The whole machine (user + nice + system + irq + softirq).
    pub system_seconds: f64,
    /// This load generator.
    pub client_seconds: f64,
}

impl CpuUsage {
    pub fn between(start: &CpuSnapshot, end: &CpuSnapshot, measured_pids: bool) -> CpuUsage {
        let hertz = sys::clock_ticks_per_second() as f64;
        // A process that exited or appeared during the run contributes what both saw.
        let proxy: u64 = end
            .processes
            .iter()
            .map(|(pid, &ticks)| {
                ticks.saturating_sub(start.processes.get(pid).copied().unwrap_or(ticks))
            })
            .sum();
        CpuUsage {
            proxy_seconds: measured_pids.then_some(proxy as f64 / hertz),
            system_seconds: end.system.saturating_sub(start.system) as f64 / hertz,
            client_seconds: end.own.saturating_sub(start.own) as f64 / hertz,
        }
    }
}

/// Proportional set size of the processes, in bytes (shared pages split between sharers, so
/// nginx's master and worker are not double-counted as with RSS).
pub fn pss_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|text| {
            text.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .sum()
}

/// Kernel memory that sockets use: TCP buffer pages from /proc/net/sockstat and the slab caches
/// that grow with connections, from /proc/slabinfo (readable by root only).
#[derive(Debug, Clone, Default)]
pub struct KernelMemory {
    pub tcp_buffer_bytes: u64,
    pub tcp_sockets_in_use: u64,
    /// Cache name → bytes (active objects × object size).
    pub slabs: BTreeMap<String, u64>,
}

/// The slab caches that a TCP connection allocates from.
const SOCKET_SLABS: &[&str] = &[
    "TCP",
    "TCPv6",
    "sock_inode_cache",
    "filp",
    "dentry",
    "eventpoll_epi",
    "eventpoll_pwq",
    "skbuff_head_cache",
    "request_sock_TCP",
    "tw_sock_TCP",
    "io_kiocb",
    "kmalloc-64",
    "kmalloc-192",
    "kmalloc-256",
    "kmalloc-512",
    "kmalloc-1k",
    "kmalloc-2k",
    "kmalloc-4k",
];

impl KernelMemory {
    pub fn take() -> KernelMemory {
        let mut memory = KernelMemory::default();
        let page = 4096;
        if let Ok(text) = fs::read_to_string("/proc/net/sockstat") {
            for line in text.lines().filter(|l| l.starts_with("TCP:")) {
                let words: Vec<&str> = line.split_whitespace().collect();
                for pair in words.windows(2) {
                    match pair[0] {
                        "mem" => memory.tcp_buffer_bytes = pair[1].parse().unwrap_or(0) * page,
                        "inuse" => memory.tcp_sockets_in_use = pair[1].parse().unwrap_or(0),
                        _ => {}
                    }
                }
            }
        }
        if let Ok(text) = fs::read_to_string("/proc/slabinfo") {
            for line in text.lines().skip(2) {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.len() < 4 || !SOCKET_SLABS.contains(&words[0]) {
                    continue;
                }
                let active: u64 = words[1].parse().unwrap_or(0);
                let size: u64 = words[3].parse().unwrap_or(0);
                memory.slabs.insert(words[0].to_owned(), active * size);
            }
        }
        memory
    }
}
