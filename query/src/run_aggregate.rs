//! Partial aggregation over runs of equal group keys.
//!
//! Lake files are sorted by series key and time, so a scan yields each series' rows
//! together and in time order. Grouped by tags and a time bucket (`GROUP BY date_bin(..),
//! hostname`), consecutive rows share their group for long runs: 360 rows per host and hour
//! at a 10 s interval. DataFusion's partial aggregate hashes the keys of every row anyway;
//! over 4.3 M rows that cost as much as the scan itself.
//!
//! [`RunAggregation`] replaces such a partial `AggregateExec` with [`RunAggregateExec`],
//! which finds where the keys change (comparing a tag's dictionary keys rather than its
//! strings), hashes only the first row of each run into DataFusion's own group values, and
//! feeds DataFusion's own groups accumulators. Its output is the same partial state, so the
//! final aggregate above it is unchanged. Rows in no particular order only make runs of one
//! row: the work is then the same hashing as before, plus one comparison per row.

use std::fmt;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, RecordBatch, UInt32Array,
    UInt64Array,
};
use arrow::buffer::BooleanBuffer;
use arrow::compute::kernels::cmp::distinct;
use arrow::compute::{take, take_record_batch};
use arrow::datatypes::{DataType, Float64Type, Schema, SchemaRef, TimestampNanosecondType};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::config::ConfigOptions;
use datafusion::execution::TaskContext;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::expressions::{CastExpr, Column, Literal};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr, ScalarFunctionExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, InputOrderMode,
    Partitioning, PlanProperties, SendableRecordBatchStream,
};
use futures::StreamExt;

/// Groups kept before the partial state is handed on, bounding the exec's memory like
/// DataFusion's partial aggregate does under memory pressure.
const MAX_GROUPS: usize = 1 << 16;

/// Replaces partial hash aggregates that DataFusion's groups accumulators can compute
/// with [`RunAggregateExec`].
#[derive(Debug, Default)]
pub struct RunAggregation;

impl PhysicalOptimizerRule for RunAggregation {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(agg) = node.downcast_ref::<AggregateExec>() else {
                return Ok(Transformed::no(node));
            };
            match RunAggregateExec::try_from_aggregate(agg)? {
                Some(exec) => Ok(Transformed::yes(Arc::new(exec) as Arc<dyn ExecutionPlan>)),
                None => Ok(Transformed::no(node)),
            }
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "historian_run_aggregation"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// A partial aggregate that hashes one row per run of equal group keys. Same output
/// schema and partitioning as the `AggregateExec` it replaces; no output order.
#[derive(Debug, Clone)]
pub struct RunAggregateExec {
    input: Arc<dyn ExecutionPlan>,
    group_by: Vec<(Arc<dyn PhysicalExpr>, String)>,
    aggregates: Vec<Arc<AggregateFunctionExpr>>,
    filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    folds: Vec<Option<RunFold>>,
    bins: Vec<Option<FixedBins>>,
    /// Schema of the group keys, for DataFusion's group values.
    group_schema: SchemaRef,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

/// The exec's properties: no output order; partial state at the end, and earlier when
/// groups or memory run out.
fn plan_properties(
    schema: &SchemaRef,
    partitioning: Partitioning,
    boundedness: Boundedness,
) -> Arc<PlanProperties> {
    Arc::new(PlanProperties::new(
        EquivalenceProperties::new(schema.clone()),
        partitioning,
        EmissionType::Both,
        boundedness,
    ))
}

/// Can the run comparison and DataFusion's group values handle keys of this type?
fn comparable(t: &DataType) -> bool {
    t.is_primitive()
        || matches!(
            t,
            DataType::Boolean
                | DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Binary
                | DataType::LargeBinary
                | DataType::BinaryView
        )
        || matches!(t, DataType::Dictionary(k, v) if k.is_integer() && comparable(v))
}

impl RunAggregateExec {
    /// The run aggregate standing in for `agg`, if `agg` is a plain partial hash aggregate
    /// (no grouping sets, limit, ordered input, DISTINCT or ORDER BY in an aggregate) whose
    /// aggregates all have groups accumulators.
    pub fn try_from_aggregate(agg: &AggregateExec) -> Result<Option<Self>> {
        let group_by = agg.group_expr();
        let input_schema = agg.input().schema();
        let plain = *agg.mode() == AggregateMode::Partial
            && group_by.is_single()
            && !group_by.expr().is_empty()
            && agg.limit_options().is_none()
            && *agg.input_order_mode() == InputOrderMode::Linear
            && agg.aggr_expr().iter().all(|a| {
                !a.is_distinct() && a.order_bys().is_empty() && a.groups_accumulator_supported()
            });
        if !plain {
            return Ok(None);
        }
        for (expr, _) in group_by.expr() {
            if !comparable(&expr.data_type(&input_schema)?) {
                return Ok(None);
            }
        }
        let folds = agg
            .aggr_expr()
            .iter()
            .map(|a| RunFold::of(a, &input_schema))
            .collect::<Result<Vec<_>>>()?;
        let schema = agg.schema();
        let properties = plan_properties(
            &schema,
            agg.properties().partitioning.clone(),
            agg.properties().boundedness,
        );
        Ok(Some(RunAggregateExec {
            input: agg.input().clone(),
            group_by: group_by.expr().to_vec(),
            aggregates: agg.aggr_expr().to_vec(),
            filters: agg.filter_expr().to_vec(),
            folds,
            bins: group_by
                .expr()
                .iter()
                .map(|(e, _)| FixedBins::of(e))
                .collect(),
            group_schema: group_by.group_schema(&input_schema)?,
            schema,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        }))
    }
}

impl DisplayAs for RunAggregateExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let keys: Vec<String> = self
            .group_by
            .iter()
            .map(|(e, name)| format!("{e} as {name}"))
            .collect();
        let aggs: Vec<&str> = self.aggregates.iter().map(|a| a.name()).collect();
        write!(
            f,
            "RunAggregateExec: mode=Partial, gby=[{}], aggr=[{}]",
            keys.join(", "),
            aggs.join(", ")
        )
    }
}

