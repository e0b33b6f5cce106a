//! The command line: `agent`, and Consul-shaped client commands that talk to an agent.
//!
//! Consul's flags take one dash (`-datacenter primary`, `-token=x`); clap wants two. Before
//! parsing, [`consul_style_args`] rewrites every `-word` argument into `--word` (the afterburn
//! approach). Single-letter flags (`-h`) and a bare `-` (stdin) are left alone, and nothing
//! after `--` is touched.

mod client;
mod commands;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use client::Client;
pub use commands::run;

/// Rewrites Consul-style single-dash long flags into clap's double-dash form (`mesh-model`'s
/// rule, shared with `gateway mesh` and `gateway sidecar`).
pub fn consul_style_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    mesh_model::cli::rewrite_single_dash(args, mesh_model::cli::Scope::Everywhere)
}

/// controlplane-lite: a Consul-shaped control plane for the mesh gateway.
#[derive(Parser, Debug)]
#[command(name = "controlplane-lite", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent (HTTP API, store, CA).
    Agent(Box<AgentFlags>),
    /// ACL bootstrap, policies and tokens.
    #[command(subcommand)]
    Acl(AclCommand),
    /// Config entries.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Service registrations.
    #[command(subcommand)]
    Services(ServicesCommand),
    /// Intentions.
    #[command(subcommand)]
    Intention(IntentionCommand),
    /// Catalog queries.
    #[command(subcommand)]
    Catalog(CatalogCommand),
    /// Ask the agent to register the services in its config dir again.
    Reload(ClientFlags),
    /// Make certificates for the agents' HTTPS (like `consul tls`).
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Save or restore the whole state of an agent (like `consul snapshot`).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

/// `snapshot ...`.
#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Writes the agent's whole state (including the CA private keys and token secrets) to
    /// FILE, mode 0600, after checking the snapshot's checksum.
    Save {
        /// Agent address and token (a management token).
        #[command(flatten)]
        client: ClientFlags,
        /// Where to write the snapshot.
        file: PathBuf,
    },
    /// Replaces the agent's whole state with the snapshot in FILE (checked first, applied in
    /// one transaction).
    Restore {
        /// Agent address and token (a management token).
        #[command(flatten)]
        client: ClientFlags,
        /// The snapshot to restore.
        file: PathBuf,
    },
}

/// `tls ...`.
#[derive(Subcommand, Debug)]
pub enum TlsCommand {
    /// Certificate authorities.
    #[command(subcommand)]
    Ca(TlsCaCommand),
    /// Certificates signed by the CA.
    #[command(subcommand)]
    Cert(TlsCertCommand),
}

/// `tls ca ...`.
#[derive(Subcommand, Debug)]
pub enum TlsCaCommand {
    /// Writes `<domain>-agent-ca.pem` and `<domain>-agent-ca-key.pem` (0600) in the current
    /// directory.
    Create {
        /// The domain.
        #[arg(long, default_value = "consul")]
        domain: String,
        /// Validity in days.
        #[arg(long, default_value_t = 1825)]
        days: i64,
    },
}

