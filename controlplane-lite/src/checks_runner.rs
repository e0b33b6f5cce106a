//! The IO shell around [`crate::checks`]: keeps time, runs the due TCP/HTTP probes (each
//! bounded by its timeout), turns silent TTL checks critical, deregisters services that stayed
//! critical too long, and writes every status change to the store. A write moves the
//! `checks` table's index, which wakes blocking queries and the mesh gateways' and sidecars'
//! route snapshots that depend on it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use crate::agent::Agent;
use crate::checks::{
    expired_ttls, http_status, to_deregister, transition, HealthCheck, Probe, Scheduler, CRITICAL,
    PASSING,
};
use crate::error::{Error, Result};
use crate::store::{Index, Table};

/// Longest sleep with nothing due (the loop also wakes on every change to the checks).
const IDLE: Duration = Duration::from_secs(60);
/// Pause after a store error before trying again.
const RETRY: Duration = Duration::from_secs(1);

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Starts the runner on the current tokio runtime. Only the datacenter's leader runs it (two
/// agents probing and writing one check would make it flap), and aborts it when it stops leading.
pub fn spawn(agent: &Arc<Agent>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(agent.clone()))
}

/// A probe's outcome: check ID, status, output.
type Outcome = (String, &'static str, String);

async fn store_write<R: Send + 'static>(
    agent: &Arc<Agent>,
    body: impl FnMut(&mut crate::store::Transaction<'_>) -> Result<R> + Send + 'static,
) -> Result<R> {
    let agent = agent.clone();
    // Check status is a leader's duty result: fenced on its leadership.
    tokio::task::spawn_blocking(move || agent.duty_write(body))
        .await
        .map_err(|e| Error::Internal(format!("check write: {e}")))?
}

async fn run(agent: Arc<Agent>) {
    let mut scheduler = Scheduler::default();
    let mut changes = agent.store.subscribe(Table::Checks);
    let mut shutdown = agent.shutdown.subscribe();
    let (results_tx, mut results) = mpsc::channel::<Outcome>(256);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let now = now_ms();
        let wake = match step(&agent, &mut scheduler, &results_tx, now).await {
            Ok(wake) => wake,
            Err(e) => {
                tracing::warn!(error = %e, "health checks: store error; retrying");
                RETRY
            }
        };
        tokio::select! {
            Some(outcome) = results.recv() => {
                if let Err(e) = record(&agent, &mut scheduler, outcome).await {
                    tracing::warn!(error = %e, "health checks: could not record a result");
                }
            }
            _ = changes.changed() => {}
            () = tokio::time::sleep(wake) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// Resolves once the agent is stopping (the watch guard is dropped before returning, so the
/// future stays `Send`).
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

/// One round: expiries and deregistrations are written, due probes started. Returns how long
/// to sleep until something is next due.
async fn step(
    agent: &Arc<Agent>,
    scheduler: &mut Scheduler,
    results: &mpsc::Sender<Outcome>,
    now: u64,
) -> Result<Duration> {
    // Only checks with timers (TTL, probes, deregistration): alias checks, one per sidecar,
    // have nothing to schedule, and scanning them would cost every write the catalog's size.
    let checks: Vec<HealthCheck> = agent.store.list_by(Index::TimedCheck, "")?;
    let expired = expired_ttls(&checks, now);
    let doomed = to_deregister(&checks, now);
    if !expired.is_empty() || !doomed.is_empty() {
        for service in &doomed {
            tracing::info!(service, "deregistering a service critical for too long");
        }
        store_write(agent, move |tx| {
            for check in expired.clone() {
                let mut check = check;
                check.modify_index = tx.index();
                tx.put(Table::Checks, &check.check_id.clone(), &check)?;
            }
            for service in doomed.clone() {
                crate::http::deregister_service(tx, &service)?;
            }
            Ok(())
        })
        .await?;
        // The write wakes the loop, which reads the new state.
        return Ok(Duration::ZERO);
    }
    for probe in scheduler.due(&checks, now) {
        let results = results.clone();
        tokio::spawn(async move {
            let outcome = run_probe(probe).await;
            let _ = results.send(outcome).await;
        });
    }
    Ok(scheduler
        .next_wake(&checks)
        .map_or(IDLE, |at| Duration::from_millis(at.saturating_sub(now)))
        .min(IDLE))
}

/// Stores a probe's result if it changes what clients see.
async fn record(agent: &Arc<Agent>, scheduler: &mut Scheduler, outcome: Outcome) -> Result<()> {
    let (check_id, status, output) = outcome;
    let now = now_ms();
    let Some(check) = agent.store.get::<HealthCheck>(Table::Checks, &check_id)? else {
        scheduler.abandoned(&check_id);
        return Ok(());
    };
    scheduler.finished(&check, now);
    let Some(next) = transition(&check, status, &output, now) else {
        return Ok(());
    };
    store_write(agent, move |tx| {
        // Written only if the check is still the one probed (not deregistered meanwhile).
        if tx.get::<HealthCheck>(Table::Checks, &check_id)?.is_some() {
            let mut next = next.clone();
            next.modify_index = tx.index();
            tx.put(Table::Checks, &check_id, &next)?;
        }
        Ok(())
    })
    .await
}

async fn run_probe(probe: Probe) -> Outcome {
    match probe {
        Probe::Tcp {
            check_id,
            address,
            timeout,
        } => {
            let (status, output) =
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&address)).await
                {
                    Ok(Ok(_)) => (PASSING, format!("TCP connect {address}: Success")),
                    Ok(Err(e)) => (CRITICAL, format!("dial tcp {address}: {e}")),
                    Err(_) => (CRITICAL, format!("dial tcp {address}: i/o timeout")),
                };
            (check_id, status, output)
        }
        Probe::Http {
            check_id,
            url,
            method,
            timeout,
        } => {
            let request = (url.clone(), method.clone());
            let answer =
                tokio::task::spawn_blocking(move || http_probe(&request.0, &request.1, timeout))
                    .await;
            let (status, output) = match answer {
                Ok(Ok(code)) => (http_status(code), format!("HTTP {method} {url}: {code}")),
                Ok(Err(e)) => (CRITICAL, format!("HTTP {method} {url}: {e}")),
                Err(e) => (CRITICAL, format!("HTTP {method} {url}: {e}")),
            };
            (check_id, status, output)
        }
    }
}

fn http_probe(url: &str, method: &str, timeout: Duration) -> std::result::Result<u16, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into();
    let response = match method {
        "HEAD" => agent.head(url).call(),
        "POST" => agent.post(url).send_empty(),
        "PUT" => agent.put(url).send_empty(),
        _ => agent.get(url).call(),
    }
    .map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}
