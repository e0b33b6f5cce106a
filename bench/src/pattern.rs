//! The byte pattern every client sends, so that an echo can be checked byte for byte.
//!
//! Byte `i` of a stream is `PATTERN[i % PERIOD]`. The period is a prime, so no write size or
//! buffer size lines up with it: a dropped, duplicated or reordered chunk changes the bytes seen
//! at every later offset. Checking is a memcmp against a precomputed table, cheap enough to run at
//! many Gbit/s on the load generator.

use std::sync::OnceLock;

/// The largest slice [`slice`] hands out in one piece.
pub const MAX_CHUNK: usize = 1 << 20;
/// A prime a little below 1 MiB.
const PERIOD: usize = 1_048_573;

fn table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..PERIOD + MAX_CHUNK)
            .map(|i| {
                let index = (i % PERIOD) as u64;
                // A multiplicative hash of the counter: neighbouring bytes differ.
                (index.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
            })
            .collect()
    })
}

/// The `length` pattern bytes starting at stream offset `offset` (`length <= MAX_CHUNK`).
pub fn slice(offset: u64, length: usize) -> &'static [u8] {
    let start = (offset % PERIOD as u64) as usize;
    &table()[start..start + length.min(MAX_CHUNK)]
}

/// Whether `data` equals the pattern at stream offset `offset`.
pub fn matches(offset: u64, data: &[u8]) -> bool {
    data.chunks(MAX_CHUNK)
        .enumerate()
        .all(|(index, chunk)| chunk == slice(offset + (index * MAX_CHUNK) as u64, chunk.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifted_data_does_not_match() {
        let data = slice(1000, 4096).to_vec();
        assert!(matches(1000, &data));
        assert!(!matches(1001, &data));
        assert!(!matches(1000 + PERIOD as u64 - 1, &data));
        assert!(matches(1000 + PERIOD as u64, &data));
    }

    #[test]
    fn long_checks_cross_the_period() {
        let start = PERIOD as u64 - 10;
        let mut data = slice(start, MAX_CHUNK).to_vec();
        data.extend_from_slice(slice(start + MAX_CHUNK as u64, 100));
        assert!(matches(start, &data));
        data[MAX_CHUNK + 50] ^= 1;
        assert!(!matches(start, &data));
    }
}
