//! The integration tests' one harness, shared by the gateway's and the bench's tests: start a
//! gateway, start a controlplane-lite agent, read the addresses a child reports, wait for
//! readiness with a deadline, and private temporary directories removed on drop.
//!
//! Binaries of other packages have no `CARGO_BIN_EXE_` in a test, so [`process::binary`]
//! finds them beside the test executable (`cargo test --workspace` builds them all) and fails
//! with a clear message when one is missing. No test runs `cargo build` itself.
#![allow(clippy::unwrap_used)] // a harness panics loudly on a broken environment

pub mod activation;
pub mod dir;
pub mod gateway;
pub mod mesh;
pub mod process;
