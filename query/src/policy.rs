//! Access policies as the engine applies them: which tables a session holds, which rows of
//! each it may see and how it sees each personal column. The access-control layer (roles,
//! tokens) decides; this module only describes and enforces.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, DataFusionError, Result, ScalarValue};
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::expr::InList;
use datafusion::logical_expr::{Expr, Operator, lit};
use parking_lot::Mutex;

use crate::personal::PersonalAccess;

/// How a role sees one column that holds personal data (or, for `deny`, any column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnMode {
    /// The column does not exist for the role.
    Deny,
    /// The column reads as NULL.
    Mask,
    /// Decrypted (the access is audited).
    Clear,
    /// Subject columns only: the pseudonym of the key period.
    Pseudonym,
}

/// Which rows of a table a session may see.
#[derive(Debug, Clone)]
pub enum RowPolicy {
    /// A predicate already built over the table's stored columns.
    Expr(Expr),
    /// A SQL predicate over the table's stored columns in which `$name` stands for the
    /// caller's attribute `name` (a list inside `IN (...)`, one value elsewhere).
    Sql {
        /// The predicate text, as the role defines it.
        predicate: String,
        /// The caller's attributes.
        attributes: Arc<BTreeMap<String, Vec<String>>>,
    },
}

/// How one session sees one table.
#[derive(Debug, Clone, Default)]
pub struct TableAccess {
    /// Personal and subject columns not named in `columns`: masked (pseudonyms for subject
    /// columns) or clear.
    pub default: PersonalAccess,
    /// Per column, how it is seen.
    pub columns: HashMap<String, ColumnMode>,
    /// Rows the session may see; None = all.
    pub rows: Option<RowPolicy>,
    /// When only rows with cells under these data keys can match (a subject's export):
    /// files whose key bitmap names none of them are not read. None = every file.
    pub subject_keys: Option<Arc<HashSet<u64>>>,
}

impl TableAccess {
    /// Everything visible, personal columns seen with `default`.
    pub fn all(default: PersonalAccess) -> Self {
        TableAccess {
            default,
            ..TableAccess::default()
        }
    }

    /// Whether the table must be read through a secured view even without a profile.
    pub fn restricts(&self) -> bool {
        self.rows.is_some() || !self.columns.is_empty()
    }
}

/// Which tables a session holds and how it sees each. Implemented by the access-control
/// layer; a table for which it answers None does not exist for the session.
pub trait AccessPolicy: Debug + Send + Sync {
    /// How the session sees `db.table`, or None if it may not read it.
    fn table(&self, db: &str, table: &str) -> Option<TableAccess>;
}

/// A fixed policy: the listed tables (in any database), each seen as given.
#[derive(Debug, Clone, Default)]
pub struct TablePolicies(pub HashMap<String, TableAccess>);

impl AccessPolicy for TablePolicies {
    fn table(&self, _db: &str, table: &str) -> Option<TableAccess> {
        self.0.get(table).cloned()
    }
}

/// What a query decrypted: which data keys (so a subject's export can name the queries
/// that read their data) and how many cells.
#[derive(Debug, Default)]
pub struct DecryptionLog {
    key_ids: Mutex<BTreeSet<u64>>,
    cells: AtomicU64,
}

impl DecryptionLog {
    /// Notes cells decrypted under `key_ids`.
    pub fn record(&self, key_ids: impl IntoIterator<Item = u64>, cells: u64) {
        if cells == 0 {
            return;
        }
        self.cells.fetch_add(cells, Ordering::Relaxed);
        self.key_ids.lock().extend(key_ids);
    }

    /// The data keys used so far.
    pub fn key_ids(&self) -> Vec<u64> {
        self.key_ids.lock().iter().copied().collect()
    }

    /// Cells decrypted so far.
    pub fn cells(&self) -> u64 {
        self.cells.load(Ordering::Relaxed)
    }
}

/// Why a row policy cannot be applied. The message names the table, never the predicate.
fn policy_error(table: &str, why: &str) -> DataFusionError {
    DataFusionError::Plan(format!(
        "the access policy for table {table} cannot be applied ({why}); the query is refused"
    ))
}

