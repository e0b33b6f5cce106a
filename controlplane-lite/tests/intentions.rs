//! Intentions over HTTP: precedence, uniqueness, CRUD, match, authorize.

mod common;

use common::{Agent, TempDir};
use serde_json::json;

fn create(agent: &Agent, source: &str, destination: &str, action: &str) -> String {
    let body =
        json!({"SourceName": source, "DestinationName": destination, "Action": action}).to_string();
    let answer = agent.request("POST", "/v1/connect/intentions", None, Some(&body));
    assert_eq!(answer.status, 200, "{}", answer.text);
    answer.json()["ID"].as_str().expect("ID").to_owned()
}

fn allowed(agent: &Agent, source: &str, destination: &str) -> bool {
    let answer = agent.get(
        &format!("/v1/connect/intentions/check?source={source}&destination={destination}"),
        None,
    );
    assert_eq!(answer.status, 200, "{}", answer.text);
    answer.json()["Allowed"].as_bool().expect("Allowed")
}

#[test]
fn precedence_table_over_http() {
    let dir = TempDir::new("intentions");
    // Default allow so that the default is visible as "allowed" where nothing matches.
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    create(&agent, "*", "*", "deny");
    create(&agent, "*", "db", "allow");
    create(&agent, "web", "db", "deny");
    create(&agent, "web", "*", "allow");

    // (source, destination, allowed, why)
    let table = [
        (
            "web",
            "db",
            false,
            "exact web => db (9) beats * => db (8) and web => * (6)",
        ),
        ("api", "db", true, "* => db (8)"),
        ("web", "cache", true, "web => * (6) beats * => * (5)"),
        ("api", "cache", false, "* => * (5)"),
    ];
    for (source, destination, expected, why) in table {
        assert_eq!(
            allowed(&agent, source, destination),
            expected,
            "{source} => {destination}: {why}"
        );
    }

    let list = agent.get("/v1/connect/intentions", None).json();
    let order: Vec<(String, String, u64)> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|i| {
            (
                i["SourceName"].as_str().unwrap_or("").to_owned(),
                i["DestinationName"].as_str().unwrap_or("").to_owned(),
                i["Precedence"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("web".into(), "db".into(), 9),
            ("*".into(), "db".into(), 8),
            ("web".into(), "*".into(), 6),
            ("*".into(), "*".into(), 5)
        ]
    );
    let matched = agent
        .get("/v1/connect/intentions/match?by=destination&name=db", None)
        .json();
    let sources: Vec<&str> = matched["db"]
        .as_array()
        .expect("db")
        .iter()
        .filter_map(|i| i["SourceName"].as_str())
        .collect();
    assert_eq!(
        sources,
        ["web", "*", "web", "*"],
        "web => db, * => db, web => *, * => *"
    );

    // The destination sidecar's question, keyed on the client certificate's SPIFFE ID.
    let body =
        r#"{"Target":"db","ClientCertURI":"spiffe://x.consul/ns/default/dc/secondary/svc/web"}"#;
    let answer = agent
        .request("POST", "/v1/agent/connect/authorize", None, Some(body))
        .json();
    assert_eq!(answer["Authorized"], false);
    assert!(
        answer["Reason"]
            .as_str()
            .unwrap_or("")
            .contains("DENY default/web => default/db"),
        "{answer}"
    );

    // A dotted service name is a valid SPIFFE ID (Consul's parser takes any segment without
    // a `/`), so a certificate for `web.v2` is decided by the intentions, here `* => db`,
    // rather than refused as malformed.
    let body =
        r#"{"Target":"db","ClientCertURI":"spiffe://x.consul/ns/default/dc/secondary/svc/web.v2"}"#;
    let answer = agent.request("POST", "/v1/agent/connect/authorize", None, Some(body));
    assert_eq!(answer.status, 200, "{}", answer.text);
    let answer = answer.json();
    assert_eq!(answer["Authorized"], true, "{answer}");
    assert!(
        answer["Reason"]
            .as_str()
            .unwrap_or("")
            .contains("ALLOW default/* => default/db"),
        "{answer}"
    );
}

#[test]
fn crud_uniqueness_and_validation() {
    let dir = TempDir::new("intentions-crud");
    let agent = Agent::start_in(dir.path(), "primary", &["-acl-default-policy", "deny"]);
    let management = agent.bootstrap();
    let token = Some(management.as_str());
    let body = r#"{"SourceName":"web","DestinationName":"socat","Action":"allow"}"#;
    let answer = agent.request("POST", "/v1/connect/intentions", token, Some(body));
    assert_eq!(answer.status, 200);
    let id = answer.json()["ID"].as_str().expect("id").to_owned();
    let duplicate = agent.request("POST", "/v1/connect/intentions", token, Some(body));
    assert_eq!(duplicate.status, 409, "{}", duplicate.text);

    let read = agent
        .get(&format!("/v1/connect/intentions/{id}"), token)
        .json();
    assert_eq!(
        (
            read["Action"].as_str(),
            read["Precedence"].as_u64(),
            read["SourceNS"].as_str()
        ),
        (Some("allow"), Some(9), Some("default"))
    );
    let update =
        r#"{"SourceName":"web","DestinationName":"socat","Action":"deny","Description":"closed"}"#;
    assert_eq!(
        agent
            .put(&format!("/v1/connect/intentions/{id}"), token, update)
            .status,
        200
    );
    let check = agent
        .get(
            "/v1/connect/intentions/check?source=web&destination=socat",
            token,
        )
        .json();
    assert_eq!(check["Allowed"], false);
    assert_eq!(
        agent
            .request(
                "DELETE",
                &format!("/v1/connect/intentions/{id}"),
                token,
                None
            )
            .status,
        200
    );
    assert_eq!(
        agent
            .get(&format!("/v1/connect/intentions/{id}"), token)
            .status,
        404
    );

    for (bad, field) in [
        (
            r#"{"SourceName":"web","DestinationName":"socat"}"#,
            "Action",
        ),
        (
            r#"{"SourceName":"we*","DestinationName":"socat","Action":"allow"}"#,
            "SourceName",
        ),
        (
            r#"{"SourceName":"web","DestinationName":"socat","Action":"maybe"}"#,
            "Action",
        ),
        (
            r#"{"SourceName":"web","DestinationName":"socat","Action":"allow","Bogus":1}"#,
            "Bogus",
        ),
        (
            r#"{"SourceName":"web","DestinationName":"socat","Action":"allow","SourceNS":"other"}"#,
            "SourceNS",
        ),
        ("not json", "JSON"),
    ] {
        let answer = agent.request("POST", "/v1/connect/intentions", token, Some(bad));
        assert_eq!(answer.status, 400, "{bad}");
        assert!(answer.text.contains(field), "{bad}: {}", answer.text);
    }
    assert_eq!(agent.get("/v1/connect/intentions", token).json(), json!([]));
    assert_eq!(
        agent
            .get("/v1/connect/intentions/check?source=web", token)
            .status,
        400
    );

    // CLI -deny, -replace, delete.
    assert_eq!(
        agent
            .cli_ok(&["intention", "create", "-deny", "web", "socat"], token)
            .trim(),
        "Created: web => socat (deny)"
    );
    let (code, _, stderr) = agent.cli(&["intention", "create", "web", "socat"], token);
    assert_eq!(code, 1, "{stderr}");
    agent.cli_ok(&["intention", "create", "-replace", "web", "socat"], token);
    assert_eq!(
        agent
            .cli_ok(&["intention", "check", "web", "socat"], token)
            .trim(),
        "Allowed"
    );
    agent.cli_ok(&["intention", "delete", "web", "socat"], token);
    let (code, out, _) = agent.cli(&["intention", "check", "web", "socat"], token);
    assert_eq!(
        (code, out.trim()),
        (2, "Denied"),
        "default deny from the ACL default policy"
    );
}
