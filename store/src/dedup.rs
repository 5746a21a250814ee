//! Sorting rows by series then time, and last-write-wins deduplication.
//!
//! Rows of the same series (all tags equal) at the same time are one point; each field
//! takes its value from the latest write (highest `_seq`) that set it, as in InfluxDB.

use crate::{ColumnType, SEQ_COLUMN, TIME_COLUMN};
use arrow::array::AsArray;
use arrow::array::{Array, ArrayRef, UInt32Array, new_null_array};
use arrow::compute::{SortOptions, concat_batches, take};
use arrow::datatypes::SchemaRef;
use arrow::datatypes::UInt64Type;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};

/// Reshapes a batch to `target`: columns by name, missing ones all NULL.
pub fn align(batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    let columns: Vec<ArrayRef> = target
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => arrow::compute::cast(c, f.data_type()),
            None => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<Result<_, _>>()?;
    RecordBatch::try_new(target.clone(), columns)
}

/// Aligns batches to `target` and concatenates them.
pub fn concat_aligned(
    batches: &[RecordBatch],
    target: &SchemaRef,
) -> Result<RecordBatch, ArrowError> {
    let aligned: Vec<RecordBatch> = batches
        .iter()
        .map(|b| align(b, target))
        .collect::<Result<_, _>>()?;
    concat_batches(target, &aligned)
}

/// Whether a column belongs to the series key (a tag, or time).
pub fn is_key(field: &arrow::datatypes::Field) -> bool {
    field.name() == TIME_COLUMN || is_tag(field)
}

/// Whether a column is a tag.
pub fn is_tag(field: &arrow::datatypes::Field) -> bool {
    ColumnType::from_data_type(field.data_type()) == Some(ColumnType::Tag)
}

/// Indices of the series key: tags (schema order), then time.
fn key_indices(schema: &SchemaRef) -> Vec<usize> {
    schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| is_key(f) && f.name() != TIME_COLUMN)
        .map(|(i, _)| i)
        .chain(schema.index_of(TIME_COLUMN).ok())
        .collect()
}

/// The series key columns of `schema` (tags, then time) and a converter to Arrow's row
/// format for them, in the order files are sorted by. Rows compare as plain bytes: far
/// faster than comparing ten dictionary columns one by one.
pub fn series_key_converter(schema: &SchemaRef) -> Result<(Vec<usize>, RowConverter), ArrowError> {
    let key_idx = key_indices(schema);
    let converter = RowConverter::new(
        key_idx
            .iter()
            .map(|i| {
                SortField::new_with_options(
                    schema.field(*i).data_type().clone(),
                    SortOptions {
                        descending: false,
                        nulls_first: true,
                    },
                )
            })
            .collect(),
    )?;
    Ok((key_idx, converter))
}

/// The series keys of a batch in Arrow's row format.
fn series_keys(batch: &RecordBatch) -> Result<arrow::row::Rows, ArrowError> {
    let (key_idx, converter) = series_key_converter(&batch.schema())?;
    let key_columns: Vec<ArrayRef> = key_idx.iter().map(|i| batch.column(*i).clone()).collect();
    converter.convert_columns(&key_columns)
}

fn seq_column(batch: &RecordBatch) -> Result<&arrow::array::UInt64Array, ArrowError> {
    batch
        .column_by_name(SEQ_COLUMN)
        .and_then(|c| c.as_primitive_opt::<UInt64Type>())
        .ok_or_else(|| ArrowError::SchemaError("a UInt64 _seq column is required".into()))
}

/// Splits rows listed in `order` into runs of equal keys.
fn equal_key_runs(keys: &arrow::row::Rows, order: &[u32]) -> Vec<std::ops::Range<usize>> {
    let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0;
    for k in 1..order.len() {
        if keys.row(order[k] as usize) != keys.row(order[k - 1] as usize) {
            ranges.push(start..k);
            start = k;
        }
    }
    if !order.is_empty() {
        ranges.push(start..order.len());
    }
    ranges
}

