//! Two mesh gateways in the primary datacenter, one killed mid-test (SIGKILL, so it cannot
//! deregister): every new connection still echoes, in mode `remote` (the sidecar dials
//! primary's gateways and moves to the next endpoint on a refused connect) and mode `local`
//! (secondary's gateway dials primary's gateways with the same fallback).

mod mesh_support;

use mesh_support::*;

/// New connections opened after the kill, per mode: enough that round robin starts on the
/// dead gateway many times.
const NEW_CONNECTIONS: usize = 20;

/// A socket bound to 127.0.0.1:`port` in the gateway's `SO_REUSEPORT` group, never
/// listening: it gets no connections while the gateway lives, and once the gateway is dead
/// it keeps the port refusing connects — no other process can take the freed port and
/// accept (then reset) what was meant for the dead gateway, as happened on a busy machine.
fn hold_port(port: u16) -> socket2::Socket {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    let address: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    socket
        .bind(&address.into())
        .expect("join the gateway's port");
    socket
}

#[test]
fn new_connections_succeed_after_one_of_two_gateways_is_killed() {
    let primary = ControlPlane::start("fo-primary");
    let secondary = ControlPlane::start_secondary("fo-secondary", &primary);

    // Every registered port is a listening socket of the test, passed to its sidecar (socket
    // activation), so no other process can take one before the sidecar runs.
    let socat_public = listening();
    let socat = socat_echo();
    primary.register_socat(socat.port, port(&socat_public));
    primary.allow("web", "socat");
    primary.allow("api", "socat");

    let mut gateway_one = mesh_gateway_named(
        &primary.address,
        &primary.token,
        "gateway-primary-1",
        "fo-gw-p1",
    );
    let gateway_two = mesh_gateway_named(
        &primary.address,
        &primary.token,
        "gateway-primary-2",
        "fo-gw-p2",
    );
    let (gw_p1, gw_p2) = (gateway_one.listen.port(), gateway_two.listen.port());
    let _gateway_secondary = mesh_gateway(&secondary, &secondary.token, "fo-gw-s");

    let web_sockets = [listening(), listening()];
    let api_sockets = [listening(), listening()];
    let (web_upstream, api_upstream) = (port(&web_sockets[1]), port(&api_sockets[1]));
    secondary.register_client("web", port(&web_sockets[0]), web_upstream, Some("local"));
    secondary.register_client("api", port(&api_sockets[0]), api_upstream, Some("remote"));

    let both = |endpoints: &serde_json::Value| {
        let endpoints = endpoints.as_array().cloned().unwrap_or_default();
        [gw_p1, gw_p2]
            .iter()
            .all(|port| endpoints.contains(&serde_json::json!(format!("127.0.0.1:{port}"))))
    };
    wait_for(
        "the api upstream to list both of primary's gateways",
        || {
            let config = secondary.ok("GET", "/v1/internal/sidecar/api-sidecar-proxy", None);
            both(&config["upstreams"][0]["endpoints"])
        },
    );
    wait_for(
        "secondary's gateway to route primary's names to both gateways",
        || {
            let routes = secondary.ok("GET", "/v1/internal/mesh-gateway/routes", None);
            routes["routes"].as_array().is_some_and(|routes| {
                routes.iter().any(|r| {
                    r["sni"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("*.primary."))
                        && both(&r["endpoints"])
                })
            })
        },
    );

    let _socat_proxy = sidecar_passing(&primary, "socat", &primary.token, vec![socat_public]);
    let _web_proxy = sidecar_passing(&secondary, "web", &secondary.token, web_sockets.into());
    let _api_proxy = sidecar_passing(&secondary, "api", &secondary.token, api_sockets.into());
    let web = format!("127.0.0.1:{web_upstream}");
    let api = format!("127.0.0.1:{api_upstream}");
    assert_eq!(eventually_echo(&web, "before, local\n"), "before, local\n");
    assert_eq!(
        eventually_echo(&api, "before, remote\n"),
        "before, remote\n"
    );
    // Through both gateways while both are alive (round robin alternates).
    for i in 0..4 {
        let line = format!("warm {i}\n");
        assert_eq!(echo_once(&api, &line).as_deref(), Some(line.as_str()));
    }

    let _hold = hold_port(gw_p1);
    gateway_one.signal("KILL");
    assert!(gateway_one
        .wait_exit(std::time::Duration::from_secs(5))
        .is_some());
    // A killed process's listening sockets can outlive it for a moment: io_uring tears a ring
    // down asynchronously, and a pending poll on the listener holds it until then (seen here
    // as a LISTEN socket owned by no process). Wait, bounded, until the port refuses. Should
    // it never, another process joined the port: not a data-plane bug.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", gw_p1)).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "something else still listens on the dead gateway's port {gw_p1}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The data plane must move to the surviving gateway.

    for (mode, address) in [("local", &web), ("remote", &api)] {
        let mut failed = Vec::new();
        for i in 0..NEW_CONNECTIONS {
            let line = format!("{mode} after kill {i}\n");
            if echo_once(address, &line).as_deref() != Some(line.as_str()) {
                failed.push(i);
            }
        }
        assert!(
            failed.is_empty(),
            "mode {mode}: connections {failed:?} of {NEW_CONNECTIONS} failed"
        );
    }
}
