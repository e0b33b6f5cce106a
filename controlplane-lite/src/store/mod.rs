//! The state store: the whole state in memory, indexed, behind one seam to a durable backend.
//!
//! Every logical table holds JSON values under string keys. Reads (`get`, `list`, `entries`,
//! `dump`, `index`, `subscribe`) are served from memory ([`memory`]) and never touch the
//! backend. A write runs its closure against a [`Transaction`] that reads memory plus its own
//! pending changes and records them as a [`ChangeSet`]; the [`Backend`] commits it durably
//! (redb by default, see [`redb`]); only then does memory change and do blocking queries wake
//! ([`Store::apply`], the one path for local commits and, with a shared backend, for commits
//! made by other agents). A write is acknowledged only after the backend commit.
//!
//! A write takes the next value of one global, raft-like index; each table it touches records
//! that index as its own "table index", which is what `X-Consul-Index` reports and what
//! blocking queries wait on (the same model as Consul's memdb `index` table).
//!
//! Tables are split into **replicated** ones (owned by the primary datacenter and copied to
//! secondaries verbatim) and **local** ones (this datacenter's own state that never leaves
//! it). Keep that split when adding tables: replication streams exactly [`Table::REPLICATED`]
//! (`replication::Kind` maps its streams onto them; the `system` table's cluster id arrives
//! with the CA roots).

pub mod backend;
pub mod codec;
pub mod etcd;
pub mod memory;
pub mod redb;

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

pub use self::backend::{Backend, ChangeSet, CommitError, LeaderFence, TableChange};
pub use self::memory::Index;
use self::memory::Memory;
pub use self::redb::RECOVERY_INTERVAL;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// A logical table of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// ACL policies, keyed by policy ID. Replicated.
    AclPolicies,
    /// ACL tokens, keyed by accessor ID. Replicated.
    AclTokens,
    /// Config entries, keyed by `kind/name`. Replicated.
    ConfigEntries,
    /// Intentions, keyed by intention ID. Replicated.
    Intentions,
    /// Connect CA roots (public certificates only), keyed by root ID. Replicated.
    CaRoots,
    /// Small cluster-wide singletons (cluster id, ACL bootstrap marker). Replicated.
    System,
    /// Mesh-gateway addresses per datacenter (Consul's federation states). Replicated.
    FederationStates,
    /// This datacenter's service catalog, keyed by service ID. Local.
    Services,
    /// Private keys of the CA signer active in this datacenter. Local; never replicated.
    CaSigning,
    /// This agent's health checks and their status, keyed by check ID. Local.
    Checks,
}

impl Table {
    /// Every table, in a fixed order (the position is the index into per-table arrays).
    pub const ALL: [Table; 10] = [
        Table::AclPolicies,
        Table::AclTokens,
        Table::ConfigEntries,
        Table::Intentions,
        Table::CaRoots,
        Table::System,
        Table::FederationStates,
        Table::Services,
        Table::CaSigning,
        Table::Checks,
    ];

    /// The tables a secondary datacenter will follow from the primary.
    pub const REPLICATED: [Table; 7] = [
        Table::AclPolicies,
        Table::AclTokens,
        Table::ConfigEntries,
        Table::Intentions,
        Table::CaRoots,
        Table::System,
        Table::FederationStates,
    ];

    /// The redb table name.
    pub fn name(self) -> &'static str {
        match self {
            Table::AclPolicies => "acl_policies",
            Table::AclTokens => "acl_tokens",
            Table::ConfigEntries => "config_entries",
            Table::Intentions => "intentions",
            Table::CaRoots => "ca_roots",
            Table::System => "system",
            Table::FederationStates => "federation_states",
            Table::Services => "services",
            Table::CaSigning => "ca_signing",
            Table::Checks => "checks",
        }
    }

    /// The table named `name` (see [`Table::name`]).
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The table's slot in per-table arrays: its declaration order, which `ALL` repeats (a
    /// unit test keeps the two in step).
    pub(crate) fn position(self) -> usize {
        self as usize
    }
}

/// One table's rows as `(key, JSON value)`, in key order.
pub type TableRows = (Table, Vec<(String, serde_json::Value)>);

/// A value as memory holds it: decoded once, or known to be corrupt (its checksum failed when
/// it was loaded; never served, every read of it fails naming the record).
#[derive(Clone, Debug)]
pub enum Stored {
    /// The decoded JSON value.
    Value(Arc<Value>),
    /// The durable bytes did not verify.
    Corrupt,
}

