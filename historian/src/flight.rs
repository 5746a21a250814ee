//! Arrow Flight SQL, for ADBC, pyarrow and Grafana's Flight SQL data source. It is served
//! on the HTTP port (gRPC over HTTP/2, as InfluxDB 3 does), so it shares its TLS.
//!
//! Every call authenticates its token (`authorization: Bearer`, or `Basic` with the token
//! as password; a handshake answers with the bearer token to use). Statements run through
//! [`crate::session::query`] with interface `flight`: the caller's policy, the sandbox,
//! the audit log. Tickets and prepared statements carry the id of the token that made
//! them and serve no other token; a prepared statement is planned again, with its bound
//! parameters, each time it runs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow::record_batch::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage,
    SchemaAsIpc, Ticket, flight_service_server::FlightService,
    flight_service_server::FlightServiceServer,
};
use futures::{Stream, StreamExt, TryStreamExt};
use parking_lot::Mutex;
use prost::Message;
use query::{QueryEngine, QueryError};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::audit::AuditLog;
use crate::auth::{Auth, AuthFailure, Caller};

/// The interface name of Flight SQL, in the audit log.
pub const FLIGHT: &str = "flight";

/// The catalog and schema Flight SQL clients see the database under.
const CATALOG: &str = query::engine::CATALOG;
const SCHEMA: &str = "public";

/// Prepared statements one token may hold open.
const MAX_PREPARED_PER_TOKEN: usize = 256;

/// A statement ticket: what to run, where, and for whom.
#[derive(Debug, Serialize, Deserialize)]
struct StatementTicket {
    token_id: String,
    db: String,
    sql: String,
}

/// An open prepared statement.
#[derive(Debug, Clone)]
struct Prepared {
    token_id: String,
    db: String,
    sql: String,
    /// The values bound by the last DoPut: one literal per parameter.
    parameters: Vec<String>,
}

/// The Flight SQL service.
pub struct FlightSql {
    engine: Arc<QueryEngine>,
    audit: Arc<AuditLog>,
    auth: Arc<Auth>,
    prepared: Mutex<HashMap<String, Prepared>>,
    sql_info: SqlInfoData,
}

impl FlightSql {
    /// The service, as a gRPC server to route to.
    pub fn server(
        engine: Arc<QueryEngine>,
        audit: Arc<AuditLog>,
        auth: Arc<Auth>,
    ) -> FlightServiceServer<FlightSql> {
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "Historian");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerSql, true);
        info.append(SqlInfo::FlightSqlServerSubstrait, false);
        info.append(SqlInfo::FlightSqlServerTransaction, 0_i32);
        info.append(SqlInfo::FlightSqlServerCancel, false);
        info.append(SqlInfo::SqlDdlCatalog, false);
        info.append(SqlInfo::SqlDdlSchema, false);
        info.append(SqlInfo::SqlDdlTable, false);
        info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        info.append(SqlInfo::SqlIdentifierCase, 1_i32);
        info.append(SqlInfo::SqlQuotedIdentifierCase, 0_i32);
        let sql_info = info.build().expect("a valid static SQL info");
        FlightServiceServer::new(FlightSql {
            engine,
            audit,
            auth,
            prepared: Mutex::new(HashMap::new()),
            sql_info,
        })
        .max_decoding_message_size(64 << 20)
    }

    /// The caller of a request, authenticated now.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let headers = request.metadata().clone().into_headers();
        let token = crate::auth::presented_token(&headers);
        let client = peer(request);
        let caller = self
            .auth
            .authenticate(token.as_deref(), client, FLIGHT)
            .await
            .map_err(auth_status)?;
        if caller.role == crate::role::Role::Writer {
            return Err(Status::permission_denied("the writer role may not query"));
        }
        Ok(caller)
    }

    /// The database a request names (`database`, or InfluxDB's `bucket-name` and
    /// `iox-namespace-name` headers).
    fn database<T>(request: &Request<T>) -> Result<String, Status> {
        ["database", "bucket-name", "iox-namespace-name"]
            .iter()
            .find_map(|h| {
                request
                    .metadata()
                    .get(*h)?
                    .to_str()
                    .ok()
                    .map(str::to_string)
            })
            .ok_or_else(|| {
                Status::invalid_argument(
                    "name the database in the `database` request header (gRPC metadata)",
                )
            })
    }

    async fn run(
        &self,
        caller: &Caller,
        db: &str,
        sql: &str,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let result = crate::session::query(&self.engine, &self.audit, caller, FLIGHT, db, sql)
            .await
            .map_err(query_status)?;
        let schema = Arc::new(announced(&result.schema()));
        let batches =
            result.map_err(|e| arrow_flight::error::FlightError::Tonic(Box::new(query_status(e))));
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    fn info(
        schema: &Schema,
        ticket: Vec<u8>,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(format!("cannot encode the schema: {e}")))?
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }

    /// The FlightInfo of a catalog command, for an authenticated caller.
    async fn catalog_info(
        &self,
        schema: &Schema,
        command: Vec<u8>,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(&request).await?;
        Self::info(schema, command, request.into_inner())
    }

    /// The prepared statement `handle`, if `caller` made it.
    fn prepared_for(&self, handle: &[u8], caller: &Caller) -> Result<Prepared, Status> {
        let handle = String::from_utf8_lossy(handle).to_string();
        match self.prepared.lock().get(&handle) {
            Some(p) if p.token_id == caller.token_id => Ok(p.clone()),
            // Another token's statement does not exist for this caller.
            _ => Err(Status::not_found("no such prepared statement")),
        }
    }
}

