//! Erasure on the write path: which data keys a batch's personal cells use (the Roaring
//! bitmap kept per file in the manifest), and dropping the rows of erased subjects from
//! every batch that is flushed or compacted, so no erased row is ever written again.

use std::collections::HashSet;

use arrow::array::{Array, BinaryArray, BooleanArray};
use arrow::compute::filter_record_batch;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use base64::Engine;
use futures::StreamExt;
use parquet::arrow::ProjectionMask;
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use roaring::RoaringTreemap;

fn cell_columns(batch: &RecordBatch) -> impl Iterator<Item = &BinaryArray> {
    batch
        .columns()
        .iter()
        .filter_map(|c| c.as_any().downcast_ref::<BinaryArray>())
}

/// The key ids of every cell in the batch.
pub fn key_ids(batch: &RecordBatch) -> RoaringTreemap {
    let mut ids = RoaringTreemap::new();
    for cells in cell_columns(batch) {
        for cell in cells.iter().flatten() {
            if let Some(id) = privacy::key_id_of(cell) {
                ids.insert(id);
            }
        }
    }
    ids
}

/// A bitmap as stored in the manifest (an empty one too: None means "not known").
pub fn encode_key_ids(ids: &RoaringTreemap) -> Option<String> {
    let mut bytes = Vec::with_capacity(ids.serialized_size());
    ids.serialize_into(&mut bytes).ok()?;
    Some(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Per row of the batch, whether it has a cell under an erased key; None if no row has.
fn erased_mask(batch: &RecordBatch, erased: &HashSet<u64>) -> Option<Vec<bool>> {
    if erased.is_empty() {
        return None;
    }
    let mut hit = vec![false; batch.num_rows()];
    let mut any = false;
    for cells in cell_columns(batch) {
        for (row, h) in hit.iter_mut().enumerate() {
            if !*h
                && cells.is_valid(row)
                && privacy::key_id_of(cells.value(row)).is_some_and(|id| erased.contains(&id))
            {
                *h = true;
                any = true;
            }
        }
    }
    any.then_some(hit)
}

/// The batch without rows that have a cell under an erased key.
pub fn drop_erased(batch: &RecordBatch, erased: &HashSet<u64>) -> Result<RecordBatch, ArrowError> {
    match erased_mask(batch, erased) {
        None => Ok(batch.clone()),
        Some(hit) => filter_record_batch(
            batch,
            &BooleanArray::from_iter(hit.iter().map(|h| Some(!h))),
        ),
    }
}

/// The positions (in file order) of a Parquet file's rows that have a cell under an erased
/// key: its deletion vector. Only the cell columns are read and decoded.
pub async fn erased_rows(
    file: impl AsyncFileReader + Unpin + 'static,
    erased: &HashSet<u64>,
) -> Result<RoaringTreemap, parquet::errors::ParquetError> {
    let builder = ParquetRecordBatchStreamBuilder::new(file).await?;
    let cells: Vec<usize> = builder
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| f.data_type() == &arrow::datatypes::DataType::Binary)
        .map(|(i, _)| i)
        .collect();
    let mut rows = RoaringTreemap::new();
    if cells.is_empty() {
        return Ok(rows);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), cells);
    let mut batches = builder.with_projection(mask).build()?;
    let mut offset = 0u64;
    while let Some(batch) = batches.next().await {
        let batch = batch?;
        if let Some(hit) = erased_mask(&batch, erased) {
            rows.extend(
                hit.iter()
                    .enumerate()
                    .filter(|(_, h)| **h)
                    .map(|(i, _)| offset + i as u64),
            );
        }
        offset += batch.num_rows() as u64;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn cell(id: u64) -> Vec<u8> {
        let mut c = vec![1u8];
        c.extend_from_slice(&id.to_le_bytes());
        c.extend_from_slice(&[0u8; 12 + 16 + 3]);
        c
    }

    #[tokio::test]
    async fn erased_rows_go_and_bitmaps_round_trip() {
        let cells = BinaryArray::from(vec![Some(&cell(5)[..]), None, Some(&cell(9)[..])]);
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("v", DataType::Int64, false),
                Field::new("c", DataType::Binary, true),
            ])),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef,
                Arc::new(cells),
            ],
        )
        .unwrap();
        let ids = key_ids(&batch);
        assert_eq!(ids.iter().collect::<Vec<_>>(), vec![5, 9]);
        let text = encode_key_ids(&ids).unwrap();
        assert!(store::manifest::may_hold_keys(
            Some(&text),
            &HashSet::from([9])
        ));
        assert!(!store::manifest::may_hold_keys(
            Some(&text),
            &HashSet::from([7])
        ));
        assert!(
            store::manifest::may_hold_keys(None, &HashSet::from([7])),
            "unknown: must be read"
        );
        let empty = encode_key_ids(&RoaringTreemap::new()).unwrap();
        assert!(!store::manifest::may_hold_keys(
            Some(&empty),
            &HashSet::from([7])
        ));
        let kept = drop_erased(&batch, &HashSet::from([9])).unwrap();
        assert_eq!(kept.num_rows(), 2);
        assert_eq!(drop_erased(&batch, &HashSet::new()).unwrap().num_rows(), 3);

        let mut file = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut file, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let store = Arc::new(object_store::memory::InMemory::new());
        let size = file.len() as u64;
        object_store::ObjectStoreExt::put(store.as_ref(), &"f.parquet".into(), file.into())
            .await
            .unwrap();
        let reader = store::reader::LakeFileReader::new(store, "f.parquet", size);
        let rows = erased_rows(reader, &HashSet::from([9])).await.unwrap();
        assert_eq!(
            rows.iter().collect::<Vec<_>>(),
            vec![2, 5],
            "positions in file order"
        );
    }
}
