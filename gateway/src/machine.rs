//! One proxied connection as a sans-IO state machine, driven by completions (quinn-proto
//! style): the io_uring shell (`uring.rs`) feeds it what the kernel reported — bytes received
//! from a side, a send that finished, an end of stream, an error, a connect result, the
//! worker's tick — and drains the [`Action`]s it asks for. It owns no socket, no ring and no
//! clock, so every path (ClientHello peek, route decision, connect with fail-over, replay,
//! relay with half-close and backpressure, idle and write-stall timeouts) is unit-tested
//! below without a socket.
//!
//! Bulk flows are spliced: once a receive fills a whole buffer (the readiness engine's rule,
//! [`Mode::splices`]), that direction stops receiving and moves bytes socket -> pipe -> socket
//! with splice(2) calls the shell makes on readiness polls the machine asks for; when the
//! source has been quiet for a tick, the direction goes back to receives and its pipe is
//! closed, so an idle connection holds no pipe either.
//!
//! Bytes are never copied on the relay path: a received buffer `B` (in the shell, a buffer of
//! the worker's provided-buffer ring) is queued as is for the opposite side and dropped, which
//! gives it back, once sent. Only a ClientHello split over several receives is gathered into
//! a buffer of its own. An idle connection queues nothing, so it holds no buffer.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::balance::{EndpointOrder, WorkerSnapshot};
use crate::clienthello::{self, Verdict};
use crate::metrics::ConnectFailure;
use crate::outcome::{Close, HelloOutcome, Reason, Side};
use crate::relay_mode::{Mode, SPLICE_CHUNK};
use crate::routes::Lookup;

/// Buffers queued for one side before the machine stops receiving from the other: a peer
/// that reads slowly holds at most this many of the worker's shared buffers.
pub const MAX_QUEUED: usize = 4;

/// Full splices into a pipe one direction makes in a row before it waits on a readiness poll
/// again, so that one bulk flow cannot starve the worker's other connections (the readiness
/// engine's `READS_PER_WAKE`).
pub const SPLICES_PER_WAKE: u8 = 8;

/// Load balancing and passive health, as the machine sees them (their one owner is the
/// worker: round-robin cursors per snapshot, held-out endpoints by address).
pub trait Balance {
    /// Endpoint indices of `cluster` to try, healthy ones first.
    fn endpoint_order(
        &self,
        snapshot: &WorkerSnapshot,
        cluster: usize,
        now: Instant,
    ) -> EndpointOrder;
    /// A connect to `address` failed: keep it out of round robin until `until`.
    fn hold_out(&self, address: SocketAddr, until: Instant);
    /// A connect to `address` succeeded.
    fn mark_healthy(&self, address: SocketAddr);
}

/// What the shell observed.
pub enum Input<B> {
    /// Bytes received from `side` (never empty: an empty receive is [`Input::Eof`]).
    Received(Side, B),
    /// `side` sent FIN.
    Eof(Side),
    /// A receive, send or connect on `side`'s socket failed (a reset).
    Failed(Side),
    /// A send to `side` of the front of its queue took this many bytes.
    Sent(Side, usize),
    /// The upstream connect asked for by [`Action::Connect`] finished.
    Connected(Result<(), ConnectFailure>),
    /// The worker's periodic tick: deadlines are checked here (no timer per connection).
    Tick,
    /// The readiness poll on `side` asked for by [`Action::PollIn`] fired (bytes, a FIN or an
    /// error wait: the next splice says which).
    Readable(Side),
    /// The poll for room on `side` asked for by [`Action::PollOut`] fired.
    Writable(Side),
    /// A splice from `side` into its direction's pipe moved this many bytes (never 0: an
    /// empty splice is [`Input::Eof`]).
    SplicedIn(Side, usize),
    /// A splice from `side` found nothing to move.
    Drained(Side),
    /// A splice from the pipe to `side` moved this many bytes.
    SplicedOut(Side, usize),
    /// `side` took no byte of a splice from the pipe (its send buffer is full).
    Full(Side),
    /// No pipe could be made for the direction reading `side` (out of descriptors): it stays
    /// on receives.
    NoPipe(Side),
}

/// What the machine asks the shell to do, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Open a socket and connect it to `address`, giving up after `timeout` (a linked
    /// timeout); answer with [`Input::Connected`]. Any previous upstream socket is closed
    /// first.
    Connect {
        address: SocketAddr,
        timeout: Duration,
    },
    /// Start receiving from `side` (multishot), or again after a pause.
    Receive(Side),
    /// Stop receiving from `side`: the other side has [`MAX_QUEUED`] buffers waiting.
    Pause(Side),
    /// Send [`Machine::pending`]`(side)`; answer with [`Input::Sent`] or [`Input::Failed`].
    Send(Side),
    /// Half-close: `shutdown(SHUT_WR)` on `side` (everything for it was sent).
    Shutdown(Side),
    /// Arm a one-shot readiness poll for bytes on `side`; answer with [`Input::Readable`].
    /// Only once `side`'s receive has stopped (the shell waits for its last completion), so
    /// no received buffer can come after spliced bytes.
    PollIn(Side),
    /// Arm a one-shot poll for room on `side`; answer with [`Input::Writable`].
    PollOut(Side),
    /// splice(2) up to [`SPLICE_CHUNK`] bytes from `side` into the pipe of the direction that
    /// reads it (made on first use); answer with [`Input::SplicedIn`], [`Input::Eof`],
    /// [`Input::Drained`], [`Input::Failed`] or [`Input::NoPipe`].
    SpliceIn(Side),
    /// splice(2) [`Machine::piped`]`(side)` bytes from the pipe to `side`; answer with
    /// [`Input::SplicedOut`], [`Input::Full`] or [`Input::Failed`].
    SpliceOut(Side),
    /// The direction reading `side` stops splicing: cancel its poll on `side` and close its
    /// (empty) pipe. A [`Action::Receive`] follows.
    Unsplice(Side),
    /// The connection is over: close both sockets. With [`Close::resets`], with `SO_LINGER`
    /// 0 (a reset is passed on as a reset); for the idle timeout, after a FIN both ways.
    Close(Close),
}

