//! Security of the link between datacenters: replication runs over HTTPS verified against the
//! agent CA; a capture of the link shows no token secret; a rogue "primary" whose certificate
//! comes from another CA is refused; plain http is refused unless explicitly allowed.

mod common;

use std::time::Duration;

use common::{
    eventually, owned, refs, secondary_flags, start_primary, Agent, Certs, Federation, TempDir,
};
use serde_json::json;

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn the_wan_link_is_tls_and_carries_no_secret_in_clear() {
    // The primary also requires client certificates: the secondary presents its own. A
    // recording relay stands for the WAN link. Started, ACLs have replicated over TLS.
    let federation = Federation::start_relayed("tls", &["-verify-incoming"]);
    let (secondary, relay) = (&federation.secondary, federation.relay());
    let (management, replication) = (&federation.management, &federation.replication_token);

    // Replication works: the management token, the CA and a forwarded write arrive.
    let intention = r#"{"SourceName":"web","DestinationName":"socat","Action":"allow"}"#;
    let forwarded = secondary.request(
        "POST",
        "/v1/connect/intentions",
        Some(management),
        Some(intention),
    );
    assert_eq!(forwarded.status, 200, "{}", forwarded.text);
    eventually(Duration::from_secs(30), "the intention replicates", || {
        federation.check(secondary)
    });

    // The capture saw traffic, but neither the replication token, the management token (in
    // the token table it replicates and in the forwarded write), nor the CA key in clear.
    let captured = relay.captured();
    assert!(
        captured.len() > 1000,
        "the relay saw {} bytes",
        captured.len()
    );
    for (what, secret) in [("replication", replication), ("management", management)] {
        assert!(
            !contains(&captured, secret),
            "the {what} token crossed in clear text"
        );
    }
    assert!(!contains(&captured, "X-Consul-Token"));
    assert!(!contains(&captured, "PRIVATE KEY"));
}

#[test]
fn a_rogue_primary_with_another_ca_is_refused() {
    // The real agent CA, and the attacker's own CA (another `tls ca create`).
    let certs_dir = TempDir::new("rogue-certs");
    let certs = Certs::make(certs_dir.path(), &["secondary"]);
    let rogue_dir = TempDir::new("rogue-ca");
    let rogue_certs = Certs::make(rogue_dir.path(), &["primary"]);
    // The rogue agent answers at the primary's address with a certificate for the right name
    // (server.primary.consul, 127.0.0.1) but from its own CA, and knows the sniffed token
    // (its own bootstrap stands in for a stolen replication token).
    let rogue_data = TempDir::new("rogue-p");
    let (rogue, rogue_management, rogue_replication) =
        start_primary(rogue_data.path(), rogue_certs.agent_flags("primary"));
    let secondary_dir = TempDir::new("rogue-s");
    let flags = secondary_flags(
        &rogue.https(),
        &rogue_replication,
        certs.agent_flags("secondary"),
    );
    let secondary = Agent::start_in(secondary_dir.path(), "secondary", &refs(&flags));

    // The secondary keeps failing to replicate and adopts nothing: no CA, no tokens.
    eventually(Duration::from_secs(30), "replication fails", || {
        let metrics = secondary.get("/metrics", None).text;
        metrics.contains("controlplane_replication_status{type=\"acl-tokens\"} 0")
    });
    assert_eq!(secondary.get("/v1/connect/ca/roots", None).status, 503);
    assert_eq!(
        secondary
            .get("/v1/acl/token/self", Some(&rogue_management))
            .status,
        403
    );
    // And the rogue saw no request from it: the handshake failed before any byte of HTTP.
    let _ = rogue;
}

#[test]
fn plain_http_across_datacenters_needs_the_insecure_flag() {
    let (primary_dir, secondary_dir) = (TempDir::new("plain-p"), TempDir::new("plain-s"));
    let (primary, management, replication) = start_primary(primary_dir.path(), Vec::new());
    // It exits at once (no -ca-file, no flag): a startup error, not a silent downgrade.
    let stderr = common::refused_start(
        std::process::Command::new(common::BINARY)
            .args([
                "agent",
                "-datacenter",
                "secondary",
                "-http-addr",
                "127.0.0.1:0",
            ])
            .arg("-data-dir")
            .arg(secondary_dir.path())
            .args(secondary_flags(&primary.address, &replication, Vec::new())),
    );
    assert!(
        stderr.contains("refusing plain http") && stderr.contains("-primary-insecure-http"),
        "{stderr}"
    );

    // With the explicit flag it works (and says so loudly on stderr).
    let flags = secondary_flags(
        &primary.address,
        &replication,
        vec!["-primary-insecure-http".to_owned()],
    );
    let secondary = Agent::start_in(secondary_dir.path(), "secondary", &refs(&flags));
    eventually(
        Duration::from_secs(30),
        "replication over plain http",
        || {
            secondary
                .get("/v1/acl/token/self", Some(&management))
                .status
                == 200
        },
    );
}

