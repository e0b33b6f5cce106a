//! Fuzz target `csr`: the invariants are in `../checks.rs` (`controlplane_fuzz::csr`),
//! shared with the corpus replay test `controlplane-lite/tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| controlplane_fuzz::csr(data));