/// Facts for metrics and the access log, in the order they happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// The first flight was read: how it ended, and (when found) the server name.
    Hello(HelloOutcome),
    /// The route was found: cluster index, its destination metric slot.
    Routed { cluster: usize, slot: usize },
    /// A connect attempt failed.
    ConnectFailed {
        address: SocketAddr,
        failure: ConnectFailure,
    },
    /// The upstream answered after `took`.
    Connected { address: SocketAddr, took: Duration },
    /// Bytes handed to a side's socket.
    Relayed { to: Side, bytes: usize },
    /// Of those, bytes spliced through a pipe.
    Spliced { bytes: usize },
}

impl Close {
    /// Whether closing passes a reset on (`SO_LINGER` 0) rather than a FIN.
    pub fn resets(self) -> bool {
        matches!(self.reason, Reason::Error | Reason::WriteStall)
    }
}

enum Phase {
    /// Reading the first flight; `gathered` holds it when it spans several receives.
    Hello {
        gathered: Vec<u8>,
    },
    /// Connecting to `address`; the first flight waits in the upstream queue.
    Connecting {
        order: EndpointOrder,
        cluster: usize,
        address: SocketAddr,
        since: Instant,
        none_healthy: bool,
    },
    Relaying,
    Closed(Close),
}

/// One direction's bytes waiting for their destination.
struct Queue<B> {
    buffers: VecDeque<(B, usize)>,
    /// A send of the front buffer is with the kernel.
    sending: bool,
    /// The source sent FIN: shut this destination down once the queue is empty.
    eof: bool,
    /// The shutdown was asked for.
    shut: bool,
    /// Since when a send has waited with no byte taken (write-stall clock).
    stalled_since: Option<Instant>,
    /// Receiving from the source is paused for backpressure (or because it splices).
    paused: bool,
    /// The source is spliced through a pipe (a bulk flow). Boxed: only a bulk flow pays for
    /// it, and every idle connection's machine stays as small as before splicing existed.
    bulk: Option<Box<Bulk>>,
}

/// A spliced direction's state.
#[derive(Debug, Default)]
struct Bulk {
    /// Bytes in the pipe, not yet spliced to the destination.
    piped: usize,
    /// A readiness poll on the source is armed.
    polling: bool,
    /// A splice from the source was asked for and has not answered.
    reading: bool,
    /// The last splice from the source filled a whole chunk (more is likely waiting).
    last_full: bool,
    /// Splices from the source since the last readiness poll.
    burst: u8,
    /// Bytes moved since the last tick (a direction quiet for a tick leaves splicing).
    moved: bool,
}

impl<B> Queue<B> {
    fn new() -> Queue<B> {
        Queue {
            buffers: VecDeque::new(),
            sending: false,
            eof: false,
            shut: false,
            stalled_since: None,
            paused: false,
            bulk: None,
        }
    }
}

/// A buffer the machine made itself (a first flight gathered over several receives).
pub enum Data<B> {
    Received(B),
    Gathered(Vec<u8>),
}

impl<B: AsRef<[u8]>> AsRef<[u8]> for Data<B> {
    fn as_ref(&self) -> &[u8] {
        match self {
            Data::Received(buffer) => buffer.as_ref(),
            Data::Gathered(bytes) => bytes,
        }
    }
}

pub struct Machine<B> {
    snapshot: Rc<WorkerSnapshot>,
    started: Instant,
    phase: Phase,
    /// Index 0: bytes for the upstream (from the client); 1: for the client.
    queues: [Queue<Data<B>>; 2],
    first_eof: Option<Side>,
    last_activity: Instant,
    actions: VecDeque<Action>,
    notes: Vec<Note>,
    /// Keep the server name (an allocation, so only when an access log or a debug line
    /// wants it).
    names: bool,
    server_name: Option<String>,
    /// The first input was handled (it starts the receive from the client).
    begun: bool,
    /// Copy, splice, or splice once a receive fills a buffer of `full_receive` bytes.
    mode: Mode,
    full_receive: u32,
}

/// Where [`Machine::handle_with`] puts what a machine asks for.
#[derive(Default)]
pub struct Output {
    pub actions: VecDeque<Action>,
    pub notes: Vec<Note>,
}

fn slot(side: Side) -> usize {
    match side {
        Side::Upstream => 0,
        Side::Downstream | Side::Gateway => 1,
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::Downstream => Side::Upstream,
        Side::Upstream | Side::Gateway => Side::Downstream,
    }
}

impl<B: AsRef<[u8]>> Machine<B> {
    /// A connection accepted at `now`; it starts by receiving from the client.
    pub fn new(snapshot: Rc<WorkerSnapshot>, now: Instant, names: bool) -> Machine<B> {
        Machine {
            snapshot,
            started: now,
            phase: Phase::Hello {
                gathered: Vec::new(),
            },
            queues: [Queue::new(), Queue::new()],
            first_eof: None,
            last_activity: now,
            actions: VecDeque::new(),
            notes: Vec::new(),
            begun: false,
            names,
            server_name: None,
            mode: Mode::Copy,
            full_receive: u32::MAX,
        }
    }

    /// Relay in `mode` ([`Mode::Copy`] unless this is called): with [`Mode::Auto`], a
    /// direction turns to splice once one receive brings `full_receive` bytes (the shell's
    /// whole buffer).
    pub fn with_relay_mode(mut self, mode: Mode, full_receive: usize) -> Machine<B> {
        self.mode = mode;
        self.full_receive = u32::try_from(full_receive).unwrap_or(u32::MAX);
        self
    }

    /// The bytes waiting in the pipe of the direction that writes to `side`.
    pub fn piped(&self, side: Side) -> usize {
        self.queues[slot(side)]
            .bulk
            .as_ref()
            .map_or(0, |bulk| bulk.piped)
    }

    /// Whether the direction that reads `side` is spliced.
    pub fn splicing(&self, side: Side) -> bool {
        self.queues[slot(other(side))].bulk.is_some()
    }

    /// [`Machine::handle`], with the actions and notes going to `out` (the shell's one
    /// reused buffer) instead of the machine's own: a machine then never allocates for them,
    /// so an idle connection holds no action or note capacity.
    pub fn handle_with(
        &mut self,
        input: Input<B>,
        now: Instant,
        balance: &dyn Balance,
        out: &mut Output,
    ) {
        std::mem::swap(&mut self.actions, &mut out.actions);
        std::mem::swap(&mut self.notes, &mut out.notes);
        self.handle(input, now, balance);
        std::mem::swap(&mut self.actions, &mut out.actions);
        std::mem::swap(&mut self.notes, &mut out.notes);
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Facts gathered since the last call (for metrics and the access log).
    pub fn take_notes(&mut self) -> std::vec::Drain<'_, Note> {
        self.notes.drain(..)
    }

