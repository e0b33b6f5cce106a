//! One downstream connection, from accept to close: read the ClientHello under a deadline,
//! route it, connect upstream (trying the next endpoint on failure), replay the buffered
//! bytes, relay both ways, count, log.
//!
//! Every decision comes from the pure cores (`clienthello::parse`, `RouteTable::lookup`,
//! `balance::Balancer`); this file only does the IO around them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Instant, SystemTime};

use monoio::net::TcpStream;

use crate::access_log::Record;
use crate::balance::WorkerSnapshot;
use crate::clienthello::{self, ClientHello, Verdict};
use crate::context::WorkerContext;
use crate::machine::Balance;
use crate::metrics::{self, ConnectFailure, DestinationStats};
use crate::outcome::{Close, HelloOutcome, Reason, Side};
use crate::relay::{self, Direction, End};
use crate::routes::Lookup;
use crate::sys;

/// The bytes to replay upstream and what the parser found in them.
struct FirstFlight {
    bytes: Vec<u8>,
    hello: ClientHello,
}

/// Serve one accepted connection until it closes.
///
/// Written as a function returning an `async move` block rather than an `async fn`: an
/// `async fn` moves its arguments into locals, keeping two copies of the 80-byte stream in
/// the task for its whole life; the block uses the captured values in place (measured with
/// `-Zprint-type-sizes`: 952 → 728 bytes per connection).
#[allow(clippy::manual_async_fn)]
pub fn serve(
    worker: Rc<WorkerContext>,
    listener_index: usize,
    client: TcpStream,
    peer: SocketAddr,
) -> impl std::future::Future<Output = ()> {
    async move {
        let started = Instant::now();
        let stats = worker.stats();
        let listener_stats = &stats.listeners[listener_index];
        let _active = ActiveGuard::new(&[&listener_stats.active, &stats.connections_active]);
        // The record exists only with an access log: it would cost ~260 bytes for the whole life
        // of every connection otherwise.
        let mut record = worker.access_log_enabled().then(|| {
            let local = client.local_addr().ok();
            Box::new(worker.access_record(listener_index, local, peer, started, SystemTime::now()))
        });

        // Phase 1, boxed: its state (the first flight, the deadline and connect timers) is freed
        // as soon as relaying begins, so an idle connection's task holds only phase 2.
        let Some(Established {
            upstream,
            shared,
            slot,
        }) = Box::pin(establish(
            &worker,
            listener_index,
            &client,
            peer,
            started,
            &mut record,
        ))
        .await
        else {
            return;
        };

        // Phase 2: relay both ways.
        let destination = &stats.destinations[slot];
        let _pair = ActiveGuard::new(&[&destination.active]);
        let (to_upstream, to_downstream) = monoio::join!(
            relay::pump(
                &worker.scratch,
                &client,
                &upstream,
                &shared,
                Direction::ToUpstream,
                destination,
                &stats.spliced_bytes
            ),
            relay::pump(
                &worker.scratch,
                &upstream,
                &client,
                &shared,
                Direction::ToDownstream,
                destination,
                &stats.spliced_bytes
            ),
        );
        finish(
            &worker,
            listener_index,
            started,
            destination,
            close_reason(to_upstream, to_downstream, &shared),
            &shared,
            &mut record,
        );
    }
}

/// A connection whose ClientHello was routed, whose upstream answered and to which the first
/// flight was replayed.
struct Established {
    upstream: TcpStream,
    shared: Rc<relay::Shared>,
    /// The destination's metric slot.
    slot: usize,
}

