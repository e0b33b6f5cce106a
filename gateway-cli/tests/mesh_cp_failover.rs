//! `gateway mesh` and two sidecars pointed at two control-plane agents (`-http-addr A,B`),
//! each agent on its own redb store and CA. The agent in use is SIGKILLed; connections open
//! through the gateway and the sidecars keep flowing, new ones are routed once the processes
//! follow the survivor, and a route and an intention written to the survivor after the kill
//! take effect. The times from the kill are measured and printed, never asserted.
//!
//! The same with two agents sharing one etcd store (one CA, one catalog): the gateway follows
//! a route written through the survivor after the agent it used is SIGKILLed. Needs etcd
//! (scripts/install-test-deps).

mod mesh_support;

/// The controlplane-lite tests' 3-member etcd cluster on unix sockets (`scripts/etcd-cluster`),
/// the one home of how a test starts one.
#[path = "../../controlplane-lite/tests/common/etcd.rs"]
#[allow(dead_code)]
mod etcd;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mesh_support::*;
use test_support::gateway::{echo_backend, tag_backend, try_established};

/// Bound on each wait after the kill: the sidecars move to the survivor's CA (new roots, a new
/// leaf) within a few back-off rounds; this is a deadline, not an expectation.
const AFTER_KILL: Duration = Duration::from_secs(90);

/// A TLS ClientHello for `sni`, as any client sends it (the gateway routes on its SNI and
/// relays it untouched; the backends here never answer TLS).
fn client_hello(sni: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).expect("server name");
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).expect("ClientHello");
    hello
}

fn sni(service: &str, trust_domain: &str) -> String {
    format!("{service}.default.primary.internal.{trust_domain}")
}

/// Register `service` with its "sidecar" at `port` (what the gateway routes the SNI to).
fn register_behind_gateway(cp: &ControlPlane, service: &str, port: u16) {
    let body = format!(
        r#"{{"service": {{"name": "{service}", "port": 1,
            "connect": {{"sidecar_service": {{"port": {port}}}}}}}}}"#
    );
    cp.ok("PUT", "/v1/agent/service/register", Some(&body));
}

/// Wait (up to [`AFTER_KILL`]) until `condition` holds; the time it took since `since`.
fn measure(what: &str, since: Instant, mut condition: impl FnMut() -> bool) -> Duration {
    let deadline = Instant::now() + AFTER_KILL;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
    since.elapsed()
}

/// A connection through the gateway to `sni`'s echo, open and echoing.
fn echo_through_gateway(gateway: SocketAddr, sni: &str) -> Option<TcpStream> {
    try_established(gateway, &client_hello(sni))
}

fn echo_raw(stream: &mut TcpStream, bytes: &[u8]) -> bool {
    if stream.write_all(bytes).is_err() {
        return false;
    }
    let mut got = vec![0u8; bytes.len()];
    stream.read_exact(&mut got).is_ok() && got == bytes
}

fn failovers(admin: &str) -> f64 {
    ["connect", "tls", "timeout", "hung_up", "server_error"]
        .iter()
        .filter_map(|reason| {
            metric(
                admin,
                &format!("gateway_control_plane_failovers_total{{reason=\"{reason}\"}}"),
            )
        })
        .sum()
}

