//! The etcd backend: several agents of one datacenter share one etcd cluster
//! (`agent -store etcd -etcd-endpoints URL,URL,URL [-etcd-prefix /meshgw/<dc>]`).
//!
//! ## Layout under the prefix `P`
//! - `P/index`: the global index (decimal), Consul's raft index: `X-Consul-Index`,
//!   `CreateIndex`/`ModifyIndex`.
//! - `P/tindex/<table>`: the index of the last commit that wrote the table.
//! - `P/t/<table>/<key>`: one row, in the checksummed format of [`codec`].
//! - `P/leader`, `P/agents/…`: the election ([`crate::leader`]); not state.
//!
//! ## Commits
//! One write is one etcd transaction: `If value(P/index) == base_index Then put P/index,
//! the table indexes and every row Else get P/index`. The global index therefore moves by
//! exactly one per commit, in etcd's commit order, and a writer that raced another gets
//! [`CommitError::Conflict`] and runs again on current memory (this is also what makes
//! `?cas=` a compare-and-swap across agents: the check runs on memory at `base_index` and the
//! transaction fails if anything was committed since). The index is a counter in etcd rather
//! than etcd's own revision because writers stamp `ModifyIndex` into values *before* the
//! commit, and etcd's revision also moves for keys that are not state (leases, the election).
//! A write is acknowledged only after etcd answered the transaction, i.e. after a quorum
//! committed it. A transaction that times out has an unknown outcome: the client gets an
//! error, and if it did commit, every agent applies it from the watch.
//!
//! ## Reads
//! Every agent follows `P/` with one etcd watch from the revision it loaded, and applies each
//! commit to memory through [`Store::apply`](super::Store::apply): blocking queries on any
//! agent wake on a write made through any other. `?consistent` asks etcd for `P/index` with a
//! quorum (linearizable) read and waits until memory has applied it; a default read is served
//! from memory while the agent reaches etcd; `?stale` is always served from memory. An agent
//! that cannot reach a quorum (write or probe failed, watch cancelled for "no leader") is
//! unhealthy ([`Backend::health`]): it refuses writes and default and `?consistent` reads
//! with a 503 that says so, and answers `?stale` reads from its last state.
//!
//! The etcd client is async; the [`Backend`] trait is blocking. The backend owns a small
//! runtime of its own and waits for each call on a channel with a deadline, so it may be
//! called from any thread, even one of the agent's async workers.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, TxnOpResponse};

use super::backend::{
    Backend, ChangeSet, CommitError, LeaderFence, Loaded, LoadedTable, TableChange,
};
use super::{codec, Stored, Table};
use crate::error::{Error, Result};

/// The bound on one etcd call (a commit, a quorum read).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows per page when loading (etcd's and gRPC's message limits stay far away).
const PAGE: i64 = 500;
/// The pause before the watch is opened again after it broke.
const WATCH_RETRY: Duration = Duration::from_millis(200);

/// The keys of one datacenter's state under `-etcd-prefix`.
#[derive(Clone, Debug)]
pub struct DataKeys {
    prefix: String,
}

impl DataKeys {
    /// The keys under `prefix` (a trailing `/` is ignored).
    pub fn new(prefix: &str) -> DataKeys {
        DataKeys {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    fn index(&self) -> String {
        format!("{}/index", self.prefix)
    }

    fn table_index(&self, table: Table) -> String {
        format!("{}/tindex/{}", self.prefix, table.name())
    }

    fn table_rows(&self, table: Table) -> String {
        format!("{}/t/{}/", self.prefix, table.name())
    }

    fn row(&self, table: Table, key: &str) -> String {
        format!("{}/t/{}/{key}", self.prefix, table.name())
    }

    /// What a key under the prefix is. Sans-IO.
    fn classify<'k>(&self, key: &'k str) -> Option<KeyKind<'k>> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        if rest == "index" {
            return Some(KeyKind::Index);
        }
        if let Some(name) = rest.strip_prefix("tindex/") {
            return Table::from_name(name).map(KeyKind::TableIndex);
        }
        let (name, row) = rest.strip_prefix("t/")?.split_once('/')?;
        Table::from_name(name).map(|t| KeyKind::Row(t, row))
    }
}

/// A state key, parsed.
#[derive(Debug, PartialEq, Eq)]
enum KeyKind<'k> {
    Index,
    TableIndex(Table),
    Row(Table, &'k str),
}

