//! Column types and table schemas as line protocol shapes them.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

/// Name of the timestamp column of every table.
pub const TIME_COLUMN: &str = "time";
/// Name of the write-sequence column: orders writes of the same series and time (last write wins).
pub const SEQ_COLUMN: &str = "_seq";

/// The kind of a column. A field's kind is fixed once set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    /// A line-protocol tag: dictionary-encoded string, part of the series key.
    Tag,
    /// A float field.
    Float,
    /// A signed integer field (`i` suffix).
    Integer,
    /// An unsigned integer field (`u` suffix).
    UInteger,
    /// A string field.
    String,
    /// A boolean field.
    Boolean,
    /// A personal value as an AES-256-GCM cell (binary): made by the privacy step of
    /// ingest, never sent in line protocol.
    Encrypted,
    /// The row timestamp, nanoseconds since the Unix epoch, UTC.
    Time,
}

impl ColumnType {
    /// The Arrow type used for this column in the buffer and in Parquet files.
    pub fn data_type(self) -> DataType {
        match self {
            ColumnType::Tag => {
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
            }
            ColumnType::Float => DataType::Float64,
            ColumnType::Integer => DataType::Int64,
            ColumnType::UInteger => DataType::UInt64,
            ColumnType::String => DataType::Utf8,
            ColumnType::Boolean => DataType::Boolean,
            ColumnType::Encrypted => DataType::Binary,
            ColumnType::Time => DataType::Timestamp(TimeUnit::Nanosecond, None),
        }
    }

    /// The column type an Arrow type stands for, if any.
    pub fn from_data_type(data_type: &DataType) -> Option<ColumnType> {
        Some(match data_type {
            DataType::Dictionary(_, value) if **value == DataType::Utf8 => ColumnType::Tag,
            DataType::Float64 => ColumnType::Float,
            DataType::Int64 => ColumnType::Integer,
            DataType::UInt64 => ColumnType::UInteger,
            DataType::Utf8 => ColumnType::String,
            DataType::Boolean => ColumnType::Boolean,
            DataType::Binary => ColumnType::Encrypted,
            DataType::Timestamp(TimeUnit::Nanosecond, _) => ColumnType::Time,
            _ => return None,
        })
    }

    /// A human name for error messages.
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Tag => "tag",
            ColumnType::Float => "float",
            ColumnType::Integer => "integer",
            ColumnType::UInteger => "unsigned integer",
            ColumnType::String => "string",
            ColumnType::Boolean => "boolean",
            ColumnType::Encrypted => "encrypted",
            ColumnType::Time => "time",
        }
    }
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDef {
    /// Column name.
    pub name: String,
    /// Column kind.
    #[serde(rename = "type")]
    pub column_type: ColumnType,
}

/// The schema of a table: tags first (sorted by name, the series key order), then `time`,
/// then fields in the order they first arrived. Only ever grows.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TableSchema {
    /// Bumped each time a column is added.
    pub version: u64,
    /// The columns, tags first.
    pub columns: Vec<ColumnDef>,
}

impl TableSchema {
    /// A schema with only the time column.
    pub fn new() -> Self {
        TableSchema {
            version: 1,
            columns: vec![ColumnDef {
                name: TIME_COLUMN.to_string(),
                column_type: ColumnType::Time,
            }],
        }
    }

    /// The type of a column, if the table has it.
    pub fn column_type(&self, name: &str) -> Option<ColumnType> {
        self.columns
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.column_type)
    }

    /// Adds a column (tags keep sorted order before `time`) and bumps the version.
    /// Does nothing if the column exists.
    pub fn add_column(&mut self, name: &str, column_type: ColumnType) {
        if self.column_type(name).is_some() {
            return;
        }
        let def = ColumnDef {
            name: name.to_string(),
            column_type,
        };
        if column_type == ColumnType::Tag {
            let at = self
                .columns
                .iter()
                .position(|c| c.column_type != ColumnType::Tag || c.name.as_str() > name)
                .unwrap_or(self.columns.len());
            self.columns.insert(at, def);
        } else {
            self.columns.push(def);
        }
        self.version += 1;
    }

    /// Merges the columns of another schema into this one.
    pub fn merge(&mut self, other: &TableSchema) {
        for c in &other.columns {
            self.add_column(&c.name, c.column_type);
        }
        self.version = self.version.max(other.version);
    }

    /// The tag column names, in series-key order.
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        self.columns
            .iter()
            .filter(|c| c.column_type == ColumnType::Tag)
            .map(|c| c.name.as_str())
    }

    /// Number of columns, `time` included.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    /// Whether the schema has no columns at all.
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// The Arrow schema of stored data: the columns plus the write-sequence column.
    pub fn arrow_schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = self
            .columns
            .iter()
            .map(|c| {
                Field::new(
                    &c.name,
                    c.column_type.data_type(),
                    c.column_type != ColumnType::Time,
                )
            })
            .collect();
        fields.push(Field::new(SEQ_COLUMN, DataType::UInt64, false));
        Arc::new(Schema::new(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_stay_sorted_before_time_and_fields_keep_arrival_order() {
        let mut s = TableSchema::new();
        s.add_column("usage", ColumnType::Float);
        s.add_column("region", ColumnType::Tag);
        s.add_column("host", ColumnType::Tag);
        s.add_column("count", ColumnType::Integer);
        s.add_column("host", ColumnType::Tag);
        let names: Vec<_> = s.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["host", "region", "time", "usage", "count"]);
        assert_eq!(s.version, 5);
        let arrow = s.arrow_schema();
        assert_eq!(arrow.fields().len(), 6);
        assert_eq!(
            ColumnType::from_data_type(arrow.field(0).data_type()),
            Some(ColumnType::Tag)
        );
    }
}
