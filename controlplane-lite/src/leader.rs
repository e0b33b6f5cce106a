//! Leader election among the agents of one datacenter that share an etcd cluster.
//!
//! Some duties must run once per datacenter however many agents serve it: replication from the
//! primary, signing and renewing this datacenter's intermediate CA, publishing its federation
//! state, and running health checks (two agents probing and writing the same check would make
//! it flap). Only the leader runs them.
//!
//! Each agent holds one etcd lease, renewed every third of its TTL. It registers itself under
//! `<prefix>/agents/<node>` with that lease (what `/v1/status/peers` lists), and campaigns for
//! `<prefix>/leader` with a transaction that creates the key, bound to the lease, only if it
//! does not exist (`create_revision == 0`). etcd deletes both keys when the lease expires, so a
//! dead agent leaves the election within one TTL and a follower, which campaigns every tenth
//! of the TTL, takes over at most a tenth of a TTL after that.
//!
//! The leader's own view is conservative: it counts its lease as valid only until the time it
//! *sent* its last successful renewal plus the TTL, less a safety margin. etcd starts the TTL
//! when it *receives* the renewal, which is later, so the agent stops its duties before etcd
//! can hand the key to anyone else. A partitioned leader therefore steps down on its own clock.
//!
//! [`Election`] is the decision logic, sans IO: it takes the time and the outcome of each etcd
//! call and says what to do next. [`run`] is the thin tokio shell that talks to etcd and
//! publishes the verdict on a watch channel.

use std::time::{Duration, Instant};

/// The fraction of the TTL kept as a safety margin before the leader's lease ends (1/5).
const MARGIN_DIVISOR: u32 = 5;
/// A lease is renewed this many times per TTL.
const RENEWALS_PER_TTL: u32 = 3;
/// A follower campaigns this many times per TTL.
const CAMPAIGNS_PER_TTL: u32 = 10;
/// How long to wait before retrying after an etcd error.
const RETRY: Duration = Duration::from_millis(200);

/// The lease this agent holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lease {
    id: i64,
    ttl: Duration,
    /// When the request that last granted or renewed it was sent.
    renewed_at: Instant,
}

/// What the shell should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Grant a new lease with this TTL, then register this agent under it.
    Grant(Duration),
    /// Renew the lease.
    KeepAlive(i64),
    /// Try to take (or confirm holding) the leader key with this lease.
    Campaign(i64),
    /// Nothing to do before this instant.
    Wait(Instant),
}

/// The decision logic of one agent's election.
#[derive(Debug)]
pub struct Election {
    ttl: Duration,
    lease: Option<Lease>,
    /// Whether the last campaign found the leader key held by our lease.
    holds_key: bool,
    next_keepalive: Instant,
    next_campaign: Instant,
    /// After an error, no call before this.
    backoff_until: Option<Instant>,
}

impl Election {
    /// A new election asking for leases of `ttl`.
    pub fn new(ttl: Duration, now: Instant) -> Election {
        Election {
            ttl,
            lease: None,
            holds_key: false,
            next_keepalive: now,
            next_campaign: now,
            backoff_until: None,
        }
    }

    /// The margin before the lease's end at which the leader stops counting on it.
    fn margin(ttl: Duration) -> Duration {
        ttl / MARGIN_DIVISOR
    }

    /// Until when our lease is surely still alive in etcd, if we have one.
    fn lease_valid_until(&self) -> Option<Instant> {
        self.lease
            .map(|l| l.renewed_at + l.ttl - Self::margin(l.ttl))
    }

    /// Whether this agent is the leader at `now`: it holds the key, and its lease surely has
    /// not expired in etcd yet.
    pub fn is_leader(&self, now: Instant) -> bool {
        self.holds_key && self.lease_valid_until().is_some_and(|until| now < until)
    }

    /// The lease id, if one is held (the shell registers and campaigns with it).
    pub fn lease_id(&self) -> Option<i64> {
        self.lease.map(|l| l.id)
    }