/// The smallest key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn parse_index(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Health shared by the backend and its watch follower: `Some(cause)` while the agent cannot
/// count on reaching a quorum.
type Health = Arc<Mutex<Option<String>>>;

fn set_unhealthy(health: &Health, cause: String) {
    let mut slot = health.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_none() {
        tracing::warn!(%cause, "etcd unreachable: refusing writes and non-stale reads");
    }
    *slot = Some(cause);
}

fn set_healthy(health: &Health) {
    let mut slot = health.lock().unwrap_or_else(|p| p.into_inner());
    if slot.take().is_some() {
        tracing::info!("etcd reachable again");
    }
}

/// The etcd backend of a [`Store`](super::Store).
pub struct EtcdBackend {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    client: etcd_client::Client,
    keys: DataKeys,
    health: Health,
    /// The etcd revision [`Backend::load`] read at; the follower watches from the next one.
    loaded_revision: Arc<Mutex<i64>>,
}

/// Follows the cluster's commits into memory ([`Follower::start`]).
pub struct Follower {
    handle: tokio::runtime::Handle,
    client: etcd_client::Client,
    keys: DataKeys,
    health: Health,
    loaded_revision: Arc<Mutex<i64>>,
}

impl EtcdBackend {
    /// Connects to the cluster (bounded by `timeout`). Blocking.
    pub fn connect(
        endpoints: &[crate::etcd::Endpoint],
        prefix: &str,
        timeout: Duration,
    ) -> Result<(EtcdBackend, Follower)> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-io")
            .enable_all()
            .build()
            .map_err(|e| Error::Startup(format!("etcd runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let endpoints = endpoints.to_vec();
        let client = call(&handle, timeout + Duration::from_secs(1), async move {
            crate::etcd::connect(&endpoints, timeout).await
        })?
        .map_err(|e| Error::Startup(e.to_string()))?;
        let keys = DataKeys::new(prefix);
        let health = Health::default();
        let loaded_revision = Arc::new(Mutex::new(0));
        let follower = Follower {
            handle: handle.clone(),
            client: client.clone(),
            keys: keys.clone(),
            health: health.clone(),
            loaded_revision: loaded_revision.clone(),
        };
        Ok((
            EtcdBackend {
                runtime: Some(runtime),
                handle,
                client,
                keys,
                health,
                loaded_revision,
            },
            follower,
        ))
    }

    fn unreachable(&self, what: &str, cause: impl std::fmt::Display) -> Error {
        let cause = format!("etcd: {what}: {cause}");
        set_unhealthy(&self.health, cause.clone());
        Error::Unavailable(format!(
            "{cause}; this agent cannot reach an etcd quorum and refuses writes (reads with ?stale are answered from its last state)"
        ))
    }

    /// The global index by a quorum read.
    fn quorum_index(&self) -> Result<u64> {
        let mut client = self.client.clone();
        let key = self.keys.index();
        let answer = call(&self.handle, CALL_TIMEOUT, async move {
            client.get(key, None).await
        })?
        .map_err(|e| self.unreachable("quorum read", e))?;
        Ok(answer
            .kvs()
            .first()
            .and_then(|kv| parse_index(kv.value()))
            .unwrap_or(0))
    }
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        // Never blocks, so the store may be dropped from async code.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs `future` on the backend's runtime and waits for it, at most `timeout`. Works from any
/// thread: the caller only blocks on a channel.
fn call<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    timeout: Duration,
    future: impl Future<Output = T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(tokio::time::timeout(timeout, future).await);
    });
    match rx.recv_timeout(timeout + Duration::from_secs(1)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) | Err(_) => Err(Error::Unavailable(format!(
            "etcd: no answer within {timeout:?}; this agent cannot reach an etcd quorum and refuses writes (reads with ?stale are answered from its last state)"
        ))),
    }
}