/// How often a write runs again after [`CommitError::Conflict`] before it gives up.
const CONFLICT_ATTEMPTS: u32 = 5;
/// How long a write waits for memory to catch up with a conflicting commit.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// The store: the in-memory state, its durable backend, and one watch channel per table for
/// blocking queries.
///
/// When the backend refuses writes (redb: read-only after a disk error), reads go on from
/// memory, writes answer a 500 naming the cause, and [`Store::read_only`] says why.
pub struct Store {
    backend: Box<dyn Backend>,
    memory: RwLock<Memory>,
    /// Serialises this process's writers: a transaction reads memory, so two local writers
    /// must not interleave between read and commit.
    writer: Mutex<()>,
    /// Per table: its index, sent after memory holds the commit.
    watches: Vec<watch::Sender<u64>>,
    /// The applied global index, for [`Store::wait_applied`].
    applied: Mutex<u64>,
    applied_changed: Condvar,
    metrics: Arc<Metrics>,
}

impl Store {
    /// Opens the redb store at `path` (see [`redb::Redb::open`]) and loads it into memory.
    pub fn open(path: &Path, metrics: Arc<Metrics>) -> Result<Store> {
        let backend = redb::Redb::open(path, metrics.clone())?;
        Store::with_backend(Box::new(backend), metrics)
    }

    /// A store over `backend`, loaded into memory.
    pub fn with_backend(backend: Box<dyn Backend>, metrics: Arc<Metrics>) -> Result<Store> {
        let memory = Memory::new(backend.load()?);
        let watches = Table::ALL
            .iter()
            .map(|t| watch::channel(memory.table_index(*t)).0)
            .collect();
        let applied = memory.applied();
        Ok(Store {
            backend,
            memory: RwLock::new(memory),
            writer: Mutex::new(()),
            watches,
            applied: Mutex::new(applied),
            applied_changed: Condvar::new(),
            metrics,
        })
    }

    fn read_memory(&self) -> std::sync::RwLockReadGuard<'_, Memory> {
        self.memory.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The index of the last write to `table` (0 if it was never written).
    pub fn index(&self, table: Table) -> u64 {
        *self.watches[table.position()].borrow()
    }

    /// The highest index among `tables`, at least 1 (Consul clients treat 0 as "no index").
    pub fn max_index(&self, tables: &[Table]) -> u64 {
        tables
            .iter()
            .map(|t| self.index(*t))
            .max()
            .unwrap_or(0)
            .max(1)
    }

    /// A receiver that is notified whenever `table` is written.
    pub fn subscribe(&self, table: Table) -> watch::Receiver<u64> {
        self.watches[table.position()].subscribe()
    }

    /// Reads one value.
    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>> {
        let stored = self.read_memory().get(table, key).map(|r| r.value.clone());
        stored
            .map(|s| decode(&self.metrics, table, key, &s))
            .transpose()
    }

    /// Reads every value of a table, in key order.
    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>> {
        let rows = self.rows(table);
        rows.iter()
            .map(|(key, stored)| decode(&self.metrics, table, key, stored))
            .collect()
    }

    /// Reads every row of a table as `(key, JSON value)`, in key order (what replication sends).
    pub fn entries(&self, table: Table) -> Result<Vec<(String, Value)>> {
        let rows = self.rows(table);
        rows.into_iter()
            .map(|(key, stored)| {
                let value = decode(&self.metrics, table, &key, &stored)?;
                Ok((key, value))
            })
            .collect()
    }

