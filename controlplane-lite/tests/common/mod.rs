//! Test harness: spawns the real binary on 127.0.0.1 with a temporary data dir and drives it
//! over HTTP (ureq) and through the CLI.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod election;
pub mod etcd;

pub const BINARY: &str = env!("CARGO_BIN_EXE_controlplane-lite");

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("cplite-it-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        // The agent refuses a data dir other users can read; the directory is also private
        // because it holds CA keys and token secrets.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .expect("chmod temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The path of a file in `testdata/`.
pub fn testdata(name: &str) -> String {
    format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The store backend the suite runs against: `MESHGW_TEST_STORE=etcd` starts every agent with
/// `-store etcd` on the cluster `MESHGW_TEST_ETCD_ENDPOINTS` names (`.ci/run` starts one with
/// `scripts/etcd-cluster`), under a prefix made of its data dir: unique per agent, and the same
/// when a test restarts an agent on its data dir. Unset (or `redb`): the default, redb. A test
/// that chooses `-store` itself is left alone.
fn store_flags(data_dir: &Path, dc: &str, extra: &[&str]) -> Vec<String> {
    let chosen = extra.iter().any(|a| a.trim_start_matches('-') == "store");
    match std::env::var("MESHGW_TEST_STORE").as_deref() {
        Ok("etcd") if !chosen => {
            let endpoints = std::env::var("MESHGW_TEST_ETCD_ENDPOINTS").expect(
                "MESHGW_TEST_STORE=etcd needs MESHGW_TEST_ETCD_ENDPOINTS (scripts/etcd-cluster start DIR prints it)",
            );
            vec![
                "-store".to_owned(),
                "etcd".to_owned(),
                "-etcd-endpoints".to_owned(),
                endpoints,
                "-etcd-prefix".to_owned(),
                format!("/meshgw-test{}/{dc}", data_dir.display()),
            ]
        }
        _ => Vec::new(),
    }
}

/// Whether the suite runs on etcd (see [`store_flags`]): tests of redb's own file handling
/// pin `-store redb`.
pub fn on_etcd() -> bool {
    std::env::var("MESHGW_TEST_STORE").as_deref() == Ok("etcd")
}

/// A running agent; killed on drop.
pub struct Agent {
    pub child: Child,
    pub address: String,
    /// The HTTPS listener's bound address, when started with `-https-addr`.
    pub https_address: Option<String>,
    pub data_dir: PathBuf,
    http: ureq::Agent,
}

/// An HTTP answer.
pub struct Answer {
    pub status: u16,
    pub index: Option<u64>,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

impl Agent {
    /// Starts an agent for datacenter `dc` with extra flags, in `data_dir`. It binds port 0
    /// and the test reads the bound address from its own child's readiness line; a test that
    /// needs a stable address across restarts puts a [`Relay`] in front instead of reusing a
    /// released port.
    pub fn start_in(data_dir: &Path, dc: &str, extra: &[&str]) -> Agent {
        let http_addr = "127.0.0.1:0";
        let mut command = Command::new(BINARY);
        command
            .args([
                "agent",
                "-datacenter",
                dc,
                "-http-addr",
                http_addr,
                "-log-level",
                "warn",
                "-data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .args(store_flags(data_dir, dc, extra))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().expect("spawn agent");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        let https = extra
            .iter()
            .any(|a| a.trim_start_matches('-') == "https-addr");
        let readiness_lines = if https { 2 } else { 1 };
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            for _ in 0..readiness_lines {
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let _ = tx.send(line);
            }
            // Keep draining so the agent never blocks on a full pipe.
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("agent did not start in 30s");
        let address = line
            .trim()
            .rsplit("http://")
            .next()
            .filter(|a| a.contains(':'))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let https_address = https.then(|| {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("no https readiness line in 30s");
            line.trim()
                .rsplit("https://")
                .next()
                .filter(|a| a.contains(':') && line.contains("https://"))
                .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
                .to_owned()
        });
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Agent {
            child,
            address,
            https_address,
            data_dir: data_dir.to_owned(),
            http,
        }
    }

    /// The HTTPS listener's bound address; panics when the agent was started without one.
    pub fn https(&self) -> String {
        self.https_address.clone().expect("an HTTPS listener")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Answer {
        let url = self.url(path);
        let mut response = match method {
            "GET" => with(self.http.get(&url), token).call(),
            "DELETE" => with(self.http.delete(&url), token).call(),
            "PUT" => match body {
                Some(body) => with(self.http.put(&url), token).send(body),
                None => with(self.http.put(&url), token).send_empty(),
            },
            "POST" => match body {
                Some(body) => with(self.http.post(&url), token).send(body),
                None => with(self.http.post(&url), token).send_empty(),
            },
            other => panic!("method {other}"),
        }
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let index = response
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let text = response.body_mut().read_to_string().expect("body");
        Answer {
            status,
            index,
            text,
        }
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> Answer {
        self.request("GET", path, token, None)
    }

    pub fn put(&self, path: &str, token: Option<&str>, body: &str) -> Answer {
        self.request("PUT", path, token, Some(body))
    }

    /// Runs a CLI command against this agent; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str], token: Option<&str>) -> (i32, String, String) {
        let mut command = Command::new(BINARY);
        command
            .args(args)
            .env("CONSUL_HTTP_ADDR", &self.address)
            .env_remove("CONSUL_HTTP_TOKEN");
        if let Some(token) = token {
            command.env("CONSUL_HTTP_TOKEN", token);
        }
        let output = command.output().expect("run cli");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Runs a CLI command that must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str], token: Option<&str>) -> String {
        let (code, stdout, stderr) = self.cli(args, token);
        assert_eq!(code, 0, "{args:?} failed: {stdout}{stderr}");
        stdout
    }

    /// `acl bootstrap` through the CLI; returns the SecretID.
    pub fn bootstrap(&self) -> String {
        let out = self.cli_ok(&["acl", "bootstrap"], None);
        field(&out, "SecretID:")
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix.
        let _ = self.child.wait();
    }
}

fn with<B>(builder: ureq::RequestBuilder<B>, token: Option<&str>) -> ureq::RequestBuilder<B> {
    match token {
        Some(token) => builder.header("X-Consul-Token", token),
        None => builder,
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The value after `label` on the line that starts with it (CLI output).
pub fn field(output: &str, label: &str) -> String {
    output
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .map(|rest| rest.trim().to_owned())
        .unwrap_or_else(|| panic!("no {label} in {output}"))
}

/// A PEM CSR for a fresh P-256 key whose only SAN is `uri` (the key is discarded: tests only
/// look at what the CA signs).
pub fn csr(uri: &str) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.to_owned().try_into().expect("ia5"))];
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

/// Agent certificates made with the binary's `tls` commands, like `consul tls ca create` and
/// `consul tls cert create -server -dc DC`.
pub struct Certs {
    pub ca: PathBuf,
    /// Per datacenter: (certificate, key).
    pub servers: Vec<(String, PathBuf, PathBuf)>,
}

impl Certs {
    pub fn make(dir: &Path, datacenters: &[&str]) -> Certs {
        let run = |args: &[&str]| {
            let output = Command::new(BINARY)
                .args(args)
                .current_dir(dir)
                .output()
                .expect("run tls");
            assert!(
                output.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        run(&["tls", "ca", "create"]);
        let mut servers = Vec::new();
        for dc in datacenters {
            run(&["tls", "cert", "create", "-server", "-dc", dc]);
            servers.push((
                (*dc).to_owned(),
                dir.join(format!("{dc}-server-consul-0.pem")),
                dir.join(format!("{dc}-server-consul-0-key.pem")),
            ));
        }
        Certs {
            ca: dir.join("consul-agent-ca.pem"),
            servers,
        }
    }

    /// The agent flags for datacenter `dc`: an HTTPS listener on port 0 with its server
    /// certificate, and the CA that verifies the other datacenters' agents.
    pub fn agent_flags(&self, dc: &str) -> Vec<String> {
        let (_, cert, key) = self
            .servers
            .iter()
            .find(|(d, _, _)| d == dc)
            .unwrap_or_else(|| panic!("no certificate for {dc}"));
        vec![
            "-https-addr".into(),
            "127.0.0.1:0".into(),
            "-cert-file".into(),
            cert.display().to_string(),
            "-key-file".into(),
            key.display().to_string(),
            "-ca-file".into(),
            self.ca.display().to_string(),
        ]
    }
}

/// A TCP relay the test owns: it listens on a port it bound itself (port 0) and forwards
/// every connection to `target`, which can change. It stands for the WAN link between two
/// agents: it records the bytes both ways (a capture of the link), and it lets a restarted
/// agent, on a new port, keep the address its peer was given, without ever releasing a port.
pub struct Relay {
    pub address: String,
    target: std::sync::Arc<std::sync::Mutex<String>>,
    capture: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Bound on the recorded bytes (enough for a test's whole federation traffic).
const CAPTURE_LIMIT: usize = 64 << 20;

impl Relay {
    pub fn start(target: &str) -> Relay {
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let address = listener.local_addr().expect("relay addr").to_string();
        let target = Arc::new(Mutex::new(target.to_owned()));
        let capture = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (t, c, s, h) = (target.clone(), capture.clone(), stop.clone(), held.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut client) = client else { continue };
                if h.load(Ordering::Relaxed) {
                    // A silent partition: the connection opens (as a middlebox or a SYN
                    // queue would let it) but nothing ever comes back.
                    std::thread::spawn(move || {
                        use std::io::Read;
                        let mut sink = [0u8; 4096];
                        while client.read(&mut sink).map(|n| n > 0).unwrap_or(false) {}
                    });
                    continue;
                }
                let to = t.lock().map(|t| t.clone()).unwrap_or_default();
                let Ok(server) = std::net::TcpStream::connect(&to) else {
                    continue;
                };
                for (mut from, mut into) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| a.ok().zip(b.ok()))
                {
                    let capture = c.clone();
                    let held = h.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buffer = [0u8; 16 << 10];
                        loop {
                            let n = match from.read(&mut buffer) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if held.load(Ordering::Relaxed) {
                                // Partitioned: bytes vanish, and the connection stays open.
                                continue;
                            }
                            if let Ok(mut capture) = capture.lock() {
                                if capture.len() + n <= CAPTURE_LIMIT {
                                    capture.extend_from_slice(&buffer[..n]);
                                }
                            }
                            if into.write_all(&buffer[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = into.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay {
            address,
            target,
            capture,
            stop,
            held,
        }
    }

    /// Holds (`true`) or heals (`false`) a silent partition: while held, bytes on existing
    /// connections are dropped and new connections are accepted but never answered.
    pub fn partition(&self, held: bool) {
        self.held.store(held, Ordering::Relaxed);
    }

    /// Sends new connections to `target` from now on.
    pub fn retarget(&self, target: &str) {
        if let Ok(mut t) = self.target.lock() {
            *t = target.to_owned();
        }
    }

    /// Every byte relayed so far, both directions.
    pub fn captured(&self) -> Vec<u8> {
        self.capture.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(&self.address);
    }
}

/// Polls `check` every 20 ms until it holds or `limit` passes.
pub fn eventually(limit: Duration, what: &str, check: impl FnMut() -> bool) {
    eventually_every(Duration::from_millis(20), limit, what, check);
}

/// Polls `check` every 20 ms until it holds (true) or `limit` passes (false), for a caller that
/// says more than [`eventually`] can when the condition never holds.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while !check() {
        if started.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Polls `check` every `interval` until it holds or `limit` passes (a short interval where the
/// test measures how soon the condition holds).
pub fn eventually_every(
    interval: Duration,
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(interval);
    }
}

/// Borrows owned flags the way [`Agent::start_in`] takes them.
pub fn refs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// `flags` followed by `more`, owned.
pub fn owned(flags: &[&str], more: Vec<String>) -> Vec<String> {
    let mut all: Vec<String> = flags.iter().map(|s| (*s).to_owned()).collect();
    all.extend(more);
    all
}

/// The guide's replication policy (acl write, operator write, read on every service).
pub const REPLICATION_POLICY: &str =
    r#"{"acl": "write", "operator": "write", "service_prefix": {"": {"policy": "read"}}}"#;

/// The flags of a primary: ACLs deny by default, then `more` (its TLS flags).
pub fn primary_flags(more: Vec<String>) -> Vec<String> {
    owned(&["-acl-default-policy", "deny"], more)
}

/// Starts a primary with [`primary_flags`] in `dir`, bootstraps its ACLs and creates the
/// guide's replication policy and a token for it: (agent, management, replication token).
pub fn start_primary(dir: &Path, more: Vec<String>) -> (Agent, String, String) {
    let primary = Agent::start_in(dir, "primary", &refs(&primary_flags(more)));
    let management = primary.bootstrap();
    let replication = policy_token(&primary, &management, "replication", REPLICATION_POLICY);
    (primary, management, replication)
}

/// Creates the policy `name` with `rules` and a token holding it (through the CLI, as the
/// guide does); returns the token's secret.
pub fn policy_token(agent: &Agent, management: &str, name: &str, rules: &str) -> String {
    let policy = agent.put(
        "/v1/acl/policy",
        Some(management),
        &json!({"Name": name, "Rules": rules}).to_string(),
    );
    assert_eq!(policy.status, 200, "{}", policy.text);
    let out = agent.cli_ok(
        &[
            "acl",
            "token",
            "create",
            "-description",
            name,
            "-policy-name",
            name,
        ],
        Some(management),
    );
    field(&out, "SecretID:")
}

/// The flags of a secondary that replicates from the primary at `primary_address` with the
/// token `replication`: ACLs deny by default, then `more` (its TLS flags).
pub fn secondary_flags(primary_address: &str, replication: &str, more: Vec<String>) -> Vec<String> {
    owned(
        &[
            "-acl-default-policy",
            "deny",
            "-primary-datacenter",
            "primary",
            "-primary-address",
            primary_address,
            "-replication-token",
            replication,
        ],
        more,
    )
}

/// Two datacenters, `primary` and `secondary`, federated over HTTPS verified against an agent
/// CA made at start (`tls ca create`, `tls cert create -server`), started as the guide does:
/// the primary with ACLs bootstrapped and a replication token, the secondary pointed at it.
/// Started, the secondary holds its intermediate CA and knows the management token.
pub struct Federation {
    pub primary: Agent,
    pub secondary: Agent,
    pub management: String,
    pub replication_token: String,
    /// The WAN link the secondary dials, when started with [`Federation::start_relayed`].
    pub relay: Option<Relay>,
    pub certs: Certs,
    primary_flags: Vec<String>,
    primary_dir: TempDir,
    _secondary_dir: TempDir,
    _certs_dir: TempDir,
}

impl Federation {
    /// The secondary dials the primary's HTTPS listener directly.
    pub fn start(label: &str) -> Federation {
        Federation::launch(label, false, &[])
    }

    /// The secondary reaches the primary through a [`Relay`] the test owns, so a restarted
    /// primary (on a new port) keeps the address the secondary was given, and the link can be
    /// captured. `primary_extra` follows the primary's TLS flags.
    pub fn start_relayed(label: &str, primary_extra: &[&str]) -> Federation {
        Federation::launch(label, true, primary_extra)
    }

    fn launch(label: &str, relayed: bool, primary_extra: &[&str]) -> Federation {
        let primary_dir = TempDir::new(&format!("{label}-primary"));
        let secondary_dir = TempDir::new(&format!("{label}-secondary"));
        let certs_dir = TempDir::new(&format!("{label}-certs"));
        let certs = Certs::make(certs_dir.path(), &["primary", "secondary"]);
        let mut tls = certs.agent_flags("primary");
        tls.extend(primary_extra.iter().map(|s| (*s).to_owned()));
        let (primary, management, replication_token) =
            start_primary(primary_dir.path(), tls.clone());
        let relay = relayed.then(|| Relay::start(&primary.https()));
        let primary_address = match &relay {
            Some(relay) => relay.address.clone(),
            None => primary.https(),
        };
        let flags = secondary_flags(
            &primary_address,
            &replication_token,
            certs.agent_flags("secondary"),
        );
        let secondary = Agent::start_in(secondary_dir.path(), "secondary", &refs(&flags));
        let federation = Federation {
            primary,
            secondary,
            management,
            replication_token,
            relay,
            certs,
            primary_flags: primary_flags(tls),
            primary_dir,
            _secondary_dir: secondary_dir,
            _certs_dir: certs_dir,
        };
        eventually(Duration::from_secs(30), "secondary CA and ACLs", || {
            federation
                .secondary
                .get("/v1/connect/ca/roots", None)
                .status
                == 200
                && federation
                    .secondary
                    .get("/v1/acl/token/self", Some(&federation.management))
                    .status
                    == 200
        });
        federation
    }

    /// Whether `agent` allows web → socat (the intention check, asked with the management
    /// token).
    pub fn check(&self, agent: &Agent) -> bool {
        let answer = agent.get(
            "/v1/connect/intentions/check?source=web&destination=socat",
            Some(&self.management),
        );
        assert_eq!(answer.status, 200, "{}", answer.text);
        answer.json()["Allowed"].as_bool().expect("Allowed")
    }

    /// The relay of a federation started with [`Federation::start_relayed`].
    pub fn relay(&self) -> &Relay {
        self.relay
            .as_ref()
            .expect("a federation started with start_relayed")
    }

    /// Starts the primary again on its data dir and flags (a new port; the relay is pointed
    /// at it). The old process is killed first if it still runs.
    pub fn restart_primary(&mut self) {
        self.primary.kill9();
        self.primary = Agent::start_in(
            self.primary_dir.path(),
            "primary",
            &refs(&self.primary_flags),
        );
        self.relay().retarget(&self.primary.https());
    }
}

/// Runs `command` (an agent that must refuse to start); it must exit non-zero within 30 s.
/// Returns its stderr.
pub fn refused_start(command: &mut Command) -> String {
    use std::io::Read;
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent started instead of refusing: {command:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "the agent exited 0");
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    stderr
}