fn peer<T>(request: &Request<T>) -> SocketAddr {
    request
        .remote_addr()
        .or_else(|| {
            request
                .extensions()
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|c| c.0)
        })
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

fn auth_status(failure: AuthFailure) -> Status {
    match failure {
        AuthFailure::RateLimited(wait) => Status::resource_exhausted(format!(
            "too many failed logins from this address; retry in {} s",
            wait.as_secs().max(1)
        )),
        AuthFailure::Missing => {
            Status::unauthenticated("send a Historian token: authorization: Bearer <token>")
        }
        AuthFailure::Refused(_) => Status::unauthenticated("the token is not valid"),
    }
}

fn query_status(e: QueryError) -> Status {
    match &e {
        QueryError::Refused(_) => Status::permission_denied(e.to_string()),
        QueryError::DatabaseNotFound(_) => Status::not_found(e.to_string()),
        QueryError::Invalid(_) => Status::invalid_argument(e.to_string()),
        QueryError::MemoryLimit { .. } | QueryError::Busy(_) => {
            Status::resource_exhausted(e.to_string())
        }
        QueryError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
        QueryError::Internal(_) => Status::internal(e.to_string()),
    }
}

fn once_batch<E: std::fmt::Display>(
    schema: SchemaRef,
    batch: Result<RecordBatch, E>,
) -> Result<Response<<FlightSql as FlightService>::DoGetStream>, Status> {
    let batch = batch.map_err(|e| Status::internal(e.to_string()))?;
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::once(async { Ok(batch) }))
        .map_err(Status::from);
    Ok(Response::new(Box::pin(stream)))
}

