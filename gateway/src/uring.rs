//! The completion-driven engine (the default; `GATEWAY_ENGINE=readiness` selects the
//! other): the worker's thread owns one
//! io_uring and drives every connection's sans-IO [`Machine`] from its completions.
//!
//! - Accepting is one multishot accept per listening socket.
//! - Receiving is one multishot receive per socket into the worker's provided-buffer ring:
//!   the kernel picks a buffer only when bytes arrive, so an idle connection holds none.
//! - Sends, connects (each linked to a timeout), shutdowns, cancellations and closes are
//!   submission queue entries, all submitted in one `io_uring_enter` per loop turn, which is
//!   also the one wait.
//! - The ring is `SINGLE_ISSUER|DEFER_TASKRUN`: completions raised by other CPUs wait for the
//!   worker's own wait instead of interrupting it.
//! - Bulk flows are spliced (`GATEWAY_RELAY_MODE`, as the readiness engine: auto by
//!   default): once a receive fills a whole buffer, the machine stops that direction's
//!   receive and asks for a one-shot readiness poll on its source, then for non-blocking
//!   splice(2) calls socket -> pipe -> socket made here, on the worker thread (an
//!   `IORING_OP_SPLICE` is always handed to an io-wq kernel thread). The pipe is made on the
//!   first splice and closed when the direction goes back to receives.
//! - Deadlines (ClientHello, idle, write stall) are checked on the worker's 100 ms tick, a
//!   ring timeout; there is no timer per connection. Connect timeouts are linked timeouts.
//!
//! This is the gateway's third `unsafe` module (after `sys.rs` and `passfd.rs`): pushing an
//! entry hands the kernel pointers (buffers, addresses, timespecs) that must stay valid until
//! the entry completes, and the provided-buffer ring is memory shared with the kernel. Each
//! block says what keeps its pointers valid.

#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::context::{Shared, WorkerCommand, WorkerContext, TICK};
use crate::machine::{Action, Input, Machine, Note, Output};
use crate::metrics::{self, AcceptError, ConnectFailure};
use crate::outcome::{Close, HelloOutcome, Reason, Side};
use crate::relay_mode::{Mode, BULK_READ, SPLICE_CHUNK};
use crate::ring_setup::RingSetup;

/// Size of one provided buffer. A receive takes a whole buffer whatever it reads, so a bulk
/// flow moves at most this much per receive and per send: 128 KiB cut the completion engine's
/// CPU per bulk GB to 0.75-0.86x of 32 KiB's in three same-run comparisons (64 KiB: no gain;
/// 256 KiB: as 128), with request/response and idle memory per connection unchanged
/// (perf/RESULTS.md, "Round 4"). `GATEWAY_URING_BUFFER_KIB` overrides it for measurement.
const BUFFER_BYTES: usize = 128 * 1024;
/// Buffers in the worker's pool (a power of two, as the kernel requires): 32 MiB of address
/// space per worker, shared by all its connections; pages are touched only as bytes pass
/// through them (an idle connection holds no buffer).
const BUFFERS: u16 = 256;
const BUFFER_GROUP: u16 = 0;
/// Submission queue entries; the completion queue is four times larger so that bursts of
/// multishot completions do not overflow it.
const SQ_ENTRIES: u32 = 1024;
/// How long a wait that counts on submitted entries completing at once (see
/// [`Completion::enter`]) may hold a completion back when one of them did not: a send to a
/// socket whose buffer is full completes later, and the next event then waits this long at
/// most. The kernel arms a timer of this length for every such wait, and one that fires
/// before the awaited event costs a wake-up. Off by default (0): it halves the
/// `io_uring_enter` calls per relayed message, but no CPU or latency gain showed in three
/// same-run comparisons on the shared 2-vCPU machine (perf/RESULTS.md, "Counted wait"), and a
/// wrong guess delays other connections' events. `GATEWAY_URING_MIN_WAIT_US=1000` turns it
/// on for measurement.
const MIN_WAIT_US: u32 = 0;
/// Sends up to this size count on completing during their submission (see
/// [`Completion::enter`]): a message. Larger ones are a stream's, whose destination is more
/// often full, and a wrong guess there would hold every wait for `MIN_WAIT_US` (measured: bulk
/// goodput fell by a third when every send counted).
const SMALL_SEND: usize = 4096;
/// While busy polling, the clock is read once per this many turns of the spin.
const SPIN_TURNS_PER_CLOCK_READ: u32 = 64;

// io_uring ABI values the io-uring 0.6 crate does not expose (include/uapi/linux/io_uring.h).
const IORING_ENTER_GETEVENTS: u32 = 1;
const IORING_ENTER_EXT_ARG: u32 = 1 << 3;
const IORING_ENTER_REGISTERED_RING: u32 = 1 << 4;
const IORING_REGISTER_RING_FDS: libc::c_long = 20;

/// `struct io_uring_getevents_arg` (Linux 6.12+ reads `min_wait_usec`; older kernels call it
/// padding).
#[repr(C)]
struct GeteventsArg {
    sigmask: u64,
    sigmask_sz: u32,
    min_wait_usec: u32,
    ts: u64,
}

/// `struct io_uring_rsrc_update`, to register the ring's own descriptor.
#[repr(C)]
struct RsrcUpdate {
    offset: u32,
    resv: u32,
    data: u64,
}

/// Which engine runs the worker's data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// monoio tasks waiting on readiness (io_uring poll requests, or epoll).
    Readiness,
    /// This module: completions drive sans-IO connection machines.
    Completion,
}

impl Engine {
    /// The completion engine is the default: it costs less CPU per connection and per
    /// request/response than the readiness engine, and less memory per idle connection, and
    /// bulk flows are level since it splices (perf/RESULTS.md, "Round 5").
    /// `GATEWAY_ENGINE=readiness` selects the readiness engine (for comparison, or a kernel
    /// whose io_uring misbehaves); `uring`, anything else or no variable, the completion
    /// engine. Where the completion engine's ring cannot be set up, the worker logs it and
    /// runs the readiness engine anyway (epoll where there is no io_uring at all).
    pub fn current() -> Engine {
        Engine::from_setting(std::env::var("GATEWAY_ENGINE").ok().as_deref())
    }

    fn from_setting(setting: Option<&str>) -> Engine {
        match setting {
            Some("readiness") => Engine::Readiness,
            _ => Engine::Completion,
        }
    }
}

// What a completion belongs to: the operation kind in the top byte, the connection or
// listener index in the low 32 bits.
const KIND_SHIFT: u32 = 56;
const ACCEPT: u64 = 1;
const RECV_UPSTREAM: u64 = 2;
const RECV_DOWNSTREAM: u64 = 3;
const SEND_UPSTREAM: u64 = 4;
const SEND_DOWNSTREAM: u64 = 5;
const CONNECT: u64 = 6;
const CONNECT_TIMEOUT: u64 = 7;
const SHUTDOWN: u64 = 8;
const TICK_TIMER: u64 = 9;
/// Cancellations: tracked like every operation on a connection, so that its sockets are
/// closed only once nothing pending can still name their descriptors.
const CANCEL: u64 = 10;
/// Closes of sockets nothing refers to any more, and the listeners' cancellations.
const UNTRACKED: u64 = 11;
/// One-shot readiness polls of a spliced direction: bytes on its source, room on its
/// destination.
const POLL_IN_UPSTREAM: u64 = 12;
const POLL_IN_DOWNSTREAM: u64 = 13;
const POLL_OUT_UPSTREAM: u64 = 14;
const POLL_OUT_DOWNSTREAM: u64 = 15;

