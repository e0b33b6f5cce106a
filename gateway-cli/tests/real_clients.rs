//! Real TLS clients and servers through the gateway: openssl s_client, gnutls-cli and curl to
//! openssl s_server backends with a different certificate per route; nc and socat for
//! half-close. The gateway only ever sees TLS records it does not decrypt.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn make_cert(dir: &Path, name: &str) {
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.crt")))
        .args(["-subj", &format!("/CN={name}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl req");
    assert!(status.success());
}

/// `openssl s_server -www` with its own certificate, on the port it reports (`ACCEPT ADDR`).
fn tls_server(dir: &Path, name: &str) -> (Process, std::net::SocketAddr) {
    make_cert(dir, name);
    let mut child = Command::new("openssl")
        .args(["s_server", "-www", "-accept", "127.0.0.1:0"])
        .arg("-cert")
        .arg(dir.join(format!("{name}.crt")))
        .arg("-key")
        .arg(dir.join(format!("{name}.key")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let stdout = child.stdout.take().expect("piped stdout");
    let accept = |line: &str| line.starts_with("ACCEPT ");
    let lines = test_support::process::read_lines(stdout, Duration::from_secs(20), accept, accept)
        .unwrap_or_else(|error| panic!("openssl s_server did not report its address: {error}"));
    let address: std::net::SocketAddr = lines[0]
        .trim_start_matches("ACCEPT ")
        .parse()
        .expect("ACCEPT address");
    wait_listening(address);
    (Process(child), address)
}

fn wait_listening(address: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(address).is_err() {
        assert!(Instant::now() < deadline, "{address} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_with_input(command: &mut Command, input: &[u8]) -> (String, String) {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let output = child.wait_with_output().expect("client output");
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

struct Setup {
    gateway: Gateway,
    _servers: Vec<Process>,
    _dir: TempDir,
}

/// Two TLS servers behind the gateway: `alpha.test` (exact) and `*.beta.test` (wildcard).
fn setup() -> Setup {
    require_tool("openssl");
    let dir = temp_dir("real");
    let (alpha, alpha_address) = tls_server(&dir, "alpha.test");
    let (beta, beta_address) = tls_server(&dir, "beta.test");
    let config = [
        route("alpha.test", &[alpha_address]),
        route("*.beta.test", &[beta_address]),
    ]
    .concat();
    Setup {
        gateway: Gateway::start(&config),
        _servers: vec![alpha, beta],
        _dir: dir,
    }
}

/// `openssl s_client` to the gateway's `port` on 127.0.0.1 with SNI `name`, then `extra`,
/// sending `input`: (stdout, stderr).
fn s_client(port: &str, name: &str, extra: &[&str], input: &[u8]) -> (String, String) {
    run_with_input(
        Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                name,
            ])
            .args(extra),
        input,
    )
}

#[test]
fn openssl_s_client_reaches_the_server_its_name_routes_to() {
    let setup = setup();
    let port = setup.gateway.listen.port().to_string();
    for (name, expected) in [
        ("alpha.test", "CN = alpha.test"),
        ("www.beta.test", "CN = beta.test"),
        ("ALPHA.test.", "CN = alpha.test"),
    ] {
        let (stdout, stderr) = s_client(&port, name, &["-ign_eof"], b"GET / HTTP/1.0\r\n\r\n");
        assert!(
            stdout.contains(&format!("subject={expected}")),
            "{name}: {stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("HTTP/1.0 200 ok"),
            "{name}: the request and answer passed through\n{stdout}"
        );
    }
    // Large hellos fragmented over several TLS records (max_send_frag 512).
    let alpn: Vec<String> = (0..40)
        .map(|i| format!("protocol-{i:03}-padding-padding"))
        .collect();
    let (stdout, _) = s_client(
        &port,
        "alpha.test",
        &[
            "-max_send_frag",
            "512",
            "-alpn",
            &alpn.join(","),
            "-ign_eof",
        ],
        b"GET / HTTP/1.0\r\n\r\n",
    );
    assert!(stdout.contains("subject=CN = alpha.test"), "{stdout}");
}

#[test]
fn curl_through_the_gateway_gets_the_right_certificate() {
    require_tool("curl");
    let setup = setup();
    let port = setup.gateway.listen.port();
    for (name, expected) in [
        ("alpha.test", "CN=alpha.test"),
        ("api.beta.test", "CN=beta.test"),
    ] {
        let (stdout, stderr) = run_with_input(
            Command::new("curl").args([
                "-sv",
                "-k",
                "--max-time",
                "10",
                "--resolve",
                &format!("{name}:{port}:127.0.0.1"),
                &format!("https://{name}:{port}/"),
            ]),
            b"",
        );
        assert!(
            stderr.contains(&format!("subject: {expected}")),
            "{name}: {stderr}"
        );
        assert!(
            stdout.contains("s_server"),
            "{name}: body from openssl s_server: {stdout}"
        );
    }
}

#[test]
fn gnutls_cli_through_the_gateway_gets_the_right_certificate() {
    require_tool("gnutls-cli");
    let setup = setup();
    let port = setup.gateway.listen.port().to_string();
    let (stdout, stderr) = run_with_input(
        Command::new("gnutls-cli").args([
            "--insecure",
            "--port",
            &port,
            "--sni-hostname",
            "deep.name.beta.test",
            "127.0.0.1",
        ]),
        b"GET / HTTP/1.0\r\n\r\n",
    );
    let all = format!("{stdout}\n{stderr}");
    assert!(all.contains("CN=beta.test"), "{all}");
    assert!(all.contains("HTTP/1.0 200 ok"), "{all}");
}

#[test]
fn unknown_names_are_closed_before_any_byte_for_real_clients() {
    let setup = setup();
    let port = setup.gateway.listen.port().to_string();
    let (stdout, _) = s_client(&port, "gamma.test", &[], b"");
    assert!(stdout.contains("no peer certificate available"), "{stdout}");
    assert_eq!(
        setup.gateway.wait_metric(
            "gateway_route_lookups_total{listener=\"wan\",result=\"no_route\"}",
            1.0
        ),
        1.0
    );
}

#[test]
fn nc_and_socat_half_close_through_the_gateway() {
    require_tool("socat");
    require_tool("nc");
    // A real echo peer: socat runs `cat` per connection; cat exits at EOF, which only comes
    // if the gateway passes the client's half-close on.
    let socat = test_support::mesh::socat_echo();
    let backend: std::net::SocketAddr = ([127, 0, 0, 1], socat.port).into();
    wait_listening(backend);
    let file = "python-ssl.bin";
    let gateway = Gateway::start(&route(&testdata_sni(file), &[backend]));
    let mut input = testdata(file);
    input.extend_from_slice(&pattern(300_000, 5));
    // netcat-openbsd: -N shuts the socket down for writing at EOF on stdin.
    let mut child = Command::new("nc")
        .args(["-N", "127.0.0.1", &gateway.listen.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("nc");
    let mut stdin = child.stdin.take().expect("stdin");
    let sent = input.clone();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&sent);
    });
    let output = child.wait_with_output().expect("nc output");
    writer.join().expect("writer");
    assert_eq!(output.stdout.len(), input.len());
    assert!(
        output.stdout == input,
        "echo through nc → gateway → socat is byte-exact"
    );
    drop(socat);
}
