//! The configuration file (`historian.toml`) and its defaults.
//!
//! With no file, Historian runs on the embedded default: a lake in `<data-dir>/lake`, the
//! WAL in `<data-dir>/wal`, HTTP on 127.0.0.1:8181.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ingest::{IngestConfig, Limits, PersistConfig};
use serde::{Deserialize, Serialize};
use store::{S3Options, TableOptions};

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Network and data directory.
    pub server: ServerConfig,
    /// Where the lake lives.
    pub storage: StorageConfig,
    /// The write API and write buffer.
    pub write: WriteConfig,
    /// The write-ahead log.
    pub wal: WalSection,
    /// Flushing and compaction.
    pub persist: PersistSection,
    /// Catalog limits.
    pub limits: Limits,
    /// Per-table settings, keyed by table name.
    pub tables: HashMap<String, TableOptions>,
    /// Query limits.
    pub query: QuerySection,
    /// The keyring and its master key.
    pub privacy: PrivacySection,
    /// Roles beyond the built-in ones, keyed by name.
    pub roles: HashMap<String, crate::role::RoleDef>,
    /// The audit trail.
    pub audit: AuditSection,
    /// Logging.
    pub log: LogConfig,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// HTTP listen address.
    pub http_bind: String,
    /// Data directory (WAL, and the lake by default).
    pub data_dir: PathBuf,
    /// PostgreSQL wire protocol listen address; none = not served.
    pub pg_bind: Option<String>,
    /// Accept tokens as plaintext passwords from non-loopback PostgreSQL clients (without
    /// TLS). Off: such clients must use TLS.
    pub pg_allow_cleartext: bool,
    /// PostgreSQL connections at once; more are refused at startup.
    pub pg_max_connections: usize,
    /// TLS certificate chain (PEM); with `tls_key`, HTTP and the PostgreSQL protocol are
    /// served over TLS (PostgreSQL clients negotiate it; `sslmode=require`).
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http_bind: "127.0.0.1:8181".into(),
            data_dir: PathBuf::from("./historian-data"),
            pg_bind: None,
            pg_allow_cleartext: false,
            pg_max_connections: 256,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// `[audit]`: the hash-chained audit trail.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// How often pending records are shipped to the lake as a segment.
    #[serde(with = "humantime_serde")]
    pub ship_interval: Duration,
    /// Segments older than this are removed; none = kept for ever.
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            ship_interval: Duration::from_secs(10),
            retention: Some(Duration::from_secs(400 * 86_400)),
        }
    }
}

/// `[privacy]`: where the keyring and its master key live.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacySection {
    /// Keyring directory (local disk, never the lake); default `<data_dir>/keyring`.
    pub keyring_dir: Option<PathBuf>,
    /// Master key file (64 hex digits, mode 0600); default `<data_dir>/master.key`. The
    /// environment variable `HISTORIAN_MASTER_KEY` takes precedence.
    pub master_key_file: Option<PathBuf>,
    /// How often keys whose period is wholly past a table's `personal_ttl` are destroyed.
    #[serde(with = "humantime_serde")]
    pub key_expiry_interval: Duration,
}

impl Default for PrivacySection {
    fn default() -> Self {
        PrivacySection {
            keyring_dir: None,
            master_key_file: None,
            key_expiry_interval: Duration::from_secs(600),
        }
    }
}

/// Environment variable holding the master key (64 hex digits).
pub const MASTER_KEY_ENV: &str = "HISTORIAN_MASTER_KEY";

/// Where the master key comes from.
#[derive(Debug, Clone)]
pub enum MasterKeySource {
    /// The environment variable.
    Env(String),
    /// A file.
    File(PathBuf),
}

/// `[storage]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `file:///abs/path` or `s3://bucket/prefix`; default `file://<data_dir>/lake`.
    pub lake: Option<String>,
    /// S3 settings for `s3://` lakes.
    pub s3: S3Options,
}

/// `[write]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WriteConfig {
    /// Largest request body, before and after gzip decoding (413 past it).
    pub max_body_bytes: usize,
    /// Write buffer memory limit (503 with Retry-After past it).
    pub buffer_limit_bytes: usize,
    /// Seconds a throttled client is told to wait.
    pub retry_after_secs: u64,
    /// How long a write waits for a flush to free buffer space before it gets 503.
    #[serde(with = "humantime_serde")]
    pub full_buffer_wait: Duration,
}

