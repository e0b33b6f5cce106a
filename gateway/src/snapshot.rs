//! What a connection decision reads: one immutable value, published whole.
//!
//! The control thread builds a [`Snapshot`] from the configuration (or, later, from the
//! control plane) and stores it in an `ArcSwap`. Each worker keeps its own `Rc` of the current
//! one and checks for a newer generation once per accepted connection, so the hot path never
//! touches a shared reference count; a connection keeps the snapshot it started with.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Config, Limits, Timeouts};
use crate::routes::RouteTable;

pub struct Snapshot {
    pub generation: u64,
    pub table: RouteTable,
    /// Metric slot of each cluster, by cluster index.
    pub slots: Vec<usize>,
    /// The endpoints of each metric slot in use, clusters in table order (for
    /// `gateway_cluster_endpoints`; workers publish held-out endpoints as bits in this order).
    pub endpoints_by_slot: Vec<(usize, Vec<SocketAddr>)>,
    pub timeouts: Timeouts,
    pub limits: Limits,
}

impl Snapshot {
    /// The snapshot of a validated route table with `config`'s timeouts and limits. `slots`
    /// holds each cluster's metric slot, assigned by the one publish path
    /// (`Control::publish`) just before the snapshot is stored: building a snapshot names no
    /// metric slot, so one that is then refused leaves the registry as it was.
    pub fn new(table: RouteTable, slots: Vec<usize>, config: &Config, generation: u64) -> Snapshot {
        let mut endpoints_by_slot: Vec<(usize, Vec<SocketAddr>)> = Vec::new();
        for (cluster, &slot) in table.clusters().iter().zip(&slots) {
            match endpoints_by_slot
                .iter_mut()
                .find(|(known, _)| *known == slot)
            {
                Some((_, endpoints)) => endpoints.extend_from_slice(&cluster.endpoints),
                None => endpoints_by_slot.push((slot, cluster.endpoints.clone())),
            }
        }
        Snapshot {
            generation,
            table,
            slots,
            endpoints_by_slot,
            timeouts: config.timeouts,
            limits: config.limits,
        }
    }
}

pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;
