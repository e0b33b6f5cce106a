//! Out of descriptors (issue 14 #5, issue 15 #5): under a low `RLIMIT_NOFILE` accept hits
//! EMFILE, pauses and counts it, and the warning is rate-limited (the rest are counted in
//! `gateway_log_lines_suppressed_total`) instead of flooding the log.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const HELLO: &str = "openssl-default.bin";
/// Low enough that a few hundred client connections exhaust it (the gateway raises its soft
/// limit to the hard one at start, so both are set).
const NOFILE: &str = "96";

#[test]
fn emfile_pauses_are_counted_and_their_warnings_rate_limited() {
    require_tool("prlimit");
    let backend = echo_backend();
    let dir = temp_dir("emfile");
    let config_path = dir.join("gateway.toml");
    // A connection limit above what the descriptors allow, so accept itself runs out.
    std::fs::write(
        &config_path,
        base_config(
            ANY_PORT,
            ANY_PORT,
            &format!(
                "[limits]\nmax_connections = 10000\n\n{}",
                route(&testdata_sni(HELLO), &[backend.address])
            ),
        ),
    )
    .expect("config");
    let log_path = dir.join("stderr.log");
    let mut child = std::process::Command::new("prlimit")
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .arg(env!("CARGO_BIN_EXE_gateway"))
        .args(["run", "--config"])
        .arg(&config_path)
        .env("GATEWAY_LOG", "info")
        // `gateway bound:` lines say which ports it got (prlimit execs the gateway in place).
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("spawn gateway under prlimit");
    let bound = match child.stdout.take().map(read_bound) {
        Some(Ok(bound)) => bound,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("the gateway did not report its addresses ({other:?}): {log}");
        }
    };
    assert_eq!(bound.pid, child.id(), "the report is not our child's");
    let listen = bound.listener("wan").expect("the wan listener's address");
    let admin = bound.admin.expect("the admin address");
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(admin, "GET", "/ready").map(|r| r.0).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "not ready");
        thread::sleep(Duration::from_millis(25));
    }

    // Open far more connections than descriptors and hold them (idle, ClientHello unsent:
    // TCP_DEFER_ACCEPT would hold them in the kernel, so each sends one byte of a record).
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..300 {
        if let Ok(mut stream) = TcpStream::connect_timeout(&listen, Duration::from_secs(2)) {
            let _ = stream.write_all(&[0x16]);
            held.push(stream);
        }
    }
    // Keep the pressure on until a second warning reports suppressed repeats (one interval
    // passed under EMFILE). The admin server is out of descriptors too, so the log, not a
    // scrape, says when.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log
            .lines()
            .any(|line| line.contains("out of descriptors") && line.contains("suppressed="))
        {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    drop(held);
    let emfile = "gateway_listener_accept_errors_total{listener=\"wan\",reason=\"emfile\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        if let Ok((200, body)) = http(admin, "GET", "/metrics") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no scrape after the pressure ended"
        );
        thread::sleep(Duration::from_millis(100));
    };
    let pauses = sample(&text, emfile).expect("the accept-error sample exists");
    let suppressed =
        sample(&text, "gateway_log_lines_suppressed_total").expect("the suppressed counter exists");
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(pauses >= 20.0, "EMFILE pauses counted: {pauses}");
    let warnings = log
        .lines()
        .filter(|line| line.contains("out of descriptors"))
        .count();
    eprintln!("EMFILE pauses {pauses}, warning lines {warnings}, suppressed {suppressed}");
    assert!(warnings >= 1, "the condition is logged at all:\n{log}");
    // Two workers, one line each per interval (5 s), over at most ~50 s of test.
    assert!(
        warnings <= 22,
        "{warnings} warnings for {pauses} pauses:\n{log}"
    );
    assert!(suppressed >= 10.0, "suppressed lines counted: {suppressed}");
}

/// One sample's value; `None` when the sample is absent (absent is a failure, not zero).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}
