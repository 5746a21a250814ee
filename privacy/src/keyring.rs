//! The keyring: pseudonyms and data keys per (scope, subject, key period), wrapped under the
//! master key, kept on local disk apart from the lake.
//!
//! Files in the keyring directory:
//! - `keyring.dat`: a magic number, then records `[len u32][nonce 12][AES-256-GCM sealed
//!   JSON]`, each sealed under the master key. The first record holds the secret of the keyed
//!   hash that finds a subject's entries; the others are entries. New entries are appended
//!   and fsynced; destroying entries rewrites the file atomically (temporary file, fsync,
//!   rename, fsync of the directory) without them.
//! - `destroyed.log`: one line per destroyed key id, appended and fsynced before the keyring
//!   is rewritten. It is re-applied at every open, so a restored backup never brings a
//!   destroyed key back. It holds no secrets: ids, reasons and times only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::master::MasterKey;

/// File name of the keyring in its directory.
pub const KEYRING_FILE: &str = "keyring.dat";
/// File name of the log of destroyed keys.
pub const DESTROYED_FILE: &str = "destroyed.log";
/// File locked by the one process that may change the keyring.
const LOCK_FILE: &str = "keyring.lock";

const MAGIC: &[u8; 8] = b"HISTKR01";
const RECORD_AAD: &[u8] = b"historian keyring record v1";

/// The keyed hash of a subject value: finds its entries without storing the value.
pub type SubjectHash = [u8; 32];

/// Errors of the keyring.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// A file could not be read or written.
    #[error("keyring {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No keyring at this place.
    #[error(
        "no keyring at {0}; create one with `historian keys init` (tables with a privacy profile need it)"
    )]
    Missing(String),
    /// `init` found one already.
    #[error("a keyring already exists at {0}")]
    Exists(String),
    /// The master key does not open this keyring.
    #[error("the master key does not open the keyring at {0} (wrong key, or not a keyring)")]
    WrongMasterKey(String),
    /// A record failed its integrity check or could not be decoded.
    #[error("keyring {path} is corrupt at byte {offset}")]
    Corrupt {
        /// The file.
        path: String,
        /// Where.
        offset: u64,
    },
    /// The system random source failed.
    #[error("the system random source failed")]
    Random,
    /// Another process (a running server) holds the keyring.
    #[error("the keyring at {0} is in use by another process (a running server?); stop it first")]
    InUse(String),
    /// A keyring opened read-only cannot change.
    #[error("the keyring was opened read-only")]
    ReadOnly,
}

/// Why a key was destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestroyReason {
    /// A subject's erasure request (Art. 17): their rows are purged too.
    Erasure,
    /// The key period is wholly past the table's personal TTL.
    PersonalTtl,
}

impl DestroyReason {
    fn as_str(self) -> &'static str {
        match self {
            DestroyReason::Erasure => "erasure",
            DestroyReason::PersonalTtl => "personal_ttl",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "erasure" => Some(DestroyReason::Erasure),
            "personal_ttl" => Some(DestroyReason::PersonalTtl),
            _ => None,
        }
    }
}

/// One keyring entry: the pseudonym and data key of a subject in a scope and key period.
pub struct Entry {
    /// Random id, written into every cell encrypted under this key.
    pub key_id: u64,
    /// The scope (database and table) the entry belongs to.
    pub scope: String,
    /// Keyed hash of the subject value.
    pub subject: SubjectHash,
    /// Start of the key period (ns, inclusive).
    pub period_start: i64,
    /// End of the key period (ns, exclusive).
    pub period_end: i64,
    /// The pseudonym stored in clear in place of the subject value.
    pub pseudonym: String,
    /// When the entry was made (ns).
    pub created_ns: i64,
    key: [u8; 32],
    cipher: LessSafeKey,
    generation: u64,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("key_id", &self.key_id)
            .field("scope", &self.scope)
            .field("period_start", &self.period_start)
            .finish_non_exhaustive()
    }
}

impl Entry {
    pub(crate) fn cipher(&self) -> &LessSafeKey {
        &self.cipher
    }

