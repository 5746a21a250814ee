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
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, Result};
use datafusion::datasource::TableType;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
    SendableRecordBatchStream,
};
use futures::StreamExt;
use privacy::{CellError, Keyring, associated_data, decrypt_cell};
use store::{CIPHER_SUFFIX, ColumnType, TIME_COLUMN};

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

/// How one column of the view is made from the stored columns.
#[derive(Debug, Clone)]
enum ViewColumn {
    /// As stored (inner index).
    Plain(usize),
    /// Decrypted from the cell column at this inner index, stored under this name.
    Decrypted { cell: usize, stored_name: String },
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
    row_filter: Option<Expr>,
}

impl PersonalTable {
    /// Only rows passing `filter` (over stored columns) are read: a barrier applied before
    /// any user expression sees a row.
    pub fn with_row_filter(mut self, filter: Option<Expr>) -> Self {
        self.row_filter = filter;
        self
    }

    /// Wraps `inner` (a profiled table) for a session with `access`, at `now_ns`.
    pub fn new(
        inner: LakeTable,
        keyring: Option<Arc<Keyring>>,
        access: PersonalAccess,
        now_ns: i64,
    ) -> Self {
        let snapshot = inner.snapshot();
        let options = &snapshot.options;
        let scope = format!("{}/{}", snapshot.db, snapshot.table);
        let stored = inner.schema();
        let mut fields = Vec::new();
        let mut columns = Vec::new();
        for (i, f) in stored.fields().iter().enumerate() {
            let name = f.name();
            let is_subject = options.subjects.contains_key(name.as_str());
            let is_personal =
                options.subject_of(name).is_some() && f.data_type() == &DataType::Binary;
            let subject_cell = name
                .strip_suffix(CIPHER_SUFFIX)
                .is_some_and(|s| options.subjects.contains_key(s));
            if subject_cell {
                continue;
            }
            if is_subject && access == PersonalAccess::Clear {
                let cell_name = store::cipher_column(name);
                match stored.index_of(&cell_name) {
                    Ok(cell) => {
                        fields.push(Field::new(name, DataType::Utf8, true));
                        columns.push(ViewColumn::Decrypted {
                            cell,
                            stored_name: cell_name,
                        });
                    }
                    Err(_) => {
                        fields.push(f.as_ref().clone());
                        columns.push(ViewColumn::Plain(i));
                    }
                }
            } else if is_personal {
                fields.push(Field::new(name, DataType::Utf8, true));
                columns.push(match access {
                    PersonalAccess::Clear => ViewColumn::Decrypted {
                        cell: i,
                        stored_name: name.clone(),
                    },
                    PersonalAccess::Masked => ViewColumn::Masked,
                });
            } else {
                fields.push(f.as_ref().clone());
                columns.push(ViewColumn::Plain(i));
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
            row_filter: None,
            inner,
        }
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
        // masked column runs above this table, on what the session sees.
        Ok(filters
            .iter()
            .map(|f| {
                if f.column_refs().iter().all(|c| self.is_plain(&c.name)) {
                    TableProviderFilterPushDown::Inexact
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
        if let Some(f) = &self.row_filter {
            for c in f.column_refs() {
                inner.push(stored.index_of(&c.name)?);
            }
        }
        inner.sort_unstable();
        inner.dedup();
        let at = |i: usize| inner.iter().position(|x| *x == i).expect("projected");
        let outputs: Vec<Output> = wanted
            .iter()
            .map(|&v| match &self.columns[v] {
                ViewColumn::Plain(i) => Output::Plain(at(*i)),
                ViewColumn::Decrypted { cell, stored_name } => Output::Decrypted {
                    cell: at(*cell),
                    stored_name: stored_name.clone(),
                },
                ViewColumn::Masked => Output::Masked,
            })
            .collect();
        let series = self
            .tags
            .iter()
            .filter(|t| inner.contains(t))
            .map(|t| (self.inner.schema().field(*t).name().clone(), at(*t)))
            .collect();
        let input = match &self.row_filter {
            None => self.inner.scan(state, Some(&inner), filters, limit).await?,
            Some(barrier) => {
                // The barrier's own columns may prune files; the limit must wait for it.
                let mut pruning = filters.to_vec();
                pruning.push(barrier.clone());
                let input = self.inner.scan(state, Some(&inner), &pruning, None).await?;
                let df_schema = DFSchema::try_from(input.schema())?;
                let predicate = state.create_physical_expr(barrier.clone(), &df_schema)?;
                Arc::new(FilterExec::try_new(predicate, input)?) as Arc<dyn ExecutionPlan>
            }
        };
        let schema = Arc::new(Schema::new(
            wanted
                .iter()
                .map(|&v| self.view.field(v).clone())
                .collect::<Vec<_>>(),
        ));
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
            }),
        )))
    }
}

