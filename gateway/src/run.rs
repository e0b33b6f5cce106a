//! `gateway run`: take the listening sockets over from a running gateway (hand-over) or bind
//! them, start the workers, then serve the control thread until it is time to exit.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use arc_swap::ArcSwap;

use crate::config::Config;
use crate::context::Shared;
use crate::control::{Control, ControlParts, ListenerEntry};
use crate::logging::LogFilter;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::route_source::RouteOrigin;
use crate::snapshot::Snapshot;
use crate::worker;

/// Tell whoever started us the addresses we bound, one line each on stdout, then
/// `gateway bound: done`. A listener or admin address with port 0 is only known here, so
/// tests and scripts read these lines instead of choosing a port and handing it on. Written
/// whatever the log filter, and never fatal (stdout may be closed).
fn report_bound(entries: &[ListenerEntry], admin: Option<&std::net::TcpListener>) {
    use std::io::Write as _;
    let mut text = String::new();
    for entry in entries {
        text.push_str(&format!(
            "gateway bound: listener {} {}\n",
            entry.name, entry.resolved
        ));
    }
    if let Some(address) = admin.and_then(|socket| socket.local_addr().ok()) {
        text.push_str(&format!("gateway bound: admin {address}\n"));
    }
    text.push_str(&format!("gateway bound: done pid {}\n", std::process::id()));
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Descriptors kept back from the connection budget for listeners, the admin server, the
/// access log, rings and timers.
const RESERVED_FDS: u64 = 128;

pub fn run(config_path: &Path, log_filter: Option<LogFilter>) -> anyhow::Result<()> {
    serve(config_path, log_filter, RouteOrigin::File)
}

/// `gateway run`, or with a route source the same runtime with its routes from that source
/// (`gateway mesh` follows the control plane; `config_path` is then its `--config`, possibly
/// empty).
pub fn serve(
    config_path: &Path,
    log_filter: Option<LogFilter>,
    routes: RouteOrigin,
) -> anyhow::Result<()> {
    let fd_limit = match crate::sys::raise_fd_limit() {
        Ok((before, hard)) => {
            tracing::info!(
                soft_before = before,
                soft_now = hard,
                hard,
                "file-descriptor limit"
            );
            hard
        }
        Err(error) => {
            tracing::warn!(%error, "could not raise the file-descriptor limit");
            1024
        }
    };
    let config = match &routes {
        RouteOrigin::Source(source) => source.initial_config(),
        RouteOrigin::File => Config::load(config_path),
    }
    .map_err(|errors| {
        anyhow!(
            "{} has {} error(s):\n  {}",
            config_path.display(),
            errors.len(),
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n  ")
        )
    })?;

    // Read before anything is bound, so a bad token file fails the start cleanly.
    let admin_token = config
        .admin_token_file
        .as_deref()
        .map(crate::admin::AdminToken::load)
        .transpose()
        .map_err(|error| anyhow!("admin.token_file: {error}"))?;

    let cpus = crate::sys::allowed_cpus();
    let workers = config.workers.count.unwrap_or(cpus.len().max(1));
    let io_driver = worker::io_driver_name();
    if io_driver != "io_uring" {
        tracing::warn!("io_uring is not available (kernel.io_uring_disabled, seccomp, or MONOIO_FORCE_LEGACY_DRIVER); using the epoll driver");
    }
    // Each proxied connection holds two sockets.
    let derived_max = (fd_limit.saturating_sub(RESERVED_FDS) / 2) as usize;
    let max_connections = config.limits.max_connections.unwrap_or(derived_max).max(1);
    if max_connections > derived_max {
        tracing::warn!(
            max_connections,
            derived_max,
            "limits.max_connections exceeds what the file-descriptor limit allows"
        );
    }

    let metrics = Arc::new(Metrics::new(workers, io_driver));
    metrics
        .control
        .max_connections
        .store(max_connections as u64, Ordering::Relaxed);
    // The first snapshot: generation 1, published before any worker or control thread
    // exists; every later one goes through `Control::publish`.
    let table = config.route_table().map_err(|error| anyhow!(error))?;
    let slots = metrics.registry.destination_slots(&table);
    let snapshot = Snapshot::new(table, slots, &config, 1);
    metrics
        .control
        .config_generation
        .store(1, Ordering::Relaxed);
    let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));

    // A running gateway behind the hand-over socket gives us its sockets; otherwise bind.
    // Everything is bound before any worker starts, so a busy port fails the start cleanly.
    let mut inherited = match &config.handover_socket {
        Some(path) => crate::handover::take_over(path)
            .with_context(|| format!("hand-over through {}", path.display()))?,
        None => None,
    };
    let defer_seconds =
        u32::try_from(config.timeouts.client_hello.as_secs().max(1)).unwrap_or(u32::MAX);
    let mut entries = Vec::new();
    let mut per_worker: Vec<Vec<(usize, std::net::TcpListener)>> =
        (0..workers).map(|_| Vec::new()).collect();
    for listener in &config.listeners {
        let slot = metrics
            .registry
            .listener_slot(&listener.name)
            .ok_or_else(|| anyhow!("too many listeners"))?;
        let taken = inherited.as_mut().and_then(|inherited| {
            let position = inherited
                .listeners
                .iter()
                .position(|(offered, _)| offered.configured == listener.address)?;
            Some(inherited.listeners.swap_remove(position))
        });
        let sockets = match taken {
            Some((offered, mut sockets)) => {
                // Fewer inherited sockets than workers: the extra workers join the same
                // SO_REUSEPORT group. More: some workers accept on several.
                while sockets.len() < workers {
                    sockets.push(
                        worker::bind_reuseport(offered.resolved, defer_seconds)
                            .with_context(|| format!("listener `{}`", listener.name))?,
                    );
                }
                tracing::info!(listener = %listener.name, sockets = sockets.len(), "inherited listener");
                sockets
            }
            None => worker::bind_listener_at_start(listener.address, workers, defer_seconds)
                .with_context(|| format!("listener `{}`", listener.name))?,
        };
        let resolved = sockets
            .first()
            .ok_or_else(|| anyhow!("listener `{}` has no socket", listener.name))?
            .local_addr()?;
        for (index, socket) in sockets.iter().enumerate() {
            per_worker[index % workers].push((slot, socket.try_clone()?));
        }
        entries.push(ListenerEntry {
            slot,
            name: listener.name.clone(),
            configured: listener.address,
            resolved,
            sockets,
        });
    }
    if let Some(inherited) = &inherited {
        for (offered, _) in &inherited.listeners {
            tracing::info!(listener = %offered.name, address = %offered.resolved, "not in this configuration; closing the inherited listener");
        }
    }
    let inherited_admin = inherited
        .as_mut()
        .and_then(|inherited| inherited.admin.take());
    let admin = match config.admin {
        Some(address) => {
            let socket = match inherited_admin {
                Some((inherited, socket))
                    if inherited == address
                        || address.port() == 0 && inherited.ip() == address.ip() =>
                {
                    socket
                }
                _ => std::net::TcpListener::bind(address)
                    .with_context(|| format!("cannot bind the admin address {address}"))?,
            };
            socket.set_nonblocking(true)?;
            Some(socket)
        }
        None => None,
    };
    let access_log = crate::access_log::start(
        &config.access_log,
        Arc::clone(&metrics.control.access_log_dropped),
    )
    .context("access log")?;
    let (access_log_sender, access_log_control) = access_log.unzip();

    let shared = Arc::new(Shared {
        metrics: Arc::clone(&metrics),
        snapshot: Arc::clone(&snapshot),
        access_log: access_log_sender,
        max_connections_per_worker: max_connections.div_ceil(workers),
        accepting: AtomicBool::new(true),
        redact_addresses: config.access_log.redact_addresses,
        busy_poll: config.workers.busy_poll,
    });
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let mut worker_commands = Vec::with_capacity(workers);
    for (id, sockets) in per_worker.into_iter().enumerate() {
        let (commands, receiver) = std::sync::mpsc::channel();
        worker_commands.push(commands);
        let pin_to = config.workers.pin.then(|| cpus[id % cpus.len()]);
        let shared = Arc::clone(&shared);
        let started = started_tx.clone();
        std::thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || worker::run(id, shared, sockets, receiver, pin_to, started))
            .context("cannot spawn a worker thread")?;
    }
    drop(started_tx);
    for _ in 0..workers {
        match started_rx.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => bail!(error),
            Err(_) => bail!("a worker exited while starting"),
        }
    }
    for entry in &entries {
        tracing::info!(listener = %entry.name, address = %entry.resolved, workers, io_driver, "listening");
    }
    report_bound(&entries, admin.as_ref());

    let handover_path = config.handover_socket.clone();
    let admin_copy = admin
        .as_ref()
        .map(std::net::TcpListener::try_clone)
        .transpose()?;
    let (control, events) = Control::new(ControlParts {
        metrics,
        snapshot,
        shared,
        config_path: config_path.to_owned(),
        config,
        routes,
        notifier: Notifier::from_env(),
        log_filter,
        access_log: access_log_control,
        admin_token,
        listeners: entries,
        worker_commands,
        admin_socket: admin_copy,
        defer_accept_seconds: defer_seconds,
    });
    let control = Arc::new(control);

    // Our workers accept on every inherited socket: the old process may stop now.
    if let Some(inherited) = inherited {
        let old_pid = inherited.old_pid;
        match inherited.complete() {
            Ok(()) => tracing::info!(old_pid, "hand-over complete; the old process drains"),
            Err(error) => {
                tracing::warn!(old_pid, %error, "the old process did not confirm the hand-over")
            }
        }
    }
    if let Some(path) = handover_path {
        let listener = crate::handover::bind(&path)?;
        let control = Arc::clone(&control);
        std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || crate::handover::serve(listener, control))
            .context("cannot spawn the hand-over thread")?;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build the control runtime")?;
    runtime.block_on(async {
        let admin = match admin {
            Some(socket) => Some(tokio::net::TcpListener::from_std(socket)?),
            None => None,
        };
        if let RouteOrigin::Source(source) = &control.routes {
            tokio::spawn(Arc::clone(source).follow(Arc::clone(&control)));
        }
        // A mesh gateway routes nothing until its first route table arrives: `/ready` stays
        // 503 until the follower has applied it (the process itself is up, so the service
        // manager is told it started).
        if let RouteOrigin::File = control.routes {
            control.ready.store(true, Ordering::Relaxed);
        }
        control.notifier.ready("serving");
        crate::lifecycle::run(Arc::clone(&control), admin, events).await;
        if let RouteOrigin::Source(source) = &control.routes {
            // With a hand-over socket a successor may have taken over and keeps the
            // registration; otherwise a clean stop leaves the catalog.
            let successor_possible = crate::control::lock(&control.config)
                .handover_socket
                .is_some();
            Arc::clone(source).stop(successor_possible).await;
        }
        anyhow::Ok(())
    })?;
    Ok(())
}