fn user_data(kind: u64, index: usize) -> u64 {
    (kind << KIND_SHIFT) | (index as u64 & 0xffff_ffff)
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Upstream => 0,
        Side::Downstream | Side::Gateway => 1,
    }
}

/// The worker's provided-buffer ring: `BUFFERS` buffers of `BUFFER_BYTES`, handed to the
/// kernel through a ring of entries it takes from as receives complete.
struct BufferPool {
    memory: *mut u8,
    /// Bytes per buffer (see [`buffer_bytes`]).
    buffer_bytes: usize,
    entries: *mut types::BufRingEntry,
    /// Our copy of the ring's tail (the kernel reads the shared one).
    tail: std::cell::Cell<u16>,
    /// Buffers given back by connections, to be provided again at the next loop turn.
    returned: RefCell<Vec<u16>>,
}

fn memory_layout(buffer_bytes: usize) -> Layout {
    // A valid layout: non-zero size (`buffer_bytes` is at least 4 KiB and at most 1 MiB, see
    // `buffer_bytes`), power-of-two alignment.
    Layout::from_size_align(buffer_bytes * BUFFERS as usize, 4096).expect("bounded layout")
}

fn ring_layout() -> Layout {
    Layout::from_size_align(
        std::mem::size_of::<types::BufRingEntry>() * BUFFERS as usize,
        4096,
    )
    .expect("constant layout")
}

impl BufferPool {
    fn new(buffer_bytes: usize) -> io::Result<BufferPool> {
        // SAFETY: both layouts have a non-zero size; a null result is checked.
        let (memory, entries) = unsafe {
            (
                alloc::alloc(memory_layout(buffer_bytes)),
                alloc::alloc_zeroed(ring_layout()).cast::<types::BufRingEntry>(),
            )
        };
        if memory.is_null() || entries.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let pool = BufferPool {
            memory,
            buffer_bytes,
            entries,
            tail: std::cell::Cell::new(0),
            returned: RefCell::new((0..BUFFERS).collect()),
        };
        pool.provide();
        Ok(pool)
    }

    /// Put every returned buffer back into the ring and publish the new tail.
    fn provide(&self) {
        let mut returned = self.returned.borrow_mut();
        if returned.is_empty() {
            return;
        }
        let mut tail = self.tail.get();
        for bid in returned.drain(..) {
            let index = usize::from(tail & (BUFFERS - 1));
            // SAFETY: `index < BUFFERS`, inside the ring allocation; the kernel never writes
            // entries, it only reads those below the published tail, and this one is not yet
            // published. `bid < BUFFERS`, so the address is inside `memory`.
            unsafe {
                let entry = &mut *self.entries.add(index);
                entry.set_addr(self.memory.add(usize::from(bid) * self.buffer_bytes) as u64);
                entry.set_len(self.buffer_bytes as u32);
                entry.set_bid(bid);
            }
            tail = tail.wrapping_add(1);
        }
        self.tail.set(tail);
        // SAFETY: the tail field lives in the first entry of the ring allocation, which stays
        // valid for the pool's life; the kernel reads it, so it is written atomically with
        // release ordering after the entries.
        unsafe {
            let shared_tail = types::BufRingEntry::tail(self.entries).cast_mut();
            (*shared_tail.cast::<AtomicU16>()).store(tail, Ordering::Release);
        }
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts. The pool is dropped only after the
        // ring (see `Engine` field order), so the kernel no longer uses it.
        unsafe {
            alloc::dealloc(self.memory, memory_layout(self.buffer_bytes));
            alloc::dealloc(self.entries.cast::<u8>(), ring_layout());
        }
    }
}

/// One received buffer, lent to a connection until it is sent; dropping it gives it back.
pub struct RingBuffer {
    pool: Rc<BufferPool>,
    bid: u16,
    len: usize,
}

impl AsRef<[u8]> for RingBuffer {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the kernel wrote `len <= buffer_bytes` bytes into buffer `bid` and will not
        // write it again before it is provided again, which happens only after this value is
        // dropped. The pool (and its memory) lives as long as this `Rc`.
        unsafe {
            std::slice::from_raw_parts(
                self.pool
                    .memory
                    .add(usize::from(self.bid) * self.pool.buffer_bytes),
                self.len,
            )
        }
    }
}

impl Drop for RingBuffer {
    fn drop(&mut self) {
        self.pool.returned.borrow_mut().push(self.bid);
    }
}

/// What the access log needs beyond the machine (only kept with an access log).
struct LogFacts {
    client: SocketAddr,
    local: Option<SocketAddr>,
    started_wall: SystemTime,
    route: Option<String>,
    upstream: Option<SocketAddr>,
    upstream_connect: Option<Duration>,
    bytes_received: u64,
    bytes_sent: u64,
}

struct Conn {
    machine: Machine<RingBuffer>,
    listener: usize,
    client: Option<TcpStream>,
    upstream: Option<socket2::Socket>,
    /// The connect target and its timeout: the kernel reads them when the entries are
    /// submitted, so they live here until the connect completes.
    connect_to: Option<Box<(socket2::SockAddr, types::Timespec)>>,
    /// Operations with the kernel that will still post a completion for this connection.
    in_flight: u32,
    /// A multishot receive is armed, per side (index: `side_index`).
    receiving: [bool; 2],
    /// The machine wants this side read (it asked to receive and has not paused it).
    wanted: [bool; 2],
    /// The receive stopped for want of a buffer: re-armed at the next loop turn.
    starved: [bool; 2],
    /// A send to this side is with the kernel (index: `side_index`).
    sending: [bool; 2],
    /// A readiness poll for bytes on / room on this side is with the kernel.
    polling_in: [bool; 2],
    polling_out: [bool; 2],
    /// The machine asked for a poll for bytes on this side while its receive was still
    /// ending: armed when the receive's last completion arrives.
    poll_after_receive: [bool; 2],
    /// The pipe of the direction that reads each side, while it splices. Boxed: only a
    /// connection that ever spliced pays for it (an idle connection's `Conn` stays small).
    pipes: Option<Box<[Option<crate::sys::Pipe>; 2]>>,
    /// Both sockets were made non-blocking (splice(2) needs it).
    nonblocking: bool,
    /// The destination metric slot, once routed.
    slot: Option<usize>,
    /// Relaying started (destination gauge held).
    relaying: bool,
    /// The sockets were handed to close entries (or a panic ended the connection).
    closed: bool,
    started: Instant,
    log: Option<Box<LogFacts>>,
}

struct ListenerEntry {
    slot: usize,
    socket: Option<TcpListener>,
    armed: bool,
    stopping: bool,
}

/// The engine of one worker thread. Field order matters: the ring is dropped before the
/// connections and the buffer pool whose memory it may still reference.
pub struct Completion {
    ring: IoUring,
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<usize>,
    listeners: Vec<ListenerEntry>,
    /// Receives to re-arm at the next loop turn (see `rearm_starved`).
    starved: Vec<(usize, Side)>,
    pool: Rc<BufferPool>,
    tick: Box<types::Timespec>,
    /// The machines' actions and notes, one buffer reused for every connection.
    out: Output,
    worker: Rc<WorkerContext>,
    /// Accepting paused after EMFILE/ENFILE/ENOMEM until this instant.
    accept_paused_until: Option<Instant>,
    /// The ring's index among the thread's registered ring descriptors: `io_uring_enter`
    /// then skips looking the ring's descriptor up in the (shared, so atomically counted)
    /// file table.
    registered_ring: Option<u32>,
    /// The counted wait's `min_wait_usec`; 0 when it is off (the kernel is older than 6.12,
    /// which ignores the field, or `GATEWAY_URING_MIN_WAIT_US=0`).
    min_wait: u32,
    /// Entries pushed since the last `io_uring_enter` that usually complete during the
    /// submission itself (small sends, cancellations, closes).
    expect_inline: u32,
    /// `[workers] busy_poll`: spin this long before sleeping on the ring.
    busy_poll: Option<Duration>,
}

