//! The tables of one database as a DataFusion schema: resolved lazily, one snapshot per
//! table reference.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::error::DataFusionError;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::Expr;
use store::TableSource;

use crate::personal::{PersonalAccess, PersonalTable};
use crate::table::LakeTable;
use privacy::Keyring;

/// One database's tables.
#[derive(Debug)]
pub struct DatabaseSchema {
    db: String,
    source: Arc<dyn TableSource>,
    lake_url: ObjectStoreUrl,
    now_ns: i64,
    keyring: Option<Arc<Keyring>>,
    access: PersonalAccess,
    row_filters: HashMap<String, Expr>,
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
            keyring: None,
            access: PersonalAccess::Masked,
            row_filters: HashMap::new(),
        }
    }

    /// Per profiled table, a predicate over stored columns applied before anything else.
    pub fn with_row_filters(mut self, row_filters: HashMap<String, Expr>) -> Self {
        self.row_filters = row_filters;
        self
    }

    /// Reads personal columns of profiled tables with `access`, decrypting with `keyring`.
    pub fn with_personal_access(
        mut self,
        keyring: Option<Arc<Keyring>>,
        access: PersonalAccess,
    ) -> Self {
        self.keyring = keyring;
        self.access = access;
        self
    }
}

#[async_trait]
impl SchemaProvider for DatabaseSchema {
    fn table_names(&self) -> Vec<String> {
        self.source.tables(&self.db)
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        Ok(self.source.snapshot(&self.db, name).map(|snapshot| {
            let profiled = snapshot.options.has_profile();
            let table = LakeTable::new(snapshot, self.lake_url.clone(), self.now_ns);
            if profiled {
                Arc::new(
                    PersonalTable::new(table, self.keyring.clone(), self.access, self.now_ns)
                        .with_row_filter(self.row_filters.get(name).cloned()),
                ) as Arc<dyn TableProvider>
            } else {
                Arc::new(table) as Arc<dyn TableProvider>
            }
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.source.tables(&self.db).iter().any(|t| t == name)
    }
}
