//! The guide's workflow for one datacenter, with the guide's files verbatim (testdata/), driven
//! through the CLI exactly as the guide types it (plus `-http-addr`/`CONSUL_HTTP_ADDR`).

mod common;

use common::{field, testdata, Agent, TempDir};
use serde_json::json;

#[test]
fn guide_steps_in_the_primary_datacenter() {
    let dir = TempDir::new("guide");
    let agent = Agent::start_in(dir.path(), "primary", &["-acl-default-policy", "deny"]);

    // ACLs: bootstrap, then the replication policy of the prerequisites.
    let management = agent.bootstrap();
    let out = agent.cli_ok(
        &[
            "acl",
            "policy",
            "create",
            "-name",
            "replication",
            "-rules",
            &format!("@{}", testdata("replication-policy.json")),
        ],
        Some(&management),
    );
    assert_eq!(field(&out, "Name:"), "replication");
    let out = agent.cli_ok(
        &[
            "acl",
            "token",
            "create",
            "-description",
            "replication token",
            "-policy-name",
            "replication",
        ],
        Some(&management),
    );
    let replication = field(&out, "SecretID:");
    assert!(
        agent.get("/v1/acl/policies", Some(&replication)).status == 200,
        "acl:write reads ACLs"
    );
    assert_eq!(
        agent
            .get("/v1/connect/intentions", Some(&replication))
            .status,
        200,
        "service:read implies intentions:read"
    );

    // Generate tokens for the gateways: the guide's mesh-gateway-policy.json (three JSON objects
    // one after another) and two tokens from it.
    let out = agent.cli_ok(
        &[
            "acl",
            "policy",
            "create",
            "-name",
            "mesh-gateway",
            "-rules",
            &format!("@{}", testdata("mesh-gateway-policy.json")),
        ],
        Some(&management),
    );
    assert_eq!(field(&out, "Name:"), "mesh-gateway");
    let out = agent.cli_ok(
        &[
            "acl",
            "token",
            "create",
            "-description",
            "mesh-gateway primary datacenter token",
            "-policy-name",
            "mesh-gateway",
        ],
        Some(&management),
    );
    let gateway_token = field(&out, "SecretID:");
    assert!(out.contains("- mesh-gateway"), "{out}");
    agent.cli_ok(
        &[
            "acl",
            "token",
            "create",
            "-description",
            "mesh-gateway secondary datacenter token",
            "-policy-name",
            "mesh-gateway",
        ],
        Some(&management),
    );

    // Deploy the gateway: what `gateway mesh -register` does, with the gateway's own token.
    let registration = json!({"Kind": "mesh-gateway", "Name": "mesh-gateway", "ID": "mesh-gateway",
        "Address": "127.0.0.1", "Port": 8443,
        "TaggedAddresses": {"lan": {"address": "127.0.0.1", "port": 8443}, "wan": {"address": "127.0.0.1", "port": 8443}},
        "Proxy": {"Config": {"connect_timeout_ms": 5000}},
        "Check": {"Name": "Mesh Gateway Listening", "TCP": "127.0.0.1:8443", "Interval": "10s", "DeregisterCriticalServiceAfter": "6h"}});
    let answer = agent.put(
        "/v1/agent/service/register",
        Some(&gateway_token),
        &registration.to_string(),
    );
    assert_eq!(answer.status, 200, "{}", answer.text);

    // Configure sidecars to use gateways: the bare-string "MeshGateway": "local".
    let out = agent.cli_ok(
        &["config", "write", &testdata("proxy-defaults.json")],
        Some(&management),
    );
    assert_eq!(out.trim(), "Config entry written: proxy-defaults/global");
    let out = agent.cli_ok(
        &[
            "config",
            "read",
            "-kind",
            "proxy-defaults",
            "-name",
            "global",
        ],
        Some(&management),
    );
    let entry: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(entry["MeshGateway"], json!({"Mode": "local"}));

    // Register the services with sidecars (files verbatim, including "token": "<token here>").
    assert_eq!(
        agent
            .cli_ok(
                &["services", "register", &testdata("socat.json")],
                Some(&management)
            )
            .trim(),
        "Registered service: socat"
    );
    assert_eq!(
        agent
            .cli_ok(
                &["services", "register", &testdata("web.json")],
                Some(&management)
            )
            .trim(),
        "Registered service: web"
    );
    let services = agent.cli_ok(&["catalog", "services"], Some(&management));
    let names: Vec<&str> = services.lines().collect();
    assert_eq!(
        names,
        [
            "mesh-gateway",
            "socat",
            "socat-sidecar-proxy",
            "web",
            "web-sidecar-proxy"
        ]
    );

    let connect = agent
        .get("/v1/health/connect/socat", Some(&gateway_token))
        .json();
    assert_eq!(connect[0]["Service"]["ID"], "socat-sidecar-proxy");
    assert_eq!(connect[0]["Service"]["Kind"], "connect-proxy");
    assert_eq!(connect[0]["Service"]["Port"], 21000);
    assert_eq!(
        connect[0]["Service"]["Proxy"]["DestinationServiceName"],
        "socat"
    );
    assert_eq!(connect[0]["Service"]["Proxy"]["LocalServicePort"], 8181);
    let web = agent
        .get("/v1/catalog/service/web-sidecar-proxy", Some(&management))
        .json();
    let upstream = &web[0]["ServiceProxy"]["Upstreams"][0];
    assert_eq!(web[0]["ServicePort"], 21001);
    assert_eq!(upstream["DestinationName"], "socat");
    assert_eq!(upstream["Datacenter"], "primary");
    assert_eq!(upstream["LocalBindAddress"], "127.0.0.1");
    assert_eq!(upstream["LocalBindPort"], 8181);
    assert!(
        !web.to_string().contains("<token here>"),
        "service tokens are not stored"
    );

    // Intentions: default deny until `intention create web socat`.
    let (code, out, _) = agent.cli(&["intention", "check", "web", "socat"], Some(&management));
    assert_eq!((code, out.trim()), (2, "Denied"));
    assert_eq!(
        agent
            .cli_ok(&["intention", "create", "web", "socat"], Some(&management))
            .trim(),
        "Created: web => socat (allow)"
    );
    assert_eq!(
        agent
            .cli_ok(&["intention", "check", "web", "socat"], Some(&management))
            .trim(),
        "Allowed"
    );
    let (code, _, _) = agent.cli(&["intention", "check", "socat", "web"], Some(&management));
    assert_eq!(code, 2);
    let list = agent.cli_ok(&["intention", "list"], Some(&management));
    assert!(
        list.lines()
            .nth(1)
            .is_some_and(|l| l.contains("web") && l.contains("allow") && l.contains("socat")),
        "{list}"
    );

    // What the gateway and the sidecars will consume.
    let roots = agent.get("/v1/connect/ca/roots", None).json();
    let td = roots["TrustDomain"]
        .as_str()
        .expect("trust domain")
        .to_owned();
    let routes = agent
        .get(
            "/v1/internal/mesh-gateway/routes?datacenter=primary",
            Some(&gateway_token),
        )
        .json();
    assert_eq!(
        routes["routes"],
        json!([
            {"sni": format!("socat.default.primary.internal.{td}"), "endpoints": ["127.0.0.1:21000"]},
            {"sni": format!("web.default.primary.internal.{td}"), "endpoints": ["127.0.0.1:21001"]},
        ])
    );
    let sidecar = agent
        .get("/v1/internal/sidecar/web-sidecar-proxy", Some(&management))
        .json();
    assert_eq!(
        sidecar["upstreams"][0]["sni"],
        format!("socat.default.primary.internal.{td}")
    );
    assert_eq!(
        sidecar["upstreams"][0]["mesh_gateway_mode"], "none",
        "same datacenter: no gateway"
    );
    assert_eq!(
        sidecar["upstreams"][0]["endpoints"],
        json!(["127.0.0.1:21000"])
    );
    assert_eq!(sidecar["upstreams"][0]["local_bind"], "127.0.0.1:8181");
}

