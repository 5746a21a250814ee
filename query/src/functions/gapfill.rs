//! Gap filling: `date_bin_gapfill(stride, time[, origin])` in GROUP BY, with `locf(agg)`
//! and `interpolate(agg)` in the select list, as InfluxDB's `date_bin_gapfill` and
//! TimescaleDB's `time_bucket_gapfill` do.
//!
//! An analyzer rule turns such an aggregate into a plain `date_bin` aggregate under a
//! [`GapFill`] plan node; the node's physical form, [`GapFillExec`], adds the missing
//! buckets of each series within the query's time range (taken from the WHERE clause) and
//! fills them. The same node finishes `time_weighted_avg` in queries grouped by `date_bin`,
//! since it needs the value each series held before each bucket.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, RecordBatchOptions, StructArray,
    TimestampNanosecondArray, UInt32Array,
};
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampNanosecondType};
use arrow::row::{RowConverter, SortField};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, DFSchemaRef, Result, ScalarValue, plan_err};
use datafusion::config::ConfigOptions;
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::execution_props::ExecutionProps;
use datafusion::logical_expr::expr::{AggregateFunction, ScalarFunction};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Aggregate, ColumnarValue, Expr, Extension, LogicalPlan, Projection, ScalarFunctionArgs,
    ScalarUDFImpl, Signature, UserDefinedLogicalNode, UserDefinedLogicalNodeCore, Volatility,
};
use datafusion::optimizer::AnalyzerRule;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, Partitioning, PlanProperties,
};
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};
use datafusion::prelude::SessionContext;

use super::time_weighted::{TIME_WEIGHTED_AVG, TimeWeightedAvg, read_summary};

/// `date_bin_gapfill`.
pub const DATE_BIN_GAPFILL: &str = "date_bin_gapfill";
/// `locf`: last observation carried forward.
pub const LOCF: &str = "locf";
/// `interpolate`: linear interpolation between the neighbouring values.
pub const INTERPOLATE: &str = "interpolate";

/// How a column's missing or NULL values are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd)]
pub enum Fill {
    /// Left NULL.
    Null,
    /// The series' last non-NULL value.
    Locf,
    /// Linear between the series' previous and next non-NULL values.
    Interpolate,
    /// A `time_weighted_avg` summary to finish.
    TimeWeighted,
}

/// The marker functions, replaced by the rewrite; evaluating one is an error.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Marker {
    name: &'static str,
    signature: Signature,
}

impl Marker {
    /// The marker function `name`.
    pub fn new(name: &'static str) -> Self {
        let signature = if name == DATE_BIN_GAPFILL {
            Signature::user_defined(Volatility::Immutable)
        } else {
            Signature::any(1, Volatility::Immutable)
        };
        Marker { name, signature }
    }
}

fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, None)
}

impl ScalarUDFImpl for Marker {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if !(2..=3).contains(&arg_types.len()) {
            return plan_err!("date_bin_gapfill(stride, time[, origin]) takes 2 or 3 arguments");
        }
        let mut types = vec![
            DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano),
            time_type(),
        ];
        if arg_types.len() == 3 {
            types.push(time_type());
        }
        Ok(types)
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        if self.name == DATE_BIN_GAPFILL {
            Ok(time_type())
        } else {
            Ok(arg_types[0].clone())
        }
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if self.name == DATE_BIN_GAPFILL {
            plan_err!(
                "date_bin_gapfill() must be a GROUP BY expression of an aggregate query whose WHERE clause bounds time"
            )
        } else {
            plan_err!(
                "{}() must wrap an aggregate in the select list of a query grouped by date_bin_gapfill()",
                self.name
            )
        }
    }
}

/// The gap-fill plan node.
#[derive(Debug, Clone)]
pub struct GapFill {
    input: LogicalPlan,
    /// The bucket column of the aggregate's output.
    time: Column,
    /// The other group columns: one series per distinct combination.
    series: Vec<Column>,
    /// Every aggregate column and its fill (`Null`, or `TimeWeighted` for summaries).
    fills: Vec<(Column, Fill)>,
    /// Extra output columns: an aggregate column filled another way, under the name of
    /// the `locf(...)` or `interpolate(...)` expression that asked for it.
    derived: Vec<(Column, Fill, String)>,
    stride: i64,
    origin: i64,
    /// `[start, end)` in ns, from the WHERE clause.
    range: (Option<i64>, Option<i64>),
    /// Whether to add missing buckets (date_bin_gapfill) or only finish the summaries.
    fill_gaps: bool,
    /// For time-weighted averages: each series' last value (one column per average, after
    /// the series columns) in the lookback window before the range (see [`GapFillRule`]),
    /// held into its first bucket.
    lookback: Option<LogicalPlan>,
    schema: DFSchemaRef,
}

