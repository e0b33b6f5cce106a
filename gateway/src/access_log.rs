//! One JSON line per connection at close, written by a dedicated thread so that a slow disk
//! never blocks a worker. Workers hand lines over through a bounded channel; when it is full
//! the line is dropped and counted (`gateway_access_log_dropped_total`).
//!
//! A file target is reopened on SIGUSR1 (nginx's meaning, for logrotate): the control thread
//! raises a flag that the writer checks before each batch and at least once a second.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use crate::config::{AccessLog, AccessLogTarget};
use crate::outcome::Close;

/// Facts gathered for one connection's line (both engines fill one in); this module is the
/// one owner of the line's format.
pub struct Record<'a> {
    pub listener: &'a str,
    pub worker: usize,
    pub client: SocketAddr,
    pub local: Option<SocketAddr>,
    pub started: Instant,
    pub started_wall: SystemTime,
    pub server_name: Option<String>,
    pub route: Option<String>,
    pub upstream: Option<SocketAddr>,
    pub upstream_connect: Option<Duration>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub termination: &'static str,
    pub flags: &'static str,
}

impl<'a> Record<'a> {
    /// The record of a connection accepted at `started` (`started_wall` on the wall clock) by
    /// worker `worker` on the listener named `listener`; the rest is filled in as the
    /// connection goes on.
    pub fn new(
        listener: &'a str,
        worker: usize,
        client: SocketAddr,
        local: Option<SocketAddr>,
        started: Instant,
        started_wall: SystemTime,
    ) -> Record<'a> {
        Record {
            listener,
            worker,
            client,
            local,
            started,
            started_wall,
            server_name: None,
            route: None,
            upstream: None,
            upstream_connect: None,
            bytes_received: 0,
            bytes_sent: 0,
            termination: "",
            flags: "-",
        }
    }

    /// Say how the connection ended (its termination and Envoy's response flags).
    pub fn end(&mut self, close: Close) {
        self.termination = close.termination();
        self.flags = close.flag();
    }
}

/// Lines buffered between the workers and the writer (about 30 MB of lines at worst).
const QUEUE_LINES: usize = 128 * 1024;

/// Lines written between flushes at most, so a constant stream still reaches the file.
const BATCH_LINES: usize = 4096;

/// How often an idle writer wakes to honour a reopen request.
const REOPEN_CHECK: Duration = Duration::from_secs(1);

enum Message {
    Line(String),
    /// Write out everything queued before this, then answer (used before exit).
    Flush(std::sync::mpsc::Sender<()>),
}

/// The workers' end: cheap to clone, never blocks.
#[derive(Clone)]
pub struct AccessLogSender {
    sender: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
    /// Write `"redacted"` instead of client addresses.
    pub redact_addresses: bool,
}