#[test]
fn config_dir_and_reload() {
    let dir = TempDir::new("configdir");
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    std::fs::copy(testdata("socat.json"), config.join("socat.json")).expect("copy");
    std::fs::write(
        config.join("connect.json"),
        r#"{"connect": {"enabled": true}}"#,
    )
    .expect("write");
    let data = dir.path().join("data");
    let config_arg = config.to_string_lossy().into_owned();
    let agent = Agent::start_in(&data, "primary", &["-config-dir", &config_arg]);
    let services = agent.cli_ok(&["catalog", "services"], None);
    assert_eq!(
        services.lines().collect::<Vec<_>>(),
        ["socat", "socat-sidecar-proxy"]
    );
    // `consul reload` after adding web.json.
    std::fs::copy(testdata("web.json"), config.join("web.json")).expect("copy");
    assert_eq!(
        agent.cli_ok(&["reload"], None).trim(),
        "Configuration reload triggered"
    );
    let services = agent.cli_ok(&["catalog", "services"], None);
    assert_eq!(services.lines().count(), 4, "{services}");
    // Reload keeps the sidecar on its port.
    let connect = agent.get("/v1/health/connect/socat", None).json();
    assert_eq!(connect[0]["Service"]["Port"], 21000);
}

#[test]
fn cli_flags_override_the_environment() {
    let dir = TempDir::new("cliflags");
    let agent = Agent::start_in(dir.path(), "primary", &["-acl-default-policy", "deny"]);
    let management = agent.bootstrap();
    assert_eq!(
        agent
            .put(
                "/v1/agent/service/register",
                Some(&management),
                r#"{"Name":"web","Port":80}"#
            )
            .status,
        200
    );
    let output = std::process::Command::new(common::BINARY)
        .args([
            "catalog",
            "services",
            "-http-addr",
            &format!("http://{}", agent.address),
            &format!("-token={management}"),
        ])
        .env("CONSUL_HTTP_ADDR", "127.0.0.1:1")
        .env("CONSUL_HTTP_TOKEN", "anonymous")
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "web");
    // Without a token the same command sees nothing (default deny filters the catalog).
    assert_eq!(agent.cli_ok(&["catalog", "services"], None).trim(), "");
    // An unreachable agent is a clear error, not a panic.
    let output = std::process::Command::new(common::BINARY)
        .args(["catalog", "services", "-http-addr", "127.0.0.1:1"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach the agent"));
}
