//! The catalog of databases and tables: schemas, limits and series counts, and the
//! validation of parsed lines against them into Arrow batches ready for the WAL.

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder,
    StringDictionaryBuilder, TimestampNanosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{Field, Int32Type, Schema};
use arrow::record_batch::RecordBatch;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use store::layout::is_valid_name;
use store::{ColumnType, PartitionKey, TIME_COLUMN, TableOptions, TableSchema};

use crate::line_protocol::{FieldValue, LineError, ParsedLine, Precision};
use crate::protect::{ProtectScratch, protect_line};

/// Limits that keep one misconfigured collector from flooding the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Tables per database.
    pub max_tables_per_db: usize,
    /// Columns per table, `time` included.
    pub max_columns_per_table: usize,
    /// Distinct series (tag sets) per table.
    pub max_series_per_table: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tables_per_db: 1_000,
            max_columns_per_table: 500,
            max_series_per_table: 1_000_000,
        }
    }
}

/// Lines of a request validated together: the most parsed lines a request holds at once.
const VALIDATION_CHUNK_LINES: usize = 256;

/// The most rows a batch is sized for before its lines are known: a body of blank or
/// broken lines after a few good ones must not reserve memory for all of them.
const MAX_ESTIMATED_ROWS: usize = 1 << 20;

/// The rows to size a table's batch for, from its `table_lines` among the body's first
/// `lines_read` of `body_lines`: its share of the body so far.
fn estimated_rows(body_lines: usize, table_lines: usize, lines_read: usize) -> usize {
    (body_lines.saturating_mul(table_lines) / lines_read.max(1)).min(MAX_ESTIMATED_ROWS)
}

/// One table of a request while its lines stream through validation.
struct RequestTable<'a> {
    name: String,
    /// The table, or why none of its lines can be written.
    target: Result<Arc<TableCatalog>, String>,
    /// Parsed lines not yet validated.
    lines: Vec<ParsedLine<'a>>,
    /// Lines of the request for this table so far.
    seen: usize,
    /// The batches so far, per partition.
    builders: Vec<(PartitionKey, BatchBuilder)>,
}

/// The state of one table that writes validate against.
#[derive(Debug)]
pub struct TableCatalog {
    /// Database name.
    pub db: String,
    /// Table name.
    pub name: String,
    /// Settings from the configuration.
    pub options: TableOptions,
    state: Mutex<TableState>,
}

#[derive(Debug)]
struct TableState {
    schema: TableSchema,
    series: ahash::AHashSet<u64>,
}

impl TableCatalog {
    /// The current schema.
    pub fn schema(&self) -> TableSchema {
        self.state.lock().schema.clone()
    }

    /// Number of columns, `time` included, without copying the schema.
    pub fn column_count(&self) -> usize {
        self.state.lock().schema.len()
    }

    /// Number of distinct series known: those in the lake (counted by the census at start),
    /// replayed from the WAL, and written since.
    pub fn series_count(&self) -> usize {
        self.state.lock().series.len()
    }

    /// Adds the columns of a stored schema, bypassing limits (they were accepted once).
    pub fn merge_schema(&self, schema: &TableSchema) {
        self.state.lock().schema.merge(schema);
    }
}

#[derive(Debug, Default)]
struct DbCatalog {
    tables: RwLock<HashMap<String, Arc<TableCatalog>>>,
}

/// All databases and tables.
#[derive(Debug)]
pub struct Catalog {
    dbs: RwLock<HashMap<String, Arc<DbCatalog>>>,
    limits: Limits,
    table_options: HashMap<String, TableOptions>,
    keyring: Option<Arc<privacy::Keyring>>,
    /// Keyed per process: series hashes only ever meet others of the same process.
    hasher: ahash::RandomState,
}

/// Rows of one table and partition from one write, as an Arrow batch without `_seq`.
#[derive(Debug, Clone)]
pub struct TableWrite {
    /// Database.
    pub db: String,
    /// Table.
    pub table: String,
    /// The partition all rows fall in.
    pub partition: PartitionKey,
    /// The rows: a subset of the table's columns in schema order, `time` included.
    pub batch: RecordBatch,
}

