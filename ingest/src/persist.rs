//! The persister: writes buffered partitions to Parquet, commits them to the manifest,
//! retires WAL segments, compacts small files and applies retention.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parking_lot::Mutex;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use store::{
    DeletionVector, FileMeta, Lake, Layout, Manifest, ManifestError, ManifestStore, PartitionKey,
    PendingDelete, TIME_COLUMN,
};

use crate::buffer::{FlushCandidate, FlushSnapshot, WriteBuffer};
use crate::catalog::Catalog;
use crate::failpoint;
use crate::merge::{MergeInput, SortedMerge};
use crate::metrics::IngestMetrics;
use crate::upload::{LakeSink, UploadJournal};
use crate::wal::Wal;
use store::dedup::{BatchStats, concat_aligned, filter_horizon, sort_dedup, stats};

/// Errors of flushing, compaction and retention.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The manifest could not be read or committed.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The object store failed.
    #[error("object store error on {path}: {source}")]
    Store {
        /// Object path.
        path: String,
        /// Cause.
        #[source]
        source: object_store::Error,
    },
    /// Parquet encoding or decoding failed.
    #[error("parquet error on {path}: {source}")]
    Parquet {
        /// Object path.
        path: String,
        /// Cause.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// Arrow compute failed.
    #[error("arrow error: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A deletion vector could not be read.
    #[error(transparent)]
    Deletes(#[from] store::deletes::DeletesError),
    /// The journal of multipart uploads could not be read or written.
    #[error(transparent)]
    Journal(#[from] crate::upload::JournalError),
    /// A blocking task failed.
    #[error("background task failed: {0}")]
    Task(String),
}

/// Settings of flushing and compaction.
#[derive(Debug, Clone)]
pub struct PersistConfig {
    /// A partition is flushed once it holds this many bytes.
    pub flush_bytes: usize,
    /// A partition is flushed once its oldest row waited this long.
    pub flush_age: Duration,
    /// Files at least this large are left alone by compaction.
    pub target_file_bytes: u64,
    /// A partition still receiving writes is compacted past this many files.
    pub max_files_per_partition: usize,
    /// Compaction reads at most this many bytes of Parquet per run (memory bound).
    pub compaction_max_input_bytes: u64,
    /// Replaced files are deleted after this long (longer than the query time limit).
    pub deletion_grace: Duration,
    /// A partition that has not been written to for this long counts as closed and is
    /// compacted down to one file (within the input bound).
    pub closed_after: Duration,
    /// zstd level of flushed files.
    pub flush_zstd_level: i32,
    /// zstd level of compacted files.
    pub compaction_zstd_level: i32,
    /// Local directory of the multipart uploads in flight (S3 lakes), so that recovery
    /// can abort those a crash interrupted. None: not journaled.
    pub upload_journal: Option<std::path::PathBuf>,
}

impl Default for PersistConfig {
    fn default() -> Self {
        PersistConfig {
            flush_bytes: 64 << 20,
            flush_age: Duration::from_secs(60),
            target_file_bytes: 256 << 20,
            max_files_per_partition: 4,
            // The merge holds its inputs' compressed bytes and one decoded batch per input.
            compaction_max_input_bytes: 512 << 20,
            deletion_grace: Duration::from_secs(600),
            closed_after: Duration::from_secs(600),
            flush_zstd_level: 1,
            compaction_zstd_level: 3,
            upload_journal: None,
        }
    }
}

type TableKey = (String, String);

/// Writes the lake.
pub struct Persister {
    lake: Lake,
    layout: Layout,
    manifests: ManifestStore,
    tables: Mutex<HashMap<TableKey, Arc<tokio::sync::Mutex<Manifest>>>>,
    /// The latest committed manifest of each table, for readers that must not wait for a
    /// commit in progress.
    published: Mutex<HashMap<TableKey, Arc<Manifest>>>,
    counts: Mutex<HashMap<TableKey, (usize, usize)>>,
    /// Per table, when each partition was last flushed to (to tell closed partitions).
    last_flush: Mutex<HashMap<(TableKey, String), std::time::Instant>>,
    catalog: Arc<Catalog>,
    buffer: Arc<WriteBuffer>,
    wal: OnceLock<Arc<Wal>>,
    metrics: Arc<IngestMetrics>,
    config: PersistConfig,
    flush_lock: tokio::sync::Mutex<()>,
    /// Held while files are rewritten (compaction) or given deletion vectors (erasure), so
    /// neither works from a manifest the other has changed since it read it.
    rewrite_lock: tokio::sync::Mutex<()>,
    /// Data keys destroyed by erasure: rows with cells under them are never written again.
    erased: Mutex<Arc<HashSet<u64>>>,
}

impl std::fmt::Debug for Persister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persister")
            .field("lake", &self.lake.url)
            .finish()
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn now_ms() -> i64 {
    now_ns() / 1_000_000
}

/// The most rows a data page of a lake file holds.
const DATA_PAGE_ROWS: usize = 8_192;

/// The Parquet settings of every file the persister writes: zstd at `zstd_level`,
/// dictionaries (delta encoding for time and sequence), page statistics (page indexes), and
/// the tags-then-time sort order recorded.
pub fn writer_props(schema: &arrow::datatypes::Schema, zstd_level: i32) -> WriterProperties {
    // Sorted by tags then time, as the rows are.
    let sorting: Vec<SortingColumn> = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| store::dedup::is_tag(f))
        .map(|(i, _)| i)
        .chain(schema.index_of(TIME_COLUMN).ok())
        .map(|i| SortingColumn {
            column_idx: i as i32,
            descending: false,
            nulls_first: true,
        })
        .collect();
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(zstd_level).unwrap_or_default(),
        ))
        .set_dictionary_enabled(true)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_sorting_columns(Some(sorting))
        // Pages of at most 8,192 rows: about one series' day at 10 s, so that a page's
        // tag min/max mostly name one series and the page index finds a series' rows. The
        // default (20,000) spans several series, whose names range widely when the page
        // crosses from one value of an earlier sort column to the next.
        .set_data_page_row_count_limit(DATA_PAGE_ROWS)
        .set_max_row_group_row_count(Some(1 << 20));
    // Timestamps and sequence numbers rise within a series: their deltas are nearly
    // constant, so delta encoding packs them into a few bits per row and decodes them with
    // a running sum. A dictionary holds every distinct timestamp of a row group and makes
    // every read unpack an index and look it up, which the time-range filter of nearly
    // every query pays on every row it scans.
    for column in [TIME_COLUMN, store::SEQ_COLUMN] {
        if schema.index_of(column).is_ok() {
            let column = ColumnPath::from(column);
            props = props
                .set_column_dictionary_enabled(column.clone(), false)
                .set_column_encoding(column, Encoding::DELTA_BINARY_PACKED);
        }
    }
    // Ciphertext is random: every cell is distinct and nothing compresses, and its min/max
    // prune nothing. Dictionary, compression and page statistics would only cost CPU.
    for f in schema.fields() {
        if f.name().ends_with(store::CIPHER_SUFFIX) {
            let column = ColumnPath::from(f.name().as_str());
            props = props
                .set_column_dictionary_enabled(column.clone(), false)
                .set_column_compression(column.clone(), Compression::UNCOMPRESSED)
                .set_column_statistics_enabled(column, EnabledStatistics::Chunk);
        }
    }
    props.build()
}

