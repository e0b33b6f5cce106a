//! Graceful drain: SIGTERM or POST /drain turns /ready to 503, keeps accepting for the
//! announce period, closes the listeners, lets open connections finish, and exits 0.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const HELLO: &str = "openssl-default.bin";

fn drain_gateway(drain: &str) -> (Gateway, Backend) {
    let backend = echo_backend();
    let routes = route(&testdata_sni(HELLO), &[backend.address]);
    let gateway = Gateway::start_from(
        |listen, admin, _| base_config(listen, admin, &format!("[drain]\n{drain}\n\n{routes}")),
        &[],
    );
    (gateway, backend)
}

fn still_echoes(stream: &mut TcpStream) {
    stream.write_all(b"ping").expect("write");
    let mut reply = [0u8; 4];
    stream
        .read_exact(&mut reply)
        .expect("the open connection still works");
    assert_eq!(&reply, b"ping");
}

/// Wait until connecting is refused; returns when that happened.
fn wait_refused(address: SocketAddr, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        match TcpStream::connect_timeout(&address, Duration::from_secs(1)) {
            Err(error) if error.kind() == ErrorKind::ConnectionRefused => return Instant::now(),
            _ => {}
        }
        assert!(Instant::now() < deadline, "connections are still accepted");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_announces_closes_the_listeners_and_exits_0_once_connections_finish() {
    let (mut gateway, _backend) = drain_gateway("announce = \"1s\"\ntimeout = \"20s\"");
    let mut long = established(gateway.listen, &testdata(HELLO));
    let signalled = Instant::now();
    gateway.signal("TERM");
    // /ready turns 503 on the signal; the gauge says so. The deadline only bounds the wait (a
    // loaded 2-core machine can take seconds to schedule the handler); the 1 s announce below
    // is checked as a lower bound, which no slowness can break.
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(gateway.admin, "GET", "/ready").expect("ready").0 != 503 {
        assert!(Instant::now() < deadline, "/ready still 200");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(gateway.metric("gateway_draining"), 1.0);
    // During the announce period new connections are still served.
    let mut during = established(gateway.listen, &testdata(HELLO));
    still_echoes(&mut during);
    drop(during);
    // Then the listeners close: connecting is refused.
    let refused_at = wait_refused(gateway.listen, Duration::from_secs(20));
    assert!(
        refused_at - signalled >= Duration::from_millis(900),
        "listeners closed only after the announce period ({:?})",
        refused_at - signalled
    );
    // The open connection goes on, and the process waits for it.
    still_echoes(&mut long);
    assert!(gateway.child.try_wait().expect("wait").is_none());
    long.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(
        read_to_end(&mut long),
        b"",
        "its upstream finished it cleanly"
    );
    let status = gateway
        .wait_exit(Duration::from_secs(20))
        .expect("exits once the last connection closed");
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_drain_timeout_closes_what_is_left_and_exits_0() {
    let (mut gateway, _backend) = drain_gateway("announce = \"0s\"\ntimeout = \"1s\"");
    let mut long = established(gateway.listen, &testdata(HELLO));
    let signalled = Instant::now();
    gateway.signal("TERM");
    let status = gateway
        .wait_exit(Duration::from_secs(5))
        .expect("exits within the timeout");
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took >= Duration::from_millis(900),
        "not before the 1 s drain timeout, took {took:?}"
    );
    // The timeout (not the connection finishing) ended the drain.
    assert!(
        gateway
            .stderr()
            .contains("drain timeout: closing the remaining connections"),
        "{}",
        gateway.stderr()
    );
    // The connection that did not finish was closed with the process.
    long.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buffer = [0u8; 16];
    assert!(matches!(long.read(&mut buffer), Ok(0) | Err(_)));
}

#[test]
fn a_second_sigterm_exits_at_once() {
    let (mut gateway, _backend) = drain_gateway("announce = \"30s\"\ntimeout = \"30s\"");
    let _long = established(gateway.listen, &testdata(HELLO));
    gateway.signal("TERM");
    // Two signals sent before the first is handled merge into one: wait until the gateway
    // says it is draining before sending the second.
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(gateway.admin, "GET", "/ready").map_or(0, |(status, _)| status) != 503 {
        assert!(
            Instant::now() < deadline,
            "the first SIGTERM did not start a drain"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        gateway.child.try_wait().expect("wait").is_none(),
        "first SIGTERM drains"
    );
    gateway.signal("TERM");
    // The drain has 30 s of announce left: exiting within the wait's deadline, and saying
    // why, is the second signal's doing.
    let status = gateway
        .wait_exit(Duration::from_secs(10))
        .expect("second SIGTERM exits at once");
    assert!(status.success(), "{status:?}");
    assert!(
        gateway.stderr().contains("second SIGTERM: exiting now"),
        "{}",
        gateway.stderr()
    );
}

#[test]
fn post_drain_drains_and_mutating_calls_need_post() {
    let (mut gateway, _backend) = drain_gateway("announce = \"0s\"\ntimeout = \"10s\"");
    assert_eq!(http(gateway.admin, "GET", "/drain").expect("get").0, 405);
    assert_eq!(http(gateway.admin, "GET", "/reload").expect("get").0, 405);
    let (status, body) = http(gateway.admin, "POST", "/drain").expect("drain");
    assert_eq!(status, 202, "{body}");
    assert_eq!(http(gateway.admin, "GET", "/ready").expect("ready").0, 503);
    // A reload while draining is refused and says why.
    let (status, body) = http(gateway.admin, "POST", "/reload").expect("reload");
    assert_eq!(status, 400);
    assert!(body.contains("draining"), "{body}");
    wait_refused(gateway.listen, Duration::from_secs(3));
    let status = gateway
        .wait_exit(Duration::from_secs(3))
        .expect("no connections: exits at once");
    assert!(status.success(), "{status:?}");
}
