//! `gateway mesh`: the static gateway's runtime (workers, snapshots, admin), with its routes
//! followed from controlplane-lite instead of a file — the guide's
//! `consul connect envoy -mesh-gateway -register`.
//!
//! The follower registers the gateway (a `mesh-gateway` service with `lan`/`wan` tagged
//! addresses and a TCP check), then follows `/v1/internal/mesh-gateway/routes` with blocking
//! queries and publishes each changed table as a new snapshot: new connections use it,
//! established ones keep theirs. While the control plane is unreachable the last snapshot
//! stays in force; requests are retried with back-off, and `/metrics` says so
//! (`gateway_control_plane_connected`, `gateway_control_plane_snapshot_age_seconds`). A clean
//! stop deregisters. `/ready` answers 503 until the first route table has been applied. The
//! gateway never holds a private key and never decrypts.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use gateway::config::{Config, ConfigErrors, Listener};
use gateway::control::Control;
use gateway::route_source::{RouteSource, SourceFuture};
use gateway::routes::{Pattern, RouteSpec};
use mesh_client::cp_client::{backoff, Client, ClientError, ControlPlaneStats};
use mesh_client::watch::Watch;
use mesh_model::wire::{RouteSnapshot, MESH_GATEWAY_ROUTES_PATH};

/// Command-line arguments of `gateway mesh`.
pub use mesh_client::consul_cli::MeshArgs as Args;

/// The configuration the runtime starts with: the file's, or one listener on `-address`.
/// Routes come from the control plane only.
pub fn initial_config(args: &Args) -> Result<Config, ConfigErrors> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::with_listeners(
            vec![Listener {
                name: "mesh".into(),
                address: args.address,
            }],
            Some(args.admin_bind),
        ),
    };
    config.routes.clear();
    config.default_route = None;
    Ok(config)
}

/// `-address` (and `-wan-address`, when it is the same) with port 0 stand for the address the
/// listener on it was bound to, so the catalog names a port that is really served. The
/// listener is the one configured with that address, else the first.
pub fn with_bound_ports(args: &Args, listeners: &[(String, SocketAddr, SocketAddr)]) -> Args {
    let mut resolved = args.clone();
    if args.address.port() != 0 {
        return resolved;
    }
    let bound = listeners
        .iter()
        .find(|(_, configured, _)| *configured == args.address)
        .or_else(|| listeners.first())
        .map(|(_, _, bound)| *bound);
    if let Some(bound) = bound {
        resolved.address = bound;
        if args.wan_address == args.address {
            resolved.wan_address = bound;
        }
    }
    resolved
}

/// The registration body (spec §7.1, the guide's gateway).
pub fn registration(args: &Args) -> serde_json::Value {
    let tagged = |address: SocketAddr| serde_json::json!({ "address": address.ip().to_string(), "port": address.port() });
    serde_json::json!({
        "Kind": "mesh-gateway",
        "ID": args.service_name,
        "Name": args.service_name,
        "Address": args.address.ip().to_string(),
        "Port": args.address.port(),
        "TaggedAddresses": { "lan": tagged(args.address), "wan": tagged(args.wan_address) },
        "Check": {
            "Name": "Mesh Gateway Listening",
            "TCP": args.address.to_string(),
            "Interval": "10s",
            "DeregisterCriticalServiceAfter": "6h"
        }
    })
}

/// A route table from the control plane, parsed into the gateway's own types. Routes that
/// do not parse are left out and reported (one bad name must not stop the others); an
/// endpoint that is not `ip:port` is left out the same way.
pub fn parse_routes(body: &[u8]) -> Result<(u64, Vec<RouteSpec>, Vec<String>), String> {
    let wire: RouteSnapshot =
        serde_json::from_slice(body).map_err(|error| format!("route table: {error}"))?;
    let mut routes = Vec::with_capacity(wire.routes.len());
    let mut problems = Vec::new();
    for route in wire.routes {
        let pattern = match Pattern::parse(&route.sni) {
            Ok(pattern) => pattern,
            Err(error) => {
                problems.push(error);
                continue;
            }
        };
        let mut endpoints = Vec::with_capacity(route.endpoints.len());
        for endpoint in &route.endpoints {
            match endpoint.parse::<SocketAddr>() {
                Ok(address) => endpoints.push(address),
                Err(_) => problems.push(format!(
                    "route `{}`: endpoint {endpoint:?} is not ip:port",
                    route.sni
                )),
            }
        }
        if endpoints.is_empty() {
            problems.push(format!("route `{}` has no usable endpoint", route.sni));
            continue;
        }
        routes.push(RouteSpec { pattern, endpoints });
    }
    Ok((wire.generation, routes, problems))
}

