//! How a value is stored durably: compact JSON framed with a marker and a checksum. One home for
//! the format, used by every backend (and by the redb migration of older files).

use std::sync::Arc;

use serde_json::Value;

use super::{Stored, Table};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// The first bytes of every stored value: a marker no JSON text starts with, then the format
/// version. What follows is [`DIGEST_LEN`] bytes of the SHA-256 of the JSON, then the JSON.
pub(crate) const VALUE_MAGIC: [u8; 2] = [0xC5, 0x01];
/// How much of the SHA-256 each value carries: 64 bits make a random change that still
/// matches a 2^-64 event, at 10 bytes of overhead per record.
const DIGEST_LEN: usize = 8;
const HEADER_LEN: usize = VALUE_MAGIC.len() + DIGEST_LEN;

fn digest(json: &[u8]) -> [u8; DIGEST_LEN] {
    let full = ring::digest::digest(&ring::digest::SHA256, json);
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(&full.as_ref()[..DIGEST_LEN]);
    out
}

/// Frames JSON bytes with the marker and their checksum.
pub(crate) fn frame(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + json.len());
    out.extend_from_slice(&VALUE_MAGIC);
    out.extend_from_slice(&digest(json));
    out.extend_from_slice(json);
    out
}

/// The durable bytes of one value.
pub fn encode(value: &Value) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(value).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(frame(&json))
}

/// The JSON inside a stored value, if its checksum holds.
pub(crate) fn verified(bytes: &[u8]) -> Option<&[u8]> {
    let rest = bytes.strip_prefix(&VALUE_MAGIC[..])?;
    if rest.len() < DIGEST_LEN {
        return None;
    }
    let (sum, json) = rest.split_at(DIGEST_LEN);
    (sum == digest(json)).then_some(json)
}

/// Checks and parses durable bytes into what memory holds. A checksum mismatch (or JSON that
/// does not parse) is logged here, once, and kept as [`Stored::Corrupt`]: memory never serves
/// it, and every read of the record fails naming it (see [`corrupt_error`]).
pub fn decode(table: Table, key: &str, bytes: &[u8]) -> Stored {
    let Some(json) = verified(bytes) else {
        tracing::error!(
            table = table.name(),
            key,
            "corrupt record: checksum mismatch, the stored bytes changed on disk; not served"
        );
        return Stored::Corrupt;
    };
    match serde_json::from_slice(json) {
        Ok(value) => Stored::Value(Arc::new(value)),
        Err(e) => {
            tracing::error!(table = table.name(), key, error = %e, "corrupt record: not JSON; not served");
            Stored::Corrupt
        }
    }
}

/// The answer to a read of a corrupt record: counted in
/// `controlplane_store_corrupt_records_total`, a 500 naming the record (a list fails whole
/// rather than skipping the row: a missing deny intention or a missing ACL token would
/// silently change who may talk to whom).
pub(crate) fn corrupt_error(metrics: &Metrics, table: Table, key: &str) -> Error {
    metrics.count_corrupt_record(table.name());
    Error::Store(format!(
        "corrupt record {}/{key}: checksum mismatch (the stored bytes changed on disk); not served. Restore a snapshot (`controlplane-lite snapshot restore`) or write the record again",
        table.name()
    ))
}
