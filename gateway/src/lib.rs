//! The gateway: a thread-per-core SNI passthrough mesh gateway. See ARCHITECTURE.md.
#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod clienthello;
pub mod config;
pub mod connection;
pub mod consul_cli;
pub mod control;
pub mod cp_client;
pub mod handover;
pub mod lifecycle;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod notify;
pub mod passfd;
pub mod process_metrics;
pub mod relay;
pub mod routes;
pub mod run;
pub mod sidecar;
pub mod snapshot;
pub mod sys;
pub mod version;
pub mod worker;