/// How far before a query's range the time-weighted average looks for the value a series
/// held when the range began, unless configured (`[query] time_weighted_lookback`).
pub const DEFAULT_LOOKBACK_NS: i64 = 24 * 3_600_000_000_000;

impl PartialEq for GapFill {
    fn eq(&self, other: &Self) -> bool {
        self.input == other.input
            && self.lookback == other.lookback
            && self.time == other.time
            && self.series == other.series
            && self.fills == other.fills
            && self.derived == other.derived
            && (self.stride, self.origin, self.range, self.fill_gaps)
                == (other.stride, other.origin, other.range, other.fill_gaps)
    }
}

impl Eq for GapFill {}

impl Hash for GapFill {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.input.hash(state);
        self.lookback.hash(state);
        self.time.hash(state);
        self.series.hash(state);
        self.fills.hash(state);
        self.derived.hash(state);
        (self.stride, self.origin, self.range, self.fill_gaps).hash(state);
    }
}

impl PartialOrd for GapFill {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        (self.stride, self.origin, self.range, self.fill_gaps).partial_cmp(&(
            other.stride,
            other.origin,
            other.range,
            other.fill_gaps,
        ))
    }
}

impl GapFill {
    fn output_schema(
        input: &DFSchema,
        fills: &[(Column, Fill)],
        derived: &[(Column, Fill, String)],
    ) -> Result<DFSchemaRef> {
        let mut fields: Vec<_> = input
            .iter()
            .map(|(q, f)| {
                let fill = fills
                    .iter()
                    .find(|(c, _)| c.name == *f.name() && c.relation.as_ref() == q)
                    .map(|(_, fill)| *fill);
                // Aggregates are NULL in added buckets, even those that never are (count).
                let f = match fill {
                    Some(Fill::TimeWeighted) => {
                        Arc::new(Field::new(f.name(), DataType::Float64, true))
                    }
                    Some(_) => Arc::new(f.as_ref().clone().with_nullable(true)),
                    None => f.clone(),
                };
                (q.cloned(), f)
            })
            .collect();
        for (source, _, name) in derived {
            let (_, field) = input.qualified_field_from_column(source)?;
            fields.push((
                None,
                Arc::new(Field::new(name, field.data_type().clone(), true)),
            ));
        }
        Ok(Arc::new(DFSchema::new_with_metadata(
            fields,
            input.metadata().clone(),
        )?))
    }
}

impl UserDefinedLogicalNodeCore for GapFill {
    fn name(&self) -> &str {
        "GapFill"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        std::iter::once(&self.input)
            .chain(self.lookback.as_ref())
            .collect()
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        Vec::new()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let fills: Vec<String> = self
            .fills
            .iter()
            .filter(|(_, fill)| *fill != Fill::Null)
            .map(|(c, fill)| format!("{}: {fill:?}", c.name))
            .chain(self.derived.iter().map(|(_, _, name)| name.clone()))
            .collect();
        write!(
            f,
            "GapFill: time={}, stride={}ns, range={:?}, fill_gaps={}, fills=[{}]",
            self.time.name,
            self.stride,
            self.range,
            self.fill_gaps,
            fills.join(", ")
        )
    }

    fn with_exprs_and_inputs(
        &self,
        _exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        let lookback = (inputs.len() > 1).then(|| inputs.swap_remove(1));
        let input = inputs.swap_remove(0);
        Ok(GapFill {
            schema: GapFill::output_schema(input.schema(), &self.fills, &self.derived)?,
            input,
            lookback,
            ..self.clone()
        })
    }
}

/// Evaluates a constant expression.
fn constant(expr: &Expr) -> Result<ScalarValue> {
    let props = ExecutionProps::new();
    let physical = datafusion::physical_expr::create_physical_expr(
        expr,
        &DFSchema::empty(),
        &props,
        &PhysicalPlanningContext::default(),
    )?;
    let batch = RecordBatch::try_new_with_options(
        Arc::new(Schema::empty()),
        vec![],
        &RecordBatchOptions::new().with_row_count(Some(1)),
    )?;
    match physical.evaluate(&batch)? {
        ColumnarValue::Scalar(s) => Ok(s),
        ColumnarValue::Array(a) => ScalarValue::try_from_array(&a, 0),
    }
}

fn constant_ns(expr: &Expr) -> Option<i64> {
    if !expr.column_refs().is_empty() {
        return None;
    }
    let value = constant(expr).ok()?.cast_to(&time_type()).ok()?;
    match value {
        ScalarValue::TimestampNanosecond(Some(v), _) => Some(v),
        _ => None,
    }
}

