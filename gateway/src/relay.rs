//! Moving bytes both ways after the ClientHello was forwarded.
//!
//! Readiness first, then a non-blocking `recv` into the worker's one [`Scratch`] buffer and an
//! immediate non-blocking `send` of what was read. Only when the destination cannot take all
//! of it (backpressure) is the rest copied into a buffer owned by this direction, and that
//! buffer is freed once it drains. So an idle proxied connection holds no data buffer at all:
//! what it costs is its task, two sockets and two pending poll requests.
//!
//! The two directions run as two futures joined in one task. EOF on one side becomes
//! `shutdown(SHUT_WR)` on the other while the other direction keeps flowing (TCP half-close);
//! an error on either side, or `timeouts.idle` without a byte either way, shuts both sockets
//! down, which wakes and ends the other direction too.
//!
//! Idle timeouts use no timer per connection: monoio's `Sleep` is 640 bytes (cache-padded), and
//! two of them per connection made an idle proxied connection's task four times larger than
//! everything else in it. Instead every connection's [`Shared`] is listed per worker, and the
//! worker's tick calls [`sweep_idle`], which shuts down the ones whose last byte is older than
//! their idle timeout (checked every tick, so the timeout fires up to one tick late).
//!
//! The same sweep enforces `timeouts.write_stall`: a direction that has bytes for a peer that
//! takes none of them marks when it started waiting, any progress clears the mark, and a mark
//! older than the timeout closes the pair with a reset (the peer stopped reading; a FIN would
//! only queue behind the bytes it does not take). This is HAProxy's `timeout server`/`timeout
//! client` in the data phase; without it such a pair held four descriptors until `idle`.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use crate::metrics::{self, DestinationStats};
use crate::outcome::Side;
use crate::sys;

/// The size of a worker's [`Scratch`] buffer: 64 KiB matches the largest chunk a loopback TCP
/// receive usually returns in one call and the ClientHello cap.
const SCRATCH_BYTES: usize = 64 * 1024;

/// A worker's one copy buffer: every relay read lands here first (and the first ClientHello
/// read, see `connection`). The relay defines it; the worker owns one and lends it to each
/// [`pump`] and ClientHello read. It is borrowed only between awaits, never across one.
///
/// It is allocated on its first use: only the readiness engine reads into it, so a worker
/// running the completion engine (which receives into its provided-buffer ring) never holds
/// these 64 KiB.
pub struct Scratch(RefCell<Vec<u8>>);

impl Scratch {
    pub fn new() -> Scratch {
        Scratch(RefCell::new(Vec::new()))
    }

    /// The buffer, `SCRATCH_BYTES` long, for one read and the send of what it read (panics if
    /// already borrowed, which would mean a borrow held across an await: a bug).
    pub fn borrow_mut(&self) -> std::cell::RefMut<'_, [u8]> {
        let mut buffer = self.0.borrow_mut();
        if buffer.is_empty() {
            buffer.resize(SCRATCH_BYTES, 0);
        }
        std::cell::RefMut::map(buffer, |buffer| buffer.as_mut_slice())
    }

    /// Whether the buffer was ever used (allocated).
    #[cfg(test)]
    fn allocated(&self) -> bool {
        !self.0.borrow().is_empty()
    }
}

impl Default for Scratch {
    fn default() -> Scratch {
        Scratch::new()
    }
}

/// How many full scratch-buffer reads one direction performs before it yields back to its
/// readiness wait, so that one bulk flow cannot starve the worker's other connections.
const READS_PER_WAKE: usize = 8;

/// Idle pipes kept per worker (two descriptors each). A pipe is held only while a direction
/// has spliced bytes in flight, so this bounds descriptors, not connections.
const PIPE_POOL: usize = 64;

// The mode and its decision live in `relay_mode.rs`, shared with the completion engine.
pub use crate::relay_mode::{Mode, SPLICE_CHUNK};

/// How long after passing a reset on a pair may still be open before its write sides are
/// shut down too (see [`Shared::abort`]).
const ABORT_GRACE: Duration = Duration::from_secs(1);