impl ExecutionPlan for RunAggregateExec {
    fn name(&self) -> &str {
        "RunAggregateExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        let exprs = self
            .group_by
            .iter()
            .map(|(e, _)| e.clone())
            .chain(self.aggregates.iter().flat_map(|a| a.expressions()))
            .chain(self.filters.iter().flatten().cloned());
        for expr in exprs {
            if f(&expr)? == TreeNodeRecursion::Stop {
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let input = children.swap_remove(0);
        let properties = plan_properties(
            &self.schema,
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count()),
            self.properties.boundedness,
        );
        Ok(Arc::new(RunAggregateExec {
            input,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
            ..RunAggregateExec::clone(&self)
        }))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context.clone())?;
        let accumulators = self
            .aggregates
            .iter()
            .map(|a| a.create_groups_accumulator())
            .collect::<Result<Vec<_>>>()?;
        // Refused memory makes it hand on its state, as DataFusion's partial aggregate does.
        let reservation = MemoryConsumer::new(format!("RunAggregateExec[{partition}]"))
            .with_can_spill(true)
            .register(context.memory_pool());
        let state = RunState {
            group_by: self.group_by.clone(),
            bins: self.bins.clone(),
            folds: self.folds.clone(),
            aggregates: self.aggregates.clone(),
            filters: self.filters.clone(),
            schema: self.schema.clone(),
            group_values: new_group_values(self.group_schema.clone(), &GroupOrdering::None)?,
            accumulators,
            run_groups: Vec::new(),
            row_groups: Vec::new(),
            reservation,
            metrics: BaselineMetrics::new(&self.metrics, partition),
        };
        let schema = self.schema.clone();
        let stream = futures::stream::unfold(Some((input, state)), |running| async move {
            let (mut input, mut state) = running?;
            loop {
                let outcome = match input.next().await {
                    Some(Ok(batch)) => {
                        let elapsed = state.metrics.elapsed_compute().clone();
                        let timer = elapsed.timer();
                        let pushed = state.push(&batch);
                        timer.done();
                        match pushed {
                            Ok(None) => continue,
                            Ok(Some(out)) => Ok(out),
                            Err(e) => Err(e),
                        }
                    }
                    Some(Err(e)) => Err(e),
                    None => {
                        let out = state.emit();
                        state.metrics.done();
                        return match out {
                            Ok(Some(out)) => {
                                state.metrics.record_output(out.num_rows());
                                Some((Ok(out), None))
                            }
                            Ok(None) => None,
                            Err(e) => Some((Err(e), None)),
                        };
                    }
                };
                return match outcome {
                    Ok(out) => {
                        state.metrics.record_output(out.num_rows());
                        Some((Ok(out), Some((input, state))))
                    }
                    Err(e) => Some((Err(e), None)),
                };
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

/// An aggregate whose partial state for a run of rows is computed here, over the run's
/// slice, and merged into DataFusion's accumulator once per run: `count`, and `sum`,
/// `avg`, `min`, `max` of `Float64`. The state arrays have the layout DataFusion's
/// `state_fields` declare; [`RunFold::of`] checks them.
#[derive(Debug, Clone, Copy)]
enum RunFold {
    Count,
    Sum,
    Avg,
    Min,
    Max,
}

impl RunFold {
    fn of(aggregate: &AggregateFunctionExpr, input: &Schema) -> Result<Option<Self>> {
        let args = aggregate.expressions();
        let [arg] = args.as_slice() else {
            return Ok(None);
        };
        let float = arg.data_type(input)? == DataType::Float64;
        let fold = match aggregate.fun().name() {
            "count" => RunFold::Count,
            "sum" if float => RunFold::Sum,
            "avg" if float => RunFold::Avg,
            "min" if float => RunFold::Min,
            "max" if float => RunFold::Max,
            _ => return Ok(None),
        };
        let expected: &[DataType] = match fold {
            RunFold::Count => &[DataType::Int64],
            RunFold::Avg => &[DataType::UInt64, DataType::Float64],
            RunFold::Sum | RunFold::Min | RunFold::Max => &[DataType::Float64],
        };
        let state: Vec<DataType> = aggregate
            .state_fields()?
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        Ok((state == expected).then_some(fold))
    }

    /// The partial state of each run `[start, end)` of `values`; None where this batch must
    /// go row by row.
    fn states(self, values: &dyn Array, runs: &[(usize, usize)]) -> Result<Option<Vec<ArrayRef>>> {
        let non_null = |start: usize, end: usize| match values.logical_nulls() {
            Some(nulls) => end - start - nulls.slice(start, end - start).null_count(),
            None => end - start,
        };
        if let RunFold::Count = self {
            let counts = runs.iter().map(|(s, e)| non_null(*s, *e) as i64);
            return Ok(Some(vec![Arc::new(Int64Array::from_iter_values(counts))]));
        }
        let values = values.as_primitive_opt::<Float64Type>().ok_or_else(|| {
            DataFusionError::Internal(format!("{self:?} of a run expects Float64"))
        })?;
        let nulls = values.nulls();
        let valid = |start: usize, end: usize| {
            values.values()[start..end]
                .iter()
                .enumerate()
                .filter(move |(i, _)| nulls.is_none_or(|n| n.is_valid(start + i)))
                .map(|(_, v)| *v)
        };
        // From 0.0, one value after the other, as DataFusion's sum adds them (a regrouped
        // sum may overflow to NaN where DataFusion's gives infinity). Without nulls a run
        // is a plain slice: no validity check per value (half the time of `valid` here).
        let sums = || -> Float64Array {
            runs.iter()
                .map(|(s, e)| match nulls {
                    None => (s < e).then(|| values.values()[*s..*e].iter().fold(0.0, |a, v| a + v)),
                    Some(_) => {
                        (non_null(*s, *e) > 0).then(|| valid(*s, *e).fold(0.0, |a, v| a + v))
                    }
                })
                .collect()
        };
        // Min and max as DataFusion's accumulators fold them: from f64::MAX (MIN), keeping
        // the first of equal values. That fold treats NaN in an order-dependent way, so a
        // batch with NaN goes row by row, as DataFusion would.
        let extreme = |start: f64, keep: fn(f64, f64) -> bool| -> Option<Float64Array> {
            if valid(0, values.len()).any(f64::is_nan) {
                return None;
            }
            Some(
                runs.iter()
                    .map(|(s, e)| {
                        (non_null(*s, *e) > 0).then(|| {
                            valid(*s, *e).fold(start, |cur, v| if keep(v, cur) { v } else { cur })
                        })
                    })
                    .collect(),
            )
        };
        Ok(match self {
            RunFold::Count => unreachable!("counted above"),
            RunFold::Sum => Some(vec![Arc::new(sums())]),
            RunFold::Avg => {
                // A run without a value has no state at all (null count and sum), as
                // DataFusion's partial average leaves it; a count of 0 would make NaN.
                let counts: UInt64Array = runs
                    .iter()
                    .map(|(s, e)| Some(non_null(*s, *e) as u64).filter(|n| *n > 0))
                    .collect();
                Some(vec![Arc::new(counts), Arc::new(sums())])
            }
            RunFold::Min => {
                extreme(f64::MAX, |v, cur| v < cur).map(|m| vec![Arc::new(m) as ArrayRef])
            }
            RunFold::Max => {
                extreme(f64::MIN, |v, cur| v > cur).map(|m| vec![Arc::new(m) as ArrayRef])
            }
        })
    }
}

/// One partition's groups and accumulators.
struct RunState {
    group_by: Vec<(Arc<dyn PhysicalExpr>, String)>,
    /// Per group key, its bins if it is a `date_bin` of a fixed stride.
    bins: Vec<Option<FixedBins>>,
    /// Per aggregate, how a run folds into its partial state, if it is a common one.
    folds: Vec<Option<RunFold>>,
    aggregates: Vec<Arc<AggregateFunctionExpr>>,
    filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    schema: SchemaRef,
    group_values: Box<dyn GroupValues>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    run_groups: Vec<usize>,
    row_groups: Vec<usize>,
    reservation: MemoryReservation,
    metrics: BaselineMetrics,
}

/// The column under a chain of casts, if it is a dictionary: equal keys mean equal values,
/// so its keys find the runs without decoding (or casting) a value. A change of the inner
/// value may leave the cast value equal; that only splits a run, which stays correct.
fn dictionary_under_casts(expr: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> Option<ArrayRef> {
    let mut expr = expr;
    while let Some(cast) = expr.downcast_ref::<CastExpr>() {
        expr = cast.expr();
    }
    let column = expr.downcast_ref::<Column>()?;
    let array = batch.columns().get(column.index())?;
    let dictionary = array.as_any_dictionary_opt()?;
    Some(dictionary.keys().slice(0, dictionary.keys().len()))
}

/// `date_bin` of a nanosecond timestamp column by a fixed stride: its bins are found by
/// comparing each time with the current bin's bounds, one division per bin instead of
/// DataFusion's checked division per row.
#[derive(Debug, Clone, Copy)]
struct FixedBins {
    column: usize,
    stride: i64,
    origin: i64,
}

impl FixedBins {
    fn of(expr: &Arc<dyn PhysicalExpr>) -> Option<Self> {
        let function = expr.downcast_ref::<ScalarFunctionExpr>()?;
        let args = function.args();
        if function.name() != "date_bin" || !(2..=3).contains(&args.len()) {
            return None;
        }
        const DAY: i64 = 86_400_000_000_000;
        let stride = match args[0].downcast_ref::<Literal>()?.value() {
            ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => i64::from(v.days)
                .checked_mul(DAY)?
                .checked_add(v.nanoseconds)?,
            ScalarValue::IntervalDayTime(Some(v)) => i64::from(v.days)
                .checked_mul(DAY)?
                .checked_add(i64::from(v.milliseconds).checked_mul(1_000_000)?)?,
            _ => return None,
        };
        let column = args[1].downcast_ref::<Column>()?.index();
        let origin = match args.get(2) {
            None => 0,
            Some(origin) => match origin.downcast_ref::<Literal>()?.value() {
                ScalarValue::TimestampNanosecond(Some(v), _) => *v,
                _ => return None,
            },
        };
        (stride > 0).then_some(FixedBins {
            column,
            stride,
            origin,
        })
    }

    /// The start of `time`'s bin, as `date_bin` computes it; None where it overflows.
    fn start(&self, time: i64) -> Option<i64> {
        let diff = time.checked_sub(self.origin)?;
        let mut delta = diff - diff % self.stride;
        if diff < 0 && delta != diff {
            delta = delta.checked_sub(self.stride)?;
        }
        self.origin.checked_add(delta)
    }

    /// Where the bin changes, as [`changes`] would mark it on the evaluated `date_bin`;
    /// a row whose bin overflows is a run of its own. None when the column is not a
    /// timestamp in nanoseconds without nulls.
    fn changes(&self, batch: &RecordBatch) -> Option<BooleanBuffer> {
        let times = batch
            .columns()
            .get(self.column)?
            .as_primitive_opt::<TimestampNanosecondType>()?;
        if times.null_count() > 0 {
            return None;
        }
        let times = times.values();
        // Past origin + i64::MAX, `date_bin` gives NULL (the difference overflows): a bin
        // ends there at the latest.
        let limit = i128::from(self.origin) + i128::from(i64::MAX) + 1;
        let bounds = |time: i64| {
            self.start(time).map(|start| {
                let end = i128::from(start) + i128::from(self.stride);
                (start, end.min(limit))
            })
        };
        let mut bin = bounds(times[0]);
        Some(BooleanBuffer::collect_bool(times.len() - 1, |i| {
            let time = times[i + 1];
            match bin {
                Some((start, end)) if start <= time && i128::from(time) < end => false,
                _ => {
                    bin = bounds(time);
                    true
                }
            }
        }))
    }
}

/// Marks the rows (from the second on) whose value differs from the row before.
fn changes(array: &dyn Array) -> Result<BooleanBuffer> {
    let n = array.len();
    let changed: BooleanArray = distinct(&array.slice(1, n - 1), &array.slice(0, n - 1))?;
    Ok(changed.values().clone())
}

impl RunState {
    /// Adds a batch; returns partial state when the groups reached [`MAX_GROUPS`] or the
    /// memory pool refused more.
    fn push(&mut self, batch: &RecordBatch) -> Result<Option<RecordBatch>> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(None);
        }
        // Where any key changes: a `date_bin`'s bins, a dictionary's keys, or the evaluated
        // expression.
        let mut evaluated: Vec<Option<ArrayRef>> = Vec::with_capacity(self.group_by.len());
        let mut changed: Option<BooleanBuffer> = None;
        for ((expr, _), bins) in self.group_by.iter().zip(&self.bins) {
            let mut value = None;
            let here = if rows == 1 {
                None
            } else if let Some(bins) = bins.as_ref().and_then(|b| b.changes(batch)) {
                Some(bins)
            } else if let Some(keys) = dictionary_under_casts(expr, batch) {
                Some(changes(keys.as_ref())?)
            } else {
                let evaluated = expr.evaluate(batch)?.into_array(rows)?;
                let here = changes(evaluated.as_ref())?;
                value = Some(evaluated);
                Some(here)
            };
            evaluated.push(value);
            if let Some(here) = here {
                changed = Some(match changed {
                    Some(before) => &before | &here,
                    None => here,
                });
            }
        }
        let mut starts: Vec<u32> = Vec::with_capacity(64);
        starts.push(0);
        if let Some(changed) = &changed {
            starts.extend(changed.set_indices().map(|i| i as u32 + 1));
        }
        let starts = UInt32Array::from(starts);
        // The keys of each run's first row, hashed once per run.
        let taken = if evaluated.iter().any(Option::is_none) {
            Some(take_record_batch(batch, &starts)?)
        } else {
            None
        };
        let keys = self
            .group_by
            .iter()
            .zip(&evaluated)
            .map(|((expr, _), value)| match (value, &taken) {
                (Some(value), _) => Ok(take(value.as_ref(), &starts, None)?),
                (None, Some(taken)) => expr.evaluate(taken)?.into_array(taken.num_rows()),
                (None, None) => Err(DataFusionError::Internal(
                    "run keys without their rows".to_string(),
                )),
            })
            .collect::<Result<Vec<ArrayRef>>>()?;
        self.group_values.intern(&keys, &mut self.run_groups)?;
        let runs: Vec<(usize, usize)> = starts
            .values()
            .iter()
            .map(|s| *s as usize)
            .zip(
                starts
                    .values()
                    .iter()
                    .skip(1)
                    .map(|s| *s as usize)
                    .chain([rows]),
            )
            .collect();
        let groups = self.group_values.len();
        self.row_groups.clear();
        for (((aggregate, filter), fold), accumulator) in self
            .aggregates
            .iter()
            .zip(&self.filters)
            .zip(&self.folds)
            .zip(self.accumulators.iter_mut())
        {
            let values = aggregate
                .expressions()
                .iter()
                .map(|e| e.evaluate(batch).and_then(|v| v.into_array(rows)))
                .collect::<Result<Vec<_>>>()?;
            if let (Some(fold), None) = (fold, filter)
                && let Some(state) = fold.states(values[0].as_ref(), &runs)?
            {
                accumulator.merge_batch(&state, &self.run_groups, groups)?;
                continue;
            }
            if self.row_groups.is_empty() {
                self.row_groups.reserve(rows);
                for (group, (start, end)) in self.run_groups.iter().zip(&runs) {
                    self.row_groups
                        .extend(std::iter::repeat_n(*group, end - start));
                }
            }
            let filter = match filter {
                Some(f) => Some(f.evaluate(batch)?.into_array(rows)?),
                None => None,
            };
            accumulator.update_batch(
                &values,
                &self.row_groups,
                filter.as_ref().map(|f| f.as_boolean()),
                groups,
            )?;
        }
        let size = self.group_values.size()
            + self.accumulators.iter().map(|a| a.size()).sum::<usize>()
            + self.row_groups.capacity() * size_of::<usize>();
        if groups >= MAX_GROUPS || self.reservation.try_resize(size).is_err() {
            return self.emit();
        }
        Ok(None)
    }

    /// Hands on the partial state of every group so far and starts afresh.
    fn emit(&mut self) -> Result<Option<RecordBatch>> {
        if self.group_values.is_empty() {
            return Ok(None);
        }
        let mut columns = self.group_values.emit(EmitTo::All)?;
        for accumulator in &mut self.accumulators {
            columns.extend(accumulator.state(EmitTo::All)?);
        }
        self.group_values.clear_shrink(0);
        self.reservation.free();
        Ok(Some(RecordBatch::try_new(self.schema.clone(), columns)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{DictionaryArray, Float64Array, TimestampNanosecondArray};
    use arrow::datatypes::{Field, Int32Type, Schema, TimeUnit};
    use datafusion::datasource::MemTable;
    use datafusion::execution::session_state::SessionStateBuilder;
    use datafusion::prelude::SessionContext;

    /// Rows of `hosts` series, each sorted by time (as a lake file holds them), or shuffled.
    /// Every 7th value, every value of every 13th host and every 11th host are null; a few
    /// values are NaN, infinite or -0.0. Values are quarters, so every sum is exact
    /// whatever the order of addition.
    fn batches(hosts: usize, per_host: usize, shuffled: bool) -> (SchemaRef, Vec<RecordBatch>) {
        let mut rows: Vec<(Option<String>, i64, Option<f64>)> = Vec::new();
        for h in 0..hosts {
            for i in 0..per_host {
                let n = h * per_host + i;
                let host = (h % 11 != 10).then(|| format!("host_{h}"));
                let value = match n {
                    // Every 13th host has no value at all: its average is NULL, not NaN.
                    _ if n.is_multiple_of(7) || h % 13 == 12 => None,
                    // NaN (in the first batch only), infinities and -0.0, which min and
                    // max must fold as DataFusion does.
                    5 | 13 => Some(f64::NAN),
                    _ if n % 1009 == 7 => Some(f64::INFINITY),
                    _ if n % 1013 == 9 => Some(f64::NEG_INFINITY),
                    _ if n % 17 == 3 => Some(-0.0),
                    _ => Some((n % 40) as f64 * 0.25),
                };
                rows.push((host, i as i64 * 600_000_000_000, value));
            }
        }
        if shuffled {
            // A fixed permutation: every row lands far from its neighbours.
            let len = rows.len();
            let mut order: Vec<usize> = (0..len).map(|i| (i * 7919) % len).collect();
            order.dedup();
            rows = order.into_iter().map(|i| rows[i].clone()).collect();
        }
        let host: DictionaryArray<Int32Type> = rows.iter().map(|r| r.0.as_deref()).collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("host", host.data_type().clone(), true),
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Nanosecond, None),
                false,
            ),
            Field::new("v", DataType::Float64, true),
        ]));
        let time = TimestampNanosecondArray::from_iter_values(rows.iter().map(|r| r.1));
        let value: Float64Array = rows.iter().map(|r| r.2).collect();
        let all = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(host), Arc::new(time), Arc::new(value)],
        )
        .unwrap();
        // Batches of uneven size, so runs cross batch boundaries.
        let mut out = Vec::new();
        let mut at = 0;
        while at < all.num_rows() {
            let len = 1000.min(all.num_rows() - at);
            out.push(all.slice(at, len));
            at += len;
        }
        (schema, out)
    }