fn stride_ns(expr: &Expr) -> Result<i64> {
    let stride = match constant(expr)? {
        ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => {
            i64::from(v.days) * 86_400_000_000_000 + v.nanoseconds
        }
        ScalarValue::IntervalDayTime(Some(v)) => {
            i64::from(v.days) * 86_400_000_000_000 + i64::from(v.milliseconds) * 1_000_000
        }
        other => {
            return plan_err!(
                "date_bin_gapfill: the stride must be a fixed interval (no months), got {other}"
            );
        }
    };
    if stride <= 0 {
        return plan_err!("date_bin_gapfill: the stride must be positive");
    }
    Ok(stride)
}

fn is_time(expr: &Expr) -> bool {
    matches!(expr, Expr::Column(c) if c.name == store::TIME_COLUMN)
}

/// `[start, end)` of `time` from the filters between an aggregate and its scan.
fn time_range(plan: &LogicalPlan) -> (Option<i64>, Option<i64>) {
    let mut predicates: Vec<Expr> = Vec::new();
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Filter(f) => {
                predicates.push(f.predicate.clone());
                node = f.input.as_ref();
            }
            LogicalPlan::Projection(p) => node = p.input.as_ref(),
            LogicalPlan::SubqueryAlias(s) => node = s.input.as_ref(),
            LogicalPlan::TableScan(scan) => {
                predicates.extend(scan.filters.iter().cloned());
                break;
            }
            _ => break,
        }
    }
    let range = crate::table::TimeRange::from_filters_with(&predicates, constant_ns);
    (
        (range.start != i64::MIN).then_some(range.start),
        (range.end != i64::MAX).then(|| range.end.saturating_add(1)),
    )
}

fn function_name(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::ScalarFunction(f) => Some(f.func.name()),
        Expr::AggregateFunction(f) => Some(f.func.name()),
        _ => None,
    }
}

/// The analyzer rule that builds [`GapFill`] nodes.
#[derive(Debug)]
pub struct GapFillRule {
    /// How far before a query's range a time-weighted average looks for the value each
    /// series held when the range began (ns).
    pub lookback_ns: i64,
}

impl Default for GapFillRule {
    fn default() -> Self {
        GapFillRule {
            lookback_ns: DEFAULT_LOOKBACK_NS,
        }
    }
}

impl AnalyzerRule for GapFillRule {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|p| rewrite(p, self.lookback_ns))
            .data()
    }

    fn name(&self) -> &str {
        "historian_gap_fill"
    }
}

fn rewrite(plan: LogicalPlan, lookback_ns: i64) -> Result<Transformed<LogicalPlan>> {
    match plan {
        LogicalPlan::Aggregate(agg) => rewrite_aggregate(agg, lookback_ns),
        LogicalPlan::Projection(p) => {
            let gap = match p.input.as_ref() {
                LogicalPlan::Extension(e) => e.node.as_any().downcast_ref::<GapFill>().cloned(),
                _ => None,
            };
            match gap {
                Some(gap) => rewrite_projection(p, gap),
                None => Ok(Transformed::no(LogicalPlan::Projection(p))),
            }
        }
        other => Ok(Transformed::no(other)),
    }
}

