//! Query counters, exported in Prometheus text format by the server.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::QueryError;

/// The outcome label of a finished query.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// ok, invalid, refused, memory_limit, timeout, busy, error.
    pub outcome: &'static str,
}

/// Everything the query path counts.
#[derive(Debug)]
pub struct QueryMetrics {
    /// Queries streaming a result right now.
    pub running: Gauge,
    /// Finished queries by outcome.
    pub queries: Family<Outcome, Counter>,
    /// Queries whose client went away before the end of the result.
    pub cancelled: Counter,
    /// Rows returned.
    pub rows: Counter,
    /// Time from receipt to the end of the result.
    pub duration_seconds: Histogram,
}

impl Default for QueryMetrics {
    fn default() -> Self {
        QueryMetrics {
            running: Gauge::default(),
            queries: Family::default(),
            cancelled: Counter::default(),
            rows: Counter::default(),
            // 1 ms .. ~65 s
            duration_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
        }
    }
}

impl QueryMetrics {
    /// Registers every metric under the `historian_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "historian_queries_running",
            "Queries streaming a result",
            self.running.clone(),
        );
        registry.register(
            "historian_queries",
            "Finished queries by outcome",
            self.queries.clone(),
        );
        registry.register(
            "historian_queries_cancelled",
            "Queries cancelled because the client went away",
            self.cancelled.clone(),
        );
        registry.register(
            "historian_query_rows",
            "Rows returned by queries",
            self.rows.clone(),
        );
        registry.register(
            "historian_query_duration_seconds",
            "Query time from receipt to the end of the result",
            self.duration_seconds.clone(),
        );
    }

    /// Records a finished query.
    pub fn finished(&self, started: Instant, result: Result<u64, &QueryError>) {
        let outcome = match result {
            Ok(rows) => {
                self.rows.inc_by(rows);
                "ok"
            }
            Err(QueryError::Refused(_)) => "refused",
            Err(QueryError::Invalid(_) | QueryError::DatabaseNotFound(_)) => "invalid",
            Err(QueryError::MemoryLimit { .. }) => "memory_limit",
            Err(QueryError::Timeout(_)) => "timeout",
            Err(QueryError::Busy(_)) => "busy",
            Err(QueryError::Internal(_)) => "error",
        };
        self.queries.get_or_create(&Outcome { outcome }).inc();
        self.duration_seconds
            .observe(started.elapsed().as_secs_f64());
    }
}