    /// The primary keys of the rows filed under `key` in a secondary index, in key order.
    pub fn keys_by(&self, index: Index, key: &str) -> Vec<String> {
        self.read_memory()
            .keys_by(index, key)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The values of the rows filed under `key` in a secondary index (e.g. the instances of
    /// one service name), in key order: a map lookup, not a scan of the table.
    pub fn list_by<T: DeserializeOwned>(&self, index: Index, key: &str) -> Result<Vec<T>> {
        let table = index.table();
        let rows: Vec<(String, Stored)> = {
            let memory = self.read_memory();
            match memory.keys_by(index, key) {
                None => Vec::new(),
                Some(keys) => keys
                    .iter()
                    .filter_map(|k| memory.get(table, k).map(|r| (k.clone(), r.value.clone())))
                    .collect(),
            }
        };
        rows.iter()
            .map(|(key, stored)| decode(&self.metrics, table, key, stored))
            .collect()
    }

    /// The rows of one table, copied out of memory (cheap: values are shared).
    fn rows(&self, table: Table) -> Vec<(String, Stored)> {
        self.read_memory()
            .rows(table)
            .iter()
            .map(|(k, r)| (k.clone(), r.value.clone()))
            .collect()
    }

    /// Every row of every table plus the global index, read under one lock (a consistent
    /// point-in-time copy, what `GET /v1/snapshot` saves).
    pub fn dump(&self) -> Result<(u64, Vec<TableRows>)> {
        let (index, tables) = {
            let memory = self.read_memory();
            let tables: Vec<(Table, Vec<(String, Stored)>)> = Table::ALL
                .iter()
                .map(|t| {
                    let rows = memory
                        .rows(*t)
                        .iter()
                        .map(|(k, r)| (k.clone(), r.value.clone()))
                        .collect();
                    (*t, rows)
                })
                .collect();
            (memory.applied(), tables)
        };
        let mut out = Vec::with_capacity(tables.len());
        for (table, rows) in tables {
            let mut decoded = Vec::with_capacity(rows.len());
            for (key, stored) in rows {
                let value = decode(&self.metrics, table, &key, &stored)?;
                decoded.push((key, value));
            }
            out.push((table, decoded));
        }
        Ok((index, out))
    }

    /// Runs `body` in one write transaction and commits it durably. The closure sees the index
    /// this write will get; every table it writes takes that index. Memory changes, and
    /// blocking queries waiting on those tables wake, after the commit (never before: a woken
    /// reader must see the data).
    ///
    /// When the backend answers [`CommitError::Conflict`] (another agent wrote first), the
    /// store waits until memory has caught up and runs `body` again, a bounded number of
    /// times: `body` must not have effects outside the transaction.
    ///
    /// This blocks on `fsync`: call it from a blocking context (see `http::write`).
    pub fn write<R>(&self, body: impl FnMut(&mut Transaction<'_>) -> Result<R>) -> Result<R> {
        self.write_fenced(None, body)
    }

    /// [`Store::write`] for a write made because this agent leads (a duty's result): with a
    /// `fence`, a shared backend commits it only while the election key is still bound to the
    /// fence's lease. A refused write is counted (`controlplane_leader_fenced_writes_total`),
    /// logged, and answered [`Error::NotLeader`]; nothing was written.
    pub fn write_fenced<R>(
        &self,
        fence: Option<&LeaderFence>,
        mut body: impl FnMut(&mut Transaction<'_>) -> Result<R>,
    ) -> Result<R> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let base_index = self.read_memory().applied();
            let mut transaction = Transaction {
                store: self,
                changes: ChangeSet {
                    base_index,
                    index: base_index.saturating_add(1),
                    tables: Vec::new(),
                },
            };
            let result = body(&mut transaction)?;
            let changes = transaction.changes;
            if changes.tables.is_empty() {
                // Nothing changed: do not burn an index or wake anyone.
                return Ok(result);
            }
            let started = Instant::now();
            match self.backend.commit(&changes, fence) {
                Ok(index) if index == changes.index => {
                    self.metrics.observe_commit(started.elapsed());
                    self.apply(&changes);
                    drop(writer);
                    return Ok(result);
                }
                Ok(index) => {
                    return Err(Error::Internal(format!(
                        "the store backend committed at index {index}, not at {}",
                        changes.index
                    )));
                }
                Err(CommitError::Conflict { current }) => {
                    drop(writer);
                    if attempt >= CONFLICT_ATTEMPTS {
                        return Err(Error::Unavailable(format!(
                            "store: gave up after {attempt} conflicting writes (the store is at index {current}); retry"
                        )));
                    }
                    tracing::debug!(
                        current,
                        base_index,
                        "store write conflicted; running it again once memory catches up"
                    );
                    self.wait_applied(current, CATCH_UP_WAIT)?;
                }
                Err(CommitError::Failed(error)) => return Err(error),
                Err(fenced @ CommitError::Fenced { .. }) => {
                    self.metrics.count_fenced_write();
                    tracing::warn!(error = %fenced, index = changes.index, "a leader-duty write was refused: this agent was deposed");
                    return Err(Error::NotLeader(fenced.to_string()));
                }
            }
        }
    }

    /// Applies one committed change set to memory, then wakes the blocking queries of every
    /// table it wrote. The one path by which memory changes: the store calls it for its own
    /// commits, a shared backend's follower (an etcd watch) for commits made elsewhere. A
    /// change set at or below the applied index changes nothing (it was applied already).
    pub fn apply(&self, changes: &ChangeSet) {
        let mut memory = self.memory.write().unwrap_or_else(|p| p.into_inner());
        if !memory.apply(changes) {
            return;
        }
        // Still under the memory lock, so table indexes are published in commit order.
        for change in &changes.tables {
            self.watches[change.table.position()].send_replace(changes.index);
        }
        drop(memory);
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        *applied = (*applied).max(changes.index);
        drop(applied);
        self.applied_changed.notify_all();
    }

    /// The global index memory has applied.
    pub fn applied_index(&self) -> u64 {
        self.read_memory().applied()
    }

    /// Blocks until memory has applied `index` (read-your-writes after a commit seen
    /// elsewhere), or fails after `timeout`.
    pub fn wait_applied(&self, index: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        while *applied < index {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Unavailable(format!(
                    "store: this agent has applied index {}, not yet {index}, after {timeout:?}",
                    *applied
                )));
            }
            applied = self
                .applied_changed
                .wait_timeout(applied, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        Ok(())
    }

    /// Makes memory current for a linearizable (`?consistent`) read: a no-op on redb (memory
    /// is always current); on a shared backend, waits until memory has applied the index the
    /// backend reports, or fails. Blocking: call it from a blocking context.
    pub fn sync_consistent(&self) -> Result<()> {
        match self.backend.consistent_index()? {
            None => Ok(()),
            Some(index) => self.wait_applied(index, CATCH_UP_WAIT),
        }
    }

    /// Whether writes are refused (read-only after a disk error, unreachable cluster) and
    /// the cause, for health endpoints.
    pub fn read_only(&self) -> Option<String> {
        self.backend.health()
    }

    /// Tries to leave the read-only state (see [`Backend::recover`]). Writes call it through
    /// the backend; the agent also calls it on a timer.
    pub fn recover(&self) -> Result<()> {
        self.backend.recover()
    }
}

/// Turns a stored value into `T`; a corrupt record is counted and never served.
fn decode<T: DeserializeOwned>(
    metrics: &Metrics,
    table: Table,
    key: &str,
    stored: &Stored,
) -> Result<T> {
    match stored {
        Stored::Corrupt => Err(codec::corrupt_error(metrics, table, key)),
        Stored::Value(value) => T::deserialize(&**value)
            .map_err(|e| Error::Store(format!("corrupt value {}/{key}: {e}", table.name()))),
    }
}

/// One write transaction in progress (see [`Store::write`]): reads see memory plus this
/// transaction's own changes.
pub struct Transaction<'a> {
    store: &'a Store,
    changes: ChangeSet,
}

impl Transaction<'_> {
    /// The index this transaction commits at: use it for `CreateIndex`/`ModifyIndex`.
    pub fn index(&self) -> u64 {
        self.changes.index
    }