    /// The bytes a [`Action::Send`] to `side` must send (the unsent rest of the front buffer).
    pub fn pending(&self, side: Side) -> &[u8] {
        match self.queues[slot(side)].buffers.front() {
            Some((buffer, offset)) => &buffer.as_ref()[*offset..],
            None => &[],
        }
    }

    /// How it ended, once it has.
    pub fn closed(&self) -> Option<Close> {
        match self.phase {
            Phase::Closed(close) => Some(close),
            _ => None,
        }
    }

    /// The ClientHello's server name, if the machine was asked to keep names.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// The snapshot this connection decides with (read once, at accept).
    pub fn snapshot_rc(&self) -> &Rc<WorkerSnapshot> {
        &self.snapshot
    }

    /// Feed one observation.
    pub fn handle(&mut self, input: Input<B>, now: Instant, balance: &dyn Balance) {
        if matches!(self.phase, Phase::Closed(_)) {
            // Completions still in flight when the connection ended (the shell closes the
            // sockets, they finish with errors); the buffers they carry are dropped here.
            return;
        }
        if !self.begun {
            self.begun = true;
            self.actions.push_back(Action::Receive(Side::Downstream));
        }
        match input {
            Input::Received(side, buffer) => self.received(side, buffer, now, balance),
            Input::Eof(side) => self.eof(side, now),
            Input::Failed(side) => self.failed(side, now, balance),
            Input::Sent(side, bytes) => self.sent(side, bytes, now),
            Input::Connected(result) => self.connected(result, now, balance),
            Input::Tick => self.tick(now),
            Input::Readable(side) => self.readable(side),
            Input::Writable(side) => self.writable(side),
            Input::SplicedIn(side, bytes) => self.spliced_in(side, bytes, now),
            Input::Drained(side) => self.drained(side),
            Input::SplicedOut(side, bytes) => self.spliced_out(side, bytes, now),
            Input::Full(side) => self.actions.push_back(Action::PollOut(side)),
            Input::NoPipe(side) => self.leave_bulk(side),
        }
    }

    fn finish(&mut self, close: Close) {
        self.phase = Phase::Closed(close);
        // Buffers still queued go back to the shell's pool now.
        for queue in &mut self.queues {
            if !queue.sending {
                queue.buffers.clear();
            }
        }
        self.actions.push_back(Action::Close(close));
    }

    fn received(&mut self, side: Side, buffer: B, now: Instant, balance: &dyn Balance) {
        if let Phase::Hello { gathered } = &mut self.phase {
            let max_bytes = self.snapshot.snapshot.limits.client_hello_max_bytes;
            let bytes = buffer.as_ref();
            // `Some(lookup)` once the hello is whole; the verdict borrows the bytes, so what
            // it decides is taken out before the buffer moves.
            let decided = {
                // Whole buffers are gathered: the bytes after the hello are the client's too and
                // are replayed with it. `parse` refuses once `max_bytes` are buffered, so what
                // is gathered stays under `max_bytes` plus one received buffer.
                let verdict = if gathered.is_empty() {
                    clienthello::parse(bytes, max_bytes)
                } else {
                    gathered.extend_from_slice(bytes);
                    clienthello::parse(gathered, max_bytes)
                };
                match verdict {
                    Verdict::NeedMore => None,
                    Verdict::Reject(reason) => Some(Err(HelloOutcome::Rejected(reason))),
                    Verdict::Done(hello) => {
                        let name = hello.server_name.as_ref().map(|name| name.as_str());
                        fault_injection(name);
                        if self.names {
                            self.server_name = name.map(str::to_owned);
                        }
                        let found = if name.is_some() {
                            HelloOutcome::SniFound
                        } else {
                            HelloOutcome::SniMissing
                        };
                        Some(Ok((found, self.snapshot.snapshot.table.lookup(name))))
                    }
                }
            };
            match decided {
                None => {
                    if gathered.is_empty() {
                        gathered.extend_from_slice(bytes);
                    }
                }
                Some(Err(outcome)) => {
                    self.notes.push(Note::Hello(outcome));
                    self.finish(Close::new(Side::Downstream, Reason::Hello(outcome)));
                }
                Some(Ok((found, lookup))) => {
                    let flight = if gathered.is_empty() {
                        Data::Received(buffer)
                    } else {
                        Data::Gathered(std::mem::take(gathered))
                    };
                    self.notes.push(Note::Hello(found));
                    self.route(lookup, flight, now, balance);
                }
            }
            return;
        }
        self.last_activity = now;
        let filled = buffer.as_ref().len() >= self.full_receive as usize;
        let queue = &mut self.queues[slot(other(side))];
        queue.buffers.push_back((Data::Received(buffer), 0));
        if queue.buffers.len() >= MAX_QUEUED && !queue.paused {
            queue.paused = true;
            self.actions.push_back(Action::Pause(side));
        }
        if matches!(self.phase, Phase::Relaying) {
            if queue.bulk.is_none() && !queue.eof && self.mode.splices(filled) {
                self.enter_bulk(side);
            }
            self.start_send(other(side), now);
        }
    }

    /// The direction reading `source` turns to splice: its receive stops (buffers it already
    /// received are sent first), and a readiness poll waits for the next bytes.
    fn enter_bulk(&mut self, source: Side) {
        let queue = &mut self.queues[slot(other(source))];
        queue.bulk = Some(Box::new(Bulk {
            polling: true,
            ..Bulk::default()
        }));
        if !queue.paused {
            queue.paused = true;
            self.actions.push_back(Action::Pause(source));
        }
        self.actions.push_back(Action::PollIn(source));
    }

    /// The direction reading `source` goes back to receives (its source was quiet for a
    /// tick, or no pipe could be made): its pipe is closed.
    fn leave_bulk(&mut self, source: Side) {
        let queue = &mut self.queues[slot(other(source))];
        if queue.bulk.take().is_none() {
            return;
        }
        self.actions.push_back(Action::Unsplice(source));
        if queue.buffers.len() < MAX_QUEUED && !queue.eof {
            queue.paused = false;
            self.actions.push_back(Action::Receive(source));
        }
    }

    fn readable(&mut self, source: Side) {
        let queue = &mut self.queues[slot(other(source))];
        let eof = queue.eof;
        let Some(bulk) = queue.bulk.as_mut() else {
            // A poll that finished after its direction left splicing.
            return;
        };
        bulk.polling = false;
        if !bulk.reading && bulk.piped == 0 && !eof {
            bulk.reading = true;
            bulk.burst = 0;
            self.actions.push_back(Action::SpliceIn(source));
        }
    }