/// The first call of function `name` inside `expr`.
fn find_call(expr: &Expr, name: &str) -> Option<ScalarFunction> {
    let mut found = None;
    let _ = expr.apply(|e| {
        if let Expr::ScalarFunction(f) = e
            && f.func.name() == name
        {
            found = Some(f.clone());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

fn rewrite_aggregate(agg: Aggregate, lookback_ns: i64) -> Result<Transformed<LogicalPlan>> {
    let position = |name: &str| {
        agg.group_expr
            .iter()
            .position(|e| find_call(e, name).is_some())
    };
    let has_twa = agg
        .aggr_expr
        .iter()
        .any(|e| function_name(&e.clone().unalias_nested().data) == Some(TIME_WEIGHTED_AVG));
    let (time_at, fill_gaps, marker) = match (position(DATE_BIN_GAPFILL), position("date_bin")) {
        (Some(i), _) => (i, true, DATE_BIN_GAPFILL),
        (None, Some(i)) if has_twa => (i, false, "date_bin"),
        _ => return Ok(Transformed::no(LogicalPlan::Aggregate(agg))),
    };
    let bucket_expr = &agg.group_expr[time_at];
    let bucket_name = bucket_expr.schema_name().to_string();
    let Some(call) = find_call(bucket_expr, marker) else {
        return plan_err!("date_bin_gapfill: unexpected GROUP BY expression");
    };
    if !is_time(&call.args[1]) {
        return plan_err!(
            "date_bin_gapfill(stride, time): the second argument must be the time column"
        );
    }
    let stride = stride_ns(&call.args[0])?;
    let origin = match call.args.get(2) {
        Some(e) => match constant_ns(e) {
            Some(o) => o,
            None => return plan_err!("date_bin_gapfill: the origin must be a constant timestamp"),
        },
        None => 0,
    };
    let range = time_range(agg.input.as_ref());
    if fill_gaps && (range.0.is_none() || range.1.is_none()) {
        return plan_err!(
            "date_bin_gapfill needs the query's time range in WHERE, e.g. time >= '2026-01-01T00:00:00Z' AND time < '2026-01-02T00:00:00Z'"
        );
    }
    let mut group_expr = agg.group_expr.clone();
    // The bucket may sit inside a cast: replace only the call.
    let date_bin = Expr::ScalarFunction(ScalarFunction::new_udf(
        datafusion::functions::datetime::date_bin(),
        call.args.clone(),
    ));
    let replaced = bucket_expr
        .clone()
        .unalias_nested()
        .data
        .transform_up(|e| match &e {
            Expr::ScalarFunction(f) if f.func.name() == DATE_BIN_GAPFILL => {
                Ok(Transformed::yes(date_bin.clone()))
            }
            _ => Ok(Transformed::no(e)),
        })?
        .data;
    group_expr[time_at] = replaced.alias(bucket_name);
    let summary = Arc::new(datafusion::logical_expr::AggregateUDF::from(
        TimeWeightedAvg::new(true),
    ));
    let mut twa_at = HashSet::new();
    let aggr_expr: Vec<Expr> = agg
        .aggr_expr
        .iter()
        .enumerate()
        .map(|(i, e)| match e.clone().unalias_nested().data {
            Expr::AggregateFunction(f) if f.func.name() == TIME_WEIGHTED_AVG => {
                twa_at.insert(i);
                Expr::AggregateFunction(AggregateFunction {
                    func: summary.clone(),
                    params: f.params,
                })
                .alias(e.schema_name().to_string())
            }
            _ => e.clone(),
        })
        .collect();
    let group_len = group_expr.len();
    let new_agg = Aggregate::try_new(agg.input.clone(), group_expr, aggr_expr)?;
    let schema = new_agg.schema.clone();
    let column = |i: usize| Column::from(schema.qualified_field(i));
    let series = (0..group_len)
        .filter(|i| *i != time_at)
        .map(column)
        .collect();
    let fills = (group_len..schema.fields().len())
        .map(|i| {
            let fill = if twa_at.contains(&(i - group_len)) {
                Fill::TimeWeighted
            } else {
                Fill::Null
            };
            (column(i), fill)
        })
        .collect::<Vec<_>>();
    let lookback = match range.0 {
        Some(start) if !twa_at.is_empty() => {
            Some(lookback_plan(&agg, time_at, start, lookback_ns)?)
        }
        _ => None,
    };
    let input = LogicalPlan::Aggregate(new_agg);
    let node = GapFill {
        lookback,
        schema: GapFill::output_schema(input.schema(), &fills, &[])?,
        input,
        derived: Vec::new(),
        time: column(time_at),
        series,
        fills,
        stride,
        origin,
        range,
        fill_gaps,
    };
    Ok(Transformed::yes(LogicalPlan::Extension(Extension {
        node: Arc::new(node),
    })))
}

/// `last(value, time)` of each time-weighted average's value, per series, over the
/// aggregate's input restricted to `[start - lookback_ns, start)`.
fn lookback_plan(
    agg: &Aggregate,
    time_at: usize,
    start: i64,
    lookback_ns: i64,
) -> Result<LogicalPlan> {
    let ts = |v: i64| Expr::Literal(ScalarValue::TimestampNanosecond(Some(v), None), None);
    let time = || Expr::Column(Column::from_name(store::TIME_COLUMN));
    let window = time()
        .gt_eq(ts(start.saturating_sub(lookback_ns)))
        .and(time().lt(ts(start)));
    // The same input, with the WHERE clause's time bounds replaced by the window.
    let mut replaced = false;
    let input = agg
        .input
        .as_ref()
        .clone()
        .transform_down(|p| match p {
            LogicalPlan::Filter(f) if !replaced => {
                replaced = true;
                let kept = datafusion::logical_expr::utils::split_conjunction(&f.predicate)
                    .into_iter()
                    .filter(|c| !c.column_refs().iter().any(|r| r.name == store::TIME_COLUMN))
                    .cloned();
                let predicate =
                    datafusion::logical_expr::utils::conjunction(kept.chain([window.clone()]))
                        .unwrap_or(window.clone());
                Ok(Transformed::yes(LogicalPlan::Filter(
                    datafusion::logical_expr::Filter::try_new(predicate, f.input)?,
                )))
            }
            other => Ok(Transformed::no(other)),
        })?
        .data;
    if !replaced {
        return plan_err!("time_weighted_avg: no time filter to look back from");
    }
    let last = Arc::new(datafusion::logical_expr::AggregateUDF::from(
        super::selector::Selector::new(super::selector::End::Last),
    ));
    let group: Vec<Expr> = agg
        .group_expr
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != time_at)
        .map(|(_, e)| e.clone())
        .collect();
    let aggr: Vec<Expr> = agg
        .aggr_expr
        .iter()
        .filter_map(|e| match e.clone().unalias_nested().data {
            Expr::AggregateFunction(f) if f.func.name() == TIME_WEIGHTED_AVG => {
                Some(Expr::AggregateFunction(AggregateFunction::new_udf(
                    last.clone(),
                    f.params.args.clone(),
                    false,
                    None,
                    vec![],
                    None,
                )))
            }
            _ => None,
        })
        .enumerate()
        .map(|(i, e)| e.alias(format!("held_{i}")))
        .collect();
    Ok(LogicalPlan::Aggregate(Aggregate::try_new(
        Arc::new(input),
        group,
        aggr,
    )?))
}

fn rewrite_projection(p: Projection, gap: GapFill) -> Result<Transformed<LogicalPlan>> {
    let mut derived = gap.derived.clone();
    let mut exprs = Vec::with_capacity(p.expr.len());
    for e in p.expr {
        let rewritten = e.transform_up(|x| {
            let Expr::ScalarFunction(f) = &x else {
                return Ok(Transformed::no(x));
            };
            let fill = match f.func.name() {
                LOCF => Fill::Locf,
                INTERPOLATE => Fill::Interpolate,
                _ => return Ok(Transformed::no(x)),
            };
            let Some(Expr::Column(c)) = f.args.first() else {
                return plan_err!("{}() takes one aggregate of the query", f.func.name());
            };
            let Some((_, base)) = gap.fills.iter().find(|(fc, _)| fc == c) else {
                return plan_err!(
                    "{}() takes an aggregate of the query, not a GROUP BY column",
                    f.func.name()
                );
            };
            if *base == Fill::TimeWeighted {
                // A time-weighted average already holds the last value across gaps.
                if fill == Fill::Interpolate {
                    return plan_err!("interpolate() cannot wrap time_weighted_avg()");
                }
                return Ok(Transformed::yes(Expr::Column(c.clone())));
            }
            let name = x.schema_name().to_string();
            if !derived.iter().any(|(_, _, n)| *n == name) {
                derived.push((c.clone(), fill, name.clone()));
            }
            Ok(Transformed::yes(Expr::Column(Column::from_name(name))))
        })?;
        exprs.push(rewritten.data);
    }
    let gap = GapFill {
        schema: GapFill::output_schema(gap.input.schema(), &gap.fills, &derived)?,
        derived,
        ..gap
    };
    let input = Arc::new(LogicalPlan::Extension(Extension {
        node: Arc::new(gap),
    }));
    Ok(Transformed::yes(LogicalPlan::Projection(
        Projection::try_new(exprs, input)?,
    )))
}

/// Plans [`GapFill`] nodes.
#[derive(Debug, Default)]
pub struct GapFillPlanner;

#[async_trait]
impl ExtensionPlanner for GapFillPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn Session,
        _planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(gap) = node.as_any().downcast_ref::<GapFill>() else {
            return Ok(None);
        };
        let input_schema = logical_inputs[0].schema();
        let index = |c: &Column| input_schema.index_of_column(c);
        let exec = GapFillExec::new(
            physical_inputs[0].clone(),
            physical_inputs.get(1).cloned(),
            GapFillSpec {
                time: index(&gap.time)?,
                series: gap.series.iter().map(index).collect::<Result<_>>()?,
                fills: gap
                    .fills
                    .iter()
                    .map(|(c, f)| Ok((index(c)?, *f)))
                    .collect::<Result<_>>()?,
                derived: gap
                    .derived
                    .iter()
                    .map(|(c, f, name)| Ok((index(c)?, *f, name.clone())))
                    .collect::<Result<_>>()?,
                stride: gap.stride,
                origin: gap.origin,
                range: gap.range,
                fill_gaps: gap.fill_gaps,
            },
        );
        Ok(Some(Arc::new(exec)))
    }
}

/// The query planner of Historian sessions: DataFusion's, plus the extension nodes.
#[derive(Debug, Default)]
pub struct HistorianQueryPlanner;

#[async_trait]
impl QueryPlanner for HistorianQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        DefaultPhysicalPlanner::with_extension_planners(vec![Arc::new(GapFillPlanner)])
            .create_physical_plan(logical_plan, session)
            .await
    }
}

