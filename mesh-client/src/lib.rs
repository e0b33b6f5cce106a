//! What `gateway mesh` and `gateway sidecar` share to talk to controlplane-lite: the HTTP(S)
//! client with its blocking-query rules and its failover between agents, the watch that
//! follows one resource with them, the client's TLS files, and the Consul-shaped command
//! lines.

pub mod consul_cli;
pub mod cp_client;
pub mod failover;
pub mod tls;
pub mod watch;
