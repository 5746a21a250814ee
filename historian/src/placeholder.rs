//! Binding `$n` and `?` parameters of prepared statements (PostgreSQL Bind, Flight SQL
//! DoPut) as literals, tokenized as the engine parses. Each value becomes one literal
//! token of its type, never SQL text, and the bound statement then runs as an ordinary query: through the sandbox, the caller's
//! policy and the audit log (which seals literals).

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

/// `sql` with each `$n` replaced by `literal(n - 1)` and each `?` by the next value;
/// `count` values are bound.
pub fn substitute(
    sql: &str,
    count: usize,
    mut literal: impl FnMut(usize) -> Result<String, String>,
) -> Result<String, String> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .with_unescape(false)
        .tokenize()
        .map_err(|e| format!("syntax error: {e}"))?;
    let mut out = String::with_capacity(sql.len() + 16 * count);
    let mut positional = 0;
    for token in tokens {
        match &token {
            // `?` (ODBC, JDBC, ADBC): the next value in order.
            Token::Placeholder(p) if p == "?" => {
                if positional >= count {
                    return Err(format!(
                        "the statement has more ? placeholders than the {count} values bound"
                    ));
                }
                push_literal(&mut out, literal(positional)?);
                positional += 1;
            }
            Token::Placeholder(p) if p.starts_with('$') => {
                let index: usize = p[1..]
                    .parse()
                    .ok()
                    .filter(|i| *i >= 1 && *i <= count)
                    .ok_or_else(|| {
                        format!("the statement uses {p} but {count} parameters were bound")
                    })?;
                push_literal(&mut out, literal(index - 1)?);
            }
            other => out.push_str(&other.to_string()),
        }
    }
    Ok(out)
}

/// Appends a literal as one self-contained token: a negative number is parenthesised, so
/// that `1-$1` with `-5` reads `1-(-5)`, never `1--5` (the start of a comment).
fn push_literal(out: &mut String, literal: String) {
    if literal.starts_with('-') {
        out.push('(');
        out.push_str(&literal);
        out.push(')');
    } else {
        out.push_str(&literal);
    }
}

/// `value` as a single-quoted SQL string literal.
pub fn quoted(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A float as a literal that stays a float (and NaN and infinities as casts).
pub fn float_literal(v: f64) -> String {
    if v.is_finite() {
        // Debug keeps a decimal point.
        format!("{v:?}")
    } else {
        format!("CAST('{v}' AS DOUBLE)")
    }
}

/// One row of Arrow values (Flight SQL parameters) as literals.
pub fn arrow_literal(array: &dyn arrow::array::Array, row: usize) -> Result<String, String> {
    use arrow::array::AsArray;
    use arrow::datatypes::*;
    if array.is_null(row) {
        return Ok("NULL".into());
    }
    Ok(match array.data_type() {
        DataType::Boolean => {
            if array.as_boolean().value(row) {
                "TRUE".into()
            } else {
                "FALSE".into()
            }
        }
        DataType::Int8 => array.as_primitive::<Int8Type>().value(row).to_string(),
        DataType::Int16 => array.as_primitive::<Int16Type>().value(row).to_string(),
        DataType::Int32 => array.as_primitive::<Int32Type>().value(row).to_string(),
        DataType::Int64 => array.as_primitive::<Int64Type>().value(row).to_string(),
        DataType::UInt8 => array.as_primitive::<UInt8Type>().value(row).to_string(),
        DataType::UInt16 => array.as_primitive::<UInt16Type>().value(row).to_string(),
        DataType::UInt32 => array.as_primitive::<UInt32Type>().value(row).to_string(),
        DataType::UInt64 => array.as_primitive::<UInt64Type>().value(row).to_string(),
        DataType::Float32 => float_literal(array.as_primitive::<Float32Type>().value(row) as f64),
        DataType::Float64 => float_literal(array.as_primitive::<Float64Type>().value(row)),
        DataType::Utf8 => quoted(array.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => quoted(array.as_string::<i64>().value(row)),
        DataType::Utf8View => quoted(array.as_string_view().value(row)),
        DataType::Timestamp(_, _) => {
            let ns = arrow::compute::cast(
                &array.slice(row, 1),
                &DataType::Timestamp(TimeUnit::Nanosecond, None),
            )
            .map_err(|e| e.to_string())?;
            let ns = ns.as_primitive::<TimestampNanosecondType>().value(0);
            let t = chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(ns);
            format!("TIMESTAMP '{}'", t.format("%Y-%m-%dT%H:%M:%S%.f"))
        }
        DataType::Date32 => {
            let days = array.as_primitive::<Date32Type>().value(row);
            let date = days
                .checked_add(719_163)
                .and_then(chrono::NaiveDate::from_num_days_from_ce_opt)
                .ok_or("date out of range")?;
            format!("DATE '{}'", date.format("%Y-%m-%d"))
        }
        other => return Err(format!("parameters of type {other} are not supported")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_become_single_literals() {
        let sql = "SELECT * FROM t WHERE a = $1 AND b = '$2' AND c = $2";
        let out = substitute(sql, 2, |i| {
            Ok(if i == 0 {
                "5".into()
            } else {
                quoted("x' OR '1'='1")
            })
        })
        .unwrap();
        assert_eq!(
            out,
            "SELECT * FROM t WHERE a = 5 AND b = '$2' AND c = 'x'' OR ''1''=''1'"
        );
        assert!(substitute("SELECT $3", 2, |_| Ok("1".into())).is_err());
        let out = substitute("SELECT ? + ?, '?'", 2, |i| Ok((i + 1).to_string())).unwrap();
        assert_eq!(out, "SELECT 1 + 2, '?'");
        assert!(substitute("SELECT ?", 0, |_| Ok("1".into())).is_err());
        // A negative value never starts a comment.
        let out = substitute("SELECT 1-$1 AND x = 'y'", 1, |_| Ok("-5".into())).unwrap();
        assert_eq!(out, "SELECT 1-(-5) AND x = 'y'");
        assert_eq!(float_literal(1.0), "1.0");
        assert_eq!(float_literal(f64::NAN), "CAST('NaN' AS DOUBLE)");
    }
}
