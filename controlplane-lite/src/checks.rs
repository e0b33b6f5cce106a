//! Health checks, the sans-IO core: definitions as clients send them, the stored check with
//! its status, when each check is due, and what a probe result or the passing of time changes.
//! Every function takes `now` (Unix milliseconds); the IO shell (`checks_runner`) dials,
//! keeps time and writes the changes to the store.
//!
//! Supported kinds, as Consul's agent runs them: TTL (a client reports the status), TCP (a
//! connect succeeds), HTTP (`http://` only: 2xx passing, 429 warning, anything else critical)
//! and alias (the worst status of another local service's checks; every sidecar gets one for
//! the service it fronts, as Consul's `sidecar_service` does). Like Consul, a new check starts
//! `critical` unless its definition sets `Status`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::blocking::parse_duration;
use crate::catalog::from_value;
use crate::error::{Error, Result};

/// Consul's status strings.
pub const PASSING: &str = "passing";
/// See [`PASSING`].
pub const WARNING: &str = "warning";
/// See [`PASSING`].
pub const CRITICAL: &str = "critical";

/// Shortest interval accepted (Consul's minimum check interval is 1s; tests need less).
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Timeout when the definition gives none (Consul's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on `Output` and `Notes`, so a chatty probe cannot grow the store.
pub const MAX_OUTPUT: usize = 4096;

/// A check definition as Consul's `api.AgentServiceCheck` / `api.AgentCheckRegistration`
/// carry it (normalised to PascalCase). Kinds this agent does not run are refused.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct CheckDefinition {
    #[serde(default, rename = "ID")]
    id: Option<String>,
    #[serde(default, rename = "CheckID")]
    check_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    notes: Option<String>,
    #[serde(default, rename = "ServiceID")]
    service_id: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default, rename = "TTL")]
    ttl: Option<String>,
    #[serde(default, rename = "TCP")]
    tcp: Option<String>,
    #[serde(default, rename = "HTTP")]
    http: Option<String>,
    #[serde(default)]
    method: Option<String>,
    /// Meaningless for the `http://` checks this agent runs; accepted and ignored.
    #[serde(default, rename = "TLSSkipVerify")]
    _tls_skip_verify: Option<IgnoredAny>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    deregister_critical_service_after: Option<String>,
    #[serde(default)]
    alias_service: Option<String>,
    #[serde(default)]
    alias_node: Option<String>,
    #[serde(default)]
    header: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    success_before_passing: Option<u32>,
    #[serde(default)]
    failures_before_warning: Option<u32>,
    #[serde(default)]
    failures_before_critical: Option<u32>,
    #[serde(default)]
    args: Option<Value>,
    #[serde(default)]
    script_args: Option<Value>,
    #[serde(default, rename = "DockerContainerID")]
    docker_container_id: Option<Value>,
    #[serde(default, rename = "GRPC")]
    grpc: Option<Value>,
    #[serde(default, rename = "H2PING")]
    h2ping: Option<Value>,
    #[serde(default, rename = "UDP")]
    udp: Option<Value>,
    #[serde(default, rename = "OSService")]
    os_service: Option<Value>,
    #[serde(default, rename = "Namespace")]
    _namespace: Option<IgnoredAny>,
    #[serde(default, rename = "Partition")]
    _partition: Option<IgnoredAny>,
    #[serde(default, rename = "Shell")]
    _shell: Option<IgnoredAny>,
    #[serde(default, rename = "TLSServerName")]
    _tls_server_name: Option<IgnoredAny>,
    #[serde(default, rename = "GRPCUseTLS")]
    _grpc_use_tls: Option<IgnoredAny>,
}

/// What a stored check does; the strings are kept as given, for display.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct CheckSpec {
    /// Time-to-live (TTL checks).
    #[serde(default, rename = "TTL", skip_serializing_if = "String::is_empty")]
    pub ttl: String,
    /// `host:port` (TCP checks).
    #[serde(default, rename = "TCP", skip_serializing_if = "String::is_empty")]
    pub tcp: String,
    /// `http://` URL (HTTP checks).
    #[serde(default, rename = "HTTP", skip_serializing_if = "String::is_empty")]
    pub http: String,
    /// HTTP method (default GET).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// The local service whose checks this one mirrors (alias checks).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub alias_service: String,
    /// How often TCP/HTTP probes run.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interval: String,
    /// Bound on one probe.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub timeout: String,
    /// Deregister the service after this long critical.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub deregister_critical_service_after: String,
}

