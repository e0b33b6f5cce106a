//! Process logs: `tracing` to stderr, text or JSON, with a filter that can be read and
//! replaced at run time (`GET|POST /logging`) through a `tracing-subscriber` reload layer.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The handle the admin API changes the filter through.
#[derive(Clone)]
pub struct LogFilter {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogFilter {
    /// The filter in force, in EnvFilter syntax.
    pub fn current(&self) -> String {
        self.handle
            .with_current(|filter| filter.to_string())
            .unwrap_or_default()
    }

    /// Replace the filter; a filter that does not parse changes nothing.
    pub fn set(&self, directives: &str) -> Result<String, String> {
        let filter = EnvFilter::try_new(directives.trim())
            .map_err(|error| format!("`{}`: {error}", directives.trim()))?;
        self.handle
            .reload(filter)
            .map_err(|error| error.to_string())?;
        Ok(self.current())
    }
}

/// Install the global subscriber. `level` (from `--log-level`) wins over `GATEWAY_LOG`; the
/// default is `info`.
pub fn init(level: Option<&str>, json: bool) -> LogFilter {
    let filter = level
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_env("GATEWAY_LOG").ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            // Colours only on a terminal: journald and log files get plain text.
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .init();
    }
    LogFilter { handle }
}

/// A rate limit for one repeated warning (the EMFILE pause can fire every 50 ms per worker):
/// at most one line per `interval`, and the number of repeats left out since the last line,
/// which that next line reports and the caller counts. Sans-IO: the caller passes `now`.
#[derive(Debug)]
pub struct Throttle {
    interval: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl Throttle {
    pub const fn new(interval: std::time::Duration) -> Throttle {
        Throttle {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(repeats left out since the last line)` when this occurrence should be logged;
    /// `None` when it is suppressed (and counted here).
    pub fn allow(&mut self, now: std::time::Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn one_line_per_interval_and_the_rest_counted() {
        let mut throttle = Throttle::new(Duration::from_secs(5));
        let start = Instant::now();
        assert_eq!(throttle.allow(start), Some(0));
        for step in 1..=10 {
            assert_eq!(
                throttle.allow(start + Duration::from_millis(50 * step)),
                None
            );
        }
        assert_eq!(throttle.allow(start + Duration::from_secs(5)), Some(10));
        assert_eq!(throttle.allow(start + Duration::from_secs(6)), None);
        assert_eq!(throttle.allow(start + Duration::from_secs(11)), Some(1));
    }
}
