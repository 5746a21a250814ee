//! The SQL query API end to end: the real binary, real HTTP, the write buffer and real
//! Parquet files read together.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Server, post, query, rows};
use serde_json::{Value, json};

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

async fn count(server: &Server, db: &str, table: &str) -> i64 {
    let r = rows(server, db, &format!("SELECT count(*) AS n FROM {table}")).await;
    r[0]["n"].as_i64().unwrap()
}

async fn write(server: &Server, db: &str, body: String) {
    let c = server.client();
    let (status, resp) = post(&c, &server.url(&format!("/api/v3/write_lp?db={db}")), body).await;
    assert_eq!(status, 204, "{resp}");
}

/// The physical plan `EXPLAIN` gives for `sql` in the database `db`.
async fn physical_plan(server: &Server, sql: &str) -> String {
    let plan = rows(server, "db", &format!("EXPLAIN {sql}")).await;
    plan[1]["plan"].as_str().unwrap().to_string()
}

const FLUSH_FAST: &str = r#"
[persist]
flush_age = "100ms"
interval = "100ms"
"#;

#[tokio::test]
async fn acknowledged_rows_are_visible_at_once_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "");
    let t = now_ns();
    write(
        &server,
        "plant",
        format!(
            "machine,line=L1,cell=c1 temp=21.5,count=3i,ok=true,note=\"a,b\" {t}\n\
             machine,line=L2,cell=c1 temp=19.0,count=4i,ok=false {}\n",
            t + 1
        ),
    )
    .await;
    let sql = "SELECT line, temp, count, ok, note FROM machine ORDER BY line";

    let (status, ct, body) = query(&server, "plant", sql, "json").await;
    assert_eq!((status, ct.as_str()), (200, "application/json"));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        json!([
            {"line": "L1", "temp": 21.5, "count": 3, "ok": true, "note": "a,b"},
            {"line": "L2", "temp": 19.0, "count": 4, "ok": false}
        ])
    );

    let (status, ct, body) = query(&server, "plant", sql, "jsonl").await;
    assert_eq!((status, ct.as_str()), (200, "application/jsonl"));
    let lines: Vec<Value> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["line"], "L2");

    let (status, ct, body) = query(&server, "plant", sql, "csv").await;
    assert_eq!((status, ct.as_str()), (200, "text/csv; charset=utf-8"));
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "line,temp,count,ok,note\nL1,21.5,3,true,\"a,b\"\nL2,19.0,4,false,\n"
    );

    let (status, ct, body) = query(&server, "plant", sql, "arrow").await;
    assert_eq!(
        (status, ct.as_str()),
        (200, "application/vnd.apache.arrow.stream")
    );
    let reader = arrow::ipc::reader::StreamReader::try_new(&body[..], None).unwrap();
    let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    assert_eq!(batches[0].schema().field(1).name(), "temp");

    let (status, ct, body) = query(&server, "plant", sql, "parquet").await;
    assert_eq!(
        (status, ct.as_str()),
        (200, "application/vnd.apache.parquet")
    );
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(
        bytes::Bytes::from(body),
        1024,
    )
    .unwrap();
    assert_eq!(reader.map(|b| b.unwrap().num_rows()).sum::<usize>(), 2);

    let (status, ct, body) = query(&server, "plant", sql, "pretty").await;
    assert_eq!((status, ct.as_str()), (200, "text/plain; charset=utf-8"));
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("| L1   | 21.5 |"), "{text}");

    // POST with a JSON body, and with the SQL as the body.
    let c = server.client();
    let resp = c
        .post(server.url("/api/v3/query_sql"))
        .header("content-type", "application/json")
        .body(
            json!({"db": "plant", "q": "SELECT count(*) AS n FROM machine", "format": "jsonl"})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "{\"n\":2}\n");
    let resp = c
        .post(server.url("/api/v3/query_sql?db=plant&format=csv"))
        .body("SELECT max(temp) AS m FROM machine")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "m\n21.5\n");

    // Empty results keep their shape.
    let (_, _, body) = query(
        &server,
        "plant",
        "SELECT temp FROM machine WHERE temp > 100",
        "json",
    )
    .await;
    assert_eq!(body, b"[]");
    let (_, _, body) = query(
        &server,
        "plant",
        "SELECT temp FROM machine WHERE temp > 100",
        "csv",
    )
    .await;
    assert_eq!(body, b"temp\n");

    // The catalog lists the tables.
    let tables = rows(&server, "plant", "SHOW TABLES").await;
    assert!(
        tables
            .iter()
            .any(|r| r["table_name"] == "machine" && r["table_schema"] == "public"),
        "{tables:?}"
    );
    let columns = rows(
        &server,
        "plant",
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'machine' ORDER BY ordinal_position",
    )
    .await;
    let names: Vec<&str> = columns
        .iter()
        .map(|c| c["column_name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["cell", "line", "time", "temp", "count", "ok", "note"]
    );
}

