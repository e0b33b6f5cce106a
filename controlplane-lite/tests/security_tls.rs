//! Security of the link between datacenters: replication runs over HTTPS verified against the
//! agent CA; a capture of the link shows no token secret; a rogue "primary" whose certificate
//! comes from another CA is refused; plain http is refused unless explicitly allowed.

mod common;

use std::time::{Duration, Instant};

use common::{field, Agent, Certs, Relay, TempDir};
use serde_json::json;

const REPLICATION_POLICY: &str =
    r#"{"acl": "write", "operator": "write", "service_prefix": {"": {"policy": "read"}}}"#;

fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn owned(flags: &[&str], more: Vec<String>) -> Vec<String> {
    let mut all: Vec<String> = flags.iter().map(|s| (*s).to_owned()).collect();
    all.extend(more);
    all
}

fn refs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// A primary with ACLs bootstrapped and a replication token: (agent, management, replication).
fn primary(dir: &TempDir, tls: Vec<String>) -> (Agent, String, String) {
    let flags = owned(&["-acl-default-policy", "deny"], tls);
    let primary = Agent::start_in(dir.path(), "primary", &refs(&flags));
    let management = primary.bootstrap();
    let policy = json!({"Name": "replication", "Rules": REPLICATION_POLICY});
    assert_eq!(
        primary
            .put("/v1/acl/policy", Some(&management), &policy.to_string())
            .status,
        200
    );
    let out = primary.cli_ok(
        &["acl", "token", "create", "-policy-name", "replication"],
        Some(&management),
    );
    let replication = field(&out, "SecretID:");
    (primary, management, replication)
}

fn secondary_flags(primary_address: &str, replication: &str, more: Vec<String>) -> Vec<String> {
    owned(
        &[
            "-acl-default-policy",
            "deny",
            "-primary-datacenter",
            "primary",
            "-primary-address",
            primary_address,
            "-replication-token",
            replication,
        ],
        more,
    )
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn the_wan_link_is_tls_and_carries_no_secret_in_clear() {
    let certs_dir = TempDir::new("tls-certs");
    let certs = Certs::make(certs_dir.path(), &["primary", "secondary"]);
    let (primary_dir, secondary_dir) = (TempDir::new("tls-p"), TempDir::new("tls-s"));
    // The primary also requires client certificates: the secondary presents its own.
    let mut primary_flags = certs.agent_flags("primary");
    primary_flags.push("-verify-incoming".to_owned());
    let (primary, management, replication) = primary(&primary_dir, primary_flags);
    // A recording relay stands for the WAN link.
    let relay = Relay::start(&primary.https_address.clone().expect("https"));
    let flags = secondary_flags(&relay.address, &replication, certs.agent_flags("secondary"));
    let secondary = Agent::start_in(secondary_dir.path(), "secondary", &refs(&flags));

    // Replication works: the management token, the CA and a forwarded write arrive.
    eventually(Duration::from_secs(30), "ACLs replicate over TLS", || {
        secondary
            .get("/v1/acl/token/self", Some(&management))
            .status
            == 200
    });
    let intention = r#"{"SourceName":"web","DestinationName":"socat","Action":"allow"}"#;
    let forwarded = secondary.request(
        "POST",
        "/v1/connect/intentions",
        Some(&management),
        Some(intention),
    );
    assert_eq!(forwarded.status, 200, "{}", forwarded.text);
    eventually(Duration::from_secs(30), "the intention replicates", || {
        let check = secondary.get(
            "/v1/connect/intentions/check?source=web&destination=socat",
            Some(&management),
        );
        check.status == 200 && check.json()["Allowed"] == json!(true)
    });

    // The capture saw traffic, but neither the replication token, the management token (in
    // the token table it replicates and in the forwarded write), nor the CA key in clear.
    let captured = relay.captured();
    assert!(
        captured.len() > 1000,
        "the relay saw {} bytes",
        captured.len()
    );
    for (what, secret) in [("replication", &replication), ("management", &management)] {
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
        primary(&rogue_data, rogue_certs.agent_flags("primary"));
    let secondary_dir = TempDir::new("rogue-s");
    let flags = secondary_flags(
        &rogue.https_address.clone().expect("https"),
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
    let (primary, management, replication) = primary(&primary_dir, Vec::new());
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
    let certs_dir = TempDir::new("td-certs");
    let certs = Certs::make(certs_dir.path(), &["primary", "secondary"]);
    let (primary_dir, secondary_dir) = (TempDir::new("td-p"), TempDir::new("td-s"));
    let (mut first, management, replication) = primary(&primary_dir, certs.agent_flags("primary"));
    let relay = Relay::start(&first.https_address.clone().expect("https"));
    let flags = secondary_flags(&relay.address, &replication, certs.agent_flags("secondary"));
    let secondary = Agent::start_in(secondary_dir.path(), "secondary", &refs(&flags));
    let trust_domain = |agent: &Agent| {
        let roots = agent.get("/v1/connect/ca/roots", None);
        (roots.status == 200).then(|| roots.json()["TrustDomain"].clone())
    };
    eventually(
        Duration::from_secs(30),
        "the secondary adopts the CA",
        || {
            trust_domain(&secondary).is_some()
                && secondary
                    .get("/v1/acl/token/self", Some(&management))
                    .status
                    == 200
        },
    );
    let adopted = trust_domain(&secondary);
    assert_eq!(adopted, trust_domain(&first));

    first.kill9();
    let rebuilt_dir = TempDir::new("td-p2");
    // The rebuilt primary gets the same replication token secret, as an operator restoring
    // only the ACLs would (so replication of the rest would succeed).
    let flags = owned(
        &["-acl-default-policy", "allow"],
        certs.agent_flags("primary"),
    );
    let rebuilt = Agent::start_in(rebuilt_dir.path(), "primary", &refs(&flags));
    let token = json!({"SecretID": replication, "Policies": [{"Name": "global-management"}]});
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
    relay.retarget(&rebuilt.https_address.clone().expect("https"));

    eventually(
        Duration::from_secs(30),
        "the change is refused and counted",
        || {
            secondary.get("/metrics", None).text.contains(
                "controlplane_replication_ca_changes_refused_total{reason=\"trust_domain\"}",
            )
        },
    );
    assert_eq!(trust_domain(&secondary), adopted);
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
    let https = agent.https_address.clone().expect("https");
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
