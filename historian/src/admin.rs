//! Administration of access: tokens and roles by API (`/api/v3/tokens`, `/api/v3/roles`)
//! and CLI (`historian token`), and `historian audit verify`.
//!
//! Admin and dpo manage tokens and roles; anything that lets someone read personal data in
//! clear (a role with a `clear` column, or the dpo role itself) takes the dpo. Every change
//! is audited.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Caller, forbidden};
use crate::client::ServerArgs;
use crate::http::{AppState, error_response};
use crate::role::{BUILTIN_ROLES, Role, RoleDef};
use crate::token::{TokenStore, unix_now};

/// The body of `POST /api/v3/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// A name for people.
    pub name: String,
    /// The role.
    pub role: String,
    /// Attributes for row predicates.
    #[serde(default)]
    pub attributes: BTreeMap<String, Vec<String>>,
    /// Lifetime, e.g. `90d`; none = until revoked.
    #[serde(default)]
    pub expires_in: Option<String>,
}

fn bad_request(message: &str) -> Response {
    error_response(StatusCode::BAD_REQUEST, message, json!({}))
}

fn tokens(s: &AppState) -> Result<&TokenStore, Box<Response>> {
    s.auth.tokens.as_ref().ok_or_else(|| {
        Box::new(bad_request(
            "the server runs --without-auth: there are no tokens to manage",
        ))
    })
}

/// `POST /api/v3/tokens`: answers the token once.
pub async fn create_token(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Response {
    if !caller.role.manages_access() {
        return forbidden("managing tokens needs the admin or dpo role");
    }
    let req: NewToken = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(&format!("invalid JSON body: {e}")),
    };
    let Some(role) = s.auth.roles.get(&req.role) else {
        return bad_request(&format!("no role {:?}", req.role));
    };
    if role.reads_clear() && caller.role != Role::Dpo {
        return forbidden(&format!(
            "role {} reads personal data in clear: only the dpo may grant it",
            req.role
        ));
    }
    let expires = match req.expires_in.as_deref().map(humantime::parse_duration) {
        None => None,
        Some(Ok(d)) => Some(unix_now() + d.as_secs() as i64),
        Some(Err(e)) => return bad_request(&format!("expires_in: {e}")),
    };
    let store = match tokens(&s) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match store.create(
        &req.name,
        &req.role,
        req.attributes,
        expires,
        &caller.user(),
        caller.role == Role::Dpo,
    ) {
        Ok((record, token)) => {
            let mut event = caller.event("token_created", "http");
            event.fields.detail = Some(format!("token {} with role {}", record.id, record.role));
            s.audit.record(event).await;
            let mut body = record.public();
            body["token"] = json!(token);
            (StatusCode::CREATED, axum::Json(body)).into_response()
        }
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), json!({})),
    }
}