#[derive(Debug, Clone)]
enum Output {
    Plain(usize),
    Decrypted { cell: usize, stored_name: String },
    Masked,
}

/// What the associated data of a batch's cells is made of: the series tags as text (name,
/// values) and the time column.
type RowContext = (Vec<(String, StringArray)>, Option<ArrayRef>);

/// Turns stored batches into what the session sees.
#[derive(Debug)]
struct Decryptor {
    keyring: Option<Arc<Keyring>>,
    scope: String,
    outputs: Vec<Output>,
    /// Tag name and input index, sorted by name: the series of the associated data.
    series: Vec<(String, usize)>,
    time: Option<usize>,
    personal_horizon: i64,
}

impl Decryptor {
    fn apply(&self, batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
        let rows = batch.num_rows();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.outputs.len());
        let mut tampered = 0usize;
        let mut prepared: Option<RowContext> = None;
        for out in &self.outputs {
            match out {
                Output::Plain(i) => columns.push(batch.column(*i).clone()),
                Output::Masked => columns.push(new_null_array(&DataType::Utf8, rows)),
                Output::Decrypted { cell, stored_name } => {
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
                    let (array, bad) =
                        self.decrypt_column(batch.column(*cell), stored_name, tags, time.as_ref())?;
                    tampered += bad;
                    columns.push(array);
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

    fn decrypt_column(
        &self,
        cells: &ArrayRef,
        column: &str,
        tags: &[(String, StringArray)],
        time: Option<&ArrayRef>,
    ) -> Result<(ArrayRef, usize)> {
        let rows = cells.len();
        let (Some(keyring), Some(cells), Some(time)) = (
            &self.keyring,
            cells.as_any().downcast_ref::<BinaryArray>(),
            time.and_then(|t| {
                t.as_any()
                    .downcast_ref::<arrow::array::TimestampNanosecondArray>()
            }),
        ) else {
            return Ok((new_null_array(&DataType::Utf8, rows), 0));
        };
        let keys = keyring.keys();
        let mut out = StringBuilder::with_capacity(rows, rows * 16);
        let mut aad = Vec::with_capacity(128);
        let mut tampered = 0;
        for row in 0..rows {
            if cells.is_null(row) || time.is_null(row) || time.value(row) < self.personal_horizon {
                out.append_null();
                continue;
            }
            let series = tags
                .iter()
                .filter(|(_, a)| a.is_valid(row))
                .map(|(n, a)| (n.as_str(), a.value(row)));
            associated_data(&mut aad, &self.scope, column, series, time.value(row));
            match decrypt_cell(cells.value(row), &aad, |id| keys.get(id)) {
                Ok(plain) => match String::from_utf8(plain) {
                    Ok(s) => out.append_value(s),
                    Err(_) => {
                        tampered += 1;
                        out.append_null();
                    }
                },
                Err(CellError::KeyGone) => out.append_null(),
                Err(CellError::Tampered | CellError::Malformed) => {
                    tampered += 1;
                    out.append_null();
                }
            }
        }
        Ok((Arc::new(out.finish()), tampered))
    }
}

/// Applies a [`Decryptor`] to every batch of its input.
#[derive(Debug)]
pub struct PersonalExec {
    input: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    decryptor: Arc<Decryptor>,
    properties: Arc<PlanProperties>,
}

impl PersonalExec {
    fn new(input: Arc<dyn ExecutionPlan>, schema: SchemaRef, decryptor: Arc<Decryptor>) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            input.output_partitioning().clone(),
            input.pipeline_behavior(),
            input.boundedness(),
        );
        PersonalExec {
            input,
            schema,
            decryptor,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for PersonalExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "PersonalExec: personal columns masked or decrypted")
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
        vec![&self.input]
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
        Ok(Arc::new(PersonalExec::new(
            children.swap_remove(0),
            self.schema.clone(),
            self.decryptor.clone(),
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
