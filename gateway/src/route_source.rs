//! The seam through which routes that do not come from the configuration file reach the
//! runtime. `gateway mesh` follows a control plane through it; the gateway package itself
//! knows nothing of control planes, so its dependency tree stays free of their clients.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::Config;
use crate::control::{lock, Control};
use crate::routes::RouteSpec;
use crate::snapshot::Snapshot;

/// A future a route source runs on the control thread's runtime.
pub type SourceFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A supplier of route tables other than the configuration file.
pub trait RouteSource: Send + Sync + 'static {
    /// The configuration the runtime starts with (listeners, admin, workers, timeouts). Its
    /// routes are not used: the source publishes its own with [`publish`].
    fn initial_config(&self) -> Result<Config, Vec<String>>;

    /// Follow the source until the process stops, publishing each new table with [`publish`]
    /// and setting `control.ready` once the first one is applied. It never returns an error:
    /// the last snapshot serves while the source is away.
    fn follow(self: Arc<Self>, control: Arc<Control>) -> SourceFuture;

    /// Called once the control loop has ended. `successor_possible` is true when a new
    /// process may have taken the sockets over (a hand-over socket is configured).
    fn stop(self: Arc<Self>, successor_possible: bool) -> SourceFuture;

    /// Append this source's Prometheus text to `/metrics`.
    fn render_metrics(&self, out: &mut prom_text::Writer<'_>);
}

/// Publish `routes` as a new snapshot (the file's listeners, timeouts and limits stay).
/// Returns the gateway's new generation.
pub fn publish(control: &Control, routes: Vec<RouteSpec>) -> Result<u64, String> {
    let mut current = lock(&control.config);
    let mut next = current.clone();
    next.routes = routes;
    let generation = control.snapshot.load().generation + 1;
    let snapshot = Snapshot::build(&next, generation, &control.metrics)?;
    control.snapshot.store(Arc::new(snapshot));
    control
        .metrics
        .control
        .config_generation
        .store(generation, Ordering::Relaxed);
    *current = next;
    Ok(generation)
}