impl Completion {
    /// Set up the ring (the best setup this kernel accepts, as the readiness engine:
    /// `SINGLE_ISSUER|DEFER_TASKRUN` first) and the buffer pool. An error means this kernel
    /// lacks something the engine needs; the caller falls back to readiness.
    pub fn new(worker: Rc<WorkerContext>) -> io::Result<Completion> {
        let setups = RingSetup::preference();
        let mut built = Err(io::Error::other("no io_uring setup to try"));
        for (index, setup) in setups.iter().enumerate() {
            let mut builder = setup.uring_builder();
            if worker.busy_poll().is_some() && *setup == RingSetup::Defer {
                // The kernel then flags the shared ring when completion work is waiting for
                // this thread, which a spin can watch without a system call.
                builder.setup_taskrun_flag();
            }
            built = builder.setup_cqsize(SQ_ENTRIES * 4).build(SQ_ENTRIES);
            match &built {
                Ok(_) => {
                    tracing::info!(
                        worker = worker.id,
                        ring_setup = setup.name(),
                        engine = "completion",
                        "io_uring ring set up"
                    );
                    break;
                }
                Err(error)
                    if error.raw_os_error() == Some(libc::EINVAL) && index + 1 < setups.len() => {}
                Err(_) => break,
            }
        }
        let ring = built?;
        let pool = Rc::new(BufferPool::new(buffer_bytes())?);
        // SAFETY: the ring of entries stays allocated until the pool is dropped, which is
        // after the ring (field order), so for as long as the registration exists.
        unsafe {
            ring.submitter()
                .register_buf_ring(pool.entries as u64, BUFFERS, BUFFER_GROUP)?;
        }
        let registered_ring = register_ring_fd(&ring);
        let busy_poll = worker.busy_poll();
        Ok(Completion {
            busy_poll,
            registered_ring,
            min_wait: if kernel_at_least(6, 12) {
                min_wait_us()
            } else {
                0
            },
            expect_inline: 0,
            ring,
            conns: Vec::new(),
            free: Vec::new(),
            listeners: Vec::new(),
            starved: Vec::new(),
            pool,
            tick: Box::new(types::Timespec::from(TICK)),
            out: Output::default(),
            worker,
            accept_paused_until: None,
        })
    }

    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: every pointer in `entry` (buffers pending in a machine's queue, a boxed
        // address and timespec in its `Conn`, the boxed tick timespec) stays valid until the
        // entry completes: a connection is freed only once `in_flight` is back to zero.
        unsafe {
            while self.ring.submission().push(&entry).is_err() {
                if let Err(error) = self.ring.submit() {
                    tracing::warn!(%error, "io_uring submit failed");
                }
            }
        }
    }

    /// Submit what was pushed and wait for the next event, in one `io_uring_enter`.
    ///
    /// Entries that complete during the submission (a send to a socket with room, a
    /// cancellation, a close) post their completions before the wait starts, and a plain
    /// "wait for 1" would then return at once: one more `io_uring_enter` per relayed message
    /// just to collect a send's completion. So the wait asks for those completions plus one,
    /// with `min_wait_usec` bounding the cost of a guess that was wrong (a send that had to
    /// wait for room): after it, the kernel returns as soon as anything new arrived.
    fn enter(&mut self) -> io::Result<usize> {
        let expected = std::mem::take(&mut self.expect_inline);
        self.enter_waiting(1 + expected)
    }