impl RowPolicy {
    /// The predicate as an expression over `schema` (the stored columns of `table`), with
    /// the caller's attributes bound. Fails closed: a missing attribute or a predicate that
    /// does not plan refuses the query.
    pub fn to_expr(&self, state: &SessionState, table: &str, schema: &DFSchema) -> Result<Expr> {
        let (predicate, attributes) = match self {
            RowPolicy::Expr(e) => return Ok(e.clone()),
            RowPolicy::Sql {
                predicate,
                attributes,
            } => (predicate, attributes),
        };
        let parsed = state.create_logical_expr(predicate, schema).map_err(|e| {
            tracing::warn!(table, error = %e, "a row policy does not plan against the table");
            policy_error(table, "the policy does not match the table's columns")
        })?;
        let value_of = |id: &str| -> Result<&Vec<String>> {
            let name = id.trim_start_matches('$');
            attributes
                .get(name)
                .ok_or_else(|| policy_error(table, &format!("the caller has no attribute {name}")))
        };
        let bound = parsed.transform_down(|e| match e {
            Expr::InList(InList {
                expr,
                list,
                negated,
            }) if list.iter().any(|x| matches!(x, Expr::Placeholder(_))) => {
                let mut values = Vec::new();
                for item in list {
                    match item {
                        Expr::Placeholder(p) => {
                            values.extend(value_of(&p.id)?.iter().map(|v| lit(v.clone())))
                        }
                        other => values.push(other),
                    }
                }
                if values.is_empty() {
                    // `x IN ()` with an empty attribute: nothing (or everything, negated).
                    return Ok(Transformed::yes(lit(negated)));
                }
                Ok(Transformed::yes(Expr::InList(InList {
                    expr,
                    list: values,
                    negated,
                })))
            }
            // The planner turns `x IN ($list)` into `x = $list`: a list stays a list.
            Expr::BinaryExpr(b)
                if matches!(b.op, Operator::Eq | Operator::NotEq)
                    && matches!(b.right.as_ref(), Expr::Placeholder(_)) =>
            {
                let Expr::Placeholder(p) = b.right.as_ref() else {
                    unreachable!("matched above")
                };
                let list: Vec<Expr> = value_of(&p.id)?.iter().map(|v| lit(v.clone())).collect();
                let negated = b.op == Operator::NotEq;
                if list.is_empty() {
                    return Ok(Transformed::yes(lit(negated)));
                }
                Ok(Transformed::yes(Expr::InList(InList {
                    expr: b.left,
                    list,
                    negated,
                })))
            }
            Expr::Placeholder(p) => {
                let values = value_of(&p.id)?;
                match values.as_slice() {
                    [one] => Ok(Transformed::yes(lit(one.clone()))),
                    _ => Err(policy_error(
                        table,
                        &format!(
                            "attribute {} has {} values; use it inside IN (...)",
                            p.id.trim_start_matches('$'),
                            values.len()
                        ),
                    )),
                }
            }
            other => Ok(Transformed::no(other)),
        })?;
        Ok(bound.data)
    }
}

/// Whether `filter` is a plain comparison of stored columns with literals: the only kind
/// of user filter that may be evaluated below a row policy (to skip files and row groups),
/// because it cannot fail or call a function on a row the policy hides.
pub fn is_plain_comparison(filter: &Expr) -> bool {
    let column = |e: &Expr| matches!(e, Expr::Column(_));
    let literal = |e: &Expr| matches!(e, Expr::Literal(..));
    match filter {
        Expr::BinaryExpr(b) => match b.op {
            Operator::And | Operator::Or => {
                is_plain_comparison(&b.left) && is_plain_comparison(&b.right)
            }
            Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq => {
                (column(&b.left) && literal(&b.right)) || (literal(&b.left) && column(&b.right))
            }
            _ => false,
        },
        Expr::Between(b) => column(&b.expr) && literal(&b.low) && literal(&b.high),
        Expr::InList(l) => column(&l.expr) && l.list.iter().all(literal),
        Expr::IsNull(e) | Expr::IsNotNull(e) => column(e),
        Expr::Literal(ScalarValue::Boolean(_), _) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::col;

    #[test]
    fn only_plain_comparisons_pass_below_a_policy() {
        assert!(is_plain_comparison(&col("time").gt(lit(5))));
        assert!(is_plain_comparison(
            &col("a").eq(lit("x")).and(lit(3).lt_eq(col("b")))
        ));
        assert!(is_plain_comparison(
            &col("a").in_list(vec![lit("x")], false)
        ));
        // An expression that can fail or call a function never passes.
        assert!(!is_plain_comparison(&(lit(1) / col("v")).gt(lit(0))));
        assert!(!is_plain_comparison(&col("v").eq(col("w"))));
        assert!(!is_plain_comparison(
            &datafusion::functions::expr_fn::abs(col("v")).gt(lit(0))
        ));
    }
}
