//! The query engine: a sandboxed DataFusion session per query over one database, run under
//! a memory limit, a time limit and a cap on concurrent queries.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
    SchemaProvider, TableProvider,
};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::cache::cache_manager::{
    CacheManager, CacheManagerConfig, FileMetadataCache,
};
use datafusion::execution::disk_manager::{DiskManager, DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::object_store::{ObjectStoreRegistry, ObjectStoreUrl};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use futures::{Stream, StreamExt};
use object_store::ObjectStore;
use store::TableSource;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use url::Url;

use crate::catalog::{AllTables, DatabaseSchema};
use crate::metrics::QueryMetrics;
use crate::personal::PersonalAccess;
use crate::pg_catalog::PgSchema;
use crate::policy::{AccessPolicy, DecryptionLog};
use crate::sandbox::{self, SandboxError};

/// The URL under which the lake's object store is known to DataFusion. No other store is
/// registered, so no query can reach a file outside the lake.
pub const LAKE_URL: &str = "historian://lake/";

/// The catalog name sessions use; the database is its `public` schema.
pub const CATALOG: &str = "historian";

/// Limits and tuning of the query engine.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// Memory one query may use for sorts, joins and aggregations before it spills or fails.
    pub memory_limit_bytes: usize,
    /// Wall-clock limit of one query, planning and streaming included.
    pub timeout: Duration,
    /// Queries running at once; more wait up to `queue_timeout`, then are refused.
    pub max_concurrent: usize,
    /// How long a query waits for a slot.
    pub queue_timeout: Duration,
    /// The threads queries compute on (apart from the server's).
    pub threads: usize,
    /// The partitions one query's plan is split into. More than `threads` lets a thread
    /// whose partitions are done take another: a scan is split by byte ranges before
    /// row groups and pages are pruned and rows filtered, so equal ranges can hold very
    /// unequal work, and with one partition per thread the query ends when the slowest
    /// partition does while the other threads idle.
    pub target_partitions: usize,
    /// Where operators spill; `None` = the system's temporary directory.
    pub spill_dir: Option<PathBuf>,
    /// Evaluate filters while decoding Parquet (late materialisation): fewer values
    /// decoded for selective filters, more work for filters that keep most rows.
    pub parquet_pushdown_filters: bool,
    /// How far before a query's range `time_weighted_avg` looks for the value each series
    /// held when the range began; a series silent for longer starts at its first sample.
    pub time_weighted_lookback: Duration,
    /// Memory for lake files' footers and page indexes, shared by all queries; past it the
    /// least recently used are dropped and read again when next needed.
    pub metadata_cache_bytes: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        let threads = default_threads();
        QueryConfig {
            memory_limit_bytes: 1 << 30,
            timeout: Duration::from_secs(300),
            max_concurrent: 16,
            queue_timeout: Duration::from_secs(10),
            threads,
            target_partitions: PARTITIONS_PER_THREAD * threads,
            spill_dir: None,
            parquet_pushdown_filters: true,
            time_weighted_lookback: Duration::from_secs(24 * 3600),
            metadata_cache_bytes: 256 << 20,
        }
    }
}

impl QueryConfig {
    /// Sets the query threads (None = one per core) and the partitions of each query (None =
    /// [`PARTITIONS_PER_THREAD`] per thread).
    pub fn with_parallelism(mut self, threads: Option<usize>, partitions: Option<usize>) -> Self {
        self.threads = threads.unwrap_or_else(default_threads);
        self.target_partitions = partitions.unwrap_or(PARTITIONS_PER_THREAD * self.threads);
        self
    }
}

/// Partitions per query thread by default. Measured on two cores over the TSBS set
/// (BENCHMARKS.md): twice as many partitions as threads took the skew out of high-cpu-all's
/// scan and sped up the small queries; eight partitions cost the small queries more than
/// they gained.
pub const PARTITIONS_PER_THREAD: usize = 2;

/// One query thread per core.
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Refused by the sandbox.
    #[error(transparent)]
    Refused(#[from] SandboxError),
    /// No such database.
    #[error("database not found: {0}")]
    DatabaseNotFound(String),
    /// An error in the query: unknown table or column, wrong types, bad function call.
    #[error("{0}")]
    Invalid(String),
    /// The query needed more memory than its limit allows.
    #[error("query exceeded its memory limit of {limit_mib} MiB: {detail}")]
    MemoryLimit {
        /// The limit.
        limit_mib: usize,
        /// What DataFusion said.
        detail: String,
    },
    /// The query ran longer than its time limit.
    #[error("query exceeded its time limit of {0:?}")]
    Timeout(Duration),
    /// Too many queries at once.
    #[error("too many concurrent queries (limit {0}); retry later")]
    Busy(usize),
    /// A failure of the engine or the store, not of the query.
    #[error("query failed: {0}")]
    Internal(String),
}

