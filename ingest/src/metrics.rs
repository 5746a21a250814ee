//! Ingest counters, exported in Prometheus text format by the server.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Everything the write path counts.
#[derive(Debug)]
pub struct IngestMetrics {
    /// Write requests received.
    pub write_requests: Counter,
    /// Rows accepted.
    pub rows_ingested: Counter,
    /// Lines rejected.
    pub lines_rejected: Counter,
    /// Write requests refused because the buffer was full (503).
    pub writes_throttled: Counter,
    /// WAL records written.
    pub wal_writes: Counter,
    /// WAL bytes written.
    pub wal_bytes: Counter,
    /// WAL fsyncs.
    pub wal_fsyncs: Counter,
    /// WAL fsync latency.
    pub wal_fsync_seconds: Histogram,
    /// Open WAL segments.
    pub wal_segments: Gauge,
    /// Bytes held by the write buffer.
    pub buffer_bytes: Gauge,
    /// Rows held by the write buffer.
    pub buffer_rows: Gauge,
    /// Parquet files written by flushes.
    pub files_flushed: Counter,
    /// Parquet files written by compaction.
    pub files_compacted: Counter,
    /// Live Parquet files in all manifests.
    pub files: Gauge,
    /// Partitions with at least one live file.
    pub partitions: Gauge,
    /// Bytes of Parquet written.
    pub parquet_bytes_written: Counter,
    /// Flushes that failed (retried later).
    pub flush_errors: Counter,
    /// Partitions deleted by retention.
    pub partitions_expired: Counter,
}

impl Default for IngestMetrics {
    fn default() -> Self {
        IngestMetrics {
            write_requests: Counter::default(),
            rows_ingested: Counter::default(),
            lines_rejected: Counter::default(),
            writes_throttled: Counter::default(),
            wal_writes: Counter::default(),
            wal_bytes: Counter::default(),
            wal_fsyncs: Counter::default(),
            // 50 µs .. ~3 s
            wal_fsync_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            wal_segments: Gauge::default(),
            buffer_bytes: Gauge::default(),
            buffer_rows: Gauge::default(),
            files_flushed: Counter::default(),
            files_compacted: Counter::default(),
            files: Gauge::default(),
            partitions: Gauge::default(),
            parquet_bytes_written: Counter::default(),
            flush_errors: Counter::default(),
            partitions_expired: Counter::default(),
        }
    }
}

impl IngestMetrics {
    /// Registers every metric under the `historian_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "historian_write_requests",
            "Write requests received",
            self.write_requests.clone(),
        );
        r.register(
            "historian_rows_ingested",
            "Rows accepted",
            self.rows_ingested.clone(),
        );
        r.register(
            "historian_lines_rejected",
            "Lines rejected",
            self.lines_rejected.clone(),
        );
        r.register(
            "historian_writes_throttled",
            "Writes refused with 503 because the buffer was full",
            self.writes_throttled.clone(),
        );
        r.register(
            "historian_wal_writes",
            "WAL records written",
            self.wal_writes.clone(),
        );
        r.register(
            "historian_wal_bytes",
            "WAL bytes written",
            self.wal_bytes.clone(),
        );
        r.register(
            "historian_wal_fsyncs",
            "WAL fsync calls",
            self.wal_fsyncs.clone(),
        );
        r.register(
            "historian_wal_fsync_seconds",
            "WAL fsync latency",
            self.wal_fsync_seconds.clone(),
        );
        r.register(
            "historian_wal_segments",
            "WAL segments on disk",
            self.wal_segments.clone(),
        );
        r.register(
            "historian_buffer_bytes",
            "Bytes held by the write buffer",
            self.buffer_bytes.clone(),
        );
        r.register(
            "historian_buffer_rows",
            "Rows held by the write buffer",
            self.buffer_rows.clone(),
        );
        r.register(
            "historian_files_flushed",
            "Parquet files written by flushes",
            self.files_flushed.clone(),
        );
        r.register(
            "historian_files_compacted",
            "Parquet files written by compaction",
            self.files_compacted.clone(),
        );
        r.register("historian_files", "Live Parquet files", self.files.clone());
        r.register(
            "historian_partitions",
            "Partitions with live files",
            self.partitions.clone(),
        );
        r.register(
            "historian_parquet_bytes_written",
            "Bytes of Parquet written",
            self.parquet_bytes_written.clone(),
        );
        r.register(
            "historian_flush_errors",
            "Flushes that failed and will be retried",
            self.flush_errors.clone(),
        );
        r.register(
            "historian_partitions_expired",
            "Partitions deleted by retention",
            self.partitions_expired.clone(),
        );
    }
}
