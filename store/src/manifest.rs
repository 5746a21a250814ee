//! The manifest: which Parquet files make up a table, committed atomically.
//!
//! Every commit writes a new version file with a create-if-absent put (a conditional put on
//! object storage), so two writers can never both commit version N and a crash leaves either
//! the old or the new version, never half of one. Readers take the highest version.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::layout::Layout;
use crate::partition::PartitionGranularity;
use crate::schema::TableSchema;

/// How many old manifest versions are kept after a commit, for readers still holding one.
const KEEP_OLD_VERSIONS: u64 = 8;

/// Errors reading or committing a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The object store failed.
    #[error("object store error on manifest of {db}.{table}: {source}")]
    Store {
        /// Database.
        db: String,
        /// Table.
        table: String,
        /// Cause.
        #[source]
        source: object_store::Error,
    },
    /// Another writer committed the same version first.
    #[error("manifest version {version} of {db}.{table} was committed concurrently")]
    Conflict {
        /// Database.
        db: String,
        /// Table.
        table: String,
        /// Version both tried to commit.
        version: u64,
    },
    /// A manifest file does not parse.
    #[error("manifest {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// One Parquet file of a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileMeta {
    /// Object path below the store root.
    pub path: String,
    /// Partition directory, e.g. `date=2026-11-27`.
    pub partition: String,
    /// Rows in the file (after deduplication within it).
    pub rows: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Smallest timestamp in the file (ns).
    pub min_time: i64,
    /// Largest timestamp in the file (ns).
    pub max_time: i64,
    /// Smallest write sequence in the file.
    pub min_seq: u64,
    /// Largest write sequence in the file.
    pub max_seq: u64,
    /// Version of the table schema the file was written with.
    pub schema_version: u64,
    /// Whether the file came from compaction.
    #[serde(default)]
    pub compacted: bool,
    /// For tables with personal data: the data key ids whose cells occur in the file, as a
    /// base64 Roaring bitmap, so that an erasure rewrites only the files that hold the
    /// subject. None: no personal cells (or a file from before bitmaps: read to find out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ids: Option<String>,
    /// Rows hidden from readers until compaction rewrites the file without them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletes: Option<crate::DeletionVector>,
}

/// Whether a file whose manifest key bitmap is `stored` (base64 Roaring) may hold cells
/// under any of `keys`. Without a readable bitmap it may.
pub fn may_hold_keys(stored: Option<&str>, keys: &std::collections::HashSet<u64>) -> bool {
    use base64::Engine;
    let ids = stored
        .and_then(|text| base64::engine::general_purpose::STANDARD.decode(text).ok())
        .and_then(|bytes| roaring::RoaringTreemap::deserialize_from(&bytes[..]).ok());
    match ids {
        Some(ids) => keys.iter().any(|id| ids.contains(*id)),
        None => true,
    }
}

impl FileMeta {
    /// Whether the file may hold cells under any of `keys` (by its key bitmap).
    pub fn may_hold_keys(&self, keys: &std::collections::HashSet<u64>) -> bool {
        may_hold_keys(self.key_ids.as_deref(), keys)
    }

    /// The objects that make up the file: its Parquet file and its deletion vector.
    pub fn objects(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.path.as_str()).chain(self.deletes.as_ref().map(|d| d.path.as_str()))
    }

    /// Rows readers see: the file's rows less those its deletion vector hides.
    pub fn live_rows(&self) -> u64 {
        self.rows - self.deletes.as_ref().map_or(0, |d| d.rows.min(self.rows))
    }
}

/// A file no longer in the table, deleted once readers can no longer be using it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingDelete {
    /// Object path.
    pub path: String,
    /// Unix milliseconds after which the file may be deleted.
    pub delete_after_ms: i64,
}

/// One committed version of a table's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Monotonic version, one per commit.
    pub version: u64,
    /// Database name.
    pub db: String,
    /// Table name.
    pub table: String,
    /// Partition granularity the files were laid out with.
    pub granularity: PartitionGranularity,
    /// The table schema (the union of all files' schemas).
    pub schema: TableSchema,
    /// The live files.
    pub files: Vec<FileMeta>,
    /// Per partition, the highest write sequence whose rows are in the files: WAL rows at or
    /// below it are not replayed into that partition again.
    pub persisted_seq: BTreeMap<String, u64>,
    /// Files replaced by compaction or expired, awaiting deletion.
    pub pending_deletes: Vec<PendingDelete>,
}

impl Manifest {
    /// An empty manifest (version 0: nothing committed yet).
    pub fn empty(db: &str, table: &str, granularity: PartitionGranularity) -> Self {
        Manifest {
            version: 0,
            db: db.to_string(),
            table: table.to_string(),
            granularity,
            schema: TableSchema::new(),
            files: Vec::new(),
            persisted_seq: BTreeMap::new(),
            pending_deletes: Vec::new(),
        }
    }

    /// The highest persisted write sequence of any partition.
    pub fn max_persisted_seq(&self) -> u64 {
        self.persisted_seq.values().copied().max().unwrap_or(0)
    }

    /// Files per partition.
    pub fn files_by_partition(&self) -> BTreeMap<&str, Vec<&FileMeta>> {
        let mut map: BTreeMap<&str, Vec<&FileMeta>> = BTreeMap::new();
        for f in &self.files {
            map.entry(f.partition.as_str()).or_default().push(f);
        }
        map
    }
}

/// Reads and commits manifests in an object store.
#[derive(Debug, Clone)]
pub struct ManifestStore {
    store: Arc<dyn ObjectStore>,
    layout: Layout,
}