/// A check in Consul's `api.HealthCheck` shape plus what the runner needs (stored in the
/// `checks` table, keyed by check ID).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    /// The node name.
    pub node: String,
    /// Check ID.
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// Display name.
    pub name: String,
    /// `passing`, `warning` or `critical`.
    pub status: String,
    /// Free text from the definition.
    pub notes: String,
    /// The last probe's or client's output.
    pub output: String,
    /// The service checked ("" for a node check).
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    /// Its name.
    pub service_name: String,
    /// Its tags.
    pub service_tags: Vec<String>,
    /// `ttl`, `tcp`, `http` or `alias`.
    #[serde(rename = "Type")]
    pub check_type: String,
    /// The definition.
    pub definition: CheckSpec,
    /// Unix ms when the check became critical (for `DeregisterCriticalServiceAfter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical_since_ms: Option<u64>,
    /// Unix ms after which a TTL check without news turns critical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_deadline_ms: Option<u64>,
    /// Raft index of creation.
    pub create_index: u64,
    /// Raft index of the last change.
    pub modify_index: u64,
}

fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn duration(text: &str, field: &str) -> Result<Duration> {
    parse_duration(text).map_err(|e| Error::bad_request(format!("check: field `{field}`: {e}")))
}

fn set(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

/// The service a check is attached to.
#[derive(Clone, Debug)]
pub struct CheckTarget<'a> {
    /// Service ID.
    pub id: &'a str,
    /// Service name.
    pub name: &'a str,
    /// Service tags.
    pub tags: &'a [String],
}

impl CheckDefinition {
    /// Parses one definition from a (normalised) JSON value.
    pub fn parse(value: Value) -> Result<CheckDefinition> {
        from_value(value, "check")
    }

    /// The `Name` the definition gives, if any.
    pub fn name(&self) -> Option<&str> {
        set(&self.name)
    }

    /// The `ServiceID` the definition names, if any.
    pub fn service_id(&self) -> Option<&str> {
        set(&self.service_id)
    }

