//! The embedded, crash-safe backend (redb), the default: one file per agent. Every logical
//! table is a redb table of framed JSON values (see [`codec`](super::codec)) under string
//! keys; the `meta` table holds the global index (`raft`) and each table's index
//! (`table/<name>`). Every commit uses `Durability::Immediate`, so a write the HTTP layer has
//! acknowledged is on disk and survives `kill -9`.
//!
//! After a failed write that leaves redb's handle poisoned (a failed `fsync` or write, e.g.
//! `ENOSPC`: redb then answers every write with "Previous I/O error occurred"), the backend is
//! **read-only**: writes answer a 500 naming the original cause, and
//! `controlplane_store_healthy` is 0 (reads are served from memory and go on). Each later write
//! first checks, at most once per [`RECOVERY_INTERVAL`], whether the disk takes a small probe
//! file; if so it closes the handle and opens the file again (redb repairs it to the last
//! durable commit, so every acknowledged write is kept) and the write proceeds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::backend::{Backend, ChangeSet, CommitError, LeaderFence, Loaded, LoadedTable};
use super::codec::{self, VALUE_MAGIC};
use super::{Stored, Table};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// How often a read-only store tries to recover (only when a write asks for it).
pub const RECOVERY_INTERVAL: Duration = Duration::from_millis(500);
/// The free space a recovery attempt needs: redb's repair and the next commits write pages.
const RECOVERY_PROBE_BYTES: usize = 256 << 10;
/// How long a recovery waits for in-flight users to let go of the old handle.
const RECOVERY_DRAIN: Duration = Duration::from_secs(2);

/// The table of indexes: `raft` holds the global index, `table/<name>` each table's index.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const GLOBAL_INDEX_KEY: &str = "raft";
/// `meta` key of the value format: absent in files written before values were checksummed,
/// [`VALUE_FORMAT`] once every value carries its checksum.
const FORMAT_KEY: &str = "value_format";
const VALUE_FORMAT: u64 = 1;

pub(crate) fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

fn table_index_key(table: Table) -> String {
    format!("table/{}", table.name())
}

/// The redb backend.
pub struct Redb {
    path: PathBuf,
    database: RwLock<Option<Arc<Database>>>,
    health: Mutex<Health>,
    metrics: Arc<Metrics>,
}

/// Why the backend is read-only, if it is.
#[derive(Default)]
struct Health {
    failure: Option<String>,
    last_attempt: Option<Instant>,
}

impl Redb {
    /// Opens the database file, or initialises a new one when `path` does not exist.
    ///
    /// Only a missing file means "new datacenter". An existing file that is empty (0 bytes) or
    /// that redb cannot open is an error naming the file: starting fresh over it would mint a
    /// new CA, a new trust domain and an open ACL bootstrap, silently orphaning every sidecar
    /// and token of the datacenter (see `controlplane-lite snapshot restore` for recovery).
    pub fn open(path: &Path, metrics: Arc<Metrics>) -> Result<Redb> {
        let database = if path.exists() {
            open_existing(path)?
        } else {
            initialise(path)?
        };
        {
            // Create every table up front so later transactions never see a missing table.
            let mut txn = database.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                txn.open_table(META)?;
                for table in Table::ALL {
                    txn.open_table(definition(table))?;
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
        metrics.set_store_healthy(true);
        Ok(Redb {
            path: path.to_owned(),
            database: RwLock::new(Some(Arc::new(database))),
            health: Mutex::new(Health::default()),
            metrics,
        })
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
                self.health().unwrap_or_default()
            ))
        })
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

    fn commit_on(&self, database: &Database, changes: &ChangeSet) -> Result<u64, CommitError> {
        let mut txn = database.begin_write().map_err(Error::from)?;
        txn.set_durability(Durability::Immediate)
            .map_err(Error::from)?;
        {
            let mut meta = txn.open_table(META).map_err(Error::from)?;
            let current = meta
                .get(GLOBAL_INDEX_KEY)
                .map_err(Error::from)?
                .map(|v| v.value())
                .unwrap_or(0);
            if current != changes.base_index {
                // One process owns the file and the store serialises its writers, so this
                // means memory and file disagree; refuse rather than overwrite.
                return Err(CommitError::Conflict { current });
            }
            meta.insert(GLOBAL_INDEX_KEY, changes.index)
                .map_err(Error::from)?;
            for change in &changes.tables {
                meta.insert(table_index_key(change.table).as_str(), changes.index)
                    .map_err(Error::from)?;
            }
        }
        for change in &changes.tables {
            let mut handle = txn
                .open_table(definition(change.table))
                .map_err(Error::from)?;
            if change.cleared {
                handle.retain(|_, _| false).map_err(Error::from)?;
            }
            for (key, value) in &change.rows {
                match value {
                    Some(Stored::Value(value)) => {
                        let bytes = codec::encode(value)?;
                        handle
                            .insert(key.as_str(), bytes.as_slice())
                            .map_err(Error::from)?;
                    }
                    Some(Stored::Corrupt) => {
                        return Err(CommitError::Failed(Error::Internal(format!(
                            "refusing to write the corrupt record {}/{key} back",
                            change.table.name()
                        ))));
                    }
                    None => {
                        handle.remove(key.as_str()).map_err(Error::from)?;
                    }
                }
            }
        }
        txn.commit().map_err(Error::from)?;
        Ok(changes.index)
    }
}