/// What [`GapFillExec`] does, by column index.
#[derive(Debug, Clone)]
pub struct GapFillSpec {
    time: usize,
    series: Vec<usize>,
    fills: Vec<(usize, Fill)>,
    derived: Vec<(usize, Fill, String)>,
    stride: i64,
    origin: i64,
    range: (Option<i64>, Option<i64>),
    fill_gaps: bool,
}

/// Fills gaps in an aggregate's output. Holds the aggregate's output (one row per series
/// and bucket) in memory: that is the size of the answer, not of the data scanned.
#[derive(Debug)]
pub struct GapFillExec {
    input: Arc<dyn ExecutionPlan>,
    /// Series columns, then each time-weighted average's value held before the range.
    lookback: Option<Arc<dyn ExecutionPlan>>,
    spec: GapFillSpec,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl GapFillExec {
    fn new(
        input: Arc<dyn ExecutionPlan>,
        lookback: Option<Arc<dyn ExecutionPlan>>,
        spec: GapFillSpec,
    ) -> Self {
        let in_schema = input.schema();
        let mut fields: Vec<Field> = in_schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| match spec.fills.iter().find(|(c, _)| *c == i) {
                Some((_, Fill::TimeWeighted)) => Field::new(f.name(), DataType::Float64, true),
                Some(_) => f.as_ref().clone().with_nullable(true),
                None => f.as_ref().clone(),
            })
            .collect();
        for (source, _, name) in &spec.derived {
            fields.push(Field::new(
                name,
                in_schema.field(*source).data_type().clone(),
                true,
            ));
        }
        let schema = Arc::new(Schema::new_with_metadata(
            fields,
            in_schema.metadata().clone(),
        ));
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        GapFillExec {
            input,
            lookback,
            spec,
            schema,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for GapFillExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "GapFillExec: stride={}ns, range={:?}, fill_gaps={}",
            self.spec.stride, self.spec.range, self.spec.fill_gaps
        )
    }
}

