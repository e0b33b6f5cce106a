//! Fencing of a deposed leader on a real 3-member etcd cluster (unix sockets,
//! `scripts/etcd-cluster`): a duty write carries the election key and the lease it was made
//! under, and etcd refuses it once another agent leads, whatever the writer still believes.
//! Needs etcd (scripts/install-test-deps).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::election::candidate;
use common::etcd::EtcdCluster;
use controlplane_lite::error::Error;
use controlplane_lite::leader::{self, Keys, Verdict};
use controlplane_lite::metrics::Metrics;
use controlplane_lite::store::etcd::EtcdBackend;
use controlplane_lite::store::{LeaderFence, Store, Table};

async fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `value` under `key` in the system table, fenced on `fence`, on a blocking thread.
async fn fenced_put(
    store: &Arc<Store>,
    fence: LeaderFence,
    key: &'static str,
    value: &'static str,
) -> Result<(), Error> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        store.write_fenced(Some(&fence), |tx| tx.put(Table::System, key, &value))
    })
    .await
    .expect("the write's thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_duty_write_is_refused_by_etcd() {
    let cluster = EtcdCluster::start("fence");
    let ttl = Duration::from_secs(2);
    let prefix = "/meshgw/test-fence";
    let endpoints = controlplane_lite::etcd::parse_endpoints(&cluster.endpoints).expect("list");
    let metrics = Arc::new(Metrics::default());
    let store = {
        let metrics = metrics.clone();
        tokio::task::spawn_blocking(move || {
            let (backend, _follower) =
                EtcdBackend::connect(&endpoints, prefix, Duration::from_secs(10))
                    .expect("the store reaches etcd");
            Store::with_backend(Box::new(backend), metrics).expect("the store opens")
        })
        .await
        .expect("open")
    };
    let store = Arc::new(store);

    let a = candidate(&cluster.endpoints, prefix, "a", ttl).await;
    wait_for(Duration::from_secs(10), "a leads", || {
        a.verdict.borrow().leader
    })
    .await;
    let b = candidate(&cluster.endpoints, prefix, "b", ttl).await;
    let key = format!("{prefix}/leader");
    let fence_a = LeaderFence {
        key: key.clone(),
        lease: a.verdict.borrow().lease,
    };
    assert_ne!(fence_a.lease, 0, "a leader publishes its lease");
    fenced_put(&store, fence_a.clone(), "duty", "from a")
        .await
        .expect("the leader's fenced write commits");

    // `a` goes away (its lease ends, as it would for an agent paused past its TTL) and `b`
    // takes over. `a`'s fence still names its old lease: a write made with it now is a write
    // from a deposed leader.
    a.stop.send_replace(true);
    let _ = a.task.await;
    wait_for(Duration::from_secs(15), "b takes over", || {
        b.verdict.borrow().leader
    })
    .await;
    let refused = fenced_put(&store, fence_a.clone(), "duty", "from deposed a").await;
    assert!(
        matches!(refused, Err(Error::NotLeader(_))),
        "a deposed leader's write must be refused, got {refused:?}"
    );
    assert!(
        metrics
            .render()
            .contains("controlplane_leader_fenced_writes_total 1\n"),
        "the refusal is counted"
    );
    assert_eq!(
        store
            .get::<String>(Table::System, "duty")
            .ok()
            .flatten()
            .as_deref(),
        Some("from a"),
        "nothing of the refused write was stored"
    );

    // The new leader's fence holds.
    let fence_b = LeaderFence {
        key,
        lease: b.verdict.borrow().lease,
    };
    fenced_put(&store, fence_b, "duty", "from b")
        .await
        .expect("the new leader's fenced write commits");
    assert_eq!(
        store
            .get::<String>(Table::System, "duty")
            .ok()
            .flatten()
            .as_deref(),
        Some("from b")
    );
    b.stop.send_replace(true);
    let _ = b.task.await;
}

