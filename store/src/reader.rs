//! Reading Parquet files of the lake by byte ranges, for readers that need only some
//! columns or rows of a file (the lastpoint fast path, the series census).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

/// Bytes read with the footer in one request, so a small footer needs no second one.
const FOOTER_HINT: usize = 64 * 1024;

/// One Parquet file of the lake, read through the object store by byte ranges.
#[derive(Debug, Clone)]
pub struct LakeFileReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
}

impl LakeFileReader {
    /// The file at `path`, of `size` bytes (from the manifest: no HEAD request).
    pub fn new(store: Arc<dyn ObjectStore>, path: &str, size: u64) -> Self {
        LakeFileReader {
            store,
            path: Path::from(path),
            size,
        }
    }
}

fn external(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl AsyncFileReader for LakeFileReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes>> {
        async move {
            self.store
                .get_range(&self.path, range)
                .await
                .map_err(external)
        }
        .boxed()
    }

    fn get_byte_ranges(&mut self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Vec<Bytes>>> {
        async move {
            self.store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(external)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, Result<Arc<ParquetMetaData>>> {
        async move {
            let mut reader = ParquetMetaDataReader::new().with_prefetch_hint(Some(FOOTER_HINT));
            if let Some(o) = options {
                reader = reader
                    .with_column_index_policy(o.column_index_policy())
                    .with_offset_index_policy(o.offset_index_policy());
            }
            let size = self.size;
            Ok(Arc::new(reader.load_and_finish(self, size).await?))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use futures::TryStreamExt;
    use object_store::memory::InMemory;
    use parquet::arrow::{ArrowWriter, ParquetRecordBatchStreamBuilder};

    #[tokio::test]
    async fn reads_a_lake_file_by_ranges() {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(0..1000))],
        )
        .unwrap();
        let mut file = Vec::new();
        let mut w = ArrowWriter::try_new(&mut file, schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let store = Arc::new(InMemory::new());
        let size = file.len() as u64;
        store
            .put(&Path::from("t/part-1.parquet"), file.into())
            .await
            .unwrap();
        let reader = LakeFileReader::new(store, "t/part-1.parquet", size);
        let batches: Vec<RecordBatch> = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .unwrap()
            .build()
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, 1000);
    }
}