    fn pending(&self, table: Table) -> Option<&TableChange> {
        self.changes.tables.iter().find(|c| c.table == table)
    }

    fn pending_mut(&mut self, table: Table) -> &mut TableChange {
        let position = match self.changes.tables.iter().position(|c| c.table == table) {
            Some(position) => position,
            None => {
                self.changes.tables.push(TableChange::new(table));
                self.changes.tables.len() - 1
            }
        };
        &mut self.changes.tables[position]
    }

    /// One row as this transaction sees it.
    fn lookup(&self, table: Table, key: &str) -> Option<Stored> {
        if let Some(change) = self.pending(table) {
            if let Some(row) = change.rows.get(key) {
                return row.clone();
            }
            if change.cleared {
                return None;
            }
        }
        self.store
            .read_memory()
            .get(table, key)
            .map(|r| r.value.clone())
    }

    /// Every row of `table` as this transaction sees it, in key order.
    fn rows(&self, table: Table) -> Vec<(String, Stored)> {
        let Some(change) = self.pending(table) else {
            return self.store.rows(table);
        };
        let mut rows: std::collections::BTreeMap<String, Stored> = if change.cleared {
            std::collections::BTreeMap::new()
        } else {
            self.store.rows(table).into_iter().collect()
        };
        for (key, row) in &change.rows {
            match row {
                Some(value) => {
                    rows.insert(key.clone(), value.clone());
                }
                None => {
                    rows.remove(key);
                }
            }
        }
        rows.into_iter().collect()
    }

