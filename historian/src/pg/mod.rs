//! The PostgreSQL wire protocol, for Grafana's PostgreSQL data source, psql and BI tools.
//!
//! The password is a Historian token: it is checked like an HTTP token, and checked again
//! before every statement, so a revoked token or a changed role takes effect on open
//! connections at once. Every statement that reads data runs through
//! [`crate::session::query`], the path HTTP takes: the same policy, sandbox and audit log
//! (interface `pgwire`). Prepared statements are planned as their caller at Parse, and
//! run at Execute as an ordinary query with their parameters bound as literals, so they
//! are checked again then.

mod dialect;
mod encode;
mod statement;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{Sink, SinkExt, Stream, StreamExt, stream};
use pgwire::api::auth::{
    ServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::cancel::DefaultCancelHandler;
use pgwire::api::portal::PortalExecutionState;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler, send_query_response};
use pgwire::api::results::{
    DescribePortalResponse, DescribeStatementResponse, FieldInfo, QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::Entry;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionHandle, ConnectionManager, DEFAULT_NAME,
    METADATA_DATABASE, METADATA_USER, PgWireConnectionState, PgWireServerHandlers,
    PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;
use pgwire::messages::extendedquery::Execute;
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use query::{QueryEngine, QueryError};
use tokio::net::TcpListener;

use crate::audit::AuditLog;
use crate::auth::{Auth, AuthFailure, Caller};
use statement::{Command, user_error};

/// What the PostgreSQL front end needs of the server.
pub struct PgService {
    engine: Arc<QueryEngine>,
    audit: Arc<AuditLog>,
    auth: Arc<Auth>,
    settings: PgSettings,
    /// Connections open now (cancel requests included, while they last).
    open: Arc<std::sync::atomic::AtomicUsize>,
    connections: Arc<ConnectionManager>,
    cancel: Arc<DefaultCancelHandler>,
    keys: RandomPidSecretKeyGenerator,
}

/// How the PostgreSQL front end admits clients.
#[derive(Debug, Clone, Copy)]
pub struct PgSettings {
    /// Accept tokens as plaintext passwords from non-loopback clients.
    pub allow_cleartext: bool,
    /// Connections at once; more are refused at startup (SQLSTATE 53300).
    pub max_connections: usize,
}

impl PgService {
    /// A front end over `engine`, authenticating with `auth`.
    pub fn new(
        engine: Arc<QueryEngine>,
        audit: Arc<AuditLog>,
        auth: Arc<Auth>,
        settings: PgSettings,
    ) -> Arc<Self> {
        let connections = Arc::new(ConnectionManager::new());
        Arc::new(PgService {
            engine,
            audit,
            auth,
            settings,
            open: Arc::default(),
            cancel: Arc::new(DefaultCancelHandler::new(connections.clone())),
            connections,
            keys: RandomPidSecretKeyGenerator::default(),
        })
    }

    /// Accepts connections on `listener` until `stop` turns true; TLS with `tls`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let handlers = Arc::new(Handlers(self));
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => {
                        let _ = socket.set_nodelay(true);
                        let handlers = handlers.clone();
                        let tls = tls.clone();
                        let open = OpenConnection::new(&handlers.0.open);
                        tokio::spawn(async move {
                            let _open = open;
                            if let Err(e) = pgwire::tokio::process_socket(socket, tls, handlers).await {
                                tracing::debug!(error = %e, "PostgreSQL connection ended with an error");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot accept a PostgreSQL connection");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
                _ = stop.changed() => return,
            }
        }
    }
}

/// One open connection, counted while it lives.
struct OpenConnection(Arc<std::sync::atomic::AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        OpenConnection(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The per-connection state kept in the session's extensions.
struct Session {
    /// The token the client logged in with; statements re-check it.
    token: String,
    /// The Historian database: the connection's database name.
    db: String,
}

/// Open cursors per connection: each holds a running query (and a query slot).
const MAX_CURSORS: usize = 16;

/// An open cursor: its rows, described by its fields.
struct Cursor {
    schema: arrow::datatypes::SchemaRef,
    /// None once FETCH ALL took the rest.
    result: Option<crate::session::AuditedStream>,
    /// Rows of the last batch that the previous FETCH did not take.
    leftover: Option<arrow::record_batch::RecordBatch>,
}

impl Cursor {
    /// The next `count` rows (None = all the rest), in batches.
    async fn fetch(
        &mut self,
        count: Option<usize>,
    ) -> PgWireResult<Vec<arrow::record_batch::RecordBatch>> {
        let mut out = Vec::new();
        let mut wanted = count.unwrap_or(usize::MAX);
        while wanted > 0 {
            let batch = match self.leftover.take() {
                Some(b) => b,
                None => match self.result.as_mut() {
                    Some(result) => match result.next().await {
                        Some(b) => b.map_err(query_error)?,
                        None => break,
                    },
                    None => break,
                },
            };
            if batch.num_rows() > wanted {
                self.leftover = Some(batch.slice(wanted, batch.num_rows() - wanted));
                out.push(batch.slice(0, wanted));
                wanted = 0;
            } else {
                wanted -= batch.num_rows();
                out.push(batch);
            }
        }
        Ok(out)
    }
}

/// The connection's open cursors. Each holds its running query; closing it (or the
/// connection) stops the query.
#[derive(Default)]
struct Cursors(tokio::sync::Mutex<HashMap<String, Cursor>>);

/// The connection's cursors.
fn cursors<C: ClientInfo>(client: &C) -> Arc<Cursors> {
    client
        .session_extensions()
        .get_or_insert_with(Cursors::default)
}

/// The cancel handle of a connection, under a type pgwire does not look for: the
/// handlers here watch it for the whole statement, streaming included.
struct CancelHandle(Arc<ConnectionHandle>);

/// The pgwire handlers, all on one type.
struct Handlers(Arc<PgService>);

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::new(Handlers(self.0.clone()))
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::new(Handlers(self.0.clone()))
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(Handlers(self.0.clone()))
    }

    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        self.0.cancel.clone()
    }
}

fn fatal(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".into(),
        code.into(),
        message,
    )))
}

