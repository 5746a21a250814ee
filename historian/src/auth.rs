//! Authentication: who is calling. A token from the `Authorization` header (`Bearer`,
//! `Token` as InfluxDB clients send it, or `Basic` with the token as password, as v1
//! clients and Telegraf send it), checked against the token store, its role resolved.
//! Failures are rate-limited per client address and audited.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use parking_lot::Mutex;
use serde_json::json;

use crate::audit::{AuditEvent, AuditFields, AuditLog};
use crate::http::AppState;
use crate::role::{CallerPolicy, Role, Roles};
use crate::token::TokenStore;

/// Failed attempts one client address may make per window before it is refused.
const MAX_FAILURES: u32 = 10;
/// The window of [`MAX_FAILURES`].
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// A token's use from one address is audited as a login at most this often: HTTP has no
/// sessions, and a record per request would flood the log at ingest rates.
const LOGIN_INTERVAL: Duration = Duration::from_secs(3600);

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's id (`-` without auth).
    pub token_id: String,
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its attributes.
    pub attributes: Arc<BTreeMap<String, Vec<String>>>,
    /// Where the request came from.
    pub client: SocketAddr,
}

impl Caller {
    /// `name (id)`, as the audit log names callers.
    pub fn user(&self) -> String {
        format!("{} ({})", self.name, self.token_id)
    }

    /// The engine's policy for this caller.
    pub fn policy(&self) -> Arc<CallerPolicy> {
        Arc::new(CallerPolicy {
            role: self.role.clone(),
            attributes: self.attributes.clone(),
        })
    }

    /// An audit event of `kind` by this caller over `interface`.
    pub fn event(&self, kind: &str, interface: &str) -> AuditEvent {
        AuditEvent {
            fields: AuditFields {
                kind: kind.to_string(),
                user: self.user(),
                role: self.role.name().to_string(),
                interface: interface.to_string(),
                client: self.client.to_string(),
                outcome: "ok".into(),
                ..AuditFields::default()
            },
            ..AuditEvent::default()
        }
    }
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthFailure {
    /// No credentials.
    Missing,
    /// Wrong, expired or revoked token, or one whose role no longer exists.
    Refused(&'static str),
    /// Too many failures from this address.
    RateLimited(Duration),
}

impl IntoResponse for AuthFailure {
    fn into_response(self) -> Response {
        let (status, message, retry) = match self {
            AuthFailure::Missing => (
                StatusCode::UNAUTHORIZED,
                "authentication required: send a token as 'Authorization: Bearer <token>' (or 'Token <token>')".to_string(),
                None,
            ),
            // One message for every refusal: the caller learns nothing about which tokens exist.
            AuthFailure::Refused(_) => (
                StatusCode::UNAUTHORIZED,
                "invalid, expired or revoked token".to_string(),
                None,
            ),
            AuthFailure::RateLimited(wait) => (
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many failed authentication attempts from this address; retry in {} s",
                    wait.as_secs().max(1)
                ),
                Some(wait.as_secs().max(1)),
            ),
        };
        let mut r = (
            status,
            axum::Json(json!({"error": message, "message": message, "code": "unauthorized"})),
        )
            .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"historian\""),
        );
        if let Some(s) = retry
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

/// Counts failures per client address.
#[derive(Debug, Default)]
struct FailureLimiter {
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    /// How long `ip` must wait, if it is over its limit.
    fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let windows = self.windows.lock();
        let (start, count) = windows.get(&ip)?;
        let elapsed = start.elapsed();
        (*count >= MAX_FAILURES && elapsed < FAILURE_WINDOW).then(|| FAILURE_WINDOW - elapsed)
    }

