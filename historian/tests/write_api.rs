//! The write API end to end: the real binary, real HTTP, real Parquet files.

mod common;

use std::io::Write;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, Int64Type, TimestampNanosecondType, UInt64Type};
use arrow::record_batch::RecordBatch;
use common::{Server, live_files, post, read_parquet};

const FAST: &str = r#"
[persist]
flush_age = "100ms"
interval = "100ms"
"#;

fn all_rows(server: &Server, db: &str, table: &str) -> RecordBatch {
    let batches: Vec<RecordBatch> = live_files(&server.lake(), db, table)
        .iter()
        .flat_map(|p| read_parquet(p))
        .collect();
    assert!(!batches.is_empty(), "no files for {db}.{table}");
    // Files of one table can differ in columns; widen to the union.
    let mut fields: Vec<arrow::datatypes::FieldRef> = Vec::new();
    for b in &batches {
        for f in b.schema().fields() {
            if !fields.iter().any(|x| x.name() == f.name()) {
                fields.push(f.clone());
            }
        }
    }
    let schema = Arc::new(arrow::datatypes::Schema::new(fields));
    let aligned: Vec<RecordBatch> = batches
        .iter()
        .map(|b| store::dedup::align(b, &schema).unwrap())
        .collect();
    arrow::compute::concat_batches(&schema, &aligned).unwrap()
}

fn strings(b: &RecordBatch, col: &str) -> Vec<Option<String>> {
    let c = arrow::compute::cast(
        b.column_by_name(col).unwrap(),
        &arrow::datatypes::DataType::Utf8,
    )
    .unwrap();
    c.as_string::<i32>()
        .iter()
        .map(|v| v.map(str::to_string))
        .collect()
}

#[tokio::test]
async fn line_protocol_grammar_round_trips_through_every_endpoint_into_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), FAST);
    let c = server.client();
    let body = concat!(
        "# a comment, then a blank line\n",
        "\n",
        "we\\,ird\\ meas,tag\\ key=tag\\=val\\,ue f\\=ield=1.5e3,s=\"quote \\\" and \\\\ back\",i=-42i,u=18446744073709551615u,b=TRUE,b2=f 1700000000000000000\r\n",
        "we\\,ird\\ meas,tag\\ key=other b=false,i=7i 1700000000000000001\n",
    );
    let (status, json) = post(&c, &server.url("/api/v3/write_lp?db=g&precision=ns"), body).await;
    assert_eq!(status, 204, "{json}");
    // v2 (bucket, seconds) and v1 (db, ms), the latter gzipped.
    let (status, _) = post(
        &c,
        &server.url("/api/v2/write?bucket=g&org=x&precision=s"),
        "v2m,t=a x=1 1700000000",
    )
    .await;
    assert_eq!(status, 204);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"v1m,t=a x=2 1700000000000\n").unwrap();
    let resp = c
        .post(server.url("/write?db=g&precision=ms"))
        .header("Content-Encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    // precision=auto guesses seconds from the magnitude; a missing timestamp takes server time.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let (status, _) = post(
        &c,
        &server.url("/api/v3/write_lp?db=g"),
        "auto,t=a x=3 1700000000\nauto,t=b x=4\n",
    )
    .await;
    assert_eq!(status, 204);
    server.stop();

    let b = all_rows(&server, "g", "we,ird meas");
    assert_eq!(b.num_rows(), 2);
    assert_eq!(
        strings(&b, "tag key"),
        vec![Some("other".into()), Some("tag=val,ue".into())]
    );
    let f = b
        .column_by_name("f=ield")
        .unwrap()
        .as_primitive::<Float64Type>();
    assert_eq!(f.value(1), 1500.0);
    assert!(f.is_null(0));
    assert_eq!(strings(&b, "s")[1].as_deref(), Some("quote \" and \\ back"));
    assert_eq!(
        b.column_by_name("i")
            .unwrap()
            .as_primitive::<Int64Type>()
            .values()
            .to_vec(),
        vec![7, -42]
    );
    assert_eq!(
        b.column_by_name("u")
            .unwrap()
            .as_primitive::<UInt64Type>()
            .value(1),
        u64::MAX
    );
    let bools = b.column_by_name("b").unwrap().as_boolean();
    assert_eq!((bools.value(0), bools.value(1)), (false, true));

    let t = |table: &str| {
        let b = all_rows(&server, "g", table);
        b.column_by_name("time")
            .unwrap()
            .as_primitive::<TimestampNanosecondType>()
            .values()
            .to_vec()
    };
    assert_eq!(t("v2m"), vec![1_700_000_000_000_000_000]);
    assert_eq!(t("v1m"), vec![1_700_000_000_000_000_000]);
    // Two partitions, two files; the manifest lists them in flush order.
    let mut auto = t("auto");
    auto.sort();
    assert_eq!(auto[0], 1_700_000_000_000_000_000);
    assert!(
        auto[1] >= before,
        "server time was used for the line without a timestamp"
    );
}

