//! Zero-downtime upgrade: a second gateway process takes the listening sockets over from the
//! first through the hand-over socket while clients keep connecting.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const HELLO: &str = "openssl-default.bin";

/// Kills the second process when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn handover_config(
    listen: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    dir: &std::path::Path,
    workers: usize,
    routes: &str,
) -> String {
    format!(
        "[[listener]]\nname = \"wan\"\naddress = \"{listen}\"\n\n[admin]\naddress = \"{admin}\"\nhandover_socket = \"{}\"\n\n[workers]\ncount = {workers}\n\n[drain]\ntimeout = \"20s\"\n\n{routes}",
        dir.join("handover.sock").display()
    )
}

/// One short proxied exchange; `Err` says what went wrong (refused, reset, truncated).
fn exchange(address: std::net::SocketAddr, hello: &[u8], payload: &[u8]) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut sent = hello.to_vec();
    sent.extend_from_slice(payload);
    stream.write_all(&sent).map_err(|e| format!("write: {e}"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("half-close: {e}"))?;
    let mut received = Vec::new();
    stream
        .read_to_end(&mut received)
        .map_err(|e| format!("read after {} bytes: {e}", received.len()))?;
    if received != sent {
        return Err(format!(
            "received {} of {} bytes",
            received.len(),
            sent.len()
        ));
    }
    Ok(())
}

fn config_pid(admin: std::net::SocketAddr) -> Option<u32> {
    let (status, body) = http(admin, "GET", "/config_dump").ok()?;
    if status != 200 {
        return None;
    }
    let dump: serde_json::Value = serde_json::from_str(&body).ok()?;
    dump["pid"].as_u64().map(|pid| pid as u32)
}

#[test]
fn a_new_process_takes_over_without_refusing_a_connection() {
    let backend = echo_backend();
    let sni = testdata_sni(HELLO);
    let routes = route(&sni, &[backend.address]);
    let mut old = Gateway::start_from(
        |listen, admin, dir| handover_config(listen, admin, dir, 2, &routes),
        &[],
    );
    let hello = testdata(HELLO);

    // A long-lived connection through the old process: it must survive the old one's drain.
    let mut long = established(old.listen, &hello);

    // A bounded connect loop on three threads, across the whole hand-over.
    let stop = Arc::new(AtomicBool::new(false));
    let succeeded = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..3)
        .map(|seed| {
            let (stop, succeeded, failures) = (
                Arc::clone(&stop),
                Arc::clone(&succeeded),
                Arc::clone(&failures),
            );
            let (address, hello) = (old.listen, hello.clone());
            thread::spawn(move || {
                let payload = pattern(512, seed);
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match exchange(address, &hello, &payload) {
                        Ok(()) => succeeded.fetch_add(1, Ordering::Relaxed),
                        Err(error) => {
                            failures.lock().expect("lock").push(error);
                            0
                        }
                    };
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));

    // The upgrade: the same file with a different worker count (three workers, two
    // inherited sockets: the third joins the reuseport group).
    let config = std::fs::read_to_string(&old.config_path).expect("config");
    std::fs::write(&old.config_path, config.replace("count = 2", "count = 3")).expect("rewrite");
    let before_handover = succeeded.load(Ordering::Relaxed);
    let new = KillOnDrop(spawn_gateway(
        &old.config_path,
        &old.dir.join("new.log"),
        &[],
    ));
    let new_pid = new.0.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while config_pid(old.admin) != Some(new_pid) {
        assert!(
            Instant::now() < deadline,
            "the new process never served admin: {}\n{}",
            old.stderr(),
            std::fs::read_to_string(old.dir.join("new.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let (status, _) = http(old.admin, "GET", "/ready").expect("ready");
    assert_eq!(status, 200, "the new process is ready");

    // The old process drains: still alive for the long connection, which still works.
    thread::sleep(Duration::from_millis(500));
    assert!(
        old.child.try_wait().expect("wait").is_none(),
        "old process waits for its connection"
    );
    long.write_all(b"still here").expect("write");
    let mut reply = [0u8; 10];
    long.read_exact(&mut reply)
        .expect("the old connection still echoes");
    assert_eq!(&reply, b"still here");
    long.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(read_to_end(&mut long), b"");
    let status = old
        .wait_exit(Duration::from_secs(10))
        .expect("old process exits once drained");
    assert!(status.success(), "old process exit status {status:?}");

    // Keep connecting to the new process alone for a moment, then stop.
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("client thread");
    }
    let failures = failures.lock().expect("lock");
    let total = succeeded.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} connection attempts failed across the hand-over, e.g. {:?}",
        failures.len(),
        total + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        before_handover > 50 && total > before_handover + 50,
        "the loop ran across the hand-over ({before_handover} before, {total} in all)"
    );
    eprintln!(
        "hand-over: 0 of {total} connection attempts refused or reset ({before_handover} before the new process started)"
    );
    let metrics = http(old.admin, "GET", "/metrics").expect("scrape").1;
    assert!(
        metric_value(
            &metrics,
            "gateway_listener_connections_accepted_total{listener=\"wan\"}"
        )
        .is_some_and(|accepted| accepted > 0.0),
        "the new process accepted connections"
    );
    assert_eq!(
        metric_value(&metrics, "gateway_listener_sockets_open{listener=\"wan\"}"),
        Some(3.0),
        "two inherited sockets and one new one"
    );
}

#[test]
fn without_a_running_gateway_the_hand_over_socket_is_just_bound() {
    let backend = echo_backend();
    let routes = route(&testdata_sni(HELLO), &[backend.address]);
    let gateway = Gateway::start_from(
        |listen, admin, dir| {
            // A stale socket file from a crashed process must not stop the start.
            let stale = dir.join("handover.sock");
            drop(std::os::unix::net::UnixListener::bind(&stale).expect("stale socket"));
            handover_config(listen, admin, dir, 2, &routes)
        },
        &[],
    );
    let hello = testdata(HELLO);
    exchange(gateway.listen, &hello, b"payload").expect("serves");
    assert_offers_its_sockets(&gateway.dir.join("handover.sock"), gateway.pid());
}

/// The process behind `path` answers the hand-over protocol with its own pid (a file at the
/// path proves nothing: the test itself left a stale one there). The exchange is abandoned
/// after the offer, which the gateway logs and survives.
fn assert_offers_its_sockets(path: &std::path::Path, pid: u32) {
    let mut stream = std::os::unix::net::UnixStream::connect(path).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let protocol = b"gateway-handover/1";
    let mut frame = (protocol.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(protocol);
    stream.write_all(&frame).expect("send the protocol frame");
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).expect("offer length");
    let length = u32::from_be_bytes(length) as usize;
    assert!(length < 1 << 20, "offer of {length} bytes");
    let mut offer = vec![0u8; length];
    stream.read_exact(&mut offer).expect("offer");
    let offer: serde_json::Value = serde_json::from_slice(&offer).expect("offer JSON");
    assert_eq!(offer["pid"], serde_json::json!(pid), "{offer}");
}