impl Default for WriteConfig {
    fn default() -> Self {
        WriteConfig {
            max_body_bytes: 64 << 20,
            buffer_limit_bytes: 1 << 30,
            retry_after_secs: 1,
            full_buffer_wait: Duration::from_secs(10),
        }
    }
}

/// `[wal]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalSection {
    /// WAL directory; default `<data_dir>/wal`. Always local disk.
    pub dir: Option<PathBuf>,
    /// Segment size in bytes.
    pub segment_bytes: u64,
    /// How often `no_sync` writes are fsynced at the latest.
    #[serde(with = "humantime_serde")]
    pub no_sync_interval: Duration,
    /// Under concurrent writes, how long a group commit waits for more records before its
    /// fsync (a lone writer never waits).
    #[serde(with = "humantime_serde")]
    pub commit_delay: Duration,
}

impl Default for WalSection {
    fn default() -> Self {
        WalSection {
            dir: None,
            segment_bytes: 64 << 20,
            no_sync_interval: Duration::from_millis(100),
            commit_delay: Duration::from_millis(5),
        }
    }
}

/// `[persist]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersistSection {
    /// Flush a partition past this many buffered bytes.
    pub flush_bytes: usize,
    /// Flush a partition once its oldest row waited this long.
    #[serde(with = "humantime_serde")]
    pub flush_age: Duration,
    /// How often the persister looks for work.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Files at least this large are not compacted further.
    pub target_file_bytes: u64,
    /// Compact an active partition past this many files.
    pub max_files_per_partition: usize,
    /// Memory bound of one compaction, in Parquet bytes read.
    pub compaction_max_input_bytes: u64,
    /// Delay before replaced files are deleted (longer than the query time limit).
    #[serde(with = "humantime_serde")]
    pub deletion_grace: Duration,
    /// A partition not flushed to for this long is compacted down to one file.
    #[serde(with = "humantime_serde")]
    pub closed_after: Duration,
    /// OS niceness of the flush and compaction threads (0 = the server's priority, 19 the
    /// lowest): above 0, queries and writes take the CPU first.
    pub nice: i32,
}

impl Default for PersistSection {
    fn default() -> Self {
        let p = PersistConfig::default();
        PersistSection {
            flush_bytes: p.flush_bytes,
            flush_age: p.flush_age,
            interval: Duration::from_secs(1),
            target_file_bytes: p.target_file_bytes,
            max_files_per_partition: p.max_files_per_partition,
            compaction_max_input_bytes: p.compaction_max_input_bytes,
            deletion_grace: p.deletion_grace,
            closed_after: p.closed_after,
            nice: DEFAULT_PERSIST_NICE,
        }
    }
}

/// Flushes and compactions run at the server's priority unless configured lower: below
/// it, a CPU kept busy by queries starves them, and writers then get 503 and an erasure
/// waits for the compaction it must follow.
const DEFAULT_PERSIST_NICE: i32 = 0;

/// `[query]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuerySection {
    /// Memory one query may use for sorts, joins and aggregations (spills, then fails).
    pub memory_limit_bytes: usize,
    /// Wall-clock limit of one query.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Queries running at once.
    pub max_concurrent: usize,
    /// How long a query waits for a free slot before it is refused with 503.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Where queries spill; default `<data_dir>/spill`.
    pub spill_dir: Option<PathBuf>,
    /// Evaluate filters while decoding Parquet (late materialisation).
    pub parquet_pushdown_filters: bool,
    /// How far before a query's range `time_weighted_avg` looks for each series' held value.
    #[serde(with = "humantime_serde")]
    pub time_weighted_lookback: Duration,
    /// Memory for the lake files' footers and page indexes, shared by all queries.
    pub metadata_cache_bytes: usize,
    /// Threads queries compute on; 0 = one per core.
    pub threads: usize,
    /// Partitions each query is split into; 0 = twice the query threads.
    pub partitions: usize,
}