    /// Validates the definition and builds the stored check. `default_id` is used when the
    /// definition has no ID (Consul: `service:<id>[:<n>]` for service checks).
    pub fn build(
        self,
        node: &str,
        default_id: &str,
        target: Option<CheckTarget<'_>>,
        now_ms: u64,
    ) -> Result<HealthCheck> {
        let refused = [
            ("Args", self.args.is_some() || self.script_args.is_some()),
            ("DockerContainerID", self.docker_container_id.is_some()),
            ("GRPC", self.grpc.is_some()),
            ("H2PING", self.h2ping.is_some()),
            ("UDP", self.udp.is_some()),
            ("OSService", self.os_service.is_some()),
            (
                "Header",
                self.header.as_ref().is_some_and(|h| !h.is_empty()),
            ),
            ("Body", set(&self.body).is_some()),
            (
                "SuccessBeforePassing",
                self.success_before_passing.unwrap_or(0) > 0,
            ),
            (
                "FailuresBeforeWarning",
                self.failures_before_warning.unwrap_or(0) > 0,
            ),
            (
                "FailuresBeforeCritical",
                self.failures_before_critical.unwrap_or(0) > 0,
            ),
        ];
        if let Some((field, _)) = refused.iter().find(|(_, present)| *present) {
            return Err(Error::bad_request(format!(
                "check: field `{field}` is not supported (TTL, TCP, HTTP and alias checks only)"
            )));
        }
        if set(&self.alias_node).is_some_and(|n| n != node) {
            return Err(Error::bad_request(
                "check: field `AliasNode`: only this agent's node exists",
            ));
        }
        let kinds = [
            ("ttl", set(&self.ttl)),
            ("tcp", set(&self.tcp)),
            ("http", set(&self.http)),
            ("alias", set(&self.alias_service)),
        ];
        let mut given = kinds.iter().filter(|(_, v)| v.is_some());
        let (check_type, _) = given.next().ok_or_else(|| {
            Error::bad_request("check: one of `TTL`, `TCP`, `HTTP` or `AliasService` is required")
        })?;
        if given.next().is_some() {
            return Err(Error::bad_request(
                "check: only one of `TTL`, `TCP`, `HTTP` and `AliasService` may be set",
            ));
        }
        let spec = CheckSpec {
            ttl: self.ttl.clone().unwrap_or_default(),
            tcp: self.tcp.clone().unwrap_or_default(),
            http: self.http.clone().unwrap_or_default(),
            method: self.method.clone().unwrap_or_default(),
            alias_service: self.alias_service.clone().unwrap_or_default(),
            interval: self.interval.clone().unwrap_or_default(),
            timeout: self.timeout.clone().unwrap_or_default(),
            deregister_critical_service_after: self
                .deregister_critical_service_after
                .clone()
                .unwrap_or_default(),
        };
        let mut ttl_deadline_ms = None;
        match *check_type {
            "ttl" => ttl_deadline_ms = Some(now_ms.saturating_add(ms(duration(&spec.ttl, "TTL")?))),
            "tcp" | "http" => {
                let interval = duration(&spec.interval, "Interval")?;
                if interval < MIN_INTERVAL {
                    return Err(Error::bad_request(format!(
                        "check: field `Interval` must be at least {MIN_INTERVAL:?}"
                    )));
                }
                if !spec.timeout.is_empty() {
                    duration(&spec.timeout, "Timeout")?;
                }
                if *check_type == "tcp" && !spec.tcp.contains(':') {
                    return Err(Error::bad_request("check: field `TCP` must be host:port"));
                }
                if *check_type == "http" && !spec.http.starts_with("http://") {
                    return Err(Error::bad_request(
                        "check: field `HTTP` must be an http:// URL (https checks are not supported)",
                    ));
                }
                if !matches!(spec.method.as_str(), "" | "GET" | "HEAD" | "POST" | "PUT") {
                    return Err(Error::bad_request(
                        "check: field `Method` must be GET, HEAD, POST or PUT",
                    ));
                }
            }
            _ => {}
        }
        if !spec.deregister_critical_service_after.is_empty() {
            duration(
                &spec.deregister_critical_service_after,
                "DeregisterCriticalServiceAfter",
            )?;
        }
        let status = match set(&self.status) {
            None => CRITICAL,
            Some(s @ (PASSING | WARNING | CRITICAL)) => s,
            Some(other) => {
                return Err(Error::bad_request(format!(
                    "check: invalid field `Status` {other:?}"
                )))
            }
        };
        let check_id = set(&self.check_id)
            .or(set(&self.id))
            .unwrap_or(default_id)
            .to_owned();
        crate::catalog::validate_id(&check_id, "CheckID")?;
        let name = set(&self.name).map_or_else(
            || match &target {
                Some(t) => format!("Service '{}' check", t.name),
                None => check_id.clone(),
            },
            str::to_owned,
        );
        let mut notes = self.notes.unwrap_or_default();
        notes.truncate(floor_char_boundary(&notes, MAX_OUTPUT));
        Ok(HealthCheck {
            node: node.to_owned(),
            check_id,
            name,
            status: status.to_owned(),
            notes,
            output: String::new(),
            service_id: target.as_ref().map_or("", |t| t.id).to_owned(),
            service_name: target.as_ref().map_or("", |t| t.name).to_owned(),
            service_tags: target.map_or_else(Vec::new, |t| t.tags.to_vec()),
            check_type: (*check_type).to_owned(),
            definition: spec,
            critical_since_ms: (status == CRITICAL).then_some(now_ms),
            ttl_deadline_ms,
            create_index: 0,
            modify_index: 0,
        })
    }
}

/// The largest index `<= limit` on a char boundary of `text`.
pub fn floor_char_boundary(text: &str, limit: usize) -> usize {
    let mut end = limit.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// The alias check Consul gives every sidecar: it mirrors the service the sidecar fronts.
pub fn sidecar_alias(node: &str, sidecar: CheckTarget<'_>, parent_id: &str) -> HealthCheck {
    HealthCheck {
        node: node.to_owned(),
        check_id: format!("service:{}:alias", sidecar.id),
        name: format!("Connect Sidecar Aliasing {parent_id}"),
        status: PASSING.to_owned(),
        notes: String::new(),
        output: String::new(),
        service_id: sidecar.id.to_owned(),
        service_name: sidecar.name.to_owned(),
        service_tags: sidecar.tags.to_vec(),
        check_type: "alias".to_owned(),
        definition: CheckSpec {
            alias_service: parent_id.to_owned(),
            ..CheckSpec::default()
        },
        critical_since_ms: None,
        ttl_deadline_ms: None,
        create_index: 0,
        modify_index: 0,
    }
}

fn rank(status: &str) -> u8 {
    match status {
        PASSING => 0,
        WARNING => 1,
        _ => 2,
    }
}

/// The worst of `statuses` (`passing` when there are none, as Consul).
pub fn worst<'a>(statuses: impl IntoIterator<Item = &'a str>) -> &'a str {
    statuses
        .into_iter()
        .max_by_key(|s| rank(s))
        .unwrap_or(PASSING)
}

