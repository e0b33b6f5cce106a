//! The few operating-system calls that std, mio and socket2 do not wrap.
//!
//! This is the only module of the crate that uses `unsafe`; each block says why it is sound.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Raises the soft limit on open files to the hard limit and returns the new soft limit.
///
/// A load generator holding thousands of idle connections needs far more descriptors than the
/// usual soft limit of 1024; the hard limit is what the administrator allows us.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: `limit` is a valid rlimit that we only read from.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// Clock ticks per second, the unit of the CPU times in `/proc/*/stat` and `/proc/stat`.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // USER_HZ is 100 on every Linux architecture we care about; use it if sysconf fails.
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// A one-shot monotonic timer as a file descriptor, so that an epoll loop can wake up at a
/// precise instant: epoll_wait's own timeout has only millisecond resolution, which would add up
/// to a millisecond of generator lateness to every open-loop start.
pub struct Timer {
    file: File,
}

impl Timer {
    pub fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create has no memory-safety preconditions; we check the result.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Timer {
            file: File::from(owned),
        })
    }

    /// Arms the timer to fire once after `delay` (a zero delay fires after one nanosecond,
    /// because a zero value would disarm it).
    pub fn arm_after(&self, delay: Duration) -> io::Result<()> {
        let delay = delay.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(delay.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(i32::try_from(delay.subsec_nanos()).unwrap_or(0)),
            },
        };
        // SAFETY: the descriptor is a timerfd we own; `spec` is valid for reading and the old
        // value pointer may be null.
        let rc =
            unsafe { libc::timerfd_settime(self.file.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consumes an expiry so that the descriptor stops being readable.
    pub fn clear(&mut self) {
        let mut expirations = [0u8; 8];
        // A read that finds no expiry returns WouldBlock, which is fine to ignore.
        let _ = self.file.read(&mut expirations);
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
