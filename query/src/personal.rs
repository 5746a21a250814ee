//! Personal columns as a query sees them: a table with a privacy profile is read through
//! [`PersonalTable`], which hides the ciphertext columns and turns each personal column
//! into text that is either masked (NULL) or decrypted, per the session's access.
//!
//! Decryption checks each cell's associated data (table, column, series, time): a cell moved
//! to another row reads as NULL and is logged. A destroyed key (erasure, personal TTL) reads
//! as NULL, never as an error. Cells older than the table's personal TTL read as NULL at
//! once, before their key period ends and the key is destroyed.

use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryArray, StringArray, StringBuilder, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::DataFusionError;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, Result};
use datafusion::datasource::TableType;
use datafusion::execution::TaskContext;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::expressions::{Column, Literal};
use datafusion::physical_expr::projection::ProjectionMapping;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
    SendableRecordBatchStream,
};
use futures::StreamExt;
use privacy::{
    CURRENT_VERSION, CellError, Keyring, Plaintext, associated_data, decrypt_cell, key_id_of,
    version_of,
};
use store::{CIPHER_SUFFIX, ColumnType, TIME_COLUMN};

use crate::policy::{ColumnMode, DecryptionLog, RowPolicy, TableAccess, is_plain_comparison};
use crate::table::LakeTable;

/// What a session may see of personal columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PersonalAccess {
    /// Subject columns show pseudonyms; personal columns read as NULL.
    #[default]
    Masked,
    /// Subject and personal columns are decrypted (subject export; the access-control
    /// layer decides who else).
    Clear,
}

/// How one column of the view is made from the stored columns. Indices are into the
/// table's stored columns in [`PersonalTable`], into the scan's input in a [`Decryptor`].
#[derive(Debug, Clone)]
enum ViewColumn {
    /// As stored.
    Plain(usize),
    /// Column `value` (the subject itself or one of its personal columns) from the subject
    /// cell at this index, stored under `cell_name`.
    Decrypted {
        cell: usize,
        cell_name: String,
        value: String,
    },
    /// NULL text.
    Masked,
}

/// A table with a privacy profile, as one session may see it.
#[derive(Debug)]
pub struct PersonalTable {
    inner: LakeTable,
    keyring: Option<Arc<Keyring>>,
    scope: String,
    view: SchemaRef,
    columns: Vec<ViewColumn>,
    /// Inner indices of the tag columns (the series) and of time.
    tags: Vec<usize>,
    time: usize,
    personal_horizon: i64,
    /// Rows the session may see: a barrier below every user expression.
    rows: Option<RowPolicy>,
    decryption_log: Option<Arc<DecryptionLog>>,
}

impl PersonalTable {
    /// Notes in `log` every cell this table's scans decrypt.
    pub fn with_decryption_log(mut self, log: Option<Arc<DecryptionLog>>) -> Self {
        self.decryption_log = log;
        self
    }

