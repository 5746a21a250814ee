//! The deduplication step of a scan: rows of one series at one time, coming from several
//! overlapping files and the write buffer, become one row (last write wins per field).

use std::fmt;
use std::sync::Arc;

use arrow::compute::concat_batches;
use arrow::record_batch::RecordBatch;
use datafusion::common::Result;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::TaskContext;
use datafusion::physical_expr::{LexOrdering, OrderingRequirements, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, ExecutionPlanProperties,
    Partitioning, PlanProperties, SendableRecordBatchStream,
};
use futures::StreamExt;

/// Merges duplicate keys of a single input partition sorted by series key, time and `_seq`
/// (as `SortPreservingMergeExec` over sorted files yields it). Streams: holds back only the
/// rows of the last key seen.
#[derive(Debug)]
pub struct DedupExec {
    input: Arc<dyn ExecutionPlan>,
    /// The order the input must keep: series key, time, `_seq`.
    ordering: LexOrdering,
    properties: Arc<PlanProperties>,
}

impl DedupExec {
    /// Deduplicates `input`, which must be one partition sorted by `ordering`.
    pub fn new(input: Arc<dyn ExecutionPlan>, ordering: LexOrdering) -> Self {
        let properties = PlanProperties::new(
            input.equivalence_properties().clone(),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        DedupExec {
            input,
            ordering,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for DedupExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "DedupExec: last write wins per field")
    }
}

impl ExecutionPlan for DedupExec {
    fn name(&self) -> &str {
        "DedupExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn required_input_ordering(&self) -> Vec<Option<OrderingRequirements>> {
        // Without this the optimizer may replace the merge below by a plain concatenation.
        vec![Some(OrderingRequirements::from(self.ordering.clone()))]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
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
        Ok(Arc::new(DedupExec::new(
            children.swap_remove(0),
            self.ordering.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let schema = self.input.schema();
        let out_schema = schema.clone();
        let stream = futures::stream::unfold(
            (input, None::<RecordBatch>, false),
            move |(mut input, mut held, finished)| {
                let schema = schema.clone();
                async move {
                    if finished {
                        return None;
                    }
                    loop {
                        match input.next().await {
                            Some(Ok(batch)) => {
                                let joined = match &held {
                                    Some(h) => concat_batches(&schema, [h, &batch]),
                                    None => Ok(batch),
                                };
                                match joined.and_then(|b| store::dedup::dedup_sorted(&b)) {
                                    Ok((done, rest)) => {
                                        held = Some(rest);
                                        if done.num_rows() > 0 {
                                            return Some((Ok(done), (input, held, false)));
                                        }
                                    }
                                    Err(e) => return Some((Err(e.into()), (input, None, true))),
                                }
                            }
                            Some(Err(e)) => return Some((Err(e), (input, None, true))),
                            None => {
                                let last = held.take().filter(|h| h.num_rows() > 0)?;
                                let merged = store::dedup::sort_dedup(&last).map_err(Into::into);
                                return Some((merged, (input, None, true)));
                            }
                        }
                    }
                }
            },
        );
        Ok(Box::pin(RecordBatchStreamAdapter::new(out_schema, stream)))
    }
}