fn auth_error(failure: AuthFailure) -> PgWireError {
    match failure {
        AuthFailure::RateLimited(wait) => fatal(
            "28P01",
            format!(
                "too many failed logins from this address; retry in {} s",
                wait.as_secs().max(1)
            ),
        ),
        AuthFailure::Missing => fatal("28P01", "a token is required as the password".into()),
        AuthFailure::Refused(_) => fatal(
            "28P01",
            "password authentication failed: the password must be a valid Historian token".into(),
        ),
    }
}

struct Parameters;

impl ServerParameterProvider for Parameters {
    fn server_parameters<C>(&self, client: &C) -> Option<HashMap<String, String>>
    where
        C: ClientInfo,
    {
        let mut params: HashMap<String, String> = [
            "server_version",
            "server_encoding",
            "client_encoding",
            "integer_datetimes",
            "standard_conforming_strings",
            "is_superuser",
            "default_transaction_read_only",
            "search_path",
            "IntervalStyle",
            "DateStyle",
            "TimeZone",
        ]
        .iter()
        .filter_map(|name| {
            query::functions::postgres::setting(&name.to_lowercase())
                .map(|v| (name.to_string(), v.to_string()))
        })
        .collect();
        if let Some(app) = client.metadata().get("application_name") {
            params.insert("application_name".into(), app.clone());
        }
        if let Some(user) = client.metadata().get(METADATA_USER) {
            params.insert("session_authorization".into(), user.clone());
        }
        Some(params)
    }
}

