//! The one path every query takes, whatever the interface: the caller's policy decides
//! which tables the session holds and how it sees them, the engine's sandbox checks the
//! SQL, and the audit log records the query when its result ends (rows, duration,
//! outcome, what was decrypted), also when it fails or the client goes away. A role that
//! may decrypt also has a `query_start` record written before the first row is served.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use arrow::array::{ArrayRef, BooleanArray, StringArray, TimestampNanosecondArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use futures::{Stream, StreamExt};
use query::{DecryptionLog, QueryEngine, QueryError, QueryOptions, QueryStream};

use crate::audit::{AuditEvent, AuditLog, AuditRecord};
use crate::auth::Caller;
use crate::role::Role;

/// The interface name of the PostgreSQL wire protocol, in the audit log.
pub const PGWIRE: &str = "pgwire";

/// The name under which auditors see the audit log.
pub const AUDIT_TABLE: &str = "audit_log";

/// Runs `sql` against `db` as `caller`; the result streams and is audited when it ends.
pub async fn query(
    engine: &QueryEngine,
    audit: &Arc<AuditLog>,
    caller: &Caller,
    interface: &str,
    db: &str,
    sql: &str,
) -> Result<AuditedStream, QueryError> {
    let started = Instant::now();
    let decryption_log = Arc::new(DecryptionLog::default());
    let mut event = caller.event("query", interface);
    event.fields.sql = Some(sql.to_string());
    let options = caller_options(audit, caller, interface, Some(decryption_log.clone())).await?;
    match engine.query_with(db, sql, options).await {
        Ok(inner) => {
            for (table, columns) in inner.touched() {
                event.fields.tables.push(table.clone());
                event
                    .fields
                    .columns
                    .extend(columns.iter().map(|c| format!("{table}.{c}")));
            }
            if caller.role.reads_clear() {
                // A role that may decrypt has the query on record, fsynced, before any row
                // is served: a crash or a stalled client cannot keep the access off the log.
                let mut start = event.clone();
                start.fields.kind = "query_start".into();
                start.fields.outcome = "started".into();
                audit.record(start).await;
            }
            Ok(AuditedStream {
                inner,
                audit: audit.clone(),
                event: Some(event),
                decryption_log,
                started,
            })
        }
        Err(e) => {
            event.fields.outcome = format!("error: {e}");
            event.fields.duration_ms = Some(started.elapsed().as_millis() as u64);
            audit.record(event).await;
            Err(e)
        }
    }
}

/// Plans `sql` as `caller` would run it, without running it: its parameters' types and
/// its result's schema, for clients that prepare statements. Nothing is read, so only a
/// refusal is audited; running the statement later goes through [`query`] and is checked
/// again.
pub async fn describe(
    engine: &QueryEngine,
    audit: &Arc<AuditLog>,
    caller: &Caller,
    interface: &str,
    db: &str,
    sql: &str,
) -> Result<(Vec<Option<DataType>>, SchemaRef), QueryError> {
    let options = caller_options(audit, caller, interface, None).await?;
    let described = engine.describe(db, sql, options).await;
    if let Err(e) = &described {
        // A statement refused while being prepared is an attempt on record, as a
        // refused query is.
        let mut event = caller.event("query", interface);
        event.fields.sql = Some(sql.to_string());
        event.fields.outcome = format!("error: {e}");
        audit.record(event).await;
    }
    described
}

/// The tables `caller` sees in `db`, with their schemas as the caller sees them.
pub async fn tables(
    engine: &QueryEngine,
    audit: &Arc<AuditLog>,
    caller: &Caller,
    interface: &str,
    db: &str,
) -> Result<Vec<(String, SchemaRef)>, QueryError> {
    let options = caller_options(audit, caller, interface, None).await?;
    let ctx = engine.session_with(db, options)?;
    let schema = ctx
        .catalog(query::engine::CATALOG)
        .and_then(|c| c.schema("public"))
        .ok_or_else(|| QueryError::Internal("the session has no public schema".into()))?;
    let mut names = schema.table_names();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        if let Some(table) = schema
            .table(&name)
            .await
            .map_err(|e| QueryError::Internal(e.strip_backtrace()))?
        {
            out.push((name, table.schema()));
        }
    }
    Ok(out)
}