    /// The primary keys filed under `key` in a secondary index, seeing this transaction's
    /// own writes, in key order.
    pub fn keys_by(&self, index: Index, key: &str) -> Vec<String> {
        let table = index.table();
        let change = self.pending(table);
        let mut keys: std::collections::BTreeSet<String> = match change {
            Some(change) if change.cleared => std::collections::BTreeSet::new(),
            _ => self
                .store
                .read_memory()
                .keys_by(index, key)
                .cloned()
                .unwrap_or_default(),
        };
        for (row_key, row) in change.iter().flat_map(|c| c.rows.iter()) {
            let filed =
                matches!(row, Some(Stored::Value(v)) if index.key_of(v).as_deref() == Some(key));
            if filed {
                keys.insert(row_key.clone());
            } else {
                keys.remove(row_key);
            }
        }
        keys.into_iter().collect()
    }

    /// The values filed under `key` in a secondary index, seeing this transaction's writes.
    pub fn list_by<T: DeserializeOwned>(&self, index: Index, key: &str) -> Result<Vec<T>> {
        let table = index.table();
        let mut out = Vec::new();
        for row_key in self.keys_by(index, key) {
            if let Some(stored) = self.lookup(table, &row_key) {
                out.push(decode(&self.store.metrics, table, &row_key, &stored)?);
            }
        }
        Ok(out)
    }

    /// Reads one value, seeing this transaction's own writes.
    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>> {
        self.lookup(table, key)
            .map(|s| decode(&self.store.metrics, table, key, &s))
            .transpose()
    }

    /// Reads every value of a table, seeing this transaction's own writes.
    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>> {
        self.rows(table)
            .iter()
            .map(|(key, stored)| decode(&self.store.metrics, table, key, stored))
            .collect()
    }

    /// Reads every row of a table as `(key, JSON value)`, seeing this transaction's writes.
    pub fn entries(&self, table: Table) -> Result<Vec<(String, Value)>> {
        self.rows(table)
            .into_iter()
            .map(|(key, stored)| {
                let value = decode(&self.store.metrics, table, &key, &stored)?;
                Ok((key, value))
            })
            .collect()
    }

    /// Inserts or replaces one value.
    pub fn put<T: Serialize>(&mut self, table: Table, key: &str, value: &T) -> Result<()> {
        let value = serde_json::to_value(value).map_err(|e| Error::Internal(e.to_string()))?;
        self.pending_mut(table)
            .rows
            .insert(key.to_owned(), Some(Stored::Value(Arc::new(value))));
        Ok(())
    }

    /// Makes this transaction commit at an index above `floor` (a restored snapshot may carry
    /// `ModifyIndex` values above this store's index; `X-Consul-Index` must never be below
    /// them, or blocking queries would miss changes).
    pub fn raise_index_past(&mut self, floor: u64) {
        if self.changes.index <= floor {
            self.changes.index = floor.saturating_add(1);
        }
    }

    /// Deletes every row of `table` (and counts as a write to it even when it was empty, so
    /// blocking queries on it wake).
    pub fn clear(&mut self, table: Table) -> Result<()> {
        let change = self.pending_mut(table);
        change.cleared = true;
        change.rows.clear();
        Ok(())
    }

