//! The gateway: a thread-per-core SNI passthrough mesh gateway. See ARCHITECTURE.md.
#![deny(unsafe_code)]

// The sans-IO core lives in its own crate; these names keep `crate::clienthello` working.
pub use gateway_proto::{clienthello, routes};

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod config;
pub mod connection;
pub mod context;
pub mod control;
pub mod handover;
pub mod lifecycle;
pub mod logging;
pub mod machine;
pub mod metrics;
pub mod notify;
pub mod outcome;
pub mod passfd;
pub mod process_metrics;
pub mod relay;
pub mod relay_mode;
pub mod ring_setup;
pub mod route_source;
pub mod run;
pub mod snapshot;
pub mod sys;
pub mod uring;
pub mod version;
pub mod worker;