#[tokio::test]
async fn bad_lines_are_named_without_their_values_and_good_lines_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), FAST);
    let c = server.client();
    let url = server.url("/api/v3/write_lp?db=plant&precision=ns");
    let (status, _) = post(&c, &url, "mes,line=l1 operator=\"Jürgen Secret\",n=1i 1").await;
    assert_eq!(status, 204);
    let body = concat!(
        "mes,line=l1 n=2i 2\n",
        "mes,line=l1 n=\"Zoë Hidden\" 3\n", // type conflict: integer column
        "mes,line=l1 operator=99i 4\n",     // type conflict: string column
        "mes,line=l1 n=3i notatime\n",      // bad timestamp
        "mes,line=l1 n=4i 5\n",
    );
    let (status, json) = post(&c, &url, body).await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["lines_written"], 2);
    assert_eq!(json["lines_rejected"], 3);
    let data = json["data"].as_array().unwrap();
    let lines: Vec<u64> = data
        .iter()
        .map(|d| d["line_number"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![2, 3, 4]);
    assert_eq!(data[0]["column"], "n");
    assert_eq!(data[0]["measurement"], "mes");
    assert_eq!(data[1]["column"], "operator");
    let text = json.to_string();
    assert!(
        !text.contains("Zoë") && !text.contains("Hidden") && !text.contains("notatime"),
        "{text}"
    );

    // accept_partial=false: nothing of a request with a bad line is written.
    let url_strict = server.url("/api/v3/write_lp?db=plant&precision=ns&accept_partial=false");
    let (status, json) = post(
        &c,
        &url_strict,
        "mes,line=l9 n=100i 100\nmes,line=l9 n=1.5 101\n",
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(json["lines_written"], 0);
    // Missing database, bad precision, bad flags.
    assert_eq!(
        post(&c, &server.url("/api/v3/write_lp"), "x v=1").await.0,
        400
    );
    assert_eq!(
        post(
            &c,
            &server.url("/api/v3/write_lp?db=x&precision=fortnight"),
            "x v=1"
        )
        .await
        .0,
        400
    );
    assert_eq!(
        post(
            &c,
            &server.url("/api/v3/write_lp?db=x&no_sync=maybe"),
            "x v=1"
        )
        .await
        .0,
        400
    );
    assert_eq!(
        post(&c, &server.url("/api/v3/write_lp?db=../etc"), "x v=1")
            .await
            .0,
        400
    );
    // Garbage bytes: an error per line, never a crash.
    let (status, json) = post(&c, &url, vec![0xffu8, 0xfe, b'\n', b'=', b',', b' ', b'"']).await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["lines_rejected"], 2);
    assert_eq!(
        c.get(server.url("/health")).send().await.unwrap().status(),
        200
    );
    server.stop();
    let b = all_rows(&server, "plant", "mes");
    let n: Vec<i64> = b
        .column_by_name("n")
        .unwrap()
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    assert_eq!(
        n,
        vec![1, 2, 4],
        "good lines of the partial write kept; strict write dropped"
    );
}