impl QueryError {
    fn from_datafusion(e: DataFusionError, config: &QueryConfig) -> QueryError {
        let message = e.find_root().strip_backtrace();
        match e.find_root() {
            DataFusionError::ResourcesExhausted(detail) => QueryError::MemoryLimit {
                limit_mib: config.memory_limit_bytes >> 20,
                detail: detail.clone(),
            },
            DataFusionError::SQL(..)
            | DataFusionError::Plan(_)
            | DataFusionError::SchemaError(..)
            | DataFusionError::NotImplemented(_)
            | DataFusionError::Execution(_)
            | DataFusionError::ArrowError(..) => QueryError::Invalid(message),
            _ => QueryError::Internal(message),
        }
    }
}

/// The object stores DataFusion may read: the lake, and nothing else (no `file://`).
#[derive(Debug)]
struct LakeOnlyRegistry {
    url: Url,
    store: Arc<dyn ObjectStore>,
}

impl ObjectStoreRegistry for LakeOnlyRegistry {
    fn register_store(
        &self,
        _url: &Url,
        _store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        // Sessions never register stores; one that tried gets nothing reachable.
        None
    }

    fn get_store(&self, url: &Url) -> datafusion::error::Result<Arc<dyn ObjectStore>> {
        if url.scheme() == self.url.scheme() && url.host_str() == self.url.host_str() {
            Ok(self.store.clone())
        } else {
            Err(DataFusionError::Plan(format!(
                "queries may read only the tables of the lake, not {}",
                url.scheme()
            )))
        }
    }
}

/// Runs SQL over the live tables.
#[derive(Debug)]
pub struct QueryEngine {
    source: Arc<dyn TableSource>,
    /// Parquet footers and page indexes, shared by all queries: files are immutable and
    /// their paths never reused, so an entry never goes stale.
    metadata_cache: Arc<FileMetadataCache>,
    /// Where queries spill, shared by all of them: one working directory for the server's
    /// life instead of one created and removed per query (a `mkdir` and an `rmdir` on the
    /// path of every query, also of those that never spill), and one bound on the spilled
    /// bytes of all queries together. The error, if the directory could not be made, is
    /// each query's.
    disk_manager: Result<Arc<DiskManager>, String>,
    registry: Arc<LakeOnlyRegistry>,
    config: QueryConfig,
    slots: Arc<Semaphore>,
    metrics: Arc<QueryMetrics>,
    keyring: Option<Arc<privacy::Keyring>>,
    executor: Executor,
}

/// The threads queries compute on, apart from the server's: a query that keeps every
/// core busy for a while cannot starve the accept loops, the write path, cancel requests
/// or the client connections that stream results (the shape of InfluxDB 3's dedicated
/// executor).
#[derive(Debug)]
struct Executor {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Executor {
    fn new(threads: usize) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("historian-query")
            .enable_all()
            .build()
            .map_err(|e| tracing::warn!(error = %e, "no query threads; queries share the server's"))
            .ok();
        Executor { runtime }
    }

