//! `gateway mesh` and `gateway sidecar` talk to an agent over HTTPS (`-http-addr https://…
//! -ca-file F`, issue 13 item 2), with certificates made as scripts/demo makes them, and refuse
//! an agent whose certificate does not chain to their CA file.

mod mesh_support;

use std::process::{Command, Stdio};
use std::time::Duration;

use mesh_support::*;

#[test]
fn gateway_mesh_and_sidecars_follow_an_agent_over_https() {
    let (cp, https, ca) = ControlPlane::start_https("https-agent");
    let https = format!("https://{https}");
    let ca = ca.display().to_string();
    let (socat_public, web_public, web_upstream) = (listening(), listening(), listening());
    let socat = socat_echo();
    cp.register_socat(socat.port, port(&socat_public));
    cp.register_web(port(&web_public), port(&web_upstream));
    cp.allow("web", "socat");
    let upstream = format!("127.0.0.1:{}", port(&web_upstream));

    let gateway = mesh_gateway_with(
        &https,
        &cp.token,
        "mesh-gateway",
        "https-gw",
        &["-ca-file", &ca],
    );
    let admin = gateway.admin.to_string();
    let in_use = format!("gateway_control_plane_agent{{address=\"{https}\"}}");
    wait_for("the gateway to follow the agent over https", || {
        metric(&admin, "gateway_control_plane_connected") == Some(1.0)
            && metric(&admin, &in_use) == Some(1.0)
    });
    let registered = cp.ok("GET", "/v1/catalog/service/mesh-gateway", None);
    assert_eq!(
        registered.as_array().map(Vec::len),
        Some(1),
        "registered over https: {registered}"
    );

    // The sidecars get their configuration, roots, leaf and intentions over https only.
    let flags = ["-ca-file", ca.as_str()];
    let _socat_proxy = sidecar_passing_to(&https, "socat", &cp.token, vec![socat_public], &flags);
    let web_proxy = sidecar_passing_to(
        &https,
        "web",
        &cp.token,
        vec![web_public, web_upstream],
        &flags,
    );
    assert_eq!(eventually_echo(&upstream, "over https\n"), "over https\n");
    assert_eq!(metric(&web_proxy.admin.to_string(), &in_use), Some(1.0));
}

#[test]
fn an_agent_certificate_from_another_ca_is_refused() {
    let (cp, https, _ca) = ControlPlane::start_https("https-foreign");
    let https = format!("https://{https}");
    let other = temp_dir("https-foreign-ca");
    let foreign_ca = make_agent_certs(&other, "other").join("consul-agent-ca.pem");
    let foreign_ca = foreign_ca.display().to_string();
    let socat_public = listening();
    let socat = socat_echo();
    cp.register_socat(socat.port, port(&socat_public));

    // The gateway starts (it serves its last, here empty, table) but never talks to the
    // agent: every request fails in the handshake, and nothing is registered.
    let gateway = mesh_gateway_with(
        &https,
        &cp.token,
        "mesh-gateway",
        "https-foreign-gw",
        &["-ca-file", &foreign_ca],
    );
    let admin = gateway.admin.to_string();
    wait_for("failed requests to be counted", || {
        metric(&admin, "gateway_control_plane_watch_errors_total") >= Some(2.0)
    });
    assert_eq!(metric(&admin, "gateway_control_plane_connected"), Some(0.0));
    let registered = cp.ok("GET", "/v1/catalog/service/mesh-gateway", None);
    assert_eq!(registered.as_array().map(Vec::len), Some(0), "{registered}");

    // The sidecar needs the agent to start: it exits, saying why. It is configured through
    // Consul's variables this time: a bare address made https by CONSUL_HTTP_SSL, and
    // CONSUL_CACERT (without either, the error would not be a failed handshake).
    let bare = https.trim_start_matches("https://");
    let mut sidecar = Proc::spawn(
        "sidecar",
        Command::new(test_support::gateway::gateway_binary())
            .args(["sidecar", "-sidecar-for", "socat", "-token", &cp.token])
            .env("CONSUL_HTTP_ADDR", bare)
            .env("CONSUL_HTTP_SSL", "true")
            .env("CONSUL_CACERT", &foreign_ca)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let status = sidecar
        .wait_exit(Duration::from_secs(60))
        .expect("the sidecar exits when it cannot trust the agent");
    assert!(!status.success());
    let mut stderr = String::new();
    if let Some(mut pipe) = sidecar.child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    assert!(stderr.contains("TLS handshake failed"), "{stderr}");
    drop(socat_public);
}

#[test]
fn an_agent_that_verifies_incoming_needs_the_client_certificate() {
    let (cp, https, ca) = ControlPlane::start_https_with("https-verify", true);
    let https = format!("https://{https}");
    let folder = ca.parent().expect("certificate folder").to_owned();
    let client_cert = folder
        .join("primary-client-consul-0.pem")
        .display()
        .to_string();
    let client_key = folder
        .join("primary-client-consul-0-key.pem")
        .display()
        .to_string();
    let ca = ca.display().to_string();

    // Without a client certificate the agent refuses the handshake.
    let anonymous = mesh_gateway_with(
        &https,
        &cp.token,
        "mesh-gateway",
        "https-verify-anonymous",
        &["-ca-file", &ca],
    );
    let anonymous_admin = anonymous.admin.to_string();
    wait_for("refused requests to be counted", || {
        metric(&anonymous_admin, "gateway_control_plane_watch_errors_total") >= Some(2.0)
    });
    assert_eq!(
        metric(&anonymous_admin, "gateway_control_plane_connected"),
        Some(0.0)
    );

    // With -client-cert and -client-key it follows the agent.
    let gateway = mesh_gateway_with(
        &https,
        &cp.token,
        "mesh-gateway",
        "https-verify-client",
        &[
            "-ca-file",
            &ca,
            "-client-cert",
            &client_cert,
            "-client-key",
            &client_key,
        ],
    );
    let admin = gateway.admin.to_string();
    wait_for(
        "the gateway to follow the agent with its client certificate",
        || metric(&admin, "gateway_control_plane_connected") == Some(1.0),
    );
}