    /// `io_uring_enter`: submit what is queued, run completion work due to this thread, and
    /// wait until `want` completions are in the queue (`want` 0: do not wait).
    fn enter_waiting(&mut self, want: u32) -> io::Result<usize> {
        let to_submit = self.ring.submission().len() as u32;
        let mut flags = IORING_ENTER_GETEVENTS;
        let fd = match self.registered_ring {
            Some(index) => {
                flags |= IORING_ENTER_REGISTERED_RING;
                index as libc::c_long
            }
            None => self.ring.as_raw_fd() as libc::c_long,
        };
        let arg = GeteventsArg {
            sigmask: 0,
            sigmask_sz: 0,
            min_wait_usec: self.min_wait,
            ts: 0,
        };
        let (want, arg_pointer, arg_size) = if want > 1 && self.min_wait > 0 {
            flags |= IORING_ENTER_EXT_ARG;
            (
                want,
                std::ptr::from_ref(&arg).cast::<libc::c_void>(),
                std::mem::size_of::<GeteventsArg>(),
            )
        } else {
            // Without `min_wait_usec` a wrong guess could hold an event back until the tick.
            (want.min(1), std::ptr::null(), 0)
        };
        // SAFETY: the submission queue entries were written by `push` (their pointers are
        // valid until completion, see there); `arg` lives until the call returns, and without
        // `EXT_ARG` the null signal mask means "no mask".
        let result = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                fd,
                libc::c_long::from(to_submit),
                libc::c_long::from(want),
                libc::c_long::from(flags),
                arg_pointer,
                arg_size,
            )
        };
        if result < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(result as usize)
        }
    }

    /// `[workers] busy_poll`: submit what is queued, then spin for up to `budget` watching the
    /// completion queue and the kernel's "completion work is waiting" flag, without a system
    /// call, before the caller sleeps on the ring. True when completions are ready to be
    /// read (the caller then skips its wait).
    fn spin(&mut self, budget: Duration) -> bool {
        self.expect_inline = 0;
        if let Err(error) = self.enter_waiting(0) {
            tracing::debug!(%error, "io_uring_enter (busy poll) failed");
            return false;
        }
        let deadline = Instant::now() + budget;
        let mut turns: u32 = 0;
        loop {
            if !self.ring.completion().is_empty() {
                return true;
            }
            if self.ring.submission().taskrun() {
                // Completions were raised for this thread: an enter that does not wait runs
                // them into the queue.
                return self.enter_waiting(0).is_ok();
            }
            std::hint::spin_loop();
            turns = turns.wrapping_add(1);
            if turns % SPIN_TURNS_PER_CLOCK_READ == 0 && Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Serve until the thread ends (as the readiness engine, a worker runs for the process's
    /// life).
    pub fn run(
        mut self,
        listeners: Vec<(usize, TcpListener)>,
        commands: Receiver<WorkerCommand>,
        started: std::sync::mpsc::Sender<Result<usize, String>>,
    ) {
        for (slot, socket) in listeners {
            self.listen(slot, socket);
        }
        let _ = started.send(Ok(self.worker.id));
        tracing::info!(
            worker = self.worker.id,
            registered_ring = self.registered_ring.is_some(),
            min_wait = self.min_wait,
            busy_poll_us = self.busy_poll.map_or(0, |spin| spin.as_micros() as u64),
            "completion engine: multishot accept and receive, provided buffers"
        );
        self.push(
            opcode::Timeout::new(&*self.tick)
                .build()
                .user_data(user_data(TICK_TIMER, 0)),
        );
        let mut completions: Vec<(u64, i32, u32)> = Vec::with_capacity(256);
        loop {
            self.pool.provide();
            self.rearm_starved();
            if let Some(budget) = self.busy_poll {
                if self.spin(budget) {
                    self.drain_completions(&mut completions, &commands);
                    continue;
                }
            }
            match self.enter() {
                Ok(_) => {}
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => {}
                Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {}
                Err(error) => {
                    tracing::error!(worker = self.worker.id, %error, "io_uring_enter failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            self.drain_completions(&mut completions, &commands);
        }
    }

    /// Handle every completion in the queue (`completions` is the loop's reused buffer).
    fn drain_completions(
        &mut self,
        completions: &mut Vec<(u64, i32, u32)>,
        commands: &Receiver<WorkerCommand>,
    ) {
        completions.clear();
        completions.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
        );
        for &(data, result, flags) in completions.iter() {
            let kind = data >> KIND_SHIFT;
            let index = (data & 0xffff_ffff) as usize;
            match kind {
                ACCEPT => self.accepted(index, result, flags),
                TICK_TIMER => self.on_tick(commands),
                UNTRACKED => {}
                _ => self.completed(kind, index, result, flags),
            }
        }
    }

    fn listen(&mut self, slot: usize, socket: TcpListener) {
        metrics::add(&self.worker.stats().listeners[slot].sockets_open, 1);
        let index = self.listeners.len();
        self.listeners.push(ListenerEntry {
            slot,
            socket: Some(socket),
            armed: false,
            stopping: false,
        });
        self.arm_accept(index);
    }

    fn arm_accept(&mut self, index: usize) {
        let Some(entry) = self.listeners.get_mut(index) else {
            return;
        };
        let Some(socket) = &entry.socket else {
            return;
        };
        if entry.armed || entry.stopping {
            return;
        }
        entry.armed = true;
        let fd = socket.as_raw_fd();
        self.push(
            opcode::AcceptMulti::new(types::Fd(fd))
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(user_data(ACCEPT, index)),
        );
    }

    /// Stop accepting on listener `index`: cancel its multishot accept. Its socket is closed
    /// when the accept's last completion arrives, so no connection it took is lost.
    fn stop_listener(&mut self, index: usize) {
        let Some(entry) = self.listeners.get_mut(index) else {
            return;
        };
        if entry.stopping || entry.socket.is_none() {
            return;
        }
        entry.stopping = true;
        if entry.armed {
            self.push(
                opcode::AsyncCancel::new(user_data(ACCEPT, index))
                    .build()
                    .user_data(user_data(UNTRACKED, 0)),
            );
        } else {
            self.close_listener_socket(index);
        }
    }

    fn close_listener_socket(&mut self, index: usize) {
        if let Some(entry) = self.listeners.get_mut(index) {
            if entry.socket.take().is_some() {
                metrics::sub(&self.worker.stats().listeners[entry.slot].sockets_open, 1);
            }
        }
    }

    fn accepted(&mut self, index: usize, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        let Some(entry) = self.listeners.get_mut(index) else {
            return;
        };
        let slot = entry.slot;
        if !more {
            entry.armed = false;
        }
        if result >= 0 {
            // SAFETY: a successful accept completion carries a new descriptor that nothing
            // else owns.
            let stream = unsafe { TcpStream::from_raw_fd(result) };
            self.admit(slot, stream);
        } else {
            let error = io::Error::from_raw_os_error(-result);
            match -result {
                libc::ECANCELED | libc::EAGAIN | libc::EINTR | libc::ECONNABORTED => {}
                _ => {
                    let reason = AcceptError::classify(&error);
                    self.worker.stats().listeners[slot].accept_error(reason);
                    if reason != AcceptError::Other {
                        self.accept_paused_until = Some(Instant::now() + ACCEPT_ERROR_PAUSE);
                        self.worker.warn_accept_pause(&error);
                    } else {
                        tracing::debug!(%error, "accept failed");
                    }
                }
            }
        }
        if !more {
            let stopping = self.listeners[index].stopping;
            if stopping {
                self.close_listener_socket(index);
            } else if self.accept_paused_until.is_none() {
                self.arm_accept(index);
            }
        }
    }

    fn admit(&mut self, listener: usize, stream: TcpStream) {
        let stats = self.worker.stats();
        let listener_stats = &stats.listeners[listener];
        if stats.connections_active.load(Ordering::Relaxed)
            >= self.worker.max_connections_per_worker() as u64
        {
            metrics::add(&listener_stats.rejected_max_connections, 1);
            if self.worker.access_log_enabled() {
                if let Ok(peer) = stream.peer_addr() {
                    self.worker.log_refused(
                        listener,
                        stream.local_addr().ok(),
                        peer,
                        Close::new(Side::Gateway, Reason::MaxConnections),
                    );
                }
            }
            return;
        }
        metrics::add(&listener_stats.accepted, 1);
        metrics::add(&listener_stats.active, 1);
        metrics::add(&stats.connections_active, 1);
        let now = Instant::now();
        // The server name is kept for the access log and for debug lines only.
        let names = self.worker.access_log_enabled() || tracing::enabled!(tracing::Level::DEBUG);
        let log = if self.worker.access_log_enabled() {
            stream.peer_addr().ok().map(|client| {
                Box::new(LogFacts {
                    client,
                    local: stream.local_addr().ok(),
                    started_wall: SystemTime::now(),
                    route: None,
                    upstream: None,
                    upstream_connect: None,
                    bytes_received: 0,
                    bytes_sent: 0,
                })
            })
        } else {
            None
        };
        let conn = Box::new(Conn {
            machine: Machine::new(self.worker.snapshot(), now, names)
                .with_relay_mode(Mode::current(), BULK_READ.min(self.pool.buffer_bytes)),
            listener,
            client: Some(stream),
            upstream: None,
            connect_to: None,
            in_flight: 0,
            receiving: [false; 2],
            wanted: [false; 2],
            starved: [false; 2],
            sending: [false; 2],
            polling_in: [false; 2],
            polling_out: [false; 2],
            poll_after_receive: [false; 2],
            pipes: None,
            nonblocking: false,
            slot: None,
            relaying: false,
            closed: false,
            started: now,
            log,
        });
        let index = match self.free.pop() {
            Some(index) => {
                self.conns[index] = Some(conn);
                index
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        // The first input starts the machine (it asks to receive from the client).
        self.feed(index, Input::Tick);
    }

    fn completed(&mut self, kind: u64, index: usize, result: i32, flags: u32) {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        let more = cqueue::more(flags);
        let mut arm_poll_in = None;
        let input = match kind {
            RECV_UPSTREAM | RECV_DOWNSTREAM => {
                let side = if kind == RECV_UPSTREAM {
                    Side::Upstream
                } else {
                    Side::Downstream
                };
                let at = side_index(side);
                let buffer = cqueue::buffer_select(flags).map(|bid| RingBuffer {
                    pool: Rc::clone(&self.pool),
                    bid,
                    len: usize::try_from(result).unwrap_or(0),
                });
                if !more {
                    conn.receiving[at] = false;
                    conn.in_flight -= 1;
                    if conn.poll_after_receive[at] {
                        conn.poll_after_receive[at] = false;
                        if !conn.closed {
                            arm_poll_in = Some(side);
                        }
                    }
                }
                if conn.closed {
                    None
                } else if result > 0 {
                    match buffer {
                        Some(buffer) => {
                            if !more && conn.wanted[at] {
                                conn.starved[at] = true;
                            }
                            Some(Input::Received(side, buffer))
                        }
                        None => Some(Input::Failed(side)),
                    }
                } else if result == 0 {
                    conn.wanted[at] = false;
                    Some(Input::Eof(side))
                } else if result == -libc::ENOBUFS {
                    // Every buffer is lent out: try again once some came back.
                    conn.starved[at] = conn.wanted[at];
                    None
                } else if result == -libc::ECANCELED {
                    // A pause; a resume asked for meanwhile re-arms.
                    conn.starved[at] = conn.wanted[at];
                    None
                } else {
                    tracing::debug!(?side, result, "receive failed");
                    conn.wanted[at] = false;
                    Some(Input::Failed(side))
                }
            }
            SEND_UPSTREAM | SEND_DOWNSTREAM => {
                conn.in_flight -= 1;
                let side = if kind == SEND_UPSTREAM {
                    Side::Upstream
                } else {
                    Side::Downstream
                };
                conn.sending[side_index(side)] = false;
                if conn.closed {
                    None
                } else if result >= 0 {
                    Some(Input::Sent(side, result as usize))
                } else {
                    tracing::debug!(?side, result, "send failed");
                    Some(Input::Failed(side))
                }
            }
            CONNECT => {
                conn.in_flight -= 1;
                conn.connect_to = None;
                if conn.closed {
                    None
                } else if result >= 0 {
                    Some(Input::Connected(Ok(())))
                } else {
                    Some(Input::Connected(Err(classify_connect(-result))))
                }
            }
            CONNECT_TIMEOUT | SHUTDOWN | CANCEL => {
                conn.in_flight -= 1;
                None
            }
            POLL_IN_UPSTREAM | POLL_IN_DOWNSTREAM | POLL_OUT_UPSTREAM | POLL_OUT_DOWNSTREAM => {
                conn.in_flight -= 1;
                let side = if kind == POLL_IN_UPSTREAM || kind == POLL_OUT_UPSTREAM {
                    Side::Upstream
                } else {
                    Side::Downstream
                };
                let for_bytes = kind == POLL_IN_UPSTREAM || kind == POLL_IN_DOWNSTREAM;
                if for_bytes {
                    conn.polling_in[side_index(side)] = false;
                } else {
                    conn.polling_out[side_index(side)] = false;
                }
                if conn.closed || result == -libc::ECANCELED {
                    None
                } else if result >= 0 {
                    // Bytes, a FIN or an error: the splice that follows tells which.
                    Some(if for_bytes {
                        Input::Readable(side)
                    } else {
                        Input::Writable(side)
                    })
                } else {
                    tracing::debug!(?side, result, "poll failed");
                    Some(Input::Failed(side))
                }
            }
            _ => None,
        };
        if let Some(side) = arm_poll_in {
            self.arm_poll(index, side, true);
        }
        if let Some(Some(conn)) = self.conns.get(index) {
            for side in [Side::Upstream, Side::Downstream] {
                let at = side_index(side);
                if conn.starved[at] && !conn.receiving[at] {
                    self.starved.push((index, side));
                }
            }
        }
        if let Some(input) = input {
            self.feed(index, input);
        } else {
            self.maybe_free(index);
        }
    }

    /// Give the machine an input and carry out what it asks, containing a panic to this
    /// connection.
    fn feed(&mut self, index: usize, input: Input<RingBuffer>) {
        let now = Instant::now();
        let worker = Rc::clone(&self.worker);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            // The worker's one output buffer; a nested feed (a connect that fails at once)
            // finds it taken and uses a fresh one.
            let mut out = std::mem::take(&mut self.out);
            if let Some(Some(conn)) = self.conns.get_mut(index) {
                conn.machine.handle_with(input, now, &*worker, &mut out);
            }
            // Notes first: an action (a close) reads what they recorded (the route's slot).
            self.count_notes(index, &mut out.notes);
            while let Some(action) = out.actions.pop_front() {
                if self
                    .conns
                    .get(index)
                    .and_then(Option::as_ref)
                    .is_none_or(|conn| conn.closed)
                {
                    break;
                }
                // A splice is made here and now: its result goes straight back to the
                // machine, whose next actions join the queue.
                if let Some(input) = self.act(index, action) {
                    if let Some(Some(conn)) = self.conns.get_mut(index) {
                        conn.machine.handle_with(input, now, &*worker, &mut out);
                    }
                    self.count_notes(index, &mut out.notes);
                }
            }
            out.actions.clear();
            out.notes.clear();
            self.out = out;
            self.maybe_free(index);
        }));
        if outcome.is_err() {
            metrics::add(&self.worker.stats().connection_panics, 1);
            tracing::error!(
                worker = self.worker.id,
                "a connection panicked; it was closed and the worker goes on"
            );
            self.abandon(index);
        }
    }

    /// After a panic: reset both sockets and forget the machine's state.
    fn abandon(&mut self, index: usize) {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        if !conn.closed {
            conn.closed = true;
            self.release_gauges(index);
            self.cancel_all(index, true);
        }
        self.maybe_free(index);
    }

    /// Carry out one action; a splice answers at once, with the input returned.
    fn act(&mut self, index: usize, action: Action) -> Option<Input<RingBuffer>> {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return None;
        };
        match action {
            Action::Receive(side) => {
                let at = side_index(side);
                conn.wanted[at] = true;
                if !conn.receiving[at] {
                    self.arm_receive(index, side);
                }
            }
            Action::Pause(side) => {
                let at = side_index(side);
                conn.wanted[at] = false;
                conn.starved[at] = false;
                if conn.receiving[at] {
                    let kind = recv_kind(side);
                    conn.in_flight += 1;
                    self.push(
                        opcode::AsyncCancel::new(user_data(kind, index))
                            .build()
                            .user_data(user_data(CANCEL, index)),
                    );
                }
            }
            Action::Send(side) => {
                let fd = conn_fd(conn, side)?;
                let pending = conn.machine.pending(side);
                let (pointer, length) = (pending.as_ptr(), pending.len() as u32);
                conn.in_flight += 1;
                conn.sending[side_index(side)] = true;
                let kind = if side == Side::Upstream {
                    SEND_UPSTREAM
                } else {
                    SEND_DOWNSTREAM
                };
                if length as usize <= SMALL_SEND {
                    self.expect_inline += 1;
                }
                self.push(
                    opcode::Send::new(types::Fd(fd), pointer, length)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                        .user_data(user_data(kind, index)),
                );
            }
            Action::Shutdown(side) => {
                let fd = conn_fd(conn, side)?;
                conn.in_flight += 1;
                self.push(
                    opcode::Shutdown::new(types::Fd(fd), libc::SHUT_WR)
                        .build()
                        .user_data(user_data(SHUTDOWN, index)),
                );
            }
            Action::Connect { address, timeout } => self.connect(index, address, timeout),
            Action::Close(close) => self.close(index, close),
            Action::PollIn(side) => {
                let at = side_index(side);
                if conn.receiving[at] {
                    // Its last completion may still carry bytes, which must reach the
                    // machine before any spliced byte: the poll waits for it.
                    conn.poll_after_receive[at] = true;
                } else {
                    self.arm_poll(index, side, true);
                }
            }
            Action::PollOut(side) => self.arm_poll(index, side, false),
            Action::SpliceIn(side) => return Some(splice_in(conn, side)),
            Action::SpliceOut(side) => return Some(splice_out(conn, side)),
            Action::Unsplice(side) => {
                let at = side_index(side);
                conn.poll_after_receive[at] = false;
                // Empty (the machine leaves splicing only with nothing piped): closing it
                // loses no byte.
                if let Some(pipes) = conn.pipes.as_mut() {
                    pipes[at] = None;
                }
                if conn.polling_in[at] {
                    let kind = if side == Side::Upstream {
                        POLL_IN_UPSTREAM
                    } else {
                        POLL_IN_DOWNSTREAM
                    };
                    conn.in_flight += 1;
                    self.push(
                        opcode::AsyncCancel::new(user_data(kind, index))
                            .build()
                            .user_data(user_data(CANCEL, index)),
                    );
                }
            }
        }
        None
    }

    /// Arm a one-shot poll on `side`: for bytes (`for_bytes`) or for room.
    fn arm_poll(&mut self, index: usize, side: Side, for_bytes: bool) {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        let Some(fd) = conn_fd(conn, side) else {
            return;
        };
        let at = side_index(side);
        let (flag, mask, kind) = match (for_bytes, side) {
            (true, Side::Upstream) => (&mut conn.polling_in[at], libc::POLLIN, POLL_IN_UPSTREAM),
            (true, _) => (&mut conn.polling_in[at], libc::POLLIN, POLL_IN_DOWNSTREAM),
            (false, Side::Upstream) => {
                (&mut conn.polling_out[at], libc::POLLOUT, POLL_OUT_UPSTREAM)
            }
            (false, _) => (
                &mut conn.polling_out[at],
                libc::POLLOUT,
                POLL_OUT_DOWNSTREAM,
            ),
        };
        if *flag {
            return;
        }
        *flag = true;
        conn.in_flight += 1;
        self.push(
            opcode::PollAdd::new(types::Fd(fd), (mask | libc::POLLRDHUP) as u32)
                .build()
                .user_data(user_data(kind, index)),
        );
    }

    fn arm_receive(&mut self, index: usize, side: Side) {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        let Some(fd) = conn_fd(conn, side) else {
            return;
        };
        let at = side_index(side);
        conn.receiving[at] = true;
        conn.starved[at] = false;
        conn.in_flight += 1;
        self.push(
            opcode::RecvMulti::new(types::Fd(fd), BUFFER_GROUP)
                .build()
                .user_data(user_data(recv_kind(side), index)),
        );
    }

    /// Re-arm receives that stopped (no buffer was left, a pause was lifted, the kernel ended
    /// a multishot), once per loop turn, after buffers were given back.
    fn rearm_starved(&mut self) {
        let starved = std::mem::take(&mut self.starved);
        for (index, side) in starved {
            let at = side_index(side);
            let ready = self
                .conns
                .get(index)
                .and_then(Option::as_ref)
                .is_some_and(|conn| {
                    conn.starved[at] && conn.wanted[at] && !conn.receiving[at] && !conn.closed
                });
            if ready {
                self.arm_receive(index, side);
            }
        }
    }

    fn connect(&mut self, index: usize, address: SocketAddr, timeout: Duration) {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        if let Some(previous) = conn.upstream.take() {
            // Its connect completed (that is why another is asked for) and nothing else was
            // ever submitted on it.
            let fd = previous.into_raw_fd();
            self.close_fd(fd);
        }
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        let socket = match socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        ) {
            Ok(socket) => socket,
            Err(_) => {
                self.feed(index, Input::Connected(Err(ConnectFailure::Other)));
                return;
            }
        };
        let _ = socket.set_nodelay(true);
        let fd = socket.as_raw_fd();
        conn.upstream = Some(socket);
        let target = Box::new((
            socket2::SockAddr::from(address),
            types::Timespec::from(timeout),
        ));
        let (address_pointer, address_length) = (target.0.as_ptr(), target.0.len());
        let timespec: *const types::Timespec = &target.1;
        conn.connect_to = Some(target);
        conn.in_flight += 2;
        self.push(
            opcode::Connect::new(types::Fd(fd), address_pointer.cast(), address_length)
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(user_data(CONNECT, index)),
        );
        // SAFETY (for the pointer): the timespec is boxed in `conn.connect_to`, kept until
        // the connect completes, and the kernel reads it at submission.
        self.push(
            opcode::LinkTimeout::new(timespec)
                .build()
                .user_data(user_data(CONNECT_TIMEOUT, index)),
        );
    }

    /// The connection is over: count it, log it, close both sockets.
    fn close(&mut self, index: usize, close: Close) {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        conn.closed = true;
        let stats = self.worker.stats();
        if tracing::enabled!(tracing::Level::DEBUG) {
            debug_close(&self.worker, conn, close);
        }
        let listener_stats = &stats.listeners[conn.listener];
        match close.reason {
            Reason::NoRoute => metrics::add(&listener_stats.route_no_route, 1),
            Reason::Connect { .. } => {
                if let Some(slot) = conn.slot {
                    stats.destinations[slot].connect_failure(ConnectFailure::NoHealthyEndpoint);
                }
            }
            _ => {}
        }
        if let (Some(slot), Some(_)) = (conn.slot, close.label_index()) {
            stats.destinations[slot].closed(close);
            stats.connection_duration[conn.listener].observe(conn.started.elapsed());
        }
        if let Some(facts) = conn.log.take() {
            let mut record = self.worker.access_record(
                conn.listener,
                facts.local,
                facts.client,
                conn.started,
                facts.started_wall,
            );
            record.server_name = conn.machine.server_name().map(str::to_owned);
            record.route = facts.route;
            record.upstream = facts.upstream;
            record.upstream_connect = facts.upstream_connect;
            record.bytes_received = facts.bytes_received;
            record.bytes_sent = facts.bytes_sent;
            record.end(close);
            self.worker.log_access(&record);
        }
        self.release_gauges(index);
        self.cancel_all(index, close.resets());
    }

    /// End a connection's pending operations (its multishot receives, a send to a peer that
    /// does not read, a connect). Its sockets are closed once every completion is in (see
    /// `maybe_free`): an operation the kernel runs later (a shutdown is always handed to a
    /// kernel worker) looks its descriptor up by number, and a number closed too early may
    /// already belong to the next accepted connection.
    ///
    /// Each pending operation is cancelled by its `user_data`, a hashed lookup in the kernel;
    /// cancelling by descriptor walks every bucket of the ring's poll table (3.6 % of a
    /// connection's CPU at 64 connections in flight, perf/RESULTS.md). A shutdown is not
    /// cancelled: it runs to its end in a kernel worker.
    fn cancel_all(&mut self, index: usize, resets: bool) {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        if resets {
            for side in [Side::Downstream, Side::Upstream] {
                if let Some(fd) = conn_fd(conn, side) {
                    // A reset is passed on as a reset (and leaves no TIME_WAIT).
                    let _ = crate::sys::set_linger_zero(fd);
                }
            }
        }
        let mut pending = [0u64; 9];
        let mut count = 0;
        for side in [Side::Downstream, Side::Upstream] {
            let at = side_index(side);
            let upstream = side == Side::Upstream;
            if conn.polling_in[at] {
                pending[count] = if upstream {
                    POLL_IN_UPSTREAM
                } else {
                    POLL_IN_DOWNSTREAM
                };
                count += 1;
            }
            if conn.polling_out[at] {
                pending[count] = if upstream {
                    POLL_OUT_UPSTREAM
                } else {
                    POLL_OUT_DOWNSTREAM
                };
                count += 1;
            }
            if conn.receiving[at] {
                pending[count] = recv_kind(side);
                count += 1;
            }
            if conn.sending[at] {
                pending[count] = if side == Side::Upstream {
                    SEND_UPSTREAM
                } else {
                    SEND_DOWNSTREAM
                };
                count += 1;
            }
        }
        if conn.connect_to.is_some() {
            // Its linked timeout ends with it.
            pending[count] = CONNECT;
            count += 1;
        }
        conn.in_flight += count as u32;
        for &kind in &pending[..count] {
            self.expect_inline += 1;
            self.push(
                opcode::AsyncCancel::new(user_data(kind, index))
                    .build()
                    .user_data(user_data(CANCEL, index)),
            );
        }
    }

    /// Close a socket no pending operation refers to.
    fn close_fd(&mut self, fd: RawFd) {
        self.expect_inline += 1;
        self.push(
            opcode::Close::new(types::Fd(fd))
                .build()
                .user_data(user_data(UNTRACKED, 0)),
        );
    }

    fn release_gauges(&mut self, index: usize) {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        let stats = self.worker.stats();
        metrics::sub(&stats.listeners[conn.listener].active, 1);
        metrics::sub(&stats.connections_active, 1);
        if conn.relaying {
            if let Some(slot) = conn.slot {
                metrics::sub(&stats.destinations[slot].active, 1);
            }
            conn.relaying = false;
        }
    }

    fn maybe_free(&mut self, index: usize) {
        let done = self
            .conns
            .get(index)
            .and_then(Option::as_ref)
            .is_some_and(|conn| conn.closed && conn.in_flight == 0);
        if done {
            if let Some(mut conn) = self.conns[index].take() {
                for fd in take_sockets(&mut conn) {
                    self.close_fd(fd);
                }
            }
            self.free.push(index);
        }
    }

    /// Count what the machine noted (and remember it for the access log).
    fn count_notes(&mut self, index: usize, notes: &mut Vec<Note>) {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        let stats = self.worker.stats();
        let listener_stats = &stats.listeners[conn.listener];
        let snapshot = Rc::clone(conn.machine.snapshot_rc());
        for note in notes.drain(..) {
            match note {
                Note::Hello(outcome) => {
                    listener_stats.hello(outcome);
                    if matches!(outcome, HelloOutcome::SniFound | HelloOutcome::SniMissing) {
                        stats.hello_wait[conn.listener].observe(conn.started.elapsed());
                    }
                }
                Note::Routed { cluster, slot } => {
                    metrics::add(&listener_stats.route_matched, 1);
                    metrics::add(&stats.destinations[slot].connections, 1);
                    conn.slot = Some(slot);
                    if let Some(log) = conn.log.as_mut() {
                        log.route =
                            Some(snapshot.snapshot.table.cluster(cluster).pattern.to_string());
                    }
                }
                Note::ConnectFailed { address, failure } => {
                    if let Some(slot) = conn.slot {
                        stats.destinations[slot].connect_failure(failure);
                    }
                    tracing::debug!(endpoint = %address, ?failure, "upstream connect failed");
                }
                Note::Connected { address, took } => {
                    if let Some(slot) = conn.slot {
                        stats.connect_duration[slot].observe(took);
                        metrics::add(&stats.destinations[slot].active, 1);
                        conn.relaying = true;
                    }
                    if let Some(log) = conn.log.as_mut() {
                        log.upstream = Some(address);
                        log.upstream_connect = Some(took);
                    }
                }
                Note::Spliced { bytes } => {
                    metrics::add(&stats.spliced_bytes, bytes as u64);
                }
                Note::Relayed { to, bytes } => {
                    if let Some(slot) = conn.slot {
                        let destination = &stats.destinations[slot];
                        let counter = if to == Side::Upstream {
                            &destination.bytes_to_upstream
                        } else {
                            &destination.bytes_to_downstream
                        };
                        metrics::add(counter, bytes as u64);
                    }
                    if let Some(log) = conn.log.as_mut() {
                        if to == Side::Upstream {
                            log.bytes_received += bytes as u64;
                        } else {
                            log.bytes_sent += bytes as u64;
                        }
                    }
                }
            }
        }
    }

    fn on_tick(&mut self, commands: &Receiver<WorkerCommand>) {
        let now = Instant::now();
        metrics::add(&self.worker.stats().heartbeat, 1);
        while let Ok(command) = commands.try_recv() {
            match command {
                WorkerCommand::Listen { slot, socket } => {
                    if let Err(error) = socket.set_nonblocking(true) {
                        tracing::error!(worker = self.worker.id, %error, "cannot accept on a new listener");
                        continue;
                    }
                    self.listen(slot, socket);
                }
                WorkerCommand::Close { slot } => {
                    let indices: Vec<usize> = (0..self.listeners.len())
                        .filter(|&index| self.listeners[index].slot == slot)
                        .collect();
                    for index in indices {
                        self.stop_listener(index);
                    }
                }
            }
        }
        if !self.worker.accepting() {
            for index in 0..self.listeners.len() {
                self.stop_listener(index);
            }
        }
        if self.accept_paused_until.is_some_and(|until| now >= until) {
            self.accept_paused_until = None;
            for index in 0..self.listeners.len() {
                self.arm_accept(index);
            }
        }
        self.worker.publish_health(now);
        for index in 0..self.conns.len() {
            if self.conns[index].as_ref().is_some_and(|conn| !conn.closed) {
                self.feed(index, Input::Tick);
            }
        }
        self.push(
            opcode::Timeout::new(&*self.tick)
                .build()
                .user_data(user_data(TICK_TIMER, 0)),
        );
    }
}

/// The debug lines of a connection that ended before relaying, as the readiness engine writes
/// them. Never the raw name at info level: it is client-controlled; with redaction on, no
/// address and no unrouted name at debug level either.
fn debug_close(worker: &WorkerContext, conn: &Conn, close: Close) {
    let client = conn
        .client
        .as_ref()
        .and_then(|client| client.peer_addr().ok());
    let redact = worker.redact_addresses();
    match close.reason {
        Reason::Hello(_) => {
            let reason = close.termination();
            match client {
                Some(client) if !redact => {
                    tracing::debug!(client = %client, reason, "closed before routing");
                }
                _ => tracing::debug!(reason, "closed before routing"),
            }
        }
        Reason::NoRoute => {
            let server_name = conn.machine.server_name();
            match client {
                Some(client) if !redact => {
                    tracing::debug!(client = %client, server_name = ?server_name, "no route");
                }
                _ => tracing::debug!("no route"),
            }
        }
        _ => tracing::debug!(worker = worker.id, ?close, "connection closed"),
    }
}

/// How long accept pauses after EMFILE/ENFILE/ENOMEM (as the readiness engine).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

fn recv_kind(side: Side) -> u64 {
    if side == Side::Upstream {
        RECV_UPSTREAM
    } else {
        RECV_DOWNSTREAM
    }
}

fn conn_fd(conn: &Conn, side: Side) -> Option<RawFd> {
    match side {
        Side::Upstream => conn.upstream.as_ref().map(AsRawFd::as_raw_fd),
        Side::Downstream | Side::Gateway => conn.client.as_ref().map(AsRawFd::as_raw_fd),
    }
}

/// The connection's descriptors, now owned by the caller (to be closed by entries).
fn take_sockets(conn: &mut Conn) -> Vec<RawFd> {
    let mut fds = Vec::with_capacity(2);
    if let Some(client) = conn.client.take() {
        fds.push(client.into_raw_fd());
    }
    if let Some(upstream) = conn.upstream.take() {
        fds.push(upstream.into_raw_fd());
    }
    fds
}

/// Both sockets non-blocking, once: splice(2) on a blocking socket blocks whatever its flags
/// say (io_uring's own receives and sends on them are unchanged: they still wait by polling).
fn prepare_splice(conn: &mut Conn) -> io::Result<()> {
    if !conn.nonblocking {
        for side in [Side::Downstream, Side::Upstream] {
            if let Some(fd) = conn_fd(conn, side) {
                crate::sys::set_nonblocking(fd)?;
            }
        }
        conn.nonblocking = true;
    }
    Ok(())
}

/// [`Action::SpliceIn`]: one non-blocking splice from `side` into its direction's pipe (made
/// here on first use).
fn splice_in(conn: &mut Conn, side: Side) -> Input<RingBuffer> {
    let Some(fd) = conn_fd(conn, side) else {
        return Input::Failed(side);
    };
    if prepare_splice(conn).is_err() {
        return Input::NoPipe(side);
    }
    let pipes = conn.pipes.get_or_insert_with(|| Box::new([None, None]));
    let pipe = &mut pipes[side_index(side)];
    if pipe.is_none() {
        match crate::sys::Pipe::new(SPLICE_CHUNK) {
            Ok(made) => *pipe = Some(made),
            Err(error) => {
                tracing::debug!(%error, "no pipe for a bulk flow; it stays on receives");
                return Input::NoPipe(side);
            }
        }
    }
    let Some(pipe) = pipe.as_ref() else {
        return Input::NoPipe(side);
    };
    match crate::sys::splice(fd, pipe.write.as_raw_fd(), SPLICE_CHUNK) {
        Ok(0) => Input::Eof(side),
        Ok(moved) => Input::SplicedIn(side, moved),
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Input::Drained(side)
        }
        Err(error) => {
            tracing::debug!(?side, %error, "splice from a socket failed");
            Input::Failed(side)
        }
    }
}

