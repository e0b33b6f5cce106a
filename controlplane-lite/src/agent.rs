//! The agent process: configuration, first-start initialisation, and the HTTP server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use time::OffsetDateTime;

use crate::acl::{
    Authorizer, DefaultPolicy, Policy, Token, ANONYMOUS_ACCESSOR_ID, ANONYMOUS_SECRET,
    MANAGEMENT_POLICY_ID, MANAGEMENT_POLICY_NAME,
};
use crate::ca::{self, CaRoot};
use crate::catalog::ServiceDefinition;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::replication::client::PrimaryClient;
use crate::store::{Store, Table};

/// Key of the cluster id in the `system` table.
pub const CLUSTER_ID_KEY: &str = "cluster_id";
/// Key of the ACL bootstrap marker in the `system` table.
pub const ACL_BOOTSTRAP_KEY: &str = "acl_bootstrap";

/// Where the agent keeps its state (`-store`).
#[derive(Clone, Debug)]
pub enum StoreChoice {
    /// A redb file in the data dir: one agent per datacenter.
    Redb,
    /// An etcd cluster shared by the datacenter's agents ([`crate::store::etcd`]).
    Etcd {
        /// The cluster's members.
        endpoints: Vec<crate::etcd::Endpoint>,
        /// The key prefix of this datacenter's state.
        prefix: String,
        /// The election lease's TTL.
        lease_ttl: std::time::Duration,
    },
}

/// How long the agent waits for etcd at start.
const ETCD_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The agent's flags, parsed.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Where state lives.
    pub store: StoreChoice,
    /// This datacenter's name.
    pub datacenter: String,
    /// The primary datacenter (owner of the CA root, ACLs, intentions, config entries).
    pub primary_datacenter: String,
    /// Where the primary's agent listens (a secondary replicates from it).
    pub primary_address: Option<String>,
    /// The token a secondary presents to the primary.
    pub replication_token: Option<String>,
    /// Where state lives.
    pub data_dir: PathBuf,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// The node name shown in the catalog.
    pub node_name: String,
    /// The node address services without their own address get.
    pub node_address: String,
    /// What ACLs do when no rule matches; also the intentions default.
    pub default_policy: DefaultPolicy,
    /// Service definitions loaded at start and on reload.
    pub config_dir: Option<PathBuf>,
    /// The HTTPS listener (`-https-addr` with its certificate), if any.
    pub https: Option<(SocketAddr, crate::tls::ServerTls)>,
    /// How other datacenters' agents are reached (TLS, or the explicit insecure flag).
    pub cross_dc: crate::replication::client::CrossDcTransport,
    /// Connection caps and timeouts of the HTTP server.
    pub limits: crate::server::Limits,
    /// Service names a token may register as a mesh gateway with an exact `service:write`
    /// rule alone (`-mesh-gateway-names`); any other name needs `mesh:write`.
    pub mesh_gateway_names: Vec<String>,
    /// The smallest `LeafCertTTL` the CA configuration accepts (`-ca-leaf-ttl-min`): Consul's
    /// 1h, lowered only by tests that watch leaves renew.
    pub ca_leaf_ttl_min: std::time::Duration,
}

/// One running agent.
pub struct Agent {
    /// Flags.
    pub config: AgentConfig,
    /// State.
    pub store: Store,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The primary's agent, in a secondary started with `-primary-address`: replication reads
    /// from it and writes of replicated data are forwarded to it.
    pub primary: Option<Arc<PrimaryClient>>,
    /// Set to `true` when the agent shuts down, so blocking queries answer at once instead of
    /// holding graceful shutdown for up to ten minutes.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// The HTTP address other datacenters reach this agent at, once it listens (published
    /// in this datacenter's federation state).
    pub http_address: std::sync::OnceLock<String>,
    /// One permit per blocking query held open (`-http-max-blocking-queries`).
    pub blocking_slots: tokio::sync::Semaphore,
    /// Whether this agent runs the once-per-datacenter duties: always with one agent on redb;
    /// with several on etcd, the one that won the lease election ([`crate::leader`]).
    pub leadership: tokio::sync::watch::Sender<crate::leader::Verdict>,
    /// The etcd cluster this agent's datacenter shares, if any: the election and the
    /// `status/leader|peers` registry live there.
    pub cluster: Option<crate::leader::Cluster>,
}

