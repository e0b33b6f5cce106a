//! The hand-over socket's guards (issue 13 #7): both sides check the peer's uid with
//! `SO_PEERCRED` (the same uid or root), and a socket path in a directory that others can write
//! to is refused. The other uid is `nobody`, reached with setpriv(1); that needs root.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use common::*;

const NOBODY: &str = "65534";

/// These tests switch to another uid, which only root can do. Under CI they must run; a
/// developer's unprivileged run says so and skips them.
fn require_root() -> bool {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_default();
    if uid == "0" {
        require_tool("setpriv");
        require_tool("socat");
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs these tests as root (they switch to uid {NOBODY})"
    );
    eprintln!("SKIPPED: not root, cannot switch to another uid");
    false
}

fn as_nobody() -> Command {
    let mut command = Command::new("setpriv");
    command.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
    ]);
    command
}

fn handover_config(
    socket: &Path,
) -> impl FnOnce(std::net::SocketAddr, std::net::SocketAddr, &Path) -> String + '_ {
    move |listen, admin, _dir| {
        format!(
            "[[listener]]\nname = \"wan\"\naddress = \"{listen}\"\n\n[admin]\naddress = \"{admin}\"\nhandover_socket = \"{}\"\n\n[workers]\ncount = 2\n",
            socket.display()
        )
    }
}

/// Runs a gateway whose hand-over socket is `socket` (its config and log in `dir`), one that
/// must refuse to start: waits at most 20 s for it to exit, then kills it. Returns its exit
/// status, if it exited, and its log.
fn run_refused(dir: &Path, socket: &Path) -> (Option<ExitStatus>, String) {
    let config_path = dir.join("gateway.toml");
    std::fs::write(
        &config_path,
        handover_config(socket)(
            "127.0.0.1:0".parse().expect("address"),
            "127.0.0.1:0".parse().expect("address"),
            dir,
        ),
    )
    .expect("write config");
    let log = dir.join("stderr.log");
    let mut child = spawn_gateway(&config_path, &log, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn a_peer_with_another_uid_gets_no_sockets() {
    if !require_root() {
        return;
    }
    let dir = temp_dir("handover-peer");
    // Test directories are 0700; the attacker (nobody) must reach the socket file so that the
    // uid check, not the directory's mode, is what refuses it.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let socket = dir.join("handover.sock");
    let gateway = Gateway::start_from(handover_config(&socket), &[]);
    // The socket file is 0600; a lax mode (or an abstract socket) would let anyone connect,
    // and the uid check is what must still refuse.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let mut attacker = as_nobody()
        .args(["socat", "-t", "3", "-T", "10", "-"])
        .arg(format!("UNIX-CONNECT:{}", socket.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn socat as nobody");
    let mut frame = 18u32.to_be_bytes().to_vec();
    frame.extend_from_slice(b"gateway-handover/1");
    attacker
        .stdin
        .take()
        .expect("stdin")
        .write_all(&frame)
        .expect("send the protocol frame");
    let output = attacker.wait_with_output().expect("socat");
    let answer = String::from_utf8_lossy(&output.stdout);
    assert!(
        !answer.contains("listeners"),
        "a process of another uid was offered the sockets: {answer:?} ({})",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(http(gateway.admin, "GET", "/ready").expect("ready").0, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gateway.stderr().contains("uid") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        gateway.stderr().contains("uid 65534"),
        "the refusal is logged: {}",
        gateway.stderr()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_new_process_refuses_a_running_gateway_of_another_uid() {
    if !require_root() {
        return;
    }
    // The configured path is in a safe directory but leads to a socket that `nobody` listens
    // on (through a symlink), so only the uid check stands between the new process and it.
    let dir = temp_dir("handover-rogue");
    let rogue_dir = temp_dir("handover-rogue-nobody");
    Command::new("chown")
        .args([NOBODY, &rogue_dir.display().to_string()])
        .status()
        .expect("chown");
    let offer = rogue_dir.join("offer.bin");
    let body = br#"{"pid":1,"listeners":[],"admin":null,"error":null}"#;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    std::fs::write(&offer, frame).expect("write offer");
    std::fs::set_permissions(&offer, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let rogue_socket = rogue_dir.join("rogue.sock");
    let mut rogue = as_nobody()
        .args(["socat", "-u"])
        .arg(format!("OPEN:{}", offer.display()))
        .arg(format!("UNIX-LISTEN:{},fork", rogue_socket.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn socat as nobody");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !rogue_socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let socket = dir.join("handover.sock");
    std::os::unix::fs::symlink(&rogue_socket, &socket).expect("symlink");
    let (status, text) = run_refused(&dir, &socket);
    let _ = rogue.kill();
    let _ = rogue.wait();
    assert!(
        status.is_some_and(|status| !status.success()),
        "the gateway took sockets from a process of another uid: {text}"
    );
    assert!(text.contains("uid 65534"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&rogue_dir);
}

#[test]
fn a_socket_path_in_a_directory_others_can_write_is_refused() {
    let dir = temp_dir("handover-open-dir");
    let open = dir.join("open");
    std::fs::create_dir(&open).expect("mkdir");
    // World-writable and sticky, like /tmp: anyone could create the socket path first.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let (status, stderr) = run_refused(&dir, &open.join("handover.sock"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        status.is_some_and(|status| !status.success()),
        "started: {stderr}"
    );
    assert!(stderr.contains("writable by others"), "{stderr}");
}
