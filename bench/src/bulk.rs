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
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        let tokens: Vec<usize> = events.iter().map(|e| e.token().0).collect();
        for index in tokens {
            let Some(stream) = streams.get_mut(index) else {
                continue;
            };
            if stream.failed {
                continue;
            }
            let before = stream.received;
            if let Err(name) = drive(stream, &config.hello, write_size, &mut scratch) {
                stream.failed = true;
                outcome.error(name, progress);
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

/// Writes and reads until the socket would block in both directions.
fn drive(
    stream: &mut Stream,
    hello: &[u8],
    write_size: usize,
    scratch: &mut [u8],
) -> Result<(), String> {
    if !stream.connected {
        match client::connect_finished(&stream.stream) {
            Ok(true) => stream.connected = true,
            Ok(false) => return Ok(()),
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
            return Ok(());
        }
    }
}