    /// Deletes one value; returns whether it existed.
    pub fn delete(&mut self, table: Table, key: &str) -> Result<bool> {
        let existed = self.lookup(table, key).is_some();
        if existed {
            self.pending_mut(table).rows.insert(key.to_owned(), None);
        }
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Store {
        Store::open(&dir.join("state.redb"), Arc::new(Metrics::default())).expect("open")
    }

    #[test]
    fn indexes_are_per_table_and_survive_reopen() {
        let dir = crate::testutil::TempDir::new("store");
        {
            let store = open(dir.path());
            assert_eq!(store.index(Table::Services), 0);
            store
                .write(|tx| tx.put(Table::Services, "a", &1u32))
                .expect("write");
            store
                .write(|tx| tx.put(Table::Intentions, "b", &2u32))
                .expect("write");
            assert_eq!(store.index(Table::Services), 1);
            assert_eq!(store.index(Table::Intentions), 2);
            // A write that changes nothing takes no index.
            store
                .write(|tx| tx.delete(Table::Services, "missing"))
                .expect("write");
            assert_eq!(store.max_index(&[Table::Services, Table::Intentions]), 2);
        }
        let store = open(dir.path());
        assert_eq!(store.index(Table::Services), 1);
        assert_eq!(store.index(Table::Intentions), 2);
        assert_eq!(
            store.get::<u32>(Table::Services, "a").expect("get"),
            Some(1)
        );
    }

    #[test]
    fn positions_follow_all() {
        for (i, table) in Table::ALL.iter().enumerate() {
            assert_eq!(table.position(), i, "{table:?}");
        }
        for (i, index) in Index::ALL.iter().enumerate() {
            assert_eq!(*index as usize, i, "{index:?}");
        }
        assert!(Table::REPLICATED.iter().all(|t| Table::ALL.contains(t)));
        assert!(
            !Table::REPLICATED.contains(&Table::CaSigning),
            "private keys never leave the datacenter"
        );
    }

    #[test]
    fn empty_or_garbage_state_file_is_an_error_not_a_fresh_start() {
        let dir = crate::testutil::TempDir::new("store-empty");
        let path = dir.path().join("state.redb");
        std::fs::write(&path, b"").expect("write");
        let error = Store::open(&path, Arc::new(Metrics::default()))
            .err()
            .expect("an empty state file must not open")
            .to_string();
        assert!(error.contains("is empty (0 bytes)"), "{error}");
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            0,
            "untouched"
        );
        std::fs::write(&path, vec![0x5a; 8192]).expect("write");
        let error = Store::open(&path, Arc::new(Metrics::default()))
            .err()
            .expect("garbage must not open")
            .to_string();
        assert!(error.contains("cannot open state file"), "{error}");
        // A missing file is a new store, and the temporary name is gone afterwards.
        std::fs::remove_file(&path).expect("remove");
        drop(open(dir.path()));
        assert!(path.exists());
        assert!(!dir.path().join("state.redb.init").exists());
    }

    fn raw(path: &Path, table: Table, key: &str) -> Vec<u8> {
        use ::redb::ReadableDatabase as _;
        let database = ::redb::Database::open(path).expect("open raw");
        let txn = database.begin_read().expect("read");
        let handle = txn.open_table(redb::definition(table)).expect("table");
        let value = handle
            .get(key)
            .expect("get")
            .expect("present")
            .value()
            .to_vec();
        value
    }

    fn put_raw(path: &Path, table: Table, key: &str, bytes: &[u8]) {
        let database = ::redb::Database::create(path).expect("open raw");
        let txn = database.begin_write().expect("write");
        {
            let mut handle = txn.open_table(redb::definition(table)).expect("table");
            handle.insert(key, bytes).expect("insert");
        }
        txn.commit().expect("commit");
    }

