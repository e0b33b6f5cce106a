//! Leader election on a real 3-member etcd cluster (unix sockets, `scripts/etcd-cluster`):
//! exactly one of several candidates leads, the registry lists them all, and when the leader
//! goes away a follower takes over within a bounded time. Needs etcd (scripts/install-test-deps).

mod common;

use std::time::{Duration, Instant};

use common::election::{candidate, Candidate};
use common::etcd::EtcdCluster;
use controlplane_lite::leader::{self, Keys};

fn leaders(candidates: &[&Candidate]) -> usize {
    candidates
        .iter()
        .filter(|c| c.verdict.borrow().leader)
        .count()
}

async fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_a_follower_takes_over() {
    let cluster = EtcdCluster::start("leader");
    let ttl = Duration::from_secs(2);
    let prefix = "/meshgw/test-leader";
    let a = candidate(&cluster.endpoints, prefix, "a", ttl).await;
    let b = candidate(&cluster.endpoints, prefix, "b", ttl).await;
    let c = candidate(&cluster.endpoints, prefix, "c", ttl).await;
    wait_for(Duration::from_secs(10), "one leader", || {
        leaders(&[&a, &b, &c]) == 1
    })
    .await;
    // Held for a while: never two leaders at once.
    for _ in 0..20 {
        assert!(leaders(&[&a, &b, &c]) <= 1, "two leaders at once");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = controlplane_lite::etcd::connect(
        &controlplane_lite::etcd::parse_endpoints(&cluster.endpoints).expect("endpoints"),
        Duration::from_secs(10),
    )
    .await
    .expect("etcd");
    let keys = Keys::new(prefix, "observer");
    let mut peers = leader::peer_addresses(&mut client, &keys)
        .await
        .expect("peers");
    peers.sort();
    assert_eq!(
        peers,
        vec!["a.example:8500", "b.example:8500", "c.example:8500"]
    );
    let (first, rest): (&Candidate, Vec<&Candidate>) = if a.verdict.borrow().leader {
        (&a, vec![&b, &c])
    } else if b.verdict.borrow().leader {
        (&b, vec![&a, &c])
    } else {
        (&c, vec![&a, &b])
    };
    let address = leader::leader_address(&mut client, &keys)
        .await
        .expect("leader");
    assert!(address.ends_with(".example:8500"), "{address:?}");
    // The leader dies without a word (its task is aborted: no revoke), so its lease runs out.
    first.task.abort();
    let took = wait_for(Duration::from_secs(10), "a follower takes over", || {
        leaders(&rest) == 1
    })
    .await;
    // Reported, not asserted: the bound above is a deadline, the machine is noisy.
    eprintln!("leadership moved {took:?} after the leader died (lease TTL {ttl:?})");
    // The dead candidate's registration leaves with its lease (it has run out by now: a
    // follower took over).
    let peers = leader::peer_addresses(&mut client, &keys)
        .await
        .expect("peers");
    assert_eq!(peers.len(), 2, "{peers:?}");
    // A clean stop revokes the lease: the last follower leads at once.
    let (second, last) = if rest[0].verdict.borrow().leader {
        (rest[0], rest[1])
    } else {
        (rest[1], rest[0])
    };
    second.stop.send_replace(true);
    let took = wait_for(
        Duration::from_secs(10),
        "the last follower takes over",
        || last.verdict.borrow().leader,
    )
    .await;
    eprintln!("leadership moved {took:?} after a clean stop");
    last.stop.send_replace(true);
}