/// Sorts by tags (schema order), time and `_seq`, then merges rows of the same series and
/// time, field by field, keeping the value of the latest write. The batch must have `time`
/// and `_seq` columns.
pub fn sort_dedup(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let n = batch.num_rows();
    if n <= 1 {
        return Ok(batch.clone());
    }
    let seq = seq_column(batch)?;
    let keys = series_keys(batch)?;
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_unstable_by(|&a, &b| {
        keys.row(a as usize)
            .cmp(&keys.row(b as usize))
            .then_with(|| seq.value(a as usize).cmp(&seq.value(b as usize)))
    });
    let ranges = equal_key_runs(&keys, &order);
    merge_runs(batch, &order, &ranges)
}

/// Deduplicates a batch already sorted by series key then `_seq` (as a merge of sorted
/// files yields it). Returns the merged rows of every complete key and, held back, the rows
/// of the last key, which may continue in the next batch of the stream: prepend them to it.
pub fn dedup_sorted(batch: &RecordBatch) -> Result<(RecordBatch, RecordBatch), ArrowError> {
    let n = batch.num_rows();
    if n == 0 {
        return Ok((batch.clone(), batch.clone()));
    }
    let keys = series_keys(batch)?;
    let order: Vec<u32> = (0..n as u32).collect();
    let mut ranges = equal_key_runs(&keys, &order);
    let last = ranges.pop().unwrap_or(0..0);
    let held = batch.slice(last.start, last.len());
    let complete = batch.slice(0, last.start);
    if ranges.len() == last.start {
        return Ok((complete, held));
    }
    Ok((merge_runs(&complete, &order[..last.start], &ranges)?, held))
}

/// Merges each run of `order` (rows with one key, in write order) into one row.
fn merge_runs(
    batch: &RecordBatch,
    order: &[u32],
    ranges: &[std::ops::Range<usize>],
) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    let indices = UInt32Array::from(order.to_vec());
    if ranges.len() == order.len() {
        // No duplicates: one take per column.
        let columns: Vec<ArrayRef> = batch
            .columns()
            .iter()
            .map(|c| take(c.as_ref(), &indices, None))
            .collect::<Result<_, _>>()?;
        return RecordBatch::try_new(schema, columns);
    }
    let seq_idx = schema.index_of(SEQ_COLUMN).ok();
    let idx = indices.values();
    let first: UInt32Array = ranges.iter().map(|r| idx[r.start]).collect();
    let last: UInt32Array = ranges.iter().map(|r| idx[r.end - 1]).collect();
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (i, field) in schema.fields().iter().enumerate() {
        let col = batch.column(i);
        let picked = if is_key(field) {
            take(col.as_ref(), &first, None)?
        } else if Some(i) == seq_idx {
            take(col.as_ref(), &last, None)?
        } else {
            // The latest non-null value in each group, else the latest row (NULL).
            let chosen: UInt32Array = ranges
                .iter()
                .map(|r| {
                    idx[r.clone()]
                        .iter()
                        .rev()
                        .find(|&&row| col.is_valid(row as usize))
                        .copied()
                        .unwrap_or(idx[r.end - 1])
                })
                .collect();
            take(col.as_ref(), &chosen, None)?
        };
        columns.push(picked);
    }
    RecordBatch::try_new(schema, columns)
}

/// Row count and time and sequence ranges of a sorted, deduplicated batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStats {
    /// Rows.
    pub rows: u64,
    /// Smallest time.
    pub min_time: i64,
    /// Largest time.
    pub max_time: i64,
    /// Smallest `_seq`.
    pub min_seq: u64,
    /// Largest `_seq`.
    pub max_seq: u64,
}

