//! The Historian lake: table schemas, the Hive-style partition layout, the manifest that
//! says which Parquet files make up a table, and retention horizons.
//!
//! Nothing here knows about HTTP, the write-ahead log or DataFusion.

pub mod dedup;
pub mod deletes;
pub mod lake;
pub mod layout;
pub mod manifest;
pub mod partition;
pub mod reader;
pub mod schema;
pub mod snapshot;
pub mod table;

pub use deletes::DeletionVector;
pub use lake::{Lake, LakeError, S3Options};
pub use layout::Layout;
pub use manifest::{FileMeta, Manifest, ManifestError, ManifestStore, PendingDelete};
pub use partition::{PartitionGranularity, PartitionKey};
pub use schema::{ColumnDef, ColumnType, SEQ_COLUMN, TIME_COLUMN, TableSchema};
pub use snapshot::{TableSnapshot, TableSource};
pub use table::{CIPHER_SUFFIX, KeyPeriod, TableOptions, UnknownColumns, cipher_column, key_scope};