impl Agent {
    /// Opens the store and performs first-start initialisation: the built-in management policy,
    /// the anonymous token and, in the primary datacenter, the cluster id and CA root.
    pub fn open(
        config: AgentConfig,
        cluster: Option<crate::leader::Cluster>,
    ) -> Result<Arc<Agent>> {
        let metrics = Arc::new(Metrics::default());
        let (store, follower) = match &config.store {
            StoreChoice::Redb => {
                let state_file = crate::datadir::prepare(&config.data_dir)?;
                (Store::open(&state_file, metrics.clone())?, None)
            }
            StoreChoice::Etcd {
                endpoints, prefix, ..
            } => {
                let (backend, follower) = crate::store::etcd::EtcdBackend::connect(
                    endpoints,
                    prefix,
                    ETCD_START_TIMEOUT,
                )?;
                (
                    Store::with_backend(Box::new(backend), metrics.clone())?,
                    Some(follower),
                )
            }
        };
        let shutdown = tokio::sync::watch::channel(false).0;
        let primary = match (
            &config.primary_address,
            config.datacenter == config.primary_datacenter,
        ) {
            (Some(address), false) => Some(Arc::new(
                PrimaryClient::new(address, config.replication_token.clone(), &config.cross_dc)
                    .map_err(|e| Error::Startup(format!("-primary-address: {e}")))?,
            )),
            _ => None,
        };
        let blocking_slots = tokio::sync::Semaphore::new(config.limits.max_blocking_queries);
        // Alone on its store, the agent leads from the start; on a shared cluster the election
        // decides (it starts as a follower).
        let leadership = tokio::sync::watch::channel(crate::leader::Verdict {
            leader: cluster.is_none(),
            lease: 0,
        })
        .0;
        let agent = Arc::new(Agent {
            config,
            store,
            metrics,
            primary,
            shutdown,
            http_address: std::sync::OnceLock::new(),
            blocking_slots,
            leadership,
            cluster,
        });
        if let Some(follower) = follower {
            // Commits made through other agents reach memory through the store's one path.
            let weak = Arc::downgrade(&agent);
            follower.start(
                move |changes| {
                    if let Some(agent) = weak.upgrade() {
                        agent.store.apply(changes);
                    }
                },
                agent.shutdown.subscribe(),
            );
        }
        agent.initialise(OffsetDateTime::now_utc())?;
        if let Some(root) = agent.active_root()? {
            if let Ok(time) = OffsetDateTime::parse(
                &root.not_after,
                &time::format_description::well_known::Rfc3339,
            ) {
                agent.metrics.set_root_expiry(time.unix_timestamp());
            }
        }
        Ok(agent)
    }

    /// The address this agent advertises to its peers (federation state, `status/leader|peers`).
    pub fn advertised_http_address(&self) -> String {
        self.http_address
            .get()
            .cloned()
            .unwrap_or_else(|| self.config.http_addr.to_string())
    }

    /// The fence of a duty write made now: `None` alone on a store (the agent leads while it
    /// runs); on a shared etcd cluster the election key bound to the lease this agent leads
    /// with, or [`Error::NotLeader`] when it does not lead.
    pub fn duty_fence(&self) -> Result<Option<crate::store::LeaderFence>> {
        let Some(cluster) = &self.cluster else {
            return Ok(None);
        };
        let verdict = self.leadership.borrow().clone();
        if !verdict.leader {
            return Err(Error::NotLeader(
                "this agent no longer leads its datacenter; the duty stops".to_owned(),
            ));
        }
        Ok(Some(crate::store::LeaderFence {
            key: cluster.keys.leader.clone(),
            lease: verdict.lease,
        }))
    }