impl Default for QuerySection {
    fn default() -> Self {
        let q = query::QueryConfig::default();
        QuerySection {
            memory_limit_bytes: q.memory_limit_bytes,
            timeout: q.timeout,
            max_concurrent: q.max_concurrent,
            queue_timeout: q.queue_timeout,
            spill_dir: None,
            parquet_pushdown_filters: q.parquet_pushdown_filters,
            time_weighted_lookback: q.time_weighted_lookback,
            metadata_cache_bytes: q.metadata_cache_bytes,
            threads: 0,
            partitions: 0,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `historian=debug,info`; RUST_LOG wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// File.
        path: String,
        /// Cause (with line and column).
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.write.max_body_bytes == 0 {
            return bad("write.max_body_bytes must be positive");
        }
        if self.persist.max_files_per_partition == 0 {
            return bad("persist.max_files_per_partition must be positive");
        }
        if self.persist.interval.is_zero() {
            return bad("persist.interval must be positive");
        }
        if !(0..=19).contains(&self.persist.nice) {
            return bad("persist.nice must be between 0 (the server's priority) and 19");
        }
        if self.wal.segment_bytes < 1024 {
            return bad("wal.segment_bytes must be at least 1024");
        }
        if self.query.max_concurrent == 0 || self.query.memory_limit_bytes == 0 {
            return bad("query.max_concurrent and query.memory_limit_bytes must be positive");
        }
        for (name, table) in &self.tables {
            table.validate_profile(name).map_err(ConfigError::Invalid)?;
        }
        for (name, role) in &self.roles {
            role.validate(name).map_err(ConfigError::Invalid)?;
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return bad("server.tls_cert and server.tls_key go together");
        }
        if self.server.pg_max_connections == 0 {
            return bad("server.pg_max_connections must be at least 1");
        }
        if self.audit.ship_interval.is_zero() {
            return bad("audit.ship_interval must be positive");
        }
        if self.persist.deletion_grace <= self.query.timeout {
            // A query may still be reading a file that compaction replaced: it would fail.
            tracing::warn!(
                grace = ?self.persist.deletion_grace,
                timeout = ?self.query.timeout,
                "persist.deletion_grace is not longer than query.timeout: long queries may fail when compaction deletes the files they read"
            );
        }
        Ok(())
    }

    /// The lake URL, defaulting to `<data_dir>/lake`.
    pub fn lake_url(&self) -> Result<String, ConfigError> {
        if let Some(url) = &self.storage.lake {
            return Ok(url.clone());
        }
        let dir = absolute(&self.server.data_dir)?.join("lake");
        Ok(format!("file://{}", dir.display()))
    }

    /// The write path's settings.
    pub fn ingest_config(&self) -> Result<IngestConfig, ConfigError> {
        let data_dir = absolute(&self.server.data_dir)?;
        Ok(IngestConfig {
            wal_dir: self.wal.dir.clone().unwrap_or_else(|| data_dir.join("wal")),
            wal_segment_bytes: self.wal.segment_bytes,
            no_sync_interval: self.wal.no_sync_interval,
            commit_delay: self.wal.commit_delay,
            buffer_limit_bytes: self.write.buffer_limit_bytes,
            full_buffer_wait: self.write.full_buffer_wait,
            persist: PersistConfig {
                flush_bytes: self.persist.flush_bytes,
                flush_age: self.persist.flush_age,
                target_file_bytes: self.persist.target_file_bytes,
                max_files_per_partition: self.persist.max_files_per_partition,
                compaction_max_input_bytes: self.persist.compaction_max_input_bytes,
                deletion_grace: self.persist.deletion_grace,
                closed_after: self.persist.closed_after,
                upload_journal: Some(data_dir.join("uploads")),
                ..PersistConfig::default()
            },
            persist_interval: self.persist.interval,
            limits: self.limits.clone(),
            tables: self.tables.clone(),
            keyring: None,
        })
    }

    /// The data directory, absolute.
    pub fn data_dir(&self) -> Result<PathBuf, ConfigError> {
        absolute(&self.server.data_dir)
    }

    /// Whether some table's privacy profile names subjects (and so needs the keyring).
    pub fn needs_keyring(&self) -> bool {
        self.tables.values().any(|t| !t.subjects.is_empty())
    }

    /// The keyring directory.
    pub fn keyring_dir(&self) -> Result<PathBuf, ConfigError> {
        let data_dir = absolute(&self.server.data_dir)?;
        Ok(self
            .privacy
            .keyring_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("keyring")))
    }

