//! The ingester: the write path wired together, from request body to acknowledgement, and
//! recovery at start.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use store::{ColumnType, Lake, TableOptions, TableSchema};

use crate::buffer::WriteBuffer;
use crate::catalog::{Catalog, CatalogError, Limits};
use crate::line_protocol::{LineError, Precision, parse_lines};
use crate::metrics::IngestMetrics;
use crate::persist::{PersistConfig, PersistError, Persister};
use crate::wal::{EncodedRecord, Wal, WalConfig, WalError};

/// Settings of the write path.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Directory of the WAL (local disk).
    pub wal_dir: PathBuf,
    /// WAL segment size.
    pub wal_segment_bytes: u64,
    /// How often `no_sync` writes reach the disk at the latest.
    pub no_sync_interval: Duration,
    /// Group-commit wait under concurrency.
    pub commit_delay: Duration,
    /// Buffer memory limit: past it, writes wait for a flush, then are refused.
    pub buffer_limit_bytes: usize,
    /// How long a write waits for buffer space before it is refused.
    pub full_buffer_wait: Duration,
    /// Flush and compaction settings.
    pub persist: PersistConfig,
    /// How often the persister looks for work.
    pub persist_interval: Duration,
    /// Catalog limits.
    pub limits: Limits,
    /// Per-table settings.
    pub tables: HashMap<String, TableOptions>,
    /// The keyring, needed by tables whose privacy profile names subjects.
    pub keyring: Option<Arc<privacy::Keyring>>,
}

/// One write request.
#[derive(Clone, Copy)]
pub struct WriteRequest<'a> {
    /// Target database.
    pub db: &'a str,
    /// Line protocol body (already decompressed).
    pub body: &'a [u8],
    /// Timestamp precision.
    pub precision: Precision,
    /// Write the good lines even if some are rejected.
    pub accept_partial: bool,
    /// Acknowledge before the WAL fsync.
    pub no_sync: bool,
    /// Which tables the writer may write; lines for others are rejected. None = all.
    pub may_write: Option<&'a (dyn Fn(&str) -> bool + Send + Sync)>,
}

impl std::fmt::Debug for WriteRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteRequest")
            .field("db", &self.db)
            .field("bytes", &self.body.len())
            .field("precision", &self.precision)
            .field("accept_partial", &self.accept_partial)
            .field("no_sync", &self.no_sync)
            .field("restricted", &self.may_write.is_some())
            .finish()
    }
}

/// What a write did.
#[derive(Debug, Default)]
pub struct WriteOutcome {
    /// Lines written.
    pub lines_written: usize,
    /// Rejected lines, with reasons that never contain values.
    pub rejected: Vec<LineError>,
    /// Columns that privacy profiles dropped (names only).
    pub dropped_columns: Vec<String>,
}

/// Why a write was not (wholly) taken.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The buffer is at its memory limit; retry after the hint.
    #[error("write buffer is full ({used} of {limit} bytes); retry later")]
    BufferFull {
        /// Bytes used.
        used: usize,
        /// Limit.
        limit: usize,
    },
    /// The database name is unusable.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// With `accept_partial=false`, some lines were bad so nothing was written.
    #[error("{} lines rejected; nothing written", .0.len())]
    Rejected(Vec<LineError>),
    /// The WAL failed; nothing was acknowledged.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// A new data key could not be made durable; nothing was acknowledged.
    #[error(transparent)]
    Keyring(#[from] privacy::KeyringError),
}

/// What an erasure did: no subject value, no pseudonym, only counts and times.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ErasureReceipt {
    /// When the request arrived (Unix ns).
    pub requested_ns: i64,
    /// When the keys were destroyed (Unix ns): from then on nothing of the subject decrypts
    /// and their pseudonyms link to no one.
    pub keys_destroyed_ns: i64,
    /// Data keys (and pseudonyms) destroyed now; 0 when repeated.
    pub keys_destroyed: usize,
    /// Tables (`db/table`) that held data of the subject.
    pub tables: Vec<String>,
    /// Parquet files given a deletion vector that hides the subject's rows from then on.
    /// Compaction rewrites them without those rows at its next run (`persist.interval`).
    pub files_with_deletion_vectors: usize,
    /// When the buffer and WAL were purged and the deletion vectors committed (Unix ns).
    pub purged_ns: i64,
    /// Replaced files are deleted after this many seconds (readers may still use them).
    pub replaced_files_deleted_after_secs: u64,
}

