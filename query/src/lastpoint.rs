//! The fast path for the latest row per series (TSBS `lastpoint`, `DISTINCT ON (tags) ...
//! ORDER BY tags, time DESC`).
//!
//! DataFusion plans such a query as `first_value(... ORDER BY time DESC)` grouped by tags,
//! over every row. Since files are sorted by series then time, each series' last row in a
//! file is the row before the series key changes: [`LastPointRule`] swaps the scan under
//! such an aggregate for [`LastPointTable`], which reads only the tag and time columns to
//! find those rows, fetches just them, and adds the buffer's. The aggregate above then runs
//! over one candidate per series and source instead of over the table.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::datatypes::SchemaRef;
use arrow::row::{OwnedRow, RowConverter, Rows, SortField};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, DataFusionError, Result};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{TableType, provider_as_source, source_as_provider};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{
    Aggregate, Expr, LogicalPlan, TableProviderFilterPushDown, TableScan,
};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};
use datafusion::physical_plan::ExecutionPlan;
use futures::StreamExt;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, RowSelection};
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use store::dedup::{align, concat_aligned, is_key, is_tag, sort_dedup};
use store::reader::LakeFileReader;
use store::{FileMeta, SEQ_COLUMN, TIME_COLUMN};

use crate::personal::PersonalTable;
use crate::table::LakeTable;

/// Rows at which the tag key changes, over consecutive batches of one sorted stream.
struct SeriesEnds {
    converter: Option<RowConverter>,
    /// The last row seen and its key (none for a table without tags).
    pending: Option<(usize, Option<OwnedRow>)>,
    offset: usize,
    ends: Vec<usize>,
}

impl SeriesEnds {
    fn new() -> Self {
        SeriesEnds {
            converter: None,
            pending: None,
            offset: 0,
            ends: Vec::new(),
        }
    }

    fn keys(&mut self, tags: &[ArrayRef]) -> Result<Rows> {
        if self.converter.is_none() {
            let fields = tags
                .iter()
                .map(|c| SortField::new(c.data_type().clone()))
                .collect();
            self.converter = Some(RowConverter::new(fields)?);
        }
        let converter = self.converter.as_ref().expect("set above");
        Ok(converter.convert_columns(tags)?)
    }

    /// Feeds the tag columns of the next batch (`rows` rows).
    fn push(&mut self, tags: &[ArrayRef], rows: usize) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        if tags.is_empty() {
            // No tags: one series, whose last row is the stream's last.
            self.offset += rows;
            self.pending = Some((self.offset - 1, None));
            return Ok(());
        }
        let keys = self.keys(tags)?;
        if let Some((at, Some(key))) = self.pending.take()
            && key.row() != keys.row(0)
        {
            self.ends.push(at);
        }
        for i in 0..rows - 1 {
            if keys.row(i) != keys.row(i + 1) {
                self.ends.push(self.offset + i);
            }
        }
        self.pending = Some((self.offset + rows - 1, Some(keys.row(rows - 1).owned())));
        self.offset += rows;
        Ok(())
    }

    fn finish(mut self) -> Vec<usize> {
        if let Some((at, _)) = self.pending.take() {
            self.ends.push(at);
        }
        self.ends
    }
}

fn tag_columns(batch: &RecordBatch) -> Vec<ArrayRef> {
    batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(f, _)| is_tag(f))
        .map(|(_, c)| c.clone())
        .collect()
}

/// The last row of each series in a batch sorted by series then time.
fn last_per_series(batch: &RecordBatch) -> Result<RecordBatch> {
    let mut ends = SeriesEnds::new();
    ends.push(&tag_columns(batch), batch.num_rows())?;
    let picks =
        arrow::array::UInt32Array::from_iter_values(ends.finish().into_iter().map(|i| i as u32));
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c.as_ref(), &picks, None))
        .collect::<std::result::Result<_, _>>()?;
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

fn external(e: impl std::error::Error + Send + Sync + 'static) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// Each series' last rows of one sorted file, with the columns of `target` it has.
async fn file_candidates(
    store: Arc<dyn object_store::ObjectStore>,
    file: &FileMeta,
    target: &SchemaRef,
) -> Result<RecordBatch> {
    let open = || LakeFileReader::new(store.clone(), &file.path, file.bytes);
    // The footer is read once, for both passes.
    let mut reader = open();
    let metadata = ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new())
        .await
        .map_err(external)?;
    let builder = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, metadata.clone());
    let file_schema = builder.schema().clone();
    let key_indices: Vec<usize> = file_schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| is_key(f))
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), key_indices);
    let mut stream = builder.with_projection(mask).build().map_err(external)?;
    let mut ends = SeriesEnds::new();
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(external)?;
        ends.push(&tag_columns(&batch), batch.num_rows())?;
    }
    let total = ends.offset;
    let picks = ends.finish();
    if picks.is_empty() {
        return Ok(RecordBatch::new_empty(target.clone()));
    }
    let wanted: Vec<usize> = file_schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| target.index_of(f.name()).is_ok())
        .map(|(i, _)| i)
        .collect();
    let builder = ParquetRecordBatchStreamBuilder::new_with_metadata(open(), metadata);
    let mask = ProjectionMask::roots(builder.parquet_schema(), wanted);
    let selection = RowSelection::from_consecutive_ranges(picks.iter().map(|&i| i..i + 1), total);
    let mut stream = builder
        .with_projection(mask)
        .with_row_selection(selection)
        .build()
        .map_err(external)?;
    let mut batches = Vec::new();
    while let Some(batch) = stream.next().await {
        batches.push(batch.map_err(external)?);
    }
    Ok(concat_aligned(&batches, target)?)
}

