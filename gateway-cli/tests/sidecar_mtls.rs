//! `gateway sidecar` end to end in one datacenter: a real controlplane-lite, the guide's
//! services (with test ports), socat as the echo service, and two sidecars.

mod mesh_support;

use std::sync::Arc;

use mesh_support::*;

use gateway_sidecar::identity::SpiffeId;
use gateway_sidecar::tls::{Credentials, TlsState};
use mesh_client::cp_client::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn echo_through_web_upstream_in_mode_none_and_default_deny_until_an_intention() {
    let cp = ControlPlane::start("sidecar-none");
    // The registered ports are the test's listening sockets, passed to the sidecars (socket
    // activation), so no other process can take one in between.
    let (socat_public, web_public, web_upstream) = (listening(), listening(), listening());
    let (socat_sidecar, upstream) = (port(&socat_public), port(&web_upstream));
    let socat = socat_echo();
    cp.register_socat(socat.port, socat_sidecar);
    cp.register_web(port(&web_public), upstream);
    let config = cp.ok("GET", "/v1/internal/sidecar/web-sidecar-proxy", None);
    assert_eq!(config["upstreams"][0]["mesh_gateway_mode"], "none");

    // Each sidecar runs with its own service-identity token, as the guide's services do.
    let socat_token = cp.service_token("socat");
    let web_token = cp.service_token("web");
    let socat_proxy = sidecar_passing(&cp, "socat", &socat_token, vec![socat_public]);
    let web_proxy = sidecar_passing(&cp, "web", &web_token, vec![web_public, web_upstream]);
    assert_eq!(socat_proxy.public.port(), socat_sidecar);
    let upstream_address = format!("127.0.0.1:{upstream}");
    let socat_metrics = socat_proxy.admin.to_string();
    let web_metrics = web_proxy.admin.to_string();

    // No intention and ACL default deny: the TLS handshake completes (the web sidecar counts
    // an established upstream), then socat's sidecar refuses and closes without a byte.
    assert_eq!(
        echo_once(&upstream_address, "hello before intention\n"),
        None
    );
    wait_for("the intention refusal to be counted", || {
        metric(
            &socat_metrics,
            "gateway_sidecar_refused_total{reason=\"intention_denied\"}",
        ) >= Some(1.0)
    });
    assert!(
        metric(
            &web_metrics,
            "gateway_sidecar_established_total{listener=\"upstream\"}"
        ) >= Some(1.0),
        "the handshake should have completed before the refusal"
    );
    assert_eq!(
        metric(
            &socat_metrics,
            "gateway_sidecar_established_total{listener=\"public\"}"
        ),
        Some(0.0)
    );

    // `intention create web socat`: new connections are allowed, bytes echo.
    cp.allow("web", "socat");
    let answer = eventually_echo(&upstream_address, "hello from web\n");
    assert_eq!(answer, "hello from web\n");
    assert!(
        metric(
            &socat_metrics,
            "gateway_sidecar_established_total{listener=\"public\"}"
        ) >= Some(1.0)
    );
    assert_eq!(
        metric(&socat_metrics, "gateway_sidecar_leaf_renewals_total"),
        Some(1.0)
    );
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_in_the_handshake() {
    let cp = ControlPlane::start("sidecar-foreign");
    let socat_public = listening();
    let socat_sidecar = port(&socat_public);
    let socat = socat_echo();
    cp.register_socat(socat.port, socat_sidecar);
    cp.allow("web", "socat");
    let socat_proxy = sidecar_passing(&cp, "socat", &cp.token, vec![socat_public]);
    let public = format!("127.0.0.1:{socat_sidecar}");
    assert_eq!(socat_proxy.public.port(), socat_sidecar);
    let trust_domain = cp.trust_domain();

    // A leaf for `web` with the right SPIFFE ID, signed by a CA the mesh does not trust.
    let foreign_ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(ca_params, foreign_ca_key);
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut leaf_params = rcgen::CertificateParams::default();
    let web_id = format!("spiffe://{trust_domain}/ns/default/dc/primary/svc/web");
    leaf_params.subject_alt_names =
        vec![rcgen::SanType::URI(web_id.clone().try_into().expect("ia5"))];
    leaf_params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("sign");
    let foreign = Credentials {
        chain: vec![leaf.der().clone()],
        key_pkcs8: leaf_key.serialize_der(),
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let admin = socat_proxy.admin.to_string();
    let handshake_refusals = "gateway_sidecar_refused_total{reason=\"client_handshake\"}";
    let before = metric(&admin, handshake_refusals).expect("refusal metric");
    let echoed = runtime.block_on(async {
        // The client verifies socat's sidecar with the real roots, so only our certificate
        // is wrong.
        let client = Client::new(&cp.address, Some(cp.token.clone())).expect("client");
        let roots =
            gateway_sidecar::follow::fetch_roots(&client, &mut mesh_client::watch::Watch::new())
                .await
                .expect("roots");
        let state = TlsState::new(
            foreign,
            gateway_sidecar::tls::root_store(&roots.pems).expect("roots"),
        )
        .expect("tls");
        let socat_id = SpiffeId::parse(&format!(
            "spiffe://{trust_domain}/ns/default/dc/primary/svc/socat"
        ))
        .expect("id");
        let config = state.client(&socat_id).expect("client config");
        let stream = tokio::net::TcpStream::connect(&public)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("socat").expect("name");
        // TLS 1.3: the client may finish before the server has judged its certificate, so
        // the refusal shows as an alert or EOF on the first read.
        let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::clone(&config))
            .connect(name, stream)
            .await
        else {
            return false;
        };
        let _ = tls.write_all(b"foreign hello\n").await;
        let mut buffer = [0u8; 64];
        matches!(tls.read(&mut buffer).await, Ok(n) if n > 0)
    });
    assert!(!echoed, "a foreign-CA client must not get through");
    wait_for("the handshake refusal to be counted", || {
        metric(&admin, handshake_refusals) > Some(before)
    });
    assert_eq!(
        metric(
            &admin,
            "gateway_sidecar_refused_total{reason=\"intention_denied\"}"
        ),
        Some(0.0),
        "refused in the handshake, before any intention was consulted"
    );
    assert_eq!(
        metric(
            &admin,
            "gateway_sidecar_established_total{listener=\"public\"}"
        ),
        Some(0.0)
    );
}

/// A socket passed for an upstream the configuration does not have yet is kept, and taken
/// when a later registration adds that upstream (its port was held by the sidecar all along).
#[test]
fn a_passed_socket_waits_for_the_upstream_a_later_registration_adds() {
    let cp = ControlPlane::start("sidecar-later");
    let socat_public = listening();
    let socat = socat_echo();
    cp.register_socat(socat.port, port(&socat_public));
    cp.allow("web", "socat");
    let (web_public, later) = (listening(), listening());
    let (web_port, later_port) = (port(&web_public), port(&later));
    // web without upstreams first.
    let body = format!(
        r#"{{"service": {{"name": "web", "port": 8080,
            "connect": {{"sidecar_service": {{"port": {web_port}}}}}}}}}"#
    );
    cp.ok("PUT", "/v1/agent/service/register", Some(&body));
    let _socat_proxy = sidecar_passing(&cp, "socat", &cp.token, vec![socat_public]);
    let _web_proxy = sidecar_passing(&cp, "web", &cp.token, vec![web_public, later]);

    // The guide's web.json: now with the upstream on the passed socket's port.
    cp.register_web(web_port, later_port);
    let answer = eventually_echo(&format!("127.0.0.1:{later_port}"), "hello later\n");
    assert_eq!(answer, "hello later\n");
}
