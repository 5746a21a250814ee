//! Streaming k-way merge of sorted Parquet files: the compaction step.
//!
//! Every input file is sorted by series key (tags, then time) and has no duplicate key.
//! The merge walks all inputs at once and emits the union in the same order, merging rows
//! of the same key field by field (the latest non-null value by `_seq` wins). It decodes
//! one batch per input at a time, so memory is the inputs' compressed bytes plus a batch
//! each, never the decoded partition.

use arrow::array::{Array, ArrayRef, AsArray, UInt64Array};
use arrow::compute::interleave;
use arrow::datatypes::{SchemaRef, UInt64Type};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, Rows};
use bytes::Bytes;
use parquet::arrow::arrow_reader::{
    ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder, RowSelection,
};
use store::SEQ_COLUMN;

use store::dedup::{align, is_key, series_key_converter};

/// Rows per output batch and per input read.
const BATCH_ROWS: usize = 8192;

/// One file to merge: its bytes, and the rows it keeps (None: all; a deletion vector
/// hides the others).
pub struct MergeInput {
    /// The whole Parquet file.
    pub bytes: Bytes,
    /// Rows to read, over the whole file.
    pub kept: Option<RowSelection>,
}

impl From<Bytes> for MergeInput {
    fn from(bytes: Bytes) -> Self {
        MergeInput { bytes, kept: None }
    }
}

/// The current batch of one input.
struct Cursor {
    keys: Rows,
    seq: UInt64Array,
    rows: usize,
    pos: usize,
    /// Index of the batch in the merge's source list.
    source: usize,
}

/// Merges sorted, internally deduplicated Parquet files into sorted batches of `target`.
pub struct SortedMerge {
    target: SchemaRef,
    key_columns: Vec<usize>,
    seq_column: usize,
    converter: RowConverter,
    readers: Vec<ParquetRecordBatchReader>,
    cursors: Vec<Option<Cursor>>,
    /// Batches that rows of the output chunk being built come from.
    sources: Vec<RecordBatch>,
}

fn external(e: parquet::errors::ParquetError) -> ArrowError {
    ArrowError::ExternalError(Box::new(e))
}

