//! Zero-downtime binary upgrade: a new gateway process takes the listening sockets over from
//! the running one through a Unix socket (`[admin] handover_socket`), as HAProxy and Envoy's
//! hot restart do. Both processes then hold the same sockets, so the kernel's accept queues
//! survive: nothing is refused and nothing queued is lost.
//!
//! The exchange (frames are a 4-byte big-endian length and the bytes; JSON where structured):
//!
//! ```text
//! new → old   "gateway-handover/1"
//! old → new   Offer {pid, listeners: [{name, configured, resolved, sockets}], admin}
//! old → new   the descriptors over SCM_RIGHTS, in offer order (listeners, then admin)
//!             … new starts its workers on them and binds anything new in its config …
//! new → old   "ready"
//!             old stops accepting (no accept op is cancelled: workers accept by
//!             readiness), gives up the admin socket, and drains
//! old → new   "done"
//!             new binds the hand-over socket itself, for the next upgrade
//! ```
//!
//! Whoever answers gets (or gives) every listening socket, so both sides trust only a peer of
//! their own uid or root (`SO_PEERCRED`), and the socket must live in a directory that no one
//! but its owner (this uid or root) can write to: in a directory like /tmp another user could
//! bind the path first and pose as the running gateway.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::control::{Control, Event};
use crate::passfd;

const PROTOCOL: &[u8] = b"gateway-handover/1";
/// Frames are small JSON documents; anything bigger is not our peer.
const MAX_FRAME: usize = 1 << 20;
/// Each step of the exchange (a peer that stops answering is given up on).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the old process waits for the new one to start its workers.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
pub struct Offer {
    pub pid: u32,
    pub listeners: Vec<OfferedListener>,
    pub admin: Option<SocketAddr>,
    /// Set instead of the rest when the old process refuses (e.g. it is draining).
    pub error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OfferedListener {
    pub name: String,
    pub configured: SocketAddr,
    pub resolved: SocketAddr,
    pub sockets: usize,
}

fn write_frame(stream: &mut UnixStream, bytes: &[u8]) -> io::Result<()> {
    let length = u32::try_from(bytes.len()).map_err(io::Error::other)?;
    stream.write_all(&length.to_be_bytes())?;
    stream.write_all(bytes)
}

/// Reads exactly one frame: ancillary data is a barrier in a Unix stream, so reading no more
/// than the frame's bytes can never swallow descriptors sent after it.
fn read_frame(stream: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length)?;
    let length = u32::from_be_bytes(length) as usize;
    if length > MAX_FRAME {
        return Err(io::Error::other(format!("frame of {length} bytes")));
    }
    let mut bytes = vec![0u8; length];
    stream.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// The old process: serve hand-over requests until one succeeds. Runs on its own thread
/// (blocking IO, bounded by timeouts); it asks the control loop to stop accepting through an
/// event, so workers still only see flags.
pub fn serve(listener: UnixListener, control: Arc<Control>) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        match serve_one(&mut stream, &control) {
            Ok(()) => {
                tracing::info!("handed the listening sockets over to a new process; draining");
                return;
            }
            Err(error) => tracing::warn!(%error, "hand-over failed; still serving"),
        }
    }
}

/// Refuse a peer that is neither this process's uid nor root.
fn check_peer(stream: &UnixStream) -> anyhow::Result<()> {
    let peer = crate::sys::peer_uid(stream.as_raw_fd()).context("reading the peer's uid")?;
    let own = crate::sys::effective_uid();
    if peer != own && peer != 0 {
        bail!("the peer runs as uid {peer}, not as uid {own} or root; refused");
    }
    Ok(())
}

/// Refuse a socket path whose directory someone other than its owner can write to, or whose
/// owner is neither this uid nor root (either could replace the socket with their own).
pub fn check_directory(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let metadata = std::fs::metadata(directory)
        .with_context(|| format!("hand-over socket directory {}", directory.display()))?;
    let own = crate::sys::effective_uid();
    if metadata.uid() != own && metadata.uid() != 0 {
        bail!(
            "the hand-over socket's directory {} belongs to uid {}, not to uid {own} or root",
            directory.display(),
            metadata.uid()
        );
    }
    if metadata.mode() & 0o022 != 0 {
        bail!(
            "the hand-over socket's directory {} is writable by others (mode {:o}); use a directory only its owner can write, like /run/gateway",
            directory.display(),
            metadata.mode() & 0o7777
        );
    }
    Ok(())
}

