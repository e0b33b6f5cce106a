//! `gateway mesh` end to end in one datacenter: registration, routes followed from a real
//! controlplane-lite, mutual TLS passed through to socat's sidecar without decryption, and
//! life after the control plane dies.
//!
//! The client side is web's sidecar *library* (its leaf by CSR, its SPIFFE-checking verifier)
//! dialling the gateway as a sidecar in mode `local` does: controlplane-lite resolves every
//! same-datacenter upstream to mode `none` (Consul's rule: same-datacenter traffic never goes
//! through a gateway), so the sidecar *process* only dials gateways across datacenters.

mod mesh_support;

use std::sync::Arc;
use std::time::Duration;

use mesh_support::*;

use gateway_sidecar::identity::SpiffeId;
use gateway_sidecar::tls::{root_store, TlsState};
use mesh_client::cp_client::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;

/// `gateway mesh -register` with the guide's gateway token (service:write on `mesh-gateway`,
/// read on every service and node).
fn start_gateway(cp: &ControlPlane, tag: &str) -> MeshGateway {
    let token = cp.guide_gateway_token();
    mesh_gateway(cp, &token, tag)
}

/// Web's TLS client configuration: a leaf for `web` signed from a CSR, the mesh roots, and
/// socat's SPIFFE ID as the only acceptable server identity.
async fn web_client(cp: &ControlPlane, trust_domain: &str) -> Arc<rustls::ClientConfig> {
    let client = Client::new(&cp.address, Some(cp.token.clone())).expect("client");
    let web = SpiffeId::parse(&format!(
        "spiffe://{trust_domain}/ns/default/dc/primary/svc/web"
    ))
    .expect("web id");
    let leaf = gateway_sidecar::follow::sign_leaf(&client, "web", &web)
        .await
        .expect("leaf");
    let roots =
        gateway_sidecar::follow::fetch_roots(&client, &mut mesh_client::watch::Watch::new())
            .await
            .expect("roots");
    let state = TlsState::new(leaf.credentials, root_store(&roots.pems).expect("roots"))
        .expect("tls state");
    let socat = SpiffeId::parse(&format!(
        "spiffe://{trust_domain}/ns/default/dc/primary/svc/socat"
    ))
    .expect("socat id");
    state.client(&socat).expect("client config")
}

