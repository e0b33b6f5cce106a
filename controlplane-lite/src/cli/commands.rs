//! The client commands: each builds one or two API calls and prints Consul-like output.

use std::io::Read as _;
use std::process::ExitCode;

use serde_json::{json, Value};

use super::client::{encode, Client};
use super::{
    AclCommand, AclPolicyCommand, AclTokenCommand, CatalogCommand, ClientFlags, Command,
    ConfigCommand,
};
use super::{
    IntentionCommand, ServicesCommand, SnapshotCommand, TlsCaCommand, TlsCertCommand, TlsCommand,
};
use crate::error::{Error, Result};

impl ClientFlags {
    fn client(&self) -> Result<Client> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        Error::bad_request(format!("-token-file {}: {e}", path.display()))
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let tls = crate::tls::ClientTls {
            ca_file: self.ca_file.clone(),
            cert_file: self.client_cert.clone(),
            key_file: self.client_key.clone(),
        };
        Client::new(&self.http_addr, token, self.http_ssl.unwrap_or(false), &tls)
    }
}

fn tls_command(command: TlsCommand) -> Result<ExitCode> {
    let dir = std::env::current_dir()
        .map_err(|e| Error::bad_request(format!("current directory: {e}")))?;
    match command {
        TlsCommand::Ca(TlsCaCommand::Create { domain, days }) => {
            let (cert, key) = crate::tls::create_ca(&dir, &domain, days)?;
            println!("==> Saved {}", file_name(&cert));
            println!("==> Saved {}", file_name(&key));
        }
        TlsCommand::Cert(TlsCertCommand::Create {
            server,
            client,
            dc,
            domain,
            ca,
            key,
            additional_dnsname,
            additional_ipaddress,
            days,
        }) => {
            let role = match (server, client) {
                (true, _) => "server",
                (_, true) => "client",
                _ => return Err(Error::bad_request("choose -server or -client")),
            };
            let (default_ca, default_key) = crate::tls::ca_paths(&dir, &domain);
            let request = crate::tls::CertRequest {
                role,
                datacenter: dc,
                domain,
                dns_names: additional_dnsname,
                ip_addresses: additional_ipaddress,
                days,
            };
            let (cert, key) = crate::tls::create_cert(
                &dir,
                &ca.unwrap_or(default_ca),
                &key.unwrap_or(default_key),
                &request,
            )?;
            println!("==> Saved {}", file_name(&cert));
            println!("==> Saved {}", file_name(&key));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs a client command (everything but `agent`), printing its result.
pub fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Agent(_) => Err(Error::Internal("agent is not a client command".to_owned())),
        Command::Acl(acl) => acl_command(acl),
        Command::Config(config) => config_command(config),
        Command::Services(services) => services_command(services),
        Command::Intention(intention) => intention_command(intention),
        Command::Catalog(catalog) => catalog_command(catalog),
        Command::Tls(tls) => tls_command(tls),
        Command::Snapshot(snapshot) => snapshot_command(snapshot),
        Command::Reload(client) => {
            client.client()?.json("PUT", "/v1/agent/reload", None)?;
            println!("Configuration reload triggered");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn snapshot_command(command: SnapshotCommand) -> Result<ExitCode> {
    use crate::snapshot::{decode, MAX_SNAPSHOT_BYTES};
    let limit = u64::try_from(MAX_SNAPSHOT_BYTES).unwrap_or(u64::MAX);
    match command {
        SnapshotCommand::Save { client, file } => {
            let (status, bytes) = client.client()?.bytes("GET", "/v1/snapshot", None, limit)?;
            if status != 200 {
                return Err(Error::bad_request(format!(
                    "Unexpected response code: {status} ({})",
                    String::from_utf8_lossy(&bytes).trim()
                )));
            }
            // Check what arrived before keeping it: a backup that cannot be restored is worse
            // than none.
            let snapshot = decode(&bytes)?;
            let mut temporary = file.as_os_str().to_owned();
            temporary.push(".part");
            let temporary = std::path::PathBuf::from(temporary);
            let _ = std::fs::remove_file(&temporary);
            let io = |e: std::io::Error| {
                Error::bad_request(format!("cannot write {}: {e}", file.display()))
            };
            {
                use std::io::Write as _;
                let mut out = crate::datadir::create_private_file(&temporary)?;
                out.write_all(&bytes).map_err(io)?;
                out.sync_all().map_err(io)?;
            }
            std::fs::rename(&temporary, &file).map_err(io)?;
            println!("Saved and verified snapshot to index {}", snapshot.index);
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Restore { client, file } => {
            let bytes = std::fs::read(&file)
                .map_err(|e| Error::bad_request(format!("{}: {e}", file.display())))?;
            decode(&bytes)?;
            let (status, answer) =
                client
                    .client()?
                    .bytes("PUT", "/v1/snapshot", Some(&bytes), 1 << 20)?;
            if status != 200 {
                return Err(Error::bad_request(format!(
                    "Unexpected response code: {status} ({})",
                    String::from_utf8_lossy(&answer).trim()
                )));
            }
            println!("Restored snapshot");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Reads `@FILE`, `-` (stdin) or returns the text itself.
fn read_argument(value: &str) -> Result<String> {
    if value == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Error::bad_request(format!("stdin: {e}")))?;
        Ok(text)
    } else if let Some(path) = value.strip_prefix('@') {
        std::fs::read_to_string(path).map_err(|e| Error::bad_request(format!("{path}: {e}")))
    } else {
        Ok(value.to_owned())
    }
}

fn read_file(path: &str) -> Result<String> {
    if path == "-" {
        read_argument("-")
    } else {
        std::fs::read_to_string(path).map_err(|e| Error::bad_request(format!("{path}: {e}")))
    }
}

fn text(value: &Value, key: &str) -> String {
    match value.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn print_token(token: &Value) {
    println!("AccessorID:       {}", text(token, "AccessorID"));
    println!("SecretID:         {}", text(token, "SecretID"));
    println!("Description:      {}", text(token, "Description"));
    println!(
        "Local:            {}",
        token.get("Local").and_then(Value::as_bool).unwrap_or(false)
    );
    println!("Create Time:      {}", text(token, "CreateTime"));
    let policies = token
        .get("Policies")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !policies.is_empty() {
        println!("Policies:");
        for policy in policies {
            println!("   {} - {}", text(&policy, "ID"), text(&policy, "Name"));
        }
    }
    let identities = token
        .get("ServiceIdentities")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !identities.is_empty() {
        println!("Service Identities:");
        for identity in identities {
            let dcs = identity
                .get("Datacenters")
                .and_then(Value::as_array)
                .map(|d| {
                    d.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                });
            let dcs = dcs
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "all".to_owned());
            println!("   {} (Datacenters: {dcs})", text(&identity, "ServiceName"));
        }
    }
}

fn print_policy(policy: &Value) {
    println!("ID:           {}", text(policy, "ID"));
    println!("Name:         {}", text(policy, "Name"));
    println!("Description:  {}", text(policy, "Description"));
    let dcs = policy
        .get("Datacenters")
        .and_then(Value::as_array)
        .map(|d| {
            d.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        });
    println!("Datacenters:  {}", dcs.unwrap_or_default());
    println!("Rules:");
    println!("{}", text(policy, "Rules"));
}

/// `-policy-id` takes a full UUID or, like Consul's CLI, a unique prefix of one.
fn resolve_policy_id(client: &Client, id: &str) -> Result<String> {
    if id.len() == 36 {
        return Ok(id.to_owned());
    }
    let policies = client.json("GET", "/v1/acl/policies", None)?;
    let matches: Vec<String> = policies
        .as_array()
        .map(|list| {
            list.iter()
                .map(|p| text(p, "ID"))
                .filter(|p| p.starts_with(id))
                .collect()
        })
        .unwrap_or_default();
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::bad_request(format!(
            "-policy-id {id:?}: no policy ID starts with it"
        ))),
        _ => Err(Error::bad_request(format!(
            "-policy-id {id:?}: more than one policy ID starts with it"
        ))),
    }
}

fn acl_command(command: AclCommand) -> Result<ExitCode> {
    match command {
        AclCommand::Bootstrap(client) => {
            let token = client.client()?.json("PUT", "/v1/acl/bootstrap", None)?;
            print_token(&token);
        }
        AclCommand::Policy(AclPolicyCommand::Create {
            client,
            name,
            description,
            rules,
            valid_datacenter,
        }) => {
            let rules = read_argument(&rules)?;
            let body = json!({"Name": name, "Description": description, "Rules": rules, "Datacenters": valid_datacenter});
            let policy = client
                .client()?
                .json("PUT", "/v1/acl/policy", Some(body.to_string()))?;
            print_policy(&policy);
        }
        AclCommand::Policy(AclPolicyCommand::List { client }) => {
            let policies = client.client()?.json("GET", "/v1/acl/policies", None)?;
            for policy in policies.as_array().cloned().unwrap_or_default() {
                println!("{}:", text(&policy, "Name"));
                println!("   ID:           {}", text(&policy, "ID"));
                println!("   Description:  {}", text(&policy, "Description"));
            }
        }
        AclCommand::Token(AclTokenCommand::Create {
            client,
            description,
            policy_name,
            policy_id,
            service_identity,
            local,
        }) => {
            let client = client.client()?;
            let mut policies: Vec<Value> = policy_name.iter().map(|n| json!({"Name": n})).collect();
            for id in &policy_id {
                policies.push(json!({"ID": resolve_policy_id(&client, id)?}));
            }
            let mut identities = Vec::new();
            for spec in &service_identity {
                let (name, dcs) = match spec.split_once(':') {
                    Some((name, dcs)) => (
                        name,
                        dcs.split(',').filter(|d| !d.is_empty()).collect::<Vec<_>>(),
                    ),
                    None => (spec.as_str(), Vec::new()),
                };
                identities.push(json!({"ServiceName": name, "Datacenters": dcs}));
            }
            let body = json!({"Description": description, "Policies": policies, "ServiceIdentities": identities, "Local": local});
            let token = client.json("PUT", "/v1/acl/token", Some(body.to_string()))?;
            print_token(&token);
        }
        AclCommand::Token(AclTokenCommand::List { client }) => {
            let tokens = client.client()?.json("GET", "/v1/acl/tokens", None)?;
            for token in tokens.as_array().cloned().unwrap_or_default() {
                print_token(&token);
                println!();
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn config_command(command: ConfigCommand) -> Result<ExitCode> {
    match command {
        ConfigCommand::Write { client, file } => {
            let body = read_file(&file)?;
            let value: Value = serde_json::from_str(&body).map_err(|e| {
                Error::bad_request(format!(
                    "{file}: invalid JSON (HCL config entries are not supported yet): {e}"
                ))
            })?;
            let written = client.client()?.json("PUT", "/v1/config", Some(body))?;
            if written == Value::Bool(false) {
                return Err(Error::Conflict(
                    "config entry not written (check-and-set failed)".to_owned(),
                ));
            }
            let normalized = crate::casing::normalize(value);
            println!(
                "Config entry written: {}/{}",
                text(&normalized, "Kind"),
                text(&normalized, "Name")
            );
        }
        ConfigCommand::Read { client, kind, name } => {
            let entry = client.client()?.json(
                "GET",
                &format!("/v1/config/{}/{}", encode(&kind), encode(&name)),
                None,
            )?;
            println!(
                "{}",
                serde_json::to_string_pretty(&entry).unwrap_or_default()
            );
        }
        ConfigCommand::List { client, kind } => {
            let entries =
                client
                    .client()?
                    .json("GET", &format!("/v1/config/{}", encode(&kind)), None)?;
            for entry in entries.as_array().cloned().unwrap_or_default() {
                println!("{}", text(&entry, "Name"));
            }
        }
        ConfigCommand::Delete { client, kind, name } => {
            client.client()?.json(
                "DELETE",
                &format!("/v1/config/{}/{}", encode(&kind), encode(&name)),
                None,
            )?;
            println!("Config entry deleted: {kind}/{name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn services_command(command: ServicesCommand) -> Result<ExitCode> {
    match command {
        ServicesCommand::Register { client, file } => {
            let body = std::fs::read_to_string(&file)
                .map_err(|e| Error::bad_request(format!("{}: {e}", file.display())))?;
            let definitions =
                crate::catalog::parse_definitions(serde_json::from_str(&body).map_err(|e| {
                    Error::bad_request(format!(
                        "{}: invalid JSON (HCL definitions are not supported yet): {e}",
                        file.display()
                    ))
                })?)?;
            client
                .client()?
                .json("PUT", "/v1/agent/service/register", Some(body))?;
            for definition in definitions {
                println!(
                    "Registered service: {}",
                    definition.name.unwrap_or_default()
                );
            }
        }
        ServicesCommand::Deregister { client, id } => {
            client.client()?.json(
                "PUT",
                &format!("/v1/agent/service/deregister/{}", encode(&id)),
                None,
            )?;
            println!("Deregistered service: {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn find_intention(client: &Client, source: &str, destination: &str) -> Result<Option<Value>> {
    let all = client.json("GET", "/v1/connect/intentions", None)?;
    Ok(all.as_array().and_then(|list| {
        list.iter()
            .find(|i| text(i, "SourceName") == source && text(i, "DestinationName") == destination)
            .cloned()
    }))
}

fn intention_command(command: IntentionCommand) -> Result<ExitCode> {
    match command {
        IntentionCommand::Create {
            client,
            allow: _,
            deny,
            replace,
            meta,
            source,
            destination,
        } => {
            let client = client.client()?;
            let mut meta_map = serde_json::Map::new();
            for pair in &meta {
                let (key, value) = pair.split_once('=').ok_or_else(|| {
                    Error::bad_request(format!("-meta {pair:?}: expected key=value"))
                })?;
                meta_map.insert(key.to_owned(), Value::String(value.to_owned()));
            }
            let action = if deny { "deny" } else { "allow" };
            let body = json!({"SourceName": source, "DestinationName": destination, "SourceType": "consul", "Action": action, "Meta": meta_map});
            if replace {
                if let Some(existing) = find_intention(&client, &source, &destination)? {
                    client.json(
                        "DELETE",
                        &format!("/v1/connect/intentions/{}", encode(&text(&existing, "ID"))),
                        None,
                    )?;
                }
            }
            client.json("POST", "/v1/connect/intentions", Some(body.to_string()))?;
            println!("Created: {source} => {destination} ({action})");
        }
        IntentionCommand::Check {
            client,
            source,
            destination,
        } => {
            let answer = client.client()?.json(
                "GET",
                &format!(
                    "/v1/connect/intentions/check?source={}&destination={}",
                    encode(&source),
                    encode(&destination)
                ),
                None,
            )?;
            if answer
                .get("Allowed")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                println!("Allowed");
            } else {
                println!("Denied");
                return Ok(ExitCode::from(2));
            }
        }
        IntentionCommand::List { client } => {
            let all = client
                .client()?
                .json("GET", "/v1/connect/intentions", None)?;
            println!(
                "{:<38} {:<20} {:<6} {:<20} Precedence",
                "ID", "Source", "Action", "Destination"
            );
            for i in all.as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<38} {:<20} {:<6} {:<20} {}",
                    text(&i, "ID"),
                    text(&i, "SourceName"),
                    text(&i, "Action"),
                    text(&i, "DestinationName"),
                    text(&i, "Precedence")
                );
            }
        }
        IntentionCommand::Delete {
            client,
            source,
            destination,
        } => {
            let client = client.client()?;
            let existing = find_intention(&client, &source, &destination)?.ok_or_else(|| {
                Error::NotFound(format!("no intention {source} => {destination}"))
            })?;
            client.json(
                "DELETE",
                &format!("/v1/connect/intentions/{}", encode(&text(&existing, "ID"))),
                None,
            )?;
            println!("Intention deleted.");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn catalog_command(command: CatalogCommand) -> Result<ExitCode> {
    match command {
        CatalogCommand::Services { client, tags } => {
            let services = client.client()?.json("GET", "/v1/catalog/services", None)?;
            for (name, service_tags) in services.as_object().cloned().unwrap_or_default() {
                if tags {
                    let list = service_tags.as_array().map(|t| {
                        t.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    });
                    println!("{name}  {}", list.unwrap_or_default());
                } else {
                    println!("{name}");
                }
            }
        }
        CatalogCommand::Datacenters { client } => {
            let datacenters = client
                .client()?
                .json("GET", "/v1/catalog/datacenters", None)?;
            for dc in datacenters.as_array().cloned().unwrap_or_default() {
                println!("{}", dc.as_str().unwrap_or_default());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
