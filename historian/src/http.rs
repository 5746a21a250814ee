//! The HTTP API: InfluxDB-compatible write endpoints, the SQL query endpoint, health and
//! metrics.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ingest::line_protocol::{LineError, Precision};
use ingest::{Ingester, WriteError, WriteRequest};
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::audit::AuditLog;
use crate::auth::{Auth, Caller, forbidden};
use crate::role::Role;

/// Shared state of the handlers.
pub struct AppState {
    /// The write path.
    pub ingester: Arc<Ingester>,
    /// The query path.
    pub query: Arc<query::QueryEngine>,
    /// Metrics to export.
    pub registry: Registry,
    /// Body limit, before and after decompression.
    pub max_body_bytes: usize,
    /// Retry-After seconds for throttled writes.
    pub retry_after_secs: u64,
    /// Tokens, roles and failed-login accounting.
    pub auth: Arc<Auth>,
    /// The audit trail.
    pub audit: Arc<AuditLog>,
}

/// The router of every endpoint.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/v3/write_lp", post(write_v3))
        .route("/api/v2/write", post(write_v2))
        .route("/write", post(write_v1))
        .route("/api/v3/query_sql", get(query_get).post(query_post))
        .route(
            "/api/v3/subjects/export",
            post(crate::subject::export_handler),
        )
        .route(
            "/api/v3/subjects/erase",
            post(crate::subject::erase_handler),
        )
        .route(
            "/api/v3/subjects/inventory",
            get(crate::subject::inventory_handler),
        )
        .route(
            "/api/v3/tokens",
            get(crate::admin::list_tokens).post(crate::admin::create_token),
        )
        .route(
            "/api/v3/tokens/{id}",
            axum::routing::delete(crate::admin::revoke_token),
        )
        .route("/api/v3/roles", get(crate::admin::list_roles))
        .route(
            "/api/v3/roles/{name}",
            axum::routing::put(crate::admin::put_role).delete(crate::admin::delete_role),
        )
        .route("/health", get(health))
        .route("/ping", get(ping).head(ping))
        .route("/metrics", get(metrics))
        // The body limit is enforced by hand so the answer is a JSON 413.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// An error answer in the InfluxDB 3 shape (`error`, `data`), with v2's `code`/`message`.
pub(crate) fn error_response(
    status: StatusCode,
    message: &str,
    extra: serde_json::Value,
) -> Response {
    let mut body = json!({
        "error": message,
        "message": message,
        "code": match status {
            StatusCode::PAYLOAD_TOO_LARGE => "request too large",
            StatusCode::NOT_FOUND => "not found",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            StatusCode::INTERNAL_SERVER_ERROR => "internal error",
            _ => "invalid",
        },
    });
    if let (Some(obj), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            obj.insert(k.clone(), v.clone());
        }
    }
    (status, axum::Json(body)).into_response()
}

fn line_errors_json(errors: &[LineError]) -> serde_json::Value {
    errors
        .iter()
        .map(|e| {
            json!({
                "line_number": e.line_number,
                "error_message": e.reason,
                "measurement": e.measurement,
                "column": e.column,
            })
        })
        .collect()
}

/// Which API flavour a write came through: they differ in parameter names and defaults.
#[derive(Clone, Copy, PartialEq)]
enum Flavour {
    V3,
    V2,
    V1,
}

async fn write_v3(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    write(s, &caller, q, headers, body, Flavour::V3).await
}

async fn write_v2(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    write(s, &caller, q, headers, body, Flavour::V2).await
}

async fn write_v1(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    write(s, &caller, q, headers, body, Flavour::V1).await
}

/// A request refused before it reaches the write path.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.0, &self.1, json!({}))
    }
}

fn parse_bool(q: &HashMap<String, String>, key: &str, default: bool) -> Result<bool, ApiError> {
    match q.get(key).map(|s| s.to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if v == "true" || v == "1" => Ok(true),
        Some(v) if v == "false" || v == "0" => Ok(false),
        Some(_) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("query parameter {key} must be true or false"),
        )),
    }
}

