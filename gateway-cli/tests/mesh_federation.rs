//! The guide across two federated datacenters on one machine: controlplane-lite primary and
//! secondary, a `gateway mesh` in each, socat and its sidecar in primary, web (and a second
//! client) with sidecars in secondary. Echo through mode `local` (the guide's proxy-defaults:
//! web → secondary's gateway → primary's gateway → socat's sidecar) and mode `remote` (→
//! primary's gateway directly), and mode `none` (a third client's sidecar dials socat's
//! sidecar directly: the secondary's agent reads primary's catalog from primary's agent).

mod mesh_support;

use mesh_support::*;

#[test]
fn echo_across_datacenters_in_modes_local_remote_and_none() {
    let primary = ControlPlane::start("fed-primary");
    let secondary = ControlPlane::start_secondary("fed-secondary", &primary);

    // The guide's proxy-defaults.json, verbatim ("MeshGateway": "local"), written in primary.
    let proxy_defaults = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../controlplane-lite/testdata/proxy-defaults.json"
    ))
    .expect("proxy-defaults.json");
    primary.ok("PUT", "/v1/config", Some(&proxy_defaults));

    // Every registered port is a listening socket of the test, passed to its sidecar (socket
    // activation), so no other process can take one before the sidecar runs.
    let socat_public = listening();
    let socat_sidecar = port(&socat_public);
    let socat = socat_echo();
    primary.register_socat(socat.port, socat_sidecar);
    primary.allow("web", "socat");
    primary.allow("api", "socat");
    primary.allow("cli", "socat");

    let gw_primary = mesh_gateway(&primary, &primary.token, "fed-gw-p");
    let gw_secondary = mesh_gateway(&secondary, &secondary.token, "fed-gw-s");
    let (gateway_primary, gateway_secondary) =
        (gw_primary.listen.port(), gw_secondary.listen.port());

    let web = [listening(), listening()];
    let api = [listening(), listening()];
    let cli = [listening(), listening()];
    let (web_upstream, api_upstream, cli_upstream) = (port(&web[1]), port(&api[1]), port(&cli[1]));
    secondary.register_client("web", port(&web[0]), web_upstream, None);
    secondary.register_client("api", port(&api[0]), api_upstream, Some("remote"));
    secondary.register_client("cli", port(&cli[0]), cli_upstream, Some("none"));

    // Wait until federation states made each datacenter's gateway known to the other, and
    // the sidecars' upstreams resolve to gateways.
    wait_for(
        "the secondary's web upstream to resolve to its local gateway",
        || {
            let config = secondary.ok("GET", "/v1/internal/sidecar/web-sidecar-proxy", None);
            config["upstreams"][0]["mesh_gateway_mode"] == "local"
                && config["upstreams"][0]["endpoints"][0]
                    == format!("127.0.0.1:{gateway_secondary}")
        },
    );
    wait_for(
        "the api upstream to resolve to primary's gateway (remote)",
        || {
            let config = secondary.ok("GET", "/v1/internal/sidecar/api-sidecar-proxy", None);
            config["upstreams"][0]["mesh_gateway_mode"] == "remote"
                && config["upstreams"][0]["endpoints"][0] == format!("127.0.0.1:{gateway_primary}")
        },
    );
    wait_for(
        "the cli upstream to resolve to socat's sidecar in primary (none)",
        || {
            let config = secondary.ok("GET", "/v1/internal/sidecar/cli-sidecar-proxy", None);
            config["upstreams"][0]["mesh_gateway_mode"] == "none"
                && config["upstreams"][0]["endpoints"][0] == format!("127.0.0.1:{socat_sidecar}")
        },
    );
    wait_for("secondary's gateway to route primary's names", || {
        let routes = secondary.ok("GET", "/v1/internal/mesh-gateway/routes", None);
        routes["routes"].as_array().is_some_and(|routes| {
            routes.iter().any(|r| {
                r["sni"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("*.primary."))
            })
        })
    });

    let _socat_proxy = sidecar_passing(&primary, "socat", &primary.token, vec![socat_public]);
    let _web_proxy = sidecar_passing(&secondary, "web", &secondary.token, web.into());
    let _api_proxy = sidecar_passing(&secondary, "api", &secondary.token, api.into());
    let _cli_proxy = sidecar_passing(&secondary, "cli", &secondary.token, cli.into());

    let local = eventually_echo(&format!("127.0.0.1:{web_upstream}"), "web via local\n");
    assert_eq!(local, "web via local\n");
    let remote = eventually_echo(&format!("127.0.0.1:{api_upstream}"), "api via remote\n");
    assert_eq!(remote, "api via remote\n");
    let none = eventually_echo(&format!("127.0.0.1:{cli_upstream}"), "cli via none\n");
    assert_eq!(none, "cli via none\n");
}
