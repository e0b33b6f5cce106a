//! One worker per core: its own monoio runtime (io_uring, or epoll where io_uring is not
//! allowed), its own `SO_REUSEPORT` listening sockets, its own counters and scratch buffer.
//! Nothing here is shared with other workers except read-only snapshots and flags.
//!
//! A worker never waits on the control thread. It sees the control thread's decisions only
//! as values it reads on its own schedule: the route snapshot (per connection), the
//! process-wide "accepting" flag (per accept-loop wake, at least every `TICK`), and listening
//! sockets to add or close (a channel it drains every `TICK`).
//!
//! This module is the top of the data path: it starts the completion engine (`uring`) or
//! runs the readiness engine (accept loops here, connections in `connection`). What the
//! connections need from their worker is lent to them as a `context::WorkerContext`; nothing
//! below this module imports it.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use monoio::net::TcpListener;

use crate::context::{Shared, WorkerCommand, WorkerContext, TICK};
use crate::metrics::{self, AcceptError};
use crate::outcome::{Close, Reason, Side};
use crate::ring_setup::RingSetup;

/// io_uring submission queue entries per worker (monoio's minimum is 256). Each connection
/// has at most two poll requests in flight, and the queue is flushed every loop turn, so 1024
/// carries bursts of hundreds of new connections per turn.
const RING_ENTRIES: u32 = 1024;

/// How long accept pauses after EMFILE/ENFILE/ENOMEM before trying again: long enough for
/// connections to close and free descriptors, short enough not to overflow the backlog.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Connections one accept loop takes off the queue per readiness event before it yields, so
/// that a connection storm cannot starve the worker's established connections.
const ACCEPT_BATCH: usize = 64;

/// Stop flags of this worker's accept loops, by listener slot.
type AcceptLoops = Vec<(usize, Rc<Cell<bool>>)>;

/// Start accepting on `socket` for listener `slot`.
fn listen(
    worker: &Rc<WorkerContext>,
    accept_loops: &mut AcceptLoops,
    slot: usize,
    socket: std::net::TcpListener,
) -> io::Result<()> {
    // Readiness, then non-blocking accept4: the socket must not block (both drivers).
    socket.set_nonblocking(true)?;
    let listener = TcpListener::from_std(socket)?;
    let stop = Rc::new(Cell::new(false));
    accept_loops.push((slot, Rc::clone(&stop)));
    monoio::spawn(accept_loop(Rc::clone(worker), slot, listener, stop));
    Ok(())
}

/// Stop the accept loops of listener `slot` (each closes its socket within one `TICK`).
fn close_listener(accept_loops: &mut AcceptLoops, slot: usize) {
    accept_loops.retain(|(owner, stop)| {
        if *owner == slot {
            stop.set(true);
        }
        *owner != slot
    });
}

/// Take one accepted connection: refuse it over the limit, else serve it in its own task.
fn admit(worker: &Rc<WorkerContext>, slot: usize, stream: std::net::TcpStream, peer: SocketAddr) {
    let stats = worker.stats();
    let listener_stats = &stats.listeners[slot];
    let max_connections = worker.max_connections_per_worker() as u64;
    if stats.connections_active.load(Ordering::Relaxed) >= max_connections {
        metrics::add(&listener_stats.rejected_max_connections, 1);
        // The access-log line of a refused connection (Envoy's UO).
        if worker.access_log_enabled() {
            worker.log_refused(
                slot,
                stream.local_addr().ok(),
                peer,
                Close::new(Side::Gateway, Reason::MaxConnections),
            );
        }
        return;
    }
    let stream = match monoio::net::TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(error) => {
            listener_stats.accept_error(AcceptError::classify(&error));
            return;
        }
    };
    metrics::add(&listener_stats.accepted, 1);
    // TCP_NODELAY is inherited from the listening socket (set in `bind_reuseport`): Linux
    // copies it into every accepted socket, so there is no setsockopt per connection.
    // The task is the connection's future itself, wrapped: an `async` block around it would
    // keep a second copy of it (measured with -Zprint-type-sizes: 1528 → ~800 bytes).
    monoio::spawn(ContainPanics {
        inner: crate::connection::serve(Rc::clone(worker), slot, stream, peer),
        worker: Rc::clone(worker),
    });
}