thread_local! {
    /// This worker's idle pipes (a worker is one thread, so thread-local is per-core).
    static PIPES: RefCell<Vec<sys::Pipe>> = const { RefCell::new(Vec::new()) };
    /// This worker's relayed connections, for [`sweep_idle`].
    static RELAYED: RefCell<Vec<Weak<Shared>>> = const { RefCell::new(Vec::new()) };
}

/// Shut down this worker's connections that have been idle for their timeout. Called from
/// the worker's tick; costs a few nanoseconds per open connection.
pub fn sweep_idle(now: Instant) {
    RELAYED.with(|relayed| {
        relayed.borrow_mut().retain(|entry| {
            let Some(shared) = entry.upgrade() else {
                return false;
            };
            if let Some(aborted_at) = shared.aborted_at.get() {
                if now.saturating_duration_since(aborted_at) < ABORT_GRACE {
                    return true;
                }
                // Still open after a reset: a direction is stuck writing to a peer that does
                // not read. Shutting the write sides down wakes it.
                let _ = sys::shutdown(shared.client_fd, Shutdown::Both);
                let _ = sys::shutdown(shared.upstream_fd, Shutdown::Both);
                return false;
            }
            if shared.aborted.get() {
                return false;
            }
            if now.saturating_duration_since(shared.last_activity.get()) >= shared.idle {
                shared.close_idle();
                return false;
            }
            if let Some(direction) = shared.stalled_for(now) {
                shared.close_stalled(direction);
                return false;
            }
            true
        });
    });
}

fn take_pipe() -> io::Result<sys::Pipe> {
    match PIPES.with(|pipes| pipes.borrow_mut().pop()) {
        Some(pipe) => Ok(pipe),
        None => sys::Pipe::new(SPLICE_CHUNK),
    }
}

/// Return an empty pipe to the pool (a pipe that may hold bytes is closed instead).
fn give_back(pipe: sys::Pipe) {
    PIPES.with(|pipes| {
        let mut pipes = pipes.borrow_mut();
        if pipes.len() < PIPE_POOL {
            pipes.push(pipe);
        }
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToUpstream,
    ToDownstream,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToUpstream => 0,
            Direction::ToDownstream => 1,
        }
    }

    /// The side this direction reads from.
    pub fn source(self) -> Side {
        match self {
            Direction::ToUpstream => Side::Downstream,
            Direction::ToDownstream => Side::Upstream,
        }
    }

    /// The side this direction writes to.
    pub fn destination(self) -> Side {
        match self {
            Direction::ToUpstream => Side::Upstream,
            Direction::ToDownstream => Side::Downstream,
        }
    }
}

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The source sent FIN; we passed it on.
    Eof,
    /// No bytes either way for the idle timeout.
    Idle,
    /// Bytes were pending for a peer that took none of them for the write-stall timeout; the
    /// direction named is the one whose destination stopped reading.
    Stalled(Direction),
    /// A reset or IO error on this side's socket.
    Error(Side),
    /// The other direction failed and shut this one down.
    Aborted,
}

/// State the two directions share (one task, so plain cells).
pub struct Shared {
    idle: Duration,
    write_stall: Duration,
    last_activity: Cell<Instant>,
    /// Per direction (`ToUpstream`, `ToDownstream`): since when it has been waiting to write
    /// with no byte accepted. `None` while it is not blocked on its destination.
    stalled_since: [Cell<Option<Instant>>; 2],
    /// The abort came from the write-stall sweep, for this direction.
    stall_expired: Cell<Option<Direction>>,
    aborted: Cell<bool>,
    /// The abort came from the idle sweep.
    idle_expired: Cell<bool>,
    /// When a reset was passed on (see [`Shared::abort`]).
    aborted_at: Cell<Option<Instant>>,
    /// Which direction saw EOF first (for the DC/UC response flags).
    pub first_eof: Cell<Option<Direction>>,
    pub bytes_to_upstream: Cell<u64>,
    pub bytes_to_downstream: Cell<u64>,
    client_fd: RawFd,
    upstream_fd: RawFd,
    mode: Mode,
    /// Both sockets are O_NONBLOCK (needed by splice, set on first use).
    nonblocking: Cell<bool>,
}

