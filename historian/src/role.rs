//! Roles: what a token may do. Four are built in (admin, dpo, auditor, writer); others are
//! defined in the config (`[roles.<name>]`) or by API, per table: read, write, a row
//! predicate over the table's columns and the caller's attributes, and how each personal
//! column is seen.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::sql::sqlparser::ast::Expr as SqlExpr;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use parking_lot::RwLock;
use query::{AccessPolicy, ColumnMode, PersonalAccess, RowPolicy, TableAccess};
use serde::{Deserialize, Serialize};

/// The names of the built-in roles.
pub const BUILTIN_ROLES: [&str; 4] = ["admin", "dpo", "auditor", "writer"];

/// What a role grants on one table (or on every table, under the key `*`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TableGrant {
    /// May query the table.
    pub read: bool,
    /// May write lines to it.
    pub write: bool,
    /// SQL predicate over the table's columns; `$name` is the caller's attribute `name`.
    pub rows: Option<String>,
    /// Per personal (or any) column: deny, mask, clear, pseudonym. Unlisted personal
    /// columns are masked and subject columns show pseudonyms.
    pub columns: BTreeMap<String, ColumnMode>,
}

/// A role defined in the config or by API.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoleDef {
    /// Per table name (`*` = every table without an entry of its own).
    pub tables: BTreeMap<String, TableGrant>,
}

impl RoleDef {
    /// The grant for `table` of database `db`: `db/table`, then `db/*`, then `table` and
    /// `*` (which apply in every database).
    pub fn grant(&self, db: &str, table: &str) -> Option<&TableGrant> {
        self.tables
            .get(&format!("{db}/{table}"))
            .or_else(|| self.tables.get(&format!("{db}/*")))
            .or_else(|| self.tables.get(table))
            .or_else(|| self.tables.get("*"))
    }

    /// Whether the role decrypts any personal column.
    pub fn grants_clear(&self) -> bool {
        self.tables
            .values()
            .any(|g| g.columns.values().any(|m| *m == ColumnMode::Clear))
    }

    /// Checks the definition: predicates parse as SQL expressions.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        if BUILTIN_ROLES.contains(&name) {
            return Err(format!("role {name} is built in and cannot be redefined"));
        }
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "role name {name:?} must be letters, digits, '_' or '-'"
            ));
        }
        for (table, grant) in &self.tables {
            let Some(rows) = &grant.rows else {
                continue;
            };
            let expr = Parser::new(&GenericDialect {})
                .try_with_sql(rows)
                .and_then(|mut p| p.parse_expr())
                .map_err(|e| {
                    format!("role {name}, table {table}: the rows predicate does not parse: {e}")
                })?;
            if !cannot_fail(&expr) {
                return Err(format!(
                    "role {name}, table {table}: a rows predicate may only compare columns with literals or $attributes (=, <>, <, >, IN, BETWEEN, IS NULL, AND, OR, NOT): an expression that can fail on a row would tell callers about rows they cannot see"
                ));
            }
            if grant.write {
                // Last write wins per field: a writer could overwrite a hidden row's fields
                // with values that pass the predicate, and then read it.
                return Err(format!(
                    "role {name}, table {table}: a role that writes a table cannot also have a rows predicate on it"
                ));
            }
        }
        Ok(())
    }
}

