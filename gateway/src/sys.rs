//! The one module that calls libc directly: non-blocking socket IO after a readiness event,
//! socket options monoio does not expose, and process limits.
//!
//! Why not monoio's `read`/`write` ops for the relay: those own a buffer per pending
//! operation, so an idle proxied connection would pin a buffer in each direction. Waiting for
//! readiness first and then reading into the worker's one scratch buffer keeps idle
//! connections buffer-free (see ARCHITECTURE.md, "The relay").
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

fn check(result: libc::ssize_t) -> io::Result<usize> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        // A non-negative ssize_t always fits usize.
        Ok(result as usize)
    }
}

/// `recv(2)` with `MSG_DONTWAIT`: never blocks, whatever the socket's O_NONBLOCK state (the
/// io_uring driver leaves sockets blocking). `Ok(0)` is end of stream.
pub fn recv(fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buffer` is a valid, exclusively borrowed region of `buffer.len()` bytes for the
    // duration of the call; the kernel writes at most that many bytes into it.
    check(unsafe {
        libc::recv(
            fd,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_DONTWAIT,
        )
    })
}

/// `send(2)` with `MSG_DONTWAIT | MSG_NOSIGNAL`: never blocks, and a peer that went away is an
/// `EPIPE` error instead of a process-killing SIGPIPE.
pub fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a valid region of `data.len()` bytes that the kernel only reads.
    check(unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// `shutdown(2)`; errors such as ENOTCONN after a reset are expected and ignored by callers.
pub fn shutdown(fd: RawFd, how: std::net::Shutdown) -> io::Result<()> {
    let how = match how {
        std::net::Shutdown::Read => libc::SHUT_RD,
        std::net::Shutdown::Write => libc::SHUT_WR,
        std::net::Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: plain syscall on a descriptor number; no memory is passed.
    if unsafe { libc::shutdown(fd, how) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `accept4(2)` with `SOCK_NONBLOCK | SOCK_CLOEXEC` on a non-blocking listening socket: one
/// pending connection, or `WouldBlock` when the queue is empty. Called after a readiness
/// event instead of io_uring's accept op, because cancelling an in-flight accept op can lose
/// a connection the kernel already took off the queue (see ARCHITECTURE.md, "Accepting").
pub fn accept(fd: RawFd) -> io::Result<(std::net::TcpStream, std::net::SocketAddr)> {
    use std::os::fd::FromRawFd;
    // SAFETY: an all-zero sockaddr_storage is a valid value of that plain C struct.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut length = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is writable and `length` holds its exact size; the kernel writes at
    // most that many bytes and stores the address's real length in `length`.
    let accepted = unsafe {
        libc::accept4(
            fd,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut length,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if accepted < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns; the stream closes it.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(accepted) };
    // SAFETY: the kernel initialised `length` bytes of `storage` as a socket address.
    let address = unsafe { socket2::SockAddr::new(storage, length) };
    let peer = address
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a connection that is not TCP/IP"))?;
    Ok((stream, peer))
}

/// `CLOCK_MONOTONIC` in microseconds: the clock systemd's `MONOTONIC_USEC=` refers to.
pub fn monotonic_micros() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000 + (now.tv_nsec as u64) / 1_000
}

/// `TCP_DEFER_ACCEPT` (tcp(7)): the kernel hands a connection to `accept` only once the
/// client has sent data (its ClientHello), saving a wake-up per connection. Clients that never
/// send stay in the handshake queue and are accepted after `seconds` anyway, where the
/// ClientHello deadline then applies.
pub fn set_defer_accept(fd: RawFd, seconds: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
    // SAFETY: passes a pointer to a local c_int and its exact size.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The uid of the process at the other end of a connected Unix socket (`SO_PEERCRED`, unix(7):
/// the credentials in effect when the peer called connect(2) or listen(2)).
pub fn peer_uid(fd: RawFd) -> io::Result<u32> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: passes a pointer to a local ucred and its exact size; the kernel writes at most
    // `length` bytes and updates `length`.
    let result = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut length,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    if length as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::other("SO_PEERCRED returned a short answer"));
    }
    Ok(credentials.uid)
}

/// This process's effective uid.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, always succeeds and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit. Returns (soft before, hard).
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a valid rlimit struct that the kernel only reads.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, limit.rlim_max))
}

/// The number of CPUs in this process's affinity mask (what it may actually run on).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it and the
    // CPU_ISSET reads stay within its fixed size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Pin the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: as in `allowed_cpus`; CPU_SET is bounds-checked against CPU_SETSIZE below.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A pipe for splicing, both ends non-blocking. Closed on drop.
pub struct Pipe {
    pub read: std::os::fd::OwnedFd,
    pub write: std::os::fd::OwnedFd,
}

impl Pipe {
    /// `pipe2(O_NONBLOCK | O_CLOEXEC)`, then ask for `capacity` bytes (F_SETPIPE_SZ; the kernel
    /// rounds up to pages and caps unprivileged callers at /proc/sys/fs/pipe-max-size).
    pub fn new(capacity: usize) -> io::Result<Pipe> {
        use std::os::fd::FromRawFd;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two c_ints for the kernel to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let pipe = unsafe {
            Pipe {
                read: std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                write: std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            }
        };
        use std::os::fd::AsRawFd;
        let size = libc::c_int::try_from(capacity).unwrap_or(libc::c_int::MAX);
        // SAFETY: plain fcntl on a descriptor we own; a failure only leaves the default size.
        unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
        Ok(pipe)
    }
}

/// `splice(2)` without offsets, non-blocking, moving pages where the kernel can.
pub fn splice(from: RawFd, to: RawFd, length: usize) -> io::Result<usize> {
    // SAFETY: no memory is passed (null offsets mean "current position" for pipes/sockets).
    check(unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            length,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    })
}

/// Set O_NONBLOCK, so that splice on the socket side never blocks either.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain fcntl calls on a descriptor number; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `SO_LINGER` on with a zero timeout: `close(2)` then sends a reset and frees the socket at
/// once instead of a FIN followed by TIME_WAIT. Used to pass a reset on to the other side.
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: passes a pointer to a local `linger` struct and its exact size.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