impl Shared {
    /// State for one proxied pair, registered with this worker's idle sweep.
    pub fn new(
        timeouts: &crate::config::Timeouts,
        client: &TcpStream,
        upstream: &TcpStream,
        mode: Mode,
    ) -> Rc<Shared> {
        let shared = Rc::new(Shared {
            idle: timeouts.idle,
            write_stall: timeouts.write_stall,
            last_activity: Cell::new(Instant::now()),
            stalled_since: [Cell::new(None), Cell::new(None)],
            stall_expired: Cell::new(None),
            aborted: Cell::new(false),
            idle_expired: Cell::new(false),
            aborted_at: Cell::new(None),
            first_eof: Cell::new(None),
            bytes_to_upstream: Cell::new(0),
            bytes_to_downstream: Cell::new(0),
            client_fd: client.as_raw_fd(),
            upstream_fd: upstream.as_raw_fd(),
            mode,
            nonblocking: Cell::new(false),
        });
        RELAYED.with(|relayed| relayed.borrow_mut().push(Rc::downgrade(&shared)));
        shared
    }

    /// How a direction ends when it finds the pair aborted.
    fn aborted_end(&self) -> End {
        if let Some(direction) = self.stall_expired.get() {
            End::Stalled(direction)
        } else if self.idle_expired.get() {
            End::Idle
        } else {
            End::Aborted
        }
    }

    /// A direction is about to wait for its destination to take pending bytes: start its
    /// stall clock unless it is already running.
    fn waiting_to_write(&self, direction: Direction) {
        let since = &self.stalled_since[direction.index()];
        if since.get().is_none() {
            since.set(Some(Instant::now()));
        }
    }

    /// The destination took bytes: that direction is not stalled.
    fn progressed(&self, direction: Direction) {
        self.stalled_since[direction.index()].set(None);
        self.last_activity.set(Instant::now());
    }

    /// The direction whose destination has taken nothing for the write-stall timeout.
    fn stalled_for(&self, now: Instant) -> Option<Direction> {
        [Direction::ToUpstream, Direction::ToDownstream]
            .into_iter()
            .find(|direction| {
                self.stalled_since[direction.index()]
                    .get()
                    .is_some_and(|since| now.saturating_duration_since(since) >= self.write_stall)
            })
    }

    /// splice(2) blocks on a blocking socket whatever its flags say, so both sockets are
    /// switched to O_NONBLOCK before the first splice.
    fn prepare_splice(&self) -> io::Result<()> {
        if !self.nonblocking.get() {
            sys::set_nonblocking(self.client_fd)?;
            sys::set_nonblocking(self.upstream_fd)?;
            self.nonblocking.set(true);
        }
        Ok(())
    }

    /// A reset or IO error on either side: pass it on as a reset. Both sockets get
    /// `SO_LINGER` 0, so closing them sends RST and leaves no TIME_WAIT behind (which would
    /// otherwise make the kernel's ephemeral-port search for new upstream connections the
    /// largest single cost per connection; see perf/RESULTS.md). Their read sides are shut,
    /// which wakes a direction waiting to read without putting a FIN on the wire; a direction
    /// waiting to write to the broken socket wakes on its error. The rare direction waiting to
    /// write to the healthy side is woken by [`sweep_idle`] after [`ABORT_GRACE`].
    fn abort(&self) {
        self.aborted.set(true);
        self.aborted_at.set(Some(Instant::now()));
        for fd in [self.client_fd, self.upstream_fd] {
            let _ = sys::set_linger_zero(fd);
            let _ = sys::shutdown(fd, Shutdown::Read);
        }
    }