#[async_trait]
impl StartupHandler for Handlers {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                let open = self.0.open.load(std::sync::atomic::Ordering::SeqCst);
                if open > self.0.settings.max_connections {
                    return Err(fatal(
                        "53300",
                        format!(
                            "too many connections: the server accepts {} PostgreSQL connections at once ([server] pg_max_connections)",
                            self.0.settings.max_connections
                        ),
                    ));
                }
                if !client.is_secure()
                    && !client.socket_addr().ip().is_loopback()
                    && !self.0.settings.allow_cleartext
                {
                    return Err(fatal(
                        "28000",
                        "a token may not travel in clear text from a non-loopback address: connect with TLS (sslmode=require), or set [server] pg_allow_cleartext = true".into(),
                    ));
                }
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(password) => {
                let token = password.into_password()?.password;
                self.0
                    .auth
                    .authenticate(Some(&token), client.socket_addr(), crate::session::PGWIRE)
                    .await
                    .map_err(auth_error)?;
                let db = client
                    .metadata()
                    .get(METADATA_DATABASE)
                    .or_else(|| client.metadata().get(METADATA_USER))
                    .cloned()
                    .unwrap_or_default();
                let (pid, secret) = self.0.keys.generate(client);
                client.set_pid_and_secret_key(pid, secret.clone());
                let (handle, guard) = self.0.connections.register(pid, secret);
                let extensions = client.session_extensions();
                extensions.insert(CancelHandle(handle));
                extensions.insert(guard);
                extensions.insert(Session { token, db });
                finish_authentication(client, &Parameters).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

impl Handlers {
    /// The connection's session and its caller, checked again now.
    async fn caller<C: ClientInfo>(&self, client: &C) -> PgWireResult<(Caller, Arc<Session>)> {
        let session = client
            .session_extensions()
            .get::<Session>()
            .ok_or_else(|| fatal("28000", "not authenticated".into()))?;
        let caller = self
            .0
            .auth
            .authenticate(
                Some(&session.token),
                client.socket_addr(),
                crate::session::PGWIRE,
            )
            .await
            .map_err(auth_error)?;
        if caller.role == crate::role::Role::Writer {
            return Err(user_error("42501", "the writer role may not query".into()));
        }
        Ok((caller, session))
    }

    /// Starts `sql` (in PostgreSQL's spelling) as the connection's caller, checked now.
    async fn open<C: ClientInfo>(
        &self,
        client: &C,
        sql: &str,
    ) -> PgWireResult<crate::session::AuditedStream> {
        let (caller, session) = self.caller(client).await?;
        crate::session::query(
            &self.0.engine,
            &self.0.audit,
            &caller,
            crate::session::PGWIRE,
            &session.db,
            &dialect::rewrite(sql),
        )
        .await
        .map_err(query_error)
    }

    /// Runs one command; a query streams its rows in `format`.
    async fn run<C: ClientInfo>(
        &self,
        client: &C,
        command: Command,
        format: Option<&Format>,
    ) -> PgWireResult<Response> {
        Ok(match command {
            Command::Set => Response::Execution(Tag::new("SET")),
            Command::Begin => Response::TransactionStart(Tag::new("BEGIN")),
            Command::Commit | Command::Rollback => {
                // Cursors end with their transaction, as in PostgreSQL (WITHOUT HOLD): a
                // client that rolls back after an error can declare the same name again.
                if let Some(cursors) = client.session_extensions().get::<Cursors>() {
                    cursors.0.lock().await.clear();
                }
                let tag = if command == Command::Commit {
                    "COMMIT"
                } else {
                    "ROLLBACK"
                };
                Response::TransactionEnd(Tag::new(tag))
            }
            Command::Housekeeping(tag) => Response::Execution(Tag::new(tag)),
            Command::Unsupported(what) => {
                return Err(user_error("0A000", format!("{what} is not supported")));
            }
            Command::Declare { name, query } => {
                let cursors = cursors(client);
                let mut cursors = cursors.0.lock().await;
                if cursors.len() >= MAX_CURSORS {
                    return Err(user_error(
                        "54000",
                        format!(
                            "a connection may hold at most {MAX_CURSORS} open cursors; close some"
                        ),
                    ));
                }
                if cursors.contains_key(&name) {
                    return Err(user_error(
                        "42P03",
                        format!("cursor \"{name}\" already exists"),
                    ));
                }
                let result = self.open(client, &query).await?;
                cursors.insert(
                    name,
                    Cursor {
                        schema: result.schema(),
                        result: Some(result),
                        leftover: None,
                    },
                );
                Response::Execution(Tag::new("DECLARE CURSOR"))
            }
            Command::Fetch { name, count } => {
                // The token is checked again: a revoked token fetches nothing more.
                self.caller(client).await?;
                let cursors = cursors(client);
                let mut cursors = cursors.0.lock().await;
                let cursor = cursors.get_mut(&name).ok_or_else(|| {
                    user_error("34000", format!("cursor \"{name}\" does not exist"))
                })?;
                let fields = Arc::new(encode::fields(&cursor.schema, format));
                let mut response = match count {
                    Some(count) => {
                        let mut rows = Vec::new();
                        for batch in cursor.fetch(Some(count)).await? {
                            rows.extend(encode::rows(&batch, &fields)?);
                        }
                        QueryResponse::new(fields, stream::iter(rows.into_iter().map(Ok)))
                    }
                    // FETCH ALL streams the rest, as a query's result does.
                    None => {
                        let leftover = stream::iter(cursor.leftover.take().map(Ok));
                        let rest = match cursor.result.take() {
                            Some(result) => result.boxed(),
                            None => stream::empty().boxed(),
                        };
                        let rows = row_stream(leftover.chain(rest), fields.clone(), None);
                        QueryResponse::new(fields, rows)
                    }
                };
                response.set_command_tag("FETCH");
                Response::Query(response)
            }
            Command::Close(name) => {
                let cursors = cursors(client);
                let mut cursors = cursors.0.lock().await;
                match name {
                    Some(name) => {
                        cursors.remove(&name).ok_or_else(|| {
                            user_error("34000", format!("cursor \"{name}\" does not exist"))
                        })?;
                    }
                    None => cursors.clear(),
                }
                Response::Execution(Tag::new("CLOSE CURSOR"))
            }
            Command::Show(name) => {
                let value = query::functions::postgres::setting(&name).ok_or_else(|| {
                    user_error(
                        "42704",
                        format!("unrecognized configuration parameter \"{name}\""),
                    )
                })?;
                let fields = Arc::new(vec![FieldInfo::new(
                    name,
                    None,
                    None,
                    Type::TEXT,
                    pgwire::api::results::FieldFormat::Text,
                )]);
                let mut encoder = pgwire::api::results::DataRowEncoder::new(fields.clone());
                encoder.encode_field(&value)?;
                let row = encoder.take_row();
                Response::Query(QueryResponse::new(fields, stream::iter(vec![Ok(row)])))
            }
            Command::Query(sql) => {
                let cancel = match client.session_extensions().get::<CancelHandle>() {
                    Some(handle) => Some(handle.0.start_query().await),
                    None => None,
                };
                let planned = self.open(client, &sql);
                let result = match cancel {
                    Some(mut cancel) => tokio::select! {
                        r = planned => r.map(|s| (s, Some(cancel))),
                        _ = &mut cancel => return Err(PgWireError::QueryCanceled),
                    },
                    None => planned.await.map(|s| (s, None)),
                };
                let (result, cancel) = result?;
                let fields = Arc::new(encode::fields(&result.schema(), format));
                Response::Query(QueryResponse::new(
                    fields.clone(),
                    row_stream(result, fields, cancel),
                ))
            }
        })
    }
}

/// The rows of a query's `result` batches, ending with an error when the client cancels
/// the statement. Dropping the result (at the end, or when the client goes away) stops
/// the query and audits it.
fn row_stream<S>(
    result: S,
    fields: Arc<Vec<FieldInfo>>,
    cancel: Option<futures::channel::oneshot::Receiver<()>>,
) -> impl Stream<Item = PgWireResult<DataRow>> + Send + 'static
where
    S: Stream<Item = Result<arrow::record_batch::RecordBatch, QueryError>> + Send + Unpin + 'static,
{
    struct Rows<S> {
        result: S,
        fields: Arc<Vec<FieldInfo>>,
        cancel: Option<futures::channel::oneshot::Receiver<()>>,
        pending: std::collections::VecDeque<DataRow>,
        done: bool,
    }
    let rows = Rows {
        result,
        fields,
        cancel,
        pending: Default::default(),
        done: false,
    };
    stream::unfold(rows, |mut st| async move {
        loop {
            if let Some(row) = st.pending.pop_front() {
                return Some((Ok(row), st));
            }
            if st.done {
                return None;
            }
            let Rows { result, cancel, .. } = &mut st;
            let next = match cancel {
                Some(cancel) => tokio::select! {
                    batch = result.next() => batch,
                    fired = cancel => {
                        st.cancel = None;
                        if fired.is_ok() {
                            st.done = true;
                            return Some((Err(PgWireError::QueryCanceled), st));
                        }
                        continue;
                    }
                },
                None => result.next().await,
            };
            match next {
                None => st.done = true,
                Some(Ok(batch)) => match encode::rows(&batch, &st.fields) {
                    Ok(rows) => st.pending.extend(rows),
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                },
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(query_error(e)), st));
                }
            }
        }
    })
}