/// How many keys from `from` (below `to`) are less than `bound`. The keys are strictly
/// increasing: a galloping search, so a short run costs a comparison or two and a long
/// one a logarithm.
fn rows_below(keys: &Rows, from: usize, to: usize, bound: arrow::row::Row<'_>) -> usize {
    // Find a step past the run: keys[from + step - 1] >= bound, or the end.
    let mut lo = from;
    let mut step = 1;
    let mut hi = loop {
        let probe = from + step - 1;
        if probe >= to {
            break to;
        }
        if keys.row(probe) >= bound {
            break probe;
        }
        lo = probe + 1;
        step *= 2;
    };
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if keys.row(mid) < bound {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo - from
}

impl SortedMerge {
    /// Opens the merge over whole-file contents (with the rows each input keeps).
    pub fn new(files: Vec<impl Into<MergeInput>>, target: SchemaRef) -> Result<Self, ArrowError> {
        let (key_columns, converter) = series_key_converter(&target)?;
        let seq_column = target.index_of(SEQ_COLUMN)?;
        let readers = files
            .into_iter()
            .map(|input| {
                let MergeInput { bytes, kept } = input.into();
                let mut builder = ParquetRecordBatchReaderBuilder::try_new(bytes)
                    .map_err(external)?
                    .with_batch_size(BATCH_ROWS);
                if let Some(kept) = kept {
                    builder = builder.with_row_selection(kept);
                }
                builder.build().map_err(external)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut merge = SortedMerge {
            target,
            key_columns,
            seq_column,
            converter,
            cursors: readers.iter().map(|_| None).collect(),
            readers,
            sources: Vec::new(),
        };
        for i in 0..merge.readers.len() {
            merge.load(i)?;
        }
        Ok(merge)
    }

    /// Loads the next non-empty batch of input `i` (or marks it done).
    fn load(&mut self, i: usize) -> Result<(), ArrowError> {
        self.cursors[i] = None;
        while let Some(batch) = self.readers[i].next().transpose()? {
            if batch.num_rows() == 0 {
                continue;
            }
            let batch = align(&batch, &self.target)?;
            let key_arrays: Vec<ArrayRef> = self
                .key_columns
                .iter()
                .map(|c| batch.column(*c).clone())
                .collect();
            let keys = self.converter.convert_columns(&key_arrays)?;
            let seq = batch
                .column(self.seq_column)
                .as_primitive::<UInt64Type>()
                .clone();
            self.cursors[i] = Some(Cursor {
                keys,
                seq,
                rows: batch.num_rows(),
                pos: 0,
                source: self.sources.len(),
            });
            self.sources.push(batch);
            return Ok(());
        }
        Ok(())
    }

    /// The next merged batch, or None when every input is exhausted.
    pub fn next_batch(&mut self) -> Result<Option<RecordBatch>, ArrowError> {
        let columns = self.target.fields().len();
        let mut picks: Vec<Vec<(usize, usize)>> = vec![Vec::with_capacity(BATCH_ROWS); columns];
        let mut members: Vec<(u64, usize, usize)> = Vec::new();
        let mut emitted = 0;
        while emitted < BATCH_ROWS {
            // The smallest key among the inputs, and the smallest of the other inputs' keys.
            let mut min: Option<usize> = None;
            let mut runner_up: Option<usize> = None;
            for (i, c) in self.cursors.iter().enumerate() {
                let Some(c) = c else { continue };
                match min {
                    None => min = Some(i),
                    Some(m) => {
                        let mc = self.cursors[m].as_ref().expect("min is live");
                        if c.keys.row(c.pos) < mc.keys.row(mc.pos) {
                            runner_up = min;
                            min = Some(i);
                        } else if runner_up.is_none_or(|r| {
                            let rc = self.cursors[r].as_ref().expect("runner-up is live");
                            c.keys.row(c.pos) < rc.keys.row(rc.pos)
                        }) {
                            runner_up = Some(i);
                        }
                    }
                }
            }
            let Some(m) = min else { break };
            // Where the smallest input's keys stay below every other input's, its rows are
            // copied as one run without comparing each (files that do not overlap, or a
            // series' rows in one flush, skip the row-by-row merge).
            let run = {
                let mc = self.cursors[m].as_ref().expect("min is live");
                let limit = (mc.rows - mc.pos).min(BATCH_ROWS - emitted);
                match runner_up {
                    None => limit,
                    Some(r) => {
                        let rc = self.cursors[r].as_ref().expect("runner-up is live");
                        rows_below(&mc.keys, mc.pos, mc.pos + limit, rc.keys.row(rc.pos))
                    }
                }
            };
            if run > 0 {
                let mc = self.cursors[m].as_mut().expect("min is live");
                let (source, from) = (mc.source, mc.pos);
                for p in picks.iter_mut() {
                    p.extend((from..from + run).map(|r| (source, r)));
                }
                mc.pos += run;
                emitted += run;
                if mc.pos >= mc.rows {
                    self.load(m)?;
                }
                continue;
            }
            members.clear();
            {
                let mc = self.cursors[m].as_ref().expect("min is live");
                let key = mc.keys.row(mc.pos);
                for c in self.cursors.iter().flatten() {
                    if c.keys.row(c.pos) == key {
                        members.push((c.seq.value(c.pos), c.source, c.pos));
                    }
                }
            }
            if members.len() == 1 {
                let (_, s, r) = members[0];
                for p in picks.iter_mut() {
                    p.push((s, r));
                }
            } else {
                members.sort_unstable_by_key(|(seq, _, _)| *seq);
                let &(_, ls, lr) = members.last().expect("non-empty");
                for (col, p) in picks.iter_mut().enumerate() {
                    if col == self.seq_column || is_key(self.target.field(col)) {
                        p.push((ls, lr));
                    } else {
                        let chosen = members
                            .iter()
                            .rev()
                            .find(|(_, s, r)| self.sources[*s].column(col).is_valid(*r))
                            .map(|(_, s, r)| (*s, *r))
                            .unwrap_or((ls, lr));
                        p.push(chosen);
                    }
                }
            }
            emitted += 1;
            // Advance every input that held the key.
            let key_sources: Vec<usize> = members.iter().map(|(_, s, _)| *s).collect();
            for i in 0..self.cursors.len() {
                let done = match &mut self.cursors[i] {
                    Some(c) if key_sources.contains(&c.source) => {
                        c.pos += 1;
                        c.pos >= c.rows
                    }
                    _ => false,
                };
                if done {
                    self.load(i)?;
                }
            }
        }
        if emitted == 0 {
            return Ok(None);
        }
        let arrays: Vec<ArrayRef> = (0..columns)
            .map(|col| {
                let values: Vec<&dyn Array> = self
                    .sources
                    .iter()
                    .map(|b| b.column(col).as_ref())
                    .collect();
                interleave(&values, &picks[col])
            })
            .collect::<Result<_, _>>()?;
        // Keep only the batches the cursors still read from, renumbered.
        let mut kept = Vec::new();
        for c in self.cursors.iter_mut().flatten() {
            kept.push(self.sources[c.source].clone());
            c.source = kept.len() - 1;
        }
        self.sources = kept;
        RecordBatch::try_new(self.target.clone(), arrays).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::DataType;
    use parquet::arrow::ArrowWriter;
    use store::dedup::fixtures::{self, Row};
    use store::dedup::sort_dedup;

    /// The rows as a flushed file: sorted, deduplicated Parquet.
    fn file(rows: &[Row<'_>]) -> Bytes {
        let b = sort_dedup(&fixtures::batch(rows)).unwrap();
        let mut out = Vec::new();
        let mut w = ArrowWriter::try_new(&mut out, b.schema(), None).unwrap();
        w.write(&b).unwrap();
        w.close().unwrap();
        Bytes::from(out)
    }

    /// Merging the files of `flushes` equals sorting and deduplicating all their rows.
    fn assert_merge_is_sorted_union(flushes: &[Vec<Row<'_>>]) {
        let target = fixtures::schema();
        let files: Vec<Bytes> = flushes.iter().map(|rows| file(rows)).collect();
        let all: Vec<Row<'_>> = flushes.iter().flatten().cloned().collect();
        let expected = {
            let f = file(&all);
            let r = ParquetRecordBatchReaderBuilder::try_new(f)
                .unwrap()
                .build()
                .unwrap();
            let batches: Vec<RecordBatch> = r.collect::<Result<_, _>>().unwrap();
            arrow::compute::concat_batches(&target, &batches).unwrap()
        };
        let mut merge = SortedMerge::new(files, target.clone()).unwrap();
        let mut out = Vec::new();
        while let Some(b) = merge.next_batch().unwrap() {
            assert!(b.num_rows() <= BATCH_ROWS);
            out.push(b);
        }
        let got = arrow::compute::concat_batches(&target, &out).unwrap();
        assert_eq!(got.num_rows(), expected.num_rows());
        for c in 0..target.fields().len() {
            let (g, e) = (got.column(c), expected.column(c));
            let g = arrow::compute::cast(g, &DataType::Utf8).unwrap();
            let e = arrow::compute::cast(e, &DataType::Utf8).unwrap();
            assert_eq!(
                g.as_string::<i32>(),
                e.as_string::<i32>(),
                "column {}",
                target.field(c).name()
            );
        }
    }

    #[test]
    fn merging_files_equals_sorting_and_deduplicating_their_union() {
        // Pseudo-random rows over a small key space so files overlap and collide.
        let mut x = 7u64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 33
        };
        let hosts = ["h0", "h1", "h2", "h3"];
        let mut flushes = Vec::new();
        let mut seq = 0;
        for _ in 0..5 {
            let mut rows = Vec::new();
            for _ in 0..20_000 {
                seq += 1;
                let h = hosts[(next() % 4) as usize];
                let t = (next() % 3000) as i64;
                let a = (next() % 3 != 0).then(|| (next() % 100) as f64);
                let b = (next() % 2 == 0).then(|| (next() % 100) as f64);
                rows.push((h, t, a, b, seq));
            }
            flushes.push(rows);
        }
        assert_merge_is_sorted_union(&flushes);
    }

    #[test]
    fn files_that_do_not_overlap_or_overlap_in_runs_merge_as_the_sorted_union() {
        let hosts = ["h0", "h1", "h2", "h3", "h4", "h5"];
        let mut seq = 0;
        let mut rows = |hosts: &[&'static str], times: std::ops::Range<i64>| {
            let mut out = Vec::new();
            for h in hosts {
                for t in times.clone() {
                    seq += 1;
                    out.push((*h, t, Some(t as f64), None, seq));
                }
            }
            out
        };
        // Disjoint hosts: whole files are runs.
        let disjoint = vec![
            rows(&hosts[..2], 0..10_000),
            rows(&hosts[2..4], 0..10_000),
            rows(&hosts[4..], 0..10_000),
        ];
        assert_merge_is_sorted_union(&disjoint);
        // Every host in every file at later times (a partition's flushes): a run per
        // series and file; the last file repeats one time of the one before (a resend).
        let flushes = vec![
            rows(&hosts, 0..3_000),
            rows(&hosts, 3_000..9_000),
            rows(&hosts, 8_999..9_100),
            rows(&hosts[..1], 20_000..20_001),
        ];
        assert_merge_is_sorted_union(&flushes);
    }
}
