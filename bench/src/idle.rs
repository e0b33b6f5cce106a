//! Idle connections: how much memory a proxy spends per established, idle proxied connection.

use std::thread;
use std::time::Duration;

use crate::client::{Outcome, Progress};
use crate::procfs::{self, KernelMemory};
use crate::report::MemoryReport;
use crate::session::Sessions;

pub struct Config {
    pub target: std::net::SocketAddr,
    pub hello: std::sync::Arc<Vec<u8>>,
    pub connections: usize,
    pub pids: Vec<u32>,
    pub sample: usize,
    pub settle: Duration,
    pub timeout: Duration,
    /// Keep the connections open this long after measuring (for looking at the proxy by hand).
    pub hold: Duration,
}

/// Bytes of the round trip that proves each connection is established through the proxy.
const PROBE_BYTES: usize = 16;

pub fn run(config: &Config, progress: &Progress) -> anyhow::Result<Outcome> {
    let pids = procfs::with_descendants(&config.pids);
    let pss_before = procfs::pss_bytes(&pids);
    let kernel_before = KernelMemory::take();

    let mut sessions = Sessions::new(config.hello.clone(), PROBE_BYTES)?;
    let open_timeout = config.timeout + Duration::from_millis(config.connections as u64);
    let established = sessions.open(config.target, config.connections, open_timeout, progress)?;
    // Let the proxies finish their own work (upstream connects, buffer releases) before measuring.
    thread::sleep(config.settle);
    let pids_after = procfs::with_descendants(&config.pids);
    let pss_after = procfs::pss_bytes(&pids_after);
    let kernel_after = KernelMemory::take();

    let sample_checked = config.sample.min(established);
    let sample_ok = sessions.check_sample(sample_checked, config.timeout, progress)?;
    thread::sleep(config.hold);
    sessions.close_all();

    let count = established.max(1) as f64;
    let mut slab_deltas = std::collections::BTreeMap::new();
    for (name, &after) in &kernel_after.slabs {
        let before = kernel_before.slabs.get(name).copied().unwrap_or(0);
        let delta = after as i64 - before as i64;
        if delta != 0 {
            slab_deltas.insert(name.clone(), delta);
        }
    }
    let slab_delta: i64 = slab_deltas.values().sum();
    let tcp_delta = kernel_after.tcp_buffer_bytes as i64 - kernel_before.tcp_buffer_bytes as i64;
    let mut outcome = std::mem::replace(&mut sessions.outcome, Outcome::new());
    if sample_ok < sample_checked {
        *outcome
            .errors
            .entry("sample_no_echo".to_owned())
            .or_default() += (sample_checked - sample_ok) as u64;
    }
    outcome.operations = established as u64;
    outcome.memory = Some(MemoryReport {
        connections: established as u64,
        proxy_pss_before_bytes: pss_before,
        proxy_pss_after_bytes: pss_after,
        proxy_pss_per_connection: (pss_after as f64 - pss_before as f64) / count,
        kernel_tcp_buffer_delta_bytes: tcp_delta,
        kernel_slab_delta_bytes: slab_delta,
        kernel_per_connection: (slab_delta + tcp_delta) as f64 / count,
        slab_deltas,
        sample_checked: sample_checked as u64,
        sample_ok: sample_ok as u64,
    });
    Ok(outcome)
}
