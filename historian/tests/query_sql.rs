//! Historian SQL checked against an independent engine: the TSBS query set through
//! Historian's HTTP API and through DuckDB over the same Parquet files; gap filling, the
//! time-weighted average and the selectors against hand-checked answers.

mod common;

use std::time::{Duration, Instant};

use common::{Server, live_files, post, query, rows, run_python};
use historian_benches::mes::{MesConfig, MesGen};
use historian_benches::tsbs::{FIELDS, TsbsGen};
use serde_json::{Value, json};

/// 2026-01-01T00:00:00Z in ns.
const T0: i64 = 1_767_225_600_000_000_000;
const SEC: i64 = 1_000_000_000;

/// `time_weighted_avg(v, time)` of the signal per series and minute (`bucket` is
/// `date_bin` or `date_bin_gapfill`), ordered by series and minute.
async fn twa(server: &Server, bucket: &str, filter: &str) -> Vec<Value> {
    let sql = format!(
        "SELECT s, CAST({bucket}(INTERVAL '1 minute', time) AS BIGINT) AS minute, \
         time_weighted_avg(v, time) AS twa FROM signal WHERE {filter} GROUP BY 1, 2 ORDER BY 1, 2"
    );
    rows(server, "plant", &sql).await
}

async fn error(server: &Server, db: &str, sql: &str) -> String {
    let (status, _, body) = query(server, db, sql, "json").await;
    assert_eq!(status, 400);
    String::from_utf8(body).unwrap()
}

