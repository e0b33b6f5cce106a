//! Endpoint choice for one worker: round robin over a cluster's endpoints and passive health
//! (endpoints that failed to connect are held out of round robin for a while). One owner for
//! both, used by both engines: the readiness engine's connections ask it directly, the
//! completion engine's state machines through `machine::Balance`.
//!
//! Plain values, no sockets and no clock: the caller passes `now`. Each worker owns one
//! [`Balancer`] (in its `WorkerContext`) and one [`WorkerSnapshot`] per route snapshot, so
//! nothing here is shared between workers.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::metrics::WorkerStats;
use crate::snapshot::Snapshot;

/// The snapshot a connection works with, plus this worker's round-robin cursors for it.
pub struct WorkerSnapshot {
    pub snapshot: Arc<Snapshot>,
    cursors: Vec<Cell<usize>>,
}

impl WorkerSnapshot {
    pub(crate) fn new(snapshot: Arc<Snapshot>) -> WorkerSnapshot {
        let cursors = (0..snapshot.table.clusters().len())
            .map(|_| Cell::new(0))
            .collect();
        WorkerSnapshot { snapshot, cursors }
    }
}

/// One worker's passive health: which endpoints it holds out, and what it last published.
#[derive(Default)]
pub struct Balancer {
    /// Endpoints that failed to connect, held out of round robin until the instant given.
    /// Keyed by address so that it survives snapshot changes.
    held_out: RefCell<HashMap<SocketAddr, Instant>>,
    /// The snapshot generation for which "no endpoint held out" was last published.
    health_clean_generation: Cell<Option<u64>>,
}

impl Balancer {
    pub fn new() -> Balancer {
        Balancer::default()
    }

    /// Endpoint indices to try, in order: healthy ones round robin from this worker's cursor,
    /// then held-out ones (used only when none of the healthy ones answered).
    pub fn endpoint_order(
        &self,
        snapshot: &WorkerSnapshot,
        cluster: usize,
        now: Instant,
    ) -> EndpointOrder {
        let endpoints = &snapshot.snapshot.table.cluster(cluster).endpoints;
        let cursor = &snapshot.cursors[cluster];
        let start = cursor.get();
        cursor.set(start.wrapping_add(1));
        let mut held_out = self.held_out.borrow_mut();
        if !held_out.is_empty() {
            held_out.retain(|_, until| *until > now);
        }
        EndpointOrder::new(endpoints, start, |address| held_out.contains_key(address))
    }

    pub fn hold_out(&self, address: SocketAddr, until: Instant) {
        self.held_out.borrow_mut().insert(address, until);
    }

    pub fn mark_healthy(&self, address: SocketAddr) {
        let mut held_out = self.held_out.borrow_mut();
        if !held_out.is_empty() {
            held_out.remove(&address);
        }
    }

    /// Publish which endpoints this worker holds out, as one bit mask per destination slot of
    /// `snapshot`, into `stats` (for `gateway_cluster_endpoints`). Costs nothing while no
    /// endpoint is held out.
    pub fn publish_health(&self, snapshot: &Snapshot, stats: &WorkerStats, now: Instant) {
        let mut held_out = self.held_out.borrow_mut();
        held_out.retain(|_, until| *until > now);
        if held_out.is_empty() && self.health_clean_generation.get() == Some(snapshot.generation) {
            return;
        }
        for (slot, endpoints) in &snapshot.endpoints_by_slot {
            let mut mask = 0u64;
            for (index, address) in endpoints.iter().enumerate().take(64) {
                if held_out.contains_key(address) {
                    mask |= 1 << index;
                }
            }
            stats.destinations[*slot]
                .endpoints_held_out
                .store(mask, Ordering::Relaxed);
        }
        stats
            .health_generation
            .store(snapshot.generation, Ordering::Relaxed);
        self.health_clean_generation
            .set(held_out.is_empty().then_some(snapshot.generation));
    }
}

/// Iterates endpoint indices without allocating: two passes over the ring starting at the
/// round-robin cursor, the first over endpoints healthy when the connection started, the
/// second over the held-out ones. Only the first 64 endpoints of a cluster can be held out.
pub struct EndpointOrder {
    count: usize,
    start: usize,
    held_mask: u64,
    step: usize,
}

impl EndpointOrder {
    /// The order over `endpoints` from round-robin position `start`, `held` saying which
    /// endpoints are held out.
    pub fn new(
        endpoints: &[SocketAddr],
        start: usize,
        held: impl Fn(&SocketAddr) -> bool,
    ) -> EndpointOrder {
        let mut held_mask = 0u64;
        for (index, address) in endpoints.iter().enumerate().take(64) {
            if held(address) {
                held_mask |= 1 << index;
            }
        }
        EndpointOrder {
            count: endpoints.len(),
            start: start % endpoints.len().max(1),
            held_mask,
            step: 0,
        }
    }

    /// The next endpoint index to try, if any is left.
    pub fn next_index(&mut self) -> Option<usize> {
        while self.step < 2 * self.count {
            let second_pass = self.step >= self.count;
            let index = (self.start + self.step) % self.count;
            self.step += 1;
            let held = index < 64 && self.held_mask & (1 << index) != 0;
            if held == second_pass {
                return Some(index);
            }
        }
        None
    }

    /// Every endpoint was held out when the connection started (Envoy's UH, "no healthy
    /// upstream", as opposed to UF, "upstream connect failure").
    pub fn none_healthy(&self) -> bool {
        let tracked = self.count.min(64);
        self.count <= 64 && tracked > 0 && self.held_mask.count_ones() as usize == tracked
    }

