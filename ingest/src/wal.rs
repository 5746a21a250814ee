//! The write-ahead log: every accepted write is appended here and fsynced before it is
//! acknowledged.
//!
//! One thread owns the open segment. Writers hand it records through a channel; it writes
//! all records waiting at that moment in one `write`, fsyncs once for the whole group
//! (group commit), applies them to the write buffer in sequence order, and only then
//! answers the writers. Each record gets a range of write sequences, one per row.
//!
//! Segment file: `<first_seq>.wal` = magic, then records `[len u32][crc32 u32][payload]`.
//! Payload: `base_seq u64`, `db`, write count, then per write the table, the partition
//! range and the rows as an Arrow IPC stream.

use std::fs::{self, File, OpenOptions};
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use parking_lot::Mutex;
use store::PartitionGranularity;
use tokio::sync::oneshot;

use crate::catalog::TableWrite;
use crate::failpoint;
use crate::metrics::IngestMetrics;

const MAGIC: &[u8; 8] = b"HWAL0001";
const RECORD_HEADER: usize = 8;
/// How long a group waits for the writers of the previous group when none is mid-request.
const BURST_WAIT: Duration = Duration::from_millis(5);

/// Group-commit size cap: past this, the group is written and a new one starts.
const MAX_GROUP_BYTES: usize = 32 << 20;

/// Errors of the write-ahead log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// Disk I/O failed.
    #[error("WAL I/O error on {path}: {source}")]
    Io {
        /// File or directory.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A record could not be encoded or decoded.
    #[error("WAL record encoding error: {0}")]
    Encoding(String),
    /// The WAL thread has stopped (shutdown or a fatal I/O error).
    #[error("the WAL is closed")]
    Closed,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Settings of the WAL.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Directory of segment files (local disk).
    pub dir: PathBuf,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// How often `no_sync` writes are fsynced at the latest.
    pub no_sync_interval: Duration,
    /// When writers are concurrent, how long the first record of a group waits for more
    /// before the group is written (fewer fsyncs under load, no wait for a lone writer).
    pub commit_delay: Duration,
}

/// Receives committed records, in sequence order, on the WAL thread.
pub trait WalApplier: Send + Sync + 'static {
    /// Applies one committed record whose rows start at `base_seq`.
    fn apply(&self, base_seq: u64, writes: Vec<TableWrite>);
}

/// A record encoded by the writer's task, so the WAL thread only copies bytes.
#[derive(Debug)]
pub struct EncodedRecord {
    payload: Vec<u8>,
    rows: u64,
    writes: Vec<TableWrite>,
}

impl EncodedRecord {
    /// Encodes the writes of one request.
    pub fn encode(db: &str, writes: Vec<TableWrite>) -> Result<Self, WalError> {
        let mut payload = Vec::with_capacity(
            64 + writes
                .iter()
                .map(|w| w.batch.get_array_memory_size())
                .sum::<usize>(),
        );
        payload.extend_from_slice(&0u64.to_le_bytes()); // base_seq, set by the WAL thread
        put_str(&mut payload, db)?;
        payload.extend_from_slice(&(writes.len() as u32).to_le_bytes());
        let mut rows = 0u64;
        for w in &writes {
            put_str(&mut payload, &w.table)?;
            payload.extend_from_slice(&w.partition.start.to_le_bytes());
            payload.push(granularity_code(w.partition.granularity()));
            let at = payload.len();
            payload.extend_from_slice(&0u32.to_le_bytes());
            let mut writer = StreamWriter::try_new(&mut payload, &w.batch.schema())
                .map_err(|e| WalError::Encoding(e.to_string()))?;
            writer
                .write(&w.batch)
                .and_then(|_| writer.finish())
                .map_err(|e| WalError::Encoding(e.to_string()))?;
            drop(writer);
            let len = u32::try_from(payload.len() - at - 4)
                .map_err(|_| WalError::Encoding("write too large for one WAL record".into()))?;
            payload[at..at + 4].copy_from_slice(&len.to_le_bytes());
            rows += w.batch.num_rows() as u64;
        }
        if u32::try_from(payload.len()).is_err() {
            return Err(WalError::Encoding(
                "write too large for one WAL record".into(),
            ));
        }
        Ok(EncodedRecord {
            payload,
            rows,
            writes,
        })
    }