impl Backend for EtcdBackend {
    fn load(&self) -> Result<Loaded> {
        let mut client = self.client.clone();
        let keys = self.keys.clone();
        let pages = call(&self.handle, CALL_TIMEOUT * 4, async move {
            // Page through the prefix at one revision: a consistent snapshot of any size.
            let start = keys.all();
            let end = prefix_end(&start);
            let mut from = start.into_bytes();
            let mut revision = 0;
            let mut out = Vec::new();
            loop {
                let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
                if revision != 0 {
                    options = options.with_revision(revision);
                }
                let answer = client.get(from.clone(), Some(options)).await?;
                if revision == 0 {
                    revision = answer.header().map_or(0, |h| h.revision());
                }
                let kvs = answer.kvs();
                for kv in kvs {
                    out.push((kv.key().to_vec(), kv.value().to_vec()));
                }
                match kvs.last() {
                    Some(last) if answer.more() => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => break,
                }
            }
            Ok::<_, etcd_client::Error>((revision, out))
        })?;
        let (revision, pairs) = pages.map_err(|e| Error::Startup(format!("etcd: load: {e}")))?;
        *self
            .loaded_revision
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = revision;
        let mut loaded = Loaded::default();
        let mut tables: BTreeMap<usize, LoadedTable> = BTreeMap::new();
        let slot = |tables: &mut BTreeMap<usize, LoadedTable>, t: Table| {
            tables.entry(t.position()).or_insert_with(|| LoadedTable {
                table: t,
                index: 0,
                rows: Vec::new(),
            });
            t.position()
        };
        for (key, value) in &pairs {
            let Ok(key) = std::str::from_utf8(key) else {
                continue;
            };
            match self.keys.classify(key) {
                Some(KeyKind::Index) => loaded.index = parse_index(value).unwrap_or(0),
                Some(KeyKind::TableIndex(t)) => {
                    let position = slot(&mut tables, t);
                    if let Some(table) = tables.get_mut(&position) {
                        table.index = parse_index(value).unwrap_or(0);
                    }
                }
                Some(KeyKind::Row(t, row)) => {
                    let position = slot(&mut tables, t);
                    if let Some(table) = tables.get_mut(&position) {
                        table
                            .rows
                            .push((row.to_owned(), codec::decode(t, row, value)));
                    }
                }
                None => {}
            }
        }
        loaded.tables = tables.into_values().collect();
        tracing::info!(
            index = loaded.index,
            revision,
            prefix = %self.keys.prefix,
            "loaded the datacenter's state from etcd"
        );
        Ok(loaded)
    }

    fn commit(&self, changes: &ChangeSet, fence: Option<&LeaderFence>) -> Result<u64, CommitError> {
        let keys = self.keys.clone();
        let index = changes.index.to_string();
        let mut ops = vec![TxnOp::put(keys.index(), index.as_str(), None)];
        let mut cleared = Vec::new();
        for change in &changes.tables {
            ops.push(TxnOp::put(
                keys.table_index(change.table),
                index.as_str(),
                None,
            ));
            if change.cleared {
                cleared.push(change);
            }
            for (key, row) in &change.rows {
                let row_key = keys.row(change.table, key);
                match row {
                    Some(Stored::Value(value)) => {
                        ops.push(TxnOp::put(row_key, codec::encode(value)?, None));
                    }
                    Some(Stored::Corrupt) => {
                        return Err(CommitError::Failed(Error::Internal(format!(
                            "a write carried the corrupt record {}/{key}",
                            change.table.name()
                        ))));
                    }
                    None => ops.push(TxnOp::delete(row_key, None)),
                }
            }
        }
        // A cleared table (snapshot restore): etcd refuses a delete-range and a put of a key
        // inside it in one transaction, so every existing row not written again is deleted
        // by name. The rows are read first; the index comparison makes the pair atomic.
        let to_clear: Vec<(Table, String, Vec<String>)> = cleared
            .iter()
            .map(|c| {
                let kept = c
                    .rows
                    .iter()
                    .filter(|(_, v)| v.is_some())
                    .map(|(k, _)| keys.row(c.table, k))
                    .collect();
                (c.table, keys.table_rows(c.table), kept)
            })
            .collect();
        let compare = if changes.base_index == 0 {
            Compare::create_revision(keys.index(), CompareOp::Equal, 0)
        } else {
            Compare::value(
                keys.index(),
                CompareOp::Equal,
                changes.base_index.to_string(),
            )
        };
        // A leader's duty write also requires the election key to be bound to its lease, in the
        // same transaction: a deposed leader's write is refused by etcd itself.
        let mut compares = vec![compare];
        let mut otherwise = vec![TxnOp::get(keys.index(), None)];
        if let Some(fence) = fence {
            compares.push(Compare::lease(
                fence.key.as_str(),
                CompareOp::Equal,
                fence.lease,
            ));
            otherwise.push(TxnOp::get(fence.key.as_str(), None));
        }
        let mut client = self.client.clone();
        let answer = call(&self.handle, CALL_TIMEOUT, async move {
            for (_, rows_prefix, kept) in &to_clear {
                let options = GetOptions::new().with_prefix().with_keys_only();
                let existing = client.get(rows_prefix.as_str(), Some(options)).await?;
                for kv in existing.kvs() {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    if !kept.contains(&key) {
                        ops.push(TxnOp::delete(key, None));
                    }
                }
            }
            let txn = Txn::new().when(compares).and_then(ops).or_else(otherwise);
            client.txn(txn).await
        })
        .map_err(|_| {
            // The transaction may still be in a member's queue and commit once a quorum
            // answers, so the caller hears that the outcome is unknown, not that the write
            // was refused (Consul's own raft-apply timeout is as ambiguous).
            let cause = format!("etcd: no answer to this write within {CALL_TIMEOUT:?}");
            set_unhealthy(&self.health, cause.clone());
            CommitError::Failed(Error::Unavailable(format!(
                "{cause}: its outcome is unknown (it may still be applied); read with ?consistent to learn it"
            )))
        })?
        .map_err(|e| CommitError::Failed(self.unreachable("commit", e)))?;
        set_healthy(&self.health);
        if answer.succeeded() {
            return Ok(changes.index);
        }
        let gets: Vec<_> = answer
            .op_responses()
            .into_iter()
            .filter_map(|op| match op {
                TxnOpResponse::Get(get) => Some(get),
                _ => None,
            })
            .collect();
        if let Some(fence) = fence {
            // The second get is the election key's: a missing key (0) or another lease means
            // this agent no longer leads, whatever the index did.
            let holder = gets
                .get(1)
                .and_then(|get| get.kvs().first())
                .map_or(0, |kv| kv.lease());
            if holder != fence.lease {
                return Err(CommitError::Fenced {
                    holder,
                    ours: fence.lease,
                });
            }
        }
        let current = gets
            .first()
            .and_then(|get| get.kvs().first())
            .and_then(|kv| parse_index(kv.value()))
            .unwrap_or(0);
        Err(CommitError::Conflict { current })
    }