/// The result of validating a request body.
#[derive(Debug, Default)]
pub struct ValidatedWrite {
    /// The accepted rows, grouped by table and partition.
    pub writes: Vec<TableWrite>,
    /// Lines accepted.
    pub lines_accepted: usize,
    /// Rejected lines with reasons.
    pub rejected: Vec<LineError>,
    /// Columns the privacy profiles dropped (names only).
    pub dropped_columns: BTreeSet<String>,
    /// Keyring generation that must be durable before the write is acknowledged (0: none).
    pub keyring_generation: u64,
}

impl ValidatedWrite {
    /// Total rows across all writes.
    pub fn rows(&self) -> usize {
        self.writes.iter().map(|w| w.batch.num_rows()).sum()
    }
}

/// Why a write as a whole cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The database name cannot be used.
    #[error("invalid database name {0:?}")]
    InvalidDatabase(String),
}

impl Catalog {
    /// An empty catalog with limits and per-table settings (keyed by table name). Tables
    /// with subjects in their privacy profile need the keyring.
    pub fn new(
        limits: Limits,
        table_options: HashMap<String, TableOptions>,
        keyring: Option<Arc<privacy::Keyring>>,
    ) -> Self {
        Catalog {
            dbs: RwLock::new(HashMap::new()),
            limits,
            table_options,
            keyring,
            hasher: Default::default(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The settings of a table.
    pub fn options_for(&self, table: &str) -> TableOptions {
        self.table_options.get(table).cloned().unwrap_or_default()
    }

    fn db(&self, db: &str) -> Arc<DbCatalog> {
        if let Some(d) = self.dbs.read().get(db) {
            return d.clone();
        }
        self.dbs.write().entry(db.to_string()).or_default().clone()
    }

    /// A table, if it exists.
    pub fn table(&self, db: &str, table: &str) -> Option<Arc<TableCatalog>> {
        self.dbs.read().get(db)?.tables.read().get(table).cloned()
    }

    /// All tables, sorted by database and name.
    pub fn tables(&self) -> Vec<Arc<TableCatalog>> {
        let mut out: Vec<_> = self
            .dbs
            .read()
            .values()
            .flat_map(|d| d.tables.read().values().cloned().collect::<Vec<_>>())
            .collect();
        out.sort_by(|a, b| (&a.db, &a.name).cmp(&(&b.db, &b.name)));
        out
    }

    /// Gets or creates a table. `enforce_limit` is false when restoring what was accepted once.
    fn table_or_create(
        &self,
        db: &str,
        table: &str,
        enforce_limit: bool,
    ) -> Result<Arc<TableCatalog>, String> {
        let dbc = self.db(db);
        if let Some(t) = dbc.tables.read().get(table) {
            return Ok(t.clone());
        }
        if !is_valid_name(table) {
            return Err("invalid table name".to_string());
        }
        let mut tables = dbc.tables.write();
        if let Some(t) = tables.get(table) {
            return Ok(t.clone());
        }
        if enforce_limit && tables.len() >= self.limits.max_tables_per_db {
            return Err(format!(
                "database has reached its limit of {} tables",
                self.limits.max_tables_per_db
            ));
        }
        let t = self.new_table(db, table);
        tables.insert(table.to_string(), t.clone());
        Ok(t)
    }

    fn new_table(&self, db: &str, table: &str) -> Arc<TableCatalog> {
        Arc::new(TableCatalog {
            db: db.to_string(),
            name: table.to_string(),
            options: self.options_for(table),
            state: Mutex::new(TableState {
                schema: TableSchema::new(),
                series: ahash::AHashSet::new(),
            }),
        })
    }

    /// Restores a table from a stored schema (manifest or WAL), bypassing limits.
    pub fn restore_table(&self, db: &str, table: &str, schema: &TableSchema) -> Arc<TableCatalog> {
        let t = match self.table_or_create(db, table, false) {
            Ok(t) => t,
            Err(_) => {
                // Names in stored data were valid when written; a name refused now still
                // has to be restored so that no acknowledged row is lost.
                let dbc = self.db(db);
                let mut tables = dbc.tables.write();
                tables
                    .entry(table.to_string())
                    .or_insert_with(|| self.new_table(db, table))
                    .clone()
            }
        };
        t.merge_schema(schema);
        t
    }

    /// Counts the series of stored or replayed rows so that limits hold across restarts.
    pub fn note_series(&self, table: &TableCatalog, batch: &RecordBatch) {
        // The tag columns as plain strings, with their names, found once per batch.
        let schema = batch.schema();
        let tags: Vec<(&str, ArrayRef)> = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .filter(|(f, _)| store::dedup::is_tag(f))
            .filter_map(|(f, c)| {
                let c = arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8).ok()?;
                Some((f.name().as_str(), c))
            })
            .collect();
        let tags: Vec<(&str, &arrow::array::StringArray)> = tags
            .iter()
            .filter_map(|(name, c)| Some((*name, c.as_any().downcast_ref()?)))
            .collect();
        let mut state = table.state.lock();
        for row in 0..batch.num_rows() {
            let mut series = 0u64;
            for (name, col) in &tags {
                if arrow::array::Array::is_valid(*col, row) {
                    series = series.wrapping_add(self.tag_hash(name, col.value(row)));
                }
            }
            state.series.insert(series);
        }
    }

    /// Validates parsed lines against the catalog (creating tables and columns as needed)
    /// and builds Arrow batches per table and partition. Lines that fail are reported and
    /// left out; the rest are all-or-nothing per line.
    pub fn validate<'a>(
        &self,
        db: &str,
        lines: impl IntoIterator<Item = Result<ParsedLine<'a>, LineError>>,
        precision: Precision,
        now_ns: i64,
    ) -> Result<ValidatedWrite, CatalogError> {
        self.validate_for(db, lines, 0, precision, now_ns, None)
    }

    /// [`Catalog::validate`] for a writer who may write only the tables `may_write`
    /// accepts: lines for other tables are rejected (before any table is created).
    /// `expected_lines` (0: unknown) sizes the batches, so that they need not grow.
    pub fn validate_for<'a>(
        &self,
        db: &str,
        lines: impl IntoIterator<Item = Result<ParsedLine<'a>, LineError>>,
        expected_lines: usize,
        precision: Precision,
        now_ns: i64,
        may_write: Option<&(dyn Fn(&str) -> bool + Send + Sync)>,
    ) -> Result<ValidatedWrite, CatalogError> {
        if !is_valid_name(db) {
            return Err(CatalogError::InvalidDatabase(db.to_string()));
        }
        let mut out = ValidatedWrite::default();
        let mut scratch = ProtectScratch::default();
        // Lines are validated a chunk at a time as they are parsed, so the parsed request is
        // never held whole (its memory was several times the body's); each table is locked
        // once per chunk.
        let mut tables: Vec<RequestTable<'a>> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut last = 0;
        // The body's lines read so far, blank, comment and refused ones included.
        let mut read = 0;
        let mut pending = 0;
        for line in lines {
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    read = read.max(e.line_number);
                    out.rejected.push(e);
                    continue;
                }
            };
            read = read.max(line.line_number);
            let at = match tables.get(last) {
                Some(t) if t.name == line.measurement => last,
                _ => match index.get(line.measurement.as_ref()) {
                    Some(i) => *i,
                    None => {
                        let name = line.measurement.to_string();
                        let permitted = may_write.is_none_or(|f| f(&name));
                        let target = if permitted {
                            self.table_or_create(db, &name, true)
                        } else {
                            Err("this token's role may not write to this table".to_string())
                        };
                        index.insert(name.clone(), tables.len());
                        tables.push(RequestTable {
                            name,
                            target,
                            lines: Vec::new(),
                            seen: 0,
                            builders: Vec::new(),
                        });
                        tables.len() - 1
                    }
                },
            };
            last = at;
            tables[at].lines.push(line);
            tables[at].seen += 1;
            pending += 1;
            if pending == VALIDATION_CHUNK_LINES {
                for t in &mut tables {
                    let expected = estimated_rows(expected_lines, t.seen, read);
                    self.validate_chunk(t, expected, precision, now_ns, &mut out, &mut scratch);
                }
                pending = 0;
            }
        }
        for mut t in tables {
            // Every line is known now: a table first met here is sized exactly.
            let seen = t.seen;
            self.validate_chunk(&mut t, seen, precision, now_ns, &mut out, &mut scratch);
            let Ok(table) = t.target else { continue };
            let schema = table.state.lock().schema.clone();
            for (partition, builder) in t.builders {
                out.writes.push(TableWrite {
                    db: table.db.clone(),
                    table: table.name.clone(),
                    partition,
                    batch: builder.finish(&schema),
                });
            }
        }
        out.rejected.sort_by_key(|e| e.line_number);
        out.dropped_columns = scratch.dropped;
        out.keyring_generation = scratch.generation;
        Ok(out)
    }

    /// Validates the lines a request has gathered for one table so far into its batches,
    /// the first of which is sized for `expected_lines`.
    fn validate_chunk(
        &self,
        request: &mut RequestTable<'_>,
        expected_lines: usize,
        precision: Precision,
        now_ns: i64,
        out: &mut ValidatedWrite,
        scratch: &mut ProtectScratch,
    ) {
        if request.lines.is_empty() {
            return;
        }
        let table = match &request.target {
            Ok(t) => t,
            Err(reason) => {
                for l in request.lines.drain(..) {
                    out.rejected.push(LineError {
                        line_number: l.line_number,
                        reason: reason.clone(),
                        measurement: Some(request.name.clone()),
                        column: None,
                    });
                }
                return;
            }
        };
        let horizon = table.options.horizon(now_ns);
        let profiled = table.options.has_profile();
        let scope = if profiled {
            store::key_scope(&table.db, &table.name)
        } else {
            String::new()
        };
        let granularity = table.options.partition;
        let builders = &mut request.builders;
        let mut state = table.state.lock();
        for line in request.lines.drain(..) {
            let line_number = line.line_number;
            let reject = |reason: String, column: Option<&str>| LineError {
                line_number,
                reason,
                measurement: Some(table.name.clone()),
                column: column.map(str::to_string),
            };
            let time = match line.timestamp {
                None => now_ns,
                Some(raw) => match precision.to_nanos(raw) {
                    Some(t) => t,
                    None => {
                        out.rejected.push(reject(
                            "timestamp out of range for nanosecond precision".into(),
                            None,
                        ));
                        continue;
                    }
                },
            };
            if time < horizon {
                out.rejected.push(reject(
                    "timestamp is older than the table's retention (ttl)".into(),
                    None,
                ));
                continue;
            }
            let line = if profiled {
                let protected = protect_line(
                    line,
                    time,
                    &scope,
                    &table.options,
                    self.keyring.as_deref(),
                    scratch,
                );
                match protected {
                    Ok(l) => l,
                    Err((reason, column)) => {
                        out.rejected.push(reject(reason, column.as_deref()));
                        continue;
                    }
                }
            } else {
                line
            };
            // Check every column before changing anything, so a line is all or nothing.
            let mut new_columns: Vec<(&str, ColumnType)> = Vec::new();
            let mut error = None;
            let columns = line
                .tags
                .iter()
                .map(|(k, _)| (k.as_ref(), ColumnType::Tag))
                .chain(line.fields.iter().map(|(k, v)| (k.as_ref(), field_type(v))));
            for (name, ty) in columns {
                if name == TIME_COLUMN || name == store::SEQ_COLUMN {
                    error = Some(reject(
                        format!("column name {name:?} is reserved"),
                        Some(name),
                    ));
                    break;
                }
                match state.schema.column_type(name) {
                    Some(existing) if existing == ty => {}
                    Some(existing) => {
                        error = Some(reject(
                            format!(
                                "{} value conflicts with the column's type {}",
                                ty.name(),
                                existing.name()
                            ),
                            Some(name),
                        ));
                        break;
                    }
                    None => match new_columns.iter().find(|(n, _)| *n == name) {
                        Some((_, t)) if *t != ty => {
                            error = Some(reject(
                                "column is used as both a tag and a field".to_string(),
                                Some(name),
                            ));
                            break;
                        }
                        Some(_) => {}
                        None => new_columns.push((name, ty)),
                    },
                }
            }
            if error.is_none()
                && !new_columns.is_empty()
                && state.schema.len() + new_columns.len() > self.limits.max_columns_per_table
            {
                error = Some(reject(
                    format!(
                        "table has reached its limit of {} columns",
                        self.limits.max_columns_per_table
                    ),
                    new_columns.first().map(|(n, _)| *n),
                ));
            }
            let series = self.series_hash(&line);
            if error.is_none()
                && !state.series.contains(&series)
                && state.series.len() >= self.limits.max_series_per_table
            {
                error = Some(reject(
                    format!(
                        "table has reached its limit of {} series",
                        self.limits.max_series_per_table
                    ),
                    None,
                ));
            }
            if let Some(e) = error {
                out.rejected.push(e);
                continue;
            }
            for (name, ty) in new_columns {
                state.schema.add_column(name, ty);
            }
            state.series.insert(series);
            // Found by range; a range clamped at i64::MAX cannot hold i64::MAX itself,
            // so a miss looks for the key before it opens a partition.
            let at = match builders
                .iter()
                .position(|(p, _)| p.start <= time && time < p.end)
            {
                Some(i) => i,
                None => {
                    let partition = granularity.partition_of(time);
                    match builders.iter().position(|(p, _)| *p == partition) {
                        Some(i) => i,
                        None => {
                            // Most requests fall in one partition: the first is sized for
                            // all lines, the others grow as they fill.
                            let expected = if builders.is_empty() {
                                expected_lines
                            } else {
                                0
                            };
                            builders.push((partition, BatchBuilder::with_capacity(expected)));
                            builders.len() - 1
                        }
                    }
                }
            };
            let builder = &mut builders[at].1;
            builder.append(&line, time);
            out.lines_accepted += 1;
        }
    }

    fn series_hash(&self, line: &ParsedLine<'_>) -> u64 {
        // Tag order in a line is arbitrary and the series is the set: combine per-tag
        // hashes with a commutative sum instead of sorting.
        line.tags
            .iter()
            .fold(0u64, |acc, (k, v)| acc.wrapping_add(self.tag_hash(k, v)))
    }

    /// One tag's share of a series hash; live writes and WAL replay must agree on it.
    fn tag_hash(&self, key: &str, value: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(key.as_bytes());
        h.write_u8(0xff);
        h.write(value.as_bytes());
        h.finish()
    }
}

