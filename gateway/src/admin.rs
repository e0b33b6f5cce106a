//! The admin HTTP API on the control thread (hyper, HTTP/1). Reads are GET; anything that
//! changes state is POST only (a GET to it is 405), as Envoy's admin requires.
//!
//! | path | method | what |
//! | --- | --- | --- |
//! | `/metrics` | GET | Prometheus text |
//! | `/ready` | GET | 200 once serving; 503 before, and while draining |
//! | `/healthz` | GET | 200 while every worker's heartbeat is fresh |
//! | `/config_dump` | GET | effective configuration, generation, io driver (no secrets) |
//! | `/reload` | POST | re-read the file (like SIGHUP) |
//! | `/drain` | POST | start draining (like SIGTERM) |
//! | `/logging` | GET, POST | read the log filter; `POST /logging?level=FILTER` (or the filter as the body) sets it |
//!
//! Guards, checked before any of the above (issue 13 #5; a browser on the same machine can
//! reach a loopback port):
//! - The `Host` header must name the address the connection reached (an IP literal, or
//!   `localhost` on a loopback address) with its port; anything else is 403. A DNS-rebinding
//!   page reaches the port under the attacker's own name, so its `Host` never matches.
//! - A mutating request (any method but GET and HEAD) that carries an `Origin` header is 403:
//!   browsers send `Origin` on cross-site POSTs, and the tools that drive this API (curl,
//!   systemd, scripts) do not.
//! - With `[admin] token_file`, mutating requests need `Authorization: Bearer TOKEN` (401
//!   otherwise). Reads stay open: Prometheus and health checks carry no token.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::control::{Control, Event};
use crate::metrics::ReloadSource;

/// Request bodies (only `/logging` reads one) are tiny.
const MAX_BODY_BYTES: usize = 4096;

/// The longest admin token accepted from `[admin] token_file` (a generous bound for a random
/// token; the file is read whole).
const MAX_TOKEN_BYTES: u64 = 4096;

