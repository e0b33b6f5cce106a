//! The chaos suite (issue 14): runs `scripts/chaos` (the guide's two datacenters in network
//! namespaces, then kill -9 of each gateway, sidecar and agent, both agents at once, a 10 s
//! silent partition, a flapping link and a full disk, with invariants checked after each) and
//! checks that every fault passed. The script prints one `FAULT <name>: PASS|FAIL` line per
//! fault; this test requires each expected fault to be there and to have passed, so a fault
//! silently dropped from the script fails here too.
//!
//! Needs root, `ip netns` and a tmpfs mount. Skipped (with a message) only outside CI: under
//! `CI=true` a missing prerequisite is a failure, never a silent pass. The soak mode
//! (`CHAOS_SOAK_SECONDS`) is for running the script by hand; it is removed from the
//! environment here so the test stays bounded.

mod mesh_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mesh_support::{controlplane_binary, GATEWAY};

use crate::guide_netns::run_script;

/// The run takes about two minutes on a quiet machine; this bounds a hung one.
const LIMIT: Duration = Duration::from_secs(600);

/// Every fault the script must report, in its order.
const FAULTS: [&str; 12] = [
    "baseline (no fault)",
    "kill -9 gateway (secondary)",
    "kill -9 gateway (primary)",
    "kill -9 sidecar (web)",
    "kill -9 sidecar (socat)",
    "kill -9 agent (primary)",
    "kill -9 agent (secondary)",
    "kill -9 both agents",
    "partition 10s",
    "flapping link (10 x 0.5 s)",
    "disk full (primary, 32 MiB tmpfs)",
    "resources",
];

#[test]
fn chaos_suite_in_two_network_namespaces() {
    if let Some(reason) = crate::guide_netns::prerequisites_missing() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chaos_netns cannot run under CI: {reason}"
        );
        eprintln!("SKIPPED chaos_netns: {reason}");
        return;
    }
    let controlplane = controlplane_binary();
    let bin_dir = Path::new(GATEWAY).parent().expect("binary directory");
    assert_eq!(controlplane.parent(), Some(bin_dir));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/chaos");

    let run = run_script(
        Command::new(&script)
            .env("CHAOS_BIN_DIR", bin_dir)
            .env_remove("CHAOS_SOAK_SECONDS"),
        LIMIT,
        Duration::from_secs(20),
    );
    let (stdout, stderr) = (run.stdout, run.stderr);
    eprintln!(
        "{stdout}\n--- stderr ---\n{stderr}\n(scripts/chaos took {:?})",
        run.elapsed
    );
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    let status = run
        .status
        .unwrap_or_else(|| panic!("scripts/chaos ran over {LIMIT:?}\n{context}"));

    let reported: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("FAULT "))
        .collect();
    for fault in FAULTS {
        let line = reported
            .iter()
            .find(|line| line.starts_with(&format!("{fault}: ")))
            .unwrap_or_else(|| panic!("fault {fault:?} was not reported\n{context}"));
        assert!(
            line.starts_with(&format!("{fault}: PASS")),
            "fault {fault:?} failed: {line}\n{context}"
        );
    }
    assert!(
        !reported.iter().any(|line| line.contains(": FAIL")),
        "{context}"
    );
    assert!(
        status.success(),
        "scripts/chaos failed: {status}\n{context}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("RESULT: PASS")),
        "{context}"
    );

    // Everything the script created is gone.
    let pid = run.pid;
    let namespaces = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.contains(&format!("chaos-primary-{pid}"))
            && !namespaces.contains(&format!("chaos-secondary-{pid}")),
        "namespaces left behind: {namespaces}"
    );
    // Only this run's tmpfs: another checkout's suite may be running its own chaos run on the
    // same machine (a CI clone next to a developer's tests), and its mount is not ours.
    let work = stdout
        .lines()
        .find_map(|line| line.strip_prefix("(cleaned up: "))
        .and_then(|line| line.rsplit(", ").next())
        .and_then(|dir| dir.strip_suffix(')'))
        .unwrap_or_else(|| panic!("scripts/chaos did not report its cleanup\n{context}"));
    assert!(
        work.starts_with("/tmp/chaos."),
        "unexpected work directory {work:?}"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    assert!(
        !mounts
            .lines()
            .any(|l| l.starts_with("chaos-data ") && l.contains(&format!("{work}/"))),
        "this run's chaos tmpfs ({work}) is still mounted: {mounts}"
    );
}
