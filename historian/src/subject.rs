//! Subject requests for the data-protection role: export (GDPR Art. 15 and 20), erasure
//! (Art. 17) and the inventory for the records of processing, over HTTP and as
//! `historian subject ...`.
//!
//! The subject value travels in a POST body only (never in a URL, where access logs would
//! keep it) and is never logged. Until access control exists, these endpoints answer
//! clients on the loopback interface only.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::DataType;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use datafusion::logical_expr::{Expr, col, lit};
use datafusion::scalar::ScalarValue;
use futures::TryStreamExt;
use ingest::Ingester;
use query::{PersonalAccess, QueryEngine, QueryOptions, RowPolicy, TableAccess, TablePolicies};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::audit::AuditLog;
use crate::auth::{Caller, forbidden};
use crate::client::ServerArgs;
use crate::http::AppState;
use crate::role::Role;

/// The body of an export or erasure request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectRequest {
    /// The subject's identifying value as written (e.g. an employee id).
    pub subject: String,
    /// Export format: `json` (default) or `csv`.
    #[serde(default)]
    pub format: Option<String>,
}

/// Why a subject request failed.
#[derive(Debug, thiserror::Error)]
pub enum SubjectError {
    /// No keyring: no table has subjects.
    #[error("no table's privacy profile names subjects")]
    NoProfiles,
    /// A query failed.
    #[error("export query on {table} failed: {message}")]
    Query {
        /// `db/table`.
        table: String,
        /// The engine's message.
        message: String,
    },
}

fn dictionary_literal(value: &str) -> Expr {
    lit(ScalarValue::Dictionary(
        Box::new(DataType::Int32),
        Box::new(ScalarValue::Utf8(Some(value.to_string()))),
    ))
}

/// Every row of one subject, decrypted, across tables, partitions and subject columns:
/// JSON objects with `db`, `table` and `subject_columns` (which columns name the subject)
/// added.
pub async fn export(
    ingester: &Ingester,
    engine: &QueryEngine,
    subject: &str,
) -> Result<Vec<Map<String, Value>>, SubjectError> {
    let keyring = ingester.keyring.as_ref().ok_or(SubjectError::NoProfiles)?;
    let entries = keyring.subject_entries(&keyring.subject_hash(subject));
    let mut pseudonyms: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut keys: BTreeMap<String, std::collections::HashSet<u64>> = BTreeMap::new();
    for e in &entries {
        pseudonyms
            .entry(e.scope.clone())
            .or_default()
            .push(e.pseudonym.clone());
        keys.entry(e.scope.clone()).or_default().insert(e.key_id);
    }
    let mut rows = Vec::new();
    for (scope, names) in pseudonyms {
        let Some((db, table)) = scope.split_once('/') else {
            continue;
        };
        let Some(t) = ingester.catalog.table(db, table) else {
            continue;
        };
        // Subject columns the table has (one may not have been written yet).
        let schema = t.schema();
        let subject_columns: Vec<String> = t
            .options
            .subjects
            .keys()
            .filter(|c| schema.column_type(c).is_some())
            .cloned()
            .collect();
        if subject_columns.is_empty() {
            continue;
        }
        // Rows whose subject columns hold one of the subject's pseudonyms: a filter on the
        // stored tags, so files and row groups without them are skipped.
        let barrier = subject_columns
            .iter()
            .map(|c| {
                col(c.as_str())
                    .in_list(names.iter().map(|n| dictionary_literal(n)).collect(), false)
            })
            .reduce(Expr::or)
            .expect("checked not empty");
        let access = TableAccess {
            default: PersonalAccess::Clear,
            columns: Default::default(),
            rows: Some(RowPolicy::Expr(barrier)),
            // Files whose key bitmaps do not name the subject's keys are not read.
            subject_keys: keys.remove(&scope).map(Arc::new),
        };
        let options = QueryOptions {
            policy: Some(Arc::new(TablePolicies(
                [(table.to_string(), access)].into(),
            ))),
            ..QueryOptions::default()
        };
        let failed = |message: String| SubjectError::Query {
            table: scope.clone(),
            message,
        };
        let sql = format!(
            "SELECT * FROM \"{}\" ORDER BY time",
            table.replace('"', "\"\"")
        );
        let stream = engine
            .query_with(db, &sql, options)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let batches: Vec<_> = stream
            .try_collect()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let mut writer = arrow::json::ArrayWriter::new(Vec::new());
        for b in &batches {
            writer.write(b).map_err(|e| failed(e.to_string()))?;
        }
        writer.finish().map_err(|e| failed(e.to_string()))?;
        let bytes = writer.into_inner();
        let objects: Vec<Map<String, Value>> = if bytes.is_empty() {
            Vec::new()
        } else {
            serde_json::from_slice(&bytes).map_err(|e| failed(e.to_string()))?
        };
        for mut o in objects {
            let named: Vec<Value> = subject_columns
                .iter()
                .filter(|c| o.get(c.as_str()).and_then(Value::as_str) == Some(subject))
                .map(|c| Value::String(c.clone()))
                .collect();
            o.insert("db".into(), Value::String(db.to_string()));
            o.insert("table".into(), Value::String(table.to_string()));
            o.insert("subject_columns".into(), Value::Array(named));
            rows.push(o);
        }
    }
    Ok(rows)
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// An export as CSV in long form, one line per non-null cell, so rows of tables with
/// different columns fit one file: `db,table,time,column,value`.
pub fn export_csv(rows: &[Map<String, Value>]) -> String {
    let mut out = String::from("db,table,time,column,value\n");
    for r in rows {
        let get = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default();
        for (k, v) in r {
            if matches!(k.as_str(), "db" | "table" | "time" | "subject_columns") || v.is_null() {
                continue;
            }
            let value = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!(
                "{},{},{},{},{}\n",
                csv_field(get("db")),
                csv_field(get("table")),
                csv_field(get("time")),
                csv_field(k),
                csv_field(&value)
            ));
        }
    }
    out
}

