//! The command lines of `gateway mesh` and `gateway sidecar`, shaped like Consul's
//! `consul connect envoy`: single-dash long flags (`-sidecar-for socat`, `-token=T`), and
//! `CONSUL_HTTP_ADDR` / `CONSUL_HTTP_TOKEN` / `CONSUL_HTTP_SSL` from the environment when the
//! flags are absent. `-http-addr` may be repeated or a comma list: the client fails over
//! between the addresses in order (see [`crate::failover`]).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use mesh_model::address::{AddressError, ControlPlaneAddress};
use mesh_model::cli::Scope;

use crate::tls::ClientTls;

/// The subcommands whose flags may be written with one dash.
const CONSUL_STYLE: [&str; 2] = ["mesh", "sidecar"];

/// Rewrite `-long-flag` to `--long-flag` after a Consul-style subcommand, so clap parses
/// Consul's spelling (the rule is `mesh-model`'s, shared with controlplane-lite's command line).
/// Short flags (`-c`), values and anything after `--` stay as they are. A value that itself
/// starts with `-letter` must be written `-flag=value`.
pub fn rewrite_single_dash(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    mesh_model::cli::rewrite_single_dash(args, Scope::AfterSubcommand(&CONSUL_STYLE))
}

/// The control-plane addresses: the `-http-addr` flags, else `CONSUL_HTTP_ADDR`, else
/// Consul's default; an address without a scheme is https when `CONSUL_HTTP_SSL` is true.
fn http_addr(flags: Vec<String>) -> Result<Vec<ControlPlaneAddress>, AddressError> {
    let values = if flags.is_empty() {
        let from_environment = std::env::var("CONSUL_HTTP_ADDR")
            .ok()
            .filter(|address| !address.trim().is_empty());
        vec![from_environment.unwrap_or_else(|| "127.0.0.1:8500".to_owned())]
    } else {
        flags
    };
    mesh_model::address::parse_list(&values, http_ssl())
}

/// `CONSUL_HTTP_SSL`, read as Consul's API client does (Go's `strconv.ParseBool`).
fn http_ssl() -> bool {
    std::env::var("CONSUL_HTTP_SSL")
        .is_ok_and(|value| matches!(value.trim(), "1" | "t" | "T" | "true" | "TRUE" | "True"))
}

fn token(flag: Option<String>) -> Option<String> {
    flag.or_else(|| std::env::var("CONSUL_HTTP_TOKEN").ok())
        .filter(|token| !token.is_empty())
}

/// Command-line arguments of `gateway mesh`.
#[derive(Debug, Clone)]
pub struct MeshArgs {
    /// Register (and on a clean stop deregister) the gateway in the catalog.
    pub register: bool,
    pub service_name: String,
    /// The LAN address: sidecars of this datacenter dial it; the gateway listens on it
    /// unless `--config` names the listeners.
    pub address: SocketAddr,
    /// The address other datacenters' gateways and sidecars dial.
    pub wan_address: SocketAddr,
    pub token: Option<String>,
    /// The control plane's addresses, in failover order.
    pub http_addr: Vec<ControlPlaneAddress>,
    /// What https to the control plane trusts and presents.
    pub tls: ClientTls,
    /// Listeners, admin, workers, timeouts; its `[[route]]`s are ignored.
    pub config: Option<PathBuf>,
    /// The admin address when there is no `--config` (Consul's `-admin-bind`).
    pub admin_bind: SocketAddr,
}

/// Command-line arguments of `gateway sidecar`.
#[derive(Debug, Clone)]
pub struct SidecarArgs {
    /// The service this sidecar fronts.
    pub sidecar_for: String,
    /// The proxy's service ID; Consul's default is `<service>-sidecar-proxy`.
    pub proxy_id: Option<String>,
    pub token: Option<String>,
    /// The control plane's addresses, in failover order.
    pub http_addr: Vec<ControlPlaneAddress>,
    /// What https to the control plane trusts and presents.
    pub tls: ClientTls,
    /// Where `/metrics` and `/ready` are served (like Envoy's admin); none if unset.
    pub admin_bind: Option<SocketAddr>,
    /// Bind the public listener here instead of the registered address (for a sidecar
    /// behind a port mapping; the catalog still advertises the registered one).
    pub listen: Option<SocketAddr>,
    /// `-redact-addresses`: no client address in any log line, at any level.
    pub redact_addresses: bool,
}