/// Registration and route following for one `gateway mesh` process.
pub struct Follower {
    client: Client,
    args: Args,
    /// Rendered in `/metrics` as `gateway_control_plane_*`.
    stats: ControlPlaneStats,
}

impl Follower {
    /// Fails on an unusable address list or TLS file (the user's to fix).
    pub fn new(args: Args) -> Result<Follower, ClientError> {
        Ok(Follower {
            client: Client::with_addresses(args.http_addr.clone(), args.token.clone(), &args.tls)?,
            args,
            stats: ControlPlaneStats::default(),
        })
    }

    async fn register(&self, args: &Args) -> bool {
        if !args.register {
            return true;
        }
        match self
            .client
            .put("/v1/agent/service/register", &registration(args))
            .await
        {
            Ok(_) => {
                tracing::info!(service = %args.service_name, lan = %args.address, wan = %args.wan_address, "registered the mesh gateway");
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot register the mesh gateway; retrying");
                false
            }
        }
    }

    /// Deregister on a clean stop (best effort: the control plane may be gone).
    pub async fn deregister(&self) {
        if !self.args.register {
            return;
        }
        let path = format!("/v1/agent/service/deregister/{}", self.args.service_name);
        match self.client.put(&path, &serde_json::json!(null)).await {
            Ok(_) => tracing::info!(service = %self.args.service_name, "deregistered"),
            Err(error) => tracing::warn!(%error, "could not deregister"),
        }
    }

    /// Register, then follow the route table until the process stops. Never returns an
    /// error: the last snapshot serves while the control plane is away.
    pub async fn follow_routes(self: Arc<Self>, control: Arc<Control>) {
        let args = with_bound_ports(&self.args, &control.bound_listeners());
        let stats = &self.stats;
        stats.enabled.store(true, Ordering::Relaxed);
        let mut registered = false;
        let mut registered_with: Option<String> = None;
        let mut watch = Watch::new();
        let mut published: Option<Vec<RouteSpec>> = None;
        loop {
            if !registered {
                registered = self.register(&args).await;
                registered_with = Some(self.client.address());
            }
            let answer = match watch.query(&self.client, MESH_GATEWAY_ROUTES_PATH).await {
                Ok(answer) => answer,
                Err(error) => {
                    stats.connected.store(false, Ordering::Relaxed);
                    stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "control plane unreachable; serving the last snapshot");
                    // The watch starts over at index 0: the control plane may come back
                    // with a lower index (restored), so ask for the current table rather
                    // than wait for an index it never reaches.
                    tokio::time::sleep(watch.failed()).await;
                    // Re-register after an outage: a control plane that lost its catalog
                    // must learn about us again (PUT is idempotent).
                    registered = false;
                    continue;
                }
            };
            if watch.succeeded(answer.index) {
                tracing::info!("control plane reachable again");
            }
            // The client failed over to another agent: that agent's store may not be the one
            // we registered in (agents on one redb file each), so register there too (PUT is
            // idempotent where the store is shared).
            if registered_with.as_deref() != Some(self.client.address().as_str()) {
                registered = false;
            }
            let (generation, routes, problems) = match parse_routes(&answer.body) {
                Ok(parsed) => parsed,
                Err(error) => {
                    stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%error, "unusable route table; keeping the snapshot in force");
                    tokio::time::sleep(backoff(0)).await;
                    continue;
                }
            };
            for problem in &problems {
                tracing::warn!(problem = %problem, "route left out");
            }
            stats.received(generation);
            if published.as_ref() == Some(&routes) {
                continue;
            }
            let count = routes.len();
            match control.publish_routes(routes.clone()) {
                Ok(local) => {
                    tracing::info!(
                        control_plane_generation = generation,
                        generation = local,
                        routes = count,
                        "published routes from the control plane"
                    );
                    published = Some(routes);
                    // The first applied table makes the gateway ready (`/ready` 200); an
                    // outage later keeps it ready, as it serves the last table.
                    if !control.ready.swap(true, Ordering::Relaxed) {
                        tracing::info!("ready: first route table from the control plane applied");
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "route table refused; keeping the snapshot in force")
                }
            }
        }
    }
}