/// The records-of-processing inventory: per table with a privacy profile, its personal
/// columns, subjects, oldest and newest personal data, and the retention that applies.
pub async fn inventory(ingester: &Ingester, engine: &QueryEngine) -> Value {
    let status = ingester.keyring.as_ref().map(|k| k.status());
    let mut tables = Vec::new();
    for t in ingester.catalog.tables() {
        if !t.options.has_profile() || t.column_count() <= 1 {
            continue;
        }
        let scope = store::key_scope(&t.db, &t.name);
        let keys = status.as_ref().and_then(|s| s.scopes.get(&scope));
        let (mut oldest, mut newest) = (Value::Null, Value::Null);
        let schema = t.schema();
        if t.options
            .subjects
            .keys()
            .any(|c| schema.column_type(c).is_some())
        {
            let any_subject = t
                .options
                .subjects
                .keys()
                .filter(|c| schema.column_type(c).is_some())
                .map(|c| format!("\"{c}\" IS NOT NULL"))
                .collect::<Vec<_>>()
                .join(" OR ");
            let sql = format!(
                "SELECT CAST(min(time) AS VARCHAR) AS oldest, CAST(max(time) AS VARCHAR) AS newest FROM \"{}\" WHERE {any_subject}",
                t.name
            );
            if let Ok(stream) = engine.query(&t.db, &sql).await
                && let Ok(batches) = stream.try_collect::<Vec<_>>().await
                && let Some(b) = batches.iter().find(|b| b.num_rows() > 0)
            {
                let text = |i: usize| {
                    let c = arrow::compute::cast(b.column(i), &DataType::Utf8).ok()?;
                    let s = c.as_any().downcast_ref::<arrow::array::StringArray>()?;
                    arrow::array::Array::is_valid(s, 0)
                        .then(|| Value::String(s.value(0).to_string()))
                };
                oldest = text(0).unwrap_or(Value::Null);
                newest = text(1).unwrap_or(Value::Null);
            }
        }
        tables.push(json!({
            "db": t.db,
            "table": t.name,
            "subjects": t.options.subjects,
            "allowed_columns": t.options.columns,
            "dropped_columns": t.options.drop,
            "subjects_with_live_keys": keys.map_or(0, |k| k.subjects),
            "live_keys": keys.map_or(0, |k| k.keys),
            "oldest_personal_data": oldest,
            "newest_personal_data": newest,
            "retention": {
                "ttl": t.options.ttl.map(duration_text),
                "personal_ttl": t.options.personal_ttl.map(duration_text),
                "key_period": t.options.key_period,
            },
        }));
    }
    json!({
        "tables": tables,
        "keys_destroyed": status.map(|s| s.destroyed).unwrap_or_default(),
    })
}