/// Why an erasure or key expiry failed.
#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    /// No table has subjects, so there is no keyring.
    #[error("no keyring: no table's privacy profile names subjects")]
    NoKeyring,
    /// The keyring could not be rewritten.
    #[error(transparent)]
    Keyring(#[from] privacy::KeyringError),
    /// The buffer or files could not be purged (the keys are destroyed already).
    #[error("keys destroyed, but the physical purge failed (it is retried at the next start): {0}")]
    Purge(String),
}

/// Errors at start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The WAL could not be read or started.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The lake could not be read.
    #[error(transparent)]
    Persist(#[from] PersistError),
}

/// The write path.
#[derive(Debug)]
pub struct Ingester {
    /// Schemas and limits.
    pub catalog: Arc<Catalog>,
    /// Buffered rows.
    pub buffer: Arc<WriteBuffer>,
    /// The log.
    pub wal: Arc<Wal>,
    /// The lake writer.
    pub persister: Arc<Persister>,
    /// Counters.
    pub metrics: Arc<IngestMetrics>,
    /// Pseudonyms and data keys, when privacy profiles name subjects.
    pub keyring: Option<Arc<privacy::Keyring>>,
    persist_interval: Duration,
    full_buffer_wait: Duration,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl Ingester {
    /// Opens the lake and the WAL: restores schemas from manifests, replays WAL records not
    /// yet in Parquet into the buffer, and starts the WAL thread.
    pub async fn open(
        lake: Lake,
        config: IngestConfig,
        metrics: Arc<IngestMetrics>,
    ) -> Result<Arc<Self>, OpenError> {
        let catalog = Arc::new(Catalog::new(
            config.limits.clone(),
            config.tables.clone(),
            config.keyring.clone(),
        ));
        let buffer = Arc::new(WriteBuffer::new(config.buffer_limit_bytes, metrics.clone()));
        let persister = Arc::new(Persister::new(
            lake,
            catalog.clone(),
            buffer.clone(),
            metrics.clone(),
            config.persist.clone(),
        ));
        let persisted = persister.recover().await?;
        let max_persisted = persisted.values().copied().max().unwrap_or(0);
        let wal_dir = config.wal_dir.clone();
        let (replay, segments) = tokio::task::spawn_blocking(move || Wal::replay(&wal_dir))
            .await
            .map_err(|e| WalError::Encoding(e.to_string()))??;
        let (mut replayed, mut skipped) = (0usize, 0usize);
        for record in replay.records {
            let mut seq = record.base_seq;
            for w in record.writes {
                let rows = w.batch.num_rows() as u64;
                let last = seq + rows.saturating_sub(1);
                let key = (w.db.clone(), w.table.clone(), w.partition.dir());
                if persisted.get(&key).is_some_and(|p| *p >= last) {
                    skipped += rows as usize;
                } else {
                    let mut schema = TableSchema::new();
                    for f in w.batch.schema().fields() {
                        if let Some(t) = ColumnType::from_data_type(f.data_type())
                            && t != ColumnType::Time
                        {
                            schema.add_column(f.name(), t);
                        }
                    }
                    let table = catalog.restore_table(&w.db, &w.table, &schema);
                    catalog.note_series(&table, &w.batch);
                    replayed += rows as usize;
                    buffer.insert(seq, vec![w]);
                }
                seq += rows;
            }
        }
        let next_seq = replay.next_seq.max(max_persisted + 1);
        tracing::info!(
            replayed,
            skipped,
            truncated_bytes = replay.truncated_bytes,
            next_seq,
            "WAL replayed"
        );
        let wal = Arc::new(Wal::start(
            WalConfig {
                dir: config.wal_dir.clone(),
                segment_bytes: config.wal_segment_bytes,
                no_sync_interval: config.no_sync_interval,
                commit_delay: config.commit_delay,
            },
            next_seq,
            segments,
            buffer.clone(),
            metrics.clone(),
        )?);
        persister.set_wal(wal.clone());
        if let Some(k) = &config.keyring {
            persister.set_erased(k.erased_key_ids());
        }
        let manifests: Vec<_> = persister
            .manifest_tables()
            .iter()
            .filter_map(|(db, table)| persister.published_manifest(db, table))
            .collect();
        tokio::spawn(crate::census::count_stored_series(
            persister.store(),
            catalog.clone(),
            manifests,
            now_ns(),
        ));
        Ok(Arc::new(Ingester {
            catalog,
            buffer,
            wal,
            persister,
            metrics,
            keyring: config.keyring.clone(),
            persist_interval: config.persist_interval,
            full_buffer_wait: config.full_buffer_wait,
        }))
    }

    /// Validates, logs and buffers one request; resolves when it may be acknowledged.
    pub async fn write(&self, req: WriteRequest<'_>) -> Result<WriteOutcome, WriteError> {
        self.metrics.write_requests.inc();
        // Under sustained overload writers first wait for a flush to make room (slower
        // acknowledgements); only if none comes in time do they get "retry later".
        if self.buffer.is_full() && !self.buffer.wait_for_space(self.full_buffer_wait).await {
            self.metrics.writes_throttled.inc();
            return Err(WriteError::BufferFull {
                used: self.buffer.bytes(),
                limit: self.buffer.limit_bytes(),
            });
        }
        let guard = self.wal.preparing();
        let validated = self.catalog.validate_for(
            req.db,
            parse_lines(req.body),
            // Lines in the body (the last may end without a newline): sizes the batches.
            memchr::memchr_iter(b'\n', req.body).count() + 1,
            req.precision,
            now_ns(),
            req.may_write,
        )?;
        self.metrics
            .lines_rejected
            .inc_by(validated.rejected.len() as u64);
        if !req.accept_partial && !validated.rejected.is_empty() {
            return Err(WriteError::Rejected(validated.rejected));
        }
        let lines_written = validated.lines_accepted;
        if validated.keyring_generation > 0
            && let Some(keyring) = &self.keyring
            && !keyring.is_durable(validated.keyring_generation)
        {
            // A data key is durable before anything encrypted under it is logged.
            let keyring = keyring.clone();
            let generation = validated.keyring_generation;
            tokio::task::spawn_blocking(move || keyring.ensure_durable(generation))
                .await
                .map_err(|e| WalError::Encoding(e.to_string()))??;
        }
        if !validated.writes.is_empty() {
            let rows = validated.rows() as u64;
            let record = EncodedRecord::encode(req.db, validated.writes)?;
            self.wal.append(record, !req.no_sync, Some(guard)).await?;
            self.metrics.rows_ingested.inc_by(rows);
        }
        Ok(WriteOutcome {
            lines_written,
            rejected: validated.rejected,
            dropped_columns: validated.dropped_columns.into_iter().collect(),
        })
    }

    /// Runs flushing, and beside it compaction and retention, until `shutdown` resolves.
    pub async fn run_background(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let maintenance = tokio::spawn(self.clone().run_maintenance(shutdown.clone()));
        self.run_flushes(shutdown).await;
        let _ = maintenance.await;
    }

    async fn run_flushes(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.persist_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            if let Err(e) = self.persister.run_once(false).await {
                tracing::warn!(error = %e, "persist cycle had errors");
            }
            // Under memory pressure, start the next cycle at once.
            if self.buffer.bytes() > self.buffer.limit_bytes() / 2 {
                tick.reset_immediately();
            }
        }
    }

