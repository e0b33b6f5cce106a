//! The replication protocol as a sans-IO state machine.
//!
//! One stream per [`Kind`] runs Consul's loop (spec §4.5): a blocking query against the
//! primary with the last applied index, apply the answer, ask again; on an error wait
//! `base · 2^(n-1)` (capped) before retrying; if the primary's index went backwards (its state
//! was rebuilt), the full snapshot that came with it is applied as a resync. Every fetch has a
//! deadline (`wait` plus a grace period), so a lost request or answer never stalls a stream.
//! The first fetch, and the first after any error, does not block (index 0), so recovery is
//! confirmed and the copy resynced as soon as the primary answers.
//!
//! The shell calls [`Replicator::poll`] whenever [`Replicator::next_wakeup`] passes, performs the
//! returned [`Action`]s and reports back with [`Replicator::on_fetched`] and
//! [`Replicator::on_applied`]. Nothing here reads a clock: `now` is always an argument, which
//! is what lets `sim.rs` run two datacenters over a simulated, lossy link deterministically.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mesh_model::blocking::{went_backwards, Backoff};

use super::Kind;

/// Timing of the protocol.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long the primary may hold a blocking query (`?wait=`).
    pub wait: Duration,
    /// How long past `wait` an answer may take before the fetch counts as lost.
    pub grace: Duration,
    /// The first back-off after an error; it doubles with every further error.
    pub backoff_base: Duration,
    /// The longest back-off.
    pub backoff_max: Duration,
}

impl Default for Config {
    /// A minute of blocking (short enough that a silently dead connection is noticed quickly,
    /// long enough to cost nothing when idle); back-off from 250 ms doubling to 8 s, so a
    /// restarted primary is picked up within seconds rather than Consul's minutes.
    fn default() -> Config {
        Config {
            wait: Duration::from_secs(60),
            grace: Duration::from_secs(15),
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(8),
        }
    }
}

/// Identifies one fetch, so a late answer to an abandoned fetch is recognised and dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// What the shell must do.
#[derive(Debug, PartialEq)]
pub enum Action<P> {
    /// Run a blocking query against the primary and report with [`Replicator::on_fetched`].
    Fetch {
        /// Echo this back.
        id: RequestId,
        /// Which stream.
        kind: Kind,
        /// `?index=` (0: answer at once).
        index: u64,
        /// `?wait=`.
        wait: Duration,
    },
    /// Make the local copy equal `payload` and report with [`Replicator::on_applied`].
    Apply {
        /// Which stream.
        kind: Kind,
        /// The primary's index of this snapshot.
        index: u64,
        /// The snapshot, opaque to the state machine.
        payload: P,
        /// The primary's index went backwards: this is a full resync.
        reset: bool,
    },
}

/// How one stream is doing (for metrics and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// No snapshot applied yet and no error either.
    Starting,
    /// The last fetch and apply succeeded.
    Healthy,
    /// The last fetch or apply failed; retrying after a back-off.
    Failing,
}

/// The observable state of one stream.
#[derive(Clone, Debug)]
pub struct StreamStatus {
    /// See [`Health`].
    pub health: Health,
    /// The primary's index of the last applied snapshot (0: none yet).
    pub index: u64,
    /// When the last snapshot was applied.
    pub last_success: Option<Instant>,
    /// Consecutive failures.
    pub failures: u32,
    /// How often the primary's index went backwards.
    pub resets: u64,
    /// The last error, for logs.
    pub last_error: Option<String>,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Waiting { until: Instant },
    Fetching { id: RequestId, deadline: Instant },
    Applying { index: u64 },
}

#[derive(Debug)]
struct Stream {
    phase: Phase,
    applied: Option<u64>,
    /// After an error the next fetch does not block (index 0): the first answer from a
    /// reachable primary then confirms health and resyncs at once instead of up to `wait` later.
    resync: bool,
    status: StreamStatus,
}

/// The replication state machine of one secondary datacenter.
#[derive(Debug)]
pub struct Replicator {
    config: Config,
    streams: BTreeMap<Kind, Stream>,
    next_id: u64,
}