async fn wait_until_persisted(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = server
            .client()
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if m.lines().any(|l| l == "historian_buffer_rows 0") {
            return;
        }
        assert!(Instant::now() < deadline, "the buffer never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// TSBS `cpu-only` data (the load generator's): 40 hosts, 10 s apart, 6 hours, in
/// requests of 10 minutes each.
fn tsbs_cpu() -> Vec<Vec<u8>> {
    let mut generator = TsbsGen::new(1, 40, T0, 10 * SEC, None);
    (0..36)
        .map(|_| {
            let mut body = Vec::new();
            for _ in 0..60 {
                generator.write_interval(&mut body);
            }
            body
        })
        .collect()
}

/// MES data (the load generator's): 3 lines of 4 machines, readings every 10 s and the
/// events between them, 6 hours.
fn mes() -> Vec<Vec<u8>> {
    let mut generator = MesGen::new(&MesConfig {
        seed: 7,
        lines: 3,
        machines: 4,
        start_ns: T0,
        interval_ns: 10 * SEC,
        event_rate: 5.0,
    });
    (0..36)
        .map(|_| {
            let mut body = Vec::new();
            for _ in 0..60 {
                generator.write_tick(&mut body);
            }
            body
        })
        .collect()
}

/// The TSBS query set (TimescaleDB's SQL forms), for Historian or DuckDB.
fn tsbs_queries(duckdb: bool) -> Vec<(&'static str, String)> {
    let bucket = |width: &str| {
        if duckdb {
            format!("epoch_ns(time_bucket(INTERVAL '{width}', time))")
        } else {
            format!("CAST(date_bin(INTERVAL '{width}', time) AS BIGINT)")
        }
    };
    let ns = |col: &str| {
        if duckdb {
            format!("epoch_ns({col})")
        } else {
            format!("CAST({col} AS BIGINT)")
        }
    };
    let ts = |h: i64| format!("TIMESTAMP '2026-01-01 {h:02}:00:00'");
    let max_all: Vec<String> = FIELDS.iter().map(|f| format!("max({f}) AS {f}")).collect();
    let avg_all: Vec<String> = FIELDS.iter().map(|f| format!("avg({f}) AS {f}")).collect();
    vec![
        (
            "single-groupby-1-1-1",
            format!(
                "SELECT {} AS minute, max(usage_user) AS m FROM cpu \
                 WHERE hostname IN ('host_3') AND time >= {} AND time < {} GROUP BY 1 ORDER BY 1",
                bucket("1 minute"),
                ts(1),
                ts(2)
            ),
        ),
        (
            "single-groupby-5-8-1",
            format!(
                "SELECT {} AS minute, max(usage_user) a, max(usage_system) b, max(usage_idle) c, \
                 max(usage_nice) d, max(usage_iowait) e FROM cpu \
                 WHERE hostname IN ('host_1','host_5','host_9','host_13','host_17','host_21','host_25','host_29') \
                 AND time >= {} AND time < {} GROUP BY 1 ORDER BY 1",
                bucket("1 minute"),
                ts(2),
                ts(3)
            ),
        ),
        (
            "cpu-max-all-8",
            format!(
                "SELECT {} AS hour, {} FROM cpu \
                 WHERE hostname IN ('host_0','host_2','host_4','host_6','host_8','host_10','host_12','host_14') \
                 AND time >= {} AND time < {} GROUP BY 1 ORDER BY 1",
                bucket("1 hour"),
                max_all.join(", "),
                ts(0),
                ts(6)
            ),
        ),
        (
            "double-groupby-1",
            format!(
                "SELECT {} AS hour, hostname, avg(usage_user) AS mean FROM cpu \
                 WHERE time >= {} AND time < {} GROUP BY 1, 2 ORDER BY 1, 2",
                bucket("1 hour"),
                ts(0),
                ts(6)
            ),
        ),
        (
            "double-groupby-all",
            format!(
                "SELECT {} AS hour, hostname, {} FROM cpu \
                 WHERE time >= {} AND time < {} GROUP BY 1, 2 ORDER BY 1, 2",
                bucket("1 hour"),
                avg_all.join(", "),
                ts(0),
                ts(6)
            ),
        ),
        (
            "high-cpu-1",
            format!(
                "SELECT hostname, {} AS t, usage_user FROM cpu WHERE usage_user > 90.0 \
                 AND time >= {} AND time < {} AND hostname IN \
                 (SELECT hostname FROM cpu ORDER BY usage_user DESC, hostname LIMIT 1) ORDER BY t",
                ns("time"),
                ts(0),
                ts(6)
            ),
        ),
        (
            "high-cpu-all",
            format!(
                "SELECT hostname, {} AS t, usage_user FROM cpu WHERE usage_user > 90.0 \
                 AND time >= {} AND time < {} ORDER BY hostname, t",
                ns("time"),
                ts(3),
                ts(5)
            ),
        ),
        (
            "lastpoint",
            format!(
                "SELECT DISTINCT ON (hostname) hostname, {} AS t, usage_user, usage_idle FROM cpu \
                 ORDER BY hostname, time DESC",
                ns("time")
            ),
        ),
        (
            "lastpoint-two-regions",
            format!(
                "SELECT DISTINCT ON (hostname) hostname, region, {} AS t, usage_user FROM cpu \
                 WHERE region IN ('eu-west-1', 'us-east-1') ORDER BY hostname, time DESC",
                ns("time")
            ),
        ),
        (
            "mes-line-10m",
            format!(
                "SELECT line, {} AS b, avg(temperature) AS t, max(vibration) AS v, \
                 max(part_count) - min(part_count) AS parts, count(*) AS n FROM machine \
                 WHERE time >= {} AND time < {} GROUP BY 1, 2 ORDER BY 1, 2",
                bucket("10 minutes"),
                ts(1),
                ts(3)
            ),
        ),
        (
            "mes-events-per-type",
            "SELECT event, line, count(*) AS n, count(DISTINCT operator_id) AS ops \
             FROM mes_event GROUP BY 1, 2 ORDER BY 1, 2"
                .to_string(),
        ),
        (
            "mes-lastpoint",
            format!(
                "SELECT DISTINCT ON (machine) machine, {} AS t, temperature, quality_ok \
                 FROM machine ORDER BY machine, time DESC",
                ns("time")
            ),
        ),
        (
            "groupby-orderby-limit",
            format!(
                "SELECT {} AS minute, max(usage_user) AS m FROM cpu WHERE time < {} \
                 GROUP BY 1 ORDER BY 1 DESC LIMIT 5",
                bucket("1 minute"),
                ts(4)
            ),
        ),
    ]
}

const DUCKDB: &str = r#"
import duckdb, json, sys
tables, sql = json.loads(sys.argv[1]), sys.argv[2]
con = duckdb.connect()
for table, files in tables.items():
    con.execute("CREATE VIEW %s AS SELECT * FROM read_parquet(%s, union_by_name=true)"
                % (table, json.dumps(files).replace('"', "'")))
cur = con.execute(sql)
names = [d[0] for d in cur.description]
print(json.dumps([dict(zip(names, row)) for row in cur.fetchall()]))
"#;

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[tokio::test]
async fn tsbs_queries_answer_as_duckdb_does_over_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        "[persist]\nflush_age = \"200ms\"\ninterval = \"100ms\"\n",
    );
    let c = server.client();
    for body in tsbs_cpu().into_iter().chain(mes()) {
        let (status, resp) = post(&c, &server.url("/api/v3/write_lp?db=tsbs"), body).await;
        assert_eq!(status, 204, "{resp}");
    }
    wait_until_persisted(&server).await;
    let tables: serde_json::Map<String, Value> = ["cpu", "machine", "mes_event"]
        .iter()
        .map(|t| {
            let files: Vec<String> = live_files(&server.lake(), "tsbs", t)
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            (t.to_string(), json!(files))
        })
        .collect();
    let files = Value::Object(tables).to_string();
    let count = rows(&server, "tsbs", "SELECT count(*) AS n FROM cpu").await;
    assert_eq!(count[0]["n"], 36 * 60 * 40);
    for ((name, ours), (_, theirs)) in tsbs_queries(false).into_iter().zip(tsbs_queries(true)) {
        let got = rows(&server, "tsbs", &ours).await;
        let want: Vec<Value> =
            serde_json::from_str(&run_python(DUCKDB, &[&files, &theirs])).unwrap();
        assert!(!want.is_empty(), "{name}: DuckDB found no rows");
        assert_eq!(got.len(), want.len(), "{name}: row count");
        for (g, w) in got.iter().zip(&want) {
            assert!(same(g, w), "{name}: Historian {g} != DuckDB {w}");
        }
    }
}

