//! Moving bytes both ways after the ClientHello was forwarded.
//!
//! Readiness first, then a non-blocking `recv` into the worker's one scratch buffer and an
//! immediate non-blocking `send` of what was read. Only when the destination cannot take all
//! of it (backpressure) is the rest copied into a buffer owned by this direction, and that
//! buffer is freed once it drains. So an idle proxied connection holds no data buffer at all:
//! what it costs is its task, two sockets and two pending poll requests.
//!
//! The two directions run as two futures joined in one task. EOF on one side becomes
//! `shutdown(SHUT_WR)` on the other while the other direction keeps flowing (TCP half-close);
//! an error on either side, or `timeouts.idle` without a byte either way, shuts both sockets
//! down, which wakes and ends the other direction too.

use std::cell::Cell;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use crate::metrics::{self, DestinationStats};
use crate::sys;
use crate::worker::Worker;

/// How many full scratch-buffer reads one direction performs before it yields back to its
/// readiness wait, so that one bulk flow cannot starve the worker's other connections.
const READS_PER_WAKE: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToUpstream,
    ToDownstream,
}

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The source sent FIN; we passed it on.
    Eof,
    /// No bytes either way for the idle timeout.
    Idle,
    /// A reset or IO error on either socket.
    Error,
    /// The other direction failed and shut this one down.
    Aborted,
}

/// State the two directions share (one task, so plain cells).
pub struct Shared {
    idle: Duration,
    last_activity: Cell<Instant>,
    aborted: Cell<bool>,
    /// Which direction saw EOF first (for the DC/UC response flags).
    pub first_eof: Cell<Option<Direction>>,
    pub bytes_to_upstream: Cell<u64>,
    pub bytes_to_downstream: Cell<u64>,
    client_fd: RawFd,
    upstream_fd: RawFd,
}

impl Shared {
    pub fn new(idle: Duration, client: &TcpStream, upstream: &TcpStream) -> Shared {
        Shared {
            idle,
            last_activity: Cell::new(Instant::now()),
            aborted: Cell::new(false),
            first_eof: Cell::new(None),
            bytes_to_upstream: Cell::new(0),
            bytes_to_downstream: Cell::new(0),
            client_fd: client.as_raw_fd(),
            upstream_fd: upstream.as_raw_fd(),
        }
    }

    fn idle_deadline(&self) -> Instant {
        self.last_activity.get() + self.idle
    }

    /// Shut both sockets down so that the other direction's readiness wait wakes and ends.
    fn abort(&self) {
        self.aborted.set(true);
        let _ = sys::shutdown(self.client_fd, Shutdown::Both);
        let _ = sys::shutdown(self.upstream_fd, Shutdown::Both);
    }
}

/// Relay one direction until it ends.
pub async fn pump(
    worker: &Worker,
    source: &TcpStream,
    destination: &TcpStream,
    shared: &Shared,
    direction: Direction,
    stats: &DestinationStats,
) -> End {
    let (source_fd, destination_fd) = (source.as_raw_fd(), destination.as_raw_fd());
    let (counter, total) = match direction {
        Direction::ToUpstream => (&stats.bytes_to_upstream, &shared.bytes_to_upstream),
        Direction::ToDownstream => (&stats.bytes_to_downstream, &shared.bytes_to_downstream),
    };
    loop {
        match wait_until(shared, source.readable(false)).await {
            Wait::Ready => {}
            Wait::Idle => return End::Idle,
            Wait::Failed => {
                shared.abort();
                return End::Error;
            }
        }
        if shared.aborted.get() {
            return End::Aborted;
        }
        for _ in 0..READS_PER_WAKE {
            // The scratch buffer is borrowed only between awaits.
            let outcome = {
                let mut scratch = worker.scratch.borrow_mut();
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
                            Err(_) => Read::Failed,
                        }
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => Read::Drained,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => Read::Failed,
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
                Read::Failed => {
                    shared.abort();
                    return End::Error;
                }
                Read::Drained => break,
                Read::Sent { read, full } => {
                    account(shared, counter, total, read);
                    if !full {
                        // A short read almost always means the socket is empty: go back to
                        // the readiness wait instead of paying for a recv that says EAGAIN.
                        break;
                    }
                }
                Read::Backlog(pending, read) => {
                    account(shared, counter, total, read);
                    if let Err(end) = flush(destination, shared, &pending).await {
                        return end;
                    }
                    break;
                }
            }
        }
    }
}

enum Read {
    Eof,
    Failed,
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

/// Write all of `data` to `destination`, waiting for writability under the idle deadline.
pub async fn flush(destination: &TcpStream, shared: &Shared, mut data: &[u8]) -> Result<(), End> {
    let fd = destination.as_raw_fd();
    while !data.is_empty() {
        match sys::send(fd, data) {
            Ok(sent) => {
                data = &data[sent..];
                shared.last_activity.set(Instant::now());
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                match wait_until(shared, destination.writable(false)).await {
                    Wait::Ready => {}
                    Wait::Idle => return Err(End::Idle),
                    Wait::Failed => {
                        shared.abort();
                        return Err(End::Error);
                    }
                }
                if shared.aborted.get() {
                    return Err(End::Aborted);
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                shared.abort();
                return Err(End::Error);
            }
        }
    }
    Ok(())
}

enum Wait {
    Ready,
    Idle,
    Failed,
}

/// Await a readiness future under the shared idle deadline. Activity in the other direction
/// moves the deadline, so a timer firing only ends the connection if nothing moved at all.
async fn wait_until(
    shared: &Shared,
    readiness: impl std::future::Future<Output = io::Result<()>>,
) -> Wait {
    let mut readiness = std::pin::pin!(readiness);
    loop {
        let deadline = shared.idle_deadline();
        match monoio::time::timeout_at(
            monoio::time::Instant::from_std(deadline),
            readiness.as_mut(),
        )
        .await
        {
            Ok(Ok(())) => return Wait::Ready,
            Ok(Err(_)) => return Wait::Failed,
            Err(_elapsed) => {
                if Instant::now() >= shared.idle_deadline() {
                    shared.abort();
                    return Wait::Idle;
                }
            }
        }
    }
}
