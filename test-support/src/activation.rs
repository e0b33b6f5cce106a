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