fn field_type(v: &FieldValue<'_>) -> ColumnType {
    match v {
        FieldValue::Float(_) => ColumnType::Float,
        FieldValue::Integer(_) => ColumnType::Integer,
        FieldValue::UInteger(_) => ColumnType::UInteger,
        FieldValue::String(_) => ColumnType::String,
        FieldValue::Boolean(_) => ColumnType::Boolean,
        FieldValue::Encrypted(_) => ColumnType::Encrypted,
    }
}

enum ColumnBuilder {
    Tag(StringDictionaryBuilder<Int32Type>),
    Float(Float64Builder),
    Integer(Int64Builder),
    UInteger(UInt64Builder),
    String(StringBuilder),
    Boolean(BooleanBuilder),
    Binary(BinaryBuilder),
}

/// The most a variable-length column reserves up front; past it, it grows as it fills.
const MAX_RESERVED_BYTES: usize = 8 << 20;

/// The most one request's batch reserves up front across its columns.
const RESERVE_BUDGET_BYTES: usize = 32 << 20;

impl ColumnBuilder {
    /// A builder sized for `rows` values and, if variable-length, `bytes` of value data, so
    /// that a request's columns do not grow (and copy) by doubling.
    fn new(ty: ColumnType, rows: usize, bytes: usize) -> Self {
        match ty {
            ColumnType::Tag | ColumnType::Time => {
                ColumnBuilder::Tag(StringDictionaryBuilder::with_capacity(rows, 64, 1024))
            }
            ColumnType::Float => ColumnBuilder::Float(Float64Builder::with_capacity(rows)),
            ColumnType::Integer => ColumnBuilder::Integer(Int64Builder::with_capacity(rows)),
            ColumnType::UInteger => ColumnBuilder::UInteger(UInt64Builder::with_capacity(rows)),
            ColumnType::String => ColumnBuilder::String(StringBuilder::with_capacity(rows, bytes)),
            ColumnType::Boolean => ColumnBuilder::Boolean(BooleanBuilder::with_capacity(rows)),
            ColumnType::Encrypted => {
                ColumnBuilder::Binary(BinaryBuilder::with_capacity(rows, bytes))
            }
        }
    }