/// Reads the body, enforcing the limit, and gunzips it if needed (limit again after).
async fn read_body(s: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body exceeds the limit of {} bytes",
                s.max_body_bytes
            ),
        )
    };
    let raw = axum::body::to_bytes(body, s.max_body_bytes)
        .await
        .map_err(|_| too_large())?;
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    match gzip.as_deref() {
        None | Some("") | Some("identity") => Ok(raw),
        Some("gzip") | Some("x-gzip") => {
            let mut out = Vec::with_capacity(raw.len() * 4);
            let limit = s.max_body_bytes as u64;
            let mut decoder = flate2::read::MultiGzDecoder::new(&raw[..]).take(limit + 1);
            decoder.read_to_end(&mut out).map_err(|e| {
                ApiError(StatusCode::BAD_REQUEST, format!("invalid gzip body: {e}"))
            })?;
            if out.len() as u64 > limit {
                return Err(too_large());
            }
            Ok(Bytes::from(out))
        }
        Some(other) => Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported Content-Encoding {other:?}; use gzip or none"),
        )),
    }
}

async fn write(
    s: Arc<AppState>,
    caller: &Caller,
    q: HashMap<String, String>,
    headers: HeaderMap,
    body: Body,
    flavour: Flavour,
) -> Response {
    let db_key = if flavour == Flavour::V2 {
        "bucket"
    } else {
        "db"
    };
    let Some(db) = q.get(db_key).filter(|d| !d.is_empty()) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            &format!("missing query parameter {db_key}"),
            json!({}),
        );
    };
    // A v2 bucket may carry a retention policy ("db/rp"); the database is the first part.
    let db = db.split('/').next().unwrap_or(db).to_string();
    let default_precision = if flavour == Flavour::V3 { "auto" } else { "ns" };
    let precision_text = q
        .get("precision")
        .map(String::as_str)
        .unwrap_or(default_precision);
    let precision = match Precision::parse(precision_text) {
        Some(Precision::Auto) if flavour != Flavour::V3 => None,
        p => p,
    };
    let Some(precision) = precision else {
        return error_response(
            StatusCode::BAD_REQUEST,
            &format!("unsupported precision {precision_text:?}; use ns, us, ms or s"),
            json!({}),
        );
    };
    let accept_partial = match parse_bool(&q, "accept_partial", true) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let no_sync = match parse_bool(&q, "no_sync", false) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let body = match read_body(&s, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    if matches!(caller.role, Role::Dpo | Role::Auditor) {
        return forbidden(&format!("role {} may not write", caller.role.name()));
    }
    let may_write = |table: &str| caller.role.may_write(&db, table);
    let req = WriteRequest {
        db: &db,
        body: &body,
        precision,
        accept_partial,
        no_sync,
        may_write: Some(&may_write),
    };
    match s.ingester.write(req).await {
        Ok(outcome) if outcome.rejected.is_empty() && outcome.dropped_columns.is_empty() => {
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(outcome) if outcome.rejected.is_empty() => {
            // Written, minus columns a privacy profile never stores: say which.
            (
                StatusCode::OK,
                axum::Json(json!({
                    "lines_written": outcome.lines_written,
                    "dropped_columns": outcome.dropped_columns,
                })),
            )
                .into_response()
        }
        Ok(outcome) => {
            let msg = if outcome.lines_written == 0 {
                "no lines were written: every line was rejected"
            } else {
                "partial write of line protocol occurred"
            };
            error_response(
                StatusCode::BAD_REQUEST,
                msg,
                json!({
                    "lines_written": outcome.lines_written,
                    "lines_rejected": outcome.rejected.len(),
                    "dropped_columns": outcome.dropped_columns,
                    "data": line_errors_json(&outcome.rejected),
                }),
            )
        }
        Err(WriteError::Rejected(errors)) => error_response(
            StatusCode::BAD_REQUEST,
            "write rejected: some lines are invalid and accept_partial=false, so nothing was written",
            json!({
                "lines_written": 0,
                "lines_rejected": errors.len(),
                "data": line_errors_json(&errors),
            }),
        ),
        Err(e @ WriteError::BufferFull { .. }) => {
            let mut r = error_response(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), json!({}));
            if let Ok(v) = HeaderValue::from_str(&s.retry_after_secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        Err(e @ WriteError::Catalog(_)) => {
            error_response(StatusCode::BAD_REQUEST, &e.to_string(), json!({}))
        }
        Err(e @ (WriteError::Wal(_) | WriteError::Keyring(_))) => {
            tracing::error!(error = %e, "write failed in the WAL or the keyring");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), json!({}))
        }
    }
}

