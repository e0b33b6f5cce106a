//! Issue 11 item 4: the CLI takes several agent addresses (a repeated `-http-addr`, a comma
//! list, or a comma list in `CONSUL_HTTP_ADDR`) and moves past one that refuses connections.

mod common;

use common::{Agent, TempDir};

/// An address whose connects are refused: a socket the test binds on port 0 and never
/// listens on, held for the whole test so no other process can take the port.
fn dead_address() -> (socket2::Socket, String) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    socket.bind(&any.into()).expect("bind");
    let bound = socket
        .local_addr()
        .expect("address")
        .as_socket()
        .expect("inet");
    (socket, bound.to_string())
}

#[test]
fn a_dead_first_address_is_skipped_in_every_spelling() {
    let dir = TempDir::new("cli-failover");
    let agent = Agent::start_in(dir.path(), "dc1", &[]);
    let (_held, dead) = dead_address();
    let live = agent.address.clone();

    // Only the dead address: the command fails and says why.
    let (code, _, stderr) = agent.cli(&["catalog", "datacenters", "-http-addr", &dead], None);
    assert_ne!(code, 0, "a dead agent cannot answer");
    assert!(stderr.contains("cannot reach the agent"), "{stderr}");

    let comma_list = format!("{dead},http://{live}");
    for flags in [
        vec!["-http-addr", comma_list.as_str()],
        vec!["-http-addr", dead.as_str(), "-http-addr", live.as_str()],
    ] {
        let mut args = vec!["catalog", "datacenters"];
        args.extend(&flags);
        let (code, stdout, stderr) = agent.cli(&args, None);
        assert_eq!(code, 0, "{flags:?}: {stdout}{stderr}");
        assert!(stdout.contains("dc1"), "{flags:?}: {stdout}");
        assert!(
            stderr.contains(&format!("agent at http://{dead} failed")),
            "{flags:?}: {stderr}"
        );
    }

    // CONSUL_HTTP_ADDR may be a list too (the harness sets it to the live agent alone).
    let output = std::process::Command::new(common::BINARY)
        .args(["catalog", "datacenters"])
        .env("CONSUL_HTTP_ADDR", &comma_list)
        .env_remove("CONSUL_HTTP_TOKEN")
        .output()
        .expect("run cli");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("dc1"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
