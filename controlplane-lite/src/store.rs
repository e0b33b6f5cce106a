//! The embedded, crash-safe state store (redb).
//!
//! Every logical table holds JSON values under string keys. A write transaction takes the next
//! value of one global, raft-like index; each table it touches records that index as its own
//! "table index", which is what `X-Consul-Index` reports and what blocking queries wait on (the
//! same model as Consul's memdb `index` table). Every commit uses `Durability::Immediate`, so a
//! write the HTTP layer has acknowledged is on disk and survives `kill -9`.
//!
//! Tables are split into **replicated** ones (owned by the primary datacenter and, once
//! replication exists, copied to secondaries verbatim) and **local** ones (this datacenter's own
//! state that never leaves it). Keep that split when adding tables: the replication issue will
//! stream exactly [`Table::REPLICATED`] (`replication::Kind` maps its streams onto them; the
//! `system` table's cluster id arrives with the CA roots).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;

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
    fn position(self) -> usize {
        self as usize
    }

    fn definition(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(self.name())
    }
}

/// One table's rows as `(key, JSON value)`, in key order.
pub type TableRows = (Table, Vec<(String, serde_json::Value)>);

/// The table of indexes: `raft` holds the global index, `table/<name>` each table's index.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const GLOBAL_INDEX_KEY: &str = "raft";

/// The store: a redb database plus one watch channel per table for blocking queries.
///
/// After a failed write that leaves redb's handle poisoned (a failed `fsync` or write, e.g.
/// `ENOSPC`: redb then answers every write with "Previous I/O error occurred"), the store is
/// **read-only**: reads go on through the old handle (what it has cached or can still read),
/// writes answer a 500 naming the original cause, and `controlplane_store_healthy` is 0. Each
/// later write first checks, at most once per [`RECOVERY_INTERVAL`], whether the disk takes a
/// small probe file; if so it closes the handle and opens the file again (redb repairs it to
/// the last durable commit, so every acknowledged write is kept) and the write proceeds.
pub struct Store {
    path: PathBuf,
    database: RwLock<Option<Arc<Database>>>,
    health: Mutex<Health>,
    watches: Vec<watch::Sender<u64>>,
    metrics: Arc<Metrics>,
}

/// How often a read-only store tries to recover (only when a write asks for it).
pub const RECOVERY_INTERVAL: Duration = Duration::from_millis(500);
/// The free space a recovery attempt needs: redb's repair and the next commits write pages.
const RECOVERY_PROBE_BYTES: usize = 256 << 10;
/// How long a recovery waits for in-flight reads to let go of the old handle.
const RECOVERY_DRAIN: Duration = Duration::from_secs(2);

/// Why the store is read-only, if it is.
#[derive(Default)]
struct Health {
    failure: Option<String>,
    last_attempt: Option<Instant>,
}

