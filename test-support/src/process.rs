//! Child processes: found beside the test executable, killed on drop, and asked for the
//! addresses they bound (every child binds port 0 and reports; no test picks a port).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::dir::TempDir;

/// The binary `name` of the workspace, beside the running test executable
/// (`target/<profile>/deps/test-…` → `target/<profile>/name`). `cargo test --workspace`
/// builds every package's binaries; a narrower `cargo test -p` may not, hence the message.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable is in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo test --workspace` does, or `cargo build -p {}`)",
        path.display(),
        package_of(name)
    );
    path
}

fn package_of(binary: &str) -> &str {
    match binary {
        "gateway" => "gateway-cli",
        other => other,
    }
}

/// A child process killed (and reaped) on drop, with the temporary directory it works in.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
    dir: Option<TempDir>,
}

impl Proc {
    pub fn spawn(name: &'static str, command: &mut Command) -> Proc {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            child,
            name,
            dir: None,
        }
    }

    /// Keep `dir` until the process is gone (then remove it).
    pub fn owning(mut self, dir: TempDir) -> Proc {
        self.dir = Some(dir);
        self
    }

    pub fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal);
    }

    /// Wait for exit up to `limit`; the exit status if it exited.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send a signal by name (`TERM`, `HUP`, `USR1`, ...) with kill(1).
pub fn send_signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// Read `stdout` until a line accepted by `last` has arrived, at most `limit`, and return the
/// lines accepted by `wanted` (`last` included). The rest of the output is drained in the
/// background so the child never blocks on a full pipe.
pub fn read_lines(
    stdout: impl std::io::Read + Send + 'static,
    limit: Duration,
    wanted: impl Fn(&str) -> bool + Send + 'static,
    last: impl Fn(&str) -> bool + Send + 'static,
) -> Result<Vec<String>, String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let mut done = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if done => {}
                Ok(_) => {
                    let text = line.trim_end().to_owned();
                    done = last(&text);
                    // A send fails only when the reader gave up; draining goes on.
                    if wanted(&text) || done {
                        let _ = tx.send((text, done));
                    }
                }
            }
        }
    });
    let deadline = Instant::now() + limit;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((line, done)) => {
                lines.push(line);
                if done {
                    return Ok(lines);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!("no final line within {limit:?}; got {lines:?}"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(format!("output ended before the final line; got {lines:?}"))
            }
        }
    }
}
