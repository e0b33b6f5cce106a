//! The control loop: signals, admin events, the drain state machine, the systemd watchdog.
//!
//! ```text
//!            SIGTERM / POST /drain                 announce over
//! Running ───────────────────────────▶ Announcing ───────────────▶ Closing ──▶ exit 0
//!    │        /ready 503, draining 1,   (still accepting)   listeners   (no connections
//!    │        STOPPING=1                                     closed      left, or timeout:
//!    │                                                                   the rest closed)
//!    └── hand-over done ──────────────────────────────────────▶ Closing
//!         (the new process accepts on the same sockets; admin handed over too)
//!
//! SIGINT, or a second SIGTERM or SIGINT while draining: exit at once.
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

use crate::control::{Control, Event};
use crate::metrics::ReloadSource;

/// How often the loop checks drain progress and worker heartbeats.
const TICK: Duration = Duration::from_millis(100);

/// How long the access log gets to write its last lines before exit.
const ACCESS_LOG_FLUSH: Duration = Duration::from_secs(2);

enum Phase {
    Running,
    /// `/ready` says 503; listeners still accept until `until`.
    Announcing {
        until: Instant,
    },
    /// Listeners closed; open connections have until `deadline`.
    Closing {
        deadline: Instant,
    },
}

/// Serve the admin API and handle signals until the gateway should exit.
pub async fn run(
    control: Arc<Control>,
    admin: Option<tokio::net::TcpListener>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
) {
    let (stop_admin, admin_stopped) = tokio::sync::watch::channel(false);
    if let Some(listener) = admin {
        tokio::spawn(crate::admin::serve(
            Arc::clone(&control),
            listener,
            admin_stopped,
        ));
    }
    let signals = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
    );
    let (Ok(mut hangup), Ok(mut terminate), Ok(mut interrupt), Ok(mut user1)) = signals else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let mut phase = Phase::Running;
    let mut handed_over = false;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watchdog = Watchdog::new(&control);
    loop {
        tokio::select! {
            _ = hangup.recv() => { let _ = control.reload(ReloadSource::Sighup); }
            _ = user1.recv() => {
                if let Some(log) = &control.access_log {
                    log.reopen();
                    tracing::info!("reopening the access log");
                }
            }
            _ = terminate.recv() => {
                if matches!(phase, Phase::Running) {
                    phase = begin_drain(&control, "SIGTERM");
                } else {
                    tracing::warn!(open = control.active_connections(), "second SIGTERM: exiting now");
                    break;
                }
            }
            _ = interrupt.recv() => {
                tracing::warn!(open = control.active_connections(), "SIGINT: exiting now");
                break;
            }
            Some(event) = events.recv() => match event {
                Event::Drain => {
                    if matches!(phase, Phase::Running) {
                        phase = begin_drain(&control, "POST /drain");
                    }
                }
                Event::HandOver(done) => {
                    control.metrics.control.draining.store(true, Ordering::Relaxed);
                    control.stop_accepting();
                    control.release_admin_socket();
                    let _ = stop_admin.send(true);
                    handed_over = true;
                    let _ = done.send(());
                    phase = Phase::Closing { deadline: Instant::now() + drain_settings(&control).timeout };
                }
            },
            _ = tick.tick() => {
                watchdog.check(&control);
                let now = Instant::now();
                match phase {
                    Phase::Running => {}
                    Phase::Announcing { until } => {
                        if now >= until {
                            phase = close_listeners(&control);
                        }
                    }
                    Phase::Closing { deadline } => {
                        let open = control.active_connections();
                        if open == 0 && control.open_listener_sockets() == 0 {
                            tracing::info!("drained: no connections left");
                            break;
                        }
                        if now >= deadline {
                            tracing::warn!(open, "drain timeout: closing the remaining connections");
                            break;
                        }
                    }
                }
            }
        }
    }
    if let Some(log) = &control.access_log {
        log.flush(ACCESS_LOG_FLUSH);
    }
    if !handed_over {
        // The next process binds it afresh; a hand-over's new owner has already rebound it.
        let path = crate::control::lock(&control.config)
            .handover_socket
            .clone();
        if let Some(path) = path {
            let _ = std::fs::remove_file(path);
        }
    }
    tracing::info!("stopped");
}

fn drain_settings(control: &Control) -> crate::config::Drain {
    crate::control::lock(&control.config).drain
}

fn begin_drain(control: &Control, source: &str) -> Phase {
    let drain = drain_settings(control);
    control
        .metrics
        .control
        .draining
        .store(true, Ordering::Relaxed);
    control.notifier.stopping("draining");
    tracing::info!(
        source,
        announce = ?drain.announce,
        timeout = ?drain.timeout,
        open = control.active_connections(),
        "draining: /ready now answers 503"
    );
    if drain.announce.is_zero() {
        close_listeners(control)
    } else {
        Phase::Announcing {
            until: Instant::now() + drain.announce,
        }
    }
}

fn close_listeners(control: &Control) -> Phase {
    control.stop_accepting();
    let drain = drain_settings(control);
    tracing::info!(
        open = control.active_connections(),
        timeout = ?drain.timeout,
        "listeners closed; waiting for open connections"
    );
    Phase::Closing {
        deadline: Instant::now() + drain.timeout,
    }
}

/// `WATCHDOG=1` only while every worker's heartbeat advances: a stuck worker stops the
/// pings and systemd restarts the service after `WatchdogSec`.
struct Watchdog {
    /// Ping at most this often (a quarter of `WATCHDOG_USEC`).
    interval: Option<Duration>,
    last_ping: Instant,
    heartbeats: Vec<u64>,
}

impl Watchdog {
    fn new(control: &Control) -> Watchdog {
        Watchdog {
            interval: control.notifier.watchdog.map(|period| period / 4),
            last_ping: Instant::now(),
            heartbeats: control
                .metrics
                .workers
                .iter()
                .map(|w| w.heartbeat.load(Ordering::Relaxed))
                .collect(),
        }
    }

    fn check(&mut self, control: &Control) {
        let Some(interval) = self.interval else {
            return;
        };
        if self.last_ping.elapsed() < interval {
            return;
        }
        let all_advanced = control
            .metrics
            .workers
            .iter()
            .zip(&self.heartbeats)
            .all(|(worker, last)| worker.heartbeat.load(Ordering::Relaxed) != *last);
        if all_advanced {
            control.notifier.watchdog();
            self.last_ping = Instant::now();
            for (last, worker) in self
                .heartbeats
                .iter_mut()
                .zip(control.metrics.workers.iter())
            {
                *last = worker.heartbeat.load(Ordering::Relaxed);
            }
        }
    }
}