    /// The generation to pass to [`Keyring::ensure_durable`] before acknowledging data
    /// encrypted under this entry.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn new(record: EntryRecord, key: [u8; 32], generation: u64) -> Self {
        let cipher = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &key).expect("a 32-byte key suits AES-256-GCM"),
        );
        Entry {
            key_id: record.key_id,
            scope: record.scope,
            subject: record.subject,
            period_start: record.period_start,
            period_end: record.period_end,
            pseudonym: record.pseudonym,
            created_ns: record.created_ns,
            key,
            cipher,
            generation,
        }
    }

    fn record(&self) -> Record {
        Record::Entry(EntryRecord {
            key_id: self.key_id,
            scope: self.scope.clone(),
            subject: self.subject,
            period_start: self.period_start,
            period_end: self.period_end,
            pseudonym: self.pseudonym.clone(),
            created_ns: self.created_ns,
            key: hex::encode(self.key),
        })
    }

    #[cfg(test)]
    pub(crate) fn for_test(key_id: u64) -> Self {
        let mut key = [0u8; 32];
        key[0] = key_id as u8;
        let record = EntryRecord {
            key_id,
            scope: "db/t".into(),
            subject: [0; 32],
            period_start: 0,
            period_end: 1,
            pseudonym: format!("ps-{key_id}"),
            created_ns: 0,
            key: String::new(),
        };
        Entry::new(record, key, 0)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Record {
    Header { hash_key: String, created_ns: i64 },
    Entry(EntryRecord),
}

#[derive(Serialize, Deserialize)]
struct EntryRecord {
    key_id: u64,
    scope: String,
    #[serde(with = "hex_array")]
    subject: SubjectHash,
    period_start: i64,
    period_end: i64,
    pseudonym: String,
    created_ns: i64,
    key: String,
}

mod hex_array {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

/// Counts for `historian keys status` and the records of processing: no secrets.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KeyringStatus {
    /// Live entries (data keys).
    pub keys: usize,
    /// Distinct subjects with at least one live key.
    pub subjects: usize,
    /// Keys destroyed so far, by reason.
    pub destroyed: BTreeMap<String, usize>,
    /// Per scope.
    pub scopes: BTreeMap<String, ScopeStatus>,
}

/// Counts of one scope (table).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ScopeStatus {
    /// Live keys.
    pub keys: usize,
    /// Distinct subjects.
    pub subjects: usize,
    /// Start of the oldest live key period (ns).
    pub oldest_period_start: i64,
    /// End of the newest live key period (ns).
    pub newest_period_end: i64,
}

struct State {
    hash_key: hmac::Key,
    hash_key_hex: String,
    created_ns: i64,
    by_lookup: HashMap<(String, SubjectHash, i64), Arc<Entry>>,
    by_id: HashMap<u64, Arc<Entry>>,
    destroyed: HashMap<u64, DestroyReason>,
    pending: Vec<Arc<Entry>>,
    next_generation: u64,
}

struct Files {
    keyring: File,
    destroyed: File,
    durable_generation: u64,
}

/// The live keys, read-locked: see [`Keyring::keys`].
pub struct KeyView<'a>(parking_lot::RwLockReadGuard<'a, State>);

impl KeyView<'_> {
    /// The entry of a key id, unless destroyed.
    pub fn get(&self, key_id: u64) -> Option<&Entry> {
        self.0.by_id.get(&key_id).map(|e| e.as_ref())
    }
}

