//! The audit trail: every query, login failure, token and role change, export and erasure,
//! appended to a hash-chained log.
//!
//! Each record is one JSON line whose last field, `mac`, is HMAC-SHA256 under the audit
//! key of the previous record's mac followed by the line's other bytes; so changing,
//! removing, reordering or inventing a record breaks the chain, and without the key nobody
//! can rebuild it. The key lives outside the lake (`<data-dir>/audit/audit.key`), and so
//! does the anchor: the first record kept (after retention) and the head last shipped, so a
//! cut tail or a rewritten chain is found too.
//!
//! Records are appended (and fsynced) to `<data-dir>/audit/pending.jsonl`, then shipped as
//! immutable segments `audit/<first>-<last>.jsonl` to the lake. Literal values in the SQL
//! (which could name a person), the subject of an export or erasure and the data keys a
//! query decrypted are sealed (AES-256-GCM under a key derived from the audit key): the
//! auditor reads the shape of every query, the data-protection officer can learn whose data
//! it read.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::ops::ControlFlow;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, Value, visit_expressions_mut};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parking_lot::Mutex;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Why the audit log failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Local files.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The lake.
    #[error("audit log in the lake: {0}")]
    Lake(#[from] object_store::Error),
    /// A file that does not parse.
    #[error("audit log {0}")]
    Corrupt(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a record says in clear.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AuditFields {
    /// `query`, `auth_failed`, `token_created`, `token_revoked`, `role_changed`,
    /// `role_removed`, `subject_export`, `subject_erase`, `subject_inventory`.
    pub kind: String,
    /// Token name and id (`name (id)`), or `anonymous`.
    pub user: String,
    /// The caller's role.
    pub role: String,
    /// `http`, `pgwire`, `flight`.
    pub interface: String,
    /// Client address.
    pub client: String,
    /// The SQL; in a stored record with its literals replaced by `$n` (they are sealed).
    pub sql: Option<String>,
    /// Tables touched.
    pub tables: Vec<String>,
    /// Columns touched (`table.column`).
    pub columns: Vec<String>,
    /// Whether personal columns were decrypted.
    pub personal_decrypted: bool,
    /// Rows returned.
    pub rows: Option<u64>,
    /// Duration in milliseconds.
    pub duration_ms: Option<u64>,
    /// `ok` or `error: ...`.
    pub outcome: String,
    /// Free text without personal data (a token id, a role name).
    pub detail: Option<String>,
}

/// One thing that happened, as the caller reports it (plain; sealed on append).
#[derive(Debug, Clone, Default)]
pub struct AuditEvent {
    /// What is recorded in clear.
    pub fields: AuditFields,
    /// Data keys decrypted (sealed).
    pub key_ids: Vec<u64>,
    /// The subject of an export or erasure (sealed).
    pub subject: Option<String>,
}

/// One record as stored, without its mac.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// Unix nanoseconds.
    pub time_ns: i64,
    /// What happened.
    #[serde(flatten)]
    pub fields: AuditFields,
    /// Base64 of nonce, ciphertext and tag of the [`Sealed`] part; None if empty.
    pub sealed: Option<String>,
}

/// The sealed part of a record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sealed {
    /// The SQL's literals, in order (`$1`, `$2`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub literals: Vec<String>,
    /// SQL that did not parse, whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// Data keys decrypted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_ids: Vec<u64>,
    /// The subject of an export or erasure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

impl Sealed {
    fn is_empty(&self) -> bool {
        self.literals.is_empty()
            && self.sql.is_none()
            && self.key_ids.is_empty()
            && self.subject.is_none()
    }
}

/// The anchor kept outside the lake.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Anchor {
    /// The first record kept (retention removes older segments).
    base_seq: u64,
    /// The mac before it (hex; zeros at the start of the chain).
    base_prev: String,
    /// The last record shipped to the lake.
    head_seq: u64,
    /// Its mac.
    head_mac: String,
}

impl Default for Anchor {
    fn default() -> Self {
        Anchor {
            base_seq: 1,
            base_prev: hex::encode([0u8; 32]),
            head_seq: 0,
            head_mac: hex::encode([0u8; 32]),
        }
    }
}

