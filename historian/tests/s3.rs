//! The lake on a real S3-compatible server: moto (in memory, with conditional puts) as a
//! child process, checked from the outside with boto3 through the test venv.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Int64Type, TimestampNanosecondType};
use common::Server;

const DB: &str = "factory";
const DAY_NS: i64 = 86_400_000_000_000;

/// A moto server on a free loopback port, killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
    log: PathBuf,
}

impl Moto {
    fn start(dir: &Path) -> Moto {
        let bin = std::env::var("HISTORIAN_MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|_| common::python().with_file_name("moto_server"));
        assert!(
            bin.exists(),
            "{} not found: the test venv needs moto[server] (run `bash .ci/run` once, or set HISTORIAN_MOTO_SERVER)",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join("moto.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!(
                    "moto_server exited ({status}): {}",
                    std::fs::read_to_string(&moto.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen within 60 s: {}",
                std::fs::read_to_string(&moto.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// Runs a boto3 command against this server (see `S3_PY`).
    fn s3(&self, args: &[&str]) -> String {
        let mut all = vec![self.endpoint.as_str()];
        all.extend_from_slice(args);
        common::run_python(S3_PY, &all)
    }

    fn create_bucket(&self, bucket: &str) {
        self.s3(&["create", bucket]);
    }

    /// Keys and sizes under a prefix.
    fn list(&self, bucket: &str, prefix: &str) -> BTreeMap<String, u64> {
        let out = self.s3(&["list", bucket, prefix]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["key"].as_str().unwrap().to_string(),
                    o["size"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// Downloads every object under `prefix` into `dest/<key>`; returns how many.
    fn download(&self, bucket: &str, prefix: &str, dest: &Path) -> usize {
        let out = self.s3(&["download", bucket, prefix, dest.to_str().unwrap()]);
        out.trim().parse().unwrap()
    }

    /// Like [`Moto::download`] while the server may delete objects: those gone between the
    /// listing and the download are skipped.
    fn download_present(&self, bucket: &str, prefix: &str, dest: &Path) -> usize {
        let out = self.s3(&["download_present", bucket, prefix, dest.to_str().unwrap()]);
        out.trim().parse().unwrap()
    }

    /// Keys of multipart uploads begun and neither completed nor aborted.
    fn pending_uploads(&self, bucket: &str) -> Vec<String> {
        let out = self.s3(&["uploads", bucket]);
        serde_json::from_str(out.trim()).unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const S3_PY: &str = r#"
import json, os, sys
import boto3
from botocore.config import Config

endpoint, cmd, bucket, *args = sys.argv[1:]
s3 = boto3.client(
    "s3",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
    config=Config(s3={"addressing_style": "path"}),
)

def objects(prefix):
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])

if cmd == "create":
    s3.create_bucket(Bucket=bucket)
elif cmd == "list":
    print(json.dumps([{"key": o["Key"], "size": o["Size"]} for o in objects(args[0])]))
elif cmd == "download":
    prefix, dest = args
    n = 0
    for o in objects(prefix):
        path = os.path.join(dest, o["Key"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        s3.download_file(bucket, o["Key"], path)
        n += 1
    print(n)
elif cmd == "download_present":
    # Like download, for a lake being changed: an object deleted after the listing is skipped.
    from botocore.exceptions import ClientError
    prefix, dest = args
    n = 0
    for o in objects(prefix):
        path = os.path.join(dest, o["Key"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            s3.download_file(bucket, o["Key"], path)
            n += 1
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                raise
    print(n)
elif cmd == "get":
    sys.stdout.write(s3.get_object(Bucket=bucket, Key=args[0])["Body"].read().decode())
elif cmd == "fetch":
    s3.download_file(bucket, args[0], args[1])
elif cmd == "uploads":
    r = s3.list_multipart_uploads(Bucket=bucket)
    print(json.dumps([u["Key"] for u in r.get("Uploads", [])]))
else:
    raise SystemExit(f"unknown command {cmd}")
"#;

fn config(endpoint: &str, bucket: &str, prefix: &str, persist: &str) -> String {
    format!(
        r#"
[storage]
lake = "s3://{bucket}/{prefix}"

[storage.s3]
endpoint = "{endpoint}"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "test"
allow_http = true
path_style = true

[persist]
{persist}
"#
    )
}

/// The server log without terminal colours.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn today() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    now.div_euclid(DAY_NS) * DAY_NS
}

fn date_dir(ts: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ts)
        .format("date=%Y-%m-%d")
        .to_string()
}

/// Posts line protocol; asserts it was acknowledged.
async fn write_acked(client: &reqwest::Client, server_url: &str, body: String) {
    let (status, json) = common::post(client, server_url, body).await;
    assert_eq!(status, 204, "write not acknowledged: {json}");
}

fn write_url(server: &Server) -> String {
    server.url(&format!("/api/v3/write_lp?db={DB}&precision=ns"))
}

/// A row as read back: table, sensor tag, time, `n` field.
type Row = (String, String, i64, i64);

/// Downloads the lake below `prefix`, checks that every data object is listed by (or
/// scheduled for deletion in) its table's latest manifest, and returns the rows of the live
/// files plus the manifests.
fn read_s3_lake(
    moto: &Moto,
    bucket: &str,
    prefix: &str,
    tables: &[&str],
    dest: &Path,
) -> (Vec<Row>, BTreeMap<String, serde_json::Value>) {
    let _ = std::fs::remove_dir_all(dest);
    let n = moto.download(bucket, &format!("{prefix}/"), dest);
    assert!(n > 0, "nothing under s3://{bucket}/{prefix}/");
    let lake = dest.join(prefix);
    let keys = moto.list(bucket, &format!("{prefix}/"));
    let mut rows = Vec::new();
    let mut manifests = BTreeMap::new();
    for table in tables {
        let m = common::manifest(&lake, DB, table);
        // Manifest paths are keys below the bucket root: they include the lake prefix.
        let known: BTreeSet<String> = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .chain(m["pending_deletes"].as_array().unwrap())
            .map(|f| f["path"].as_str().unwrap().to_string())
            .collect();
        let table_prefix = format!("{prefix}/databases/{DB}/tables/{table}/");
        let objects: Vec<&String> = keys
            .keys()
            .filter(|k| k.starts_with(&table_prefix))
            .collect();
        let orphans: Vec<&&String> = objects.iter().filter(|k| !known.contains(**k)).collect();
        assert!(
            orphans.is_empty(),
            "objects under {table_prefix} that the manifest does not know: {orphans:?}"
        );
        for f in m["files"].as_array().unwrap() {
            let key = f["path"].as_str().unwrap().to_string();
            assert!(
                keys.contains_key(&key),
                "manifest lists {key} but S3 has no such object"
            );
            let rest = key.strip_prefix(&table_prefix).unwrap();
            let (date, file) = rest.split_once('/').unwrap();
            assert!(
                date.starts_with("date=")
                    && file.starts_with("part-")
                    && file.ends_with(".parquet"),
                "unexpected data object key {key}"
            );
            assert_eq!(date, f["partition"].as_str().unwrap());
            let path = dest.join(&key);
            let mut file_rows = 0;
            for batch in common::read_parquet(&path) {
                file_rows += batch.num_rows();
                let sensor = arrow::compute::cast(
                    batch.column_by_name("sensor").expect("sensor column"),
                    &DataType::Utf8,
                )
                .unwrap();
                let sensor = sensor.as_string::<i32>();
                let n = batch
                    .column_by_name("n")
                    .unwrap()
                    .as_primitive::<Int64Type>();
                let time = batch
                    .column_by_name("time")
                    .unwrap()
                    .as_primitive::<TimestampNanosecondType>();
                for i in 0..batch.num_rows() {
                    assert_eq!(date_dir(time.value(i)), date, "row in the wrong partition");
                    rows.push((
                        table.to_string(),
                        sensor.value(i).to_string(),
                        time.value(i),
                        n.value(i),
                    ));
                }
            }
            assert_eq!(
                f["rows"].as_u64().unwrap(),
                file_rows as u64,
                "rows of {key}"
            );
        }
        manifests.insert(table.to_string(), m);
    }
    (rows, manifests)
}

/// Asserts that `found` holds exactly the rows of `sent`, each once.
fn assert_exactly_once(sent: &[Row], found: &[Row]) {
    let mut counts: HashMap<&Row, usize> = HashMap::new();
    for r in found {
        *counts.entry(r).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(10).collect();
    assert!(dups.is_empty(), "rows present more than once: {dups:?}");
    let sent_set: BTreeSet<&Row> = sent.iter().collect();
    assert_eq!(sent_set.len(), sent.len(), "the test sent a row twice");
    let missing: Vec<_> = sent
        .iter()
        .filter(|r| !counts.contains_key(r))
        .take(10)
        .collect();
    assert!(missing.is_empty(), "acknowledged rows missing: {missing:?}");
    let extra: Vec<_> = found
        .iter()
        .filter(|r| !sent_set.contains(r))
        .take(10)
        .collect();
    assert!(extra.is_empty(), "rows that were never sent: {extra:?}");
    assert_eq!(found.len(), sent.len());
}

/// Line protocol for `count` rows of `table` starting at counter `from`, spread over `days`
/// (days before today).
fn rows(table: &str, from: i64, count: i64, days: &[i64], sent: &mut Vec<Row>) -> String {
    let base = today();
    let mut body = String::new();
    for n in from..from + count {
        let day = days[(n % days.len() as i64) as usize];
        let sensor = format!("s{}", n % 5);
        let ts = base - day * DAY_NS + n * 1_000_003;
        body.push_str(&format!(
            "{table},sensor={sensor} n={n}i,v={}.25 {ts}\n",
            n % 97
        ));
        sent.push((table.to_string(), sensor, ts, n));
    }
    body
}

#[test]
fn the_lake_lives_on_s3_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let (bucket, prefix) = ("lake-a", "plant1");
    moto.create_bucket(bucket);
    let persist = "flush_age = \"200ms\"\ninterval = \"100ms\"";
    let mut server = Server::start(
        &dir.path().join("data"),
        &config(&moto.endpoint, bucket, prefix, persist),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = server.client();
    let mut sent = Vec::new();
    let url = write_url(&server);
    rt.block_on(async {
        for (i, table) in ["temperature", "power"].iter().enumerate() {
            for req in 0..3 {
                let body = rows(table, (i as i64 * 10 + req) * 400, 400, &[1, 2], &mut sent);
                write_acked(&client, &url, body).await;
            }
        }
    });
    server.stop();

    let tables = ["temperature", "power"];
    let keys = moto.list(bucket, "");
    for table in tables {
        for day in [1, 2] {
            let date = date_dir(today() - day * DAY_NS);
            let p = format!("{prefix}/databases/{DB}/tables/{table}/{date}/part-");
            assert!(
                keys.keys()
                    .any(|k| k.starts_with(&p) && k.ends_with(".parquet")),
                "no {p}*.parquet in {keys:#?}"
            );
        }
        let m = format!("{prefix}/databases/{DB}/manifest/{table}/");
        assert!(
            keys.keys()
                .any(|k| k.starts_with(&m) && k.ends_with(".json")),
            "no manifest under {m} in {keys:#?}"
        );
    }
    assert!(
        keys.keys().all(|k| k.starts_with(&format!("{prefix}/"))),
        "objects outside the lake prefix: {keys:#?}"
    );
    let (found, manifests) = read_s3_lake(&moto, bucket, prefix, &tables, &dir.path().join("s3-1"));
    assert_exactly_once(&sent, &found);
    let versions: BTreeMap<String, u64> = manifests
        .iter()
        .map(|(t, m)| (t.clone(), m["version"].as_u64().unwrap()))
        .collect();

    // Restart on the same bucket: the manifests are loaded (persisted rows in the WAL are
    // skipped, new commits continue the version sequence), and writing goes on.
    server.restart_with_env(&[]);
    let log = plain(&server.log());
    let replay = log
        .lines()
        .rev()
        .find(|l| l.contains("WAL replayed"))
        .unwrap();
    assert!(
        replay.contains("replayed=0"),
        "rows already in S3 were replayed from the WAL: {replay}"
    );
    let url = write_url(&server);
    rt.block_on(async {
        for (i, table) in tables.iter().enumerate() {
            let body = rows(table, (i as i64 * 10 + 5) * 400, 300, &[0, 1], &mut sent);
            write_acked(&client, &url, body).await;
        }
    });
    server.stop();
    let (found, manifests) = read_s3_lake(&moto, bucket, prefix, &tables, &dir.path().join("s3-2"));
    assert_exactly_once(&sent, &found);
    for (t, m) in &manifests {
        assert!(
            m["version"].as_u64().unwrap() > versions[t],
            "{t}: the manifest version did not advance from {} after the restart",
            versions[t]
        );
        let partitions: BTreeSet<&str> = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["partition"].as_str().unwrap())
            .collect();
        assert_eq!(partitions.len(), 3, "{t}: partitions {partitions:?}");
    }
    let log = plain(&server.log());
    assert!(
        !log.contains("panicked") && !log.contains(" ERROR "),
        "errors in the server log:\n{log}"
    );

    // A server with a fresh data directory (no WAL) on the same lake: everything it knows
    // comes from S3; its commits must continue the manifests' version sequence.
    let mut fresh = Server::start(
        &dir.path().join("data-fresh"),
        &config(&moto.endpoint, bucket, prefix, persist),
    );
    let url = write_url(&fresh);
    let client = fresh.client();
    rt.block_on(async {
        for (i, table) in tables.iter().enumerate() {
            let body = rows(table, (i as i64 * 10 + 8) * 400, 200, &[0, 2], &mut sent);
            write_acked(&client, &url, body).await;
        }
    });
    fresh.stop();
    let log = plain(&fresh.log());
    assert!(
        !log.contains("panicked") && !log.contains(" ERROR "),
        "errors in the fresh server's log:\n{log}"
    );
    let (found, after) = read_s3_lake(&moto, bucket, prefix, &tables, &dir.path().join("s3-3"));
    assert_exactly_once(&sent, &found);
    for (t, m) in &after {
        assert!(
            m["version"].as_u64().unwrap() > manifests[t]["version"].as_u64().unwrap(),
            "{t}: the fresh server did not commit on top of the loaded manifest"
        );
    }
}

/// Lines for the large partition: ~24 random-looking characters per row so the Parquet file
/// is large (the first row group alone exceeds the 10 MiB multipart threshold).
fn big_rows(from: i64, count: i64, base: i64) -> String {
    let mut body = String::with_capacity(count as usize * 72);
    for n in from..from + count {
        body.push_str(&format!(
            "big,sensor=s{} n={n}i,s=\"{}\" {}\n",
            n % 4,
            noise(n),
            base + n * 1_000
        ));
    }
    body
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn noise(n: i64) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(24);
    for k in 0..3u64 {
        let mut x = splitmix(n as u64 * 3 + k);
        for _ in 0..8 {
            s.push(ALPHABET[(x & 63) as usize] as char);
            x >>= 6;
        }
    }
    s
}

/// Latest manifest of a table as stored in S3, if any.
fn s3_manifest(moto: &Moto, bucket: &str, prefix: &str, table: &str) -> Option<serde_json::Value> {
    let dir = format!("{prefix}/databases/{DB}/manifest/{table}/");
    let keys = moto.list(bucket, &dir);
    let latest = keys.keys().filter(|k| k.ends_with(".json")).max()?;
    Some(serde_json::from_str(&moto.s3(&["get", bucket, latest])).unwrap())
}

/// Data objects of a table that its latest manifest neither lists nor schedules for deletion.
fn s3_orphans(moto: &Moto, bucket: &str, prefix: &str, table: &str) -> Vec<String> {
    let known: BTreeSet<String> = s3_manifest(moto, bucket, prefix, table)
        .map(|m| {
            m["files"]
                .as_array()
                .unwrap()
                .iter()
                .chain(m["pending_deletes"].as_array().unwrap())
                .map(|f| f["path"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    moto.list(bucket, &format!("{prefix}/databases/{DB}/tables/{table}/"))
        .into_keys()
        .filter(|k| !known.contains(k))
        .collect()
}

#[test]
fn an_upload_interrupted_by_a_crash_is_aborted_at_restart_and_loses_nothing() {
    // Parquet row groups hold 2^20 rows and nothing reaches the store before the first one
    // is complete; the failpoint fires once half the rows are written, so more than 2^21 rows
    // make the crash land after a >10 MiB row group went to a multipart upload.
    const FIRST: i64 = 1_000;
    const ROWS: i64 = 2_100_000;
    const PER_REQUEST: i64 = 100_000;
    const LAST: i64 = 1_000;
    const TOTAL: i64 = FIRST + ROWS + LAST;
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let (bucket, prefix) = ("lake-b", "plant2");
    moto.create_bucket(bucket);
    let cfg = |flush_age: &str| {
        let persist =
            format!("flush_age = \"{flush_age}\"\nflush_bytes = 4294967296\ninterval = \"100ms\"");
        config(&moto.endpoint, bucket, prefix, &persist)
    };
    let data_dir = dir.path().join("data");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let base = today() - DAY_NS;

    // A first flush of both tables, so they have manifests.
    let mut server = Server::start(&data_dir, &cfg("200ms"));
    let client = server.client_with_timeout(Duration::from_secs(300));
    let url = write_url(&server);
    rt.block_on(async {
        write_acked(&client, &url, big_rows(0, FIRST, base)).await;
        write_acked(
            &client,
            &url,
            "small,sensor=a n=1i 1000000000\nsmall,sensor=a n=2i 2000000000\n".to_string(),
        )
        .await;
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while s3_manifest(&moto, bucket, prefix, "big").is_none()
        || s3_manifest(&moto, bucket, prefix, "small").is_none()
    {
        assert!(Instant::now() < deadline, "no manifests in S3 after 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Buffer the large partition (no flush), then crash.
    server.set_config(&cfg("1h"));
    server.restart_with_env(&[]);
    let url = write_url(&server);
    rt.block_on(async {
        let mut from = FIRST;
        while from < FIRST + ROWS {
            write_acked(&client, &url, big_rows(from, PER_REQUEST, base)).await;
            from += PER_REQUEST;
        }
    });
    println!(
        "wrote {ROWS} rows at {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // Restart with flushing due after 1 s and the failpoint armed: the replayed rows are
    // flushed and the process aborts half-way through the multipart upload.
    server.set_config(&cfg("1s"));
    server.restart_with_env(&[("HISTORIAN_FAILPOINT", "parquet_upload:1")]);
    assert!(
        server.wait_exit(Duration::from_secs(300)),
        "the parquet_upload failpoint did not fire within 300 s"
    );
    assert!(
        plain(&server.log()).contains("failpoint parquet_upload reached"),
        "the server exited without reaching the failpoint:\n{}",
        server.log()
    );
    println!(
        "parquet_upload fired at {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let table_prefix = format!("{prefix}/databases/{DB}/tables/big/");
    let uploads = moto.pending_uploads(bucket);
    assert!(
        uploads.iter().any(|k| k.starts_with(&table_prefix)),
        "the crash did not interrupt a multipart upload of the big partition: pending uploads {uploads:?}"
    );
    assert!(
        s3_orphans(&moto, bucket, prefix, "big").is_empty(),
        "an interrupted multipart upload is not an object"
    );

    // Again, but the upload completes and the crash comes just before the manifest commit:
    // a whole file in S3 that no manifest lists.
    server.restart_with_env(&[("HISTORIAN_FAILPOINT", "manifest_commit:1")]);
    assert!(
        server.wait_exit(Duration::from_secs(300)),
        "the manifest_commit failpoint did not fire within 300 s"
    );
    assert!(plain(&server.log()).contains("failpoint manifest_commit reached"));
    println!(
        "manifest_commit fired at {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let orphans = s3_orphans(&moto, bucket, prefix, "big");
    assert_eq!(
        orphans.len(),
        1,
        "one uploaded, uncommitted file expected: {orphans:?}"
    );

    // Recover: the orphan is deleted, the rows are replayed and flushed for good.
    server.restart_with_env(&[]);
    let url = write_url(&server);
    rt.block_on(async {
        write_acked(&client, &url, big_rows(FIRST + ROWS, LAST, base)).await;
    });
    server.stop();
    println!(
        "recovered and stopped at {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let log = plain(&server.log());
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("deleting a file no manifest lists"),
        "recovery did not report deleting the orphan"
    );
    for table in ["big", "small"] {
        let left = s3_orphans(&moto, bucket, prefix, table);
        assert!(left.is_empty(), "objects outside the manifest: {left:?}");
    }
    let small: u64 = s3_manifest(&moto, bucket, prefix, "small").unwrap()["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(small, 2, "the small table's rows");

    let dest = dir.path().join("s3");
    let m = s3_manifest(&moto, bucket, prefix, "big").unwrap();
    let mut seen = vec![0u8; TOTAL as usize];
    for f in m["files"].as_array().unwrap() {
        let key = f["path"].as_str().unwrap();
        let path = dest.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        moto.s3(&["fetch", bucket, key, path.to_str().unwrap()]);
        for batch in common::read_parquet(&path) {
            let sensor =
                arrow::compute::cast(batch.column_by_name("sensor").unwrap(), &DataType::Utf8)
                    .unwrap();
            let sensor = sensor.as_string::<i32>();
            let nc = batch
                .column_by_name("n")
                .unwrap()
                .as_primitive::<Int64Type>();
            let sc = batch.column_by_name("s").unwrap().as_string::<i32>();
            let time = batch
                .column_by_name("time")
                .unwrap()
                .as_primitive::<TimestampNanosecondType>();
            for i in 0..batch.num_rows() {
                let n = nc.value(i);
                assert!((0..TOTAL).contains(&n), "row n={n} was never sent");
                assert_eq!(time.value(i), base + n * 1_000, "time of row n={n}");
                assert_eq!(
                    sensor.value(i),
                    format!("s{}", n % 4),
                    "sensor of row n={n}"
                );
                assert_eq!(sc.value(i), noise(n), "s of row n={n}");
                seen[n as usize] = seen[n as usize].saturating_add(1);
            }
        }
    }
    let dups: Vec<usize> = (0..seen.len()).filter(|i| seen[*i] > 1).take(10).collect();
    let missing: Vec<usize> = (0..seen.len()).filter(|i| seen[*i] == 0).take(10).collect();
    let missing_count = seen.iter().filter(|c| **c == 0).count();
    assert!(
        dups.is_empty(),
        "rows present more than once, e.g. n in {dups:?}"
    );
    assert!(
        missing.is_empty(),
        "{missing_count} acknowledged rows missing, e.g. n in {missing:?}"
    );
    // The upload the first crash interrupted was journaled with its id, and the next
    // start aborted it: no parts are left behind in the bucket.
    let leftover = moto.pending_uploads(bucket);
    assert!(
        leftover.is_empty(),
        "multipart uploads still pending after recovery: {leftover:?}"
    );
    assert!(
        log.contains("aborted a multipart upload an interrupted process left"),
        "recovery did not report aborting the interrupted upload"
    );
    println!(
        "done in {:.1}s; {} files, no multipart upload pending",
        started.elapsed().as_secs_f64(),
        m["files"].as_array().unwrap().len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn personal_data_on_s3_is_ciphertext_and_erasure_rewrites_the_objects() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let bucket = "privacy";
    moto.create_bucket(bucket);
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let profile = r#"flush_age = "1s"
interval = "200ms"
deletion_grace = "4s"

[query]
timeout = "3s"

[tables.mes_event]
columns = ["line", "event", "job_id"]
[tables.mes_event.subjects]
operator_id = ["operator_name", "badge_id"]
"#;
    let cfg = config(&moto.endpoint, bucket, "plant", profile);
    let mut server = Server::start_with_keyring(&data, &cfg);
    let client = server.client();
    let t0 = today() - 2 * DAY_NS;
    let mut body = String::new();
    for i in 0..200i64 {
        let (who, name, badge) = if i % 2 == 0 {
            ("E-S3-ALPHA", "Xaver Quellbrunn", "BADGE-ALPHA-77")
        } else {
            ("E-S3-BRAVO", "Yolanda Zwirnhof", "BADGE-BRAVO-88")
        };
        // Each person on two days, so in two partitions.
        let t = t0 + ((i / 2) % 2) * DAY_NS + i * 1_000_000_000;
        body.push_str(&format!(
            "mes_event,line=L{},event=login operator_id=\"{who}\",operator_name=\"{name}\",badge_id=\"{badge}\",job_id=\"JOB-CLEAR-{i}\" {t}\n",
            i % 3
        ));
    }
    write_acked(&client, &write_url(&server), body).await;
    server.restart_graceful();

    let secrets = [
        "E-S3-ALPHA",
        "Xaver Quellbrunn",
        "BADGE-ALPHA-77",
        "E-S3-BRAVO",
        "Yolanda Zwirnhof",
        "BADGE-BRAVO-88",
    ];
    let dest = dir.path().join("objects");
    assert!(moto.download(bucket, "plant/", &dest) > 0);
    assert!(
        !common::values_found(&dest, ["JOB-CLEAR-7"]).is_empty(),
        "clear columns are visible to the scan"
    );
    let leaks = common::values_found(&dest, secrets);
    assert!(leaks.is_empty(), "personal data in clear on S3: {leaks:?}");

    // The pseudonyms of ALPHA (masked rows at ALPHA's times).
    let masked = common::rows(&server, DB, "SELECT time, operator_id FROM mes_event").await;
    let exported = {
        let (status, body) = common::post(
            &server.dpo(),
            &server.url("/api/v3/subjects/export"),
            serde_json::json!({"subject": "E-S3-ALPHA"}).to_string(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        body["rows"].as_array().unwrap().clone()
    };
    assert_eq!(exported.len(), 100);
    assert!(
        exported
            .iter()
            .all(|r| r["operator_name"] == "Xaver Quellbrunn")
    );
    let times: BTreeSet<String> = exported.iter().map(|r| r["time"].to_string()).collect();
    let pseudonyms: BTreeSet<String> = masked
        .iter()
        .filter(|r| times.contains(&r["time"].to_string()))
        .map(|r| r["operator_id"].as_str().unwrap().to_string())
        .collect();
    assert!(!pseudonyms.is_empty());

    let (status, receipt) = common::post(
        &server.dpo(),
        &server.url("/api/v3/subjects/erase"),
        serde_json::json!({"subject": "E-S3-ALPHA"}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{receipt}");
    assert!(
        receipt["receipt"]["files_with_deletion_vectors"]
            .as_u64()
            .unwrap()
            >= 2,
        "{receipt}"
    );
    // Once the replaced objects are past their grace period, no object holds ALPHA's
    // pseudonyms; BRAVO's rows are all there.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = std::fs::remove_dir_all(&dest);
        moto.download_present(bucket, "plant/", &dest);
        let left = common::values_found(&dest, &pseudonyms);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ALPHA's pseudonyms still on S3: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let left = common::rows(&server, DB, "SELECT count(*) AS n FROM mes_event").await;
    assert_eq!(left[0]["n"], 100);
    server.stop();
}