#[tokio::test]
async fn bad_queries_get_clear_errors_and_the_sandbox_holds() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "");
    write(
        &server,
        "plant",
        format!("machine,line=L1 temp=1 {}\n", now_ns()),
    )
    .await;
    std::fs::write(dir.path().join("secret.csv"), "a\n1\n").unwrap();
    let secret = dir.path().join("secret.csv").display().to_string();

    let cases: Vec<(String, u16, &str)> = vec![
        ("SELECT nope FROM machine".into(), 400, "nope"),
        ("SELECT * FROM missing_table".into(), 400, "missing_table"),
        ("SELEC 1".into(), 400, "syntax"),
        ("SELECT 1; SELECT 2".into(), 400, "one statement"),
        ("DROP TABLE machine".into(), 400, "DROP TABLE"),
        (
            "INSERT INTO machine (temp) VALUES (1)".into(),
            400,
            "INSERT INTO",
        ),
        ("DELETE FROM machine".into(), 400, "DELETE FROM"),
        ("SET datafusion.execution.batch_size = 1".into(), 400, "SET"),
        (format!("COPY (SELECT 1) TO '{secret}.out'"), 400, "COPY"),
        (
            format!("EXPLAIN COPY (SELECT 1) TO '{secret}.out'"),
            400,
            "COPY",
        ),
        (
            format!("CREATE EXTERNAL TABLE s STORED AS CSV LOCATION '{secret}'"),
            400,
            "CREATE EXTERNAL TABLE",
        ),
        (format!("SELECT * FROM '{secret}'"), 400, "not found"),
        (
            format!("SELECT * FROM read_csv('{secret}')"),
            400,
            "read_csv",
        ),
        ("CREATE VIEW v AS SELECT 1".into(), 400, "CREATE VIEW"),
    ];
    for (sql, status, needle) in cases {
        let (got, ct, body) = query(&server, "plant", &sql, "json").await;
        let text = String::from_utf8_lossy(&body).to_string();
        assert_eq!(got, status, "{sql}: {text}");
        assert!(ct.starts_with("application/json"), "{sql}: {ct}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let message = v["error"].as_str().unwrap();
        assert!(
            message.to_lowercase().contains(&needle.to_lowercase()),
            "{sql}: {message}"
        );
    }
    assert!(
        !dir.path().join("secret.csv.out").exists(),
        "COPY wrote a file"
    );

    let (status, _, body) = query(&server, "nodb", "SELECT 1", "json").await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = query(&server, "plant", "SELECT 1", "xml").await;
    assert_eq!(status, 400);
    let resp = server
        .client()
        .get(server.url("/api/v3/query_sql?q=SELECT%201"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("db"));

    // EXPLAIN, DESCRIBE and SHOW are queries.
    for sql in [
        "EXPLAIN SELECT * FROM machine",
        "DESCRIBE machine",
        "SHOW COLUMNS FROM machine",
    ] {
        let (status, _, body) = query(&server, "plant", sql, "json").await;
        assert_eq!(status, 200, "{sql}: {}", String::from_utf8_lossy(&body));
    }
}

#[tokio::test]
async fn last_write_wins_across_buffer_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), FLUSH_FAST);
    let t = now_ns();
    write(
        &server,
        "db",
        format!("m,host=a x=1,y=10 {t}\nm,host=b x=5 {t}\n"),
    )
    .await;
    common::wait_for_files(&server, "db", "m", 1).await;
    // A resend of the same point with a new x: in the buffer, while the old is in a file.
    write(&server, "db", format!("m,host=a x=2 {t}\n")).await;
    let r = rows(&server, "db", "SELECT host, x, y FROM m ORDER BY host").await;
    assert_eq!(
        r,
        vec![
            json!({"host": "a", "x": 2.0, "y": 10.0}),
            json!({"host": "b", "x": 5.0})
        ]
    );
    // Now both versions are in overlapping files.
    common::wait_for_files(&server, "db", "m", 2).await;
    let r = rows(&server, "db", "SELECT host, x, y FROM m ORDER BY host").await;
    assert_eq!(
        r,
        vec![
            json!({"host": "a", "x": 2.0, "y": 10.0}),
            json!({"host": "b", "x": 5.0})
        ]
    );
    // A filter on a field never sees the older version of a row.
    let r = rows(&server, "db", "SELECT host FROM m WHERE x = 1").await;
    assert!(r.is_empty(), "{r:?}");
    // The latest row per series, through the lastpoint fast path: it reads no Parquet scan
    // node but gives the merged row.
    let lastpoint = "SELECT DISTINCT ON (host) host, x, y FROM m ORDER BY host, time DESC";
    let r = rows(&server, "db", lastpoint).await;
    assert_eq!(
        r,
        vec![
            json!({"host": "a", "x": 2.0, "y": 10.0}),
            json!({"host": "b", "x": 5.0})
        ]
    );
    let physical = physical_plan(&server, lastpoint).await;
    assert!(!physical.contains("file_type=parquet"), "{physical}");
    // A filter on tags keeps whole series: the fast path still applies, the filter above it.
    let one = "SELECT DISTINCT ON (host) host, x, y FROM m WHERE host IN ('b', 'c') ORDER BY host, time DESC";
    assert_eq!(
        rows(&server, "db", one).await,
        vec![json!({"host": "b", "x": 5.0})]
    );
    let physical = physical_plan(&server, one).await;
    assert!(!physical.contains("file_type=parquet"), "{physical}");
    // A filter on a field is not per series: the plain plan answers (the last row with
    // x < 3 is not the last row).
    let field = "SELECT DISTINCT ON (host) host, x FROM m WHERE x < 3 ORDER BY host, time DESC";
    assert_eq!(
        rows(&server, "db", field).await,
        vec![json!({"host": "a", "x": 2.0})]
    );
    let physical = physical_plan(&server, field).await;
    assert!(physical.contains("file_type=parquet"), "{physical}");
    write(&server, "db", format!("m,host=b x=6 {}\n", t + 1)).await;
    let r = rows(&server, "db", lastpoint).await;
    assert_eq!(
        r,
        vec![
            json!({"host": "a", "x": 2.0, "y": 10.0}),
            json!({"host": "b", "x": 6.0})
        ]
    );
    assert_eq!(count(&server, "db", "m").await, 3);
}

