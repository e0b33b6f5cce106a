//! Harness for the mesh and sidecar tests: a real controlplane-lite agent, real `gateway mesh`
//! and `gateway sidecar` processes, a real socat echo, and a recording TCP relay.
//!
//! controlplane-lite is another crate, so Cargo gives us no `CARGO_BIN_EXE_` for it: it is
//! expected beside the test executable (`cargo test --workspace` builds it); a missing one
//! fails the test with a message saying so.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub use crate::activation::{listening, port};
pub use crate::dir::{temp_dir, TempDir};
pub use crate::process::Proc;

/// The controlplane-lite binary beside the test executable.
pub fn controlplane_binary() -> PathBuf {
    crate::process::binary("controlplane-lite")
}

/// A controlplane-lite agent (primary, ACL default deny) with a bootstrapped management token.
pub struct ControlPlane {
    pub proc: Proc,
    pub address: String,
    pub token: String,
    pub dir: TempDir,
}

impl ControlPlane {
    pub fn start(tag: &str) -> ControlPlane {
        ControlPlane::start_with(tag, &[])
    }

    /// [`ControlPlane::start`] with `extra` agent flags (e.g. `-store etcd ...`).
    pub fn start_with(tag: &str, extra: &[&str]) -> ControlPlane {
        let mut cp = ControlPlane::spawn(tag, "primary", extra);
        let (status, body) = cp.request("PUT", "/v1/acl/bootstrap", None);
        assert_eq!(status, 200, "bootstrap: {body}");
        let value: serde_json::Value = serde_json::from_str(&body).expect("bootstrap JSON");
        cp.token = value["SecretID"].as_str().expect("SecretID").to_owned();
        cp
    }

    /// Another agent of the same datacenter on its own data directory (its own store and CA,
    /// as two redb agents are), whose management token has `other`'s secret, so that one token
    /// works against both: what a client failing over between the two needs.
    pub fn start_alongside(tag: &str, other: &ControlPlane) -> ControlPlane {
        let mut cp = ControlPlane::start(tag);
        let body = serde_json::json!({
            "Description": "the management token of the other agent",
            "SecretID": other.token,
            "Policies": [{ "Name": "global-management" }],
        })
        .to_string();
        cp.ok("PUT", "/v1/acl/token", Some(&body));
        cp.token = other.token.clone();
        cp
    }

    /// Another agent of `other`'s datacenter on the same shared store (`extra` names the same
    /// etcd cluster and prefix): its ACLs are `other`'s, so `other`'s token works as is.
    pub fn join(tag: &str, extra: &[&str], other: &ControlPlane) -> ControlPlane {
        let mut cp = ControlPlane::spawn(tag, "primary", extra);
        cp.token = other.token.clone();
        cp
    }

