//! PostgreSQL spellings the engine's SQL does not have, rewritten on the syntax tree into
//! what they mean there: schema-qualified system functions (`pg_catalog.format_type`),
//! `OPERATOR(pg_catalog.~)`, `COLLATE`, casts to `regclass` and friends, and set-returning
//! functions in FROM (`generate_series(1, 3) AS i`). The result is an ordinary query that
//! the engine's sandbox and policies check like any other; the rewrite grants nothing.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    BinaryOperator, CastKind, DataType, Expr, Function, FunctionArguments, GroupByExpr, Ident,
    ObjectName, ObjectNamePart, OrderByKind, SelectItem, SetExpr, Statement, TableFactor, Value,
    VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

/// `sql` in the engine's spelling; unchanged when nothing needed rewriting or it does not
/// parse (the engine then reports the error).
pub fn rewrite(sql: &str) -> String {
    let Ok(mut statements) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
        return sql.to_string();
    };
    let mut rewriter = Rewriter {
        changed: false,
        in_case: 0,
    };
    for statement in statements.iter_mut() {
        if let Some(empty) = empty_result(statement) {
            *statement = empty;
            rewriter.changed = true;
            continue;
        }
        let _ = statement.visit(&mut rewriter);
        if let Some(ordered) = order_outside(statement) {
            *statement = ordered;
            rewriter.changed = true;
        }
    }
    if !rewriter.changed {
        return sql.to_string();
    }
    statements
        .iter()
        .map(Statement::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A query whose rows come from a catalog table that is always empty here has no rows:
/// it becomes an empty result with the same column names, whatever PostgreSQL-only
/// expressions it selects (psql's `\d` asks for policies, statistics, publications).
fn empty_result(statement: &Statement) -> Option<Statement> {
    let Statement::Query(query) = statement else {
        return None;
    };
    if !body_is_empty(&query.body) {
        return None;
    }
    let mut first = query.body.as_ref();
    while let SetExpr::SetOperation { left, .. } = first {
        first = left.as_ref();
    }
    let SetExpr::Select(select) = first else {
        return None;
    };
    if !matches!(select.group_by, GroupByExpr::Expressions(ref e, _) if e.is_empty()) {
        return None;
    }
    let mut columns = Vec::new();
    for (i, item) in select.projection.iter().enumerate() {
        let name = match item {
            SelectItem::ExprWithAlias { expr, .. } | SelectItem::UnnamedExpr(expr)
                if is_aggregate(expr) =>
            {
                // An aggregate over no rows is still one row (count = 0).
                return None;
            }
            SelectItem::ExprWithAlias { alias, .. } => alias.value.clone(),
            SelectItem::UnnamedExpr(Expr::CompoundIdentifier(parts)) => parts.last()?.value.clone(),
            SelectItem::UnnamedExpr(Expr::Identifier(i)) => i.value.clone(),
            SelectItem::UnnamedExpr(_) => format!("column{}", i + 1),
            _ => return None,
        };
        columns.push(format!(
            "CAST(NULL AS TEXT) AS \"{}\"",
            name.replace('"', "\"\"")
        ));
    }
    let sql = format!("SELECT {} WHERE false", columns.join(", "));
    Parser::parse_sql(&PostgreSqlDialect {}, &sql).ok()?.pop()
}

/// Whether `expr` holds a subquery.
fn has_subquery(expr: &Expr) -> bool {
    datafusion::sql::sqlparser::ast::visit_expressions(expr, |e| {
        if matches!(
            e,
            Expr::Subquery(_) | Expr::InSubquery { .. } | Expr::Exists { .. }
        ) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .is_break()
}

/// A query that orders by a subquery (Grafana's table list orders by "is it on the
/// search path") computes the sort keys as hidden columns of an inner query and sorts
/// outside it, where the engine accepts them.
fn order_outside(statement: &Statement) -> Option<Statement> {
    let Statement::Query(query) = statement else {
        return None;
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    let order = query.order_by.as_ref()?;
    let OrderByKind::Expressions(items) = &order.kind else {
        return None;
    };
    if !items.iter().any(|o| has_subquery(&o.expr)) {
        return None;
    }
    let mut names = Vec::new();
    for item in &select.projection {
        names.push(match item {
            SelectItem::ExprWithAlias { alias, .. } => alias.clone(),
            SelectItem::UnnamedExpr(Expr::Identifier(i)) => i.clone(),
            SelectItem::UnnamedExpr(Expr::CompoundIdentifier(parts)) => parts.last()?.clone(),
            _ => return None,
        });
    }
    let mut inner = select.as_ref().clone();
    let mut keys = Vec::new();
    for (k, item) in items.iter().enumerate() {
        let key = match &item.expr {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => {
                    let i: usize = n.parse().ok()?;
                    names.get(i.checked_sub(1)?)?.clone()
                }
                _ => return None,
            },
            expr => {
                let alias = Ident::with_quote('"', format!("__order_{k}"));
                inner.projection.push(SelectItem::ExprWithAlias {
                    expr: expr.clone(),
                    alias: alias.clone(),
                });
                alias
            }
        };
        keys.push(format!("{key}{}", item.options));
    }
    let columns = names
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let limit = query
        .limit_clause
        .as_ref()
        .map(|l| format!(" {l}"))
        .unwrap_or_default();
    let sql = format!(
        "SELECT {columns} FROM ({inner}) AS __ordered ORDER BY {}{limit}",
        keys.join(", ")
    );
    Parser::parse_sql(&PostgreSqlDialect {}, &sql).ok()?.pop()
}

struct Rewriter {
    changed: bool,
    /// How many CASE expressions the visit is inside.
    in_case: usize,
}

fn last_part(name: &ObjectName) -> Option<String> {
    name.0
        .last()
        .and_then(ObjectNamePart::as_ident)
        .map(|i| i.value.to_lowercase())
}

fn is_pg_catalog(name: &ObjectName) -> bool {
    name.0.len() == 2
        && name.0[0]
            .as_ident()
            .is_some_and(|i| i.value.eq_ignore_ascii_case("pg_catalog"))
}

/// The session values PostgreSQL spells without parentheses (`user`, `current_user`, …);
/// the engine has them as functions.
const SESSION_VALUES: &[&str] = &[
    "user",
    "current_user",
    "session_user",
    "current_role",
    "current_catalog",
];

/// `text` parsed as one expression.
fn parse_expr(text: &str) -> Option<Expr> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(text)
        .and_then(|mut p| p.parse_expr())
        .ok()
}

/// Whether `expr` is an aggregate call already.
fn is_aggregate(expr: &Expr) -> bool {
    let Expr::Function(f) = expr else {
        return false;
    };
    matches!(
        last_part(&f.name).as_deref(),
        Some(
            "count"
                | "max"
                | "min"
                | "sum"
                | "avg"
                | "array_agg"
                | "string_agg"
                | "bool_and"
                | "bool_or"
                | "every"
                | "first_value"
                | "last_value"
        )
    )
}

/// Whether a query body has no rows: a SELECT whose rows come from an inner join with a
/// `pg_catalog` table that is always empty here, or a UNION / INTERSECT of such.
fn body_is_empty(body: &SetExpr) -> bool {
    let select = match body {
        SetExpr::Select(select) => select,
        SetExpr::SetOperation { left, right, .. } => {
            return body_is_empty(left) && body_is_empty(right);
        }
        _ => return false,
    };
    let empty = |factor: &TableFactor| {
        reads_catalog(factor)
            && matches!(factor, TableFactor::Table { name, .. }
                if last_part(name).is_some_and(|t| query::pg_catalog::is_always_empty(&t)))
    };
    select.from.iter().any(|t| {
        t.joins.iter().all(|j| {
            matches!(
                j.join_operator,
                datafusion::sql::sqlparser::ast::JoinOperator::Inner(_)
                    | datafusion::sql::sqlparser::ast::JoinOperator::Join(_)
                    | datafusion::sql::sqlparser::ast::JoinOperator::CrossJoin(_)
            )
        }) && (empty(&t.relation) || t.joins.iter().any(|j| empty(&j.relation)))
    })
}

/// Whether a FROM item is a table of `pg_catalog`.
fn reads_catalog(factor: &TableFactor) -> bool {
    let TableFactor::Table {
        name, args: None, ..
    } = factor
    else {
        return false;
    };
    let parts: Vec<&Ident> = name.0.iter().filter_map(ObjectNamePart::as_ident).collect();
    match parts.as_slice() {
        [schema, _] => schema.value.eq_ignore_ascii_case("pg_catalog"),
        [table] => table.quote_style.is_none() && query::pg_catalog::is_catalog_table(&table.value),
        _ => false,
    }
}

fn operator(symbol: &str) -> Option<BinaryOperator> {
    Some(match symbol {
        "~" => BinaryOperator::PGRegexMatch,
        "~*" => BinaryOperator::PGRegexIMatch,
        "!~" => BinaryOperator::PGRegexNotMatch,
        "!~*" => BinaryOperator::PGRegexNotIMatch,
        "~~" => BinaryOperator::PGLikeMatch,
        "!~~" => BinaryOperator::PGNotLikeMatch,
        "=" => BinaryOperator::Eq,
        "<>" | "!=" => BinaryOperator::NotEq,
        "<" => BinaryOperator::Lt,
        "<=" => BinaryOperator::LtEq,
        ">" => BinaryOperator::Gt,
        ">=" => BinaryOperator::GtEq,
        "||" => BinaryOperator::StringConcat,
        _ => return None,
    })
}

/// The text of a table function's arguments.
fn arguments(args: &[datafusion::sql::sqlparser::ast::FunctionArg]) -> String {
    args.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl VisitorMut for Rewriter {
    type Break = ();

    fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
        // PostgreSQL searches pg_catalog before the tables: `FROM pg_database` is
        // `pg_catalog.pg_database`.
        if let TableFactor::Table {
            name, args: None, ..
        } = factor
            && name.0.len() == 1
            && name.0[0].as_ident().is_some_and(|i| {
                i.quote_style.is_none() && query::pg_catalog::is_catalog_table(&i.value)
            })
        {
            name.0
                .insert(0, ObjectNamePart::Identifier(Ident::new("pg_catalog")));
            self.changed = true;
            return ControlFlow::Continue(());
        }
        // A function in FROM with an alias names one column after the alias, as in
        // PostgreSQL: `generate_series(1, 3) AS i` is a table of `i`, and
        // `string_to_array('a,b', ',') s` a table of one array `s`.
        let TableFactor::Table {
            name,
            alias: Some(alias),
            args: Some(args),
            ..
        } = factor
        else {
            return ControlFlow::Continue(());
        };
        if !alias.columns.is_empty() {
            return ControlFlow::Continue(());
        }
        let Some(function) = last_part(name) else {
            return ControlFlow::Continue(());
        };
        let column = &alias.name;
        let call = format!("{function}({})", arguments(&args.args));
        let select = match function.as_str() {
            "generate_series" | "range" | "unnest" => format!("unnest({call})"),
            _ => call,
        };
        let text = format!("(SELECT {select} AS {column}) AS {column}");
        if let Ok(derived) = Parser::new(&PostgreSqlDialect {})
            .try_with_sql(&text)
            .and_then(|mut p| p.parse_table_factor())
        {
            *factor = derived;
            self.changed = true;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if matches!(expr, Expr::Case { .. }) {
            self.in_case += 1;
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if matches!(expr, Expr::Case { .. }) {
            self.in_case = self.in_case.saturating_sub(1);
        }
        match expr {
            // `x IN (SELECT ...)` inside CASE (Grafana's search-path test): the engine
            // takes IN subqueries only as filters, so the set becomes an array.
            Expr::InSubquery {
                expr: needle,
                subquery,
                negated,
            } if self.in_case > 0 => {
                if let SetExpr::Select(select) = subquery.body.as_mut()
                    && select.projection.len() == 1
                    && let SelectItem::UnnamedExpr(item)
                    | SelectItem::ExprWithAlias { expr: item, .. } = &mut select.projection[0]
                    && let Some(agg) = parse_expr(&format!("array_agg({item})"))
                {
                    *item = agg;
                    let not = if *negated { "NOT " } else { "" };
                    if let Some(e) = parse_expr(&format!("{not}array_has(({subquery}), {needle})"))
                    {
                        *expr = e;
                        self.changed = true;
                    }
                }
            }
            Expr::Function(Function { name, .. }) if is_pg_catalog(name) => {
                name.0.remove(0);
                self.changed = true;
            }
            Expr::BinaryOp { op, .. } => {
                if let BinaryOperator::PGCustomBinaryOperator(parts) = op
                    && let Some(plain) = parts.last().and_then(|s| operator(s))
                {
                    *op = plain;
                    self.changed = true;
                }
            }
            Expr::Subquery(query) if body_is_empty(&query.body) => {
                // Over a catalog table that is always empty here, a scalar subquery
                // is NULL.
                *expr = Expr::value(Value::Null);
                self.changed = true;
            }
            Expr::Subquery(query) => {
                // A scalar subquery over the catalogs (psql's `\d`) returns at most one
                // row in PostgreSQL; the engine wants that stated as an aggregate.
                if let SetExpr::Select(select) = query.body.as_mut()
                    && select.projection.len() == 1
                    && matches!(select.group_by, GroupByExpr::Expressions(ref e, _) if e.is_empty())
                    && !select.from.is_empty()
                    && select.from.iter().all(|t| {
                        reads_catalog(&t.relation)
                            && t.joins.iter().all(|j| reads_catalog(&j.relation))
                    })
                {
                    let item = &mut select.projection[0];
                    let inner = match item {
                        SelectItem::UnnamedExpr(e) => Some(e),
                        SelectItem::ExprWithAlias { expr, .. } => Some(expr),
                        _ => None,
                    };
                    if let Some(inner) = inner
                        && !is_aggregate(inner)
                        && let Some(e) = parse_expr(&format!("max({inner})"))
                    {
                        *inner = e;
                        self.changed = true;
                    }
                }
            }
            Expr::Collate { expr: inner, .. } => {
                *expr = (**inner).clone();
                self.changed = true;
            }
            Expr::Cast {
                expr: inner,
                data_type,
                ..
            } => {
                let target = match data_type {
                    DataType::Regclass => "regclass".to_string(),
                    DataType::Custom(name, _) => last_part(name).unwrap_or_default(),
                    _ => return ControlFlow::Continue(()),
                };
                match target.as_str() {
                    "regclass" => {
                        // A table name's oid is a function of the name (see pg_catalog).
                        if let Expr::Value(v) = inner.as_ref()
                            && let Value::SingleQuotedString(s) = &v.value
                        {
                            let table = s.rsplit('.').next().unwrap_or(s).trim_matches('"');
                            *expr = Expr::value(Value::Number(
                                query::pg_catalog::table_oid(table).to_string(),
                                false,
                            ));
                        } else {
                            *expr = (**inner).clone();
                        }
                        self.changed = true;
                    }
                    "regtype" | "regproc" | "regprocedure" | "regnamespace" | "regrole"
                    | "regoper" | "oid" => {
                        *expr = Expr::Cast {
                            kind: CastKind::Cast,
                            expr: inner.clone(),
                            data_type: DataType::BigInt(None),
                            array: false,
                            format: None,
                        };
                        self.changed = true;
                    }
                    "text" | "name" | "char" | "bpchar" | "varchar" => {
                        *data_type = DataType::Text;
                        self.changed = true;
                    }
                    _ => {}
                }
            }
            Expr::Identifier(Ident {
                value,
                quote_style: None,
                ..
            }) if SESSION_VALUES.contains(&value.to_lowercase().as_str()) => {
                if let Some(e) = parse_expr(&format!("{}()", value.to_lowercase())) {
                    *expr = e;
                    self.changed = true;
                }
            }
            Expr::Function(Function {
                name,
                args: FunctionArguments::None,
                ..
            }) => {
                // `current_user`, `session_user`, `user` parse as calls without
                // parentheses; the engine wants the parentheses.
                if let Some(n) = last_part(name)
                    && (SESSION_VALUES.contains(&n.as_str()) || n == "current_schema")
                    && let Some(e) = parse_expr(&format!("{n}()"))
                {
                    *expr = e;
                    self.changed = true;
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_queries_pass_unchanged() {
        let sql = "SELECT time, value FROM cpu WHERE time > now() - INTERVAL '1 hour'";
        assert_eq!(rewrite(sql), sql);
        assert_eq!(rewrite("not sql at all"), "not sql at all");
    }

    #[test]
    fn postgres_spellings_become_engine_sql() {
        let psql = "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c \
                    LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                    WHERE c.relname OPERATOR(pg_catalog.~) '^(cpu)$' COLLATE pg_catalog.default \
                    AND pg_catalog.pg_table_is_visible(c.oid)";
        let out = rewrite(psql);
        assert!(out.contains("c.relname ~ '^(cpu)$'"), "{out}");
        assert!(out.contains(" pg_table_is_visible(c.oid)"), "{out}");
        assert!(!out.contains("COLLATE"), "{out}");
        assert!(out.contains("FROM pg_catalog.pg_class"), "{out}");

        let grafana = "SELECT CASE WHEN trim(s[i]) = '\"$user\"' THEN user ELSE trim(s[i]) END \
                       FROM generate_series(array_lower(string_to_array(current_setting('search_path'),','),1), \
                       array_upper(string_to_array(current_setting('search_path'),','),1)) as i, \
                       string_to_array(current_setting('search_path'),',') s";
        let out = rewrite(grafana);
        assert!(out.contains("(SELECT unnest(generate_series("), "{out}");
        assert!(out.contains("AS s) AS s"), "{out}");

        let out = rewrite("SELECT 'cpu'::regclass, c.oid::pg_catalog.regclass FROM t c");
        assert!(
            out.contains(&query::pg_catalog::table_oid("cpu").to_string()),
            "{out}"
        );
    }

    /// A few statements a client may send, with the tokens PostgreSQL spellings use.
    fn sql_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let word = prop::sample::select(vec![
            "SELECT",
            "FROM",
            "WHERE",
            "CASE",
            "WHEN",
            "THEN",
            "ELSE",
            "END",
            "IN",
            "(",
            ")",
            ",",
            "1",
            "'x'",
            "pg_catalog.pg_class",
            "pg_class",
            "c",
            "c.oid",
            "::regclass",
            "::pg_catalog.text",
            "OPERATOR(pg_catalog.~)",
            "COLLATE",
            "pg_catalog.default",
            "generate_series(1, 3)",
            "AS",
            "i",
            "s",
            "s[i]",
            "user",
            "ORDER BY",
            "LIMIT",
            "UNION",
            "DROP TABLE",
            "INSERT INTO",
            "COPY",
            "DELETE FROM",
            "machine",
            ";",
            "pg_attrdef d",
            "EXISTS",
            "NOT",
            "=",
            "array_agg",
            "*",
            "\"q\"",
            "$1",
            "?",
        ]);
        let expr = prop::sample::select(vec![
            "1",
            "c.oid::regclass",
            "'cpu'::regclass",
            "x::pg_catalog.text",
            "user",
            "pg_catalog.format_type(1, 2)",
            "c.relname OPERATOR(pg_catalog.~) 'a' COLLATE pg_catalog.default",
            "(SELECT d.adbin FROM pg_catalog.pg_attrdef d WHERE d.adrelid = 1)",
            "CASE WHEN x IN (SELECT 1) THEN 1 ELSE 2 END",
            "s[i]",
            "$1",
        ]);
        let table = prop::sample::select(vec![
            "machine",
            "pg_class c",
            "pg_catalog.pg_policy p",
            "generate_series(1, 3) AS i",
            "string_to_array('a,b', ',') s",
            "pg_catalog.pg_attrdef d",
        ]);
        let statement = (expr.clone(), table, expr, 0..6usize).prop_map(|(a, t, b, k)| match k {
            0 => format!("SELECT {a} FROM {t} WHERE {b}"),
            1 => format!("SELECT {a} AS v FROM {t} ORDER BY {b}, 1"),
            2 => format!("SELECT {a} FROM {t} UNION SELECT {b} FROM {t}"),
            3 => format!("CREATE TABLE x AS SELECT {a} FROM {t}"),
            4 => format!("DELETE FROM {t} WHERE {b}"),
            _ => format!("EXPLAIN SELECT {a} FROM {t}"),
        });
        prop_oneof![
            prop::collection::vec(word, 0..24).prop_map(|w| w.join(" ")),
            ".{0,64}",
            statement,
        ]
    }

    fn kinds(sql: &str) -> Option<Vec<std::mem::Discriminant<Statement>>> {
        Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .ok()
            .map(|s| s.iter().map(std::mem::discriminant).collect())
    }

    proptest::proptest! {
        /// The rewrite never panics, and never turns one kind of statement into another:
        /// a statement the sandbox refuses stays refused.
        #[test]
        fn the_rewrite_keeps_every_statement_what_it_was(sql in sql_text()) {
            let out = rewrite(&sql);
            if let Some(before) = kinds(&sql) {
                let after = kinds(&out);
                proptest::prop_assert_eq!(Some(before), after, "{} => {}", sql, out);
            }
            let _ = crate::pg::statement::commands(&sql);
        }
    }
}