    fn spliced_in(&mut self, source: Side, bytes: usize, now: Instant) {
        let to = other(source);
        let Some(bulk) = self.queues[slot(to)].bulk.as_mut() else {
            return;
        };
        bulk.reading = false;
        bulk.piped += bytes;
        bulk.last_full = bytes >= SPLICE_CHUNK;
        bulk.moved = true;
        self.last_activity = now;
        self.start_send(to, now);
    }

    fn drained(&mut self, source: Side) {
        let Some(bulk) = self.queues[slot(other(source))].bulk.as_mut() else {
            return;
        };
        bulk.reading = false;
        if !bulk.polling {
            bulk.polling = true;
            self.actions.push_back(Action::PollIn(source));
        }
    }

    /// The pipe of the direction reading `source` is empty: splice more at once while the
    /// source keeps filling chunks (up to [`SPLICES_PER_WAKE`]), else wait for readiness.
    fn next_splice_in(&mut self, source: Side) {
        let queue = &mut self.queues[slot(other(source))];
        let eof = queue.eof;
        let Some(bulk) = queue.bulk.as_mut() else {
            return;
        };
        if eof || bulk.reading || bulk.polling || bulk.piped > 0 {
            return;
        }
        if bulk.last_full && bulk.burst < SPLICES_PER_WAKE {
            bulk.burst += 1;
            bulk.reading = true;
            self.actions.push_back(Action::SpliceIn(source));
        } else {
            bulk.polling = true;
            self.actions.push_back(Action::PollIn(source));
        }
    }

    fn spliced_out(&mut self, to: Side, bytes: usize, now: Instant) {
        let queue = &mut self.queues[slot(to)];
        let Some(bulk) = queue.bulk.as_mut() else {
            return;
        };
        queue.sending = false;
        bulk.piped = bulk.piped.saturating_sub(bytes);
        let drained = bulk.piped == 0;
        if bytes > 0 {
            queue.stalled_since = None;
            self.last_activity = now;
            self.notes.push(Note::Relayed { to, bytes });
            self.notes.push(Note::Spliced { bytes });
        }
        if drained {
            self.next_splice_in(other(to));
        }
        // More of the pipe, or (drained after the source's FIN) the shutdown.
        self.start_send(to, now);
    }

    fn writable(&mut self, to: Side) {
        let queue = &self.queues[slot(to)];
        if queue.sending && queue.buffers.is_empty() && self.piped(to) > 0 {
            self.actions.push_back(Action::SpliceOut(to));
        }
    }

    fn route(&mut self, lookup: Lookup, flight: Data<B>, now: Instant, balance: &dyn Balance) {
        let Lookup::Matched(cluster) = lookup else {
            self.finish(Close::new(Side::Downstream, Reason::NoRoute));
            return;
        };
        let slot_index = self.snapshot.snapshot.slots[cluster];
        self.notes.push(Note::Routed {
            cluster,
            slot: slot_index,
        });
        self.queues[slot(Side::Upstream)]
            .buffers
            .push_back((flight, 0));
        let order = balance.endpoint_order(&self.snapshot, cluster, now);
        let none_healthy = order.none_healthy();
        self.connect_next(order, cluster, none_healthy, now);
    }

    /// Try the next endpoint, or give up with UH/UF.
    fn connect_next(
        &mut self,
        mut order: EndpointOrder,
        cluster: usize,
        none_healthy: bool,
        now: Instant,
    ) {
        let endpoints = &self.snapshot.snapshot.table.cluster(cluster).endpoints;
        match order.next_index() {
            Some(index) => {
                let address = endpoints[index];
                self.actions.push_back(Action::Connect {
                    address,
                    timeout: self.snapshot.snapshot.timeouts.connect,
                });
                self.phase = Phase::Connecting {
                    order,
                    cluster,
                    address,
                    since: now,
                    none_healthy,
                };
            }
            None => self.finish(Close::new(Side::Upstream, Reason::Connect { none_healthy })),
        }
    }

    fn connected(
        &mut self,
        result: Result<(), ConnectFailure>,
        now: Instant,
        balance: &dyn Balance,
    ) {
        let Phase::Connecting {
            cluster,
            address,
            since,
            none_healthy,
            ..
        } = self.phase
        else {
            return;
        };
        match result {
            Ok(()) => {
                balance.mark_healthy(address);
                self.notes.push(Note::Connected {
                    address,
                    took: now.saturating_duration_since(since),
                });
                self.phase = Phase::Relaying;
                self.last_activity = now;
                self.actions.push_back(Action::Receive(Side::Upstream));
                self.start_send(Side::Upstream, now);
                // Bytes the upstream sent before anything else (a server-first protocol).
                self.start_send(Side::Downstream, now);
            }
            Err(failure) => {
                self.notes.push(Note::ConnectFailed { address, failure });
                balance.hold_out(
                    address,
                    now + self.snapshot.snapshot.limits.endpoint_backoff,
                );
                let Phase::Connecting { order, .. } =
                    std::mem::replace(&mut self.phase, Phase::Relaying)
                else {
                    return;
                };
                self.connect_next(order, cluster, none_healthy, now);
            }
        }
    }

    fn start_send(&mut self, to: Side, now: Instant) {
        let queue = &mut self.queues[slot(to)];
        if queue.sending {
            return;
        }
        if queue.buffers.is_empty() {
            if queue.bulk.as_ref().is_some_and(|bulk| bulk.piped > 0) {
                // Spliced bytes come after every received buffer (the receive stopped before
                // the first splice), and before the FIN.
                queue.sending = true;
                if queue.stalled_since.is_none() {
                    queue.stalled_since = Some(now);
                }
                self.actions.push_back(Action::SpliceOut(to));
                return;
            }
            if queue.eof && !queue.shut {
                queue.shut = true;
                self.actions.push_back(Action::Shutdown(to));
                self.maybe_finished();
            }
            return;
        }
        queue.sending = true;
        if queue.stalled_since.is_none() {
            queue.stalled_since = Some(now);
        }
        self.actions.push_back(Action::Send(to));
    }

