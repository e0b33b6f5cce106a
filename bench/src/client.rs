//! Pieces shared by the load generators: non-blocking connects, closing with FIN or RST, error
//! classification, latency histograms and the per-thread result that threads merge.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use socket2::{Domain, SockRef, Socket, Type};

/// Starts a non-blocking connect with TCP_NODELAY set; completion shows up as writability.
pub fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// After a writable event on a connecting socket: `Ok(true)` once connected, `Ok(false)` while
/// still connecting, or the connect error (mio's documented protocol).
pub fn connect_finished(stream: &TcpStream) -> io::Result<bool> {
    if let Some(error) = stream.take_error()? {
        return Err(error);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

/// How a load generator closes a finished connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Close {
    /// An orderly close (FIN), as a TLS client sends after close_notify: the proxy sees EOF,
    /// half-closes its backend side and waits for the backend's FIN, and the client's socket
    /// goes through TIME_WAIT. This is what real traffic costs.
    Fin,
    /// SO_LINGER 0: an RST, which skips the FIN exchange and TIME_WAIT (cheaper for every
    /// party, and not what TLS clients do).
    Rst,
}

impl Close {
    pub fn name(self) -> &'static str {
        match self {
            Close::Fin => "fin",
            Close::Rst => "rst",
        }
    }
}

/// Closes `stream` the way `how` says.
pub fn close(stream: TcpStream, how: Close) {
    match how {
        Close::Fin => drop(stream),
        Close::Rst => close_with_reset(stream),
    }
}

/// Closes with SO_LINGER 0, which sends RST and leaves no TIME_WAIT socket behind: with tens of
/// thousands of connections per second, TIME_WAIT would exhaust ports and slow connect().
pub fn close_with_reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// A short, bounded name for an IO error, used as the key of the error counts.
pub fn error_name(stage: &str, error: &io::Error) -> String {
    let kind = match error.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset => "reset",
        io::ErrorKind::ConnectionAborted => "aborted",
        io::ErrorKind::BrokenPipe => "broken_pipe",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::AddrNotAvailable => "no_local_port",
        io::ErrorKind::AddrInUse => "address_in_use",
        io::ErrorKind::UnexpectedEof => "eof",
        _ => match error.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => "out_of_fds",
            Some(libc::ENOBUFS) | Some(libc::ENOMEM) => "out_of_memory",
            _ => "other",
        },
    };
    format!("{stage}_{kind}")
}

/// Latency histogram in nanoseconds from 1 ns to 100 s at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("constant bounds are valid")
}

pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
    histogram.saturating_record(nanos);
}

/// What one load thread measured; threads' results are merged into one.
pub struct Outcome {
    pub operations: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub latency: Histogram<u64>,
    pub connect: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    /// Length of the measurement window.
    pub window: Duration,
    /// Set by the idle mode.
    pub memory: Option<crate::report::MemoryReport>,
}

impl Outcome {
    pub fn new() -> Outcome {
        Outcome {
            operations: 0,
            bytes_sent: 0,
            bytes_received: 0,
            latency: new_histogram(),
            connect: new_histogram(),
            errors: BTreeMap::new(),
            window: Duration::ZERO,
            memory: None,
        }
    }

    pub fn error(&mut self, name: impl Into<String>, progress: &Progress) {
        *self.errors.entry(name.into()).or_default() += 1;
        progress.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn merge(&mut self, other: Outcome) {
        self.operations += other.operations;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        let _ = self.latency.add(&other.latency);
        let _ = self.connect.add(&other.connect);
        for (name, count) in other.errors {
            *self.errors.entry(name).or_default() += count;
        }
        self.window = self.window.max(other.window);
        if other.memory.is_some() {
            self.memory = other.memory;
        }
    }
}

/// Counters the load threads bump and the progress line reads.
#[derive(Default)]
pub struct Progress {
    pub operations: AtomicU64,
    pub errors: AtomicU64,
    pub bytes: AtomicU64,
    pub done: AtomicBool,
}

impl Progress {
    pub fn shared() -> Arc<Progress> {
        Arc::new(Progress::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Instant;

    /// Connects a mio client to a blocking listener on loopback, closes it the way `how` says,
    /// and returns what the accepting side's read then sees.
    fn peer_read_after(how: Close) -> io::Result<usize> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let client = connect(listener.local_addr()?)?;
        let (mut accepted, _) = listener.accept()?;
        // The non-blocking connect has completed once the listener accepted it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !connect_finished(&client)? {
            assert!(Instant::now() < deadline, "connect did not finish");
            std::thread::sleep(Duration::from_millis(1));
        }
        close(client, how);
        accepted.set_read_timeout(Some(Duration::from_secs(5)))?;
        accepted.read(&mut [0u8; 16])
    }

    #[test]
    fn fin_close_is_an_orderly_eof() {
        assert_eq!(peer_read_after(Close::Fin).ok(), Some(0));
    }

    #[test]
    fn rst_close_resets_the_peer() {
        let error = peer_read_after(Close::Rst).err().map(|e| e.kind());
        assert_eq!(error, Some(io::ErrorKind::ConnectionReset));
    }
}
