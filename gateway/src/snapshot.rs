//! What a connection decision reads: one immutable value, published whole.
//!
//! The control thread builds a [`Snapshot`] from the configuration (or, later, from the
//! control plane) and stores it in an `ArcSwap`. Each worker keeps its own `Rc` of the current
//! one and checks for a newer generation once per accepted connection, so the hot path never
//! touches a shared reference count; a connection keeps the snapshot it started with.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Config, Limits, Timeouts};
use crate::metrics::Metrics;
use crate::routes::RouteTable;

pub struct Snapshot {
    pub generation: u64,
    pub table: RouteTable,
    /// Metric slot of each cluster, by cluster index.
    pub slots: Vec<usize>,
    pub timeouts: Timeouts,
    pub limits: Limits,
}

impl Snapshot {
    pub fn build(config: &Config, generation: u64, metrics: &Metrics) -> Result<Snapshot, String> {
        let table = config.route_table()?;
        let slots = table
            .clusters()
            .iter()
            .map(|cluster| metrics.destination_slot(&cluster.labels))
            .collect();
        Ok(Snapshot {
            generation,
            table,
            slots,
            timeouts: config.timeouts,
            limits: config.limits,
        })
    }
}

pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;
