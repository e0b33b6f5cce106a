//! The seam through which routes that do not come from the configuration file reach the
//! runtime. `gateway mesh` follows a control plane through it; the gateway package itself
//! knows nothing of control planes, so its dependency tree stays free of their clients.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::config::{Config, ConfigErrors};
use crate::control::Control;

/// A future a route source runs on the control thread's runtime.
pub type SourceFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A supplier of route tables other than the configuration file.
pub trait RouteSource: Send + Sync + 'static {
    /// The configuration the runtime starts with (listeners, admin, workers, timeouts). Its
    /// routes are not used: the source publishes its own with [`Control::publish_routes`].
    fn initial_config(&self) -> Result<Config, ConfigErrors>;

    /// Follow the source until the process stops, publishing each new table with
    /// [`Control::publish_routes`] and setting `control.ready` once the first one is applied.
    /// It never returns an error: the last snapshot serves while the source is away.
    fn follow(self: Arc<Self>, control: Arc<Control>) -> SourceFuture;

    /// Called once the control loop has ended. `successor_possible` is true when a new
    /// process may have taken the sockets over (a hand-over socket is configured).
    fn stop(self: Arc<Self>, successor_possible: bool) -> SourceFuture;

    /// Append this source's Prometheus text to `/metrics`.
    fn render_metrics(&self, out: &mut prom_text::Writer<'_>);
}

/// Where the route table comes from: the file (`gateway run`), or a source that publishes
/// its own (`gateway mesh`), in which case a reload re-reads everything but the routes.
#[derive(Clone)]
pub enum RouteOrigin {
    File,
    Source(Arc<dyn RouteSource>),
}

impl RouteOrigin {
    pub fn source(&self) -> Option<&dyn RouteSource> {
        match self {
            RouteOrigin::File => None,
            RouteOrigin::Source(source) => Some(source.as_ref()),
        }
    }
}