    /// A secondary datacenter federated with `primary` (replication token from the guide's
    /// `replication-policy.json`); ready once it has its intermediate CA and knows the
    /// primary's management token.
    pub fn start_secondary(tag: &str, primary: &ControlPlane) -> ControlPlane {
        let rules = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../controlplane-lite/testdata/replication-policy.json"
        ))
        .expect("the guide's replication-policy.json");
        let policy = serde_json::json!({ "Name": "replication", "Rules": rules }).to_string();
        primary.ok("PUT", "/v1/acl/policy", Some(&policy));
        let token = r#"{"Description": "replication", "Policies": [{"Name": "replication"}]}"#;
        let replication = primary.ok("PUT", "/v1/acl/token", Some(token))["SecretID"]
            .as_str()
            .expect("SecretID")
            .to_owned();
        let mut cp = ControlPlane::spawn(
            tag,
            "secondary",
            &[
                "-primary-datacenter",
                "primary",
                "-primary-address",
                &primary.address,
                "-replication-token",
                &replication,
                // Both agents are on loopback here; controlplane-lite refuses plain http
                // between datacenters without this flag (HTTPS is tested in controlplane-lite).
                "-primary-insecure-http",
            ],
        );
        cp.token = primary.token.clone();
        wait_for("the secondary's CA and ACLs", || {
            cp.request("GET", "/v1/connect/ca/roots", None).0 == 200
                && cp.request("GET", "/v1/acl/token/self", None).0 == 200
        });
        cp
    }

    /// An agent that also serves its API over HTTPS (`-https-addr 127.0.0.1:0`) with a
    /// server certificate made as the demo makes it (`tls ca create`, `tls cert create
    /// -server`) in its directory. Returns it, the HTTPS address it reported and the CA file
    /// (beside it, a client certificate: `primary-client-consul-0.pem` and its key).
    pub fn start_https(tag: &str) -> (ControlPlane, String, PathBuf) {
        ControlPlane::start_https_with(tag, false)
    }

    /// [`ControlPlane::start_https`]; with `verify_incoming`, HTTPS clients must present a
    /// certificate signed by the agent CA (`-verify-incoming -ca-file`).
    pub fn start_https_with(tag: &str, verify_incoming: bool) -> (ControlPlane, String, PathBuf) {
        let dir = temp_dir(tag);
        let certs = make_agent_certs(&dir, "certs");
        let ca = certs.join("consul-agent-ca.pem");
        let cert = certs.join("primary-server-consul-0.pem");
        let key = certs.join("primary-server-consul-0-key.pem");
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        let ca_text = ca.display().to_string();
        let mut flags = vec![
            "-https-addr",
            "127.0.0.1:0",
            "-cert-file",
            &cert,
            "-key-file",
            &key,
        ];
        if verify_incoming {
            flags.extend(["-verify-incoming", "-ca-file", &ca_text]);
        }
        let (mut cp, lines) = ControlPlane::spawn_in(dir, "primary", &flags, 2);
        let https = lines[1]
            .trim()
            .rsplit("https://")
            .next()
            .filter(|a| a.contains(':') && lines[1].contains("https://"))
            .unwrap_or_else(|| panic!("unexpected second line {:?}", lines[1]))
            .to_owned();
        let (status, body) = cp.request("PUT", "/v1/acl/bootstrap", None);
        assert_eq!(status, 200, "bootstrap: {body}");
        let value: serde_json::Value = serde_json::from_str(&body).expect("bootstrap JSON");
        cp.token = value["SecretID"].as_str().expect("SecretID").to_owned();
        (cp, https, ca)
    }

    fn spawn(tag: &str, datacenter: &str, extra: &[&str]) -> ControlPlane {
        ControlPlane::spawn_in(temp_dir(tag), datacenter, extra, 1).0
    }

    /// Start an agent in `dir` and read its first `lines` stdout lines (the http address,
    /// then the https one when it serves https).
    fn spawn_in(
        dir: TempDir,
        datacenter: &str,
        extra: &[&str],
        lines: usize,
    ) -> (ControlPlane, Vec<String>) {
        let mut command = Command::new(controlplane_binary());
        command
            .args([
                "agent",
                "-datacenter",
                datacenter,
                "-http-addr",
                "127.0.0.1:0",
            ])
            .args([
                "-acl-default-policy",
                "deny",
                "-log-level",
                "warn",
                "-data-dir",
            ])
            .arg(dir.join("cp"))
            .args(extra)
            .stdout(Stdio::piped());
        let mut proc = Proc::spawn("controlplane-lite", &mut command);
        let stdout = proc.child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            for _ in 0..lines {
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let _ = tx.send(line);
            }
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let reported: Vec<String> = (0..lines)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(30))
                    .expect("controlplane-lite did not start")
            })
            .collect();
        let line = &reported[0];
        let address = line
            .trim()
            .rsplit("http://")
            .next()
            .filter(|a| a.contains(':'))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let cp = ControlPlane {
            proc,
            address,
            token: String::new(),
            dir,
        };
        (cp, reported)
    }

    /// One HTTP/1.1 request with the management token; (status, body).
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        http(&self.address, method, path, Some(&self.token), body)
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<&str>) -> serde_json::Value {
        let (status, text) = self.request(method, path, body);
        assert_eq!(status, 200, "{method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    pub fn trust_domain(&self) -> String {
        self.ok("GET", "/v1/connect/ca/roots", None)["TrustDomain"]
            .as_str()
            .expect("TrustDomain")
            .to_owned()
    }

    /// The guide's `socat.json` with test ports (the sidecar's port named so that parallel
    /// tests do not all get 21000: a port the test holds, see [`sidecar_passing`]).
    pub fn register_socat(&self, socat_port: u16, sidecar_port: u16) {
        let body = format!(
            r#"{{"service": {{"name": "socat", "port": {socat_port},
                "connect": {{"sidecar_service": {{"port": {sidecar_port}}}}}}}}}"#
        );
        self.ok("PUT", "/v1/agent/service/register", Some(&body));
    }

    /// The guide's `web.json` with test ports.
    pub fn register_web(&self, sidecar_port: u16, upstream_port: u16) {
        self.register_client("web", sidecar_port, upstream_port, None);
    }

    /// A service shaped like the guide's `web`, whose one upstream is socat in `primary`;
    /// `mode` sets the upstream's own `mesh_gateway` mode.
    pub fn register_client(
        &self,
        name: &str,
        sidecar_port: u16,
        upstream_port: u16,
        mode: Option<&str>,
    ) {
        let mut upstream = serde_json::json!({
            "destination_name": "socat", "datacenter": "primary", "local_bind_port": upstream_port
        });
        if let Some(mode) = mode {
            upstream["mesh_gateway"] = serde_json::json!({ "mode": mode });
        }
        let body = serde_json::json!({"service": {"name": name, "port": 8080,
            "connect": {"sidecar_service": {"port": sidecar_port,
                "proxy": {"upstreams": [upstream]}}}}});
        self.ok("PUT", "/v1/agent/service/register", Some(&body.to_string()));
    }

    /// A token like the guide's per-service tokens: a service identity for `service`.
    pub fn service_token(&self, service: &str) -> String {
        let body = format!(
            r#"{{"Description": "{service} sidecar", "ServiceIdentities": [{{"ServiceName": "{service}"}}]}}"#
        );
        self.ok("PUT", "/v1/acl/token", Some(&body))["SecretID"]
            .as_str()
            .expect("SecretID")
            .to_owned()
    }

    /// The guide's gateway token: `acl policy create -name mesh-gateway -rules
    /// @mesh-gateway-policy.json`, then a token with that policy.
    pub fn guide_gateway_token(&self) -> String {
        let rules = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../controlplane-lite/testdata/mesh-gateway-policy.json"
        ))
        .expect("the guide's mesh-gateway-policy.json");
        let policy = serde_json::json!({ "Name": "mesh-gateway", "Rules": rules }).to_string();
        self.ok("PUT", "/v1/acl/policy", Some(&policy));
        let token = r#"{"Description": "mesh-gateway primary datacenter token",
            "Policies": [{"Name": "mesh-gateway"}]}"#;
        self.ok("PUT", "/v1/acl/token", Some(token))["SecretID"]
            .as_str()
            .expect("SecretID")
            .to_owned()
    }

    pub fn allow(&self, source: &str, destination: &str) {
        let body = format!(
            r#"{{"SourceName": "{source}", "DestinationName": "{destination}", "Action": "allow"}}"#
        );
        self.ok("POST", "/v1/connect/intentions", Some(&body));
    }
}

