//! The write buffer: acknowledged rows as Arrow batches per table and partition, readable
//! at once, until the persister writes them to Parquet.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arrow::array::{Array, ArrayRef, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parking_lot::{Mutex, RwLock};
use store::{PartitionKey, SEQ_COLUMN};

use crate::catalog::TableWrite;
use crate::metrics::IngestMetrics;
use crate::wal::WalApplier;

/// One table's rows in one partition.
#[derive(Debug, Default)]
pub struct PartitionBuffer {
    /// Batches not yet picked up by a flush, each with a `_seq` column, in sequence order
    /// of their writes; within a batch, rows are sorted by series and time.
    active: Vec<RecordBatch>,
    /// Batches being written to Parquet right now; still visible to readers.
    persisting: Vec<RecordBatch>,
    active_bytes: usize,
    persisting_bytes: usize,
    active_rows: usize,
    /// Lowest sequence of the active batches.
    active_min_seq: Option<u64>,
    /// Lowest sequence of the persisting batches.
    persisting_min_seq: Option<u64>,
    /// When the oldest active batch arrived.
    oldest: Option<Instant>,
}

impl PartitionBuffer {
    fn min_seq(&self) -> Option<u64> {
        match (self.active_min_seq, self.persisting_min_seq) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

type TableKey = (String, String);
/// One table's partitions.
type TablePartitions = Arc<Mutex<BTreeMap<PartitionKey, PartitionBuffer>>>;

/// A flush's hold on a partition's rows.
#[derive(Debug)]
pub struct FlushSnapshot {
    /// Database.
    pub db: String,
    /// Table.
    pub table: String,
    /// Partition.
    pub partition: PartitionKey,
    /// The batches, each with `_seq`.
    pub batches: Vec<RecordBatch>,
    /// Highest sequence among them.
    pub max_seq: u64,
}

/// What a flush may be asked to pick.
#[derive(Debug, Clone)]
pub struct FlushCandidate {
    /// Database.
    pub db: String,
    /// Table.
    pub table: String,
    /// Partition.
    pub partition: PartitionKey,
    /// Bytes waiting.
    pub bytes: usize,
    /// Rows waiting.
    pub rows: usize,
    /// Age of the oldest waiting batch.
    pub age: std::time::Duration,
}

/// The write buffer.
#[derive(Debug)]
pub struct WriteBuffer {
    tables: RwLock<HashMap<TableKey, TablePartitions>>,
    bytes: AtomicUsize,
    rows: AtomicUsize,
    limit_bytes: usize,
    metrics: Arc<IngestMetrics>,
    freed: tokio::sync::Notify,
}

fn seq_column(batch: &RecordBatch) -> Option<&UInt64Array> {
    batch
        .column_by_name(SEQ_COLUMN)?
        .as_any()
        .downcast_ref::<UInt64Array>()
}

/// Lowest sequence of a batch (rows are in series order, not sequence order).
fn first_seq(batch: &RecordBatch) -> Option<u64> {
    arrow::compute::min(seq_column(batch)?)
}

/// Appends the `_seq` column to a batch.
pub fn with_seq(batch: &RecordBatch, base_seq: u64) -> RecordBatch {
    let n = batch.num_rows() as u64;
    let seq: ArrayRef = Arc::new(UInt64Array::from_iter_values(base_seq..base_seq + n));
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(SEQ_COLUMN, DataType::UInt64, false));
    let mut columns = batch.columns().to_vec();
    columns.push(seq);
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .expect("a column of the batch's length with a fresh name")
}

impl WriteBuffer {
    /// An empty buffer that refuses writes past `limit_bytes`.
    pub fn new(limit_bytes: usize, metrics: Arc<IngestMetrics>) -> Self {
        WriteBuffer {
            tables: RwLock::new(HashMap::new()),
            bytes: AtomicUsize::new(0),
            rows: AtomicUsize::new(0),
            limit_bytes,
            metrics,
            freed: tokio::sync::Notify::new(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The configured limit.
    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    /// Whether a new write must wait (503) because the buffer is at its limit.
    pub fn is_full(&self) -> bool {
        self.bytes() >= self.limit_bytes
    }

    fn table(&self, db: &str, table: &str) -> TablePartitions {
        let key = (db.to_string(), table.to_string());
        if let Some(t) = self.tables.read().get(&key) {
            return t.clone();
        }
        self.tables.write().entry(key).or_default().clone()
    }

    fn account(&self, bytes: isize, rows: isize) {
        let b = if bytes >= 0 {
            self.bytes.fetch_add(bytes as usize, Ordering::Relaxed) + bytes as usize
        } else {
            self.bytes.fetch_sub((-bytes) as usize, Ordering::Relaxed) - (-bytes) as usize
        };
        let r = if rows >= 0 {
            self.rows.fetch_add(rows as usize, Ordering::Relaxed) + rows as usize
        } else {
            self.rows.fetch_sub((-rows) as usize, Ordering::Relaxed) - (-rows) as usize
        };
        self.metrics.buffer_bytes.set(b as i64);
        self.metrics.buffer_rows.set(r as i64);
    }

    /// Adds rows whose sequences start at `base_seq`.
    pub fn insert(&self, base_seq: u64, writes: Vec<TableWrite>) {
        let mut seq = base_seq;
        for w in writes {
            let rows = w.batch.num_rows();
            if rows == 0 {
                continue;
            }
            let batch = with_seq(&w.batch, seq);
            // Each batch is kept as a sorted, deduplicated run (series, time), so that
            // readers merge runs instead of sorting the buffer on every query.
            let batch = match store::dedup::sort_dedup(&batch) {
                Ok(sorted) => sorted,
                Err(e) => {
                    tracing::error!(error = %e, "could not sort a buffered batch; kept as written");
                    batch
                }
            };
            let kept = batch.num_rows();
            let bytes = batch.get_array_memory_size();
            {
                let table = self.table(&w.db, &w.table);
                let mut parts = table.lock();
                let p = parts.entry(w.partition).or_default();
                p.active.push(batch);
                p.active_bytes += bytes;
                p.active_rows += kept;
                p.active_min_seq.get_or_insert(seq);
                p.oldest.get_or_insert_with(Instant::now);
            }
            self.account(bytes as isize, kept as isize);
            // Sequences were assigned per written row, duplicates included.
            seq += rows as u64;
        }
    }

    /// Partitions with rows waiting, for the persister to choose from.
    pub fn candidates(&self) -> Vec<FlushCandidate> {
        let now = Instant::now();
        let tables: Vec<_> = self
            .tables
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = Vec::new();
        for ((db, table), parts) in tables {
            for (key, p) in parts.lock().iter() {
                if p.active.is_empty() || !p.persisting.is_empty() {
                    continue;
                }
                out.push(FlushCandidate {
                    db: db.clone(),
                    table: table.clone(),
                    partition: *key,
                    bytes: p.active_bytes,
                    rows: p.active_rows,
                    age: p.oldest.map(|o| now.duration_since(o)).unwrap_or_default(),
                });
            }
        }
        out
    }

    /// Moves a partition's oldest active rows, up to about `max_bytes`, to persisting and
    /// returns them; None if there is nothing to flush or a flush of it is already running.
    /// Bounding the snapshot bounds the memory a flush needs to sort and encode it.
    pub fn begin_flush(
        &self,
        db: &str,
        table: &str,
        partition: PartitionKey,
        max_bytes: usize,
    ) -> Option<FlushSnapshot> {
        let t = self.table(db, table);
        let mut parts = t.lock();
        let p = parts.get_mut(&partition)?;
        if p.active.is_empty() || !p.persisting.is_empty() {
            return None;
        }
        // Batches are in sequence order, so taking a prefix keeps "every row of this
        // partition up to max_seq is in the snapshot" true.
        let mut taken_bytes = 0;
        let mut take = 0;
        while take < p.active.len() && (take == 0 || taken_bytes < max_bytes) {
            taken_bytes += p.active[take].get_array_memory_size();
            take += 1;
        }
        let rest = p.active.split_off(take);
        p.persisting = std::mem::replace(&mut p.active, rest);
        p.persisting_bytes = taken_bytes.min(p.active_bytes);
        p.active_bytes -= p.persisting_bytes;
        p.persisting_min_seq = p.active_min_seq.take();
        p.active_rows = p.active.iter().map(|b| b.num_rows()).sum();
        p.active_min_seq = p.active.first().and_then(first_seq);
        p.oldest = if p.active.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        let max_seq = p
            .persisting
            .last()
            .and_then(|b| arrow::compute::max(seq_column(b)?))
            .unwrap_or(0);
        Some(FlushSnapshot {
            db: db.to_string(),
            table: table.to_string(),
            partition,
            batches: p.persisting.clone(),
            max_seq,
        })
    }

    /// Drops the persisting rows of a partition once they are committed to the manifest.
    pub fn finish_flush(&self, snapshot: &FlushSnapshot) {
        let t = self.table(&snapshot.db, &snapshot.table);
        let (bytes, rows) = {
            let mut parts = t.lock();
            let Some(p) = parts.get_mut(&snapshot.partition) else {
                return;
            };
            let rows: usize = p.persisting.iter().map(|b| b.num_rows()).sum();
            let bytes = std::mem::take(&mut p.persisting_bytes);
            p.persisting.clear();
            p.persisting_min_seq = None;
            if p.active.is_empty() {
                parts.remove(&snapshot.partition);
            }
            (bytes, rows)
        };
        self.account(-(bytes as isize), -(rows as isize));
        self.freed.notify_waiters();
    }

    /// Waits until the buffer is below its limit, at most `timeout`; true if it is.
    pub async fn wait_for_space(&self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.is_full() {
            let notified = self.freed.notified();
            if !self.is_full() {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return !self.is_full();
            }
        }
        true
    }

    /// Puts a failed flush's rows back in front of the active ones, to be retried.
    pub fn abort_flush(&self, snapshot: &FlushSnapshot) {
        let t = self.table(&snapshot.db, &snapshot.table);
        let mut parts = t.lock();
        let Some(p) = parts.get_mut(&snapshot.partition) else {
            return;
        };
        let mut batches = std::mem::take(&mut p.persisting);
        batches.append(&mut p.active);
        p.active = batches;
        p.active_bytes += std::mem::take(&mut p.persisting_bytes);
        p.active_rows = p.active.iter().map(|b| b.num_rows()).sum();
        p.active_min_seq = match (p.persisting_min_seq.take(), p.active_min_seq) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        p.oldest.get_or_insert_with(Instant::now);
    }

    /// Every write sequence below this is in Parquet and the manifest (or was never a row).
    pub fn persisted_below(&self, next_seq: u64) -> u64 {
        let tables: Vec<_> = self.tables.read().values().cloned().collect();
        let mut min = next_seq;
        for t in tables {
            for p in t.lock().values() {
                if let Some(s) = p.min_seq() {
                    min = min.min(s);
                }
            }
        }
        min
    }

    /// The rows of a table, per partition, for readers: active and persisting batches.
    pub fn snapshot(&self, db: &str, table: &str) -> Vec<(PartitionKey, Vec<RecordBatch>)> {
        let Some(t) = self
            .tables
            .read()
            .get(&(db.to_string(), table.to_string()))
            .cloned()
        else {
            return Vec::new();
        };
        t.lock()
            .iter()
            .map(|(k, p)| {
                let mut batches = p.persisting.clone();
                batches.extend(p.active.iter().cloned());
                (*k, batches)
            })
            .collect()
    }

    /// All (db, table) pairs with buffered rows.
    pub fn tables(&self) -> Vec<(String, String)> {
        self.tables.read().keys().cloned().collect()
    }
}

impl WalApplier for WriteBuffer {
    fn apply(&self, base_seq: u64, writes: Vec<TableWrite>) {
        self.insert(base_seq, writes);
    }
}
