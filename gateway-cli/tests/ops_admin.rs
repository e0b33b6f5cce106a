//! The operator surface: metrics that promtool accepts and a real Prometheus scrapes, the
//! run-time log filter, systemd's notify protocol, passive-health endpoint counts.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const HELLO: &str = "openssl-default.bin";

fn echo_once(gateway: &Gateway) {
    let mut stream = connect(gateway.listen);
    let hello = testdata(HELLO);
    stream.write_all(&hello).expect("hello");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    assert_eq!(read_to_end(&mut stream), hello);
}

#[test]
fn metrics_pass_promtool_and_carry_the_operations_set() {
    require_tool("promtool");
    let backend = echo_backend();
    let gateway = Gateway::start(&route(&testdata_sni(HELLO), &[backend.address]));
    echo_once(&gateway);
    let text = gateway.metrics();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let output = promtool.wait_with_output().expect("promtool");
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for family in [
        "gateway_build_info{",
        "gateway_draining 0",
        "gateway_cluster_endpoints{",
        "gateway_config_reloads_total{source=\"sighup\",result=\"success\"} 0",
        "gateway_config_reloads_total{source=\"api\",result=\"failure\"} 0",
        "gateway_access_log_dropped_total 0",
        "gateway_listener_sockets_open{listener=\"wan\"} 2",
        "gateway_listener_accept_errors_total{listener=\"wan\",reason=\"enfile\"} 0",
        "gateway_connections_limit ",
        "gateway_worker_connections_active{worker=\"1\"}",
        "process_cpu_seconds_total ",
        "process_open_fds ",
        "process_max_fds ",
        "process_resident_memory_bytes ",
        "process_start_time_seconds ",
    ] {
        assert!(text.contains(family), "missing {family}");
    }
    assert!(
        text.contains(",rustc=\"rustc "),
        "build info names the compiler"
    );
}

