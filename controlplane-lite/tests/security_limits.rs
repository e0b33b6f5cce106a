//! Security: an unauthenticated peer cannot exhaust the agent. A slowloris flood of half-sent
//! requests is capped per client and closed after the header timeout, while a legitimate
//! client is still served; blocking queries past their cap are refused with 429.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{eventually, Agent, TempDir};

/// A TCP connection from `source` to `target`: any 127.0.0.0/8 address works as a source on
/// Linux, so one test can be several clients.
fn connect_from(source: [u8; 4], target: &str) -> std::io::Result<TcpStream> {
    let target: SocketAddr = target.parse().expect("addr");
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&target.into(), Duration::from_secs(10))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(stream)
}

/// Whether the agent closed `stream` (EOF or reset) before `deadline`.
fn closed_by_agent(stream: &mut TcpStream, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    if stream
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .is_err()
    {
        return false;
    }
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
        ),
    }
}

/// A complete request from `source`; returns the status line.
fn legit_request(source: [u8; 4], target: &str) -> String {
    let mut stream = connect_from(source, target).expect("connect");
    stream
        .write_all(
            b"GET /v1/catalog/datacenters HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n",
        )
        .expect("send");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.lines().next().unwrap_or_default().to_owned()
}

const FLOOD: usize = 300;
const PER_CLIENT: usize = 50;

/// An agent that takes at most [`PER_CLIENT`] connections from one client and closes a
/// connection whose request header is not complete after `header_timeout` seconds.
fn capped_agent(dir: &TempDir, header_timeout: &str) -> Agent {
    Agent::start_in(
        dir.path(),
        "primary",
        &[
            "-http-max-conns-per-client",
            &PER_CLIENT.to_string(),
            "-http-header-timeout",
            header_timeout,
        ],
    )
}

#[test]
fn slowloris_is_capped_and_a_legitimate_client_is_served() {
    let dir = TempDir::new("slowloris");
    let agent = capped_agent(&dir, "3");
    // The attacker (127.0.0.1) opens FLOOD connections, each with half a request header.
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        if let Ok(mut stream) = connect_from([127, 0, 0, 1], &agent.address) {
            let _ = stream.write_all(b"GET /v1/catalog/services HTTP/1.1\r\nHost: a");
            flood.push(stream);
        }
    }
    assert_eq!(flood.len(), FLOOD, "the kernel accepted every connection");

    // A legitimate client (another address) is served while the flood holds its slots.
    assert_eq!(
        legit_request([127, 0, 0, 2], &agent.address),
        "HTTP/1.1 200 OK"
    );

    // Everything over the per-client cap was closed by the agent; the rest are closed by the
    // header timeout. Either way none is left holding the agent.
    let mut closed = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    for stream in &mut flood {
        if closed_by_agent(stream, deadline) {
            closed += 1;
        }
    }
    assert_eq!(
        closed, FLOOD,
        "every half-sent request is eventually closed"
    );
    drop(flood);
    // And the attacker's address is admitted again once its connections are gone.
    let started = Instant::now();
    loop {
        let status = legit_request([127, 0, 0, 1], &agent.address);
        if status == "HTTP/1.1 200 OK" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "127.0.0.1 not admitted again: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn connections_over_the_per_client_cap_are_refused_at_once() {
    let dir = TempDir::new("conn-cap");
    // A long header timeout: only the cap can close the extra connections within the test.
    let agent = capped_agent(&dir, "600");
    let mut held = Vec::new();
    for _ in 0..PER_CLIENT {
        let mut stream = connect_from([127, 0, 0, 3], &agent.address).expect("connect");
        stream.write_all(b"GET / HTTP/1.1\r\n").expect("send");
        held.push(stream);
    }
    // The agent accepts in arrival order, so the held connections take the client's slots
    // before this one arrives.
    let mut extra = connect_from([127, 0, 0, 3], &agent.address).expect("connect");
    assert!(
        closed_by_agent(&mut extra, Instant::now() + Duration::from_secs(30)),
        "connection over the cap was not closed"
    );
    // Another client is not affected.
    assert_eq!(
        legit_request([127, 0, 0, 4], &agent.address),
        "HTTP/1.1 200 OK"
    );
    drop(held);
}

#[test]
fn blocking_queries_over_the_cap_get_429() {
    let dir = TempDir::new("blocking-cap");
    let agent = Agent::start_in(dir.path(), "primary", &["-http-max-blocking-queries", "2"]);
    let index = agent
        .get("/v1/catalog/services", None)
        .index
        .expect("X-Consul-Index");
    let path = format!("/v1/catalog/services?index={index}&wait=60s");
    let mut holders = Vec::new();
    for _ in 0..2 {
        let url = agent.url(&path);
        holders.push(std::thread::spawn(move || {
            ureq::get(&url).call().map(|r| r.status().as_u16()).ok()
        }));
    }
    // Wait until both are held (the gauge), then a third is refused at once.
    eventually(Duration::from_secs(30), "blocking queries held", || {
        agent
            .get("/metrics", None)
            .text
            .contains("controlplane_blocking_queries_active 2")
    });
    let third = agent.get(&path, None);
    assert_eq!(third.status, 429, "{}", third.text);
    // Non-blocking reads still work.
    assert_eq!(agent.get("/v1/catalog/services", None).status, 200);
    // A write releases the held queries.
    let register = agent.put(
        "/v1/agent/service/register",
        None,
        r#"{"Name": "web", "Port": 1}"#,
    );
    assert_eq!(register.status, 200, "{}", register.text);
    for holder in holders {
        assert_eq!(holder.join().expect("thread"), Some(200));
    }
}