/// The keyring, loaded in memory, with its files.
pub struct Keyring {
    dir: PathBuf,
    master: MasterKey,
    rng: SystemRandom,
    // Lock order: `files`, then `state`.
    files: Mutex<Files>,
    state: RwLock<State>,
    /// Mirror of `files.durable_generation`, readable without the lock.
    durable: std::sync::atomic::AtomicU64,
    /// The exclusive lock of a writable keyring; None when opened read-only.
    lock: Option<File>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyringError + '_ {
    move |source| KeyringError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn seal_record(
    master: &MasterKey,
    rng: &SystemRandom,
    record: &Record,
) -> Result<Vec<u8>, KeyringError> {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, master.bytes()).expect("a 32-byte key suits AES-256-GCM"),
    );
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce).map_err(|_| KeyringError::Random)?;
    let mut body = serde_json::to_vec(record).expect("records serialise");
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(RECORD_AAD),
        &mut body,
    )
    .map_err(|_| KeyringError::Random)?;
    let mut out = Vec::with_capacity(4 + NONCE_LEN + body.len());
    out.extend_from_slice(&((NONCE_LEN + body.len()) as u32).to_le_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads and opens all records; returns them with the length of the valid prefix (a torn
/// tail from a crash during an append is cut off).
fn read_records(path: &Path, master: &MasterKey) -> Result<(Vec<Record>, u64), KeyringError> {
    let shown = || path.display().to_string();
    let mut bytes = Vec::new();
    File::open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                KeyringError::Missing(shown())
            } else {
                io_err(path)(e)
            }
        })?
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(KeyringError::WrongMasterKey(shown()));
    }
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, master.bytes()).expect("a 32-byte key suits AES-256-GCM"),
    );
    let mut records = Vec::new();
    let mut at = MAGIC.len();
    while at + 4 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let end = at + 4 + len;
        if len < NONCE_LEN + 16 || end > bytes.len() {
            break;
        }
        let nonce: [u8; NONCE_LEN] = bytes[at + 4..at + 4 + NONCE_LEN]
            .try_into()
            .expect("12 bytes");
        let mut body = bytes[at + 4 + NONCE_LEN..end].to_vec();
        let opened = key.open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(RECORD_AAD),
            &mut body,
        );
        let plain = match opened {
            Ok(p) => p,
            Err(_) if records.is_empty() => return Err(KeyringError::WrongMasterKey(shown())),
            Err(_) => {
                return Err(KeyringError::Corrupt {
                    path: shown(),
                    offset: at as u64,
                });
            }
        };
        let record: Record = serde_json::from_slice(plain).map_err(|_| KeyringError::Corrupt {
            path: shown(),
            offset: at as u64,
        })?;
        records.push(record);
        at = end;
    }
    if records.is_empty() {
        return Err(KeyringError::WrongMasterKey(shown()));
    }
    Ok((records, at as u64))
}

