//! The tables of one database as a DataFusion schema: resolved lazily, one snapshot per
//! table reference.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::error::DataFusionError;
use datafusion::execution::object_store::ObjectStoreUrl;
use store::TableSource;

use crate::table::LakeTable;

/// One database's tables.
#[derive(Debug)]
pub struct DatabaseSchema {
    db: String,
    source: Arc<dyn TableSource>,
    lake_url: ObjectStoreUrl,
    now_ns: i64,
}

impl DatabaseSchema {
    /// The tables of `db` in `source`, as seen at `now_ns`.
    pub fn new(
        db: &str,
        source: Arc<dyn TableSource>,
        lake_url: ObjectStoreUrl,
        now_ns: i64,
    ) -> Self {
        DatabaseSchema {
            db: db.to_string(),
            source,
            lake_url,
            now_ns,
        }
    }
}

#[async_trait]
impl SchemaProvider for DatabaseSchema {
    fn table_names(&self) -> Vec<String> {
        self.source.tables(&self.db)
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        Ok(self.source.snapshot(&self.db, name).map(|snapshot| {
            Arc::new(LakeTable::new(snapshot, self.lake_url.clone(), self.now_ns))
                as Arc<dyn TableProvider>
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.source.tables(&self.db).iter().any(|t| t == name)
    }
}
