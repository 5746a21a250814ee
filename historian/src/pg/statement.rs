//! What a PostgreSQL client's statement is, before the engine sees it: session commands
//! that drivers send on their own (SET, BEGIN, SHOW, DISCARD) are answered here and read
//! no data; everything else is a query for the engine, which checks it. Parameters of
//! prepared statements become typed literals in the text, so the executed statement is
//! an ordinary query that goes through the sandbox, the policy and the audit log.

use crate::placeholder::{float_literal, quoted};
use datafusion::sql::sqlparser::ast::{Set, Statement};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use pgwire::api::Type;
use pgwire::api::portal::Portal;
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};

/// A statement as the PostgreSQL front end handles it.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// A query for the engine, with its text.
    Query(String),
    /// `SET name = value` (and `RESET`): accepted, changes nothing the engine reads.
    Set,
    /// `BEGIN` / `START TRANSACTION`: reads are already consistent per statement.
    Begin,
    /// `COMMIT` / `END`.
    Commit,
    /// `ROLLBACK` / `ABORT`.
    Rollback,
    /// `SHOW name`.
    Show(String),
    /// `DISCARD`, `DEALLOCATE`: session housekeeping of drivers and pools.
    Housekeeping(&'static str),
    /// `DECLARE name CURSOR FOR query` (psql's FETCH_COUNT, psycopg's named cursors,
    /// Tableau): the query starts, its rows wait for FETCH.
    Declare {
        /// The cursor's name.
        name: String,
        /// The query.
        query: String,
    },
    /// `FETCH [FORWARD] n | ALL | NEXT FROM name`; None = all the rest.
    Fetch {
        /// The cursor's name.
        name: String,
        /// How many rows.
        count: Option<usize>,
    },
    /// `CLOSE name`, or `CLOSE ALL` (None).
    Close(Option<String>),
    /// A statement the front end understands but does not support, by name.
    Unsupported(String),
}

/// Splits `sql` into the statements a simple-protocol message holds. Text that does not
/// parse as PostgreSQL goes to the engine whole, which reports the error.
/// Text without statements (`-- ping`, `;`) has none: the answer is an empty query.
pub fn commands(sql: &str) -> Vec<Command> {
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) if statements.is_empty() => Vec::new(),
        Ok(statements) if statements.len() > 1 => statements.iter().map(classify).collect(),
        Ok(statements) if statements.len() == 1 => match classify(&statements[0]) {
            // The client's own text, not a re-rendering of it.
            Command::Query(_) => vec![Command::Query(sql.to_string())],
            other => vec![other],
        },
        _ => vec![Command::Query(sql.to_string())],
    }
}

