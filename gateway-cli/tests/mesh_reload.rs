//! SIGHUP in mesh mode (issue 15 #5): the file is re-read for listeners and settings, and the
//! routes the control plane pushed stay in force (a mesh gateway's file has no routes).

mod mesh_support;

use mesh_support::*;

/// The SNIs of the routes in force, from `/config_dump`.
fn routes_in_force(admin: &str) -> Vec<String> {
    let (status, body) = http(admin, "GET", "/config_dump", None, None);
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).expect("config_dump JSON");
    dump["routes"]
        .as_array()
        .map(|routes| {
            routes
                .iter()
                .filter_map(|route| route["sni"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sighup_in_mesh_mode_keeps_the_control_planes_routes() {
    let cp = ControlPlane::start("mesh-sighup");
    let trust_domain = cp.trust_domain();
    // Nothing needs to answer on socat's ports: the test only reads the routes. It holds both
    // ports so that nobody else is registered under them.
    let socat_port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat_sidecar = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    cp.register_socat(
        socat_port.local_addr().expect("addr").port(),
        socat_sidecar.local_addr().expect("addr").port(),
    );
    let token = cp.guide_gateway_token();
    let gateway = mesh_gateway(&cp, &token, "mesh-sighup");
    let admin = gateway.admin.to_string();
    wait_listening(&admin);
    let socat = format!("socat.default.primary.internal.{trust_domain}");
    wait_for("socat's route from the control plane", || {
        routes_in_force(&admin).contains(&socat)
    });
    let reloads = "gateway_config_reloads_total{source=\"sighup\",result=\"success\"}";
    assert_eq!(metric(&admin, reloads), Some(0.0));

    gateway.signal("HUP");
    wait_for("the SIGHUP reload", || metric(&admin, reloads) == Some(1.0));
    let routes = routes_in_force(&admin);
    assert!(
        routes.contains(&socat),
        "the control plane's routes were dropped by the reload: {routes:?}"
    );
}