    /// A write made because this agent leads (replication results, the CA from the primary,
    /// federation-state publication, health-check status): committed only while the election
    /// key is still bound to this agent's lease. A refused write turns the verdict to "not
    /// leader" at once, which stops the duties and makes the election step down
    /// ([`crate::leader::run`]). Blocking: call from a blocking context.
    pub fn duty_write<R>(
        &self,
        body: impl FnMut(&mut crate::store::Transaction<'_>) -> Result<R>,
    ) -> Result<R> {
        let fence = self.duty_fence()?;
        let result = self.store.write_fenced(fence.as_ref(), body);
        if fence.is_some() && matches!(result, Err(Error::NotLeader(_))) {
            self.leadership.send_if_modified(|v| {
                let was = v.leader;
                v.leader = false;
                v.lease = 0;
                was
            });
        }
        result
    }

    /// Whether this is the primary datacenter.
    pub fn is_primary(&self) -> bool {
        self.config.datacenter == self.config.primary_datacenter
    }

    fn initialise(&self, now: OffsetDateTime) -> Result<()> {
        let primary = self.is_primary();
        self.store.write(|tx| {
            if tx.get::<Policy>(Table::AclPolicies, MANAGEMENT_POLICY_ID)?.is_none() {
                let policy = Policy {
                    id: MANAGEMENT_POLICY_ID.to_owned(),
                    name: MANAGEMENT_POLICY_NAME.to_owned(),
                    description: "Builtin Policy that grants unlimited access".to_owned(),
                    rules: String::new(),
                    datacenters: Vec::new(),
                    create_index: tx.index(),
                    modify_index: tx.index(),
                };
                tx.put(Table::AclPolicies, MANAGEMENT_POLICY_ID, &policy)?;
            }
            if tx.get::<Token>(Table::AclTokens, ANONYMOUS_ACCESSOR_ID)?.is_none() {
                let token = Token {
                    accessor_id: ANONYMOUS_ACCESSOR_ID.to_owned(),
                    secret_id: ANONYMOUS_SECRET.to_owned(),
                    description: "Anonymous Token".to_owned(),
                    policies: Vec::new(),
                    service_identities: Vec::new(),
                    local: false,
                    create_time: ca::rfc3339(now),
                    create_index: tx.index(),
                    modify_index: tx.index(),
                };
                tx.put(Table::AclTokens, ANONYMOUS_ACCESSOR_ID, &token)?;
            }
            // The CA belongs to the primary; a secondary adopts the primary's cluster id and
            // gets its intermediate signed once replication reaches the primary.
            if primary && tx.get::<String>(Table::System, CLUSTER_ID_KEY)?.is_none() {
                let cluster_id = uuid::Uuid::new_v4().to_string();
                let mut generated = ca::generate_root(&cluster_id, now, tx.index())?;
                generated.root.create_index = tx.index();
                generated.root.modify_index = tx.index();
                tx.put(Table::System, CLUSTER_ID_KEY, &cluster_id)?;
                tx.put(Table::CaRoots, &generated.root.id, &generated.root)?;
                tx.put(Table::CaSigning, &generated.root.id, &generated.key)?;
                tracing::info!(%cluster_id, root = %generated.root.id, "bootstrapped the Connect CA");
            }
            Ok(())
        })
    }

    /// `<cluster-id>.consul`, once the CA exists.
    pub fn trust_domain(&self) -> Result<Option<String>> {
        Ok(self
            .store
            .get::<String>(Table::System, CLUSTER_ID_KEY)?
            .map(|id| format!("{}.consul", id.to_ascii_lowercase())))
    }

    /// The trust domain, or 503 if the CA is not initialised in this datacenter.
    pub fn require_trust_domain(&self) -> Result<String> {
        self.trust_domain()?.ok_or_else(|| {
            Error::Unavailable(
                "Connect CA not initialised in this datacenter yet: a secondary gets it from the primary through replication (is -primary-address set and the primary reachable?)".to_owned(),
            )
        })
    }

    /// This datacenter's CA configuration (Consul's defaults until a `PUT` changes it).
    pub fn ca_settings(&self) -> Result<ca::CaSettings> {
        Ok(self
            .store
            .get::<ca::CaSettings>(Table::System, ca::CA_SETTINGS_KEY)?
            .unwrap_or_default())
    }

    /// The active root and this datacenter's key for it: the root's own key in the primary,
    /// the intermediate's in a secondary (503 while either is missing).
    pub fn active_signer(&self) -> Result<(CaRoot, ca::SigningKey)> {
        let root = self
            .active_root()?
            .ok_or_else(|| Error::Unavailable("no active CA root".to_owned()))?;
        let key = self
            .store
            .get::<ca::SigningKey>(Table::CaSigning, &root.id)?
            .ok_or_else(|| {
                Error::Unavailable(
                    "this datacenter holds no signing key for the active root".to_owned(),
                )
            })?;
        Ok((root, key))
    }

    /// The active CA root.
    pub fn active_root(&self) -> Result<Option<CaRoot>> {
        Ok(self
            .store
            .list::<CaRoot>(Table::CaRoots)?
            .into_iter()
            .find(|r| r.active))
    }

    /// Resolves a token secret into an authorizer (no secret = the anonymous token).
    pub fn authorizer(&self, secret: Option<&str>) -> Result<Authorizer> {
        let secret = secret.filter(|s| !s.is_empty()).unwrap_or(ANONYMOUS_SECRET);
        let token = self
            .store
            .list::<Token>(Table::AclTokens)?
            .into_iter()
            .find(|t| t.secret_id == secret)
            .ok_or(Error::AclNotFound)?;
        let mut policies = Vec::with_capacity(token.policies.len());
        for link in &token.policies {
            // A deleted policy simply grants nothing (Consul skips dangling links too).
            if let Some(policy) = self.store.get::<Policy>(Table::AclPolicies, &link.id)? {
                policies.push(policy);
            }
        }
        Authorizer::for_token(
            &token,
            &policies,
            &self.config.datacenter,
            self.config.default_policy,
        )
    }

    /// Reads the service definitions in the config dir (`*.json`, in name order).
    pub fn read_config_dir(&self) -> Result<Vec<ServiceDefinition>> {
        let Some(dir) = &self.config.config_dir else {
            return Ok(Vec::new());
        };
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Error::Startup(format!("cannot read config dir {}: {e}", dir.display()))
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        let mut definitions = Vec::new();
        for path in paths {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::bad_request(format!("{}: {e}", path.display())))?;
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                Error::bad_request(format!("{}: invalid JSON: {e}", path.display()))
            })?;
            let is_services = value
                .as_object()
                .is_some_and(|o| o.contains_key("service") || o.contains_key("services"));
            if !is_services {
                tracing::warn!(file = %path.display(), "config dir file has no service definition; ignored");
                continue;
            }
            let parsed = crate::catalog::parse_definitions(value)
                .map_err(|e| Error::bad_request(format!("{}: {e}", path.display())))?;
            definitions.extend(parsed);
        }
        Ok(definitions)
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: AgentConfig) -> Result<()> {
    if config.primary_address.is_none() && config.datacenter != config.primary_datacenter {
        tracing::warn!(
            "secondary datacenter without -primary-address: nothing replicates and the Connect CA stays unavailable"
        );
    }
    let cluster = match &config.store {
        StoreChoice::Redb => None,
        StoreChoice::Etcd {
            endpoints,
            prefix,
            lease_ttl,
        } => Some(crate::leader::Cluster {
            client: crate::etcd::connect(endpoints, ETCD_START_TIMEOUT)
                .await
                .map_err(|e| Error::Startup(e.to_string()))?,
            keys: crate::leader::Keys::new(prefix, &config.node_name),
            ttl: *lease_ttl,
        }),
    };
    let agent = tokio::task::spawn_blocking(move || Agent::open(config, cluster))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let definitions = agent.read_config_dir()?;
    if !definitions.is_empty() {
        let count = definitions.len();
        crate::http::register_local(&agent, definitions).await?;
        tracing::info!(count, "registered services from the config dir");
    }
    let listener = tokio::net::TcpListener::bind(agent.config.http_addr)
        .await
        .map_err(|e| Error::Startup(format!("cannot listen on {}: {e}", agent.config.http_addr)))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Startup(e.to_string()))?;
    let mut listeners = vec![crate::server::Listener {
        tcp: listener,
        tls: None,
    }];
    let mut https_local = None;
    if let Some((address, tls)) = &agent.config.https {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config()?);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| Error::Startup(format!("cannot listen on {address}: {e}")))?;
        https_local = Some(
            listener
                .local_addr()
                .map_err(|e| Error::Startup(e.to_string()))?,
        );
        listeners.push(crate::server::Listener {
            tcp: listener,
            tls: Some(acceptor),
        });
    }
    if agent.config.cross_dc.allow_insecure_http && !agent.is_primary() {
        tracing::warn!(
            "-primary-insecure-http: links to other datacenters may use plain http; the replication token and every replicated token secret cross them in clear text"
        );
    }
    tracing::info!(
        datacenter = %agent.config.datacenter,
        http = %local,
        https = ?https_local,
        data_dir = %agent.config.data_dir.display(),
        "agent running"
    );
    // Lines on stdout that scripts and tests can wait for (the plain one first).
    println!("controlplane-lite agent listening on http://{local}");
    if let Some(https) = https_local {
        println!("controlplane-lite agent listening on https://{https}");
    }
    // Set before the federation-state publisher starts, so its first state carries it. Other
    // datacenters are reached over HTTPS when this agent has it.
    let _ = agent.http_address.set(crate::remote_dc::advertised_address(
        https_local.unwrap_or(local),
        &agent.config.node_address,
    ));
    if let Some(cluster) = agent.cluster.clone() {
        let elector = agent.clone();
        let address = agent.advertised_http_address();
        tokio::spawn(async move {
            let shutdown = elector.shutdown.subscribe();
            // Registered under its advertised address, unique among the datacenter's agents.
            let keys = crate::leader::Keys::new(&cluster.keys.prefix, &address);
            crate::leader::run(
                cluster.client,
                keys,
                address,
                cluster.ttl,
                &elector.leadership,
                shutdown,
            )
            .await;
        });
    }
    spawn_duties(&agent);
    spawn_store_recovery(&agent);
    let stopping = agent.clone();
    let limits = agent.config.limits;
    crate::server::serve(
        listeners,
        crate::http::router(agent),
        limits,
        async move {
            shutdown_signal().await;
            stopping.shutdown.send_replace(true);
        },
        std::time::Duration::from_secs(5),
    )
    .await;
    Ok(())
}

