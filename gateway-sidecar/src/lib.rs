//! `gateway sidecar -sidecar-for NAME`: the mutual-TLS sidecar of one service (the guide's
//! `consul connect envoy -sidecar-for socat`).
//!
//! The sidecar is not the hot path (the mesh gateway is): it runs on a small tokio runtime
//! with tokio-rustls. Its protocol decisions (identities, intentions, renewal times) are
//! sans-IO in [`identity`]; [`tls`] builds the rustls configurations; [`proxy`] moves bytes;
//! [`follow`] keeps the leaf, roots, configuration and intentions current from the control
//! plane with blocking queries. [`activation`] takes listening sockets passed by systemd's
//! socket-activation protocol (the crate's only `unsafe`, in `sys`, claims the descriptors).
//!
//! Everything a connection reads is an immutable value swapped whole (`ArcSwap`): the TLS
//! state, the configuration, the intentions. A new leaf, new roots, new endpoints or a new
//! intention apply to new connections and never touch established ones.

pub mod activation;
pub mod follow;
pub mod identity;
pub mod proxy;
mod sys;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use arc_swap::ArcSwap;

use identity::{DefaultDecision, Intention, SpiffeId};
use mesh_client::cp_client::{Client, ControlPlaneStats};
use mesh_client::watch::Watch;
use tls::TlsState;

/// Command-line arguments of `gateway sidecar`.
pub use mesh_client::consul_cli::SidecarArgs as Args;

/// Tell whoever started us the public and admin addresses we bound, one line each on stdout,
/// then `sidecar bound: done pid N`, so an `-admin-bind` or `-listen` with port 0 can be
/// found. Never fatal (stdout may be closed).
fn report_bound(public: Option<SocketAddr>, admin: Option<SocketAddr>) {
    use std::io::Write as _;
    let mut text = String::new();
    if let Some(address) = public {
        text.push_str(&format!("sidecar bound: public {address}\n"));
    }
    if let Some(address) = admin {
        text.push_str(&format!("sidecar bound: admin {address}\n"));
    }
    text.push_str(&format!("sidecar bound: done pid {}\n", std::process::id()));
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// The sidecar's configuration as the control plane resolves it (`/v1/internal/sidecar/:id`),
/// parsed into typed values at the edge.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub generation: u64,
    pub service: String,
    pub identity: SpiffeId,
    pub public_listener: SocketAddr,
    pub local_app: SocketAddr,
    pub upstreams: Vec<Upstream>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub destination_name: String,
    /// `host:port` of the local plaintext listener (the key of an upstream).
    pub local_bind: String,
    pub sni: String,
    pub spiffe_id: SpiffeId,
    /// `none`, `local` or `remote`: who the endpoints are (for logs).
    pub mesh_gateway_mode: String,
    /// `host:port` to dial, in the control plane's order.
    pub endpoints: Vec<String>,
}

impl SidecarConfig {
    /// Parse the control plane's answer; every error names its field.
    pub fn parse(body: &[u8]) -> Result<SidecarConfig, String> {
        let wire: mesh_model::wire::SidecarConfig =
            serde_json::from_slice(body).map_err(|error| format!("sidecar config: {error}"))?;
        let address = |field: &str, value: &str| {
            value
                .parse::<SocketAddr>()
                .map_err(|_| format!("sidecar config: `{field}` {value:?} is not ip:port"))
        };
        let spiffe = |field: &str, value: &str| {
            SpiffeId::parse(value).map_err(|error| {
                format!("sidecar config: `{field}` {value:?} is not a SPIFFE ID: {error}")
            })
        };
        let mut upstreams = Vec::new();
        for (index, upstream) in wire.upstreams.into_iter().enumerate() {
            upstreams.push(Upstream {
                spiffe_id: spiffe(
                    &format!("upstreams[{index}].spiffe_id"),
                    &upstream.spiffe_id,
                )?,
                destination_name: upstream.destination_name,
                local_bind: upstream.local_bind,
                sni: upstream.sni,
                mesh_gateway_mode: upstream.mesh_gateway_mode,
                endpoints: upstream.endpoints,
            });
        }
        Ok(SidecarConfig {
            generation: wire.generation,
            identity: spiffe("spiffe_id", &wire.spiffe_id)?,
            service: wire.service,
            public_listener: address("public_listener", &wire.public_listener)?,
            local_app: address("local_app", &wire.local_app)?,
            upstreams,
        })
    }
}

/// The intentions that apply to this service, and the default when none matches.
pub struct Authorization {
    pub intentions: Vec<Intention>,
    pub default: DefaultDecision,
}

