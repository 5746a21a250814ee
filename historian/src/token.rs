//! API tokens: created with a role, attributes and an optional expiry; only a keyed hash
//! of each secret is stored, in `<data-dir>/auth/tokens.json`.
//!
//! A token reads `hst_<id>_<secret>`: the id finds the record, the 256-bit secret is
//! checked against its hash in constant time. The file is rewritten atomically under an
//! exclusive lock, so the server and an offline `historian token` never lose each other's
//! changes; the server re-reads it when it changes on disk.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use parking_lot::Mutex;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// The prefix of every token.
pub const TOKEN_PREFIX: &str = "hst_";

/// The hash of token secrets: HMAC-SHA256 under a fixed, public key (domain separation,
/// and `hmac::verify` compares in constant time). Secrets are 256 random bits, so no
/// slow password hash is needed.
const HASH_KEY: &[u8] = b"historian api token v1";

/// Why a token store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Reading or writing the store.
    #[error("token store {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The store does not parse.
    #[error("token store {path} is corrupt: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The system's random source failed.
    #[error("no randomness for a new token")]
    Random,
}

/// Why a presented token was refused. The caller sees one message for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not of the token shape, or no such id, or a wrong secret.
    Unknown,
    /// Past its expiry.
    Expired,
    /// Revoked.
    Revoked,
}

impl Refusal {
    /// For the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unknown => "unknown token",
            Refusal::Expired => "expired token",
            Refusal::Revoked => "revoked token",
        }
    }
}

/// One token as stored (no secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    /// Public id (16 hex digits), part of the token.
    pub id: String,
    /// A name for people ("line-1 telegraf").
    pub name: String,
    /// The role whose policy applies.
    pub role: String,
    /// Attributes the role's row predicates use (`lines = ["L1"]`).
    #[serde(default)]
    pub attributes: BTreeMap<String, Vec<String>>,
    /// Hex HMAC of the secret.
    pub hash: String,
    /// Unix seconds.
    pub created: i64,
    /// Who created it (token name, or `bootstrap`, or `local`).
    pub created_by: String,
    /// Unix seconds after which the token is refused.
    #[serde(default)]
    pub expires: Option<i64>,
    /// Unix seconds at which it was revoked.
    #[serde(default)]
    pub revoked: Option<i64>,
    /// Issued by the dpo (or by plant IT on the machine): only such tokens may use a role
    /// that reads personal data in clear, even if the role gains `clear` later.
    #[serde(default)]
    pub dpo_granted: bool,
}

impl TokenRecord {
    /// The record without its hash, for listings.
    pub fn public(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "attributes": self.attributes,
            "created": self.created,
            "created_by": self.created_by,
            "expires": self.expires,
            "revoked": self.revoked,
            "dpo_granted": self.dpo_granted,
        })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoreFile {
    tokens: Vec<TokenRecord>,
}

/// What identifies a version of the file on disk.
type Stamp = Option<(u64, i64, i64, u64)>;

#[derive(Debug)]
struct Loaded {
    stamp: Stamp,
    tokens: Vec<TokenRecord>,
}

/// The token store.
#[derive(Debug)]
pub struct TokenStore {
    dir: PathBuf,
    loaded: Mutex<Loaded>,
}

/// Now, in Unix seconds (token times are whole seconds).
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn hash_secret(secret: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, HASH_KEY);
    hex::encode(hmac::sign(&key, secret.as_bytes()).as_ref())
}