/// Runs the once-per-datacenter duties (replication, the intermediate CA, federation-state
/// publication, health checks) while this agent leads, and stops them when it no longer does.
/// With one agent on redb it leads from start to shutdown.
fn spawn_duties(agent: &Arc<Agent>) {
    let agent = agent.clone();
    tokio::spawn(async move {
        let mut verdict = agent.leadership.subscribe();
        let mut shutdown = agent.shutdown.subscribe();
        loop {
            tokio::select! {
                led = verdict.wait_for(|v| v.leader) => if led.is_err() { return },
                _ = shutdown.wait_for(|stopping| *stopping) => return,
            }
            tracing::info!("leading this datacenter: starting replication, CA and checks duties");
            agent.metrics.set_leader(true);
            let mut tasks = crate::replication::runner::spawn(&agent);
            tasks.push(crate::checks_runner::spawn(&agent));
            let stop = tokio::select! {
                lost = verdict.wait_for(|v| !v.leader) => lost.is_err(),
                _ = shutdown.wait_for(|stopping| *stopping) => true,
            };
            if stop {
                // The duties end on their own at shutdown (they watch it too).
                return;
            }
            for task in &tasks {
                task.abort();
            }
            agent.metrics.set_leader(false);
            tracing::warn!("no longer leading this datacenter: duties stopped");
        }
    });
}

/// Brings a read-only store (after a disk error) back on its own once the disk takes writes,
/// so health and metrics recover even when no client writes.
fn spawn_store_recovery(agent: &Arc<Agent>) {
    let agent = agent.clone();
    tokio::spawn(async move {
        let mut shutdown = agent.shutdown.subscribe();
        loop {
            tokio::select! {
                () = tokio::time::sleep(crate::store::RECOVERY_INTERVAL * 2) => {}
                _ = shutdown.wait_for(|stopping| *stopping) => return,
            }
            if agent.store.read_only().is_some() {
                let worker = agent.clone();
                let _ = tokio::task::spawn_blocking(move || worker.store.recover()).await;
            }
        }
    });
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}