/// A retention as configured: whole days as `90d`, anything else in humantime form.
fn duration_text(d: std::time::Duration) -> String {
    if d.as_secs().is_multiple_of(86_400) && d.subsec_nanos() == 0 {
        format!("{}d", d.as_secs() / 86_400)
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// Who accessed one subject's data: the audited queries that decrypted cells under one of
/// the subject's data keys, and the subject requests made about them.
pub async fn access_records(
    ingester: &Ingester,
    audit: &AuditLog,
    subject: &str,
) -> Result<Vec<Value>, String> {
    let Some(keyring) = ingester.keyring.as_ref() else {
        return Ok(Vec::new());
    };
    let keys: std::collections::HashSet<u64> = keyring
        .subject_entries(&keyring.subject_hash(subject))
        .iter()
        .map(|e| e.key_id)
        .collect();
    let records = audit.records().await.map_err(|e| e.to_string())?;
    Ok(records
        .into_iter()
        .filter(|(_, sealed)| {
            sealed.as_ref().is_some_and(|s| {
                s.key_ids.iter().any(|k| keys.contains(k)) || s.subject.as_deref() == Some(subject)
            })
        })
        .map(|(r, _)| {
            json!({
                "time": chrono::DateTime::from_timestamp_nanos(r.time_ns).to_rfc3339(),
                "kind": r.fields.kind,
                "user": r.fields.user,
                "role": r.fields.role,
                "interface": r.fields.interface,
                "client": r.fields.client,
                "sql": r.fields.sql,
                "tables": r.fields.tables,
                "audit_seq": r.seq,
            })
        })
        .collect())
}

/// Subject requests are the data-protection officer's.
fn refuse_unless_dpo(caller: &Caller) -> Option<Response> {
    (caller.role != Role::Dpo).then(|| forbidden("subject requests need the dpo role"))
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": message})),
    )
        .into_response()
}

/// A subject request from the dpo with a well-formed body, or the answer.
fn accept(caller: &Caller, body: &[u8]) -> Result<SubjectRequest, Box<Response>> {
    if let Some(r) = refuse_unless_dpo(caller) {
        return Err(Box::new(r));
    }
    let req: SubjectRequest = serde_json::from_slice(body)
        .map_err(|e| Box::new(bad_request(format!("invalid JSON body: {e}"))))?;
    if req.subject.is_empty() {
        return Err(Box::new(bad_request("subject must not be empty".into())));
    }
    Ok(req)
}

fn failure(e: SubjectError) -> Response {
    let status = match e {
        SubjectError::NoProfiles => StatusCode::NOT_FOUND,
        SubjectError::Query { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, axum::Json(json!({"error": e.to_string()}))).into_response()
}

/// `POST /api/v3/subjects/export` with `{"subject": "...", "format": "json"|"csv"}`.
pub async fn export_handler(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Response {
    let req = match accept(&caller, &body) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    let exported = export(&s.ingester, &s.query, &req.subject).await;
    let mut event = caller.event("subject_export", "http");
    event.subject = Some(req.subject.clone());
    event.fields.personal_decrypted = true;
    if let Ok(rows) = &exported {
        event.fields.rows = Some(rows.len() as u64);
    }
    if let Err(e) = &exported {
        event.fields.outcome = format!("error: {e}");
    }
    // Recorded before it is answered: the export itself is an access to the data.
    s.audit.record(event).await;
    let rows = match exported {
        Ok(r) => r,
        Err(e) => return failure(e),
    };
    tracing::info!(rows = rows.len(), "subject export served");
    match req.format.as_deref().unwrap_or("json") {
        "json" => {
            let access = match access_records(&s.ingester, &s.audit, &req.subject).await {
                Ok(a) => a,
                Err(e) => {
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        axum::Json(json!({"error": format!("cannot read the audit log: {e}")})),
                    )
                        .into_response();
                }
            };
            axum::Json(json!({"rows": rows, "access": access})).into_response()
        }
        "csv" => (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            export_csv(&rows),
        )
            .into_response(),
        other => bad_request(format!("unsupported format {other:?}; use json or csv")),
    }
}

/// `POST /api/v3/subjects/erase` with `{"subject": "..."}`: answers the erasure receipt.
pub async fn erase_handler(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Response {
    let req = match accept(&caller, &body) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    let mut event = caller.event("subject_erase", "http");
    event.subject = Some(req.subject.clone());
    // The keys go first and the purge and the audit record must follow even if the client
    // gives up meanwhile (a dropped handler would stop between them): the erasure runs as
    // a task of its own, which the handler only waits for.
    let state = s.clone();
    let erasure = tokio::spawn(async move {
        let erased = state.ingester.erase_subject(&req.subject).await;
        if let Err(e) = &erased {
            event.fields.outcome = format!("error: {e}");
        }
        state.audit.record(event).await;
        erased
    });
    let erased = match erasure.await {
        Ok(erased) => erased,
        Err(e) => {
            tracing::error!(error = %e, "the erasure task failed");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": "the erasure failed; see the server log"})),
            )
                .into_response();
        }
    };
    match erased {
        Ok(receipt) => axum::Json(json!({"receipt": receipt})).into_response(),
        Err(ingest::EraseError::NoKeyring) => failure(SubjectError::NoProfiles),
        Err(e) => {
            tracing::error!(error = %e, "erasure failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": e.to_string()})),
            )
                .into_response()
        }
    }
}