    /// Wraps `inner` for a session that sees it with `access`, at `now_ns`: personal
    /// columns of a profiled table masked, pseudonymised, decrypted or absent, and only the
    /// rows the access allows.
    pub fn new(
        inner: LakeTable,
        keyring: Option<Arc<Keyring>>,
        access: TableAccess,
        now_ns: i64,
    ) -> Self {
        let snapshot = inner.snapshot();
        let options = &snapshot.options;
        let scope = store::key_scope(&snapshot.db, &snapshot.table);
        let stored = inner.schema();
        let mut fields = Vec::new();
        let mut columns = Vec::new();
        let cell_of = |subject: &str| {
            let name = store::cipher_column(subject);
            stored.index_of(&name).ok().map(|i| (i, name))
        };
        for (i, f) in stored.fields().iter().enumerate() {
            let name = f.name();
            let subject_cell = name
                .strip_suffix(CIPHER_SUFFIX)
                .is_some_and(|s| options.subjects.contains_key(s));
            // Personal columns come from the profile below (their values live in the
            // subject's cell); a stored column of that name is never shown.
            if subject_cell || options.subject_of(name).is_some() {
                continue;
            }
            let is_subject = options.subjects.contains_key(name.as_str());
            let mode =
                access
                    .columns
                    .get(name)
                    .copied()
                    .unwrap_or(match (is_subject, access.default) {
                        (true, PersonalAccess::Clear) => ColumnMode::Clear,
                        _ => ColumnMode::Pseudonym,
                    });
            let column = match mode {
                ColumnMode::Deny => continue,
                ColumnMode::Clear if is_subject => match cell_of(name) {
                    Some((cell, cell_name)) => ViewColumn::Decrypted {
                        cell,
                        cell_name,
                        value: name.clone(),
                    },
                    None => ViewColumn::Masked,
                },
                ColumnMode::Mask => ViewColumn::Masked,
                // Columns that are not personal are stored in clear: as stored.
                ColumnMode::Clear | ColumnMode::Pseudonym => ViewColumn::Plain(i),
            };
            fields.push(match column {
                ViewColumn::Plain(_) => f.as_ref().clone(),
                _ => Field::new(name, DataType::Utf8, true),
            });
            columns.push(column);
        }
        for (subject, personal) in &options.subjects {
            for p in personal {
                let mode = access
                    .columns
                    .get(p)
                    .copied()
                    .unwrap_or(match access.default {
                        PersonalAccess::Clear => ColumnMode::Clear,
                        PersonalAccess::Masked => ColumnMode::Mask,
                    });
                let column = match (mode, cell_of(subject)) {
                    (ColumnMode::Deny, _) => continue,
                    (ColumnMode::Clear, Some((cell, cell_name))) => ViewColumn::Decrypted {
                        cell,
                        cell_name,
                        value: p.clone(),
                    },
                    _ => ViewColumn::Masked,
                };
                fields.push(Field::new(p, DataType::Utf8, true));
                columns.push(column);
            }
        }
        let tags = snapshot
            .schema
            .columns
            .iter()
            .filter(|c| c.column_type == ColumnType::Tag)
            .filter_map(|c| stored.index_of(&c.name).ok())
            .collect();
        let time = stored.index_of(TIME_COLUMN).unwrap_or(0);
        let personal_horizon = options.personal_horizon(now_ns);
        PersonalTable {
            keyring,
            scope,
            view: Arc::new(Schema::new(fields)),
            columns,
            tags,
            time,
            personal_horizon,
            rows: access.rows,
            decryption_log: None,
            inner,
        }
    }

    /// The table as stored.
    pub fn lake_table(&self) -> &LakeTable {
        &self.inner
    }

    /// Whether the view shows every stored column as stored, in order (a table without a
    /// profile, read under a row policy only).
    pub fn is_transparent(&self) -> bool {
        self.columns.len() == self.inner.schema().fields().len()
            && self
                .columns
                .iter()
                .enumerate()
                .all(|(at, c)| matches!(c, ViewColumn::Plain(i) if *i == at))
    }

    /// The row policy as an expression over the stored columns, for this session.
    pub fn barrier(&self, state: &dyn Session) -> Result<Option<Expr>> {
        let Some(rows) = &self.rows else {
            return Ok(None);
        };
        let session = state
            .as_any()
            .downcast_ref::<SessionState>()
            .ok_or_else(|| DataFusionError::Internal("a row policy needs a SessionState".into()))?;
        let df_schema = DFSchema::try_from(self.inner.schema())?;
        let table = &self.inner.snapshot().table;
        Ok(Some(rows.to_expr(session, table, &df_schema)?))
    }

    /// Whether any column of the view is decrypted.
    pub fn decrypts(&self) -> bool {
        self.columns
            .iter()
            .any(|c| matches!(c, ViewColumn::Decrypted { .. }))
    }

    fn is_plain(&self, name: &str) -> bool {
        self.view
            .index_of(name)
            .is_ok_and(|i| matches!(self.columns[i], ViewColumn::Plain(_)))
    }
}