/// Deletes the temporary files a local-disk upload leaves when the process dies mid-write
/// (`part-….parquet#N`); the object store's listing hides them.
fn remove_local_temp_files(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            remove_local_temp_files(&path);
        } else if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(".parquet#"))
        {
            tracing::info!(path = %path.display(), "deleting the temporary file of an interrupted write");
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete temporary file");
            }
        }
    }
}

/// A Parquet file being uploaded to the lake.
type ParquetUpload = AsyncArrowWriter<LakeSink>;

/// The `n` consecutive files (or all, if fewer) with the fewest bytes together.
fn lightest_window(files: &[FileMeta], n: usize) -> std::ops::Range<usize> {
    let n = n.min(files.len());
    (0..=files.len() - n)
        .min_by_key(|&i| files[i..i + n].iter().map(|f| f.bytes).sum::<u64>())
        .map_or(0..0, |i| i..i + n)
}

fn random_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Persister {
    /// A persister over a lake.
    pub fn new(
        lake: Lake,
        catalog: Arc<Catalog>,
        buffer: Arc<WriteBuffer>,
        metrics: Arc<IngestMetrics>,
        config: PersistConfig,
    ) -> Self {
        let layout = Layout::new(lake.root.clone());
        let manifests = ManifestStore::new(lake.store.clone(), layout.clone());
        Persister {
            lake,
            layout,
            manifests,
            tables: Mutex::new(HashMap::new()),
            published: Mutex::new(HashMap::new()),
            counts: Mutex::new(HashMap::new()),
            last_flush: Mutex::new(HashMap::new()),
            catalog,
            buffer,
            wal: OnceLock::new(),
            metrics,
            config,
            flush_lock: tokio::sync::Mutex::new(()),
            rewrite_lock: tokio::sync::Mutex::new(()),
            erased: Mutex::new(Arc::new(HashSet::new())),
        }
    }

    /// How long replaced files stay before deletion.
    pub fn deletion_grace(&self) -> std::time::Duration {
        self.config.deletion_grace
    }

    /// Sets the data keys destroyed by erasure, whose rows flushes and compactions drop.
    pub fn set_erased(&self, erased: HashSet<u64>) {
        *self.erased.lock() = Arc::new(erased);
    }

    fn erased(&self) -> Arc<HashSet<u64>> {
        self.erased.lock().clone()
    }

    /// Hides the rows under erased keys: every file that may hold them (by its key bitmap)
    /// gets a deletion vector naming those rows, committed to the manifest, so readers skip
    /// them at once; compaction then rewrites the files without them (see
    /// [`Persister::compact`]). A file left with no rows leaves the manifest. Idempotent:
    /// a file whose vector already covers its erased rows is left alone. Returns how many
    /// files got a new or larger deletion vector.
    pub async fn hide_erased(&self) -> Result<usize, PersistError> {
        let _rewriting = self.rewrite_lock.lock().await;
        let erased = self.erased();
        if erased.is_empty() {
            return Ok(0);
        }
        let mut hidden = 0;
        for (db, table) in self.manifest_tables() {
            let personal = self
                .catalog
                .table(&db, &table)
                .is_some_and(|t| !t.options.subjects.is_empty());
            if !personal {
                continue;
            }
            let manifest = self.manifest(&db, &table).await;
            let mut vectors: HashMap<String, Option<DeletionVector>> = HashMap::new();
            let mut stale = Vec::new();
            for f in &manifest.files {
                if !f.may_hold_keys(&erased) {
                    continue;
                }
                let mut rows = match &f.deletes {
                    Some(d) => store::deletes::load(self.lake.store.as_ref(), &d.path).await?,
                    None => roaring::RoaringTreemap::new(),
                };
                let before = rows.len();
                let file =
                    store::reader::LakeFileReader::new(self.lake.store.clone(), &f.path, f.bytes);
                rows |= crate::erasure::erased_rows(file, &erased)
                    .await
                    .map_err(|source| PersistError::Parquet {
                        path: f.path.clone(),
                        source,
                    })?;
                if rows.len() == before {
                    continue;
                }
                hidden += 1;
                stale.extend(f.deletes.iter().map(|d| d.path.clone()));
                if rows.len() >= f.rows {
                    // Nothing of the file is left to read.
                    vectors.insert(f.path.clone(), None);
                    continue;
                }
                let path = store::deletes::vector_path(&f.path, &random_id());
                self.lake
                    .store
                    .put(&path, store::deletes::encode(&rows).into())
                    .await
                    .map_err(|source| PersistError::Store {
                        path: path.to_string(),
                        source,
                    })?;
                vectors.insert(
                    f.path.clone(),
                    Some(DeletionVector {
                        path: path.to_string(),
                        rows: rows.len(),
                    }),
                );
            }
            if vectors.is_empty() {
                continue;
            }
            let delete_after_ms = now_ms() + self.config.deletion_grace.as_millis() as i64;
            let committed = self
                .commit(&db, &table, |m| {
                    let mut gone = Vec::new();
                    m.files.retain_mut(|f| match vectors.get(&f.path) {
                        None => true,
                        Some(Some(v)) => {
                            f.deletes = Some(v.clone());
                            true
                        }
                        Some(None) => {
                            gone.push(f.path.clone());
                            false
                        }
                    });
                    m.pending_deletes
                        .extend(gone.into_iter().chain(stale).map(|path| PendingDelete {
                            path,
                            delete_after_ms,
                        }));
                })
                .await;
            if let Err(e) = committed {
                for v in vectors.values().flatten() {
                    let _ = self.lake.store.delete(&Path::from(v.path.as_str())).await;
                }
                return Err(e);
            }
            tracing::info!(
                db,
                table,
                files = vectors.len(),
                "erased rows hidden by deletion vectors"
            );
        }
        Ok(hidden)
    }

    /// Hands the persister the WAL whose segments it retires.
    pub fn set_wal(&self, wal: Arc<Wal>) {
        let _ = self.wal.set(wal);
    }

    /// The object store.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.lake.store.clone()
    }

    /// The lake layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn set_counts(&self, key: &TableKey, m: &Manifest) {
        let partitions = m.files_by_partition().len();
        let mut counts = self.counts.lock();
        counts.insert(key.clone(), (m.files.len(), partitions));
        let (f, p) = counts
            .values()
            .fold((0, 0), |(f, p), (a, b)| (f + a, p + b));
        self.metrics.files.set(f as i64);
        self.metrics.partitions.set(p as i64);
    }

    fn manifest_handle(&self, db: &str, table: &str) -> Arc<tokio::sync::Mutex<Manifest>> {
        let key = (db.to_string(), table.to_string());
        self.tables
            .lock()
            .entry(key)
            .or_insert_with(|| {
                let g = self.catalog.options_for(table).partition;
                Arc::new(tokio::sync::Mutex::new(Manifest::empty(db, table, g)))
            })
            .clone()
    }

    /// The latest manifest of a table (empty if none).
    pub async fn manifest(&self, db: &str, table: &str) -> Manifest {
        self.manifest_handle(db, table).lock().await.clone()
    }

    /// The latest committed manifest of a table, without waiting for a commit in progress.
    pub fn published_manifest(&self, db: &str, table: &str) -> Option<Arc<Manifest>> {
        self.published
            .lock()
            .get(&(db.to_string(), table.to_string()))
            .cloned()
    }

    /// All (db, table) pairs with a manifest.
    pub fn manifest_tables(&self) -> Vec<TableKey> {
        let mut v: Vec<_> = self.tables.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// Loads every manifest, restores the catalog's schemas from them and deletes files
    /// that no manifest lists (uploads cut short by a crash). Returns, per table and
    /// partition, the highest persisted write sequence, for WAL replay to skip.
    pub async fn recover(&self) -> Result<HashMap<(String, String, String), u64>, PersistError> {
        let mut persisted = HashMap::new();
        if let Some((s3, journal)) = self.multipart() {
            let aborted = journal.abort_all(s3.as_ref()).await?;
            if aborted > 0 {
                tracing::info!(
                    aborted,
                    "aborted the multipart uploads of an interrupted run"
                );
            }
        }
        // Tables with data directories but no manifest yet crashed before their first
        // commit: everything in them is an orphan.
        let mut tables: Vec<(String, String)> = self.manifests.list_tables().await?;
        tables.extend(self.manifests.list_table_dirs().await?);
        tables.sort();
        tables.dedup();
        for (db, table) in tables {
            let manifest = self.manifests.load(&db, &table).await?;
            if let Some(m) = &manifest {
                self.catalog.restore_table(&db, &table, &m.schema);
                for (p, s) in &m.persisted_seq {
                    persisted.insert((db.clone(), table.clone(), p.clone()), *s);
                }
            }
            let known: HashSet<&str> = manifest
                .iter()
                .flat_map(|m| {
                    m.files
                        .iter()
                        .flat_map(FileMeta::objects)
                        .chain(m.pending_deletes.iter().map(|d| d.path.as_str()))
                })
                .collect();
            let dir = self.layout.table_dir(&db, &table);
            let objects: Vec<_> = self
                .lake
                .store
                .list(Some(&dir))
                .try_collect()
                .await
                .map_err(|source| PersistError::Store {
                    path: dir.to_string(),
                    source,
                })?;
            for o in objects {
                if !known.contains(o.location.as_ref()) {
                    tracing::info!(path = %o.location, "deleting a file no manifest lists (interrupted upload)");
                    if let Err(e) = self.lake.store.delete(&o.location).await {
                        tracing::warn!(path = %o.location, error = %e, "could not delete orphan file");
                    }
                }
            }
            if let Some(local) = &self.lake.local_dir {
                remove_local_temp_files(&local.join(dir.as_ref()));
            }
            if let Some(m) = manifest {
                let key = (db.clone(), table.clone());
                self.set_counts(&key, &m);
                self.published
                    .lock()
                    .insert(key.clone(), Arc::new(m.clone()));
                self.tables
                    .lock()
                    .insert(key, Arc::new(tokio::sync::Mutex::new(m)));
            }
        }
        Ok(persisted)
    }

    /// Commits a change to a table's manifest: `change` edits a copy of the latest version.
    async fn commit(
        &self,
        db: &str,
        table: &str,
        change: impl FnOnce(&mut Manifest),
    ) -> Result<Manifest, PersistError> {
        let handle = self.manifest_handle(db, table);
        let mut current = handle.lock().await;
        let mut next = current.clone();
        next.version += 1;
        if let Some(t) = self.catalog.table(db, table) {
            next.schema.merge(&t.schema());
        }
        change(&mut next);
        failpoint::hit("manifest_commit");
        self.manifests.commit(&next).await?;
        *current = next.clone();
        let key = (db.to_string(), table.to_string());
        self.set_counts(&key, &next);
        self.published.lock().insert(key, Arc::new(next.clone()));
        Ok(next)
    }

    /// The multipart store and journal of uploads, when the lake has upload ids to journal.
    fn multipart(
        &self,
    ) -> Option<(
        Arc<dyn object_store::multipart::MultipartStore>,
        UploadJournal,
    )> {
        let s3 = self.lake.s3.clone()?;
        let dir = self.config.upload_journal.clone()?;
        Some((s3, UploadJournal::new(dir)))
    }

    /// Starts a Parquet upload to `path` with the persister's settings.
    fn open_upload(
        &self,
        path: &Path,
        schema: SchemaRef,
        zstd_level: i32,
    ) -> Result<ParquetUpload, PersistError> {
        let sink = LakeSink::open(self.lake.store.clone(), self.multipart(), path.clone());
        let props = writer_props(&schema, zstd_level);
        AsyncArrowWriter::try_new(sink, schema, Some(props)).map_err(|source| {
            PersistError::Parquet {
                path: path.to_string(),
                source,
            }
        })
    }

    /// Ends an upload. `publish` says how writing went: `Ok(true)` finishes the file and
    /// returns its size; `Ok(false)` (nothing to publish) or an error aborts the upload, so
    /// no half-finished multipart upload is left on object storage.
    async fn close_upload(
        &self,
        path: &Path,
        mut writer: ParquetUpload,
        publish: Result<bool, PersistError>,
    ) -> Result<Option<u64>, PersistError> {
        let outcome = match publish {
            Ok(true) => {
                writer
                    .finish()
                    .await
                    .map(|_| true)
                    .map_err(|source| PersistError::Parquet {
                        path: path.to_string(),
                        source,
                    })
            }
            other => other,
        };
        if !matches!(outcome, Ok(true)) {
            let mut sink = writer.into_inner();
            if let Err(abort) = sink.abort().await {
                tracing::warn!(path = %path, error = %abort, "could not abort the upload");
            }
            return outcome.map(|_| None);
        }
        let meta = self
            .lake
            .store
            .head(path)
            .await
            .map_err(|source| PersistError::Store {
                path: path.to_string(),
                source,
            })?;
        self.metrics.parquet_bytes_written.inc_by(meta.size);
        Ok(Some(meta.size))
    }

    async fn write_file(
        &self,
        path: &Path,
        batch: &RecordBatch,
        zstd_level: i32,
    ) -> Result<u64, PersistError> {
        let mut writer = self.open_upload(path, batch.schema(), zstd_level)?;
        // Write in slices so a large batch streams out as several pages and parts.
        let step = 65_536;
        let mut offset = 0;
        let mut result = Ok(());
        while offset < batch.num_rows() && result.is_ok() {
            let len = step.min(batch.num_rows() - offset);
            result = writer.write(&batch.slice(offset, len)).await;
            offset += len;
            if offset >= batch.num_rows() / 2 {
                failpoint::hit("parquet_upload");
            }
        }
        let publish = result
            .map(|_| true)
            .map_err(|source| PersistError::Parquet {
                path: path.to_string(),
                source,
            });
        // Publishing always yields a size; None only follows an error, returned above.
        Ok(self.close_upload(path, writer, publish).await?.unwrap_or(0))
    }

    /// Writes one partition's buffered rows to a Parquet file and commits it.
    pub async fn flush(
        &self,
        db: &str,
        table: &str,
        partition: PartitionKey,
    ) -> Result<bool, PersistError> {
        let Some(snapshot) = self
            .buffer
            .begin_flush(db, table, partition, self.config.flush_bytes)
        else {
            return Ok(false);
        };
        match self.flush_snapshot(&snapshot).await {
            Ok(()) => {
                self.buffer.finish_flush(&snapshot);
                Ok(true)
            }
            Err(e) => {
                self.buffer.abort_flush(&snapshot);
                self.metrics.flush_errors.inc();
                Err(e)
            }
        }
    }

    async fn flush_snapshot(&self, snapshot: &FlushSnapshot) -> Result<(), PersistError> {
        let Some(table) = self.catalog.table(&snapshot.db, &snapshot.table) else {
            return Ok(());
        };
        let schema = table.schema();
        let target = schema.arrow_schema();
        let horizon = table.options.horizon(now_ns());
        let batches = snapshot.batches.clone();
        let erased = self.erased();
        let batch = tokio::task::spawn_blocking(move || -> Result<RecordBatch, PersistError> {
            let all = concat_aligned(&batches, &target)?;
            let live = filter_horizon(&all, horizon)?;
            let kept = crate::erasure::drop_erased(&live, &erased)?;
            Ok(sort_dedup(&kept)?)
        })
        .await
        .map_err(|e| PersistError::Task(e.to_string()))??;
        let partition_dir = snapshot.partition.dir();
        let file = if batch.num_rows() > 0 {
            let s = stats(&batch);
            let id = format!("{:020}-{}", s.max_seq, random_id());
            let path =
                self.layout
                    .data_file(&snapshot.db, &snapshot.table, &snapshot.partition, &id);
            let bytes = self
                .write_file(&path, &batch, self.config.flush_zstd_level)
                .await?;
            self.metrics.files_flushed.inc();
            Some(FileMeta {
                path: path.to_string(),
                partition: partition_dir.clone(),
                rows: s.rows,
                bytes,
                min_time: s.min_time,
                max_time: s.max_time,
                min_seq: s.min_seq,
                max_seq: s.max_seq,
                schema_version: schema.version,
                compacted: false,
                key_ids: crate::erasure::encode_key_ids(&crate::erasure::key_ids(&batch)),
                deletes: None,
            })
        } else {
            None
        };
        let max_seq = snapshot.max_seq;
        let path = file.as_ref().map(|f| f.path.clone());
        let committed = self
            .commit(&snapshot.db, &snapshot.table, |m| {
                if let Some(f) = file {
                    m.files.push(f);
                }
                let e = m.persisted_seq.entry(partition_dir.clone()).or_insert(0);
                *e = (*e).max(max_seq);
            })
            .await;
        if let Err(e) = committed {
            if let Some(p) = path {
                let _ = self.lake.store.delete(&Path::from(p)).await;
            }
            return Err(e);
        }
        self.last_flush.lock().insert(
            ((snapshot.db.clone(), snapshot.table.clone()), partition_dir),
            std::time::Instant::now(),
        );
        Ok(())
    }

    /// Flushes what is due: partitions past the size or age threshold, or every partition
    /// when `force`; under memory pressure the largest first until below half the limit.
    /// Then retires WAL segments.
    pub async fn run_once(&self, force: bool) -> Result<(), PersistError> {
        let _guard = self.flush_lock.lock().await;
        let mut first_error = None;
        // A flush takes at most flush_bytes of a partition, so a big partition (or a
        // forced flush of everything) takes several rounds.
        for _round in 0..256 {
            let mut candidates = self.buffer.candidates();
            candidates.sort_by_key(|c| std::cmp::Reverse(c.bytes));
            let mut pressure = self
                .buffer
                .bytes()
                .saturating_sub(self.buffer.limit_bytes() / 2);
            let mut flushed = 0;
            for c in candidates {
                let due = force
                    || c.bytes >= self.config.flush_bytes
                    || c.age >= self.config.flush_age
                    || pressure > 0;
                if !due {
                    continue;
                }
                pressure = pressure.saturating_sub(c.bytes.min(self.config.flush_bytes));
                let FlushCandidate {
                    db,
                    table,
                    partition,
                    ..
                } = c;
                match self.flush(&db, &table, partition).await {
                    Ok(true) => flushed += 1,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(db, table, partition = %partition, error = %e, "flush failed; will retry");
                        first_error.get_or_insert(e);
                    }
                }
            }
            if flushed == 0 || first_error.is_some() {
                break;
            }
            self.retire_wal();
        }
        self.retire_wal();
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Compacts every table that needs it. Runs beside flushing, so a steady stream of
    /// flushes cannot starve it.
    pub async fn compact_all(&self) -> Result<(), PersistError> {
        let mut first_error = None;
        for (db, table) in self.manifest_tables() {
            if let Err(e) = self.compact(&db, &table).await {
                tracing::error!(db, table, error = %e, "compaction failed; will retry");
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Deletes WAL segments whose rows are all persisted.
    pub fn retire_wal(&self) {
        if let Some(wal) = self.wal.get() {
            let below = self.buffer.persisted_below(wal.last_seq() + 1);
            wal.retire(below.saturating_sub(1), &self.metrics);
        }
    }

    /// Flushes everything in the buffer (shutdown).
    pub async fn flush_all(&self) -> Result<(), PersistError> {
        self.run_once(true).await
    }

    /// Merges small files of partitions that hold too many.
    pub async fn compact(&self, db: &str, table: &str) -> Result<(), PersistError> {
        let manifest = self.manifest(db, table).await;
        let key = (db.to_string(), table.to_string());
        let partitions: Vec<(String, Vec<FileMeta>)> = manifest
            .files_by_partition()
            .into_iter()
            .map(|(p, fs)| (p.to_string(), fs.into_iter().cloned().collect()))
            .collect();
        for (partition, files) in partitions {
            // Rows hidden by deletion vectors (erasure) leave the lake at the next run.
            let with_deletes: Vec<FileMeta> = files
                .iter()
                .filter(|f| f.deletes.is_some())
                .cloned()
                .collect();
            if !with_deletes.is_empty() {
                self.compact_files(db, table, &partition, with_deletes)
                    .await?;
                continue;
            }
            let closed = self
                .last_flush
                .lock()
                .get(&(key.clone(), partition.clone()))
                .is_none_or(|t| t.elapsed() >= self.config.closed_after);
            let limit = if closed {
                1
            } else {
                self.config.max_files_per_partition
            };
            if files.len() <= limit {
                continue;
            }
            let files_count = files.len();
            let mut small: Vec<FileMeta> = files
                .into_iter()
                .filter(|f| f.bytes < self.config.target_file_bytes)
                .collect();
            // A partition still being written merges only a few of its files, just enough
            // to get back under the limit: re-merging its big file at every flush would
            // cost work quadratic in the partition's size. They are neighbours in time,
            // the smallest such run: a merge of files far apart in time spans the files
            // between them, and every query of that stretch then merges them all (the
            // smallest files, chosen by size alone, left the hot partition of a load in
            // files that each overlapped all the others). A closed partition merges all,
            // in time order as far as one merge may take.
            small.sort_by_key(|f| (f.min_time, f.max_time));
            let candidates: Vec<FileMeta> = if closed {
                small
            } else {
                let window = lightest_window(&small, (files_count - limit + 1).max(2));
                small.drain(window).collect()
            };
            let mut chosen = Vec::new();
            let mut total = 0;
            for f in candidates {
                if total + f.bytes > self.config.compaction_max_input_bytes && chosen.len() >= 2 {
                    break;
                }
                total += f.bytes;
                chosen.push(f);
            }
            if chosen.len() < 2 {
                continue;
            }
            self.compact_files(db, table, &partition, chosen).await?;
        }
        Ok(())
    }

    async fn read_bytes(&self, path: &str) -> Result<bytes::Bytes, PersistError> {
        let p = Path::from(path);
        let err = |source| PersistError::Store {
            path: path.to_string(),
            source,
        };
        self.lake
            .store
            .get(&p)
            .await
            .map_err(err)?
            .bytes()
            .await
            .map_err(err)
    }

    async fn compact_files(
        &self,
        db: &str,
        table: &str,
        partition: &str,
        chosen: Vec<FileMeta>,
    ) -> Result<(), PersistError> {
        let Some(t) = self.catalog.table(db, table) else {
            return Ok(());
        };
        let schema = t.schema();
        let target = schema.arrow_schema();
        let Some(key) = t.options.partition.parse_dir(partition) else {
            return Ok(());
        };
        let _rewriting = self.rewrite_lock.lock().await;
        // The files as the manifest holds them now: an erasure may have given one a
        // deletion vector since they were chosen.
        let current = self.manifest(db, table).await;
        let chosen: Vec<FileMeta> = chosen
            .iter()
            .filter_map(|c| current.files.iter().find(|f| f.path == c.path).cloned())
            .collect();
        if chosen.is_empty() {
            return Ok(());
        }
        let mut inputs = Vec::with_capacity(chosen.len());
        for f in &chosen {
            let bytes = self.read_bytes(&f.path).await?;
            let kept = store::deletes::kept_rows(self.lake.store.as_ref(), f).await?;
            inputs.push(MergeInput { bytes, kept });
        }
        let horizon = t.options.horizon(now_ns());
        let erased = self.erased();
        // The merge decodes on a blocking thread and hands sorted batches to the upload.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<RecordBatch, PersistError>>(2);
        let merge_target = target.clone();
        let merging = tokio::task::spawn_blocking(move || {
            let run = || -> Result<(), PersistError> {
                let mut merge = SortedMerge::new(inputs, merge_target)?;
                while let Some(batch) = merge.next_batch()? {
                    let live = filter_horizon(&batch, horizon)?;
                    let live = crate::erasure::drop_erased(&live, &erased)?;
                    if live.num_rows() > 0 && tx.blocking_send(Ok(live)).is_err() {
                        break;
                    }
                }
                Ok(())
            };
            if let Err(e) = run() {
                let _ = tx.blocking_send(Err(e));
            }
        });
        let max_seq = chosen.iter().map(|f| f.max_seq).max().unwrap_or(0);
        let id = format!("{max_seq:020}-c{}", random_id());
        let path = self.layout.data_file(db, table, &key, &id);
        let mut writer =
            self.open_upload(&path, target.clone(), self.config.compaction_zstd_level)?;
        let mut totals: Option<BatchStats> = None;
        let mut key_ids = roaring::RoaringTreemap::new();
        let mut failure: Option<PersistError> = None;
        while let Some(next) = rx.recv().await {
            let batch = match next {
                Ok(b) => b,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            let s = stats(&batch);
            totals = Some(totals.map_or(s, |t| t.merge(s)));
            key_ids |= crate::erasure::key_ids(&batch);
            if let Err(source) = writer.write(&batch).await {
                failure = Some(PersistError::Parquet {
                    path: path.to_string(),
                    source,
                });
                break;
            }
        }
        drop(rx);
        let _ = merging.await;
        let publish = match failure {
            Some(e) => Err(e),
            None => Ok(totals.is_some()),
        };
        let bytes = self.close_upload(&path, writer, publish).await?;
        let new_file = totals.zip(bytes).map(|(s, bytes)| {
            self.metrics.files_compacted.inc();
            FileMeta {
                path: path.to_string(),
                partition: partition.to_string(),
                rows: s.rows,
                bytes,
                min_time: s.min_time,
                max_time: s.max_time,
                min_seq: s.min_seq,
                max_seq: s.max_seq,
                schema_version: schema.version,
                compacted: true,
                key_ids: crate::erasure::encode_key_ids(&key_ids),
                deletes: None,
            }
        });
        let replaced: HashSet<String> = chosen
            .iter()
            .flat_map(FileMeta::objects)
            .map(str::to_string)
            .collect();
        let delete_after_ms = now_ms() + self.config.deletion_grace.as_millis() as i64;
        let new_path = new_file.as_ref().map(|f| f.path.clone());
        let result = self
            .commit(db, table, |m| {
                m.files.retain(|f| !replaced.contains(&f.path));
                m.files.extend(new_file);
                m.pending_deletes
                    .extend(replaced.iter().map(|p| PendingDelete {
                        path: p.clone(),
                        delete_after_ms,
                    }));
            })
            .await;
        if let Err(e) = result {
            if let Some(p) = new_path {
                let _ = self.lake.store.delete(&Path::from(p)).await;
            }
            return Err(e);
        }
        tracing::info!(
            db,
            table,
            partition,
            files = chosen.len(),
            "compacted partition files"
        );
        Ok(())
    }

    /// Applies retention: drops expired partitions from manifests (logging each) and
    /// deletes files whose grace period has passed.
    pub async fn sweep(&self) -> Result<(), PersistError> {
        let now = now_ns();
        let now_ms = now / 1_000_000;
        for (db, table) in self.manifest_tables() {
            let m = self.manifest(&db, &table).await;
            let options = self.catalog.options_for(&table);
            let granularity = options.partition;
            let expired: BTreeMap<String, usize> = m
                .files_by_partition()
                .into_iter()
                .filter(|(p, _)| {
                    granularity
                        .parse_dir(p)
                        .is_some_and(|k| options.partition_expired(&k, now))
                })
                .map(|(p, fs)| (p.to_string(), fs.len()))
                .collect();
            let due: Vec<PendingDelete> = m
                .pending_deletes
                .iter()
                .filter(|d| d.delete_after_ms <= now_ms)
                .cloned()
                .collect();
            if expired.is_empty() && due.is_empty() {
                continue;
            }
            for d in &due {
                match self.lake.store.delete(&Path::from(d.path.as_str())).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(source) => {
                        return Err(PersistError::Store {
                            path: d.path.clone(),
                            source,
                        });
                    }
                }
            }
            let grace = now_ms + self.config.deletion_grace.as_millis() as i64;
            let due_paths: HashSet<String> = due.iter().map(|d| d.path.clone()).collect();
            self.commit(&db, &table, |m| {
                m.pending_deletes.retain(|d| !due_paths.contains(&d.path));
                let (gone, keep): (Vec<FileMeta>, Vec<FileMeta>) = std::mem::take(&mut m.files)
                    .into_iter()
                    .partition(|f| expired.contains_key(&f.partition));
                m.files = keep;
                m.pending_deletes
                    .extend(
                        gone.iter()
                            .flat_map(FileMeta::objects)
                            .map(|path| PendingDelete {
                                path: path.to_string(),
                                delete_after_ms: grace,
                            }),
                    );
            })
            .await?;
            for (p, n) in expired {
                self.metrics.partitions_expired.inc();
                tracing::info!(
                    db,
                    table,
                    partition = p,
                    files = n,
                    "retention: partition expired and scheduled for deletion"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod props_tests {
    use super::*;
    use arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn the_lightest_window_is_the_run_of_neighbours_with_the_fewest_bytes() {
        let file = |bytes: u64| FileMeta {
            path: String::new(),
            partition: String::new(),
            rows: 1,
            bytes,
            min_time: 0,
            max_time: 0,
            min_seq: 0,
            max_seq: 0,
            schema_version: 1,
            compacted: false,
            key_ids: None,
            deletes: None,
        };
        let files: Vec<FileMeta> = [5, 90, 4, 3, 80, 1].into_iter().map(file).collect();
        assert_eq!(lightest_window(&files, 2), 2..4);
        assert_eq!(lightest_window(&files, 3), 3..6);
        assert_eq!(lightest_window(&files, 9), 0..6);
        assert_eq!(lightest_window(&[], 2), 0..0);
    }

    #[test]
    fn ciphertext_columns_skip_dictionary_compression_and_page_statistics() {
        let schema = Schema::new(vec![
            Field::new("operator_id__enc", DataType::Binary, true),
            Field::new("job_id", DataType::Utf8, true),
        ]);
        let props = writer_props(&schema, 3);
        let cells = ColumnPath::from("operator_id__enc");
        let job = ColumnPath::from("job_id");
        assert_eq!(props.compression(&cells), Compression::UNCOMPRESSED);
        assert!(!props.dictionary_enabled(&cells));
        assert_eq!(props.statistics_enabled(&cells), EnabledStatistics::Chunk);
        assert!(matches!(props.compression(&job), Compression::ZSTD(_)));
        assert!(props.dictionary_enabled(&job));
        assert_eq!(props.statistics_enabled(&job), EnabledStatistics::Page);
    }

    /// A lake file of `series` series of 8,640 rows each (a day at 10 s), sorted by series
    /// and time, written with the lake's properties: the file, its reader (with the page
    /// index) and the rows written.
    fn series_days(
        series: usize,
    ) -> (
        bytes::Bytes,
        parquet::file::serialized_reader::SerializedFileReader<bytes::Bytes>,
        RecordBatch,
    ) {
        use arrow::array::{StringArray, TimestampNanosecondArray, UInt64Array};
        use parquet::arrow::ArrowWriter;
        use parquet::file::serialized_reader::{ReadOptionsBuilder, SerializedFileReader};

        let rows = series * 8_640;
        let schema = Arc::new(Schema::new(vec![
            Field::new("host", DataType::Utf8, true),
            Field::new(TIME_COLUMN, store::ColumnType::Time.data_type(), false),
            Field::new(store::SEQ_COLUMN, DataType::UInt64, false),
        ]));
        let hosts = StringArray::from_iter_values((0..rows).map(|i| format!("h{}", i / 8_640)));
        // A little jitter, as clocks of real devices have.
        let times = TimestampNanosecondArray::from_iter_values(
            (0..rows).map(|i| (i % 8_640) as i64 * 10_000_000_000 + (i as i64 * 7919) % 1_000),
        );
        let seqs = UInt64Array::from_iter_values((0..rows as u64).map(|i| (i % 8_640) * 3));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(hosts), Arc::new(times), Arc::new(seqs)],
        )
        .unwrap();
        let mut bytes = Vec::new();
        let props = writer_props(&schema, 3);
        let mut writer = ArrowWriter::try_new(&mut bytes, schema, Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let bytes = bytes::Bytes::from(bytes);
        let options = ReadOptionsBuilder::new().with_page_index().build();
        let reader = SerializedFileReader::new_with_options(bytes.clone(), options).unwrap();
        (bytes, reader, batch)
    }

    #[test]
    fn time_and_sequence_are_delta_encoded_and_read_back_exactly() {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        use parquet::basic::Encoding;
        use parquet::file::reader::FileReader;

        let (bytes, reader, written) = series_days(3);
        let row_group = reader.metadata().row_group(0);
        for (i, name) in [(1, TIME_COLUMN), (2, store::SEQ_COLUMN)] {
            let encodings: Vec<Encoding> = row_group.column(i).encodings().collect();
            assert!(
                encodings.contains(&Encoding::DELTA_BINARY_PACKED),
                "{name}: {encodings:?}"
            );
            assert!(
                !encodings.contains(&Encoding::RLE_DICTIONARY),
                "{name}: {encodings:?}"
            );
        }
        // Delta-packed, a 10 s step with jitter below 1 µs takes far less than 8 bytes a row.
        let time_bytes = row_group.column(1).uncompressed_size();
        assert!(
            time_bytes < 3 * 8_640 * 3,
            "{time_bytes} bytes of timestamps before compression"
        );
        let read: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let read = arrow::compute::concat_batches(&written.schema(), &read).unwrap();
        assert_eq!(read, written);
    }

    #[test]
    fn a_series_day_at_ten_seconds_fills_about_one_page() {
        use parquet::file::reader::FileReader;

        let rows = 3 * 8_640;
        let (_, reader, _) = series_days(3);
        let pages = &reader.metadata().offset_index().unwrap()[0][0].page_locations;
        let starts: Vec<i64> = pages.iter().map(|p| p.first_row_index).collect();
        let mut ends = starts[1..].to_vec();
        ends.push(rows as i64);
        for (start, end) in starts.iter().zip(&ends) {
            assert!(
                end - start <= DATA_PAGE_ROWS as i64,
                "page of {} rows",
                end - start
            );
        }
        assert!(pages.len() >= 4, "{} pages", pages.len());
    }
}

#[cfg(test)]
mod cipher_timing {
    use super::*;
    use arrow::array::{BinaryArray, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    /// Encoding 300k cells of 117 bytes with the ciphertext settings and with those of any
    /// other column: `cargo test --release -p historian-ingest cipher_column_encoding --
    /// --ignored --nocapture`.
    #[test]
    #[ignore = "timing, run with --release --ignored --nocapture"]
    fn cipher_column_encoding() {
        let mut seed = 1u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u8
        };
        let cells: Vec<Vec<u8>> = (0..300_000)
            .map(|_| (0..117).map(|_| next()).collect())
            .collect();
        let array = BinaryArray::from_iter_values(cells.iter());
        for name in ["operator_id__enc", "operator_x"] {
            let schema = Arc::new(Schema::new(vec![Field::new(name, DataType::Binary, true)]));
            let batch =
                RecordBatch::try_new(schema.clone(), vec![Arc::new(array.clone())]).unwrap();
            for level in [1, 3] {
                let t = std::time::Instant::now();
                let mut out = Vec::new();
                let mut w = parquet::arrow::ArrowWriter::try_new(
                    &mut out,
                    schema.clone(),
                    Some(writer_props(&schema, level)),
                )
                .unwrap();
                w.write(&batch).unwrap();
                w.close().unwrap();
                eprintln!("{name} zstd {level}: {:?} {} bytes", t.elapsed(), out.len());
            }
        }
    }
}