#[tokio::test]
async fn body_limit_answers_413_before_and_after_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "[write]\nmax_body_bytes = 1000\n");
    let c = server.client();
    let url = server.url("/api/v3/write_lp?db=d");
    let big = "m v=1 1\n".repeat(200);
    let (status, json) = post(&c, &url, big.clone()).await;
    assert_eq!(status, 413, "{json}");
    assert!(json["error"].as_str().unwrap().contains("1000"));
    // 1600 bytes that compress to far less than 1000: refused after decoding.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(big.as_bytes()).unwrap();
    let compressed = gz.finish().unwrap();
    assert!(compressed.len() < 1000);
    let resp = c
        .post(&url)
        .header("Content-Encoding", "gzip")
        .body(compressed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let resp = c
        .post(&url)
        .header("Content-Encoding", "gzip")
        .body("not gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = c
        .post(&url)
        .header("Content-Encoding", "br")
        .body("m v=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
}

#[tokio::test]
async fn limits_on_tables_columns_and_series_reject_with_a_clear_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        dir.path(),
        "[limits]\nmax_tables_per_db = 2\nmax_columns_per_table = 4\nmax_series_per_table = 3\n",
    );
    let c = server.client();
    let url = server.url("/api/v3/write_lp?db=d&precision=ns");
    assert_eq!(post(&c, &url, "a v=1 1\nb v=1 1\n").await.0, 204);
    let (status, json) = post(&c, &url, "c v=1 1\n").await;
    assert_eq!(status, 400);
    assert!(
        json["data"][0]["error_message"]
            .as_str()
            .unwrap()
            .contains("2 tables"),
        "{json}"
    );
    // time + v + w + x = 4 columns; a fifth is refused, naming the column.
    assert_eq!(post(&c, &url, "a w=1,x=2 2\n").await.0, 204);
    let (_, json) = post(&c, &url, "a y=1 3\n").await;
    assert!(
        json["data"][0]["error_message"]
            .as_str()
            .unwrap()
            .contains("4 columns"),
        "{json}"
    );
    assert_eq!(json["data"][0]["column"], "y");
    // Series: the tag set, in any order.
    assert_eq!(post(&c, &url, "b,h=1 v=1 1\nb,h=2 v=1 1\n").await.0, 204);
    let (status, json) = post(&c, &url, "b,h=4 v=1 1\n").await;
    assert_eq!(status, 400, "{json}");
    assert!(
        json["data"][0]["error_message"]
            .as_str()
            .unwrap()
            .contains("3 series")
    );
    assert_eq!(
        post(&c, &url, "b,h=2 v=5 2\n").await.0,
        204,
        "known series still accepted"
    );

    // After a restart the series are in Parquet, not the WAL: the census at start counts
    // them, so the limit still holds.
    server.restart_graceful();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // The log file spans both runs; the second start's census is the second line.
    while server.log().matches("series census done").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "no series census");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        !common::live_files(&server.lake(), "d", "b").is_empty(),
        "the graceful stop flushed table b to Parquet"
    );
    let url = server.url("/api/v3/write_lp?db=d&precision=ns");
    let (status, json) = post(&c, &url, "b,h=5 v=1 1\n").await;
    assert_eq!(status, 400, "a fourth series after restart: {json}");
    assert!(
        json["data"][0]["error_message"]
            .as_str()
            .unwrap()
            .contains("3 series"),
        "{json}"
    );
    assert_eq!(
        post(&c, &url, "b v=7 9\nb,h=1 v=7 9\n").await.0,
        204,
        "stored series still accepted after restart"
    );
}

#[tokio::test]
async fn a_full_buffer_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        // No flush round between the two writes: one would relieve the pressure and empty
        // the buffer (the persister flushes a buffer over its limit at each interval).
        "[write]\nbuffer_limit_bytes = 1\nretry_after_secs = 7\nfull_buffer_wait = \"100ms\"\n[persist]\nflush_age = \"1h\"\nflush_bytes = 1000000000\ninterval = \"1h\"\n",
    );
    let c = server.client();
    let url = server.url("/api/v3/write_lp?db=d&precision=ns");
    // The first write fits (the buffer was empty); the next finds it full. (Should the
    // start's flush round land between them and empty the buffer, the one after does.)
    assert_eq!(post(&c, &url, "m v=1 1").await.0, 204);
    let mut refused = None;
    for t in 2..5 {
        let resp = c
            .post(&url)
            .body(format!("m v={t} {t}"))
            .send()
            .await
            .unwrap();
        if resp.status() == 503 {
            refused = Some(resp);
            break;
        }
        assert_eq!(resp.status(), 204);
    }
    let resp = refused.expect("a write into the full buffer is refused with 503");
    assert_eq!(resp.headers()["retry-after"], "7");
}