impl Replicator {
    /// Streams for `kinds`, each due to fetch at `now`.
    pub fn new(kinds: &[Kind], config: Config, now: Instant) -> Replicator {
        let streams = kinds
            .iter()
            .map(|kind| {
                let stream = Stream {
                    phase: Phase::Waiting { until: now },
                    applied: None,
                    resync: true,
                    status: StreamStatus {
                        health: Health::Starting,
                        index: 0,
                        last_success: None,
                        failures: 0,
                        resets: 0,
                        last_error: None,
                    },
                };
                (*kind, stream)
            })
            .collect();
        Replicator {
            config,
            streams,
            next_id: 0,
        }
    }

    /// Starts the fetches that are due and abandons those past their deadline.
    pub fn poll<P>(&mut self, now: Instant) -> Vec<Action<P>> {
        let mut actions = Vec::new();
        for (kind, stream) in &mut self.streams {
            if let Phase::Fetching { deadline, .. } = stream.phase {
                if now >= deadline {
                    fail(
                        &self.config,
                        stream,
                        now,
                        "no answer before the deadline".into(),
                    );
                }
            }
            if let Phase::Waiting { until } = stream.phase {
                if now >= until {
                    self.next_id += 1;
                    let id = RequestId(self.next_id);
                    let index = if stream.resync {
                        0
                    } else {
                        stream.applied.unwrap_or(0)
                    };
                    // A query with index 0 is answered at once, so it gets only the grace
                    // period: a lost resync is retried in seconds, not after a whole `wait`.
                    let held = if index == 0 {
                        Duration::ZERO
                    } else {
                        self.config.wait
                    };
                    stream.phase = Phase::Fetching {
                        id,
                        deadline: now + held + self.config.grace,
                    };
                    actions.push(Action::Fetch {
                        id,
                        kind: *kind,
                        index,
                        wait: self.config.wait,
                    });
                }
            }
        }
        actions
    }

    /// The answer to fetch `id`: `(primary index, snapshot)` or an error. Returns the apply to
    /// perform, or nothing if the fetch failed or was already abandoned.
    pub fn on_fetched<P>(
        &mut self,
        now: Instant,
        id: RequestId,
        result: Result<(u64, P), String>,
    ) -> Option<Action<P>> {
        let (kind, stream) = self.streams.iter_mut().find(
            |(_, s)| matches!(s.phase, Phase::Fetching { id: current, .. } if current == id),
        )?;
        match result {
            Err(error) => {
                fail(&self.config, stream, now, error);
                None
            }
            Ok((index, payload)) => {
                // Spec §4.5: "reset index to 0 if it goes backwards". The answer is a full
                // snapshot, so applying it *is* the resync; the flag is for logs and metrics.
                let reset = stream
                    .applied
                    .is_some_and(|applied| went_backwards(applied, index));
                if reset {
                    stream.status.resets += 1;
                }
                stream.phase = Phase::Applying { index };
                // Applying an unchanged snapshot is a no-op (see `snapshot::plan`), so even a
                // wait that ran out is applied: it also heals a primary rebuilt at the same index.
                Some(Action::Apply {
                    kind: *kind,
                    index,
                    payload,
                    reset,
                })
            }
        }
    }

    /// The outcome of an [`Action::Apply`].
    pub fn on_applied(&mut self, now: Instant, kind: Kind, result: Result<(), String>) {
        let Some(stream) = self.streams.get_mut(&kind) else {
            return;
        };
        let Phase::Applying { index, .. } = stream.phase else {
            return;
        };
        match result {
            Ok(()) => {
                stream.applied = Some(index);
                stream.resync = false;
                stream.status = StreamStatus {
                    health: Health::Healthy,
                    index,
                    last_success: Some(now),
                    failures: 0,
                    last_error: None,
                    ..stream.status.clone()
                };
                stream.phase = Phase::Waiting { until: now };
            }
            Err(error) => fail(&self.config, stream, now, error),
        }
    }

