//! Which control-plane address to ask next (sans-IO): the one failover policy of every client
//! of controlplane-lite (`gateway mesh`, the sidecar, the CLIs).
//!
//! The client keeps asking the address that answered last. When a request there fails in a
//! way that says "this agent is gone" (connect error, TLS failure, timeout, hang-up, 5xx; a
//! 4xx is the agent's considered answer and is not a reason to move), that address backs off
//! (250 ms doubling to 30 s, per address) and the next address in the list that is not backing
//! off is tried. When every address is backing off, the one whose back-off ends first is tried,
//! so a request is never refused without asking anyone.
//!
//! Time is an argument (`now`), so the policy is tested without sleeping.

use std::time::{Duration, Instant};

use mesh_model::blocking::Backoff;

/// The back-off of one address after consecutive failures: 250 ms doubling to 30 s (the
/// same shape as the watch's back-off between failed rounds).
pub const ADDRESS_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(250),
    max: Duration::from_secs(30),
};

/// Why a request moved off an address: the label of `gateway_control_plane_failovers_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailoverReason {
    /// The TCP connect failed (nobody listens, or the host is unreachable).
    Connect,
    /// The TLS handshake failed (wrong CA, wrong name, refused client certificate).
    Tls,
    /// No complete answer before the deadline.
    Timeout,
    /// The connection closed before a complete answer (the agent died mid-request).
    HungUp,
    /// The agent answered 5xx.
    ServerError,
}

impl FailoverReason {
    /// Every reason, in the order metrics list them.
    pub const ALL: [FailoverReason; 5] = [
        FailoverReason::Connect,
        FailoverReason::Tls,
        FailoverReason::Timeout,
        FailoverReason::HungUp,
        FailoverReason::ServerError,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            FailoverReason::Connect => "connect",
            FailoverReason::Tls => "tls",
            FailoverReason::Timeout => "timeout",
            FailoverReason::HungUp => "hung_up",
            FailoverReason::ServerError => "server_error",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct AddressState {
    /// Consecutive failures of this address.
    failures: u32,
    /// Not to be asked before this (unless every address is backing off).
    retry_at: Option<Instant>,
}

impl AddressState {
    fn available(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| at <= now)
    }
}

/// The failover state over a fixed list of addresses, named by their position.
#[derive(Clone, Debug)]
pub struct Failover {
    addresses: Vec<AddressState>,
    /// The address that answered last (the first one at start).
    current: usize,
}

impl Failover {
    /// A policy over `count` addresses (at least one is assumed; 0 behaves as 1).
    pub fn new(count: usize) -> Failover {
        Failover {
            addresses: vec![AddressState::default(); count.max(1)],
            current: 0,
        }
    }

    /// The address that answered last.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The address to ask now: the current one unless it is backing off, else the next one
    /// in list order that is not, else the one whose back-off ends first.
    pub fn next_attempt(&self, now: Instant) -> usize {
        let count = self.addresses.len();
        let rotation = (0..count).map(|offset| (self.current + offset) % count);
        if let Some(index) = rotation
            .clone()
            .find(|&index| self.addresses[index].available(now))
        {
            return index;
        }
        rotation
            .min_by_key(|&index| self.addresses[index].retry_at)
            .unwrap_or(self.current)
    }

    /// The address `index` answered (any status but 5xx): it becomes the current one and its
    /// back-off ends. Returns whether the current address changed.
    pub fn succeeded(&mut self, index: usize) -> bool {
        let Some(state) = self.addresses.get_mut(index) else {
            return false;
        };
        *state = AddressState::default();
        let moved = self.current != index;
        self.current = index;
        moved
    }

    /// A request to `index` failed with a failover reason: it backs off, longer with each
    /// consecutive failure.
    pub fn failed(&mut self, index: usize, now: Instant) {
        let Some(state) = self.addresses.get_mut(index) else {
            return;
        };
        state.failures = state.failures.saturating_add(1);
        state.retry_at = Some(now + ADDRESS_BACKOFF.delay(state.failures));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_on_the_address_that_answers() {
        let mut policy = Failover::new(3);
        let now = Instant::now();
        assert_eq!(policy.next_attempt(now), 0);
        assert!(!policy.succeeded(0));
        assert_eq!(policy.next_attempt(now), 0);
    }

    #[test]
    fn a_failure_moves_to_the_next_address_in_order_and_wraps_around() {
        let mut policy = Failover::new(3);
        let now = Instant::now();
        policy.failed(0, now);
        assert_eq!(policy.next_attempt(now), 1);
        assert!(policy.succeeded(1), "the current address changed");
        assert_eq!(policy.current(), 1);
        policy.failed(1, now);
        assert_eq!(policy.next_attempt(now), 2);
        policy.failed(2, now);
        // All three back off until now + 250 ms: the rotation from the current address (1)
        // breaks the tie.
        assert_eq!(policy.next_attempt(now), 1);
        // Once 0's back-off is over it is asked again (after 2 wraps to 0).
        let later = now + ADDRESS_BACKOFF.base;
        policy.succeeded(2);
        policy.failed(2, later);
        assert_eq!(policy.next_attempt(later), 0);
    }

    #[test]
    fn backoff_is_per_address_and_grows_with_its_consecutive_failures() {
        let mut policy = Failover::new(2);
        let start = Instant::now();
        policy.failed(0, start);
        policy.failed(0, start);
        // Address 0 failed twice (500 ms), address 1 once (250 ms): 1 is asked first.
        policy.failed(1, start);
        assert_eq!(policy.next_attempt(start), 1);
        assert_eq!(
            policy.next_attempt(start + Duration::from_millis(300)),
            1,
            "1's back-off is over, 0's is not"
        );
        // A success clears that address's back-off only.
        policy.succeeded(1);
        policy.failed(1, start + Duration::from_millis(300));
        assert_eq!(
            policy.next_attempt(start + Duration::from_millis(500)),
            0,
            "0's back-off (500 ms) is over; 1 backs off again until 550 ms"
        );
    }

    #[test]
    fn a_single_address_is_always_asked() {
        let mut policy = Failover::new(1);
        let now = Instant::now();
        for _ in 0..5 {
            policy.failed(0, now);
            assert_eq!(policy.next_attempt(now), 0);
        }
        let mut empty = Failover::new(0);
        assert_eq!(empty.next_attempt(now), 0);
        empty.failed(7, now);
        assert!(!empty.succeeded(7), "an unknown index is ignored");
    }
}