/// Whether a rows predicate is made only of operations that cannot fail on a row:
/// columns, literals and `$attributes` under comparisons, IN, BETWEEN, IS [NOT] NULL and
/// the boolean connectives.
fn cannot_fail(e: &SqlExpr) -> bool {
    use datafusion::sql::sqlparser::ast::{BinaryOperator as B, UnaryOperator};
    match e {
        SqlExpr::Identifier(_) | SqlExpr::CompoundIdentifier(_) | SqlExpr::Value(_) => true,
        SqlExpr::TypedString(_) => true,
        SqlExpr::Nested(inner) | SqlExpr::IsNull(inner) | SqlExpr::IsNotNull(inner) => {
            cannot_fail(inner)
        }
        SqlExpr::UnaryOp {
            op: UnaryOperator::Not,
            expr,
        } => cannot_fail(expr),
        SqlExpr::BinaryOp { left, op, right } => {
            matches!(
                op,
                B::And | B::Or | B::Eq | B::NotEq | B::Lt | B::LtEq | B::Gt | B::GtEq
            ) && cannot_fail(left)
                && cannot_fail(right)
        }
        SqlExpr::InList { expr, list, .. } => cannot_fail(expr) && list.iter().all(cannot_fail),
        SqlExpr::Between {
            expr, low, high, ..
        } => cannot_fail(expr) && cannot_fail(low) && cannot_fail(high),
        _ => false,
    }
}

/// What a caller's role is.
#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    /// Manages tokens and roles; reads every table, personal columns masked.
    Admin,
    /// Data protection: subject export and erasure, granting `clear`; reads like admin.
    Dpo,
    /// Reads the audit log only.
    Auditor,
    /// Writes only.
    Writer,
    /// A configured or API-defined role.
    Custom(String, Arc<RoleDef>),
}

impl Role {
    /// The role's name.
    pub fn name(&self) -> &str {
        match self {
            Role::Admin => "admin",
            Role::Dpo => "dpo",
            Role::Auditor => "auditor",
            Role::Writer => "writer",
            Role::Custom(name, _) => name,
        }
    }

    /// May write lines to `table` of `db`.
    pub fn may_write(&self, db: &str, table: &str) -> bool {
        match self {
            Role::Admin | Role::Writer => true,
            Role::Dpo | Role::Auditor => false,
            Role::Custom(_, def) => def.grant(db, table).is_some_and(|g| g.write),
        }
    }

    /// Whether the role reads personal data in clear (only the dpo may grant it).
    pub fn reads_clear(&self) -> bool {
        match self {
            Role::Dpo => true,
            Role::Custom(_, def) => def.grants_clear(),
            _ => false,
        }
    }

    /// May manage tokens and roles.
    pub fn manages_access(&self) -> bool {
        matches!(self, Role::Admin | Role::Dpo)
    }
}

/// Where roles come from: the config (fixed) and the API (kept in `auth/roles.json`).
#[derive(Debug)]
pub struct Roles {
    configured: BTreeMap<String, Arc<RoleDef>>,
    defined: RwLock<BTreeMap<String, Arc<RoleDef>>>,
    path: PathBuf,
}

impl Roles {
    /// The roles of the config plus those defined by API in `dir`.
    pub fn open(configured: &HashMap<String, RoleDef>, dir: &Path) -> Result<Roles, String> {
        for (name, def) in configured {
            def.validate(name)?;
        }
        let path = dir.join("roles.json");
        let defined: BTreeMap<String, RoleDef> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| format!("{} is corrupt: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(Roles {
            configured: configured
                .iter()
                .map(|(k, v)| (k.clone(), Arc::new(v.clone())))
                .collect(),
            defined: RwLock::new(defined.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()),
            path,
        })
    }

    /// The role called `name`, if it exists.
    pub fn get(&self, name: &str) -> Option<Role> {
        match name {
            "admin" => Some(Role::Admin),
            "dpo" => Some(Role::Dpo),
            "auditor" => Some(Role::Auditor),
            "writer" => Some(Role::Writer),
            _ => self
                .configured
                .get(name)
                .cloned()
                .or_else(|| self.defined.read().get(name).cloned())
                .map(|def| Role::Custom(name.to_string(), def)),
        }
    }

    /// Every role with its definition and origin.
    pub fn list(&self) -> serde_json::Value {
        let mut out = Vec::new();
        for name in BUILTIN_ROLES {
            out.push(serde_json::json!({"name": name, "origin": "builtin"}));
        }
        for (name, def) in &self.configured {
            out.push(serde_json::json!({"name": name, "origin": "config", "definition": **def}));
        }
        for (name, def) in self.defined.read().iter() {
            out.push(serde_json::json!({"name": name, "origin": "api", "definition": **def}));
        }
        serde_json::Value::Array(out)
    }

    /// Whether `name` comes from the config (and so cannot be changed by API).
    pub fn is_configured(&self, name: &str) -> bool {
        self.configured.contains_key(name)
    }

    /// The API-defined role `name`, if any.
    pub fn defined(&self, name: &str) -> Option<Arc<RoleDef>> {
        self.defined.read().get(name).cloned()
    }

    /// Defines (or, with None, removes) the API role `name` and saves the set.
    pub fn set(&self, name: &str, def: Option<RoleDef>) -> Result<(), String> {
        let mut defined = self.defined.write();
        let mut next = defined.clone();
        match def {
            Some(d) => {
                d.validate(name)?;
                next.insert(name.to_string(), Arc::new(d));
            }
            None => {
                next.remove(name);
            }
        }
        let plain: BTreeMap<&String, &RoleDef> = next.iter().map(|(k, v)| (k, &**v)).collect();
        let bytes = serde_json::to_vec_pretty(&plain).map_err(|e| e.to_string())?;
        crate::state_file::replace(&self.path, &bytes)
            .map_err(|e| format!("cannot save {}: {e}", self.path.display()))?;
        *defined = next;
        Ok(())
    }
}

