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

/// The time intervals (closed, disjoint, sorted) where rows of a partition may have
/// duplicates: where two files' ranges meet, and all of the buffered rows' range (its runs
/// overlap each other).
fn overlap_intervals(files: &[&FileMeta], buffer: Option<(i64, i64)>) -> Vec<(i64, i64)> {
    let mut ranges: Vec<(i64, i64)> = files.iter().map(|f| (f.min_time, f.max_time)).collect();
    let mut meets: Vec<(i64, i64)> = Vec::new();
    if let Some(b) = buffer {
        meets.push(b);
        ranges.push(b);
    }
    for i in 0..ranges.len() {
        for j in i + 1..ranges.len() {
            let (a, b) = (ranges[i].0.max(ranges[j].0), ranges[i].1.min(ranges[j].1));
            if a <= b {
                meets.push((a, b));
            }
        }
    }
    meets.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::new();
    for (a, b) in meets {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// Smallest and largest time of buffered runs.
fn time_bounds(runs: &[RecordBatch]) -> (i64, i64) {
    let mut bounds = (i64::MAX, i64::MIN);
    for run in runs {
        if let Some(t) = run.column_by_name(TIME_COLUMN).and_then(|c| {
            c.as_any()
                .downcast_ref::<arrow::array::TimestampNanosecondArray>()
        }) {
            if let Some(min) = arrow::compute::min(t) {
                bounds.0 = bounds.0.min(min);
            }
            if let Some(max) = arrow::compute::max(t) {
                bounds.1 = bounds.1.max(max);
            }
        }
    }
    bounds
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
        for partition in partitions {
            let part_files = files.get(partition).cloned().unwrap_or_default();
            let buffer = buffered.get(partition);
            // Only rows at times where two sources meet can be duplicates: those go
            // through the merge, the rest of each file is read as it is.
            let overlaps = overlap_intervals(&part_files, buffer.map(|runs| time_bounds(runs)));
            if overlaps.is_empty() {
                plain_files.extend(part_files);
                continue;
            }
            let inside = intervals_expr(&overlaps);
            let outside = Expr::Not(Box::new(inside.clone()));
            let (merged_files, rest): (Vec<&FileMeta>, Vec<&FileMeta>) =
                part_files.iter().partition(|f| {
                    overlaps
                        .iter()
                        .any(|(a, b)| f.min_time <= *b && f.max_time >= *a)
                });
            plain_files.extend(rest);
            let partly_outside: Vec<&FileMeta> = merged_files
                .iter()
                .copied()
                .filter(|f| {
                    !overlaps
                        .iter()
                        .any(|(a, b)| *a <= f.min_time && f.max_time <= *b)
                })
                .collect();
            if !partly_outside.is_empty() {
                let predicate =
                    conjunction(all_filters.clone().into_iter().chain([outside.clone()]));
                let scan =
                    self.parquet_scan(state, &partly_outside, &kept, &with_time, predicate, false)?;
                let kept = exact_filter(state, scan, &self.stored, &with_time, outside)?;
                branches.push(project(kept, &self.stored, &with_time, &inner)?);
            }
            // Overlapping files and buffered runs, within the overlaps: merge by key, dedup.
            let order = self.sort_order(&with_keys_schema)?;
            let mut inputs = Vec::new();
            if !merged_files.is_empty() {
                let predicate =
                    conjunction(key_filters.clone().into_iter().chain([inside.clone()]));
                let scan =
                    self.parquet_scan(state, &merged_files, &kept, &with_keys, predicate, true)?;
                inputs.push(exact_filter(state, scan, &self.stored, &with_keys, inside)?);
            }
            if let Some(runs) = buffer {
                let partitions: Vec<Vec<RecordBatch>> =
                    runs.iter().map(|r| vec![r.clone()]).collect();
                let source =
                    MemorySourceConfig::try_new(&partitions, with_keys_schema.clone(), None)?
                        .try_with_sort_information(vec![order.clone()])?;
                inputs.push(DataSourceExec::from_data_source(source));
            }
            let union = UnionExec::try_new(inputs)?;
            let merged = Arc::new(SortPreservingMergeExec::new(order.clone(), union));
            let deduped = Arc::new(DedupExec::new(merged, order));
            branches.push(project(deduped, &self.stored, &with_keys, &inner)?);
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

    fn file(min_time: i64, max_time: i64) -> FileMeta {
        FileMeta {
            path: String::new(),
            partition: String::new(),
            rows: 1,
            bytes: 1,
            min_time,
            max_time,
            min_seq: 0,
            max_seq: 0,
            schema_version: 1,
            compacted: false,
            key_ids: None,
            deletes: None,
        }
    }

    #[test]
    fn only_where_sources_meet_is_merged() {
        let (a, b, c) = (file(0, 10), file(10, 20), file(30, 40));
        assert_eq!(overlap_intervals(&[&a, &c], None), vec![]);
        assert_eq!(overlap_intervals(&[&a, &b, &c], None), vec![(10, 10)]);
        // The buffer's whole range, and where it meets a file.
        assert_eq!(
            overlap_intervals(&[&a, &b, &c], Some((18, 25))),
            vec![(10, 10), (18, 25)]
        );
        assert_eq!(overlap_intervals(&[&a, &c], Some((5, 31))), vec![(5, 31)]);
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
