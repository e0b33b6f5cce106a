//! Socket activation: listening sockets handed to the sidecar by whoever started it, with
//! systemd's `sd_listen_fds(3)` protocol, used instead of binding.
//!
//! The starter (a systemd socket unit, `systemd-socket-activate`, or a test) binds and
//! listens, then starts the sidecar with the sockets as descriptors 3, 4, … and sets
//! `LISTEN_FDS` (how many), `LISTEN_PID` (the sidecar's own pid, so that a child that
//! inherits the environment does not take them too) and optionally `LISTEN_FDNAMES`
//! (colon-separated names). The sidecar uses an inherited socket for a listener whose
//! address equals the socket's local address (the public listener, or an upstream's
//! `local_bind_address:local_bind_port`) and binds every other listener itself. A port that
//! is bound before the sidecar starts cannot be taken by another process in between, which a
//! registration naming the port otherwise risks.
//!
//! [`plan`] reads the variables (sans-IO); [`Inherited`] claims the descriptors it names
//! (through the crate's one `unsafe` module, `sys`) and hands them out by address.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Mutex;

/// The first passed descriptor (`SD_LISTEN_FDS_START`): 0, 1 and 2 stay stdio.
pub const FIRST_FD: RawFd = 3;

/// At most this many descriptors are accepted: a sidecar has one public listener and one per
/// upstream, and a count beyond any real configuration is a broken environment, not a plan.
pub const MAX_FDS: usize = 256;

/// The environment variables of the protocol, unset once read so that no child inherits them.
pub const VARIABLES: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// Why the activation variables were refused: the starter's fault, every one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_PID` is not a process id.
    #[error("LISTEN_PID {0:?} is not a process id")]
    BadPid(String),
    /// `LISTEN_FDS` is not a number.
    #[error("LISTEN_FDS {0:?} is not a descriptor count")]
    BadCount(String),
    /// `LISTEN_FDS` names more descriptors than any sidecar could use.
    #[error("LISTEN_FDS {0} is more than {MAX_FDS} descriptors")]
    TooMany(usize),
    /// `LISTEN_FDNAMES` does not name each descriptor once (systemd refuses this too).
    #[error("LISTEN_FDNAMES has {names} names for {count} descriptors")]
    NameCount { names: usize, count: usize },
}

/// What the activation variables say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No `LISTEN_FDS` or no `LISTEN_PID`: nothing was passed; bind everything.
    Nothing,
    /// The variables are meant for another process (`LISTEN_PID`): a parent that passed them
    /// on by mistake. Its descriptors are not ours to take.
    NotOurs { listen_pid: u32 },
    /// These descriptors are ours.
    Passed(Vec<Passed>),
}

/// One passed descriptor and its name (`LISTEN_FDNAMES`; systemd says `unknown` without it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passed {
    pub fd: RawFd,
    pub name: String,
}

/// Read the protocol's variables, as `sd_listen_fds_with_names(3)` does: `LISTEN_PID` must
/// be `our_pid`, `LISTEN_FDS` counts descriptors from [`FIRST_FD`], `LISTEN_FDNAMES` (if
/// set) has one name per descriptor.
pub fn plan(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    our_pid: u32,
) -> Result<Plan, ActivationError> {
    let (Some(listen_pid), Some(listen_fds)) = (listen_pid, listen_fds) else {
        return Ok(Plan::Nothing);
    };
    let listen_pid: u32 = listen_pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(bounded(listen_pid)))?;
    if listen_pid != our_pid {
        return Ok(Plan::NotOurs { listen_pid });
    }
    let count: usize = listen_fds
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(bounded(listen_fds)))?;
    if count > MAX_FDS {
        return Err(ActivationError::TooMany(count));
    }
    let names: Vec<String> = match listen_fdnames {
        Some(names) => {
            let names: Vec<String> = names.split(':').map(str::to_owned).collect();
            if names.len() != count {
                return Err(ActivationError::NameCount {
                    names: names.len(),
                    count,
                });
            }
            names
        }
        None => vec!["unknown".to_owned(); count],
    };
    Ok(Plan::Passed(
        (FIRST_FD..)
            .zip(names)
            .map(|(fd, name)| Passed { fd, name })
            .collect(),
    ))
}

/// A value from the environment, cut short for an error message.
fn bounded(value: &str) -> String {
    value.chars().take(32).collect()
}

/// An inherited listening TCP socket and its address.
#[derive(Debug)]
struct Listener {
    name: String,
    address: SocketAddr,
    socket: std::net::TcpListener,
}

/// The listening sockets this process inherited and has not used yet. Upstreams added later
/// (a configuration change) can still take theirs.
#[derive(Debug, Default)]
pub struct Inherited {
    listeners: Mutex<Vec<Listener>>,
}