    /// The write-stall timeout: reset both sides (a FIN would wait behind the bytes the peer
    /// does not take, and the socket would linger), which wakes both directions.
    fn close_stalled(&self, direction: Direction) {
        self.stall_expired.set(Some(direction));
        self.aborted.set(true);
        for fd in [self.client_fd, self.upstream_fd] {
            let _ = sys::set_linger_zero(fd);
            let _ = sys::shutdown(fd, Shutdown::Both);
        }
    }

    /// The idle timeout: close both sides gracefully (FIN), which wakes both directions.
    fn close_idle(&self) {
        self.idle_expired.set(true);
        self.aborted.set(true);
        let _ = sys::shutdown(self.client_fd, Shutdown::Both);
        let _ = sys::shutdown(self.upstream_fd, Shutdown::Both);
    }
}

/// Relay one direction until it ends.
pub async fn pump(
    scratch: &Scratch,
    source: &TcpStream,
    destination: &TcpStream,
    shared: &Shared,
    direction: Direction,
    stats: &DestinationStats,
    spliced: &std::sync::atomic::AtomicU64,
) -> End {
    let (source_fd, destination_fd) = (source.as_raw_fd(), destination.as_raw_fd());
    let (counter, total) = match direction {
        Direction::ToUpstream => (&stats.bytes_to_upstream, &shared.bytes_to_upstream),
        Direction::ToDownstream => (&stats.bytes_to_downstream, &shared.bytes_to_downstream),
    };
    let mut splicing = shared.mode.splices(false);
    loop {
        if source.readable(false).await.is_err() {
            shared.abort();
            return End::Error(direction.source());
        }
        if shared.aborted.get() {
            return shared.aborted_end();
        }
        if splicing {
            // Without a pipe (out of descriptors) this wake copies instead.
            if let Ok(pipe) = shared.prepare_splice().and_then(|()| take_pipe()) {
                // Boxed, like `flush` below: these states are short-lived, and inline they
                // would enlarge every idle connection's task.
                match Box::pin(splice_burst(
                    source_fd,
                    destination,
                    &pipe,
                    shared,
                    direction,
                    Counted {
                        counter,
                        total,
                        spliced,
                    },
                ))
                .await
                {
                    Ok(()) => give_back(pipe),
                    // The pipe may still hold bytes: it is closed, not pooled.
                    Err(end) => return end,
                }
                continue;
            }
        }
        for _ in 0..READS_PER_WAKE {
            // The scratch buffer is borrowed only between awaits.
            let outcome = {
                let mut scratch = scratch.borrow_mut();
                match sys::recv(source_fd, &mut scratch) {
                    Ok(0) => Read::Eof,
                    Ok(read) => {
                        let full = read == scratch.len();
                        match sys::send(destination_fd, &scratch[..read]) {
                            Ok(sent) if sent == read => Read::Sent { read, full },
                            Ok(sent) => Read::Backlog(scratch[sent..read].to_vec(), read),
                            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                                Read::Backlog(scratch[..read].to_vec(), read)
                            }
                            Err(_) => Read::Failed(direction.destination()),
                        }
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => Read::Drained,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => Read::Failed(direction.source()),
                }
            };
            match outcome {
                Read::Eof => {
                    if shared.first_eof.get().is_none() {
                        shared.first_eof.set(Some(direction));
                    }
                    let _ = sys::shutdown(destination_fd, Shutdown::Write);
                    return End::Eof;
                }
                Read::Failed(side) => {
                    shared.abort();
                    return End::Error(side);
                }
                Read::Drained => break,
                Read::Sent { read, full } => {
                    account(shared, counter, total, read);
                    if shared.mode.splices(full) {
                        splicing = true;
                        break;
                    }
                    if !full {
                        // A short read almost always means the socket is empty: go back to
                        // the readiness wait instead of paying for a recv that says EAGAIN.
                        break;
                    }
                }
                Read::Backlog(pending, read) => {
                    account(shared, counter, total, read);
                    if let Err(end) =
                        Box::pin(flush(destination, shared, direction, &pending)).await
                    {
                        return end;
                    }
                    break;
                }
            }
        }
    }
}

