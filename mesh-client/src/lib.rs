//! What `gateway mesh` and `gateway sidecar` share to talk to controlplane-lite: the HTTP
//! client with its blocking-query rules, the watch that follows one resource with them, and
//! the Consul-shaped command lines.

pub mod consul_cli;
pub mod cp_client;
pub mod failover;
pub mod watch;
