//! Runs every load mode for about a second against `bench backend` directly and checks that the
//! bytes came back intact: the bench must be trustworthy before it measures anything else.
//! No timing assertions: those belong to benchmarks.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use test_support::process::{read_lines, Proc};

const BENCH: &str = env!("CARGO_BIN_EXE_bench");

/// A backend process that is killed when the test ends, at the address it reported.
struct Backend {
    proc: Proc,
    address: String,
}

impl Backend {
    fn start(mode: &str) -> Backend {
        let mut proc = Proc::spawn(
            "bench backend",
            Command::new(BENCH)
                .args([
                    "backend",
                    "--listen",
                    "127.0.0.1:0",
                    "--mode",
                    mode,
                    "--duration",
                    "60",
                ])
                .stdout(Stdio::piped()),
        );
        let stdout = proc.child.stdout.take().expect("backend stdout");
        let ready = |line: &str| line.starts_with("listening on ");
        let lines = read_lines(stdout, Duration::from_secs(20), ready, ready)
            .unwrap_or_else(|error| panic!("the backend did not report its address: {error}"));
        let address = lines[0]
            .strip_prefix("listening on ")
            .expect("backend prints its address")
            .to_owned();
        Backend { proc, address }
    }
}

fn run(args: &[&str]) -> Value {
    let output = Command::new(BENCH)
        .args(args)
        .arg("--json")
        .output()
        .expect("run bench");
    assert!(
        output.status.success(),
        "bench {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("bench prints JSON")
}

fn number(report: &Value, pointer: &str) -> f64 {
    report
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} missing in {report}"))
}

fn assert_clean(report: &Value) {
    assert_eq!(number(report, "/errors_total"), 0.0, "errors in {report}");
    assert!(
        number(report, "/operations") > 0.0,
        "no operations in {report}"
    );
}

#[test]
fn connrate_closed_and_open_loop_echo_every_payload() {
    let backend = Backend::start("echo");
    let pid = backend.proc.child.id().to_string();
    let closed = run(&[
        "connrate",
        "--target",
        &backend.address,
        "--duration",
        "1",
        "--concurrency",
        "8",
        "--payload",
        "100",
        "--pid",
        &pid,
    ]);
    assert_clean(&closed);
    let operations = number(&closed, "/operations");
    assert_eq!(number(&closed, "/bytes_received"), operations * 100.0);
    assert!(number(&closed, "/latency_us/p99") > 0.0);
    assert!(closed.pointer("/cpu/proxy_seconds").is_some());

    let open = run(&[
        "connrate",
        "--target",
        &backend.address,
        "--count",
        "300",
        "--rate",
        "1000",
        "--sni",
        "open.loop.test",
        "--hello-size",
        "1800",
        "--post-quantum",
        "--close",
        "rst",
    ]);
    assert_clean(&open);
    assert_eq!(number(&open, "/operations"), 300.0);
    assert_eq!(open.pointer("/parameters/close"), Some(&Value::from("rst")));
    assert_eq!(
        closed.pointer("/parameters/close"),
        Some(&Value::from("fin"))
    );
    assert_eq!(number(&open, "/parameters/hello_bytes"), 1800.0);
}

#[test]
fn request_response_round_trips_are_verified() {
    let backend = Backend::start("echo");
    let report = run(&[
        "rr",
        "--target",
        &backend.address,
        "--connections",
        "4",
        "--request",
        "1000",
        "--duration",
        "1",
    ]);
    assert_clean(&report);
    let operations = number(&report, "/operations");
    // Every measured round trip echoed exactly its request (plus the warm-up trips).
    assert!(number(&report, "/bytes_received") >= operations * 1000.0);
    assert_eq!(
        number(&report, "/bytes_received"),
        number(&report, "/bytes_sent")
    );

    let paced = run(&[
        "rr",
        "--target",
        &backend.address,
        "--connections",
        "2",
        "--duration",
        "1",
        "--rate",
        "500",
    ]);
    assert_clean(&paced);
}

#[test]
fn bulk_streams_come_back_byte_for_byte() {
    let backend = Backend::start("echo");
    let report = run(&[
        "bulk",
        "--target",
        &backend.address,
        "--connections",
        "2",
        "--duration",
        "1",
        "--hello",
        concat!(env!("CARGO_MANIFEST_DIR"), "/hellos/pq-rustls.bin"),
    ]);
    assert_clean(&report);
    // Both streams finished with every byte sent echoed and verified.
    assert_eq!(number(&report, "/operations"), 2.0);
    assert!(number(&report, "/gbit_per_second") > 0.0);
}

#[test]
fn idle_connections_stay_established_and_still_echo() {
    let backend = Backend::start("echo");
    let pid = backend.proc.child.id().to_string();
    let report = run(&[
        "idle",
        "--target",
        &backend.address,
        "--connections",
        "500",
        "--sample",
        "50",
        "--settle",
        "0.2",
        "--pid",
        &pid,
    ]);
    assert_clean(&report);
    assert_eq!(number(&report, "/memory/connections"), 500.0);
    assert_eq!(number(&report, "/memory/sample_ok"), 50.0);
    assert!(number(&report, "/memory/proxy_pss_after_bytes") > 0.0);
}

#[test]
fn sink_backend_swallows_bytes_so_echo_clients_time_out() {
    // A correctness check of the check: against a sink nothing comes back, and the bench says so.
    let backend = Backend::start("sink");
    let report = run(&[
        "connrate",
        "--target",
        &backend.address,
        "--count",
        "3",
        "--concurrency",
        "3",
        "--timeout",
        "0.3",
    ]);
    assert_eq!(number(&report, "/operations"), 0.0);
    assert_eq!(number(&report, "/errors_total"), 3.0);
}
