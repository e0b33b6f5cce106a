//! The in-memory state every read is served from: per table an ordered map from key to the
//! decoded value and the index of the commit that wrote it, plus the table indexes. It changes
//! only through [`Memory::apply`], for local and remote commits alike.

use std::collections::BTreeMap;

use super::backend::{ChangeSet, Loaded};
use super::{Stored, Table};

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
}

impl Memory {
    /// Memory holding what a backend loaded.
    pub fn new(loaded: Loaded) -> Memory {
        let mut memory = Memory {
            tables: vec![BTreeMap::new(); Table::ALL.len()],
            table_indexes: vec![0; Table::ALL.len()],
            applied: loaded.index,
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
        }
        memory
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
            let slot = change.table.position();
            let rows = &mut self.tables[slot];
            if change.cleared {
                rows.clear();
            }
            for (key, value) in &change.rows {
                match value {
                    Some(value) => {
                        rows.insert(
                            key.clone(),
                            Record {
                                value: value.clone(),
                                index,
                            },
                        );
                    }
                    None => {
                        rows.remove(key);
                    }
                }
            }
            self.table_indexes[slot] = index;
        }
        self.applied = index;
        true
    }
}