fn read_destroyed(path: &Path) -> Result<HashMap<u64, DestroyReason>, KeyringError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut out = HashMap::new();
    // A line without its newline was torn by a crash before its fsync: that destruction was
    // never confirmed, and its caller retries.
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let mut parts = line.split_whitespace();
        let id = parts.next().and_then(|h| u64::from_str_radix(h, 16).ok());
        let reason = parts.next().and_then(DestroyReason::parse);
        if let (Some(id), Some(reason)) = (id, reason) {
            out.insert(id, reason);
        }
    }
    Ok(out)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), KeyringError> {
    let tmp = path.with_extension("tmp");
    {
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}

fn open_append(path: &Path) -> Result<File, KeyringError> {
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map_err(io_err(path))
}

impl Keyring {
    /// Creates a new, empty keyring in `dir` (made with mode 0700 if missing).
    pub fn init(dir: &Path, master: MasterKey) -> Result<Keyring, KeyringError> {
        let path = dir.join(KEYRING_FILE);
        if path.exists() {
            return Err(KeyringError::Exists(path.display().to_string()));
        }
        create_private_dir(dir)?;
        let rng = SystemRandom::new();
        let mut hash_key = [0u8; 32];
        rng.fill(&mut hash_key).map_err(|_| KeyringError::Random)?;
        let header = Record::Header {
            hash_key: hex::encode(hash_key),
            created_ns: now_ns(),
        };
        let lock = lock(dir)?;
        let mut bytes = MAGIC.to_vec();
        bytes.extend(seal_record(&master, &rng, &header)?);
        write_atomically(&path, &bytes)?;
        Self::load(dir, master, Some(lock))
    }

    /// Opens the keyring in `dir` for a process that may change it (the server, restore,
    /// rotate): takes its exclusive lock, cuts a torn last record, and re-applies the log of
    /// destroyed keys to the file.
    pub fn open(dir: &Path, master: MasterKey) -> Result<Keyring, KeyringError> {
        let lock = lock(dir)?;
        Self::load(dir, master, Some(lock))
    }

    /// Opens the keyring to read it (status, backup) while a server may hold it: changes
    /// nothing on disk.
    pub fn open_read_only(dir: &Path, master: MasterKey) -> Result<Keyring, KeyringError> {
        Self::load(dir, master, None)
    }

    fn load(dir: &Path, master: MasterKey, lock: Option<File>) -> Result<Keyring, KeyringError> {
        let writable = lock.is_some();
        let path = dir.join(KEYRING_FILE);
        let (records, valid_len) = read_records(&path, &master)?;
        let destroyed_path = dir.join(DESTROYED_FILE);
        let destroyed = read_destroyed(&destroyed_path)?;
        let mut records = records.into_iter();
        let Some(Record::Header {
            hash_key: hash_key_hex,
            created_ns,
        }) = records.next()
        else {
            return Err(KeyringError::Corrupt {
                path: path.display().to_string(),
                offset: MAGIC.len() as u64,
            });
        };
        let hash_key_bytes = hex::decode(&hash_key_hex).map_err(|_| KeyringError::Corrupt {
            path: path.display().to_string(),
            offset: MAGIC.len() as u64,
        })?;
        let mut state = State {
            hash_key: hmac::Key::new(hmac::HMAC_SHA256, &hash_key_bytes),
            hash_key_hex,
            created_ns,
            by_lookup: HashMap::new(),
            by_id: HashMap::new(),
            destroyed,
            pending: Vec::new(),
            next_generation: 1,
        };
        let mut reapplied = 0usize;
        for record in records {
            let Record::Entry(entry) = record else {
                continue;
            };
            if state.destroyed.contains_key(&entry.key_id) {
                reapplied += 1;
                continue;
            }
            let key: [u8; 32] = hex::decode(&entry.key)
                .ok()
                .and_then(|k| k.try_into().ok())
                .ok_or_else(|| KeyringError::Corrupt {
                    path: path.display().to_string(),
                    offset: 0,
                })?;
            let entry = Arc::new(Entry::new(entry, key, 0));
            state.insert(entry);
        }
        // Cut a torn tail before anything is appended after it.
        let file_len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
        if writable && file_len > valid_len {
            tracing::warn!(
                path = %path.display(),
                cut = file_len - valid_len,
                "keyring had a torn last record (crash during an append); cut it off"
            );
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| {
                    f.set_len(valid_len)?;
                    f.sync_all()
                })
                .map_err(io_err(&path))?;
        }
        let keyring = Keyring {
            dir: dir.to_path_buf(),
            rng: SystemRandom::new(),
            files: Mutex::new(Files {
                keyring: open_append(&path)?,
                destroyed: open_append(&destroyed_path)?,
                durable_generation: 0,
            }),
            master,
            state: RwLock::new(state),
            durable: std::sync::atomic::AtomicU64::new(0),
            lock,
        };
        if writable && reapplied > 0 {
            // A backup from before some destruction was restored: remove those keys from
            // the file too, not only from memory.
            tracing::warn!(reapplied, "re-applied destroyed keys to the keyring");
            let mut files = keyring.files.lock();
            keyring.rewrite(&mut files, &keyring.state.read())?;
        }
        Ok(keyring)
    }

    /// Restores a backup made by [`Keyring::backup`] into `dir`, then re-applies the log of
    /// destroyed keys. Returns the opened keyring. Stop the server first.
    pub fn restore(dir: &Path, master: MasterKey, backup: &Path) -> Result<Keyring, KeyringError> {
        // Check that the backup opens under this master key before replacing anything.
        read_records(backup, &master)?;
        let bytes = std::fs::read(backup).map_err(io_err(backup))?;
        create_private_dir(dir)?;
        let lock = lock(dir)?;
        write_atomically(&dir.join(KEYRING_FILE), &bytes)?;
        Self::load(dir, master, Some(lock))
    }

    /// Rewrites the keyring under a new master key. Stop the server first.
    pub fn rotate(dir: &Path, old: MasterKey, new: MasterKey) -> Result<Keyring, KeyringError> {
        let mut keyring = Self::open(dir, old)?;
        keyring.master = new;
        {
            let mut files = keyring.files.lock();
            keyring.rewrite(&mut files, &keyring.state.read())?;
        }
        Ok(keyring)
    }

    /// Copies the keyring file (still sealed under the master key) to `to`, which must not
    /// exist. The master key is not in it: keep it apart.
    pub fn backup(&self, to: &Path) -> Result<u64, KeyringError> {
        let files = self.files.lock();
        files.keyring.sync_all().map_err(io_err(to))?;
        let from = self.dir.join(KEYRING_FILE);
        let bytes = std::fs::read(&from).map_err(io_err(&from))?;
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(to).map_err(io_err(to))?;
        f.write_all(&bytes).map_err(io_err(to))?;
        f.sync_all().map_err(io_err(to))?;
        Ok(bytes.len() as u64)
    }

    /// The directory of the keyring.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The keyed hash of a subject value.
    pub fn subject_hash(&self, value: &str) -> SubjectHash {
        let tag = hmac::sign(&self.state.read().hash_key, value.as_bytes());
        tag.as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
    }

    /// The entry of a subject in a scope and key period, made (in memory) if missing. Call
    /// [`Keyring::ensure_durable`] with its generation before acknowledging anything
    /// encrypted under it.
    pub fn entry_for(
        &self,
        scope: &str,
        subject: &SubjectHash,
        period: (i64, i64),
    ) -> Result<Arc<Entry>, KeyringError> {
        let lookup = (scope.to_string(), *subject, period.0);
        if let Some(e) = self.state.read().by_lookup.get(&lookup) {
            return Ok(e.clone());
        }
        let mut state = self.state.write();
        if let Some(e) = state.by_lookup.get(&lookup) {
            return Ok(e.clone());
        }
        let mut key = [0u8; 32];
        self.rng.fill(&mut key).map_err(|_| KeyringError::Random)?;
        let mut pseudonym = [0u8; 10];
        self.rng
            .fill(&mut pseudonym)
            .map_err(|_| KeyringError::Random)?;
        let key_id = loop {
            let mut id = [0u8; 8];
            self.rng.fill(&mut id).map_err(|_| KeyringError::Random)?;
            let id = u64::from_le_bytes(id);
            if id != 0 && !state.by_id.contains_key(&id) && !state.destroyed.contains_key(&id) {
                break id;
            }
        };
        let generation = state.next_generation;
        state.next_generation += 1;
        let record = EntryRecord {
            key_id,
            scope: lookup.0,
            subject: *subject,
            period_start: period.0,
            period_end: period.1,
            pseudonym: format!("ps-{}", hex::encode(pseudonym)),
            created_ns: now_ns(),
            key: String::new(),
        };
        let entry = Arc::new(Entry::new(record, key, generation));
        state.insert(entry.clone());
        state.pending.push(entry.clone());
        Ok(entry)
    }

    /// Whether every entry up to `generation` is durable already (no I/O, no lock).
    pub fn is_durable(&self, generation: u64) -> bool {
        self.durable.load(std::sync::atomic::Ordering::Acquire) >= generation
    }

    /// Makes every entry up to `generation` durable (appended and fsynced). Blocking.
    pub fn ensure_durable(&self, generation: u64) -> Result<(), KeyringError> {
        if self.lock.is_none() {
            return Err(KeyringError::ReadOnly);
        }
        let mut files = self.files.lock();
        if files.durable_generation >= generation {
            return Ok(());
        }
        let (pending, upto) = {
            let mut state = self.state.write();
            (
                std::mem::take(&mut state.pending),
                state.next_generation - 1,
            )
        };
        let mut bytes = Vec::new();
        let result = pending
            .iter()
            .try_for_each(|e| {
                bytes.extend(seal_record(&self.master, &self.rng, &e.record())?);
                Ok(())
            })
            .and_then(|()| {
                let path = self.dir.join(KEYRING_FILE);
                files.keyring.write_all(&bytes).map_err(io_err(&path))?;
                files.keyring.sync_data().map_err(io_err(&path))
            });
        match result {
            Ok(()) => {
                files.durable_generation = upto;
                self.durable
                    .store(upto, std::sync::atomic::Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // Keep them pending: nothing under them may be acknowledged until written.
                let mut state = self.state.write();
                let mut again = pending;
                again.append(&mut state.pending);
                state.pending = again;
                Err(e)
            }
        }
    }

    /// The entry of a key id, unless destroyed.
    pub fn entry(&self, key_id: u64) -> Option<Arc<Entry>> {
        self.state.read().by_id.get(&key_id).cloned()
    }

    /// A view of the live keys under one read lock, to decrypt a whole batch. Hold it
    /// briefly: new keys wait for it.
    pub fn keys(&self) -> KeyView<'_> {
        KeyView(self.state.read())
    }

    /// Why a key was destroyed, if it was.
    pub fn destroyed_reason(&self, key_id: u64) -> Option<DestroyReason> {
        self.state.read().destroyed.get(&key_id).copied()
    }

    /// Ids of keys destroyed for erasure (their rows are to be purged).
    pub fn erased_key_ids(&self) -> HashSet<u64> {
        self.state
            .read()
            .destroyed
            .iter()
            .filter(|(_, r)| **r == DestroyReason::Erasure)
            .map(|(id, _)| *id)
            .collect()
    }

    /// All live entries of one subject, in every scope and period.
    pub fn subject_entries(&self, subject: &SubjectHash) -> Vec<Arc<Entry>> {
        let mut out: Vec<_> = self
            .state
            .read()
            .by_id
            .values()
            .filter(|e| &e.subject == subject)
            .cloned()
            .collect();
        out.sort_by(|a, b| (&a.scope, a.period_start).cmp(&(&b.scope, b.period_start)));
        out
    }

    /// Ids of a scope's live keys whose period ends at or before `cutoff_ns`.
    pub fn expired(&self, scope: &str, cutoff_ns: i64) -> Vec<u64> {
        self.state
            .read()
            .by_id
            .values()
            .filter(|e| e.scope == scope && e.period_end <= cutoff_ns)
            .map(|e| e.key_id)
            .collect()
    }

    /// Destroys keys: logs their ids (fsync), then rewrites the keyring without them.
    /// Returns how many live keys were destroyed; destroying a destroyed key is a no-op.
    pub fn destroy(&self, key_ids: &[u64], reason: DestroyReason) -> Result<usize, KeyringError> {
        if key_ids.is_empty() {
            return Ok(0);
        }
        if self.lock.is_none() {
            return Err(KeyringError::ReadOnly);
        }
        let mut files = self.files.lock();
        let log_path = self.dir.join(DESTROYED_FILE);
        let now = now_ns();
        let mut log = String::new();
        {
            let state = self.state.read();
            for id in key_ids {
                if !state.destroyed.contains_key(id) {
                    log.push_str(&format!("{id:016x} {} {now}\n", reason.as_str()));
                }
            }
        }
        files
            .destroyed
            .write_all(log.as_bytes())
            .map_err(io_err(&log_path))?;
        files.destroyed.sync_data().map_err(io_err(&log_path))?;
        let mut destroyed = 0;
        let mut state = self.state.write();
        for id in key_ids {
            if let Some(entry) = state.by_id.remove(id) {
                state
                    .by_lookup
                    .remove(&(entry.scope.clone(), entry.subject, entry.period_start));
                state.pending.retain(|p| p.key_id != *id);
                destroyed += 1;
            }
            state.destroyed.entry(*id).or_insert(reason);
        }
        // Pending entries are written by the rewrite, so they are durable afterwards.
        let upto = state.next_generation - 1;
        state.pending.clear();
        let state = parking_lot::RwLockWriteGuard::downgrade(state);
        self.rewrite(&mut files, &state)?;
        files.durable_generation = upto;
        self.durable
            .store(upto, std::sync::atomic::Ordering::Release);
        Ok(destroyed)
    }

    fn rewrite(&self, files: &mut Files, state: &State) -> Result<(), KeyringError> {
        let path = self.dir.join(KEYRING_FILE);
        let mut bytes = MAGIC.to_vec();
        bytes.extend(seal_record(
            &self.master,
            &self.rng,
            &Record::Header {
                hash_key: state.hash_key_hex.clone(),
                created_ns: state.created_ns,
            },
        )?);
        let mut entries: Vec<_> = state.by_id.values().collect();
        entries.sort_by_key(|e| e.key_id);
        for e in entries {
            bytes.extend(seal_record(&self.master, &self.rng, &e.record())?);
        }
        write_atomically(&path, &bytes)?;
        files.keyring = open_append(&path)?;
        Ok(())
    }

    /// Counts per scope, without secrets.
    pub fn status(&self) -> KeyringStatus {
        let state = self.state.read();
        let mut out = KeyringStatus {
            keys: state.by_id.len(),
            ..Default::default()
        };
        let mut subjects: HashSet<SubjectHash> = HashSet::new();
        let mut per_scope: BTreeMap<String, HashSet<SubjectHash>> = BTreeMap::new();
        for e in state.by_id.values() {
            subjects.insert(e.subject);
            per_scope
                .entry(e.scope.clone())
                .or_default()
                .insert(e.subject);
            let s = out.scopes.entry(e.scope.clone()).or_insert(ScopeStatus {
                oldest_period_start: i64::MAX,
                newest_period_end: i64::MIN,
                ..Default::default()
            });
            s.keys += 1;
            s.oldest_period_start = s.oldest_period_start.min(e.period_start);
            s.newest_period_end = s.newest_period_end.max(e.period_end);
        }
        for (scope, set) in per_scope {
            if let Some(s) = out.scopes.get_mut(&scope) {
                s.subjects = set.len();
            }
        }
        out.subjects = subjects.len();
        for reason in state.destroyed.values() {
            *out.destroyed
                .entry(reason.as_str().to_string())
                .or_default() += 1;
        }
        out
    }
}