/// The engine's view of one caller: which tables, rows and columns.
#[derive(Debug)]
pub struct CallerPolicy {
    /// The caller's role.
    pub role: Role,
    /// The caller's attributes, bound into row predicates.
    pub attributes: Arc<BTreeMap<String, Vec<String>>>,
}

impl AccessPolicy for CallerPolicy {
    fn table(&self, db: &str, table: &str) -> Option<TableAccess> {
        match &self.role {
            Role::Admin | Role::Dpo => Some(TableAccess::all(PersonalAccess::Masked)),
            Role::Auditor | Role::Writer => None,
            Role::Custom(_, def) => {
                let grant = def.grant(db, table).filter(|g| g.read)?;
                Some(TableAccess {
                    default: PersonalAccess::Masked,
                    columns: grant.columns.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                    rows: grant.rows.as_ref().map(|predicate| RowPolicy::Sql {
                        predicate: predicate.clone(),
                        attributes: self.attributes.clone(),
                    }),
                    ..TableAccess::default()
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_definitions_are_checked() {
        let mut def = RoleDef::default();
        def.tables.insert(
            "events".into(),
            TableGrant {
                read: true,
                rows: Some("line IN ($lines".into()),
                ..TableGrant::default()
            },
        );
        assert!(
            def.validate("supervisor")
                .unwrap_err()
                .contains("does not parse")
        );
        assert!(RoleDef::default().validate("admin").is_err());
        assert!(RoleDef::default().validate("a b").is_err());
    }

    #[test]
    fn api_roles_persist_and_config_roles_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let mut configured = HashMap::new();
        let mut def = RoleDef::default();
        def.tables.insert(
            "*".into(),
            TableGrant {
                read: true,
                ..TableGrant::default()
            },
        );
        configured.insert("viewer".to_string(), def.clone());
        let roles = Roles::open(&configured, dir.path()).unwrap();
        assert!(matches!(roles.get("viewer"), Some(Role::Custom(..))));
        assert!(roles.get("nobody").is_none());
        roles.set("analyst", Some(def)).unwrap();
        let reopened = Roles::open(&configured, dir.path()).unwrap();
        let analyst = reopened.get("analyst").unwrap();
        assert!(!analyst.may_write("db", "cpu"));
        let policy = CallerPolicy {
            role: analyst,
            attributes: Arc::default(),
        };
        assert!(policy.table("db", "cpu").is_some());
        let writer = CallerPolicy {
            role: Role::Writer,
            attributes: Arc::default(),
        };
        assert!(writer.table("db", "cpu").is_none());
    }
}
