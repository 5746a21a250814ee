//! The Historian write path: line protocol in, validated against the catalog, appended to
//! the write-ahead log, held in the write buffer, and persisted as Parquet in the lake.
//!
//! Nothing here knows about HTTP or DataFusion.

pub mod buffer;
pub mod catalog;
pub mod census;
pub mod erasure;
pub mod failpoint;
pub mod line_protocol;
pub mod merge;
pub mod metrics;
pub mod persist;
pub mod protect;
pub mod upload;
pub mod wal;
pub mod writer;

pub use catalog::{Catalog, Limits, TableWrite, ValidatedWrite};
pub use metrics::IngestMetrics;
pub use persist::{PersistConfig, Persister};
pub use writer::{
    EraseError, ErasureReceipt, IngestConfig, Ingester, WriteError, WriteOutcome, WriteRequest,
};
