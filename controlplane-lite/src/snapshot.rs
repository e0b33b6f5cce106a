//! Backups of the whole store: the file format of `GET|PUT /v1/snapshot` and
//! `controlplane-lite snapshot save|restore` (Consul's `consul snapshot`).
//!
//! A snapshot is one header line and a JSON body:
//!
//! ```text
//! controlplane-lite-snapshot 1 sha256=<64 hex digits> length=<body bytes>\n
//! {"Version":1,"Datacenter":"dc1","Index":42,"Tables":{"acl_tokens":{"<key>":<value>,…},…}}
//! ```
//!
//! The checksum covers the body, so a truncated or altered file is refused before anything is
//! restored. The body is a logical copy (every row of every table, read in one transaction), not
//! the redb file, so it survives changes of the on-disk format. It holds the CA private keys and
//! every token secret: the endpoints need a management-level token and the CLI writes it `0600`.
//!
//! Restoring replaces every table in one write transaction: either the whole snapshot is in the
//! store afterwards or none of it is. The restore commits at an index above both the store's and
//! the snapshot's, so `X-Consul-Index` stays monotonic and every blocking query wakes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::store::{Store, Table};

/// The first word of a snapshot file.
pub const MAGIC: &str = "controlplane-lite-snapshot";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// The largest snapshot accepted (header and body); far above any realistic store of a
/// single-agent datacenter, and a bound on what one request may make the agent buffer.
pub const MAX_SNAPSHOT_BYTES: usize = 256 << 20;
/// The longest header line accepted.
const MAX_HEADER_BYTES: usize = 256;

/// Why a snapshot file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The first line is not a snapshot header this build understands.
    #[error("not a controlplane-lite snapshot (bad header: {0})")]
    Header(String),
    /// The body is shorter or longer than the header says (a truncated file).
    #[error("snapshot body is {actual} bytes but the header says {expected} (truncated?)")]
    Length {
        /// What the header says.
        expected: usize,
        /// What the file holds.
        actual: usize,
    },
    /// The body's SHA-256 is not the header's.
    #[error("snapshot checksum mismatch: header sha256={expected}, body sha256={actual}")]
    Checksum {
        /// What the header says.
        expected: String,
        /// What the body hashes to.
        actual: String,
    },
    /// The body is not a snapshot document.
    #[error("snapshot body is invalid: {0}")]
    Body(String),
    /// The snapshot is over [`MAX_SNAPSHOT_BYTES`].
    #[error("snapshot is over {MAX_SNAPSHOT_BYTES} bytes")]
    TooLarge,
}

impl From<SnapshotError> for Error {
    fn from(error: SnapshotError) -> Error {
        Error::BadRequest(error.to_string())
    }
}

/// The document inside a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`VERSION`].
    #[serde(rename = "Version")]
    pub version: u32,
    /// The datacenter the snapshot was taken in (informational).
    #[serde(rename = "Datacenter")]
    pub datacenter: String,
    /// The store's global index when the snapshot was taken.
    #[serde(rename = "Index")]
    pub index: u64,
    /// Table name → key → value.
    #[serde(rename = "Tables")]
    pub tables: BTreeMap<String, BTreeMap<String, Value>>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Serialises a snapshot into the file format.
pub fn encode(snapshot: &Snapshot) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(snapshot).map_err(|e| Error::Internal(e.to_string()))?;
    let header = format!(
        "{MAGIC} {VERSION} sha256={} length={}\n",
        sha256_hex(&body),
        body.len()
    );
    let mut out = Vec::with_capacity(header.len() + body.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    if out.len() > MAX_SNAPSHOT_BYTES {
        return Err(Error::Store(SnapshotError::TooLarge.to_string()));
    }
    Ok(out)
}