/// A check's status as reported: an alias check shows the worst status of the aliased
/// service's own (non-alias) checks; every other check its stored status.
pub fn effective_status<'a>(check: &'a HealthCheck, all: &'a [HealthCheck]) -> &'a str {
    if check.check_type != "alias" {
        return &check.status;
    }
    worst(
        all.iter()
            .filter(|c| c.service_id == check.definition.alias_service && c.check_type != "alias")
            .map(|c| c.status.as_str()),
    )
}

/// The aggregate status of service instance `service_id` over its checks.
pub fn service_status<'a>(service_id: &str, all: &'a [HealthCheck]) -> &'a str {
    worst(
        all.iter()
            .filter(|c| c.service_id == service_id)
            .map(|c| effective_status(c, all)),
    )
}

/// The instances traffic may go to: all but those whose checks are critical (a warning still
/// routes, as Consul's proxies do unless told to use passing only). `keep` stays regardless:
/// the sidecar asking for its own configuration. Mesh gateways stay too: which gateways other
/// datacenters dial is decided by federation states, not by these snapshots.
pub fn routable(
    services: Vec<crate::catalog::ServiceInstance>,
    checks: &[HealthCheck],
    keep: &str,
) -> Vec<crate::catalog::ServiceInstance> {
    services
        .into_iter()
        .filter(|s| {
            s.id == keep
                || s.kind == crate::catalog::KIND_MESH_GATEWAY
                || service_status(&s.id, checks) != CRITICAL
        })
        .collect()
}

/// The checks of `service_id` as shown to clients (alias statuses resolved).
pub fn shown_checks(service_id: &str, all: &[HealthCheck]) -> Vec<HealthCheck> {
    all.iter()
        .filter(|c| c.service_id == service_id)
        .map(|c| HealthCheck {
            status: effective_status(c, all).to_owned(),
            ..c.clone()
        })
        .collect()
}

/// The check after a result, or `None` when nothing visible changed (so nothing is
/// written). A TTL check's deadline moves on every update, so that always counts.
pub fn transition(
    check: &HealthCheck,
    status: &str,
    output: &str,
    now_ms: u64,
) -> Option<HealthCheck> {
    let mut output = output.to_owned();
    output.truncate(floor_char_boundary(&output, MAX_OUTPUT));
    let ttl_deadline_ms = if check.check_type == "ttl" {
        parse_duration(&check.definition.ttl)
            .ok()
            .map(|ttl| now_ms.saturating_add(ms(ttl)))
    } else {
        check.ttl_deadline_ms
    };
    if check.status == status && check.output == output && check.check_type != "ttl" {
        return None;
    }
    let critical_since_ms = match (status == CRITICAL, check.critical_since_ms) {
        (false, _) => None,
        (true, Some(since)) => Some(since),
        (true, None) => Some(now_ms),
    };
    Some(HealthCheck {
        status: status.to_owned(),
        output,
        ttl_deadline_ms,
        critical_since_ms,
        ..check.clone()
    })
}

/// One probe the shell must run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Connect to `address`.
    Tcp {
        /// Check ID.
        check_id: String,
        /// `host:port`.
        address: String,
        /// Bound on the connect.
        timeout: Duration,
    },
    /// Send `method` to `url`.
    Http {
        /// Check ID.
        check_id: String,
        /// `http://` URL.
        url: String,
        /// HTTP method.
        method: String,
        /// Bound on the request.
        timeout: Duration,
    },
}

/// The status an HTTP answer means (Consul: 2xx passing, 429 warning, else critical).
pub fn http_status(code: u16) -> &'static str {
    match code {
        200..=299 => PASSING,
        429 => WARNING,
        _ => CRITICAL,
    }
}