/// `GET /api/v3/tokens`.
pub async fn list_tokens(State(s): State<Arc<AppState>>, caller: Caller) -> Response {
    if !caller.role.manages_access() {
        return forbidden("managing tokens needs the admin or dpo role");
    }
    let store = match tokens(&s) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match store.list() {
        Ok(list) => axum::Json(json!({
            "tokens": list.iter().map(|t| t.public()).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), json!({})),
    }
}

/// `DELETE /api/v3/tokens/{id}`.
pub async fn revoke_token(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Response {
    if !caller.role.manages_access() {
        return forbidden("managing tokens needs the admin or dpo role");
    }
    let store = match tokens(&s) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    match store.revoke(&id) {
        Ok(true) => {
            let mut event = caller.event("token_revoked", "http");
            event.fields.detail = Some(format!("token {id}"));
            s.audit.record(event).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => error_response(StatusCode::NOT_FOUND, "no such token", json!({})),
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), json!({})),
    }
}

/// `GET /api/v3/roles`.
pub async fn list_roles(State(s): State<Arc<AppState>>, caller: Caller) -> Response {
    if !caller.role.manages_access() {
        return forbidden("managing roles needs the admin or dpo role");
    }
    axum::Json(json!({"roles": s.auth.roles.list()})).into_response()
}

/// Whether `caller` may change (or remove) the API role `name` to `next`.
fn may_change_role(
    s: &AppState,
    caller: &Caller,
    name: &str,
    next: Option<&RoleDef>,
) -> Option<Response> {
    if !caller.role.manages_access() {
        return Some(forbidden("managing roles needs the admin or dpo role"));
    }
    if BUILTIN_ROLES.contains(&name) || s.auth.roles.is_configured(name) {
        return Some(error_response(
            StatusCode::CONFLICT,
            &format!("role {name} is built in or defined in the config file; change it there"),
            json!({}),
        ));
    }
    let clear_now = s.auth.roles.defined(name).is_some_and(|d| d.grants_clear());
    let clear_next = next.is_some_and(|d| d.grants_clear());
    if (clear_now || clear_next) && caller.role != Role::Dpo {
        return Some(forbidden(
            "this role reads personal data in clear: only the dpo may grant or change it",
        ));
    }
    None
}

/// `PUT /api/v3/roles/{name}` with the role's definition (`{"tables": {...}}`).
pub async fn put_role(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let def: RoleDef = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => return bad_request(&format!("invalid role definition: {e}")),
    };
    if let Some(r) = may_change_role(&s, &caller, &name, Some(&def)) {
        return r;
    }
    match s.auth.roles.set(&name, Some(def)) {
        Ok(()) => {
            let mut event = caller.event("role_changed", "http");
            event.fields.detail = Some(format!("role {name}"));
            s.audit.record(event).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => bad_request(&e),
    }
}

/// `DELETE /api/v3/roles/{name}`.
pub async fn delete_role(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Response {
    if let Some(r) = may_change_role(&s, &caller, &name, None) {
        return r;
    }
    if s.auth.roles.defined(&name).is_none() {
        return error_response(StatusCode::NOT_FOUND, "no such role", json!({}));
    }
    match s.auth.roles.set(&name, None) {
        Ok(()) => {
            let mut event = caller.event("role_removed", "http");
            event.fields.detail = Some(format!("role {name}"));
            s.audit.record(event).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e, json!({})),
    }
}

/// Arguments of `historian token`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
    #[command(flatten)]
    server: ServerArgs,
    /// Work on the token store of this data directory instead of a running server
    /// (for plant IT with access to the machine: how the first dpo token is made).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum TokenCommand {
    /// Creates a token and prints it (once).
    Create {
        /// The role.
        #[arg(long)]
        role: String,
        /// A name for people.
        #[arg(long)]
        name: String,
        /// An attribute, `key=value1,value2`; repeatable.
        #[arg(long = "attr")]
        attributes: Vec<String>,
        /// Lifetime, e.g. `90d`.
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// Lists tokens (never their secrets).
    List,
    /// Revokes a token by id.
    Revoke {
        /// The token's id.
        id: String,
    },
}

fn parse_attributes(list: &[String]) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for a in list {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| format!("attribute {a:?} is not key=value1,value2"))?;
        out.entry(k.to_string())
            .or_default()
            .extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_string));
    }
    Ok(out)
}

/// Runs `historian token ...`.
pub async fn run_token(args: TokenArgs) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(dir) = &args.data_dir {
        let store = TokenStore::open(&dir.join("auth"))?;
        match args.command {
            TokenCommand::Create {
                role,
                name,
                attributes,
                expires_in,
            } => {
                let expires = match expires_in {
                    Some(e) => Some(unix_now() + humantime::parse_duration(&e)?.as_secs() as i64),
                    None => None,
                };
                let (record, token) = store.create(
                    &name,
                    &role,
                    parse_attributes(&attributes)?,
                    expires,
                    "local",
                    // Plant IT on the machine holds the data directory: it stands in for
                    // the dpo (this is how the first dpo token is made).
                    true,
                )?;
                eprintln!("created token {} with role {}", record.id, record.role);
                println!("{token}");
            }
            TokenCommand::List => {
                let list: Vec<_> = store.list()?.iter().map(|t| t.public()).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            }
            TokenCommand::Revoke { id } => {
                if !store.revoke(&id)? {
                    return Err(format!("no token {id}").into());
                }
                eprintln!("revoked token {id}");
            }
        }
        return Ok(());
    }
    let client = args.server.client()?;
    let request = match &args.command {
        TokenCommand::Create {
            role,
            name,
            attributes,
            expires_in,
        } => client
            .post(args.server.endpoint("/api/v3/tokens"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(
                json!({
                    "name": name,
                    "role": role,
                    "attributes": parse_attributes(attributes)?,
                    "expires_in": expires_in,
                })
                .to_string(),
            ),
        TokenCommand::List => client.get(args.server.endpoint("/api/v3/tokens")),
        TokenCommand::Revoke { id } => {
            client.delete(args.server.endpoint(&format!("/api/v3/tokens/{id}")))
        }
    };
    let response = request
        .send()
        .await
        .map_err(|e| format!("cannot reach {}: {e}", args.server.url))?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        return Err(format!("{status}: {}", crate::client::error_message(&text)).into());
    }
    match args.command {
        TokenCommand::Create { .. } => {
            let v: serde_json::Value = serde_json::from_str(&text)?;
            eprintln!("created token {} with role {}", v["id"], v["role"]);
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        TokenCommand::List => println!("{text}"),
        TokenCommand::Revoke { id } => eprintln!("revoked token {id}"),
    }
    Ok(())
}