/// The keys of the chain.
struct AuditKeys {
    chain: hmac::Key,
    seal: LessSafeKey,
}

impl AuditKeys {
    fn load_or_create(dir: &Path, create: bool) -> Result<AuditKeys, AuditError> {
        let path = dir.join("audit.key");
        let secret = match std::fs::read_to_string(&path) {
            Ok(text) => hex::decode(text.trim())
                .ok()
                .filter(|k| k.len() == 32)
                .ok_or_else(|| {
                    AuditError::Corrupt(format!("key {} is not 64 hex digits", path.display()))
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut key = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| AuditError::Corrupt("no randomness for the audit key".into()))?;
                let mut f = File::options()
                    .create_new(true)
                    .write(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.write_all(hex::encode(key).as_bytes())
                    .and_then(|_| f.sync_all())
                    .map_err(io_err(&path))?;
                key.to_vec()
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mode = std::fs::metadata(&path)
            .map_err(io_err(&path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(AuditError::Corrupt(format!(
                "key {} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            )));
        }
        let chain = hmac::Key::new(hmac::HMAC_SHA256, &secret);
        let derived = hmac::sign(&chain, b"historian audit seal v1");
        let seal = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, derived.as_ref())
                .map_err(|_| AuditError::Corrupt("bad seal key".into()))?,
        );
        Ok(AuditKeys { chain, seal })
    }

    fn mac(&self, prev: &[u8], body: &[u8]) -> Vec<u8> {
        let mut ctx = hmac::Context::with_key(&self.chain);
        ctx.update(prev);
        ctx.update(body);
        ctx.sign().as_ref().to_vec()
    }

    fn seal(&self, seq: u64, sealed: &Sealed) -> Option<String> {
        if sealed.is_empty() {
            return None;
        }
        let mut nonce = [0u8; 12];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut data = serde_json::to_vec(sealed).ok()?;
        self.seal
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(seq.to_be_bytes()),
                &mut data,
            )
            .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Some(base64::engine::general_purpose::STANDARD.encode(out))
    }

    fn unseal(&self, record: &AuditRecord) -> Option<Sealed> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(record.sealed.as_ref()?)
            .ok()?;
        if bytes.len() < 12 + 16 {
            return None;
        }
        let (nonce, rest) = bytes.split_at(12);
        let mut data = rest.to_vec();
        let plain = self
            .seal
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).ok()?,
                Aad::from(record.seq.to_be_bytes()),
                &mut data,
            )
            .ok()?;
        serde_json::from_slice(plain).ok()
    }
}

/// The SQL with every literal value replaced by `$1`, `$2`, ..., and the literals.
/// SQL that does not parse is kept whole in the sealed part.
pub fn redact_sql(sql: &str) -> (Option<String>, Sealed) {
    let Ok(mut statements) = Parser::parse_sql(&GenericDialect {}, sql) else {
        return (
            None,
            Sealed {
                sql: Some(sql.to_string()),
                ..Sealed::default()
            },
        );
    };
    let mut literals = Vec::new();
    let _ = visit_expressions_mut(&mut statements, |e| {
        // `VARCHAR 'Ann'`, `TIMESTAMP '...'`: the literal inside a typed string too.
        if let SqlExpr::TypedString(ts) = e {
            let text = match &ts.value.value {
                Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
                other => other.to_string(),
            };
            literals.push(text);
            ts.value.value = Value::Placeholder(format!("${}", literals.len()));
        }
        if let SqlExpr::Value(v) = e
            && !matches!(
                v.value,
                Value::Boolean(_) | Value::Null | Value::Placeholder(_)
            )
        {
            let text = match &v.value {
                Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
                other => other.to_string(),
            };
            literals.push(text);
            v.value = Value::Placeholder(format!("${}", literals.len()));
        }
        ControlFlow::<()>::Continue(())
    });
    let text = statements
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    (
        Some(text),
        Sealed {
            literals,
            ..Sealed::default()
        },
    )
}

/// Splits a stored line into its body (the bytes the mac covers) and its mac.
fn split_line(line: &str) -> Option<(String, Vec<u8>)> {
    let at = line.rfind(",\"mac\":\"")?;
    let mac_hex = line[at + 8..].strip_suffix("\"}")?;
    let body = format!("{}}}", &line[..at]);
    Some((body, hex::decode(mac_hex).ok()?))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The writer's position in the chain.
struct Chain {
    next_seq: u64,
    last_mac: Vec<u8>,
    pending: File,
}

/// The audit log of a running server.
pub struct AuditLog {
    dir: PathBuf,
    keys: AuditKeys,
    lake: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    retention: Option<Duration>,
    chain: Mutex<Chain>,
    /// Serialises shipping.
    shipping: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("dir", &self.dir).finish()
    }
}

fn read_anchor(dir: &Path) -> Result<Anchor, AuditError> {
    let path = dir.join("anchor.json");
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| AuditError::Corrupt(format!("anchor {}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Anchor::default()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn write_anchor(dir: &Path, anchor: &Anchor) -> Result<(), AuditError> {
    let path = dir.join("anchor.json");
    let bytes = serde_json::to_vec(anchor).map_err(|e| AuditError::Corrupt(e.to_string()))?;
    crate::state_file::replace(&path, &bytes).map_err(io_err(&path))
}

/// The lines of the pending file; a torn last line (a crash mid-append) is dropped.
fn read_pending(path: &Path) -> Result<Vec<String>, AuditError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut lines = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io_err(path))?;
        if !line.is_empty() {
            lines.push(line);
        }
    }
    if lines.last().is_some_and(|l| split_line(l).is_none()) {
        lines.pop();
    }
    Ok(lines)
}

