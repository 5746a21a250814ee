//! One Historian table as DataFusion sees it: the write buffer and the Parquet files of one
//! snapshot, deduplicated where they may overlap, with the retention horizon applied.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, Mutex};

use arrow::array::RecordBatch;
use arrow::compute::SortOptions;
use arrow::datatypes::{Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::config::TableParquetOptions;
use datafusion::common::{DFSchema, DataFusionError, Result, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::parquet::ParquetRowSelection;
use datafusion::datasource::physical_plan::parquet::{
    CachedParquetFileReaderFactory, ParquetFileReaderFactory,
};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::{conjunction, split_conjunction};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown, col, lit};
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::expressions::Column;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::union::UnionExec;
use futures::future::BoxFuture;
use parquet::arrow::arrow_reader::{ArrowReaderOptions, RowSelection};
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData};
use store::dedup::{align, filter_time};
use store::{ColumnType, FileMeta, SEQ_COLUMN, TIME_COLUMN, TableSnapshot};

use crate::dedup::DedupExec;

/// The closed time range `[start, end]` (ns) a query's filters allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    /// Earliest time a row may have.
    pub start: i64,
    /// Latest time a row may have.
    pub end: i64,
}

impl TimeRange {
    /// Every time.
    pub const ALL: TimeRange = TimeRange {
        start: i64::MIN,
        end: i64::MAX,
    };

    fn overlaps(&self, min: i64, max: i64) -> bool {
        min <= self.end && max >= self.start
    }

    /// The range allowed by a conjunction of filters: plain comparisons of `time` with
    /// timestamp literals narrow it, everything else leaves it alone.
    pub fn from_filters(filters: &[Expr]) -> TimeRange {
        TimeRange::from_filters_with(filters, |e| match e {
            Expr::Literal(v, _) => timestamp_ns(v),
            _ => None,
        })
    }

    /// Like [`TimeRange::from_filters`], with `value` telling the time (ns) an operand
    /// stands for, if any.
    pub fn from_filters_with(filters: &[Expr], value: impl Fn(&Expr) -> Option<i64>) -> TimeRange {
        let is_time = |e: &Expr| matches!(e, Expr::Column(c) if c.name == TIME_COLUMN);
        let mut range = TimeRange::ALL;
        for expr in filters.iter().flat_map(|f| split_conjunction(f)) {
            match expr {
                Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                    let (op, t) = if is_time(left) {
                        (Some(*op), value(right))
                    } else if is_time(right) {
                        (op.swap(), value(left))
                    } else {
                        continue;
                    };
                    let (Some(op), Some(t)) = (op, t) else {
                        continue;
                    };
                    match op {
                        Operator::Gt => range.start = range.start.max(t.saturating_add(1)),
                        Operator::GtEq => range.start = range.start.max(t),
                        Operator::Lt => range.end = range.end.min(t.saturating_sub(1)),
                        Operator::LtEq => range.end = range.end.min(t),
                        Operator::Eq => {
                            range.start = range.start.max(t);
                            range.end = range.end.min(t);
                        }
                        _ => {}
                    }
                }
                Expr::Between(b) if !b.negated && is_time(&b.expr) => {
                    if let Some(t) = value(&b.low) {
                        range.start = range.start.max(t);
                    }
                    if let Some(t) = value(&b.high) {
                        range.end = range.end.min(t);
                    }
                }
                _ => {}
            }
        }
        range
    }
}

/// A timestamp literal in nanoseconds.
fn timestamp_ns(value: &ScalarValue) -> Option<i64> {
    match value {
        ScalarValue::TimestampNanosecond(Some(v), _) => Some(*v),
        ScalarValue::TimestampMicrosecond(Some(v), _) => v.checked_mul(1_000),
        ScalarValue::TimestampMillisecond(Some(v), _) => v.checked_mul(1_000_000),
        ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1_000_000_000),
        _ => None,
    }
}

/// A table of one snapshot.
#[derive(Debug, Clone)]
pub struct LakeTable {
    snapshot: TableSnapshot,
    /// Columns plus `_seq`, as stored.
    stored: SchemaRef,
    /// Columns as users see them.
    schema: SchemaRef,
    lake_url: ObjectStoreUrl,
    /// Rows before this time (ns) are past the table's TTL.
    horizon: i64,
}

