//! The gateway's harness: the real `gateway` binary, real sockets, and backends that say who
//! they are.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

pub fn testdata(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../gateway-proto/testdata/clienthello")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The SNI of a captured hello (from the manifest), for building matching routes.
pub fn testdata_sni(name: &str) -> String {
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../gateway-proto/testdata/clienthello/MANIFEST.tsv"),
    )
    .expect("manifest");
    manifest
        .lines()
        .find(|line| line.starts_with(&format!("{name}\t")))
        .and_then(|line| line.split('\t').nth(3))
        .expect("capture listed")
        .to_owned()
}

/// `127.0.0.1:0`: the address every test process binds, reporting what it got.
pub const ANY_PORT: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    0,
));

/// An address that refuses connections for as long as this value lives: a socket bound to
/// port 0 that never listens, so no other process can take the port in the meantime (a
/// port closed after `bind` could be reused by anyone before the test connects to it).
pub struct DeadEndpoint {
    _socket: socket2::Socket,
    pub address: SocketAddr,
}

pub fn dead_endpoint() -> DeadEndpoint {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&ANY_PORT.into()).expect("bind");
    let address = socket
        .local_addr()
        .ok()
        .and_then(|address| address.as_socket())
        .expect("bound address");
    DeadEndpoint {
        _socket: socket,
        address,
    }
}

impl DeadEndpoint {
    /// Start listening on the held address: from now on it accepts. The port was never free
    /// in between, so nothing else can have taken it.
    pub fn listen(self) -> TcpListener {
        self._socket.listen(128).expect("listen");
        self._socket.into()
    }
}

/// What a gateway reported on stdout after binding (`gateway bound: ...` lines).
#[derive(Debug, Clone)]
pub struct Bound {
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    pub pid: u32,
}

impl Bound {
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(listener, _)| listener == name)
            .map(|(_, address)| *address)
    }
}

/// Read a gateway's `gateway bound:` lines (bounded wait).
pub fn read_bound(stdout: std::process::ChildStdout) -> Result<Bound, String> {
    read_bound_of(stdout, "gateway")
}

/// Read `PROGRAM bound:` lines (`gateway`, `sidecar`) up to `PROGRAM bound: done pid N`;
/// a sidecar's public listener is reported as the listener `public`.
pub fn read_bound_of(stdout: std::process::ChildStdout, program: &str) -> Result<Bound, String> {
    let prefix = format!("{program} bound: ");
    let done = format!("{program} bound: done ");
    let lines = crate::process::read_lines(
        stdout,
        Duration::from_secs(30),
        move |line| line.starts_with(&prefix),
        move |line| line.starts_with(&done),
    )?;
    let mut bound = Bound {
        listeners: Vec::new(),
        admin: None,
        pid: 0,
    };
    for line in &lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        let words = words.get(1..).unwrap_or_default();
        match words {
            ["bound:", "public", address] => bound.listeners.push((
                "public".to_owned(),
                address.parse().map_err(|_| format!("bad line {line:?}"))?,
            )),
            ["bound:", "listener", name, address] => bound.listeners.push((
                (*name).to_owned(),
                address.parse().map_err(|_| format!("bad line {line:?}"))?,
            )),
            ["bound:", "admin", address] => {
                bound.admin = Some(address.parse().map_err(|_| format!("bad line {line:?}"))?)
            }
            ["bound:", "done", "pid", pid] => {
                bound.pid = pid.parse().map_err(|_| format!("bad line {line:?}"))?
            }
            _ => return Err(format!("unexpected line {line:?}")),
        }
    }
    Ok(bound)
}

pub use crate::dir::{temp_dir, write_private, TempDir};
pub use crate::process::send_signal;

/// The `gateway` binary beside the test executable.
pub fn gateway_binary() -> PathBuf {
    crate::process::binary("gateway")
}

/// A running gateway process, killed on drop.
pub struct Gateway {
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub dir: TempDir,
}

impl Gateway {
    /// Start with `[[route]]` and other sections given as TOML; listener and admin are added.
    pub fn start(extra_toml: &str) -> Gateway {
        Self::start_with_env(extra_toml, &[])
    }

