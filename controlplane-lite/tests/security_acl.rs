//! Security: who sees token secrets. The ACL privilege matrix (no token, a bogus token,
//! `acl:read`, `acl:write`, a service token, management) over every endpoint that answers with a
//! token. Consul's rule: the `SecretID` is shown only to callers holding `acl:write`.

mod common;

use common::{Agent, TempDir};
use serde_json::{json, Value};

/// Creates a policy with `rules` and a token linked to it; returns (AccessorID, SecretID).
fn token_with_rules(agent: &Agent, management: &str, name: &str, rules: &str) -> (String, String) {
    let policy = agent.put(
        "/v1/acl/policy",
        Some(management),
        &json!({"Name": name, "Rules": rules}).to_string(),
    );
    assert_eq!(policy.status, 200, "{}", policy.text);
    token_with(agent, management, json!({"Policies": [{"Name": name}]}))
}

fn token_with(agent: &Agent, management: &str, body: Value) -> (String, String) {
    let token = agent.put("/v1/acl/token", Some(management), &body.to_string());
    assert_eq!(token.status, 200, "{}", token.text);
    let token = token.json();
    (
        token["AccessorID"].as_str().expect("accessor").to_owned(),
        token["SecretID"].as_str().expect("secret").to_owned(),
    )
}