/// When each TCP/HTTP check is next due, and which probes are running.
#[derive(Debug, Default)]
pub struct Scheduler {
    next_due: BTreeMap<String, u64>,
    in_flight: BTreeSet<String>,
}

fn interval_of(check: &HealthCheck) -> Option<Duration> {
    matches!(check.check_type.as_str(), "tcp" | "http")
        .then(|| parse_duration(&check.definition.interval).ok())
        .flatten()
}

impl Scheduler {
    /// The probes due at `now` (a new check is due at once). Forgets removed checks.
    pub fn due(&mut self, checks: &[HealthCheck], now_ms: u64) -> Vec<Probe> {
        let live: BTreeSet<&str> = checks.iter().map(|c| c.check_id.as_str()).collect();
        self.next_due.retain(|id, _| live.contains(id.as_str()));
        let mut probes = Vec::new();
        for check in checks {
            if interval_of(check).is_none() || self.in_flight.contains(&check.check_id) {
                continue;
            }
            let due = *self
                .next_due
                .entry(check.check_id.clone())
                .or_insert(now_ms);
            if due > now_ms {
                continue;
            }
            let timeout = parse_duration(&check.definition.timeout).unwrap_or(DEFAULT_TIMEOUT);
            self.in_flight.insert(check.check_id.clone());
            probes.push(if check.check_type == "tcp" {
                Probe::Tcp {
                    check_id: check.check_id.clone(),
                    address: check.definition.tcp.clone(),
                    timeout,
                }
            } else {
                Probe::Http {
                    check_id: check.check_id.clone(),
                    url: check.definition.http.clone(),
                    method: if check.definition.method.is_empty() {
                        "GET".to_owned()
                    } else {
                        check.definition.method.clone()
                    },
                    timeout,
                }
            });
        }
        probes
    }

    /// A probe of `check` finished at `now`: it is next due one interval later.
    pub fn finished(&mut self, check: &HealthCheck, now_ms: u64) {
        self.in_flight.remove(&check.check_id);
        if let Some(interval) = interval_of(check) {
            self.next_due
                .insert(check.check_id.clone(), now_ms.saturating_add(ms(interval)));
        }
    }

    /// A probe whose check has gone: forget it.
    pub fn abandoned(&mut self, check_id: &str) {
        self.in_flight.remove(check_id);
    }

    /// The earliest time anything is due: a probe, a TTL deadline or a deregistration.
    pub fn next_wake(&self, checks: &[HealthCheck]) -> Option<u64> {
        let probes = self
            .next_due
            .iter()
            .filter(|(id, _)| !self.in_flight.contains(*id))
            .map(|(_, at)| *at);
        let ttls = checks
            .iter()
            .filter(|c| c.check_type == "ttl" && c.status != CRITICAL)
            .filter_map(|c| c.ttl_deadline_ms);
        let deregistrations = checks.iter().filter_map(deregister_at);
        probes.chain(ttls).chain(deregistrations).min()
    }
}

/// TTL checks whose deadline passed without news, turned critical.
pub fn expired_ttls(checks: &[HealthCheck], now_ms: u64) -> Vec<HealthCheck> {
    checks
        .iter()
        .filter(|c| c.check_type == "ttl" && c.status != CRITICAL)
        .filter(|c| c.ttl_deadline_ms.is_some_and(|at| at <= now_ms))
        .filter_map(|c| {
            let mut next = transition(c, CRITICAL, "TTL expired", now_ms)?;
            // Expiry is not news from the client: the deadline stays where it was.
            next.ttl_deadline_ms = c.ttl_deadline_ms;
            Some(next)
        })
        .collect()
}

fn deregister_at(check: &HealthCheck) -> Option<u64> {
    let after = parse_duration(&check.definition.deregister_critical_service_after).ok()?;
    if check.status != CRITICAL || check.service_id.is_empty() {
        return None;
    }
    Some(check.critical_since_ms?.saturating_add(ms(after)))
}