impl LakeTable {
    /// The table of `snapshot`, whose files are read from the store registered as
    /// `lake_url`, as seen at `now_ns`.
    pub fn new(snapshot: TableSnapshot, lake_url: ObjectStoreUrl, now_ns: i64) -> Self {
        let stored = snapshot.schema.arrow_schema();
        let user_fields: Vec<_> = stored
            .fields()
            .iter()
            .filter(|f| f.name() != SEQ_COLUMN)
            .cloned()
            .collect();
        let horizon = snapshot.options.horizon(now_ns);
        LakeTable {
            snapshot,
            schema: Arc::new(Schema::new(user_fields)),
            stored,
            lake_url,
            horizon,
        }
    }

    /// The snapshot the table reads.
    pub fn snapshot(&self) -> &TableSnapshot {
        &self.snapshot
    }

    /// Whether some file has rows hidden by a deletion vector.
    pub fn has_deletion_vectors(&self) -> bool {
        self.snapshot
            .manifest
            .as_ref()
            .is_some_and(|m| m.files.iter().any(|f| f.deletes.is_some()))
    }

    /// Rows before this time (ns) are past the TTL.
    pub fn horizon(&self) -> i64 {
        self.horizon
    }

    /// The object store URL the files are read from.
    pub fn lake_url(&self) -> &ObjectStoreUrl {
        &self.lake_url
    }

    fn index(&self, name: &str) -> usize {
        self.stored
            .index_of(name)
            .expect("stored schemas always have time and _seq")
    }

    /// Stored indices of the series key (tags, time) and `_seq`.
    fn key_and_seq(&self) -> Vec<usize> {
        let mut key: Vec<usize> = self
            .snapshot
            .schema
            .columns
            .iter()
            .filter(|c| c.column_type == ColumnType::Tag)
            .map(|c| self.index(&c.name))
            .collect();
        key.push(self.index(TIME_COLUMN));
        key.push(self.index(SEQ_COLUMN));
        key
    }

    /// The sort order of files and of the deduplicated buffer, over `schema`.
    fn sort_order(&self, schema: &SchemaRef) -> Result<LexOrdering> {
        let options = SortOptions {
            descending: false,
            nulls_first: true,
        };
        let exprs = self.key_and_seq().into_iter().map(|i| {
            let name = self.stored.field(i).name();
            let at = schema.index_of(name)?;
            Ok(PhysicalSortExpr::new(
                Arc::new(Column::new(name, at)),
                options,
            ))
        });
        let exprs: Vec<PhysicalSortExpr> = exprs.collect::<Result<_>>()?;
        LexOrdering::new(exprs)
            .ok_or_else(|| datafusion::error::DataFusionError::Internal("empty sort order".into()))
    }

    /// Filters usable below deduplication: on key columns only, since a newer version of a
    /// row may differ in its fields.
    fn is_key_filter(&self, expr: &Expr) -> bool {
        let tags: BTreeSet<&str> = self.snapshot.schema.tags().collect();
        expr.column_refs()
            .iter()
            .all(|c| c.name == TIME_COLUMN || tags.contains(c.name.as_str()))
    }