impl TokenStore {
    /// Opens (creating the directory) the store in `dir`.
    pub fn open(dir: &Path) -> Result<TokenStore, TokenError> {
        std::fs::create_dir_all(dir).map_err(|source| TokenError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let store = TokenStore {
            dir: dir.to_path_buf(),
            loaded: Mutex::new(Loaded {
                stamp: None,
                tokens: Vec::new(),
            }),
        };
        store.refresh()?;
        Ok(store)
    }

    fn path(&self) -> PathBuf {
        self.dir.join("tokens.json")
    }

    fn stamp(&self) -> Stamp {
        std::fs::metadata(self.path())
            .ok()
            .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
    }

    fn read_file(&self) -> Result<Vec<TokenRecord>, TokenError> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<StoreFile>(&bytes)
                .map(|f| f.tokens)
                .map_err(|e| TokenError::Corrupt {
                    path,
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(TokenError::Io { path, source }),
        }
    }

    /// Re-reads the file if it changed on disk (another process created or revoked).
    fn refresh(&self) -> Result<(), TokenError> {
        let stamp = self.stamp();
        let mut loaded = self.loaded.lock();
        if loaded.stamp != stamp || stamp.is_none() {
            loaded.tokens = self.read_file()?;
            loaded.stamp = stamp;
        }
        Ok(())
    }

    /// Runs `change` on the tokens under the store's exclusive lock, then writes them
    /// back atomically.
    fn modify<T>(&self, change: impl FnOnce(&mut Vec<TokenRecord>) -> T) -> Result<T, TokenError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TokenError::Io { path, source }
        };
        let lock_path = self.dir.join("tokens.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        let mut tokens = self.read_file()?;
        let out = change(&mut tokens);
        let path = self.path();
        let bytes = serde_json::to_vec_pretty(&StoreFile {
            tokens: tokens.clone(),
        })
        .map_err(|e| TokenError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        crate::state_file::replace(&path, &bytes).map_err(io(&path))?;
        let mut loaded = self.loaded.lock();
        loaded.tokens = tokens;
        loaded.stamp = self.stamp();
        Ok(out)
    }

    /// Whether the store holds no token at all (a first start).
    pub fn is_empty(&self) -> Result<bool, TokenError> {
        self.refresh()?;
        Ok(self.loaded.lock().tokens.is_empty())
    }

    /// Creates a token; returns its record and the token text (shown once, never stored).
    pub fn create(
        &self,
        name: &str,
        role: &str,
        attributes: BTreeMap<String, Vec<String>>,
        expires: Option<i64>,
        created_by: &str,
        dpo_granted: bool,
    ) -> Result<(TokenRecord, String), TokenError> {
        let rng = SystemRandom::new();
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        rng.fill(&mut id).map_err(|_| TokenError::Random)?;
        rng.fill(&mut secret).map_err(|_| TokenError::Random)?;
        let id = hex::encode(id);
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        let record = TokenRecord {
            id: id.clone(),
            name: name.to_string(),
            role: role.to_string(),
            attributes,
            hash: hash_secret(&secret),
            created: unix_now(),
            created_by: created_by.to_string(),
            expires,
            revoked: None,
            dpo_granted,
        };
        let stored = record.clone();
        self.modify(move |tokens| tokens.push(stored))?;
        Ok((record, format!("{TOKEN_PREFIX}{id}_{secret}")))
    }

    /// Every token, revoked and expired ones included.
    pub fn list(&self) -> Result<Vec<TokenRecord>, TokenError> {
        self.refresh()?;
        Ok(self.loaded.lock().tokens.clone())
    }

    /// Revokes the token `id`; false if there is none.
    pub fn revoke(&self, id: &str) -> Result<bool, TokenError> {
        let now = unix_now();
        self.modify(|tokens| match tokens.iter_mut().find(|t| t.id == id) {
            Some(t) => {
                t.revoked.get_or_insert(now);
                true
            }
            None => false,
        })
    }

    /// The record of a presented token, if it is valid now.
    pub fn verify(&self, presented: &str) -> Result<TokenRecord, Refusal> {
        let (id, secret) = presented
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .ok_or(Refusal::Unknown)?;
        if self.refresh().is_err() {
            return Err(Refusal::Unknown);
        }
        let loaded = self.loaded.lock();
        let record = loaded
            .tokens
            .iter()
            .find(|t| t.id == id)
            .ok_or(Refusal::Unknown)?;
        let expected = hex::decode(&record.hash).map_err(|_| Refusal::Unknown)?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, HASH_KEY);
        hmac::verify(&key, secret.as_bytes(), &expected).map_err(|_| Refusal::Unknown)?;
        if record.revoked.is_some() {
            return Err(Refusal::Revoked);
        }
        if record.expires.is_some_and(|e| e <= unix_now()) {
            return Err(Refusal::Expired);
        }
        Ok(record.clone())
    }
}

/// At first start (no token at all): creates an admin token and writes it once to
/// `<data_dir>/admin-token` (mode 0600). Returns the file's path if it did.
pub fn bootstrap_admin(store: &TokenStore, data_dir: &Path) -> Result<Option<PathBuf>, TokenError> {
    if !store.is_empty()? {
        return Ok(None);
    }
    let (_, token) = store.create("admin", "admin", BTreeMap::new(), None, "bootstrap", false)?;
    let path = data_dir.join("admin-token");
    crate::state_file::replace(&path, format!("{token}\n").as_bytes()).map_err(|source| {
        TokenError::Io {
            path: path.clone(),
            source,
        }
    })?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_until_revoked_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        let (rec, token) = store
            .create("t", "writer", BTreeMap::new(), None, "test", false)
            .unwrap();
        assert_eq!(store.verify(&token).unwrap().id, rec.id);
        // The file never holds the secret.
        let text = std::fs::read_to_string(dir.path().join("tokens.json")).unwrap();
        // The secret is all after `hst_<id>_`; base64url may itself hold `_`.
        let secret = token.splitn(3, '_').nth(2).unwrap();
        assert!(secret.len() >= 40, "{token}");
        assert!(!text.contains(secret));
        let mut wrong = token.clone();
        wrong.pop();
        wrong.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(store.verify(&wrong), Err(Refusal::Unknown));
        assert_eq!(store.verify("Bearer"), Err(Refusal::Unknown));
        assert!(store.revoke(&rec.id).unwrap());
        assert_eq!(store.verify(&token), Err(Refusal::Revoked));
        let (_, old) = store
            .create(
                "t",
                "writer",
                BTreeMap::new(),
                Some(unix_now() - 1),
                "test",
                false,
            )
            .unwrap();
        assert_eq!(store.verify(&old), Err(Refusal::Expired));
    }

    #[test]
    fn a_second_process_sees_changes() {
        let dir = tempfile::tempdir().unwrap();
        let server = TokenStore::open(dir.path()).unwrap();
        let offline = TokenStore::open(dir.path()).unwrap();
        let (rec, token) = offline
            .create("dpo", "dpo", BTreeMap::new(), None, "local", true)
            .unwrap();
        assert_eq!(server.verify(&token).unwrap().role, "dpo");
        offline.revoke(&rec.id).unwrap();
        assert_eq!(server.verify(&token), Err(Refusal::Revoked));
    }

    #[test]
    fn the_admin_token_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(&dir.path().join("auth")).unwrap();
        let path = bootstrap_admin(&store, dir.path()).unwrap().unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let token = std::fs::read_to_string(&path).unwrap();
        assert_eq!(store.verify(token.trim()).unwrap().role, "admin");
        assert!(bootstrap_admin(&store, dir.path()).unwrap().is_none());
    }
}