/// Services to deregister: a check with `DeregisterCriticalServiceAfter` has been critical
/// that long.
pub fn to_deregister(checks: &[HealthCheck], now_ms: u64) -> BTreeSet<String> {
    checks
        .iter()
        .filter(|c| deregister_at(c).is_some_and(|at| at <= now_ms))
        .map(|c| c.service_id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn build(definition: Value, now: u64) -> Result<HealthCheck> {
        let tags = vec!["v1".to_owned()];
        CheckDefinition::parse(crate::casing::normalize(definition))?.build(
            "node",
            "service:web",
            Some(CheckTarget {
                id: "web",
                name: "web",
                tags: &tags,
            }),
            now,
        )
    }

    #[test]
    fn ttl_starts_critical_passes_and_expires() {
        let check = build(json!({"ttl": "10s"}), 1_000).expect("valid");
        assert_eq!(check.status, CRITICAL);
        assert_eq!(check.check_id, "service:web");
        let passed = transition(&check, PASSING, "ok", 2_000).expect("changed");
        assert_eq!(passed.ttl_deadline_ms, Some(12_000));
        assert!(expired_ttls(std::slice::from_ref(&passed), 11_999).is_empty());
        let expired = expired_ttls(std::slice::from_ref(&passed), 12_000);
        assert_eq!(expired[0].status, CRITICAL);
        assert_eq!(expired[0].output, "TTL expired");
        assert_eq!(expired[0].critical_since_ms, Some(12_000));
    }

    #[test]
    fn probes_are_due_once_per_interval() {
        let check = build(json!({"TCP": "127.0.0.1:1", "Interval": "1s"}), 0).expect("valid");
        let checks = vec![check.clone()];
        let mut scheduler = Scheduler::default();
        assert_eq!(scheduler.due(&checks, 5).len(), 1);
        // In flight: not due again until it finishes.
        assert!(scheduler.due(&checks, 5_000).is_empty());
        scheduler.finished(&check, 5_000);
        assert_eq!(scheduler.next_wake(&checks), Some(6_000));
        assert!(scheduler.due(&checks, 5_999).is_empty());
        assert_eq!(scheduler.due(&checks, 6_000).len(), 1);
    }

    #[test]
    fn unchanged_results_write_nothing() {
        let check =
            build(json!({"HTTP": "http://127.0.0.1:1/", "Interval": "1s"}), 0).expect("valid");
        let failed = transition(&check, CRITICAL, "refused", 10).expect("output changed");
        assert_eq!(
            failed.critical_since_ms,
            Some(0),
            "critical since registration"
        );
        assert!(transition(&failed, CRITICAL, "refused", 20).is_none());
        let ok = transition(&failed, PASSING, "200", 30).expect("changed");
        assert_eq!(ok.critical_since_ms, None);
    }

    #[test]
    fn alias_follows_the_parent_and_deregistration_waits() {
        let tags = Vec::new();
        let parent = build(
            json!({"TTL": "1m", "DeregisterCriticalServiceAfter": "30s"}),
            0,
        )
        .expect("valid");
        let alias = sidecar_alias(
            "node",
            CheckTarget {
                id: "web-sidecar-proxy",
                name: "web-sidecar-proxy",
                tags: &tags,
            },
            "web",
        );
        let all = vec![parent.clone(), alias.clone()];
        assert_eq!(service_status("web-sidecar-proxy", &all), CRITICAL);
        let passing = transition(&parent, PASSING, "", 1).expect("changed");
        assert_eq!(
            service_status("web-sidecar-proxy", &[passing, alias]),
            PASSING
        );
        assert!(to_deregister(&all, 29_999).is_empty());
        assert_eq!(
            to_deregister(&all, 30_000).into_iter().collect::<Vec<_>>(),
            ["web"]
        );
    }

    #[test]
    fn unsupported_and_malformed_definitions_are_refused() {
        for (definition, text) in [
            (json!({"Args": ["/bin/true"], "Interval": "1s"}), "Args"),
            (json!({"TCP": "127.0.0.1:1"}), "Interval"),
            (json!({"TTL": "soon"}), "TTL"),
            (json!({"HTTP": "https://x/", "Interval": "1s"}), "https"),
            (
                json!({"TTL": "1s", "TCP": "a:1", "Interval": "1s"}),
                "only one",
            ),
            (json!({"TTL": "1s", "Bogus": 1}), "Bogus"),
            (json!({"TTL": 5}), "TTL"),
        ] {
            let error = build(definition, 0).expect_err(text).to_string();
            assert!(error.contains(text), "{error}");
        }
    }
}