pin_project_lite::pin_project! {
    /// Runs a connection future and contains a panic inside it: the connection is dropped
    /// (closing its sockets), the panic is counted and logged, and the worker and its other
    /// connections go on (monoio does not catch task panics).
    struct ContainPanics<F> {
        #[pin]
        inner: F,
        worker: Rc<WorkerContext>,
    }
}

impl<F: Future<Output = ()>> Future for ContainPanics<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let inner = this.inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(context))) {
            Ok(poll) => poll,
            Err(_panic) => {
                metrics::add(&this.worker.stats().connection_panics, 1);
                tracing::error!(
                    worker = this.worker.id,
                    "a connection panicked; it was closed and the worker goes on"
                );
                Poll::Ready(())
            }
        }
    }
}

/// Which io driver monoio will use on this kernel.
pub fn io_driver_name() -> &'static str {
    if monoio::utils::detect_uring() {
        "io_uring"
    } else {
        "epoll"
    }
}

type WorkerRuntime = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

/// Builds the worker's runtime: io_uring with the best ring setup this kernel accepts (a
/// kernel that does not know a flag refuses the whole setup with EINVAL, so the next one is
/// tried), or epoll where io_uring is unavailable.
fn build_runtime(id: usize) -> std::io::Result<WorkerRuntime> {
    let setups = RingSetup::preference();
    for (index, setup) in setups.iter().enumerate() {
        let built = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .with_entries(RING_ENTRIES)
            .uring_builder(setup.uring_builder())
            .enable_timer()
            .build();
        match built {
            Ok(runtime) => {
                if monoio::utils::detect_uring() {
                    tracing::info!(
                        worker = id,
                        ring_setup = setup.name(),
                        "io_uring ring set up"
                    );
                }
                return Ok(runtime);
            }
            Err(error)
                if error.raw_os_error() == Some(libc::EINVAL) && index + 1 < setups.len() =>
            {
                tracing::info!(worker = id, ring_setup = setup.name(), %error,
                    "io_uring setup refused; trying the next one");
            }
            Err(error) => return Err(error),
        }
    }
    Err(std::io::Error::other("no io_uring setup to try"))
}

/// The worker thread's body: build the runtime, take over the listening sockets (each with
/// its listener's metric slot), serve. `started` is told once the worker is accepting (or why
/// it could not start).
pub fn run(
    id: usize,
    shared: Arc<Shared>,
    listeners: Vec<(usize, std::net::TcpListener)>,
    commands: Receiver<WorkerCommand>,
    pin_to: Option<usize>,
    started: std::sync::mpsc::Sender<Result<usize, String>>,
) {
    if let Some(cpu) = pin_to {
        if let Err(error) = crate::sys::pin_current_thread(cpu) {
            tracing::warn!(worker = id, cpu, %error, "could not pin worker to its CPU");
        }
    }
    let (listeners, commands, started) =
        if crate::uring::Engine::current() == crate::uring::Engine::Completion {
            match crate::uring::run(id, Arc::clone(&shared), listeners, commands, started) {
                Ok(()) => return,
                Err((error, listeners, commands, started)) => {
                    tracing::warn!(worker = id, %error,
                    "the completion engine cannot start here; using the readiness engine");
                    (listeners, commands, started)
                }
            }
        } else {
            (listeners, commands, started)
        };
    let runtime = build_runtime(id);
    let mut runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = started.send(Err(format!("worker {id}: cannot build runtime: {error}")));
            return;
        }
    };
    runtime.block_on(async move {
        let worker = Rc::new(WorkerContext::new(id, shared));
        let mut accept_loops = AcceptLoops::new();
        for (slot, socket) in listeners {
            if let Err(error) = listen(&worker, &mut accept_loops, slot, socket) {
                let _ = started.send(Err(format!("worker {id}: {error}")));
                return;
            }
        }
        let _ = started.send(Ok(id));
        loop {
            monoio::time::sleep(TICK).await;
            metrics::add(&worker.stats().heartbeat, 1);
            while let Ok(command) = commands.try_recv() {
                match command {
                    WorkerCommand::Listen { slot, socket } => {
                        if let Err(error) = listen(&worker, &mut accept_loops, slot, socket) {
                            tracing::error!(worker = id, %error, "cannot accept on a new listener");
                        }
                    }
                    WorkerCommand::Close { slot } => close_listener(&mut accept_loops, slot),
                }
            }
            worker.publish_health(Instant::now());
            crate::relay::sweep_idle(Instant::now());
        }
    });
}