    #[test]
    fn records_written_before_checksums_still_load_and_gain_them() {
        let dir = crate::testutil::TempDir::new("store-legacy");
        let path = dir.path().join("state.redb");
        // What an older version wrote: bare JSON values, no format marker in `meta`.
        put_raw(&path, Table::Intentions, "i1", br#"{"SourceName":"web"}"#);
        {
            let store = Store::open(&path, Arc::new(Metrics::default())).expect("open");
            let value: Option<serde_json::Value> = store.get(Table::Intentions, "i1").expect("get");
            assert_eq!(value, Some(serde_json::json!({"SourceName": "web"})));
            assert_eq!(
                store.index(Table::Intentions),
                0,
                "migration is not a write"
            );
        }
        let bytes = raw(&path, Table::Intentions, "i1");
        assert!(bytes.starts_with(&codec::VALUE_MAGIC), "{bytes:?}");
        assert_eq!(
            codec::verified(&bytes),
            Some(&br#"{"SourceName":"web"}"#[..])
        );
    }

    #[test]
    fn a_changed_byte_is_counted_and_never_served() {
        let dir = crate::testutil::TempDir::new("store-corrupt");
        let path = dir.path().join("state.redb");
        {
            let store = open(dir.path());
            store
                .write(|tx| tx.put(Table::Intentions, "i1", &"src-r5-0-0"))
                .expect("write");
        }
        let mut bytes = raw(&path, Table::Intentions, "i1");
        let last_digit = bytes.len() - 2;
        bytes[last_digit] = b'9';
        put_raw(&path, Table::Intentions, "i1", &bytes);
        let metrics = Arc::new(Metrics::default());
        let store = Store::open(&path, metrics.clone()).expect("open");
        let error = store
            .get::<String>(Table::Intentions, "i1")
            .expect_err("a changed value must not be served")
            .to_string();
        assert!(
            error.contains("corrupt record intentions/i1: checksum mismatch"),
            "{error}"
        );
        assert!(
            store.list::<String>(Table::Intentions).is_err(),
            "lists fail whole"
        );
        assert!(store
            .write(|tx| tx.get::<String>(Table::Intentions, "i1"))
            .is_err());
        let text = metrics.render();
        assert!(
            text.contains("controlplane_store_corrupt_records_total{table=\"intentions\"} 3"),
            "{text}"
        );
        // A marker-less value after migration is corruption too, not an old record.
        drop(store);
        put_raw(&path, Table::Intentions, "i2", br#""bare""#);
        let store = Store::open(&path, Arc::new(Metrics::default())).expect("open");
        assert!(store.get::<String>(Table::Intentions, "i2").is_err());
    }

    /// A redb backend that, on its first commit, lets "another agent" commit first (straight
    /// into the file) and answers `Conflict`; a follower thread then pushes that commit into
    /// memory through `Store::apply`, as an etcd watch would.
    struct Contended {
        inner: redb::Redb,
        injected: std::sync::atomic::AtomicBool,
        follower: Mutex<std::sync::mpsc::Sender<ChangeSet>>,
    }

    impl Backend for Contended {
        fn load(&self) -> Result<backend::Loaded> {
            self.inner.load()
        }
        fn commit(
            &self,
            changes: &ChangeSet,
            _fence: Option<&LeaderFence>,
        ) -> Result<u64, CommitError> {
            if self
                .injected
                .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                return self.inner.commit(changes, None);
            }
            let mut other = TableChange::new(Table::Intentions);
            other.rows.insert(
                "other".to_owned(),
                Some(Stored::Value(Arc::new(serde_json::json!("elsewhere")))),
            );
            let remote = ChangeSet {
                base_index: changes.base_index,
                index: changes.base_index + 1,
                tables: vec![other],
            };
            let current = self.inner.commit(&remote, None)?;
            let sent = self
                .follower
                .lock()
                .map_err(|_| Error::Internal("follower".into()))?
                .send(remote);
            assert!(sent.is_ok(), "follower gone");
            Err(CommitError::Conflict { current })
        }
        fn consistent_index(&self) -> Result<Option<u64>> {
            Ok(None)
        }
        fn health(&self) -> Option<String> {
            None
        }
        fn recover(&self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_conflicting_write_runs_again_on_the_caught_up_memory() {
        let dir = crate::testutil::TempDir::new("store-conflict");
        let path = dir.path().join("state.redb");
        let metrics = Arc::new(Metrics::default());
        let (sender, receiver) = std::sync::mpsc::channel::<ChangeSet>();
        let backend = Contended {
            inner: redb::Redb::open(&path, metrics.clone()).expect("open"),
            injected: std::sync::atomic::AtomicBool::new(false),
            follower: Mutex::new(sender),
        };
        let store = Arc::new(Store::with_backend(Box::new(backend), metrics).expect("store"));
        let follower = {
            let store = store.clone();
            std::thread::spawn(move || {
                if let Ok(changes) = receiver.recv_timeout(Duration::from_secs(10)) {
                    store.apply(&changes);
                }
            })
        };
        let mut runs = 0;
        let index = store
            .write(|tx| {
                runs += 1;
                let seen: Option<String> = tx.get(Table::Intentions, "other")?;
                tx.put(Table::Services, "mine", &seen)?;
                Ok(tx.index())
            })
            .expect("write");
        follower.join().expect("follower");
        assert_eq!(runs, 2, "the closure runs again after the conflict");
        assert_eq!(
            index, 2,
            "the second run commits after the other agent's write"
        );
        assert_eq!(
            store
                .get::<Option<String>>(Table::Services, "mine")
                .expect("get"),
            Some(Some("elsewhere".to_owned())),
            "the second run saw the other agent's write"
        );
        assert_eq!(store.index(Table::Intentions), 1);
        assert_eq!(store.index(Table::Services), 2);
        assert_eq!(store.applied_index(), 2);
        // Applying a commit again (an etcd agent sees its own commits echoed) changes nothing.
        let mut stale = TableChange::new(Table::Services);
        stale.rows.insert("mine".to_owned(), None);
        store.apply(&ChangeSet {
            base_index: 1,
            index: 2,
            tables: vec![stale],
        });
        assert!(store
            .get::<Option<String>>(Table::Services, "mine")
            .expect("get")
            .is_some());
        drop(store);
        let reopened = open(dir.path());
        assert_eq!(reopened.index(Table::Services), 2);
        assert_eq!(
            reopened
                .get::<String>(Table::Intentions, "other")
                .expect("get"),
            Some("elsewhere".to_owned())
        );
    }

    #[test]
    fn a_transaction_sees_its_own_changes_and_a_woken_reader_sees_the_commit() {
        let dir = crate::testutil::TempDir::new("store-memory");
        let store = open(dir.path());
        store
            .write(|tx| {
                tx.put(Table::Intentions, "a", &"old-a")?;
                tx.put(Table::Intentions, "b", &"old-b")
            })
            .expect("write");
        let mut watch = store.subscribe(Table::Intentions);
        watch.borrow_and_update();
        store
            .write(|tx| {
                assert!(tx.delete(Table::Intentions, "a")?);
                assert!(!tx.delete(Table::Intentions, "a")?, "already deleted here");
                assert_eq!(tx.list::<String>(Table::Intentions)?, ["old-b"]);
                tx.clear(Table::Intentions)?;
                assert_eq!(tx.get::<String>(Table::Intentions, "b")?, None);
                tx.put(Table::Intentions, "c", &"new-c")?;
                assert_eq!(tx.list::<String>(Table::Intentions)?, ["new-c"]);
                // Memory does not change before the commit.
                assert_eq!(store.list::<String>(Table::Intentions)?, ["old-a", "old-b"]);
                Ok(())
            })
            .expect("write");
        assert!(watch.has_changed().expect("open"));
        assert_eq!(*watch.borrow_and_update(), 2);
        assert_eq!(
            store.list::<String>(Table::Intentions).expect("list"),
            ["new-c"]
        );
        drop(store);
        assert_eq!(
            open(dir.path())
                .list::<String>(Table::Intentions)
                .expect("list"),
            ["new-c"]
        );
    }

    #[test]
    fn secondary_indexes_follow_every_change_and_reopen() {
        use serde_json::json;
        let dir = crate::testutil::TempDir::new("store-index");
        let store = open(dir.path());
        let by_name = |store: &Store, name: &str| store.keys_by(Index::ServiceName, name);
        store
            .write(|tx| {
                tx.put(Table::Services, "a", &json!({"Service": "web"}))?;
                tx.put(Table::Services, "b", &json!({"Service": "web"}))?;
                tx.put(Table::Services, "c", &json!({"Service": "db"}))?;
                // The transaction sees its own changes through the index.
                assert_eq!(tx.keys_by(Index::ServiceName, "web"), ["a", "b"]);
                Ok(())
            })
            .expect("write");
        assert_eq!(by_name(&store, "web"), ["a", "b"]);
        store
            .write(|tx| {
                tx.put(Table::Services, "b", &json!({"Service": "db"}))?;
                tx.delete(Table::Services, "c")?;
                assert_eq!(tx.keys_by(Index::ServiceName, "db"), ["b"]);
                assert_eq!(tx.keys_by(Index::ServiceName, "web"), ["a"]);
                Ok(())
            })
            .expect("write");
        assert_eq!(
            by_name(&store, "web"),
            ["a"],
            "a renamed row leaves its old key"
        );
        assert_eq!(
            by_name(&store, "db"),
            ["b"],
            "a deleted row leaves the index"
        );
        let names: Vec<serde_json::Value> = store.list_by(Index::ServiceName, "db").expect("list");
        assert_eq!(names, [json!({"Service": "db"})]);
        drop(store);
        let store = open(dir.path());
        assert_eq!(by_name(&store, "web"), ["a"], "rebuilt at load");
        store
            .write(|tx| {
                tx.clear(Table::Services)?;
                assert!(tx.keys_by(Index::ServiceName, "web").is_empty());
                tx.put(Table::Services, "d", &json!({"Service": "web"}))
            })
            .expect("write");
        assert_eq!(by_name(&store, "web"), ["d"]);
        assert!(by_name(&store, "db").is_empty());
    }

    #[test]
    fn failed_transaction_stores_nothing() {
        let dir = crate::testutil::TempDir::new("store-abort");
        let store = open(dir.path());
        let result: Result<()> = store.write(|tx| {
            tx.put(Table::Services, "a", &1u32)?;
            Err(Error::bad_request("no"))
        });
        assert!(result.is_err());
        assert_eq!(store.get::<u32>(Table::Services, "a").expect("get"), None);
        assert_eq!(store.index(Table::Services), 0);
    }
}