/// `GET /api/v3/subjects/inventory`.
pub async fn inventory_handler(State(s): State<Arc<AppState>>, caller: Caller) -> Response {
    if !matches!(caller.role, Role::Dpo | Role::Admin) {
        return forbidden("the inventory is for the dpo and admin roles");
    }
    s.audit
        .record(caller.event("subject_inventory", "http"))
        .await;
    axum::Json(inventory(&s.ingester, &s.query).await).into_response()
}

/// Arguments of `historian subject`.
#[derive(Debug, clap::Args)]
pub struct SubjectArgs {
    #[command(subcommand)]
    command: SubjectCommand,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Subcommand)]
enum SubjectCommand {
    /// Prints every row of one person, decrypted.
    Export {
        /// The subject's identifying value (e.g. an employee id).
        subject: String,
        /// json or csv.
        #[arg(long, default_value = "json")]
        format: String,
    },
    /// Erases one person: keys destroyed at once, rows purged; prints the receipt.
    Erase {
        /// The subject's identifying value.
        subject: String,
    },
    /// Prints the inventory of personal data per table.
    Inventory,
}

/// Runs `historian subject ...` against a running server.
pub async fn run(args: SubjectArgs) -> Result<(), Box<dyn std::error::Error>> {
    let base = args.server.url.trim_end_matches('/');
    let client = args.server.client()?;
    let request = match &args.command {
        SubjectCommand::Export { subject, format } => client
            .post(format!("{base}/api/v3/subjects/export"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json!({"subject": subject, "format": format}).to_string()),
        SubjectCommand::Erase { subject } => client
            .post(format!("{base}/api/v3/subjects/erase"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json!({"subject": subject}).to_string()),
        SubjectCommand::Inventory => client.get(format!("{base}/api/v3/subjects/inventory")),
    };
    let response = request
        .send()
        .await
        .map_err(|e| format!("cannot reach {base}: {e}"))?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        return Err(format!("{status}: {text}").into());
    }
    println!("{text}");
    Ok(())
}