    fn append_nulls(&mut self, n: usize) {
        match self {
            ColumnBuilder::Tag(b) => b.append_nulls(n),
            ColumnBuilder::Float(b) => b.append_nulls(n),
            ColumnBuilder::Integer(b) => b.append_nulls(n),
            ColumnBuilder::UInteger(b) => b.append_nulls(n),
            ColumnBuilder::String(b) => b.append_nulls(n),
            ColumnBuilder::Boolean(b) => b.append_nulls(n),
            ColumnBuilder::Binary(b) => b.append_nulls(n),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::Tag(b) => Arc::new(b.finish()),
            ColumnBuilder::Float(b) => Arc::new(b.finish()),
            ColumnBuilder::Integer(b) => Arc::new(b.finish()),
            ColumnBuilder::UInteger(b) => Arc::new(b.finish()),
            ColumnBuilder::String(b) => Arc::new(b.finish()),
            ColumnBuilder::Boolean(b) => Arc::new(b.finish()),
            ColumnBuilder::Binary(b) => Arc::new(b.finish()),
        }
    }
}

/// Builds the batch of one table and partition from lines, column by column.
struct BatchBuilder {
    rows: usize,
    /// Rows expected (the request's lines of the table): columns are sized for them.
    expected_rows: usize,
    /// Bytes columns may still reserve up front: a wide first line followed by many
    /// narrow ones must not reserve every column for every line.
    reserve_budget: usize,
    time: TimestampNanosecondBuilder,
    /// (name, builder, rows appended so far), in order of first appearance.
    columns: Vec<(String, ColumnBuilder, usize)>,
}

