//! `gateway run`: start the workers, then serve the control thread until told to stop.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use arc_swap::ArcSwap;

use crate::config::Config;
use crate::control::Control;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::worker::{self, Shared};

/// Descriptors kept back from the connection budget for listeners, the admin server, the
/// access log, rings and timers.
const RESERVED_FDS: u64 = 128;

pub fn run(config_path: &Path) -> anyhow::Result<()> {
    match crate::sys::raise_fd_limit() {
        Ok((before, hard)) => tracing::info!(
            soft_before = before,
            soft_now = hard,
            hard,
            "file-descriptor limit"
        ),
        Err(error) => tracing::warn!(%error, "could not raise the file-descriptor limit"),
    }
    let fd_limit = crate::sys::raise_fd_limit().map_or(1024, |(_, hard)| hard);
    let config = Config::load(config_path).map_err(|errors| {
        anyhow!(
            "{} has {} error(s):\n  {}",
            config_path.display(),
            errors.len(),
            errors.join("\n  ")
        )
    })?;

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

    let listener_names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
    let metrics = Arc::new(Metrics::new(workers, listener_names.clone(), io_driver));
    let snapshot = Snapshot::build(&config, 1, &metrics).map_err(|error| anyhow!(error))?;
    metrics
        .control
        .config_generation
        .store(1, Ordering::Relaxed);
    let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));

    // Bind everything before any worker starts, so a busy port fails the start cleanly.
    let defer_seconds =
        u32::try_from(config.timeouts.client_hello.as_secs().max(1)).unwrap_or(u32::MAX);
    let mut per_listener = Vec::new();
    for listener in &config.listeners {
        per_listener.push(
            worker::bind_listener(listener.address, workers, defer_seconds)
                .with_context(|| format!("listener `{}`", listener.name))?,
        );
    }
    let admin = match config.admin {
        Some(address) => {
            let socket = std::net::TcpListener::bind(address)
                .with_context(|| format!("cannot bind the admin address {address}"))?;
            socket.set_nonblocking(true)?;
            Some(socket)
        }
        None => None,
    };
    let access_log = crate::access_log::start(&config.access_log).context("access log")?;

    let shared = Arc::new(Shared {
        metrics: Arc::clone(&metrics),
        snapshot: Arc::clone(&snapshot),
        listener_names,
        access_log,
        max_connections_per_worker: max_connections.div_ceil(workers),
    });
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    for id in 0..workers {
        let sockets: Vec<_> = per_listener
            .iter_mut()
            .map(|sockets| sockets.remove(0))
            .collect();
        let pin_to = config.workers.pin.then(|| cpus[id % cpus.len()]);
        let shared = Arc::clone(&shared);
        let started = started_tx.clone();
        std::thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || worker::run(id, shared, sockets, pin_to, started))
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
    for listener in &config.listeners {
        tracing::info!(listener = %listener.name, address = %listener.address, workers, io_driver, "listening");
    }

    let control = Arc::new(Control::new(
        metrics,
        snapshot,
        config_path.to_owned(),
        config,
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build the control runtime")?;
    runtime.block_on(async {
        let admin = match admin {
            Some(socket) => Some(tokio::net::TcpListener::from_std(socket)?),
            None => None,
        };
        control.ready.store(true, Ordering::Relaxed);
        crate::control::run(Arc::clone(&control), admin).await;
        anyhow::Ok(())
    })?;
    Ok(())
}
