//! The `controlplane-lite` binary: `agent` runs the server; every other subcommand is a client.

mod malloc_trim;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use controlplane_lite::acl::DefaultPolicy;
use controlplane_lite::agent::{self, AgentConfig, StoreChoice};
use controlplane_lite::cli::{self, AgentFlags, Cli, Command};
use controlplane_lite::replication::client::CrossDcTransport;
use controlplane_lite::server::Limits;
use controlplane_lite::tls::{ClientTls, ServerTls};

fn main() -> ExitCode {
    let cli = Cli::parse_from(cli::consul_style_args(std::env::args()));
    let result = match cli.command {
        Command::Agent(flags) => run_agent(*flags).map(|()| ExitCode::SUCCESS),
        other => cli::run(other).map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("Error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_agent(flags: AgentFlags) -> anyhow::Result<()> {
    let level: tracing::Level = flags.log_level.parse().context("-log-level")?;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    let address = flags
        .http_addr
        .strip_prefix("http://")
        .unwrap_or(&flags.http_addr);
    let client_cert = flags.cert_file.clone();
    let client_key = flags.key_file.clone();
    let store = match flags.store.as_str() {
        "redb" => {
            if flags.etcd_endpoints.is_some() {
                anyhow::bail!("-etcd-endpoints needs -store etcd");
            }
            StoreChoice::Redb
        }
        "etcd" => {
            let endpoints = flags
                .etcd_endpoints
                .as_deref()
                .context("-store etcd needs -etcd-endpoints URL,URL,URL")?;
            if !(2..=3600).contains(&flags.etcd_lease_ttl) {
                anyhow::bail!("-etcd-lease-ttl must be 2 to 3600 seconds");
            }
            StoreChoice::Etcd {
                endpoints: controlplane_lite::etcd::parse_endpoints(endpoints)?,
                prefix: flags
                    .etcd_prefix
                    .clone()
                    .unwrap_or_else(|| format!("/meshgw/{}", flags.datacenter)),
                lease_ttl: std::time::Duration::from_secs(flags.etcd_lease_ttl),
            }
        }
        other => anyhow::bail!("-store {other:?}: expected redb or etcd"),
    };
    let ca_leaf_ttl_min = controlplane_lite::blocking::parse_duration(&flags.ca_leaf_ttl_min)
        .map_err(|e| anyhow::anyhow!("-ca-leaf-ttl-min {:?}: {e}", flags.ca_leaf_ttl_min))?;
    if ca_leaf_ttl_min < std::time::Duration::from_secs(1)
        || ca_leaf_ttl_min > controlplane_lite::ca::MAX_LEAF_TTL
    {
        anyhow::bail!("-ca-leaf-ttl-min must be between 1s and 8760h");
    }
    let config = AgentConfig {
        store,
        primary_datacenter: flags
            .primary_datacenter
            .clone()
            .unwrap_or_else(|| flags.datacenter.clone()),
        datacenter: flags.datacenter,
        primary_address: flags.primary_address,
        replication_token: flags.replication_token,
        data_dir: flags.data_dir,
        http_addr: address
            .parse()
            .with_context(|| format!("-http-addr {address:?} must be host:port"))?,
        node_name: flags.node,
        node_address: flags.advertise,
        default_policy: DefaultPolicy::parse(&flags.acl_default_policy)
            .context("-acl-default-policy")?,
        config_dir: flags.config_dir,
        https: match (flags.https_addr, flags.cert_file, flags.key_file) {
            (None, _, _) => None,
            (Some(address), Some(cert_file), Some(key_file)) => {
                let address = address.strip_prefix("https://").unwrap_or(&address);
                Some((
                    address
                        .parse()
                        .with_context(|| format!("-https-addr {address:?} must be host:port"))?,
                    ServerTls {
                        cert_file,
                        key_file,
                        ca_file: flags.ca_file.clone(),
                        verify_incoming: flags.verify_incoming,
                    },
                ))
            }
            (Some(_), _, _) => anyhow::bail!("-https-addr needs -cert-file and -key-file"),
        },
        cross_dc: CrossDcTransport {
            tls: ClientTls {
                ca_file: flags.ca_file,
                // The agent's own certificate is its client certificate for peers that
                // verify incoming connections (Consul's server certificates carry both EKUs).
                cert_file: client_cert,
                key_file: client_key,
            },
            allow_insecure_http: flags.primary_insecure_http,
        },
        limits: Limits {
            max_conns: flags.http_max_conns,
            max_conns_per_client: flags.http_max_conns_per_client,
            header_timeout: std::time::Duration::from_secs(flags.http_header_timeout.max(1)),
            max_blocking_queries: flags.http_max_blocking_queries,
        },
        mesh_gateway_names: flags
            .mesh_gateway_names
            .into_iter()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .collect(),
        ca_leaf_ttl_min,
    };
    // Two cores in CI and production-like demos; the agent is I/O bound and fsyncs on a
    // blocking pool, so two workers are plenty.
    malloc_trim::spawn().context("starting the malloc-trim thread")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(agent::run(config)).context("agent");
    // Replication holds blocking queries on the blocking pool; do not wait out their minute.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
