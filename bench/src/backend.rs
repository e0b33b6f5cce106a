//! The "fake TLS" backend: reads and discards one ClientHello, then echoes (or discards) every
//! later byte. The proxies under test only look at the hello, so no TLS is needed behind it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Socket, Type};

use crate::hello::{self, MAX_CLIENT_HELLO};

/// What the backend does with the bytes that follow the ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Write every byte back.
    Echo,
    /// Read and discard every byte.
    Sink,
}

const LISTENER: Token = Token(usize::MAX);
/// Read size per syscall; matches the bulk test's 256 KiB writes.
const READ_BUFFER: usize = 256 * 1024;

/// Binds `threads` SO_REUSEPORT listeners on `address` (the first one picks the port when it is
/// 0) and returns them with the bound address.
pub fn bind(address: SocketAddr, threads: usize) -> anyhow::Result<(Vec<TcpListener>, SocketAddr)> {
    let mut listeners = Vec::new();
    let mut bound = address;
    for _ in 0..threads.max(1) {
        let socket = Socket::new(Domain::for_address(bound), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket
            .bind(&bound.into())
            .with_context(|| format!("bind {bound}"))?;
        socket.listen(4096)?;
        let listener = TcpListener::from_std(socket.into());
        bound = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok((listeners, bound))
}

/// Serves connections on one listener until `stop_at` (forever if `None`).
pub fn serve(listener: TcpListener, mode: Mode, stop_at: Option<Instant>) -> anyhow::Result<()> {
    let mut server = Server {
        poll: Poll::new()?,
        listener,
        mode,
        connections: HashMap::new(),
        next_token: 0,
        buffer: vec![0; READ_BUFFER],
    };
    server
        .poll
        .registry()
        .register(&mut server.listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    loop {
        let timeout = stop_at.map(|t| t.saturating_duration_since(Instant::now()));
        if timeout == Some(Duration::ZERO) {
            return Ok(());
        }
        match server.poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                server.accept_all();
            } else {
                server.drive(event.token());
            }
        }
    }
}

struct Connection {
    stream: TcpStream,
    /// The ClientHello bytes read so far; `None` once the hello is through.
    hello: Option<Vec<u8>>,
    /// Echo bytes the socket would not take yet. While non-empty we stop reading, so a slow
    /// reader throttles its writer instead of growing this buffer.
    pending: Vec<u8>,
    pending_offset: usize,
    read_closed: bool,
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    mode: Mode,
    connections: HashMap<usize, Connection>,
    next_token: usize,
    buffer: Vec<u8>,
}

/// What happened to a connection after it was driven.
enum Outcome {
    Open,
    Close,
}

impl Server {
    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let token = self.next_token;
                    self.next_token = self.next_token.wrapping_add(1) % (usize::MAX - 1);
                    if self
                        .poll
                        .registry()
                        .register(
                            &mut stream,
                            Token(token),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_err()
                    {
                        continue;
                    }
                    self.connections.insert(
                        token,
                        Connection {
                            stream,
                            hello: Some(Vec::new()),
                            pending: Vec::new(),
                            pending_offset: 0,
                            read_closed: false,
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Out of descriptors or an aborted handshake: drop this one, try again later.
                Err(_) => return,
            }
        }
    }

    fn drive(&mut self, token: Token) {
        let Some(connection) = self.connections.get_mut(&token.0) else {
            return;
        };
        if let Outcome::Close = drive_connection(connection, self.mode, &mut self.buffer) {
            if let Some(mut connection) = self.connections.remove(&token.0) {
                let _ = self.poll.registry().deregister(&mut connection.stream);
            }
        }
    }
}

/// Flushes pending echo bytes, then reads until the socket would block (edge-triggered).
fn drive_connection(connection: &mut Connection, mode: Mode, buffer: &mut [u8]) -> Outcome {
    loop {
        while connection.pending_offset < connection.pending.len() {
            match connection
                .stream
                .write(&connection.pending[connection.pending_offset..])
            {
                Ok(written) => connection.pending_offset += written,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Open,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Outcome::Close,
            }
        }
        connection.pending.clear();
        connection.pending_offset = 0;
        if connection.read_closed {
            return Outcome::Close;
        }
        let read = match connection.stream.read(buffer) {
            Ok(0) => {
                connection.read_closed = true;
                continue;
            }
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Open,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Outcome::Close,
        };
        let payload: &[u8] = match connection.hello.as_mut() {
            None => &buffer[..read],
            Some(hello_bytes) => {
                hello_bytes.extend_from_slice(&buffer[..read]);
                match hello::client_hello_end(hello_bytes) {
                    Ok(None) if hello_bytes.len() <= MAX_CLIENT_HELLO + 1024 => continue,
                    Ok(None) | Err(_) => return Outcome::Close,
                    Ok(Some(end)) => {
                        // Whatever followed the hello in the same read is payload.
                        let rest = hello_bytes.split_off(end);
                        connection.hello = None;
                        if mode == Mode::Echo {
                            connection.pending = rest;
                        }
                        continue;
                    }
                }
            }
        };
        if mode == Mode::Sink {
            continue;
        }
        let mut written = 0;
        while written < payload.len() {
            match connection.stream.write(&payload[written..]) {
                Ok(count) => written += count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Outcome::Close,
            }
        }
        connection.pending.extend_from_slice(&payload[written..]);
    }
}