impl Backend for Redb {
    fn load(&self) -> Result<Loaded> {
        let txn = self.handle()?.begin_read()?;
        let meta = txn.open_table(META)?;
        let index = meta.get(GLOBAL_INDEX_KEY)?.map(|v| v.value()).unwrap_or(0);
        let mut tables = Vec::with_capacity(Table::ALL.len());
        for table in Table::ALL {
            let table_index = meta
                .get(table_index_key(table).as_str())?
                .map(|v| v.value())
                .unwrap_or(0);
            let handle = txn.open_table(definition(table))?;
            let mut rows = Vec::new();
            for entry in handle.iter()? {
                let (key, value) = entry?;
                rows.push((
                    key.value().to_owned(),
                    codec::decode(table, key.value(), value.value()),
                ));
            }
            tables.push(LoadedTable {
                table,
                index: table_index,
                rows,
            });
        }
        Ok(Loaded { index, tables })
    }

    fn commit(
        &self,
        changes: &ChangeSet,
        // One process owns a redb file: it leads for as long as it runs, so there is no
        // deposed leader to fence.
        _fence: Option<&LeaderFence>,
    ) -> Result<u64, CommitError> {
        self.recover()?;
        let database = self.handle()?;
        match self.commit_on(&database, changes) {
            Err(CommitError::Failed(Error::Store(cause))) if database.begin_write().is_err() => {
                // The handle is poisoned (redb refuses any further write): remember the cause,
                // which redb's later errors no longer name.
                tracing::error!(%cause, path = %self.path.display(), "store write failed; the store is read-only until the disk takes writes again");
                self.lock_health().failure = Some(cause.clone());
                self.metrics.set_store_healthy(false);
                Err(CommitError::Failed(read_only(&cause)))
            }
            other => other,
        }
    }

    fn consistent_index(&self) -> Result<Option<u64>> {
        // One process owns the file and memory is updated on every commit before it is
        // acknowledged: memory is always current.
        Ok(None)
    }

    fn health(&self) -> Option<String> {
        self.lock_health().failure.clone()
    }

    /// In a read-only store: if the disk takes writes again, reopens the file. Otherwise, or
    /// between attempts (at most one per [`RECOVERY_INTERVAL`]), answers the read-only error.
    fn recover(&self) -> Result<()> {
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
            // Users clone the handle for the length of one call; wait for them (bounded) so
            // the old handle really closes and releases its file lock.
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
        match open_file(&self.path) {
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
}

/// redb's page cache. Reads are served from memory, so redb only reads at start (once) and
/// along the B-tree paths a commit rewrites; its default cache (up to 1 GiB, kept full of every
/// page once read) would double the agent's memory per service for nothing.
const CACHE_BYTES: usize = 16 << 20;

/// Opens an existing redb file with the store's cache size.
fn open_file(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder().set_cache_size(CACHE_BYTES).open(path)
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
    open_file(path).map_err(|e| {
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
                txn.open_table(definition(table))?;
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
    open_file(path).map_err(Error::from)
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
        let mut handle = txn.open_table(definition(table))?;
        let mut legacy = Vec::new();
        for entry in handle.iter()? {
            let (key, value) = entry?;
            if !value.value().starts_with(&VALUE_MAGIC) {
                legacy.push((key.value().to_owned(), codec::frame(value.value())));
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