/// [`Action::SpliceOut`]: one non-blocking splice of what the pipe holds to `side`.
fn splice_out(conn: &mut Conn, side: Side) -> Input<RingBuffer> {
    let Some(fd) = conn_fd(conn, side) else {
        return Input::Failed(side);
    };
    let source = if side == Side::Upstream {
        Side::Downstream
    } else {
        Side::Upstream
    };
    let bytes = conn.machine.piped(side);
    let Some(pipe) = conn
        .pipes
        .as_ref()
        .and_then(|pipes| pipes[side_index(source)].as_ref())
    else {
        return Input::Failed(side);
    };
    match crate::sys::splice(pipe.read.as_raw_fd(), fd, bytes) {
        Ok(0) => Input::Full(side),
        Ok(moved) => Input::SplicedOut(side, moved),
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Input::Full(side)
        }
        Err(error) => {
            tracing::debug!(?side, %error, "splice to a socket failed");
            Input::Failed(side)
        }
    }
}

fn classify_connect(errno: i32) -> ConnectFailure {
    match errno {
        libc::ECONNREFUSED => ConnectFailure::Refused,
        // The linked timeout fired and cancelled the connect.
        libc::ECANCELED | libc::ETIMEDOUT => ConnectFailure::Timeout,
        libc::ENETUNREACH | libc::EHOSTUNREACH => ConnectFailure::Unreachable,
        _ => ConnectFailure::Other,
    }
}

