//! The lake as other engines see it: Parquet layout and properties, schema evolution, late
//! data, retention, and DuckDB / pyarrow reading the same rows.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Server, live_files, manifest, post, run_python};
use parquet::basic::{Compression, Encoding};
use parquet::file::reader::{FileReader, SerializedFileReader};

const FAST: &str = "[persist]\nflush_age = \"100ms\"\ninterval = \"100ms\"\n";

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

const DAY: i64 = 86_400_000_000_000;

/// A deterministic MES-like body: machine signals and operator events, with names that
/// need escaping, over `days` days ending now.
fn mes_body(days: i64, per_day: i64) -> String {
    let names = ["Jürgen Müller", "Zoë O'Brien", "Ann \"AJ\" Lee", "Bob, Jr."];
    let mut out = String::new();
    let start = now_ns() - days * DAY;
    for d in 0..days {
        for i in 0..per_day {
            let t = start + d * DAY + i * 1_000_000_000;
            let m = i % 7;
            out.push_str(&format!(
                "machine,plant=p1,line=l{},machine=m{m} temperature={},spindle_speed={}i,ok={} {t}\n",
                m % 2,
                40.0 + (i % 50) as f64 * 0.5,
                1000 + i,
                if i % 3 == 0 { "t" } else { "f" },
            ));
            if i % 5 == 0 {
                let name = names[(i as usize / 5) % names.len()]
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"");
                out.push_str(&format!(
                    "mes_event,plant=p1,machine=m{m},event=quality_check operator_id=\"OP-{}\",operator_name=\"{name}\",alarm_code={}i {t}\n",
                    100 + i % 13,
                    i % 4,
                ));
            }
        }
    }
    out
}

#[tokio::test]
async fn parquet_files_are_sorted_zstd_with_dictionary_tags_statistics_and_page_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), FAST);
    let c = server.client();
    // Rows arrive out of order; the file must be sorted by tags then time.
    let mut lines: Vec<String> = (0..3000)
        .map(|i| {
            format!(
                "cpu,host=h{},region=r{} usage={} {}",
                (i * 7919) % 13,
                i % 3,
                i,
                1_700_000_000_000_000_000i64 + ((i * 104_729) % 3000) * 1_000_000
            )
        })
        .collect();
    lines.reverse();
    let (s, j) = post(
        &c,
        &server.url("/api/v3/write_lp?db=lake&precision=ns"),
        lines.join("\n"),
    )
    .await;
    assert_eq!(s, 204, "{j}");
    server.stop();
    let files = live_files(&server.lake(), "lake", "cpu");
    assert_eq!(files.len(), 1);
    let rel = files[0]
        .strip_prefix(server.lake())
        .unwrap()
        .to_string_lossy()
        .to_string();
    assert!(
        rel.starts_with("databases/lake/tables/cpu/date=2023-11-14/part-"),
        "{rel}"
    );
    assert!(rel.ends_with(".parquet"));

    let reader = SerializedFileReader::new(std::fs::File::open(&files[0]).unwrap()).unwrap();
    let meta = reader.metadata();
    assert_eq!(meta.file_metadata().num_rows(), 3000);
    let rg = meta.row_group(0);
    let sorting = rg.sorting_columns().expect("sorting columns recorded");
    let schema = meta.file_metadata().schema_descr();
    let sort_names: Vec<String> = sorting
        .iter()
        .map(|s| schema.column(s.column_idx as usize).name().to_string())
        .collect();
    assert_eq!(sort_names, ["host", "region", "time"]);
    for col in rg.columns() {
        assert!(
            matches!(col.compression(), Compression::ZSTD(_)),
            "{:?}",
            col.column_path()
        );
        assert!(
            col.statistics().is_some(),
            "statistics for {:?}",
            col.column_path()
        );
        assert!(
            col.offset_index_offset().is_some() && col.column_index_offset().is_some(),
            "page index for {:?}",
            col.column_path()
        );
        if col.column_path().string() == "host" {
            assert!(
                col.encodings().any(|e| e == Encoding::RLE_DICTIONARY),
                "dictionary-encoded tag"
            );
        }
    }
    // Rows are sorted by (host, region, time).
    let batches = common::read_parquet(&files[0]);
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let keys: Vec<(String, String, i64)> = (0..b.num_rows())
        .map(|i| {
            let s = |n: &str| {
                let c = arrow::compute::cast(
                    b.column_by_name(n).unwrap(),
                    &arrow::datatypes::DataType::Utf8,
                )
                .unwrap();
                arrow::array::AsArray::as_string::<i32>(&c)
                    .value(i)
                    .to_string()
            };
            let t =
                arrow::array::AsArray::as_primitive::<arrow::datatypes::TimestampNanosecondType>(
                    b.column_by_name("time").unwrap(),
                )
                .value(i);
            (s("host"), s("region"), t)
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
}

#[tokio::test]
async fn duckdb_and_pyarrow_read_the_partitions_and_see_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), FAST);
    let c = server.client();
    let body = mes_body(3, 400);
    let (s, j) = post(
        &c,
        &server.url("/api/v3/write_lp?db=plant&precision=ns"),
        body.clone(),
    )
    .await;
    assert_eq!(s, 204, "{j}");
    server.stop();

    // What was sent, per table and day.
    let mut expected: BTreeMap<(String, String), usize> = BTreeMap::new();
    for line in body.lines() {
        let table = line.split(',').next().unwrap().to_string();
        let t: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        let day = chrono_day(t);
        *expected.entry((table, day)).or_default() += 1;
    }
    let script = r#"