impl BatchStats {
    /// The statistics of two batches together.
    pub fn merge(self, other: BatchStats) -> BatchStats {
        BatchStats {
            rows: self.rows + other.rows,
            min_time: self.min_time.min(other.min_time),
            max_time: self.max_time.max(other.max_time),
            min_seq: self.min_seq.min(other.min_seq),
            max_seq: self.max_seq.max(other.max_seq),
        }
    }
}

/// Computes [`BatchStats`].
pub fn stats(batch: &RecordBatch) -> BatchStats {
    use arrow::array::{TimestampNanosecondArray, UInt64Array};
    let time = batch.column_by_name(TIME_COLUMN).and_then(|c| {
        c.as_any()
            .downcast_ref::<TimestampNanosecondArray>()
            .cloned()
    });
    let seq = batch
        .column_by_name(SEQ_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<UInt64Array>().cloned());
    BatchStats {
        rows: batch.num_rows() as u64,
        min_time: time.as_ref().and_then(arrow::compute::min).unwrap_or(0),
        max_time: time.as_ref().and_then(arrow::compute::max).unwrap_or(0),
        min_seq: seq.as_ref().and_then(arrow::compute::min).unwrap_or(0),
        max_seq: seq.as_ref().and_then(arrow::compute::max).unwrap_or(0),
    }
}

/// Keeps only rows at or after `horizon` (ns).
pub fn filter_horizon(batch: &RecordBatch, horizon: i64) -> Result<RecordBatch, ArrowError> {
    filter_time(batch, horizon, i64::MAX)
}

/// Keeps only rows with `start <= time <= end` (ns).
pub fn filter_time(batch: &RecordBatch, start: i64, end: i64) -> Result<RecordBatch, ArrowError> {
    use arrow::array::TimestampNanosecondArray;
    if start == i64::MIN && end == i64::MAX {
        return Ok(batch.clone());
    }
    let Some(time) = batch
        .column_by_name(TIME_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<TimestampNanosecondArray>())
    else {
        return Ok(batch.clone());
    };
    let keep: arrow::array::BooleanArray = time
        .iter()
        .map(|t| Some(t.is_some_and(|t| t >= start && t <= end)))
        .collect();
    arrow::compute::filter_record_batch(batch, &keep)
}

/// Test rows of a small table (`host` tag, floats `a` and `b`), shared by the tests of the
/// sort, of the compaction merge and of the query path's deduplication.
#[doc(hidden)]
pub mod fixtures {
    use std::sync::Arc;

    use crate::{ColumnType as CT, TableSchema};
    use arrow::array::{Float64Array, StringArray, TimestampNanosecondArray, UInt64Array};
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    use arrow::record_batch::RecordBatch;

    use super::align;

