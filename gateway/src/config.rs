//! The static configuration file (DESIGN.md "Static configuration", a contract).
//!
//! Parsed into typed values at the edge; the rest of the gateway never re-checks. Unknown keys
//! are errors, every error names its key, and all errors are reported in one pass, so an
//! operator fixes a file in one round.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use crate::clienthello::DEFAULT_MAX_HELLO_BYTES;
use crate::routes::{Pattern, RouteSpec, RouteTable};

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub admin: Option<SocketAddr>,
    /// `[admin] handover_socket`: the Unix socket through which a new gateway process takes
    /// the listening sockets over from this one (zero-downtime upgrade).
    pub handover_socket: Option<PathBuf>,
    /// `[admin] token_file`: a file holding the bearer token that mutating admin requests
    /// (`POST /reload`, `/drain`, `/logging`) must carry. Read once at start.
    pub admin_token_file: Option<PathBuf>,
    pub workers: Workers,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub routes: Vec<RouteSpec>,
    /// Endpoints for a valid ClientHello without server_name; without it such hellos are
    /// closed and counted.
    pub default_route: Option<Vec<SocketAddr>>,
    pub access_log: AccessLog,
    pub drain: Drain,
}

/// `timeouts.write_stall` by default: HAProxy's documentation suggests 30 s and more for
/// `timeout client`/`timeout server`; a peer that accepts no byte for 30 s has stopped reading.
pub const DEFAULT_WRITE_STALL: Duration = Duration::from_secs(30);

/// Listeners one process may ever have (each keeps its metric slot for the process's life).
pub const MAX_LISTENERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// The `listener` label in metrics and logs.
    pub name: String,
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workers {
    /// `None`: one per CPU in the process's affinity mask.
    pub count: Option<usize>,
    pub pin: bool,
    /// `[workers] busy_poll`: how long a worker spins, watching its ring, before it sleeps in
    /// the kernel (HAProxy's `busy-polling`, but bounded). `None` (the default): it sleeps at
    /// once. Only the completion engine (the default) spins.
    pub busy_poll: Option<Duration>,
}

/// `busy_poll = true`: spin this long. A loopback round trip through a peer takes tens of
/// microseconds, so a spin of this length catches the answer to what was just sent.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(200);

/// The longest spin `busy_poll` accepts: beyond it a worker would burn its CPU for nothing a
/// sleep would not do as well.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Absolute deadline from accept to a complete ClientHello (slowloris defence).
    pub client_hello: Duration,
    pub connect: Duration,
    /// A proxied connection with no bytes either way for this long is closed.
    pub idle: Duration,
    /// A proxied connection with bytes waiting for a peer that accepts none of them for this
    /// long (the peer stopped reading) is closed: HAProxy's `timeout client`/`timeout server`
    /// for the data phase. Shorter than `idle`, which a silent but healthy pair may reach.
    pub write_stall: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `None`: derived from the file-descriptor limit at start.
    pub max_connections: Option<usize>,
    /// Cap on bytes buffered while waiting for a whole ClientHello.
    pub client_hello_max_bytes: usize,
    /// How long an endpoint that failed to connect is held out of round robin.
    pub endpoint_backoff: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    pub target: AccessLogTarget,
    /// Write `"redacted"` instead of the client's address (client addresses can be personal
    /// data; Consul's access-log documentation warns about it).
    pub redact_addresses: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stdout,
    File(PathBuf),
}

/// `[drain]`: what SIGTERM and `POST /drain` do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// How long `/ready` says 503 while the listeners still accept, so that load balancers
    /// notice before connections are refused. Zero is allowed.
    pub announce: Duration,
    /// How long open connections may take to finish once the listeners are closed; the rest
    /// are closed when it runs out.
    pub timeout: Duration,
}

impl Default for Drain {
    fn default() -> Drain {
        Drain {
            announce: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
        }
    }
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            client_hello: Duration::from_secs(10),
            connect: Duration::from_secs(5),
            idle: Duration::from_secs(3600),
            write_stall: DEFAULT_WRITE_STALL,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: None,
            client_hello_max_bytes: DEFAULT_MAX_HELLO_BYTES,
            endpoint_backoff: Duration::from_secs(5),
        }
    }
}