async fn health() -> Response {
    axum::Json(json!({"status": "pass", "version": env!("CARGO_PKG_VERSION")})).into_response()
}

async fn ping() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut()
        .insert("X-Influxdb-Version", HeaderValue::from_static("historian"));
    r
}

async fn metrics(State(s): State<Arc<AppState>>, caller: Caller) -> Response {
    if caller.role != Role::Admin {
        return forbidden("metrics are for the admin role");
    }
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &s.registry) {
        return error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), json!({}));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The body of `POST /api/v3/query_sql` as JSON.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    db: Option<String>,
    q: Option<String>,
    format: Option<String>,
}

async fn query_get(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let body = QueryBody {
        db: q.get("db").cloned(),
        q: q.get("q").cloned(),
        format: q.get("format").cloned(),
    };
    run_query(s, &caller, body).await
}

async fn query_post(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let bytes = match read_body(&s, &headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut parsed = if content_type.starts_with("application/json") {
        match serde_json::from_slice::<QueryBody>(&bytes) {
            Ok(b) => b,
            Err(e) => {
                return ApiError(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}"))
                    .into_response();
            }
        }
    } else if bytes.is_empty() {
        QueryBody::default()
    } else {
        // A plain body is the SQL text (as `curl --data-binary @query.sql` sends it).
        match String::from_utf8(bytes.to_vec()) {
            Ok(sql) => QueryBody {
                q: Some(sql),
                ..QueryBody::default()
            },
            Err(_) => {
                return ApiError(StatusCode::BAD_REQUEST, "the body is not UTF-8".into())
                    .into_response();
            }
        }
    };
    parsed.db = parsed.db.or_else(|| q.get("db").cloned());
    parsed.q = parsed.q.or_else(|| q.get("q").cloned());
    parsed.format = parsed.format.or_else(|| q.get("format").cloned());
    run_query(s, &caller, parsed).await
}

fn query_error_response(e: &query::QueryError) -> Response {
    use query::QueryError as E;
    let status = match e {
        E::Refused(_) | E::Invalid(_) | E::MemoryLimit { .. } | E::Timeout(_) => {
            StatusCode::BAD_REQUEST
        }
        E::DatabaseNotFound(_) => StatusCode::NOT_FOUND,
        E::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        E::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_response(status, &e.to_string(), json!({}))
}

async fn run_query(s: Arc<AppState>, caller: &Caller, body: QueryBody) -> Response {
    use futures::StreamExt;
    let format: query::OutputFormat = match body.format.as_deref().unwrap_or("json").parse() {
        Ok(f) => f,
        Err(e) => return ApiError(StatusCode::BAD_REQUEST, e).into_response(),
    };
    let Some(db) = body.db.filter(|d| !d.is_empty()) else {
        return ApiError(StatusCode::BAD_REQUEST, "missing query parameter db".into())
            .into_response();
    };
    let Some(sql) = body.q.filter(|q| !q.trim().is_empty()) else {
        return ApiError(
            StatusCode::BAD_REQUEST,
            "missing query parameter q (the SQL)".into(),
        )
        .into_response();
    };
    if matches!(caller.role, Role::Writer) {
        return forbidden("the writer role may not query");
    }
    let mut stream =
        match crate::session::query(&s.query, &s.audit, caller, "http", &db, &sql).await {
            Ok(stream) => stream,
            Err(e) => return query_error_response(&e),
        };
    // The first batch comes before the headers, so that most errors get a status code;
    // a later one cuts the response short.
    let first = match stream.next().await {
        Some(Err(e)) => return query_error_response(&e),
        other => other,
    };
    let mut encoder = match format.encoder(stream.schema()) {
        Ok(e) => e,
        Err(e) => {
            return error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), json!({}));
        }
    };
    let pending = futures::stream::iter(first);
    let body = pending
        .chain(stream)
        .map(Some)
        .chain(futures::stream::once(async { None }))
        .map(move |item| {
            let bytes = match item {
                Some(Ok(batch)) => encoder.batch(&batch),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "query failed while streaming its result");
                    return Err(std::io::Error::other(e.to_string()));
                }
                None => encoder.finish(),
            };
            bytes
                .map(Bytes::from)
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .filter(|r| futures::future::ready(!matches!(r, Ok(b) if b.is_empty())));
    (
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from_stream(body),
    )
        .into_response()
}
