//! Issue 14: the store's resilience. An empty state file is refused rather than starting a new
//! datacenter; `snapshot save|restore` brings a datacenter back from a backup.

mod common;

use std::process::Command;

use common::{refused_start, Agent, TempDir};

/// These tests are about redb's own file (its disk errors, checksums, permissions): they keep
/// `-store redb` when the suite runs on etcd (`MESHGW_TEST_STORE=etcd`).
const REDB: &[&str] = &["-store", "redb"];

const BINARY: &str = env!("CARGO_BIN_EXE_controlplane-lite");

fn trust_domain(agent: &Agent, token: &str) -> String {
    let roots = agent.get("/v1/connect/ca/roots", Some(token)).json();
    roots["TrustDomain"]
        .as_str()
        .unwrap_or_else(|| panic!("no TrustDomain in {roots}"))
        .to_owned()
}

#[test]
fn empty_state_file_is_refused_and_a_snapshot_restores_the_datacenter() {
    let dir = TempDir::new("resilience-snapshot");
    let data = dir.path().join("data");
    let backup = dir.path().join("backup.snap");
    let deny = ["-acl-default-policy", "deny", "-store", "redb"];
    let (token, domain) = {
        let agent = Agent::start_in(&data, "primary", &deny);
        let token = agent.bootstrap();
        let created = agent.request(
            "POST",
            "/v1/connect/intentions",
            Some(&token),
            Some(r#"{"SourceName":"web","DestinationName":"db","Action":"deny"}"#),
        );
        assert_eq!(created.status, 200, "{}", created.text);
        // Only a management token may take a snapshot: it holds every secret.
        let (code, _, stderr) = agent.cli(&["snapshot", "save", "x.snap"], None);
        assert_ne!(code, 0);
        assert!(stderr.contains("403"), "{stderr}");
        let out = agent.cli_ok(
            &["snapshot", "save", backup.to_str().expect("utf-8")],
            Some(&token),
        );
        assert!(out.contains("Saved and verified snapshot"), "{out}");
        let domain = trust_domain(&agent, &token);
        (token, domain)
    };
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "a snapshot holds the CA key");
    }

    // The state file is truncated (a bad disk, an operator's mistake): refuse, never a new
    // datacenter with a new CA and an open ACL bootstrap.
    let state = data.join("state.redb");
    std::fs::write(&state, b"").expect("truncate");
    let stderr = refused_start(
        Command::new(BINARY)
            .args(["agent", "-http-addr", "127.0.0.1:0", "-data-dir"])
            .arg(&data),
    );
    assert!(stderr.contains("is empty (0 bytes)"), "{stderr}");
    assert_eq!(std::fs::metadata(&state).expect("stat").len(), 0);

    // Recovery as the message says: move the file aside, start, restore the backup.
    std::fs::rename(&state, data.join("state.redb.bad")).expect("move aside");
    let agent = Agent::start_in(&data, "primary", &deny);
    let fresh = agent.bootstrap();
    assert_ne!(
        trust_domain(&agent, &fresh),
        domain,
        "a new CA before restore"
    );

    // A changed byte is refused by the agent itself, not only by the CLI.
    let mut tampered = std::fs::read(&backup).expect("read backup");
    let at = tampered.len() - 3;
    tampered[at] ^= 0x01;
    let answer = agent.request(
        "PUT",
        "/v1/snapshot",
        Some(&fresh),
        Some(&String::from_utf8_lossy(&tampered)),
    );
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert!(answer.text.contains("checksum mismatch"), "{}", answer.text);

    let out = agent.cli_ok(
        &["snapshot", "restore", backup.to_str().expect("utf-8")],
        Some(&fresh),
    );
    assert!(out.contains("Restored snapshot"), "{out}");
    assert_eq!(trust_domain(&agent, &token), domain, "the old CA is back");
    let intentions = agent.get("/v1/connect/intentions", Some(&token)).json();
    let sources: Vec<&str> = intentions
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|i| i["SourceName"].as_str())
        .collect();
    assert_eq!(sources, ["web"], "{intentions}");
    // The fresh datacenter's bootstrap token went with the state it belonged to.
    assert_eq!(agent.get("/v1/acl/token/self", Some(&fresh)).status, 403);
}

