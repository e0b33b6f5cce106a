//! Consul's blocking-query rules, as plain functions: which index to send next, when an
//! answer means the server's state was rebuilt, and how long to back off after failures.
//!
//! Every follower of a blocking query uses these: `gateway mesh` and the sidecar (through
//! `mesh-client`) and controlplane-lite's replication machine, so "index went backwards"
//! means the same thing everywhere.
//!
//! Consul's blocking-query documentation asks clients to: use the `X-Consul-Index` of each
//! answer as the next `?index=`; reset to 0 when the index goes backwards (a restored or
//! replaced server), which makes the next query answer at once with the full state; never
//! treat an index below 1 as "seen" (an answer of 0 is sent as 1, since `?index=0` does not
//! block); and back off between failed requests.

use std::time::Duration;

/// The `?index=` to send after an answer. `previous` is the index the query was sent with (0
/// for none); `answered` is the answer's `X-Consul-Index`, `None` if it had none.
///
/// The answered index is used as is, except that it is reset to 0 when it went backwards or
/// is missing (so the next query does not block and reads the state afresh), and raised to 1
/// when the server answered 0 (so the next query blocks).
pub fn next_index(previous: u64, answered: Option<u64>) -> u64 {
    match answered {
        Some(index) if went_backwards(previous, index) => 0,
        Some(index) => index.max(1),
        None => 0,
    }
}

/// Whether an answer at `answered` means the server's state is older than what the follower
/// last saw at `previous`: the server was restored or replaced, and the follower must take the
/// answer as a full resync rather than a change.
pub fn went_backwards(previous: u64, answered: u64) -> bool {
    answered < previous
}

/// Exponential back-off between failed requests: `base` after the first failure, doubling
/// with each further consecutive failure, never more than `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay after `failures` consecutive failures (0 and 1 both give `base`).
    pub fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(16);
        self.base.saturating_mul(1 << exponent).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answered_index_is_sent_next() {
        assert_eq!(next_index(0, Some(7)), 7);
        assert_eq!(next_index(7, Some(7)), 7);
        assert_eq!(next_index(7, Some(9)), 9);
    }

    #[test]
    fn an_index_going_backwards_resets_to_zero() {
        assert!(went_backwards(9, 3));
        assert!(!went_backwards(3, 3));
        assert_eq!(next_index(9, Some(3)), 0);
    }

    #[test]
    fn never_below_one_and_zero_without_an_index() {
        assert_eq!(next_index(0, Some(0)), 1);
        assert_eq!(next_index(5, None), 0);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let backoff = Backoff {
            base: Duration::from_millis(250),
            max: Duration::from_secs(8),
        };
        assert_eq!(backoff.delay(0), Duration::from_millis(250));
        assert_eq!(backoff.delay(1), Duration::from_millis(250));
        assert_eq!(backoff.delay(2), Duration::from_millis(500));
        assert_eq!(backoff.delay(4), Duration::from_secs(2));
        assert_eq!(backoff.delay(6), Duration::from_secs(8));
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(8));
    }
}