/// Why a connection was refused (the `reason` label: a closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Inbound: the TLS handshake failed (no client certificate, one from another CA,
    /// expired, not TLS at all). The client's fault.
    ClientHandshake,
    /// Inbound: the client hung up before the handshake completed (a TCP health check
    /// does exactly this, so it is counted but logged at debug level only).
    ClientClosed,
    /// Inbound: the client certificate has no single SPIFFE service ID. The client's fault.
    ClientIdentity,
    /// Inbound: an intention (or the default policy) denies the client.
    IntentionDenied,
    /// Inbound: the local application did not accept the connection.
    LocalAppConnect,
    /// Outbound: the upstream is no longer configured.
    NoUpstream,
    /// Outbound: the control plane knows no endpoint for the destination.
    NoEndpoints,
    /// Outbound: no endpoint accepted a TCP connection.
    UpstreamConnect,
    /// Outbound: the TLS handshake with the destination failed (including a certificate
    /// without the expected SPIFFE ID).
    UpstreamHandshake,
    /// Our fault: a configuration could not be built.
    Internal,
}

impl Refusal {
    pub const ALL: [Refusal; 10] = [
        Refusal::ClientHandshake,
        Refusal::ClientClosed,
        Refusal::ClientIdentity,
        Refusal::IntentionDenied,
        Refusal::LocalAppConnect,
        Refusal::NoUpstream,
        Refusal::NoEndpoints,
        Refusal::UpstreamConnect,
        Refusal::UpstreamHandshake,
        Refusal::Internal,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::ClientHandshake => "client_handshake",
            Refusal::ClientClosed => "client_closed",
            Refusal::ClientIdentity => "client_identity",
            Refusal::IntentionDenied => "intention_denied",
            Refusal::LocalAppConnect => "local_app_connect",
            Refusal::NoUpstream => "no_upstream",
            Refusal::NoEndpoints => "no_endpoints",
            Refusal::UpstreamConnect => "upstream_connect",
            Refusal::UpstreamHandshake => "upstream_handshake",
            Refusal::Internal => "internal",
        }
    }
}

#[derive(Default)]
pub struct Stats {
    pub public_accepted: AtomicU64,
    pub public_established: AtomicU64,
    pub upstream_accepted: AtomicU64,
    pub upstream_established: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    pub leaf_renewals: AtomicU64,
    pub leaf_not_after_unix: AtomicU64,
    pub control_plane: ControlPlaneStats,
}

