//! Several agents of one datacenter on a real 3-member etcd cluster (`scripts/etcd-cluster`,
//! unix sockets): failover under load, and an agent cut off from a quorum. Needs etcd
//! (scripts/install-test-deps). Times are reported on stderr, never asserted.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::{eventually, wait_until, Agent, TempDir};

/// One HTTP exchange with an agent by address (threads outlive a killed agent's handle).
struct Http(ureq::Agent);

struct Reply {
    status: u16,
    index: Option<u64>,
    text: String,
}

impl Http {
    fn new(timeout: Duration) -> Http {
        Http(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(timeout))
                .build()
                .into(),
        )
    }

    /// `None` when the agent does not answer at all (killed, restarting).
    fn call(&self, method: &str, address: &str, path: &str, body: Option<&str>) -> Option<Reply> {
        let url = format!("http://{address}{path}");
        let result = match (method, body) {
            ("POST", Some(body)) => self.0.post(&url).send(body),
            ("PUT", Some(body)) => self.0.put(&url).send(body),
            _ => self.0.get(&url).call(),
        };
        let mut response = result.ok()?;
        let status = response.status().as_u16();
        let index = response
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let text = response.body_mut().read_to_string().ok()?;
        Some(Reply {
            status,
            index,
            text,
        })
    }
}

fn start(dir: &TempDir, flags: &[String]) -> Agent {
    Agent::start_in(dir.path(), "dc1", &common::refs(flags))
}

/// The intention IDs an agent lists (`?consistent` or not, per `query`).
fn intention_ids(http: &Http, address: &str, query: &str) -> Option<(u64, BTreeSet<String>)> {
    let reply = http.call(
        "GET",
        address,
        &format!("/v1/connect/intentions{query}"),
        None,
    )?;
    if reply.status != 200 {
        return None;
    }
    let list: serde_json::Value = serde_json::from_str(&reply.text).ok()?;
    let ids = list
        .as_array()?
        .iter()
        .filter_map(|i| i["ID"].as_str().map(str::to_owned))
        .collect();
    Some((reply.index.unwrap_or(0), ids))
}

#[derive(Default)]
struct Watched {
    /// Every index the agent answered with, in order.
    indexes: Vec<u64>,
    /// The IDs of the last answer.
    last: BTreeSet<String>,
}