impl BatchBuilder {
    fn with_capacity(rows: usize) -> Self {
        BatchBuilder {
            rows: 0,
            expected_rows: rows,
            reserve_budget: RESERVE_BUDGET_BYTES,
            time: TimestampNanosecondBuilder::with_capacity(rows),
            columns: Vec::new(),
        }
    }

    /// The column's index; `hint` is where the same key sat in the previous line, since
    /// collectors send keys in the same order line after line. A new column is sized from
    /// its first value, `value_len` bytes.
    fn column(&mut self, name: &str, ty: ColumnType, hint: usize, value_len: usize) -> usize {
        if let Some((n, _, _)) = self.columns.get(hint)
            && n == name
        {
            return hint;
        }
        if let Some(i) = self.columns.iter().position(|(n, _, _)| n == name) {
            return i;
        }
        // Value data for the expected rows (a quarter more than the first value's length
        // each), then the reservation counted against the request's budget with 8 bytes per
        // row for values or offsets; past the budget a column starts small.
        let reserve = |rows: usize| {
            let bytes = rows
                .saturating_mul(value_len + value_len / 4)
                .min(MAX_RESERVED_BYTES);
            (bytes, rows.saturating_mul(8).saturating_add(bytes))
        };
        let wanted = self.expected_rows.max(self.rows + 1);
        let (rows, bytes) = match reserve(wanted) {
            (bytes, total) if total <= self.reserve_budget => {
                self.reserve_budget -= total;
                (wanted, bytes)
            }
            _ => (self.rows + 1, reserve(self.rows + 1).0),
        };
        let mut b = ColumnBuilder::new(ty, rows, bytes);
        b.append_nulls(self.rows);
        self.columns.push((name.to_string(), b, self.rows));
        self.columns.len() - 1
    }

