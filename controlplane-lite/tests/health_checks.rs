//! Health checks that run: a TCP check on a sidecar's listener, followed by the catalog's
//! `passing` filter, a blocking query, and the sidecar configuration of a client (its upstream
//! endpoints); and `DeregisterCriticalServiceAfter`.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, Agent, TempDir};
use serde_json::{json, Value};

fn passing_connect(agent: &Agent, service: &str) -> Vec<Value> {
    let answer = agent.get(&format!("/v1/health/connect/{service}?passing"), None);
    assert_eq!(answer.status, 200, "{}", answer.text);
    answer.json().as_array().cloned().unwrap_or_default()
}

fn upstream_endpoints(agent: &Agent) -> Value {
    let answer = agent.get("/v1/internal/sidecar/web-sidecar-proxy", None);
    assert_eq!(answer.status, 200, "{}", answer.text);
    answer.json()["upstreams"][0]["endpoints"].clone()
}

#[test]
fn a_stopped_sidecar_leaves_routing_within_a_check_interval() {
    let dir = TempDir::new("checks-tcp");
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    // Stands in for socat's sidecar listener: the TCP check dials it.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let sidecar_address = listener.local_addr().expect("addr").to_string();
    let socat = json!({"Name": "socat", "Port": 8181, "Connect": {"SidecarService": {
        "Checks": [{"Name": "Connect Sidecar Listening", "TCP": sidecar_address,
                    "Interval": "200ms", "Timeout": "1s"}]}}});
    let web = json!({"Name": "web", "Port": 9090, "Connect": {"SidecarService": {"Proxy": {
        "Upstreams": [{"DestinationName": "socat", "LocalBindPort": 9191}]}}}});
    for body in [&socat, &web] {
        let answer = agent.put("/v1/agent/service/register", None, &body.to_string());
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    // New checks start critical; the first probe makes it pass.
    eventually(Duration::from_secs(10), "socat's sidecar passes", || {
        passing_connect(&agent, "socat").len() == 1
    });
    let rows = agent.get("/v1/health/connect/socat", None).json();
    let checks = rows[0]["Checks"].as_array().cloned().unwrap_or_default();
    assert_eq!(checks.len(), 2, "{checks:?}");
    assert!(
        checks.iter().all(|c| c["Status"] == "passing"),
        "{checks:?}"
    );
    assert_eq!(
        upstream_endpoints(&agent).as_array().map(Vec::len),
        Some(1),
        "web's sidecar dials socat's"
    );
    let index = agent
        .get("/v1/health/connect/socat?passing", None)
        .index
        .expect("index");

    // The sidecar stops: its check fails at the next probe, and a blocking query wakes.
    drop(listener);
    let dropped = Instant::now();
    let answer = agent.get(
        &format!("/v1/health/connect/socat?passing&index={index}&wait=10s"),
        None,
    );
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(
        answer.json(),
        json!([]),
        "the blocking query saw the failure"
    );
    // Reported, not asserted: how long after the stop the blocking query woke, against the
    // 200 ms check interval.
    println!(
        "left health/connect?passing {} ms after the listener closed (check interval 200 ms)",
        dropped.elapsed().as_millis()
    );
    assert_eq!(upstream_endpoints(&agent), json!([]));
    let critical = agent.get("/v1/health/state/critical", None).json();
    assert!(
        critical
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["ServiceID"] == "socat-sidecar-proxy")),
        "{critical}"
    );
}

#[test]
fn critical_services_are_deregistered_after_the_grace_period() {
    let dir = TempDir::new("checks-dereg");
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    let body = json!({"Name": "batch", "Port": 1, "Check": {"TTL": "10s",
        "DeregisterCriticalServiceAfter": "300ms"}});
    let answer = agent.put("/v1/agent/service/register", None, &body.to_string());
    assert_eq!(answer.status, 200, "{}", answer.text);
    // Kept alive by its TTL updates: it stays while passing.
    let pass = agent.put("/v1/agent/check/pass/service:batch", None, "");
    assert_eq!(pass.status, 200, "{}", pass.text);
    assert_eq!(agent.get("/v1/agent/service/batch", None).status, 200);
    let fail = agent.put("/v1/agent/check/fail/service:batch?note=down", None, "");
    assert_eq!(fail.status, 200, "{}", fail.text);
    eventually(Duration::from_secs(10), "batch is deregistered", || {
        agent.get("/v1/agent/service/batch", None).status == 404
    });
    let checks = agent.get("/v1/agent/checks", None).json();
    assert_eq!(checks, json!({}), "its checks went with it");
    // Unsupported check kinds are refused, not silently stored.
    let script =
        json!({"Name": "x", "Port": 1, "Check": {"Args": ["/bin/true"], "Interval": "1s"}});
    let answer = agent.put("/v1/agent/service/register", None, &script.to_string());
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert!(answer.text.contains("Args"), "{}", answer.text);
}

/// A tiny HTTP server answering every request with the current `code`; stops when `stop` is set
/// and one more connection arrives (bounded to 10 000 requests).
fn status_server(code: Arc<AtomicU16>, stop: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(10_000) {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut request = Vec::new();
            let mut buffer = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buffer[..n]),
                }
            }
            let status = code.load(Ordering::SeqCst);
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    address
}

fn check_status(agent: &Agent, service: &str) -> Value {
    let answer = agent.get(&format!("/v1/health/checks/{service}"), None);
    assert_eq!(answer.status, 200, "{}", answer.text);
    answer.json()[0]["Status"].clone()
}

#[test]
fn http_checks_follow_the_status_code() {
    let dir = TempDir::new("checks-http");
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    let code = Arc::new(AtomicU16::new(200));
    let stop = Arc::new(AtomicBool::new(false));
    let address = status_server(code.clone(), stop.clone());
    let body = json!({"Name": "api", "Port": 1, "Check": {
        "HTTP": format!("http://{address}/health"), "Interval": "200ms", "Timeout": "2s"}});
    let answer = agent.put("/v1/agent/service/register", None, &body.to_string());
    assert_eq!(answer.status, 200, "{}", answer.text);
    eventually(Duration::from_secs(10), "api passes", || {
        check_status(&agent, "api") == "passing"
    });
    assert_eq!(
        agent.get("/v1/health/service/api?passing", None).json()[0]["Service"]["ID"],
        "api"
    );
    code.store(429, Ordering::SeqCst);
    eventually(Duration::from_secs(10), "429 is a warning", || {
        check_status(&agent, "api") == "warning"
    });
    assert_eq!(
        agent.get("/v1/health/service/api?passing", None).json(),
        json!([]),
        "passing means every check passes"
    );
    code.store(503, Ordering::SeqCst);
    eventually(Duration::from_secs(10), "503 is critical", || {
        check_status(&agent, "api") == "critical"
    });
    stop.store(true, Ordering::SeqCst);
    let _ = TcpStream::connect(&address);
}