/// Blocking queries on `address` until `stop`: records each answer's index and IDs.
fn watch(address: String, stop: Arc<AtomicBool>, into: Arc<Mutex<Watched>>) {
    let http = Http::new(Duration::from_secs(10));
    let mut index = 0;
    // Bounded: stops with the test, and each query waits at most 2 s.
    for _ in 0..100_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let query = format!("?index={index}&wait=2s");
        match intention_ids(&http, &address, &query) {
            Some((answered, ids)) => {
                let mut watched = into.lock().unwrap_or_else(|p| p.into_inner());
                watched.indexes.push(answered);
                watched.last = ids;
                index = answered;
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn failover_under_load_loses_no_acknowledged_write() {
    let cluster = EtcdCluster::start("ha");
    let flags = common::etcd::agent_flags(&cluster.endpoints, "/meshgw-test/ha/dc1");
    let dirs: Vec<TempDir> = (0..3).map(|i| TempDir::new(&format!("ha{i}"))).collect();
    let mut agents: Vec<Agent> = dirs.iter().map(|d| start(d, &flags)).collect();
    let addresses: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(
        agents.iter().map(|a| a.address.clone()).collect(),
    ));
    let http = Http::new(Duration::from_secs(10));
    // Wait for a leader.
    let mut leader = String::new();
    eventually(Duration::from_secs(20), "a leader is elected", || {
        leader = http
            .call("GET", &agents[0].address, "/v1/status/leader", None)
            .map(|r| r.text.trim_matches('"').to_owned())
            .unwrap_or_default();
        !leader.is_empty()
    });
    // Each agent lists itself in etcd when it starts, so the list fills in shortly after the
    // first leader is known.
    let mut peers = String::new();
    let all_listed = wait_until(Duration::from_secs(20), || {
        peers = http
            .call("GET", &agents[0].address, "/v1/status/peers", None)
            .map(|r| r.text)
            .unwrap_or_default();
        agents.iter().all(|agent| peers.contains(&agent.address))
    });
    assert!(all_listed, "every agent is a peer: {peers}");
    let leader_slot = agents
        .iter()
        .position(|a| a.address == leader)
        .expect("the leader is one of ours");

    // The writer: intentions through every agent in turn; acknowledged IDs are kept.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_writer = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stall: Arc<Mutex<Duration>> = Arc::default();
    let writer = {
        let (stop, acked, stall, addresses) = (
            stop_writer.clone(),
            acked.clone(),
            stall.clone(),
            addresses.clone(),
        );
        std::thread::spawn(move || {
            let http = Http::new(Duration::from_secs(10));
            let mut last_ack = Instant::now();
            for n in 0..100_000u32 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let address = {
                    let list = addresses.lock().unwrap_or_else(|p| p.into_inner());
                    list[n as usize % list.len()].clone()
                };
                let body =
                    format!(r#"{{"SourceName":"src-{n}","DestinationName":"db","Action":"deny"}}"#);
                let reply = http.call("POST", &address, "/v1/connect/intentions", Some(&body));
                match reply {
                    Some(reply) if reply.status == 200 => {
                        let id: serde_json::Value =
                            serde_json::from_str(&reply.text).expect("ID JSON");
                        let id = id["ID"].as_str().expect("ID").to_owned();
                        acked.lock().unwrap_or_else(|p| p.into_inner()).push(id);
                        let mut worst = stall.lock().unwrap_or_else(|p| p.into_inner());
                        *worst = (*worst).max(last_ack.elapsed());
                        last_ack = Instant::now();
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
    };
    // Blocking queries on the two agents that survive.
    let survivors: Vec<String> = agents
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader_slot)
        .map(|(_, a)| a.address.clone())
        .collect();
    let watched: Vec<Arc<Mutex<Watched>>> = survivors.iter().map(|_| Arc::default()).collect();
    let watchers: Vec<_> = survivors
        .iter()
        .zip(&watched)
        .map(|(address, into)| {
            let (address, stop, into) = (address.clone(), stop.clone(), into.clone());
            std::thread::spawn(move || watch(address, stop, into))
        })
        .collect();
    let acked_count = || acked.lock().unwrap_or_else(|p| p.into_inner()).len();
    let more = |n: usize, what: &str| {
        let target = acked_count() + n;
        eventually(Duration::from_secs(60), what, || acked_count() >= target);
    };
    more(20, "writes before the failover");

    // SIGKILL the leader agent; the writer's turn on it fails, the others go on.
    agents[leader_slot].kill9();
    let killed_at = Instant::now();
    let mut new_leader = String::new();
    eventually(Duration::from_secs(30), "another agent leads", || {
        new_leader = http
            .call("GET", &survivors[0], "/v1/status/leader", None)
            .map(|r| r.text.trim_matches('"').to_owned())
            .unwrap_or_default();
        !new_leader.is_empty() && new_leader != leader
    });
    eprintln!(
        "leadership moved to {new_leader} {:?} after the leader was killed (lease TTL 2 s)",
        killed_at.elapsed()
    );
    more(20, "writes after the agent failover");

    // SIGKILL one etcd member: two keep the quorum.
    cluster.kill(1);
    more(20, "writes with one etcd member down");
    cluster.restart(1);
    // The killed agent comes back on the cluster (a new port: it binds port 0).
    agents[leader_slot] = start(&dirs[leader_slot], &flags);
    addresses.lock().unwrap_or_else(|p| p.into_inner())[leader_slot] =
        agents[leader_slot].address.clone();
    more(20, "writes after both restarts");
    stop_writer.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    // The watchers go on until they have answered at the final index (bounded), then stop.
    let (final_index, _) =
        intention_ids(&http, &survivors[0], "?consistent").expect("consistent read");
    for (address, watched) in survivors.iter().zip(&watched) {
        eventually(Duration::from_secs(30), "the watchers catch up", || {
            watched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .indexes
                .last()
                .is_some_and(|i| *i >= final_index)
        });
        eprintln!("{address}: blocking queries reached index {final_index}");
    }
    stop.store(true, Ordering::Relaxed);
    for watcher in watchers {
        watcher.join().expect("watcher");
    }
    let acked: BTreeSet<String> = acked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect();
    eprintln!(
        "{} acknowledged writes; the longest stall between two acknowledgements was {:?}",
        acked.len(),
        *stall.lock().unwrap_or_else(|p| p.into_inner())
    );

    // Every acknowledged write is on every agent, the restarted one included.
    for agent in &agents {
        let (_, ids) =
            intention_ids(&http, &agent.address, "?consistent").expect("consistent read");
        let missing: Vec<_> = acked.difference(&ids).collect();
        assert!(missing.is_empty(), "{} lost {missing:?}", agent.address);
    }
    // The survivors' blocking queries saw every change, their indexes never went backwards.
    for (address, watched) in survivors.iter().zip(&watched) {
        let watched = watched.lock().unwrap_or_else(|p| p.into_inner());
        let backwards = watched.indexes.windows(2).find(|w| w[1] < w[0]);
        assert!(
            backwards.is_none(),
            "{address}: index went back {backwards:?}"
        );
        let missing: Vec<_> = acked.difference(&watched.last).collect();
        assert!(
            missing.is_empty(),
            "{address}: blocking queries missed {missing:?}"
        );
    }
    // Each write moved the index by exactly one commit: no index is shared by two intentions.
    let (_, all) = intention_ids(&http, &agents[0].address, "?consistent").expect("list");
    let list = http
        .call("GET", &agents[0].address, "/v1/connect/intentions", None)
        .expect("list");
    let parsed: serde_json::Value = serde_json::from_str(&list.text).expect("JSON");
    let mut by_index: BTreeMap<u64, usize> = BTreeMap::new();
    for intention in parsed.as_array().expect("array") {
        *by_index
            .entry(intention["ModifyIndex"].as_u64().expect("ModifyIndex"))
            .or_default() += 1;
    }
    assert!(by_index.values().all(|n| *n == 1), "{by_index:?}");
    assert_eq!(all.len(), by_index.len());
}

#[test]
fn an_agent_cut_off_from_a_quorum_refuses_writes_and_answers_only_stale_reads() {
    let cluster = EtcdCluster::start("iso");
    // The agent reaches member 3 only; killing 1 and 2 leaves it with a member that has no
    // quorum: cut off, though its socket still answers.
    let only_m3 = cluster.endpoint_list()[2].clone();
    let flags = common::etcd::agent_flags(&only_m3, "/meshgw-test/iso/dc1");
    let dir = TempDir::new("iso");
    let agent = start(&dir, &flags);
    let http = Http::new(Duration::from_secs(15));
    let body = r#"{"SourceName":"web","DestinationName":"db","Action":"deny"}"#;
    let created = http
        .call("POST", &agent.address, "/v1/connect/intentions", Some(body))
        .expect("answer");
    assert_eq!(created.status, 200, "{}", created.text);

    cluster.kill(1);
    cluster.kill(2);
    let refused_body = r#"{"SourceName":"api","DestinationName":"db","Action":"allow"}"#;
    let mut refusal = String::new();
    eventually(
        Duration::from_secs(30),
        "writes are refused",
        || match http.call(
            "POST",
            &agent.address,
            "/v1/connect/intentions",
            Some(refused_body),
        ) {
            Some(reply) if reply.status == 503 => {
                refusal = reply.text;
                true
            }
            _ => false,
        },
    );
    assert!(refusal.contains("etcd"), "a clear error: {refusal}");
    let consistent = http
        .call(
            "GET",
            &agent.address,
            "/v1/connect/intentions?consistent",
            None,
        )
        .expect("answer");
    assert_eq!(
        consistent.status, 503,
        "never a stale consistent read: {}",
        consistent.text
    );
    let default = http
        .call("GET", &agent.address, "/v1/connect/intentions", None)
        .expect("answer");
    assert_eq!(default.status, 503, "{}", default.text);
    assert!(
        default.text.contains("stale"),
        "says how to read: {}",
        default.text
    );
    let stale = http
        .call("GET", &agent.address, "/v1/connect/intentions?stale", None)
        .expect("answer");
    assert_eq!(stale.status, 200, "{}", stale.text);
    assert!(stale.text.contains("\"web\""), "{}", stale.text);
    assert!(
        !stale.text.contains("\"api\""),
        "the refused write is absent: {}",
        stale.text
    );
    let leader = http
        .call("GET", &agent.address, "/v1/status/leader", None)
        .expect("answer");
    assert_eq!(leader.text.trim(), "\"\"", "no leader while cut off");

    // The quorum comes back: the agent writes again.
    cluster.restart(1);
    cluster.restart(2);
    // An upsert, so an attempt that timed out while the quorum was coming back (its outcome
    // unknown: it may have committed) does not make the next attempt a duplicate.
    let mut last = String::new();
    let accepted = wait_until(Duration::from_secs(60), || {
        match http.call(
            "PUT",
            &agent.address,
            "/v1/connect/intentions/exact?source=api&destination=db",
            Some(r#"{"Action":"allow"}"#),
        ) {
            Some(reply) if reply.status == 200 => true,
            Some(reply) => {
                last = format!("{} {}", reply.status, reply.text);
                false
            }
            None => {
                last = "no answer".to_owned();
                false
            }
        }
    });
    assert!(accepted, "writes are accepted again; last answer: {last}");
    let (_, after) = intention_ids(&http, &agent.address, "?consistent").expect("list");
    assert_eq!(after.len(), 2, "web=>db and api=>db, once each: {after:?}");
}

#[test]
fn an_idle_agent_keeps_its_etcd_connection_and_answers_every_read() {
    // etcd closes a connection that pings more often than its keepalive minimum (5 s) while
    // idle; the agent's watch then broke every 8 s and default reads were refused until it
    // reconnected. Idle for three of those periods, every read must be answered.
    let cluster = EtcdCluster::start("idle");
    let flags = common::etcd::agent_flags(&cluster.endpoints, "/meshgw-test/idle/dc1");
    let dir = TempDir::new("idle");
    let agent = start(&dir, &flags);
    let http = Http::new(Duration::from_secs(15));
    let started = std::time::Instant::now();
    let mut reads = 0;
    while started.elapsed() < Duration::from_secs(25) {
        let reply = http
            .call("GET", &agent.address, "/v1/connect/intentions", None)
            .expect("the agent answers");
        assert_eq!(
            reply.status,
            200,
            "read {reads} after {:?}: {}",
            started.elapsed(),
            reply.text
        );
        reads += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(reads > 100, "{reads} reads");
}
