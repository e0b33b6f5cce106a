//! Applying a full snapshot of one replicated table (sans-IO diff, then one store transaction).
//!
//! The primary always sends the whole table, so applying is idempotent and needs no history:
//! rows that differ are written, rows the primary no longer has are deleted, equal rows are left
//! alone (so a repeated snapshot does not even take a new index). Local-only rows (local ACL
//! tokens) are never touched.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Kind;
use crate::error::Result;
use crate::store::Transaction;

/// One row of a replicated table as it travels: `{"Key": …, "Value": …}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Entry {
    /// The store key.
    pub key: String,
    /// The stored JSON value, verbatim.
    pub value: Value,
}

/// The body of `GET /v1/internal/replication/:kind`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct TableSnapshot {
    /// The table's index in the primary (also `X-Consul-Index`).
    pub index: u64,
    /// Every replicated row, in key order.
    pub entries: Vec<Entry>,
}

/// One change to the local table.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Insert or replace.
    Put(String, Value),
    /// Delete.
    Delete(String),
}

/// The changes that make `local` equal `remote`, leaving local-only rows of `kind` alone.
pub fn plan(kind: Kind, local: &BTreeMap<String, Value>, remote: &[Entry]) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut wanted: BTreeMap<&str, &Value> = BTreeMap::new();
    for entry in remote {
        if !kind.is_local_only(&entry.value) {
            wanted.insert(&entry.key, &entry.value);
        }
    }
    for (key, value) in &wanted {
        if local.get(*key) != Some(*value) {
            changes.push(Change::Put((*key).to_owned(), (*value).clone()));
        }
    }
    for (key, value) in local {
        if !wanted.contains_key(key.as_str()) && !kind.is_local_only(value) {
            changes.push(Change::Delete(key.clone()));
        }
    }
    changes
}

/// Applies `remote` to the table of `kind` inside `tx`; returns how many rows changed.
pub fn apply(tx: &mut Transaction<'_>, kind: Kind, remote: &[Entry]) -> Result<usize> {
    let table = kind.table();
    let local: BTreeMap<String, Value> = tx.entries(table)?.into_iter().collect();
    let changes = plan(kind, &local, remote);
    for change in &changes {
        match change {
            Change::Put(key, value) => tx.put(table, key, value)?,
            Change::Delete(key) => {
                tx.delete(table, key)?;
            }
        }
    }
    Ok(changes.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(key: &str, value: Value) -> Entry {
        Entry {
            key: key.to_owned(),
            value,
        }
    }

    #[test]
    fn plan_is_a_minimal_diff_that_spares_local_tokens() {
        let local: BTreeMap<String, Value> = [
            ("same".to_owned(), json!({"Local": false, "X": 1})),
            ("changed".to_owned(), json!({"Local": false, "X": 1})),
            ("gone".to_owned(), json!({"Local": false})),
            ("mine".to_owned(), json!({"Local": true})),
        ]
        .into();
        let remote = [
            entry("same", json!({"Local": false, "X": 1})),
            entry("changed", json!({"Local": false, "X": 2})),
            entry("new", json!({"Local": false})),
            entry("theirs", json!({"Local": true})),
        ];
        let changes = plan(Kind::AclTokens, &local, &remote);
        assert_eq!(
            changes,
            vec![
                Change::Put("changed".into(), json!({"Local": false, "X": 2})),
                Change::Put("new".into(), json!({"Local": false})),
                Change::Delete("gone".into()),
            ]
        );
        // Other kinds have no local-only rows.
        assert!(plan(Kind::Intentions, &local, &remote).contains(&Change::Delete("mine".into())));
        // Applying the plan and planning again gives nothing: idempotent.
        let mut after = local.clone();
        for change in changes {
            match change {
                Change::Put(k, v) => {
                    after.insert(k, v);
                }
                Change::Delete(k) => {
                    after.remove(&k);
                }
            }
        }
        assert!(plan(Kind::AclTokens, &after, &remote).is_empty());
    }
}