impl Default for AccessLog {
    fn default() -> AccessLog {
        AccessLog {
            target: AccessLogTarget::Off,
            redact_addresses: false,
        }
    }
}

impl Config {
    /// A configuration of `listeners` and an admin address with every other setting at the
    /// file's defaults and no routes (`gateway mesh` without `--config`: its routes come from
    /// the control plane).
    pub fn with_listeners(listeners: Vec<Listener>, admin: Option<SocketAddr>) -> Config {
        Config {
            listeners,
            admin,
            handover_socket: None,
            admin_token_file: None,
            workers: Workers::default(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            routes: Vec::new(),
            default_route: None,
            access_log: AccessLog::default(),
            drain: Drain::default(),
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            vec![ConfigError::Unreadable {
                path: path.to_owned(),
                reason: error.to_string(),
            }]
        })?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let table: Table = text.parse().map_err(|error: toml::de::Error| {
            vec![ConfigError::Syntax(
                error.to_string().trim_end().replace('\n', " "),
            )]
        })?;
        let mut errors = Errors::default();
        let config = Config::from_table(&table, &mut errors);
        if let Some(config) = config.filter(|_| errors.0.is_empty()) {
            // Build the table once so that duplicate routes are reported by `validate` too.
            if let Err(error) = config.route_table() {
                errors.push("route", error);
            } else {
                return Ok(config);
            }
        }
        Err(errors.0)
    }

    pub fn route_table(&self) -> Result<RouteTable, String> {
        RouteTable::build(self.routes.clone(), self.default_route.clone())
    }