#[tokio::test]
async fn queries_during_flushes_and_compactions_see_every_row_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Arc::new(Server::start(
        dir.path(),
        r#"
[persist]
flush_age = "30ms"
interval = "30ms"
max_files_per_partition = 3
"#,
    ));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let server = server.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            let base = now_ns() - 3_600_000_000_000;
            for batch in 0..120i64 {
                let body: String = (0..50i64)
                    .map(|i| {
                        let n = batch * 50 + i;
                        format!("m,host=h{} v={n} {}\n", n % 7, base + n * 1_000_000)
                    })
                    .collect();
                write(&server, "db", body).await;
                acked.fetch_add(50, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    let mut checks = 0;
    while !writer.is_finished() {
        let before = acked.load(Ordering::SeqCst) as i64;
        if before == 0 {
            // The database exists once the first write is acknowledged.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let r = rows(
            &server,
            "db",
            "SELECT count(*) AS n, count(DISTINCT v) AS d FROM m",
        )
        .await;
        let after = acked.load(Ordering::SeqCst) as i64;
        let (n, d) = (r[0]["n"].as_i64().unwrap(), r[0]["d"].as_i64().unwrap());
        assert_eq!(n, d, "a row came back twice");
        assert!(n >= before && n <= after, "{before} <= {n} <= {after}");
        checks += 1;
    }
    writer.await.unwrap();
    assert!(checks > 10, "only {checks} checks ran");
    assert_eq!(count(&server, "db", "m").await, 6000);
    let log = server.log();
    assert!(log.contains("compact"), "no compaction ran during the test");
}

#[tokio::test]
async fn a_hot_partition_compacts_neighbours_in_time_into_files_that_do_not_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        r#"
[persist]
flush_age = "50ms"
interval = "50ms"
max_files_per_partition = 2
"#,
    );
    // Three flushes: small, big, small, in time order. Merging the two smallest would
    // give a file spanning the big one's whole range.
    let base = now_ns() - 3_600_000_000_000;
    let second = 1_000_000_000i64;
    for (i, (start, rows)) in [(0i64, 20i64), (10, 2000), (20, 20)]
        .into_iter()
        .enumerate()
    {
        let body: String = (0..rows)
            .map(|n| {
                let t = base + start * second + n * (second / rows);
                format!("m,host=h{} v={n} {t}\n", n % 5)
            })
            .collect();
        write(&server, "db", body).await;
        // The third file is compacted away as soon as it lands: not waited for.
        if i < 2 {
            common::wait_for_files(&server, "db", "m", i + 1).await;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let files = loop {
        let m = common::manifest(&server.lake(), "db", "m");
        let files = m["files"].as_array().unwrap().clone();
        if files.len() == 2 && files.iter().any(|f| f["compacted"] == json!(true)) {
            break files;
        }
        assert!(std::time::Instant::now() < deadline, "no compaction: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut ranges: Vec<(i64, i64)> = files
        .iter()
        .map(|f| {
            (
                f["min_time"].as_i64().unwrap(),
                f["max_time"].as_i64().unwrap(),
            )
        })
        .collect();
    ranges.sort();
    assert!(
        ranges[0].1 < ranges[1].0,
        "files overlap in time: {ranges:?}"
    );
    assert_eq!(count(&server, "db", "m").await, 2040);
}

#[tokio::test]
async fn rows_past_the_ttl_are_hidden_before_the_sweeper_runs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        r#"
[tables.m]
partition = "hour"
ttl = "1h"
"#,
    );
    let t = now_ns();
    let soon_expired = t - 3_600_000_000_000 + 2_000_000_000;
    write(
        &server,
        "db",
        format!("m,host=a v=1 {soon_expired}\nm,host=a v=2 {t}\n"),
    )
    .await;
    assert_eq!(count(&server, "db", "m").await, 2);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(count(&server, "db", "m").await, 1);
    let r = rows(&server, "db", "SELECT v FROM m").await;
    assert_eq!(r, vec![json!({"v": 2.0})]);
}

/// An error before the first batch gets a status code; one after it cannot, so the server
/// aborts the transfer: the client sees a broken response, never a clean but short one.
#[tokio::test]
async fn an_error_after_the_first_batch_aborts_the_response() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "");
    let t = now_ns() - 3_600_000_000_000;
    for part in 0..20 {
        let body: String = (part * 5_000..(part + 1) * 5_000)
            .map(|i| format!("t,s=a n={i}i {}\n", t + i))
            .collect();
        write(&server, "db", body).await;
    }
    // A division by the running row number's test can only run after the window, which
    // emits sorted batches of 8192 rows (the sort streams them: too many rows to sort in
    // one piece): from the 90,000th row on it divides by zero, so the first batch streams
    // before the error.
    let sql = "SELECT n, 10 / (CASE WHEN row_number() OVER (ORDER BY n) < 90000 THEN 1 ELSE 0 END) AS q FROM t";
    for format in ["csv", "json", "arrow"] {
        let resp = server
            .client()
            .get(server.url("/api/v3/query_sql"))
            .query(&[("db", "db"), ("q", sql), ("format", format)])
            .send()
            .await
            .expect("query request");
        let status = resp.status().as_u16();
        if status != 200 {
            panic!(
                "{format}: {status} {}",
                resp.text().await.unwrap_or_default()
            );
        }
        let read = resp.bytes().await;
        assert!(
            read.is_err(),
            "{format}: a result cut by an error must not end like a complete one ({} bytes)",
            read.map(|b| b.len()).unwrap_or_default()
        );
    }
    // The same error in the first batch is a 400 with the reason.
    let (status, _, body) = query(&server, "db", "SELECT 10 / (n - n) FROM t", "csv").await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 400, "{text}");
    assert!(text.to_lowercase().contains("divide by zero"), "{text}");
    assert_eq!(
        count(&server, "db", "t").await,
        100_000,
        "the server still answers"
    );
}