impl Store {
    /// Opens the database file, or initialises a new one when `path` does not exist, and loads
    /// every table's index.
    ///
    /// Only a missing file means "new datacenter". An existing file that is empty (0 bytes) or
    /// that redb cannot open is an error naming the file: starting fresh over it would mint a
    /// new CA, a new trust domain and an open ACL bootstrap, silently orphaning every sidecar
    /// and token of the datacenter (see `controlplane-lite snapshot restore` for recovery).
    pub fn open(path: &Path, metrics: Arc<Metrics>) -> Result<Store> {
        let database = if path.exists() {
            open_existing(path)?
        } else {
            initialise(path)?
        };
        let mut indexes = Vec::with_capacity(Table::ALL.len());
        {
            // Create every table up front so read transactions never see a missing table.
            let mut txn = database.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                let meta = txn.open_table(META)?;
                for table in Table::ALL {
                    txn.open_table(table.definition())?;
                    let key = format!("table/{}", table.name());
                    indexes.push(meta.get(key.as_str())?.map(|v| v.value()).unwrap_or(0));
                }
            }
            let migrated = migrate_values(&txn)?;
            if migrated > 0 {
                tracing::info!(
                    records = migrated,
                    "added checksums to records written by an older version"
                );
            }
            txn.commit()?;
        }
        let watches = indexes.into_iter().map(|i| watch::channel(i).0).collect();
        metrics.set_store_healthy(true);
        Ok(Store {
            path: path.to_owned(),
            database: RwLock::new(Some(Arc::new(database))),
            health: Mutex::new(Health::default()),
            watches,
            metrics,
        })
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
        let txn = self.handle()?.begin_read()?;
        let handle = txn.open_table(table.definition())?;
        match handle.get(key)? {
            Some(bytes) => decode(&self.metrics, table, key, bytes.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Reads every value of a table, in key order.
    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>> {
        let txn = self.handle()?.begin_read()?;
        let handle = txn.open_table(table.definition())?;
        let mut out = Vec::new();
        for entry in handle.iter()? {
            let (key, value) = entry?;
            out.push(decode(&self.metrics, table, key.value(), value.value())?);
        }
        Ok(out)
    }

    /// Reads every row of a table as `(key, JSON value)`, in key order (what replication sends).
    pub fn entries(&self, table: Table) -> Result<Vec<(String, serde_json::Value)>> {
        let txn = self.handle()?.begin_read()?;
        let handle = txn.open_table(table.definition())?;
        let mut out = Vec::new();
        for entry in handle.iter()? {
            let (key, value) = entry?;
            out.push((
                key.value().to_owned(),
                decode(&self.metrics, table, key.value(), value.value())?,
            ));
        }
        Ok(out)
    }

    /// Every row of every table plus the global index, read in one transaction (a consistent
    /// point-in-time copy, what `GET /v1/snapshot` saves).
    pub fn dump(&self) -> Result<(u64, Vec<TableRows>)> {
        let txn = self.handle()?.begin_read()?;
        let index = {
            let meta = txn.open_table(META)?;
            let value = meta.get(GLOBAL_INDEX_KEY)?.map(|v| v.value()).unwrap_or(0);
            value
        };
        let mut tables = Vec::with_capacity(Table::ALL.len());
        for table in Table::ALL {
            let handle = txn.open_table(table.definition())?;
            let mut rows = Vec::new();
            for entry in handle.iter()? {
                let (key, value) = entry?;
                rows.push((
                    key.value().to_owned(),
                    decode(&self.metrics, table, key.value(), value.value())?,
                ));
            }
            tables.push((table, rows));
        }
        Ok((index, tables))
    }

    /// Runs `body` in one write transaction and commits it durably. The closure sees the index
    /// this write will get; every table it writes takes that index. Blocking queries waiting on
    /// those tables wake after the commit (never before: a woken reader must see the data).
    ///
    /// This blocks on `fsync`: call it from a blocking context (see `http::write`).
    pub fn write<R>(&self, body: impl FnOnce(&mut Transaction<'_>) -> Result<R>) -> Result<R> {
        self.recover()?;
        let database = self.handle()?;
        match self.write_on(&database, body) {
            Err(Error::Store(cause)) if database.begin_write().is_err() => {
                // The handle is poisoned (redb refuses any further write): remember the cause,
                // which redb's later errors no longer name.
                tracing::error!(%cause, path = %self.path.display(), "store write failed; the store is read-only until the disk takes writes again");
                self.lock_health().failure = Some(cause.clone());
                self.metrics.set_store_healthy(false);
                Err(read_only(&cause))
            }
            other => other,
        }
    }

    /// Whether writes are refused after a disk error (and the cause), for health endpoints.
    pub fn read_only(&self) -> Option<String> {
        self.lock_health().failure.clone()
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current redb handle (absent only while a recovery could not reopen the file).
    fn handle(&self) -> Result<Arc<Database>> {
        let guard = self.database.read().unwrap_or_else(|p| p.into_inner());
        guard.clone().ok_or_else(|| {
            Error::Store(format!(
                "state file {} is closed after a disk error and could not be reopened yet: {}",
                self.path.display(),
                self.read_only().unwrap_or_default()
            ))
        })
    }

    /// In a read-only store: if the disk takes writes again, reopens the file. Otherwise, or
    /// between attempts (at most one per [`RECOVERY_INTERVAL`]), answers the read-only error.
    /// Writes call it first; the agent also calls it on a timer.
    pub fn recover(&self) -> Result<()> {
        let cause = {
            let mut health = self.lock_health();
            let Some(cause) = health.failure.clone() else {
                return Ok(());
            };
            if health
                .last_attempt
                .is_some_and(|t| t.elapsed() < RECOVERY_INTERVAL)
            {
                return Err(read_only(&cause));
            }
            health.last_attempt = Some(Instant::now());
            cause
        };
        if let Err(probe) = self.probe_space() {
            return Err(read_only(&format!("{cause}; still failing: {probe}")));
        }
        let mut slot = self.database.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = slot.take() {
            // Readers clone the handle for the length of one call; wait for them (bounded)
            // so the old handle really closes and releases its file lock.
            let deadline = Instant::now() + RECOVERY_DRAIN;
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if Arc::strong_count(&old) > 1 {
                *slot = Some(old);
                return Err(read_only(&format!(
                    "{cause}; readers still hold the old handle"
                )));
            }
            drop(old);
        }
        match Database::open(&self.path) {
            Ok(database) => {
                *slot = Some(Arc::new(database));
                drop(slot);
                self.lock_health().failure = None;
                self.metrics.set_store_healthy(true);
                tracing::warn!(path = %self.path.display(), %cause, "store reopened after a disk error; writes resume");
                Ok(())
            }
            Err(e) => Err(read_only(&format!("{cause}; reopening failed: {e}"))),
        }
    }

    /// Writes, syncs and removes a small file next to the store: whether the disk takes
    /// writes again.
    fn probe_space(&self) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut probe = self.path.as_os_str().to_owned();
        probe.push(".probe");
        let probe = PathBuf::from(probe);
        let result = (|| {
            let mut file = std::fs::File::create(&probe)?;
            file.write_all(&vec![0u8; RECOVERY_PROBE_BYTES])?;
            file.sync_all()
        })();
        let _ = std::fs::remove_file(&probe);
        result
    }

    fn write_on<R>(
        &self,
        database: &Database,
        body: impl FnOnce(&mut Transaction<'_>) -> Result<R>,
    ) -> Result<R> {
        let started = Instant::now();
        let mut txn = database.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let current = {
            let meta = txn.open_table(META)?;
            let value = meta.get(GLOBAL_INDEX_KEY)?.map(|v| v.value()).unwrap_or(0);
            value
        };
        let mut transaction = Transaction {
            txn: &txn,
            metrics: &self.metrics,
            index: current + 1,
            touched: Vec::new(),
        };
        let result = body(&mut transaction)?;
        let touched = std::mem::take(&mut transaction.touched);
        let index = transaction.index;
        if touched.is_empty() {
            // Nothing changed: do not burn an index or wake anyone.
            txn.abort()?;
            return Ok(result);
        }
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(GLOBAL_INDEX_KEY, index)?;
            for table in &touched {
                meta.insert(format!("table/{}", table.name()).as_str(), index)?;
            }
        }
        txn.commit()?;
        self.metrics.observe_commit(started.elapsed());
        for table in touched {
            self.watches[table.position()].send_replace(index);
        }
        Ok(result)
    }
}

/// The answer to a write while the store is read-only: Consul-style 500 text with the cause.
fn read_only(cause: &str) -> Error {
    Error::Store(format!(
        "read-only after a failed disk write ({cause}); writes resume once the disk takes writes again"
    ))
}

/// Opens an existing state file, refusing an empty or unreadable one.
fn open_existing(path: &Path) -> Result<Database> {
    let length = std::fs::metadata(path)
        .map_err(|e| Error::Startup(format!("cannot stat state file {}: {e}", path.display())))?
        .len();
    if length == 0 {
        return Err(Error::Startup(format!(
            "refusing to start: state file {} is empty (0 bytes), so this datacenter's state (CA, ACL tokens, intentions) is lost or was truncated; starting fresh would create a new datacenter with a new CA and an open ACL bootstrap. Move the file aside and restore a backup (`controlplane-lite snapshot restore FILE` into the new agent), or delete it to deliberately start a new datacenter",
            path.display()
        )));
    }
    Database::open(path).map_err(|e| {
        Error::Startup(format!(
            "refusing to start: cannot open state file {} ({e}); it is not a readable controlplane-lite store. Move it aside and restore a backup with `controlplane-lite snapshot restore FILE`, or delete it to deliberately start a new datacenter",
            path.display()
        ))
    })
}

/// Creates a new, empty store at `path`: initialised under a temporary name, synced, then
/// renamed into place, so a crash part-way leaves no (empty) state file behind.
fn initialise(path: &Path) -> Result<Database> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".init");
    let temporary = std::path::PathBuf::from(temporary);
    // A leftover from a crash during an earlier initialisation never held any state (it was
    // never renamed into place), so it is safe to remove.
    if temporary.exists() {
        std::fs::remove_file(&temporary)
            .map_err(|e| Error::Startup(format!("cannot remove {}: {e}", temporary.display())))?;
    }
    drop(crate::datadir::create_private_file(&temporary)?);
    {
        let database = Database::create(&temporary)?;
        let mut txn = database.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(FORMAT_KEY, VALUE_FORMAT)?;
            for table in Table::ALL {
                txn.open_table(table.definition())?;
            }
        }
        txn.commit()?;
    }
    let io = |e: std::io::Error| Error::Startup(format!("cannot create {}: {e}", path.display()));
    std::fs::File::open(&temporary)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    tracing::info!(path = %path.display(), "initialised a new state store");
    Database::open(path).map_err(Error::from)
}

