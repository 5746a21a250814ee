//! Historian SQL: gap filling (`date_bin_gapfill`, `locf`, `interpolate`), the
//! time-weighted average and the `first` / `last` selectors.

pub mod gapfill;
pub mod postgres;
pub mod selector;
pub mod time_weighted;

use std::sync::Arc;

use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::AggregateUDF;
use datafusion::optimizer::Analyzer;
use datafusion::prelude::SessionContext;

/// Adds the gap-fill rewrite (after DataFusion's own analyzer rules, so it sees coerced
/// types), the planner of its plan node, and the lastpoint fast path. Time-weighted
/// averages look back `lookback_ns` before a query's range for each series' held value.
pub fn install(builder: SessionStateBuilder, lookback_ns: i64) -> SessionStateBuilder {
    let mut rules = Analyzer::new().rules;
    rules.push(Arc::new(gapfill::GapFillRule { lookback_ns }));
    builder
        .with_analyzer_rules(rules)
        .with_optimizer_rule(Arc::new(crate::lastpoint::LastPointRule))
        // After the lastpoint rule, which recognises its aggregate by plain tag columns.
        .with_optimizer_rule(Arc::new(crate::group_keys::DictionaryGroupKeys))
        .with_physical_optimizer_rule(Arc::new(crate::run_aggregate::RunAggregation))
        // After DataFusion's filter pushdown, which repeats the lake scans' own filters.
        .with_physical_optimizer_rule(Arc::new(crate::scan_predicate::DistinctScanPredicates))
        .with_query_planner(Arc::new(gapfill::HistorianQueryPlanner))
}

/// Registers the historian functions in a session.
pub fn register(ctx: &SessionContext) {
    gapfill::register(ctx);
    ctx.register_udaf(AggregateUDF::from(selector::Selector::new(
        selector::End::First,
    )));
    ctx.register_udaf(AggregateUDF::from(selector::Selector::new(
        selector::End::Last,
    )));
    ctx.register_udaf(AggregateUDF::from(time_weighted::TimeWeightedAvg::new(
        false,
    )));
}