impl Inherited {
    /// Claim what the environment passes to this process, then unset the variables so that no
    /// child inherits them. Every problem is logged and leaves the sidecar binding its
    /// listeners itself; none is fatal.
    ///
    /// Call this before the process starts threads (the variables are unset) or opens any
    /// descriptor of its own (descriptors from 3 are assumed to be the ones passed).
    pub fn from_environment() -> Inherited {
        let variable = |name: &str| std::env::var(name).ok();
        let (pid, fds, names) = (
            variable(VARIABLES[0]),
            variable(VARIABLES[1]),
            variable(VARIABLES[2]),
        );
        for name in VARIABLES {
            std::env::remove_var(name);
        }
        let passed = match plan(
            pid.as_deref(),
            fds.as_deref(),
            names.as_deref(),
            std::process::id(),
        ) {
            Ok(Plan::Nothing) => return Inherited::default(),
            Ok(Plan::NotOurs { listen_pid }) => {
                tracing::warn!(
                    listen_pid,
                    our_pid = std::process::id(),
                    "socket activation: LISTEN_PID is another process; ignoring LISTEN_FDS and binding every listener"
                );
                return Inherited::default();
            }
            Ok(Plan::Passed(passed)) => passed,
            Err(error) => {
                tracing::warn!(%error, "socket activation: ignoring the LISTEN_* variables and binding every listener");
                return Inherited::default();
            }
        };
        let mut listeners = Vec::new();
        for Passed { fd, name } in passed {
            match crate::sys::inherited_listener(fd) {
                Ok((socket, address)) => {
                    tracing::info!(fd, %name, %address, "socket activation: inherited a listening socket");
                    listeners.push(Listener {
                        name,
                        address,
                        socket,
                    });
                }
                Err(refusal) => tracing::warn!(
                    fd,
                    %name,
                    %refusal,
                    "socket activation: refusing a passed descriptor that is not a listening TCP socket"
                ),
            }
        }
        Inherited {
            listeners: Mutex::new(listeners),
        }
    }

    /// Take the inherited socket listening on exactly `address`, if there is one, ready for
    /// tokio (non-blocking).
    pub fn take(&self, address: SocketAddr) -> Option<std::net::TcpListener> {
        let mut listeners = match self.listeners.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let index = listeners
            .iter()
            .position(|listener| listener.address == address)?;
        let listener = listeners.swap_remove(index);
        if let Err(error) = listener.socket.set_nonblocking(true) {
            tracing::warn!(%error, %address, name = %listener.name, "socket activation: cannot make the inherited socket non-blocking; binding instead");
            return None;
        }
        tracing::info!(%address, name = %listener.name, "socket activation: using the inherited socket instead of binding");
        Some(listener.socket)
    }

    /// Log the inherited sockets no listener has taken (yet): a starter that passed a socket
    /// for an address the configuration does not name should hear about it.
    pub fn report_unused(&self) {
        let listeners = match self.listeners.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        for listener in listeners.iter() {
            tracing::warn!(
                address = %listener.address,
                name = %listener.name,
                "socket activation: no listener is configured on this inherited socket's address (kept for upstreams added later)"
            );
        }
    }
}

/// A tokio listener on `address`: the inherited socket for it if there is one, otherwise a
/// new bind.
pub async fn listen(
    inherited: &Inherited,
    address: SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    match inherited.take(address) {
        Some(socket) => tokio::net::TcpListener::from_std(socket),
        None => tokio::net::TcpListener::bind(address).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(fds: &[(RawFd, &str)]) -> Plan {
        Plan::Passed(
            fds.iter()
                .map(|(fd, name)| Passed {
                    fd: *fd,
                    name: (*name).to_owned(),
                })
                .collect(),
        )
    }

    #[test]
    fn without_both_variables_nothing_was_passed() {
        assert_eq!(plan(None, None, None, 42), Ok(Plan::Nothing));
        assert_eq!(plan(Some("42"), None, None, 42), Ok(Plan::Nothing));
        assert_eq!(plan(None, Some("2"), None, 42), Ok(Plan::Nothing));
    }

    #[test]
    fn descriptors_count_from_three_and_take_their_names() {
        assert_eq!(
            plan(Some("42"), Some("2"), None, 42),
            Ok(passed(&[(3, "unknown"), (4, "unknown")]))
        );
        assert_eq!(
            plan(Some("42"), Some("2"), Some("public:upstream"), 42),
            Ok(passed(&[(3, "public"), (4, "upstream")]))
        );
        assert_eq!(plan(Some("42"), Some("0"), None, 42), Ok(passed(&[])));
    }

    #[test]
    fn another_process_pid_means_the_descriptors_are_not_ours() {
        assert_eq!(
            plan(Some("41"), Some("2"), None, 42),
            Ok(Plan::NotOurs { listen_pid: 41 })
        );
        // Even a malformed count is not our business then.
        assert_eq!(
            plan(Some("41"), Some("many"), None, 42),
            Ok(Plan::NotOurs { listen_pid: 41 })
        );
    }

    #[test]
    fn malformed_variables_are_refused_with_the_value() {
        assert_eq!(
            plan(Some("self"), Some("1"), None, 42),
            Err(ActivationError::BadPid("self".to_owned()))
        );
        assert_eq!(
            plan(Some("-1"), Some("1"), None, 42),
            Err(ActivationError::BadPid("-1".to_owned()))
        );
        assert_eq!(
            plan(Some("42"), Some("-1"), None, 42),
            Err(ActivationError::BadCount("-1".to_owned()))
        );
        assert_eq!(
            plan(Some("42"), Some("100000"), None, 42),
            Err(ActivationError::TooMany(100_000))
        );
        assert_eq!(
            plan(Some("42"), Some("2"), Some("public"), 42),
            Err(ActivationError::NameCount { names: 1, count: 2 })
        );
        let long = "9".repeat(1000);
        assert!(matches!(
            plan(Some(&long), Some("1"), None, 42),
            Err(ActivationError::BadPid(value)) if value.len() == 32
        ));
    }
}
