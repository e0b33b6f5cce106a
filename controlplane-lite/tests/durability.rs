//! An acknowledged write survives `kill -9`: a writer registers services as fast as it can, the
//! agent is killed mid-stream, and after a restart every acknowledged service is there.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::{wait_until, Agent, TempDir};

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = TempDir::new("durability");
    let mut acknowledged: Vec<String> = Vec::new();
    for round in 0..4u64 {
        let mut agent = Agent::start_in(dir.path(), "primary", &[]);
        let acked = Mutex::new(Vec::new());
        let stop = AtomicBool::new(false);
        let address = agent.address.clone();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let http: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build()
                    .into();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("svc-{round}-{n}");
                    let body = format!(r#"{{"Name":"{name}","Port":80}}"#);
                    match http
                        .put(format!("http://{address}/v1/agent/service/register"))
                        .send(body.as_str())
                    {
                        Ok(response) if response.status().as_u16() == 200 => {
                            acked.lock().expect("lock").push(name);
                            n += 1;
                        }
                        // Refused (a store still settling after start): not acknowledged, and
                        // the same name is tried again.
                        Ok(_) => std::thread::sleep(Duration::from_millis(10)),
                        // The agent died mid-request: this write was not acknowledged.
                        Err(_) => break,
                    }
                }
            });
            // Once writes flow, let some more through (a different amount each round), then
            // kill without warning.
            let flowing = wait_until(Duration::from_secs(30), || {
                !acked.lock().expect("lock").is_empty()
            });
            if flowing {
                std::thread::sleep(Duration::from_millis(50 + 100 * round));
            }
            agent.kill9();
            stop.store(true, Ordering::Relaxed);
        });
        let acked = acked.into_inner().expect("lock");
        assert!(
            !acked.is_empty(),
            "round {round}: no write was acknowledged within 30 s"
        );
        acknowledged.extend(acked);
    }
    let agent = Agent::start_in(dir.path(), "primary", &[]);
    let services = agent.get("/v1/catalog/services", None).json();
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|name| services.get(name.as_str()).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost: {missing:?}",
        missing.len(),
        acknowledged.len()
    );
}