/// A query error as PostgreSQL reports it, with its SQLSTATE.
fn query_error(e: QueryError) -> PgWireError {
    use query::sandbox::SandboxError;
    let code = match &e {
        QueryError::Refused(SandboxError::Syntax(_)) => "42601",
        QueryError::Refused(_) => "42501",
        QueryError::DatabaseNotFound(_) => "3D000",
        QueryError::Invalid(m) if m.contains("not found") => "42P01",
        QueryError::Invalid(_) => "42000",
        QueryError::MemoryLimit { .. } => "53200",
        QueryError::Timeout(_) => "57014",
        QueryError::Busy(_) => "53300",
        QueryError::Internal(_) => "XX000",
    };
    user_error(code, e.to_string())
}

#[async_trait]
impl SimpleQueryHandler for Handlers {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
    {
        let commands = statement::commands(query);
        if commands.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        let mut responses = Vec::new();
        for command in commands {
            match self.run(client, command, None).await {
                Ok(r) => responses.push(r),
                Err(e) => {
                    // PostgreSQL stops at the first failing statement of a message.
                    responses.push(Response::Error(Box::new(e.into())));
                    break;
                }
            }
        }
        Ok(responses)
    }
}

/// A prepared statement: its text, and what planning it as its caller said.
#[derive(Debug, Clone)]
pub struct Prepared {
    command: Command,
    parameters: Vec<Type>,
    schema: arrow::datatypes::SchemaRef,
}