async fn connect(
    config: &Arc<rustls::ClientConfig>,
    gateway: &str,
    sni: &str,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let stream = tokio::net::TcpStream::connect(gateway).await?;
    let name =
        rustls::pki_types::ServerName::try_from(sni.to_owned()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(name, stream)
        .await
}

async fn echo(
    stream: &mut TlsStream<tokio::net::TcpStream>,
    line: &str,
) -> std::io::Result<String> {
    stream.write_all(line.as_bytes()).await?;
    let mut got = vec![0u8; line.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got))
        .await
        .map_err(|_| std::io::Error::other("echo timeout"))??;
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// Every byte is inside a TLS record: type 20–23, version 3.x, length ≤ 2^14 + 2048.
fn only_tls_records(mut bytes: &[u8]) -> bool {
    while bytes.len() >= 5 {
        let length = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
        if !(20..=23).contains(&bytes[0]) || bytes[1] != 3 || length > 16384 + 2048 {
            return false;
        }
        bytes = &bytes[(5 + length).min(bytes.len())..];
    }
    bytes.is_empty()
}

#[test]
fn routes_from_the_control_plane_carry_only_tls_and_survive_its_death() {
    let cp = ControlPlane::start("mesh-e2e");
    let trust_domain = cp.trust_domain();
    // socat's sidecar listens privately; a recorder on its registered port sees exactly what
    // the gateway forwards. The test binds the registered port itself and keeps it.
    let registered = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let socat = socat_echo();
    cp.register_socat(socat.port, registered.local_addr().expect("addr").port());
    cp.allow("web", "socat");
    let socat_proxy = sidecar(&cp, "socat", &["-listen", "127.0.0.1:0"]);
    wait_listening(&socat_proxy.public.to_string());
    let recorder = Recorder::on(registered, socat_proxy.public);
    let mesh_gateway = start_gateway(&cp, "mesh-e2e");
    let gateway_port = mesh_gateway.listen.port();
    let gateway = mesh_gateway.listen.to_string();
    let admin = mesh_gateway.admin.to_string();
    wait_listening(&admin);
    wait_for("the gateway to register", || {
        let nodes = cp.ok("GET", "/v1/catalog/service/mesh-gateway", None);
        nodes.as_array().is_some_and(|nodes| {
            nodes.iter().any(|node| {
                node["ServiceKind"] == "mesh-gateway"
                    && node["ServiceTaggedAddresses"]["wan"]["Port"] == gateway_port
            })
        })
    });
    wait_for("the gateway to follow the control plane", || {
        metric(&admin, "gateway_control_plane_connected") == Some(1.0)
    });
    let sni = format!("socat.default.primary.internal.{trust_domain}");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config = runtime.block_on(web_client(&cp, &trust_domain));
    let payload = "payload-7f3a9c-never-in-clear\n";
    let mut established = runtime.block_on(async {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut stream) = connect(&config, &gateway, &sni).await {
                if let Ok(answer) = echo(&mut stream, payload).await {
                    assert_eq!(answer, payload);
                    return stream;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no echo through the gateway"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // The gateway forwarded TLS records only: the payload never appeared in clear.
    let forwarded = recorder.bytes();
    assert!(!forwarded.is_empty());
    assert_eq!(forwarded[0], 0x16, "starts with the replayed ClientHello");
    assert!(!contains(&forwarded, payload.trim_end().as_bytes()));
    assert!(
        only_tls_records(&forwarded),
        "something other than TLS records was forwarded"
    );
    assert!(metric(&admin, "gateway_control_plane_snapshot_age_seconds").is_some());

    // Kill the control plane: the established connection goes on, and new connections
    // still route on the last snapshot.
    let mut cp = cp;
    let _ = cp.proc.child.kill();
    let _ = cp.proc.child.wait();
    wait_for("the gateway to notice the control plane is gone", || {
        metric(&admin, "gateway_control_plane_connected") == Some(0.0)
    });
    runtime.block_on(async {
        assert_eq!(
            echo(&mut established, "still here\n")
                .await
                .expect("established"),
            "still here\n"
        );
        let mut fresh = connect(&config, &gateway, &sni)
            .await
            .expect("new connection");
        assert_eq!(
            echo(&mut fresh, "new after the control plane died\n")
                .await
                .expect("new connection echo"),
            "new after the control plane died\n"
        );
    });
}

#[test]
fn a_clean_stop_deregisters_the_gateway() {
    let cp = ControlPlane::start("mesh-dereg");
    let mut gateway = start_gateway(&cp, "mesh-dereg");
    let registered = || {
        cp.ok("GET", "/v1/catalog/service/mesh-gateway", None)
            .as_array()
            .is_some_and(|nodes| !nodes.is_empty())
    };
    wait_for("the gateway to register", registered);
    gateway.signal("TERM");
    let status = gateway
        .wait_exit(Duration::from_secs(20))
        .expect("the gateway did not stop");
    assert!(status.success(), "{status:?}");
    assert!(!registered(), "still in the catalog after a clean stop");
}

/// `/ready` says 503 until the first route table from the control plane is applied: before
/// that the gateway listens but routes nothing, and a load balancer must not send it
/// traffic. The control plane is unreachable at first (the address the gateway is given is
/// held by the test, bound but not listening, so connects are refused), then a relay to a
/// real one starts listening on that same socket.
#[test]
fn ready_only_once_the_first_route_table_is_applied() {
    let cp = ControlPlane::start("mesh-ready");
    let relay = test_support::gateway::dead_endpoint();
    let gateway = mesh_gateway_named(
        &relay.address.to_string(),
        &cp.token,
        "mesh-gateway",
        "mesh-ready",
    );
    let admin = gateway.admin.to_string();
    wait_listening(&admin);
    wait_listening(&gateway.listen.to_string());
    for _ in 0..10 {
        let (status, body) = http(&admin, "GET", "/ready", None, None);
        assert_eq!(status, 503, "ready without routes: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http(&admin, "GET", "/healthz", None, None).0, 200);

    let target = cp.address.parse().expect("control plane address");
    let _relay = Recorder::on(relay.listen(), target);
    wait_for("/ready to say 200 after the first route table", || {
        http(&admin, "GET", "/ready", None, None).0 == 200
    });
    assert!(metric(&admin, "gateway_control_plane_connected").is_some_and(|v| v == 1.0));
}