    fn from_table(table: &Table, errors: &mut Errors) -> Option<Config> {
        errors.unknown_keys(
            "",
            table,
            &[
                "listener",
                "admin",
                "workers",
                "timeouts",
                "limits",
                "route",
                "default_route",
                "access_log",
                "drain",
            ],
        );
        let listeners = array_of_tables(table, "listener", errors)
            .into_iter()
            .enumerate()
            .filter_map(|(index, (key, item))| {
                errors.unknown_keys(&key, item, &["name", "address"]);
                let name = item
                    .contains_key("name")
                    .then(|| required_string(item, &key, "name", errors))
                    .flatten();
                let address = required_address(item, &key, "address", errors);
                Some(Listener {
                    name: name.unwrap_or_else(|| format!("listener{index}")),
                    address: address?,
                })
            })
            .collect::<Vec<_>>();
        if listeners.len() > MAX_LISTENERS {
            errors.push(
                "listener",
                format!("at most {MAX_LISTENERS} listeners are supported"),
            );
        }
        if listeners.is_empty() && table.get("listener").is_none() {
            errors.push("listener", "at least one [[listener]] is required".into());
        }
        let mut names = std::collections::HashSet::new();
        for listener in &listeners {
            if !names.insert(listener.name.clone()) {
                errors.push(
                    "listener.name",
                    format!("`{}` is used by two listeners", listener.name),
                );
            }
        }

        let mut handover_socket = None;
        let mut admin_token_file = None;
        let admin = sub_table(table, "admin", errors).and_then(|admin| {
            errors.unknown_keys(
                "admin",
                admin,
                &["address", "handover_socket", "token_file"],
            );
            if admin.contains_key("handover_socket") {
                handover_socket =
                    required_string(admin, "admin", "handover_socket", errors).map(PathBuf::from);
            }
            if admin.contains_key("token_file") {
                admin_token_file = required_string(admin, "admin", "token_file", errors)
                    .filter(|path| {
                        let empty = path.trim().is_empty();
                        if empty {
                            errors.push("admin.token_file", "must name a file".into());
                        }
                        !empty
                    })
                    .map(PathBuf::from);
            }
            required_address(admin, "admin", "address", errors)
        });

        let mut workers = Workers::default();
        if let Some(section) = sub_table(table, "workers", errors) {
            errors.unknown_keys("workers", section, &["count", "pin", "busy_poll"]);
            workers.count = optional_integer(section, "workers", "count", 1, 1024, errors);
            workers.pin = optional_bool(section, "workers", "pin", errors).unwrap_or(false);
            workers.busy_poll = busy_poll(section, errors);
        }

        let mut timeouts = Timeouts::default();
        if let Some(section) = sub_table(table, "timeouts", errors) {
            errors.unknown_keys(
                "timeouts",
                section,
                &["client_hello", "connect", "idle", "write_stall"],
            );
            for (key, slot) in [
                ("client_hello", &mut timeouts.client_hello),
                ("connect", &mut timeouts.connect),
                ("idle", &mut timeouts.idle),
                ("write_stall", &mut timeouts.write_stall),
            ] {
                if let Some(value) = optional_duration(section, "timeouts", key, errors) {
                    *slot = value;
                }
            }
        }

        let mut limits = Limits::default();
        if let Some(section) = sub_table(table, "limits", errors) {
            errors.unknown_keys(
                "limits",
                section,
                &[
                    "max_connections",
                    "client_hello_max_bytes",
                    "endpoint_backoff",
                ],
            );
            limits.max_connections =
                optional_integer(section, "limits", "max_connections", 1, 10_000_000, errors);
            // The floor fits the smallest real hello (~250 B) with room; the ceiling keeps one
            // connection's buffer bounded (1 MiB).
            if let Some(bytes) = optional_integer(
                section,
                "limits",
                "client_hello_max_bytes",
                512,
                1 << 20,
                errors,
            ) {
                limits.client_hello_max_bytes = bytes;
            }
            if let Some(backoff) = optional_duration(section, "limits", "endpoint_backoff", errors)
            {
                limits.endpoint_backoff = backoff;
            }
        }

        let routes = array_of_tables(table, "route", errors)
            .into_iter()
            .filter_map(|(key, item)| {
                errors.unknown_keys(&key, item, &["sni", "endpoints"]);
                let pattern = required_string(item, &key, "sni", errors).and_then(|text| {
                    Pattern::parse(&text)
                        .map_err(|error| errors.push(&format!("{key}.sni"), error))
                        .ok()
                });
                let endpoints = endpoint_list(item, &key, errors);
                Some(RouteSpec {
                    pattern: pattern?,
                    endpoints: endpoints?,
                })
            })
            .collect();

        let default_route = sub_table(table, "default_route", errors).and_then(|section| {
            errors.unknown_keys("default_route", section, &["endpoints"]);
            endpoint_list(section, "default_route", errors)
        });

        let mut access_log = AccessLog::default();
        if let Some(section) = sub_table(table, "access_log", errors) {
            errors.unknown_keys("access_log", section, &["path", "redact_addresses"]);
            if let Some(path) = required_string(section, "access_log", "path", errors) {
                access_log.target = match path.as_str() {
                    "off" => AccessLogTarget::Off,
                    "stdout" | "-" => AccessLogTarget::Stdout,
                    _ => AccessLogTarget::File(path.into()),
                };
            }
            access_log.redact_addresses =
                optional_bool(section, "access_log", "redact_addresses", errors).unwrap_or(false);
        }

        let mut drain = Drain::default();
        if let Some(section) = sub_table(table, "drain", errors) {
            errors.unknown_keys("drain", section, &["announce", "timeout"]);
            // "0s" is a valid announce period: close the listeners at once.
            if section.get("announce").and_then(Value::as_str) == Some("0s") {
                drain.announce = Duration::ZERO;
            } else if let Some(value) = optional_duration(section, "drain", "announce", errors) {
                drain.announce = value;
            }
            if let Some(value) = optional_duration(section, "drain", "timeout", errors) {
                drain.timeout = value;
            }
        }

        Some(Config {
            listeners,
            admin,
            handover_socket,
            admin_token_file,
            workers,
            timeouts,
            limits,
            routes,
            default_route,
            access_log,
            drain,
        })
    }
}

