//! The sidecar's one module that touches raw descriptors: taking ownership of a socket passed
//! by socket activation (see `activation`). Everything else in the crate is safe Rust; the
//! workspace denies `unsafe_code`, and this module alone opts out, one SAFETY comment per
//! block. It is the sidecar's own because the gateway's `sys` lives in the `gateway` package,
//! which the sidecar does not (and should not) depend on.
#![allow(unsafe_code)]

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};

/// Why a passed descriptor cannot be used as a listener (the starter's fault, every one).
#[derive(Debug, thiserror::Error)]
pub enum NotAListener {
    /// The descriptor is not open in this process (the starter counted wrong).
    #[error("descriptor {fd} is not open: {source}")]
    NotOpen { fd: RawFd, source: std::io::Error },
    /// The descriptor is open but not a socket, or its kind cannot be read.
    #[error("descriptor {fd} is not a socket: {source}")]
    NotASocket { fd: RawFd, source: std::io::Error },
    /// A socket, but not a listening TCP socket on an IP address.
    #[error("descriptor {fd} is a socket but {what}")]
    Wrong { fd: RawFd, what: &'static str },
}

/// Take the passed descriptor `fd` as a listening TCP socket, and the address it listens on.
///
/// The descriptor is marked close-on-exec first, as `sd_listen_fds(3)` does, so children
/// never inherit it. A descriptor that is open but not a listening TCP socket is left open
/// and otherwise untouched: it was passed to this process, but not for the sidecar to close.
pub fn inherited_listener(fd: RawFd) -> Result<(std::net::TcpListener, SocketAddr), NotAListener> {
    // SAFETY: F_GETFD passes no memory and only reads the descriptor's flags; an fd that is
    // not open fails with EBADF, which is how we learn it was not passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(NotAListener::NotOpen {
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: as above; F_SETFD only changes the descriptor's close-on-exec flag.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(NotAListener::NotOpen {
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is open (checked above) and, by the socket-activation protocol, was handed
    // to this process for its own use: nothing else in the process owns it, because the
    // sidecar claims passed descriptors at start-up before it opens any of its own (see
    // `activation::Inherited::from_environment`). The `OwnedFd` becomes its only owner; on
    // refusal ownership is given back with `into_raw_fd`, so it is never closed twice.
    let socket = socket2::Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
    match check_listener(&socket, fd) {
        Ok(address) => Ok((socket.into(), address)),
        Err(refusal) => {
            let _ = socket.into_raw_fd();
            Err(refusal)
        }
    }
}

/// The address `socket` listens on, if it is a listening TCP socket on an IP address.
fn check_listener(socket: &socket2::Socket, fd: RawFd) -> Result<SocketAddr, NotAListener> {
    let kind = socket
        .r#type()
        .map_err(|source| NotAListener::NotASocket { fd, source })?;
    if kind != socket2::Type::STREAM {
        return Err(NotAListener::Wrong {
            fd,
            what: "not a stream socket",
        });
    }
    let address = socket
        .local_addr()
        .ok()
        .and_then(|address| address.as_socket())
        .ok_or(NotAListener::Wrong {
            fd,
            what: "not bound to an IP address",
        })?;
    // SOCK_STREAM on IP is TCP or SCTP; only TCP is ours.
    if !matches!(socket.protocol(), Ok(Some(protocol)) if protocol == socket2::Protocol::TCP) {
        return Err(NotAListener::Wrong {
            fd,
            what: "not TCP",
        });
    }
    if !socket.is_listener().unwrap_or(false) {
        return Err(NotAListener::Wrong {
            fd,
            what: "not listening",
        });
    }
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A duplicate of `fd` as a raw number to pass, owned by the test.
    fn duplicate(fd: &impl std::os::fd::AsFd) -> RawFd {
        fd.as_fd().try_clone_to_owned().expect("dup").into_raw_fd()
    }

    fn is_open(fd: RawFd) -> bool {
        // SAFETY (test): F_GETFD passes no memory.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    #[test]
    fn a_listening_tcp_socket_is_taken_with_its_address_and_close_on_exec() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let fd = duplicate(&listener);
        // Passed descriptors arrive without close-on-exec.
        // SAFETY (test): F_SETFD on the duplicate this test owns.
        assert!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } >= 0);
        let (taken, address) = inherited_listener(fd).expect("a listener");
        assert_eq!(address, listener.local_addr().expect("address"));
        assert_eq!(taken.as_raw_fd(), fd);
        // SAFETY (test): F_GETFD on a descriptor `taken` owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }

    #[test]
    fn other_descriptors_are_refused_and_left_open() {
        let bound_only = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        bound_only
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let file = std::fs::File::open("/dev/null").expect("file");
        let (unix_left, _unix_right) = std::os::unix::net::UnixStream::pair().expect("pair");
        for (what, fd) in [
            ("bound, not listening", duplicate(&bound_only)),
            ("udp", duplicate(&udp)),
            ("file", duplicate(&file)),
            ("unix stream", duplicate(&unix_left)),
        ] {
            let refusal = inherited_listener(fd).expect_err(what);
            assert!(
                matches!(
                    refusal,
                    NotAListener::Wrong { .. } | NotAListener::NotASocket { .. }
                ),
                "{what}: {refusal}"
            );
            assert!(is_open(fd), "{what} was closed");
            // SAFETY (test): `fd` is the duplicate made above and owned by nobody else.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        // A descriptor number that is not open at all (far above any descriptor limit, so no
        // other test's descriptor can have it).
        assert!(matches!(
            inherited_listener(RawFd::MAX),
            Err(NotAListener::NotOpen { .. })
        ));
    }
}