/// Register the ring's descriptor for the calling thread (Linux 5.18+), so that
/// `io_uring_enter` finds the ring without a file-table lookup. `None` when the kernel refuses:
/// the engine then enters with the plain descriptor. (The io-uring crate, 0.7 included, keeps
/// the registration in a `Submitter` that `IoUring::submitter` rebuilds on every call, so it is
/// done here.)
fn register_ring_fd(ring: &IoUring) -> Option<u32> {
    let mut update = RsrcUpdate {
        offset: u32::MAX,
        resv: 0,
        data: ring.as_raw_fd() as u64,
    };
    // SAFETY: `update` is a valid `io_uring_rsrc_update` for the duration of the call; the
    // kernel writes the chosen index into `offset`.
    let result = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd(),
            IORING_REGISTER_RING_FDS,
            std::ptr::from_mut(&mut update),
            1,
        )
    };
    (result == 1).then_some(update.offset)
}

/// The counted wait's bound: [`MIN_WAIT_US`], or `GATEWAY_URING_MIN_WAIT_US` (a measurement
/// knob, like `GATEWAY_RING_SETUP`).
fn min_wait_us() -> u32 {
    std::env::var("GATEWAY_URING_MIN_WAIT_US")
        .ok()
        .and_then(|value| value.parse::<u32>().ok())
        .map_or(MIN_WAIT_US, |micros| micros.min(1_000_000))
}