#[test]
fn gateway_and_sidecars_fail_over_to_the_surviving_agent_and_follow_its_changes() {
    let first = ControlPlane::start("cpfo-a");
    let second = ControlPlane::start_alongside("cpfo-b", &first);
    let http_addr = format!("{},{}", first.address, second.address);
    let (first_domain, second_domain) = (first.trust_domain(), second.trust_domain());
    assert_ne!(first_domain, second_domain, "two stores, two CAs");

    // The same services on both agents, as an operator registers them on each.
    let echo = echo_backend();
    let (socat_public, web_public, web_upstream) = (listening(), listening(), listening());
    let socat = socat_echo();
    for cp in [&first, &second] {
        register_behind_gateway(cp, "echo", echo.address.port());
        cp.register_socat(socat.port, port(&socat_public));
        cp.register_web(port(&web_public), port(&web_upstream));
        cp.allow("web", "socat");
    }
    let upstream = format!("127.0.0.1:{}", port(&web_upstream));

    let gateway = mesh_gateway_named(&http_addr, &first.token, "mesh-gateway", "cpfo-gw");
    let gateway_admin = gateway.admin.to_string();
    let socat_proxy =
        sidecar_passing_to(&http_addr, "socat", &first.token, vec![socat_public], &[]);
    let web_proxy = sidecar_passing_to(
        &http_addr,
        "web",
        &first.token,
        vec![web_public, web_upstream],
        &[],
    );
    let sidecar_admins = [socat_proxy.admin.to_string(), web_proxy.admin.to_string()];
    let first_agent = format!(
        "gateway_control_plane_agent{{address=\"http://{}\"}}",
        first.address
    );
    let second_agent = format!(
        "gateway_control_plane_agent{{address=\"http://{}\"}}",
        second.address
    );
    wait_for("the gateway to use the first agent", || {
        metric(&gateway_admin, "gateway_control_plane_connected") == Some(1.0)
            && metric(&gateway_admin, &first_agent) == Some(1.0)
    });

    // Connections open before the kill: through the gateway (raw relay after the hello) and
    // through web's sidecar to socat's (mutual TLS, then socat's echo).
    let mut through_gateway = None;
    wait_for("a route from the first agent", || {
        through_gateway = echo_through_gateway(gateway.listen, &sni("echo", &first_domain));
        through_gateway.is_some()
    });
    let mut through_gateway = through_gateway.expect("connection");
    let mut through_sidecars = TcpStream::connect(&upstream).expect("web's upstream");
    assert_eq!(
        echo_on(&mut through_sidecars, "before the kill\n").as_deref(),
        Some("before the kill\n")
    );
    for admin in &sidecar_admins {
        assert_eq!(metric(admin, &first_agent), Some(1.0), "{admin}");
    }

    let mut first = first;
    first.proc.signal("KILL");
    let killed = Instant::now();
    first
        .proc
        .wait_exit(Duration::from_secs(10))
        .expect("the first agent died");

    // Existing connections keep flowing: neither the gateway nor the sidecars drop them.
    assert!(echo_raw(
        &mut through_gateway,
        b"after the kill, via the gateway"
    ));
    assert_eq!(
        echo_on(&mut through_sidecars, "after the kill\n").as_deref(),
        Some("after the kill\n")
    );

    // New connections: the gateway routes the survivor's names (its trust domain), which only
    // a table read from the second agent holds.
    let gateway_new = measure("a route from the second agent", killed, || {
        echo_through_gateway(gateway.listen, &sni("echo", &second_domain)).is_some()
    });
    assert_eq!(metric(&gateway_admin, &second_agent), Some(1.0));
    assert_eq!(metric(&gateway_admin, &first_agent), Some(0.0));
    assert!(failovers(&gateway_admin) >= 1.0);
    // The sidecars move to the second agent's roots and leaves; new connections echo again.
    let sidecars_new = measure("a new connection through the sidecars", killed, || {
        echo_once(&upstream, "after the failover\n").as_deref() == Some("after the failover\n")
    });
    for admin in &sidecar_admins {
        assert_eq!(metric(admin, &second_agent), Some(1.0), "{admin}");
        assert!(failovers(admin) >= 1.0, "{admin}");
    }

    // Changes written to the survivor after the kill: a new route for the gateway, a deny
    // for the sidecars.
    let late = tag_backend("late-service");
    let written = Instant::now();
    register_behind_gateway(&second, "late", late.address.port());
    let route_change = measure("the route written after the kill", written, || {
        let Ok(mut stream) = TcpStream::connect(gateway.listen) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.write_all(&client_hello(&sni("late", &second_domain)));
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        answer == b"late-service"
    });
    let written = Instant::now();
    second.ok(
        "DELETE",
        "/v1/connect/intentions/exact?source=web&destination=socat",
        None,
    );
    let deny = r#"{"SourceName": "web", "DestinationName": "socat", "Action": "deny"}"#;
    second.ok("POST", "/v1/connect/intentions", Some(deny));
    let intention_change = measure("the deny written after the kill", written, || {
        echo_once(&upstream, "after the deny\n").is_none()
    });
    println!(
        "control-plane failover (SIGKILL of the agent in use): gateway routes from the survivor \
         after {:?}, sidecars route new connections after {:?}; after the kill, a route written \
         to the survivor took {:?} and a deny {:?}",
        gateway_new, sidecars_new, route_change, intention_change
    );
}

#[test]
fn the_gateway_follows_a_route_written_through_the_survivor_of_two_agents_sharing_etcd() {
    let cluster = etcd::EtcdCluster::start("gwfo");
    let flags = [
        "-store",
        "etcd",
        "-etcd-endpoints",
        cluster.endpoints.as_str(),
        "-etcd-prefix",
        "/meshgw/gwfo/primary",
        "-etcd-lease-ttl",
        "2",
    ];
    let first = ControlPlane::start_with("gwfo-a", &flags);
    let second = ControlPlane::join("gwfo-b", &flags, &first);
    let domain = first.trust_domain();
    assert_eq!(second.trust_domain(), domain, "one shared store, one CA");

    let echo = echo_backend();
    register_behind_gateway(&first, "echo", echo.address.port());
    let http_addr = format!("{},{}", first.address, second.address);
    let gateway = mesh_gateway_named(&http_addr, &first.token, "mesh-gateway", "gwfo-gw");
    let gateway_admin = gateway.admin.to_string();
    let agent_series =
        |address: &str| format!("gateway_control_plane_agent{{address=\"http://{address}\"}}");
    let (first_agent, second_agent) = (agent_series(&first.address), agent_series(&second.address));
    wait_for("the gateway to use the first agent", || {
        metric(&gateway_admin, "gateway_control_plane_connected") == Some(1.0)
            && metric(&gateway_admin, &first_agent) == Some(1.0)
    });
    wait_for("a route from the shared store", || {
        echo_through_gateway(gateway.listen, &sni("echo", &domain)).is_some()
    });

    let mut first = first;
    first.proc.signal("KILL");
    let killed = Instant::now();
    first
        .proc
        .wait_exit(Duration::from_secs(10))
        .expect("the first agent died");

    // A service registered through the survivor after the kill: only a gateway that moved to
    // the second agent and resumed its watch there routes it.
    let late = tag_backend("late-service");
    register_behind_gateway(&second, "late", late.address.port());
    let route_change = measure("the route written through the survivor", killed, || {
        let Ok(mut stream) = TcpStream::connect(gateway.listen) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.write_all(&client_hello(&sni("late", &domain)));
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        answer == b"late-service"
    });
    assert_eq!(metric(&gateway_admin, &second_agent), Some(1.0));
    assert!(failovers(&gateway_admin) >= 1.0);
    // Routes learnt before the kill still work (one store: nothing was lost with the agent).
    assert!(echo_through_gateway(gateway.listen, &sni("echo", &domain)).is_some());
    println!(
        "control-plane failover on a shared etcd store (SIGKILL of the agent in use): the \
         gateway routed a service registered through the survivor {route_change:?} after the kill"
    );
}
