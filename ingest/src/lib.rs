//! Historian ingest.
pub mod line_protocol;
