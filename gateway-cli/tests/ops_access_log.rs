//! The access log: one JSON line per connection with the right byte counts and Envoy-style
//! response flags, client addresses redacted on request, reopened on SIGUSR1.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const HELLO: &str = "openssl-default.bin";
const OTHER: &str = "gnutls-cli.bin";

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect()
}

fn wait_lines(path: &Path, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = lines(path);
        if found.len() >= count || Instant::now() > deadline {
            return found;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn access_log_gateway(extra: &str, routes: &str) -> Gateway {
    Gateway::start_from(
        |listen, admin, dir| {
            base_config(
                listen,
                admin,
                &format!(
                    "[access_log]\npath = \"{}\"\nredact_addresses = true\n\n{extra}\n{routes}",
                    dir.join("access.log").display()
                ),
            )
        },
        &[],
    )
}

#[test]
fn one_line_per_connection_with_bytes_and_flags() {
    let echo = echo_backend();
    let closes_first = tag_backend("bye");
    let dead_endpoint = dead_endpoint();
    let dead = dead_endpoint.address;
    let sni = testdata_sni(HELLO);
    let routes = [
        route(&sni, &[echo.address]),
        route(&format!("first.{TD}"), &[closes_first.address]),
        route(&testdata_sni(OTHER), &[dead]),
    ]
    .concat();
    let gateway = access_log_gateway("", &routes);
    let log = gateway.dir.join("access.log");
    let hello = testdata(HELLO);

    // DC: the client finishes first; bytes both ways are the hello plus the payload.
    let payload = pattern(10_000, 3);
    let mut stream = connect(gateway.listen);
    let mut sent = hello.clone();
    sent.extend_from_slice(&payload);
    stream.write_all(&sent).expect("send");
    stream.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(read_to_end(&mut stream).len(), sent.len());
    let line = &wait_lines(&log, 1)[0];
    assert_eq!(line["bytes_received"], sent.len() as u64, "{line}");
    assert_eq!(line["bytes_sent"], sent.len() as u64, "{line}");
    assert_eq!(line["response_flags"], "DC", "{line}");
    assert_eq!(line["connection_termination_details"], "downstream_close");
    assert_eq!(line["requested_server_name"], sni.as_str());
    assert_eq!(line["upstream_host"], echo.address.to_string());
    assert_eq!(line["listener"], "wan");
    assert_eq!(line["downstream_remote_address"], "redacted");
    assert!(line["upstream_connect_ms"].as_f64().is_some());

    // NR: not TLS, and a name without a route (a client-controlled name is logged as sent,
    // in the access log only).
    let mut plaintext = connect(gateway.listen);
    plaintext
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("send");
    assert_eq!(read_to_end(&mut plaintext), b"");
    // UF: the only endpoint refuses.
    let mut refused = connect(gateway.listen);
    refused.write_all(&testdata(OTHER)).expect("send");
    assert_eq!(read_to_end(&mut refused), b"");
    let all = wait_lines(&log, 3);
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all[1]["response_flags"], "NR", "{}", all[1]);
    assert_eq!(all[1]["bytes_sent"], 0);
    assert_eq!(all[2]["response_flags"], "UF", "{}", all[2]);
    assert_eq!(
        all[2]["connection_termination_details"],
        "upstream_connect_failure"
    );

    assert_eq!(gateway.metric("gateway_access_log_dropped_total"), 0.0);
    assert!(gateway
        .metrics()
        .contains("gateway_access_log_dropped_total 0"));
}

#[test]
fn the_upstream_closing_first_is_uc() {
    let closes_first = tag_backend("bye");
    let sni = testdata_sni(HELLO);
    let gateway = access_log_gateway("", &route(&sni, &[closes_first.address]));
    let log = gateway.dir.join("access.log");
    let hello = testdata(HELLO);
    let mut stream = connect(gateway.listen);
    stream.write_all(&hello).expect("send");
    let mut reply = [0u8; 3];
    stream.read_exact(&mut reply).expect("tag");
    assert_eq!(&reply, b"bye");
    // The upstream has finished its side; the client closes after it.
    let mut buffer = [0u8; 1];
    assert_eq!(stream.read(&mut buffer).expect("eof"), 0);
    drop(stream);
    let line = &wait_lines(&log, 1)[0];
    assert_eq!(line["response_flags"], "UC", "{line}");
    assert_eq!(line["bytes_sent"], 3);
    assert_eq!(line["bytes_received"], hello.len() as u64);
}

#[test]
fn connections_over_max_connections_are_logged_as_uo() {
    let echo = echo_backend();
    let gateway = access_log_gateway(
        "[limits]\nmax_connections = 2\n",
        &route(&testdata_sni(HELLO), &[echo.address]),
    );
    let log = gateway.dir.join("access.log");
    let hello = testdata(HELLO);
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        match try_established(gateway.listen, &hello) {
            Some(stream) => open.push(stream),
            None => refused += 1,
        }
    }
    assert!(refused >= 4, "refused {refused}");
    let overflow: Vec<_> = wait_lines(&log, refused)
        .into_iter()
        .filter(|line| line["response_flags"] == "UO")
        .collect();
    assert_eq!(
        overflow.len(),
        refused,
        "one UO line per refused connection"
    );
    assert_eq!(
        overflow[0]["connection_termination_details"],
        "max_connections"
    );
    assert_eq!(overflow[0]["downstream_remote_address"], "redacted");
}

