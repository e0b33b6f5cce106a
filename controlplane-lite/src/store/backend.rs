//! The storage seam: what a durable backend (redb today, etcd next) must do for [`Store`].
//!
//! [`Store`] keeps the whole state in memory and serves every read from there. A backend only
//! (1) hands over the durable state once, at start ([`Backend::load`]); (2) commits change sets
//! durably ([`Backend::commit`]); (3) reports its health. Changes committed elsewhere (another
//! agent on the same etcd cluster) reach memory through [`Store::apply`], the same path the
//! store uses for its own commits.
//!
//! ## Indexes
//! One global index orders every commit (Consul's raft index, `X-Consul-Index`). Writers stamp
//! it into the values they write (`CreateIndex`/`ModifyIndex`) *before* the commit, so the
//! index of a commit is fixed when the closure runs: `ChangeSet::index`, which is
//! `base_index + 1` unless a snapshot restore raised it. A backend commits at exactly that
//! index, or answers [`CommitError::Conflict`]:
//! - redb: a counter in its `meta` table; `base_index` always matches (writes are serialised
//!   in one process), so it never conflicts.
//! - etcd: keep the index in one key under the prefix (e.g. `<prefix>/index`, value = the
//!   decimal index) and commit in one etcd txn: `If value(<prefix>/index) == base_index`
//!   (absent when 0) `Then put <prefix>/index = index, put/delete every row`, `Else` answer
//!   `Conflict { current }` with the counter's current value. Every agent's watch then sees
//!   the counter key and the rows of one commit in one etcd revision, and calls
//!   [`Store::apply`] with the counter value as the index.
//!
//! ## Values
//! Rows are JSON values under string keys, per [`Table`]. Durable bytes use the one format of
//! [`codec`](super::codec): [`codec::encode`](super::codec::encode) to write,
//! [`codec::decode`](super::codec::decode) to read (it keeps a record whose checksum fails as
//! [`Stored::Corrupt`], which memory never serves).

use std::collections::BTreeMap;

use super::{Stored, Table};
use crate::error::{Error, Result};

/// The changes of one write transaction, as the backend commits and memory applies them.
#[derive(Clone, Debug, Default)]
pub struct ChangeSet {
    /// The global index of the memory state the transaction read. A backend must refuse the
    /// commit ([`CommitError::Conflict`]) when anything was committed after it.
    pub base_index: u64,
    /// The index this commit takes (already stamped into the values).
    pub index: u64,
    /// Every table the transaction wrote, each once, in the order first written. A table
    /// listed with no rows and `cleared == false` does not occur: listing a table is what
    /// moves its table index and wakes its blocking queries.
    pub tables: Vec<TableChange>,
}

/// The changes to one table.
#[derive(Clone, Debug)]
pub struct TableChange {
    /// The table.
    pub table: Table,
    /// Every existing row is deleted first (a snapshot restore), then `rows` apply.
    pub cleared: bool,
    /// The rows written: `Some` inserts or replaces, `None` deletes.
    pub rows: BTreeMap<String, Option<Stored>>,
}

impl TableChange {
    /// An empty change to `table`.
    pub fn new(table: Table) -> TableChange {
        TableChange {
            table,
            cleared: false,
            rows: BTreeMap::new(),
        }
    }
}

/// The whole durable state, as [`Backend::load`] hands it over.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The global index of the last commit (0 for a new store).
    pub index: u64,
    /// Per table: its index (of the last commit that wrote it) and its rows.
    pub tables: Vec<LoadedTable>,
}

/// One table of [`Loaded`].
#[derive(Debug)]
pub struct LoadedTable {
    /// The table.
    pub table: Table,
    /// The index of the last commit that wrote the table (0: never written).
    pub index: u64,
    /// Every row, in any order, decoded with [`codec::decode`](super::codec::decode).
    pub rows: Vec<(String, Stored)>,
}

/// The leadership a duty write depends on: etcd's election key bound to this agent's lease.
/// A leader's duty writes carry it, and a backend shared by several agents commits them only
/// while the key is still bound to that lease, so a deposed leader (paused past its lease, cut
/// off, or slow) cannot write a duty result after its successor's term began. A backend owned
/// by one agent (redb) ignores it: that agent leads for as long as it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderFence {
    /// The election key (`<prefix>/leader`).
    pub key: String,
    /// The lease the key must be bound to.
    pub lease: i64,
}

/// Why a commit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Another writer committed after `base_index`; nothing was written. [`Store`] waits
    /// (bounded) until memory has applied `current`, then runs the transaction again.
    #[error("conflict: the store is at index {current}")]
    Conflict {
        /// The backend's index when it refused.
        current: u64,
    },
    /// The commit failed; nothing was written (or, if unknown, the backend is unhealthy and
    /// says so in [`Backend::health`]). The error goes to the client as is.
    #[error(transparent)]
    Failed(#[from] Error),
    /// The write carried a [`LeaderFence`] and the election key is no longer bound to its
    /// lease: this agent no longer leads; nothing was written.
    #[error("fenced: this agent no longer holds the leadership its write depended on (the election key is bound to lease {holder}, not {ours})")]
    Fenced {
        /// The lease the election key is bound to now (0: nobody holds it).
        holder: i64,
        /// The lease the write depended on.
        ours: i64,
    },
}

/// A durable store behind [`Store`]. Implementations are blocking (the store calls them from
/// blocking threads) and must be safe to call from several threads.
pub trait Backend: Send + Sync {
    /// Reads the whole durable state; called once, when the store opens.
    fn load(&self) -> Result<Loaded>;

    /// Commits `changes` durably and atomically at `changes.index` and returns that index.
    /// Returns only once the commit survives a crash (the write is acknowledged after it).
    /// Must not touch memory: the store applies the change set itself afterwards.
    ///
    /// With a `fence` (a leader's duty write), a backend shared by several agents commits only
    /// if the fence's key is still bound to its lease, in the same atomic step, and answers
    /// [`CommitError::Fenced`] otherwise; a backend owned by one agent ignores it.
    fn commit(&self, changes: &ChangeSet, fence: Option<&LeaderFence>) -> Result<u64, CommitError>;

    /// For a linearizable (`?consistent`) read: the index memory must have applied before the
    /// read is served, or `None` when memory is always current (one process owns the store).
    /// An etcd backend asks the cluster for its current index (a quorum read) and fails if
    /// it cannot reach it, so an isolated agent never serves a stale "consistent" read.
    fn consistent_index(&self) -> Result<Option<u64>>;

    /// `Some(cause)` while the backend refuses writes (read-only after a disk error,
    /// unreachable cluster), for health endpoints and `controlplane_store_healthy`.
    fn health(&self) -> Option<String>;

    /// Tries to leave the unhealthy state (rate-limited by the backend); `Ok` when healthy.
    /// Writes call it first; the agent also calls it on a timer.
    fn recover(&self) -> Result<()>;
}