impl RouteSource for Follower {
    fn initial_config(&self) -> Result<Config, ConfigErrors> {
        initial_config(&self.args)
    }

    fn follow(self: Arc<Self>, control: Arc<Control>) -> SourceFuture {
        Box::pin(self.follow_routes(control))
    }

    fn stop(self: Arc<Self>, successor_possible: bool) -> SourceFuture {
        Box::pin(async move {
            if !successor_possible {
                self.deregister().await;
            }
        })
    }

    fn render_metrics(&self, out: &mut prom_text::Writer<'_>) {
        self.stats.render(out);
        self.client.render_metrics(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args {
            register: true,
            service_name: "gateway-primary".into(),
            address: "10.0.0.5:8443".parse().expect("addr"),
            wan_address: "192.0.2.1:443".parse().expect("addr"),
            token: None,
            http_addr: mesh_model::address::parse_list(&["127.0.0.1:8500"], false)
                .expect("address"),
            tls: mesh_client::tls::ClientTls::default(),
            config: None,
            admin_bind: "127.0.0.1:19000".parse().expect("addr"),
        }
    }

    #[test]
    fn registration_has_tagged_addresses_and_a_tcp_check() {
        let body = registration(&args());
        assert_eq!(body["Kind"], "mesh-gateway");
        assert_eq!(body["Name"], "gateway-primary");
        assert_eq!(body["Port"], 8443);
        assert_eq!(body["TaggedAddresses"]["lan"]["address"], "10.0.0.5");
        assert_eq!(body["TaggedAddresses"]["wan"]["address"], "192.0.2.1");
        assert_eq!(body["TaggedAddresses"]["wan"]["port"], 443);
        assert_eq!(body["Check"]["TCP"], "10.0.0.5:8443");
    }

    #[test]
    fn initial_config_listens_on_the_lan_address_without_routes() {
        let config = initial_config(&args()).expect("config");
        assert_eq!(config.listeners.len(), 1);
        assert_eq!(config.listeners[0].address, args().address);
        assert_eq!(config.admin, Some(args().admin_bind));
        assert!(config.routes.is_empty());
    }

    #[test]
    fn port_zero_registers_the_bound_port() {
        let mut zero = args();
        zero.address = "127.0.0.1:0".parse().expect("addr");
        zero.wan_address = zero.address;
        let bound: SocketAddr = "127.0.0.1:41000".parse().expect("addr");
        let listeners = [("mesh".to_owned(), zero.address, bound)];
        let resolved = with_bound_ports(&zero, &listeners);
        assert_eq!((resolved.address, resolved.wan_address), (bound, bound));
        // A fixed port, or a WAN address of its own, is registered as given.
        assert_eq!(
            with_bound_ports(&args(), &listeners).address,
            args().address
        );
        zero.wan_address = "192.0.2.1:443".parse().expect("addr");
        let resolved = with_bound_ports(&zero, &listeners);
        assert_eq!(resolved.wan_address, zero.wan_address);
    }

    #[test]
    fn route_tables_parse_and_bad_routes_are_left_out() {
        let body = br#"{"generation": 12, "routes": [
            {"sni": "socat.default.primary.internal.td.consul", "endpoints": ["127.0.0.1:21000"]},
            {"sni": "*.secondary.internal.td.consul", "endpoints": ["192.0.2.2:8444", "gw.example:1"]},
            {"sni": "not a name", "endpoints": ["127.0.0.1:1"]},
            {"sni": "empty.default.primary.internal.td.consul", "endpoints": []}]}"#;
        let (generation, routes, problems) = parse_routes(body).expect("parse");
        assert_eq!(generation, 12);
        assert_eq!(routes.len(), 2);
        assert_eq!(
            routes[1].pattern,
            Pattern::Wildcard("secondary.internal.td.consul".into())
        );
        assert_eq!(routes[1].endpoints.len(), 1);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(parse_routes(b"{}").is_err());
    }
}