    /// Rows in the record.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        self.payload.len()
    }

    /// The writes, for the buffer.
    pub fn into_writes(self) -> Vec<TableWrite> {
        self.writes
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) -> Result<(), WalError> {
    let len = u16::try_from(s.len()).map_err(|_| WalError::Encoding("name too long".into()))?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
    Ok(())
}

fn granularity_code(g: PartitionGranularity) -> u8 {
    match g {
        PartitionGranularity::Hour => 0,
        PartitionGranularity::Day => 1,
        PartitionGranularity::Month => 2,
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WalError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| WalError::Encoding("record truncated".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WalError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WalError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, WalError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, WalError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn str(&mut self) -> Result<String, WalError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| WalError::Encoding("name is not UTF-8".into()))
    }
}

/// A record read back from the WAL at start.
#[derive(Debug)]
pub struct ReplayedRecord {
    /// First write sequence of the record's rows.
    pub base_seq: u64,
    /// Database.
    pub db: String,
    /// The writes, in the order they were applied.
    pub writes: Vec<TableWrite>,
}

fn decode_payload(payload: &[u8]) -> Result<ReplayedRecord, WalError> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let base_seq = r.u64()?;
    let db = r.str()?;
    let n = r.u32()?;
    let mut writes = Vec::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        let table = r.str()?;
        let start = i64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
        let granularity = match r.u8()? {
            0 => PartitionGranularity::Hour,
            2 => PartitionGranularity::Month,
            _ => PartitionGranularity::Day,
        };
        let len = r.u32()? as usize;
        let ipc = r.take(len)?;
        let reader = StreamReader::try_new(Cursor::new(ipc), None)
            .map_err(|e| WalError::Encoding(e.to_string()))?;
        let batches: Vec<RecordBatch> = reader
            .collect::<Result<_, _>>()
            .map_err(|e| WalError::Encoding(e.to_string()))?;
        let batch = match batches.len() {
            1 => batches.into_iter().next().expect("one batch"),
            _ => return Err(WalError::Encoding("expected one batch per write".into())),
        };
        writes.push(TableWrite {
            db: db.clone(),
            table,
            partition: granularity.partition_of(start),
            batch,
        });
    }
    Ok(ReplayedRecord {
        base_seq,
        db,
        writes,
    })
}

#[derive(Debug, Clone)]
struct SegmentInfo {
    path: PathBuf,
    last_seq: u64,
    closed: bool,
}

/// What replay found.
#[derive(Debug, Default)]
pub struct Replay {
    /// Valid records, in sequence order.
    pub records: Vec<ReplayedRecord>,
    /// The next unused write sequence.
    pub next_seq: u64,
    /// Bytes cut off torn tails (writes that were never acknowledged).
    pub truncated_bytes: u64,
}

struct WalRequest {
    record: EncodedRecord,
    sync: bool,
    /// Close the segment after this record (so it can be retired once persisted).
    rotate: bool,
    done: oneshot::Sender<Result<u64, String>>,
}

/// The write-ahead log.
pub struct Wal {
    tx: Mutex<Option<mpsc::Sender<WalRequest>>>,
    segments: Arc<Mutex<Vec<SegmentInfo>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    last_seq: Arc<AtomicU64>,
    dir: PathBuf,
    preparing: Arc<AtomicUsize>,
}

/// Held by a writer from the start of its request until its record is queued, so that a
/// group commit can wait for it rather than fsync without it.
#[derive(Debug)]
pub struct PreparingGuard(Arc<AtomicUsize>);

impl Drop for PreparingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").field("dir", &self.dir).finish()
    }
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.wal"))
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(seq) = name
            .strip_suffix(".wal")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