import sys, json, duckdb, pyarrow.dataset as ds
root = sys.argv[1]
out = {}
for table in ["machine", "mes_event"]:
    path = f"{root}/databases/plant/tables/{table}"
    rows = duckdb.sql(f"select cast(date as varchar) as d, count(*) from read_parquet('{path}/**/*.parquet', hive_partitioning=true) group by 1 order by 1").fetchall()
    out["duckdb_" + table] = {d: n for d, n in rows}
    t = ds.dataset(path, format="parquet", partitioning="hive").to_table()
    days = t.column("date").to_pylist()
    counts = {}
    for d in days:
        counts[str(d)] = counts.get(str(d), 0) + 1
    out["pyarrow_" + table] = counts
names = duckdb.sql(f"select distinct operator_name from read_parquet('{root}/databases/plant/tables/mes_event/**/*.parquet', hive_partitioning=true) order by 1").fetchall()
out["names"] = [n for (n,) in names]
s = duckdb.sql(f"select sum(spindle_speed), count(distinct machine) from read_parquet('{root}/databases/plant/tables/machine/**/*.parquet')").fetchall()[0]
out["spindle_sum"] = int(s[0]); out["machines"] = s[1]
print(json.dumps(out))
"#;
    let out: serde_json::Value =
        serde_json::from_str(&run_python(script, &[server.lake().to_str().unwrap()])).unwrap();
    for table in ["machine", "mes_event"] {
        let want: BTreeMap<String, u64> = expected
            .iter()
            .filter(|((t, _), _)| t == table)
            .map(|((_, d), n)| (d.clone(), *n as u64))
            .collect();
        for engine in ["duckdb", "pyarrow"] {
            let got: BTreeMap<String, u64> = out[format!("{engine}_{table}")]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
                .collect();
            assert_eq!(got, want, "{engine} rows per partition of {table}");
        }
    }
    let names: Vec<&str> = out["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["Ann \"AJ\" Lee", "Bob, Jr.", "Jürgen Müller", "Zoë O'Brien"]
    );
    let spindle: i64 = body
        .lines()
        .filter(|l| l.starts_with("machine,"))
        .map(|l| {
            l.split("spindle_speed=")
                .nth(1)
                .unwrap()
                .split('i')
                .next()
                .unwrap()
                .parse::<i64>()
                .unwrap()
        })
        .sum();
    assert_eq!(out["spindle_sum"].as_i64().unwrap(), spindle);
    assert_eq!(out["machines"], 7);
}

fn chrono_day(t: i64) -> String {
    let days = t.div_euclid(DAY);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}")
}

#[tokio::test]
async fn new_columns_extend_the_schema_and_older_files_read_back_with_nulls() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), FAST);
    let c = server.client();
    let url = server.url("/api/v3/write_lp?db=evo&precision=s");
    assert_eq!(post(&c, &url, "m,host=a v=1 1700000000").await.0, 204);
    server.stop();
    let v1 = manifest(&server.lake(), "evo", "m")["schema"]["version"]
        .as_u64()
        .unwrap();
    server.restart_with_env(&[]);
    let url = server.url("/api/v3/write_lp?db=evo&precision=s");
    assert_eq!(
        post(&c, &url, "m,host=b,zone=z1 v=2,extra=\"x\" 1700000001")
            .await
            .0,
        204
    );
    server.stop();
    let m = manifest(&server.lake(), "evo", "m");
    let v2 = m["schema"]["version"].as_u64().unwrap();
    assert!(v2 > v1, "schema version grew: {v1} -> {v2}");
    let cols: Vec<&str> = m["schema"]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols, ["host", "zone", "time", "v", "extra"]);
    let versions: Vec<u64> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["schema_version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions.len(), 2);
    assert!(versions.contains(&v1) || versions.iter().any(|v| *v < v2));
    let script = r#"
import sys, duckdb
rows = duckdb.sql(f"select host, zone, v, extra from read_parquet('{sys.argv[1]}/databases/evo/tables/m/**/*.parquet', union_by_name=true) order by host").fetchall()
print(rows)
"#;
    let out = run_python(script, &[server.lake().to_str().unwrap()]);
    assert_eq!(
        out.trim(),
        "[('a', None, 1.0, None), ('b', 'z1', 2.0, 'x')]"
    );
}