fn classify(statement: &Statement) -> Command {
    match statement {
        Statement::Set(Set::SingleAssignment { .. })
        | Statement::Set(Set::SetTimeZone { .. })
        | Statement::Set(Set::SetNames { .. })
        | Statement::Set(Set::SetNamesDefault { .. })
        | Statement::Set(Set::SetTransaction { .. })
        | Statement::Set(Set::SetSessionParam(..)) => Command::Set,
        Statement::StartTransaction { .. } => Command::Begin,
        Statement::Commit { .. } => Command::Commit,
        Statement::Rollback { .. } => Command::Rollback,
        Statement::ShowVariable { variable } => Command::Show(
            variable
                .iter()
                .map(|i| i.value.to_lowercase())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        Statement::Discard { .. } => Command::Housekeeping("DISCARD ALL"),
        Statement::Deallocate { .. } => Command::Housekeeping("DEALLOCATE"),
        Statement::Declare { stmts } => match stmts.as_slice() {
            [declare] => match (&declare.for_query, declare.names.as_slice()) {
                (Some(query), [name]) => Command::Declare {
                    name: name.value.clone(),
                    query: query.to_string(),
                },
                _ => Command::Unsupported("DECLARE without a query".into()),
            },
            _ => Command::Unsupported("DECLARE of several cursors".into()),
        },
        Statement::Fetch {
            name, direction, ..
        } => {
            use datafusion::sql::sqlparser::ast::{FetchDirection as D, Value};
            let number = |v: &datafusion::sql::sqlparser::ast::ValueWithSpan| match &v.value {
                Value::Number(n, _) => n.parse::<usize>().ok(),
                _ => None,
            };
            let count = match direction {
                D::Count { limit } | D::Forward { limit: Some(limit) } => match number(limit) {
                    Some(n) => Some(n),
                    None => return Command::Unsupported("FETCH with this count".into()),
                },
                D::Next | D::Forward { limit: None } => Some(1),
                D::All | D::ForwardAll => None,
                _ => return Command::Unsupported("FETCH other than forward".into()),
            };
            Command::Fetch {
                name: name.value.clone(),
                count,
            }
        }
        Statement::Close { cursor } => match cursor {
            datafusion::sql::sqlparser::ast::CloseCursor::All => Command::Close(None),
            datafusion::sql::sqlparser::ast::CloseCursor::Specific { name } => {
                Command::Close(Some(name.value.clone()))
            }
        },
        other => Command::Query(other.to_string()),
    }
}

/// The text of a prepared statement with its parameters bound as literals of their
/// types.
pub fn bind<S: Clone>(sql: &str, portal: &Portal<S>, types: &[Type]) -> PgWireResult<String> {
    let mut failure = None;
    let bound = crate::placeholder::substitute(sql, portal.parameter_len(), |i| {
        let ty = types.get(i).cloned().unwrap_or(Type::UNKNOWN);
        literal(portal, i, &ty).map_err(|e| {
            let message = e.to_string();
            failure = Some(e);
            message
        })
    });
    match (bound, failure) {
        (Ok(sql), _) => Ok(sql),
        (Err(_), Some(e)) => Err(e),
        (Err(message), None) => Err(user_error("08P01", message)),
    }
}

/// Parameter `idx` of `portal` as a SQL literal of type `ty`.
fn literal<S: Clone>(portal: &Portal<S>, idx: usize, ty: &Type) -> PgWireResult<String> {
    let Some(Some(raw)) = portal.parameters.get(idx) else {
        return Ok("NULL".into());
    };
    let place = |e: &dyn std::fmt::Display| {
        user_error(
            "22P02",
            format!("parameter ${} of type {}: {e}", idx + 1, ty.name()),
        )
    };
    let text = portal.parameter_format.is_text(idx);
    if text {
        let value = std::str::from_utf8(raw).map_err(|e| place(&e))?;
        return Ok(match *ty {
            Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => {
                let v: i64 = value.trim().parse().map_err(|e| place(&e))?;
                v.to_string()
            }
            Type::FLOAT4 | Type::FLOAT8 | Type::NUMERIC => {
                let v: f64 = value.trim().parse().map_err(|e| place(&e))?;
                float_literal(v)
            }
            Type::BOOL => match value.trim().to_ascii_lowercase().as_str() {
                "t" | "true" | "on" | "yes" | "1" => "TRUE".into(),
                "f" | "false" | "off" | "no" | "0" => "FALSE".into(),
                _ => return Err(place(&"not a boolean")),
            },
            Type::TIMESTAMP | Type::TIMESTAMPTZ => format!("TIMESTAMP {}", quoted(value)),
            Type::DATE => format!("DATE {}", quoted(value)),
            _ => quoted(value),
        });
    }
    Ok(match *ty {
        Type::INT2 => param::<i16>(portal, idx, ty)?.to_string(),
        Type::INT4 => param::<i32>(portal, idx, ty)?.to_string(),
        Type::INT8 => param::<i64>(portal, idx, ty)?.to_string(),
        Type::OID => param::<u32>(portal, idx, ty)?.to_string(),
        Type::FLOAT4 => float_literal(param::<f32>(portal, idx, ty)? as f64),
        Type::FLOAT8 => float_literal(param::<f64>(portal, idx, ty)?),
        Type::BOOL => if param::<bool>(portal, idx, ty)? {
            "TRUE"
        } else {
            "FALSE"
        }
        .into(),
        Type::TIMESTAMP => {
            let t = param::<chrono::NaiveDateTime>(portal, idx, ty)?;
            format!("TIMESTAMP '{}'", t.format("%Y-%m-%dT%H:%M:%S%.f"))
        }
        Type::TIMESTAMPTZ => {
            let t = param::<chrono::DateTime<chrono::FixedOffset>>(portal, idx, ty)?
                .with_timezone(&chrono::Utc);
            format!("TIMESTAMP '{}'", t.format("%Y-%m-%dT%H:%M:%S%.fZ"))
        }
        Type::DATE => {
            let d = param::<chrono::NaiveDate>(portal, idx, ty)?;
            format!("DATE '{}'", d.format("%Y-%m-%d"))
        }
        Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR | Type::UNKNOWN => {
            quoted(&param::<String>(portal, idx, ty)?)
        }
        _ => {
            return Err(place(
                &"this type is accepted in text format only; send the parameter as text",
            ));
        }
    })
}

fn param<T>(portal: &Portal<impl Clone>, idx: usize, ty: &Type) -> PgWireResult<T>
where
    T: for<'a> pgwire::types::FromSqlText<'a> + postgres_types::FromSqlOwned,
{
    portal
        .parameter::<T>(idx, ty)?
        .ok_or_else(|| user_error("22004", format!("parameter ${} is NULL", idx + 1)))
}

/// An `ERROR` with SQLSTATE `code`.
pub fn user_error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_commands_are_answered_here_and_queries_go_to_the_engine() {
        assert_eq!(commands("SET extra_float_digits = 3"), vec![Command::Set]);
        assert_eq!(commands("set application_name to 'x'"), vec![Command::Set]);
        assert_eq!(
            commands("BEGIN; SELECT 1; COMMIT"),
            vec![
                Command::Begin,
                Command::Query("SELECT 1".into()),
                Command::Commit
            ]
        );
        assert_eq!(
            commands("SHOW TRANSACTION ISOLATION LEVEL"),
            vec![Command::Show("transaction isolation level".into())]
        );
        assert_eq!(
            commands("select *  from cpu where host = 'a'"),
            vec![Command::Query("select *  from cpu where host = 'a'".into())]
        );
        // DDL is a query for the engine, whose sandbox refuses it.
        assert_eq!(
            commands("DROP TABLE cpu"),
            vec![Command::Query("DROP TABLE cpu".into())]
        );
        assert_eq!(commands("SELEC 1"), vec![Command::Query("SELEC 1".into())]);
        assert_eq!(commands("-- ping"), vec![]);
        assert_eq!(
            commands(
                "DECLARE c NO SCROLL CURSOR FOR SELECT * FROM cpu; FETCH FORWARD 100 FROM c; FETCH ALL IN c; CLOSE c"
            ),
            vec![
                Command::Declare {
                    name: "c".into(),
                    query: "SELECT * FROM cpu".into()
                },
                Command::Fetch {
                    name: "c".into(),
                    count: Some(100)
                },
                Command::Fetch {
                    name: "c".into(),
                    count: None
                },
                Command::Close(Some("c".into())),
            ]
        );
    }
}
