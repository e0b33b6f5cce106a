//! The `controlplane-lite` binary: `agent` runs the server; every other subcommand is a client.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use controlplane_lite::acl::DefaultPolicy;
use controlplane_lite::agent::{self, AgentConfig};
use controlplane_lite::cli::{self, AgentFlags, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse_from(cli::consul_style_args(std::env::args()));
    let result = match cli.command {
        Command::Agent(flags) => run_agent(flags).map(|()| ExitCode::SUCCESS),
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
    let config = AgentConfig {
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
    };
    // Two cores in CI and production-like demos; the agent is I/O bound and fsyncs on a
    // blocking pool, so two workers are plenty.
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