    /// Where the master key comes from: the environment variable, else the file.
    pub fn master_key_source(&self) -> Result<MasterKeySource, ConfigError> {
        if let Ok(v) = std::env::var(MASTER_KEY_ENV) {
            return Ok(MasterKeySource::Env(v));
        }
        let data_dir = absolute(&self.server.data_dir)?;
        Ok(MasterKeySource::File(
            self.privacy
                .master_key_file
                .clone()
                .unwrap_or_else(|| data_dir.join("master.key")),
        ))
    }
}

impl Config {
    /// The query engine's settings.
    pub fn query_config(&self) -> Result<query::QueryConfig, ConfigError> {
        let data_dir = absolute(&self.server.data_dir)?;
        Ok(query::QueryConfig {
            memory_limit_bytes: self.query.memory_limit_bytes,
            timeout: self.query.timeout,
            max_concurrent: self.query.max_concurrent,
            queue_timeout: self.query.queue_timeout,
            spill_dir: Some(
                self.query
                    .spill_dir
                    .clone()
                    .unwrap_or_else(|| data_dir.join("spill")),
            ),
            parquet_pushdown_filters: self.query.parquet_pushdown_filters,
            time_weighted_lookback: self.query.time_weighted_lookback,
            metadata_cache_bytes: self.query.metadata_cache_bytes,
            ..query::QueryConfig::default()
        }
        // 0 in the file means the engine's default.
        .with_parallelism(
            (self.query.threads != 0).then_some(self.query.threads),
            (self.query.partitions != 0).then_some(self.query.partitions),
        ))
    }
}

fn absolute(p: &Path) -> Result<PathBuf, ConfigError> {
    std::path::absolute(p)
        .map_err(|e| ConfigError::Invalid(format!("data_dir {}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_annotated_example_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/historian.toml");
        let c = Config::load(&path).unwrap();
        c.validate().unwrap();
        assert!(c.tables.contains_key("mes_event"));
    }

    #[test]
    fn the_compose_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/historian.toml");
        let c = Config::load(&path).unwrap();
        c.validate().unwrap();
        assert_eq!(c.server.pg_bind.as_deref(), Some("0.0.0.0:5432"));
        assert!(c.roles.contains_key("line_viewer"));
    }

    #[test]
    fn the_metadata_cache_size_reaches_the_query_engine() {
        let c: Config = toml::from_str("[query]\nmetadata_cache_bytes = 12345\n").unwrap();
        assert_eq!(c.query_config().unwrap().metadata_cache_bytes, 12345);
        let default = Config::default().query_config().unwrap();
        assert_eq!(
            default.metadata_cache_bytes,
            query::QueryConfig::default().metadata_cache_bytes
        );
    }

    #[test]
    fn query_threads_and_partitions_default_to_cores_and_twice_the_threads() {
        let default = Config::default().query_config().unwrap();
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(default.threads, cores);
        assert_eq!(default.target_partitions, 2 * cores);
        let c: Config = toml::from_str("[query]\nthreads = 3\n").unwrap();
        let q = c.query_config().unwrap();
        assert_eq!((q.threads, q.target_partitions), (3, 6));
        let c: Config = toml::from_str("[query]\nthreads = 3\npartitions = 5\n").unwrap();
        let q = c.query_config().unwrap();
        assert_eq!((q.threads, q.target_partitions), (3, 5));
    }

    #[test]
    fn the_persisters_niceness_is_read_and_bounded() {
        assert_eq!(Config::default().persist.nice, DEFAULT_PERSIST_NICE);
        let c: Config = toml::from_str("[persist]\nnice = 12\n").unwrap();
        assert_eq!(c.persist.nice, 12);
        c.validate().unwrap();
        for bad in ["-1", "20"] {
            let c: Config = toml::from_str(&format!("[persist]\nnice = {bad}\n")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("persist.nice"), "{err}");
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_place() {
        let err = toml::from_str::<Config>("[write]\nmax_body = 5\n").unwrap_err();
        assert!(err.to_string().contains("max_body"), "{err}");
    }
}
