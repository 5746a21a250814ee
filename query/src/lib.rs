//! The Historian query engine: DataFusion over the write buffer and the Parquet lake.
//!
//! A query runs in a session of its own that holds only the tables of one database, read
//! through [`table::LakeTable`] (buffer and files of one snapshot, deduplicated, retention
//! applied), after the [`sandbox`] has accepted it as a query. Results stream in the
//! [`format`]s clients ask for. Nothing here knows about HTTP or the write path.

pub mod catalog;
pub mod dedup;
pub mod engine;
pub mod format;
pub mod functions;
pub mod group_keys;
pub mod lastpoint;
pub mod metrics;
pub mod personal;
pub mod pg_catalog;
pub mod policy;
pub mod run_aggregate;
pub mod sandbox;
pub mod scan_predicate;
pub mod table;

pub use engine::{QueryConfig, QueryEngine, QueryError, QueryOptions, QueryStream};
pub use format::OutputFormat;
pub use metrics::QueryMetrics;
pub use personal::PersonalAccess;
pub use policy::{AccessPolicy, ColumnMode, DecryptionLog, RowPolicy, TableAccess, TablePolicies};