/// The first bytes of every stored value: a marker no JSON text starts with, then the format
/// version. What follows is [`DIGEST_LEN`] bytes of the SHA-256 of the JSON, then the JSON.
const VALUE_MAGIC: [u8; 2] = [0xC5, 0x01];
/// How much of the SHA-256 each value carries: 64 bits make a random change that still
/// matches a 2^-64 event, at 10 bytes of overhead per record.
const DIGEST_LEN: usize = 8;
const HEADER_LEN: usize = VALUE_MAGIC.len() + DIGEST_LEN;
/// `meta` key of the value format: absent in files written before values were checksummed,
/// [`VALUE_FORMAT`] once every value carries its checksum.
const FORMAT_KEY: &str = "value_format";
const VALUE_FORMAT: u64 = 1;

fn digest(json: &[u8]) -> [u8; DIGEST_LEN] {
    let full = ring::digest::digest(&ring::digest::SHA256, json);
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(&full.as_ref()[..DIGEST_LEN]);
    out
}

/// Frames JSON bytes with the marker and their checksum.
fn frame(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + json.len());
    out.extend_from_slice(&VALUE_MAGIC);
    out.extend_from_slice(&digest(json));
    out.extend_from_slice(json);
    out
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(value).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(frame(&json))
}

/// The JSON inside a stored value, if its checksum holds.
fn verified(bytes: &[u8]) -> Option<&[u8]> {
    let rest = bytes.strip_prefix(&VALUE_MAGIC[..])?;
    if rest.len() < DIGEST_LEN {
        return None;
    }
    let (sum, json) = rest.split_at(DIGEST_LEN);
    (sum == digest(json)).then_some(json)
}