/// Stops an agent with SIGTERM (a clean shutdown, so redb closes the file) and waits for it.
fn stop(agent: &mut Agent) {
    let pid = agent.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while agent.child.try_wait().expect("wait").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "agent did not stop in 30s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_byte_changed_on_disk_is_counted_and_never_served() {
    let dir = TempDir::new("resilience-corrupt");
    let data = dir.path().join("data");
    let id = {
        let mut agent = Agent::start_in(&data, "primary", REDB);
        let created = agent.request(
            "POST",
            "/v1/connect/intentions",
            None,
            Some(r#"{"SourceName":"src-r5-0-0","DestinationName":"db","Action":"deny"}"#),
        );
        assert_eq!(created.status, 200, "{}", created.text);
        stop(&mut agent);
        created.json()["ID"].as_str().expect("ID").to_owned()
    };
    // The probe's corruption: `src-r5-0-0` becomes `src-r5-0-9` wherever the file holds it.
    let state = data.join("state.redb");
    let mut bytes = std::fs::read(&state).expect("read state");
    let needle = b"src-r5-0-0";
    let mut flipped = 0;
    for at in 0..bytes.len().saturating_sub(needle.len()) {
        if &bytes[at..at + needle.len()] == needle {
            bytes[at + needle.len() - 1] = b'9';
            flipped += 1;
        }
    }
    assert!(flipped > 0, "the intention is not in the file as text");
    std::fs::write(&state, &bytes).expect("write state");

    let agent = Agent::start_in(&data, "primary", REDB);
    let read = agent.get(&format!("/v1/connect/intentions/{id}"), None);
    assert_eq!(read.status, 500, "served a changed record: {}", read.text);
    assert!(read.text.contains("checksum mismatch"), "{}", read.text);
    assert!(!read.text.contains("src-r5-0-9"), "{}", read.text);
    // Lists fail whole: leaving out a deny intention would allow what it denies.
    let list = agent.get("/v1/connect/intentions", None);
    assert_eq!(list.status, 500, "{}", list.text);
    let check = agent.get(
        "/v1/connect/intentions/check?source=src-r5-0-9&destination=db",
        None,
    );
    assert_eq!(check.status, 500, "{}", check.text);
    let metrics = agent.get("/metrics", None).text;
    let count: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("controlplane_store_corrupt_records_total{table=\"intentions\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no corrupt-record count in {metrics}"));
    assert!(count >= 3, "{count}");
}