impl ManifestStore {
    /// A manifest store over an object store and layout.
    pub fn new(store: Arc<dyn ObjectStore>, layout: Layout) -> Self {
        ManifestStore { store, layout }
    }

    fn err(db: &str, table: &str) -> impl FnOnce(object_store::Error) -> ManifestError {
        let (db, table) = (db.to_string(), table.to_string());
        move |source| ManifestError::Store { db, table, source }
    }

    /// Versions present for a table, ascending.
    async fn versions(&self, db: &str, table: &str) -> Result<Vec<(u64, Path)>, ManifestError> {
        let prefix = self.layout.manifest_dir(db, table);
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(Self::err(db, table))?;
        let mut versions: Vec<(u64, Path)> = metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?;
                let v = name.strip_suffix(".json")?.parse::<u64>().ok()?;
                Some((v, m.location))
            })
            .collect();
        versions.sort_by_key(|(v, _)| *v);
        Ok(versions)
    }

    /// The latest committed manifest of a table, if any.
    pub async fn load(&self, db: &str, table: &str) -> Result<Option<Manifest>, ManifestError> {
        let versions = self.versions(db, table).await?;
        let Some((_, path)) = versions.last() else {
            return Ok(None);
        };
        let bytes = self
            .store
            .get(path)
            .await
            .map_err(Self::err(db, table))?
            .bytes()
            .await
            .map_err(Self::err(db, table))?;
        let manifest = serde_json::from_slice(&bytes).map_err(|source| ManifestError::Corrupt {
            path: path.to_string(),
            source,
        })?;
        Ok(Some(manifest))
    }

    /// Databases and tables that have a manifest.
    pub async fn list_tables(&self) -> Result<Vec<(String, String)>, ManifestError> {
        self.list_per_database("manifest").await
    }

    /// Databases and tables that have a data directory (with or without a manifest).
    pub async fn list_table_dirs(&self) -> Result<Vec<(String, String)>, ManifestError> {
        self.list_per_database("tables").await
    }

    /// (database, name) of every directory under `databases/<db>/<kind>/`.
    async fn list_per_database(&self, kind: &str) -> Result<Vec<(String, String)>, ManifestError> {
        let mut out = Vec::new();
        let dbs = self
            .store
            .list_with_delimiter(Some(&self.layout.databases()))
            .await
            .map_err(Self::err("*", "*"))?;
        for db_prefix in dbs.common_prefixes {
            let Some(db) = db_prefix.filename().map(decode) else {
                continue;
            };
            let tables = self
                .store
                .list_with_delimiter(Some(&db_prefix.clone().join(kind)))
                .await
                .map_err(Self::err(&db, "*"))?;
            for t in tables.common_prefixes {
                if let Some(table) = t.filename() {
                    out.push((db.clone(), decode(table)));
                }
            }
        }
        Ok(out)
    }

    /// Commits `next` as version `next.version`, which must be one above the last committed.
    /// Fails with [`ManifestError::Conflict`] if that version exists already.
    pub async fn commit(&self, next: &Manifest) -> Result<(), ManifestError> {
        let path = self
            .layout
            .manifest_file(&next.db, &next.table, next.version);
        let body = serde_json::to_vec_pretty(next).map_err(|source| ManifestError::Corrupt {
            path: path.to_string(),
            source,
        })?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(body), opts)
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(ManifestError::Conflict {
                    db: next.db.clone(),
                    table: next.table.clone(),
                    version: next.version,
                });
            }
            Err(e) => return Err(Self::err(&next.db, &next.table)(e)),
        }
        // Old versions only serve readers that loaded them moments ago.
        if next.version > KEEP_OLD_VERSIONS {
            let versions = self.versions(&next.db, &next.table).await?;
            for (v, p) in versions {
                if v + KEEP_OLD_VERSIONS < next.version
                    && let Err(e) = self.store.delete(&p).await
                {
                    tracing::warn!(path = %p, error = %e, "could not delete old manifest version");
                }
            }
        }
        Ok(())
    }
}

fn decode(part: &str) -> String {
    percent_decode(part)
}

/// Undoes object_store's percent-encoding of path parts.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::local::LocalFileSystem;

    #[tokio::test]
    async fn commits_are_versioned_and_conflicts_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let ms = ManifestStore::new(store, Layout::default());
        assert!(ms.load("db", "cpu").await.unwrap().is_none());
        let mut m = Manifest::empty("db", "cpu", PartitionGranularity::Day);
        for v in 1..=12 {
            m.version = v;
            m.persisted_seq.insert("date=1970-01-01".into(), v * 10);
            ms.commit(&m).await.unwrap();
        }
        let loaded = ms.load("db", "cpu").await.unwrap().unwrap();
        assert_eq!(loaded.version, 12);
        assert_eq!(loaded.max_persisted_seq(), 120);
        // Committing an existing version is a conflict, and leaves the manifest intact.
        m.version = 12;
        m.persisted_seq.clear();
        assert!(matches!(
            ms.commit(&m).await,
            Err(ManifestError::Conflict { .. })
        ));
        assert_eq!(ms.load("db", "cpu").await.unwrap().unwrap(), loaded);
        assert_eq!(
            ms.list_tables().await.unwrap(),
            vec![("db".into(), "cpu".into())]
        );
        // Old versions are pruned.
        assert_eq!(
            ms.versions("db", "cpu").await.unwrap().len() as u64,
            KEEP_OLD_VERSIONS + 1
        );
    }

    #[test]
    fn percent_decoding_undoes_path_encoding() {
        assert_eq!(percent_decode("a%2Fb%25"), "a/b%");
        assert_eq!(percent_decode("plain%"), "plain%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
