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

use line_protocol::{Precision, parse_lines};

fuzz_target!(|data: &[u8]| {
    let newlines = data.iter().filter(|&&c| c == b'\n').count();
    let mut last_line = 0;
    for result in parse_lines(data) {
        let line_number = match result {
            Ok(line) => {
                assert!(!line.fields.is_empty());
                assert!(!line.measurement.contains('\n'));
                assert!(
                    line.tags
                        .iter()
                        .all(|(k, v)| !k.contains('\n') && !v.contains('\n'))
                );
                assert!(line.fields.iter().all(|(k, _)| !k.contains('\n')));
                if let Some(timestamp) = line.timestamp {
                    let _ = Precision::Auto.to_nanos(timestamp);
                }
                line.line_number
            }
            Err(error) => error.line_number,
        };
        assert!(line_number > last_line && line_number <= newlines + 1);
        last_line = line_number;
    }
});