    fn append(&mut self, line: &ParsedLine<'_>, time: i64) {
        let mut hint = 0;
        for (k, v) in &line.tags {
            let i = self.column(k, ColumnType::Tag, hint, 0);
            hint = i + 1;
            let (_, b, n) = &mut self.columns[i];
            if let ColumnBuilder::Tag(b) = b {
                b.append_value(v.as_ref());
                *n += 1;
            }
        }
        for (k, v) in &line.fields {
            let value_len = match v {
                FieldValue::String(x) => x.len(),
                FieldValue::Encrypted(x) => x.len(),
                _ => 0,
            };
            let i = self.column(k, field_type(v), hint, value_len);
            hint = i + 1;
            let (_, b, n) = &mut self.columns[i];
            let appended = match (b, v) {
                (ColumnBuilder::Float(b), FieldValue::Float(x)) => {
                    b.append_value(*x);
                    true
                }
                (ColumnBuilder::Integer(b), FieldValue::Integer(x)) => {
                    b.append_value(*x);
                    true
                }
                (ColumnBuilder::UInteger(b), FieldValue::UInteger(x)) => {
                    b.append_value(*x);
                    true
                }
                (ColumnBuilder::String(b), FieldValue::String(x)) => {
                    b.append_value(x.as_ref());
                    true
                }
                (ColumnBuilder::Boolean(b), FieldValue::Boolean(x)) => {
                    b.append_value(*x);
                    true
                }
                (ColumnBuilder::Binary(b), FieldValue::Encrypted(x)) => {
                    b.append_value(x);
                    true
                }
                _ => false,
            };
            if appended {
                *n += 1;
            }
        }
        self.time.append_value(time);
        self.rows += 1;
        for (_, b, n) in self.columns.iter_mut() {
            if *n < self.rows {
                b.append_nulls(self.rows - *n);
                *n = self.rows;
            }
        }
    }

