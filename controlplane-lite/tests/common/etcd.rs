//! A real 3-member etcd cluster for the tests, started by `scripts/etcd-cluster` (the one home
//! of how a local cluster is laid out) in a private temporary directory, and SIGKILLed with
//! that directory removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `scripts/etcd-cluster` of this checkout.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/etcd-cluster")
}

/// The flags that put an agent on the cluster at `endpoints` under `prefix`, with a 2 s lease
/// so elections settle fast.
pub fn agent_flags(endpoints: &str, prefix: &str) -> Vec<String> {
    [
        "-store",
        "etcd",
        "-etcd-endpoints",
        endpoints,
        "-etcd-prefix",
        prefix,
        "-etcd-lease-ttl",
        "2",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// A running cluster; stopped on drop.
pub struct EtcdCluster {
    dir: PathBuf,
    /// The client endpoints, comma-separated (`-etcd-endpoints`).
    pub endpoints: String,
}

impl EtcdCluster {
    /// Starts three members and waits (bounded, inside the script) until they have a quorum.
    pub fn start(label: &str) -> EtcdCluster {
        // Short: the socket paths live in it and a socket path has at most 107 bytes.
        let dir = std::env::temp_dir().join(format!("etcd-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let output = Command::new(script())
            .arg("start")
            .arg(&dir)
            .output()
            .expect("run scripts/etcd-cluster (is etcd installed? scripts/install-test-deps)");
        assert!(
            output.status.success(),
            "scripts/etcd-cluster start failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let endpoints = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        EtcdCluster { dir, endpoints }
    }

    /// The endpoints as a list.
    pub fn endpoint_list(&self) -> Vec<String> {
        self.endpoints.split(',').map(str::to_owned).collect()
    }

    /// SIGKILLs member `n` (1 to 3).
    pub fn kill(&self, n: u32) {
        let status = Command::new(script())
            .arg("kill")
            .arg(&self.dir)
            .arg(n.to_string())
            .status()
            .expect("run scripts/etcd-cluster kill");
        assert!(status.success(), "scripts/etcd-cluster kill {n} failed");
    }

    /// Starts member `n` again on its data.
    pub fn restart(&self, n: u32) {
        let status = Command::new(script())
            .arg("restart")
            .arg(&self.dir)
            .arg(n.to_string())
            .status()
            .expect("run scripts/etcd-cluster restart");
        assert!(status.success(), "scripts/etcd-cluster restart {n} failed");
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
    }
}
