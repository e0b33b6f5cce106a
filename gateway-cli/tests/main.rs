//! The gateway's integration tests, as one test binary: each file of this folder is a module
//! here (with `autotests = false` in Cargo.toml), so the workspace links one binary instead
//! of a dozen and their tests share one parallel run. Each file keeps its own `mod common;`
//! (a `#[path]` module resolves its submodules beside it), so a file is written as if it
//! were its own test crate. A new file must be listed here; `every_test_file_is_listed`
//! fails otherwise, so none is silently left out.
// Each file uses a different part of the harness. Each file's `mod common;` / `mod
// mesh_support;` loads the same few lines of re-exports from test-support; loading them once
// per file keeps every file self-contained.
#![allow(dead_code, unused_imports, clippy::duplicate_mod)]

#[path = "chaos_netns.rs"]
mod chaos_netns;
#[path = "guide_netns.rs"]
mod guide_netns;
#[path = "mesh_cp_failover.rs"]
mod mesh_cp_failover;
#[path = "mesh_failover.rs"]
mod mesh_failover;
#[path = "mesh_federation.rs"]
mod mesh_federation;
#[path = "mesh_gateway.rs"]
mod mesh_gateway;
#[path = "mesh_https.rs"]
mod mesh_https;
#[path = "mesh_reload.rs"]
mod mesh_reload;
#[path = "ops_access_log.rs"]
mod ops_access_log;
#[path = "ops_access_log_dropped.rs"]
mod ops_access_log_dropped;
#[path = "ops_admin.rs"]
mod ops_admin;
#[path = "ops_documented.rs"]
mod ops_documented;
#[path = "ops_drain.rs"]
mod ops_drain;
#[path = "ops_handover.rs"]
mod ops_handover;
#[path = "ops_reload.rs"]
mod ops_reload;
#[path = "ops_watchdog.rs"]
mod ops_watchdog;
#[path = "proxy.rs"]
mod proxy;
#[path = "real_clients.rs"]
mod real_clients;
#[path = "resilience_emfile.rs"]
mod resilience_emfile;
#[path = "resilience_stall.rs"]
mod resilience_stall;
#[path = "security_admin.rs"]
mod security_admin;
#[path = "security_handover.rs"]
mod security_handover;
#[path = "sidecar_mtls.rs"]
mod sidecar_mtls;
#[path = "sidecar_redact.rs"]
mod sidecar_redact;
#[path = "sidecar_renewal.rs"]
mod sidecar_renewal;

#[test]
fn every_test_file_is_listed() {
    let listed = include_str!("main.rs");
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&folder).expect("tests folder") {
        let name = entry.expect("entry").file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".rs") && name != "main.rs" && !listed.contains(&format!("\"{name}\"")) {
            missing.push(name.into_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "not listed in tests/main.rs: {missing:?}"
    );
}