/// Read the ClientHello, route it, connect, replay. `None` when the connection ended here (it
/// was counted and logged).
async fn establish(
    worker: &Rc<WorkerContext>,
    listener_index: usize,
    client: &TcpStream,
    peer: SocketAddr,
    started: Instant,
    record: &mut Option<Box<Record<'_>>>,
) -> Option<Established> {
    let stats = worker.stats();
    let listener_stats = &stats.listeners[listener_index];
    let snapshot = worker.snapshot();

    // 1. The ClientHello, under an absolute deadline.
    let deadline = started + snapshot.snapshot.timeouts.client_hello;
    let max_bytes = snapshot.snapshot.limits.client_hello_max_bytes;
    let flight = match read_first_flight(worker, client, max_bytes, deadline).await {
        Ok(flight) => flight,
        Err(outcome) => {
            listener_stats.hello(outcome);
            let close = Close::new(Side::Downstream, Reason::Hello(outcome));
            let reason = close.termination();
            log(worker, record, close);
            if worker.redact_addresses() {
                tracing::debug!(reason, "closed before routing");
            } else {
                tracing::debug!(client = %peer, reason, "closed before routing");
            }
            return None;
        }
    };
    stats.hello_wait[listener_index].observe(started.elapsed());
    let server_name = flight.hello.server_name.as_ref().map(|name| name.as_str());
    listener_stats.hello(if server_name.is_some() {
        HelloOutcome::SniFound
    } else {
        HelloOutcome::SniMissing
    });
    if let Some(record) = record.as_mut() {
        record.bytes_received = flight.bytes.len() as u64;
        record.server_name = server_name.map(str::to_owned);
    }

    // Fault injection for the panic-containment test; compiled into debug builds only.
    #[cfg(debug_assertions)]
    if server_name.is_some_and(|name| name.starts_with("panic.fault-injection."))
        && std::env::var_os("GATEWAY_FAULT_INJECTION").is_some()
    {
        panic!("fault injection: a connection panics");
    }
    // Fault injection for the stuck-worker test: block the whole worker thread, as a bug
    // that spins or blocks would, so that its heartbeat stops. Debug builds only.
    #[cfg(debug_assertions)]
    if server_name.is_some_and(|name| name.starts_with("stall.fault-injection."))
        && std::env::var_os("GATEWAY_FAULT_INJECTION").is_some()
    {
        std::thread::sleep(std::time::Duration::from_secs(8));
    }

    // 2. The route, from this connection's one snapshot.
    let cluster_index = match snapshot.snapshot.table.lookup(server_name) {
        Lookup::Matched(index) => index,
        Lookup::NoRoute => {
            metrics::add(&listener_stats.route_no_route, 1);
            log(
                worker,
                record,
                Close::new(Side::Downstream, Reason::NoRoute),
            );
            // Never the raw name at info level: it is client-controlled. With redaction on, not
            // at debug level either: a name can say who the client is.
            if worker.redact_addresses() {
                tracing::debug!("no route");
            } else {
                tracing::debug!(client = %peer, server_name = ?server_name, "no route");
            }
            return None;
        }
    };
    metrics::add(&listener_stats.route_matched, 1);
    let cluster = snapshot.snapshot.table.cluster(cluster_index);
    let slot = snapshot.snapshot.slots[cluster_index];
    let destination = &stats.destinations[slot];
    if let Some(record) = record.as_mut() {
        record.route = Some(cluster.pattern.to_string());
    }
    metrics::add(&destination.connections, 1);

    // 3. Connect, trying the next endpoint while nothing has been sent.
    let connect_started = Instant::now();
    let (upstream, address) = match connect(worker, &snapshot, cluster_index, destination).await {
        Ok(connected) => connected,
        Err(close) => {
            destination.connect_failure(ConnectFailure::NoHealthyEndpoint);
            log(worker, record, close);
            return None;
        }
    };
    let connect_time = connect_started.elapsed();
    stats.connect_duration[slot].observe(connect_time);
    if let Some(record) = record.as_mut() {
        record.upstream = Some(address);
        record.upstream_connect = Some(connect_time);
    }
    let _ = upstream.set_nodelay(true);

    // 4. Replay the first flight.
    let shared = relay::Shared::new(
        &snapshot.snapshot.timeouts,
        client,
        &upstream,
        relay::Mode::current(),
    );
    if let Err(end) = relay::flush(&upstream, &shared, Direction::ToUpstream, &flight.bytes).await {
        finish(
            worker,
            listener_index,
            started,
            destination,
            close_reason(end, End::Aborted, &shared),
            &shared,
            record,
        );
        return None;
    }
    metrics::add(&destination.bytes_to_upstream, flight.bytes.len() as u64);
    Some(Established {
        upstream,
        shared,
        slot,
    })
}

/// Count and log the end of a proxied pair.
fn finish(
    worker: &WorkerContext,
    listener_index: usize,
    started: Instant,
    destination: &DestinationStats,
    close: Close,
    shared: &relay::Shared,
    record: &mut Option<Box<Record<'_>>>,
) {
    destination.closed(close);
    worker.stats().connection_duration[listener_index].observe(started.elapsed());
    if let Some(record) = record.as_mut() {
        record.bytes_received += shared.bytes_to_upstream.get();
        record.bytes_sent = shared.bytes_to_downstream.get();
    }
    log(worker, record, close);
}

/// Write the access-log line, if there is an access log.
fn log(worker: &WorkerContext, record: &mut Option<Box<Record<'_>>>, close: Close) {
    if let Some(record) = record.as_mut() {
        record.end(close);
        worker.log_access(record);
    }
}

/// How a relayed pair ended, from how its two directions ended: a write stall first (it is
/// what caused the other direction's abort), then an error, the idle timeout, and otherwise
/// whichever side sent its FIN first.
fn close_reason(a: End, b: End, shared: &relay::Shared) -> Close {
    for end in [a, b] {
        if let End::Stalled(direction) = end {
            return Close::new(direction.destination(), Reason::WriteStall);
        }
    }
    for end in [a, b] {
        if let End::Error(side) = end {
            return Close::new(side, Reason::Error);
        }
    }
    if a == End::Idle || b == End::Idle {
        Close::new(Side::Gateway, Reason::Idle)
    } else if shared.first_eof.get() == Some(Direction::ToDownstream) {
        Close::new(Side::Upstream, Reason::Finished)
    } else {
        Close::new(Side::Downstream, Reason::Finished)
    }
}