/// A table that yields, per series, its latest row (and, where sources overlap, the
/// versions needed to merge it), for the aggregate of a lastpoint query.
#[derive(Debug)]
pub struct LastPointTable {
    table: Arc<LakeTable>,
    /// The secured view the query named (a [`PersonalTable`]), when it has one: its row
    /// policy applies.
    secured: Option<Arc<dyn TableProvider>>,
}

#[async_trait]
impl TableProvider for LastPointTable {
    fn schema(&self) -> SchemaRef {
        self.table.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![
            TableProviderFilterPushDown::Unsupported;
            filters.len()
        ])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut barrier = None;
        if let Some(provider) = &self.secured {
            let secured = provider
                .downcast_ref::<PersonalTable>()
                .ok_or_else(|| DataFusionError::Internal("not a secured view".into()))?;
            // The latest visible row of a series is its latest row only if the policy
            // keeps or drops whole series (a predicate over tags); otherwise the
            // aggregate above gets every visible row, as without the fast path.
            barrier = secured.barrier(state)?;
            let tags: BTreeSet<&str> = self.table.snapshot().schema.tags().collect();
            let per_series = barrier.as_ref().is_none_or(|b| {
                b.column_refs()
                    .iter()
                    .all(|c| tags.contains(c.name.as_str()))
            });
            if !per_series {
                return secured.scan(state, projection, filters, limit).await;
            }
        }
        let stored = self.table.snapshot().schema.arrow_schema();
        let user: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.table.schema().fields().len()).collect(),
        };
        let keys: BTreeSet<usize> = stored
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| is_key(f) || f.name() == SEQ_COLUMN)
            .map(|(i, _)| i)
            .chain(user.iter().copied())
            .collect();
        let cols: Vec<usize> = keys.into_iter().collect();
        let target = Arc::new(stored.project(&cols)?);
        let horizon = self.table.horizon();
        let store = state.runtime_env().object_store(self.table.lake_url())?;
        let mut candidates = Vec::new();
        if let Some(m) = &self.table.snapshot().manifest {
            for f in m.files.iter().filter(|f| f.max_time >= horizon) {
                candidates.push(file_candidates(store.clone(), f, &target).await?);
            }
        }
        for (_, runs) in &self.table.snapshot().buffered {
            for run in runs {
                candidates.push(last_per_series(&align(run, &target)?)?);
            }
        }
        let all = concat_aligned(&candidates, &target)?;
        let latest = last_per_series(&sort_dedup(&all)?)?;
        let mut latest = store::dedup::filter_horizon(&latest, horizon)?;
        if let Some(barrier) = barrier {
            // Tags are among the columns read, so the policy is evaluated here.
            let schema = DFSchema::try_from(latest.schema())?;
            let predicate = state.create_physical_expr(barrier, &schema)?;
            let keep = predicate.evaluate(&latest)?.into_array(latest.num_rows())?;
            let keep = keep
                .as_any()
                .downcast_ref::<arrow::array::BooleanArray>()
                .ok_or_else(|| DataFusionError::Internal("a row policy is not boolean".into()))?;
            latest = arrow::compute::filter_record_batch(&latest, keep)?;
        }
        let positions: Vec<usize> = user
            .iter()
            .map(|u| cols.iter().position(|c| c == u).unwrap_or_default())
            .collect();
        let projected = latest.project(&positions)?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![projected.clone()]],
            projected.schema(),
            None,
        )?)
    }
}

/// Swaps the scan under a lastpoint-shaped aggregate for a [`LastPointTable`].
#[derive(Debug, Default)]
pub struct LastPointRule;

/// Whether `agg` over `scan` (through `filter`, if any) asks for each series' latest row,
/// with only per-series filters between them.
fn is_lastpoint(
    agg: &Aggregate,
    filter: Option<&datafusion::logical_expr::Filter>,
    scan: &TableScan,
    table: &LakeTable,
) -> bool {
    let tags: BTreeSet<&str> = table.snapshot().schema.tags().collect();
    let group_ok = !agg.group_expr.is_empty()
        && agg
            .group_expr
            .iter()
            .all(|e| matches!(e, Expr::Column(c) if tags.contains(c.name.as_str())));
    let aggr_ok = agg.aggr_expr.iter().all(|e| {
        let Expr::AggregateFunction(f) = e.clone().unalias_nested().data else {
            return false;
        };
        if f.func.name() != "first_value" || f.params.filter.is_some() || f.params.distinct {
            return false;
        }
        let mut saw_time = false;
        for s in &f.params.order_by {
            match &s.expr {
                Expr::Column(c) if c.name == TIME_COLUMN && !s.asc => saw_time = true,
                Expr::Column(c) if tags.contains(c.name.as_str()) && !saw_time => {}
                _ => return false,
            }
        }
        saw_time
    });
    group_ok
        && aggr_ok
        && filter.is_none_or(|f| on_tags_only(&f.predicate, &tags))
        && scan.filters.iter().all(|f| on_tags_only(f, &tags))
        && scan.fetch.is_none()
}

