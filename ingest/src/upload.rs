//! Uploads of Parquet files to the lake that a crash cannot leave behind unseen.
//!
//! On S3 a file larger than one part is sent as a multipart upload. If the process dies
//! half-way, the parts stay in the bucket (billed, invisible to listings) until someone
//! aborts the upload, and only its id can do that. So before the first part is sent the
//! upload's id is written to a journal on local disk (fsynced), and removed once the upload
//! is completed or aborted; recovery aborts every upload still in the journal. Files of at
//! most one part are sent with a single PUT and need no journal. Stores without multipart
//! ids (the local file system, whose temporary files recovery removes by name) use the
//! object store's buffered writer as before.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::buffered::BufWriter;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::async_writer::AsyncFileWriter;
use parquet::errors::ParquetError;
use serde::{Deserialize, Serialize};

/// Size of each multipart part (S3 needs at least 5 MiB for all parts but the last).
pub const PART_BYTES: usize = 10 << 20;

/// Errors of the upload journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The journal directory could not be read or written.
    #[error("upload journal {path}: {source}")]
    Io {
        /// File or directory.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// One multipart upload begun and not yet completed or aborted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Object path of the file being uploaded.
    pub path: String,
    /// The store's id of the upload.
    pub upload_id: String,
}

/// The local directory of multipart uploads in flight, one small file per upload.
#[derive(Debug, Clone)]
pub struct UploadJournal {
    dir: PathBuf,
}

impl UploadJournal {
    /// A journal kept in `dir` (created on first use).
    pub fn new(dir: PathBuf) -> Self {
        UploadJournal { dir }
    }

    fn entry_file(&self, path: &str) -> PathBuf {
        // The path is inside the entry; its name only has to be short and unique per path:
        // a 64-bit FNV-1a hash, fixed across builds.
        let hash = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        self.dir.join(format!("{hash:016x}.json"))
    }

    fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
        move |source| JournalError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// Records an upload durably (file and directory fsynced) before any part is sent.
    pub fn record(&self, entry: &JournalEntry) -> Result<(), JournalError> {
        use std::io::Write;
        std::fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        let file = self.entry_file(&entry.path);
        let tmp = file.with_extension("tmp");
        let body = serde_json::to_vec(entry).expect("a journal entry serialises");
        let mut f = std::fs::File::create(&tmp).map_err(Self::io(&tmp))?;
        f.write_all(&body).map_err(Self::io(&tmp))?;
        f.sync_all().map_err(Self::io(&tmp))?;
        std::fs::rename(&tmp, &file).map_err(Self::io(&file))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(Self::io(&self.dir))
    }

    /// Forgets an upload that was completed or aborted. Not fsynced: an entry that comes
    /// back after a crash is aborted again, which S3 answers harmlessly.
    pub fn remove(&self, path: &str) -> Result<(), JournalError> {
        Self::remove_file(&self.entry_file(path))
    }

    fn remove_file(file: &std::path::Path) -> Result<(), JournalError> {
        match std::fs::remove_file(file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Self::io(file)(e)),
            _ => Ok(()),
        }
    }

    /// The uploads recorded and not removed.
    pub fn entries(&self) -> Result<Vec<JournalEntry>, JournalError> {
        Ok(self.entry_files()?.into_iter().map(|(_, e)| e).collect())
    }

    /// The uploads recorded and not removed, with the file each is recorded in.
    fn entry_files(&self) -> Result<Vec<(PathBuf, JournalEntry)>, JournalError> {
        let listing = match std::fs::read_dir(&self.dir) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for item in listing {
            let item = item.map_err(Self::io(&self.dir))?;
            let file = item.path();
            if file.extension().and_then(|e| e.to_str()) == Some("tmp") {
                // A record torn before its rename: its upload never got a part.
                let _ = std::fs::remove_file(&file);
                continue;
            }
            let body = std::fs::read(&file).map_err(Self::io(&file))?;
            match serde_json::from_slice(&body) {
                Ok(e) => out.push((file, e)),
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "ignoring an unreadable upload journal entry")
                }
            }
        }
        out.sort_by(|a: &(PathBuf, JournalEntry), b| a.1.path.cmp(&b.1.path));
        Ok(out)
    }

    /// Aborts every upload in the journal (at start, before any new upload): the parts an
    /// interrupted process left in the store are deleted. Returns how many were aborted.
    pub async fn abort_all(&self, store: &dyn MultipartStore) -> Result<usize, JournalError> {
        let mut aborted = 0;
        for (file, entry) in self.entry_files()? {
            let path = Path::from(entry.path.as_str());
            match store.abort_multipart(&path, &entry.upload_id).await {
                Ok(()) => {
                    tracing::info!(path = %entry.path, "aborted a multipart upload an interrupted process left");
                    aborted += 1;
                }
                // Completed before the crash, or already aborted.
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(path = %entry.path, error = %e, "could not abort an interrupted multipart upload; will retry at next start");
                    continue;
                }
            }
            Self::remove_file(&file)?;
        }
        Ok(aborted)
    }
}