/// Checks and parses a stored value. A checksum mismatch is never served: it is logged as an
/// error, counted in `controlplane_store_corrupt_records_total`, and the read fails with a 500
/// naming the record (a list fails whole rather than skipping the row: a missing deny
/// intention or a missing ACL token would silently change who may talk to whom).
fn decode<T: DeserializeOwned>(
    metrics: &Metrics,
    table: Table,
    key: &str,
    bytes: &[u8],
) -> Result<T> {
    let Some(json) = verified(bytes) else {
        tracing::error!(
            table = table.name(),
            key,
            "corrupt record: checksum mismatch, the stored bytes changed on disk; not served"
        );
        metrics.count_corrupt_record(table.name());
        return Err(Error::Store(format!(
            "corrupt record {}/{key}: checksum mismatch (the stored bytes changed on disk); not served. Restore a snapshot (`controlplane-lite snapshot restore`) or write the record again",
            table.name()
        )));
    };
    serde_json::from_slice(json)
        .map_err(|e| Error::Store(format!("corrupt value {}/{key}: {e}", table.name())))
}

/// Adds checksums to every value of a store written before values carried them (their bytes
/// are JSON as is), once, in the transaction that opens the store; then records the format so
/// that, from then on, a value without its marker is corruption rather than an old record.
/// Table indexes do not move: the records did not change.
fn migrate_values(txn: &redb::WriteTransaction) -> Result<usize> {
    let mut meta = txn.open_table(META)?;
    let format = meta.get(FORMAT_KEY)?.map(|v| v.value()).unwrap_or(0);
    if format >= VALUE_FORMAT {
        return Ok(0);
    }
    let mut migrated = 0;
    for table in Table::ALL {
        let mut handle = txn.open_table(table.definition())?;
        let mut legacy = Vec::new();
        for entry in handle.iter()? {
            let (key, value) = entry?;
            if !value.value().starts_with(&VALUE_MAGIC) {
                legacy.push((key.value().to_owned(), frame(value.value())));
            }
        }
        for (key, value) in &legacy {
            handle.insert(key.as_str(), value.as_slice())?;
        }
        migrated += legacy.len();
    }
    meta.insert(FORMAT_KEY, VALUE_FORMAT)?;
    Ok(migrated)
}

