//! The series census: at start, the series already stored in the lake are counted into the
//! catalog, so that the per-table series limit holds across restarts and not only for the
//! series written (or replayed from the WAL) since the process started.
//!
//! Only the tag columns of live, unexpired files are read (dictionary-encoded, small). The
//! census runs beside the write path: writes are not held up, and until it ends a table's
//! count holds the series written since start plus those counted so far.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use object_store::ObjectStore;
use parquet::arrow::ProjectionMask;
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use store::Manifest;

use crate::catalog::Catalog;

/// What the census counted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CensusSummary {
    /// Tables whose files were read.
    pub tables: usize,
    /// Files read.
    pub files: usize,
    /// Rows whose series were counted.
    pub rows: u64,
    /// Files that could not be read (logged; their series are not counted).
    pub failed_files: usize,
}

/// Counts the series of every live file of `manifests` within its table's TTL into the
/// catalog's series sets.
pub async fn count_stored_series(
    store: Arc<dyn ObjectStore>,
    catalog: Arc<Catalog>,
    manifests: Vec<Arc<Manifest>>,
    now_ns: i64,
) -> CensusSummary {
    let started = Instant::now();
    let mut summary = CensusSummary::default();
    for manifest in manifests {
        let Some(table) = catalog.table(&manifest.db, &manifest.table) else {
            continue;
        };
        let horizon = table.options.horizon(now_ns);
        summary.tables += 1;
        for file in manifest.files.iter().filter(|f| f.max_time >= horizon) {
            match file_series(&store, &file.path, file.bytes, &catalog, &table).await {
                Ok(rows) => {
                    summary.files += 1;
                    summary.rows += rows;
                }
                Err(e) => {
                    summary.failed_files += 1;
                    tracing::warn!(path = %file.path, error = %e, "series census could not read a file; its series are not counted");
                }
            }
        }
    }
    let series: usize = catalog.tables().iter().map(|t| t.series_count()).sum();
    tracing::info!(
        tables = summary.tables,
        files = summary.files,
        rows = summary.rows,
        failed_files = summary.failed_files,
        series,
        seconds = started.elapsed().as_secs_f64(),
        "series census done"
    );
    summary
}

/// Notes the series of one file's rows; returns the rows read.
async fn file_series(
    store: &Arc<dyn ObjectStore>,
    path: &str,
    bytes: u64,
    catalog: &Catalog,
    table: &crate::catalog::TableCatalog,
) -> Result<u64, parquet::errors::ParquetError> {
    let reader = store::reader::LakeFileReader::new(store.clone(), path, bytes);
    let builder = ParquetRecordBatchStreamBuilder::new(reader).await?;
    let tags: Vec<usize> = builder
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| store::dedup::is_tag(f))
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), tags);
    let mut stream = builder.with_projection(mask).build()?;
    let mut rows = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        rows += batch.num_rows() as u64;
        catalog.note_series(table, &batch);
    }
    Ok(rows)
}