#[async_trait]
impl TableProvider for PersonalTable {
    fn schema(&self) -> SchemaRef {
        self.view.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Only filters on columns as stored may reach the files; a filter on a decrypted or
        // masked column runs above this table, on what the session sees. Below a row
        // policy, only plain comparisons with literals, which cannot fail on a hidden row.
        // Those that pass are applied here, exactly, together with the policy.
        Ok(filters
            .iter()
            .map(|f| {
                let plain = f.column_refs().iter().all(|c| self.is_plain(&c.name));
                if plain && (self.rows.is_none() || is_plain_comparison(f)) {
                    TableProviderFilterPushDown::Exact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let wanted: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.columns.len()).collect(),
        };
        // Inner columns to read: the plain ones asked for, and for decryption the cells,
        // the series tags and time. At least one, so that masked-only scans count rows.
        let mut inner: Vec<usize> = Vec::new();
        let mut decrypts = false;
        for &v in &wanted {
            match &self.columns[v] {
                ViewColumn::Plain(i) => inner.push(*i),
                ViewColumn::Decrypted { cell, .. } => {
                    inner.push(*cell);
                    decrypts = true;
                }
                ViewColumn::Masked => {}
            }
        }
        if decrypts || inner.is_empty() {
            inner.extend(self.tags.iter().copied());
            inner.push(self.time);
        }
        let stored = self.inner.schema();
        let table = self.inner.snapshot().table.clone();
        let barrier = self.barrier(state)?;
        // The barrier and the filters are evaluated on the stored rows: read their columns.
        for f in barrier.iter().chain(filters) {
            for c in f.column_refs() {
                inner.push(stored.index_of(&c.name)?);
            }
        }
        inner.sort_unstable();
        inner.dedup();
        let at = |i: usize| inner.iter().position(|x| *x == i).expect("projected");
        let outputs: Vec<ViewColumn> = wanted
            .iter()
            .map(|&v| match &self.columns[v] {
                ViewColumn::Plain(i) => ViewColumn::Plain(at(*i)),
                ViewColumn::Decrypted {
                    cell,
                    cell_name,
                    value,
                } => ViewColumn::Decrypted {
                    cell: at(*cell),
                    cell_name: cell_name.clone(),
                    value: value.clone(),
                },
                ViewColumn::Masked => ViewColumn::Masked,
            })
            .collect();
        let series = self
            .tags
            .iter()
            .filter(|t| inner.contains(t))
            .map(|t| (stored.field(*t).name().clone(), at(*t)))
            .collect();
        // The filters (plain, see above) prune files, row groups and pages, and are applied
        // exactly right above the stored rows, together with the barrier.
        let exact = |input: Arc<dyn ExecutionPlan>| -> Result<Arc<dyn ExecutionPlan>> {
            let all = filters.iter().cloned().chain(barrier.iter().cloned());
            let Some(all) = datafusion::logical_expr::utils::conjunction(all) else {
                return Ok(input);
            };
            let df_schema = DFSchema::try_from(input.schema())?;
            let predicate = state.create_physical_expr(all, &df_schema)?;
            Ok(Arc::new(FilterExec::try_new(predicate, input)?))
        };
        let input = match &barrier {
            None => exact(self.inner.scan(state, Some(&inner), filters, limit).await?)?,
            Some(_) => {
                // The limit must wait for the barrier.
                let input = self.inner.scan(state, Some(&inner), filters, None).await?;
                // The secured scan is a leaf of the session's plan (nothing above reaches
                // into it, EXPLAIN shows no policy), so it is optimised here; the barrier
                // is not pushed into the Parquet reader: as a pruning predicate it costs
                // more than it saves when it admits most rows (policy-bench.sh, 1.32x vs
                // 1.03x), and one operator right above the decoded rows is simpler to
                // reason about.
                let mut plan = exact(input)?;
                if let Some(session) = state.as_any().downcast_ref::<SessionState>() {
                    for rule in session.physical_optimizers() {
                        if rule.name().starts_with("FilterPushdown") {
                            continue;
                        }
                        plan = rule.optimize(plan, session.config_options())?;
                    }
                }
                plan
            }
        };
        let schema = Arc::new(Schema::new(
            wanted
                .iter()
                .map(|&v| self.view.field(v).clone())
                .collect::<Vec<_>>(),
        ));
        let secured = barrier.is_some().then_some(table);
        Ok(Arc::new(PersonalExec::new(
            input,
            schema,
            Arc::new(Decryptor {
                keyring: self.keyring.clone(),
                scope: self.scope.clone(),
                outputs,
                series,
                time: inner.iter().position(|x| *x == self.time),
                personal_horizon: self.personal_horizon,
                log: self.decryption_log.clone(),
            }),
            secured,
        )))
    }
}

/// What the associated data of a batch's cells is made of: the series tags as text (name,
/// values) and the time column.
type RowContext = (Vec<(String, StringArray)>, Option<ArrayRef>);

/// Turns stored batches into what the session sees.
#[derive(Debug)]
struct Decryptor {
    keyring: Option<Arc<Keyring>>,
    scope: String,
    /// The output columns, indices into the input batch.
    outputs: Vec<ViewColumn>,
    /// Tag name and input index, sorted by name: the series of the associated data.
    series: Vec<(String, usize)>,
    time: Option<usize>,
    personal_horizon: i64,
    log: Option<Arc<DecryptionLog>>,
}

impl Decryptor {
    fn apply(&self, batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
        let rows = batch.num_rows();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.outputs.len());
        let mut tampered = 0usize;
        let mut prepared: Option<RowContext> = None;
        let mut opened: Vec<(usize, Vec<Option<Plaintext>>)> = Vec::new();
        for out in &self.outputs {
            match out {
                ViewColumn::Plain(i) => columns.push(batch.column(*i).clone()),
                ViewColumn::Masked => columns.push(new_null_array(&DataType::Utf8, rows)),
                ViewColumn::Decrypted {
                    cell,
                    cell_name,
                    value,
                } => {
                    if prepared.is_none() {
                        let tags = self
                            .series
                            .iter()
                            .map(|(name, i)| {
                                let text = arrow::compute::cast(batch.column(*i), &DataType::Utf8)?;
                                let text = text
                                    .as_any()
                                    .downcast_ref::<StringArray>()
                                    .cloned()
                                    .unwrap_or_else(|| StringArray::new_null(rows));
                                Ok((name.clone(), text))
                            })
                            .collect::<Result<Vec<_>>>()?;
                        let time = self.time.map(|t| batch.column(t).clone());
                        prepared = Some((tags, time));
                    }
                    let (tags, time) = prepared.as_ref().expect("prepared");
                    // Each subject cell is opened once per batch, whatever columns it feeds.
                    if !opened.iter().any(|(c, _)| c == cell) {
                        let (plain, bad) =
                            self.open_cells(batch.column(*cell), cell_name, tags, time.as_ref());
                        tampered += bad;
                        opened.push((*cell, plain));
                    }
                    let plain = &opened
                        .iter()
                        .find(|(c, _)| c == cell)
                        .expect("opened above")
                        .1;
                    let subject = cell_name.strip_suffix(CIPHER_SUFFIX).unwrap_or(cell_name);
                    let mut out = StringBuilder::with_capacity(rows, rows * 16);
                    for p in plain {
                        out.append_option(p.as_ref().and_then(|p| p.value(subject, value)));
                    }
                    columns.push(Arc::new(out.finish()));
                }
            }
        }
        if tampered > 0 {
            tracing::warn!(
                table = %self.scope,
                cells = tampered,
                "personal cells failed their integrity check (altered or moved to another row); they read as NULL"
            );
        }
        Ok(RecordBatch::try_new_with_options(
            schema.clone(),
            columns,
            &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows)),
        )?)
    }

    /// Opens each row's cell (None: null, past the personal TTL, key destroyed, or failed
    /// its integrity check); returns the plaintexts and how many failed the check.
    fn open_cells(
        &self,
        cells: &ArrayRef,
        column: &str,
        tags: &[(String, StringArray)],
        time: Option<&ArrayRef>,
    ) -> (Vec<Option<Plaintext>>, usize) {
        let rows = cells.len();
        let (Some(keyring), Some(cells), Some(time)) = (
            &self.keyring,
            cells.as_any().downcast_ref::<BinaryArray>(),
            time.and_then(|t| {
                t.as_any()
                    .downcast_ref::<arrow::array::TimestampNanosecondArray>()
            }),
        ) else {
            return (vec![None; rows], 0);
        };
        let keys = keyring.keys();
        let mut out = Vec::with_capacity(rows);
        let mut aad = Vec::with_capacity(128);
        let mut tampered = 0;
        let mut used: Vec<u64> = Vec::new();
        for row in 0..rows {
            if cells.is_null(row) || time.is_null(row) || time.value(row) < self.personal_horizon {
                out.push(None);
                continue;
            }
            let series = tags
                .iter()
                .filter(|(_, a)| a.is_valid(row))
                .map(|(n, a)| (n.as_str(), a.value(row)));
            let cell = cells.value(row);
            // A cell of no known version is refused as malformed by `decrypt_cell` below.
            let version = version_of(cell).unwrap_or(CURRENT_VERSION);
            associated_data(
                &mut aad,
                version,
                &self.scope,
                column,
                series,
                time.value(row),
            );
            out.push(match decrypt_cell(cell, &aad, |id| keys.get(id)) {
                Ok(plain) => {
                    if let Some(id) = key_id_of(cell) {
                        used.push(id);
                    }
                    Some(plain)
                }
                Err(CellError::KeyGone) => None,
                Err(CellError::Tampered | CellError::Malformed) => {
                    tampered += 1;
                    None
                }
            });
        }
        if let Some(log) = &self.log {
            let cells = used.len() as u64;
            used.sort_unstable();
            used.dedup();
            log.record(used, cells);
        }
        (out, tampered)
    }
}