/// `[workers] busy_poll`: `true` (the default spin), `false`, or a duration up to
/// [`MAX_BUSY_POLL`], which may be given in microseconds ("50us").
fn busy_poll(table: &Table, errors: &mut Errors) -> Option<Duration> {
    let key = "workers.busy_poll";
    let spin = match table.get("busy_poll")? {
        Value::Boolean(false) => return None,
        Value::Boolean(true) => DEFAULT_BUSY_POLL,
        Value::String(text) => {
            let parsed = match text.strip_suffix("us") {
                Some(number) => match number.parse::<u64>() {
                    Ok(0) => Err(format!("`{text}` must be greater than zero")),
                    Ok(micros) => Ok(Duration::from_micros(micros)),
                    Err(_) => Err(format!("`{text}` is not a whole number followed by a unit")),
                },
                None => parse_duration(text),
            };
            match parsed {
                Ok(spin) => spin,
                Err(error) => {
                    errors.push(key, error);
                    return None;
                }
            }
        }
        other => {
            errors.wrong_type(
                key,
                "true, false or a duration string like \"200us\"",
                other,
            );
            return None;
        }
    };
    if spin > MAX_BUSY_POLL {
        errors.push(
            key,
            format!("{spin:?} is longer than the {MAX_BUSY_POLL:?} a spin may last"),
        );
        return None;
    }
    Some(spin)
}

/// Parse "10s", "250ms", "5m", "1h" (a whole number and a unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` needs a unit: ms, s, m or h"))?;
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number followed by a unit"))?;
    let millis = match unit {
        "ms" => Some(value),
        "s" => value.checked_mul(1000),
        "m" => value.checked_mul(60_000),
        "h" => value.checked_mul(3_600_000),
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use ms, s, m or h)"
            ))
        }
    };
    match millis {
        Some(0) => Err(format!("`{text}` must be greater than zero")),
        Some(millis) => Ok(Duration::from_millis(millis)),
        None => Err(format!("`{text}` is too long")),
    }
}

/// One problem with a configuration, found when it is loaded (at start, by `validate` and by
/// a reload). Every variant is the operator's to fix, in the file or in how it is named; none
/// is a fault of the gateway or of a peer. `Display` is the line operators see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read: a wrong path or a missing permission.
    #[error("{}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    /// The file is not TOML (the parser's message, on one line).
    #[error("{0}")]
    Syntax(String),
    /// A key's value is wrong. `key` is its dotted path, e.g. `listener[0].address`.
    #[error("{key}: {problem}")]
    Key { key: String, problem: Problem },
}

impl ConfigError {
    /// The key at fault, if the problem is one key's.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Key { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// What is wrong with one key's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A key this version does not know (often a typo); `expected` lists the known ones.
    #[error("unknown key (expected one of: {expected})")]
    UnknownKey { expected: String },
    /// A value of the wrong TOML type.
    #[error("expected {expected}, found {found}")]
    WrongType {
        expected: String,
        found: &'static str,
    },
    /// A key that must be present is missing.
    #[error("is required")]
    Required,
    /// An integer outside the range the key allows.
    #[error("{value} is out of range {min}..={max}")]
    OutOfRange { value: i64, min: i64, max: i64 },
    /// A string that is not a socket address.
    #[error("`{0}` is not an IP address and port like 127.0.0.1:8443")]
    NotAnAddress(String),
    /// Any other refusal, in the words of the value's own parser (durations, SNI patterns,
    /// the route table's consistency, duplicate names, the token file).
    #[error("{0}")]
    Invalid(String),
}

/// Every problem of one configuration, reported together so an operator fixes a file in one
/// round.
pub type ConfigErrors = Vec<ConfigError>;

#[derive(Default)]
struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, key: &str, message: String) {
        self.problem(key, Problem::Invalid(message));
    }

    fn problem(&mut self, key: &str, problem: Problem) {
        self.0.push(ConfigError::Key {
            key: key.to_owned(),
            problem,
        });
    }

    fn wrong_type(&mut self, key: &str, expected: &str, found: &Value) {
        self.problem(
            key,
            Problem::WrongType {
                expected: expected.to_owned(),
                found: found.type_str(),
            },
        );
    }

    fn unknown_keys(&mut self, prefix: &str, table: &Table, known: &[&str]) {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                let full = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                self.problem(
                    &full,
                    Problem::UnknownKey {
                        expected: known.join(", "),
                    },
                );
            }
        }
    }
}

