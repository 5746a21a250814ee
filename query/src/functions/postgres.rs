//! The PostgreSQL system functions that clients call at connect time and in their query
//! builders (Grafana, psql, DBeaver, Metabase): `version()`, `current_schema()`,
//! `current_setting()`, `format_type()`, `quote_ident()`, the array bounds, and the
//! privilege and description lookups. They answer from the session's own view; none
//! reads data or files.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int32Array, ListArray, StringArray, new_null_array};
use arrow::datatypes::{DataType, Field, Int64Type};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};
use datafusion::prelude::SessionContext;

/// The server settings `current_setting()`, `SHOW` and `pg_settings` report.
pub const SETTINGS: &[(&str, &str)] = &[
    ("server_version", "16.6 (Historian)"),
    ("server_version_num", "160006"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("transaction_isolation", "read committed"),
    ("transaction_read_only", "on"),
    ("default_transaction_read_only", "on"),
    ("standard_conforming_strings", "on"),
    ("integer_datetimes", "on"),
    ("timezone", "UTC"),
    ("datestyle", "ISO, MDY"),
    ("intervalstyle", "postgres"),
    ("search_path", "public"),
    ("max_identifier_length", "63"),
    ("is_superuser", "off"),
    ("lc_collate", "C.UTF-8"),
    ("lc_ctype", "C.UTF-8"),
];

/// The value of setting `name` (case-insensitive).
pub fn setting(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    let name = match name.as_str() {
        "transaction isolation level" => "transaction_isolation",
        other => other,
    };
    SETTINGS.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
}

/// Which function.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Kind {
    /// A constant text: `version()`, `current_schema()`, `current_user`, ...
    Text(String),
    /// A constant boolean: `pg_table_is_visible`, `has_table_privilege`, ...
    Bool(bool),
    /// Always NULL text: `obj_description`, `pg_get_expr`, ...
    NullText,
    CurrentSetting,
    /// `current_schemas(include_implicit)`: the search path.
    CurrentSchemas,
    FormatType,
    QuoteIdent,
    ParseIdent,
    ArrayLower,
    ArrayUpper,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct PgFunction {
    name: String,
    kind: Kind,
    signature: Signature,
}

impl ScalarUDFImpl for PgFunction {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            Kind::Bool(_) => DataType::Boolean,
            Kind::ArrayLower | Kind::ArrayUpper => DataType::Int32,
            Kind::ParseIdent | Kind::CurrentSchemas => {
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
            }
            _ => DataType::Utf8,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        match &self.kind {
            Kind::Text(s) => Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(s.clone())))),
            Kind::Bool(b) => Ok(ColumnarValue::Scalar(ScalarValue::Boolean(Some(*b)))),
            Kind::NullText => Ok(ColumnarValue::Scalar(ScalarValue::Utf8(None))),
            Kind::CurrentSetting => text_map(&args.args[0], rows, |name| {
                setting(name).map(str::to_string).ok_or_else(|| {
                    DataFusionError::Execution(format!(
                        "unrecognized configuration parameter \"{name}\""
                    ))
                })
            }),
            Kind::QuoteIdent => text_map(&args.args[0], rows, |s| Ok(quote_ident(s))),
            Kind::CurrentSchemas => {
                let list = ListArray::from_iter_primitive_like(
                    (0..rows).map(|_| Some(vec![Some("public".to_string())])),
                );
                Ok(ColumnarValue::Array(Arc::new(list)))
            }
            Kind::FormatType => {
                let oids = args.args[0].to_array(rows)?;
                let oids = arrow::compute::cast(&oids, &DataType::Int64)?;
                let oids = oids.as_primitive::<Int64Type>();
                let out: StringArray = (0..oids.len())
                    .map(|i| {
                        oids.is_valid(i).then(|| {
                            crate::pg_catalog::format_type(oids.value(i)).unwrap_or("text")
                        })
                    })
                    .collect();
                Ok(ColumnarValue::Array(Arc::new(out)))
            }
            Kind::ParseIdent => {
                let texts = text_array(&args.args[0], rows)?;
                let mut values = Vec::with_capacity(texts.len());
                for i in 0..texts.len() {
                    values.push(
                        texts
                            .is_valid(i)
                            .then(|| parse_ident(texts.value(i)).map(|v| v.into_iter().map(Some)))
                            .transpose()?,
                    );
                }
                let list = ListArray::from_iter_primitive_like(values);
                Ok(ColumnarValue::Array(Arc::new(list)))
            }
            Kind::ArrayLower | Kind::ArrayUpper => {
                let arrays = args.args[0].to_array(rows)?;
                let lengths: Vec<Option<i32>> = match arrays.data_type() {
                    DataType::List(_) => {
                        let l = arrays.as_list::<i32>();
                        (0..l.len())
                            .map(|i| l.is_valid(i).then(|| l.value_length(i)))
                            .collect()
                    }
                    DataType::LargeList(_) => {
                        let l = arrays.as_list::<i64>();
                        (0..l.len())
                            .map(|i| l.is_valid(i).then(|| l.value_length(i) as i32))
                            .collect()
                    }
                    DataType::Null => vec![None; arrays.len()],
                    other => {
                        return Err(DataFusionError::Plan(format!(
                            "{}: expected an array, got {other}",
                            self.name
                        )));
                    }
                };
                let lower = self.kind == Kind::ArrayLower;
                let out: Int32Array = lengths
                    .into_iter()
                    .map(|l| l.filter(|l| *l > 0).map(|l| if lower { 1 } else { l }))
                    .collect();
                Ok(ColumnarValue::Array(Arc::new(out)))
            }
        }
    }
}

