//! The mesh and sidecar tests' harness lives in the `test-support` crate; this keeps
//! `mod mesh_support;` working in every test file.
#![allow(unused_imports, dead_code)] // each test binary uses a different subset

pub use test_support::mesh::*;

pub const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");