    /// What to do at `now`. Forgets a lease that may have expired in etcd.
    pub fn step(&mut self, now: Instant) -> Step {
        if let Some(until) = self.backoff_until {
            if now < until {
                return Step::Wait(until);
            }
            self.backoff_until = None;
        }
        if let Some(lease) = self.lease {
            // Past the lease's full TTL since the last renewal we know of, etcd has (or will
            // have) dropped it: start over with a new one.
            if now >= lease.renewed_at + lease.ttl {
                self.lease = None;
                self.holds_key = false;
            }
        }
        let Some(lease) = self.lease else {
            return Step::Grant(self.ttl);
        };
        if now >= self.next_keepalive {
            return Step::KeepAlive(lease.id);
        }
        if now >= self.next_campaign {
            return Step::Campaign(lease.id);
        }
        let mut wake = self.next_keepalive.min(self.next_campaign);
        if let Some(until) = self.lease_valid_until() {
            if self.holds_key && now < until {
                // Wake when leadership would lapse, so the verdict changes on time.
                wake = wake.min(until);
            }
        }
        Step::Wait(wake)
    }

    /// A lease was granted; `sent_at` is when the grant was requested, `ttl` what etcd granted
    /// (it may raise a TTL below its minimum).
    pub fn granted(&mut self, id: i64, ttl: Duration, sent_at: Instant) {
        self.lease = Some(Lease {
            id,
            ttl,
            renewed_at: sent_at,
        });
        self.holds_key = false;
        self.next_keepalive = sent_at + ttl / RENEWALS_PER_TTL;
        self.next_campaign = sent_at;
    }

    /// A renewal answered: `remaining` is the TTL etcd reports (zero: the lease is gone).
    pub fn kept_alive(&mut self, id: i64, remaining: Duration, sent_at: Instant) {
        let Some(lease) = self.lease.as_mut().filter(|l| l.id == id) else {
            return;
        };
        if remaining.is_zero() {
            self.lease = None;
            self.holds_key = false;
            return;
        }
        lease.renewed_at = sent_at;
        self.next_keepalive = sent_at + lease.ttl / RENEWALS_PER_TTL;
    }

    /// A campaign answered: `holds` is whether the leader key is bound to our lease.
    pub fn campaigned(&mut self, id: i64, holds: bool, now: Instant) {
        if self.lease_id() != Some(id) {
            return;
        }
        self.holds_key = holds;
        // The leader re-checks the key with each renewal (someone may delete it); a follower
        // campaigns often, so it takes over soon after the old lease ends.
        self.next_campaign = now
            + if holds {
                self.ttl / RENEWALS_PER_TTL
            } else {
                self.ttl / CAMPAIGNS_PER_TTL
            };
    }

    /// etcd refused a write fenced on our lease (the election key is bound to another, or to
    /// none): stop leading at once, and campaign now to learn whether the key is free again.
    pub fn deposed(&mut self, now: Instant) {
        self.holds_key = false;
        self.next_campaign = now;
    }

    /// An etcd call failed: retry after a pause. Leadership still lapses on the lease's clock.
    pub fn failed(&mut self, now: Instant) {
        self.backoff_until = Some(now + RETRY);
    }
}

/// The keys of one datacenter's election under `-etcd-prefix`.
#[derive(Clone, Debug)]
pub struct Keys {
    /// The datacenter's prefix, without a trailing `/`.
    pub prefix: String,
    /// `<prefix>/leader`: the leader's advertised address, bound to its lease.
    pub leader: String,
    /// `<prefix>/agents/`: one key per agent, its advertised address, bound to its lease.
    pub agents: String,
    /// `<prefix>/agents/<node>`: this agent's.
    pub me: String,
}

impl Keys {
    /// The keys under `prefix` for the agent named `node`.
    pub fn new(prefix: &str, node: &str) -> Keys {
        let prefix = prefix.trim_end_matches('/');
        Keys {
            prefix: prefix.to_owned(),
            leader: format!("{prefix}/leader"),
            agents: format!("{prefix}/agents/"),
            me: format!("{prefix}/agents/{node}"),
        }
    }
}

