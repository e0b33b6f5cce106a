//! New-connection rate: every exchange is a new TCP connection that sends the ClientHello and a
//! payload, reads the payload echoed back and closes (FIN by default, RST with `close: Rst`).
//!
//! Closed loop (`rate: None`) keeps `concurrency` exchanges in flight to find the maximum rate.
//! Open loop starts exchanges on a fixed schedule and measures each one from its *intended*
//! start, so a stalled proxy shows up as latency instead of as a slower schedule (no coordinated
//! omission).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::client::{self, Outcome, Progress};
use crate::pattern;
use crate::sys::Timer;

#[derive(Debug, Clone)]
pub struct Config {
    pub target: SocketAddr,
    pub hello: Arc<Vec<u8>>,
    pub payload: usize,
    pub concurrency: usize,
    /// Exchanges per second for this thread (open loop), or `None` for closed loop.
    pub rate: Option<f64>,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub warmup: Duration,
    pub timeout: Duration,
    /// How finished exchanges close; timed-out and abandoned ones always close with RST.
    pub close: client::Close,
}

struct Exchange {
    stream: TcpStream,
    intended: Instant,
    started: Instant,
    connected: bool,
    /// From the actual start until the connect completed.
    connect_time: Option<Duration>,
    sent: usize,
    received: usize,
}

const TIMER: Token = Token(usize::MAX);
/// How often in-flight exchanges are checked against the timeout.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