/// Read until the parser has a verdict. The first read goes into the worker's scratch buffer;
/// only a ClientHello split over several reads is accumulated in a buffer of its own.
async fn read_first_flight(
    worker: &WorkerContext,
    client: &TcpStream,
    max_bytes: usize,
    deadline: Instant,
) -> Result<FirstFlight, HelloOutcome> {
    let fd = client.as_raw_fd();
    let mut buffered: Vec<u8> = Vec::new();
    loop {
        match monoio::time::timeout_at(
            monoio::time::Instant::from_std(deadline),
            client.readable(false),
        )
        .await
        {
            Err(_elapsed) => return Err(HelloOutcome::Timeout),
            Ok(Err(_)) => return Err(HelloOutcome::ReadError),
            Ok(Ok(())) => {}
        }
        let mut scratch = worker.scratch.borrow_mut();
        // `parse` rejects once `max_bytes` are buffered, so there is always room here.
        let room = (max_bytes - buffered.len()).min(scratch.len());
        let read = match sys::recv(fd, &mut scratch[..room]) {
            Ok(0) => return Err(HelloOutcome::Eof),
            Ok(read) => read,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return Err(HelloOutcome::ReadError),
        };
        let verdict = if buffered.is_empty() {
            clienthello::parse(&scratch[..read], max_bytes)
        } else {
            buffered.extend_from_slice(&scratch[..read]);
            clienthello::parse(&buffered, max_bytes)
        };
        match verdict {
            Verdict::NeedMore => {
                if buffered.is_empty() {
                    buffered.extend_from_slice(&scratch[..read]);
                }
            }
            Verdict::Done(hello) => {
                let bytes = if buffered.is_empty() {
                    scratch[..read].to_vec()
                } else {
                    buffered
                };
                return Ok(FirstFlight { bytes, hello });
            }
            Verdict::Reject(reason) => return Err(HelloOutcome::Rejected(reason)),
        }
    }
}

/// Connect to an endpoint of the cluster: healthy ones in round-robin order, then the held-out
/// ones if every healthy one failed (or there were none). On failure, the close: `UH` when no
/// endpoint was healthy to begin with, `UF` when connects failed.
async fn connect(
    worker: &WorkerContext,
    snapshot: &WorkerSnapshot,
    cluster_index: usize,
    stats: &DestinationStats,
) -> Result<(TcpStream, SocketAddr), Close> {
    let cluster = snapshot.snapshot.table.cluster(cluster_index);
    let timeout = snapshot.snapshot.timeouts.connect;
    let backoff = snapshot.snapshot.limits.endpoint_backoff;
    let order = worker.endpoint_order(snapshot, cluster_index, Instant::now());
    let none_healthy = order.none_healthy();
    for index in order.iter() {
        let address = cluster.endpoints[index];
        let result = monoio::time::timeout(timeout, TcpStream::connect_addr(address)).await;
        let failure = match result {
            Ok(Ok(stream)) => {
                worker.mark_healthy(address);
                return Ok((stream, address));
            }
            Err(_elapsed) => ConnectFailure::Timeout,
            Ok(Err(error)) => classify_connect_error(&error),
        };
        stats.connect_failure(failure);
        worker.hold_out(address, Instant::now() + backoff);
        tracing::debug!(endpoint = %address, ?failure, "upstream connect failed");
    }
    Err(Close::new(Side::Upstream, Reason::Connect { none_healthy }))
}

fn classify_connect_error(error: &io::Error) -> ConnectFailure {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
        io::ErrorKind::TimedOut => ConnectFailure::Timeout,
        io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable => {
            ConnectFailure::Unreachable
        }
        _ => ConnectFailure::Other,
    }
}

/// Increments gauges on creation and decrements them on drop, panics included.
struct ActiveGuard<'a> {
    gauges: [Option<&'a std::sync::atomic::AtomicU64>; 2],
}

impl<'a> ActiveGuard<'a> {
    fn new(gauges: &[&'a std::sync::atomic::AtomicU64]) -> ActiveGuard<'a> {
        let mut held = [None, None];
        for (slot, gauge) in held.iter_mut().zip(gauges) {
            metrics::add(gauge, 1);
            *slot = Some(*gauge);
        }
        ActiveGuard { gauges: held }
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        for gauge in self.gauges.iter().flatten() {
            metrics::sub(gauge, 1);
        }
    }
}
