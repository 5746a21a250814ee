//! The tables of one database as a DataFusion schema: resolved lazily, one snapshot per
//! table reference.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::error::DataFusionError;
use datafusion::execution::object_store::ObjectStoreUrl;
use store::TableSource;

use crate::personal::{PersonalAccess, PersonalTable};
use crate::policy::{AccessPolicy, DecryptionLog, TableAccess};
use crate::table::LakeTable;
use privacy::Keyring;

/// The policy of a session without access control: every table, personal columns seen
/// with one [`PersonalAccess`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AllTables(pub PersonalAccess);

impl AccessPolicy for AllTables {
    fn table(&self, _db: &str, _table: &str) -> Option<TableAccess> {
        Some(TableAccess::all(self.0))
    }
}

/// One database's tables, as one session's policy shows them.
#[derive(Debug)]
pub struct DatabaseSchema {
    db: String,
    source: Arc<dyn TableSource>,
    lake_url: ObjectStoreUrl,
    now_ns: i64,
    keyring: Option<Arc<Keyring>>,
    policy: Arc<dyn AccessPolicy>,
    extra: HashMap<String, Arc<dyn TableProvider>>,
    decryption_log: Option<Arc<DecryptionLog>>,
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
            policy: Arc::new(AllTables::default()),
            extra: HashMap::new(),
            decryption_log: None,
        }
    }

    /// Shows only the tables `policy` allows, as it allows; decrypts with `keyring`, and
    /// notes what was decrypted in `log`.
    pub fn with_policy(
        mut self,
        keyring: Option<Arc<Keyring>>,
        policy: Arc<dyn AccessPolicy>,
        log: Option<Arc<DecryptionLog>>,
    ) -> Self {
        self.keyring = keyring;
        self.policy = policy;
        self.decryption_log = log;
        self
    }

    /// Adds tables that are not in the lake (the audit log for auditors).
    pub fn with_extra_tables(mut self, extra: HashMap<String, Arc<dyn TableProvider>>) -> Self {
        self.extra = extra;
        self
    }
}

#[async_trait]
impl SchemaProvider for DatabaseSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .source
            .tables(&self.db)
            .into_iter()
            .filter(|t| self.policy.table(&self.db, t).is_some())
            .collect();
        names.extend(self.extra.keys().cloned());
        names
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        if let Some(t) = self.extra.get(name) {
            return Ok(Some(t.clone()));
        }
        // A table the policy does not grant does not exist for the session.
        let Some(access) = self.policy.table(&self.db, name) else {
            return Ok(None);
        };
        Ok(self.source.snapshot(&self.db, name).map(|mut snapshot| {
            if let (Some(keys), Some(m)) = (&access.subject_keys, &snapshot.manifest) {
                // Only the files the key bitmaps say may hold the subject.
                let mut only = (**m).clone();
                only.files.retain(|f| f.may_hold_keys(keys));
                snapshot.manifest = Some(Arc::new(only));
            }
            let secured = snapshot.options.has_profile() || access.restricts();
            let table = LakeTable::new(snapshot, self.lake_url.clone(), self.now_ns);
            if secured {
                Arc::new(
                    PersonalTable::new(table, self.keyring.clone(), access, self.now_ns)
                        .with_decryption_log(self.decryption_log.clone()),
                ) as Arc<dyn TableProvider>
            } else {
                Arc::new(table) as Arc<dyn TableProvider>
            }
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.extra.contains_key(name)
            || (self.policy.table(&self.db, name).is_some()
                && self.source.tables(&self.db).iter().any(|t| t == name))
    }
}