    fn consistent_index(&self) -> Result<Option<u64>> {
        let index = self.quorum_index()?;
        set_healthy(&self.health);
        Ok(Some(index))
    }

    fn health(&self) -> Option<String> {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn recover(&self) -> Result<()> {
        self.quorum_index()?;
        set_healthy(&self.health);
        Ok(())
    }
}

/// The commits in one watch response, in order, as change sets. Events that are not a commit
/// (the election's keys, a revision without `P/index`) are skipped. Sans-IO.
fn change_sets(keys: &DataKeys, events: &[(i64, bool, Vec<u8>, Vec<u8>)]) -> Vec<(i64, ChangeSet)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < events.len() {
        let revision = events[i].0;
        let mut index = None;
        let mut tables: Vec<TableChange> = Vec::new();
        let touch = |tables: &mut Vec<TableChange>, t: Table| -> usize {
            if let Some(position) = tables.iter().position(|c| c.table == t) {
                position
            } else {
                tables.push(TableChange::new(t));
                tables.len() - 1
            }
        };
        while i < events.len() && events[i].0 == revision {
            let (_, is_put, key, value) = &events[i];
            i += 1;
            let Ok(key) = std::str::from_utf8(key) else {
                continue;
            };
            match keys.classify(key) {
                Some(KeyKind::Index) if *is_put => index = parse_index(value),
                Some(KeyKind::TableIndex(t)) => {
                    touch(&mut tables, t);
                }
                Some(KeyKind::Row(t, row)) => {
                    let position = touch(&mut tables, t);
                    let stored = is_put.then(|| codec::decode(t, row, value));
                    tables[position].rows.insert(row.to_owned(), stored);
                }
                _ => {}
            }
        }
        if let Some(index) = index {
            out.push((
                revision,
                ChangeSet {
                    base_index: index.saturating_sub(1),
                    index,
                    tables,
                },
            ));
        }
    }
    out
}

/// Resolves when `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