impl Wal {
    /// Reads every segment in `dir`, cutting torn tails, and returns the valid records.
    /// Call before [`Wal::start`].
    pub fn replay(dir: &Path) -> Result<(Replay, Vec<(PathBuf, u64)>), WalError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut replay = Replay {
            next_seq: 1,
            ..Default::default()
        };
        let mut kept = Vec::new();
        let segments = list_segments(dir)?;
        let count = segments.len();
        for (i, (first_seq, path)) in segments.into_iter().enumerate() {
            let mut data = Vec::new();
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut data))
                .map_err(io_err(&path))?;
            let mut pos = MAGIC.len();
            let mut last_seq = first_seq.saturating_sub(1);
            let valid_magic = data.len() >= MAGIC.len() && &data[..MAGIC.len()] == MAGIC;
            if valid_magic {
                while pos + RECORD_HEADER <= data.len() {
                    let len =
                        u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4")) as usize;
                    let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().expect("4"));
                    let Some(end) = (pos + RECORD_HEADER)
                        .checked_add(len)
                        .filter(|e| *e <= data.len())
                    else {
                        break;
                    };
                    let payload = &data[pos + RECORD_HEADER..end];
                    if crc32fast::hash(payload) != crc {
                        break;
                    }
                    match decode_payload(payload) {
                        Ok(rec) => {
                            let rows: u64 =
                                rec.writes.iter().map(|w| w.batch.num_rows() as u64).sum();
                            last_seq = rec.base_seq + rows.saturating_sub(1);
                            replay.next_seq = replay.next_seq.max(rec.base_seq + rows);
                            replay.records.push(rec);
                        }
                        Err(e) => {
                            tracing::error!(segment = %path.display(), error = %e, "undecodable WAL record; stopping replay of this segment");
                            break;
                        }
                    }
                    pos = end;
                }
            } else {
                pos = 0;
            }
            if pos < data.len() {
                let cut = (data.len() - pos) as u64;
                if i + 1 == count {
                    tracing::warn!(segment = %path.display(), bytes = cut, "cutting a torn WAL tail (writes never acknowledged)");
                } else {
                    tracing::error!(segment = %path.display(), bytes = cut, "WAL segment is damaged before its end");
                }
                replay.truncated_bytes += cut;
                let mut f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                if valid_magic {
                    f.set_len(pos as u64).map_err(io_err(&path))?;
                } else {
                    f.set_len(0).map_err(io_err(&path))?;
                    f.write_all(MAGIC).map_err(io_err(&path))?;
                }
                f.sync_all().map_err(io_err(&path))?;
            }
            kept.push((path, last_seq));
        }
        replay.records.sort_by_key(|r| r.base_seq);
        Ok((replay, kept))
    }

    /// Starts the WAL thread, writing a new segment from `next_seq`. `existing` are the
    /// segments replay kept, retired later like any closed segment.
    pub fn start(
        config: WalConfig,
        next_seq: u64,
        existing: Vec<(PathBuf, u64)>,
        applier: Arc<dyn WalApplier>,
        metrics: Arc<IngestMetrics>,
    ) -> Result<Wal, WalError> {
        fs::create_dir_all(&config.dir).map_err(io_err(&config.dir))?;
        let segments: Vec<SegmentInfo> = existing
            .into_iter()
            .map(|(path, last_seq)| SegmentInfo {
                path,
                last_seq,
                closed: true,
            })
            .collect();
        let segments = Arc::new(Mutex::new(segments));
        let (tx, rx) = mpsc::channel::<WalRequest>();
        let last_seq = Arc::new(AtomicU64::new(next_seq.saturating_sub(1)));
        let writer = SegmentWriter::create(&config.dir, next_seq)?;
        // An empty segment from the last run can share the new one's name.
        segments.lock().retain(|s| s.path != writer.path);
        segments.lock().push(SegmentInfo {
            path: writer.path.clone(),
            last_seq: next_seq.saturating_sub(1),
            closed: false,
        });
        metrics.wal_segments.set(segments.lock().len() as i64);
        let thread_segments = segments.clone();
        let preparing = Arc::new(AtomicUsize::new(0));
        let thread_preparing = preparing.clone();
        let thread_last = last_seq.clone();
        let dir = config.dir.clone();
        let thread = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || {
                let mut state = WalThread {
                    config,
                    writer,
                    next_seq,
                    segments: thread_segments,
                    last_seq: thread_last,
                    applier,
                    metrics,
                    unsynced: false,
                    preparing: thread_preparing,
                };
                state.run(rx);
            })
            .map_err(io_err(&dir))?;
        Ok(Wal {
            preparing,
            tx: Mutex::new(Some(tx)),
            segments,
            thread: Mutex::new(Some(thread)),
            last_seq,
            dir,
        })
    }

    /// Announces a writer that will append soon; drop the guard once queued or abandoned.
    pub fn preparing(&self) -> PreparingGuard {
        self.preparing.fetch_add(1, Ordering::AcqRel);
        PreparingGuard(self.preparing.clone())
    }

    /// Appends a record; resolves once it is on disk (fsynced unless `sync` is false) and
    /// applied to the buffer. Returns the record's first write sequence.
    pub async fn append(
        &self,
        record: EncodedRecord,
        sync: bool,
        guard: Option<PreparingGuard>,
    ) -> Result<u64, WalError> {
        self.submit(record, sync, false, guard).await
    }

    /// Closes the current segment and starts a new one, so that every row logged so far
    /// sits in closed segments that [`Wal::retire`] can delete once persisted (erasure).
    pub async fn rotate_now(&self) -> Result<(), WalError> {
        let empty = EncodedRecord::encode("_", Vec::new())?;
        self.submit(empty, true, true, None).await.map(|_| ())
    }

    /// Hands a request to the WAL thread and waits for its answer.
    async fn submit(
        &self,
        record: EncodedRecord,
        sync: bool,
        rotate: bool,
        guard: Option<PreparingGuard>,
    ) -> Result<u64, WalError> {
        let (done, rx) = oneshot::channel();
        {
            let tx = self.tx.lock();
            let tx = tx.as_ref().ok_or(WalError::Closed)?;
            tx.send(WalRequest {
                record,
                sync,
                rotate,
                done,
            })
            .map_err(|_| WalError::Closed)?;
        }
        drop(guard);
        match rx.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(msg)) => Err(WalError::Encoding(msg)),
            Err(_) => Err(WalError::Closed),
        }
    }

    /// The highest write sequence handed out so far.
    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    /// Deletes closed segments whose rows are all at or below `persisted_seq`.
    pub fn retire(&self, persisted_seq: u64, metrics: &IngestMetrics) -> usize {
        let retired: Vec<SegmentInfo> = {
            let mut segs = self.segments.lock();
            let (gone, keep): (Vec<_>, Vec<_>) = segs
                .drain(..)
                .partition(|s| s.closed && s.last_seq <= persisted_seq);
            *segs = keep;
            metrics.wal_segments.set(segs.len() as i64);
            gone
        };
        for s in &retired {
            failpoint::hit("wal_retire");
            match fs::remove_file(&s.path) {
                Ok(()) => tracing::debug!(segment = %s.path.display(), "retired WAL segment"),
                Err(e) => {
                    tracing::warn!(segment = %s.path.display(), error = %e, "could not delete WAL segment")
                }
            }
        }
        retired.len()
    }

    /// Stops accepting records and waits for the thread to finish what it has.
    pub fn close(&self) {
        self.tx.lock().take();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

struct SegmentWriter {
    file: File,
    path: PathBuf,
    len: u64,
}

impl SegmentWriter {
    fn create(dir: &Path, first_seq: u64) -> Result<Self, WalError> {
        let path = segment_path(dir, first_seq);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all(MAGIC).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
        // The new file's directory entry must survive a crash too.
        sync_dir(dir)?;
        Ok(SegmentWriter {
            file,
            path,
            len: MAGIC.len() as u64,
        })
    }
}

struct WalThread {
    config: WalConfig,
    writer: SegmentWriter,
    next_seq: u64,
    segments: Arc<Mutex<Vec<SegmentInfo>>>,
    last_seq: Arc<AtomicU64>,
    applier: Arc<dyn WalApplier>,
    metrics: Arc<IngestMetrics>,
    unsynced: bool,
    preparing: Arc<AtomicUsize>,
}

impl WalThread {
    fn run(&mut self, rx: mpsc::Receiver<WalRequest>) {
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        let mut last_group = 0usize;
        loop {
            let first = match rx.recv_timeout(self.config.no_sync_interval) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.unsynced {
                        let _ = self.sync();
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut group = vec![first];
            let mut bytes = group[0].record.payload.len();
            // Wait for writers that are preparing a record right now (up to commit_delay):
            // they would otherwise each need an fsync of their own. A lone writer never waits.
            let started = Instant::now();
            let deadline = started + self.config.commit_delay;
            // Waiting for the writers of the last group to come back is a guess: it gets
            // at most BURST_WAIT, so a lone write after a burst is not held long.
            let burst_deadline = started + self.config.commit_delay.min(BURST_WAIT);
            while bytes < MAX_GROUP_BYTES {
                let next = match rx.try_recv() {
                    Ok(r) => Some(r),
                    Err(mpsc::TryRecvError::Empty) => {
                        let now = Instant::now();
                        // Keep waiting while writers are mid-request, or until the group is as
                        // large as the last one (the writers of that group are likely on
                        // their way back with their next write).
                        let expect_more = self.preparing.load(Ordering::Acquire) > 0
                            || (group.len() < last_group && now < burst_deadline);
                        if !expect_more || now >= deadline {
                            None
                        } else {
                            let step = (deadline - now).min(Duration::from_micros(200));
                            match rx.recv_timeout(step) {
                                Ok(r) => Some(r),
                                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                                Err(mpsc::RecvTimeoutError::Disconnected) => None,
                            }
                        }
                    }
                    Err(mpsc::TryRecvError::Disconnected) => None,
                };
                match next {
                    Some(r) => {
                        bytes += r.record.payload.len();
                        group.push(r);
                    }
                    None => break,
                }
            }
            last_group = group.len();
            self.commit(group, &mut buf);
        }
        if self.unsynced {
            let _ = self.sync();
        }
    }

    fn sync(&mut self) -> Result<(), std::io::Error> {
        let started = Instant::now();
        self.writer.file.sync_data()?;
        self.metrics
            .wal_fsync_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.wal_fsyncs.inc();
        self.unsynced = false;
        Ok(())
    }

    fn commit(&mut self, mut group: Vec<WalRequest>, buf: &mut Vec<u8>) {
        buf.clear();
        let mut seqs = Vec::with_capacity(group.len());
        let mut next = self.next_seq;
        for req in &mut group {
            req.record.payload[..8].copy_from_slice(&next.to_le_bytes());
            let payload = &req.record.payload;
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
            buf.extend_from_slice(payload);
            seqs.push(next);
            next += req.record.rows.max(1);
        }
        let sync = group.iter().any(|r| r.sync);
        let written = self.writer.file.write_all(buf).and_then(|_| {
            self.unsynced = true;
            if sync { self.sync() } else { Ok(()) }
        });
        if let Err(e) = written {
            tracing::error!(segment = %self.writer.path.display(), error = %e, "WAL write failed; failing the group");
            // Leave no partial record behind for replay to trip over.
            let _ = self.writer.file.set_len(self.writer.len);
            for req in group {
                let _ = req.done.send(Err(format!("WAL write failed: {e}")));
            }
            return;
        }
        self.writer.len += buf.len() as u64;
        self.metrics.wal_writes.inc_by(group.len() as u64);
        self.metrics.wal_bytes.inc_by(buf.len() as u64);
        self.next_seq = next;
        let last = next - 1;
        {
            let mut segs = self.segments.lock();
            if let Some(s) = segs.last_mut() {
                s.last_seq = last;
            }
        }
        // Apply in order, then publish, then answer: an acknowledged row is visible.
        for (req, seq) in group.iter_mut().zip(&seqs) {
            let writes = std::mem::take(&mut req.record.writes);
            self.applier.apply(*seq, writes);
        }
        self.last_seq.store(last, Ordering::Release);
        // A requested rotation is done before the answer; one for size after it.
        let requested = group.iter().any(|r| r.rotate);
        if requested {
            self.rotate();
        }
        for (req, seq) in group.into_iter().zip(seqs) {
            let _ = req.done.send(Ok(seq));
        }
        if !requested && self.writer.len >= self.config.segment_bytes {
            self.rotate();
        }
    }

    fn rotate(&mut self) {
        if self.unsynced && self.sync().is_err() {
            return;
        }
        match SegmentWriter::create(&self.config.dir, self.next_seq) {
            Ok(w) => {
                self.writer = w;
                let mut segs = self.segments.lock();
                if let Some(s) = segs.last_mut() {
                    s.closed = true;
                }
                segs.push(SegmentInfo {
                    path: self.writer.path.clone(),
                    last_seq: self.next_seq - 1,
                    closed: false,
                });
                self.metrics.wal_segments.set(segs.len() as i64);
            }
            Err(e) => {
                tracing::error!(error = %e, "could not start a new WAL segment; continuing in the old one")
            }
        }
    }
}