/// Whether a predicate reads only tags, deterministically and without subqueries: tags are
/// constant within a series, so such a filter keeps or drops whole series and commutes with
/// taking each series' last row.
fn on_tags_only(predicate: &Expr, tags: &BTreeSet<&str>) -> bool {
    let refs_ok = predicate
        .column_refs()
        .iter()
        .all(|c| tags.contains(c.name.as_str()));
    let plain = !predicate.is_volatile()
        && !predicate
            .exists(|e| {
                Ok(matches!(
                    e,
                    Expr::ScalarSubquery(_) | Expr::InSubquery(_) | Expr::Exists(_)
                ))
            })
            .unwrap_or(true);
    refs_ok && plain
}

impl OptimizerRule for LastPointRule {
    fn name(&self) -> &str {
        "historian_last_point"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let LogicalPlan::Aggregate(agg) = &plan else {
            return Ok(Transformed::no(plan));
        };
        // The scan, under the aggregate or under a filter on tags (`WHERE line = 'L1'`).
        let (filter, scan) = match agg.input.as_ref() {
            LogicalPlan::TableScan(scan) => (None, scan),
            LogicalPlan::Filter(f) => match f.input.as_ref() {
                LogicalPlan::TableScan(scan) => (Some(f), scan),
                _ => return Ok(Transformed::no(plan)),
            },
            _ => return Ok(Transformed::no(plan)),
        };
        let Ok(provider) = source_as_provider(&scan.source) else {
            return Ok(Transformed::no(plan));
        };
        let (table, secured) = if let Some(t) = provider.downcast_ref::<LakeTable>() {
            (t.clone(), None)
        } else if let Some(p) = provider.downcast_ref::<PersonalTable>()
            && p.is_transparent()
        {
            // A secured view that shows every stored column as stored (a row policy
            // only): the fast path with the policy applied to its result.
            (p.lake_table().clone(), Some(provider.clone()))
        } else {
            return Ok(Transformed::no(plan));
        };
        // The fast path reads files' last rows directly; one hidden by a deletion vector
        // (erasure, until compaction) would come back, so such tables take the plain plan.
        if !is_lastpoint(agg, filter, scan, &table) || table.has_deletion_vectors() {
            return Ok(Transformed::no(plan));
        }
        let table = Arc::new(table);
        // The filter above the new scan applies the predicates exactly, to one row per
        // series: the query's filter and the scan's pushed-down ones (a secured view takes
        // plain comparisons as exact, and then no filter node is left above the scan).
        let new_scan = LogicalPlan::TableScan(TableScan {
            source: provider_as_source(Arc::new(LastPointTable { table, secured })),
            filters: Vec::new(),
            ..scan.clone()
        });
        let predicate = conjunction(
            filter
                .map(|f| f.predicate.clone())
                .into_iter()
                .chain(scan.filters.iter().cloned()),
        );
        let input = match predicate {
            Some(p) => {
                // A pushed-down filter's column may have left the scan's projection; then
                // the plain plan answers.
                match datafusion::logical_expr::Filter::try_new(p, Arc::new(new_scan)) {
                    Ok(f) => LogicalPlan::Filter(f),
                    Err(_) => return Ok(Transformed::no(plan)),
                }
            }
            None => new_scan,
        };
        let new_agg = Aggregate::try_new_with_schema(
            Arc::new(input),
            agg.group_expr.clone(),
            agg.aggr_expr.clone(),
            agg.schema.clone(),
        )?;
        Ok(Transformed::yes(LogicalPlan::Aggregate(new_agg)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::dedup::fixtures::batch;

    #[test]
    fn series_ends_span_batches() {
        let sorted = sort_dedup(&batch(&[
            ("a", 1, Some(1.0), None, 1),
            ("a", 2, Some(2.0), None, 2),
            ("b", 1, Some(3.0), None, 3),
            ("c", 5, Some(4.0), None, 4),
            ("c", 6, Some(5.0), None, 5),
        ]))
        .unwrap();
        let last = last_per_series(&sorted).unwrap();
        let t = last.column_by_name("time").unwrap();
        let t = t
            .as_any()
            .downcast_ref::<arrow::array::TimestampNanosecondArray>()
            .unwrap();
        assert_eq!(t.values(), &[2, 1, 6]);
        // The same stream in pieces: the end of "a" falls on a batch boundary.
        let mut ends = SeriesEnds::new();
        for (start, len) in [(0, 2), (2, 2), (4, 1)] {
            let part = sorted.slice(start, len);
            ends.push(&tag_columns(&part), len).unwrap();
        }
        assert_eq!(ends.finish(), vec![1, 2, 4]);
    }
}