/// What the view keeps of its input's orderings and equivalences: columns shown as stored
/// keep theirs (so sorted scans stay sorted for the plan above), masked ones are constant
/// NULL. Decrypted columns are known to nothing, so a view with one keeps nothing.
fn view_equivalences(
    input: &Arc<dyn ExecutionPlan>,
    schema: &SchemaRef,
    outputs: &[ViewColumn],
) -> EquivalenceProperties {
    let unknown = || EquivalenceProperties::new(schema.clone());
    if outputs
        .iter()
        .any(|c| matches!(c, ViewColumn::Decrypted { .. }))
    {
        return unknown();
    }
    let input_schema = input.schema();
    let exprs = outputs.iter().zip(schema.fields()).map(|(c, f)| {
        let expr: Arc<dyn PhysicalExpr> = match c {
            ViewColumn::Plain(i) => Arc::new(Column::new(input_schema.field(*i).name(), *i)),
            _ => Arc::new(Literal::new(datafusion::common::ScalarValue::Utf8(None))),
        };
        (expr, f.name().clone())
    });
    match ProjectionMapping::try_new(exprs, &input_schema) {
        Ok(mapping) => input
            .equivalence_properties()
            .project(&mapping, schema.clone()),
        Err(_) => unknown(),
    }
}

/// Applies a [`Decryptor`] to every batch of its input.
#[derive(Debug)]
pub struct PersonalExec {
    input: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    decryptor: Arc<Decryptor>,
    properties: Arc<PlanProperties>,
    /// Behind a row policy: the table's name, and the input is hidden from the plan (a
    /// leaf: no optimiser rule reaches below the barrier, EXPLAIN shows no policy).
    secured: Option<String>,
}

