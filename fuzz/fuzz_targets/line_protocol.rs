//! Feeds arbitrary bytes to the line protocol parser. Besides panics, it turns broken
//! invariants into crashes: line numbers that do not increase or point past the body, and
//! newlines outside string values of an accepted line (which would mean the line splitter
//! and the parser disagree on where strings are).
#![no_main]

use libfuzzer_sys::fuzz_target;

// The parser only needs std, memchr and thiserror; including its source keeps this build
// free of the ingest crate's heavy dependencies (arrow, parquet, tokio) under ASan.
#[path = "../../ingest/src/line_protocol.rs"]
#[allow(dead_code)]
mod line_protocol;

fuzz_target!(|data: &[u8]| line_protocol::check_invariants(data));
