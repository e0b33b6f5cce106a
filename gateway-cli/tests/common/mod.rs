//! The gateway tests' harness lives in the `test-support` crate; this keeps `mod common;` and
//! `use common::*;` working in every test file.
#![allow(unused_imports)] // each test binary uses a different subset

pub use test_support::gateway::*;
