//! Deterministic simulation of replication: a primary and a secondary [`Replicator`] joined by
//! an in-memory link with a simulated clock, delays, losses and partitions. No threads, no
//! sockets, no real time: every run of a test is the same run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::machine::{Action, Config, Health, Replicator, RequestId};
use super::snapshot::{plan, Change, Entry};
use super::Kind;

/// xorshift64*: a tiny seeded generator so losses and delays repeat exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

type Rows = BTreeMap<String, Value>;
type Answer = Result<(u64, Vec<Entry>), String>;

/// The primary: tables with per-table indexes and the blocking queries it is holding.
struct Primary {
    index: u64,
    tables: BTreeMap<Kind, (u64, Rows)>,
    parked: Vec<(RequestId, Kind, u64, Instant)>,
}

impl Default for Primary {
    /// Starts at index 1, like the real store after its first-start initialisation: an empty
    /// table reports index 1, so the first write must come after it.
    fn default() -> Primary {
        Primary {
            index: 1,
            tables: BTreeMap::new(),
            parked: Vec::new(),
        }
    }
}

impl Primary {
    fn write(&mut self, kind: Kind, key: &str, value: Option<Value>) {
        self.index += 1;
        let (index, rows) = self.tables.entry(kind).or_default();
        *index = self.index;
        match value {
            Some(value) => rows.insert(key.to_owned(), value),
            None => rows.remove(key),
        };
    }

    fn snapshot(&self, kind: Kind) -> (u64, Vec<Entry>) {
        match self.tables.get(&kind) {
            Some((index, rows)) => (
                (*index).max(1),
                rows.iter()
                    .filter(|(_, v)| !kind.is_local_only(v))
                    .map(|(k, v)| Entry {
                        key: k.clone(),
                        value: v.clone(),
                    })
                    .collect(),
            ),
            None => (1, Vec::new()),
        }
    }

