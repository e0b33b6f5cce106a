//! `gateway sidecar` keeps its leaf current: it renews a short-lived leaf before it expires,
//! and at once when the CA root rotates. Seen from outside with `openssl s_client`, against a
//! real controlplane-lite (its CA configuration set over the HTTP API) and a real socat echo.

mod mesh_support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mesh_support::*;
use test_support::dir::write_private;
use test_support::gateway::require_tool;

/// An `openssl s_client` session to `address` whose output is collected as it arrives.
struct SClient {
    proc: Proc,
    output: Arc<Mutex<Vec<u8>>>,
}

impl SClient {
    /// Connects presenting `client` (certificate and key files) and trusting only `ca_file`;
    /// a chain that does not verify ends the handshake (`-verify_return_error`).
    fn connect(address: &str, client: &ClientFiles, ca_file: &Path) -> SClient {
        let mut proc = Proc::spawn(
            "openssl",
            Command::new("openssl")
                .args(["s_client", "-connect", address, "-showcerts"])
                .args(["-verify_return_error", "-CAfile"])
                .arg(ca_file)
                .arg("-cert")
                .arg(&client.cert)
                .arg("-key")
                .arg(&client.key)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        let mut stdout = proc.child.stdout.take().expect("piped stdout");
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&output);
        thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                sink.lock().expect("output").extend_from_slice(&buffer[..n]);
            }
        });
        SClient { proc, output }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("output")).into_owned()
    }

    /// Sends `line` and waits (bounded) for socat to echo it back through both sidecars' TLS.
    fn echoes(&mut self, line: &str) -> bool {
        let Some(stdin) = self.proc.child.stdin.as_mut() else {
            return false;
        };
        if stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .is_err()
        {
            return false;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.text().lines().any(|l| l.trim() == line) {
                return true;
            }
            if matches!(self.proc.child.try_wait(), Ok(Some(_))) {
                // Exited: give the reader a moment to drain what was written last.
                thread::sleep(Duration::from_millis(50));
                return self.text().lines().any(|l| l.trim() == line);
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The first certificate the server presented (PEM), once the handshake printed it.
    fn server_leaf(&self) -> Option<String> {
        let text = self.text();
        let start = text.find("-----BEGIN CERTIFICATE-----")?;
        let end = text[start..].find("-----END CERTIFICATE-----")? + start;
        Some(format!("{}-----END CERTIFICATE-----\n", &text[start..end]))
    }
}

/// A client leaf for `web`, signed by the mesh CA, as files `openssl` reads.
struct ClientFiles {
    cert: PathBuf,
    key: PathBuf,
}

/// Signs a `web` leaf (an hour long, whatever the configured TTL) with the management token;
/// writes it and its key into `dir` under `name`.
fn web_leaf(cp: &ControlPlane, dir: &Path, name: &str) -> ClientFiles {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    let id = format!(
        "spiffe://{}/ns/default/dc/primary/svc/web",
        cp.trust_domain()
    );
    params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().expect("ia5"))];
    let csr = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let body = serde_json::json!({"Service": "web", "CSR": csr, "TTL": "1h"}).to_string();
    let signed = cp.ok("POST", "/v1/connect/ca/leaf/sign", Some(&body));
    let mut chain = signed["CertPEM"].as_str().expect("CertPEM").to_owned();
    for intermediate in signed["IntermediatePEMs"]
        .as_array()
        .expect("intermediates")
    {
        chain.push_str(intermediate.as_str().expect("pem"));
    }
    let files = ClientFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    write_private(&files.cert, chain);
    write_private(&files.key, key.serialize_pem());
    files
}

/// Writes the active root (or, with `active == false`, the inactive one) to `path`.
fn write_root(cp: &ControlPlane, active: bool, path: &Path) {
    let roots = cp.ok("GET", "/v1/connect/ca/roots", None);
    let root = roots["Roots"]
        .as_array()
        .expect("roots")
        .iter()
        .find(|r| r["Active"] == active)
        .expect("root")["RootCert"]
        .as_str()
        .expect("pem")
        .to_owned();
    write_private(path, root);
}