/// Where a Parquet file's bytes go: a journaled multipart upload, or the object store's
/// buffered writer for stores without multipart ids.
pub enum LakeSink {
    /// The object store's writer (local file system).
    Buffered(BufWriter),
    /// A multipart upload whose id is journaled.
    Journaled(JournaledUpload),
}

impl LakeSink {
    /// A sink for `path`: journaled when the store has multipart ids and a journal is kept.
    pub fn open(
        store: Arc<dyn ObjectStore>,
        multipart: Option<(Arc<dyn MultipartStore>, UploadJournal)>,
        path: Path,
    ) -> Self {
        match multipart {
            Some((parts, journal)) => LakeSink::Journaled(JournaledUpload {
                store,
                parts,
                journal,
                path,
                pending: Vec::new(),
                upload: None,
                sent: Vec::new(),
            }),
            None => LakeSink::Buffered(BufWriter::new(store, path)),
        }
    }

    /// Abandons the file: nothing of it stays in the store (or in the journal).
    pub async fn abort(&mut self) -> Result<(), ParquetError> {
        match self {
            LakeSink::Buffered(w) => w.abort().await.map_err(store_error),
            LakeSink::Journaled(u) => u.abort().await,
        }
    }
}

impl std::fmt::Debug for LakeSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LakeSink::Buffered(_) => f.write_str("LakeSink::Buffered"),
            LakeSink::Journaled(u) => write!(f, "LakeSink::Journaled({})", u.path),
        }
    }
}

impl AsyncFileWriter for LakeSink {
    fn write(&mut self, bs: Bytes) -> BoxFuture<'_, parquet::errors::Result<()>> {
        match self {
            LakeSink::Buffered(w) => AsyncFileWriter::write(w, bs),
            LakeSink::Journaled(u) => u.write(bs).boxed(),
        }
    }

    fn complete(&mut self) -> BoxFuture<'_, parquet::errors::Result<()>> {
        match self {
            LakeSink::Buffered(w) => AsyncFileWriter::complete(w),
            LakeSink::Journaled(u) => u.complete().boxed(),
        }
    }
}

/// A file sent in parts of [`PART_BYTES`], its upload id journaled before the first part.
pub struct JournaledUpload {
    store: Arc<dyn ObjectStore>,
    parts: Arc<dyn MultipartStore>,
    journal: UploadJournal,
    path: Path,
    /// Bytes not sent yet (less than a part, between writes).
    pending: Vec<Bytes>,
    upload: Option<MultipartId>,
    sent: Vec<PartId>,
}