impl PersonalExec {
    fn new(
        input: Arc<dyn ExecutionPlan>,
        schema: SchemaRef,
        decryptor: Arc<Decryptor>,
        secured: Option<String>,
    ) -> Self {
        let properties = PlanProperties::new(
            view_equivalences(&input, &schema, &decryptor.outputs),
            input.output_partitioning().clone(),
            input.pipeline_behavior(),
            input.boundedness(),
        );
        PersonalExec {
            input,
            schema,
            decryptor,
            properties: Arc::new(properties),
            secured,
        }
    }
}

impl DisplayAs for PersonalExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.secured {
            Some(table) => write!(f, "SecuredScan: table={table}"),
            None => write!(f, "PersonalExec: personal columns masked or decrypted"),
        }
    }
}

impl ExecutionPlan for PersonalExec {
    fn name(&self) -> &str {
        "PersonalExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        match self.secured {
            Some(_) => vec![],
            None => vec![&self.input],
        }
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            return Ok(self);
        }
        Ok(Arc::new(PersonalExec::new(
            children.swap_remove(0),
            self.schema.clone(),
            self.decryptor.clone(),
            self.secured.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let schema = self.schema.clone();
        let decryptor = self.decryptor.clone();
        let out = schema.clone();
        let stream = input.map(move |batch| decryptor.apply(&batch?, &schema));
        Ok(Box::pin(RecordBatchStreamAdapter::new(out, stream)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use arrow::array::{StringDictionaryBuilder, TimestampNanosecondArray, UInt64Array};
    use arrow::datatypes::Int32Type;
    use datafusion::common::ScalarValue;
    use datafusion::execution::object_store::ObjectStoreUrl;
    use datafusion::logical_expr::col;
    use datafusion::prelude::SessionContext;
    use privacy::{DestroyReason, MasterKey, encrypt_values};
    use store::{KeyPeriod, PartitionGranularity, TableOptions, TableSchema, TableSnapshot};

    use super::*;

    const DAY: i64 = 86_400_000_000_000;
    const NOW: i64 = 100 * DAY + 10;

    struct Fixture {
        _dir: tempfile::TempDir,
        keyring: Arc<Keyring>,
        snapshot: TableSnapshot,
        pseudonyms: BTreeMap<&'static str, String>,
    }

    /// Rows (event, subject, name, time); `swap` exchanges the cells of rows 0 and 1.
    fn fixture(swap: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Arc::new(Keyring::init(dir.path(), MasterKey::generate().unwrap()).unwrap());
        let rows = [
            ("login", "E1", "Ann", 100 * DAY),
            ("login", "E2", "Bob", 100 * DAY + 1),
            ("alarm", "E1", "Ann", 10 * DAY),
        ];
        let mut schema = TableSchema::new();
        for (name, ty) in [
            ("event", ColumnType::Tag),
            ("operator_id", ColumnType::Tag),
            ("operator_id__enc", ColumnType::Encrypted),
        ] {
            schema.add_column(name, ty);
        }
        let mut options = TableOptions {
            ttl: Some(std::time::Duration::from_secs(365 * 86_400)),
            personal_ttl: Some(std::time::Duration::from_secs(30 * 86_400)),
            ..Default::default()
        };
        options
            .subjects
            .insert("operator_id".into(), vec!["operator_name".into()]);
        let mut events = StringDictionaryBuilder::<Int32Type>::new();
        let mut subjects = StringDictionaryBuilder::<Int32Type>::new();
        let (mut enc, mut times) = (Vec::new(), Vec::new());
        let mut pseudonyms = BTreeMap::new();
        let mut aad = Vec::new();
        for (event, subject, name, time) in rows {
            let entry = keyring
                .entry_for(
                    "db/mes",
                    &keyring.subject_hash(subject),
                    KeyPeriod::Month.period_of(time),
                )
                .unwrap();
            // The pseudonym of the subject's first row (a later month gets another).
            pseudonyms
                .entry(subject)
                .or_insert_with(|| entry.pseudonym.clone());
            let series = [("event", event), ("operator_id", entry.pseudonym.as_str())];
            associated_data(
                &mut aad,
                CURRENT_VERSION,
                "db/mes",
                "operator_id__enc",
                series,
                time,
            );
            enc.push(encrypt_values(
                &entry,
                &aad,
                subject,
                [("operator_name", name)],
            ));
            events.append_value(event);
            subjects.append_value(&entry.pseudonym);
            times.push(time);
        }
        if swap {
            enc.swap(0, 1);
        }
        let stored = schema.arrow_schema();
        let columns: Vec<ArrayRef> = stored
            .fields()
            .iter()
            .map(|f| -> ArrayRef {
                match f.name().as_str() {
                    "event" => Arc::new(events.finish()),
                    "operator_id" => Arc::new(subjects.finish()),
                    "time" => Arc::new(TimestampNanosecondArray::from(times.clone())),
                    "operator_id__enc" => Arc::new(BinaryArray::from_iter_values(&enc)),
                    _ => Arc::new(UInt64Array::from(vec![1, 2, 3])),
                }
            })
            .collect();
        let batch = RecordBatch::try_new(stored, columns).unwrap();
        let batch = store::dedup::sort_dedup(&batch).unwrap();
        let partition = PartitionGranularity::Day.partition_of(0);
        Fixture {
            _dir: dir,
            keyring,
            snapshot: TableSnapshot {
                db: "db".into(),
                table: "mes".into(),
                schema,
                options,
                buffered: vec![(partition, vec![batch])],
                manifest: None,
            },
            pseudonyms,
        }
    }

    async fn run(
        f: &Fixture,
        access: PersonalAccess,
        filter: Option<Expr>,
        sql: &str,
    ) -> Vec<RecordBatch> {
        let lake = ObjectStoreUrl::parse("historian://lake/").unwrap();
        let table = PersonalTable::new(
            LakeTable::new(f.snapshot.clone(), lake, NOW),
            Some(f.keyring.clone()),
            TableAccess {
                default: access,
                columns: HashMap::new(),
                rows: filter.map(RowPolicy::Expr),
                ..TableAccess::default()
            },
            NOW,
        );
        let ctx = SessionContext::new();
        ctx.register_table("mes", Arc::new(table)).unwrap();
        ctx.sql(sql).await.unwrap().collect().await.unwrap()
    }

    fn strings(batches: &[RecordBatch], column: usize) -> Vec<Option<String>> {
        batches
            .iter()
            .flat_map(|b| {
                let c = arrow::compute::cast(b.column(column), &DataType::Utf8).unwrap();
                let c = c.as_any().downcast_ref::<StringArray>().unwrap().clone();
                (0..c.len()).map(move |i| c.is_valid(i).then(|| c.value(i).to_string()))
            })
            .collect()
    }

    const BY_TIME: &str = "SELECT operator_id, operator_name FROM mes ORDER BY time";

    #[tokio::test]
    async fn masked_sessions_see_pseudonyms_and_nulls_only() {
        let f = fixture(false);
        let out = run(&f, PersonalAccess::Masked, None, BY_TIME).await;
        let ids = strings(&out, 0);
        // The alarm, months earlier, has a pseudonym of its own period.
        assert!(ids[0].as_ref().unwrap().starts_with("ps-") && ids[0] != ids[1]);
        assert_eq!(
            ids[1..],
            [
                Some(f.pseudonyms["E1"].clone()),
                Some(f.pseudonyms["E2"].clone())
            ]
        );
        assert_eq!(strings(&out, 1), vec![None, None, None]);
        let out = run(&f, PersonalAccess::Masked, None, "SELECT * FROM mes").await;
        assert!(
            out[0]
                .schema()
                .fields()
                .iter()
                .all(|c| !c.name().ends_with(CIPHER_SUFFIX))
        );
        // A filter on a masked column sees what the session sees: NULL.
        let out = run(
            &f,
            PersonalAccess::Masked,
            None,
            "SELECT count(*) FROM mes WHERE operator_name = 'Ann'",
        )
        .await;
        assert_eq!(strings(&out, 0), vec![Some("0".into())]);
    }

    #[tokio::test]
    async fn clear_sessions_decrypt_within_personal_ttl_only() {
        let f = fixture(false);
        let out = run(&f, PersonalAccess::Clear, None, BY_TIME).await;
        // The alarm 90 days before NOW is past the 30-day personal TTL: hidden at once.
        assert_eq!(
            strings(&out, 0),
            vec![None, Some("E1".into()), Some("E2".into())]
        );
        assert_eq!(
            strings(&out, 1),
            vec![None, Some("Ann".into()), Some("Bob".into())]
        );
        let out = run(
            &f,
            PersonalAccess::Clear,
            None,
            "SELECT count(*) FROM mes WHERE operator_name = 'Ann'",
        )
        .await;
        assert_eq!(strings(&out, 0), vec![Some("1".into())]);
    }

    #[tokio::test]
    async fn moved_cells_and_destroyed_keys_read_as_null() {
        let f = fixture(true);
        let out = run(&f, PersonalAccess::Clear, None, BY_TIME).await;
        assert_eq!(
            strings(&out, 0),
            vec![None, None, None],
            "moved cells fail their AD check"
        );
        assert_eq!(strings(&out, 1), vec![None, None, None]);
        let f = fixture(false);
        let bob = f.keyring.subject_entries(&f.keyring.subject_hash("E2"));
        f.keyring
            .destroy(&[bob[0].key_id], DestroyReason::Erasure)
            .unwrap();
        let out = run(&f, PersonalAccess::Clear, None, BY_TIME).await;
        assert_eq!(strings(&out, 1), vec![None, Some("Ann".into()), None]);
    }

    #[tokio::test]
    async fn the_row_filter_is_a_barrier_below_user_expressions() {
        let f = fixture(false);
        let only_e2 = col("operator_id").in_list(
            vec![datafusion::logical_expr::lit(ScalarValue::Dictionary(
                Box::new(DataType::Int32),
                Box::new(ScalarValue::Utf8(Some(f.pseudonyms["E2"].clone()))),
            ))],
            false,
        );
        let out = run(&f, PersonalAccess::Clear, Some(only_e2), BY_TIME).await;
        assert_eq!(strings(&out, 0), vec![Some("E2".into())]);
    }
}