/// Plans statements at Parse time as the connection's caller.
pub struct Planner(Arc<PgService>);

#[async_trait]
impl QueryParser for Planner {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut commands = statement::commands(sql);
        if commands.is_empty() {
            return Ok(None);
        }
        if commands.len() != 1 {
            return Err(user_error(
                "42601",
                "cannot insert multiple commands into a prepared statement".into(),
            ));
        }
        let command = commands.remove(0);
        let empty = Arc::new(arrow::datatypes::Schema::empty());
        let text = match &command {
            Command::Query(text) => text,
            // A cursor's query is planned (and its parameters typed) like any query; the
            // DECLARE itself returns no rows.
            Command::Declare { query, .. } => query,
            _ => "",
        };
        if text.is_empty() {
            let schema = match &command {
                Command::Show(name) => Arc::new(arrow::datatypes::Schema::new(vec![
                    arrow::datatypes::Field::new(name, arrow::datatypes::DataType::Utf8, true),
                ])),
                // FETCH returns the rows its cursor describes.
                Command::Fetch { name, .. } => match client.session_extensions().get::<Cursors>() {
                    Some(cursors) => match cursors.0.lock().await.get(name) {
                        Some(c) => c.schema.clone(),
                        None => empty,
                    },
                    None => empty,
                },
                _ => empty,
            };
            return Ok(Some(Prepared {
                command,
                parameters: Vec::new(),
                schema,
            }));
        }
        let handlers = Handlers(self.0.clone());
        let (caller, session) = handlers.caller(client).await?;
        let text = dialect::rewrite(text);
        let (params, schema) = crate::session::describe(
            &self.0.engine,
            &self.0.audit,
            &caller,
            crate::session::PGWIRE,
            &session.db,
            &text,
        )
        .await
        .map_err(query_error)?;
        let count = params.len().max(types.len());
        let parameters = (0..count)
            .map(|i| {
                types
                    .get(i)
                    .cloned()
                    .flatten()
                    .or_else(|| {
                        params
                            .get(i)
                            .cloned()
                            .flatten()
                            .map(|t| encode::pg_type(&t))
                    })
                    .unwrap_or(Type::UNKNOWN)
            })
            .collect();
        let schema = match &command {
            Command::Declare { .. } => empty,
            _ => schema,
        };
        Ok(Some(Prepared {
            command,
            parameters,
            schema,
        }))
    }

    fn get_parameter_types(&self, statement: &Prepared) -> PgWireResult<Vec<Type>> {
        Ok(statement.parameters.clone())
    }

    fn get_result_schema(
        &self,
        statement: &Prepared,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(encode::fields(&statement.schema, format))
    }
}

