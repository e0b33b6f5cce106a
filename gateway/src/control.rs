//! The control thread's state: the configuration in force, reloads (routes and listeners),
//! the listening sockets it keeps copies of (for hand-over and reload), and what workers are
//! told. It runs on a single-threaded tokio runtime (`lifecycle::run`); workers never wait on
//! it — they only read the snapshots and flags it publishes.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::access_log::AccessLogControl;
use crate::config::{Config, ConfigError, Listener};
use crate::context::{Shared, WorkerCommand};
use crate::handover::{Offer, OfferedListener};
use crate::logging::LogFilter;
use crate::metrics::{Metrics, ReloadSource};
use crate::notify::Notifier;
use crate::route_source::RouteOrigin;
use crate::routes::{RouteSpec, RouteTable};
use crate::snapshot::{SharedSnapshot, Snapshot};

/// A worker whose heartbeat has not moved for this long is reported unhealthy (it beats
/// every `context::TICK`).
const HEARTBEAT_STALE: Duration = Duration::from_secs(3);

/// An open listener: its metric slot and the control thread's own copies (dups) of the
/// sockets its workers accept on. The copies are what a hand-over sends and what a reload
/// moves; dropping the entry closes the listener once the workers dropped theirs.
pub struct ListenerEntry {
    pub slot: usize,
    pub name: String,
    /// The address in the file (may have port 0).
    pub configured: SocketAddr,
    /// The address the sockets are bound to.
    pub resolved: SocketAddr,
    pub sockets: Vec<std::net::TcpListener>,
}

/// Why a reload was refused; the configuration in force stays. `Display` is what the log and
/// `POST /reload`'s `errors` say.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The gateway is draining (an operator or a hand-over asked it to stop).
    #[error("draining: reloads are refused")]
    Draining,
    /// The file has an error (the operator's to fix).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Every listener slot this process may name is used; a restart frees them.
    #[error("listener `{name}`: this process has used all {max} listener slots; restart to add more", max = crate::config::MAX_LISTENERS)]
    ListenerSlots { name: String },
    /// A new listener's sockets cannot be opened (the address is taken or not ours).
    #[error("listener `{name}`: {source}")]
    Listen {
        name: String,
        source: std::io::Error,
    },
}

/// What the admin API and the hand-over thread ask of the control loop.
pub enum Event {
    /// `POST /drain`.
    Drain,
    /// A new process has taken the sockets over and is accepting: stop accepting, give up
    /// the admin socket, drain. Answered once done.
    HandOver(Sender<()>),
}

pub struct Control {
    pub metrics: Arc<Metrics>,
    pub snapshot: SharedSnapshot,
    pub shared: Arc<Shared>,
    pub config_path: PathBuf,
    /// The configuration the snapshot in force was built from.
    pub config: Mutex<Config>,
    pub ready: AtomicBool,
    /// Where routes come from; with a source (`gateway mesh`) a reload keeps its routes.
    pub routes: RouteOrigin,
    pub notifier: Notifier,
    pub log_filter: Option<LogFilter>,
    pub access_log: Option<AccessLogControl>,
    /// `[admin] token_file`'s token, required by mutating admin requests when set.
    pub admin_token: Option<crate::admin::AdminToken>,
    pub started: Instant,
    heartbeats: Mutex<Vec<(u64, Instant)>>,
    listeners: Mutex<Vec<ListenerEntry>>,
    worker_commands: Vec<Sender<WorkerCommand>>,
    /// A copy of the admin listening socket, for a hand-over.
    admin_socket: Mutex<Option<std::net::TcpListener>>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    defer_accept_seconds: u32,
}

/// Everything `Control::new` needs (built by `run`).
pub struct ControlParts {
    pub metrics: Arc<Metrics>,
    pub snapshot: SharedSnapshot,
    pub shared: Arc<Shared>,
    pub config_path: PathBuf,
    pub config: Config,
    pub routes: RouteOrigin,
    pub notifier: Notifier,
    pub log_filter: Option<LogFilter>,
    pub access_log: Option<AccessLogControl>,
    pub admin_token: Option<crate::admin::AdminToken>,
    pub listeners: Vec<ListenerEntry>,
    pub worker_commands: Vec<Sender<WorkerCommand>>,
    pub admin_socket: Option<std::net::TcpListener>,
    pub defer_accept_seconds: u32,
}

