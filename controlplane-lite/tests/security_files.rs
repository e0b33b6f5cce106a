//! Security: the data directory holds the CA's private key and every token secret. A fresh one
//! is created 0700 with `state.redb` 0600, and the agent refuses to start on one that other
//! users can read.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{Agent, TempDir, BINARY};

/// These tests are about redb's own file (its disk errors, checksums, permissions): they keep
/// `-store redb` when the suite runs on etcd (`MESHGW_TEST_STORE=etcd`).
const REDB: &[&str] = &["-store", "redb"];

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn fresh_data_dir_is_private() {
    let dir = TempDir::new("modes");
    let data = dir.path().join("data");
    let agent = Agent::start_in(&data, "primary", REDB);
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("state.redb")), 0o600);
    drop(agent);
}

/// Runs the agent on `data`; it must exit within 30 s with an error naming the problem.
fn refused(data: &Path) -> String {
    common::refused_start(
        Command::new(BINARY)
            .args([
                "agent",
                "-datacenter",
                "primary",
                "-http-addr",
                "127.0.0.1:0",
            ])
            .arg("-data-dir")
            .arg(data),
    )
}

#[test]
fn refuses_group_or_world_readable_data() {
    let dir = TempDir::new("modes-refuse");
    let data = dir.path().join("data");
    drop(Agent::start_in(&data, "primary", REDB));

    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let stderr = refused(&data);
    assert!(
        stderr.contains("refusing to start") && stderr.contains("chmod 700"),
        "{stderr}"
    );

    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::fs::set_permissions(
        data.join("state.redb"),
        std::fs::Permissions::from_mode(0o640),
    )
    .expect("chmod");
    let stderr = refused(&data);
    assert!(
        stderr.contains("refusing to start") && stderr.contains("chmod 600"),
        "{stderr}"
    );
}