fn serve_one(stream: &mut UnixStream, control: &Control) -> anyhow::Result<()> {
    check_peer(stream)?;
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    if read_frame(stream)? != PROTOCOL {
        bail!(
            "the peer does not speak {}",
            String::from_utf8_lossy(PROTOCOL)
        );
    }
    let (offer, fds) = match control.handover_offer() {
        Ok(offer) => offer,
        Err(reason) => {
            let refusal = Offer {
                pid: std::process::id(),
                listeners: Vec::new(),
                admin: None,
                error: Some(reason.clone()),
            };
            write_frame(stream, &serde_json::to_vec(&refusal)?)?;
            bail!("refused: {reason}");
        }
    };
    tracing::info!(
        sockets = fds.len(),
        "a new process asks for the listening sockets"
    );
    write_frame(stream, &serde_json::to_vec(&offer)?)?;
    for chunk in fds.chunks(passfd::MAX_FDS_PER_MESSAGE) {
        let borrowed: Vec<_> = chunk.iter().map(AsFd::as_fd).collect();
        passfd::send(stream, &borrowed).context("sending descriptors")?;
    }
    drop(fds);
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    let ready = read_frame(stream).context("waiting for the new process to start")?;
    if ready != b"ready" {
        bail!("the new process did not start");
    }
    let (done, wait) = std::sync::mpsc::channel();
    if !control.send(Event::HandOver(done)) {
        bail!("the control loop is gone");
    }
    wait.recv_timeout(STEP_TIMEOUT)
        .context("the control loop did not stop accepting")?;
    write_frame(stream, b"done")?;
    Ok(())
}

/// What the new process inherited.
pub struct Inherited {
    stream: UnixStream,
    pub old_pid: u32,
    pub listeners: Vec<(OfferedListener, Vec<std::net::TcpListener>)>,
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
}

/// The new process: ask the process behind `path` for its sockets. `Ok(None)` when nobody
/// listens there (a fresh start).
pub fn take_over(path: &Path) -> anyhow::Result<Option<Inherited>> {
    check_directory(path)?;
    let mut stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(error) => return Err(error).context(format!("connecting to {}", path.display())),
    };
    check_peer(&stream).with_context(|| format!("the process behind {}", path.display()))?;
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    write_frame(&mut stream, PROTOCOL)?;
    let offer: Offer = serde_json::from_slice(&read_frame(&mut stream)?)
        .context("the running gateway sent an unreadable offer")?;
    if let Some(error) = offer.error {
        bail!(
            "the running gateway (pid {}) refuses the hand-over: {error}",
            offer.pid
        );
    }
    let expected = offer.listeners.iter().map(|l| l.sockets).sum::<usize>()
        + usize::from(offer.admin.is_some());
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(expected);
    while fds.len() < expected {
        fds.extend(passfd::receive(&stream).context("receiving descriptors")?);
    }
    if fds.len() != expected {
        bail!("expected {expected} descriptors, received {}", fds.len());
    }
    let mut fds = fds.into_iter();
    let mut listeners = Vec::new();
    for listener in offer.listeners {
        let sockets = fds
            .by_ref()
            .take(listener.sockets)
            .map(std::net::TcpListener::from)
            .collect();
        listeners.push((listener, sockets));
    }
    let admin = offer
        .admin
        .zip(fds.next())
        .map(|(address, fd)| (address, std::net::TcpListener::from(fd)));
    tracing::info!(old_pid = offer.pid, "took the listening sockets over");
    Ok(Some(Inherited {
        stream,
        old_pid: offer.pid,
        listeners,
        admin,
    }))
}

impl Inherited {
    /// Tell the old process we accept on every socket, and wait until it stopped accepting.
    pub fn complete(mut self) -> anyhow::Result<()> {
        write_frame(&mut self.stream, b"ready")?;
        let done = read_frame(&mut self.stream).context("waiting for the old process")?;
        if done != b"done" {
            bail!(
                "the old process answered {:?}",
                String::from_utf8_lossy(&done)
            );
        }
        Ok(())
    }
}

/// Listen for the next upgrade. Only the owner may connect (mode 0600): whoever connects
/// gets the listening sockets.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    check_directory(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).context(format!("removing {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