impl Control {
    pub fn new(parts: ControlParts) -> (Control, tokio::sync::mpsc::UnboundedReceiver<Event>) {
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        let workers = parts.metrics.workers.len();
        let control = Control {
            metrics: parts.metrics,
            snapshot: parts.snapshot,
            shared: parts.shared,
            config_path: parts.config_path,
            config: Mutex::new(parts.config),
            ready: AtomicBool::new(false),
            routes: parts.routes,
            notifier: parts.notifier,
            log_filter: parts.log_filter,
            access_log: parts.access_log,
            admin_token: parts.admin_token,
            started: Instant::now(),
            heartbeats: Mutex::new(vec![(0, Instant::now()); workers]),
            listeners: Mutex::new(parts.listeners),
            worker_commands: parts.worker_commands,
            admin_socket: Mutex::new(parts.admin_socket),
            events,
            defer_accept_seconds: parts.defer_accept_seconds,
        };
        (control, receiver)
    }

    pub fn draining(&self) -> bool {
        self.metrics.control.draining.load(Ordering::Relaxed)
    }

    pub fn send(&self, event: Event) -> bool {
        self.events.send(event).is_ok()
    }

    /// Re-read the file and publish a new snapshot, opening and closing listeners as the file
    /// says; a bad file (or a listener that cannot be bound) keeps everything as it was.
    pub fn reload(&self, source: ReloadSource) -> Result<u64, Vec<ReloadError>> {
        let draining = self.draining();
        if !draining {
            self.notifier.reloading();
        }
        let result = self.try_reload();
        let control = &self.metrics.control;
        control.reload(source, result.is_ok());
        match &result {
            Ok(generation) => {
                control
                    .last_reload_success_unix
                    .store(unix_now(), Ordering::Relaxed);
                tracing::info!(?source, generation, "configuration reloaded");
            }
            Err(errors) => {
                let errors = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                tracing::error!(?source, %errors, "reload failed; keeping the configuration in force");
            }
        }
        if !draining {
            self.notifier.ready("serving");
        }
        result
    }

    fn try_reload(&self) -> Result<u64, Vec<ReloadError>> {
        if self.draining() {
            return Err(vec![ReloadError::Draining]);
        }
        let mut config = Config::load(&self.config_path).map_err(|errors| {
            errors
                .into_iter()
                .map(ReloadError::from)
                .collect::<Vec<_>>()
        })?;
        let mut current = lock(&self.config);
        if let RouteOrigin::Source(_) = self.routes {
            config.routes = current.routes.clone();
            config.default_route = None;
        }
        let table = config.route_table().map_err(|error| {
            vec![ReloadError::Config(ConfigError::Key {
                key: "route".into(),
                problem: crate::config::Problem::Invalid(error),
            })]
        })?;
        let plan = self.plan_listeners(&config.listeners)?;
        for ignored in static_changes(&current, &config) {
            tracing::warn!(
                setting = ignored,
                "changed in the file but needs a restart; ignored"
            );
        }
        let generation = self.publish(&mut current, config, table);
        self.apply_listeners(plan);
        Ok(generation)
    }

    /// Publish `routes` from the route source as a new snapshot (the file's listeners,
    /// timeouts and limits stay). Returns the gateway's new generation.
    pub fn publish_routes(&self, routes: Vec<RouteSpec>) -> Result<u64, String> {
        let mut current = lock(&self.config);
        let mut next = current.clone();
        next.routes = routes;
        let table = next.route_table()?;
        Ok(self.publish(&mut current, next, table))
    }

    /// The one way a snapshot replaces the one in force, for a reload and for a route
    /// source alike: its destinations get their metric slots, workers see it on their next
    /// accepted connection, the generation gauge moves, and `config` becomes the
    /// configuration in force. Everything that can fail was checked before.
    fn publish(&self, current: &mut Config, config: Config, table: RouteTable) -> u64 {
        let generation = self.snapshot.load().generation + 1;
        let slots = self.metrics.registry.destination_slots(&table);
        let snapshot = Snapshot::new(table, slots, &config, generation);
        self.snapshot.store(Arc::new(snapshot));
        self.metrics
            .control
            .config_generation
            .store(generation, Ordering::Relaxed);
        *current = config;
        generation
    }

