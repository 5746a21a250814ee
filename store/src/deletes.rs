//! Deletion vectors: the rows of a Parquet file hidden from readers until compaction
//! rewrites the file without them (erasure). One immutable object per vector, a Roaring
//! bitmap of 0-based row positions in file order, at
//! `<partition>/_deletes/<file stem>-<id>.roaring`; the manifest names it beside the file.

use std::ops::Range;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::RowSelection;
use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

/// The manifest's record of a file's deletion vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeletionVector {
    /// Object path of the bitmap.
    pub path: String,
    /// How many rows it hides.
    pub rows: u64,
}

/// Errors reading a deletion vector.
#[derive(Debug, thiserror::Error)]
pub enum DeletesError {
    /// The object could not be read.
    #[error("cannot read deletion vector {path}: {source}")]
    Store {
        /// Object path.
        path: String,
        /// Cause.
        #[source]
        source: object_store::Error,
    },
    /// The object is not a Roaring bitmap.
    #[error("deletion vector {path} is corrupt: {source}")]
    Corrupt {
        /// Object path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The path of a new deletion vector for the data file at `file`.
pub fn vector_path(file: &str, id: &str) -> Path {
    let (dir, name) = file.rsplit_once('/').unwrap_or(("", file));
    let stem = name.strip_suffix(".parquet").unwrap_or(name);
    let name = format!("{stem}-{id}.roaring");
    if dir.is_empty() {
        Path::from("_deletes").join(name.as_str())
    } else {
        Path::from(dir).join("_deletes").join(name.as_str())
    }
}

/// A vector's bytes (the portable Roaring format).
pub fn encode(rows: &RoaringTreemap) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.serialized_size());
    rows.serialize_into(&mut out)
        .expect("writing into a Vec cannot fail");
    out
}

/// Reads a deletion vector from the store.
pub async fn load(store: &dyn ObjectStore, path: &str) -> Result<RoaringTreemap, DeletesError> {
    let bytes = store
        .get(&Path::from(path))
        .await
        .map_err(|source| DeletesError::Store {
            path: path.to_string(),
            source,
        })?
        .bytes()
        .await
        .map_err(|source| DeletesError::Store {
            path: path.to_string(),
            source,
        })?;
    RoaringTreemap::deserialize_from(&bytes[..]).map_err(|source| DeletesError::Corrupt {
        path: path.to_string(),
        source,
    })
}

/// The rows of `file` that readers may see, as a selection over the whole file; None when
/// the file has no deletion vector (every row).
pub async fn kept_rows(
    store: &dyn ObjectStore,
    file: &crate::FileMeta,
) -> Result<Option<RowSelection>, DeletesError> {
    let Some(vector) = &file.deletes else {
        return Ok(None);
    };
    let deleted = load(store, &vector.path).await?;
    let kept = kept_ranges(&deleted, file.rows);
    Ok(Some(RowSelection::from_consecutive_ranges(
        kept.into_iter(),
        file.rows as usize,
    )))
}

/// The row ranges of a file of `total` rows that `deleted` leaves, in order.
fn kept_ranges(deleted: &RoaringTreemap, total: u64) -> Vec<Range<usize>> {
    let mut kept = Vec::new();
    let mut next = 0u64;
    for row in deleted.iter().take_while(|r| *r < total) {
        if row > next {
            kept.push(next as usize..row as usize);
        }
        next = row + 1;
    }
    if next < total {
        kept.push(next as usize..total as usize);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_ranges_are_the_complement_of_the_deleted_rows() {
        let deleted: RoaringTreemap = [0u64, 1, 5, 9].into_iter().collect();
        assert_eq!(kept_ranges(&deleted, 10), vec![2..5, 6..9]);
        assert_eq!(kept_ranges(&RoaringTreemap::new(), 3), vec![0..3]);
        let all: RoaringTreemap = (0u64..4).collect();
        assert!(kept_ranges(&all, 4).is_empty());
    }

    #[test]
    fn vectors_sit_in_the_partitions_deletes_directory_and_round_trip() {
        assert_eq!(
            vector_path("databases/d/tables/t/date=2026-01-01/part-7.parquet", "ab").as_ref(),
            "databases/d/tables/t/date=2026-01-01/_deletes/part-7-ab.roaring"
        );
        let rows: RoaringTreemap = [3u64, 1 << 40].into_iter().collect();
        let bytes = encode(&rows);
        assert_eq!(RoaringTreemap::deserialize_from(&bytes[..]).unwrap(), rows);
    }
}
