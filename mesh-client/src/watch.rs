//! Following one control-plane resource with blocking queries: the one watch loop step that
//! `gateway mesh` (its route table) and the sidecar (configuration, roots, intentions) use.
//!
//! A [`Watch`] holds what a follower must remember between queries: the index to send next and
//! the number of consecutive failures. The rules are Consul's, from `mesh-model::blocking`
//! (shared with controlplane-lite's replication): follow the answered index, start over at 0
//! when it goes backwards, and back off exponentially between failures. A failure keeps the
//! index: the client fails over to the next agent and the query resumes there at the index
//! held, which is right when the agents share one store. When they do not (or a store was
//! restored), the agent answers at once with a lower index (controlplane-lite, like Consul,
//! does not hold a query whose index is ahead of its own), the watch starts over at 0 as
//! Consul's clients do, and says so once in the log. What a caller does with an answer, and
//! what else it logs, stays with the caller.

use std::time::Duration;

use mesh_model::blocking::next_index;

use crate::cp_client::{backoff, Answer, Client, ClientError};

/// The state of one followed resource.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watch {
    index: u64,
    failures: u32,
    /// The agent that answered last (`http://host:port`): another agent is asked to hold
    /// only briefly at `index` (see [`crate::cp_client::FAILOVER_WAIT`]).
    answered_by: Option<String>,
}

impl Watch {
    /// A watch that has seen nothing yet: its first query does not block.
    pub fn new() -> Watch {
        Watch::default()
    }

    /// The `?index=` the next query sends (0: answer at once).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Consecutive failures since the last usable answer.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Ask for `path` once: a plain request at index 0, a blocking query otherwise. The watch
    /// only notes which agent answered; the caller reports the outcome with [`Watch::succeeded`] once the answer
    /// was usable, or [`Watch::failed`].
    pub async fn query(&mut self, client: &Client, path: &str) -> Result<Answer, ClientError> {
        let answer = if self.index == 0 {
            client.get(path).await
        } else {
            client
                .get_blocking(path, self.index, self.answered_by.as_deref())
                .await
        }?;
        self.answered_by = Some(client.address());
        Ok(answer)
    }

    /// An answer carrying `X-Consul-Index` `answered` was used: the next query blocks on it
    /// (or starts over at 0 if it went backwards). Returns whether this ends a run of failures.
    pub fn succeeded(&mut self, answered: Option<u64>) -> bool {
        let next = next_index(self.index, answered);
        if next == 0 && self.index > 0 {
            tracing::info!(
                held = self.index,
                answered = ?answered,
                "control plane: the index went backwards (another store, or a restored one); starting over at 0"
            );
        }
        self.index = next;
        let recovered = self.failures > 0;
        self.failures = 0;
        recovered
    }

    /// The query failed, or its answer was unusable: the next query is sent after the
    /// returned back-off, which grows with each consecutive failure, and resumes at the index
    /// held (on whichever agent the client asks next).
    pub fn failed(&mut self) -> Duration {
        let delay = backoff(self.failures);
        self.failures = self.failures.saturating_add(1);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_index_and_resumes_at_it_after_a_failure() {
        let mut watch = Watch::new();
        assert_eq!(watch.index(), 0);
        assert!(!watch.succeeded(Some(7)));
        assert_eq!(watch.index(), 7);
        assert_eq!(watch.failed(), backoff(0));
        assert_eq!(watch.failed(), backoff(1));
        assert_eq!(
            (watch.index(), watch.failures()),
            (7, 2),
            "the next agent is asked at the index held"
        );
        assert!(watch.succeeded(Some(9)), "a success ends the outage");
        assert_eq!((watch.index(), watch.failures()), (9, 0));
        // An index going backwards (another, unshared store) starts over (Consul's rule).
        assert!(!watch.succeeded(Some(2)));
        assert_eq!(watch.index(), 0);
    }

    /// The first query of a watch is plain, every later one blocks on the answered index.
    #[test]
    fn queries_block_only_once_an_index_is_known() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let address = listener.local_addr().expect("address");
            let server = tokio::spawn(async move {
                let mut targets = Vec::new();
                for index in [5u64, 6] {
                    let (mut stream, _) = listener.accept().await.expect("accept");
                    targets.push(read_target(&mut stream).await);
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nX-Consul-Index: {index}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                    );
                    tokio::io::AsyncWriteExt::write_all(&mut stream, answer.as_bytes())
                        .await
                        .expect("write");
                }
                targets
            });
            let client = Client::new(&address.to_string(), None).expect("client");
            let mut watch = Watch::new();
            for _ in 0..2 {
                let answer = tokio::time::timeout(
                    Duration::from_secs(10),
                    watch.query(&client, "/v1/thing"),
                )
                .await
                .expect("answered in time")
                .expect("answer");
                watch.succeeded(answer.index);
            }
            assert_eq!(watch.index(), 6);
            let targets = tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("server done")
                .expect("server");
            assert_eq!(targets[0], "/v1/thing");
            assert!(
                targets[1].starts_with("/v1/thing?index=5&wait="),
                "{}",
                targets[1]
            );
        });
    }

    async fn read_target(stream: &mut tokio::net::TcpStream) -> String {
        let mut request = Vec::new();
        let mut buffer = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 64 * 1024 {
            let n = tokio::io::AsyncReadExt::read(stream, &mut buffer)
                .await
                .expect("read");
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buffer[..n]);
        }
        let text = String::from_utf8_lossy(&request);
        text.split(' ').nth(1).unwrap_or_default().to_owned()
    }
}