pub fn run(config: &Config, progress: &Progress) -> anyhow::Result<Outcome> {
    let mut poll = Poll::new()?;
    let mut timer = Timer::new()?;
    poll.registry()
        .register(&mut SourceFd(&timer.raw_fd()), TIMER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    let mut outcome = Outcome::new();
    let mut request = config.hello.to_vec();
    request.extend_from_slice(pattern::slice(0, config.payload));
    let mut scratch = vec![0u8; config.payload.clamp(1, 64 * 1024)];

    let mut slots: Vec<Option<Exchange>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut in_flight = 0usize;
    let start = Instant::now();
    let measure_from = start + config.warmup;
    let stop_at = config.duration.map(|d| measure_from + d);
    let mut started_total: u64 = 0;
    let mut stopping = false;
    let mut stopped_at: Option<Instant> = None;
    let mut last_sweep = start;
    // For the open loop, the largest number of exchanges in flight before new starts queue up
    // behind them (their latency still counts from the intended start).
    let max_in_flight = config.concurrency.max(1);

    loop {
        let now = Instant::now();
        if !stopping {
            loop {
                if in_flight >= max_in_flight {
                    break;
                }
                if config.count.is_some_and(|c| started_total >= c) {
                    stopping = true;
                    break;
                }
                let intended = match config.rate {
                    Some(rate) => start + Duration::from_secs_f64(started_total as f64 / rate),
                    None => now,
                };
                if stop_at.is_some_and(|t| intended >= t || now >= t) {
                    stopping = true;
                    break;
                }
                if intended > now {
                    timer.arm_after(intended - now)?;
                    break;
                }
                started_total += 1;
                match client::connect(config.target) {
                    Ok(mut stream) => {
                        let slot = free.pop().unwrap_or_else(|| {
                            slots.push(None);
                            slots.len() - 1
                        });
                        if let Err(e) = poll.registry().register(
                            &mut stream,
                            Token(slot),
                            Interest::READABLE | Interest::WRITABLE,
                        ) {
                            free.push(slot);
                            outcome.error(client::error_name("register", &e), progress);
                            continue;
                        }
                        slots[slot] = Some(Exchange {
                            stream,
                            intended,
                            started: now,
                            connected: false,
                            connect_time: None,
                            sent: 0,
                            received: 0,
                        });
                        in_flight += 1;
                    }
                    Err(e) => {
                        if intended >= measure_from {
                            outcome.error(client::error_name("connect", &e), progress);
                        }
                    }
                }
            }
            if stopping {
                stopped_at = Some(now);
            }
        }
        if stopping && in_flight == 0 {
            break;
        }
        if stopped_at.is_some_and(|t| now > t + config.timeout + SWEEP_INTERVAL) {
            break;
        }

        let mut wait = SWEEP_INTERVAL;
        if let Some(t) = stop_at {
            wait = wait.min(t.saturating_duration_since(now));
        }
        if config.rate.is_none() && in_flight < max_in_flight && !stopping {
            wait = Duration::ZERO;
        }
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        for event in events.iter() {
            if event.token() == TIMER {
                timer.clear();
                continue;
            }
            let slot = event.token().0;
            let Some(exchange) = slots.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            let step = advance(exchange, &request, config.payload, &mut scratch);
            let finished = match step {
                Ok(false) => continue,
                Ok(true) => Ok(()),
                Err(name) => Err(name),
            };
            let Some(exchange) = slots[slot].take() else {
                continue;
            };
            free.push(slot);
            in_flight -= 1;
            let measured = exchange.intended >= measure_from;
            match finished {
                Ok(()) => {
                    if measured {
                        let done = Instant::now();
                        outcome.operations += 1;
                        outcome.bytes_sent += request.len() as u64;
                        outcome.bytes_received += config.payload as u64;
                        client::record(&mut outcome.latency, done - exchange.intended);
                        progress.operations.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(name) => {
                    if measured {
                        outcome.error(name, progress);
                    }
                }
            }
            if let (true, Some(connect)) = (measured, exchange.connect_time) {
                client::record(&mut outcome.connect, connect);
            }
            client::close(exchange.stream, config.close);
        }
        let now = Instant::now();
        if now - last_sweep >= SWEEP_INTERVAL {
            last_sweep = now;
            for (slot, entry) in slots.iter_mut().enumerate() {
                let expired = entry
                    .as_ref()
                    .is_some_and(|e| now - e.started > config.timeout);
                if !expired {
                    continue;
                }
                if let Some(exchange) = entry.take() {
                    free.push(slot);
                    in_flight -= 1;
                    if exchange.intended >= measure_from {
                        let stage = if exchange.connected {
                            "response"
                        } else {
                            "connect"
                        };
                        outcome.error(format!("{stage}_timeout"), progress);
                    }
                    client::close_with_reset(exchange.stream);
                }
            }
        }
    }
    // Anything still in flight after the grace period timed out.
    for exchange in slots.into_iter().flatten() {
        if exchange.intended >= measure_from {
            outcome.error("response_timeout", progress);
        }
        client::close_with_reset(exchange.stream);
    }
    let window_end = stop_at.unwrap_or_else(Instant::now).min(Instant::now());
    outcome.window = window_end.saturating_duration_since(measure_from);
    Ok(outcome)
}

/// Drives one exchange as far as the socket allows: `Ok(true)` when the whole echo arrived and
/// matched, `Ok(false)` to wait for the next event, or the name of the error.
fn advance(
    exchange: &mut Exchange,
    request: &[u8],
    payload: usize,
    scratch: &mut [u8],
) -> Result<bool, String> {
    if !exchange.connected {
        match client::connect_finished(&exchange.stream) {
            Ok(true) => {
                exchange.connected = true;
                exchange.connect_time = Some(exchange.started.elapsed());
            }
            Ok(false) => return Ok(false),
            Err(e) => return Err(client::error_name("connect", &e)),
        }
    }
    while exchange.sent < request.len() {
        match exchange.stream.write(&request[exchange.sent..]) {
            Ok(written) => exchange.sent += written,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(client::error_name("write", &e)),
        }
    }
    while exchange.received < payload {
        let want = (payload - exchange.received).min(scratch.len());
        match exchange.stream.read(&mut scratch[..want]) {
            Ok(0) => return Err("read_eof".to_owned()),
            Ok(read) => {
                if !pattern::matches(exchange.received as u64, &scratch[..read]) {
                    return Err("verify_mismatch".to_owned());
                }
                exchange.received += read;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(client::error_name("read", &e)),
        }
    }
    Ok(true)
}
