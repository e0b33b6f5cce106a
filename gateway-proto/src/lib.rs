//! The gateway's sans-IO protocol core: the TLS ClientHello parser and the SNI route table.
//! Bytes and names in, verdicts and destinations out; no IO, no runtime, no unsafe code. CI
//! builds it for a target without an operating system to keep it that way.
#![forbid(unsafe_code)]

pub mod clienthello;
pub mod routes;
