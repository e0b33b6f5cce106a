//! Sends one rustls ClientHello to a listener and exits.
//!
//! Usage: rustls-pq-hello HOST:PORT SERVER_NAME [ALPN,ALPN...]
//!
//! The listener (testdata/capture.py) only records the hello, so the handshake
//! is never completed and an empty root store is enough.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let address = args.next().ok_or("missing HOST:PORT")?;
    let server_name = ServerName::try_from(args.next().ok_or("missing SERVER_NAME")?)?;
    let alpn = args.next();

    // With `prefer-post-quantum` the aws-lc-rs provider lists X25519MLKEM768
    // first, so it is the key share sent in the first flight.
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let first_group = provider.kx_groups.first().map(|group| group.name());
    eprintln!("first key exchange group: {first_group:?}");

    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    if let Some(alpn) = alpn {
        config.alpn_protocols = alpn.split(',').map(|p| p.as_bytes().to_vec()).collect();
    }

    let mut connection = ClientConnection::new(Arc::new(config), server_name)?;
    let mut stream = TcpStream::connect(address)?;
    while connection.wants_write() {
        connection.write_tls(&mut stream)?;
    }
    stream.flush()?;
    Ok(())
}
