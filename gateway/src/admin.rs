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

use std::convert::Infallible;
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
        let control = Arc::clone(&control);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let control = Arc::clone(&control);
                async move { Ok::<_, Infallible>(handle(&control, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    tracing::info!("admin API handed over; no longer serving it");
}

async fn handle(control: &Control, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    match (method, path.as_str()) {
        (Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            control.metrics.render(&control.snapshot.load()),
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
                &serde_json::json!({ "errors": errors }),
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