fn ipc_schema(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let message: IpcMessage = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e| Status::internal(format!("cannot encode the schema: {e}")))?;
    Ok(message.0)
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let headers = request.metadata().clone().into_headers();
        let token = crate::auth::presented_token(&headers)
            .ok_or_else(|| auth_status(AuthFailure::Missing))?;
        self.auth
            .authenticate(Some(&token), peer(&request), FLIGHT)
            .await
            .map_err(auth_status)?;
        let output = futures::stream::iter(vec![Ok(HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into(),
        })]);
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(Box::pin(output));
        let bearer = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Status::invalid_argument("the token is not a valid header value"))?;
        response.metadata_mut().insert("authorization", bearer);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = self.caller(&request).await?;
        let db = Self::database(&request)?;
        let (_, schema) = crate::session::describe(
            &self.engine,
            &self.audit,
            &caller,
            FLIGHT,
            &db,
            &query.query,
        )
        .await
        .map_err(query_status)?;
        let ticket = StatementTicket {
            token_id: caller.token_id.clone(),
            db,
            sql: query.query,
        };
        let handle = serde_json::to_vec(&ticket).map_err(|e| Status::internal(e.to_string()))?;
        let ticket = TicketStatementQuery {
            statement_handle: handle.into(),
        };
        Self::info(
            &announced(&schema),
            ticket.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let caller = self.caller(&request).await?;
        let ticket: StatementTicket = serde_json::from_slice(&ticket.statement_handle)
            .map_err(|_| Status::invalid_argument("not a Historian statement ticket"))?;
        if ticket.token_id != caller.token_id {
            return Err(Status::permission_denied(
                "this ticket was issued to another token",
            ));
        }
        self.run(&caller, &ticket.db, &ticket.sql).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let caller = self.caller(&request).await?;
        let db = Self::database(&request)?;
        let (params, schema) = crate::session::describe(
            &self.engine,
            &self.audit,
            &caller,
            FLIGHT,
            &db,
            &query.query,
        )
        .await
        .map_err(query_status)?;
        let parameter_schema = Schema::new(
            params
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    Field::new(
                        format!("${}", i + 1),
                        t.clone().unwrap_or(DataType::Utf8),
                        true,
                    )
                })
                .collect::<Vec<_>>(),
        );
        let handle = hex::encode(rand_bytes()?);
        {
            let mut prepared = self.prepared.lock();
            if prepared
                .values()
                .filter(|p| p.token_id == caller.token_id)
                .count()
                >= MAX_PREPARED_PER_TOKEN
            {
                return Err(Status::resource_exhausted(format!(
                    "a token may hold at most {MAX_PREPARED_PER_TOKEN} prepared statements; close some"
                )));
            }
            prepared.insert(
                handle.clone(),
                Prepared {
                    token_id: caller.token_id.clone(),
                    db,
                    sql: query.query,
                    parameters: Vec::new(),
                },
            );
        }
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into_bytes().into(),
            dataset_schema: ipc_schema(&announced(&schema))?,
            parameter_schema: ipc_schema(&parameter_schema)?,
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let caller = self.caller(&request).await?;
        self.prepared_for(&query.prepared_statement_handle, &caller)?;
        let stream = request
            .into_inner()
            .map_err(arrow_flight::error::FlightError::from);
        let mut decoded =
            arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(stream);
        // One row of parameters; reading stops as soon as a client sends more.
        let mut batches: Vec<RecordBatch> = Vec::new();
        let mut rows = 0;
        while let Some(batch) = decoded.next().await {
            let batch = batch.map_err(|e| {
                Status::invalid_argument(format!("cannot read the parameters: {e}"))
            })?;
            rows += batch.num_rows();
            if rows > 1 {
                return Err(Status::invalid_argument(
                    "bind one row of parameters per execution",
                ));
            }
            batches.push(batch);
        }
        let mut literals = Vec::new();
        if let Some(batch) = batches.iter().find(|b| b.num_rows() == 1) {
            for column in batch.columns() {
                literals.push(
                    crate::placeholder::arrow_literal(column.as_ref(), 0)
                        .map_err(Status::invalid_argument)?,
                );
            }
        }
        let handle = String::from_utf8_lossy(&query.prepared_statement_handle).to_string();
        if let Some(p) = self.prepared.lock().get_mut(&handle) {
            p.parameters = literals;
        }
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(query.prepared_statement_handle),
        })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = self.caller(&request).await?;
        let prepared = self.prepared_for(&query.prepared_statement_handle, &caller)?;
        let sql = bound(&prepared)?;
        let (_, schema) = crate::session::describe(
            &self.engine,
            &self.audit,
            &caller,
            FLIGHT,
            &prepared.db,
            &sql,
        )
        .await
        .map_err(query_status)?;
        Self::info(
            &announced(&schema),
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let caller = self.caller(&request).await?;
        let prepared = self.prepared_for(&query.prepared_statement_handle, &caller)?;
        let sql = bound(&prepared)?;
        self.run(&caller, &prepared.db, &sql).await
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        let caller = self.caller(&request).await?;
        self.prepared_for(&query.prepared_statement_handle, &caller)?;
        let handle = String::from_utf8_lossy(&query.prepared_statement_handle).to_string();
        self.prepared.lock().remove(&handle);
        Ok(())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.catalog_info(
            &query.into_builder().schema(),
            query.as_any().encode_to_vec(),
            request,
        )
        .await
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request).await?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        once_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.catalog_info(
            &query.clone().into_builder().schema(),
            query.as_any().encode_to_vec(),
            request,
        )
        .await
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request).await?;
        let mut builder = query.into_builder();
        builder.append(CATALOG, SCHEMA);
        once_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.catalog_info(
            &query.clone().into_builder().schema(),
            query.as_any().encode_to_vec(),
            request,
        )
        .await
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let caller = self.caller(&request).await?;
        let db = Self::database(&request)?;
        let tables = crate::session::tables(&self.engine, &self.audit, &caller, FLIGHT, &db)
            .await
            .map_err(query_status)?;
        let mut event = caller.event("catalog", FLIGHT);
        event.fields.tables = tables.iter().map(|(name, _)| name.clone()).collect();
        self.audit.record(event).await;
        let mut builder = query.into_builder();
        for (name, schema) in tables {
            builder
                .append(CATALOG, SCHEMA, name, "BASE TABLE", &schema)
                .map_err(Status::from)?;
        }
        once_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.catalog_info(
            &table_types_schema(),
            query.as_any().encode_to_vec(),
            request,
        )
        .await
    }

    async fn do_get_table_types(
        &self,
        _query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request).await?;
        let schema = Arc::new(table_types_schema());
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(arrow::array::StringArray::from(vec![
                "BASE TABLE",
            ]))],
        );
        once_batch(schema, batch)
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.catalog_info(
            query.clone().into_builder(&self.sql_info).schema().as_ref(),
            query.as_any().encode_to_vec(),
            request,
        )
        .await
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request).await?;
        let builder = query.into_builder(&self.sql_info);
        once_batch(builder.schema(), builder.build())
    }

    async fn do_get_fallback(
        &self,
        _request: Request<Ticket>,
        message: Any,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        Err(Status::unimplemented(format!(
            "{} is not supported",
            message.type_url
        )))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// `schema` as FlightInfo announces it and DoGet sends it: dictionary columns (tags) as
/// their values, as the encoder sends them, and every column nullable, since the plan
/// that runs may know more about nullability than the plan that was described.
fn announced(schema: &Schema) -> Schema {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            let field = f.as_ref().clone().with_nullable(true);
            match f.data_type() {
                DataType::Dictionary(_, value) => field.with_data_type(value.as_ref().clone()),
                _ => field,
            }
        })
        .collect();
    Schema::new_with_metadata(fields, schema.metadata().clone())
}

fn table_types_schema() -> Schema {
    Schema::new(vec![Field::new("table_type", DataType::Utf8, false)])
}

/// The prepared statement's text with its bound parameters.
fn bound(prepared: &Prepared) -> Result<String, Status> {
    crate::placeholder::substitute(&prepared.sql, prepared.parameters.len(), |i| {
        Ok(prepared.parameters[i].clone())
    })
    .map_err(Status::invalid_argument)
}

fn rand_bytes() -> Result<[u8; 16], Status> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| Status::internal("the system random source failed"))?;
    Ok(bytes)
}
