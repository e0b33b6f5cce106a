//! The in-memory state every read is served from: per table an ordered map from key to the
//! decoded value and the index of the commit that wrote it, the table indexes, and secondary
//! indexes ([`Index`]) so that a lookup by service name or by the service a check belongs to
//! costs a map lookup, not a scan of the catalog. It changes only through [`Memory::apply`],
//! for local and remote commits alike, which keeps the secondary indexes in step.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::backend::{ChangeSet, Loaded};
use super::{Stored, Table};

/// A secondary index: rows of one table by a value derived from the row. The derivations
/// follow the stored JSON shapes of `catalog::ServiceInstance` and `checks::HealthCheck`
/// (a unit test there keeps them in step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Index {
    /// `services` by `Service` (the service name).
    ServiceName,
    /// `services` that are Connect endpoints of a service name: connect proxies by
    /// `Proxy.DestinationServiceName`, Connect-native services by `Service`.
    ConnectEndpoint,
    /// `services` connect proxies by `Proxy.DestinationServiceID` (the sidecars of an instance).
    SidecarOf,
    /// `services` connect proxies by `Port` (decimal): which sidecar ports are taken.
    ProxyPort,
    /// `services` by `Kind` ("" for typical services).
    ServiceKind,
    /// `checks` by `ServiceID` ("" for node checks).
    CheckService,
    /// `checks` that have timers (TTL, TCP, HTTP, or `DeregisterCriticalServiceAfter`), all
    /// under the key `""`: what the check runner scans, instead of every alias check.
    TimedCheck,
}

impl Index {
    /// Every index, in a fixed order (the position is the index into per-index arrays).
    pub const ALL: [Index; 7] = [
        Index::ServiceName,
        Index::ConnectEndpoint,
        Index::SidecarOf,
        Index::ProxyPort,
        Index::ServiceKind,
        Index::CheckService,
        Index::TimedCheck,
    ];

    /// The table the index is over.
    pub fn table(self) -> Table {
        match self {
            Index::ServiceName
            | Index::ConnectEndpoint
            | Index::SidecarOf
            | Index::ProxyPort
            | Index::ServiceKind => Table::Services,
            Index::CheckService | Index::TimedCheck => Table::Checks,
        }
    }

    fn position(self) -> usize {
        self as usize
    }

    /// The index key of one row, if the row is in the index.
    pub fn key_of(self, value: &Value) -> Option<String> {
        let text = |v: &Value, field: &str| v.get(field).and_then(Value::as_str).map(str::to_owned);
        let kind = || value.get("Kind").and_then(Value::as_str).unwrap_or("");
        let proxy = || value.get("Proxy").filter(|_| kind() == "connect-proxy");
        match self {
            Index::ServiceName => text(value, "Service"),
            Index::ConnectEndpoint => match kind() {
                "connect-proxy" => proxy().and_then(|p| text(p, "DestinationServiceName")),
                "" => value
                    .get("Connect")
                    .and_then(|c| c.get("Native"))
                    .and_then(Value::as_bool)
                    .filter(|native| *native)
                    .and_then(|_| text(value, "Service")),
                _ => None,
            },
            Index::SidecarOf => proxy().and_then(|p| text(p, "DestinationServiceID")),
            Index::ProxyPort => proxy()
                .and(value.get("Port"))
                .and_then(Value::as_u64)
                .map(|p| p.to_string()),
            Index::ServiceKind => Some(kind().to_owned()),
            Index::CheckService => text(value, "ServiceID"),
            Index::TimedCheck => {
                let timed_type = matches!(
                    value.get("Type").and_then(Value::as_str),
                    Some("ttl" | "tcp" | "http")
                );
                let deregisters = value
                    .get("Definition")
                    .and_then(|d| d.get("DeregisterCriticalServiceAfter"))
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty());
                (timed_type || deregisters).then(String::new)
            }
        }
    }
}

/// The indexes of one table's row: which index keys it is filed under.
fn keys_of(table: Table, value: &Stored) -> impl Iterator<Item = (Index, String)> + '_ {
    Index::ALL
        .into_iter()
        .filter(move |i| i.table() == table)
        .filter_map(move |i| match value {
            Stored::Value(v) => i.key_of(v).map(|k| (i, k)),
            Stored::Corrupt => None,
        })
}