/// The etcd cluster a datacenter's agents share: a client and this agent's election keys.
#[derive(Clone)]
pub struct Cluster {
    /// The client (cheap to clone: one HTTP/2 channel).
    pub client: etcd_client::Client,
    /// The election keys under `-etcd-prefix`.
    pub keys: Keys,
    /// The lease TTL the election asks for.
    pub ttl: Duration,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("keys", &self.keys)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// What the election publishes to the rest of the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Whether this agent runs the once-per-datacenter duties now.
    pub leader: bool,
    /// The lease the election key is bound to while this agent leads (0 otherwise): duty
    /// writes are fenced on it ([`crate::store::LeaderFence`]).
    pub lease: i64,
}

/// The bound on one etcd call of the election.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}

/// Runs the election until `shutdown` turns true, publishing each change of verdict on
/// `verdict`. `address` is what this agent advertises (its HTTP address). On shutdown the lease
/// is revoked, so a successor does not wait out the TTL.
///
/// The agent may also turn the verdict to "not leader" itself, when etcd refused a duty write
/// fenced on the lease (`Agent::duty_write`): that is proof another agent leads, so the
/// election steps down at once instead of waiting for its next campaign.
pub async fn run(
    mut client: etcd_client::Client,
    keys: Keys,
    address: String,
    ttl: Duration,
    verdict: &tokio::sync::watch::Sender<Verdict>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
    let mut election = Election::new(ttl, Instant::now());
    let mut changes = verdict.subscribe();
    let mut published = verdict.borrow().leader;
    loop {
        let now = Instant::now();
        let step = election.step(now);
        let mut deposed = false;
        // Checked and published under the channel's one lock, so a verdict the agent turns
        // (a fenced write) between the check and the publication cannot be overwritten.
        verdict.send_if_modified(|v| {
            if published && !v.leader {
                election.deposed(now);
                deposed = true;
            }
            let leader = election.is_leader(now);
            let lease = if leader {
                election.lease_id().unwrap_or(0)
            } else {
                0
            };
            published = leader;
            if v.leader == leader && v.lease == lease {
                return false;
            }
            if v.leader != leader {
                tracing::info!(leader, key = %keys.leader, "leadership changed");
            }
            v.leader = leader;
            v.lease = lease;
            true
        });
        if deposed {
            tracing::warn!(key = %keys.leader, "a fenced duty write was refused: stepping down and campaigning now");
            // Step again at once: the campaign is due now.
            continue;
        }
        match step {
            Step::Wait(until) => {
                tokio::select! {
                    () = tokio::time::sleep_until(until.into()) => {}
                    // A change of verdict made by the agent (a fenced write) is acted on now.
                    changed = changes.changed() => if changed.is_err() { break },
                    _ = shutdown.wait_for(|stopping| *stopping) => break,
                }
            }
            Step::Grant(ttl) => {
                let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
                match bounded(client.lease_grant(seconds, None)).await {
                    Ok(granted) => {
                        let ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0));
                        election.granted(granted.id(), ttl, now);
                        let register = client.put(
                            keys.me.as_str(),
                            address.as_str(),
                            Some(PutOptions::new().with_lease(granted.id())),
                        );
                        if let Err(error) = bounded(register).await {
                            tracing::warn!(%error, "etcd: registering this agent failed");
                            election.failed(Instant::now());
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "etcd: lease grant failed");
                        election.failed(Instant::now());
                    }
                }
            }
            Step::KeepAlive(id) => {
                // A keep-alive stream per renewal: simple, and a broken stream cannot leave a
                // stale one behind. The request is answered by etcd's leader.
                let renewal = async {
                    let (mut keeper, mut stream) = client.lease_keep_alive(id).await?;
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match bounded(renewal).await {
                    Ok(Some(answer)) => {
                        let remaining =
                            Duration::from_secs(u64::try_from(answer.ttl()).unwrap_or(0));
                        election.kept_alive(id, remaining, now);
                    }
                    Ok(None) => election.failed(Instant::now()),
                    Err(error) => {
                        tracing::warn!(%error, "etcd: lease renewal failed");
                        election.failed(Instant::now());
                    }
                }
            }
            Step::Campaign(id) => {
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(
                        keys.leader.as_str(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then(vec![TxnOp::put(
                        keys.leader.as_str(),
                        address.as_str(),
                        Some(PutOptions::new().with_lease(id)),
                    )])
                    .or_else(vec![TxnOp::get(keys.leader.as_str(), None)]);
                match bounded(client.txn(txn)).await {
                    Ok(answer) => {
                        let holds = answer.succeeded()
                            || answer.op_responses().iter().any(|op| match op {
                                TxnOpResponse::Get(get) => {
                                    get.kvs().iter().any(|kv| kv.lease() == id)
                                }
                                _ => false,
                            });
                        election.campaigned(id, holds, now);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "etcd: campaign failed");
                        election.failed(Instant::now());
                    }
                }
            }
        }
    }
    verdict.send_replace(Verdict {
        leader: false,
        lease: 0,
    });
    if let Some(id) = election.lease_id() {
        // Best effort: if etcd does not answer, the lease simply runs out.
        let _ = bounded(client.lease_revoke(id)).await;
    }
}