/// The election's half of fencing: when the agent turns its verdict to "not leader" because
/// etcd refused a fenced write (`Agent::duty_write`), the election steps down for good instead
/// of publishing "leader" again from its clock, and learns who leads by campaigning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_fenced_write_makes_the_election_step_down_at_once() {
    let cluster = EtcdCluster::start("depose");
    // Long enough that neither clock nor a routine campaign ends `a`'s leadership during the
    // test (a leader re-checks the key every TTL/3 = 10 s).
    let ttl = Duration::from_secs(30);
    let prefix = "/meshgw/test-depose";
    let list = controlplane_lite::etcd::parse_endpoints(&cluster.endpoints).expect("endpoints");
    let mut client = controlplane_lite::etcd::connect(&list, Duration::from_secs(10))
        .await
        .expect("etcd");
    let a_client = controlplane_lite::etcd::connect(&list, Duration::from_secs(10))
        .await
        .expect("etcd");
    let (a_tx, a_verdict) = tokio::sync::watch::channel(Verdict::default());
    let a_tx = Arc::new(a_tx);
    let (a_stop, a_stop_rx) = tokio::sync::watch::channel(false);
    let a_task = {
        let a_tx = a_tx.clone();
        tokio::spawn(async move {
            let keys = Keys::new(prefix, "a");
            leader::run(
                a_client,
                keys,
                "a.example:8500".into(),
                ttl,
                &a_tx,
                a_stop_rx,
            )
            .await;
        })
    };
    wait_for(Duration::from_secs(10), "a leads", || {
        a_verdict.borrow().leader
    })
    .await;
    let b = candidate(&cluster.endpoints, prefix, "b", ttl).await;
    // b registers under its lease; the key is then handed to that lease behind a's back, as
    // happens when a's lease ended while it was paused and b won the election.
    let b_lease = {
        let start = Instant::now();
        loop {
            let answer = client
                .get(format!("{prefix}/agents/b"), None)
                .await
                .expect("get");
            if let Some(kv) = answer.kvs().first() {
                break kv.lease();
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "b never registered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    client
        .put(
            format!("{prefix}/leader"),
            "b.example:8500",
            Some(etcd_client::PutOptions::new().with_lease(b_lease)),
        )
        .await
        .expect("hand the key to b");
    assert!(a_verdict.borrow().leader, "a's clock still says it leads");

    // What Agent::duty_write does when etcd refuses a fenced write.
    a_tx.send_modify(|v| {
        v.leader = false;
        v.lease = 0;
    });
    // Until b leads (its next campaign, within TTL/10), a never claims the lead again.
    let start = Instant::now();
    while !b.verdict.borrow().leader {
        assert!(
            !a_verdict.borrow().leader,
            "the deposed agent published itself leader again"
        );
        assert!(start.elapsed() < Duration::from_secs(15), "b never led");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!a_verdict.borrow().leader);
    a_stop.send_replace(true);
    b.stop.send_replace(true);
    let _ = a_task.await;
    let _ = b.task.await;
}

/// `name`'s value in `agent`'s `/metrics`, if it answers.
fn metric(agent: &common::Agent, name: &str) -> Option<f64> {
    let answer = agent.get("/metrics", None);
    if answer.status != 200 {
        return None;
    }
    answer.text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        (series == name).then(|| value.parse().ok())?
    })
}

fn signal(agent: &common::Agent, signal: &str) {
    // kill(1): the crate forbids `unsafe`, so no libc::kill here.
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(agent.child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal}");
}

/// Two agents on one etcd store: the leader is SIGSTOPped past its lease TTL, the other takes
/// over, and the old one, SIGCONTed, steps down instead of running its duties beside the new
/// leader. (Its clock ends its leadership on resume; a duty write already in flight then is
/// what the fence refuses, tested deterministically above.)
#[test]
fn a_leader_paused_past_its_lease_steps_down_when_it_resumes() {
    let cluster = EtcdCluster::start("pause");
    let dirs = [
        common::TempDir::new("pause-a"),
        common::TempDir::new("pause-b"),
    ];
    let flags: Vec<String> = [
        "-store",
        "etcd",
        "-etcd-endpoints",
        cluster.endpoints.as_str(),
        "-etcd-prefix",
        "/meshgw/pause/dc1",
        "-etcd-lease-ttl",
        "2",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let agents: Vec<common::Agent> = dirs
        .iter()
        .map(|dir| common::Agent::start_in(dir.path(), "dc1", &common::refs(&flags)))
        .collect();
    let leading = |agent: &common::Agent| metric(agent, "controlplane_leader") == Some(1.0);
    common::eventually(Duration::from_secs(20), "one agent leads", || {
        agents.iter().filter(|a| leading(a)).count() == 1
    });
    let Some(old) = agents.iter().position(&leading) else {
        panic!("no leader");
    };
    let new = 1 - old;

    signal(&agents[old], "STOP");
    common::eventually(
        Duration::from_secs(20),
        "the other agent takes over",
        || leading(&agents[new]),
    );
    signal(&agents[old], "CONT");
    common::eventually(
        Duration::from_secs(20),
        "the resumed agent steps down",
        || metric(&agents[old], "controlplane_leader") == Some(0.0),
    );
    assert!(leading(&agents[new]), "the new leader keeps its term");
    let leader = agents[old].get("/v1/status/leader", None).json();
    assert_eq!(leader.as_str(), Some(agents[new].address.as_str()));
    let fenced = metric(&agents[old], "controlplane_leader_fenced_writes_total");
    println!("the resumed old leader stepped down; its refused duty writes: {fenced:?}");
}