/// `tls cert ...`.
#[derive(Subcommand, Debug)]
pub enum TlsCertCommand {
    /// Writes `<dc>-<server|client>-<domain>-<n>.pem` and its `-key.pem` (0600) in the
    /// current directory.
    Create {
        /// A server certificate (`server.<dc>.<domain>`, localhost, 127.0.0.1; server and
        /// client auth).
        #[arg(long, conflicts_with = "client")]
        server: bool,
        /// A client certificate (client auth only).
        #[arg(long)]
        client: bool,
        /// The datacenter.
        #[arg(long = "dc", default_value = "dc1")]
        dc: String,
        /// The domain.
        #[arg(long, default_value = "consul")]
        domain: String,
        /// The CA certificate (default `<domain>-agent-ca.pem`).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The CA key (default `<domain>-agent-ca-key.pem`).
        #[arg(long)]
        key: Option<PathBuf>,
        /// An extra DNS name (repeatable).
        #[arg(long = "additional-dnsname")]
        additional_dnsname: Vec<String>,
        /// An extra IP address (repeatable).
        #[arg(long = "additional-ipaddress")]
        additional_ipaddress: Vec<std::net::IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

/// Flags of `agent`.
#[derive(Args, Debug, Clone)]
pub struct AgentFlags {
    /// This datacenter's name.
    #[arg(long, default_value = "dc1")]
    pub datacenter: String,
    /// Where state is stored (created if missing).
    #[arg(long = "data-dir")]
    pub data_dir: PathBuf,
    /// Where the HTTP API listens (`host:port`; port 0 picks a free one).
    #[arg(long = "http-addr", default_value = "127.0.0.1:8500")]
    pub http_addr: String,
    /// What ACLs do when no rule matches: allow or deny. Also the intentions default.
    #[arg(long = "acl-default-policy", default_value = "allow")]
    pub acl_default_policy: String,
    /// The primary datacenter (defaults to this one).
    #[arg(long = "primary-datacenter")]
    pub primary_datacenter: Option<String>,
    /// The primary's HTTP address (`host:port`), or a comma-separated list of the primary's
    /// agents sharing one etcd store (at most 8, failed over in order); a secondary replicates
    /// from it and forwards writes of replicated data to it.
    #[arg(long = "primary-address")]
    pub primary_address: Option<String>,
    /// The token a secondary presents to the primary (`acl:write`, `operator:write`).
    #[arg(long = "replication-token", env = "CONSUL_REPLICATION_TOKEN")]
    pub replication_token: Option<String>,
    /// A directory of service definitions (`*.json`) registered at start and on reload.
    #[arg(long = "config-dir")]
    pub config_dir: Option<PathBuf>,
    /// The node name shown in the catalog.
    #[arg(long = "node", default_value = "controlplane-lite")]
    pub node: String,
    /// The node address used for services registered without one.
    #[arg(long = "advertise", default_value = "127.0.0.1")]
    pub advertise: String,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long = "log-level", default_value = "info")]
    pub log_level: String,
    /// Where state lives: `redb` (a file in -data-dir, one agent per datacenter) or `etcd`
    /// (an etcd cluster that several agents of the datacenter share; needs -etcd-endpoints).
    #[arg(long = "store", default_value = "redb")]
    pub store: String,
    /// The etcd cluster's client URLs, comma-separated: `unix://PATH` or `http://HOST:PORT`.
    #[arg(long = "etcd-endpoints")]
    pub etcd_endpoints: Option<String>,
    /// The key prefix of this datacenter's state in etcd (default `/meshgw/<datacenter>`).
    #[arg(long = "etcd-prefix")]
    pub etcd_prefix: Option<String>,
    /// The TTL in seconds of the lease that keeps this agent registered and, if it leads, in
    /// the lead; the once-per-datacenter duties move within about this long of a leader's death.
    #[arg(long = "etcd-lease-ttl", default_value_t = 5)]
    pub etcd_lease_ttl: u64,
    /// Where the HTTPS API listens (`host:port`; port 0 picks a free one). Needs -cert-file
    /// and -key-file.
    #[arg(long = "https-addr")]
    pub https_addr: Option<String>,
    /// The agent's certificate (PEM chain).
    #[arg(long = "cert-file")]
    pub cert_file: Option<PathBuf>,
    /// The agent's private key (PEM).
    #[arg(long = "key-file")]
    pub key_file: Option<PathBuf>,
    /// The agent CA: verifies other datacenters' agents, and clients with -verify-incoming.
    #[arg(long = "ca-file")]
    pub ca_file: Option<PathBuf>,
    /// Require clients of the HTTPS listener to present a certificate signed by -ca-file.
    #[arg(long = "verify-incoming")]
    pub verify_incoming: bool,
    /// Accept plain http to other datacenters' agents. Insecure: tokens cross in clear text.
    #[arg(long = "primary-insecure-http")]
    pub primary_insecure_http: bool,
    /// Open HTTP connections from one client IP (Consul's limits.http_max_conns_per_client).
    #[arg(long = "http-max-conns-per-client", default_value_t = 200)]
    pub http_max_conns_per_client: usize,
    /// Open HTTP connections in all.
    #[arg(long = "http-max-conns", default_value_t = 4096)]
    pub http_max_conns: usize,
    /// Seconds a client has to send a request header (and the TLS handshake); idle
    /// keep-alive connections close after it too.
    #[arg(long = "http-header-timeout", default_value_t = 10)]
    pub http_header_timeout: u64,
    /// Blocking queries held open at once; more are answered 429.
    #[arg(long = "http-max-blocking-queries", default_value_t = 2048)]
    pub http_max_blocking_queries: usize,
    /// Mesh-gateway service names (comma list) that a token may register with an exact
    /// `service "NAME" { policy = "write" }` rule; other names need `mesh:write`.
    #[arg(
        long = "mesh-gateway-names",
        value_delimiter = ',',
        default_value = "mesh-gateway"
    )]
    pub mesh_gateway_names: Vec<String>,
    /// The smallest `LeafCertTTL` that `PUT /v1/connect/ca/configuration` accepts (a Go
    /// duration; at least 1s). Consul's 1h is the default; lower it only for tests that
    /// watch sidecars renew short-lived leaves.
    #[arg(long = "ca-leaf-ttl-min", default_value = "1h")]
    pub ca_leaf_ttl_min: String,
}

