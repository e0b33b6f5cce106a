//! A secondary whose `-primary-address` lists two agents of a primary datacenter that share an
//! etcd cluster (`scripts/etcd-cluster`, unix sockets) keeps replicating when the agent it
//! talks to is SIGKILLed: an intention written through the survivor reaches the secondary.
//! Needs etcd (scripts/install-test-deps).

mod common;

use std::time::Duration;

use common::etcd::EtcdCluster;
use common::{
    eventually, owned, primary_flags, refs, secondary_flags, start_primary, Agent, TempDir,
};

/// Creates an intention through `agent` and returns its ID.
fn create_intention(agent: &Agent, token: &str, source: &str) -> String {
    let body = format!(r#"{{"SourceName":"{source}","DestinationName":"socat","Action":"deny"}}"#);
    let created = agent.request("POST", "/v1/connect/intentions", Some(token), Some(&body));
    assert_eq!(created.status, 200, "{}", created.text);
    created.json()["ID"]
        .as_str()
        .unwrap_or_else(|| panic!("no ID in {}", created.text))
        .to_owned()
}

#[test]
fn a_secondary_fails_over_along_its_primary_address_list() {
    let cluster = EtcdCluster::start("pfo");
    let etcd = common::etcd::agent_flags(&cluster.endpoints, "/meshgw/pfo/primary");
    let (dir_a, dir_b, dir_s) = (
        TempDir::new("pfo-a"),
        TempDir::new("pfo-b"),
        TempDir::new("pfo-s"),
    );
    let (mut a, management, replication) = start_primary(dir_a.path(), etcd.clone());
    let b = Agent::start_in(dir_b.path(), "primary", &refs(&primary_flags(etcd)));
    let list = format!("{},{}", a.address, b.address);
    let secondary = Agent::start_in(
        dir_s.path(),
        "secondary",
        &refs(&secondary_flags(
            &list,
            &replication,
            owned(&["-store", "redb", "-primary-insecure-http"], Vec::new()),
        )),
    );
    let token = Some(management.as_str());
    let replicated = |id: &str| {
        secondary
            .get(&format!("/v1/connect/intentions/{id}"), token)
            .status
            == 200
    };
    let before = create_intention(&a, &management, "web");
    eventually(Duration::from_secs(30), "replication through A", || {
        replicated(&before)
    });

    // The agent first in the list dies; the secondary must move to the second one.
    a.kill9();
    let after = create_intention(&b, &management, "api");
    eventually(
        Duration::from_secs(30),
        "an intention written through B after A died replicates",
        || replicated(&after),
    );
}

/// Measures (prints, never asserts) how long a secondary datacenter of two agents on a shared
/// etcd store stops replicating when its leader, which runs replication, is SIGKILLed: the
/// survivor replicates once it leads (about one lease TTL). The baseline is the replication
/// time of one write in steady state before the kill, in the same run.
#[test]
fn a_secondarys_replication_resumes_on_the_survivor_after_its_leader_dies() {
    let cluster = EtcdCluster::start("slag");
    let (dir_p, dir_1, dir_2) = (
        TempDir::new("slag-p"),
        TempDir::new("slag-1"),
        TempDir::new("slag-2"),
    );
    let (primary, management, replication) =
        start_primary(dir_p.path(), owned(&["-store", "redb"], Vec::new()));
    let flags = secondary_flags(
        &primary.address,
        &replication,
        owned(
            &["-primary-insecure-http"],
            common::etcd::agent_flags(&cluster.endpoints, "/meshgw/slag/secondary"),
        ),
    );
    let mut agents = vec![
        Agent::start_in(dir_1.path(), "secondary", &refs(&flags)),
        Agent::start_in(dir_2.path(), "secondary", &refs(&flags)),
    ];
    let token = Some(management.as_str());
    let seen_by = |agent: &Agent, id: &str| {
        agent
            .get(&format!("/v1/connect/intentions/{id}"), token)
            .status
            == 200
    };
    let before = create_intention(&primary, &management, "web");
    eventually(
        Duration::from_secs(30),
        "replication before the kill",
        || agents.iter().all(|a| seen_by(a, &before)),
    );
    // The baseline: one write replicated in steady state.
    let started = std::time::Instant::now();
    let steady = create_intention(&primary, &management, "db");
    eventually(
        Duration::from_secs(30),
        "replication in steady state",
        || agents.iter().all(|a| seen_by(a, &steady)),
    );
    let baseline = started.elapsed();

    let leader = agents[0].get("/v1/status/leader", None).json();
    let leader = leader.as_str().unwrap_or_default().to_owned();
    let Some(position) = agents.iter().position(|a| a.address == leader) else {
        panic!("the leader {leader:?} is not one of the two agents");
    };
    let mut dead = agents.remove(position);
    dead.kill9();
    let killed = std::time::Instant::now();
    let after = create_intention(&primary, &management, "api");
    eventually(
        Duration::from_secs(60),
        "replication on the survivor after the leader died",
        || seen_by(&agents[0], &after),
    );
    let resumed = killed.elapsed();
    println!(
        "secondary leader SIGKILLed (lease TTL 2 s): a write in the primary reached the surviving \
         secondary agent {resumed:?} after the kill, against {baseline:?} in steady state \
         before it"
    );
}
