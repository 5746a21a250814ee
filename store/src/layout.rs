//! Where things live in the lake, relative to its root.
//!
//! ```text
//! databases/<db>/tables/<table>/date=YYYY-MM-DD/part-<id>.parquet
//! databases/<db>/manifest/<table>/<version>.json
//! ```

use object_store::path::Path;

use crate::partition::PartitionKey;

/// Paths of one lake below its root prefix.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    root: Path,
}

impl Layout {
    /// A layout below `root` (empty for the store's own root).
    pub fn new(root: Path) -> Self {
        Layout { root }
    }

    /// The root prefix.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The prefix holding all databases.
    pub fn databases(&self) -> Path {
        self.root.clone().join("databases")
    }

    /// The directory of one table's data files.
    pub fn table_dir(&self, db: &str, table: &str) -> Path {
        self.databases().join(db).join("tables").join(table)
    }

    /// The directory of one partition of a table.
    pub fn partition_dir(&self, db: &str, table: &str, partition: &PartitionKey) -> Path {
        let mut path = self.table_dir(db, table);
        for part in partition.dir().split('/') {
            path = path.join(part);
        }
        path
    }

    /// A new data file of a partition.
    pub fn data_file(&self, db: &str, table: &str, partition: &PartitionKey, id: &str) -> Path {
        self.partition_dir(db, table, partition)
            .join(format!("part-{id}.parquet"))
    }

    /// The prefix holding a table's manifest versions.
    pub fn manifest_dir(&self, db: &str, table: &str) -> Path {
        self.databases().join(db).join("manifest").join(table)
    }

    /// One manifest version of a table; zero-padded so that names sort by version.
    pub fn manifest_file(&self, db: &str, table: &str, version: u64) -> Path {
        self.manifest_dir(db, table)
            .join(format!("{version:020}.json"))
    }
}

/// Whether a name may be used as a database or table name in the lake: no path separators,
/// no dot-names, no control characters, and not too long for object-store keys.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.starts_with('_')
        && !name
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control() || c == '*' || c == '?')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::PartitionGranularity;

    #[test]
    fn paths_follow_the_hive_layout() {
        let layout = Layout::new(Path::from("lake"));
        let p = PartitionGranularity::Day.partition_of(0);
        assert_eq!(
            layout.data_file("plant", "cpu", &p, "0001").as_ref(),
            "lake/databases/plant/tables/cpu/date=1970-01-01/part-0001.parquet"
        );
        let h = PartitionGranularity::Hour.partition_of(0);
        assert_eq!(
            layout.partition_dir("plant", "cpu", &h).as_ref(),
            "lake/databases/plant/tables/cpu/date=1970-01-01/hour=00"
        );
        assert_eq!(
            layout.manifest_file("plant", "cpu", 7).as_ref(),
            "lake/databases/plant/manifest/cpu/00000000000000000007.json"
        );
    }

    #[test]
    fn names_that_escape_the_layout_are_refused() {
        for bad in ["", ".", "..", "a/b", "a\\b", "_internal", "x\n"] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        assert!(is_valid_name("cpu"));
        assert!(is_valid_name("mes event,ä"));
    }
}