/// A list array of text items built from optional rows.
trait FromRows {
    fn from_iter_primitive_like<I, R>(rows: I) -> ListArray
    where
        I: IntoIterator<Item = Option<R>>,
        R: IntoIterator<Item = Option<String>>;
}

impl FromRows for ListArray {
    fn from_iter_primitive_like<I, R>(rows: I) -> ListArray
    where
        I: IntoIterator<Item = Option<R>>,
        R: IntoIterator<Item = Option<String>>,
    {
        let mut builder = arrow::array::ListBuilder::new(arrow::array::StringBuilder::new());
        for row in rows {
            match row {
                Some(items) => {
                    for item in items {
                        builder.values().append_option(item);
                    }
                    builder.append(true);
                }
                None => builder.append(false),
            }
        }
        builder.finish()
    }
}

fn text_array(value: &ColumnarValue, rows: usize) -> Result<StringArray> {
    let array = value.to_array(rows)?;
    let array: ArrayRef = if array.data_type() == &DataType::Null {
        new_null_array(&DataType::Utf8, array.len())
    } else {
        arrow::compute::cast(&array, &DataType::Utf8)?
    };
    Ok(array.as_string::<i32>().clone())
}

fn text_map(
    value: &ColumnarValue,
    rows: usize,
    f: impl Fn(&str) -> Result<String>,
) -> Result<ColumnarValue> {
    let texts = text_array(value, rows)?;
    let out = (0..texts.len())
        .map(|i| texts.is_valid(i).then(|| f(texts.value(i))).transpose())
        .collect::<Result<StringArray>>()?;
    Ok(ColumnarValue::Array(Arc::new(out)))
}

/// `quote_ident`: quotes an identifier when PostgreSQL would need it.
pub fn quote_ident(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

/// `parse_ident`: splits a qualified identifier into its parts, unquoting them.
fn parse_ident(s: &str) -> Result<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = s.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => {
                        return Err(DataFusionError::Execution(format!(
                            "string is not a valid identifier: \"{s}\""
                        )));
                    }
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == '.' {
                    break;
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
            part = part.trim().to_string();
        }
        if part.is_empty() {
            return Err(DataFusionError::Execution(format!(
                "string is not a valid identifier: \"{s}\""
            )));
        }
        parts.push(part);
        match chars.next() {
            Some('.') => continue,
            None => return Ok(parts),
            Some(_) => {
                return Err(DataFusionError::Execution(format!(
                    "string is not a valid identifier: \"{s}\""
                )));
            }
        }
    }
}