/// Two series of a signal, minute buckets from T0: a = 10 @0s, 20 @30s, 40 @150s; b = 1 @60s.
async fn signal_server(dir: &std::path::Path) -> Server {
    signal_server_with(dir, "").await
}

async fn signal_server_with(dir: &std::path::Path, config: &str) -> Server {
    let server = Server::start(dir, config);
    let c = server.client();
    let body = format!(
        "signal,s=a v=10 {}\nsignal,s=a v=20 {}\nsignal,s=a v=40 {}\nsignal,s=b v=1 {}\n",
        T0,
        T0 + 30 * SEC,
        T0 + 150 * SEC,
        T0 + 60 * SEC
    );
    let (status, resp) = post(&c, &server.url("/api/v3/write_lp?db=plant"), body).await;
    assert_eq!(status, 204, "{resp}");
    server
}

const RANGE: &str =
    "time >= TIMESTAMP '2026-01-01 00:00:00' AND time < TIMESTAMP '2026-01-01 00:04:00'";

#[tokio::test]
async fn gap_filling_adds_every_bucket_of_the_range_per_series() {
    let dir = tempfile::tempdir().unwrap();
    let server = signal_server(dir.path()).await;
    let sql = format!(
        "SELECT s, CAST(date_bin_gapfill(INTERVAL '1 minute', time) AS BIGINT) AS minute, \
         avg(v) AS plain, locf(avg(v)) AS carried, interpolate(avg(v)) AS linear \
         FROM signal WHERE {RANGE} GROUP BY s, 2 ORDER BY s, minute"
    );
    let got = rows(&server, "plant", &sql).await;
    let m = |k: i64| T0 + k * 60 * SEC;
    assert_eq!(
        got,
        vec![
            json!({"s": "a", "minute": m(0), "plain": 15.0, "carried": 15.0, "linear": 15.0}),
            json!({"s": "a", "minute": m(1), "carried": 15.0, "linear": 27.5}),
            json!({"s": "a", "minute": m(2), "plain": 40.0, "carried": 40.0, "linear": 40.0}),
            json!({"s": "a", "minute": m(3), "carried": 40.0}),
            json!({"s": "b", "minute": m(0)}),
            json!({"s": "b", "minute": m(1), "plain": 1.0, "carried": 1.0, "linear": 1.0}),
            json!({"s": "b", "minute": m(2), "carried": 1.0}),
            json!({"s": "b", "minute": m(3), "carried": 1.0}),
        ]
    );
    // The same with the result in the buffer or in Parquet: here, a WHERE on the series.
    let one = rows(
        &server,
        "plant",
        &format!(
            "SELECT date_bin_gapfill(INTERVAL '2 minutes', time) AS b, count(v) AS n FROM signal \
             WHERE s = 'b' AND {RANGE} GROUP BY 1 ORDER BY 1"
        ),
    )
    .await;
    // Added buckets hold NULL aggregates, count included (as in TimescaleDB).
    assert_eq!(one.len(), 2);
    assert_eq!(one[0]["n"], 1);
    assert_eq!(one[1].get("n"), None);
    // Without a time range there is nothing to bound the buckets.
    let e = error(
        &server,
        "plant",
        "SELECT date_bin_gapfill(INTERVAL '1 minute', time), avg(v) FROM signal GROUP BY 1",
    )
    .await;
    assert!(e.contains("time range"), "{e}");
    let e = error(&server, "plant", "SELECT locf(v) FROM signal").await;
    assert!(e.contains("date_bin_gapfill"), "{e}");
}