    /// When [`Replicator::poll`] has something to do next (`None`: everything is applying).
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.streams
            .values()
            .filter_map(|s| match s.phase {
                Phase::Waiting { until } => Some(until),
                Phase::Fetching { deadline, .. } => Some(deadline),
                Phase::Applying { .. } => None,
            })
            .min()
    }

    /// The status of every stream.
    pub fn statuses(&self) -> impl Iterator<Item = (Kind, &StreamStatus)> {
        self.streams.iter().map(|(k, s)| (*k, &s.status))
    }

    /// The status of one stream.
    pub fn status(&self, kind: Kind) -> Option<&StreamStatus> {
        self.streams.get(&kind).map(|s| &s.status)
    }
}

fn fail(config: &Config, stream: &mut Stream, now: Instant, error: String) {
    stream.resync = true;
    stream.status.failures = stream.status.failures.saturating_add(1);
    stream.status.health = Health::Failing;
    stream.status.last_error = Some(error);
    let delay = Backoff {
        base: config.backoff_base,
        max: config.backoff_max,
    }
    .delay(stream.status.failures);
    stream.phase = Phase::Waiting { until: now + delay };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetch_id(actions: &[Action<u32>]) -> RequestId {
        match actions {
            [Action::Fetch { id, .. }] => *id,
            other => panic!("expected one fetch, got {other:?}"),
        }
    }

    #[test]
    fn backs_off_exponentially_and_ignores_late_answers() {
        let start = Instant::now();
        let config = Config::default();
        let mut machine = Replicator::new(&[Kind::Intentions], config.clone(), start);
        let first = fetch_id(&machine.poll::<u32>(start));
        assert!(machine
            .on_fetched::<u32>(start, first, Err("refused".into()))
            .is_none());
        // Nothing before the back-off ends, then a retry.
        assert!(machine
            .poll::<u32>(start + config.backoff_base / 2)
            .is_empty());
        let second = fetch_id(&machine.poll::<u32>(start + config.backoff_base));
        let t = start + config.backoff_base;
        machine.on_fetched::<u32>(t, second, Err("refused".into()));
        assert_eq!(machine.next_wakeup(), Some(t + config.backoff_base * 2));
        // A late answer to the first fetch is dropped.
        assert!(machine.on_fetched(t, first, Ok((5, 1u32))).is_none());
        // Success resets the failure count and records the index.
        let t = t + config.backoff_base * 2;
        let third = fetch_id(&machine.poll::<u32>(t));
        let apply = machine.on_fetched(t, third, Ok((5, 7u32)));
        assert_eq!(
            apply,
            Some(Action::Apply {
                kind: Kind::Intentions,
                index: 5,
                payload: 7,
                reset: false
            })
        );
        machine.on_applied(t, Kind::Intentions, Ok(()));
        let status = machine.status(Kind::Intentions).expect("status");
        assert_eq!(
            (status.health, status.index, status.failures),
            (Health::Healthy, 5, 0)
        );
        // The next fetch blocks on that index; an index going backwards is a reset.
        let actions = machine.poll::<u32>(t);
        assert!(matches!(actions[..], [Action::Fetch { index: 5, .. }]));
        let fourth = fetch_id(&actions);
        assert!(matches!(
            machine.on_fetched(t, fourth, Ok((2, 0u32))),
            Some(Action::Apply { reset: true, .. })
        ));
        machine.on_applied(t, Kind::Intentions, Ok(()));
        assert_eq!(
            machine
                .status(Kind::Intentions)
                .map(|s| (s.index, s.resets)),
            Some((2, 1))
        );
    }

    #[test]
    fn a_fetch_without_answer_is_abandoned_at_its_deadline() {
        let start = Instant::now();
        let config = Config::default();
        let mut machine = Replicator::new(&[Kind::AclTokens], config.clone(), start);
        let lost = fetch_id(&machine.poll::<u32>(start));
        // The first fetch does not block, so only the grace period applies.
        let deadline = start + config.grace;
        assert_eq!(machine.next_wakeup(), Some(deadline));
        assert!(machine.poll::<u32>(deadline).is_empty(), "backs off first");
        let retry = fetch_id(&machine.poll::<u32>(deadline + config.backoff_base));
        assert_ne!(lost, retry);
        assert_eq!(
            machine.status(Kind::AclTokens).map(|s| s.health),
            Some(Health::Failing)
        );
    }
}