/// How `caller` sees the database: their policy, the audit log for auditors, and the
/// catalogs as PostgreSQL presents them for PostgreSQL clients.
async fn caller_options(
    audit: &Arc<AuditLog>,
    caller: &Caller,
    interface: &str,
    decryption_log: Option<Arc<DecryptionLog>>,
) -> Result<QueryOptions, QueryError> {
    let mut extra_tables: HashMap<String, Arc<dyn TableProvider>> = HashMap::new();
    if caller.role == Role::Auditor {
        let table = audit_table(audit)
            .await
            .map_err(|e| QueryError::Internal(format!("cannot read the audit log: {e}")))?;
        extra_tables.insert(AUDIT_TABLE.to_string(), table);
    }
    Ok(QueryOptions {
        policy: Some(caller.policy()),
        extra_tables,
        decryption_log,
        now_ns: None,
        postgres_catalog: interface == PGWIRE,
    })
}

/// A query's result that records the query in the audit log when it ends.
pub struct AuditedStream {
    inner: QueryStream,
    audit: Arc<AuditLog>,
    /// Taken when recorded.
    event: Option<AuditEvent>,
    decryption_log: Arc<DecryptionLog>,
    started: Instant,
}

impl AuditedStream {
    /// The result's schema.
    pub fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn finish(&mut self, outcome: String) {
        let Some(mut event) = self.event.take() else {
            return;
        };
        event.fields.rows = Some(self.inner.rows());
        event.fields.duration_ms = Some(self.started.elapsed().as_millis() as u64);
        event.fields.outcome = outcome;
        event.key_ids = self.decryption_log.key_ids();
        event.fields.personal_decrypted = self.decryption_log.cells() > 0;
        let audit = self.audit.clone();
        // Drop cannot wait: the append runs on its own.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { audit.record(event).await });
        } else if let Err(e) = audit.append(event) {
            tracing::error!(error = %e, "could not append to the audit log");
        }
    }
}

impl Stream for AuditedStream {
    type Item = Result<RecordBatch, QueryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.inner.poll_next_unpin(cx);
        match &polled {
            Poll::Ready(None) => self.finish("ok".into()),
            Poll::Ready(Some(Err(e))) => self.finish(format!("error: {e}")),
            _ => {}
        }
        polled
    }
}

impl Drop for AuditedStream {
    fn drop(&mut self) {
        self.finish("cancelled: the client went away".into());
    }
}

/// The audit log as a table, for auditors: every kept record, sealed parts left out.
async fn audit_table(audit: &AuditLog) -> Result<Arc<dyn TableProvider>, String> {
    let records: Vec<AuditRecord> = audit
        .records()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("seq", DataType::UInt64, false),
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
            false,
        ),
        Field::new("kind", DataType::Utf8, false),
        Field::new("user", DataType::Utf8, false),
        Field::new("role", DataType::Utf8, false),
        Field::new("interface", DataType::Utf8, false),
        Field::new("client", DataType::Utf8, false),
        Field::new("sql", DataType::Utf8, true),
        Field::new("tables", DataType::Utf8, false),
        Field::new("columns", DataType::Utf8, false),
        Field::new("personal_decrypted", DataType::Boolean, false),
        Field::new("rows", DataType::UInt64, true),
        Field::new("duration_ms", DataType::UInt64, true),
        Field::new("outcome", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, true),
    ]));
    let text = |f: &dyn Fn(&AuditRecord) -> Option<String>| -> ArrayRef {
        Arc::new(records.iter().map(f).collect::<StringArray>())
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(records.iter().map(|r| r.seq).collect::<UInt64Array>()),
        Arc::new(
            TimestampNanosecondArray::from(records.iter().map(|r| r.time_ns).collect::<Vec<_>>())
                .with_timezone("UTC"),
        ),
        text(&|r| Some(r.fields.kind.clone())),
        text(&|r| Some(r.fields.user.clone())),
        text(&|r| Some(r.fields.role.clone())),
        text(&|r| Some(r.fields.interface.clone())),
        text(&|r| Some(r.fields.client.clone())),
        text(&|r| r.fields.sql.clone()),
        text(&|r| Some(r.fields.tables.join(","))),
        text(&|r| Some(r.fields.columns.join(","))),
        Arc::new(
            records
                .iter()
                .map(|r| Some(r.fields.personal_decrypted))
                .collect::<BooleanArray>(),
        ),
        Arc::new(
            records
                .iter()
                .map(|r| r.fields.rows)
                .collect::<UInt64Array>(),
        ),
        Arc::new(
            records
                .iter()
                .map(|r| r.fields.duration_ms)
                .collect::<UInt64Array>(),
        ),
        text(&|r| Some(r.fields.outcome.clone())),
        text(&|r| r.fields.detail.clone()),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())?;
    let table = MemTable::try_new(schema, vec![vec![batch]]).map_err(|e| e.to_string())?;
    Ok(Arc::new(table))
}
