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