async fn metric(c: &reqwest::Client, server: &Server, name: &str) -> f64 {
    let text = c
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_keeps_fsyncs_under_a_tenth_of_writes_with_64_writers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), FAST);
    let c = server.client();
    let url = server.url("/api/v3/write_lp?db=gc&precision=ns");
    let fsyncs_before = metric(&c, &server, "historian_wal_fsyncs_total").await;
    let mut tasks = Vec::new();
    for w in 0..64 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for r in 0..25 {
                let body: String = (0..20)
                    .map(|i| format!("gc,writer=w{w} v={i} {}\n", r * 1000 + i + 1))
                    .collect();
                let (status, json) = post(&c, &url, body).await;
                assert_eq!(status, 204, "{json}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let requests = 64.0 * 25.0;
    let fsyncs = metric(&c, &server, "historian_wal_fsyncs_total").await - fsyncs_before;
    let rows = metric(&c, &server, "historian_rows_ingested_total").await;
    assert_eq!(rows, requests * 20.0);
    assert!(fsyncs >= 1.0);
    assert!(
        fsyncs <= requests / 10.0,
        "{fsyncs} fsyncs for {requests} write requests"
    );
    println!("{requests} requests, {fsyncs} fsyncs");
}

#[tokio::test]
async fn same_series_and_time_keep_the_last_write_per_field_across_buffer_and_files() {
    let dir = tempfile::tempdir().unwrap();
    // closed_after 0s: every partition with more than one file is compacted (deduplicated).
    let config = "[persist]\nflush_age = \"100ms\"\ninterval = \"100ms\"\nclosed_after = \"0s\"\ndeletion_grace = \"0s\"\n";
    let mut server = Server::start(dir.path(), config);
    let c = server.client();
    let url = server.url("/api/v3/write_lp?db=d&precision=s");
    // Duplicates within one request (one file).
    let (s, _) = post(
        &c,
        &url,
        "m,host=a x=1,y=1 100\nm,host=a x=2 100\nm,host=b x=9 100\n",
    )
    .await;
    assert_eq!(s, 204);
    server.stop();
    server.restart_with_env(&[]);
    let url = server.url("/api/v3/write_lp?db=d&precision=s");
    // A resend after a timeout, overwriting one field, lands in a second file.
    let (s, _) = post(&c, &url, "m,host=a y=3 100\n").await;
    assert_eq!(s, 204);
    // Wait for the flush and the compaction that merges the two files.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let files = live_files(&server.lake(), "d", "m");
        if files.len() == 1
            && common::manifest(&server.lake(), "d", "m")["files"][0]["compacted"] == true
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "compaction did not happen: {files:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Still in the buffer: a third write to the same point, then a graceful stop.
    let (s, _) = post(&c, &url, "m,host=b x=10 100\n").await;
    assert_eq!(s, 204);
    server.stop();
    server.restart_with_env(&[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while live_files(&server.lake(), "d", "m").len() > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "second compaction did not happen"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.stop();
    let b = all_rows(&server, "d", "m");
    assert_eq!(
        strings(&b, "host"),
        vec![Some("a".into()), Some("b".into())]
    );
    let x = b.column_by_name("x").unwrap().as_primitive::<Float64Type>();
    let y = b.column_by_name("y").unwrap().as_primitive::<Float64Type>();
    assert_eq!((x.value(0), y.value(0)), (2.0, 3.0));
    assert_eq!(x.value(1), 10.0);
    assert!(y.is_null(1));
    // Replaced files are gone from disk after the grace period.
    let on_disk = walk(&server.lake().join("databases/d/tables/m"));
    assert_eq!(on_disk.len(), 1, "{on_disk:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The niceness of each of the process's threads whose name starts with `prefix` (Linux:
/// `/proc/<pid>/task/<tid>/stat`, field 19, counted after the parenthesised name). Threads
/// that end while they are read are skipped.
#[cfg(target_os = "linux")]
fn thread_niceness(pid: u32, prefix: &str) -> Vec<i32> {
    let mut nice = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if comm.starts_with(prefix) {
            nice.push(niceness_in_stat(&stat));
        }
    }
    nice
}

/// The niceness in a `stat` line: from the third field (state) on, it is the 17th.
#[cfg(target_os = "linux")]
fn niceness_in_stat(stat: &str) -> i32 {
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(16).unwrap().parse().unwrap()
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn persister_threads_run_at_the_configured_niceness_and_flush() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        "[persist]\nflush_age = \"100ms\"\ninterval = \"100ms\"\nnice = 7\n",
    );
    let c = server.client();
    let url = server.url("/api/v3/write_lp?db=d&precision=ns");
    assert_eq!(post(&c, &url, "m,h=a v=1 1\n").await.0, 204);
    common::wait_for_files(&server, "d", "m", 1).await;
    // The server's main thread has the niceness it started with.
    let base =
        niceness_in_stat(&std::fs::read_to_string(format!("/proc/{}/stat", server.pid())).unwrap());
    let persist = thread_niceness(server.pid(), "historian-persi");
    assert!(!persist.is_empty(), "no persister threads");
    assert!(
        persist.iter().all(|n| *n == base.max(7)),
        "persister threads at {persist:?}, the server at {base}"
    );
    let query = thread_niceness(server.pid(), "historian-query");
    assert!(
        query.iter().all(|n| *n == base),
        "query threads keep the server's priority: {query:?}"
    );
}
