//! Passing open descriptors to another process over a Unix stream socket (`SCM_RIGHTS`,
//! unix(7)): the one other module with `unsafe`, because std has no stable API for
//! ancillary data. Each message carries one payload byte (the number of descriptors, so the
//! receiver can check nothing was lost) and at most `MAX_FDS_PER_MESSAGE` descriptors.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Descriptors per message; the kernel's limit is SCM_MAX_FD (253).
pub const MAX_FDS_PER_MESSAGE: usize = 64;

/// Room for one `SCM_RIGHTS` header and `MAX_FDS_PER_MESSAGE` descriptors, as u64 words so
/// the buffer is aligned for `cmsghdr`.
const CONTROL_WORDS: usize = (MAX_FDS_PER_MESSAGE * 4 + 64) / 8;

fn control_space(count: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    unsafe { libc::CMSG_SPACE((count * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Send `fds` (at most `MAX_FDS_PER_MESSAGE`) in one message. The caller keeps its copies.
pub fn send(socket: &UnixStream, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.is_empty() || fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "between 1 and 64 descriptors per message",
        ));
    }
    let payload = [fds.len() as u8];
    let mut control = [0u64; CONTROL_WORDS];
    let space = control_space(fds.len());
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = space as _;
    // SAFETY: msg_control points to `space` bytes (<= the buffer, checked by the constant's
    // arithmetic) of aligned, zeroed memory, so CMSG_FIRSTHDR returns a header inside it and
    // CMSG_DATA has room for `fds.len()` descriptors; the payload and iovec outlive the call,
    // and sendmsg only reads them.
    let sent = unsafe {
        let header = libc::CMSG_FIRSTHDR(&message);
        if header.is_null() {
            return Err(io::Error::other("no room for the control message"));
        }
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as _;
        let data = libc::CMSG_DATA(header).cast::<RawFd>();
        for (index, fd) in fds.iter().enumerate() {
            data.add(index).write_unaligned(fd.as_raw_fd());
        }
        libc::sendmsg(socket.as_raw_fd(), &message, libc::MSG_NOSIGNAL)
    };
    match sent {
        1 => Ok(()),
        0 => Err(io::Error::from(io::ErrorKind::WriteZero)),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Receive one message sent by [`send`]; the descriptors arrive close-on-exec.
pub fn receive(socket: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut payload = [0u8; 1];
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: the iovec and control buffer are writable for the lengths given and outlive
    // the call.
    let received =
        unsafe { libc::recvmsg(socket.as_raw_fd(), &mut message, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: recvmsg filled `msg_controllen` bytes of the control buffer with well-formed
    // headers; CMSG_FIRSTHDR/CMSG_NXTHDR stay inside it. Each SCM_RIGHTS descriptor is new
    // in this process and owned by nothing else, so OwnedFd may take it (and closes it if we
    // fail below).
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                for index in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(index).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    if received == 0 {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    if message.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() != usize::from(payload[0]) {
        return Err(io::Error::other(format!(
            "expected {} descriptors, received {}",
            payload[0],
            fds.len()
        )));
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_cross_a_socket_pair_and_still_work() {
        let (left, right) = UnixStream::pair().expect("pair");
        let (mut a, b) = UnixStream::pair().expect("pair");
        let (c, mut d) = UnixStream::pair().expect("pair");
        send(&left, &[b.as_fd(), c.as_fd()]).expect("send");
        drop((b, c));
        let received = receive(&right).expect("receive");
        assert_eq!(received.len(), 2);
        let mut iter = received.into_iter();
        let mut b = UnixStream::from(iter.next().expect("b"));
        let mut c = UnixStream::from(iter.next().expect("c"));
        a.write_all(b"to b").expect("write");
        let mut buffer = [0u8; 4];
        b.read_exact(&mut buffer).expect("read");
        assert_eq!(&buffer, b"to b");
        c.write_all(b"to d").expect("write");
        d.read_exact(&mut buffer).expect("read");
        assert_eq!(&buffer, b"to d");
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_hang() {
        let (left, right) = UnixStream::pair().expect("pair");
        drop(left);
        assert!(receive(&right).is_err());
    }
}