    /// Finishes into a batch whose columns follow the table schema's order.
    fn finish(mut self, schema: &TableSchema) -> RecordBatch {
        let mut fields = Vec::with_capacity(self.columns.len() + 1);
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.columns.len() + 1);
        for c in &schema.columns {
            if c.column_type == ColumnType::Time {
                fields.push(Field::new(TIME_COLUMN, ColumnType::Time.data_type(), false));
                arrays.push(Arc::new(self.time.finish()));
            } else if let Some((_, b, _)) = self.columns.iter_mut().find(|(n, _, _)| *n == c.name) {
                fields.push(Field::new(&c.name, c.column_type.data_type(), true));
                arrays.push(b.finish());
            }
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
            .expect("columns are built to the same length and their declared types")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line_protocol::parse_lines;

    fn catalog() -> Catalog {
        Catalog::new(Limits::default(), HashMap::new(), None)
    }

    fn validate(c: &Catalog, body: &str) -> ValidatedWrite {
        c.validate(
            "db",
            parse_lines(body.as_bytes()),
            Precision::Nanosecond,
            1_000,
        )
        .unwrap()
    }

    #[test]
    fn a_line_is_all_or_nothing_and_adds_no_column_when_rejected() {
        let c = catalog();
        let v = validate(&c, "m,t=a x=1i 1\nm,t=a y=2,x=1.5 2\n");
        assert_eq!(v.lines_accepted, 1);
        assert_eq!(v.rejected.len(), 1);
        assert_eq!(v.rejected[0].line_number, 2);
        assert_eq!(v.rejected[0].column.as_deref(), Some("x"));
        let schema = c.table("db", "m").unwrap().schema();
        assert_eq!(
            schema.column_type("y"),
            None,
            "the rejected line's new column was not added"
        );
        assert_eq!(v.rows(), 1);
    }

    #[test]
    fn a_name_used_as_tag_and_field_is_refused() {
        let c = catalog();
        let v = validate(&c, "m,k=a k=1 1\n");
        assert_eq!(v.lines_accepted, 0);
        assert!(v.rejected[0].reason.contains("both a tag and a field"));
        // Once a tag, a later field of that name conflicts with its type.
        let v = validate(&c, "m,k=a v=1 1\nm k=2 2\n");
        assert_eq!(v.lines_accepted, 1);
        assert_eq!(v.rejected[0].column.as_deref(), Some("k"));
    }

    #[test]
    fn rows_are_split_by_partition_and_tag_order_does_not_make_a_new_series() {
        let c = catalog();
        let day = 86_400_000_000_000i64;
        let body = format!("m,a=1,b=2 v=1 1\nm,b=2,a=1 v=2 {}\n", day + 1);
        let v = validate(&c, &body);
        assert_eq!(v.writes.len(), 2, "two day partitions");
        assert_eq!(c.table("db", "m").unwrap().series_count(), 1);
        let names: Vec<String> = v.writes[0]
            .batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(names, ["a", "b", "time", "v"]);
    }

    #[test]
    fn interleaved_tables_over_many_chunks_keep_every_line_in_order() {
        // Three tables interleaved over several validation chunks; one table the writer
        // may not write, one line with a type conflict far past the first chunk.
        let c = catalog();
        let lines = 3 * VALIDATION_CHUNK_LINES + 17;
        let mut body = String::new();
        for i in 0..lines {
            let table = ["a", "b", "secret"][i % 3];
            if i == 2 * VALIDATION_CHUNK_LINES + 1 {
                body.push_str(&format!("{table},t=x v=\"text\" {i}\n"));
            } else {
                body.push_str(&format!("{table},t=x v={i} {i}\n"));
            }
        }
        let may_write = |t: &str| t != "secret";
        let v = c
            .validate_for(
                "db",
                parse_lines(body.as_bytes()),
                lines,
                Precision::Nanosecond,
                1_000,
                Some(&may_write),
            )
            .unwrap();
        let conflict = 2 * VALIDATION_CHUNK_LINES + 2;
        let secret: Vec<usize> = (0..lines).filter(|i| i % 3 == 2).map(|i| i + 1).collect();
        let mut expected_rejected = secret.clone();
        expected_rejected.push(conflict);
        expected_rejected.sort();
        let rejected: Vec<usize> = v.rejected.iter().map(|e| e.line_number).collect();
        assert_eq!(
            rejected, expected_rejected,
            "rejections by line number, sorted"
        );
        assert!(
            c.table("db", "secret").is_none(),
            "no table the writer may not write"
        );
        assert_eq!(v.lines_accepted, lines - secret.len() - 1);
        for (name, offset) in [("a", 0), ("b", 1)] {
            let writes: Vec<&TableWrite> = v.writes.iter().filter(|w| w.table == name).collect();
            assert_eq!(writes.len(), 1, "one batch for table {name}");
            let batch = &writes[0].batch;
            let times = batch
                .column_by_name(TIME_COLUMN)
                .unwrap()
                .as_any()
                .downcast_ref::<arrow::array::TimestampNanosecondArray>()
                .unwrap();
            let want: Vec<i64> = (0..lines)
                .filter(|i| i % 3 == offset && i + 1 != conflict)
                .map(|i| i as i64)
                .collect();
            assert_eq!(
                times.values().to_vec(),
                want,
                "table {name} keeps line order"
            );
        }
    }

    #[test]
    fn batch_estimates_follow_each_tables_share_within_bounds() {
        // One table: every line is its.
        assert_eq!(estimated_rows(10_000, 256, 256), 10_000);
        // Two tables alternating: half each.
        assert_eq!(estimated_rows(10_000, 128, 256), 5_000);
        // A body that is mostly blank or broken lines after the first chunk: capped.
        assert_eq!(estimated_rows(64 << 20, 256, 256), MAX_ESTIMATED_ROWS);
        // Blank and refused lines read so far count against the share.
        assert_eq!(estimated_rows(1_000, 256, 900), 284);
        assert_eq!(estimated_rows(0, 3, 3), 0);
    }

    #[test]
    fn reserved_names_and_bad_databases_are_refused() {
        let c = catalog();
        let v = validate(&c, "m _seq=1 1\n");
        assert!(v.rejected[0].reason.contains("reserved"));
        assert!(
            c.validate("../x", parse_lines(b"m v=1"), Precision::Nanosecond, 0)
                .is_err()
        );
    }
}