    /// The rows each file with a deletion vector keeps, by file path. Vectors are
    /// immutable objects, so each is read once per process.
    async fn kept_rows<'a>(
        &self,
        state: &dyn Session,
        files: impl Iterator<Item = &'a FileMeta>,
    ) -> Result<HashMap<String, RowSelection>> {
        static KEPT: LazyLock<Mutex<HashMap<String, RowSelection>>> =
            LazyLock::new(|| Mutex::new(HashMap::new()));
        /// Vectors remembered at most; past it the memory starts over.
        const REMEMBERED: usize = 4096;
        let mut out = HashMap::new();
        for f in files {
            let Some(d) = &f.deletes else { continue };
            let known = KEPT.lock().ok().and_then(|k| k.get(&d.path).cloned());
            let selection = match known {
                Some(s) => s,
                None => {
                    let store = state.runtime_env().object_store(&self.lake_url)?;
                    let Some(s) = store::deletes::kept_rows(store.as_ref(), f)
                        .await
                        .map_err(|e| DataFusionError::External(Box::new(e)))?
                    else {
                        continue;
                    };
                    if let Ok(mut k) = KEPT.lock() {
                        if k.len() >= REMEMBERED {
                            k.clear();
                        }
                        k.insert(d.path.clone(), s.clone());
                    }
                    s
                }
            };
            out.insert(f.path.clone(), selection);
        }
        Ok(out)
    }

    fn parquet_scan(
        &self,
        state: &dyn Session,
        files: &[&FileMeta],
        kept: &HashMap<String, RowSelection>,
        projection: &[usize],
        predicate: Option<Expr>,
        sorted: bool,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // Footers and page indexes are parsed once per file and kept in the engine's
        // metadata cache: lake files are immutable (a rewrite gets a new name), and without
        // the cache every query re-reads and decodes them for every file it touches.
        let store = state.runtime_env().object_store(&self.lake_url)?;
        let metadata_cache = state.runtime_env().cache_manager.get_file_metadata_cache();
        let mut source = ParquetSource::new(self.stored.clone())
            .with_table_parquet_options(TableParquetOptions {
                global: state.config_options().execution.parquet.clone(),
                ..TableParquetOptions::default()
            })
            .with_parquet_file_reader_factory(Arc::new(PageIndexedReaderFactory(
                CachedParquetFileReaderFactory::new(store, metadata_cache),
            )))
            .with_enable_page_index(true);
        if let Some(p) = predicate {
            let df_schema = DFSchema::try_from(self.stored.clone())?;
            source = source.with_predicate(state.create_physical_expr(p, &df_schema)?);
        }
        // A deletion vector's hidden rows are never read.
        let file = |f: &&FileMeta| match kept.get(&f.path) {
            Some(rows) => PartitionedFile::new(f.path.clone(), f.bytes)
                .with_extension(ParquetRowSelection::new(rows.clone())),
            None => PartitionedFile::new(f.path.clone(), f.bytes),
        };
        let groups: Vec<FileGroup> = if sorted {
            files
                .iter()
                .map(|f| FileGroup::new(vec![file(f)]))
                .collect()
        } else {
            vec![FileGroup::new(files.iter().map(file).collect())]
        };
        let mut builder = FileScanConfigBuilder::new(self.lake_url.clone(), Arc::new(source))
            .with_file_groups(groups)
            .with_projection_indices(Some(projection.to_vec()))?;
        if sorted {
            builder = builder.with_output_ordering(vec![self.sort_order(&self.stored)?]);
        }
        Ok(DataSourceExec::from_data_source(builder.build()))
    }
}