impl Stats {
    pub fn refused(&self, refusal: Refusal) {
        let index = Refusal::ALL
            .iter()
            .position(|known| *known == refusal)
            .unwrap_or(Refusal::ALL.len() - 1);
        self.refused[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        use prom_text::{Kind, Writer};
        let mut out = String::new();
        let mut w = Writer::new(&mut out);
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let by_listener: [(&str, &str, &AtomicU64, &AtomicU64); 2] = [
            (
                "gateway_sidecar_connections_total",
                "Connections accepted, by listener kind.",
                &self.public_accepted,
                &self.upstream_accepted,
            ),
            (
                "gateway_sidecar_established_total",
                "Connections proxied after TLS and authorization, by listener kind.",
                &self.public_established,
                &self.upstream_established,
            ),
        ];
        for (name, help, public, upstream) in by_listener {
            w.family(name, Kind::Counter, help);
            w.sample(name, &[("listener", "public")], load(public));
            w.sample(name, &[("listener", "upstream")], load(upstream));
        }
        w.family(
            "gateway_sidecar_refused_total",
            Kind::Counter,
            "Connections refused, by reason.",
        );
        for (refusal, counter) in Refusal::ALL.iter().zip(&self.refused) {
            w.sample(
                "gateway_sidecar_refused_total",
                &[("reason", refusal.label())],
                load(counter),
            );
        }
        w.single(
            "gateway_sidecar_leaf_renewals_total",
            Kind::Counter,
            "Leaf certificates obtained (the first one included).",
            load(&self.leaf_renewals),
        );
        w.single(
            "gateway_sidecar_leaf_expiry_timestamp_seconds",
            Kind::Gauge,
            "When the leaf in force expires.",
            load(&self.leaf_not_after_unix),
        );
        self.control_plane.render(&mut w);
        out
    }
}

/// A client's address in a log line: the address, or `redacted` under `-redact-addresses`.
/// One value to log instead of a redacting and a non-redacting copy of each log statement.
pub struct Peer {
    address: std::net::SocketAddr,
    redact: bool,
}

impl Peer {
    pub fn new(address: std::net::SocketAddr, redact: bool) -> Peer {
        Peer { address, redact }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.redact {
            f.write_str("redacted")
        } else {
            self.address.fmt(f)
        }
    }
}

/// What every task and connection of the sidecar shares.
pub struct Shared {
    pub client: Client,
    pub proxy_id: String,
    pub tls: ArcSwap<TlsState>,
    pub config: ArcSwap<SidecarConfig>,
    pub authz: ArcSwap<Authorization>,
    pub stats: Stats,
    pub round_robin: AtomicUsize,
    /// Leave client addresses out of log lines.
    pub redact_addresses: bool,
    /// Upstream listener tasks by `local_bind`.
    upstream_tasks: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Listening sockets passed by socket activation that no listener has taken yet.
    inherited: activation::Inherited,
}

/// Run the sidecar until SIGTERM or SIGINT.
pub fn run(args: Args) -> anyhow::Result<()> {
    // Before any thread exists (the variables are unset) and before the sidecar opens a
    // descriptor of its own (passed descriptors are numbered from 3).
    let inherited = activation::Inherited::from_environment();
    // Two threads: the sidecar carries one service's traffic, and TLS handshakes should not
    // wait behind a bulk copy.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sidecar")
        .enable_all()
        .build()
        .context("cannot build the sidecar runtime")?;
    runtime.block_on(serve(args, inherited))
}

async fn serve(args: Args, inherited: activation::Inherited) -> anyhow::Result<()> {
    let client = Client::with_addresses(args.http_addr.clone(), args.token.clone(), &args.tls)?;
    let proxy_id = args
        .proxy_id
        .clone()
        .unwrap_or_else(|| format!("{}-sidecar-proxy", args.sidecar_for));
    // Start-up needs the control plane once: configuration, roots, a leaf, intentions.
    let mut config_watch = Watch::new();
    let config = follow::fetch_config(&client, &proxy_id, &mut config_watch)
        .await
        .with_context(|| format!("sidecar configuration of {proxy_id}"))?;
    if config.service != args.sidecar_for {
        anyhow::bail!(
            "{proxy_id} is the sidecar of {:?}, not {:?}",
            config.service,
            args.sidecar_for
        );
    }
    let mut roots_watch = Watch::new();
    let roots = follow::fetch_roots(&client, &mut roots_watch)
        .await
        .context("trust roots")?;
    let leaf = follow::sign_leaf(&client, &config.service, &config.identity)
        .await
        .context("leaf certificate")?;
    let mut intentions_watch = Watch::new();
    let authorization =
        follow::fetch_authorization(&client, &config.service, &mut intentions_watch)
            .await
            .context("intentions")?;
    let tls = TlsState::new(
        leaf.credentials,
        tls::root_store(&roots.pems).map_err(anyhow::Error::msg)?,
    )
    .map_err(anyhow::Error::msg)?;
    let stats = Stats::default();
    stats.leaf_renewals.store(1, Ordering::Relaxed);
    stats
        .leaf_not_after_unix
        .store(unix(leaf.not_after), Ordering::Relaxed);
    stats.control_plane.enabled.store(true, Ordering::Relaxed);
    stats.control_plane.received(config.generation);
    let public_address = args.listen.unwrap_or(config.public_listener);
    let shared = Arc::new(Shared {
        client,
        proxy_id,
        tls: ArcSwap::from_pointee(tls),
        config: ArcSwap::from_pointee(config),
        authz: ArcSwap::from_pointee(authorization),
        stats,
        round_robin: AtomicUsize::new(0),
        redact_addresses: args.redact_addresses,
        upstream_tasks: Mutex::new(HashMap::new()),
        inherited,
    });

    // Each listener is a socket passed by socket activation for its address, if there is
    // one, and a new bind otherwise.
    let public = activation::listen(&shared.inherited, public_address)
        .await
        .with_context(|| format!("public listener {public_address}"))?;
    reconcile_upstreams(&shared).await?;
    let mut admin_bound = None;
    if let Some(admin) = args.admin_bind {
        let listener = activation::listen(&shared.inherited, admin)
            .await
            .with_context(|| format!("admin address {admin}"))?;
        admin_bound = listener.local_addr().ok();
        tokio::spawn(follow::serve_admin(Arc::clone(&shared), listener));
    }
    shared.inherited.report_unused();
    report_bound(public.local_addr().ok(), admin_bound);
    tokio::spawn(proxy::serve_public(Arc::clone(&shared), public));
    let root_changed = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(follow::follow_config(Arc::clone(&shared), config_watch));
    tokio::spawn(follow::follow_roots(
        Arc::clone(&shared),
        roots,
        roots_watch,
        Arc::clone(&root_changed),
    ));
    tokio::spawn(follow::follow_intentions(
        Arc::clone(&shared),
        intentions_watch,
    ));
    tokio::spawn(follow::renew_leaf(
        Arc::clone(&shared),
        leaf.not_before,
        leaf.not_after,
        root_changed,
    ));
    let config = shared.config.load();
    tracing::info!(
        service = %config.service,
        identity = %config.identity,
        public = %public_address,
        local_app = %config.local_app,
        upstreams = config.upstreams.len(),
        "sidecar ready"
    );
    drop(config);

    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
        _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
    }
    Ok(())
}