    fn sent(&mut self, to: Side, bytes: usize, now: Instant) {
        let queue = &mut self.queues[slot(to)];
        queue.sending = false;
        if bytes > 0 {
            queue.stalled_since = None;
            self.last_activity = now;
            self.notes.push(Note::Relayed { to, bytes });
        }
        if let Some((buffer, offset)) = queue.buffers.front_mut() {
            *offset += bytes;
            if *offset >= buffer.as_ref().len() {
                queue.buffers.pop_front();
                if queue.buffers.is_empty() {
                    // Drained: free the queue's capacity, so that an idle connection holds
                    // no allocation for it.
                    queue.buffers = VecDeque::new();
                }
            }
        }
        if queue.paused && queue.buffers.len() < MAX_QUEUED && !queue.eof && queue.bulk.is_none() {
            queue.paused = false;
            self.actions.push_back(Action::Receive(other(to)));
        }
        self.start_send(to, now);
    }

    fn eof(&mut self, from: Side, now: Instant) {
        if matches!(self.phase, Phase::Hello { .. }) {
            let outcome = HelloOutcome::Eof;
            self.notes.push(Note::Hello(outcome));
            self.finish(Close::new(Side::Downstream, Reason::Hello(outcome)));
            return;
        }
        if self.first_eof.is_none() {
            self.first_eof = Some(from);
        }
        let queue = &mut self.queues[slot(other(from))];
        queue.eof = true;
        if let Some(bulk) = queue.bulk.as_mut() {
            bulk.reading = false;
        }
        if matches!(self.phase, Phase::Relaying) {
            self.start_send(other(from), now);
        }
    }

    /// Both sides sent FIN and both shutdowns went out: the pair is done.
    fn maybe_finished(&mut self) {
        if self.queues.iter().all(|queue| queue.shut) {
            let side = self.first_eof.unwrap_or(Side::Downstream);
            self.finish(Close::new(side, Reason::Finished));
        }
    }

    fn failed(&mut self, side: Side, now: Instant, balance: &dyn Balance) {
        match self.phase {
            Phase::Hello { .. } => {
                let outcome = HelloOutcome::ReadError;
                self.notes.push(Note::Hello(outcome));
                self.finish(Close::new(Side::Downstream, Reason::Hello(outcome)));
            }
            Phase::Connecting { .. } if side == Side::Upstream => {
                self.connected(Err(ConnectFailure::Other), now, balance);
            }
            _ => self.finish(Close::new(side, Reason::Error)),
        }
    }

    fn tick(&mut self, now: Instant) {
        let timeouts = &self.snapshot.snapshot.timeouts;
        match self.phase {
            Phase::Hello { .. } => {
                if now.saturating_duration_since(self.started) >= timeouts.client_hello {
                    let outcome = HelloOutcome::Timeout;
                    self.notes.push(Note::Hello(outcome));
                    self.finish(Close::new(Side::Downstream, Reason::Hello(outcome)));
                }
            }
            // The connect timeout is the shell's linked timeout.
            Phase::Connecting { .. } | Phase::Closed(_) => {}
            Phase::Relaying => {
                let (idle, write_stall) = (timeouts.idle, timeouts.write_stall);
                for to in [Side::Upstream, Side::Downstream] {
                    let stalled = self.queues[slot(to)].stalled_since;
                    if stalled
                        .is_some_and(|since| now.saturating_duration_since(since) >= write_stall)
                    {
                        self.finish(Close::new(to, Reason::WriteStall));
                        return;
                    }
                }
                if now.saturating_duration_since(self.last_activity) >= idle {
                    self.finish(Close::new(Side::Gateway, Reason::Idle));
                    return;
                }
                for source in [Side::Downstream, Side::Upstream] {
                    let queue = &mut self.queues[slot(other(source))];
                    let (empty, sending, eof) =
                        (queue.buffers.is_empty(), queue.sending, queue.eof);
                    let Some(bulk) = queue.bulk.as_mut() else {
                        continue;
                    };
                    // Quiet for a whole tick, with nothing in flight: back to receives, so an
                    // idle connection holds no pipe.
                    let quiet = !bulk.moved && bulk.polling && bulk.piped == 0 && empty && !sending;
                    bulk.moved = false;
                    if quiet && !eof {
                        self.leave_bulk(source);
                    }
                }
            }
        }
    }
}

/// Fault injection for the panic-containment and stuck-worker tests, as in the readiness
/// engine (`connection.rs`); compiled into debug builds only.
#[cfg(debug_assertions)]
fn fault_injection(name: Option<&str>) {
    if std::env::var_os("GATEWAY_FAULT_INJECTION").is_none() {
        return;
    }
    if name.is_some_and(|name| name.starts_with("panic.fault-injection.")) {
        panic!("fault injection: a connection panics");
    }
    if name.is_some_and(|name| name.starts_with("stall.fault-injection.")) {
        std::thread::sleep(Duration::from_secs(8));
    }
}