#[test]
fn a_new_trust_domain_from_the_primary_is_refused() {
    // A primary that is TLS-trusted but was rebuilt (a fresh data dir, so a new cluster id and
    // root) at the address the secondary knows: the secondary keeps its trust domain.
    // Started, the secondary has adopted the primary's CA.
    let mut federation = Federation::start_relayed("td", &[]);
    let trust_domain = |agent: &Agent| {
        let roots = agent.get("/v1/connect/ca/roots", None);
        (roots.status == 200).then(|| roots.json()["TrustDomain"].clone())
    };
    let adopted = trust_domain(&federation.secondary);
    assert_eq!(adopted, trust_domain(&federation.primary));

    federation.primary.kill9();
    let rebuilt_dir = TempDir::new("td-p2");
    // The rebuilt primary gets the same replication token secret, as an operator restoring
    // only the ACLs would (so replication of the rest would succeed).
    let flags = owned(
        &["-acl-default-policy", "allow"],
        federation.certs.agent_flags("primary"),
    );
    let rebuilt = Agent::start_in(rebuilt_dir.path(), "primary", &refs(&flags));
    let token = json!({"SecretID": federation.replication_token, "Policies": [{"Name": "global-management"}]});
    let made = rebuilt.put("/v1/acl/token", None, &token.to_string());
    assert_eq!(made.status, 403, "ACL writes need a token: {}", made.text);
    let rebuilt_management = rebuilt.bootstrap();
    let made = rebuilt.put(
        "/v1/acl/token",
        Some(&rebuilt_management),
        &token.to_string(),
    );
    assert_eq!(made.status, 200, "{}", made.text);
    assert_ne!(trust_domain(&rebuilt), adopted);
    federation.relay().retarget(&rebuilt.https());

    eventually(
        Duration::from_secs(30),
        "the change is refused and counted",
        || {
            federation.secondary.get("/metrics", None).text.contains(
                "controlplane_replication_ca_changes_refused_total{reason=\"trust_domain\"}",
            )
        },
    );
    assert_eq!(trust_domain(&federation.secondary), adopted);
}

/// Runs the CLI with `env`; returns (exit code, stdout, stderr).
fn cli_with(env: &[(&str, String)], args: &[&str]) -> (i32, String, String) {
    let mut command = std::process::Command::new(common::BINARY);
    command
        .args(args)
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("CONSUL_CACERT")
        .env_remove("CONSUL_CLIENT_CERT")
        .env_remove("CONSUL_CLIENT_KEY")
        .env_remove("CONSUL_HTTP_SSL");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run cli");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_cli_speaks_https_like_consul() {
    let certs_dir = TempDir::new("cli-certs");
    let certs = Certs::make(certs_dir.path(), &["primary"]);
    let made = std::process::Command::new(common::BINARY)
        .args(["tls", "cert", "create", "-client", "-dc", "primary"])
        .current_dir(certs_dir.path())
        .output()
        .expect("tls cert create -client");
    assert!(made.status.success());
    let client_cert = certs_dir.path().join("primary-client-consul-0.pem");
    let client_key = certs_dir.path().join("primary-client-consul-0-key.pem");
    let rogue_dir = TempDir::new("cli-rogue");
    let rogue = Certs::make(rogue_dir.path(), &[]);

    let data = TempDir::new("cli-agent");
    let flags = owned(&["-verify-incoming"], certs.agent_flags("primary"));
    let agent = Agent::start_in(data.path(), "primary", &refs(&flags));
    let https = agent.https();
    let url = format!("https://{https}");
    let path = |p: &std::path::Path| p.display().to_string();

    // CONSUL_HTTP_ADDR=https://…, CONSUL_CACERT, CONSUL_CLIENT_CERT/KEY: works.
    let env = [
        ("CONSUL_HTTP_ADDR", url.clone()),
        ("CONSUL_CACERT", path(&certs.ca)),
        ("CONSUL_CLIENT_CERT", path(&client_cert)),
        ("CONSUL_CLIENT_KEY", path(&client_key)),
    ];
    let (code, stdout, stderr) = cli_with(&env, &["catalog", "datacenters"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "primary");
    // A bare address with CONSUL_HTTP_SSL=true, and the flags instead of the environment.
    let (code, _, stderr) = cli_with(
        &[
            ("CONSUL_HTTP_ADDR", https.clone()),
            ("CONSUL_HTTP_SSL", "true".to_owned()),
        ],
        &[
            "catalog",
            "datacenters",
            "-ca-file",
            &path(&certs.ca),
            "-client-cert",
            &path(&client_cert),
            "-client-key",
            &path(&client_key),
        ],
    );
    assert_eq!(code, 0, "{stderr}");

    // No client certificate: the agent (-verify-incoming) refuses the handshake.
    let (code, _, _) = cli_with(&env[..2], &["catalog", "datacenters"]);
    assert_ne!(code, 0);
    // No CA file: refused before connecting, with a message.
    let (code, _, stderr) = cli_with(&env[..1], &["catalog", "datacenters"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("CA"), "{stderr}");
    // Another CA: the agent's certificate is not trusted.
    let (code, _, _) = cli_with(
        &[
            ("CONSUL_HTTP_ADDR", url),
            ("CONSUL_CACERT", path(&rogue.ca)),
            ("CONSUL_CLIENT_CERT", path(&client_cert)),
            ("CONSUL_CLIENT_KEY", path(&client_key)),
        ],
        &["catalog", "datacenters"],
    );
    assert_ne!(code, 0);
}