/// Accept by readiness: wait (at most one `TICK`) until the listening socket is readable,
/// then take connections with non-blocking `accept4` until the queue is empty or the batch
/// cap. The wait is a poll request, which is safe to cancel; an io_uring accept op is not (a
/// cancelled accept can complete in the kernel and lose the connection), and cancelling is
/// exactly what stopping for a drain or a hand-over needs. Connections left in the queue stay
/// there for whoever else holds the socket (the new process after a hand-over).
async fn accept_loop(
    worker: Rc<WorkerContext>,
    slot: usize,
    listener: TcpListener,
    stop: Rc<Cell<bool>>,
) {
    let sockets_open = &worker.stats().listeners[slot].sockets_open;
    metrics::add(sockets_open, 1);
    let fd = listener.as_raw_fd();
    while worker.accepting() && !stop.get() {
        match monoio::time::timeout(TICK, listener.readable(false)).await {
            Err(_elapsed) => continue,
            Ok(Err(error)) => {
                tracing::debug!(worker = worker.id, %error, "waiting for a connection failed");
                monoio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
            Ok(Ok(())) => {}
        }
        for _ in 0..ACCEPT_BATCH {
            if stop.get() || !worker.accepting() {
                break;
            }
            match crate::sys::accept(fd) {
                Ok((stream, peer)) => admit(&worker, slot, stream, peer),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                // The client gave up between the handshake and accept; take the next one.
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(error) => {
                    let reason = AcceptError::classify(&error);
                    worker.stats().listeners[slot].accept_error(reason);
                    if reason == AcceptError::Other {
                        tracing::debug!(%error, "accept failed");
                    } else {
                        worker.warn_accept_pause(&error);
                        monoio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                    break;
                }
            }
        }
    }
    drop(listener);
    metrics::sub(sockets_open, 1);
}

/// Bind one `SO_REUSEPORT` socket per worker for a listener address. A probe bind without
/// `SO_REUSEPORT` first makes a port that another process listens on an error, instead of
/// silently joining its reuseport group.
pub fn bind_listener(
    address: SocketAddr,
    workers: usize,
    defer_accept_seconds: u32,
) -> io::Result<Vec<std::net::TcpListener>> {
    let probe = new_socket(address)?;
    probe.set_reuse_address(true)?;
    probe.bind(&address.into()).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("cannot bind {address}: {error} (is another process listening there?)"),
        )
    })?;
    // Port 0 resolves to one port that all workers then share.
    let resolved = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listener address is not an IP socket"))?;
    drop(probe);
    (0..workers)
        .map(|_| bind_reuseport(resolved, defer_accept_seconds))
        .collect()
}

/// How long a starting gateway keeps trying a listener address that is in use, and how often.
/// A gateway killed a moment ago (`kill -9`, a crash) can still hold its listening sockets
/// after its process is reaped: io_uring tears a ring down in a kernel worker, and the last
/// reference to a socket with an operation in flight goes with it. Measured here: 7 of 40
/// kill-and-reap cycles under accept load left a listener for a moment, and the chaos suite's
/// immediate restart once failed on it. A supervisor that restarts at once (Docker, a shell
/// loop) then sees a failed start; nginx waits too (5 tries, 500 ms apart).
const START_BIND_PATIENCE: Duration = Duration::from_secs(2);
const START_BIND_RETRY: Duration = Duration::from_millis(50);

