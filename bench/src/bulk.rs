//! Bulk throughput: long streams of pattern bytes through an echo backend; every byte that comes
//! back is compared with what was sent, and at the end the byte counts must be equal.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::client::{self, Outcome, Progress};
use crate::pattern;

#[derive(Debug, Clone)]
pub struct Config {
    pub target: SocketAddr,
    pub hello: Arc<Vec<u8>>,
    pub connections: usize,
    pub write_size: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub timeout: Duration,
}

struct Stream {
    stream: TcpStream,
    connected: bool,
    hello_sent: usize,
    sent: u64,
    received: u64,
    failed: bool,
    /// Set when the writer stops and a half-close is due, so the echo can drain.
    writing: bool,
}

pub fn run(config: &Config, progress: &Progress) -> anyhow::Result<Outcome> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(256);
    let mut outcome = Outcome::new();
    let write_size = config.write_size.clamp(1, pattern::MAX_CHUNK);
    let mut scratch = vec![0u8; write_size.max(64 * 1024)];
    let mut streams = Vec::new();
    for index in 0..config.connections {
        match client::connect(config.target) {
            Ok(mut stream) => {
                poll.registry().register(
                    &mut stream,
                    Token(index),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                streams.push(Stream {
                    stream,
                    connected: false,
                    hello_sent: 0,
                    sent: 0,
                    received: 0,
                    failed: false,
                    writing: true,
                });
            }
            Err(e) => outcome.error(client::error_name("connect", &e), progress),
        }
    }
    let start = Instant::now();
    let measure_from = start + config.warmup;
    let stop_at = measure_from + config.duration;
    // (when, total bytes received then) at the start and the end of the measurement window.
    let mut window_start: Option<(Instant, u64)> = None;
    let mut window_end: Option<(Instant, u64)> = None;
    let mut hot: Vec<usize> = Vec::new();
    loop {
        let now = Instant::now();
        let total_received: u64 = streams.iter().map(|s| s.received).sum();
        if window_start.is_none() && now >= measure_from {
            window_start = Some((now, total_received));
        }
        if window_end.is_none() && now >= stop_at {
            window_end = Some((now, total_received));
            for stream in &mut streams {
                stream.writing = false;
            }
        }
        let draining = window_end.is_some();
        let all_drained = streams
            .iter()
            .all(|s| s.failed || (s.connected && s.received == s.sent));
        if draining && all_drained {
            break;
        }
        if draining && now > stop_at + config.timeout {
            let short = streams
                .iter()
                .filter(|s| !s.failed && s.received != s.sent)
                .count();
            *outcome.errors.entry("echo_short".to_owned()).or_default() += short as u64;
            break;
        }
        let wait = if draining {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(50).min(if now < measure_from {
                measure_from - now
            } else {
                stop_at.saturating_duration_since(now)
            })
        };
        // Streams that stopped on their byte budget are still ready: poll without waiting and
        // drive them again (mio is edge-triggered, so no new event would come for them).
        let wait = if hot.is_empty() { wait } else { Duration::ZERO };
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        let mut tokens: Vec<usize> = events.iter().map(|e| e.token().0).collect();
        tokens.append(&mut hot);
        tokens.sort_unstable();
        tokens.dedup();
        for index in tokens {
            let Some(stream) = streams.get_mut(index) else {
                continue;
            };
            if stream.failed {
                continue;
            }
            let before = stream.received;
            match drive(stream, &config.hello, write_size, &mut scratch) {
                Ok(Drive::Blocked) => {}
                Ok(Drive::BudgetSpent) => hot.push(index),
                Err(name) => {
                    stream.failed = true;
                    outcome.error(name, progress);
                }
            }
            progress
                .bytes
                .fetch_add(stream.received - before, Ordering::Relaxed);
        }
    }
    let (from, start_bytes) = window_start.unwrap_or((measure_from, 0));
    let (until, stop_bytes) =
        window_end.unwrap_or_else(|| (Instant::now(), streams.iter().map(|s| s.received).sum()));
    outcome.bytes_received = stop_bytes.saturating_sub(start_bytes);
    outcome.bytes_sent = streams.iter().map(|s| s.sent).sum();
    outcome.operations = streams
        .iter()
        .filter(|s| !s.failed && s.received == s.sent)
        .count() as u64;
    outcome.window = until.saturating_duration_since(from);
    for stream in streams {
        client::close_with_reset(stream.stream);
    }
    Ok(outcome)
}

/// Bytes one stream may move per call to [`drive`]: when the proxy keeps up, a stream never
/// blocks, and without a budget the loop would never get back to its clock.
const DRIVE_BUDGET: u64 = 4 << 20;

enum Drive {
    /// Both directions would block: wait for the next event.
    Blocked,
    /// The byte budget ran out while the stream was still ready.
    BudgetSpent,
}

/// Writes and reads until the socket would block in both directions, or the budget is spent.
fn drive(
    stream: &mut Stream,
    hello: &[u8],
    write_size: usize,
    scratch: &mut [u8],
) -> Result<Drive, String> {
    let budget_end = stream.received + DRIVE_BUDGET;
    if !stream.connected {
        match client::connect_finished(&stream.stream) {
            Ok(true) => stream.connected = true,
            Ok(false) => return Ok(Drive::Blocked),
            Err(e) => return Err(client::error_name("connect", &e)),
        }
    }
    let mut write_blocked = false;
    while stream.hello_sent < hello.len() {
        match stream.stream.write(&hello[stream.hello_sent..]) {
            Ok(written) => stream.hello_sent += written,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                write_blocked = true;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(client::error_name("write", &e)),
        }
    }
    loop {
        let mut progressed = false;
        if stream.writing && !write_blocked && stream.hello_sent == hello.len() {
            match stream.stream.write(pattern::slice(stream.sent, write_size)) {
                Ok(written) => {
                    stream.sent += written as u64;
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => write_blocked = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                Err(e) => return Err(client::error_name("write", &e)),
            }
        }
        match stream.stream.read(scratch) {
            Ok(0) => return Err("read_eof".to_owned()),
            Ok(read) => {
                if !pattern::matches(stream.received, &scratch[..read]) {
                    return Err("verify_mismatch".to_owned());
                }
                stream.received += read as u64;
                if stream.received > stream.sent {
                    return Err("verify_extra_bytes".to_owned());
                }
                progressed = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
            Err(e) => return Err(client::error_name("read", &e)),
        }
        if !progressed {
            return Ok(Drive::Blocked);
        }
        if stream.received >= budget_end {
            return Ok(Drive::BudgetSpent);
        }
    }
}
