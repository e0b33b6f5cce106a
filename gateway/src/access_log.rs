//! One JSON line per connection at close, written by a dedicated thread so that a slow disk
//! never blocks a worker. Workers hand lines over through a bounded channel; when it is full
//! the line is dropped and counted.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use crate::config::AccessLog;

/// Lines buffered between the workers and the writer (about 30 MB of lines at worst).
const QUEUE_LINES: usize = 128 * 1024;

#[derive(Clone)]
pub struct AccessLogSender {
    sender: SyncSender<String>,
    pub dropped: Arc<AtomicU64>,
}

impl AccessLogSender {
    pub fn send(&self, line: String) {
        match self.sender.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Start the writer thread; `None` when the access log is off.
pub fn start(target: &AccessLog) -> std::io::Result<Option<AccessLogSender>> {
    let sink: Box<dyn Write + Send> = match target {
        AccessLog::Off => return Ok(None),
        AccessLog::Stdout => Box::new(std::io::stdout()),
        AccessLog::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
    };
    let (sender, receiver) = sync_channel(QUEUE_LINES);
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_lines(receiver, sink))?;
    Ok(Some(AccessLogSender {
        sender,
        dropped: Arc::new(AtomicU64::new(0)),
    }))
}

fn write_lines(receiver: Receiver<String>, sink: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::new(sink);
    while let Ok(line) = receiver.recv() {
        let _ = out.write_all(line.as_bytes());
        let _ = out.write_all(b"\n");
        // Drain what is queued, then flush once, so a burst costs one write(2).
        while let Ok(line) = receiver.try_recv() {
            let _ = out.write_all(line.as_bytes());
            let _ = out.write_all(b"\n");
        }
        let _ = out.flush();
    }
}