    /// Runs `work` on the query threads; dropping the returned future aborts it.
    async fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, DataFusionError>> + Send + 'static,
    ) -> Result<T, DataFusionError> {
        let Some(runtime) = &self.runtime else {
            return work.await;
        };
        struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
        impl<T> Drop for AbortOnDrop<T> {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let mut handle = AbortOnDrop(runtime.spawn(work));
        (&mut handle.0)
            .await
            .map_err(|e| DataFusionError::Internal(format!("the query's task failed: {e}")))?
    }

    /// Runs `plan` on the query threads; its batches arrive through the returned stream.
    /// Dropping the stream stops the plan at its next yield.
    fn execute(
        &self,
        plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
        task: Arc<datafusion::execution::TaskContext>,
    ) -> SendableRecordBatchStream {
        let schema = plan.schema();
        let Some(runtime) = &self.runtime else {
            return match datafusion::physical_plan::execute_stream(plan, task) {
                Ok(s) => s,
                Err(e) => Box::pin(
                    datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                        schema,
                        futures::stream::once(async move { Err(e) }),
                    ),
                ),
            };
        };
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        runtime.spawn(async move {
            let mut stream = match datafusion::physical_plan::execute_stream(plan, task) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    // The client went away or the query was cancelled.
                    _ = tx.closed() => return,
                };
                let Some(item) = item else { return };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        let batches = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(schema, batches))
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // Dropped inside the server's runtime: do not block on the query threads.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Per-query settings beyond the SQL.
#[derive(Debug, Clone, Default)]
pub struct QueryOptions {
    /// Which tables the session holds and how it sees them; None = every table, personal
    /// columns masked.
    pub policy: Option<Arc<dyn AccessPolicy>>,
    /// Tables beyond the lake's (the audit log, for auditors).
    pub extra_tables: HashMap<String, Arc<dyn TableProvider>>,
    /// Where the query notes what it decrypted.
    pub decryption_log: Option<Arc<DecryptionLog>>,
    /// The time the query runs at (retention horizons); None = now. For tests and replays.
    pub now_ns: Option<i64>,
    /// Present the catalogs as PostgreSQL does, for PostgreSQL clients: `pg_catalog`, and
    /// an `information_schema` with PostgreSQL's type names (both of the caller's view).
    pub postgres_catalog: bool,
}

impl QueryEngine {
    /// An engine over `source`, reading Parquet files from `lake`.
    pub fn new(
        source: Arc<dyn TableSource>,
        lake: Arc<dyn ObjectStore>,
        config: QueryConfig,
        metrics: Arc<QueryMetrics>,
    ) -> Self {
        let url = Url::parse(LAKE_URL).expect("a valid constant URL");
        let metadata_cache = CacheManager::try_new(
            &CacheManagerConfig::default().with_metadata_cache_limit(config.metadata_cache_bytes),
        )
        .map(|m| m.get_file_metadata_cache())
        .expect("a cache configuration that only sets the metadata limit is valid");
        let executor = Executor::new(config.threads);
        let mode = match &config.spill_dir {
            Some(dir) => DiskManagerMode::Directories(vec![dir.clone()]),
            None => DiskManagerMode::OsTmpDirectory,
        };
        let disk_manager = DiskManagerBuilder::default()
            .with_mode(mode)
            .build()
            .map(Arc::new)
            .map_err(|e| format!("no spill directory: {}", e.strip_backtrace()));
        QueryEngine {
            source,
            metadata_cache,
            disk_manager,
            registry: Arc::new(LakeOnlyRegistry { url, store: lake }),
            slots: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            config,
            metrics,
            keyring: None,
            executor,
        }
    }

    /// Decrypts personal columns with `keyring` for sessions whose access allows it.
    pub fn with_keyring(mut self, keyring: Option<Arc<privacy::Keyring>>) -> Self {
        self.keyring = keyring;
        self
    }

    /// The engine's limits.
    pub fn config(&self) -> &QueryConfig {
        &self.config
    }

    /// Databases with tables.
    pub fn databases(&self) -> Vec<String> {
        self.source.databases()
    }

    /// A sandboxed session whose only tables are those of `db`, personal columns masked.
    pub fn session(&self, db: &str) -> Result<SessionContext, QueryError> {
        self.session_with(db, QueryOptions::default())
    }

    /// A sandboxed session whose only tables are those of `db`, seen with `options`.
    pub fn session_with(&self, db: &str, seen: QueryOptions) -> Result<SessionContext, QueryError> {
        let now_ns = seen.now_ns.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0)
        });
        let mut config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG, "public")
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(!seen.postgres_catalog)
            .with_target_partitions(self.config.target_partitions.max(1));
        let options = config.options_mut();
        options.execution.parquet.pushdown_filters = self.config.parquet_pushdown_filters;
        options.execution.parquet.reorder_filters = true;
        // The lake's files carry no bloom filters (the persister writes none); looking for
        // them costs a lookup per row group and column of every query.
        options.execution.parquet.bloom_filter_on_read = false;
        let runtime = RuntimeEnvBuilder {
            disk_manager: Some(self.disk_manager.clone().map_err(QueryError::Internal)?),
            ..RuntimeEnvBuilder::new()
        }
        .with_memory_pool(Arc::new(FairSpillPool::new(self.config.memory_limit_bytes)))
        .with_object_store_registry(self.registry.clone())
        .with_cache_manager(
            CacheManagerConfig::default()
                .with_file_metadata_cache(Some(self.metadata_cache.clone())),
        )
        .build_arc()
        .map_err(|e| QueryError::Internal(e.strip_backtrace()))?;
        let lake_url = ObjectStoreUrl::parse(LAKE_URL).expect("a valid constant URL");
        let policy = seen
            .policy
            .unwrap_or_else(|| Arc::new(AllTables(PersonalAccess::Masked)));
        let schema: Arc<dyn SchemaProvider> = Arc::new(
            DatabaseSchema::new(db, self.source.clone(), lake_url, now_ns)
                .with_policy(self.keyring.clone(), policy, seen.decryption_log)
                .with_extra_tables(seen.extra_tables),
        );
        let catalog = MemoryCatalogProvider::new();
        if seen.postgres_catalog {
            let internal = |e: DataFusionError| QueryError::Internal(e.strip_backtrace());
            catalog
                .register_schema(
                    "pg_catalog",
                    Arc::new(PgSchema::catalog(schema.clone(), db)),
                )
                .map_err(internal)?;
            catalog
                .register_schema(
                    "information_schema",
                    Arc::new(PgSchema::information_schema(schema.clone(), db)),
                )
                .map_err(internal)?;
        }
        catalog
            .register_schema("public", schema)
            .map_err(|e| QueryError::Internal(e.strip_backtrace()))?;
        let catalogs = MemoryCatalogProviderList::new();
        catalogs.register_catalog(CATALOG.to_string(), Arc::new(catalog));
        let builder = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            // No CREATE EXTERNAL TABLE formats, no file formats: nothing reads files.
            .with_table_factories(HashMap::new())
            .with_file_formats(Vec::new())
            .with_catalog_list(Arc::new(catalogs));
        let lookback_ns =
            i64::try_from(self.config.time_weighted_lookback.as_nanos()).unwrap_or(i64::MAX);
        let state = crate::functions::install(builder, lookback_ns).build();
        let ctx = SessionContext::new_with_state(state);
        crate::functions::register(&ctx);
        crate::functions::postgres::register(&ctx, db);
        Ok(ctx)
    }

    /// Plans and starts `sql` against `db` with personal columns masked; the result streams.
    pub async fn query(&self, db: &str, sql: &str) -> Result<QueryStream, QueryError> {
        self.query_with(db, sql, QueryOptions::default()).await
    }

    /// Plans and starts `sql` against `db`, seen with `options`; the result streams.
    pub async fn query_with(
        &self,
        db: &str,
        sql: &str,
        options: QueryOptions,
    ) -> Result<QueryStream, QueryError> {
        let started = Instant::now();
        let result = self.start(db, sql, started, options).await;
        if let Err(e) = &result {
            self.metrics.finished(started, Err(e));
        }
        result
    }

    /// Plans `sql` against `db` as `options` sees it, without running it: the types of its
    /// `$n` parameters (None where the query does not fix one) and its result's schema.
    /// The sandbox and the policy apply as they do to a query; nothing is read.
    pub async fn describe(
        &self,
        db: &str,
        sql: &str,
        options: QueryOptions,
    ) -> Result<(Vec<Option<arrow::datatypes::DataType>>, SchemaRef), QueryError> {
        sandbox::check(sql)?;
        let ctx = self.session_with(db, options)?;
        let df = ctx
            .sql_with_options(sql, queries_only())
            .await
            .map_err(|e| QueryError::from_datafusion(e, &self.config))?;
        let plan = df.logical_plan();
        let types = plan
            .get_parameter_types()
            .map_err(|e| QueryError::from_datafusion(e, &self.config))?;
        // `$1`, `$2`, ... in order; a gap (a parameter the text never uses) has no type.
        let count = types
            .keys()
            .filter_map(|k| k.strip_prefix('$')?.parse::<usize>().ok())
            .max()
            .unwrap_or(0);
        // PostgreSQL's limit: a statement names at most 65,535 parameters.
        if count > u16::MAX as usize {
            return Err(QueryError::Invalid(format!(
                "a statement may use at most {} parameters, not ${count}",
                u16::MAX
            )));
        }
        let params = (1..=count)
            .map(|i| types.get(&format!("${i}")).cloned().flatten())
            .collect();
        Ok((params, plan.schema().inner().clone()))
    }

    async fn start(
        &self,
        db: &str,
        sql: &str,
        started: Instant,
        query_options: QueryOptions,
    ) -> Result<QueryStream, QueryError> {
        sandbox::check(sql)?;
        // PostgreSQL clients connect to a database before it has tables and query the
        // catalogs: a database without tables is empty for them, not missing.
        if query_options.extra_tables.is_empty()
            && !query_options.postgres_catalog
            && !self.source.databases().iter().any(|d| d == db)
        {
            return Err(QueryError::DatabaseNotFound(db.to_string()));
        }
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::time::timeout(
                self.config.queue_timeout,
                self.slots.clone().acquire_owned(),
            )
            .await
            .map_err(|_| QueryError::Busy(self.config.max_concurrent))?
            .map_err(|_| QueryError::Busy(self.config.max_concurrent))?,
        };
        let deadline = tokio::time::Instant::from_std(started) + self.config.timeout;
        let ctx = self.session_with(db, query_options)?;
        let options = queries_only();
        // Planning can be heavy too (table functions materialise at planning): it runs
        // on the query threads as well.
        let text = sql.to_string();
        let planned = self.executor.run(async move {
            let df = ctx.sql_with_options(&text, options).await?;
            let touched = tables_touched(df.logical_plan());
            let task = df.task_ctx();
            let plan = df.create_physical_plan().await?;
            Ok::<_, DataFusionError>((plan, Arc::new(task), touched))
        });
        let (plan, task, touched) = match tokio::time::timeout_at(deadline, planned).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(QueryError::from_datafusion(e, &self.config)),
            Err(_) => return Err(QueryError::Timeout(self.config.timeout)),
        };
        let stream = self.executor.execute(plan, task);
        self.metrics.running.inc();
        Ok(QueryStream {
            schema: stream.schema(),
            inner: stream,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            started,
            rows: 0,
            outcome: None,
            touched,
            _permit: permit,
        })
    }
}