/// `openssl x509 -noout ARGS` on `pem`: (success, stdout).
fn x509(pem: &str, args: &[&str]) -> (bool, String) {
    let mut child = Command::new("openssl")
        .args(["x509", "-noout"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl x509");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(pem.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("openssl x509");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

/// A fresh `s_client` session that handshakes and echoes `line`; `None` until one does
/// (each try is bounded; the caller bounds the retries).
fn session(address: &str, client: &ClientFiles, ca_file: &Path, line: &str) -> Option<SClient> {
    let mut session = SClient::connect(address, client, ca_file);
    session.echoes(line).then_some(session)
}

/// socat and its sidecar, with `web → socat` allowed; returns what the test needs to reach
/// it. The sidecar's public listener is a socket the test bound and passed on.
struct Mesh {
    cp: ControlPlane,
    _socat: SocatEcho,
    sidecar: Sidecar,
    public: String,
}

fn mesh(cp: ControlPlane) -> Mesh {
    let socat_public = listening();
    let public = format!("127.0.0.1:{}", port(&socat_public));
    let socat = socat_echo();
    cp.register_socat(socat.port, port(&socat_public));
    cp.allow("web", "socat");
    let token = cp.service_token("socat");
    let sidecar = sidecar_passing(&cp, "socat", &token, vec![socat_public]);
    Mesh {
        cp,
        _socat: socat,
        sidecar,
        public,
    }
}

const CONFIGURATION: &str = "/v1/connect/ca/configuration";

/// With a 60 s `LeafCertTTL` (the agent's `-ca-leaf-ttl-min` lowers Consul's 1h floor for
/// this), the sidecar presents a new leaf — another serial, a new key — while the first one
/// is still valid, and connections keep working across the change.
#[test]
fn a_short_lived_leaf_is_renewed_before_it_expires() {
    require_tool("openssl");
    require_tool("socat");
    let cp = ControlPlane::start_with("renew-ttl", &["-ca-leaf-ttl-min", "10s"]);
    let ttl = r#"{"Provider": "consul", "Config": {"LeafCertTTL": "60s"}}"#;
    cp.ok("PUT", CONFIGURATION, Some(ttl));
    let mesh = mesh(cp);
    let dir = temp_dir("renew-ttl-files");
    let client = web_leaf(&mesh.cp, &dir, "web");
    let root = dir.join("root.pem");
    write_root(&mesh.cp, true, &root);
    let admin = mesh.sidecar.admin.to_string();

    let mut first_session = None;
    wait_for("a first session through the sidecar", || {
        first_session = session(&mesh.public, &client, &root, "first");
        first_session.is_some()
    });
    let first_session = first_session.expect("session");
    let first = first_session.server_leaf().expect("the server's leaf");
    let (_, first_serial) = x509(&first, &["-serial"]);
    let (_, first_dates) = x509(&first, &["-startdate", "-enddate"]);
    assert!(!first_serial.is_empty());

    // The leaf is backdated 15 s (a quarter of its life) and lives 60 s: renewal falls 21 to
    // 39 s after issue, expiry at 45 s, so a renewal is seen at least 6 s before expiry. The
    // wait is bounded well past the expiry, so a sidecar that never renews fails.
    let deadline = Instant::now() + Duration::from_secs(90);
    let renewed = loop {
        assert!(
            Instant::now() < deadline,
            "the sidecar still presents {first_serial} ({first_dates}); renewals: {:?}",
            metric(&admin, "gateway_sidecar_leaf_renewals_total")
        );
        if let Some(next) = session(&mesh.public, &client, &root, "probe") {
            let leaf = next.server_leaf().expect("the server's leaf");
            let (_, serial) = x509(&leaf, &["-serial"]);
            if serial != first_serial {
                break leaf;
            }
        }
        thread::sleep(Duration::from_millis(250));
    };
    // The old leaf had not expired when the new one was first presented (`-checkend 0`: still
    // valid now).
    let (still_valid, _) = x509(&first, &["-checkend", "0"]);
    assert!(
        still_valid,
        "the sidecar presented a new leaf only after the old one expired ({first_dates})"
    );
    // A new key with the new certificate, and the same identity.
    let (_, first_key) = x509(&first, &["-pubkey"]);
    let (_, renewed_key) = x509(&renewed, &["-pubkey"]);
    assert_ne!(first_key, renewed_key, "each renewal makes a new key");
    let (_, san) = x509(&renewed, &["-ext", "subjectAltName"]);
    assert!(san.ends_with("/svc/socat"), "{san}");
    assert!(metric(&admin, "gateway_sidecar_leaf_renewals_total") >= Some(2.0));
}

/// After a `PUT` with a new `PrivateKey` rotates the root, the sidecar presents a leaf signed
/// by the new root: a client trusting only the new root connects. A client trusting only the
/// old root still connects (the new leaf carries the cross-signature), and a connection made
/// before the rotation stays up. The leaf TTL is the default 72h, so only the root change
/// can explain a renewal within the test.
#[test]
fn a_root_rotation_renews_the_leaf_and_keeps_open_connections() {
    require_tool("openssl");
    require_tool("socat");
    let mesh = mesh(ControlPlane::start("renew-root"));
    let cp = &mesh.cp;
    let dir = temp_dir("renew-root-files");
    let old_root = dir.join("old-root.pem");
    write_root(cp, true, &old_root);
    let old_client = web_leaf(cp, &dir, "web-old");
    let admin = mesh.sidecar.admin.to_string();

    let mut before = None;
    wait_for("a session through the sidecar before the rotation", || {
        before = session(&mesh.public, &old_client, &old_root, "before");
        before.is_some()
    });
    let mut before = before.expect("session");
    let first = before.server_leaf().expect("the server's leaf");
    let (_, old_issuer) = x509(&first, &["-issuer"]);
    let renewals = metric(&admin, "gateway_sidecar_leaf_renewals_total").expect("renewals");

    // Rotate to a key the operator supplies.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let body = serde_json::json!({"Provider": "consul",
        "Config": {"PrivateKey": key.serialize_pem()}});
    cp.ok("PUT", CONFIGURATION, Some(&body.to_string()));
    let new_root = dir.join("new-root.pem");
    write_root(cp, true, &new_root);
    let (_, new_subject) = x509(
        &std::fs::read_to_string(&new_root).expect("new root"),
        &["-subject"],
    );
    let new_client = web_leaf(cp, &dir, "web-new");

    // A client trusting only the new root gets through once the sidecar has renewed.
    let mut after = None;
    wait_for("a session trusting only the new root", || {
        after = session(&mesh.public, &new_client, &new_root, "after");
        after.is_some()
    });
    let renewed = after.expect("session").server_leaf().expect("leaf");
    let (_, new_issuer) = x509(&renewed, &["-issuer"]);
    assert_ne!(new_issuer, old_issuer);
    assert_eq!(
        new_issuer.trim_start_matches("issuer="),
        new_subject.trim_start_matches("subject="),
        "the new leaf is signed by the new root"
    );
    assert!(
        metric(&admin, "gateway_sidecar_leaf_renewals_total") > Some(renewals),
        "counted as a renewal"
    );
    // A peer that has not learnt the new root yet still verifies the sidecar through the
    // cross-signature, and its old-root leaf is still accepted.
    assert!(
        session(&mesh.public, &old_client, &old_root, "old trust").is_some(),
        "a client trusting only the old root is refused after the rotation"
    );
    // The connection made before the rotation was never dropped.
    assert!(
        before.echoes("still up"),
        "the connection made before the rotation was dropped: {}",
        before.text()
    );
}