/// The provided buffers' size: [`BUFFER_BYTES`], or `GATEWAY_URING_BUFFER_KIB` (a
/// measurement knob, like `GATEWAY_URING_MIN_WAIT_US`), rounded to a whole page and bounded
/// to 4 KiB..=1 MiB.
fn buffer_bytes() -> usize {
    buffer_bytes_from(std::env::var("GATEWAY_URING_BUFFER_KIB").ok().as_deref())
}

/// [`buffer_bytes`] for a given knob value: the pool's layout needs a non-zero, page-aligned
/// size, and the kernel a length that fits its 32-bit field.
fn buffer_bytes_from(kib: Option<&str>) -> usize {
    kib.and_then(|value| value.parse::<usize>().ok())
        .map_or(BUFFER_BYTES, |kib| (kib.clamp(4, 1024) / 4) * 4 * 1024)
}

/// Whether the running kernel's release is at least `major.minor` (`uname -r`); for ABI
/// features the io-uring 0.6 crate cannot ask the ring about.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

/// Run a worker on the completion engine if this kernel allows it. `Err` gives the inputs
/// back (with why) for the readiness engine.
#[allow(clippy::type_complexity)]
pub fn run(
    id: usize,
    shared: Arc<Shared>,
    listeners: Vec<(usize, TcpListener)>,
    commands: Receiver<WorkerCommand>,
    started: std::sync::mpsc::Sender<Result<usize, String>>,
) -> Result<
    (),
    (
        io::Error,
        Vec<(usize, TcpListener)>,
        Receiver<WorkerCommand>,
        std::sync::mpsc::Sender<Result<usize, String>>,
    ),