#[test]
fn token_secrets_only_for_acl_write() {
    let dir = TempDir::new("secret-matrix");
    let agent = Agent::start_in(dir.path(), "primary", &["-acl-default-policy", "deny"]);
    let management = agent.bootstrap();
    let (_, acl_read) = token_with_rules(&agent, &management, "acl-read", r#"acl = "read""#);
    let (_, acl_write) = token_with_rules(&agent, &management, "acl-write", r#"acl = "write""#);
    let (_, service) = token_with(
        &agent,
        &management,
        json!({"ServiceIdentities": [{"ServiceName": "web"}]}),
    );
    let (victim_accessor, victim) = token_with(
        &agent,
        &management,
        json!({"Description": "victim", "ServiceIdentities": [{"ServiceName": "db"}]}),
    );
    let bogus = "00000000-1111-2222-3333-444444444444".to_owned();
    let secrets = [&management, &acl_read, &acl_write, &service, &victim];

    // (name, token, holds acl:write, holds acl:read)
    let callers: [(&str, Option<&str>, bool, bool); 6] = [
        ("no token", None, false, false),
        ("bogus", Some(&bogus), false, false),
        ("acl:read", Some(&acl_read), false, true),
        ("acl:write", Some(&acl_write), true, true),
        ("service", Some(&service), false, false),
        ("management", Some(&management), true, true),
    ];
    let read_path = format!("/v1/acl/token/{victim_accessor}");
    // (path, needs: 0 = any valid token, 1 = acl:read, 2 = acl:write)
    let endpoints: [(&str, u8); 4] = [
        (&read_path, 1),
        ("/v1/acl/tokens", 1),
        ("/v1/acl/token/self", 0),
        ("/v1/internal/replication/acl-tokens", 2),
    ];
    for (caller, token, write, read) in callers {
        let valid = token != Some(bogus.as_str());
        for (path, needs) in endpoints {
            let answer = agent.get(path, token);
            let allowed = valid
                && match needs {
                    0 => true,
                    1 => read,
                    _ => write,
                };
            // The anonymous token may read itself (no token is a valid caller of self).
            let expected = if allowed { 200 } else { 403 };
            assert_eq!(
                answer.status, expected,
                "{caller} GET {path}: {}",
                answer.text
            );
            for secret in secrets {
                let shown = answer.text.contains(secret.as_str());
                if !write {
                    assert!(!shown, "{caller} GET {path} saw a secret: {}", answer.text);
                }
            }
            if allowed && write && path != "/v1/acl/token/self" {
                assert!(
                    answer.text.contains(victim.as_str()),
                    "{caller} GET {path} (acl:write) must see secrets: {}",
                    answer.text
                );
            }
            if allowed && !write {
                assert!(
                    answer.text.contains("<hidden>"),
                    "{caller} GET {path}: {}",
                    answer.text
                );
            }
        }
    }

    // Creating a token needs acl:write, and its holder sees the new secret.
    let created = agent.put("/v1/acl/token", Some(&acl_write), "{}");
    assert_eq!(created.status, 200, "{}", created.text);
    assert_ne!(created.json()["SecretID"], json!("<hidden>"));
    assert_eq!(
        agent.put("/v1/acl/token", Some(&acl_read), "{}").status,
        403
    );
}

/// Issue 13 #8: a plain `service:write` token must not announce a mesh gateway, whose WAN
/// address would then reach every datacenter's route table. The guide's gateway policy (an exact
/// `service "mesh-gateway"` write rule, no `mesh` rule) keeps working verbatim.
#[test]
fn mesh_gateway_registration_needs_mesh_write_or_a_listed_exact_name() {
    let dir = TempDir::new("mesh-gateway-acl");
    let agent = Agent::start_in(
        dir.path(),
        "primary",
        &[
            "-acl-default-policy",
            "deny",
            "-mesh-gateway-names",
            "mesh-gateway,gateway-east",
        ],
    );
    let management = agent.bootstrap();
    let guide_rules = std::fs::read_to_string(common::testdata("mesh-gateway-policy.json"))
        .expect("the guide's policy");
    let (_, guide) = token_with_rules(&agent, &management, "guide", &guide_rules);
    let (_, web) = token_with_rules(
        &agent,
        &management,
        "web",
        r#"service "web" { policy = "write" }"#,
    );
    let (_, web_identity) = token_with(
        &agent,
        &management,
        json!({"ServiceIdentities": [{"ServiceName": "web"}]}),
    );
    let (_, mesh) = token_with_rules(&agent, &management, "mesh", r#"mesh = "write""#);
    let (_, prefix) = token_with_rules(
        &agent,
        &management,
        "prefix",
        r#"service_prefix "" { policy = "write" }"#,
    );
    let (_, east) = token_with_rules(
        &agent,
        &management,
        "east",
        r#"service "gateway-east" { policy = "write" }"#,
    );
    let gateway =
        |name: &str| json!({"Kind": "mesh-gateway", "Name": name, "Port": 8443}).to_string();
    let register =
        |token: &str, body: &str| agent.put("/v1/agent/service/register", Some(token), body);

    // (caller, token, gateway name, allowed)
    let cases: [(&str, &str, &str, bool); 9] = [
        ("guide policy", &guide, "mesh-gateway", true),
        ("guide policy, another name", &guide, "gateway-west", false),
        ("web rule", &web, "web", false),
        ("web identity", &web_identity, "web", false),
        ("mesh:write", &mesh, "gateway-west", true),
        ("prefix-only, unlisted name", &prefix, "gateway-west", false),
        ("prefix-only, listed name", &prefix, "gateway-east", false),
        (
            "exact rule, second listed name",
            &east,
            "gateway-east",
            true,
        ),
        ("management", &management, "gateway-north", true),
    ];
    for (caller, token, name, allowed) in cases {
        let answer = register(token, &gateway(name));
        if allowed {
            assert_eq!(
                answer.status, 200,
                "{caller} registering {name}: {}",
                answer.text
            );
        } else {
            assert_eq!(
                answer.status, 403,
                "{caller} registering {name}: {}",
                answer.text
            );
            assert!(
                answer.text.contains("mesh:write"),
                "{caller}: the 403 names the rule needed: {}",
                answer.text
            );
        }
    }
    // The same tokens still register ordinary services of their own.
    assert_eq!(register(&web, r#"{"Name": "web", "Port": 80}"#).status, 200);
    assert_eq!(
        register(&prefix, r#"{"Name": "api", "Port": 81}"#).status,
        200
    );
    // Nor can a prefix token take a listed gateway away (deregister) or overwrite it.
    let deregister = agent.put(
        "/v1/agent/service/deregister/mesh-gateway",
        Some(&prefix),
        "",
    );
    assert_eq!(deregister.status, 403, "{}", deregister.text);
    let overwrite = register(
        &prefix,
        r#"{"ID": "gateway-west", "Name": "gateway-west", "Port": 1}"#,
    );
    assert_eq!(overwrite.status, 403, "{}", overwrite.text);

    // What reached the catalog: exactly the accepted gateways, and `web` as a plain service.
    let services = agent.get("/v1/agent/services", Some(&management)).json();
    let mut gateways: Vec<&str> = services
        .as_object()
        .map(|o| {
            o.values()
                .filter(|s| s["Kind"] == "mesh-gateway")
                .filter_map(|s| s["Service"].as_str())
                .collect()
        })
        .unwrap_or_default();
    gateways.sort_unstable();
    assert_eq!(
        gateways,
        [
            "gateway-east",
            "gateway-north",
            "gateway-west",
            "mesh-gateway"
        ],
        "{services}"
    );
}