impl Follower {
    /// Follows the cluster from the revision the backend loaded, handing each commit to
    /// `apply` (the store's one path into memory), until `shutdown` turns true. A broken watch
    /// marks the agent unhealthy and is opened again from the next revision not yet applied.
    pub fn start(
        self,
        apply: impl Fn(&ChangeSet) + Send + Sync + 'static,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let Follower {
            handle,
            mut client,
            keys,
            health,
            loaded_revision,
        } = self;
        let mut next = *loaded_revision.lock().unwrap_or_else(|p| p.into_inner()) + 1;
        handle.spawn(async move {
            loop {
                let stopping = *shutdown.borrow();
                if stopping {
                    return;
                }
                let options = etcd_client::WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(next);
                let mut stream = tokio::select! {
                    opened = client.watch(keys.all(), Some(options)) => match opened {
                        Ok(stream) => stream,
                        Err(error) => {
                            set_unhealthy(&health, format!("etcd: watch: {error}"));
                            tokio::time::sleep(WATCH_RETRY).await;
                            continue;
                        }
                    },
                    () = stopped(&mut shutdown) => return,
                };
                loop {
                    let message = tokio::select! {
                        message = stream.message() => message,
                        () = stopped(&mut shutdown) => return,
                    };
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => {
                            set_unhealthy(&health, "etcd: the watch ended".to_owned());
                            break;
                        }
                        Err(error) => {
                            set_unhealthy(&health, format!("etcd: watch: {error}"));
                            break;
                        }
                    };
                    if response.canceled() {
                        set_unhealthy(
                            &health,
                            format!("etcd: watch cancelled: {}", response.cancel_reason()),
                        );
                        break;
                    }
                    let events: Vec<(i64, bool, Vec<u8>, Vec<u8>)> = response
                        .events()
                        .iter()
                        .filter_map(|event| {
                            let kv = event.kv()?;
                            Some((
                                kv.mod_revision(),
                                event.event_type() == EventType::Put,
                                kv.key().to_vec(),
                                kv.value().to_vec(),
                            ))
                        })
                        .collect();
                    for (revision, changes) in change_sets(&keys, &events) {
                        apply(&changes);
                        next = next.max(revision + 1);
                    }
                    if let Some(last) = events.last() {
                        next = next.max(last.0 + 1);
                    }
                }
                tokio::time::sleep(WATCH_RETRY).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_state_keys_and_skips_the_election() {
        let keys = DataKeys::new("/meshgw/dc1/");
        assert_eq!(keys.classify("/meshgw/dc1/index"), Some(KeyKind::Index));
        assert_eq!(
            keys.classify(&keys.table_index(Table::Intentions)),
            Some(KeyKind::TableIndex(Table::Intentions))
        );
        assert_eq!(
            keys.classify(&keys.row(Table::Services, "web/1")),
            Some(KeyKind::Row(Table::Services, "web/1"))
        );
        assert_eq!(keys.classify("/meshgw/dc1/leader"), None);
        assert_eq!(keys.classify("/meshgw/dc1/agents/a"), None);
        assert_eq!(keys.classify("/meshgw/dc10/index"), None);
        assert_eq!(keys.classify("/meshgw/dc1/t/nosuchtable/x"), None);
    }

    #[test]
    fn the_prefix_end_is_the_next_key() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn a_watch_response_becomes_one_change_set_per_commit() {
        let keys = DataKeys::new("/p");
        let value = codec::encode(&serde_json::json!({"ID": "x"})).expect("encode");
        let put = |rev, key: String, v: &[u8]| (rev, true, key.into_bytes(), v.to_vec());
        let events = vec![
            put(10, keys.index(), b"4"),
            put(10, keys.table_index(Table::Intentions), b"4"),
            put(10, keys.row(Table::Intentions, "x"), &value),
            // The election is not state.
            put(11, "/p/leader".to_owned(), b"a"),
            put(12, keys.index(), b"5"),
            put(12, keys.table_index(Table::Intentions), b"5"),
            (
                12,
                false,
                keys.row(Table::Intentions, "x").into_bytes(),
                Vec::new(),
            ),
        ];
        let sets = change_sets(&keys, &events);
        assert_eq!(sets.len(), 2);
        let (revision, first) = &sets[0];
        assert_eq!((*revision, first.base_index, first.index), (10, 3, 4));
        assert_eq!(first.tables.len(), 1);
        assert!(matches!(
            first.tables[0].rows.get("x"),
            Some(Some(Stored::Value(_)))
        ));
        let (revision, second) = &sets[1];
        assert_eq!((*revision, second.index), (12, 5));
        assert!(matches!(second.tables[0].rows.get("x"), Some(None)));
    }
}