/// [`bind_listener`] for a gateway starting up: an address in use is tried again for up to
/// [`START_BIND_PATIENCE`], with one warning. Any other error, or the address still in use
/// after that, is returned as is. Reloads use [`bind_listener`] directly: they answer at once.
pub fn bind_listener_at_start(
    address: SocketAddr,
    workers: usize,
    defer_accept_seconds: u32,
) -> io::Result<Vec<std::net::TcpListener>> {
    retry_while_in_use(
        START_BIND_PATIENCE,
        START_BIND_RETRY,
        std::thread::sleep,
        || bind_listener(address, workers, defer_accept_seconds),
        || tracing::warn!(%address, patience = ?START_BIND_PATIENCE, "listener address in use; trying again (a process killed a moment ago may still hold it)"),
    )
}

/// Calls `attempt` until it returns anything but `AddrInUse` or `patience` (measured in
/// `pause`s taken) has passed; `first_retry` runs once, before the first pause.
fn retry_while_in_use<T>(
    patience: Duration,
    pause: Duration,
    mut sleep: impl FnMut(Duration),
    mut attempt: impl FnMut() -> io::Result<T>,
    first_retry: impl FnOnce(),
) -> io::Result<T> {
    let mut waited = Duration::ZERO;
    let mut first_retry = Some(first_retry);
    loop {
        match attempt() {
            Err(error) if error.kind() == io::ErrorKind::AddrInUse && waited < patience => {
                if let Some(warn) = first_retry.take() {
                    warn();
                }
                sleep(pause);
                waited += pause;
            }
            other => return other,
        }
    }
}

/// One more socket in the `SO_REUSEPORT` group of `address` (no probe: the caller knows the
/// group is ours, e.g. sockets inherited in a hand-over). Non-blocking: workers accept by
/// readiness.
pub fn bind_reuseport(
    address: SocketAddr,
    defer_accept_seconds: u32,
) -> io::Result<std::net::TcpListener> {
    let socket = new_socket(address)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    // The kernel caps the backlog at net.core.somaxconn.
    socket.listen(4096)?;
    crate::sys::set_defer_accept(socket.as_raw_fd(), defer_accept_seconds)?;
    Ok(socket.into())
}

fn new_socket(address: SocketAddr) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_use() -> io::Error {
        io::Error::from(io::ErrorKind::AddrInUse)
    }

    #[test]
    fn an_address_in_use_is_tried_again_until_it_is_free_with_one_warning() {
        let (mut attempts, mut slept, mut warnings) = (0, Duration::ZERO, 0);
        let result = retry_while_in_use(
            Duration::from_secs(2),
            Duration::from_millis(50),
            |pause| slept += pause,
            || {
                attempts += 1;
                if attempts < 4 {
                    Err(in_use())
                } else {
                    Ok(attempts)
                }
            },
            || warnings += 1,
        );
        assert_eq!(result.expect("bound on the fourth try"), 4);
        assert_eq!(slept, Duration::from_millis(150));
        assert_eq!(warnings, 1);
    }

    #[test]
    fn an_address_still_in_use_after_the_patience_fails_and_other_errors_fail_at_once() {
        let mut attempts = 0;
        let result: io::Result<()> = retry_while_in_use(
            Duration::from_secs(2),
            Duration::from_millis(50),
            |_| {},
            || {
                attempts += 1;
                Err(in_use())
            },
            || {},
        );
        assert_eq!(
            result.expect_err("gave up").kind(),
            io::ErrorKind::AddrInUse
        );
        assert_eq!(attempts, 41, "40 pauses of 50 ms, then the last answer");

        let mut attempts = 0;
        let result: io::Result<()> = retry_while_in_use(
            Duration::from_secs(2),
            Duration::from_millis(50),
            |_| panic!("no pause for an error other than AddrInUse"),
            || {
                attempts += 1;
                Err(io::Error::from(io::ErrorKind::PermissionDenied))
            },
            || panic!("no warning either"),
        );
        assert_eq!(
            result.expect_err("failed").kind(),
            io::ErrorKind::PermissionDenied
        );
        assert_eq!(attempts, 1);
    }
}