fn sub_table<'a>(table: &'a Table, key: &str, errors: &mut Errors) -> Option<&'a Table> {
    match table.get(key)? {
        Value::Table(inner) => Some(inner),
        other => {
            errors.wrong_type(key, "a table", other);
            None
        }
    }
}

fn array_of_tables<'a>(
    table: &'a Table,
    key: &str,
    errors: &mut Errors,
) -> Vec<(String, &'a Table)> {
    match table.get(key) {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(index, item)| {
                let item_key = format!("{key}[{index}]");
                match item {
                    Value::Table(inner) => Some((item_key, inner)),
                    other => {
                        errors.wrong_type(&item_key, "a table", other);
                        None
                    }
                }
            })
            .collect(),
        Some(other) => {
            errors.wrong_type(key, &format!("[[{key}]] tables"), other);
            Vec::new()
        }
    }
}

fn required_string(table: &Table, prefix: &str, key: &str, errors: &mut Errors) -> Option<String> {
    match table.get(key) {
        Some(Value::String(text)) => Some(text.clone()),
        Some(other) => {
            errors.wrong_type(&format!("{prefix}.{key}"), "a string", other);
            None
        }
        None => {
            errors.problem(&format!("{prefix}.{key}"), Problem::Required);
            None
        }
    }
}

fn parse_address(text: &str) -> Result<SocketAddr, Problem> {
    text.parse()
        .map_err(|_| Problem::NotAnAddress(text.to_owned()))
}

fn required_address(
    table: &Table,
    prefix: &str,
    key: &str,
    errors: &mut Errors,
) -> Option<SocketAddr> {
    let text = required_string(table, prefix, key, errors)?;
    parse_address(&text)
        .map_err(|problem| errors.problem(&format!("{prefix}.{key}"), problem))
        .ok()
}

fn endpoint_list(table: &Table, prefix: &str, errors: &mut Errors) -> Option<Vec<SocketAddr>> {
    let key = format!("{prefix}.endpoints");
    match table.get("endpoints") {
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut endpoints = Vec::with_capacity(items.len());
            let mut ok = true;
            for (index, item) in items.iter().enumerate() {
                let parsed = match item {
                    Value::String(text) => parse_address(text),
                    other => Err(Problem::WrongType {
                        expected: "a string".into(),
                        found: other.type_str(),
                    }),
                };
                match parsed {
                    Ok(address) => endpoints.push(address),
                    Err(error) => {
                        errors.problem(&format!("{key}[{index}]"), error);
                        ok = false;
                    }
                }
            }
            ok.then_some(endpoints)
        }
        Some(Value::Array(_)) => {
            errors.push(&key, "needs at least one endpoint".into());
            None
        }
        Some(other) => {
            errors.wrong_type(&key, "an array of strings", other);
            None
        }
        None => {
            errors.problem(&key, Problem::Required);
            None
        }
    }
}

fn optional_integer(
    table: &Table,
    prefix: &str,
    key: &str,
    min: i64,
    max: i64,
    errors: &mut Errors,
) -> Option<usize> {
    match table.get(key)? {
        Value::Integer(value) if (min..=max).contains(value) => usize::try_from(*value).ok(),
        Value::Integer(value) => {
            errors.problem(
                &format!("{prefix}.{key}"),
                Problem::OutOfRange {
                    value: *value,
                    min,
                    max,
                },
            );
            None
        }
        other => {
            errors.wrong_type(&format!("{prefix}.{key}"), "an integer", other);
            None
        }
    }
}

fn optional_bool(table: &Table, prefix: &str, key: &str, errors: &mut Errors) -> Option<bool> {
    match table.get(key)? {
        Value::Boolean(value) => Some(*value),
        other => {
            errors.wrong_type(&format!("{prefix}.{key}"), "true or false", other);
            None
        }
    }
}

