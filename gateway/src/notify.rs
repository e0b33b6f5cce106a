//! The systemd notification protocol (sd_notify(3)), written by hand: one datagram of
//! `KEY=VALUE` lines to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the
//! abstract namespace). Without that variable every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    target: Option<Target>,
    /// `$WATCHDOG_USEC` when it is meant for this process (sd_watchdog_enabled(3)).
    pub watchdog: Option<Duration>,
}

enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Read the environment once at start.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|value| {
            use std::os::unix::ffi::OsStrExt;
            let bytes = value.as_bytes();
            match bytes.first() {
                Some(b'@') => Some(Target::Abstract(bytes[1..].to_vec())),
                Some(b'/') => Some(Target::Path(value.into())),
                _ => None,
            }
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|&usec| usec > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Send one notification (several `KEY=VALUE` lines); failures are logged, never fatal.
    pub fn send(&self, state: &str) {
        let Some(target) = &self.target else {
            return;
        };
        if let Err(error) = send_to(target, state) {
            tracing::warn!(%error, state, "sd_notify failed");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!(
            "READY=1\nSTATUS={status}\nMAINPID={}",
            std::process::id()
        ));
    }

    /// `RELOADING=1` with the monotonic timestamp systemd requires for `Type=notify-reload`.
    pub fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            crate::sys::monotonic_micros()
        ));
    }

    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

fn send_to(target: &Target, state: &str) -> std::io::Result<usize> {
    let socket = UnixDatagram::unbound()?;
    match target {
        Target::Path(path) => socket.send_to(state.as_bytes(), path),
        Target::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &address)
        }
    }
}
