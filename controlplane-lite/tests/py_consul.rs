//! Conformance with a Consul client we did not write: `tests/py_consul/conformance.py` drives a
//! primary and a federated secondary through `py-consul` (PyPI), walking the guide's workflow
//! and the Consul endpoints listed in the README's support table.
//!
//! The Python interpreter comes from `MESHGW_PY_CONSUL_PYTHON`, else the venv that
//! `scripts/install-test-deps` creates. Without it the test is skipped locally and fails
//! under `CI=true`, so CI always counts it.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, Federation};
use serde_json::json;

/// Bound on the whole Python run (it waits only on bounded polls of its own).
const SUITE_LIMIT: Duration = Duration::from_secs(180);

fn python() -> Option<PathBuf> {
    let candidate = std::env::var_os("MESHGW_PY_CONSUL_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".cache/meshgw/py-consul/bin/python"))
        })?;
    let usable = Command::new(&candidate)
        .args(["-c", "import consul"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    usable.then_some(candidate)
}

#[test]
fn py_consul_walks_the_guide_on_two_datacenters() {
    let Some(python) = python() else {
        let message = "py-consul is not installed (run scripts/install-test-deps)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
        eprintln!("skipped: {message}");
        return;
    };
    // The datacenters federate over verified HTTPS, as they must (issue 13); py-consul talks
    // to each agent's plain loopback listener, as a local client does.
    let federation = Federation::start("pyconsul");
    let (primary, secondary) = (&federation.primary, &federation.secondary);
    let management = &federation.management;
    // Each datacenter registers its mesh gateway, as the guide does; its federation state
    // (with the agent's address) is how the primary reaches the secondary for `?dc=`. The
    // gateway addresses are records only: nothing here dials them.
    for agent in [primary, secondary] {
        let gateway = json!({"Kind": "mesh-gateway", "Name": "mesh-gateway", "Port": 8443,
            "Address": "127.0.0.1"});
        let answer = agent.put(
            "/v1/agent/service/register",
            Some(management),
            &gateway.to_string(),
        );
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    eventually(Duration::from_secs(30), "federation states", || {
        primary
            .get("/v1/catalog/datacenters", None)
            .text
            .contains("secondary")
    });

    let script = format!(
        "{}/tests/py_consul/conformance.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut child = Command::new(&python)
        .arg(&script)
        .env("CP_PRIMARY", &primary.address)
        .env("CP_SECONDARY", &secondary.address)
        .env("CP_MANAGEMENT", management)
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("CONSUL_HTTP_ADDR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait python") {
            break Some(status);
        }
        if started.elapsed() > SUITE_LIMIT {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("python output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}{stderr}");
    let status = status.unwrap_or_else(|| panic!("conformance suite exceeded {SUITE_LIMIT:?}"));
    assert!(
        status.success(),
        "py-consul conformance failed:\n{stdout}{stderr}"
    );
}
