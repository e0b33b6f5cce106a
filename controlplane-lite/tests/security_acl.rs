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