/// Where a splice burst counts what it moved: the destination's byte counter, the
/// connection's total (for the access log) and the worker's spliced-bytes counter.
struct Counted<'a> {
    counter: &'a std::sync::atomic::AtomicU64,
    total: &'a Cell<u64>,
    spliced: &'a std::sync::atomic::AtomicU64,
}

/// Move what the source has through `pipe` to the destination. `Ok` leaves the pipe empty
/// (it can go back to the pool); `Err` ends the direction.
async fn splice_burst(
    source_fd: RawFd,
    destination: &TcpStream,
    pipe: &sys::Pipe,
    shared: &Shared,
    direction: Direction,
    counted: Counted<'_>,
) -> Result<(), End> {
    let Counted {
        counter,
        total,
        spliced,
    } = counted;
    let destination_fd = destination.as_raw_fd();
    for _ in 0..READS_PER_WAKE {
        let moved_in = match sys::splice(source_fd, pipe.write.as_raw_fd(), SPLICE_CHUNK) {
            Ok(0) => {
                if shared.first_eof.get().is_none() {
                    shared.first_eof.set(Some(direction));
                }
                let _ = sys::shutdown(destination_fd, Shutdown::Write);
                return Err(End::Eof);
            }
            Ok(moved) => moved,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                shared.abort();
                return Err(End::Error(direction.source()));
            }
        };
        let mut left = moved_in;
        while left > 0 {
            match sys::splice(pipe.read.as_raw_fd(), destination_fd, left) {
                Ok(moved) => {
                    left -= moved;
                    shared.progressed(direction);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    wait_writable(destination, shared, direction).await?;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    shared.abort();
                    return Err(End::Error(direction.destination()));
                }
            }
        }
        account(shared, counter, total, moved_in);
        metrics::add(spliced, moved_in as u64);
        if moved_in < SPLICE_CHUNK {
            // A short splice almost always means the socket is empty.
            return Ok(());
        }
    }
    Ok(())
}

enum Read {
    Eof,
    /// A reset or IO error on this side.
    Failed(Side),
    Drained,
    Sent {
        read: usize,
        full: bool,
    },
    /// Read this many bytes but could not send all of them; the rest is owned here.
    Backlog(Vec<u8>, usize),
}

fn account(shared: &Shared, counter: &std::sync::atomic::AtomicU64, total: &Cell<u64>, n: usize) {
    metrics::add(counter, n as u64);
    total.set(total.get() + n as u64);
    shared.last_activity.set(Instant::now());
}

/// Write all of `data` to `destination` (the end `direction` writes to), waiting for
/// writability under the idle and write-stall deadlines.
pub async fn flush(
    destination: &TcpStream,
    shared: &Shared,
    direction: Direction,
    mut data: &[u8],
) -> Result<(), End> {
    let fd = destination.as_raw_fd();
    while !data.is_empty() {
        match sys::send(fd, data) {
            Ok(sent) => {
                data = &data[sent..];
                shared.progressed(direction);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                wait_writable(destination, shared, direction).await?;
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                shared.abort();
                return Err(End::Error(direction.destination()));
            }
        }
    }
    Ok(())
}

/// Wait until `destination` takes bytes again, or the pair is aborted (error, idle or
/// write-stall sweep).
async fn wait_writable(
    destination: &TcpStream,
    shared: &Shared,
    direction: Direction,
) -> Result<(), End> {
    shared.waiting_to_write(direction);
    if destination.writable(false).await.is_err() {
        shared.abort();
        return Err(End::Error(direction.destination()));
    }
    if shared.aborted.get() {
        return Err(shared.aborted_end());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scratch_buffer_is_allocated_on_its_first_use_only() {
        let scratch = Scratch::new();
        assert!(!scratch.allocated(), "a new worker holds no copy buffer");
        assert_eq!(scratch.borrow_mut().len(), SCRATCH_BYTES);
        assert!(scratch.allocated());
        scratch.borrow_mut()[0] = 7;
        assert_eq!(scratch.borrow_mut()[0], 7, "the same buffer is lent again");
    }
}