    async fn run_maintenance(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.persist_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rounds = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            if let Err(e) = self.persister.compact_all().await {
                tracing::warn!(error = %e, "compaction had errors");
            }
            rounds += 1;
            if rounds.is_multiple_of(10)
                && let Err(e) = self.persister.sweep().await
            {
                tracing::warn!(error = %e, "retention sweep failed");
            }
        }
    }

    /// Erases a subject (Art. 17): destroys their pseudonym entries and data keys in every
    /// table and period at once, then purges their rows from the buffer, the WAL and every
    /// file that holds them. Idempotent.
    pub async fn erase_subject(&self, subject: &str) -> Result<ErasureReceipt, EraseError> {
        let requested_ns = now_ns();
        let keyring = self.keyring.clone().ok_or(EraseError::NoKeyring)?;
        let hash = keyring.subject_hash(subject);
        let entries = keyring.subject_entries(&hash);
        let ids: Vec<u64> = entries.iter().map(|e| e.key_id).collect();
        let mut tables: Vec<String> = entries.iter().map(|e| e.scope.clone()).collect();
        tables.dedup();
        let destroying = keyring.clone();
        let keys_destroyed = tokio::task::spawn_blocking(move || {
            destroying.destroy(&ids, privacy::DestroyReason::Erasure)
        })
        .await
        .map_err(|e| EraseError::Purge(e.to_string()))??;
        let keys_destroyed_ns = now_ns();
        tracing::info!(
            keys_destroyed,
            tables = tables.len(),
            "subject erased: keys destroyed"
        );
        self.persister.set_erased(keyring.erased_key_ids());
        crate::failpoint::delay("erase_purge").await;
        let files_with_deletion_vectors = self.purge_erased().await?;
        Ok(ErasureReceipt {
            requested_ns,
            keys_destroyed_ns,
            keys_destroyed,
            tables,
            files_with_deletion_vectors,
            purged_ns: now_ns(),
            replaced_files_deleted_after_secs: self.persister.deletion_grace().as_secs(),
        })
    }

    /// Purges rows under keys destroyed by erasure: closes the WAL segment, flushes the
    /// buffer without them (so every WAL segment that held them retires), and gives the
    /// files whose key bitmaps name those keys deletion vectors, which hide the rows at
    /// once; compaction rewrites those files without them at its next run. Returns the
    /// files given a deletion vector.
    pub async fn purge_erased(&self) -> Result<usize, EraseError> {
        let purge = |e: &dyn std::fmt::Display| EraseError::Purge(e.to_string());
        self.wal.rotate_now().await.map_err(|e| purge(&e))?;
        self.persister.flush_all().await.map_err(|e| purge(&e))?;
        self.persister.hide_erased().await.map_err(|e| purge(&e))
    }

    /// Destroys the data keys whose period lies wholly before a table's personal TTL
    /// horizon at `now_ns`: those cells read as NULL for everyone from then on, and their
    /// pseudonyms link to no one. Returns how many keys were destroyed.
    pub async fn expire_personal_keys(&self, now_ns: i64) -> Result<usize, EraseError> {
        let Some(keyring) = self.keyring.clone() else {
            return Ok(0);
        };
        let mut ids = Vec::new();
        for t in self.catalog.tables() {
            if t.options.subjects.is_empty() {
                continue;
            }
            let scope = store::key_scope(&t.db, &t.name);
            ids.extend(keyring.expired(&scope, t.options.personal_horizon(now_ns)));
        }
        if ids.is_empty() {
            return Ok(0);
        }
        let n = tokio::task::spawn_blocking(move || {
            keyring.destroy(&ids, privacy::DestroyReason::PersonalTtl)
        })
        .await
        .map_err(|e| EraseError::Purge(e.to_string()))??;
        tracing::info!(
            keys = n,
            "destroyed data keys past their table's personal_ttl"
        );
        Ok(n)
    }

    /// Flushes the buffer to the lake and closes the WAL.
    pub async fn shutdown(&self) -> Result<(), PersistError> {
        let mut result = self.persister.flush_all().await;
        if let Err(e) = self.persister.sweep().await {
            result = result.and(Err(e));
        }
        self.wal.close();
        result
    }
}

impl store::TableSource for Ingester {
    fn databases(&self) -> Vec<String> {
        let mut dbs: Vec<String> = self
            .catalog
            .tables()
            .into_iter()
            .filter(|t| t.column_count() > 1)
            .map(|t| t.db.clone())
            .collect();
        dbs.dedup();
        dbs
    }

    fn tables(&self, db: &str) -> Vec<String> {
        self.catalog
            .tables()
            .into_iter()
            .filter(|t| t.db == db && t.column_count() > 1)
            .map(|t| t.name.clone())
            .collect()
    }

    fn snapshot(&self, db: &str, table: &str) -> Option<store::TableSnapshot> {
        let t = self.catalog.table(db, table)?;
        let schema = t.schema();
        if schema.len() <= 1 {
            return None;
        }
        // Buffer first, manifest second: see `TableSnapshot::manifest`.
        let buffered = self.buffer.snapshot(db, table);
        let manifest = self.persister.published_manifest(db, table);
        Some(store::TableSnapshot {
            db: db.to_string(),
            table: table.to_string(),
            schema,
            options: t.options.clone(),
            buffered,
            manifest,
        })
    }
}
