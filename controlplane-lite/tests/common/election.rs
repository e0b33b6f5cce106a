//! A leader-election candidate on a real etcd cluster (`leader::run` over the agent's own etcd
//! client), for the tests that watch elections directly.

use std::time::Duration;

use controlplane_lite::leader::{self, Keys, Verdict};

/// One candidate: its published verdict, its stop switch and its task.
pub struct Candidate {
    pub verdict: tokio::sync::watch::Receiver<Verdict>,
    pub stop: tokio::sync::watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts a candidate for `prefix` as `node`, campaigning with lease `ttl`.
pub async fn candidate(endpoints: &str, prefix: &str, node: &str, ttl: Duration) -> Candidate {
    let list = controlplane_lite::etcd::parse_endpoints(endpoints).expect("endpoints");
    let client = controlplane_lite::etcd::connect(&list, Duration::from_secs(10))
        .await
        .expect("etcd answers over its unix sockets");
    let (verdict_tx, verdict) = tokio::sync::watch::channel(Verdict::default());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let keys = Keys::new(prefix, node);
    let address = format!("{node}.example:8500");
    let task = tokio::spawn(async move {
        leader::run(client, keys, address, ttl, &verdict_tx, stop_rx).await;
    });
    Candidate {
        verdict,
        stop,
        task,
    }
}