/// Start a listener for every configured upstream that has none, and stop the listeners of
/// upstreams that are gone (their established connections continue). A listener that cannot
/// be bound fails start-up, and is logged (and retried at the next change) afterwards.
pub async fn reconcile_upstreams(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let config = shared.config.load_full();
    let wanted: Vec<&str> = config
        .upstreams
        .iter()
        .map(|upstream| upstream.local_bind.as_str())
        .collect();
    {
        let mut tasks = match shared.upstream_tasks.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        tasks.retain(|local_bind, task| {
            let keep = wanted.contains(&local_bind.as_str());
            if !keep {
                tracing::info!(%local_bind, "upstream removed; closing its listener");
                task.abort();
            }
            keep
        });
    }
    for upstream in &config.upstreams {
        let known = match shared.upstream_tasks.lock() {
            Ok(guard) => guard.contains_key(&upstream.local_bind),
            Err(poisoned) => poisoned.into_inner().contains_key(&upstream.local_bind),
        };
        if known {
            continue;
        }
        // An address that is not ip:port (a host name) cannot match a passed socket.
        let listener = match upstream.local_bind.parse::<SocketAddr>() {
            Ok(address) => activation::listen(&shared.inherited, address).await,
            Err(_) => tokio::net::TcpListener::bind(upstream.local_bind.as_str()).await,
        }
        .with_context(|| {
            format!(
                "upstream {} listener {}",
                upstream.destination_name, upstream.local_bind
            )
        })?;
        tracing::info!(
            destination = %upstream.destination_name,
            local_bind = %upstream.local_bind,
            sni = %upstream.sni,
            mode = %upstream.mesh_gateway_mode,
            endpoints = ?upstream.endpoints,
            "upstream listening"
        );
        let task = tokio::spawn(proxy::serve_upstream(
            Arc::clone(shared),
            upstream.local_bind.clone(),
            listener,
        ));
        match shared.upstream_tasks.lock() {
            Ok(mut guard) => guard.insert(upstream.local_bind.clone(), task),
            Err(poisoned) => poisoned
                .into_inner()
                .insert(upstream.local_bind.clone(), task),
        };
    }
    Ok(())
}

fn unix(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/metrics` is a contract (DESIGN.md "Observability"): `golden.prom` is what the
    /// hand-written renderer this one replaced wrote for these values, byte for byte.
    #[test]
    fn metrics_text_is_byte_compatible_with_the_contract() {
        let stats = Stats::default();
        stats.public_accepted.store(3, Ordering::Relaxed);
        stats.upstream_established.store(2, Ordering::Relaxed);
        stats.refused(Refusal::IntentionDenied);
        stats.leaf_renewals.store(1, Ordering::Relaxed);
        stats
            .leaf_not_after_unix
            .store(1_900_000_000, Ordering::Relaxed);
        let without_control_plane = stats.render();
        assert!(!without_control_plane.contains("gateway_control_plane_"));
        stats.control_plane.enabled.store(true, Ordering::Relaxed);
        stats
            .control_plane
            .snapshot_generation
            .store(9, Ordering::Relaxed);
        stats.control_plane.watch_errors.store(4, Ordering::Relaxed);
        let text = stats.render();
        assert_eq!(text, include_str!("golden.prom"));
        assert!(text.starts_with(&without_control_plane));
    }

    #[test]
    fn a_redacted_peer_shows_no_address() {
        let address: std::net::SocketAddr = "192.0.2.7:40000".parse().expect("addr");
        assert_eq!(Peer::new(address, false).to_string(), "192.0.2.7:40000");
        assert_eq!(Peer::new(address, true).to_string(), "redacted");
    }
}
