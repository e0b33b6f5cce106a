//! controlplane-lite: a small, Consul-shaped control plane for the mesh gateway.
//!
//! The protocol logic lives in plain modules that take values (and `now`) and return values:
//! [`catalog`], [`config_entries`], [`intentions`], [`acl`], [`ca`], [`routes`]. The [`http`]
//! handlers and the [`cli`] are thin shells around them; [`store`] is the only module that
//! touches the disk and [`blocking`] the only one that waits. [`replication`] federates a
//! secondary datacenter with the primary: a sans-IO state machine plus its tokio shell.
#![forbid(unsafe_code)]

pub mod acl;
pub mod agent;
pub mod blocking;
pub mod ca;
pub mod casing;
pub mod catalog;
pub mod checks;
pub mod checks_runner;
pub mod cli;
pub mod config_entries;
pub mod datadir;
pub mod error;
pub mod etcd;
pub mod http;
pub mod intentions;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod remote_dc;
pub mod replication;
pub mod routes;
pub mod server;
pub mod snapshot;
pub mod spiffe;
pub mod store;
pub mod tls;

#[cfg(test)]
pub(crate) mod testutil;

pub use error::{Error, Result};
