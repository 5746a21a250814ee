//! The SQL sandbox: only queries run. Statements are checked on the parsed syntax tree
//! before planning, and planning runs with DDL, DML and statements disallowed as well.

use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::GenericDialect;

/// Why a statement may not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// The text does not parse.
    #[error("SQL syntax error: {0}")]
    Syntax(String),
    /// More than one statement, or none.
    #[error("send exactly one statement per query (got {0})")]
    StatementCount(usize),
    /// A statement other than a query.
    #[error(
        "only queries may run here (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE); {0} statements are refused"
    )]
    NotAQuery(String),
}

/// Parses `sql` and accepts it only if it is one query.
pub fn check(sql: &str) -> Result<(), SandboxError> {
    let statements = DFParser::parse_sql_with_dialect(sql, &GenericDialect {})
        .map_err(|e| SandboxError::Syntax(e.strip_backtrace()))?;
    if statements.len() != 1 {
        return Err(SandboxError::StatementCount(statements.len()));
    }
    check_statement(&statements[0])
}

fn check_statement(statement: &DfStatement) -> Result<(), SandboxError> {
    match statement {
        DfStatement::Statement(s) => check_sql_statement(s),
        DfStatement::Explain(e) => check_statement(&e.statement),
        DfStatement::CreateExternalTable(_) => {
            Err(SandboxError::NotAQuery("CREATE EXTERNAL TABLE".into()))
        }
        DfStatement::CopyTo(_) => Err(SandboxError::NotAQuery("COPY".into())),
        DfStatement::Reset(_) => Err(SandboxError::NotAQuery("RESET".into())),
    }
}

fn check_sql_statement(statement: &Statement) -> Result<(), SandboxError> {
    match statement {
        Statement::Query(_)
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ExplainTable { .. } => Ok(()),
        Statement::Explain { statement, .. } => check_sql_statement(statement),
        other => Err(SandboxError::NotAQuery(statement_kind(other))),
    }
}

/// The leading keywords of a statement, for the error message (never its literals).
fn statement_kind(statement: &Statement) -> String {
    let text = statement.to_string();
    let words: Vec<&str> = text
        .split_whitespace()
        .take(3)
        .take_while(|w| w.chars().all(|c| c.is_ascii_alphabetic() || c == '_'))
        .collect();
    match words.len() {
        0 => "this kind of".to_string(),
        1 => words[0].to_uppercase(),
        _ => words[..2].join(" ").to_uppercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_pass() {
        for sql in [
            "SELECT 1",
            "with t as (select 1 as a) select a from t",
            "EXPLAIN SELECT * FROM cpu",
            "EXPLAIN ANALYZE SELECT * FROM cpu",
            "SHOW TABLES",
            "SHOW COLUMNS FROM cpu",
            "DESCRIBE cpu",
            "SELECT * FROM information_schema.tables",
        ] {
            assert_eq!(check(sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn everything_else_is_refused_by_name() {
        for (sql, kind) in [
            ("CREATE TABLE t (a int)", "CREATE TABLE"),
            (
                "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/etc'",
                "CREATE EXTERNAL TABLE",
            ),
            ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY"),
            ("EXPLAIN COPY (SELECT 1) TO '/tmp/x.csv'", "COPY"),
            ("EXPLAIN ANALYZE INSERT INTO cpu VALUES (1)", "INSERT INTO"),
            ("INSERT INTO cpu VALUES (1)", "INSERT INTO"),
            ("DELETE FROM cpu", "DELETE FROM"),
            ("DROP TABLE cpu", "DROP TABLE"),
            ("SET datafusion.execution.batch_size = 1", "SET"),
            ("CREATE VIEW v AS SELECT 1", "CREATE VIEW"),
            ("RESET datafusion.execution.batch_size", "RESET"),
        ] {
            match check(sql) {
                Err(SandboxError::NotAQuery(k)) => assert!(k.starts_with(kind), "{sql}: {k}"),
                other => panic!("{sql}: {other:?}"),
            }
        }
        assert_eq!(
            check("SELECT 1; DROP TABLE cpu"),
            Err(SandboxError::StatementCount(2))
        );
        assert!(matches!(check("SELEC 1"), Err(SandboxError::Syntax(_))));
    }
}