/// Accept admin connections until `stop` turns true (after a hand-over the new process owns
/// the admin socket). Cancelling tokio's accept is safe: it is readiness plus accept(2).
pub async fn serve(
    control: Arc<Control>,
    listener: tokio::net::TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // The address this connection reached is the one its `Host` must name.
        let Ok(reached) = stream.local_addr() else {
            continue;
        };
        let control = Arc::clone(&control);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let control = Arc::clone(&control);
                async move {
                    let response = match guard(&control, reached, &request) {
                        None => handle(&control, request).await,
                        Some(refusal) => refusal,
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    tracing::info!("admin API handed over; no longer serving it");
}

/// The DNS-rebinding, CSRF and token checks (see the module documentation): the refusal to
/// send instead of handling the request, if any.
fn guard(
    control: &Control,
    reached: SocketAddr,
    request: &Request<Incoming>,
) -> Option<Response<Full<Bytes>>> {
    let headers = request.headers();
    let host = headers
        .get(hyper::header::HOST)
        .and_then(|value| value.to_str().ok());
    if !host.is_some_and(|host| host_names_address(host, reached)) {
        return Some(text(
            StatusCode::FORBIDDEN,
            "the Host header must name the admin address\n",
        ));
    }
    let mutating = !matches!(*request.method(), Method::GET | Method::HEAD);
    if !mutating {
        return None;
    }
    if headers.contains_key(hyper::header::ORIGIN) {
        return Some(text(
            StatusCode::FORBIDDEN,
            "requests that change state are refused from a browser (Origin header)\n",
        ));
    }
    if let Some(token) = &control.admin_token {
        let presented = headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if !presented.is_some_and(|presented| token.matches(presented)) {
            let mut refusal = text(
                StatusCode::UNAUTHORIZED,
                "this endpoint needs the admin token (Authorization: Bearer TOKEN)\n",
            );
            refusal.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
            return Some(refusal);
        }
    }
    None
}

/// Whether a `Host` header value names `reached`: the same port (80 when none is given), and
/// the same IP literal, or `localhost` when `reached` is a loopback address. A name is never
/// enough: DNS rebinding gives an attacker's name any address it likes.
fn host_names_address(host: &str, reached: SocketAddr) -> bool {
    let host = host.trim();
    // Split off the port: `[v6]:port`, `v4:port`, `name:port`, or no port.
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !name.is_empty() && (!name.contains(':') || name.ends_with(']')) => {
            match port.parse::<u16>() {
                Ok(port) => (name, port),
                Err(_) => return false,
            }
        }
        _ => (host, 80),
    };
    if port != reached.port() {
        return false;
    }
    let name = name
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(name);
    let reached_ip = canonical(reached.ip());
    match name.parse::<IpAddr>() {
        Ok(ip) => canonical(ip) == reached_ip,
        Err(_) => name.eq_ignore_ascii_case("localhost") && reached_ip.is_loopback(),
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is (a dual-stack socket reports those).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The admin token from `[admin] token_file`. Compared in constant time, and never printed.
pub struct AdminToken(Vec<u8>);

/// Why `[admin] token_file` cannot be used; the gateway does not start (and `validate` fails).
/// Every variant is the operator's to fix, in the file or its permissions.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    /// The file cannot be opened or read.
    #[error("{}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Group or others may read or write it: a token anyone can read guards nothing.
    #[error("{} is readable or writable by group or others (mode {mode:o}); chmod 600 it", path.display())]
    TooOpen { path: PathBuf, mode: u32 },
    /// Longer than a token can be.
    #[error("{}: longer than {MAX_TOKEN_BYTES} bytes", path.display())]
    TooLong { path: PathBuf },
    /// Nothing but whitespace.
    #[error("{} is empty", path.display())]
    Empty { path: PathBuf },
}

impl AdminToken {
    /// Read the token (surrounding whitespace trimmed). The file must not be readable by group
    /// or others, like an ssh key: a token anyone can read guards nothing.
    pub fn load(path: &Path) -> Result<AdminToken, AdminTokenError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let path_buf = || path.to_owned();
        let unreadable = |source| AdminTokenError::Unreadable {
            path: path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(unreadable)?;
        let metadata = file.metadata().map_err(unreadable)?;
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(AdminTokenError::TooOpen {
                path: path_buf(),
                mode: mode & 0o777,
            });
        }
        let mut text = String::new();
        file.take(MAX_TOKEN_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(unreadable)?;
        if text.len() as u64 > MAX_TOKEN_BYTES {
            return Err(AdminTokenError::TooLong { path: path_buf() });
        }
        let token = text.trim();
        if token.is_empty() {
            return Err(AdminTokenError::Empty { path: path_buf() });
        }
        Ok(AdminToken(token.as_bytes().to_vec()))
    }

    /// Constant-time in the token's bytes: the time taken does not say how much of a guess
    /// was right.
    fn matches(&self, presented: &str) -> bool {
        let presented = presented.trim().as_bytes();
        if presented.len() != self.0.len() {
            return false;
        }
        let difference = self
            .0
            .iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        difference == 0
    }
}

async fn handle(control: &Control, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    match (method, path.as_str()) {
        (Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            control.render_metrics(),
        ),
        (Method::GET, "/ready") => {
            if control.draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if control.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (Method::GET, "/healthz") => {
            if control.workers_healthy() {
                text(StatusCode::OK, "ok\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "a worker's heartbeat is stale\n",
                )
            }
        }
        (Method::GET, "/config_dump") => respond(
            StatusCode::OK,
            "application/json",
            format!("{:#}\n", control.config_dump()),
        ),
        (Method::POST, "/reload") => match control.reload(ReloadSource::Api) {
            Ok(generation) => json(
                StatusCode::OK,
                &serde_json::json!({ "generation": generation }),
            ),
            Err(errors) => json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({
                    "errors": errors.iter().map(ToString::to_string).collect::<Vec<_>>()
                }),
            ),
        },
        (Method::POST, "/drain") => {
            let already = control.draining();
            if !already {
                // Say 503 on /ready from this answer on, before the loop takes the event.
                control
                    .metrics
                    .control
                    .draining
                    .store(true, Ordering::Relaxed);
                if !control.send(Event::Drain) {
                    return text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n");
                }
            }
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "draining": true, "already": already }),
            )
        }
        (Method::GET, "/logging") => match &control.log_filter {
            Some(filter) => json(
                StatusCode::OK,
                &serde_json::json!({ "filter": filter.current() }),
            ),
            None => text(StatusCode::NOT_FOUND, "no run-time log filter\n"),
        },
        (Method::POST, "/logging") => {
            let Some(filter) = control.log_filter.clone() else {
                return text(StatusCode::NOT_FOUND, "no run-time log filter\n");
            };
            let from_query = request
                .uri()
                .query()
                .and_then(|query| query_value(query, "level"));
            let directives = match from_query {
                Some(level) => level,
                None => match Limited::new(request.into_body(), MAX_BODY_BYTES)
                    .collect()
                    .await
                {
                    Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                    Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"),
                },
            };
            if directives.trim().is_empty() {
                return text(
                    StatusCode::BAD_REQUEST,
                    "give the filter as ?level=FILTER or as the body\n",
                );
            }
            match filter.set(&directives) {
                Ok(current) => {
                    tracing::info!(filter = %current, "log filter changed");
                    json(StatusCode::OK, &serde_json::json!({ "filter": current }))
                }
                Err(error) => json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({ "error": error }),
                ),
            }
        }
        (_, "/reload" | "/drain") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        (_, "/metrics" | "/ready" | "/healthz" | "/config_dump" | "/logging") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The percent-decoded value of `key` in a query string (`+` is a space).
fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == key).then(|| percent_decode(value))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).ok();
                match hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        index += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    respond(status, "text/plain", body.to_owned())
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", format!("{value}\n"))
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_problems_are_typed_and_read_as_before() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("gateway-admin-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("token");
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        write("secret\n", 0o644);
        let open = AdminToken::load(&path).err();
        write("  \n", 0o600);
        let empty = AdminToken::load(&path).err();
        write("secret\n", 0o600);
        let fine = AdminToken::load(&path);
        let missing = AdminToken::load(&dir.join("absent")).err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            matches!(&open, Some(AdminTokenError::TooOpen { mode: 0o644, .. })),
            "{open:?}"
        );
        assert!(open
            .map(|e| e.to_string())
            .is_some_and(|text| text.ends_with("(mode 644); chmod 600 it")));
        assert!(
            matches!(empty, Some(AdminTokenError::Empty { .. })),
            "{empty:?}"
        );
        assert!(fine.is_ok_and(|token| token.matches("secret")));
        assert!(
            matches!(missing, Some(AdminTokenError::Unreadable { .. })),
            "{missing:?}"
        );
    }

    #[test]
    fn host_must_name_the_address_reached() {
        let v4: SocketAddr = "127.0.0.1:19000".parse().expect("address");
        let v6: SocketAddr = "[::1]:19000".parse().expect("address");
        let lan: SocketAddr = "10.0.0.5:19000".parse().expect("address");
        let mapped: SocketAddr = "[::ffff:10.0.0.5]:19000".parse().expect("address");
        for (host, reached) in [
            ("127.0.0.1:19000", v4),
            ("localhost:19000", v4),
            ("LOCALHOST:19000", v4),
            ("[::1]:19000", v6),
            ("localhost:19000", v6),
            ("10.0.0.5:19000", lan),
            ("10.0.0.5:19000", mapped),
        ] {
            assert!(host_names_address(host, reached), "{host} for {reached}");
        }
        for (host, reached) in [
            ("attacker.example:19000", v4),
            ("127.0.0.1:19001", v4),
            ("127.0.0.1", v4),
            ("127.0.0.2:19000", v4),
            ("localhost:19000", lan),
            ("[::1]:19000", v4),
            ("::1:19000", v6),
            ("127.0.0.1:x", v4),
            ("", v4),
            (":19000", v4),
        ] {
            assert!(!host_names_address(host, reached), "{host} for {reached}");
        }
    }

    #[test]
    fn tokens_match_exactly() {
        let token = AdminToken(b"abc123".to_vec());
        assert!(token.matches("abc123"));
        for wrong in ["", "abc12", "abc1234", "abc124", "ABC123"] {
            assert!(!token.matches(wrong), "{wrong}");
        }
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            query_value("level=gateway%3Ddebug%2Cinfo", "level").as_deref(),
            Some("gateway=debug,info")
        );
        assert_eq!(
            query_value("x=1&level=warn", "level").as_deref(),
            Some("warn")
        );
        assert_eq!(query_value("level=50%", "level").as_deref(), Some("50%"));
        assert_eq!(query_value("other=1", "level"), None);
    }
}
