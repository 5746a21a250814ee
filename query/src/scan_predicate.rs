//! A physical optimizer rule that keeps each conjunct of a Parquet scan's predicate once.
//!
//! The lake table gives its scans the query's filters so that files, row groups and pages
//! are pruned even where DataFusion cannot push a filter down (below the dedup merge).
//! Where DataFusion can, its filter pushdown appends the same filters to the scan's
//! predicate again, and the scan then prunes and filters rows with every conjunct twice.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::common::Result;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::datasource::physical_plan::{FileScanConfig, FileSource, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::utils::{conjunction, split_conjunction};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;

/// Removes repeated conjuncts from the predicates of Parquet scans.
#[derive(Debug, Default)]
pub struct DistinctScanPredicates;

impl PhysicalOptimizerRule for DistinctScanPredicates {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(exec) = node.downcast_ref::<DataSourceExec>() else {
                return Ok(Transformed::no(node));
            };
            let Some(config) = exec.data_source().downcast_ref::<FileScanConfig>() else {
                return Ok(Transformed::no(node));
            };
            let Some(source) = config.file_source.downcast_ref::<ParquetSource>() else {
                return Ok(Transformed::no(node));
            };
            let Some(predicate) = source.filter() else {
                return Ok(Transformed::no(node));
            };
            let conjuncts = split_conjunction(&predicate);
            let mut seen: HashSet<&Arc<dyn PhysicalExpr>> = HashSet::new();
            let distinct: Vec<Arc<dyn PhysicalExpr>> = conjuncts
                .iter()
                .filter(|c| seen.insert(*c))
                .map(|c| Arc::clone(c))
                .collect();
            if distinct.len() == conjuncts.len() {
                return Ok(Transformed::no(node));
            }
            let mut config = config.clone();
            config.file_source = Arc::new(source.with_predicate(conjunction(distinct)));
            let exec = exec.clone().with_data_source(Arc::new(config));
            Ok(Transformed::yes(Arc::new(exec) as Arc<dyn ExecutionPlan>))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "historian_distinct_scan_predicates"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::listing::PartitionedFile;
    use datafusion::datasource::physical_plan::FileScanConfigBuilder;
    use datafusion::execution::object_store::ObjectStoreUrl;
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{BinaryExpr, col, lit};
    use datafusion::physical_optimizer::filter_pushdown::FilterPushdown;
    use datafusion::physical_plan::filter::FilterExec;
    use datafusion::prelude::SessionContext;

    fn scan_predicate(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn PhysicalExpr>> {
        if let Some(exec) = plan.downcast_ref::<DataSourceExec>() {
            let config = exec.data_source().downcast_ref::<FileScanConfig>()?;
            return config.file_source.filter();
        }
        plan.children().into_iter().find_map(scan_predicate)
    }

    #[tokio::test]
    async fn filters_pushed_onto_the_scans_own_predicate_are_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(0..10_000))],
        )
        .unwrap();
        let path = dir.path().join("f.parquet");
        let mut writer = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            schema.clone(),
            None,
        )
        .unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();

        let range = |schema: &Schema| -> Arc<dyn PhysicalExpr> {
            let v = col("v", schema).unwrap();
            Arc::new(BinaryExpr::new(
                Arc::new(BinaryExpr::new(v.clone(), Operator::GtEq, lit(5_000i64))),
                Operator::And,
                Arc::new(BinaryExpr::new(v, Operator::Lt, lit(5_100i64))),
            ))
        };
        // As the lake table plans a scan: its own predicate, DataFusion's filter above.
        let source = ParquetSource::new(schema.clone()).with_predicate(range(&schema));
        let config =
            FileScanConfigBuilder::new(ObjectStoreUrl::local_filesystem(), Arc::new(source))
                .with_file(PartitionedFile::new(
                    path.to_str().unwrap(),
                    std::fs::metadata(&path).unwrap().len(),
                ))
                .build();
        let scan: Arc<dyn ExecutionPlan> = DataSourceExec::from_data_source(config);
        let plan: Arc<dyn ExecutionPlan> =
            Arc::new(FilterExec::try_new(range(&schema), scan).unwrap());

        let mut options = ConfigOptions::default();
        options.execution.parquet.pushdown_filters = true;
        let pushed = FilterPushdown::new().optimize(plan, &options).unwrap();
        let before = scan_predicate(&pushed).unwrap();
        assert_eq!(
            split_conjunction(&before).len(),
            4,
            "DataFusion repeats them"
        );

        let plan = DistinctScanPredicates.optimize(pushed, &options).unwrap();
        let after = scan_predicate(&plan).unwrap();
        let conjuncts: Vec<String> = split_conjunction(&after)
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(conjuncts, ["v@0 >= 5000", "v@0 < 5100"]);

        let ctx = SessionContext::new();
        let batches = datafusion::physical_plan::collect(plan, ctx.task_ctx())
            .await
            .unwrap();
        let values: Vec<i64> = batches
            .iter()
            .flat_map(|b| {
                let v = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                (0..v.len()).map(|i| v.value(i)).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(values, (5_000..5_100).collect::<Vec<_>>());
    }
}