/// `gateway mesh -register -service-name N -address A -wan-address W -token T -http-addr CP`
#[derive(Debug, clap::Args)]
pub struct MeshCommand {
    /// Register the gateway in the catalog (and deregister it on a clean stop).
    #[arg(long)]
    register: bool,
    /// Accepted for compatibility with `consul connect envoy -mesh-gateway`.
    #[arg(long)]
    mesh_gateway: bool,
    /// The gateway's service name and ID.
    #[arg(long, default_value = "mesh-gateway")]
    service_name: String,
    /// LAN address (ip:port): this datacenter's sidecars dial it; the gateway listens on it
    /// unless --config names listeners. With port 0 the port bound is registered.
    #[arg(long)]
    address: SocketAddr,
    /// WAN address (ip:port) other datacenters dial; defaults to --address.
    #[arg(long)]
    wan_address: Option<SocketAddr>,
    /// ACL token (default: CONSUL_HTTP_TOKEN).
    #[arg(long)]
    token: Option<String>,
    /// Control-plane address; repeat it or give a comma list to fail over between agents
    /// (default: CONSUL_HTTP_ADDR, then 127.0.0.1:8500).
    #[arg(long)]
    http_addr: Vec<String>,
    /// The CA the agent's HTTPS certificate must chain to (default: CONSUL_CACERT).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// A client certificate for agents started with -verify-incoming (default:
    /// CONSUL_CLIENT_CERT).
    #[arg(long)]
    client_cert: Option<PathBuf>,
    /// The client certificate's key (default: CONSUL_CLIENT_KEY).
    #[arg(long)]
    client_key: Option<PathBuf>,
    /// TOML file for listeners, admin, workers, timeouts (its routes are ignored).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Admin address when there is no --config.
    #[arg(long, default_value = "127.0.0.1:19000")]
    admin_bind: SocketAddr,
}

impl MeshCommand {
    pub fn into_args(self) -> Result<MeshArgs, AddressError> {
        Ok(MeshArgs {
            register: self.register,
            service_name: self.service_name,
            address: self.address,
            wan_address: self.wan_address.unwrap_or(self.address),
            token: token(self.token),
            http_addr: http_addr(self.http_addr)?,
            tls: ClientTls {
                ca_file: self.ca_file,
                cert_file: self.client_cert,
                key_file: self.client_key,
            }
            .with_environment(),
            config: self.config,
            admin_bind: self.admin_bind,
        })
    }
}

/// `gateway sidecar -sidecar-for NAME -token T -http-addr CP`
#[derive(Debug, clap::Args)]
pub struct SidecarCommand {
    /// The service this sidecar fronts.
    #[arg(long)]
    sidecar_for: String,
    /// The proxy's service ID (default: <sidecar-for>-sidecar-proxy).
    #[arg(long)]
    proxy_id: Option<String>,
    /// ACL token (default: CONSUL_HTTP_TOKEN).
    #[arg(long)]
    token: Option<String>,
    /// Control-plane address; repeat it or give a comma list to fail over between agents
    /// (default: CONSUL_HTTP_ADDR, then 127.0.0.1:8500).
    #[arg(long)]
    http_addr: Vec<String>,
    /// The CA the agent's HTTPS certificate must chain to (default: CONSUL_CACERT).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// A client certificate for agents started with -verify-incoming (default:
    /// CONSUL_CLIENT_CERT).
    #[arg(long)]
    client_cert: Option<PathBuf>,
    /// The client certificate's key (default: CONSUL_CLIENT_KEY).
    #[arg(long)]
    client_key: Option<PathBuf>,
    /// Serve /metrics and /ready here.
    #[arg(long)]
    admin_bind: Option<SocketAddr>,
    /// Bind the public listener here instead of the registered address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Leave client addresses out of every log line (like the gateway's
    /// `[access_log] redact_addresses`).
    #[arg(long)]
    redact_addresses: bool,
}

impl SidecarCommand {
    pub fn into_args(self) -> Result<SidecarArgs, AddressError> {
        Ok(SidecarArgs {
            sidecar_for: self.sidecar_for,
            proxy_id: self.proxy_id,
            token: token(self.token),
            http_addr: http_addr(self.http_addr)?,
            tls: ClientTls {
                ca_file: self.ca_file,
                cert_file: self.client_cert,
                key_file: self.client_key,
            }
            .with_environment(),
            admin_bind: self.admin_bind,
            listen: self.listen,
            redact_addresses: self.redact_addresses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(args: &[&str]) -> Vec<String> {
        rewrite_single_dash(args.iter().map(OsString::from))
            .into_iter()
            .map(|arg| arg.into_string().expect("utf-8"))
            .collect()
    }

    #[test]
    fn single_dash_long_flags_become_double_dash_after_mesh_and_sidecar() {
        assert_eq!(
            rewrite(&[
                "gateway",
                "sidecar",
                "-sidecar-for",
                "socat",
                "-token=abc",
                "-c",
                "x"
            ]),
            [
                "gateway",
                "sidecar",
                "--sidecar-for",
                "socat",
                "--token=abc",
                "-c",
                "x"
            ]
        );
        assert_eq!(
            rewrite(&[
                "gateway",
                "--log-level",
                "debug",
                "mesh",
                "-register",
                "--address",
                "1.2.3.4:1"
            ]),
            [
                "gateway",
                "--log-level",
                "debug",
                "mesh",
                "--register",
                "--address",
                "1.2.3.4:1"
            ]
        );
    }

    #[test]
    fn other_subcommands_values_and_the_rest_after_double_dash_are_untouched() {
        assert_eq!(
            rewrite(&["gateway", "run", "-c", "file.toml"]),
            ["gateway", "run", "-c", "file.toml"]
        );
        assert_eq!(
            rewrite(&["gateway", "sidecar", "-token", "-1", "--", "-keep"]),
            ["gateway", "sidecar", "--token", "-1", "--", "-keep"]
        );
    }
}