#[tokio::test]
async fn late_rows_land_in_their_own_partition_without_rewriting_old_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), FAST);
    let c = server.client();
    let now = now_ns();
    let url = server.url("/api/v3/write_lp?db=late&precision=ns");
    assert_eq!(post(&c, &url, format!("m,host=a v=1 {now}")).await.0, 204);
    common::wait_for_files(&server, "late", "m", 1).await;
    let first = live_files(&server.lake(), "late", "m");
    let first_meta = std::fs::metadata(&first[0]).unwrap().modified().unwrap();
    // Three days late.
    assert_eq!(
        post(&c, &url, format!("m,host=a v=2 {}", now - 3 * DAY))
            .await
            .0,
        204
    );
    server.stop();
    let files = live_files(&server.lake(), "late", "m");
    assert_eq!(files.len(), 2);
    assert!(files.contains(&first[0]), "the first file is still live");
    assert_eq!(
        std::fs::metadata(&first[0]).unwrap().modified().unwrap(),
        first_meta
    );
    let partitions: Vec<String> = manifest(&server.lake(), "late", "m")["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["partition"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(partitions.len(), 2);
    assert_ne!(partitions[0], partitions[1]);
    assert!(partitions.contains(&format!("date={}", chrono_day(now - 3 * DAY))));
}

fn count_parquet(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                n += count_parquet(&p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test]
async fn ttl_rejects_expired_writes_and_the_sweeper_deletes_expired_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let config = |ttl: &str| {
        format!(
            "{FAST}deletion_grace = \"0s\"\n[tables.sensor]\npartition = \"hour\"\nttl = \"{ttl}\"\n"
        )
    };
    let mut server = Server::start(dir.path(), &config("30d"));
    let c = server.client();
    let now = now_ns();
    let url = server.url("/api/v3/write_lp?db=ret&precision=ns");
    let (s, j) = post(
        &c,
        &url,
        format!(
            "sensor,id=1 v=1 {}\nsensor,id=1 v=2 {now}\nsensor,id=1 v=3 {}",
            now - 3 * DAY,
            now - 40 * DAY
        ),
    )
    .await;
    assert_eq!(s, 400, "the 40-day-old row is past the 30-day ttl");
    assert_eq!(j["lines_written"], 2);
    assert!(
        j["data"][0]["error_message"]
            .as_str()
            .unwrap()
            .contains("retention"),
        "{j}"
    );
    server.stop();
    let table_dir = server.lake().join("databases/ret/tables/sensor");
    assert_eq!(count_parquet(&table_dir), 2, "two hour partitions");
    assert!(
        live_files(&server.lake(), "ret", "sensor")
            .iter()
            .any(|p| p.to_string_lossy().contains("/hour="))
    );
    // Shorten the ttl: the 3-day-old partition is now expired and swept.
    server.set_config(&config("1d"));
    server.restart_with_env(&[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count_parquet(&table_dir) != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "expired partition not deleted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop();
    assert_eq!(live_files(&server.lake(), "ret", "sensor").len(), 1);
    assert!(
        server.log().contains("retention: partition expired"),
        "deletion is logged"
    );
}

#[tokio::test]
async fn import_loads_plain_and_gzipped_files_and_reports_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), FAST);
    let plain = dir.path().join("a.lp");
    let gz = dir.path().join("b.lp.gz");
    let body: String = (0..2500)
        .map(|i| {
            format!(
                "imp,host=h{} v={i} {}\n",
                i % 5,
                1_700_000_000_000_000_000i64 + i
            )
        })
        .collect();
    std::fs::write(&plain, &body).unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(
        &mut enc,
        format!(
            "{}imp,host=h0 v=\"wrong type\" 5\n",
            body.replace("imp,", "imp2,")
        )
        .as_bytes(),
    )
    .unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    let out = server
        .cli()
        .args([
            "import",
            "--quiet",
            "--db",
            "imp",
            "--batch-lines",
            "1000",
            "--url",
        ])
        .arg(server.url(""))
        .arg(&plain)
        .arg(&gz)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("imported 5000 rows from 5001 lines"),
        "{stdout}"
    );
    assert!(stdout.contains("1 lines rejected"), "{stdout}");
    assert!(
        stderr.contains("b.lp.gz:5001"),
        "the bad line is named by file and line: {stderr}"
    );
    server.stop();
    let rows: u64 = ["imp", "imp2"]
        .iter()
        .flat_map(|t| {
            manifest(&server.lake(), "imp", t)["files"]
                .as_array()
                .unwrap()
                .clone()
        })
        .map(|f| f["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(rows, 5000);
}