/// Planning options that admit queries only (the sandbox checked the text already).
fn queries_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// The tables a plan reads (subqueries included) and, per table, the columns it reads.
fn tables_touched(plan: &LogicalPlan) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let schema = scan.source.schema();
            let columns: Vec<String> = match &scan.projection {
                Some(p) => p.iter().map(|i| schema.field(*i).name().clone()).collect(),
                None => schema.fields().iter().map(|f| f.name().clone()).collect(),
            };
            let table = scan.table_name.table().to_string();
            match out.iter_mut().find(|(t, _)| *t == table) {
                Some((_, cols)) => {
                    for c in columns {
                        if !cols.contains(&c) {
                            cols.push(c);
                        }
                    }
                }
                None => out.push((table, columns)),
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

/// A running query's result. Dropping it cancels the query.
pub struct QueryStream {
    schema: SchemaRef,
    inner: SendableRecordBatchStream,
    deadline: Pin<Box<tokio::time::Sleep>>,
    config: QueryConfig,
    metrics: Arc<QueryMetrics>,
    started: Instant,
    rows: u64,
    /// Set once the stream has ended, with or without error.
    outcome: Option<Result<(), ()>>,
    touched: Vec<(String, Vec<String>)>,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for QueryStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryStream")
            .field("schema", &self.schema)
            .field("rows", &self.rows)
            .finish()
    }
}

impl QueryStream {
    /// The result's schema.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Rows streamed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The tables the query reads and, per table, the columns.
    pub fn touched(&self) -> &[(String, Vec<String>)] {
        &self.touched
    }
}

impl Stream for QueryStream {
    type Item = Result<RecordBatch, QueryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.outcome.is_some() {
            return Poll::Ready(None);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let e = QueryError::Timeout(self.config.timeout);
            self.metrics.finished(self.started, Err(&e));
            self.outcome = Some(Err(()));
            return Poll::Ready(Some(Err(e)));
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(batch))) => {
                self.rows += batch.num_rows() as u64;
                Poll::Ready(Some(Ok(batch)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e = QueryError::from_datafusion(e, &self.config);
                self.metrics.finished(self.started, Err(&e));
                self.outcome = Some(Err(()));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.metrics.finished(self.started, Ok(self.rows));
                self.outcome = Some(Ok(()));
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for QueryStream {
    fn drop(&mut self) {
        self.metrics.running.dec();
        if self.outcome.is_none() {
            // The client went away before the end: the query is cancelled.
            self.metrics.cancelled.inc();
        }
    }
}