/// Flags every client command takes (Consul's names and environment variables).
#[derive(Args, Debug, Clone)]
pub struct ClientFlags {
    /// The agent's HTTP address; repeat it or give a comma list to fail over between agents.
    #[arg(
        long = "http-addr",
        env = "CONSUL_HTTP_ADDR",
        default_value = "http://127.0.0.1:8500",
        value_delimiter = ','
    )]
    pub http_addr: Vec<String>,
    /// ACL token sent as X-Consul-Token.
    #[arg(long, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the ACL token.
    #[arg(long = "token-file", env = "CONSUL_HTTP_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Use https for an address without a scheme (`CONSUL_HTTP_SSL=true`).
    #[arg(long = "http-ssl", env = "CONSUL_HTTP_SSL", hide = true)]
    pub http_ssl: Option<bool>,
    /// The CA that the agent's certificate must chain to (https).
    #[arg(long = "ca-file", env = "CONSUL_CACERT")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate, for agents started with -verify-incoming.
    #[arg(long = "client-cert", env = "CONSUL_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long = "client-key", env = "CONSUL_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
}

/// `acl ...`.
#[derive(Subcommand, Debug)]
pub enum AclCommand {
    /// Create the first management token (once).
    Bootstrap(ClientFlags),
    /// Policies.
    #[command(subcommand)]
    Policy(AclPolicyCommand),
    /// Tokens.
    #[command(subcommand)]
    Token(AclTokenCommand),
}

/// `acl policy ...`.
#[derive(Subcommand, Debug)]
pub enum AclPolicyCommand {
    /// Create a policy.
    Create {
        #[command(flatten)]
        client: ClientFlags,
        /// Policy name.
        #[arg(long)]
        name: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// Rules: inline HCL/JSON, `@FILE`, or `-` for stdin.
        #[arg(long)]
        rules: String,
        /// Datacenters the policy is valid in (repeatable).
        #[arg(long = "valid-datacenter")]
        valid_datacenter: Vec<String>,
    },
    /// List policies.
    List {
        #[command(flatten)]
        client: ClientFlags,
    },
}

/// `acl token ...`.
#[derive(Subcommand, Debug)]
pub enum AclTokenCommand {
    /// Create a token.
    Create {
        #[command(flatten)]
        client: ClientFlags,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// Link a policy by name (repeatable).
        #[arg(long = "policy-name")]
        policy_name: Vec<String>,
        /// Link a policy by ID (repeatable).
        #[arg(long = "policy-id")]
        policy_id: Vec<String>,
        /// `service[:dc1,dc2]` (repeatable).
        #[arg(long = "service-identity")]
        service_identity: Vec<String>,
        /// Local token (not replicated).
        #[arg(long)]
        local: bool,
    },
    /// List tokens.
    List {
        #[command(flatten)]
        client: ClientFlags,
    },
}

