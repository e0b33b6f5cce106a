//! The access log's dropped-lines path (issue 15 #5): when the writer cannot keep up (here its
//! FIFO is not read), lines are dropped, never block a worker, and are counted in
//! `gateway_access_log_dropped_total`; every connection is either logged or counted.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Connections made while nobody reads the log: far more than the pipe (64 KiB, ~200 lines)
/// and the debug-build queue (16 lines) hold.
const CONNECTIONS: usize = 600;

#[test]
fn lines_the_writer_cannot_take_are_dropped_and_counted() {
    require_tool("mkfifo");
    let dir = temp_dir("access-dropped");
    let fifo = dir.join("access.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    // A reader that exists (so the gateway's open does not block) but does not read yet.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open the FIFO for reading");
    let fifo_path = fifo.display().to_string();
    let gateway = Gateway::start_from(
        |listen, admin, _| {
            base_config(
                listen,
                admin,
                &format!("[access_log]\npath = \"{fifo_path}\"\n"),
            )
        },
        &[("GATEWAY_ACCESS_LOG_QUEUE_LINES", "16")],
    );
    // Each connection is not TLS: closed at once, one access-log line (NR).
    for _ in 0..CONNECTIONS {
        let mut client = connect(gateway.listen);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
        assert!(read_to_end(&mut client).is_empty());
    }
    let refused = "gateway_client_hello_total{listener=\"wan\",result=\"not_tls\"}";
    assert_eq!(
        gateway.wait_metric(refused, CONNECTIONS as f64),
        CONNECTIONS as f64
    );
    let dropped = gateway.wait_metric("gateway_access_log_dropped_total", 1.0);
    assert!(dropped >= 1.0, "nothing dropped with the writer blocked");

    // Now read: the lines that were queued arrive, and with the dropped ones they account for
    // every connection.
    let expected = CONNECTIONS - dropped as usize;
    let mut text = Vec::new();
    let mut buffer = [0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(20);
    while text.iter().filter(|&&byte| byte == b'\n').count() < expected {
        assert!(
            Instant::now() < deadline,
            "{} lines read, {expected} expected ({dropped} dropped)",
            text.iter().filter(|&&byte| byte == b'\n').count()
        );
        match reader.read(&mut buffer) {
            Ok(read) => text.extend_from_slice(&buffer[..read]),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => panic!("reading the FIFO: {error}"),
        }
    }
    let text = String::from_utf8(text).expect("UTF-8");
    for line in text.lines() {
        let value: serde_json::Value = serde_json::from_str(line).expect("a whole JSON line");
        assert_eq!(value["response_flags"], "NR", "{line}");
    }
    assert_eq!(text.lines().count(), expected);
    assert_eq!(
        gateway.metric("gateway_access_log_dropped_total"),
        dropped,
        "no more drops once the reader reads"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