    fn context(rule: bool, data: &(SchemaRef, Vec<RecordBatch>)) -> SessionContext {
        context_within(rule, data, None)
    }

    /// [`context`] with a memory pool of `limit` bytes, if given.
    fn context_within(
        rule: bool,
        data: &(SchemaRef, Vec<RecordBatch>),
        limit: Option<usize>,
    ) -> SessionContext {
        let mut state = SessionStateBuilder::new()
            .with_default_features()
            .with_optimizer_rule(Arc::new(crate::group_keys::DictionaryGroupKeys));
        if rule {
            state = state.with_physical_optimizer_rule(Arc::new(RunAggregation));
        }
        if let Some(limit) = limit {
            let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
                .with_memory_pool(Arc::new(
                    datafusion::execution::memory_pool::FairSpillPool::new(limit),
                ))
                .build_arc()
                .unwrap();
            let mut config = datafusion::prelude::SessionConfig::new();
            config.options_mut().execution.sort_spill_reservation_bytes = 256 << 10;
            state = state.with_runtime_env(runtime).with_config(config);
        }
        let ctx = SessionContext::new_with_state(state.build());
        // Two partitions, so the final aggregate merges partial states of one group.
        let (schema, batches) = data;
        let half = batches.len() / 2;
        let table = MemTable::try_new(
            schema.clone(),
            vec![batches[..half].to_vec(), batches[half..].to_vec()],
        )
        .unwrap();
        ctx.register_table("m", Arc::new(table)).unwrap();
        ctx
    }

