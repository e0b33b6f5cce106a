//! Socket activation for test children: the test binds and listens on port 0, registers the
//! port it got, and starts the child with the listening socket passed as descriptor 3, 4, …
//! (systemd's `sd_listen_fds(3)` protocol: `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`).
//! The port is never free between the registration and the child's use of it, so no other
//! process can take it in between.
//!
//! This module alone in the harness is `unsafe`: `pre_exec` runs in the forked child, where
//! only async-signal-safe calls are allowed, and moving descriptors to fixed numbers needs
//! `fcntl` and `dup2` there. Setting `LISTEN_PID` needs the child's own pid, which only the
//! child knows before `exec`; `setenv` after `fork` in a multi-threaded test is not safe, so a
//! shell does it instead (`LISTEN_PID=$$ exec …`: `exec` keeps the shell's pid), much as
//! `systemd-socket-activate` sets it in its forked child before `execve`.
#![allow(unsafe_code)]

use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// More descriptors than any test passes; a fixed bound lets the forked child work in an
/// array without allocating.
const MAX_PASSED: usize = 16;

/// A listening socket on 127.0.0.1 with a port the kernel chose, to register and then pass.
pub fn listening() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind a listener on 127.0.0.1:0")
}

/// The port of a listener from [`listening`].
pub fn port(listener: &TcpListener) -> u16 {
    listener
        .local_addr()
        .expect("a bound listener's address")
        .port()
}

/// A command that runs `program` with `listeners` passed by socket activation, in order, as
/// descriptors 3, 4, … named in `LISTEN_FDNAMES`. Add arguments as to `Command::new(program)`.
/// The listeners must stay open until the command has been spawned; the test may close its
/// copies after that.
pub fn command(program: &Path, listeners: &[(&str, &TcpListener)]) -> Command {
    assert!(
        listeners.len() <= MAX_PASSED,
        "at most {MAX_PASSED} passed sockets"
    );
    let names: Vec<&str> = listeners.iter().map(|(name, _)| *name).collect();
    let sources: Vec<RawFd> = listeners
        .iter()
        .map(|(_, listener)| listener.as_raw_fd())
        .collect();
    let count = RawFd::try_from(sources.len()).expect("a small count");
    let mut command = Command::new("/bin/sh");
    // `$0` is the program, `$@` the arguments the caller adds.
    command
        .arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(program)
        .env("LISTEN_FDS", sources.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"));
    let move_descriptors = move || -> std::io::Result<()> {
        // First copy every source above the target range (close-on-exec, so the copies
        // vanish at exec), so that moving one into place never overwrites another source.
        let mut above = [0 as RawFd; MAX_PASSED];
        for (slot, source) in above.iter_mut().zip(&sources) {
            // SAFETY: fcntl with F_DUPFD_CLOEXEC is async-signal-safe and passes no memory.
            *slot = unsafe { libc::fcntl(*source, libc::F_DUPFD_CLOEXEC, FIRST_FD + count) };
            if *slot < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // Then put each at its number; dup2's new descriptor is not close-on-exec, so the
        // program inherits it (and whatever held that number before is closed).
        for (target, copy) in (FIRST_FD..).zip(&above[..sources.len()]) {
            // SAFETY: dup2 is async-signal-safe and passes no memory.
            if unsafe { libc::dup2(*copy, target) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec and calls only fcntl and dup2
    // (async-signal-safe), writing to a fixed-size array on its stack: no allocation, no lock.
    unsafe {
        command.pre_exec(move_descriptors);
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The child sees the listeners at 3 and 4 in order, `LISTEN_PID` is its own pid (the
    /// pid the test knows it by), and the temporary copies made on the way are not inherited.
    #[test]
    fn the_child_gets_the_listeners_from_three_and_its_own_pid() {
        let (first, second) = (listening(), listening());
        // The child (a shell, exec'd in place by the wrapper) reports what it inherited;
        // /proc/self/fd/N names a socket by its inode, as /proc/net/tcp lists it.
        let script = "echo \"$LISTEN_PID $$ $LISTEN_FDS $LISTEN_FDNAMES\"; \
                      readlink /proc/$$/fd/3 /proc/$$/fd/4; \
                      for fd in /proc/$$/fd/*; do readlink \"$fd\"; done";
        let output = command(Path::new("/bin/sh"), &[("one", &first), ("two", &second)])
            .args(["-c", script])
            .output()
            .expect("run the child");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() > 3, "{text}");
        let words: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(words.len(), 4, "{text}");
        assert_eq!(words[0], words[1], "LISTEN_PID is the child's own pid");
        assert_eq!(&words[2..], ["2", "one:two"]);
        let inode = |listener: &TcpListener| {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd()))
                .expect("our own descriptor");
            link.to_string_lossy().into_owned()
        };
        assert_eq!(lines[1], inode(&first), "descriptor 3: {text}");
        assert_eq!(lines[2], inode(&second), "descriptor 4: {text}");
        // No stray copy of a listener is left open: each socket once among all descriptors.
        for listener in [&first, &second] {
            let copies = lines[3..]
                .iter()
                .filter(|link| **link == inode(listener))
                .count();
            assert_eq!(copies, 1, "copies of {}: {text}", inode(listener));
        }
    }
}
