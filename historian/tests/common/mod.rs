//! Starts the real `historian` binary on a free loopback port and a temporary directory.
#![allow(dead_code)]

pub mod policy;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server.
pub struct Server {
    child: Option<Child>,
    pub addr: String,
    /// The PostgreSQL protocol's address, when the config sets `pg_bind`.
    pub pg_addr: Option<String>,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub extra_env: Vec<(String, String)>,
    pub log_path: PathBuf,
    /// The admin token the server wrote at its first start.
    pub token: String,
    dpo_token: std::sync::OnceLock<String>,
}

/// Writes `config` to `<data_dir>/historian.toml` and runs `historian keys init` on it
/// (master key and keyring), as an operator does before the first start of a server with
/// privacy profiles.
fn init_keyring(data_dir: &Path, config: &str) {
    std::fs::create_dir_all(data_dir).unwrap();
    std::fs::write(data_dir.join("historian.toml"), config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_historian"))
        .args(["keys", "init", "--config"])
        .arg(data_dir.join("historian.toml"))
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client that sends `token` with every request.
pub fn authed(builder: reqwest::ClientBuilder, token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    builder.default_headers(headers).build().unwrap()
}

/// The Python interpreter with duckdb, pyarrow and moto, installed by `.ci/run`.
pub fn python() -> PathBuf {
    let p = std::env::var("HISTORIAN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/tmp/historian-venv/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run `bash .ci/run` once (it creates the venv), or set HISTORIAN_PYTHON",
        p.display()
    );
    p
}

impl Server {
    /// Starts a server with `config` (TOML) in `data_dir`.
    pub fn start(data_dir: &Path, config: &str) -> Server {
        Self::start_with_env(data_dir, config, &[])
    }

    /// Starts a server with `config` in `data_dir` after `historian keys init` made its
    /// keyring (tables with a privacy profile need one).
    pub fn start_with_keyring(data_dir: &Path, config: &str) -> Server {
        init_keyring(data_dir, config);
        Self::start(data_dir, config)
    }

    /// Starts a server with extra environment variables (e.g. failpoints).
    pub fn start_with_env(data_dir: &Path, config: &str, env: &[(&str, &str)]) -> Server {
        std::fs::create_dir_all(data_dir).unwrap();
        let config_path = data_dir.join("historian.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut s = Server {
            child: None,
            addr: String::new(),
            pg_addr: None,
            data_dir: data_dir.to_path_buf(),
            config_path,
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log_path: data_dir.join("server.log"),
            token: String::new(),
            dpo_token: std::sync::OnceLock::new(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_historian"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--http-bind")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start historian");
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            line.clear();
            let n = reader.read_line(&mut line).unwrap();
            if n == 0 {
                let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                panic!("historian exited before listening; log:\n{log}");
            }
            let line = line.trim();
            if let Some(addr) = line.strip_prefix("historian listening for postgresql on ") {
                self.pg_addr = Some(addr.to_string());
            }
            if let Some(addr) = line
                .strip_prefix("historian listening on http://")
                .or_else(|| line.strip_prefix("historian listening on https://"))
            {
                self.addr = addr.to_string();
                break;
            }
            assert!(Instant::now() < deadline, "historian did not start");
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        self.child = Some(child);
        self.token = std::fs::read_to_string(self.data_dir.join("admin-token"))
            .expect("the server writes its admin token at first start")
            .trim()
            .to_string();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A client with the admin token.
    pub fn client(&self) -> reqwest::Client {
        authed(reqwest::Client::builder(), &self.token)
    }

    /// A client with the admin token and a request timeout.
    pub fn client_with_timeout(&self, timeout: Duration) -> reqwest::Client {
        authed(reqwest::Client::builder().timeout(timeout), &self.token)
    }

    /// A new token of `role` with `attributes` (`key=v1,v2`), made offline on the data
    /// directory with `historian token create --data-dir` as plant IT would.
    pub fn token_for(&self, role: &str, attributes: &[&str]) -> String {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_historian"));
        cmd.args([
            "token",
            "create",
            "--role",
            role,
            "--name",
            role,
            "--data-dir",
        ])
        .arg(&self.data_dir);
        for a in attributes {
            cmd.args(["--attr", a]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A client with a token of the dpo role (made once).
    pub fn dpo(&self) -> reqwest::Client {
        let token = self.dpo_token.get_or_init(|| self.token_for("dpo", &[]));
        self.client_as(token)
    }

    /// A client with `token`.
    pub fn client_as(&self, token: &str) -> reqwest::Client {
        authed(reqwest::Client::builder(), token)
    }

    /// `historian <args>` as a client of this server (URL and admin token in its
    /// environment).
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_historian"));
        cmd.env("HISTORIAN_URL", format!("http://{}", self.addr))
            .env("HISTORIAN_TOKEN", &self.token);
        cmd
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal and waits for the process to end.
    fn signal_and_wait(&mut self, sig: &str) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg(sig)
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    /// Graceful stop: SIGTERM flushes the buffer to the lake.
    pub fn stop(&mut self) {
        self.signal_and_wait("-TERM");
    }

    /// Crash: SIGKILL.
    pub fn kill9(&mut self) {
        self.signal_and_wait("-KILL");
    }

    /// Waits for the process to exit by itself (a failpoint abort), up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return true;
                }
            } else {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Starts again on the same directory and config (new port), with `env`.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.kill9();
        self.extra_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn();
    }

    /// Stops gracefully (the buffer is flushed) and starts again on the same directory.
    pub fn restart_graceful(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Rewrites the config file (takes effect on the next restart).
    pub fn set_config(&mut self, config: &str) {
        std::fs::write(&self.config_path, config).unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn lake(&self) -> PathBuf {
        self.data_dir.join("lake")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// POSTs a body; returns status and JSON body (Null when empty).
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, serde_json::Value) {
    let resp = client.post(url).body(body).send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let json = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
    };
    (status, json)
}

/// Reads every row of every live file of a table via its latest manifest.
pub fn manifest(lake: &Path, db: &str, table: &str) -> serde_json::Value {
    let dir = lake.join("databases").join(db).join("manifest").join(table);
    let mut versions: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    versions.sort();
    let latest = versions.last().expect("a manifest version");
    serde_json::from_slice(&std::fs::read(latest).unwrap()).unwrap()
}

/// Paths (absolute) of the live files of a table.
pub fn live_files(lake: &Path, db: &str, table: &str) -> Vec<PathBuf> {
    let m = manifest(lake, db, table);
    m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| lake.join(f["path"].as_str().unwrap()))
        .collect()
}

/// Waits (up to 20 s) until a table's latest manifest lists at least `at_least` files: the
/// persister has flushed. The manifest directory exists before its first version is in it.
pub async fn wait_for_files(server: &Server, db: &str, table: &str, at_least: usize) {
    let dir = server
        .lake()
        .join("databases")
        .join(db)
        .join("manifest")
        .join(table);
    let has_version = || {
        std::fs::read_dir(&dir).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "json"))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !has_version() || live_files(&server.lake(), db, table).len() < at_least {
        assert!(Instant::now() < deadline, "no flush of {db}.{table}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads all record batches of a Parquet file.
pub fn read_parquet(path: &Path) -> Vec<arrow::record_batch::RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    reader.collect::<Result<Vec<_>, _>>().unwrap()
}

/// Runs a Python script with the test venv; returns stdout, panicking with stderr on failure.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a query on `/api/v3/query_sql`; returns status, content type and body.
pub async fn query(server: &Server, db: &str, sql: &str, format: &str) -> (u16, String, Vec<u8>) {
    let resp = server
        .client()
        .get(server.url("/api/v3/query_sql"))
        .query(&[("db", db), ("q", sql), ("format", format)])
        .send()
        .await
        .expect("query request");
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ct, resp.bytes().await.unwrap_or_default().to_vec())
}

/// Runs a query that must succeed; returns its JSON rows.
pub async fn rows(server: &Server, db: &str, sql: &str) -> Vec<serde_json::Value> {
    let (status, _, body) = query(server, db, sql, "json").await;
    assert_eq!(status, 200, "{sql}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice::<serde_json::Value>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Every file below `dir`.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Where any of `values` occurs below `dir`: in the raw bytes of any file (WAL, lake,
/// keyring, log), or in any decoded string or binary cell of a Parquet file (compression
/// would hide it from the raw scan). One "value in place" line per finding.
pub fn values_found<S: AsRef<str>>(
    dir: &Path,
    values: impl IntoIterator<Item = S> + Clone,
) -> Vec<String> {
    let mut found = Vec::new();
    for path in files_under(dir) {
        // Files come and go while a server runs (flushes, compaction, retired segments).
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let mut cells: Vec<String> = Vec::new();
        if path.extension().is_some_and(|e| e == "parquet") {
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                bytes::Bytes::from(bytes.clone()),
            )
            .and_then(|b| b.build())
            .expect("a Parquet file of the lake");
            for batch in reader.map(Result::unwrap) {
                for column in batch.columns() {
                    if let Ok(text) =
                        arrow::compute::cast(column, &arrow::datatypes::DataType::Utf8)
                    {
                        let text = text
                            .as_any()
                            .downcast_ref::<arrow::array::StringArray>()
                            .unwrap();
                        cells.extend(text.iter().flatten().map(str::to_string));
                    }
                }
            }
        }
        for v in values.clone() {
            let v = v.as_ref();
            if bytes.windows(v.len()).any(|w| w == v.as_bytes()) {
                found.push(format!("{v} in {}", path.display()));
            } else if cells.iter().any(|c| c.contains(v)) {
                found.push(format!("{v} decoded from {}", path.display()));
            }
        }
    }
    found
}