    async fn run(
        rule: bool,
        data: &(SchemaRef, Vec<RecordBatch>),
        sql: &str,
    ) -> (String, Vec<RecordBatch>) {
        let df = context(rule, data).sql(sql).await.unwrap();
        let plan = df.clone().create_physical_plan().await.unwrap();
        let shown = datafusion::physical_plan::displayable(plan.as_ref())
            .indent(true)
            .to_string();
        (shown, df.collect().await.unwrap())
    }

    const QUERIES: [&str; 6] = [
        "SELECT date_bin(INTERVAL '1 hour', time) AS hour, host, avg(v) AS a, sum(v) AS s, \
         count(*) AS n, count(v) AS nv, min(v) AS lo, max(v) AS hi \
         FROM m GROUP BY 1, 2 ORDER BY 1, 2",
        "SELECT host, count(*) FILTER (WHERE v > 5) AS big, max(v) FROM m GROUP BY host ORDER BY host",
        "SELECT date_bin(INTERVAL '1 hour', time) AS hour, max(v) AS hi FROM m GROUP BY 1 ORDER BY 1",
        "SELECT v, count(*) AS n FROM m GROUP BY v ORDER BY v",
        // Bins that do not divide an hour, from an origin after most rows.
        "SELECT date_bin(INTERVAL '7 minutes 3 seconds', time, TIMESTAMP '1970-01-02 05:00:00') AS b, \
         host, sum(v) AS s, count(*) AS n FROM m GROUP BY 1, 2 ORDER BY 1, 2",
        // Rewritten into two aggregates; the outer one counts the inner one's groups.
        "SELECT host, count(DISTINCT v) AS d FROM m GROUP BY host ORDER BY host",
    ];