/// Parses and verifies a snapshot file: header, length, checksum, then the document.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    if bytes.len() > MAX_SNAPSHOT_BYTES {
        return Err(SnapshotError::TooLarge);
    }
    let newline = bytes
        .iter()
        .take(MAX_HEADER_BYTES)
        .position(|b| *b == b'\n')
        .ok_or_else(|| SnapshotError::Header("no header line".to_owned()))?;
    let (header, body) = (&bytes[..newline], &bytes[newline + 1..]);
    let header =
        std::str::from_utf8(header).map_err(|_| SnapshotError::Header("not UTF-8".to_owned()))?;
    let fields: Vec<&str> = header.split(' ').collect();
    let [magic, version, checksum, length] = fields.as_slice() else {
        return Err(SnapshotError::Header(header.to_owned()));
    };
    if *magic != MAGIC {
        return Err(SnapshotError::Header(header.to_owned()));
    }
    if *version != VERSION.to_string() {
        return Err(SnapshotError::Header(format!(
            "version {version}; this build reads version {VERSION}"
        )));
    }
    let expected_checksum = checksum
        .strip_prefix("sha256=")
        .ok_or_else(|| SnapshotError::Header(header.to_owned()))?;
    let expected_length: usize = length
        .strip_prefix("length=")
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| SnapshotError::Header(header.to_owned()))?;
    if body.len() != expected_length {
        return Err(SnapshotError::Length {
            expected: expected_length,
            actual: body.len(),
        });
    }
    let actual = sha256_hex(body);
    if actual != expected_checksum {
        return Err(SnapshotError::Checksum {
            expected: expected_checksum.to_owned(),
            actual,
        });
    }
    let snapshot: Snapshot =
        serde_json::from_slice(body).map_err(|e| SnapshotError::Body(e.to_string()))?;
    if snapshot.version != VERSION {
        return Err(SnapshotError::Body(format!(
            "document version {}",
            snapshot.version
        )));
    }
    if let Some(unknown) = snapshot
        .tables
        .keys()
        .find(|name| Table::from_name(name).is_none())
    {
        return Err(SnapshotError::Body(format!("unknown table {unknown:?}")));
    }
    Ok(snapshot)
}

/// Reads the whole store into a snapshot (one read transaction, so it is consistent).
pub fn capture(store: &Store, datacenter: &str) -> Result<Snapshot> {
    let (index, tables) = store.dump()?;
    Ok(Snapshot {
        version: VERSION,
        datacenter: datacenter.to_owned(),
        index,
        tables: tables
            .into_iter()
            .map(|(table, rows)| (table.name().to_owned(), rows.into_iter().collect()))
            .collect(),
    })
}

/// Replaces the whole store with `snapshot` in one durable write transaction; returns the
/// index the restore committed at. Tables the snapshot does not name end up empty.
pub fn restore(store: &Store, snapshot: &Snapshot) -> Result<u64> {
    store.write(|tx| {
        tx.raise_index_past(snapshot.index);
        for table in Table::ALL {
            tx.clear(table)?;
            if let Some(rows) = snapshot.tables.get(table.name()) {
                for (key, value) in rows {
                    tx.put(table, key, value)?;
                }
            }
        }
        Ok(tx.index())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut tables = BTreeMap::new();
        tables.insert(
            "intentions".to_owned(),
            BTreeMap::from([("i1".to_owned(), serde_json::json!({"SourceName": "web"}))]),
        );
        Snapshot {
            version: VERSION,
            datacenter: "dc1".to_owned(),
            index: 7,
            tables,
        }
    }

    #[test]
    fn round_trips_and_refuses_changed_or_truncated_files() {
        let bytes = encode(&sample()).expect("encode");
        assert_eq!(decode(&bytes).expect("decode"), sample());
        let mut flipped = bytes.clone();
        let at = flipped.len() - 5;
        flipped[at] ^= 0x01;
        assert!(matches!(
            decode(&flipped),
            Err(SnapshotError::Checksum { .. })
        ));
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(SnapshotError::Length { .. })
        ));
        assert!(matches!(
            decode(b"{\"Version\":1}"),
            Err(SnapshotError::Header(_))
        ));
    }

    #[test]
    fn restore_replaces_every_table_atomically_above_both_indexes() {
        let dir = crate::testutil::TempDir::new("snapshot");
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
        let store = Store::open(&dir.path().join("state.redb"), metrics).expect("open");
        store
            .write(|tx| tx.put(Table::Services, "s1", &serde_json::json!({"ID": "s1"})))
            .expect("write");
        let restored_at = restore(&store, &sample()).expect("restore");
        assert_eq!(restored_at, 8, "above the snapshot's index 7");
        assert_eq!(store.index(Table::Services), 8, "cleared tables wake too");
        assert!(store
            .get::<Value>(Table::Services, "s1")
            .expect("get")
            .is_none());
        let value: Option<Value> = store.get(Table::Intentions, "i1").expect("get");
        assert_eq!(value, Some(serde_json::json!({"SourceName": "web"})));
        let again = capture(&store, "dc1").expect("capture");
        assert_eq!(
            again.tables.get("intentions"),
            sample().tables.get("intentions")
        );
    }
}
