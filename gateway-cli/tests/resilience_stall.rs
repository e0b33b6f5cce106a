//! A peer that stops reading (issue 14 #6): with bytes pending and no progress for
//! `timeouts.write_stall`, the pair is closed long before the idle timeout, counted under
//! `reason="write_stall"` and logged with the `WS` flag.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const HELLO: &str = "openssl-default.bin";

#[test]
fn an_upstream_that_stops_reading_is_closed_after_the_write_stall_timeout() {
    // The backend accepts and then never reads: the gateway's writes to it stall once the
    // socket buffers are full. It holds the socket until the test ends.
    let (held_tx, held_rx) = mpsc::channel::<TcpStream>();
    let held_tx = std::sync::Mutex::new(held_tx);
    let backend = spawn_backend(move |stream| {
        if let Ok(sender) = held_tx.lock() {
            let _ = sender.send(stream);
        }
    });
    let sni = testdata_sni(HELLO);
    let gateway = Gateway::start_from(
        |listen, admin, dir| {
            base_config(
                listen,
                admin,
                &format!(
                    "[timeouts]\nidle = \"1h\"\nwrite_stall = \"500ms\"\n\n[access_log]\npath = \"{}\"\n\n{}",
                    dir.join("access.log").display(),
                    route(&sni, &[backend.address])
                ),
            )
        },
        &[],
    );
    let mut client = connect(gateway.listen);
    client.write_all(&testdata(HELLO)).expect("hello");
    // Write until the gateway stops taking bytes (or closes the connection); bounded by the
    // socket buffers on both hops, a few MB on loopback.
    let mut writer = client.try_clone().expect("clone");
    writer
        .set_write_timeout(Some(Duration::from_millis(200)))
        .expect("write timeout");
    let writing = thread::spawn(move || {
        let chunk = vec![0x17u8; 64 * 1024];
        let mut written = 0usize;
        let deadline = Instant::now() + Duration::from_secs(20);
        while written < 512 * 1024 * 1024 && Instant::now() < deadline {
            match writer.write(&chunk) {
                Ok(n) => written += n,
                Err(error) if is_timeout(&error) => {}
                Err(_) => break,
            }
        }
        written
    });
    // The close is seen by the client: its read ends (EOF or reset) within the bound.
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    let ended = loop {
        match client.read(&mut buffer) {
            Ok(0) => break true,
            Err(error) if is_timeout(&error) => {}
            Err(_) => break true,
            Ok(_) => {}
        }
        if started.elapsed() > Duration::from_secs(20) {
            break false;
        }
    };
    assert!(ended, "the stalled pair is still open");
    let written = writing.join().expect("writer");
    assert!(written > 0);
    let metrics = gateway.metrics();
    let stalls: f64 = metrics
        .lines()
        .filter(|line| {
            line.starts_with("gateway_connections_closed_total{")
                && line.contains("reason=\"write_stall\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(stalls, 1.0, "{metrics}");
    let log_path = gateway.dir.join("access.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut log = String::new();
    while !log.contains("\"WS\"") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        log = std::fs::read_to_string(&log_path).unwrap_or_default();
    }
    assert!(log.contains("\"response_flags\":\"WS\""), "{log}");
    assert!(log.contains("upstream_write_stall"), "{log}");
    drop(held_rx);
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}