    /// Answers parked queries whose table moved or whose wait ran out.
    fn release(&mut self, now: Instant) -> Vec<(RequestId, Answer)> {
        let mut answers = Vec::new();
        let parked = std::mem::take(&mut self.parked);
        for (id, kind, index, deadline) in parked {
            let (current, entries) = self.snapshot(kind);
            // Like Consul's blockingQuery: any index other than the client's answers at once, so a
            // client whose index is ahead of a rebuilt primary resyncs instead of hanging.
            if current != index || now >= deadline {
                answers.push((id, Ok((current, entries))));
            } else {
                self.parked.push((id, kind, index, deadline));
            }
        }
        answers
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Partition {
    Healed,
    /// Everything is lost silently (a black hole).
    Silent,
    /// Connections are refused at once.
    Refused,
}

enum Message {
    Request(RequestId, Kind, u64, Duration),
    Response(RequestId, Answer),
}

struct Sim {
    now: Instant,
    rng: Rng,
    primary: Primary,
    machine: Replicator,
    local: BTreeMap<Kind, Rows>,
    in_flight: Vec<(Instant, Message)>,
    delay: (u64, u64),
    loss_per_mille: u64,
    partition: Partition,
    fetches: BTreeMap<Kind, u32>,
    fail_next_applies: u32,
}

impl Sim {
    fn new(seed: u64, delay_ms: (u64, u64), loss_per_mille: u64) -> Sim {
        let now = Instant::now();
        Sim {
            now,
            rng: Rng(seed),
            primary: Primary::default(),
            machine: Replicator::new(&Kind::ALL, Config::default(), now),
            local: BTreeMap::new(),
            in_flight: Vec::new(),
            delay: delay_ms,
            loss_per_mille,
            partition: Partition::Healed,
            fetches: BTreeMap::new(),
            fail_next_applies: 0,
        }
    }

    fn send(&mut self, message: Message) {
        if self.partition == Partition::Silent || self.rng.below(1000) < self.loss_per_mille {
            return;
        }
        let (low, high) = self.delay;
        let delay = Duration::from_millis(low + self.rng.below(high - low + 1));
        self.in_flight.push((self.now + delay, message));
    }

    fn perform(&mut self, actions: Vec<Action<Vec<Entry>>>) {
        for action in actions {
            match action {
                Action::Fetch {
                    id,
                    kind,
                    index,
                    wait,
                } => {
                    *self.fetches.entry(kind).or_default() += 1;
                    if self.partition == Partition::Refused {
                        let apply = self.machine.on_fetched::<Vec<Entry>>(
                            self.now,
                            id,
                            Err("refused".into()),
                        );
                        assert!(apply.is_none());
                    } else {
                        self.send(Message::Request(id, kind, index, wait));
                    }
                }
                Action::Apply { kind, payload, .. } => {
                    if self.fail_next_applies > 0 {
                        self.fail_next_applies -= 1;
                        self.machine
                            .on_applied(self.now, kind, Err("disk full".into()));
                        continue;
                    }
                    let rows = self.local.entry(kind).or_default();
                    for change in plan(kind, rows, &payload) {
                        match change {
                            Change::Put(k, v) => rows.insert(k, v),
                            Change::Delete(k) => rows.remove(&k),
                        };
                    }
                    self.machine.on_applied(self.now, kind, Ok(()));
                }
            }
        }
    }

    /// Runs every event up to and including `until`.
    fn run_until(&mut self, until: Instant) {
        loop {
            let actions = self.machine.poll(self.now);
            self.perform(actions);
            for (id, answer) in self.primary.release(self.now) {
                self.send(Message::Response(id, answer));
            }
            let due: Vec<Message> = {
                let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
                    .into_iter()
                    .partition(|(at, _)| *at <= self.now);
                self.in_flight = later;
                due.into_iter().map(|(_, m)| m).collect()
            };
            let delivered = !due.is_empty();
            for message in due {
                match message {
                    Message::Request(id, kind, index, wait) => {
                        self.primary.parked.push((id, kind, index, self.now + wait));
                    }
                    Message::Response(id, answer) => {
                        if let Some(apply) = self.machine.on_fetched(self.now, id, answer) {
                            self.perform(vec![apply]);
                        }
                    }
                }
            }
            if delivered {
                continue; // New requests may be answerable at this same instant.
            }
            let next = [
                self.machine.next_wakeup(),
                self.in_flight.iter().map(|(at, _)| *at).min(),
                self.primary.parked.iter().map(|p| p.3).min(),
            ]
            .into_iter()
            .flatten()
            .filter(|t| *t > self.now)
            .min();
            match next {
                Some(t) if t <= until => self.now = t,
                _ => {
                    self.now = until;
                    return;
                }
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        self.run_until(until);
    }

    fn write(&mut self, kind: Kind, key: &str, value: Option<Value>) {
        self.primary.write(kind, key, value);
        self.run_until(self.now);
    }

    fn in_sync(&self) -> bool {
        Kind::ALL.iter().all(|kind| {
            let (_, entries) = self.primary.snapshot(*kind);
            let remote: Rows = entries.into_iter().map(|e| (e.key, e.value)).collect();
            let local: Rows = self
                .local
                .get(kind)
                .map(|rows| {
                    rows.iter()
                        .filter(|(_, v)| !kind.is_local_only(v))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            remote == local
        })
    }

    fn random_write(&mut self) {
        let kind = Kind::ALL[self.rng.below(Kind::ALL.len() as u64) as usize];
        let key = format!("k{}", self.rng.below(20));
        let value = if self.rng.below(5) == 0 {
            None
        } else {
            Some(json!({"Local": false, "V": self.rng.next()}))
        };
        self.write(kind, &key, value);
    }
}

/// Longest time a healthy stream may need to notice anything: a lost fetch times out, then the
/// longest back-off.
fn worst_case_recovery() -> Duration {
    let config = Config::default();
    config.wait + config.grace + config.backoff_max + Duration::from_secs(1)
}

#[test]
fn a_write_is_applied_one_link_delay_later_when_healthy() {
    let mut sim = Sim::new(1, (10, 10), 0);
    sim.advance(Duration::from_secs(1));
    assert!(sim.in_sync());
    for i in 0..20 {
        sim.write(Kind::Intentions, &format!("i{i}"), Some(json!({"N": i})));
        // The secondary's blocking query is already parked in the primary: the answer needs
        // one trip across the link.
        sim.advance(Duration::from_millis(9));
        assert!(!sim.in_sync(), "write {i} arrived early");
        sim.advance(Duration::from_millis(1));
        assert!(sim.in_sync(), "write {i} not applied after one link delay");
        sim.advance(Duration::from_millis(500));
    }
}

#[test]
fn converges_despite_delays_and_losses() {
    for seed in [7, 42, 1234] {
        let mut sim = Sim::new(seed, (1, 80), 100);
        sim.local
            .entry(Kind::AclTokens)
            .or_default()
            .insert("mine".into(), json!({"Local": true}));
        for _ in 0..300 {
            sim.random_write();
            let pause = Duration::from_millis(sim.rng.below(400));
            sim.advance(pause);
        }
        // A lost blocking query costs `wait + grace` before the stream notices; a few of those
        // in a row are likely with 10 % loss each way.
        sim.advance(worst_case_recovery() * 4);
        assert!(sim.in_sync(), "seed {seed}: not converged");
        assert_eq!(
            sim.local[&Kind::AclTokens].get("mine"),
            Some(&json!({"Local": true})),
            "a local token was replicated away"
        );
    }
}

#[test]
fn refused_connections_back_off_and_heal() {
    let mut sim = Sim::new(3, (2, 5), 0);
    sim.advance(Duration::from_secs(1));
    sim.partition = Partition::Refused;
    // Abandon the parked queries: the primary's answers are lost with the connection.
    sim.in_flight.clear();
    sim.primary.parked.clear();
    for kind in Kind::ALL {
        sim.fetches.insert(kind, 0);
    }
    // The parked fetches die at their deadline; afterwards every retry is refused at once.
    let config = Config::default();
    sim.advance(config.wait + config.grace);
    for kind in Kind::ALL {
        sim.fetches.insert(kind, 0);
    }
    for i in 0..60 {
        sim.write(Kind::ConfigEntries, &format!("c{i}"), Some(json!(i)));
        sim.advance(Duration::from_secs(1));
    }
    for (kind, attempts) in &sim.fetches {
        // 250 ms doubling to 8 s over 60 s: 6 growing attempts then one every 8 s, about 13.
        assert!(
            (8..=16).contains(attempts),
            "{kind:?}: {attempts} attempts in 60 s"
        );
        assert_eq!(
            sim.machine.status(*kind).map(|s| s.health),
            Some(Health::Failing)
        );
    }
    sim.partition = Partition::Healed;
    sim.advance(config.backoff_max + Duration::from_millis(50));
    assert!(
        sim.in_sync(),
        "not converged within one back-off of healing"
    );
    // Every stream reports (an empty list would pass the loop below vacuously), healthy and
    // with the outage's error cleared.
    assert_eq!(sim.machine.statuses().count(), Kind::ALL.len());
    for (kind, status) in sim.machine.statuses() {
        assert_eq!(
            (status.health, status.failures, status.last_error.as_deref()),
            (Health::Healthy, 0, None),
            "{kind:?}: {status:?}"
        );
    }
}

#[test]
fn a_black_hole_is_detected_by_deadlines_and_heals() {
    let mut sim = Sim::new(5, (2, 5), 0);
    sim.advance(Duration::from_secs(1));
    sim.partition = Partition::Silent;
    // The replication-lag gauge is the time since the last successful answer; a lost or
    // timed-out fetch must never count as one, so the lag grows for as long as the hole lasts.
    let lag = |sim: &Sim| {
        sim.machine
            .status(Kind::AclPolicies)
            .and_then(|s| s.last_success)
            .map(|at| sim.now - at)
    };
    let mut lags = Vec::new();
    for i in 0..30 {
        sim.write(Kind::AclPolicies, &format!("p{i}"), Some(json!(i)));
        sim.advance(Duration::from_secs(6));
        lags.push(lag(&sim).expect("a success before the black hole"));
    }
    assert!(
        lags.windows(2).all(|pair| pair[1] > pair[0]),
        "the lag grows during the black hole: {lags:?}"
    );
    assert!(lags[29] >= Duration::from_secs(6 * 29), "{lags:?}");
    assert!(!sim.in_sync());
    assert_eq!(
        sim.machine.status(Kind::AclPolicies).map(|s| s.health),
        Some(Health::Failing)
    );
    sim.partition = Partition::Healed;
    sim.advance(worst_case_recovery());
    assert!(sim.in_sync());
    let healed = lag(&sim).expect("a success after healing");
    assert!(healed <= worst_case_recovery(), "{healed:?}");
}

#[test]
fn apply_failures_are_retried() {
    let mut sim = Sim::new(11, (1, 3), 0);
    sim.fail_next_applies = 4;
    sim.write(Kind::Intentions, "a", Some(json!(1)));
    sim.advance(Duration::from_secs(10));
    assert!(sim.in_sync());
    // A success clears what the failures left: logs and metrics stop reporting the old error.
    let status = sim.machine.status(Kind::Intentions).expect("status");
    assert_eq!(
        (status.health, status.failures, status.last_error.as_deref()),
        (Health::Healthy, 0, None),
        "{status:?}"
    );
}

#[test]
fn a_rebuilt_primary_with_a_lower_index_is_resynced() {
    let mut sim = Sim::new(9, (1, 10), 0);
    for i in 0..50 {
        sim.write(Kind::Intentions, &format!("old{i}"), Some(json!(i)));
    }
    sim.advance(Duration::from_secs(1));
    assert!(sim.in_sync());
    let before = sim.machine.status(Kind::Intentions).map(|s| s.index);
    // The primary loses its data and starts again; answers to the old parked queries are lost.
    sim.primary = Primary::default();
    sim.in_flight.clear();
    sim.write(Kind::Intentions, "new", Some(json!("fresh")));
    // The old blocking queries died with the old primary; they time out and retry.
    sim.advance(worst_case_recovery());
    assert!(sim.in_sync(), "stale rows survived the resync");
    assert_eq!(sim.local[&Kind::Intentions].len(), 1);
    let status = sim.machine.status(Kind::Intentions).expect("status");
    assert!(status.index < before.unwrap_or(0));
    assert_eq!(status.resets, 1);
}
