//! Security (issue 13 #3): memory is given back after a connection flood. An unauthenticated
//! peer opens thousands of connections, each with 8 KiB of a request header that never ends;
//! the agent's resident memory grows while they are held and must come back to near its
//! baseline once they close. The test waits for conditions (bounded), never on a timing.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Agent, TempDir};

/// Source addresses the flood comes from (any 127.0.0.0/8 address works as a source on Linux),
/// so the per-client cap (200) does not refuse it.
const SOURCES: u8 = 20;
/// Connections per source, under the per-client cap.
const PER_SOURCE: usize = 195;
/// Bytes of an unfinished request header sent on each connection.
const HALF_HEADER: usize = 8 * 1024;
/// The flood must raise RSS at least this much, or the test measured nothing.
const MIN_GROWTH_KIB: u64 = 20 * 1024;
/// How far above the baseline RSS may stay once the flood is gone (the margin covers the
/// allocator's retained pages, tokio's grown structures and the store's page cache).
const BOUND_KIB: u64 = 16 * 1024;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn connect_from(source: [u8; 4], target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&target.into(), Duration::from_secs(10))?;
    Ok(socket.into())
}

/// Polls `check` every 100 ms until it holds or `limit` passes; returns whether it held.
fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn rss_returns_near_baseline_after_a_connection_flood() {
    let dir = TempDir::new("memory-flood");
    // A header timeout well past the flood's set-up, so the agent holds every connection
    // until the test closes them.
    let agent = Agent::start_in(dir.path(), "primary", &["-http-header-timeout", "120"]);
    let pid = agent.child.id();
    let target: SocketAddr = agent.address.parse().expect("agent address");
    // Warm up the request path so the baseline includes what any served request allocates.
    for _ in 0..50 {
        assert_eq!(agent.get("/v1/catalog/services", None).status, 200);
    }
    let baseline = rss_kib(pid);
    let baseline_fds = open_fds(pid);

    let mut header = b"GET /v1/catalog/services HTTP/1.1\r\nHost: agent\r\nX-Pad: ".to_vec();
    header.resize(HALF_HEADER, b'a');
    let mut flood = Vec::new();
    for source in 0..SOURCES {
        for _ in 0..PER_SOURCE {
            let mut stream = connect_from([127, 0, 1, 10 + source], target).expect("connect");
            stream.write_all(&header).expect("half a header");
            flood.push(stream);
        }
    }
    let expected = usize::from(SOURCES) * PER_SOURCE;
    assert!(
        wait_for(Duration::from_secs(60), || open_fds(pid)
            >= baseline_fds + expected),
        "the agent holds every flood connection: {} fds, baseline {baseline_fds}",
        open_fds(pid)
    );
    let mut peak = 0;
    assert!(
        wait_for(Duration::from_secs(60), || {
            peak = peak.max(rss_kib(pid));
            peak >= baseline + MIN_GROWTH_KIB
        }),
        "the flood raised RSS from {baseline} KiB to only {peak} KiB"
    );
    // The agent still serves while the flood holds its connections.
    assert_eq!(agent.get("/v1/catalog/services", None).status, 200);

    drop(flood);
    assert!(
        wait_for(Duration::from_secs(60), || open_fds(pid)
            <= baseline_fds + 5),
        "the agent closed the flood's connections: {} fds, baseline {baseline_fds}",
        open_fds(pid)
    );
    assert_eq!(agent.get("/v1/catalog/services", None).status, 200);
    let mut after = u64::MAX;
    let returned = wait_for(Duration::from_secs(60), || {
        after = rss_kib(pid);
        after <= baseline + BOUND_KIB
    });
    eprintln!("RSS baseline {baseline} KiB, peak {peak} KiB, after {after} KiB");
    assert!(
        returned,
        "RSS stayed at {after} KiB after the flood (baseline {baseline} KiB, peak {peak} KiB, bound baseline + {BOUND_KIB} KiB)"
    );
}
