//! Documented behaviour that no other test touched (issue 15 #5): the access log's `SI` and
//! `UH` flags, SIGINT exiting at once, `--version`, and `--log-format json`.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const HELLO: &str = "openssl-default.bin";

/// The access log's lines, once there are at least `count` (or whatever is there at the
/// deadline).
fn access_lines(path: &Path, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is JSON"))
            .collect();
        if lines.len() >= count || Instant::now() > deadline {
            return lines;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn with_access_log(extra: String) -> Gateway {
    Gateway::start_from(
        move |listen, admin, dir| {
            base_config(
                listen,
                admin,
                &format!(
                    "[access_log]\npath = \"{}\"\n\n{extra}",
                    dir.join("access.log").display()
                ),
            )
        },
        &[],
    )
}

#[test]
fn an_idle_pair_is_logged_with_si() {
    let backend = echo_backend();
    let gateway = with_access_log(format!(
        "[timeouts]\nidle = \"300ms\"\n\n{}",
        route(&testdata_sni(HELLO), &[backend.address])
    ));
    let mut client = established(gateway.listen, &testdata(HELLO));
    // Then silence: the idle sweep closes the pair.
    assert!(read_to_end(&mut client).is_empty());
    let lines = access_lines(&gateway.dir.join("access.log"), 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["response_flags"], "SI", "{}", lines[0]);
    assert_eq!(
        lines[0]["connection_termination_details"], "idle_timeout",
        "{}",
        lines[0]
    );
}

#[test]
fn no_healthy_endpoint_is_logged_with_uh_after_a_failed_connect_with_uf() {
    // A port with nothing listening: the first connect fails (UF) and holds the endpoint out
    // for `endpoint_backoff`; the next connection finds no healthy endpoint at all (UH).
    let dead: SocketAddr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    // Passive health is per worker (per-core state), so one worker sees both connections.
    let routes = route(&testdata_sni(HELLO), &[dead]);
    let gateway = Gateway::start_from(
        |listen, admin, dir| {
            format!(
                "[[listener]]\nname = \"wan\"\naddress = \"{listen}\"\n\n[admin]\naddress = \"{admin}\"\n\n[workers]\ncount = 1\n\n[limits]\nendpoint_backoff = \"1h\"\n\n[access_log]\npath = \"{}\"\n\n{routes}",
                dir.join("access.log").display()
            )
        },
        &[],
    );
    for _ in 0..2 {
        let mut client = connect(gateway.listen);
        client.write_all(&testdata(HELLO)).expect("hello");
        assert!(read_to_end(&mut client).is_empty());
    }
    let lines = access_lines(&gateway.dir.join("access.log"), 2);
    let flags: Vec<&str> = lines
        .iter()
        .filter_map(|line| line["response_flags"].as_str())
        .collect();
    assert_eq!(flags, ["UF", "UH"], "{lines:?}");
}

#[test]
fn sigint_exits_at_once_with_connections_open() {
    let backend = echo_backend();
    let mut gateway = Gateway::start(&format!(
        "[drain]\nannounce = \"1h\"\ntimeout = \"1h\"\n\n{}",
        route(&testdata_sni(HELLO), &[backend.address])
    ));
    let _client = established(gateway.listen, &testdata(HELLO));
    gateway.signal("INT");
    // With an hour of announce and drain, only an immediate exit ends within the bound.
    let status = gateway
        .wait_exit(Duration::from_secs(20))
        .expect("SIGINT did not stop the gateway");
    assert!(status.code().is_some(), "exited, not killed: {status:?}");
    assert!(gateway.stderr().contains("SIGINT"), "{}", gateway.stderr());
}

#[test]
fn version_names_the_revision_compiler_and_io_driver() {
    let output = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--version")
        .output()
        .expect("run");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.starts_with(&format!("gateway {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    for part in ["revision ", "rustc ", "io driver on this kernel: "] {
        assert!(text.contains(part), "missing `{part}` in {text}");
    }
    assert!(
        text.contains("io_uring") || text.contains("epoll"),
        "{text}"
    );
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let dir = temp_dir("log-json");
    let config_path = dir.join("gateway.toml");
    std::fs::write(
        &config_path,
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[admin]\naddress = \"127.0.0.1:0\"\n",
    )
    .expect("config");
    let log = dir.join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "--log-format",
            "json",
            "--log-level",
            "info",
            "run",
            "--config",
        ])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    // The "listening" line is written once the workers accept.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = String::new();
    while !text.contains("listening") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        text = std::fs::read_to_string(&log).unwrap_or_default();
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(text.contains("listening"), "{text}");
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}"));
        assert!(value["level"].is_string(), "{line}");
        assert!(value["fields"]["message"].is_string(), "{line}");
    }
}