#[cfg(not(debug_assertions))]
fn fault_injection(_name: Option<&str>) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::sync::Arc;

    use crate::config::{Limits, Timeouts};
    use crate::routes::{Pattern, RouteSpec, RouteTable};
    use crate::snapshot::Snapshot;

    const HELLO: &[u8] =
        include_bytes!("../../gateway-proto/testdata/clienthello/openssl-default.bin");
    const NAME: &str = "openssl-default.example.test";

    fn endpoint(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn snapshot(endpoints: Vec<SocketAddr>) -> Rc<WorkerSnapshot> {
        let table = RouteTable::build(
            vec![RouteSpec {
                pattern: Pattern::parse(NAME).expect("a valid pattern"),
                endpoints,
            }],
            None,
        )
        .expect("a valid table");
        Rc::new(WorkerSnapshot::new(Arc::new(Snapshot {
            generation: 1,
            table,
            slots: vec![7],
            endpoints_by_slot: Vec::new(),
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
        })))
    }

    /// Round robin and passive health as the worker does them, recording what it was told.
    #[derive(Default)]
    struct Health {
        held_out: RefCell<Vec<SocketAddr>>,
        healthy: RefCell<Vec<SocketAddr>>,
    }

    impl Balance for Health {
        fn endpoint_order(
            &self,
            snapshot: &WorkerSnapshot,
            cluster: usize,
            _now: Instant,
        ) -> EndpointOrder {
            let endpoints = &snapshot.snapshot.table.cluster(cluster).endpoints;
            let held = self.held_out.borrow();
            EndpointOrder::new(endpoints, 0, |address| held.contains(address))
        }
        fn hold_out(&self, address: SocketAddr, _until: Instant) {
            self.held_out.borrow_mut().push(address);
        }
        fn mark_healthy(&self, address: SocketAddr) {
            self.healthy.borrow_mut().push(address);
        }
    }

    struct Harness {
        machine: Machine<Vec<u8>>,
        health: Health,
        now: Instant,
    }

    /// A receive of this many bytes fills the shell's buffer, in the bulk tests.
    const FULL: usize = 16;

    impl Harness {
        fn new(endpoints: Vec<SocketAddr>) -> Harness {
            Harness::in_mode(endpoints, Mode::Copy)
        }
        fn in_mode(endpoints: Vec<SocketAddr>, mode: Mode) -> Harness {
            let now = Instant::now();
            Harness {
                machine: Machine::new(snapshot(endpoints), now, false).with_relay_mode(mode, FULL),
                health: Health::default(),
                now,
            }
        }
        fn feed(&mut self, input: Input<Vec<u8>>) -> Vec<Action> {
            self.machine.handle(input, self.now, &self.health);
            std::iter::from_fn(|| self.machine.poll_action()).collect()
        }
        fn later(&mut self, by: Duration) -> Vec<Action> {
            self.now += by;
            self.feed(Input::Tick)
        }
        /// Hello, connect, replay: a relaying pair.
        fn relaying() -> Harness {
            Harness::relaying_in(Mode::Copy)
        }
        fn relaying_in(mode: Mode) -> Harness {
            let mut harness = Harness::in_mode(vec![endpoint(1)], mode);
            assert_eq!(
                harness.feed(Input::Tick),
                vec![Action::Receive(Side::Downstream)]
            );
            harness.feed(Input::Received(Side::Downstream, HELLO.to_vec()));
            let actions = harness.feed(Input::Connected(Ok(())));
            assert_eq!(
                actions,
                vec![
                    Action::Receive(Side::Upstream),
                    Action::Send(Side::Upstream)
                ]
            );
            assert_eq!(harness.machine.pending(Side::Upstream), HELLO);
            harness.feed(Input::Sent(Side::Upstream, HELLO.len()));
            harness
        }
    }

    /// A relaying pair whose upstream -> client direction turned to splice after a full
    /// receive, that receive sent, and one readiness poll fired.
    fn spliced_download() -> Harness {
        let mut harness = Harness::relaying_in(Mode::Auto);
        assert_eq!(
            harness.feed(Input::Received(Side::Upstream, vec![1; FULL])),
            vec![
                Action::Pause(Side::Upstream),
                Action::PollIn(Side::Upstream),
                Action::Send(Side::Downstream)
            ]
        );
        assert!(harness.machine.splicing(Side::Upstream));
        assert!(!harness.machine.splicing(Side::Downstream));
        assert!(harness.feed(Input::Sent(Side::Downstream, FULL)).is_empty());
        assert_eq!(
            harness.feed(Input::Readable(Side::Upstream)),
            vec![Action::SpliceIn(Side::Upstream)]
        );
        harness
    }

    #[test]
    fn small_receives_and_copy_mode_never_splice() {
        let mut harness = Harness::relaying_in(Mode::Auto);
        assert_eq!(
            harness.feed(Input::Received(Side::Upstream, vec![1; FULL - 1])),
            vec![Action::Send(Side::Downstream)]
        );
        let mut harness = Harness::relaying_in(Mode::Copy);
        assert_eq!(
            harness.feed(Input::Received(Side::Upstream, vec![1; FULL])),
            vec![Action::Send(Side::Downstream)]
        );
        assert!(!harness.machine.splicing(Side::Upstream));
    }

    #[test]
    fn a_bulk_flow_splices_after_its_received_bytes_and_leaves_when_quiet() {
        let mut harness = Harness::relaying_in(Mode::Auto);
        harness.feed(Input::Received(Side::Upstream, vec![1; FULL]));
        assert_eq!(
            harness.feed(Input::Readable(Side::Upstream)),
            vec![Action::SpliceIn(Side::Upstream)]
        );
        // Spliced bytes wait while a received buffer is still being sent.
        assert!(harness
            .feed(Input::SplicedIn(Side::Upstream, 100))
            .is_empty());
        assert_eq!(harness.machine.piped(Side::Downstream), 100);
        assert_eq!(
            harness.feed(Input::Sent(Side::Downstream, FULL)),
            vec![Action::SpliceOut(Side::Downstream)]
        );
        // The client's buffer is full: wait for room, then go on.
        assert_eq!(
            harness.feed(Input::Full(Side::Downstream)),
            vec![Action::PollOut(Side::Downstream)]
        );
        assert_eq!(
            harness.feed(Input::Writable(Side::Downstream)),
            vec![Action::SpliceOut(Side::Downstream)]
        );
        assert_eq!(
            harness.feed(Input::SplicedOut(Side::Downstream, 60)),
            vec![Action::SpliceOut(Side::Downstream)]
        );
        // A short splice in: the source is likely empty, so wait for readiness again.
        assert_eq!(
            harness.feed(Input::SplicedOut(Side::Downstream, 40)),
            vec![Action::PollIn(Side::Upstream)]
        );
        let notes: Vec<Note> = harness.machine.take_notes().collect();
        assert!(notes.contains(&Note::Spliced { bytes: 60 }));
        assert!(notes.contains(&Note::Relayed {
            to: Side::Downstream,
            bytes: 40
        }));
        // Bytes moved during this tick: it stays spliced.
        assert!(harness.later(TICK_FOR_TESTS).is_empty());
        // A whole tick without a byte: back to receives, the pipe closed.
        assert_eq!(
            harness.later(TICK_FOR_TESTS),
            vec![
                Action::Unsplice(Side::Upstream),
                Action::Receive(Side::Upstream)
            ]
        );
        assert!(!harness.machine.splicing(Side::Upstream));
        // A poll that fires afterwards changes nothing.
        assert!(harness.feed(Input::Readable(Side::Upstream)).is_empty());
    }

    const TICK_FOR_TESTS: Duration = Duration::from_millis(100);

    #[test]
    fn full_chunks_are_spliced_in_a_row_up_to_a_bound() {
        let mut harness = spliced_download();
        let mut splices_in = 1;
        for _ in 0..2 * SPLICES_PER_WAKE {
            assert_eq!(
                harness.feed(Input::SplicedIn(Side::Upstream, SPLICE_CHUNK)),
                vec![Action::SpliceOut(Side::Downstream)]
            );
            let next = harness.feed(Input::SplicedOut(Side::Downstream, SPLICE_CHUNK));
            if next == vec![Action::SpliceIn(Side::Upstream)] {
                splices_in += 1;
                continue;
            }
            assert_eq!(next, vec![Action::PollIn(Side::Upstream)]);
            break;
        }
        assert_eq!(splices_in, 1 + usize::from(SPLICES_PER_WAKE));
    }

    #[test]
    fn a_spliced_direction_passes_its_fin_on_after_the_pipe_is_empty() {
        let mut harness = spliced_download();
        // The client half-closes: its FIN goes on; the spliced download keeps flowing.
        assert_eq!(
            harness.feed(Input::Eof(Side::Downstream)),
            vec![Action::Shutdown(Side::Upstream)]
        );
        assert_eq!(
            harness.feed(Input::SplicedIn(Side::Upstream, SPLICE_CHUNK)),
            vec![Action::SpliceOut(Side::Downstream)]
        );
        assert_eq!(
            harness.feed(Input::SplicedOut(Side::Downstream, SPLICE_CHUNK)),
            vec![Action::SpliceIn(Side::Upstream)]
        );
        // The upstream's FIN: nothing is piped, so it goes on at once and the pair is done.
        assert_eq!(
            harness.feed(Input::Eof(Side::Upstream)),
            vec![
                Action::Shutdown(Side::Downstream),
                Action::Close(Close::new(Side::Downstream, Reason::Finished))
            ]
        );
    }

    #[test]
    fn received_bytes_then_a_fin_wait_for_the_pipe() {
        let mut harness = spliced_download();
        assert_eq!(
            harness.feed(Input::SplicedIn(Side::Upstream, 10)),
            vec![Action::SpliceOut(Side::Downstream)]
        );
        assert_eq!(
            harness.feed(Input::Full(Side::Downstream)),
            vec![Action::PollOut(Side::Downstream)]
        );
        // A FIN while bytes are piped (as after a reset of the readiness poll): no shutdown yet.
        assert!(harness.feed(Input::Eof(Side::Upstream)).is_empty());
        assert_eq!(
            harness.feed(Input::Writable(Side::Downstream)),
            vec![Action::SpliceOut(Side::Downstream)]
        );
        assert_eq!(
            harness.feed(Input::SplicedOut(Side::Downstream, 10)),
            vec![Action::Shutdown(Side::Downstream)]
        );
    }

    #[test]
    fn a_spliced_peer_that_stops_reading_is_a_write_stall_and_errors_reset() {
        let mut harness = spliced_download();
        harness.feed(Input::SplicedIn(Side::Upstream, 10));
        harness.feed(Input::Full(Side::Downstream));
        assert!(harness.later(Duration::from_secs(9)).is_empty());
        assert_eq!(
            harness.later(Duration::from_secs(1)),
            vec![Action::Close(Close::new(
                Side::Downstream,
                Reason::WriteStall
            ))]
        );

        let mut harness = spliced_download();
        assert_eq!(
            harness.feed(Input::Failed(Side::Upstream)),
            vec![Action::Close(Close::new(Side::Upstream, Reason::Error))]
        );
    }

    #[test]
    fn without_a_pipe_the_direction_stays_on_receives() {
        let mut harness = spliced_download();
        assert_eq!(
            harness.feed(Input::NoPipe(Side::Upstream)),
            vec![
                Action::Unsplice(Side::Upstream),
                Action::Receive(Side::Upstream)
            ]
        );
        assert!(!harness.machine.splicing(Side::Upstream));
    }

    #[test]
    fn a_hello_is_routed_connected_and_replayed_unchanged() {
        let mut harness = Harness::new(vec![endpoint(1), endpoint(2)]);
        harness.feed(Input::Tick);
        let actions = harness.feed(Input::Received(Side::Downstream, HELLO.to_vec()));
        assert_eq!(
            actions,
            vec![Action::Connect {
                address: endpoint(1),
                timeout: Duration::from_secs(2)
            }]
        );
        let notes: Vec<Note> = harness.machine.take_notes().collect();
        assert_eq!(
            notes,
            vec![
                Note::Hello(HelloOutcome::SniFound),
                Note::Routed {
                    cluster: 0,
                    slot: 7
                }
            ]
        );
        harness.feed(Input::Connected(Ok(())));
        assert_eq!(harness.machine.pending(Side::Upstream), HELLO);
        assert_eq!(*harness.health.healthy.borrow(), vec![endpoint(1)]);
    }

    #[test]
    fn a_hello_split_over_receives_is_gathered() {
        let mut harness = Harness::new(vec![endpoint(1)]);
        harness.feed(Input::Tick);
        assert!(harness
            .feed(Input::Received(Side::Downstream, HELLO[..3].to_vec()))
            .is_empty());
        assert!(harness
            .feed(Input::Received(Side::Downstream, HELLO[3..100].to_vec()))
            .is_empty());
        let actions = harness.feed(Input::Received(Side::Downstream, HELLO[100..].to_vec()));
        assert!(
            matches!(actions[..], [Action::Connect { .. }]),
            "{actions:?}"
        );
        harness.feed(Input::Connected(Ok(())));
        assert_eq!(harness.machine.pending(Side::Upstream), HELLO);
    }

    #[test]
    fn bytes_after_a_split_hello_are_replayed_with_it() {
        let mut harness = Harness::new(vec![endpoint(1)]);
        harness.feed(Input::Received(Side::Downstream, HELLO[..100].to_vec()));
        // The rest of the hello and 20 KB the client sent right behind it, in one receive.
        let mut rest = HELLO[100..].to_vec();
        rest.extend(std::iter::repeat_n(7u8, 20_000));
        let actions = harness.feed(Input::Received(Side::Downstream, rest));
        assert!(
            matches!(actions[..], [Action::Connect { .. }]),
            "{actions:?}"
        );
        harness.feed(Input::Connected(Ok(())));
        let pending = harness.machine.pending(Side::Upstream);
        assert_eq!(pending.len(), HELLO.len() + 20_000);
        assert_eq!(&pending[..HELLO.len()], HELLO);
    }

    #[test]
    fn refusals_before_routing_close_without_a_byte() {
        let mut harness = Harness::new(vec![endpoint(1)]);
        harness.feed(Input::Tick);
        let actions = harness.feed(Input::Received(
            Side::Downstream,
            b"GET / HTTP/1.1\r\n".to_vec(),
        ));
        assert_eq!(
            actions,
            vec![Action::Close(Close::new(
                Side::Downstream,
                Reason::Hello(HelloOutcome::Rejected(clienthello::Reject::NotTls))
            ))]
        );

        let mut harness = Harness::new(vec![endpoint(1)]);
        harness.feed(Input::Received(Side::Downstream, HELLO[..10].to_vec()));
        assert_eq!(
            harness.feed(Input::Eof(Side::Downstream)),
            vec![Action::Close(Close::new(
                Side::Downstream,
                Reason::Hello(HelloOutcome::Eof)
            ))]
        );

        let mut harness = Harness::new(vec![endpoint(1)]);
        harness.feed(Input::Tick);
        assert!(harness.later(Duration::from_secs(4)).is_empty());
        assert_eq!(
            harness.later(Duration::from_secs(1)),
            vec![Action::Close(Close::new(
                Side::Downstream,
                Reason::Hello(HelloOutcome::Timeout)
            ))]
        );
    }

    #[test]
    fn an_unknown_name_is_no_route() {
        let other = include_bytes!("../../gateway-proto/testdata/clienthello/curl.bin");
        let mut harness = Harness::new(vec![endpoint(1)]);
        harness.feed(Input::Tick);
        let actions = harness.feed(Input::Received(Side::Downstream, other.to_vec()));
        assert_eq!(
            actions,
            vec![Action::Close(Close::new(Side::Downstream, Reason::NoRoute))]
        );
    }

    #[test]
    fn a_failed_connect_holds_the_endpoint_out_and_tries_the_next() {
        let mut harness = Harness::new(vec![endpoint(1), endpoint(2)]);
        harness.feed(Input::Tick);
        harness.feed(Input::Received(Side::Downstream, HELLO.to_vec()));
        let actions = harness.feed(Input::Connected(Err(ConnectFailure::Refused)));
        assert_eq!(
            actions,
            vec![Action::Connect {
                address: endpoint(2),
                timeout: Duration::from_secs(2)
            }]
        );
        assert_eq!(*harness.health.held_out.borrow(), vec![endpoint(1)]);
        assert_eq!(
            harness.feed(Input::Connected(Err(ConnectFailure::Timeout))),
            vec![Action::Close(Close::new(
                Side::Upstream,
                Reason::Connect {
                    none_healthy: false
                }
            ))]
        );

        // Every endpoint held out before the first attempt: tried anyway, then UH.
        let mut next = Harness::new(vec![endpoint(1)]);
        next.health = harness.health;
        next.feed(Input::Received(Side::Downstream, HELLO.to_vec()));
        assert_eq!(
            next.feed(Input::Connected(Err(ConnectFailure::Refused))),
            vec![Action::Close(Close::new(
                Side::Upstream,
                Reason::Connect { none_healthy: true }
            ))]
        );
    }

    #[test]
    fn half_close_keeps_the_other_direction_flowing() {
        let mut harness = Harness::relaying();
        // The client finishes first: its FIN goes on to the upstream at once.
        assert_eq!(
            harness.feed(Input::Eof(Side::Downstream)),
            vec![Action::Shutdown(Side::Upstream)]
        );
        // The upstream still answers.
        assert_eq!(
            harness.feed(Input::Received(Side::Upstream, b"answer".to_vec())),
            vec![Action::Send(Side::Downstream)]
        );
        assert_eq!(harness.machine.pending(Side::Downstream), b"answer");
        assert!(harness.feed(Input::Sent(Side::Downstream, 6)).is_empty());
        // Then it finishes too: the pair is done, attributed to the client (DC).
        assert_eq!(
            harness.feed(Input::Eof(Side::Upstream)),
            vec![
                Action::Shutdown(Side::Downstream),
                Action::Close(Close::new(Side::Downstream, Reason::Finished))
            ]
        );
    }

    #[test]
    fn a_short_send_resends_the_rest_and_a_fin_waits_for_the_queue() {
        let mut harness = Harness::relaying();
        harness.feed(Input::Received(Side::Downstream, b"hello world".to_vec()));
        assert_eq!(
            harness.feed(Input::Eof(Side::Downstream)),
            Vec::<Action>::new(),
            "no shutdown while bytes are queued"
        );
        assert_eq!(
            harness.feed(Input::Sent(Side::Upstream, 6)),
            vec![Action::Send(Side::Upstream)]
        );
        assert_eq!(harness.machine.pending(Side::Upstream), b"world");
        assert_eq!(
            harness.feed(Input::Sent(Side::Upstream, 5)),
            vec![Action::Shutdown(Side::Upstream)]
        );
    }

    #[test]
    fn a_slow_reader_pauses_its_source_and_resumes_it() {
        let mut harness = Harness::relaying();
        let mut actions = Vec::new();
        for chunk in 0..MAX_QUEUED {
            actions.extend(harness.feed(Input::Received(Side::Upstream, vec![chunk as u8; 8])));
        }
        assert_eq!(
            actions,
            vec![
                Action::Send(Side::Downstream),
                Action::Pause(Side::Upstream)
            ]
        );
        assert_eq!(
            harness.feed(Input::Sent(Side::Downstream, 8)),
            vec![
                Action::Receive(Side::Upstream),
                Action::Send(Side::Downstream)
            ]
        );
    }

    #[test]
    fn a_reset_on_either_side_is_an_error_close() {
        let mut harness = Harness::relaying();
        assert_eq!(
            harness.feed(Input::Failed(Side::Upstream)),
            vec![Action::Close(Close::new(Side::Upstream, Reason::Error))]
        );
        assert!(Close::new(Side::Upstream, Reason::Error).resets());
        // Completions after the close change nothing.
        assert!(harness.feed(Input::Eof(Side::Downstream)).is_empty());
    }

    #[test]
    fn idle_and_write_stall_are_checked_on_the_tick() {
        let mut harness = Harness::relaying();
        assert!(harness.later(Duration::from_secs(59)).is_empty());
        assert_eq!(
            harness.later(Duration::from_secs(1)),
            vec![Action::Close(Close::new(Side::Gateway, Reason::Idle))]
        );

        let mut harness = Harness::relaying();
        harness.feed(Input::Received(Side::Upstream, b"unread".to_vec()));
        // The client takes nothing: the send stays with the kernel.
        assert!(harness.later(Duration::from_secs(9)).is_empty());
        assert_eq!(
            harness.later(Duration::from_secs(1)),
            vec![Action::Close(Close::new(
                Side::Downstream,
                Reason::WriteStall
            ))]
        );
    }
}