    /// host, time, a, b, _seq
    pub type Row<'a> = (&'a str, i64, Option<f64>, Option<f64>, u64);

    /// The table's stored schema.
    pub fn schema() -> SchemaRef {
        let mut schema = TableSchema::new();
        schema.add_column("host", CT::Tag);
        schema.add_column("a", CT::Float);
        schema.add_column("b", CT::Float);
        schema.arrow_schema()
    }

    /// The rows as a batch of [`schema`], in the given order.
    pub fn batch(rows: &[Row<'_>]) -> RecordBatch {
        let plain = Arc::new(Schema::new(vec![
            Field::new("host", DataType::Utf8, true),
            Field::new("time", CT::Time.data_type(), false),
            Field::new("a", DataType::Float64, true),
            Field::new("b", DataType::Float64, true),
            Field::new("_seq", DataType::UInt64, false),
        ]));
        let b = RecordBatch::try_new(
            plain,
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(TimestampNanosecondArray::from_iter_values(
                    rows.iter().map(|r| r.1),
                )),
                Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.2))),
                Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.3))),
                Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.4))),
            ],
        )
        .expect("columns of one length");
        align(&b, &schema()).expect("the fixture's columns fit its schema")
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::batch;
    use super::*;
    use arrow::array::{Float64Array, StringArray, TimestampNanosecondArray, UInt64Array};
    use arrow::datatypes::DataType;

    type OwnedRow = (String, i64, Option<f64>, Option<f64>, u64);

    fn rows(b: &RecordBatch) -> Vec<OwnedRow> {
        let host = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
        let host = host.as_any().downcast_ref::<StringArray>().unwrap();
        let t = b
            .column(1)
            .as_any()
            .downcast_ref::<TimestampNanosecondArray>()
            .unwrap();
        let a = b.column(2).as_any().downcast_ref::<Float64Array>().unwrap();
        let bb = b.column(3).as_any().downcast_ref::<Float64Array>().unwrap();
        let s = b.column(4).as_any().downcast_ref::<UInt64Array>().unwrap();
        (0..b.num_rows())
            .map(|i| {
                (
                    host.value(i).to_string(),
                    t.value(i),
                    a.is_valid(i).then(|| a.value(i)),
                    bb.is_valid(i).then(|| bb.value(i)),
                    s.value(i),
                )
            })
            .collect()
    }

    #[test]
    fn last_write_wins_per_field_and_rows_sort_by_series_then_time() {
        let b = batch(&[
            ("h2", 10, Some(1.0), None, 1),
            ("h1", 20, Some(2.0), Some(20.0), 2),
            ("h1", 10, Some(3.0), None, 3),
            ("h1", 20, None, Some(21.0), 4),
            ("h1", 20, Some(5.0), None, 5),
        ]);
        let out = sort_dedup(&b).unwrap();
        assert_eq!(
            rows(&out),
            vec![
                ("h1".into(), 10, Some(3.0), None, 3),
                ("h1".into(), 20, Some(5.0), Some(21.0), 5),
                ("h2".into(), 10, Some(1.0), None, 1),
            ]
        );
        let s = stats(&out);
        assert_eq!(
            (s.rows, s.min_time, s.max_time, s.min_seq, s.max_seq),
            (3, 10, 20, 1, 5)
        );
    }

    #[test]
    fn without_duplicates_rows_are_only_sorted() {
        let b = batch(&[("b", 2, Some(1.0), None, 1), ("a", 1, None, Some(2.0), 2)]);
        let out = sort_dedup(&b).unwrap();
        assert_eq!(rows(&out)[0].0, "a");
        assert_eq!(out.num_rows(), 2);
        let f = filter_horizon(&out, 2).unwrap();
        assert_eq!(rows(&f), vec![("b".into(), 2, Some(1.0), None, 1)]);
    }

    #[test]
    fn sorted_stream_dedup_holds_the_last_key_back_for_the_next_batch() {
        let sorted = sort_dedup(&batch(&[("h1", 10, Some(1.0), None, 1)])).unwrap();
        assert_eq!(sorted.num_rows(), 1);
        // One stream, cut in two batches in the middle of the key (h1, 20).
        let first = batch(&[
            ("h1", 10, Some(1.0), None, 1),
            ("h1", 10, None, Some(7.0), 4),
            ("h1", 20, Some(2.0), None, 2),
        ]);
        let second = batch(&[
            ("h1", 20, None, Some(9.0), 3),
            ("h2", 5, Some(4.0), None, 5),
        ]);
        let (done, held) = dedup_sorted(&first).unwrap();
        assert_eq!(
            rows(&done),
            vec![("h1".into(), 10, Some(1.0), Some(7.0), 4)]
        );
        assert_eq!(held.num_rows(), 1);
        let next = concat_batches(&first.schema(), [&held, &second]).unwrap();
        let (done, held) = dedup_sorted(&next).unwrap();
        assert_eq!(
            rows(&done),
            vec![("h1".into(), 20, Some(2.0), Some(9.0), 3)]
        );
        assert_eq!(rows(&held), vec![("h2".into(), 5, Some(4.0), None, 5)]);
    }
}