#[test]
fn a_real_prometheus_scrapes_the_gateway_and_answers_a_query() {
    require_tool("prometheus");
    let backend = echo_backend();
    let gateway = Gateway::start(&route(&testdata_sni(HELLO), &[backend.address]));
    for _ in 0..7 {
        echo_once(&gateway);
    }
    let storage = gateway.dir.join("prometheus-data");
    let config = gateway.dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: ['{}']\n",
            gateway.admin
        ),
    )
    .expect("prometheus config");
    let mut server = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", storage.display()))
        .arg("--web.listen-address=127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(gateway.dir.join("prometheus.log")).expect("log"),
        ))
        .spawn()
        .expect("prometheus");
    // Prometheus binds port 0 and logs `msg="Listening on" address=127.0.0.1:PORT`.
    let log = gateway.dir.join("prometheus.log");
    let listening = Instant::now() + Duration::from_secs(40);
    let address: SocketAddr = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let found = text
            .lines()
            .filter(|line| line.contains("msg=\"Listening on\""))
            .find_map(|line| {
                line.split("address=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            });
        if let Some(address) = found {
            break address;
        }
        if Instant::now() > listening {
            let _ = server.kill();
            panic!("Prometheus did not report its address:\n{text}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    // gateway_listener_connections_accepted_total{listener="wan"}, URL-encoded.
    let query =
        "/api/v1/query?query=gateway_listener_connections_accepted_total%7Blistener%3D%22wan%22%7D";
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut last = String::new();
    let value = loop {
        if let Ok((200, body)) = http(address, "GET", query) {
            let parsed: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if let Some(value) = parsed["data"]["result"][0]["value"][1].as_str() {
                break value.to_owned();
            }
            last = body;
        }
        if Instant::now() > deadline {
            let _ = server.kill();
            panic!(
                "Prometheus never answered with a value: {last}\n{}",
                std::fs::read_to_string(gateway.dir.join("prometheus.log")).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(200));
    };
    let (_, up) = http(address, "GET", "/api/v1/query?query=up").expect("up");
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(value, "7", "Prometheus saw the seven accepted connections");
    assert!(up.contains("\"1\""), "the scrape target is up: {up}");
}

#[test]
fn the_log_filter_is_read_and_changed_at_run_time() {
    let gateway = Gateway::start_from(|listen, admin, _| base_config(listen, admin, ""), &[]);
    let (status, body) = http(gateway.admin, "GET", "/logging").expect("get");
    assert_eq!(status, 200);
    assert!(body.contains("\"filter\":\"info\""), "{body}");
    let no_route = || {
        let mut stream = connect(gateway.listen);
        stream.write_all(&testdata(HELLO)).expect("hello");
        assert_eq!(read_to_end(&mut stream), b"");
    };
    no_route();
    assert_eq!(http(gateway.admin, "GET", "/ready").expect("ready").0, 200);
    assert!(!gateway.stderr().contains("no route"), "debug is off");

    let (status, body) = http(
        gateway.admin,
        "POST",
        "/logging?level=info%2Cgateway%3Ddebug",
    )
    .expect("post");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("gateway=debug"), "{body}");
    no_route();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !gateway.stderr().contains("no route") {
        assert!(
            Instant::now() < deadline,
            "debug lines appear: {}",
            gateway.stderr()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = http(gateway.admin, "POST", "/logging?level=%5Bbroken").expect("post");
    assert_eq!(status, 400, "{body}");
    let (_, body) = http(gateway.admin, "GET", "/logging").expect("get");
    assert!(
        body.contains("gateway=debug"),
        "a bad filter changes nothing: {body}"
    );
    assert_eq!(
        http(gateway.admin, "GET", "/healthz").expect("healthz").0,
        200
    );
}

#[test]
fn endpoints_held_out_after_a_failed_connect_are_reported_unhealthy() {
    let backend = echo_backend();
    let dead_endpoint = dead_endpoint();
    let dead = dead_endpoint.address;
    let sni = testdata_sni(HELLO);
    let gateway = Gateway::start_from(
        |listen, admin, _| base_config(listen, admin, &route(&sni, &[dead, backend.address])),
        &[],
    );
    let labels = format!("destination_service=\"{sni}\",destination_datacenter=\"\"");
    assert_eq!(
        gateway.metric(&format!(
            "gateway_cluster_endpoints{{{labels},state=\"healthy\"}}"
        )),
        2.0
    );
    echo_once(&gateway);
    let unhealthy = format!("gateway_cluster_endpoints{{{labels},state=\"unhealthy\"}}");
    assert_eq!(gateway.wait_metric(&unhealthy, 1.0), 1.0);
    assert_eq!(
        gateway.metric(&format!(
            "gateway_cluster_endpoints{{{labels},state=\"healthy\"}}"
        )),
        1.0
    );
}

/// Collect notifications until one satisfies `done` (or the deadline passes).
fn wait_notification(
    socket: &UnixDatagram,
    seen: &mut Vec<String>,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buffer = [0u8; 4096];
    loop {
        assert!(Instant::now() < deadline, "notifications so far: {seen:?}");
        if let Ok(length) = socket.recv(&mut buffer) {
            let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
            seen.push(message.clone());
            if done(&message) {
                return message;
            }
        }
    }
}

#[test]
fn systemd_hears_ready_reloading_watchdog_and_stopping() {
    let dir = temp_dir("notify");
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let notify = path.display().to_string();
    let mut gateway = Gateway::start_from(
        |listen, admin, _| base_config(listen, admin, "[drain]\nannounce = \"0s\"\n"),
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")],
    );
    let mut seen = Vec::new();
    let ready = wait_notification(&socket, &mut seen, |m| m.contains("READY=1"));
    assert!(
        ready.contains(&format!("MAINPID={}", gateway.pid())),
        "{ready}"
    );
    wait_notification(&socket, &mut seen, |m| m == "WATCHDOG=1");
    wait_notification(&socket, &mut seen, |m| m == "WATCHDOG=1");

    assert_eq!(
        http(gateway.admin, "POST", "/reload").expect("reload").0,
        200
    );
    let reloading = wait_notification(&socket, &mut seen, |m| m.contains("RELOADING=1"));
    let monotonic: u64 = reloading
        .lines()
        .find_map(|line| line.strip_prefix("MONOTONIC_USEC="))
        .and_then(|value| value.parse().ok())
        .expect("MONOTONIC_USEC");
    assert!(monotonic > 0);
    wait_notification(&socket, &mut seen, |m| m.contains("READY=1"));

    gateway.signal("TERM");
    wait_notification(&socket, &mut seen, |m| m.contains("STOPPING=1"));
    let status = gateway.wait_exit(Duration::from_secs(5)).expect("exit");
    assert!(status.success());
}

#[test]
fn an_abstract_notify_socket_works_too() {
    use std::os::linux::net::SocketAddrExt;
    // A fresh private directory's name is unique among this run's tests and other runs.
    let unique = temp_dir("notify-abstract");
    let name = unique
        .file_name()
        .and_then(|name| name.to_str())
        .expect("name")
        .to_owned();
    let address =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
    let socket = UnixDatagram::bind_addr(&address).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let notify = format!("@{name}");
    let _gateway = Gateway::start_from(
        |listen, admin, _| base_config(listen, admin, ""),
        &[("NOTIFY_SOCKET", &notify)],
    );
    let mut seen = Vec::new();
    wait_notification(&socket, &mut seen, |m| m.contains("READY=1"));
    // Pings could only come after READY: listen for ten of the control loop's ticks.
    let window = Instant::now() + Duration::from_secs(1);
    let mut buffer = [0u8; 4096];
    while Instant::now() < window {
        if let Ok(length) = socket.recv(&mut buffer) {
            seen.push(String::from_utf8_lossy(&buffer[..length]).into_owned());
        }
    }
    assert!(
        !seen.iter().any(|m| m.contains("WATCHDOG")),
        "no watchdog unless asked: {seen:?}"
    );
}