/// A segment of the lake: its object path and seq range.
#[derive(Debug, Clone)]
struct Segment {
    path: ObjectPath,
    first: u64,
    last: u64,
    modified: chrono::DateTime<chrono::Utc>,
}

async fn list_segments(
    lake: &Arc<dyn ObjectStore>,
    prefix: &ObjectPath,
) -> Result<Vec<Segment>, AuditError> {
    let objects: Vec<_> = lake.list(Some(prefix)).try_collect().await?;
    let mut segments: Vec<Segment> = objects
        .into_iter()
        .filter_map(|o| {
            let name = o.location.filename()?.strip_suffix(".jsonl")?.to_string();
            let (first, last) = name.split_once('-')?;
            Some(Segment {
                first: first.parse().ok()?,
                last: last.parse().ok()?,
                path: o.location,
                modified: o.last_modified,
            })
        })
        .collect();
    segments.sort_by_key(|s| (s.first, s.last));
    Ok(segments)
}

impl AuditLog {
    /// Opens the log in `dir` (creating its key at first start), shipping segments to
    /// `lake` under `prefix`; ships whatever a crash left pending.
    pub async fn open(
        dir: &Path,
        lake: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        retention: Option<Duration>,
    ) -> Result<Arc<AuditLog>, AuditError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let keys = AuditKeys::load_or_create(dir, true)?;
        let anchor = read_anchor(dir)?;
        let pending_path = dir.join("pending.jsonl");
        let lines = read_pending(&pending_path)?;
        let (next_seq, last_mac) = match lines.last() {
            Some(line) => {
                let (body, mac) = split_line(line)
                    .ok_or_else(|| AuditError::Corrupt("pending record without mac".into()))?;
                let record: AuditRecord = serde_json::from_str(&body)
                    .map_err(|e| AuditError::Corrupt(format!("pending record: {e}")))?;
                (record.seq + 1, mac)
            }
            None => (
                anchor.head_seq + 1,
                hex::decode(&anchor.head_mac)
                    .map_err(|_| AuditError::Corrupt("anchor head mac".into()))?,
            ),
        };
        // Rewrite the pending file without a torn tail, so appends start on a clean line.
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::write(&pending_path, text).map_err(io_err(&pending_path))?;
        let pending = File::options()
            .append(true)
            .mode(0o600)
            .open(&pending_path)
            .map_err(io_err(&pending_path))?;
        let log = Arc::new(AuditLog {
            dir: dir.to_path_buf(),
            keys,
            lake,
            prefix,
            retention,
            chain: Mutex::new(Chain {
                next_seq,
                last_mac,
                pending,
            }),
            shipping: tokio::sync::Mutex::new(()),
        });
        log.ship().await?;
        Ok(log)
    }

    /// Appends `event` and fsyncs it. Blocking: call from a blocking context or
    /// through [`AuditLog::record`].
    pub fn append(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let mut fields = event.fields;
        let mut sealed = match fields.sql.take() {
            Some(sql) => {
                let (redacted, sealed) = redact_sql(&sql);
                fields.sql = redacted;
                sealed
            }
            None => Sealed::default(),
        };
        sealed.key_ids = event.key_ids;
        sealed.subject = event.subject;
        let mut chain = self.chain.lock();
        let seq = chain.next_seq;
        let record = AuditRecord {
            seq,
            time_ns: now_ns(),
            fields,
            sealed: self.keys.seal(seq, &sealed),
        };
        let body =
            serde_json::to_string(&record).map_err(|e| AuditError::Corrupt(e.to_string()))?;
        let mac = self.keys.mac(&chain.last_mac, body.as_bytes());
        let line = format!(
            "{},\"mac\":\"{}\"}}\n",
            &body[..body.len() - 1],
            hex::encode(&mac)
        );
        let path = self.dir.join("pending.jsonl");
        chain
            .pending
            .write_all(line.as_bytes())
            .and_then(|_| chain.pending.sync_data())
            .map_err(io_err(&path))?;
        chain.next_seq += 1;
        chain.last_mac = mac;
        Ok(seq)
    }

    /// Appends `event` off the async threads; a failure is logged (the event already
    /// happened; the log says it could not be recorded).
    pub async fn record(self: &Arc<Self>, event: AuditEvent) {
        let log = self.clone();
        let kind = event.fields.kind.clone();
        match tokio::task::spawn_blocking(move || log.append(event)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(%kind, error = %e, "could not append to the audit log"),
            Err(e) => tracing::error!(%kind, error = %e, "audit append task failed"),
        }
    }

    /// Ships the pending records to the lake as one segment, moves the anchor's head to
    /// them, and applies retention.
    pub async fn ship(&self) -> Result<(), AuditError> {
        let _one = self.shipping.lock().await;
        let pending_path = self.dir.join("pending.jsonl");
        let lines = {
            let _chain = self.chain.lock();
            read_pending(&pending_path)?
        };
        let mut anchor = read_anchor(&self.dir)?;
        if let (Some(first), Some(last)) = (lines.first(), lines.last()) {
            let seq_of = |line: &str| -> Result<(u64, Vec<u8>), AuditError> {
                let (body, mac) = split_line(line)
                    .ok_or_else(|| AuditError::Corrupt("pending record without mac".into()))?;
                let r: AuditRecord = serde_json::from_str(&body)
                    .map_err(|e| AuditError::Corrupt(format!("pending record: {e}")))?;
                Ok((r.seq, mac))
            };
            let (first_seq, _) = seq_of(first)?;
            let (last_seq, last_mac) = seq_of(last)?;
            let mut text = lines.join("\n");
            text.push('\n');
            let object = self
                .prefix
                .clone()
                .join(format!("{first_seq:020}-{last_seq:020}.jsonl"));
            self.lake
                .put(&object, PutPayload::from(text.into_bytes()))
                .await?;
            anchor.head_seq = last_seq;
            anchor.head_mac = hex::encode(&last_mac);
            write_anchor(&self.dir, &anchor)?;
            // Drop what was shipped; records appended meanwhile stay.
            // Under the writer's lock from here to the reopen: an append in between would
            // go to the replaced file and be lost.
            let mut chain = self.chain.lock();
            let now = read_pending(&pending_path)?;
            let rest: Vec<&String> = now.iter().skip(lines.len()).collect();
            let mut text = String::new();
            for l in rest {
                text.push_str(l);
                text.push('\n');
            }
            crate::state_file::replace(&pending_path, text.as_bytes())
                .map_err(io_err(&pending_path))?;
            // The writer's file handle points at the old inode: reopen it.
            chain.pending = File::options()
                .append(true)
                .open(&pending_path)
                .map_err(io_err(&pending_path))?;
        }
        self.apply_retention(&mut anchor).await
    }

    async fn apply_retention(&self, anchor: &mut Anchor) -> Result<(), AuditError> {
        let Some(retention) = self.retention else {
            return Ok(());
        };
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let segments = list_segments(&self.lake, &self.prefix).await?;
        // Keep the newest segment always: it carries the chain forward.
        for segment in segments.iter().take(segments.len().saturating_sub(1)) {
            if segment.modified >= cutoff || segment.last > anchor.head_seq {
                break;
            }
            let bytes = self.lake.get(&segment.path).await?.bytes().await?;
            let text = String::from_utf8_lossy(&bytes);
            let last =
                text.lines().rev().find_map(split_line).ok_or_else(|| {
                    AuditError::Corrupt(format!("segment {} is empty", segment.path))
                })?;
            anchor.base_seq = segment.last + 1;
            anchor.base_prev = hex::encode(&last.1);
            write_anchor(&self.dir, anchor)?;
            self.lake.delete(&segment.path).await?;
            tracing::info!(segment = %segment.path, "audit segment past retention removed");
        }
        Ok(())
    }

    /// Every record kept, lake segments then pending, with their sealed parts opened.
    pub async fn records(&self) -> Result<Vec<(AuditRecord, Option<Sealed>)>, AuditError> {
        let _one = self.shipping.lock().await;
        let pending = {
            let _chain = self.chain.lock();
            read_pending(&self.dir.join("pending.jsonl"))?
        };
        // The lake is not trusted: what the auditor and a subject's export read must be the
        // chain the key made, whole, from the anchored base.
        let (sources, mut problems) = read_sources(&self.lake, &self.prefix, pending).await?;
        let anchor = read_anchor(&self.dir)?;
        let check = check_chain(&self.keys, &anchor, &sources)?;
        problems.extend(check.report.problems);
        if let Some(first) = problems.first() {
            let at = match check.first_broken {
                Some(seq) => format!("record {seq}"),
                None => "the segments".to_string(),
            };
            return Err(AuditError::Corrupt(format!(
                "chain broken at {at}: {first}; the log in the lake was altered, run `historian audit verify`"
            )));
        }
        Ok(check
            .records
            .into_iter()
            .map(|r| {
                let sealed = self.keys.unseal(&r);
                (r, sealed)
            })
            .collect())
    }
}

