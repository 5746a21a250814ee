//! Arrow results as PostgreSQL rows: the type each Arrow type is announced as, and the
//! values in text or binary format. The announced type and the encoding come from one
//! place ([`pg_column`]), so a client never sees a value that disagrees with its OID.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Date32Array, Float32Array, Float64Array,
    Int16Array, Int32Array, Int64Array, ListArray, StringArray, TimestampNanosecondArray,
};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use pgwire::api::Type;
use pgwire::api::portal::Format;
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;

/// How a column of one Arrow type travels: its PostgreSQL type (from the catalog's own
/// table, [`query::pg_catalog::pg_type_of`], so `pg_attribute` and the rows agree) and
/// the Arrow type its values are cast to before encoding.
fn pg_column(data_type: &DataType) -> (Type, DataType) {
    use DataType::*;
    let oid = query::pg_catalog::pg_type_of(data_type).oid;
    let target = match oid {
        16 => Boolean,
        21 => Int16,
        23 => Int32,
        20 => Int64,
        700 => Float32,
        701 => Float64,
        17 => Binary,
        1082 => Date32,
        1114 => Timestamp(TimeUnit::Nanosecond, None),
        1184 => Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
        1009 => List(Arc::new(Field::new("item", Utf8, true))),
        _ => match data_type {
            Dictionary(_, value) if is_text(value) => Utf8,
            t if is_text(t) => Utf8,
            // Everything else travels as its display text.
            _ => Null,
        },
    };
    (Type::from_oid(oid).unwrap_or(Type::TEXT), target)
}

fn is_text(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

/// The PostgreSQL type of an Arrow type.
pub fn pg_type(data_type: &DataType) -> Type {
    pg_column(data_type).0
}

/// The row description of `schema`, each column in the format `format` asks for.
pub fn fields(schema: &Schema, format: Option<&Format>) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let format = format.map(|f| f.format_for(i)).unwrap_or(FieldFormat::Text);
            FieldInfo::new(f.name().clone(), None, None, pg_type(f.data_type()), format)
        })
        .collect()
}

/// Encodes every row of `batch` as described by `fields`.
pub fn rows(batch: &RecordBatch, fields: &Arc<Vec<FieldInfo>>) -> PgWireResult<Vec<DataRow>> {
    let columns = batch
        .columns()
        .iter()
        .map(normalise)
        .collect::<PgWireResult<Vec<_>>>()?;
    let mut encoder = DataRowEncoder::new(fields.clone());
    let mut out = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        for column in &columns {
            encode(&mut encoder, column, row)?;
        }
        out.push(encoder.take_row());
    }
    Ok(out)
}

/// A column cast to the Arrow type its values are encoded from.
enum Column {
    Cast(ArrayRef),
    /// Display text of a type PostgreSQL clients cannot take directly.
    Text(Vec<Option<String>>),
}

fn normalise(array: &ArrayRef) -> PgWireResult<Column> {
    let (_, target) = pg_column(array.data_type());
    if target == DataType::Null {
        let formatter =
            ArrayFormatter::try_new(array.as_ref(), &FormatOptions::default()).map_err(internal)?;
        // Logical nulls: a NULL-typed column has no null buffer but every value is NULL.
        let nulls = array.logical_nulls();
        return Ok(Column::Text(
            (0..array.len())
                .map(|i| {
                    nulls
                        .as_ref()
                        .is_none_or(|n| n.is_valid(i))
                        .then(|| formatter.value(i).to_string())
                })
                .collect(),
        ));
    }
    if array.data_type() == &target {
        return Ok(Column::Cast(array.clone()));
    }
    let options = CastOptions {
        safe: false,
        ..CastOptions::default()
    };
    cast_with_options(array, &target, &options)
        .map(Column::Cast)
        .map_err(internal)
}

fn internal(e: impl std::fmt::Display) -> PgWireError {
    PgWireError::ApiError(format!("cannot encode a result column: {e}").into())
}