#[tokio::test]
async fn time_weighted_average_holds_each_value_until_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let server = signal_server(dir.path()).await;
    let m = |k: i64| T0 + k * 60 * SEC;
    // Gap-filled: the value before each bucket holds into it.
    let got = twa(&server, "date_bin_gapfill", RANGE).await;
    assert_eq!(
        got,
        vec![
            json!({"s": "a", "minute": m(0), "twa": 15.0}),
            json!({"s": "a", "minute": m(1), "twa": 20.0}),
            json!({"s": "a", "minute": m(2), "twa": 30.0}),
            json!({"s": "a", "minute": m(3), "twa": 40.0}),
            json!({"s": "b", "minute": m(0)}),
            json!({"s": "b", "minute": m(1), "twa": 1.0}),
            json!({"s": "b", "minute": m(2), "twa": 1.0}),
            json!({"s": "b", "minute": m(3), "twa": 1.0}),
        ]
    );
    // Plain date_bin: only buckets with samples, still starting from the value before.
    let got = twa(&server, "date_bin", RANGE).await;
    assert_eq!(
        got,
        vec![
            json!({"s": "a", "minute": m(0), "twa": 15.0}),
            json!({"s": "a", "minute": m(2), "twa": 30.0}),
            json!({"s": "b", "minute": m(1), "twa": 1.0}),
        ]
    );
    // A range that starts after a's first samples: the value a held then (20, found by
    // looking back before the range) holds into the first buckets.
    let later =
        "time >= TIMESTAMP '2026-01-01 00:01:00' AND time < TIMESTAMP '2026-01-01 00:04:00'";
    let got = twa(&server, "date_bin_gapfill", later).await;
    assert_eq!(
        got,
        vec![
            json!({"s": "a", "minute": m(1), "twa": 20.0}),
            json!({"s": "a", "minute": m(2), "twa": 30.0}),
            json!({"s": "a", "minute": m(3), "twa": 40.0}),
            json!({"s": "b", "minute": m(1), "twa": 1.0}),
            json!({"s": "b", "minute": m(2), "twa": 1.0}),
            json!({"s": "b", "minute": m(3), "twa": 1.0}),
        ]
    );
    let got = twa(&server, "date_bin", &format!("s = 'a' AND {later}")).await;
    assert_eq!(got, vec![json!({"s": "a", "minute": m(2), "twa": 30.0})]);
    // With a lookback shorter than the 30 s since a's last sample before the range, a is
    // silent for longer than the window: it starts at its first sample in the range.
    let short = tempfile::tempdir().unwrap();
    let short =
        signal_server_with(short.path(), "[query]\ntime_weighted_lookback = \"20s\"\n").await;
    let got = twa(&short, "date_bin_gapfill", &format!("s = 'a' AND {later}")).await;
    assert_eq!(
        got,
        vec![
            json!({"s": "a", "minute": m(1)}),
            json!({"s": "a", "minute": m(2), "twa": 40.0}),
            json!({"s": "a", "minute": m(3), "twa": 40.0}),
        ]
    );
    // Whole series: from its first sample to its last (10 for 30 s, 20 for 120 s).
    let got = rows(
        &server,
        "plant",
        "SELECT s, time_weighted_avg(v, time) AS twa FROM signal GROUP BY s ORDER BY s",
    )
    .await;
    assert_eq!(
        got,
        vec![
            json!({"s": "a", "twa": 18.0}),
            json!({"s": "b", "twa": 1.0})
        ]
    );
}

#[tokio::test]
async fn first_and_last_select_by_time_not_by_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = signal_server(dir.path()).await;
    let got = rows(
        &server,
        "plant",
        "SELECT s, first(v, time) AS f, last(v, time) AS l, min(v) AS lo FROM \
         (SELECT * FROM signal ORDER BY v DESC) GROUP BY s ORDER BY s",
    )
    .await;
    assert_eq!(
        got,
        vec![
            json!({"s": "a", "f": 10.0, "l": 40.0, "lo": 10.0}),
            json!({"s": "b", "f": 1.0, "l": 1.0, "lo": 1.0}),
        ]
    );
    let e = error(&server, "plant", "SELECT last(v, v) FROM signal").await;
    assert!(e.contains("time column"), "{e}");
}
