//! What the query path sees of the tables being written: a small trait that `ingest`
//! implements and `query` reads, so that neither crate imports the other.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;

use crate::manifest::Manifest;
use crate::partition::PartitionKey;
use crate::schema::TableSchema;
use crate::table::TableOptions;

/// One table as a query sees it: rows still in the write buffer plus the files the
/// manifest lists.
#[derive(Debug, Clone)]
pub struct TableSnapshot {
    /// Database.
    pub db: String,
    /// Table.
    pub table: String,
    /// The current schema: every column accepted so far, buffered or persisted.
    pub schema: TableSchema,
    /// Settings (partitioning, TTL).
    pub options: TableOptions,
    /// Acknowledged rows not yet known to be in Parquet, per partition, each batch with a
    /// `_seq` column.
    pub buffered: Vec<(PartitionKey, Vec<RecordBatch>)>,
    /// The manifest read *after* the buffer: a flush that completes in between shows its
    /// rows in both (the same `_seq`, removed by deduplication), never in neither.
    pub manifest: Option<Arc<Manifest>>,
}

/// The live tables of a Historian node.
pub trait TableSource: Send + Sync + std::fmt::Debug {
    /// Databases that hold at least one table, sorted.
    fn databases(&self) -> Vec<String>;
    /// Tables of one database, sorted.
    fn tables(&self, db: &str) -> Vec<String>;
    /// A consistent snapshot of one table, or `None` if it does not exist.
    fn snapshot(&self, db: &str, table: &str) -> Option<TableSnapshot>;
}