fn optional_duration(
    table: &Table,
    prefix: &str,
    key: &str,
    errors: &mut Errors,
) -> Option<Duration> {
    match table.get(key)? {
        Value::String(text) => parse_duration(text)
            .map_err(|error| errors.push(&format!("{prefix}.{key}"), error))
            .ok(),
        other => {
            errors.wrong_type(
                &format!("{prefix}.{key}"),
                "a duration string like \"10s\"",
                other,
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `gateway mesh` without `--config` builds its configuration from values, not from TOML
    /// text; it must be what the same file would give, defaults included.
    #[test]
    fn a_configuration_from_values_has_the_files_defaults() {
        let address: SocketAddr = "127.0.0.1:8443".parse().expect("addr");
        let admin: SocketAddr = "127.0.0.1:19000".parse().expect("addr");
        let built = Config::with_listeners(
            vec![Listener {
                name: "mesh".into(),
                address,
            }],
            Some(admin),
        );
        let parsed = Config::parse(&format!(
            "[[listener]]\nname = \"mesh\"\naddress = \"{address}\"\n[admin]\naddress = \"{admin}\"\n"
        ))
        .expect("parse");
        assert_eq!(built, parsed);
    }

    const DESIGN_EXAMPLE: &str = r#"
[[listener]]
name = "wan"
address = "127.0.0.1:8443"

[admin]
address = "127.0.0.1:19000"

[workers]
count = 2
pin = true

[timeouts]
client_hello = "10s"
connect = "5s"
idle = "1h"

[[route]]
sni = "socat.default.dc1.internal.11111111-2222-3333-4444-555555555555.consul"
endpoints = ["127.0.0.1:21000", "127.0.0.1:21001"]

[[route]]
sni = "*.dc2.internal.11111111-2222-3333-4444-555555555555.consul"
endpoints = ["127.0.0.1:9444"]
"#;

    #[test]
    fn busy_poll_is_off_by_default_and_takes_a_bool_or_a_bounded_duration() {
        let with = |value: &str| {
            Config::parse(
                &DESIGN_EXAMPLE.replace("pin = true", &format!("pin = true\nbusy_poll = {value}")),
            )
        };
        let default = Config::parse(DESIGN_EXAMPLE).expect("valid");
        assert_eq!(default.workers.busy_poll, None);
        assert_eq!(with("false").expect("valid").workers.busy_poll, None);
        assert_eq!(
            with("true").expect("valid").workers.busy_poll,
            Some(DEFAULT_BUSY_POLL)
        );
        assert_eq!(
            with("\"50us\"").expect("valid").workers.busy_poll,
            Some(Duration::from_micros(50))
        );
        assert_eq!(
            with("\"2ms\"").expect("valid").workers.busy_poll,
            Some(Duration::from_millis(2))
        );
        for bad in ["\"1s\"", "\"0us\"", "\"fast\"", "3"] {
            let errors = with(bad).expect_err(bad);
            assert!(
                errors
                    .iter()
                    .any(|error| error.to_string().contains("workers.busy_poll")),
                "{bad}: {errors:?}"
            );
        }
    }

    #[test]
    fn the_design_example_parses() {
        let config = Config::parse(DESIGN_EXAMPLE).expect("valid");
        assert_eq!(config.listeners[0].name, "wan");
        assert_eq!(config.workers.count, Some(2));
        assert!(config.workers.pin);
        assert_eq!(config.timeouts.idle, Duration::from_secs(3600));
        assert_eq!(config.timeouts.write_stall, DEFAULT_WRITE_STALL);
        assert_eq!(config.routes.len(), 2);
        assert_eq!(config.routes[0].endpoints.len(), 2);
        assert_eq!(
            config.admin,
            Some("127.0.0.1:19000".parse().expect("address"))
        );
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let text = r#"
colour = "blue"
[[listener]]
name = "wan"
address = "localhost"
[workers]
count = 0
pinned = true
[timeouts]
connect = "5 seconds"
[[route]]
sni = "bad name"
endpoints = []
[[route]]
endpoints = ["127.0.0.1:1"]
"#;
        let errors = Config::parse(text).expect_err("invalid");
        let joined = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        for key in [
            "colour:",
            "listener[0].address:",
            "workers.count:",
            "workers.pinned:",
            "timeouts.connect:",
            "route[0].sni:",
            "route[0].endpoints:",
            "route[1].sni: is required",
        ] {
            assert!(joined.contains(key), "missing {key} in:\n{joined}");
        }
        assert_eq!(errors.len(), 8, "{joined}");
        // The same errors as values: each names its key and says what is wrong with it.
        let problem = |key: &str| {
            errors.iter().find_map(|error| match error {
                ConfigError::Key { key: k, problem } if k == key => Some(problem.clone()),
                _ => None,
            })
        };
        assert_eq!(
            problem("workers.count"),
            Some(Problem::OutOfRange {
                value: 0,
                min: 1,
                max: 1024
            })
        );
        assert_eq!(problem("route[1].sni"), Some(Problem::Required));
        assert_eq!(
            problem("listener[0].address"),
            Some(Problem::NotAnAddress("localhost".into()))
        );
        assert!(matches!(
            problem("colour"),
            Some(Problem::UnknownKey { .. })
        ));
        assert!(errors.iter().all(|error| error.key().is_some()));
        assert!(matches!(
            Config::parse("[[listener]\n").expect_err("syntax")[..],
            [ConfigError::Syntax(_)]
        ));
        let missing = Config::load(Path::new("/nonexistent/gateway.toml")).expect_err("no file");
        assert!(
            missing[0]
                .to_string()
                .starts_with("/nonexistent/gateway.toml: "),
            "{missing:?}"
        );
    }

    #[test]
    fn operations_sections_parse() {
        let text = r#"
[[listener]]
address = "127.0.0.1:1"
[admin]
address = "127.0.0.1:2"
handover_socket = "/run/gateway/handover.sock"
token_file = "/etc/gateway/admin.token"
[drain]
announce = "0s"
timeout = "2s"
[access_log]
path = "stdout"
redact_addresses = true
"#;
        let config = Config::parse(text).expect("valid");
        assert_eq!(
            config.handover_socket,
            Some(PathBuf::from("/run/gateway/handover.sock"))
        );
        assert_eq!(
            config.admin_token_file,
            Some(PathBuf::from("/etc/gateway/admin.token"))
        );
        assert_eq!(config.drain.announce, Duration::ZERO);
        assert_eq!(config.drain.timeout, Duration::from_secs(2));
        assert_eq!(config.access_log.target, AccessLogTarget::Stdout);
        assert!(config.access_log.redact_addresses);
        let defaults = Config::parse("[[listener]]\naddress = \"127.0.0.1:1\"\n").expect("valid");
        assert_eq!(defaults.drain, Drain::default());
        let bad = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:1\"\n[drain]\ntimeout = \"0s\"\nlinger = 1\n",
        )
        .expect_err("invalid");
        assert_eq!(bad.len(), 2, "{bad:?}");
        let bad = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:1\"\n[admin]\naddress = \"127.0.0.1:2\"\ntoken_file = 7\n",
        )
        .expect_err("invalid");
        assert_eq!(bad[0].key(), Some("admin.token_file"), "{bad:?}");
        assert!(
            bad[0]
                .to_string()
                .starts_with("admin.token_file: expected a string"),
            "{bad:?}"
        );
    }

    #[test]
    fn duplicate_routes_fail_validation() {
        let text = r#"
[[listener]]
address = "127.0.0.1:1"
[[route]]
sni = "a.test"
endpoints = ["127.0.0.1:2"]
[[route]]
sni = "A.TEST."
endpoints = ["127.0.0.1:3"]
"#;
        let errors = Config::parse(text).expect_err("duplicate");
        assert!(errors[0].to_string().contains("listed twice"), "{errors:?}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "10", "s", "1.5s", "0s", "-1s", "10 s", "3d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