impl ExecutionPlan for GapFillExec {
    fn name(&self) -> &str {
        "GapFillExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition; self.children().len()]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        std::iter::once(&self.input)
            .chain(self.lookback.as_ref())
            .collect()
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
        let lookback = (children.len() > 1).then(|| children.swap_remove(1));
        Ok(Arc::new(GapFillExec::new(
            children.swap_remove(0),
            lookback,
            self.spec.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context.clone())?;
        let lookback = match &self.lookback {
            Some(l) => Some((l.schema(), l.execute(partition, context)?)),
            None => None,
        };
        let in_schema = self.input.schema();
        let schema = self.schema.clone();
        let spec = self.spec.clone();
        let out_schema = schema.clone();
        let stream = futures::stream::once(async move {
            let held = match lookback {
                Some((l_schema, stream)) => {
                    let batches = datafusion::physical_plan::common::collect(stream).await?;
                    Some(concat_batches(&l_schema, &batches)?)
                }
                None => None,
            };
            let batches = datafusion::physical_plan::common::collect(input).await?;
            let batch = concat_batches(&in_schema, &batches)?;
            fill(&batch, held.as_ref(), &spec, schema)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(out_schema, stream)))
    }
}

/// One output row: the series' first input row, the bucket, and the input row if any.
struct OutRow {
    series_row: usize,
    time: i64,
    source: Option<usize>,
}

fn floor_bucket(t: i64, stride: i64, origin: i64) -> i64 {
    origin + (t - origin).div_euclid(stride) * stride
}

fn fill(
    batch: &RecordBatch,
    lookback: Option<&RecordBatch>,
    spec: &GapFillSpec,
    schema: SchemaRef,
) -> Result<RecordBatch> {
    // Sort by series, then bucket.
    let mut sort_columns: Vec<SortColumn> = spec
        .series
        .iter()
        .map(|i| SortColumn {
            values: batch.column(*i).clone(),
            options: None,
        })
        .collect();
    sort_columns.push(SortColumn {
        values: batch.column(spec.time).clone(),
        options: None,
    });
    let order = lexsort_to_indices(&sort_columns, None)?;
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| take(c.as_ref(), &order, None))
        .collect::<std::result::Result<_, _>>()?;
    let n = batch.num_rows();
    let times = arrow::compute::cast(&columns[spec.time], &time_type())?;
    let times = times.as_primitive::<TimestampNanosecondType>();
    let series_rows = if spec.series.is_empty() {
        None
    } else {
        let cols: Vec<ArrayRef> = spec.series.iter().map(|i| columns[*i].clone()).collect();
        Some(series_converter(&columns, spec)?.convert_columns(&cols)?)
    };
    // Runs of one series.
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0;
    for i in 1..n {
        let same = series_rows
            .as_ref()
            .is_none_or(|r| r.row(i) == r.row(i - 1));
        if !same {
            runs.push(start..i);
            start = i;
        }
    }
    if n > 0 {
        runs.push(start..n);
    }
    let twa_columns: Vec<usize> = spec
        .fills
        .iter()
        .filter(|(_, f)| *f == Fill::TimeWeighted)
        .map(|(c, _)| *c)
        .collect();
    let run_starts: Vec<usize> = runs.iter().map(|r| r.start).collect();
    let held = held_before_range(
        lookback,
        &columns,
        spec,
        series_rows.as_ref(),
        &run_starts,
        twa_columns.len(),
    )?;
    let mut out: Vec<OutRow> = Vec::new();
    let mut run_bounds: Vec<std::ops::Range<usize>> = Vec::with_capacity(runs.len());
    for run in runs {
        let first_out = out.len();
        if spec.fill_gaps {
            let (Some(lo), Some(hi)) = spec.range else {
                return plan_err!("gap filling needs a time range");
            };
            let mut t = floor_bucket(lo, spec.stride, spec.origin);
            let mut i = run.start;
            loop {
                if i < run.end && (t >= hi || times.value(i) <= t) {
                    if times.value(i) == t {
                        t += spec.stride;
                    }
                    out.push(OutRow {
                        series_row: run.start,
                        time: times.value(i),
                        source: Some(i),
                    });
                    i += 1;
                } else if t < hi {
                    out.push(OutRow {
                        series_row: run.start,
                        time: t,
                        source: None,
                    });
                    t += spec.stride;
                } else {
                    break;
                }
            }
        } else {
            out.extend(run.clone().map(|i| OutRow {
                series_row: run.start,
                time: times.value(i),
                source: Some(i),
            }));
        }
        run_bounds.push(first_out..out.len());
    }

    let series_idx: UInt32Array = out.iter().map(|r| Some(r.series_row as u32)).collect();
    let mut result: Vec<ArrayRef> = Vec::with_capacity(columns.len() + spec.derived.len());
    for (i, column) in columns.iter().enumerate() {
        let array: ArrayRef = if i == spec.time {
            let t = TimestampNanosecondArray::from_iter_values(out.iter().map(|r| r.time));
            arrow::compute::cast(&t, column.data_type())?
        } else if spec.series.contains(&i) {
            take(column.as_ref(), &series_idx, None)?
        } else {
            let fill = spec.fills.iter().find(|(c, _)| *c == i).map(|(_, f)| *f);
            let before: Vec<Option<f64>> = match twa_columns.iter().position(|c| *c == i) {
                Some(j) => held.iter().map(|h| h[j]).collect(),
                None => Vec::new(),
            };
            fill_column(
                column,
                fill.unwrap_or(Fill::Null),
                &out,
                &run_bounds,
                spec,
                &before,
            )?
        };
        result.push(array);
    }
    for (source, fill, _) in &spec.derived {
        result.push(fill_column(
            &columns[*source],
            *fill,
            &out,
            &run_bounds,
            spec,
            &[],
        )?);
    }
    Ok(RecordBatch::try_new_with_options(
        schema,
        result,
        &RecordBatchOptions::new().with_row_count(Some(out.len())),
    )?)
}

/// Compares series keys (the group columns other than the bucket) as bytes.
fn series_converter(columns: &[ArrayRef], spec: &GapFillSpec) -> Result<RowConverter> {
    Ok(RowConverter::new(
        spec.series
            .iter()
            .map(|i| SortField::new(columns[*i].data_type().clone()))
            .collect(),
    )?)
}

/// Per run (series), the value each time-weighted average's series held when the range
/// began, from the lookback rows (series columns, then one value per average).
fn held_before_range(
    lookback: Option<&RecordBatch>,
    columns: &[ArrayRef],
    spec: &GapFillSpec,
    series_rows: Option<&arrow::row::Rows>,
    run_starts: &[usize],
    averages: usize,
) -> Result<Vec<Vec<Option<f64>>>> {
    let none = vec![vec![None; averages]; run_starts.len()];
    let Some(lookback) = lookback.filter(|l| l.num_rows() > 0) else {
        return Ok(none);
    };
    let series = spec.series.len();
    let values: Vec<ArrayRef> = (0..averages)
        .map(|j| arrow::compute::cast(lookback.column(series + j), &DataType::Float64))
        .collect::<std::result::Result<_, _>>()?;
    let value_of = |row: usize| -> Vec<Option<f64>> {
        values
            .iter()
            .map(|v| {
                let v = v.as_primitive::<arrow::datatypes::Float64Type>();
                v.is_valid(row).then(|| v.value(row))
            })
            .collect()
    };
    let Some(series_rows) = series_rows else {
        // No series columns: one series, one lookback row.
        return Ok(run_starts.iter().map(|_| value_of(0)).collect());
    };
    let converter = series_converter(columns, spec)?;
    let keys: Vec<ArrayRef> = (0..series)
        .map(|i| arrow::compute::cast(lookback.column(i), columns[spec.series[i]].data_type()))
        .collect::<std::result::Result<_, _>>()?;
    let lookback_rows = converter.convert_columns(&keys)?;
    let index: std::collections::HashMap<Vec<u8>, usize> = (0..lookback.num_rows())
        .map(|r| (lookback_rows.row(r).as_ref().to_vec(), r))
        .collect();
    Ok(run_starts
        .iter()
        .map(|start| match index.get(series_rows.row(*start).as_ref()) {
            Some(r) => value_of(*r),
            None => vec![None; averages],
        })
        .collect())
}

/// One aggregate column over the output rows, filled.
fn fill_column(
    column: &ArrayRef,
    fill: Fill,
    out: &[OutRow],
    run_bounds: &[std::ops::Range<usize>],
    spec: &GapFillSpec,
    held_before: &[Option<f64>],
) -> Result<ArrayRef> {
    Ok(match fill {
        Fill::Null => {
            let source_idx: UInt32Array = out.iter().map(|r| r.source.map(|s| s as u32)).collect();
            take(column.as_ref(), &source_idx, None)?
        }
        Fill::Locf => {
            let mut idx: Vec<Option<u32>> = Vec::with_capacity(out.len());
            for bounds in run_bounds {
                let mut last: Option<u32> = None;
                for r in &out[bounds.clone()] {
                    if let Some(s) = r.source
                        && column.is_valid(s)
                    {
                        last = Some(s as u32);
                    }
                    idx.push(last);
                }
            }
            take(column.as_ref(), &UInt32Array::from(idx), None)?
        }
        Fill::Interpolate => interpolate(column, out, run_bounds)?,
        Fill::TimeWeighted => time_weighted(column, out, run_bounds, spec, held_before)?,
    })
}

fn interpolate(
    column: &ArrayRef,
    out: &[OutRow],
    run_bounds: &[std::ops::Range<usize>],
) -> Result<ArrayRef> {
    if !column.data_type().is_numeric() {
        return plan_err!(
            "interpolate() needs a numeric aggregate, not {}",
            column.data_type()
        );
    }
    let values = arrow::compute::cast(column, &DataType::Float64)?;
    let values = values.as_primitive::<arrow::datatypes::Float64Type>();
    let known = |r: &OutRow| {
        r.source
            .filter(|s| values.is_valid(*s))
            .map(|s| (r.time, values.value(s)))
    };
    let mut result: Vec<Option<f64>> = Vec::with_capacity(out.len());
    for bounds in run_bounds {
        let rows = &out[bounds.clone()];
        let mut prev: Option<(i64, f64)> = None;
        for (k, r) in rows.iter().enumerate() {
            if let Some(p) = known(r) {
                result.push(Some(p.1));
                prev = Some(p);
                continue;
            }
            let next = rows[k + 1..].iter().find_map(known);
            result.push(match (prev, next) {
                (Some((t0, v0)), Some((t1, v1))) if t1 > t0 => {
                    Some(v0 + (v1 - v0) * (r.time - t0) as f64 / (t1 - t0) as f64)
                }
                _ => None,
            });
        }
    }
    if column.data_type() == &DataType::Float64 {
        return Ok(Arc::new(Float64Array::from(result)));
    }
    // Integers interpolate to the nearest integer.
    let rounded: Float64Array = result.into_iter().map(|v| v.map(f64::round)).collect();
    Ok(arrow::compute::cast(&rounded, column.data_type())?)
}

fn time_weighted(
    column: &ArrayRef,
    out: &[OutRow],
    run_bounds: &[std::ops::Range<usize>],
    spec: &GapFillSpec,
    held_before: &[Option<f64>],
) -> Result<ArrayRef> {
    let Some(summaries) = column.as_any().downcast_ref::<StructArray>() else {
        return plan_err!(
            "time_weighted_avg: unexpected summary type {}",
            column.data_type()
        );
    };
    let mut result: Vec<Option<f64>> = Vec::with_capacity(out.len());
    for (k, bounds) in run_bounds.iter().enumerate() {
        let mut held: Option<f64> = held_before.get(k).copied().flatten();
        for r in &out[bounds.clone()] {
            let start = r.time;
            let end = match spec.range.1 {
                Some(hi) => (start + spec.stride).min(hi),
                None => start + spec.stride,
            };
            let summary = r.source.and_then(|s| read_summary(summaries, s));
            let Some(s) = summary else {
                // No sample in the bucket: the last value held all along.
                result.push(held);
                continue;
            };
            let mut area = s.area + s.last_value * (end - s.last_time).max(0) as f64;
            let from = match held {
                Some(v) => {
                    area += v * (s.first_time - start).max(0) as f64;
                    start
                }
                None => s.first_time,
            };
            let span = end - from;
            result.push(Some(if span > 0 {
                area / span as f64
            } else {
                s.last_value
            }));
            held = Some(s.last_value);
        }
    }
    Ok(Arc::new(Float64Array::from(result)))
}

/// Registers the functions and the rule's markers.
pub fn register(ctx: &SessionContext) {
    for name in [DATE_BIN_GAPFILL, LOCF, INTERPOLATE] {
        ctx.register_udf(datafusion::logical_expr::ScalarUDF::from(Marker::new(name)));
    }
}