/// One row in memory.
#[derive(Clone, Debug)]
pub struct Record {
    /// The value, decoded once when it was loaded or written.
    pub value: Stored,
    /// The index of the commit that wrote the row. After a redb restart this is the table's
    /// index (an upper bound): redb does not keep it per row.
    pub index: u64,
}

/// The whole state.
#[derive(Debug)]
pub struct Memory {
    /// Per [`Table::position`].
    tables: Vec<BTreeMap<String, Record>>,
    /// Per [`Table::position`]: the index of the last commit that wrote the table.
    table_indexes: Vec<u64>,
    /// The index of the last commit applied.
    applied: u64,
    /// Per [`Index::position`]: index key -> primary keys.
    secondary: Vec<BTreeMap<String, BTreeSet<String>>>,
}

impl Memory {
    /// Memory holding what a backend loaded.
    pub fn new(loaded: Loaded) -> Memory {
        let mut memory = Memory {
            tables: vec![BTreeMap::new(); Table::ALL.len()],
            table_indexes: vec![0; Table::ALL.len()],
            applied: loaded.index,
            secondary: vec![BTreeMap::new(); Index::ALL.len()],
        };
        for table in loaded.tables {
            let slot = table.table.position();
            memory.table_indexes[slot] = table.index;
            memory.tables[slot] = table
                .rows
                .into_iter()
                .map(|(key, value)| {
                    (
                        key,
                        Record {
                            value,
                            index: table.index,
                        },
                    )
                })
                .collect();
            let rows: Vec<(String, Stored)> = memory.tables[slot]
                .iter()
                .map(|(k, r)| (k.clone(), r.value.clone()))
                .collect();
            for (key, value) in &rows {
                memory.file(table.table, key, value);
            }
        }
        memory
    }

    /// Files one row under its secondary index keys.
    fn file(&mut self, table: Table, key: &str, value: &Stored) {
        for (index, index_key) in keys_of(table, value) {
            self.secondary[index.position()]
                .entry(index_key)
                .or_default()
                .insert(key.to_owned());
        }
    }

    /// Takes one row out of its secondary index keys.
    fn unfile(&mut self, table: Table, key: &str, value: &Stored) {
        for (index, index_key) in keys_of(table, value) {
            let map = &mut self.secondary[index.position()];
            if let Some(keys) = map.get_mut(&index_key) {
                keys.remove(key);
                if keys.is_empty() {
                    map.remove(&index_key);
                }
            }
        }
    }

    /// The primary keys filed under `key` in `index`, in key order.
    pub fn keys_by(&self, index: Index, key: &str) -> Option<&BTreeSet<String>> {
        self.secondary[index.position()].get(key)
    }

    /// The index of the last commit applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The index of the last commit that wrote `table`.
    pub fn table_index(&self, table: Table) -> u64 {
        self.table_indexes[table.position()]
    }

    /// One row.
    pub fn get(&self, table: Table, key: &str) -> Option<&Record> {
        self.tables[table.position()].get(key)
    }

    /// Every row of a table, in key order.
    pub fn rows(&self, table: Table) -> &BTreeMap<String, Record> {
        &self.tables[table.position()]
    }

    /// Applies one commit. A commit at or below the applied index was applied already (an
    /// etcd agent sees its own commits again through its watch) and changes nothing; the
    /// answer says whether memory changed.
    pub fn apply(&mut self, changes: &ChangeSet) -> bool {
        let index = changes.index;
        if index <= self.applied {
            return false;
        }
        for change in &changes.tables {
            let table = change.table;
            let slot = table.position();
            if change.cleared {
                self.tables[slot].clear();
                for index in Index::ALL.into_iter().filter(|i| i.table() == table) {
                    self.secondary[index.position()].clear();
                }
            }
            for (key, value) in &change.rows {
                let old = match value {
                    Some(value) => self.tables[slot].insert(
                        key.clone(),
                        Record {
                            value: value.clone(),
                            index,
                        },
                    ),
                    None => self.tables[slot].remove(key),
                };
                if let Some(old) = old {
                    self.unfile(table, key, &old.value);
                }
                if let Some(value) = value {
                    self.file(table, key, value);
                }
            }
            self.table_indexes[slot] = index;
        }
        self.applied = index;
        true
    }
}
