//! Blocking queries (Consul's long polling): `?index=N&wait=D`.
//!
//! The server holds the request until the index of one of the tables the endpoint reads moves
//! past `N`, or until `wait` runs out, and then answers with the current data and its index in
//! `X-Consul-Index`. A return does not promise a change; clients simply ask again with the new
//! index. Wake-ups come from the store's per-table watch channels, sent after each commit.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, Result};

/// Consul's default `wait` when a client sends `index` alone.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// Consul's ceiling on `wait`; longer requests are clamped.
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);

/// The blocking parameters of one request, parsed from the query string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockingQuery {
    /// The index the client already has; 0 means "answer now".
    pub index: u64,
    /// How long to hold the request at most (already clamped to [`MAX_WAIT`]).
    pub wait: Duration,
}

impl BlockingQuery {
    /// Parses the `index` and `wait` parameters; absent values mean "do not block".
    pub fn parse(index: Option<&str>, wait: Option<&str>) -> Result<BlockingQuery> {
        let index = match index {
            None | Some("") => 0,
            Some(text) => text.parse::<u64>().map_err(|_| {
                Error::bad_request(format!(
                    "invalid index {text:?}: must be an unsigned integer"
                ))
            })?,
        };
        let wait = match wait {
            None | Some("") => DEFAULT_WAIT,
            Some(text) => parse_duration(text)
                .map_err(|e| Error::bad_request(format!("invalid wait {text:?}: {e}")))?,
        };
        Ok(BlockingQuery {
            index,
            wait: wait.min(MAX_WAIT),
        })
    }

    /// Whether the request should wait at all given the tables' current index. An index ahead
    /// of ours means our state was rebuilt (a wiped data dir): answer at once, as Consul's
    /// `blockingQuery` does, so a replicating secondary resyncs instead of hanging.
    pub fn should_wait(&self, current: u64) -> bool {
        self.index > 0 && current == self.index
    }
}

/// Parses a Go-style duration: a sequence of `<number><unit>` with units `ns`, `us`, `µs`, `ms`,
/// `s`, `m`, `h` (e.g. `5m`, `1m30s`, `250ms`, `1.5s`). A bare number is taken as seconds, as
/// Consul's CLI does for `-wait`.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_owned());
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return Err(format!("expected a number at {rest:?}"));
        }
        let number: f64 = rest[..number_len]
            .parse()
            .map_err(|_| format!("bad number in {text:?}"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("missing unit in {text:?}")),
            other => return Err(format!("unknown unit {other:?}")),
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    // Anything beyond a year is a typo, not a wait; refusing it also keeps the float in range.
    if !(0.0..=31_536_000.0).contains(&total) {
        return Err("duration out of range".to_owned());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Waits until any of `receivers` reports a value above `index`, or `wait` runs out.
pub async fn wait_for_change(mut receivers: Vec<watch::Receiver<u64>>, index: u64, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if receivers.iter().any(|r| *r.borrow() > index) {
            return;
        }
        let changed = any_changed(&mut receivers);
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return;
        }
    }
}

/// Resolves when any receiver sees a new value (or its sender is gone).
async fn any_changed(receivers: &mut [watch::Receiver<u64>]) {
    let mut futures: Vec<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = receivers
        .iter_mut()
        .map(|r| {
            Box::pin(async move {
                if r.changed().await.is_err() {
                    // The store is shutting down; park forever and let the deadline end the wait.
                    std::future::pending::<()>().await;
                }
            }) as Pin<Box<dyn Future<Output = ()> + Send + '_>>
        })
        .collect();
    std::future::poll_fn(|cx| {
        for future in futures.iter_mut() {
            if future.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999h").is_err());
    }

    #[test]
    fn wait_is_clamped_and_defaulted() {
        let q = BlockingQuery::parse(Some("7"), None).expect("parse");
        assert_eq!(
            q,
            BlockingQuery {
                index: 7,
                wait: DEFAULT_WAIT
            }
        );
        let q = BlockingQuery::parse(Some("7"), Some("1h")).expect("parse");
        assert_eq!(q.wait, MAX_WAIT);
        assert!(BlockingQuery::parse(Some("-1"), None).is_err());
        assert!(q.should_wait(7));
        assert!(!q.should_wait(8));
        assert!(
            !q.should_wait(3),
            "an index that went backwards answers at once"
        );
    }

    #[tokio::test]
    async fn wait_returns_on_change_and_on_timeout() {
        let (tx, rx) = watch::channel(3u64);
        let started = tokio::time::Instant::now();
        wait_for_change(vec![rx.clone()], 3, Duration::from_millis(50)).await;
        assert!(started.elapsed() >= Duration::from_millis(50));
        let waiter = tokio::spawn(wait_for_change(vec![rx], 3, Duration::from_secs(30)));
        tx.send_replace(4);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woke")
            .expect("join");
    }
}