    pub fn iter(mut self) -> impl Iterator<Item = usize> {
        std::iter::from_fn(move || self.next_index())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{Limits, Timeouts};
    use crate::metrics::Metrics;
    use crate::routes::{Pattern, RouteSpec, RouteTable};

    fn order(count: usize, start: usize, held_mask: u64) -> Vec<usize> {
        EndpointOrder {
            count,
            start,
            held_mask,
            step: 0,
        }
        .iter()
        .collect()
    }

    #[test]
    fn endpoint_order_puts_held_out_endpoints_last() {
        assert_eq!(order(3, 0, 0), vec![0, 1, 2]);
        assert_eq!(order(3, 1, 0), vec![1, 2, 0]);
        assert_eq!(order(3, 0, 0b010), vec![0, 2, 1]);
        assert_eq!(order(3, 2, 0b111), vec![2, 0, 1]);
        assert_eq!(order(0, 0, 0), Vec::<usize>::new());
    }

    #[test]
    fn none_healthy_only_when_every_endpoint_is_held_out() {
        let order = |count, held_mask| EndpointOrder {
            count,
            start: 0,
            held_mask,
            step: 0,
        };
        assert!(order(3, 0b111).none_healthy());
        assert!(!order(3, 0b011).none_healthy());
        assert!(!order(0, 0).none_healthy());
    }

    fn endpoint(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// One cluster with `endpoints`, in destination slot 3, at `generation`.
    fn snapshot(endpoints: Vec<SocketAddr>, generation: u64) -> Arc<Snapshot> {
        let table = RouteTable::build(
            vec![RouteSpec {
                pattern: Pattern::parse("service.example.test").expect("a valid pattern"),
                endpoints: endpoints.clone(),
            }],
            None,
        )
        .expect("a valid table");
        Arc::new(Snapshot {
            generation,
            table,
            slots: vec![3],
            endpoints_by_slot: vec![(3, endpoints)],
            timeouts: Timeouts {
                client_hello: Duration::from_secs(5),
                connect: Duration::from_secs(2),
                idle: Duration::from_secs(60),
                write_stall: Duration::from_secs(10),
            },
            limits: Limits {
                max_connections: None,
                client_hello_max_bytes: 16 * 1024,
                endpoint_backoff: Duration::from_secs(30),
            },
        })
    }

    #[test]
    fn round_robin_advances_per_connection_and_skips_held_out_endpoints_until_they_expire() {
        let endpoints = vec![endpoint(1), endpoint(2), endpoint(3)];
        let current = WorkerSnapshot::new(snapshot(endpoints.clone(), 1));
        let balancer = Balancer::new();
        let now = Instant::now();
        let first = |now| balancer.endpoint_order(&current, 0, now).next_index();
        assert_eq!(first(now), Some(0));
        assert_eq!(first(now), Some(1));
        assert_eq!(first(now), Some(2));

        // Endpoint 0 failed: held out for a second, so the cursor's turn goes to the next one,
        // and it is tried last.
        balancer.hold_out(endpoints[0], now + Duration::from_secs(1));
        let order: Vec<usize> = balancer.endpoint_order(&current, 0, now).iter().collect();
        assert_eq!(order, vec![1, 2, 0]);
        // Once its time is up it is back in round robin.
        let later = now + Duration::from_secs(2);
        let order: Vec<usize> = balancer.endpoint_order(&current, 0, later).iter().collect();
        assert_eq!(order, vec![1, 2, 0]);
        assert!(balancer.held_out.borrow().is_empty());

        // A successful connect takes an endpoint back at once.
        balancer.hold_out(endpoints[2], later + Duration::from_secs(30));
        balancer.mark_healthy(endpoints[2]);
        let order: Vec<usize> = balancer.endpoint_order(&current, 0, later).iter().collect();
        assert_eq!(order, vec![2, 0, 1]);

        // Every endpoint held out: all are still tried, and the order says none was healthy.
        for address in &endpoints {
            balancer.hold_out(*address, later + Duration::from_secs(30));
        }
        let order = balancer.endpoint_order(&current, 0, later);
        assert!(order.none_healthy());
        assert_eq!(order.iter().count(), 3);
    }

    #[test]
    fn health_is_published_per_slot_and_cleared_once_per_generation() {
        let endpoints = vec![endpoint(1), endpoint(2), endpoint(3)];
        let metrics = Metrics::new(1, "test");
        let stats = &metrics.workers[0];
        let held = || {
            stats.destinations[3]
                .endpoints_held_out
                .load(Ordering::Relaxed)
        };
        let generation = || stats.health_generation.load(Ordering::Relaxed);
        let balancer = Balancer::new();
        let now = Instant::now();

        balancer.hold_out(endpoints[1], now + Duration::from_secs(1));
        balancer.publish_health(&snapshot(endpoints.clone(), 4), stats, now);
        assert_eq!((held(), generation()), (0b010, 4));

        // Expired: the clean state is published once for the generation...
        let later = now + Duration::from_secs(2);
        balancer.publish_health(&snapshot(endpoints.clone(), 4), stats, later);
        assert_eq!((held(), generation()), (0, 4));
        // ... and not written again while nothing changes (a stray value stays untouched).
        stats.destinations[3]
            .endpoints_held_out
            .store(0b100, Ordering::Relaxed);
        balancer.publish_health(&snapshot(endpoints.clone(), 4), stats, later);
        assert_eq!(held(), 0b100);
        // A new generation is published even with nothing held out.
        balancer.publish_health(&snapshot(endpoints, 5), stats, later);
        assert_eq!((held(), generation()), (0, 5));
    }
}