fn encode(encoder: &mut DataRowEncoder, column: &Column, row: usize) -> PgWireResult<()> {
    let array = match column {
        Column::Text(values) => return encoder.encode_field(&values[row]),
        Column::Cast(array) => array,
    };
    let valid = array.is_valid(row);
    macro_rules! value {
        ($ty:ty) => {{
            let a = array
                .as_any()
                .downcast_ref::<$ty>()
                .ok_or_else(|| internal("unexpected array type"))?;
            valid.then(|| a.value(row))
        }};
    }
    match array.data_type() {
        DataType::Boolean => encoder.encode_field(&value!(BooleanArray)),
        DataType::Int16 => encoder.encode_field(&value!(Int16Array)),
        DataType::Int32 => encoder.encode_field(&value!(Int32Array)),
        DataType::Int64 => encoder.encode_field(&value!(Int64Array)),
        DataType::Float32 => encoder.encode_field(&value!(Float32Array)),
        DataType::Float64 => encoder.encode_field(&value!(Float64Array)),
        DataType::Utf8 => encoder.encode_field(&value!(StringArray)),
        DataType::Binary => encoder.encode_field(&value!(BinaryArray)),
        DataType::Date32 => {
            let days = value!(Date32Array);
            // Days since 1970-01-01, which is day 719,163 of the common era.
            let date = days.and_then(|d| {
                d.checked_add(719_163)
                    .and_then(NaiveDate::from_num_days_from_ce_opt)
            });
            encoder.encode_field(&date)
        }
        DataType::Timestamp(_, None) => {
            let ns = value!(TimestampNanosecondArray);
            let t: Option<NaiveDateTime> =
                ns.map(|ns| DateTime::<Utc>::from_timestamp_nanos(ns).naive_utc());
            encoder.encode_field(&t)
        }
        DataType::Timestamp(_, Some(_)) => {
            let ns = value!(TimestampNanosecondArray);
            let t: Option<DateTime<Utc>> = ns.map(DateTime::<Utc>::from_timestamp_nanos);
            encoder.encode_field(&t)
        }
        DataType::List(_) => {
            let list = array
                .as_any()
                .downcast_ref::<ListArray>()
                .ok_or_else(|| internal("unexpected array type"))?;
            let items: Option<Vec<Option<String>>> = valid.then(|| {
                let values = list.value(row);
                let strings = values.as_any().downcast_ref::<StringArray>();
                (0..values.len())
                    .map(|i| strings.and_then(|s| s.is_valid(i).then(|| s.value(i).to_string())))
                    .collect()
            });
            encoder.encode_field(&items)
        }
        other => Err(internal(format!("no encoding for {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{DictionaryArray, UInt64Array};
    use arrow::datatypes::Int32Type;

    #[test]
    fn announced_types_match_the_historian_columns() {
        assert_eq!(
            pg_type(&DataType::Timestamp(TimeUnit::Nanosecond, None)),
            Type::TIMESTAMP
        );
        assert_eq!(
            pg_type(&DataType::Timestamp(
                TimeUnit::Nanosecond,
                Some("UTC".into())
            )),
            Type::TIMESTAMPTZ
        );
        assert_eq!(pg_type(&DataType::Float64), Type::FLOAT8);
        assert_eq!(pg_type(&DataType::Int64), Type::INT8);
        assert_eq!(pg_type(&DataType::UInt64), Type::INT8);
        assert_eq!(pg_type(&DataType::Boolean), Type::BOOL);
        assert_eq!(
            pg_type(&DataType::Dictionary(
                Box::new(DataType::Int32),
                Box::new(DataType::Utf8)
            )),
            Type::TEXT
        );
    }

    #[test]
    fn rows_encode_in_text_and_binary() {
        let tags: DictionaryArray<Int32Type> = vec![Some("L1"), None].into_iter().collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Nanosecond, None),
                false,
            ),
            Field::new("line", tags.data_type().clone(), true),
            Field::new("count", DataType::UInt64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(TimestampNanosecondArray::from(vec![
                    1_700_000_000_123_456_789,
                    0,
                ])),
                Arc::new(tags),
                Arc::new(UInt64Array::from(vec![Some(7), None])),
            ],
        )
        .unwrap();
        for format in [Format::UnifiedText, Format::UnifiedBinary] {
            let fields = Arc::new(super::fields(&schema, Some(&format)));
            let rows = rows(&batch, &fields).unwrap();
            assert_eq!(rows.len(), 2);
            assert_eq!(rows[0].field_count, 3);
        }
        let text = Arc::new(super::fields(&schema, None));
        // A NULL literal column (`SELECT NULL AS x`) is NULL, not an empty string.
        let nulls = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("x", DataType::Null, true)])),
            vec![arrow::array::new_null_array(&DataType::Null, 1)],
        )
        .unwrap();
        let null_fields = Arc::new(super::fields(&nulls.schema(), None));
        let row = super::rows(&nulls, &null_fields).unwrap();
        assert_eq!(&row[0].data[..], &(-1i32).to_be_bytes()[..]);
        let rows = rows(&batch, &text).unwrap();
        let first = String::from_utf8_lossy(&rows[0].data);
        assert!(first.contains("2023-11-14 22:13:20.123456"), "{first}");
        assert!(first.contains("L1"));
    }
}