    pub fn start_with_env(extra_toml: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = temp_dir("gw");
        let (listen, admin) = (ANY_PORT, ANY_PORT);
        let config_path = dir.join("gateway.toml");
        // Two workers unless the test sets its own.
        let workers = if extra_toml.contains("[workers]") {
            ""
        } else {
            "[workers]\ncount = 2\n"
        };
        let config = format!(
            "[[listener]]\nname = \"wan\"\naddress = \"{listen}\"\n\n[admin]\naddress = \"{admin}\"\n\n{workers}\n{extra_toml}\n"
        );
        write_private(&config_path, config);
        let mut command = Command::new(gateway_binary());
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .env("GATEWAY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("stderr.log")).expect("log file"),
            ));
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn gateway");
        Gateway::ready(child, config_path, dir)
    }

    /// Read the addresses `child` reports, then wait until it answers `/ready` as itself.
    fn ready(mut child: Child, config_path: PathBuf, dir: TempDir) -> Gateway {
        let bound = match child.stdout.take().map(read_bound) {
            Some(Ok(bound)) => bound,
            Some(Err(error)) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
                panic!("the gateway did not report its addresses ({error}): {log}");
            }
            None => panic!("the gateway's stdout is not piped"),
        };
        let listen = bound
            .listener("wan")
            .or_else(|| bound.listeners.first().map(|(_, address)| *address))
            .expect("the gateway reported no listener");
        let gateway = Gateway {
            listen,
            admin: bound.admin.expect("the gateway reported no admin address"),
            child,
            config_path,
            dir,
        };
        gateway.wait_ready();
        gateway
    }

    /// Wait, bounded, until the admin API says ready, and check that the process answering
    /// is our child (not another process that happens to hold the address).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok((200, _)) = http(self.admin, "GET", "/ready") {
                self.assert_is_our_child();
                return;
            }
            thread::sleep(Duration::from_millis(25));
        }
        panic!("gateway not ready: {}", self.stderr());
    }

    /// `/config_dump`'s pid is the child's.
    pub fn assert_is_our_child(&self) {
        let (status, body) = http(self.admin, "GET", "/config_dump").expect("config_dump");
        assert_eq!(status, 200, "{body}");
        let dump: serde_json::Value = serde_json::from_str(&body).expect("config_dump JSON");
        assert_eq!(
            dump["pid"].as_u64(),
            Some(u64::from(self.child.id())),
            "{} is answered by another process",
            self.admin
        );
    }

    /// The address a listener of this gateway is bound to now (`/config_dump`'s `bound`).
    pub fn bound_listener(&self, name: &str) -> Option<SocketAddr> {
        let (_, body) = http(self.admin, "GET", "/config_dump").ok()?;
        let dump: serde_json::Value = serde_json::from_str(&body).ok()?;
        dump["listeners"]
            .as_array()?
            .iter()
            .find(|listener| listener["name"] == name)?["bound"]
            .as_str()?
            .parse()
            .ok()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        http(self.admin, "GET", "/metrics").expect("scrape").1
    }

    /// The value of one sample, e.g. `gateway_client_hello_total{listener="wan",result="not_tls"}`.
    /// A sample the gateway does not export fails the test: reading it as 0 would let a
    /// renamed or removed metric pass every "is 0" check.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics();
        metric_value(&text, sample).unwrap_or_else(|| panic!("no sample `{sample}` in:\n{text}"))
    }

    /// Wait until a sample reaches a value (counters are updated as connections end). A
    /// sample still absent at the deadline fails the test.
    pub fn wait_metric(&self, sample: &str, at_least: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.metrics();
            let value = metric_value(&text, sample);
            if value.is_some_and(|value| value >= at_least) || Instant::now() > deadline {
                return value.unwrap_or_else(|| panic!("no sample `{sample}` in:\n{text}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one sample in Prometheus text; `None` when it is absent (never read as 0).
pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// A minimal HTTP/1.1 request (admin API), returning status and body.
pub fn http(address: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A backend on a port the kernel chose (127.0.0.1:0), stopped on drop.
pub struct Backend {
    pub address: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.address);
    }
}

/// Echo every byte back (the ClientHello included); on EOF, finish writing and close.
pub fn echo_backend() -> Backend {
    spawn_backend(|mut stream| {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = stream.shutdown(Shutdown::Write);
    })
}

/// Read the whole first flight (until EOF or a pause), then answer with `tag` and close.
pub fn tag_backend(tag: &'static str) -> Backend {
    spawn_backend(move |mut stream| {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .ok();
        let mut buffer = [0u8; 4096];
        let _ = stream.read(&mut buffer);
        let _ = stream.write_all(tag.as_bytes());
        let _ = stream.shutdown(Shutdown::Write);
        let _ = stream.read(&mut buffer);
    })
}

pub fn spawn_backend(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let address = listener.local_addr().expect("addr");
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    let handler = Arc::new(handler);
    thread::spawn(move || {
        for stream in listener.incoming() {
            if stopping.load(Ordering::Relaxed) {
                break;
            }
            let Ok(stream) = stream else { continue };
            let handler = Arc::clone(&handler);
            thread::spawn(move || handler(stream));
        }
    });
    Backend { address, stop }
}

pub fn connect(address: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(address).expect("connect to gateway");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// A connection the gateway has proxied to an echo backend: `hello` (a ClientHello its route
/// matches) was sent and came back whole.
pub fn established(address: SocketAddr, hello: &[u8]) -> TcpStream {
    try_established(address, hello).expect("echo")
}

/// [`established`], or `None` when the gateway closes the connection before the echo (a
/// connection over a limit).
pub fn try_established(address: SocketAddr, hello: &[u8]) -> Option<TcpStream> {
    let mut stream = connect(address);
    stream.write_all(hello).expect("hello");
    let mut echoed = vec![0u8; hello.len()];
    stream.read_exact(&mut echoed).ok()?;
    Some(stream)
}

/// Read until EOF; returns what arrived (or what arrived before an error).
pub fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buffer = [0u8; 16384];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buffer[..n]),
        }
    }
}