/// `config ...`.
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Write an entry from a JSON file (`-` for stdin).
    Write {
        #[command(flatten)]
        client: ClientFlags,
        /// The file.
        file: String,
    },
    /// Read one entry.
    Read {
        #[command(flatten)]
        client: ClientFlags,
        /// Kind.
        #[arg(long)]
        kind: String,
        /// Name.
        #[arg(long)]
        name: String,
    },
    /// List entries of a kind.
    List {
        #[command(flatten)]
        client: ClientFlags,
        /// Kind.
        #[arg(long)]
        kind: String,
    },
    /// Delete an entry.
    Delete {
        #[command(flatten)]
        client: ClientFlags,
        /// Kind.
        #[arg(long)]
        kind: String,
        /// Name.
        #[arg(long)]
        name: String,
    },
}

/// `services ...`.
#[derive(Subcommand, Debug)]
pub enum ServicesCommand {
    /// Register the services of a JSON definition file.
    Register {
        #[command(flatten)]
        client: ClientFlags,
        /// The file.
        file: PathBuf,
    },
    /// Deregister a service instance by ID.
    Deregister {
        #[command(flatten)]
        client: ClientFlags,
        /// Instance ID.
        #[arg(long)]
        id: String,
    },
}

/// `intention ...`.
#[derive(Subcommand, Debug)]
pub enum IntentionCommand {
    /// Create an intention (allow unless `-deny`).
    Create {
        #[command(flatten)]
        client: ClientFlags,
        /// Create an allow intention (the default).
        #[arg(long, conflicts_with = "deny")]
        allow: bool,
        /// Create a deny intention.
        #[arg(long)]
        deny: bool,
        /// Replace an existing intention for the same pair.
        #[arg(long)]
        replace: bool,
        /// Metadata `key=value` (repeatable).
        #[arg(long)]
        meta: Vec<String>,
        /// Source service or `*`.
        source: String,
        /// Destination service or `*`.
        destination: String,
    },
    /// Check whether a connection would be allowed (exit 0 allowed, 2 denied).
    Check {
        #[command(flatten)]
        client: ClientFlags,
        /// Source service.
        source: String,
        /// Destination service.
        destination: String,
    },
    /// List intentions in evaluation order.
    List {
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Delete the intention for a pair.
    Delete {
        #[command(flatten)]
        client: ClientFlags,
        /// Source service or `*`.
        source: String,
        /// Destination service or `*`.
        destination: String,
    },
}

/// `catalog ...`.
#[derive(Subcommand, Debug)]
pub enum CatalogCommand {
    /// List services.
    Services {
        #[command(flatten)]
        client: ClientFlags,
        /// Show tags too.
        #[arg(long)]
        tags: bool,
    },
    /// List datacenters.
    Datacenters {
        #[command(flatten)]
        client: ClientFlags,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        consul_style_args(line.split(' ').map(str::to_owned))
    }

    #[test]
    fn single_dash_long_flags_become_double_dash() {
        assert_eq!(
            args("cp agent -datacenter primary -data-dir /x -http-addr=127.0.0.1:1 -h --node n - -- -raw"),
            ["cp", "agent", "--datacenter", "primary", "--data-dir", "/x", "--http-addr=127.0.0.1:1", "-h", "--node", "n", "-", "--", "-raw"]
        );
        let parsed =
            Cli::try_parse_from(args("cp intention create -deny web socat")).expect("parse");
        match parsed.command {
            Command::Intention(IntentionCommand::Create {
                deny,
                source,
                destination,
                ..
            }) => {
                assert!(deny);
                assert_eq!((source.as_str(), destination.as_str()), ("web", "socat"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let parsed = Cli::try_parse_from(args(
            "cp acl token create -description D -policy-name mesh-gateway -token=abc",
        ))
        .expect("parse");
        match parsed.command {
            Command::Acl(AclCommand::Token(AclTokenCommand::Create {
                client,
                policy_name,
                ..
            })) => {
                assert_eq!(policy_name, ["mesh-gateway"]);
                assert_eq!(client.token.as_deref(), Some("abc"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
