//! `gateway sidecar -redact-addresses` (issue 13 #5: "the sidecar gets the same option"): a
//! refused inbound connection is logged without the client's address.

mod mesh_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_support::*;

#[test]
fn a_redacting_sidecar_logs_refusals_without_the_client_address() {
    let cp = ControlPlane::start("sidecar-redact");
    // Nothing answers on socat's registered ports: the refusal happens in the sidecar's
    // handshake. The test holds both so that nobody else is registered under them, and the
    // sidecar binds its public listener on port 0 (`-listen`) and reports it.
    let socat_port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let registered = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    cp.register_socat(
        socat_port.local_addr().expect("addr").port(),
        registered.local_addr().expect("addr").port(),
    );
    let dir = temp_dir("sidecar-redact-log");
    let log = dir.join("sidecar.log");
    let mut sidecar = Proc::spawn(
        "sidecar",
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["sidecar", "-sidecar-for", "socat", "-token", &cp.token])
            .args(["-http-addr", &cp.address])
            .args(["-admin-bind", "127.0.0.1:0", "-listen", "127.0.0.1:0"])
            .arg("-redact-addresses")
            .env("GATEWAY_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log")),
    );
    let stdout = sidecar.child.stdout.take().expect("piped stdout");
    let bound = test_support::gateway::read_bound_of(stdout, "sidecar")
        .unwrap_or_else(|error| panic!("the sidecar did not report its addresses: {error}"));
    assert_eq!(
        bound.pid,
        sidecar.child.id(),
        "the report is not our child's"
    );
    let public = bound
        .listener("public")
        .expect("the public address")
        .to_string();
    wait_listening(&public);
    // Not TLS at all: refused in the handshake, which is logged at warn with the reason.
    let mut client = TcpStream::connect(&public).expect("connect");
    let client_address = client.local_addr().expect("local").to_string();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = String::new();
    while !text.contains("inbound connection refused") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        text = std::fs::read_to_string(&log).unwrap_or_default();
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(text.contains("inbound connection refused"), "{text}");
    assert!(
        !text.contains(&client_address),
        "`{client_address}` in the log:\n{text}"
    );
}