/// What `historian audit verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Records whose chain checked.
    pub records: u64,
    /// First and last seq seen.
    pub range: Option<(u64, u64)>,
    /// Every problem, with where.
    pub problems: Vec<String>,
}

/// Checks the whole chain: every record's mac, seq order without gaps from the anchor's
/// base, segment names against their content, and that the anchored head is present.
pub async fn verify(
    dir: &Path,
    lake: &Arc<dyn ObjectStore>,
    prefix: &ObjectPath,
) -> Result<VerifyReport, AuditError> {
    let keys = AuditKeys::load_or_create(dir, false)?;
    let anchor = read_anchor(dir)?;
    let pending = read_pending(&dir.join("pending.jsonl"))?;
    let (sources, problems) = read_sources(lake, prefix, pending).await?;
    let mut report = check_chain(&keys, &anchor, &sources)?.report;
    report.problems.splice(0..0, problems);
    Ok(report)
}

/// The lake's segments in order, then the pending records, as (where, text); and a
/// problem for each segment whose name does not match its number of records.
async fn read_sources(
    lake: &Arc<dyn ObjectStore>,
    prefix: &ObjectPath,
    pending: Vec<String>,
) -> Result<(Vec<(String, String)>, Vec<String>), AuditError> {
    let mut sources = Vec::new();
    let mut problems = Vec::new();
    for segment in list_segments(lake, prefix).await? {
        let bytes = lake.get(&segment.path).await?.bytes().await?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let count = text.lines().filter(|l| !l.is_empty()).count() as u64;
        if segment.last < segment.first || segment.last - segment.first + 1 != count {
            problems.push(format!(
                "segment {} should hold records {}..={} but holds {count} lines",
                segment.path, segment.first, segment.last
            ));
        }
        sources.push((segment.path.to_string(), text));
    }
    sources.push(("pending.jsonl (local)".into(), pending.join("\n")));
    Ok((sources, problems))
}