#[async_trait]
impl ExtendedQueryHandler for Handlers {
    type Statement = Prepared;
    type QueryParser = Planner;

    fn query_parser(&self) -> Arc<Planner> {
        Arc::new(Planner(self.0.clone()))
    }

    /// An Execute without a row limit streams its rows as the query yields them (pgwire's
    /// default gathers them all first, which a 10M-row result cannot afford); with a
    /// limit, or for a portal already started, pgwire's portal suspension applies.
    async fn on_execute<C>(&self, client: &mut C, message: Execute) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Prepared>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
        let portal = match client.portal_store().get_portal(name) {
            Some(Entry::Value(portal)) => portal,
            _ => return self._on_execute(client, message).await,
        };
        let streams = message.max_rows == 0
            && matches!(portal.statement.statement.command, Command::Query(_))
            && matches!(client.state(), PgWireConnectionState::ReadyForQuery)
            && matches!(*portal.state().lock().await, PortalExecutionState::Initial);
        if !streams {
            return self._on_execute(client, message).await;
        }
        client.set_state(PgWireConnectionState::QueryInProgress);
        match ExtendedQueryHandler::do_query(self, client, portal.as_ref(), 0).await? {
            Response::Query(results) => {
                *portal.state().lock().await = PortalExecutionState::Finished;
                send_query_response(client, results, false).await?;
            }
            Response::Error(e) => {
                return Err(PgWireError::UserError(e));
            }
            _ => {}
        }
        client.set_state(PgWireConnectionState::ReadyForQuery);
        Ok(())
    }

    async fn do_describe_statement<C>(
        &self,
        _client: &mut C,
        target: &StoredStatement<Prepared>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Prepared>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = &target.statement;
        Ok(DescribeStatementResponse::new(
            prepared.parameters.clone(),
            encode::fields(&prepared.schema, None),
        ))
    }

    async fn do_describe_portal<C>(
        &self,
        _client: &mut C,
        target: &Portal<Prepared>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Prepared>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        Ok(DescribePortalResponse::new(encode::fields(
            &target.statement.statement.schema,
            Some(&target.result_column_format),
        )))
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Prepared>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = &portal.statement.statement;
        let command = match &prepared.command {
            Command::Query(sql) => {
                Command::Query(statement::bind(sql, portal, &prepared.parameters)?)
            }
            Command::Declare { name, query } => Command::Declare {
                name: name.clone(),
                query: statement::bind(query, portal, &prepared.parameters)?,
            },
            other => other.clone(),
        };
        let declared = match &command {
            Command::Declare { name, .. } => Some(name.clone()),
            _ => None,
        };
        let response = self
            .run(client, command, Some(&portal.result_column_format))
            .await?;
        if let Some(name) = declared {
            // As in PostgreSQL, a declared cursor is also a portal of its name: drivers
            // (psycopg's named cursors) describe it before they FETCH.
            let schema = match client.session_extensions().get::<Cursors>() {
                Some(cursors) => cursors.0.lock().await.get(&name).map(|c| c.schema.clone()),
                None => None,
            };
            if let Some(schema) = schema {
                let fetch = Prepared {
                    command: Command::Fetch {
                        name: name.clone(),
                        count: None,
                    },
                    parameters: Vec::new(),
                    schema,
                };
                let statement = Arc::new(StoredStatement::new(name.clone(), fetch, Vec::new()));
                client
                    .portal_store()
                    .put_portal(Arc::new(Portal::new_cursor(name, statement)));
            }
        }
        Ok(response)
    }
}