/// Projects `input` (whose columns are `from`, stored indices) to `to` (stored indices).
fn project(
    input: Arc<dyn ExecutionPlan>,
    stored: &SchemaRef,
    from: &[usize],
    to: &[usize],
) -> Result<Arc<dyn ExecutionPlan>> {
    if from == to {
        return Ok(input);
    }
    let exprs: Vec<(Arc<dyn datafusion::physical_expr::PhysicalExpr>, String)> = to
        .iter()
        .map(|i| {
            let name = stored.field(*i).name().clone();
            // Every branch of a scan reads a superset of what it yields; a column missing
            // here is a planning bug, reported rather than read from the wrong place.
            let at = from.iter().position(|f| f == i).ok_or_else(|| {
                datafusion::error::DataFusionError::Internal(format!(
                    "column {name} is not among the scanned columns"
                ))
            })?;
            Ok((
                Arc::new(Column::new(&name, at))
                    as Arc<dyn datafusion::physical_expr::PhysicalExpr>,
                name,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(Arc::new(ProjectionExec::try_new(exprs, input)?))
}

fn sorted_union(indices: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let set: BTreeSet<usize> = indices.into_iter().collect();
    set.into_iter().collect()
}

/// The time intervals (closed, disjoint, sorted) covered by two or more of `ranges` (closed
/// `[min, max]` time ranges of files and buffered runs): only rows at those times can have
/// a duplicate in another source. Each run and file is deduplicated in itself.
fn overlap_intervals(ranges: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let mut ranges = ranges.to_vec();
    ranges.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::new();
    // Swept by start: a range meets those before it from its start up to the furthest end
    // among them (or its own end, if sooner).
    let mut reach: Option<i64> = None;
    for (a, b) in ranges {
        if let Some(r) = reach
            && a <= r
        {
            let meet = (a, b.min(r));
            match merged.last_mut() {
                Some(last) if meet.0 <= last.1.saturating_add(1) => last.1 = last.1.max(meet.1),
                _ => merged.push(meet),
            }
        }
        reach = Some(reach.map_or(b, |r| r.max(b)));
    }
    merged
}

/// Those of `intervals` that meet `[min, max]`.
fn meeting(intervals: &[(i64, i64)], min: i64, max: i64) -> Vec<(i64, i64)> {
    intervals
        .iter()
        .copied()
        .filter(|(a, b)| *a <= max && *b >= min)
        .collect()
}

/// Whether one of `intervals` holds all of `[min, max]`.
fn covers(intervals: &[(i64, i64)], min: i64, max: i64) -> bool {
    intervals.iter().any(|(a, b)| *a <= min && max <= *b)
}

/// Smallest and largest time of a buffered run; None if it has no rows.
fn run_bounds(run: &RecordBatch) -> Option<(i64, i64)> {
    let t = run
        .column_by_name(TIME_COLUMN)?
        .as_any()
        .downcast_ref::<arrow::array::TimestampNanosecondArray>()?;
    Some((arrow::compute::min(t)?, arrow::compute::max(t)?))
}

/// `time` within any of the intervals.
fn intervals_expr(intervals: &[(i64, i64)]) -> Expr {
    let ts = |v: i64| lit(ScalarValue::TimestampNanosecond(Some(v), None));
    intervals
        .iter()
        .map(|(a, b)| col(TIME_COLUMN).between(ts(*a), ts(*b)))
        .reduce(Expr::or)
        .unwrap_or(lit(false))
}

/// Applies `predicate` to every row of `input` (columns `cols`, stored indices).
fn exact_filter(
    state: &dyn Session,
    input: Arc<dyn ExecutionPlan>,
    stored: &SchemaRef,
    cols: &[usize],
    predicate: Expr,
) -> Result<Arc<dyn ExecutionPlan>> {
    let df_schema = DFSchema::try_from(Arc::new(stored.project(cols)?))?;
    let predicate = state.create_physical_expr(predicate, &df_schema)?;
    Ok(Arc::new(FilterExec::try_new(predicate, input)?))
}

#[async_trait]
impl TableProvider for LakeTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Filters only prune files, row groups and pages; DataFusion still applies them.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let user: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let time_idx = self.index(TIME_COLUMN);
        let mut range = TimeRange::from_filters(filters);
        range.start = range.start.max(self.horizon);
        let apply_horizon = self.horizon != i64::MIN;
        // What every branch yields: the user's columns, plus time for the horizon filter.
        let inner = if apply_horizon {
            sorted_union(user.iter().copied().chain([time_idx]))
        } else {
            user.clone()
        };
        let with_keys = sorted_union(inner.iter().copied().chain(self.key_and_seq()));
        let horizon_expr = lit(ScalarValue::TimestampNanosecond(Some(self.horizon), None));
        let all_filters = conjunction(
            filters
                .iter()
                .cloned()
                .chain(apply_horizon.then(|| col(TIME_COLUMN).gt_eq(horizon_expr.clone()))),
        );
        let key_filters = conjunction(
            filters
                .iter()
                .flat_map(|f| split_conjunction(f))
                .filter(|f| self.is_key_filter(f))
                .cloned()
                .chain(apply_horizon.then(|| col(TIME_COLUMN).gt_eq(horizon_expr.clone()))),
        );

        // Files and buffered rows per partition, within the time range.
        let mut files: BTreeMap<&str, Vec<&FileMeta>> = BTreeMap::new();
        if let Some(m) = &self.snapshot.manifest {
            for f in &m.files {
                if range.overlaps(f.min_time, f.max_time) {
                    files.entry(f.partition.as_str()).or_default().push(f);
                }
            }
        }
        let kept = self
            .kept_rows(state, files.values().flatten().copied())
            .await?;
        let with_keys_schema = Arc::new(self.stored.project(&with_keys)?);
        // The buffer's batches are sorted, deduplicated runs (see `ingest::buffer`).
        let mut buffered: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
        for (partition, batches) in &self.snapshot.buffered {
            if !range.overlaps(partition.start, partition.end - 1) {
                continue;
            }
            let mut runs = Vec::new();
            for b in batches {
                let run = filter_time(&align(b, &with_keys_schema)?, range.start, range.end)?;
                if run.num_rows() > 0 {
                    runs.push(run);
                }
            }
            if !runs.is_empty() {
                buffered.insert(partition.dir(), runs);
            }
        }

        let mut plain_files: Vec<&FileMeta> = Vec::new();
        let mut branches: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        let partitions: BTreeSet<&str> = files
            .keys()
            .copied()
            .chain(buffered.keys().map(String::as_str))
            .collect();
        let with_time = sorted_union(inner.iter().copied().chain([time_idx]));
        // Where columns of `cols` (stored indices) sit among the buffered runs' `with_keys`.
        let within_keys = |cols: &[usize]| -> Vec<usize> {
            cols.iter()
                .filter_map(|c| with_keys.iter().position(|k| k == c))
                .collect()
        };
        let order = self.sort_order(&with_keys_schema)?;
        let sorted_run = |run: &RecordBatch| -> Result<Arc<dyn ExecutionPlan>> {
            let source =
                MemorySourceConfig::try_new(&[vec![run.clone()]], with_keys_schema.clone(), None)?
                    .try_with_sort_information(vec![order.clone()])?;
            Ok(DataSourceExec::from_data_source(source))
        };
        // Buffered runs that no other source meets in time: read as they are.
        let mut plain_runs: Vec<RecordBatch> = Vec::new();
        for partition in partitions {
            let part_files = files.get(partition).cloned().unwrap_or_default();
            let runs: Vec<(&RecordBatch, (i64, i64))> = buffered
                .get(partition)
                .into_iter()
                .flatten()
                .filter_map(|r| Some((r, run_bounds(r)?)))
                .collect();
            // Only rows at times where two sources meet can be duplicates: those go
            // through the merge, the rest of each file and run is read as it is. Runs are
            // taken one by one: a run of one group commit meets few others, and merging
            // the buffer's whole time range put nearly every buffered row through the
            // single-threaded merge while ingest runs.
            let ranges: Vec<(i64, i64)> = part_files
                .iter()
                .map(|f| (f.min_time, f.max_time))
                .chain(runs.iter().map(|(_, bounds)| *bounds))
                .collect();
            let overlaps = overlap_intervals(&ranges);
            if overlaps.is_empty() {
                plain_files.extend(part_files);
                plain_runs.extend(runs.into_iter().map(|(r, _)| r.clone()));
                continue;
            }
            let (merged_files, rest): (Vec<&FileMeta>, Vec<&FileMeta>) =
                part_files.iter().partition(|f| {
                    overlaps
                        .iter()
                        .any(|(a, b)| *a <= f.max_time && *b >= f.min_time)
                });
            plain_files.extend(rest);
            let mut inputs = Vec::new();
            if !merged_files.is_empty() {
                // The predicate is evaluated on every row read: only the intervals these
                // files meet.
                let near: BTreeSet<(i64, i64)> = merged_files
                    .iter()
                    .flat_map(|f| meeting(&overlaps, f.min_time, f.max_time))
                    .collect();
                let near: Vec<(i64, i64)> = near.into_iter().collect();
                let inside = intervals_expr(&near);
                let outside = Expr::Not(Box::new(inside.clone()));
                let partly_outside: Vec<&FileMeta> = merged_files
                    .iter()
                    .copied()
                    .filter(|f| !covers(&near, f.min_time, f.max_time))
                    .collect();
                if !partly_outside.is_empty() {
                    let predicate =
                        conjunction(all_filters.clone().into_iter().chain([outside.clone()]));
                    let scan = self.parquet_scan(
                        state,
                        &partly_outside,
                        &kept,
                        &with_time,
                        predicate,
                        false,
                    )?;
                    let kept = exact_filter(state, scan, &self.stored, &with_time, outside)?;
                    branches.push(project(kept, &self.stored, &with_time, &inner)?);
                }
                let predicate =
                    conjunction(key_filters.clone().into_iter().chain([inside.clone()]));
                let scan =
                    self.parquet_scan(state, &merged_files, &kept, &with_keys, predicate, true)?;
                inputs.push(exact_filter(state, scan, &self.stored, &with_keys, inside)?);
            }
            for (run, (min, max)) in runs {
                let near = meeting(&overlaps, min, max);
                if near.is_empty() {
                    plain_runs.push(run.clone());
                    continue;
                }
                if covers(&near, min, max) {
                    inputs.push(sorted_run(run)?);
                    continue;
                }
                // Split: the rows where another source meets this run are merged, the
                // rest pass by the merge (only the columns the query reads).
                let inside = intervals_expr(&near);
                let rows = sorted_run(run)?;
                inputs.push(exact_filter(
                    state,
                    rows,
                    &self.stored,
                    &with_keys,
                    inside.clone(),
                )?);
                let rest = MemorySourceConfig::try_new(
                    &[vec![run.clone()]],
                    with_keys_schema.clone(),
                    Some(within_keys(&with_time)),
                )?;
                let rest = exact_filter(
                    state,
                    DataSourceExec::from_data_source(rest),
                    &self.stored,
                    &with_time,
                    Expr::Not(Box::new(inside)),
                )?;
                branches.push(project(rest, &self.stored, &with_time, &inner)?);
            }
            if inputs.is_empty() {
                continue;
            }
            let union = UnionExec::try_new(inputs)?;
            let merged = Arc::new(SortPreservingMergeExec::new(order.clone(), union));
            let deduped = Arc::new(DedupExec::new(merged, order.clone()));
            branches.push(project(deduped, &self.stored, &with_keys, &inner)?);
        }
        if !plain_runs.is_empty() {
            // Whole runs spread over the query's partitions, the largest first onto the
            // partition with the fewest rows.
            let n = state
                .config()
                .target_partitions()
                .clamp(1, plain_runs.len());
            plain_runs.sort_by_key(|r| std::cmp::Reverse(r.num_rows()));
            let mut parts: Vec<(usize, Vec<RecordBatch>)> = vec![(0, Vec::new()); n];
            for run in plain_runs {
                if let Some(part) = parts.iter_mut().min_by_key(|(rows, _)| *rows) {
                    part.0 += run.num_rows();
                    part.1.push(run);
                }
            }
            let parts: Vec<Vec<RecordBatch>> = parts.into_iter().map(|(_, p)| p).collect();
            let source = MemorySourceConfig::try_new(
                &parts,
                with_keys_schema.clone(),
                Some(within_keys(&inner)),
            )?;
            branches.push(DataSourceExec::from_data_source(source));
        }
        if !plain_files.is_empty() {
            branches.push(self.parquet_scan(
                state,
                &plain_files,
                &kept,
                &inner,
                all_filters,
                false,
            )?);
        }
        let inner_schema = Arc::new(self.stored.project(&inner)?);
        let mut plan: Arc<dyn ExecutionPlan> = match branches.len() {
            0 => Arc::new(EmptyExec::new(inner_schema.clone())),
            _ => UnionExec::try_new(branches)?,
        };
        if apply_horizon {
            let df_schema = DFSchema::try_from(inner_schema.clone())?;
            let predicate =
                state.create_physical_expr(col(TIME_COLUMN).gt_eq(horizon_expr), &df_schema)?;
            plan = Arc::new(FilterExec::try_new(predicate, plan)?);
        }
        project(plan, &self.stored, &inner, &user)
    }
}

/// Lake files' readers, whose metadata always comes with the page index.
///
/// DataFusion's opener asks for the footer alone, prunes row groups, and then loads the
/// page index through the reader, decoding it again on every query: the metadata cache
/// kept only the footer. Asking for the page index up front makes the cache keep it, so
/// a query over a file it has seen decodes no index (a few milliseconds per file, the
/// bulk of a one-host query's fixed cost).
#[derive(Debug)]
struct PageIndexedReaderFactory(CachedParquetFileReaderFactory);

impl ParquetFileReaderFactory for PageIndexedReaderFactory {
    fn create_reader(
        &self,
        partition_index: usize,
        partitioned_file: PartitionedFile,
        metadata_size_hint: Option<usize>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> Result<Box<dyn AsyncFileReader + Send>> {
        let inner = self.0.create_reader(
            partition_index,
            partitioned_file,
            metadata_size_hint,
            metrics,
        )?;
        Ok(Box::new(PageIndexedReader(inner)))
    }
}

/// See [`PageIndexedReaderFactory`].
struct PageIndexedReader(Box<dyn AsyncFileReader + Send>);

impl AsyncFileReader for PageIndexedReader {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'_, parquet::errors::Result<bytes::Bytes>> {
        self.0.get_bytes(range)
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<bytes::Bytes>>> {
        self.0.get_byte_ranges(ranges)
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        let options = options
            .cloned()
            .unwrap_or_default()
            .with_page_index_policy(PageIndexPolicy::Optional);
        Box::pin(async move { self.0.get_metadata(Some(&options)).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::col;

    fn ts(v: i64) -> Expr {
        lit(ScalarValue::TimestampNanosecond(Some(v), None))
    }

    #[test]
    fn time_range_comes_from_plain_comparisons_of_time() {
        let filters = vec![
            col("time").gt_eq(ts(100)),
            ts(200).gt(col("time")).and(col("host").eq(lit("a"))),
            col("usage").gt(lit(5.0)),
        ];
        assert_eq!(
            TimeRange::from_filters(&filters),
            TimeRange {
                start: 100,
                end: 199
            }
        );
        let between = vec![col("time").between(ts(5), ts(9))];
        assert_eq!(
            TimeRange::from_filters(&between),
            TimeRange { start: 5, end: 9 }
        );
        // An OR says nothing about the range.
        let or = vec![col("time").gt(ts(5)).or(col("time").lt(ts(1)))];
        assert_eq!(TimeRange::from_filters(&or), TimeRange::ALL);
    }

    #[test]
    fn only_where_sources_meet_is_merged() {
        let (a, b, c) = ((0, 10), (10, 20), (30, 40));
        assert_eq!(overlap_intervals(&[a, c]), vec![]);
        assert_eq!(overlap_intervals(&[a, b, c]), vec![(10, 10)]);
        // Buffered runs count one by one: two that do not meet add nothing.
        assert_eq!(
            overlap_intervals(&[a, b, c, (21, 25), (26, 29)]),
            vec![(10, 10)]
        );
        assert_eq!(
            overlap_intervals(&[a, b, c, (18, 25), (24, 31)]),
            vec![(10, 10), (18, 20), (24, 25), (30, 31)]
        );
        // A range inside another, in any order; meetings that touch become one.
        assert_eq!(overlap_intervals(&[(5, 31), a, c]), vec![(5, 10), (30, 31)]);
        assert_eq!(overlap_intervals(&[(0, 100), (1, 2), (3, 4)]), vec![(1, 4)]);
        assert_eq!(overlap_intervals(&[(7, 7), (7, 7)]), vec![(7, 7)]);
        assert_eq!(meeting(&[(1, 4), (8, 9)], 4, 7), vec![(1, 4)]);
    }

    /// A table of buffered runs only (the rows of `store::dedup::fixtures`).
    fn buffered_table(runs: &[&[store::dedup::fixtures::Row<'_>]]) -> LakeTable {
        let mut schema = store::TableSchema::new();
        schema.add_column("host", ColumnType::Tag);
        schema.add_column("a", ColumnType::Float);
        schema.add_column("b", ColumnType::Float);
        let runs = runs
            .iter()
            .map(|r| store::dedup::sort_dedup(&store::dedup::fixtures::batch(r)).unwrap())
            .collect();
        let snapshot = TableSnapshot {
            db: "db".into(),
            table: "m".into(),
            schema,
            options: store::TableOptions::default(),
            buffered: vec![(store::PartitionGranularity::Day.partition_of(0), runs)],
            manifest: None,
        };
        LakeTable::new(
            snapshot,
            ObjectStoreUrl::parse("historian://lake/").unwrap(),
            0,
        )
    }

    #[tokio::test]
    async fn buffered_runs_merge_only_where_they_meet() {
        // The first two runs meet at 20 (a resend of a@20 with a new `a`); the third meets
        // neither.
        let table = buffered_table(&[
            &[
                ("a", 10, Some(1.0), None, 1),
                ("b", 20, Some(2.0), None, 2),
                ("a", 20, Some(3.0), Some(30.0), 3),
            ],
            &[("a", 20, Some(4.0), None, 4), ("a", 25, Some(5.0), None, 5)],
            &[("a", 40, Some(6.0), None, 6), ("b", 50, Some(7.0), None, 7)],
        ]);
        let ctx = datafusion::prelude::SessionContext::new();
        ctx.register_table("m", Arc::new(table)).unwrap();
        let df = ctx
            .sql("SELECT host, CAST(time AS BIGINT) AS t, a, b FROM m ORDER BY host, t")
            .await
            .unwrap();
        let plan = df.create_physical_plan().await.unwrap();
        let batches = datafusion::physical_plan::collect(plan.clone(), ctx.task_ctx())
            .await
            .unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        let expected = [
            "+------+----+-----+------+",
            "| host | t  | a   | b    |",
            "+------+----+-----+------+",
            "| a    | 10 | 1.0 |      |",
            "| a    | 20 | 4.0 | 30.0 |",
            "| a    | 25 | 5.0 |      |",
            "| a    | 40 | 6.0 |      |",
            "| b    | 20 | 2.0 |      |",
            "| b    | 50 | 7.0 |      |",
            "+------+----+-----+------+",
        ]
        .join("\n");
        assert_eq!(text, expected);
        // Only the three rows at 20 went through the merge below the dedup.
        fn merged_rows(plan: &Arc<dyn ExecutionPlan>) -> Vec<usize> {
            let mut out = Vec::new();
            if plan.name() == "DedupExec" {
                let input = &plan.children()[0];
                out.push(input.metrics().and_then(|m| m.output_rows()).unwrap_or(0));
            }
            for c in plan.children() {
                out.extend(merged_rows(c));
            }
            out
        }
        assert_eq!(merged_rows(&plan), vec![3]);
        // No column read at all, and a filter that leaves the merged time out.
        for (sql, n) in [
            ("SELECT count(*) AS n FROM m", 6),
            // The older a@20 (3.0) must not count.
            ("SELECT count(*) AS n FROM m WHERE a < 3.5", 2),
            ("SELECT count(*) AS n FROM m WHERE host = 'b'", 2),
        ] {
            let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
            let count = batches[0]
                .column(0)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .unwrap()
                .value(0);
            assert_eq!(count, n, "{sql}");
        }
    }

    /// Every time covered by two or more ranges, and only those, lies in the intervals.
    #[test]
    fn overlap_intervals_agree_with_counting() {
        let mut seed = 0x9e37_79b9_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n) as i64
        };
        for _ in 0..500 {
            let ranges: Vec<(i64, i64)> = (0..next(8))
                .map(|_| {
                    let a = next(60);
                    (a, a + next(15))
                })
                .collect();
            let intervals = overlap_intervals(&ranges);
            assert!(
                intervals.windows(2).all(|w| w[0].1 + 1 < w[1].0),
                "{intervals:?}"
            );
            for t in -1..80 {
                let covering = ranges.iter().filter(|(a, b)| *a <= t && t <= *b).count();
                let inside = intervals.iter().any(|(a, b)| *a <= t && t <= *b);
                assert_eq!(inside, covering >= 2, "t={t} {ranges:?} -> {intervals:?}");
            }
        }
    }
}

#[cfg(test)]
mod page_index_tests {
    use super::*;
    use arrow::array::Int64Array;
    use datafusion::execution::cache::cache_manager::{CacheManager, CacheManagerConfig};
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{ObjectStore, ObjectStoreExt};

    /// A file of a few pages, written with its page index, in an in-memory store.
    async fn lake_file() -> (Arc<dyn ObjectStore>, PartitionedFile) {
        let schema = Arc::new(Schema::new(vec![arrow::datatypes::Field::new(
            "v",
            arrow::datatypes::DataType::Int64,
            false,
        )]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(0..10_000))],
        )
        .unwrap();
        let props = parquet::file::properties::WriterProperties::builder()
            .set_data_page_row_count_limit(1000)
            .build();
        let mut bytes = Vec::new();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(&mut bytes, schema, Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let size = bytes.len() as u64;
        store
            .put(&Path::from("f.parquet"), bytes.into())
            .await
            .unwrap();
        (store, PartitionedFile::new("f.parquet", size))
    }

    #[tokio::test]
    async fn the_metadata_cache_keeps_the_page_index() {
        let (store, file) = lake_file().await;
        // As DataFusion's opener asks: the footer first, without the page index.
        let footer_only = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Skip);
        let metrics = ExecutionPlanMetricsSet::new();
        let has_index =
            |m: &ParquetMetaData| m.column_index().is_some() && m.offset_index().is_some();
        let cache = || {
            CacheManager::try_new(&CacheManagerConfig::default())
                .unwrap()
                .get_file_metadata_cache()
        };

        let plain = CachedParquetFileReaderFactory::new(store.clone(), cache());
        let mut reader = plain
            .create_reader(0, file.clone(), None, &metrics)
            .unwrap();
        let metadata = reader.get_metadata(Some(&footer_only)).await.unwrap();
        assert!(
            !has_index(&metadata),
            "DataFusion's factory alone leaves the index out"
        );

        let cache = cache();
        let indexed = PageIndexedReaderFactory(CachedParquetFileReaderFactory::new(
            store.clone(),
            cache.clone(),
        ));
        for _ in 0..2 {
            let mut reader = indexed
                .create_reader(0, file.clone(), None, &metrics)
                .unwrap();
            let metadata = reader.get_metadata(Some(&footer_only)).await.unwrap();
            assert!(has_index(&metadata));
        }
        // The cached entry holds it, so later queries decode nothing.
        let again = CachedParquetFileReaderFactory::new(store, cache);
        let mut reader = again.create_reader(0, file, None, &metrics).unwrap();
        let metadata = reader.get_metadata(Some(&footer_only)).await.unwrap();
        assert!(has_index(&metadata), "the cache kept the page index");
    }
}
