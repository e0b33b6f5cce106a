//! Harness for the mesh and sidecar tests: a real controlplane-lite agent, real `gateway mesh`
//! and `gateway sidecar` processes, a real socat echo, and a recording TCP relay.
//!
//! controlplane-lite is another crate, so Cargo gives us no `CARGO_BIN_EXE_` for it: it is
//! expected next to the gateway binary (`cargo test --workspace` builds both) and built with
//! `cargo build -p controlplane-lite` into the same target directory if it is missing.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

// The static gateway's harness: free ports and temporary directories come from there.
#[path = "../common/mod.rs"]
mod common;
#[allow(unused_imports)] // each test binary uses a different subset
pub use common::{free_port, temp_dir};

/// The controlplane-lite binary next to ours, built on first use if missing.
pub fn controlplane_binary() -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _once = BUILD
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let gateway = Path::new(GATEWAY);
    let profile_dir = gateway.parent().expect("binary directory");
    let binary = profile_dir.join("controlplane-lite");
    if !binary.exists() {
        let target_dir = profile_dir.parent().expect("target directory");
        let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        command
            .args(["build", "-p", "controlplane-lite"])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir
            .file_name()
            .is_some_and(|name| name == "release")
        {
            command.arg("--release");
        }
        let status = command
            .status()
            .expect("run cargo build -p controlplane-lite");
        assert!(status.success(), "cargo build -p controlplane-lite failed");
    }
    binary
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Proc {
    pub fn spawn(name: &'static str, command: &mut Command) -> Proc {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc { child, name }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Wait for exit up to `limit`; the exit status if it exited.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A controlplane-lite agent (primary, ACL default deny) with a bootstrapped management token.
pub struct ControlPlane {
    pub proc: Proc,
    pub address: String,
    pub token: String,
    pub dir: PathBuf,
}

impl ControlPlane {
    pub fn start(tag: &str) -> ControlPlane {
        let mut cp = ControlPlane::spawn(tag, "primary", &[]);
        let (status, body) = cp.request("PUT", "/v1/acl/bootstrap", None);
        assert_eq!(status, 200, "bootstrap: {body}");
        let value: serde_json::Value = serde_json::from_str(&body).expect("bootstrap JSON");
        cp.token = value["SecretID"].as_str().expect("SecretID").to_owned();
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

    fn spawn(tag: &str, datacenter: &str, extra: &[&str]) -> ControlPlane {
        let dir = temp_dir(tag);
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
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("controlplane-lite did not start");
        let address = line
            .trim()
            .rsplit("http://")
            .next()
            .filter(|a| a.contains(':'))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        ControlPlane {
            proc,
            address,
            token: String::new(),
            dir,
        }
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

    /// The guide's `socat.json` with test ports (the sidecar's port fixed so that parallel
    /// tests do not all get 21000).
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

/// `socat -v tcp-l:PORT,fork exec:/bin/cat` — the guide's echo service.
pub fn socat_echo(port: u16) -> Proc {
    let proc = Proc::spawn(
        "socat",
        Command::new("socat")
            .arg("-v")
            .arg(format!("tcp-l:{port},bind=127.0.0.1,reuseaddr,fork"))
            .arg("exec:/bin/cat")
            .stderr(Stdio::null()),
    );
    wait_listening(&format!("127.0.0.1:{port}"));
    proc
}

/// `gateway mesh -register` on 127.0.0.1:`listen` (LAN and WAN), with a `--config` file for
/// admin, one worker and a drain without announce period.
pub fn mesh_gateway(cp: &ControlPlane, token: &str, listen: u16, admin: u16, tag: &str) -> Proc {
    mesh_gateway_named(&cp.address, token, "mesh-gateway", listen, admin, tag)
}

/// `mesh_gateway` registered under `service_name` with the control plane at `http_addr`: the
/// name is also the registration's ID, so two gateways of one datacenter need two names.
pub fn mesh_gateway_named(
    http_addr: &str,
    token: &str,
    service_name: &str,
    listen: u16,
    admin: u16,
    tag: &str,
) -> Proc {
    let dir = temp_dir(tag);
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"lan\"\naddress = \"127.0.0.1:{listen}\"\n\n\
             [admin]\naddress = \"127.0.0.1:{admin}\"\n\n[workers]\ncount = 1\npin = false\n\n\
             [drain]\nannounce = \"0s\"\ntimeout = \"5s\"\n"
        ),
    )
    .expect("write config");
    let address = format!("127.0.0.1:{listen}");
    Proc::spawn(
        "gateway mesh",
        Command::new(GATEWAY)
            .args(["mesh", "-register", "-service-name", service_name])
            .args(["-address", &address, "-wan-address", &address])
            .args(["-token", token, "-http-addr", http_addr])
            .arg("--config")
            .arg(&config),
    )
}

pub fn wait_listening(address: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(address).is_err() {
        assert!(Instant::now() < deadline, "{address} never listened");
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn sidecar(cp: &ControlPlane, service: &str, admin_port: u16, extra: &[&str]) -> Proc {
    sidecar_with_token(cp, service, &cp.token, admin_port, extra)
}

pub fn sidecar_with_token(
    cp: &ControlPlane,
    service: &str,
    token: &str,
    admin_port: u16,
    extra: &[&str],
) -> Proc {
    Proc::spawn(
        "sidecar",
        Command::new(GATEWAY)
            .args(["sidecar", "-sidecar-for", service, "-token", token])
            .args(["-http-addr", &cp.address])
            .args(["-admin-bind", &format!("127.0.0.1:{admin_port}")])
            .args(extra)
            .env("GATEWAY_LOG", "info"),
    )
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
        let listener = TcpListener::bind(listen).expect("recorder bind");
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
