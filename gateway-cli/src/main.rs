//! The `gateway` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use gateway::config::{Config, ConfigError, Problem};

mod mesh;

#[derive(Parser)]
#[command(name = "gateway", about = "Thread-per-core io_uring SNI passthrough mesh gateway", version = version_text())]
struct Cli {
    /// Log filter in tracing's EnvFilter syntax (e.g. `info`, `gateway=debug`). Defaults to
    /// the GATEWAY_LOG environment variable, then `info`.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a static mesh gateway from a TOML file.
    Run {
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// Check a configuration file: exit 0 if valid, 1 with every error otherwise.
    Validate {
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// A mesh gateway registered with controlplane-lite, following its routes (the guide's
    /// `consul connect envoy -mesh-gateway -register`). Flags take one dash like Consul's.
    Mesh(mesh_client::consul_cli::MeshCommand),
    /// The mutual-TLS sidecar of one service (the guide's `consul connect envoy -sidecar-for`).
    Sidecar(mesh_client::consul_cli::SidecarCommand),
}

/// Built once per process (clap wants a `'static` string).
fn version_text() -> &'static str {
    let text = format!(
        "{} (revision {}, {}, io driver on this kernel: {})",
        env!("CARGO_PKG_VERSION"),
        gateway::version::GIT_REVISION,
        gateway::version::RUSTC_VERSION,
        gateway::worker::io_driver_name()
    );
    Box::leak(text.into_boxed_str())
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(mesh_client::consul_cli::rewrite_single_dash(
        std::env::args_os(),
    ));
    let log_filter = gateway::logging::init(
        cli.log_level.as_deref(),
        matches!(cli.log_format, LogFormat::Json),
    );
    match cli.command {
        Command::Validate { config } => match Config::load(&config).and_then(|parsed| {
            // The token file is read at start; a bad one should fail validation too (systemd
            // runs `validate` before start and reload).
            match parsed.admin_token_file.as_deref() {
                Some(path) => gateway::admin::AdminToken::load(path)
                    .map(|_| parsed)
                    .map_err(|error| {
                        vec![ConfigError::Key {
                            key: "admin.token_file".into(),
                            problem: Problem::Invalid(error.to_string()),
                        }]
                    }),
                None => Ok(parsed),
            }
        }) {
            Ok(parsed) => {
                println!(
                    "{}: OK ({} listener(s), {} route(s))",
                    config.display(),
                    parsed.listeners.len(),
                    parsed.routes.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{}: {} error(s)", config.display(), errors.len());
                for error in errors {
                    eprintln!("  {error}");
                }
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => exit(gateway::run::run(&config, Some(log_filter))),
        Command::Mesh(command) => {
            let args = match command.into_args() {
                Ok(args) => args,
                Err(error) => return exit(Err(error.into())),
            };
            let config = args.config.clone().unwrap_or_default();
            let source = match mesh::Follower::new(args) {
                Ok(follower) => Arc::new(follower),
                Err(error) => return exit(Err(error.into())),
            };
            exit(gateway::run::serve(
                &config,
                Some(log_filter),
                gateway::route_source::RouteOrigin::Source(source),
            ))
        }
        Command::Sidecar(command) => match command.into_args() {
            Ok(args) => exit(gateway_sidecar::run(args)),
            Err(error) => exit(Err(error.into())),
        },
    }
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gateway: {error:#}");
            ExitCode::FAILURE
        }
    }
}