fn function(name: &str, kind: Kind, signature: TypeSignature) -> ScalarUDF {
    let volatility = match kind {
        Kind::Text(_) | Kind::Bool(_) | Kind::NullText => Volatility::Stable,
        _ => Volatility::Immutable,
    };
    ScalarUDF::from(PgFunction {
        name: name.to_string(),
        kind,
        signature: Signature::new(signature, volatility),
    })
}

/// Registers the PostgreSQL system functions for a session over database `db`.
pub fn register(ctx: &SessionContext, db: &str) {
    use TypeSignature::{Any, Exact, Nullary, OneOf};
    let text = || Exact(vec![DataType::Utf8]);
    let version = format!(
        "PostgreSQL {} on x86_64-pc-linux-gnu (Historian {})",
        setting("server_version").unwrap_or_default(),
        env!("CARGO_PKG_VERSION")
    );
    let mut functions = vec![
        function("version", Kind::Text(version), Nullary),
        function("current_schema", Kind::Text("public".into()), Nullary),
        function("current_database", Kind::Text(db.into()), Nullary),
        function("current_catalog", Kind::Text(db.into()), Nullary),
        function("pg_backend_pid", Kind::Text("0".into()), Nullary),
        function("pg_is_in_recovery", Kind::Bool(false), Nullary),
        function("current_setting", Kind::CurrentSetting, text()),
        function("current_schemas", Kind::CurrentSchemas, Any(1)),
        function("quote_ident", Kind::QuoteIdent, text()),
        function("parse_ident", Kind::ParseIdent, text()),
        function("pg_encoding_to_char", Kind::Text("UTF8".into()), Any(1)),
        function("format_type", Kind::FormatType, OneOf(vec![Any(1), Any(2)])),
        function("array_lower", Kind::ArrayLower, Any(2)),
        function("array_upper", Kind::ArrayUpper, Any(2)),
    ];
    for name in [
        "user",
        "current_user",
        "session_user",
        "current_role",
        "pg_get_userbyid",
    ] {
        let signature = if name == "pg_get_userbyid" {
            Any(1)
        } else {
            Nullary
        };
        functions.push(function(
            name,
            Kind::Text(crate::pg_catalog::OWNER.into()),
            signature,
        ));
    }
    for name in [
        "pg_table_is_visible",
        "pg_type_is_visible",
        "pg_function_is_visible",
        "has_table_privilege",
        "has_schema_privilege",
        "has_database_privilege",
        "has_column_privilege",
        "has_any_column_privilege",
    ] {
        functions.push(function(
            name,
            Kind::Bool(true),
            OneOf(vec![Any(1), Any(2), Any(3), Any(4)]),
        ));
    }
    for name in [
        "obj_description",
        "col_description",
        "shobj_description",
        "pg_get_expr",
        "pg_get_indexdef",
        "pg_get_constraintdef",
        "pg_get_viewdef",
        "pg_get_triggerdef",
        "pg_get_partkeydef",
        "pg_tablespace_location",
    ] {
        functions.push(function(
            name,
            Kind::NullText,
            OneOf(vec![Any(1), Any(2), Any(3)]),
        ));
    }
    for f in functions {
        ctx.register_udf(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_quote_and_parse_as_postgres_does() {
        assert_eq!(quote_ident("cpu"), "cpu");
        assert_eq!(quote_ident("Cpu"), "\"Cpu\"");
        assert_eq!(quote_ident("mes events"), "\"mes events\"");
        assert_eq!(parse_ident("public.cpu").unwrap(), vec!["public", "cpu"]);
        assert_eq!(parse_ident("\"My.T\"").unwrap(), vec!["My.T"]);
        assert!(parse_ident("a.").is_err());
    }

    #[test]
    fn settings_answer_case_insensitively() {
        assert_eq!(setting("server_version_num"), Some("160006"));
        assert_eq!(setting("TimeZone"), Some("UTC"));
        assert_eq!(
            setting("transaction isolation level"),
            Some("read committed")
        );
        assert_eq!(setting("no_such"), None);
    }
}