/// A deterministic payload that makes lost, duplicated or reordered bytes visible.
pub fn pattern(length: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

pub fn route(sni: &str, endpoints: &[SocketAddr]) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "[[route]]\nsni = \"{sni}\"\nendpoints = [{}]\n",
        list.join(", ")
    )
}

/// Require a tool from Debian's packages (CI installs them; see .ci/run).
pub fn require_tool(name: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|out| out.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is required for this test: run scripts/install-test-deps"
    );
}

// ---- Operations tests (ops_*.rs): whole configurations, signals, second processes. ----

/// Start `gateway run` on a config file, logging to `log`.
pub fn spawn_gateway(config_path: &Path, log: &Path, env: &[(&str, &str)]) -> Child {
    let mut command = Command::new(gateway_binary());
    command
        .args(["run", "--config"])
        .arg(config_path)
        .env("GATEWAY_LOG", "info")
        // `gateway bound:` lines (a few, then only an access log set to stdout would write).
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("log file"),
        ));
    for (key, value) in env {
        command.env(key, value);
    }
    command.spawn().expect("spawn gateway")
}

impl Gateway {
    /// Start from a whole configuration: `config(listen, admin, dir)` returns the file.
    pub fn start_from(
        config: impl FnOnce(SocketAddr, SocketAddr, &Path) -> String,
        env: &[(&str, &str)],
    ) -> Gateway {
        let dir = temp_dir("ops");
        let config_path = dir.join("gateway.toml");
        write_private(&config_path, config(ANY_PORT, ANY_PORT, &dir));
        let child = spawn_gateway(&config_path, &dir.join("stderr.log"), env);
        Gateway::ready(child, config_path, dir)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, name: &str) {
        send_signal(self.pid(), name);
    }

    /// Wait for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The standard test file: one listener `wan`, admin, two workers, then `extra`.
pub fn base_config(listen: SocketAddr, admin: SocketAddr, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"wan\"\naddress = \"{listen}\"\n\n[admin]\naddress = \"{admin}\"\n\n[workers]\ncount = 2\n\n{extra}\n"
    )
}