/// A small tmpfs mounted for one test (root only), unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a `size` tmpfs under `dir`; `None` (after saying why) if mounting is impossible
    /// here, which fails the test under `CI=true` instead.
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        let target = dir.join("tmpfs");
        std::fs::create_dir_all(&target).expect("mkdir");
        let output = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&target)
            .output();
        match output {
            Ok(out) if out.status.success() => Some(Tmpfs(target)),
            other => {
                let why = match other {
                    Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "cannot mount a tmpfs for the disk-full test (needs root): {why}"
                );
                eprintln!("SKIPPED: cannot mount a tmpfs (needs root): {why}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the file system holding `path` until it refuses more bytes (bounded by `limit`).
fn fill(path: &std::path::Path, limit: usize) -> usize {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0x42u8; 4096];
    let mut written = 0;
    while written < limit {
        match file.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n,
        }
    }
    let _ = file.sync_all();
    written
}

fn register(agent: &Agent, name: &str) -> common::Answer {
    let padding = "p".repeat(2048);
    agent.put(
        "/v1/agent/service/register",
        None,
        &format!(r#"{{"Name":"{name}","Port":80,"Meta":{{"pad":"{padding}"}}}}"#),
    )
}

fn metric(agent: &Agent, name: &str) -> String {
    let text = agent.get("/metrics", None).text;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .to_owned()
}

#[test]
fn disk_full_makes_the_store_read_only_until_space_is_freed() {
    let dir = TempDir::new("resilience-disk-full");
    let Some(tmpfs) = Tmpfs::mount(dir.path(), "4M") else {
        return;
    };
    let data = tmpfs.0.join("data");
    let mut agent = Agent::start_in(&data, "primary", REDB);
    assert_eq!(metric(&agent, "controlplane_store_healthy"), "1");
    let filler = tmpfs.0.join("filler");
    fill(&filler, 8 << 20);

    // Writes until the disk refuses one (redb may still reuse pages it already owns).
    let mut acknowledged = Vec::new();
    let mut refused = None;
    for n in 0..2000 {
        let name = format!("svc-{n}");
        let answer = register(&agent, &name);
        if answer.status == 200 {
            acknowledged.push(name);
        } else {
            refused = Some(answer);
            break;
        }
    }
    let refused = refused.expect("the full disk never refused a write");
    assert_eq!(refused.status, 500, "{}", refused.text);
    assert!(
        refused.text.contains("No space left on device"),
        "the cause is named: {}",
        refused.text
    );
    assert_eq!(metric(&agent, "controlplane_store_healthy"), "0");
    let leader = agent.get("/v1/status/leader", None).json();
    assert_eq!(
        leader,
        serde_json::json!(""),
        "no leader while writes cannot commit"
    );
    let stats = agent.get("/v1/agent/self", None).json();
    assert_eq!(stats["Stats"]["store"]["read_only"], "true", "{stats}");
    // Still full: still refused, still naming the cause.
    let again = register(&agent, "while-full");
    assert_eq!(again.status, 500, "{}", again.text);
    assert!(
        again.text.contains("No space left on device"),
        "{}",
        again.text
    );

    // Free the space: the store recovers on its own, without a restart or a write.
    std::fs::remove_file(&filler).expect("free space");
    eventually(
        std::time::Duration::from_secs(20),
        "store healthy again without a write",
        || metric(&agent, "controlplane_store_healthy") == "1",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let answer = register(&agent, "after-free");
        if answer.status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "writes did not resume within 20 s: {}",
            answer.text
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    acknowledged.push("after-free".to_owned());
    assert_eq!(metric(&agent, "controlplane_store_healthy"), "1");
    assert_ne!(
        agent.get("/v1/status/leader", None).json(),
        serde_json::json!("")
    );
    let services = agent.get("/v1/catalog/services", None).json();
    for name in &acknowledged {
        assert!(services.get(name).is_some(), "{name} lost before restart");
    }
    assert!(
        services.get("while-full").is_none(),
        "a refused write was stored"
    );

    // And every acknowledged write is still there after a restart.
    agent.kill9();
    drop(agent);
    let agent = Agent::start_in(&data, "primary", REDB);
    let services = agent.get("/v1/catalog/services", None).json();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|name| services.get(name.as_str()).is_none())
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    drop(agent);
    drop(tmpfs);
}

/// Polls `condition` every 100 ms until it holds or `bound` passes (then fails naming `what`).
fn eventually(bound: std::time::Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + bound;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {bound:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn gauge(agent: &Agent, line_prefix: &str) -> Option<f64> {
    let text = agent.get("/metrics", None).text;
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_silent_partition_surfaces_within_seconds() {
    let (primary_dir, secondary_dir) = (
        TempDir::new("resilience-part-p"),
        TempDir::new("resilience-part-s"),
    );
    let primary = Agent::start_in(primary_dir.path(), "primary", &[]);
    let relay = common::Relay::start(&primary.address);
    let secondary = Agent::start_in(
        secondary_dir.path(),
        "secondary",
        &[
            "-primary-datacenter",
            "primary",
            "-primary-address",
            &relay.address,
            "-primary-insecure-http",
        ],
    );
    let status = "controlplane_replication_status{type=\"intentions\"} ";
    let contact = "controlplane_replication_last_contact_seconds ";
    eventually(
        std::time::Duration::from_secs(30),
        "replication healthy",
        || gauge(&secondary, status) == Some(1.0),
    );
    let intention = |source: &str| {
        format!(r#"{{"SourceName":"{source}","DestinationName":"db","Action":"deny"}}"#)
    };
    let forwarded = secondary.request(
        "POST",
        "/v1/connect/intentions",
        None,
        Some(&intention("before")),
    );
    assert_eq!(forwarded.status, 200, "{}", forwarded.text);
    // Idle but connected for longer than the staleness bound: the heartbeat keeps the
    // contact fresh, so no false alarm while replication's blocking query simply waits.
    std::thread::sleep(std::time::Duration::from_secs(12));
    assert_eq!(
        gauge(&secondary, status),
        Some(1.0),
        "false alarm while idle"
    );
    assert!(gauge(&secondary, contact).is_some_and(|age| age < 10.0));

    relay.partition(true);
    let started = std::time::Instant::now();
    let forwarded = secondary.request(
        "POST",
        "/v1/connect/intentions",
        None,
        Some(&intention("during")),
    );
    let write_took = started.elapsed();
    assert_eq!(forwarded.status, 503, "{}", forwarded.text);
    assert!(
        forwarded.text.contains("may be partitioned"),
        "the error names the timeout: {}",
        forwarded.text
    );
    let started = std::time::Instant::now();
    let read = secondary.get("/v1/catalog/services?dc=primary", None);
    let read_took = started.elapsed();
    assert_eq!(read.status, 503, "{}", read.text);
    assert!(read.text.contains("may be partitioned"), "{}", read.text);
    eprintln!(
        "partitioned: forwarded write failed after {write_took:?}, ?dc= read after {read_took:?}"
    );

    // Replication's blocking query hangs on the partition for its whole wait (60 s); the
    // heartbeat's silence turns the health red long before that.
    let started = std::time::Instant::now();
    eventually(
        std::time::Duration::from_secs(30),
        "replication reported failing",
        || gauge(&secondary, status) == Some(0.0),
    );
    eprintln!(
        "partitioned: replication status 0 after {:?}",
        started.elapsed()
    );
    assert!(gauge(&secondary, contact).is_some_and(|age| age > 10.0));
    let stats = secondary.get("/v1/agent/self", None).json();
    assert_eq!(stats["Stats"]["replication"]["healthy"], "false", "{stats}");

    relay.partition(false);
    eventually(
        std::time::Duration::from_secs(30),
        "healthy after healing",
        || gauge(&secondary, status) == Some(1.0),
    );
    eventually(
        std::time::Duration::from_secs(30),
        "forwarded writes work after healing",
        || {
            secondary
                .request(
                    "POST",
                    "/v1/connect/intentions",
                    None,
                    Some(&intention("after")),
                )
                .status
                == 200
        },
    );
}