#[test]
fn sigusr1_reopens_the_file_for_logrotate() {
    let echo = echo_backend();
    let gateway = access_log_gateway("", &route(&testdata_sni(HELLO), &[echo.address]));
    let log = gateway.dir.join("access.log");
    let rotated = gateway.dir.join("access.log.1");
    let hello = testdata(HELLO);
    let one_connection = || {
        let mut stream = connect(gateway.listen);
        stream.write_all(&hello).expect("send");
        stream.shutdown(Shutdown::Write).expect("half-close");
        read_to_end(&mut stream);
    };
    one_connection();
    assert_eq!(wait_lines(&log, 1).len(), 1);
    std::fs::rename(&log, &rotated).expect("rotate");
    gateway.signal("USR1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log.exists() {
        assert!(Instant::now() < deadline, "the access log was not reopened");
        thread::sleep(Duration::from_millis(20));
    }
    one_connection();
    assert_eq!(
        wait_lines(&log, 1).len(),
        1,
        "the new line went to the new file"
    );
    assert_eq!(
        lines(&rotated).len(),
        1,
        "the old file kept its line and got no more"
    );
}

#[test]
fn the_completion_engines_spliced_bytes_are_in_the_access_log_line() {
    let echo = echo_backend();
    let sni = testdata_sni(HELLO);
    let routes = route(&sni, &[echo.address]);
    let gateway = Gateway::start_from(
        |listen, admin, dir| {
            base_config(
                listen,
                admin,
                &format!(
                    "[access_log]\npath = \"{}\"\n\n{routes}",
                    dir.join("access.log").display()
                ),
            )
        },
        &[("GATEWAY_ENGINE", "uring"), ("GATEWAY_RELAY_MODE", "auto")],
    );
    let log = gateway.dir.join("access.log");
    // 16 MiB each way (a bulk flow, spliced), then the client's FIN.
    let mut sent = testdata(HELLO);
    sent.extend_from_slice(&pattern(16 << 20, 5));
    let mut stream = connect(gateway.listen);
    let mut writer = stream.try_clone().expect("clone");
    let total = sent.len();
    let sender = thread::spawn(move || {
        writer.write_all(&sent).expect("send");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    assert_eq!(read_to_end(&mut stream).len(), total);
    sender.join().expect("sender");
    let line = &wait_lines(&log, 1)[0];
    assert_eq!(line["bytes_received"], total as u64, "{line}");
    assert_eq!(line["bytes_sent"], total as u64, "{line}");
    assert_eq!(line["response_flags"], "DC", "{line}");
    assert!(
        gateway.metric("gateway_relay_spliced_bytes_total") > 0.0,
        "the flow was spliced"
    );
}
