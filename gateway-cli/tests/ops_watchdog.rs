//! A stuck worker (issue 15 #5): its heartbeat stops, `/healthz` answers 503, and the systemd
//! watchdog pings stop (so systemd would restart the service); both recover when it does.
//! The worker is stuck by fault injection (debug builds): a hello for `stall.fault-injection.*`
//! blocks its thread for 8 s.

mod common;

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

const HELLO: &str = "openssl-default.bin";

/// A capture whose server name is replaced by one of the same length under `prefix`.
fn hello_named(prefix: &str) -> Vec<u8> {
    let mut hello = testdata(HELLO);
    let original = testdata_sni(HELLO);
    let name = format!("{prefix}{}", "x".repeat(original.len() - prefix.len()));
    let at = hello
        .windows(original.len())
        .position(|window| window == original.as_bytes())
        .expect("sni bytes in the capture");
    hello[at..at + name.len()].copy_from_slice(name.as_bytes());
    hello
}

/// Every notification that arrives until `done` says stop, or the deadline.
fn collect_until(
    socket: &UnixDatagram,
    timeout: Duration,
    mut done: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline && !done(&seen) {
        if let Ok(length) = socket.recv(&mut buffer) {
            seen.push(String::from_utf8_lossy(&buffer[..length]).into_owned());
        }
    }
    seen
}

fn healthz(gateway: &Gateway) -> u16 {
    http(gateway.admin, "GET", "/healthz").map_or(0, |(status, _)| status)
}

#[test]
fn a_stuck_worker_stops_the_watchdog_and_fails_healthz() {
    let dir = temp_dir("watchdog");
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let notify = path.display().to_string();
    let gateway = Gateway::start_from(
        |listen, admin, _| base_config(listen, admin, ""),
        &[
            ("NOTIFY_SOCKET", &notify),
            ("WATCHDOG_USEC", "400000"),
            ("GATEWAY_FAULT_INJECTION", "1"),
        ],
    );
    let seen = collect_until(&socket, Duration::from_secs(10), |seen| {
        seen.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2
    });
    assert!(
        seen.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2,
        "pings while healthy: {seen:?}"
    );
    assert_eq!(healthz(&gateway), 200);

    let mut stuck = connect(gateway.listen);
    stuck
        .write_all(&hello_named("stall.fault-injection."))
        .expect("hello");
    let deadline = Instant::now() + Duration::from_secs(7);
    while healthz(&gateway) != 503 {
        assert!(Instant::now() < deadline, "/healthz never went stale");
        // Keep the notify socket drained, so that a full queue never blocks the gateway.
        let _ = collect_until(&socket, Duration::from_millis(50), |_| false);
    }
    // The heartbeat has been still for 3 s (the stale threshold, 30 watchdog ticks). From
    // now, while /healthz stays 503, not one ping may arrive: a ping is due every 100 ms.
    let _ = collect_until(&socket, Duration::from_millis(100), |_| false);
    let during = collect_until(&socket, Duration::from_secs(1), |_| false);
    assert_eq!(healthz(&gateway), 503, "still stuck after the window");
    assert!(
        !during.iter().any(|m| m == "WATCHDOG=1"),
        "pings while a worker is stuck: {during:?}"
    );

    // The worker comes back: /healthz and the pings recover.
    let deadline = Instant::now() + Duration::from_secs(20);
    while healthz(&gateway) != 200 {
        assert!(Instant::now() < deadline, "/healthz never recovered");
        let _ = collect_until(&socket, Duration::from_millis(50), |_| false);
    }
    let after = collect_until(&socket, Duration::from_secs(10), |seen| {
        seen.iter().any(|m| m == "WATCHDOG=1")
    });
    assert!(after.iter().any(|m| m == "WATCHDOG=1"), "{after:?}");
    drop(stuck);
    let _ = std::fs::remove_dir_all(dir);
}
