//! The control thread: admin HTTP, signals and reloads, on a single-threaded tokio runtime.
//! Workers never wait on it; they only see the snapshots it publishes.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::snapshot::{SharedSnapshot, Snapshot};

/// A worker whose heartbeat has not moved for this long is reported unhealthy (it beats
/// every second).
const HEARTBEAT_STALE: Duration = Duration::from_secs(3);

pub struct Control {
    pub metrics: Arc<Metrics>,
    pub snapshot: SharedSnapshot,
    pub config_path: PathBuf,
    /// The configuration the snapshot in force was built from.
    pub config: Mutex<Config>,
    pub ready: AtomicBool,
    heartbeats: Mutex<Vec<(u64, Instant)>>,
}

#[derive(Debug, Clone, Copy)]
pub enum ReloadSource {
    Signal,
    Api,
}

impl Control {
    pub fn new(
        metrics: Arc<Metrics>,
        snapshot: SharedSnapshot,
        config_path: PathBuf,
        config: Config,
    ) -> Control {
        let workers = metrics.workers.len();
        Control {
            metrics,
            snapshot,
            config_path,
            config: Mutex::new(config),
            ready: AtomicBool::new(false),
            heartbeats: Mutex::new(vec![(0, Instant::now()); workers]),
        }
    }

    /// Re-read the file and publish a new snapshot; a bad file keeps the old one.
    pub fn reload(&self, source: ReloadSource) -> Result<u64, Vec<String>> {
        let control = &self.metrics.control;
        let result = Config::load(&self.config_path).and_then(|config| {
            let generation = self.snapshot.load().generation + 1;
            let snapshot =
                Snapshot::build(&config, generation, &self.metrics).map_err(|e| vec![e])?;
            let mut current = lock(&self.config);
            for ignored in static_changes(&current, &config) {
                tracing::warn!(
                    setting = ignored,
                    "changed in the file but needs a restart; ignored"
                );
            }
            self.snapshot.store(Arc::new(snapshot));
            *current = config;
            Ok(generation)
        });
        match &result {
            Ok(generation) => {
                control.reloads_success.fetch_add(1, Ordering::Relaxed);
                control
                    .config_generation
                    .store(*generation, Ordering::Relaxed);
                control
                    .last_reload_success_unix
                    .store(unix_now(), Ordering::Relaxed);
                tracing::info!(?source, generation, "configuration reloaded");
            }
            Err(errors) => {
                control.reloads_failure.fetch_add(1, Ordering::Relaxed);
                tracing::error!(?source, errors = %errors.join("; "), "reload failed; keeping the routes in force");
            }
        }
        result
    }

    fn workers_healthy(&self) -> bool {
        let mut seen = lock(&self.heartbeats);
        let now = Instant::now();
        let mut healthy = true;
        for (worker, (last_value, last_change)) in self.metrics.workers.iter().zip(seen.iter_mut())
        {
            let value = worker.heartbeat.load(Ordering::Relaxed);
            if value != *last_value {
                *last_value = value;
                *last_change = now;
            } else if now.duration_since(*last_change) > HEARTBEAT_STALE {
                healthy = false;
            }
        }
        healthy
    }

    fn config_dump(&self) -> serde_json::Value {
        let config = lock(&self.config);
        let snapshot = self.snapshot.load();
        serde_json::json!({
            "generation": snapshot.generation,
            "io_driver": self.metrics.io_driver,
            "version": env!("CARGO_PKG_VERSION"),
            "revision": crate::version::GIT_REVISION,
            "config_path": self.config_path.display().to_string(),
            "listeners": config.listeners.iter().map(|l| serde_json::json!({
                "name": l.name, "address": l.address.to_string(),
            })).collect::<Vec<_>>(),
            "admin": config.admin.map(|a| a.to_string()),
            "workers": { "count": self.metrics.workers.len(), "pin": config.workers.pin },
            "timeouts": {
                "client_hello": format!("{:?}", config.timeouts.client_hello),
                "connect": format!("{:?}", config.timeouts.connect),
                "idle": format!("{:?}", config.timeouts.idle),
            },
            "limits": {
                "client_hello_max_bytes": config.limits.client_hello_max_bytes,
                "endpoint_backoff": format!("{:?}", config.limits.endpoint_backoff),
            },
            "routes": snapshot.table.clusters().iter().map(|c| serde_json::json!({
                "sni": c.pattern.to_string(),
                "endpoints": c.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                "destination_service": c.labels.service,
                "destination_datacenter": c.labels.datacenter,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Settings a reload cannot change in this version (they need a restart).
fn static_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.listeners != new.listeners {
        changed.push("listener");
    }
    if old.admin != new.admin {
        changed.push("admin");
    }
    if old.workers != new.workers {
        changed.push("workers");
    }
    if old.access_log != new.access_log {
        changed.push("access_log");
    }
    if old.limits.max_connections != new.limits.max_connections {
        changed.push("limits.max_connections");
    }
    changed
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Serve the admin API and handle signals until SIGTERM or SIGINT.
pub async fn run(control: Arc<Control>, admin: Option<tokio::net::TcpListener>) {
    if let Some(listener) = admin {
        let control = Arc::clone(&control);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let control = Arc::clone(&control);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let control = Arc::clone(&control);
                        async move { Ok::<_, Infallible>(handle(&control, request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    let signals = (
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()),
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
    );
    let (Ok(mut hangup), Ok(mut terminate), Ok(mut interrupt)) = signals else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = hangup.recv() => { let _ = control.reload(ReloadSource::Signal); }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("stopping");
}

fn handle(control: &Control, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    match (request.method(), path) {
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            control.metrics.render(),
        ),
        (&Method::GET, "/ready") => {
            if control.ready.load(Ordering::Relaxed) {
                respond(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready\n".into(),
                )
            }
        }
        (&Method::GET, "/healthz") => {
            if control.workers_healthy() {
                respond(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "a worker's heartbeat is stale\n".into(),
                )
            }
        }
        (&Method::GET, "/config_dump") => respond(
            StatusCode::OK,
            "application/json",
            format!("{:#}\n", control.config_dump()),
        ),
        (&Method::POST, "/reload") => match control.reload(ReloadSource::Api) {
            Ok(generation) => respond(
                StatusCode::OK,
                "application/json",
                format!("{}\n", serde_json::json!({ "generation": generation })),
            ),
            Err(errors) => respond(
                StatusCode::BAD_REQUEST,
                "application/json",
                format!("{}\n", serde_json::json!({ "errors": errors })),
            ),
        },
        (_, "/reload") => respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use POST\n".into(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
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
