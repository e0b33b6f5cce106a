//! Blocking queries against the real binary: they return on change, and at the deadline.

mod common;

use std::time::{Duration, Instant};

use common::{Agent, TempDir};

#[test]
fn returns_on_change_with_a_higher_index() {
    let dir = TempDir::new("blocking");
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    let first = agent.get("/v1/catalog/services", None);
    let index = first.index.expect("X-Consul-Index");
    assert!(index >= 1);

    std::thread::scope(|scope| {
        let waiter =
            scope.spawn(|| agent.get(&format!("/v1/catalog/services?index={index}&wait=5m"), None));
        wait_for_open_blocking_queries(&agent, 1);
        assert!(
            !waiter.is_finished(),
            "the query is still pending before the write"
        );
        let answer = agent.put(
            "/v1/agent/service/register",
            None,
            r#"{"Name":"web","Port":80}"#,
        );
        assert_eq!(answer.status, 200);
        // The query waits up to 5 minutes and the client gives up after 60 s, so an answer
        // here can only come from the write waking it.
        let answer = waiter.join().expect("join");
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert!(answer.index.expect("index") > index);
        assert!(
            answer.json().get("web").is_some(),
            "the answer shows the change"
        );
    });

    // The gateway's routes block on the catalog too.
    let routes = agent.get("/v1/internal/mesh-gateway/routes", None);
    let generation = routes.json()["generation"].as_u64().expect("generation");
    assert_eq!(Some(generation), routes.index);
    std::thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            agent.get(
                &format!("/v1/internal/mesh-gateway/routes?index={generation}&wait=5m"),
                None,
            )
        });
        wait_for_open_blocking_queries(&agent, 1);
        assert!(
            !waiter.is_finished(),
            "the routes query is still pending before the write"
        );
        let socat =
            r#"{"service": {"name": "socat", "port": 8181, "connect": {"sidecar_service": {}}}}"#;
        assert_eq!(
            agent.put("/v1/agent/service/register", None, socat).status,
            200
        );
        let answer = waiter.join().expect("join");
        assert_eq!(answer.status, 200, "{}", answer.text);
        let answer = answer.json();
        assert!(answer["generation"].as_u64().expect("generation") > generation);
        assert_eq!(answer["routes"][0]["endpoints"][0], "127.0.0.1:21000");
    });
}

#[test]
fn returns_at_the_deadline_and_ignores_other_tables() {
    let dir = TempDir::new("blocking-timeout");
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    let index = agent
        .get("/v1/connect/intentions", None)
        .index
        .expect("index");
    std::thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            let started = Instant::now();
            let answer = agent.get(
                &format!("/v1/connect/intentions?index={index}&wait=2s"),
                None,
            );
            (started.elapsed(), answer)
        });
        // A write to another table must not wake an intentions query: the query is held
        // before the write and still held once the write has committed.
        wait_for_open_blocking_queries(&agent, 1);
        assert!(
            !waiter.is_finished(),
            "the query is pending before the write"
        );
        assert_eq!(
            agent
                .put(
                    "/v1/agent/service/register",
                    None,
                    r#"{"Name":"web","Port":80}"#
                )
                .status,
            200
        );
        assert!(
            !waiter.is_finished(),
            "the services write did not answer the intentions query"
        );
        let (elapsed, answer) = waiter.join().expect("join");
        // The server's own deadline, a lower bound only: it answered at `wait`, not before.
        assert!(elapsed >= Duration::from_millis(1950), "{elapsed:?}");
        assert_eq!(answer.status, 200);
        assert_eq!(answer.index, Some(index), "no change: same index");
    });
    let answer = agent.get("/v1/catalog/services?index=1&wait=forever", None);
    assert_eq!(answer.status, 400);
    assert!(answer.text.contains("wait"), "{}", answer.text);
    let metrics = agent.get("/metrics", None).text;
    assert!(
        metrics.contains("controlplane_blocking_queries_active 0"),
        "{metrics}"
    );
}

#[test]
fn sigterm_ends_open_blocking_queries_and_exits() {
    let dir = TempDir::new("blocking-sigterm");
    let mut agent = Agent::start_in(dir.path(), "primary", &[]);
    let index = agent
        .get("/v1/catalog/services", None)
        .index
        .expect("index");
    let address = agent.address.clone();
    let waiter = std::thread::spawn(move || {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let started = Instant::now();
        let result = http
            .get(format!(
                "http://{address}/v1/catalog/services?index={index}&wait=5m"
            ))
            .call();
        (started.elapsed(), result.map(|r| r.status().as_u16()).ok())
    });
    wait_for_open_blocking_queries(&agent, 1);
    let status = std::process::Command::new("kill")
        .arg(agent.child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(exit) = agent.child.try_wait().expect("wait") {
            assert!(exit.success(), "graceful exit: {exit:?}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "agent still running 10s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (elapsed, status) = waiter.join().expect("join");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert_eq!(status, Some(200), "the open query was answered before exit");
}

/// Polls `/metrics` until `count` blocking queries are held open (so a test acts only once the
/// query really waits, however slow the machine).
fn wait_for_open_blocking_queries(agent: &Agent, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let wanted = format!("controlplane_blocking_queries_active {count}");
    while !agent
        .get("/metrics", None)
        .text
        .lines()
        .any(|l| l == wanted)
    {
        assert!(
            Instant::now() < deadline,
            "no open blocking query after 20s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