/// The entries of the spill directory.
fn spill_entries(server: &Server) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(server.data_dir.join("spill"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_sort_larger_than_the_memory_limit_spills_into_one_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    // 16 MiB: DataFusion keeps 10 MiB for merging the spilled runs, so the 24 MB of keys
    // of three million rows must go to disk.
    let server = Server::start(dir.path(), "[query]\nmemory_limit_bytes = 16777216\n");
    write(&server, "db", format!("m,host=a v=1 {}\n", now_ns())).await;
    let working = spill_entries(&server);
    assert_eq!(working.len(), 1, "one working directory: {working:?}");

    for _ in 0..2 {
        let (status, _, body) = query(
            &server,
            "db",
            "SELECT value FROM generate_series(1, 3000000) AS t(value) ORDER BY value DESC",
            "csv",
        )
        .await;
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "{}", &text[..text.len().min(500)]);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("value"));
        assert_eq!(lines.next(), Some("3000000"));
        assert_eq!(lines.clone().count(), 2_999_999);
        assert_eq!(lines.last(), Some("1"));
    }
    // Queries share the server's working directory; their spill files go with them.
    assert_eq!(spill_entries(&server), working);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let files: Vec<_> = std::fs::read_dir(&working[0]).unwrap().flatten().collect();
        if files.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "spill files left: {files:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_query_is_split_into_the_configured_partitions_and_answers_alike() {
    let t = now_ns();
    // More rows than a batch: DataFusion spreads only inputs it cannot tell are small.
    let lines: String = (0..30_000)
        .map(|i| format!("m,line=L{} v={i} {}\n", i % 3, t + i))
        .collect();
    let mut answers = Vec::new();
    for (config, partitions) in [("threads = 1\npartitions = 3", 3), ("threads = 2", 4)] {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(dir.path(), &format!("[query]\n{config}\n"));
        write(&server, "db", lines.clone()).await;
        let sql = "SELECT line, count(*) AS n, sum(v) AS s FROM m GROUP BY line ORDER BY line";
        let plan = physical_plan(&server, sql).await;
        // The buffer's one partition is spread over the configured number.
        assert!(
            plan.contains(&format!("RoundRobinBatch({partitions})")),
            "{config}: {plan}"
        );
        answers.push(rows(&server, "db", sql).await);
    }
    assert_eq!(answers[0], answers[1]);
    let expected: Vec<Value> = (0..3)
        .map(|l| {
            let sum: i64 = (0..30_000).filter(|i| i % 3 == l).sum();
            json!({"line": format!("L{l}"), "n": 10_000, "s": sum as f64})
        })
        .collect();
    assert_eq!(answers[0], expected);
}

