//! The control-plane addresses a client is given (`-http-addr`, `CONSUL_HTTP_ADDR`), read by
//! Consul's rules, once for every client: controlplane-lite's CLI, `gateway mesh` and the
//! sidecar.
//!
//! - An address is `host:port`, `http://host:port` or `https://host:port`; without a scheme it
//!   is http, unless `CONSUL_HTTP_SSL` is true (then https), as in Consul's API client.
//! - Several addresses are a repeated flag, a comma list, or both (`a:1,b:2`); the client
//!   fails over between them in this order.

use std::fmt;

/// At most this many control-plane addresses: Consul runs 3 to 5 servers per datacenter; the
/// bound keeps a mistyped list from making a client hold thousands of entries.
pub const MAX_ADDRESSES: usize = 16;

/// Bound on one address's length (a DNS name is at most 253 bytes, plus scheme and port).
const MAX_ADDRESS_BYTES: usize = 300;

/// How a client talks to the agent at an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP/1.1.
    Http,
    /// HTTP/1.1 over TLS, verified against the client's CA file.
    Https,
}

/// One control-plane address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlPlaneAddress {
    /// http or https.
    pub scheme: Scheme,
    /// `host:port` (what TCP connects to and what `Host:` carries).
    pub authority: String,
}

/// An address list the user gave that cannot be used (the user's fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// No address at all (an empty flag or variable).
    #[error("no control-plane address given (-http-addr or CONSUL_HTTP_ADDR)")]
    Empty,
    /// More than [`MAX_ADDRESSES`].
    #[error("more than {MAX_ADDRESSES} control-plane addresses")]
    TooMany,
    /// A scheme other than http or https, a path, or no port.
    #[error("-http-addr {0:?}: expected host:port, http://host:port or https://host:port")]
    Invalid(String),
}

impl ControlPlaneAddress {
    /// One address; `ssl` (`CONSUL_HTTP_SSL=true`) makes an address without a scheme https.
    pub fn parse(text: &str, ssl: bool) -> Result<ControlPlaneAddress, AddressError> {
        let text = text.trim();
        let invalid = || AddressError::Invalid(text.chars().take(MAX_ADDRESS_BYTES).collect());
        if text.len() > MAX_ADDRESS_BYTES {
            return Err(invalid());
        }
        let (scheme, rest) = if let Some(rest) = text.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = text.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else if text.contains("://") {
            return Err(invalid());
        } else if ssl {
            (Scheme::Https, text)
        } else {
            (Scheme::Http, text)
        };
        let authority = rest.trim_end_matches('/');
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !has_port || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(invalid());
        }
        Ok(ControlPlaneAddress {
            scheme,
            authority: authority.to_owned(),
        })
    }

    /// The host part, without port or IPv6 brackets (the TLS server name).
    pub fn host(&self) -> &str {
        let host = self
            .authority
            .rsplit_once(':')
            .map_or(self.authority.as_str(), |(host, _)| host);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

impl fmt::Display for ControlPlaneAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        write!(f, "{scheme}://{}", self.authority)
    }
}

/// Every address in `values` (each a single address or a comma list), in order; duplicates
/// are kept once.
pub fn parse_list<S: AsRef<str>>(
    values: &[S],
    ssl: bool,
) -> Result<Vec<ControlPlaneAddress>, AddressError> {
    let mut addresses: Vec<ControlPlaneAddress> = Vec::new();
    let pieces = values
        .iter()
        .flat_map(|value| value.as_ref().split(','))
        .map(str::trim)
        .filter(|piece| !piece.is_empty());
    for piece in pieces {
        let address = ControlPlaneAddress::parse(piece, ssl)?;
        if addresses.contains(&address) {
            continue;
        }
        if addresses.len() == MAX_ADDRESSES {
            return Err(AddressError::TooMany);
        }
        addresses.push(address);
    }
    if addresses.is_empty() {
        return Err(AddressError::Empty);
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(authority: &str) -> ControlPlaneAddress {
        ControlPlaneAddress {
            scheme: Scheme::Http,
            authority: authority.to_owned(),
        }
    }

    #[test]
    fn consul_rules_for_one_address() {
        assert_eq!(
            ControlPlaneAddress::parse("127.0.0.1:8500", false),
            Ok(http("127.0.0.1:8500"))
        );
        assert_eq!(
            ControlPlaneAddress::parse("http://127.0.0.1:8500/", true),
            Ok(http("127.0.0.1:8500"))
        );
        let https = ControlPlaneAddress::parse("localhost:8501", true).expect("ssl");
        assert_eq!(https.scheme, Scheme::Https);
        assert_eq!(https.to_string(), "https://localhost:8501");
        assert_eq!(https.host(), "localhost");
        assert_eq!(
            ControlPlaneAddress::parse("https://[::1]:8501", false)
                .expect("v6")
                .host(),
            "::1"
        );
        for bad in [
            "unix:///tmp/x",
            "ftp://h:1",
            "h",
            "h:port",
            "http://h:1/v1",
            ":80",
        ] {
            assert!(
                ControlPlaneAddress::parse(bad, false).is_err(),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn repeated_flags_and_comma_lists_make_one_ordered_list() {
        let list = parse_list(&["a:1,http://b:2", " c:3 ", "a:1"], false).expect("list");
        assert_eq!(list, [http("a:1"), http("b:2"), http("c:3")]);
        assert_eq!(parse_list(&[" , "], false), Err(AddressError::Empty));
        let empty: [&str; 0] = [];
        assert_eq!(parse_list(&empty, false), Err(AddressError::Empty));
        let many: Vec<String> = (0..=MAX_ADDRESSES)
            .map(|n| format!("h:{}", n + 1))
            .collect();
        assert_eq!(parse_list(&many, false), Err(AddressError::TooMany));
    }
}