/// The current leader's advertised address, or `""` when there is none.
pub async fn leader_address(
    client: &mut etcd_client::Client,
    keys: &Keys,
) -> Result<String, String> {
    let answer = bounded(client.get(keys.leader.as_str(), None)).await?;
    Ok(answer
        .kvs()
        .first()
        .and_then(|kv| kv.value_str().ok())
        .unwrap_or_default()
        .to_owned())
}

/// Every registered agent's advertised address, in key order.
pub async fn peer_addresses(
    client: &mut etcd_client::Client,
    keys: &Keys,
) -> Result<Vec<String>, String> {
    let options = etcd_client::GetOptions::new().with_prefix();
    let answer = bounded(client.get(keys.agents.as_str(), Some(options))).await?;
    Ok(answer
        .kvs()
        .iter()
        .filter_map(|kv| kv.value_str().ok().map(str::to_owned))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn leader_at(t0: Instant) -> Election {
        let mut e = Election::new(TTL, t0);
        assert_eq!(e.step(t0), Step::Grant(TTL));
        e.granted(7, TTL, t0);
        assert_eq!(e.step(t0), Step::Campaign(7));
        e.campaigned(7, true, t0);
        e
    }

    #[test]
    fn a_fresh_agent_grants_then_campaigns_and_leads_only_when_it_holds_the_key() {
        let t0 = Instant::now();
        let mut e = Election::new(TTL, t0);
        assert!(!e.is_leader(t0));
        assert_eq!(e.step(t0), Step::Grant(TTL));
        e.granted(7, TTL, t0);
        assert!(!e.is_leader(t0), "a lease alone is not leadership");
        assert_eq!(e.step(t0), Step::Campaign(7));
        e.campaigned(7, false, t0);
        assert!(!e.is_leader(t0));
        // A follower campaigns again a tenth of a TTL later.
        assert_eq!(e.step(t0), Step::Wait(t0 + TTL / 10));
        assert_eq!(e.step(t0 + TTL / 10), Step::Campaign(7));
        e.campaigned(7, true, t0 + TTL / 10);
        assert!(e.is_leader(t0 + TTL / 10));
    }

    #[test]
    fn the_leader_renews_and_stays_leader() {
        let t0 = Instant::now();
        let mut e = leader_at(t0);
        let mut now = t0;
        for _ in 0..10 {
            // Renewals come due every third of the TTL.
            now += TTL / 3;
            match e.step(now) {
                Step::KeepAlive(7) => e.kept_alive(7, TTL, now),
                other => panic!("expected a renewal, got {other:?}"),
            }
            if e.step(now) == Step::Campaign(7) {
                e.campaigned(7, true, now);
            }
            assert!(e.is_leader(now));
        }
    }

    #[test]
    fn a_leader_cut_off_from_etcd_steps_down_before_its_lease_can_expire() {
        let t0 = Instant::now();
        let mut e = leader_at(t0);
        // Every renewal fails from now on.
        let mut now = t0;
        let deadline = t0 + TTL - TTL / MARGIN_DIVISOR;
        while now < deadline {
            assert!(e.is_leader(now));
            if let Step::KeepAlive(_) | Step::Campaign(_) = e.step(now) {
                e.failed(now);
            }
            now += Duration::from_millis(100);
        }
        assert!(
            !e.is_leader(deadline),
            "no longer leader a margin before etcd may expire the lease"
        );
        // Once the whole TTL has passed the lease is forgotten and a new one asked for.
        assert_eq!(e.step(t0 + TTL + RETRY), Step::Grant(TTL));
        assert!(!e.is_leader(t0 + TTL + RETRY));
    }

    #[test]
    fn the_leader_wakes_when_its_leadership_would_lapse() {
        let t0 = Instant::now();
        let mut e = leader_at(t0);
        // The renewal is due first; a failed one backs off, and then the lapse bounds the wait.
        assert_eq!(e.step(t0), Step::Wait(t0 + TTL / 3));
        let late = t0 + TTL / 3;
        assert_eq!(e.step(late), Step::KeepAlive(7));
        e.failed(late);
        e.next_keepalive = t0 + TTL * 2;
        e.next_campaign = t0 + TTL * 2;
        assert_eq!(e.step(late + RETRY), Step::Wait(t0 + TTL - TTL / 5));
    }

    #[test]
    fn a_lease_etcd_reports_gone_ends_leadership_at_once() {
        let t0 = Instant::now();
        let mut e = leader_at(t0);
        let now = t0 + TTL / 3;
        assert_eq!(e.step(now), Step::KeepAlive(7));
        e.kept_alive(7, Duration::ZERO, now);
        assert!(!e.is_leader(now));
        assert_eq!(e.step(now), Step::Grant(TTL));
    }

    #[test]
    fn losing_the_key_to_another_lease_ends_leadership() {
        let t0 = Instant::now();
        let mut e = leader_at(t0);
        let now = t0 + TTL / 3;
        assert_eq!(e.step(now), Step::KeepAlive(7));
        e.kept_alive(7, TTL, now);
        assert_eq!(e.step(now), Step::Campaign(7));
        e.campaigned(7, false, now);
        assert!(!e.is_leader(now));
    }

    #[test]
    fn a_refused_fenced_write_ends_leadership_and_campaigns_at_once() {
        let t0 = Instant::now();
        let mut e = leader_at(t0);
        let now = t0 + TTL / 10;
        assert!(e.is_leader(now));
        e.deposed(now);
        assert!(!e.is_leader(now), "deposed before its lease ends");
        assert_eq!(e.step(now), Step::Campaign(7), "it asks etcd who leads now");
        // The key is another lease's: it stays a follower.
        e.campaigned(7, false, now);
        assert!(!e.is_leader(now));
    }

    #[test]
    fn answers_about_an_old_lease_are_ignored() {
        let t0 = Instant::now();
        let mut e = leader_at(t0);
        e.kept_alive(6, Duration::ZERO, t0);
        e.campaigned(6, false, t0);
        assert!(e.is_leader(t0));
    }

    #[test]
    fn keys_live_under_the_prefix() {
        let keys = Keys::new("/meshgw/dc1/", "node-a");
        assert_eq!(keys.leader, "/meshgw/dc1/leader");
        assert_eq!(keys.agents, "/meshgw/dc1/agents/");
        assert_eq!(keys.me, "/meshgw/dc1/agents/node-a");
    }
}