fn store_error(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

fn journal_error(e: JournalError) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl JournaledUpload {
    fn pending_len(&self) -> usize {
        self.pending.iter().map(Bytes::len).sum()
    }

    async fn write(&mut self, bs: Bytes) -> Result<(), ParquetError> {
        self.pending.push(bs);
        while self.pending_len() >= PART_BYTES {
            let part = self.take_part(PART_BYTES);
            self.send(part).await?;
        }
        Ok(())
    }

    /// The first `n` pending bytes, as one payload.
    fn take_part(&mut self, n: usize) -> PutPayload {
        let mut part = Vec::new();
        let mut left = n;
        while left > 0 {
            let mut head = self.pending.remove(0);
            if head.len() > left {
                self.pending.insert(0, head.split_off(left));
            }
            left -= head.len();
            part.push(head);
        }
        PutPayload::from_iter(part)
    }

    async fn send(&mut self, part: PutPayload) -> Result<(), ParquetError> {
        let id = match &self.upload {
            Some(id) => id.clone(),
            None => {
                let id = self
                    .parts
                    .create_multipart(&self.path)
                    .await
                    .map_err(store_error)?;
                let entry = JournalEntry {
                    path: self.path.to_string(),
                    upload_id: id.clone(),
                };
                let journal = self.journal.clone();
                let recorded = tokio::task::spawn_blocking(move || journal.record(&entry))
                    .await
                    .map_err(|e| ParquetError::External(Box::new(e)))
                    .and_then(|r| r.map_err(journal_error));
                if let Err(e) = recorded {
                    let _ = self.parts.abort_multipart(&self.path, &id).await;
                    return Err(e);
                }
                self.upload = Some(id.clone());
                id
            }
        };
        let part_id = self
            .parts
            .put_part(&self.path, &id, self.sent.len(), part)
            .await
            .map_err(store_error)?;
        self.sent.push(part_id);
        Ok(())
    }

    async fn complete(&mut self) -> Result<(), ParquetError> {
        let rest = self.pending_len();
        if self.upload.is_none() {
            // At most one part: a single PUT, atomic, nothing to journal.
            let body = self.take_part(rest);
            self.store
                .put(&self.path, body)
                .await
                .map_err(store_error)?;
            return Ok(());
        }
        if rest > 0 {
            let part = self.take_part(rest);
            self.send(part).await?;
        }
        let id = self.upload.clone().expect("checked above");
        self.parts
            .complete_multipart(&self.path, &id, std::mem::take(&mut self.sent))
            .await
            .map_err(store_error)?;
        self.upload = None;
        self.journal
            .remove(self.path.as_ref())
            .map_err(journal_error)
    }

    async fn abort(&mut self) -> Result<(), ParquetError> {
        self.pending.clear();
        let Some(id) = self.upload.take() else {
            return Ok(());
        };
        self.parts
            .abort_multipart(&self.path, &id)
            .await
            .map_err(store_error)?;
        self.journal
            .remove(self.path.as_ref())
            .map_err(journal_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn sink(store: &Arc<InMemory>, journal: &UploadJournal, path: &str) -> LakeSink {
        LakeSink::open(
            store.clone(),
            Some((store.clone(), journal.clone())),
            Path::from(path),
        )
    }

    #[tokio::test]
    async fn a_multipart_file_is_journaled_until_complete_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let journal = UploadJournal::new(dir.path().join("uploads"));
        let store = Arc::new(InMemory::new());
        let mut w = sink(&store, &journal, "t/date=2026-01-01/part-1.parquet");
        let body: Vec<u8> = (0..(PART_BYTES * 2 + 12345)).map(|i| i as u8).collect();
        for chunk in body.chunks(3 << 20) {
            w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        let entries = journal.entries().unwrap();
        assert_eq!(
            entries.len(),
            1,
            "the upload is journaled once parts are sent"
        );
        assert_eq!(entries[0].path, "t/date=2026-01-01/part-1.parquet");
        w.complete().await.unwrap();
        assert!(
            journal.entries().unwrap().is_empty(),
            "completed uploads leave the journal"
        );
        let got = store
            .get(&Path::from("t/date=2026-01-01/part-1.parquet"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(got.as_ref(), body.as_slice());
    }

    #[tokio::test]
    async fn a_small_file_is_one_put_and_never_journaled() {
        let dir = tempfile::tempdir().unwrap();
        let journal = UploadJournal::new(dir.path().join("uploads"));
        let store = Arc::new(InMemory::new());
        let mut w = sink(&store, &journal, "small.parquet");
        w.write(Bytes::from_static(b"PAR1")).await.unwrap();
        assert!(journal.entries().unwrap().is_empty());
        w.complete().await.unwrap();
        let got = store.get(&Path::from("small.parquet")).await.unwrap();
        assert_eq!(got.bytes().await.unwrap().as_ref(), b"PAR1");
    }

    #[tokio::test]
    async fn an_abandoned_upload_is_aborted_by_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let journal = UploadJournal::new(dir.path().join("uploads"));
        let store = Arc::new(InMemory::new());
        let mut w = sink(&store, &journal, "big.parquet");
        w.write(Bytes::from(vec![7u8; PART_BYTES + 1]))
            .await
            .unwrap();
        // The process dies here: no complete, no abort.
        drop(w);
        assert_eq!(journal.entries().unwrap().len(), 1);
        let aborted = journal.abort_all(store.as_ref()).await.unwrap();
        assert_eq!(aborted, 1);
        assert!(journal.entries().unwrap().is_empty());
        assert!(store.get(&Path::from("big.parquet")).await.is_err());
    }

    #[test]
    fn entries_of_long_paths_have_short_names() {
        let dir = tempfile::tempdir().unwrap();
        let journal = UploadJournal::new(dir.path().join("uploads"));
        // Database and table names may each be 255 bytes: far past a file name's limit.
        let path = format!(
            "databases/{}/tables/{}/date=2026-01-01/part-1.parquet",
            "d".repeat(255),
            "t".repeat(255)
        );
        let entry = JournalEntry {
            path: path.clone(),
            upload_id: "u1".into(),
        };
        journal.record(&entry).unwrap();
        assert_eq!(journal.entries().unwrap(), vec![entry]);
        journal.remove(&path).unwrap();
        assert!(journal.entries().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_explicit_abort_removes_the_parts_and_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let journal = UploadJournal::new(dir.path().join("uploads"));
        let store = Arc::new(InMemory::new());
        let mut w = sink(&store, &journal, "x.parquet");
        w.write(Bytes::from(vec![1u8; PART_BYTES])).await.unwrap();
        assert_eq!(journal.entries().unwrap().len(), 1);
        w.abort().await.unwrap();
        assert!(journal.entries().unwrap().is_empty());
        assert!(store.get(&Path::from("x.parquet")).await.is_err());
    }
}