impl State {
    fn insert(&mut self, entry: Arc<Entry>) {
        self.by_lookup.insert(
            (entry.scope.clone(), entry.subject, entry.period_start),
            entry.clone(),
        );
        self.by_id.insert(entry.key_id, entry);
    }
}

/// Takes the keyring's exclusive lock (released when the file is closed, also by a crash).
fn lock(dir: &Path) -> Result<File, KeyringError> {
    create_private_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let file = open_append(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(KeyringError::InUse(dir.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), KeyringError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MONTH: (i64, i64) = (100, 200);

    fn keyring(dir: &Path, master: &MasterKey) -> Keyring {
        Keyring::init(dir, master.clone()).unwrap()
    }

    #[test]
    fn entries_persist_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::generate().unwrap();
        let k = keyring(dir.path(), &master);
        let alice = k.subject_hash("E1001");
        let e = k.entry_for("db/mes", &alice, MONTH).unwrap();
        assert!(e.pseudonym.starts_with("ps-"));
        // Same subject, scope and period: same entry. Another period or scope: another.
        assert_eq!(
            k.entry_for("db/mes", &alice, MONTH).unwrap().key_id,
            e.key_id
        );
        let next = k.entry_for("db/mes", &alice, (200, 300)).unwrap();
        assert_ne!(next.pseudonym, e.pseudonym);
        assert_ne!(
            k.entry_for("db/other", &alice, MONTH).unwrap().key_id,
            e.key_id
        );
        k.ensure_durable(next.generation()).unwrap();
        let raw = std::fs::read(dir.path().join(KEYRING_FILE)).unwrap();
        assert!(
            !raw.windows(e.pseudonym.len())
                .any(|w| w == e.pseudonym.as_bytes())
        );
        drop(k);
        let k = Keyring::open(dir.path(), master.clone()).unwrap();
        assert_eq!(
            k.subject_hash("E1001"),
            alice,
            "the hash secret survives a reopen"
        );
        let again = k.entry(e.key_id).expect("durable entry");
        assert_eq!(again.pseudonym, e.pseudonym);
        // Made durable up to the generation of `next`: the entry for db/other came after.
        assert_eq!(k.subject_entries(&alice).len(), 3);
        assert_eq!(k.status().scopes.len(), 2);
    }

    #[test]
    fn one_writer_at_a_time_and_readers_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::generate().unwrap();
        let k = keyring(dir.path(), &master);
        let err = Keyring::open(dir.path(), master.clone()).unwrap_err();
        assert!(matches!(err, KeyringError::InUse(_)), "{err}");
        let reader = Keyring::open_read_only(dir.path(), master.clone()).unwrap();
        let e = reader
            .entry_for("db/t", &reader.subject_hash("x"), MONTH)
            .unwrap();
        assert!(reader.ensure_durable(e.generation()).is_err());
        assert!(reader.destroy(&[e.key_id], DestroyReason::Erasure).is_err());
        drop(k);
        Keyring::open(dir.path(), master).unwrap();
    }

    #[test]
    fn a_wrong_or_missing_master_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::generate().unwrap();
        keyring(dir.path(), &master);
        let err = Keyring::open(dir.path(), MasterKey::generate().unwrap()).unwrap_err();
        assert!(matches!(err, KeyringError::WrongMasterKey(_)), "{err}");
        let err = Keyring::open(&dir.path().join("nope"), master).unwrap_err();
        assert!(err.to_string().contains("historian keys init"), "{err}");
    }

    #[test]
    fn destroyed_keys_stay_destroyed_after_restoring_a_backup() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::generate().unwrap();
        let k = keyring(dir.path(), &master);
        let alice = k.subject_hash("alice");
        let bob = k.subject_hash("bob");
        let a = k.entry_for("db/t", &alice, MONTH).unwrap();
        let b = k.entry_for("db/t", &bob, MONTH).unwrap();
        k.ensure_durable(b.generation()).unwrap();
        let backup = dir.path().join("backup.dat");
        k.backup(&backup).unwrap();
        assert_eq!(k.destroy(&[a.key_id], DestroyReason::Erasure).unwrap(), 1);
        assert_eq!(
            k.destroy(&[a.key_id], DestroyReason::Erasure).unwrap(),
            0,
            "idempotent"
        );
        assert!(k.entry(a.key_id).is_none());
        assert!(k.subject_entries(&alice).is_empty());
        drop(k);
        let k = Keyring::restore(dir.path(), master.clone(), &backup).unwrap();
        assert!(
            k.entry(a.key_id).is_none(),
            "the backup must not bring alice back"
        );
        assert!(k.entry(b.key_id).is_some());
        assert_eq!(k.erased_key_ids(), HashSet::from([a.key_id]));
        // And the file itself no longer holds alice's entry.
        drop(k);
        std::fs::remove_file(dir.path().join(DESTROYED_FILE)).unwrap();
        let k = Keyring::open(dir.path(), master).unwrap();
        assert!(k.entry(a.key_id).is_none());
        assert_eq!(k.status().keys, 1);
    }

    #[test]
    fn rotation_rewraps_everything_and_expiry_finds_old_periods() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::generate().unwrap();
        let k = keyring(dir.path(), &master);
        let s = k.subject_hash("alice");
        let old = k.entry_for("db/t", &s, (0, 100)).unwrap();
        let new = k.entry_for("db/t", &s, (100, 200)).unwrap();
        k.ensure_durable(new.generation()).unwrap();
        assert_eq!(k.expired("db/t", 100), vec![old.key_id]);
        assert!(k.expired("db/other", 1000).is_empty());
        drop(k);
        let rotated = MasterKey::generate().unwrap();
        Keyring::rotate(dir.path(), master.clone(), rotated.clone()).unwrap();
        assert!(Keyring::open(dir.path(), master).is_err());
        let k = Keyring::open(dir.path(), rotated).unwrap();
        assert_eq!(k.entry(old.key_id).unwrap().pseudonym, old.pseudonym);
        let status = k.status();
        assert_eq!((status.keys, status.subjects), (2, 1));
        assert_eq!(status.scopes["db/t"].oldest_period_start, 0);
    }

    #[test]
    fn a_torn_append_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::generate().unwrap();
        let k = keyring(dir.path(), &master);
        let e = k.entry_for("db/t", &k.subject_hash("x"), MONTH).unwrap();
        k.ensure_durable(e.generation()).unwrap();
        drop(k);
        let path = dir.path().join(KEYRING_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let k = Keyring::open(dir.path(), master.clone()).unwrap();
        let f = k.entry_for("db/t", &k.subject_hash("y"), MONTH).unwrap();
        k.ensure_durable(f.generation()).unwrap();
        drop(k);
        let k = Keyring::open(dir.path(), master).unwrap();
        assert!(k.entry(e.key_id).is_some() && k.entry(f.key_id).is_some());
    }
}