> {
    let worker = Rc::new(WorkerContext::new(id, shared));
    match Completion::new(worker) {
        Ok(engine) => {
            engine.run(listeners, commands, started);
            Ok(())
        }
        Err(error) => Err((error, listeners, commands, started)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_completion_engine_is_the_default_and_readiness_is_asked_for_by_name() {
        assert_eq!(Engine::from_setting(None), Engine::Completion);
        assert_eq!(Engine::from_setting(Some("uring")), Engine::Completion);
        assert_eq!(Engine::from_setting(Some("readiness")), Engine::Readiness);
    }

    #[test]
    fn the_buffer_size_knob_is_bounded_and_page_aligned() {
        assert_eq!(buffer_bytes_from(None), BUFFER_BYTES);
        assert_eq!(buffer_bytes_from(Some("not a number")), BUFFER_BYTES);
        assert_eq!(buffer_bytes_from(Some("64")), 64 * 1024);
        // Zero would make an empty layout; a huge value an absurd pool.
        assert_eq!(buffer_bytes_from(Some("0")), 4 * 1024);
        assert_eq!(buffer_bytes_from(Some("99999999")), 1024 * 1024);
        // Rounded down to a whole page.
        assert_eq!(buffer_bytes_from(Some("70")), 68 * 1024);
    }
}