/// One write transaction in progress (see [`Store::write`]).
pub struct Transaction<'a> {
    txn: &'a redb::WriteTransaction,
    metrics: &'a Metrics,
    index: u64,
    touched: Vec<Table>,
}

impl Transaction<'_> {
    /// The index this transaction commits at: use it for `CreateIndex`/`ModifyIndex`.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Reads one value, seeing this transaction's own writes.
    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>> {
        let handle = self.txn.open_table(table.definition())?;
        let value = match handle.get(key)? {
            Some(bytes) => Some(decode(self.metrics, table, key, bytes.value())?),
            None => None,
        };
        Ok(value)
    }

    /// Reads every value of a table, seeing this transaction's own writes.
    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>> {
        let handle = self.txn.open_table(table.definition())?;
        let mut out = Vec::new();
        for entry in handle.iter()? {
            let (key, value) = entry?;
            out.push(decode(self.metrics, table, key.value(), value.value())?);
        }
        Ok(out)
    }

    /// Reads every row of a table as `(key, JSON value)`, seeing this transaction's writes.
    pub fn entries(&self, table: Table) -> Result<Vec<(String, serde_json::Value)>> {
        let handle = self.txn.open_table(table.definition())?;
        let mut out = Vec::new();
        for entry in handle.iter()? {
            let (key, value) = entry?;
            out.push((
                key.value().to_owned(),
                decode(self.metrics, table, key.value(), value.value())?,
            ));
        }
        Ok(out)
    }

    /// Inserts or replaces one value.
    pub fn put<T: Serialize>(&mut self, table: Table, key: &str, value: &T) -> Result<()> {
        let bytes = encode(value)?;
        {
            let mut handle = self.txn.open_table(table.definition())?;
            handle.insert(key, bytes.as_slice())?;
        }
        self.touch(table);
        Ok(())
    }

    /// Makes this transaction commit at an index above `floor` (a restored snapshot may carry
    /// `ModifyIndex` values above this store's index; `X-Consul-Index` must never be below
    /// them, or blocking queries would miss changes).
    pub fn raise_index_past(&mut self, floor: u64) {
        if self.index <= floor {
            self.index = floor.saturating_add(1);
        }
    }

    /// Deletes every row of `table` (and counts as a write to it even when it was empty, so
    /// blocking queries on it wake).
    pub fn clear(&mut self, table: Table) -> Result<()> {
        {
            let mut handle = self.txn.open_table(table.definition())?;
            handle.retain(|_, _| false)?;
        }
        self.touch(table);
        Ok(())
    }

    /// Deletes one value; returns whether it existed.
    pub fn delete(&mut self, table: Table, key: &str) -> Result<bool> {
        let existed = {
            let mut handle = self.txn.open_table(table.definition())?;
            let removed = handle.remove(key)?;
            removed.is_some()
        };
        if existed {
            self.touch(table);
        }
        Ok(existed)
    }

    fn touch(&mut self, table: Table) {
        if !self.touched.contains(&table) {
            self.touched.push(table);
        }
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
        let database = Database::open(path).expect("open raw");
        let txn = database.begin_read().expect("read");
        let handle = txn.open_table(table.definition()).expect("table");
        let value = handle
            .get(key)
            .expect("get")
            .expect("present")
            .value()
            .to_vec();
        value
    }

    fn put_raw(path: &Path, table: Table, key: &str, bytes: &[u8]) {
        let database = Database::create(path).expect("open raw");
        let txn = database.begin_write().expect("write");
        {
            let mut handle = txn.open_table(table.definition()).expect("table");
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
        assert!(bytes.starts_with(&VALUE_MAGIC), "{bytes:?}");
        assert_eq!(verified(&bytes), Some(&br#"{"SourceName":"web"}"#[..]));
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