    #[tokio::test]
    async fn runs_give_the_answers_of_the_hash_aggregate() {
        for shuffled in [false, true] {
            let data = batches(40, 500, shuffled);
            for sql in QUERIES {
                let (plan, with_runs) = run(true, &data, sql).await;
                assert!(plan.contains("RunAggregateExec"), "{plan}");
                let (plain, without) = run(false, &data, sql).await;
                assert!(!plain.contains("RunAggregateExec"), "{plain}");
                assert_eq!(with_runs, without, "shuffled: {shuffled}, {sql}");
            }
        }
    }

    #[tokio::test]
    async fn bins_at_the_ends_of_time_match_date_bin() {
        // Times whose bins overflow: date_bin's answer (an error or NULL) must not change.
        let times = [i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX];
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Nanosecond, None),
                false,
            ),
            Field::new("v", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(TimestampNanosecondArray::from(times.to_vec())),
                Arc::new(Float64Array::from(vec![1.0; times.len()])),
            ],
        )
        .unwrap();
        let data = (schema, vec![batch.clone(), batch]);
        for sql in [
            "SELECT date_bin(INTERVAL '1 hour', time) AS b, count(*) FROM m GROUP BY 1 ORDER BY 1",
            "SELECT date_bin(INTERVAL '1 day', time, TIMESTAMP '2000-01-01 00:00:00') AS b, \
             count(*) FROM m GROUP BY 1 ORDER BY 1",
            // An origin before 1970: the last time's difference overflows, its bin is NULL.
            "SELECT date_bin(INTERVAL '1 hour', time, TIMESTAMP '1969-12-31 23:59:59.999999999') \
             AS b, count(*) FROM m GROUP BY 1 ORDER BY 1",
        ] {
            let answer = |rule| {
                let data = &data;
                async move {
                    let (plan, _) = run(rule, data, sql).await;
                    assert_eq!(plan.contains("RunAggregateExec"), rule, "{plan}");
                    let ctx = context(rule, data);
                    match ctx.sql(sql).await.unwrap().collect().await {
                        Ok(batches) => format!("{batches:?}"),
                        Err(e) => e.to_string(),
                    }
                }
            };
            assert_eq!(answer(true).await, answer(false).await, "{sql}");
        }
    }

    #[tokio::test]
    async fn more_groups_than_it_keeps_are_handed_on_in_parts() {
        // 140,000 groups of one row, 70,000 in each of the two partitions: beyond MAX_GROUPS.
        let data = batches(140_000, 1, false);
        let sql = "SELECT host, sum(v) AS s, count(*) AS n FROM m GROUP BY host ORDER BY host";
        let (plan, with_runs) = run(true, &data, sql).await;
        assert!(plan.contains("RunAggregateExec"), "{plan}");
        assert_eq!(with_runs, run(false, &data, sql).await.1);
    }

    #[tokio::test]
    async fn refused_memory_hands_the_state_on() {
        // A pool too small for 70,000 groups per partition: the memory pool refuses, the
        // partial state goes on in parts, and the answer does not change.
        let data = batches(140_000, 1, false);
        let sql = "SELECT host, sum(v) AS s, count(*) AS n FROM m GROUP BY host";
        let mut answers = Vec::new();
        for rule in [true, false] {
            let ctx = context_within(rule, &data, Some(4 << 20));
            let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
            let shown = arrow::util::pretty::pretty_format_batches(&batches)
                .unwrap()
                .to_string();
            let mut lines: Vec<String> = shown.lines().map(str::to_string).collect();
            lines.sort();
            answers.push(lines);
        }
        assert!(answers[0].len() > 127_000, "every group came back");
        assert_eq!(answers[0], answers[1]);
    }

    #[tokio::test]
    async fn ordered_aggregates_keep_the_hash_aggregate() {
        let data = batches(5, 20, false);
        for sql in [
            "SELECT host, array_agg(v ORDER BY time) FROM m GROUP BY host",
            "SELECT count(*) FROM m",
        ] {
            let (plan, _) = run(true, &data, sql).await;
            assert!(!plan.contains("RunAggregateExec"), "{sql}\n{plan}");
        }
    }
}