#[tokio::test]
async fn memory_time_and_concurrency_limits_answer_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        r#"
[query]
memory_limit_bytes = 4194304
timeout = "2s"
max_concurrent = 1
queue_timeout = "200ms"
"#,
    );
    write(&server, "db", format!("m,host=a v=1 {}\n", now_ns())).await;

    let (status, _, body) = query(
        &server,
        "db",
        "SELECT count(DISTINCT value) FROM generate_series(1, 20000000) AS t(value)",
        "json",
    )
    .await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("memory limit of 4 MiB"), "{text}");

    let started = Instant::now();
    let (status, _, body) = query(
        &server,
        "db",
        "SELECT count(*) FROM generate_series(1, 100000000000) AS t(value)",
        "json",
    )
    .await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("time limit"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // One slot: a query streaming its result holds it; the next waits, then gets 503.
    let long = server
        .client()
        .get(server.url("/api/v3/query_sql"))
        .query(&[
            ("db", "db"),
            (
                "q",
                "SELECT value FROM generate_series(1, 100000000) AS t(value)",
            ),
            ("format", "csv"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(long.status(), 200);
    let (status, _, body) = query(&server, "db", "SELECT 1", "json").await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    // The client goes away: the query is cancelled and the slot freed.
    drop(long);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, _) = query(&server, "db", "SELECT 1", "json").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was not freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = server
        .client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("historian_queries_cancelled_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("historian_queries_running 0"), "{metrics}");
}

#[tokio::test]
async fn the_query_command_prints_results_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "");
    write(&server, "db", format!("m,host=a v=1.5 {}\n", now_ns())).await;
    let url = format!("http://{}", server.addr);
    let historian_query = |sql: &str, extra: &[&str]| {
        server
            .cli()
            .args(["query", sql, "--db", "db", "--url", &url])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = historian_query("SELECT host, v FROM m", &["--format", "csv"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "host,v\na,1.5\n");
    let out = historian_query("SELECT host, v FROM m", &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("| a    | 1.5 |"));
    let out = historian_query("DROP TABLE m", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("400") && err.contains("DROP TABLE"), "{err}");
}
