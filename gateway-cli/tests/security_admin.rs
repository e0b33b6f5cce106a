//! The admin API's guards (issue 13 #5): a foreign `Host` is refused (DNS rebinding), a
//! mutating request with an `Origin` is refused (CSRF from a browser), an optional bearer token
//! guards mutating endpoints, and `redact_addresses` holds at debug level too.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const HELLO: &str = "openssl-default.bin";

/// Send one request with exactly the headers given (the `Host` included, or not) and return
/// the status code.
fn raw_status(address: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut stream =
        TcpStream::connect_timeout(&address, Duration::from_secs(2)).expect("connect admin");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut request = format!("{method} {path} HTTP/1.1\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Connection: close\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_foreign_host_is_refused_and_the_admin_address_is_served() {
    let gateway = Gateway::start("");
    let own = gateway.admin.to_string();
    let localhost = format!("localhost:{}", gateway.admin.port());
    assert_eq!(
        raw_status(gateway.admin, "GET", "/ready", &[("Host", &own)]),
        200
    );
    assert_eq!(
        raw_status(gateway.admin, "GET", "/ready", &[("Host", &localhost)]),
        200
    );
    // A DNS-rebinding page reaches the admin port under its own name.
    let rebound = format!("attacker.example:{}", gateway.admin.port());
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/config_dump"),
        ("POST", "/drain"),
    ] {
        assert_eq!(
            raw_status(gateway.admin, method, path, &[("Host", &rebound)]),
            403,
            "{method} {path} with Host {rebound}"
        );
    }
    // Another port on the same address is not this admin address either.
    let other_port = format!("127.0.0.1:{}", gateway.admin.port().wrapping_add(1));
    assert_eq!(
        raw_status(gateway.admin, "GET", "/ready", &[("Host", &other_port)]),
        403
    );
    assert_eq!(raw_status(gateway.admin, "GET", "/ready", &[]), 403);
    // The refused drain did not happen.
    assert_eq!(
        raw_status(gateway.admin, "GET", "/ready", &[("Host", &own)]),
        200
    );
}

#[test]
fn a_mutating_request_with_an_origin_is_refused() {
    let gateway = Gateway::start("");
    let own = gateway.admin.to_string();
    let origin = ("Origin", "http://attacker.example");
    for path in ["/reload", "/drain", "/logging?level=debug"] {
        assert_eq!(
            raw_status(gateway.admin, "POST", path, &[("Host", &own), origin]),
            403,
            "POST {path} with an Origin"
        );
    }
    // Reads carry no risk of a change and stay available to a browser.
    assert_eq!(
        raw_status(gateway.admin, "GET", "/ready", &[("Host", &own), origin]),
        200
    );
    assert_eq!(
        raw_status(gateway.admin, "POST", "/reload", &[("Host", &own)]),
        200
    );
    assert_eq!(
        raw_status(gateway.admin, "GET", "/ready", &[("Host", &own)]),
        200,
        "the refused drain did not happen"
    );
}

#[test]
fn a_token_file_guards_mutating_endpoints() {
    const TOKEN: &str = "s3cr3t-admin-token-for-the-test";
    let gateway = Gateway::start_from(
        |listen, admin, dir| {
            let token_file = dir.join("admin.token");
            std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");
            std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
                .expect("chmod token");
            format!(
                "[[listener]]\nname = \"wan\"\naddress = \"{listen}\"\n\n[admin]\naddress = \"{admin}\"\ntoken_file = \"{}\"\n\n[workers]\ncount = 2\n",
                token_file.display()
            )
        },
        &[],
    );
    let own = gateway.admin.to_string();
    let host = ("Host", own.as_str());
    assert_eq!(raw_status(gateway.admin, "POST", "/reload", &[host]), 401);
    assert_eq!(
        raw_status(
            gateway.admin,
            "POST",
            "/reload",
            &[host, ("Authorization", "Bearer wrong")]
        ),
        401
    );
    assert_eq!(
        raw_status(gateway.admin, "POST", "/drain", &[host]),
        401,
        "no drain without the token"
    );
    assert_eq!(raw_status(gateway.admin, "GET", "/ready", &[host]), 200);
    assert_eq!(raw_status(gateway.admin, "GET", "/metrics", &[host]), 200);
    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(
        raw_status(
            gateway.admin,
            "POST",
            "/reload",
            &[host, ("Authorization", &bearer)]
        ),
        200
    );
}

/// Writes an admin token file and a configuration that names it into `dir`: (token file,
/// configuration file). The caller sets the token file's mode.
fn token_file_config(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, "token\n").expect("write token");
    let config_path = dir.join("gateway.toml");
    std::fs::write(
        &config_path,
        format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[admin]\naddress = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            token_file.display()
        ),
    )
    .expect("write config");
    (token_file, config_path)
}

#[test]
fn a_group_readable_token_file_is_refused_at_start() {
    let dir = temp_dir("admin-token");
    let (token_file, config_path) = token_file_config(&dir);
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644))
        .expect("chmod token");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["run", "--config"])
        .arg(&config_path)
        .output()
        .expect("run gateway");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "started: {stderr}");
    assert!(
        stderr.contains("admin.token_file") && stderr.contains("group or others"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn debug_logs_redact_client_addresses_and_unrouted_names() {
    let gateway = Gateway::start_with_env(
        "[access_log]\npath = \"stdout\"\nredact_addresses = true\n",
        &[("GATEWAY_LOG", "gateway=debug")],
    );
    // One connection that is not TLS, one whose name has no route.
    let mut not_tls = connect(gateway.listen);
    let not_tls_client = not_tls.local_addr().expect("local");
    not_tls
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let _ = read_to_end(&mut not_tls);
    let mut unrouted = connect(gateway.listen);
    let unrouted_client = unrouted.local_addr().expect("local");
    unrouted.write_all(&testdata(HELLO)).expect("hello");
    let _ = read_to_end(&mut unrouted);
    gateway.wait_metric(
        "gateway_route_lookups_total{listener=\"wan\",result=\"no_route\"}",
        1.0,
    );
    // The debug lines are written as the connections close; wait for both.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut log = gateway.stderr();
    while !(log.contains("no route") && log.contains("closed before routing"))
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(20));
        log = gateway.stderr();
    }
    assert!(
        log.contains("no route") && log.contains("closed before routing"),
        "debug logging is on: {log}"
    );
    let sni = testdata_sni(HELLO);
    for secret in [
        not_tls_client.to_string(),
        unrouted_client.to_string(),
        sni.clone(),
    ] {
        assert!(!log.contains(&secret), "`{secret}` in the log:\n{log}");
    }
}

#[test]
fn validate_checks_the_token_file() {
    let dir = temp_dir("admin-token-validate");
    let (token_file, config_path) = token_file_config(&dir);
    let validate = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["validate", "--config"])
            .arg(&config_path)
            .output()
            .expect("run validate")
    };
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o640))
        .expect("chmod token");
    let output = validate();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("admin.token_file"),
        "{output:?}"
    );
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod token");
    assert!(validate().status.success());
    let _ = std::fs::remove_dir_all(&dir);
}