    /// `/metrics`: the gateway's own, with the route source's.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.snapshot.load(), |out| {
            if let Some(source) = self.routes.source() {
                source.render_metrics(out);
            }
        })
    }

    /// Work out which listeners to close and which to open, binding the new ones now so a
    /// busy port fails the reload before anything changed. A listener whose address a removed
    /// listener had takes that listener's sockets over (no rebind, no lost queue).
    fn plan_listeners(&self, wanted: &[Listener]) -> Result<ListenerPlan, Vec<ReloadError>> {
        let entries = lock(&self.listeners);
        let same = |entry: &ListenerEntry, listener: &Listener| {
            entry.name == listener.name && entry.configured == listener.address
        };
        let removed: Vec<usize> = entries
            .iter()
            .enumerate()
            .filter(|(_, entry)| !wanted.iter().any(|listener| same(entry, listener)))
            .map(|(index, _)| index)
            .collect();
        let mut added = Vec::new();
        let mut errors = Vec::new();
        for listener in wanted
            .iter()
            .filter(|listener| !entries.iter().any(|entry| same(entry, listener)))
        {
            let Some(slot) = self.metrics.registry.listener_slot(&listener.name) else {
                errors.push(ReloadError::ListenerSlots {
                    name: listener.name.clone(),
                });
                continue;
            };
            let moved = removed
                .iter()
                .map(|&index| &entries[index])
                .find(|entry| entry.configured == listener.address);
            let sockets = match moved {
                Some(entry) => entry
                    .sockets
                    .iter()
                    .map(std::net::TcpListener::try_clone)
                    .collect(),
                None => crate::worker::bind_listener(
                    listener.address,
                    self.worker_commands.len(),
                    self.defer_accept_seconds,
                ),
            };
            match sockets.and_then(|sockets| {
                let resolved = sockets
                    .first()
                    .ok_or_else(|| std::io::Error::other("no socket"))?
                    .local_addr()?;
                Ok((sockets, resolved))
            }) {
                Ok((sockets, resolved)) => added.push(ListenerEntry {
                    slot,
                    name: listener.name.clone(),
                    configured: listener.address,
                    resolved,
                    sockets,
                }),
                Err(source) => errors.push(ReloadError::Listen {
                    name: listener.name.clone(),
                    source,
                }),
            }
        }
        if errors.is_empty() {
            Ok(ListenerPlan { removed, added })
        } else {
            Err(errors)
        }
    }

    fn apply_listeners(&self, plan: ListenerPlan) {
        let mut entries = lock(&self.listeners);
        // Close before listen: a listener that changed address keeps its slot, and the worker
        // must stop the old sockets' loops before it starts the new ones.
        for &index in plan.removed.iter().rev() {
            let entry = entries.remove(index);
            tracing::info!(listener = %entry.name, address = %entry.resolved, "closing listener");
            for commands in &self.worker_commands {
                let _ = commands.send(WorkerCommand::Close { slot: entry.slot });
            }
        }
        for entry in plan.added {
            for (index, socket) in entry.sockets.iter().enumerate() {
                let commands = &self.worker_commands[index % self.worker_commands.len()];
                match socket.try_clone() {
                    Ok(socket) => {
                        let _ = commands.send(WorkerCommand::Listen {
                            slot: entry.slot,
                            socket,
                        });
                    }
                    Err(error) => {
                        tracing::error!(listener = %entry.name, %error, "cannot hand a socket to a worker");
                    }
                }
            }
            tracing::info!(listener = %entry.name, address = %entry.resolved, "listening");
            entries.push(entry);
        }
    }

    /// Stop accepting for good: workers close their sockets within a tick, and the control
    /// thread drops its copies, so the listeners are closed (unless a new process holds them).
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::Relaxed);
        lock(&self.listeners).clear();
    }

    /// Give up the admin socket copy (after a hand-over, the new process serves admin).
    pub fn release_admin_socket(&self) {
        lock(&self.admin_socket).take();
    }

    /// What a new process gets in a hand-over: a description and a copy of every listening
    /// socket (and of the admin socket), in the order described.
    pub fn handover_offer(&self) -> Result<(Offer, Vec<OwnedFd>), String> {
        if self.draining() {
            return Err("this gateway is draining".into());
        }
        let entries = lock(&self.listeners);
        let mut fds = Vec::new();
        let mut listeners = Vec::new();
        for entry in entries.iter() {
            for socket in &entry.sockets {
                fds.push(OwnedFd::from(
                    socket.try_clone().map_err(|error| error.to_string())?,
                ));
            }
            listeners.push(OfferedListener {
                name: entry.name.clone(),
                configured: entry.configured,
                resolved: entry.resolved,
                sockets: entry.sockets.len(),
            });
        }
        let admin = match lock(&self.admin_socket).as_ref() {
            Some(socket) => {
                let address = socket.local_addr().map_err(|error| error.to_string())?;
                fds.push(OwnedFd::from(
                    socket.try_clone().map_err(|error| error.to_string())?,
                ));
                Some(address)
            }
            None => None,
        };
        Ok((
            Offer {
                pid: std::process::id(),
                listeners,
                admin,
                error: None,
            },
            fds,
        ))
    }

    pub fn workers_healthy(&self) -> bool {
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

    /// Open downstream connections, over all workers.
    pub fn active_connections(&self) -> u64 {
        self.metrics
            .workers
            .iter()
            .map(|w| w.connections_active.load(Ordering::Relaxed))
            .sum()
    }

    /// Listening sockets workers still accept on.
    pub fn open_listener_sockets(&self) -> u64 {
        self.metrics
            .workers
            .iter()
            .flat_map(|w| w.listeners.iter())
            .map(|l| l.sockets_open.load(Ordering::Relaxed))
            .sum()
    }

    /// The listeners in force: name, address in the file (port 0 possible), bound address.
    pub fn bound_listeners(&self) -> Vec<(String, SocketAddr, SocketAddr)> {
        lock(&self.listeners)
            .iter()
            .map(|entry| (entry.name.clone(), entry.configured, entry.resolved))
            .collect()
    }

    pub fn config_dump(&self) -> serde_json::Value {
        let config = lock(&self.config);
        let snapshot = self.snapshot.load();
        let entries = lock(&self.listeners);
        let access_log = match &config.access_log.target {
            crate::config::AccessLogTarget::Off => "off".to_owned(),
            crate::config::AccessLogTarget::Stdout => "stdout".to_owned(),
            crate::config::AccessLogTarget::File(path) => path.display().to_string(),
        };
        serde_json::json!({
            "generation": snapshot.generation,
            "pid": std::process::id(),
            "draining": self.draining(),
            "io_driver": self.metrics.io_driver,
            "version": env!("CARGO_PKG_VERSION"),
            "revision": crate::version::GIT_REVISION,
            "config_path": self.config_path.display().to_string(),
            "listeners": entries.iter().map(|l| serde_json::json!({
                "name": l.name,
                "address": l.configured.to_string(),
                "bound": l.resolved.to_string(),
                "sockets": l.sockets.len(),
            })).collect::<Vec<_>>(),
            "admin": config.admin.map(|a| a.to_string()),
            "admin_bound": lock(&self.admin_socket).as_ref().and_then(|socket| socket.local_addr().ok()).map(|a| a.to_string()),
            "handover_socket": config.handover_socket.as_ref().map(|p| p.display().to_string()),
            "admin_token_file": config.admin_token_file.as_ref().map(|p| p.display().to_string()),
            "workers": { "count": self.metrics.workers.len(), "pin": config.workers.pin },
            "timeouts": {
                "client_hello": format!("{:?}", config.timeouts.client_hello),
                "connect": format!("{:?}", config.timeouts.connect),
                "idle": format!("{:?}", config.timeouts.idle),
                "write_stall": format!("{:?}", config.timeouts.write_stall),
            },
            "limits": {
                "max_connections": self.metrics.control.max_connections.load(Ordering::Relaxed),
                "client_hello_max_bytes": config.limits.client_hello_max_bytes,
                "endpoint_backoff": format!("{:?}", config.limits.endpoint_backoff),
            },
            "drain": {
                "announce": format!("{:?}", config.drain.announce),
                "timeout": format!("{:?}", config.drain.timeout),
            },
            "access_log": {
                "path": access_log,
                "redact_addresses": config.access_log.redact_addresses,
            },
            "log_filter": self.log_filter.as_ref().map(LogFilter::current),
            "routes": snapshot.table.clusters().iter().map(|c| serde_json::json!({
                "sni": c.pattern.to_string(),
                "endpoints": c.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                "destination_service": c.labels.service,
                "destination_datacenter": c.labels.datacenter,
            })).collect::<Vec<_>>(),
        })
    }
}

struct ListenerPlan {
    /// Indices into the entries, ascending.
    removed: Vec<usize>,
    added: Vec<ListenerEntry>,
}

/// Settings a reload cannot change in this version (they need a restart).
fn static_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.admin != new.admin {
        changed.push("admin.address");
    }
    if old.handover_socket != new.handover_socket {
        changed.push("admin.handover_socket");
    }
    if old.admin_token_file != new.admin_token_file {
        changed.push("admin.token_file");
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

pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