    fn fail(&self, ip: IpAddr) {
        let mut windows = self.windows.lock();
        if windows.len() > 100_000 {
            windows.retain(|_, (start, _)| start.elapsed() < FAILURE_WINDOW);
        }
        let entry = windows.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= FAILURE_WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

/// Authentication and authorization state of the server.
#[derive(Debug)]
pub struct Auth {
    /// The tokens; None when the server runs `--without-auth`.
    pub tokens: Option<TokenStore>,
    /// The roles.
    pub roles: Roles,
    /// Where failures are recorded.
    pub audit: Arc<AuditLog>,
    limiter: FailureLimiter,
    /// When each (token, address) last logged in.
    logins: Mutex<HashMap<(String, IpAddr), Instant>>,
}

impl Auth {
    /// Authentication with `tokens` (None: every caller is an anonymous admin).
    pub fn new(tokens: Option<TokenStore>, roles: Roles, audit: Arc<AuditLog>) -> Self {
        Auth {
            tokens,
            roles,
            audit,
            limiter: FailureLimiter::default(),
            logins: Mutex::new(HashMap::new()),
        }
    }

    /// Whether this use of a token is a login: its first from this address in
    /// [`LOGIN_INTERVAL`].
    fn is_login(&self, token_id: &str, ip: IpAddr) -> bool {
        let mut logins = self.logins.lock();
        if logins.len() > 100_000 {
            logins.retain(|_, at| at.elapsed() < LOGIN_INTERVAL);
        }
        let key = (token_id.to_string(), ip);
        match logins.get(&key) {
            Some(at) if at.elapsed() < LOGIN_INTERVAL => false,
            _ => {
                logins.insert(key, Instant::now());
                true
            }
        }
    }

    /// The caller presenting `token` from `client`. Failures are audited.
    pub async fn authenticate(
        &self,
        token: Option<&str>,
        client: SocketAddr,
        interface: &str,
    ) -> Result<Caller, AuthFailure> {
        let Some(tokens) = &self.tokens else {
            return Ok(Caller {
                token_id: "-".into(),
                name: "anonymous".into(),
                role: Role::Admin,
                attributes: Arc::default(),
                client,
            });
        };
        if let Some(wait) = self.limiter.blocked(client.ip()) {
            return Err(AuthFailure::RateLimited(wait));
        }
        let outcome = match token {
            None => Err(AuthFailure::Missing),
            Some(t) => match tokens.verify(t) {
                Ok(record) => match self.roles.get(&record.role) {
                    // A role may gain `clear` after a token was issued for it: such a token
                    // works only if the dpo issued it.
                    Some(role) if role.reads_clear() && !record.dpo_granted => Err(
                        AuthFailure::Refused("token for a clear role not issued by the dpo"),
                    ),
                    Some(role) => Ok(Caller {
                        token_id: record.id,
                        name: record.name,
                        role,
                        attributes: Arc::new(record.attributes),
                        client,
                    }),
                    None => Err(AuthFailure::Refused(
                        "token of a role that no longer exists",
                    )),
                },
                Err(r) => Err(AuthFailure::Refused(r.as_str())),
            },
        };
        if let Ok(caller) = &outcome
            && self.is_login(&caller.token_id, client.ip())
        {
            self.audit.record(caller.event("login", interface)).await;
        }
        if let Err(AuthFailure::Refused(why)) = &outcome {
            self.limiter.fail(client.ip());
            self.audit
                .record(AuditEvent {
                    fields: AuditFields {
                        kind: "auth_failed".into(),
                        user: "-".into(),
                        role: "-".into(),
                        interface: interface.to_string(),
                        client: client.to_string(),
                        outcome: format!("error: {why}"),
                        ..AuditFields::default()
                    },
                    ..AuditEvent::default()
                })
                .await;
        }
        outcome
    }
}

/// The token in a request's headers: `Bearer`, `Token`, or the password of `Basic`.
pub fn presented_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" | "token" => Some(rest.to_string()),
        "basic" => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            text.split_once(':').map(|(_, p)| p.to_string())
        }
        _ => None,
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let client = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let token = presented_token(&parts.headers);
        state
            .auth
            .authenticate(token.as_deref(), client, "http")
            .await
            .map_err(IntoResponse::into_response)
    }
}

/// A 403 answer.
pub fn forbidden(message: &str) -> Response {
    (
        StatusCode::FORBIDDEN,
        axum::Json(json!({"error": message, "message": message, "code": "forbidden"})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_every_header_shape() {
        let mut h = HeaderMap::new();
        for (value, want) in [
            ("Bearer hst_a_b", Some("hst_a_b")),
            ("Token hst_a_b", Some("hst_a_b")),
            ("token  hst_a_b ", Some("hst_a_b")),
            ("Basic dXNlcjpoc3RfYV9i", Some("hst_a_b")),
            ("Digest x", None),
        ] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            assert_eq!(presented_token(&h).as_deref(), want, "{value}");
        }
    }

    #[test]
    fn failures_are_limited_per_address() {
        let limiter = FailureLimiter::default();
        let ip: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..MAX_FAILURES {
            assert!(limiter.blocked(ip).is_none());
            limiter.fail(ip);
        }
        assert!(limiter.blocked(ip).is_some());
        assert!(limiter.blocked([10, 0, 0, 2].into()).is_none());
    }
}