impl AccessLogSender {
    /// Format one connection's line (Envoy's field names) and hand it to the writer.
    pub fn log(&self, record: &Record<'_>) {
        let address_value = |address: Option<SocketAddr>| -> serde_json::Value {
            match address {
                Some(address) => serde_json::Value::String(address.to_string()),
                None => serde_json::Value::Null,
            }
        };
        let start_time = record
            .started_wall
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |elapsed| elapsed.as_secs_f64());
        let line = serde_json::json!({
            "start_time": start_time,
            "listener": record.listener,
            "worker": record.worker,
            "downstream_remote_address": if self.redact_addresses { "redacted".to_owned() } else { record.client.to_string() },
            "downstream_local_address": address_value(record.local),
            "requested_server_name": record.server_name,
            "route_name": record.route,
            "upstream_host": address_value(record.upstream),
            "bytes_received": record.bytes_received,
            "bytes_sent": record.bytes_sent,
            "duration_ms": record.started.elapsed().as_secs_f64() * 1000.0,
            "upstream_connect_ms": record.upstream_connect.map(|d| d.as_secs_f64() * 1000.0),
            "connection_termination_details": record.termination,
            "response_flags": record.flags,
        });
        self.send(line.to_string());
    }

    pub fn send(&self, line: String) {
        match self.sender.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The control thread's end: reopen and flush.
pub struct AccessLogControl {
    sender: SyncSender<Message>,
    reopen: Arc<AtomicBool>,
}

impl AccessLogControl {
    /// Ask the writer to reopen its file (SIGUSR1); it does so within a second.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// Wait (at most `timeout`) until every line queued so far is written.
    pub fn flush(&self, timeout: Duration) {
        let (done, wait) = std::sync::mpsc::channel();
        if self.sender.try_send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
    }
}

/// Start the writer thread; `None` when the access log is off. `dropped` is the counter the
/// metrics render.
pub fn start(
    config: &AccessLog,
    dropped: Arc<AtomicU64>,
) -> std::io::Result<Option<(AccessLogSender, AccessLogControl)>> {
    let sink = match &config.target {
        AccessLogTarget::Off => return Ok(None),
        AccessLogTarget::Stdout => Sink::Stdout(BufWriter::new(std::io::stdout())),
        AccessLogTarget::File(path) => Sink::File(BufWriter::new(open(path)?), path.clone()),
    };
    let (sender, receiver) = sync_channel(queue_lines());
    let reopen = Arc::new(AtomicBool::new(false));
    let reopen_requested = Arc::clone(&reopen);
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_lines(receiver, sink, &reopen_requested))?;
    Ok(Some((
        AccessLogSender {
            sender: sender.clone(),
            dropped,
            redact_addresses: config.redact_addresses,
        },
        AccessLogControl { sender, reopen },
    )))
}

/// The queue's capacity: `QUEUE_LINES`, or in debug builds a smaller one from
/// `GATEWAY_ACCESS_LOG_QUEUE_LINES`, so that a test can reach the dropped-lines path with a
/// few hundred connections instead of a hundred thousand.
fn queue_lines() -> usize {
    #[cfg(debug_assertions)]
    if let Some(lines) = std::env::var("GATEWAY_ACCESS_LOG_QUEUE_LINES")
        .ok()
        .and_then(|value| value.parse::<usize>().ok())
    {
        return lines.clamp(1, QUEUE_LINES);
    }
    QUEUE_LINES
}

fn open(path: &PathBuf) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

enum Sink {
    Stdout(BufWriter<std::io::Stdout>),
    File(BufWriter<File>, PathBuf),
}

impl Sink {
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(out) => out,
            Sink::File(out, _) => out,
        }
    }

    fn reopen(&mut self) {
        if let Sink::File(out, path) = self {
            let _ = out.flush();
            match open(path) {
                Ok(file) => *out = BufWriter::new(file),
                Err(error) => {
                    tracing::error!(path = %path.display(), %error, "cannot reopen the access log; still writing to the old file");
                }
            }
        }
    }
}

fn write_lines(receiver: Receiver<Message>, mut sink: Sink, reopen: &AtomicBool) {
    loop {
        let first = match receiver.recv_timeout(REOPEN_CHECK) {
            Ok(message) => Some(message),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if reopen.swap(false, Ordering::Relaxed) {
            sink.reopen();
        }
        // Drain what is queued, then flush once, so a burst costs one write(2).
        let mut flushed = Vec::new();
        let queued = std::iter::from_fn(|| receiver.try_recv().ok()).take(BATCH_LINES);
        for message in first.into_iter().chain(queued) {
            match message {
                Message::Line(line) => {
                    let out = sink.writer();
                    let _ = out.write_all(line.as_bytes());
                    let _ = out.write_all(b"\n");
                }
                Message::Flush(done) => flushed.push(done),
            }
        }
        let _ = sink.writer().flush();
        for done in flushed {
            let _ = done.send(());
        }
    }
    let _ = sink.writer().flush();
}