/// What walking the chain found: the records from the anchored base, every problem, and
/// the first record whose order or mac is wrong.
struct ChainCheck {
    records: Vec<AuditRecord>,
    report: VerifyReport,
    first_broken: Option<u64>,
}

/// Walks `sources` from the anchor's base: every record's mac, seq order without gaps,
/// and that the anchored head is present.
fn check_chain(
    keys: &AuditKeys,
    anchor: &Anchor,
    sources: &[(String, String)],
) -> Result<ChainCheck, AuditError> {
    let mut check = ChainCheck {
        records: Vec::new(),
        report: VerifyReport::default(),
        first_broken: None,
    };
    let report = &mut check.report;
    let mut expected_seq = anchor.base_seq;
    let mut prev = hex::decode(&anchor.base_prev)
        .map_err(|_| AuditError::Corrupt("anchor base mac".into()))?;
    let mut head_seen = anchor.head_seq < anchor.base_seq;
    for (source, text) in sources {
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
            let at = format!("{source} line {}", i + 1);
            let Some((body, mac)) = split_line(line) else {
                report.problems.push(format!("{at}: not a record (no mac)"));
                continue;
            };
            let record: AuditRecord = match serde_json::from_str(&body) {
                Ok(r) => r,
                Err(e) => {
                    report.problems.push(format!("{at}: does not parse: {e}"));
                    continue;
                }
            };
            if record.seq < anchor.base_seq {
                // Before the retained base: a segment retention should have removed.
                continue;
            }
            if record.seq != expected_seq {
                report.problems.push(format!(
                    "{at}: record {} where {expected_seq} was expected (removed or reordered records)",
                    record.seq
                ));
                check.first_broken.get_or_insert(record.seq);
            }
            if keys.mac(&prev, body.as_bytes()) != mac {
                report.problems.push(format!(
                    "{at}: record {} fails its mac (changed, out of order, or written without the key)",
                    record.seq
                ));
                check.first_broken.get_or_insert(record.seq);
            }
            if record.seq == anchor.head_seq {
                head_seen = hex::encode(&mac) == anchor.head_mac;
                if !head_seen {
                    report.problems.push(format!(
                        "{at}: record {} is not the anchored head (the chain was rewritten)",
                        record.seq
                    ));
                }
            }
            report.records += 1;
            report.range = Some(match report.range {
                None => (record.seq, record.seq),
                Some((a, _)) => (a, record.seq),
            });
            prev = mac;
            expected_seq = record.seq + 1;
            check.records.push(record);
        }
    }
    if !head_seen && anchor.head_seq >= anchor.base_seq {
        report.problems.push(format!(
            "the anchored head, record {}, is missing: the log was truncated",
            anchor.head_seq
        ));
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_leave_the_sql_and_are_sealed() {
        let (sql, sealed) =
            redact_sql("SELECT * FROM events WHERE operator_name = 'Ann Smith' AND n > 42 LIMIT 5");
        let sql = sql.unwrap();
        assert!(!sql.contains("Ann") && !sql.contains("42"), "{sql}");
        assert!(sql.contains("operator_name = $1"), "{sql}");
        assert_eq!(sealed.literals, vec!["Ann Smith", "42", "5"]);
        let (sql, sealed) = redact_sql("SELECT * FROM e WHERE name = VARCHAR 'Ann Smith'");
        assert!(!sql.unwrap().contains("Ann"));
        assert_eq!(sealed.literals, vec!["Ann Smith"]);
        let (sql, sealed) = redact_sql("SELEC 'Ann'");
        assert!(sql.is_none());
        assert_eq!(sealed.sql.as_deref(), Some("SELEC 'Ann'"));
    }

    fn local_lake(dir: &Path) -> Arc<dyn ObjectStore> {
        let root = dir.join("lake");
        std::fs::create_dir_all(&root).unwrap();
        Arc::new(object_store::local::LocalFileSystem::new_with_prefix(root).unwrap())
    }

    fn query_event(i: u64) -> AuditEvent {
        AuditEvent {
            fields: AuditFields {
                kind: "query".into(),
                sql: Some(format!("SELECT {i}")),
                outcome: "ok".into(),
                ..AuditFields::default()
            },
            ..AuditEvent::default()
        }
    }

    #[tokio::test]
    async fn retention_removes_old_segments_and_the_rest_still_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let lake = local_lake(dir.path());
        let prefix = ObjectPath::from("audit");
        let local = dir.path().join("audit");
        let log = AuditLog::open(&local, lake.clone(), prefix.clone(), Some(Duration::ZERO))
            .await
            .unwrap();
        for i in 0..9 {
            log.append(query_event(i)).unwrap();
            if i % 3 == 2 {
                log.ship().await.unwrap();
            }
        }
        // Every segment but the newest is past a zero retention.
        let left = list_segments(&lake, &prefix).await.unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!((left[0].first, left[0].last), (7, 9));
        let report = verify(&local, &lake, &prefix).await.unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.range, Some((7, 9)));
        assert_eq!(log.records().await.unwrap().len(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_while_shipping_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let lake = local_lake(dir.path());
        let prefix = ObjectPath::from("audit");
        let local = dir.path().join("audit");
        let log = AuditLog::open(&local, lake.clone(), prefix.clone(), None)
            .await
            .unwrap();
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..400 {
                    log.append(query_event(i)).unwrap();
                }
            })
        };
        while !writer.is_finished() {
            log.ship().await.unwrap();
        }
        writer.join().unwrap();
        log.ship().await.unwrap();
        let report = verify(&local, &lake, &prefix).await.unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.range, Some((1, 400)));
    }

    #[tokio::test]
    async fn a_clean_chain_verifies_and_sealed_parts_open() {
        let dir = tempfile::tempdir().unwrap();
        let lake: Arc<dyn ObjectStore> = Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix(
                std::fs::create_dir_all(dir.path().join("lake"))
                    .map(|_| dir.path().join("lake"))
                    .unwrap(),
            )
            .unwrap(),
        );
        let prefix = ObjectPath::from("audit");
        let local = dir.path().join("audit");
        let log = AuditLog::open(&local, lake.clone(), prefix.clone(), None)
            .await
            .unwrap();
        for i in 0..5 {
            log.append(AuditEvent {
                fields: AuditFields {
                    kind: "query".into(),
                    sql: Some(format!("SELECT {i}")),
                    outcome: "ok".into(),
                    ..AuditFields::default()
                },
                key_ids: vec![7],
                ..AuditEvent::default()
            })
            .unwrap();
            if i == 2 {
                log.ship().await.unwrap();
            }
        }
        let report = verify(&local, &lake, &prefix).await.unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.range, Some((1, 5)));
        let records = log.records().await.unwrap();
        assert_eq!(records.len(), 5);
        let sealed = records[4].1.as_ref().unwrap();
        assert_eq!(sealed.literals, vec!["4"]);
        assert_eq!(sealed.key_ids, vec![7]);
        // Reopening continues the chain.
        drop(log);
        let log = AuditLog::open(&local, lake.clone(), prefix.clone(), None)
            .await
            .unwrap();
        log.append(AuditEvent {
            fields: AuditFields {
                kind: "query".into(),
                outcome: "ok".into(),
                ..AuditFields::default()
            },
            ..AuditEvent::default()
        })
        .unwrap();
        let report = verify(&local, &lake, &prefix).await.unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.range, Some((1, 6)));
        // What the auditor and subject exports read is checked too: a changed segment in
        // the lake makes them fail rather than show a forgery.
        log.ship().await.unwrap();
        let segment = list_segments(&lake, &prefix).await.unwrap()[0].path.clone();
        let text = String::from_utf8(
            lake.get(&segment)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        let forged = text.replacen("SELECT $1", "SELECT 'x'", 1);
        assert_ne!(forged, text);
        lake.put(&segment, PutPayload::from(forged.into_bytes()))
            .await
            .unwrap();
        let err = log.records().await.unwrap_err().to_string();
        assert!(err.contains("chain broken at record 1"), "{err}");
    }
}