/// `controlplane-lite tls ca create`, `tls cert create -server -dc primary` and `tls cert
/// create -client -dc primary` run in `dir/name` (created), as scripts/demo makes its agents'
/// certificates; returns that folder.
pub fn make_agent_certs(dir: &TempDir, name: &str) -> PathBuf {
    let certs = dir.join(name);
    std::fs::create_dir_all(&certs).expect("certificate folder");
    for args in [
        &["tls", "ca", "create"][..],
        &["tls", "cert", "create", "-server", "-dc", "primary"][..],
        &["tls", "cert", "create", "-client", "-dc", "primary"][..],
    ] {
        let output = Command::new(controlplane_binary())
            .args(args)
            .current_dir(&certs)
            .output()
            .expect("run controlplane-lite tls");
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    certs
}

/// A minimal blocking HTTP/1.1 client (Connection: close).
pub fn http(
    address: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap_or_else(|e| panic!("{address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let body = body.unwrap_or("");
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("X-Consul-Token: {token}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).expect("write");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // Undo chunked transfer coding if the server used it.
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 || after.len() < size {
                break;
            }
            out.push_str(&after[..size]);
            rest = after[size..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_owned()
    };
    (status, body)
}

/// The guide's echo service, `socat tcp-l:PORT,fork exec:/bin/cat`, on the port socat reports.
pub struct SocatEcho {
    pub proc: Proc,
    pub port: u16,
}

/// `socat -d -d tcp-l:0,fork exec:/bin/cat`: socat binds port 0 and logs
/// `listening on AF=2 127.0.0.1:PORT`, which is read for the port.
pub fn socat_echo() -> SocatEcho {
    let mut proc = Proc::spawn(
        "socat",
        Command::new("socat")
            .args(["-d", "-d"])
            .arg("tcp-l:0,bind=127.0.0.1,fork")
            .arg("exec:/bin/cat")
            .stderr(Stdio::piped()),
    );
    let stderr = proc.child.stderr.take().expect("piped stderr");
    let listening = |line: &str| line.contains(" listening on ");
    let lines = crate::process::read_lines(stderr, Duration::from_secs(20), listening, listening)
        .unwrap_or_else(|error| panic!("socat did not report its port: {error}"));
    let port = lines[0]
        .rsplit(':')
        .next()
        .and_then(|port| port.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected socat line {:?}", lines[0]));
    SocatEcho { proc, port }
}

/// A `gateway mesh` process and the addresses it reported (it binds port 0 and registers
/// the port it got).
pub struct MeshGateway {
    pub proc: Proc,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl std::ops::Deref for MeshGateway {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for MeshGateway {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// `gateway mesh -register` with the guide's flags, listener (LAN and WAN) and admin on port
/// 0, with a `--config` file for admin, one worker and a drain without announce period.
pub fn mesh_gateway(cp: &ControlPlane, token: &str, tag: &str) -> MeshGateway {
    mesh_gateway_named(&cp.address, token, "mesh-gateway", tag)
}

/// `mesh_gateway` registered under `service_name` with the control plane at `http_addr`: the
/// name is also the registration's ID, so two gateways of one datacenter need two names.
pub fn mesh_gateway_named(
    http_addr: &str,
    token: &str,
    service_name: &str,
    tag: &str,
) -> MeshGateway {
    mesh_gateway_with(http_addr, token, service_name, tag, &[])
}

/// [`mesh_gateway_named`] with `extra` flags (`-ca-file F`, ...).
pub fn mesh_gateway_with(
    http_addr: &str,
    token: &str,
    service_name: &str,
    tag: &str,
    extra: &[&str],
) -> MeshGateway {
    let dir = temp_dir(tag);
    let config = dir.join("gateway.toml");
    crate::dir::write_private(
        &config,
        "[[listener]]\nname = \"lan\"\naddress = \"127.0.0.1:0\"\n\n\
         [admin]\naddress = \"127.0.0.1:0\"\n\n[workers]\ncount = 1\npin = false\n\n\
         [drain]\nannounce = \"0s\"\ntimeout = \"5s\"\n",
    );
    let address = "127.0.0.1:0";
    let mut proc = Proc::spawn(
        "gateway mesh",
        Command::new(crate::gateway::gateway_binary())
            .args(["mesh", "-register", "-service-name", service_name])
            .args(["-address", address, "-wan-address", address])
            .args(["-token", token, "-http-addr", http_addr])
            .args(extra)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped()),
    )
    .owning(dir);
    let stdout = proc.child.stdout.take().expect("piped stdout");
    let bound = crate::gateway::read_bound(stdout)
        .unwrap_or_else(|error| panic!("gateway mesh did not report its addresses: {error}"));
    assert_eq!(bound.pid, proc.child.id(), "the report is not our child's");
    MeshGateway {
        listen: bound.listener("lan").expect("the lan listener's address"),
        admin: bound.admin.expect("the admin address"),
        proc,
    }
}

pub fn wait_listening(address: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(address).is_err() {
        assert!(Instant::now() < deadline, "{address} never listened");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A `gateway sidecar` process and the addresses it reported.
pub struct Sidecar {
    pub proc: Proc,
    pub public: SocketAddr,
    pub admin: SocketAddr,
}

pub fn sidecar(cp: &ControlPlane, service: &str, extra: &[&str]) -> Sidecar {
    sidecar_with_token(cp, service, &cp.token, extra)
}

/// `gateway sidecar` with its admin on port 0; returns once it reported its addresses (it
/// has fetched its configuration and bound its listeners by then).
pub fn sidecar_with_token(
    cp: &ControlPlane,
    service: &str,
    token: &str,
    extra: &[&str],
) -> Sidecar {
    spawn_sidecar(&cp.address, service, token, extra, Vec::new())
}

/// `gateway sidecar` started with `listeners` passed by socket activation: the sockets of the
/// ports the test registered (public port, upstreams' `local_bind_port`), bound by the test
/// on port 0 and listening since, so no other process can take one before the sidecar uses
/// it. The test's copies are closed once the sidecar runs: the sidecar holds them alone.
pub fn sidecar_passing(
    cp: &ControlPlane,
    service: &str,
    token: &str,
    listeners: Vec<TcpListener>,
) -> Sidecar {
    spawn_sidecar(&cp.address, service, token, &[], listeners)
}

/// [`sidecar_passing`] with `http_addr` as its `-http-addr` (a comma list for failover).
pub fn sidecar_passing_to(
    http_addr: &str,
    service: &str,
    token: &str,
    listeners: Vec<TcpListener>,
    extra: &[&str],
) -> Sidecar {
    spawn_sidecar(http_addr, service, token, extra, listeners)
}

fn spawn_sidecar(
    http_addr: &str,
    service: &str,
    token: &str,
    extra: &[&str],
    listeners: Vec<TcpListener>,
) -> Sidecar {
    let binary = crate::gateway::gateway_binary();
    let mut command = if listeners.is_empty() {
        Command::new(binary)
    } else {
        // Names only show in the sidecar's log: `web.0`, `web.1`, … in the order passed.
        let names: Vec<String> = (0..listeners.len())
            .map(|index| format!("{service}.{index}"))
            .collect();
        let named: Vec<(&str, &TcpListener)> =
            names.iter().map(String::as_str).zip(&listeners).collect();
        crate::activation::command(&binary, &named)
    };
    let mut proc = Proc::spawn(
        "sidecar",
        command
            .args(["sidecar", "-sidecar-for", service, "-token", token])
            .args(["-http-addr", http_addr])
            .args(["-admin-bind", "127.0.0.1:0"])
            .args(extra)
            .env("GATEWAY_LOG", "info")
            .stdout(Stdio::piped()),
    );
    drop(listeners);
    let stdout = proc.child.stdout.take().expect("piped stdout");
    let bound = crate::gateway::read_bound_of(stdout, "sidecar").unwrap_or_else(|error| {
        panic!("the {service} sidecar did not report its addresses: {error}")
    });
    assert_eq!(bound.pid, proc.child.id(), "the report is not our child's");
    Sidecar {
        public: bound.listener("public").expect("the public address"),
        admin: bound.admin.expect("the admin address"),
        proc,
    }
}

/// Send `line` and read the same number of bytes back; `None` if the connection closed or
/// stayed silent first.
pub fn echo_once(address: &str, line: &str) -> Option<String> {
    let mut stream = TcpStream::connect(address).ok()?;
    echo_on(&mut stream, line)
}

pub fn echo_on(stream: &mut TcpStream, line: &str) -> Option<String> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(line.as_bytes()).ok()?;
    let mut got = vec![0u8; line.len()];
    let mut filled = 0;
    while filled < got.len() {
        match stream.read(&mut got[filled..]) {
            Ok(0) | Err(_) => return None,
            Ok(n) => filled += n,
        }
    }
    Some(String::from_utf8_lossy(&got).into_owned())
}

/// Retry an echo until it works (sidecars and gateways need a moment to start).
pub fn eventually_echo(address: &str, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(answer) = echo_once(address, line) {
            return answer;
        }
        assert!(Instant::now() < deadline, "no echo through {address}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// The value of one metric line (exact name with labels) from a Prometheus page.
pub fn metric(admin: &str, series: &str) -> Option<f64> {
    let (_, body) = http(admin, "GET", "/metrics", None, None);
    body.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// A TCP relay that records every byte sent from its client to its server.
pub struct Recorder {
    pub address: SocketAddr,
    pub forwarded: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    pub fn start(listen: SocketAddr, target: SocketAddr) -> Recorder {
        Recorder::on(TcpListener::bind(listen).expect("recorder bind"), target)
    }

    /// A recorder accepting on `listener`, which the test bound earlier.
    pub fn on(listener: TcpListener, target: SocketAddr) -> Recorder {
        let listen = listener.local_addr().expect("recorder address");
        let forwarded = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&forwarded);
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let record = Arc::clone(&record);
                let (mut client_reader, mut server_writer) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                thread::spawn(move || {
                    let mut buffer = [0u8; 16384];
                    while let Ok(n) = client_reader.read(&mut buffer) {
                        if n == 0 {
                            break;
                        }
                        record
                            .lock()
                            .expect("record")
                            .extend_from_slice(&buffer[..n]);
                        if server_writer.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = server_writer.shutdown(Shutdown::Write);
                });
                let (mut server_reader, mut client_writer) = (server, client);
                thread::spawn(move || {
                    let _ = std::io::copy(&mut server_reader, &mut client_writer);
                    let _ = client_writer.shutdown(Shutdown::Write);
                });
            }
        });
        Recorder {
            address: listen,
            forwarded,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.forwarded.lock().expect("record").clone()
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}
