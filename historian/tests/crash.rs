//! Crash recovery: while eight writers stream rows, the server is killed 20 times (SIGKILL at
//! random moments and aborts at the `parquet_upload`, `manifest_commit` and `wal_retire`
//! failpoints) and restarted. In the end every acknowledged row must be in the lake exactly
//! once, no row twice, no row that was never sent, and no file outside the manifest.
//!
//! `HISTORIAN_CRASH_SEED=<u64>` replays a run's random choices (the seed is printed).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimestampNanosecondType};
use common::Server;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const DB: &str = "plant";
const TABLES: [&str; 2] = ["crash", "crash_b"];
const WRITERS: usize = 8;
const CRASHES: usize = 20;
const DAY_NS: i64 = 86_400_000_000_000;
/// Prime to DAY_NS: `c * PRIME mod DAY_NS` is a bijection, so times are unique but unordered.
const PRIME: i128 = 1_000_000_007;
const FAILPOINTS: [&str; 3] = ["parquet_upload", "manifest_commit", "wal_retire"];

const CONFIG: &str = r#"
[wal]
segment_bytes = 65536

[persist]
flush_bytes = 1048576
flush_age = "200ms"
interval = "100ms"
max_files_per_partition = 2
closed_after = "1s"
deletion_grace = "1s"
target_file_bytes = 1048576
compaction_max_input_bytes = 8388608
"#;

/// What the client knows about a row it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// 204: fsynced; must be in the lake exactly once.
    Acked,
    /// The connection broke or the server answered an error: at most once.
    Unknown,
    /// Never reached the server (connect failed) or refused with 503: must be absent.
    Refused,
}

/// A row as sent: writer `w`, counter `c` (the `n` field) identify it.
#[derive(Debug, Clone, Copy)]
struct SentRow {
    table: u8,
    day: u8,
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    Kill,
    Failpoint(&'static str),
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn row_time(bases: &[i64; 3], day: u8, c: u64) -> i64 {
    bases[day as usize] + ((c as i128 * PRIME) % DAY_NS as i128) as i64
}

fn row_value(w: usize, c: u64) -> f64 {
    c as f64 * 0.5 + w as f64 * 1000.0
}

/// One writer: requests of 50-200 fresh rows until `stop`; returns what became of each row.
async fn writer(
    w: usize,
    client: reqwest::Client,
    addr: Arc<RwLock<String>>,
    stop: Arc<AtomicBool>,
    seed: u64,
    bases: [i64; 3],
) -> (Vec<SentRow>, BTreeMap<String, usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rows: Vec<SentRow> = Vec::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let lines = rng.random_range(50..=200);
        let first = rows.len();
        let mut body = String::with_capacity(lines * 64);
        for _ in 0..lines {
            let c = rows.len() as u64;
            let table = if rng.random_bool(0.2) { 1u8 } else { 0u8 };
            // Mostly today, some late rows for the two days before.
            let day = match rng.random_range(0..10) {
                0..6 => 0u8,
                6..9 => 1,
                _ => 2,
            };
            body.push_str(&format!(
                "{},writer=w{w} n={c}i,v={} {}\n",
                TABLES[table as usize],
                row_value(w, c),
                row_time(&bases, day, c)
            ));
            rows.push(SentRow {
                table,
                day,
                outcome: Outcome::Unknown,
            });
        }
        let url = format!(
            "http://{}/api/v3/write_lp?db={DB}&precision=ns",
            addr.read().unwrap()
        );
        let outcome = match client.post(&url).body(body).send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let _ = resp.bytes().await;
                match status {
                    204 => Outcome::Acked,
                    503 => Outcome::Refused,
                    s => {
                        *errors.entry(format!("HTTP {s}")).or_default() += 1;
                        Outcome::Unknown
                    }
                }
            }
            Err(e) if e.is_connect() => Outcome::Refused,
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else {
                    "broken connection"
                };
                *errors.entry(kind.to_string()).or_default() += 1;
                Outcome::Unknown
            }
        };
        for r in &mut rows[first..] {
            r.outcome = outcome;
        }
        let pause = if outcome == Outcome::Acked {
            rng.random_range(0..25)
        } else {
            100
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    (rows, errors)
}

/// Whether the process is alive (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// Restarts the server; false if it died before it listened (a failpoint during recovery or
/// the first persist cycle). The harness panics in that case; the panic is caught, silently.
fn restart(server: &mut Server, env: &[(String, String)]) -> bool {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| server.restart_with_env(&env)));
    std::panic::set_hook(hook);
    result.is_ok()
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

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

fn tail(log: &str) -> &str {
    let start = log.len().saturating_sub(6000);
    let start = (start..log.len())
        .find(|i| log.is_char_boundary(*i))
        .unwrap_or(0);
    &log[start..]
}

/// A row found in the lake.
struct FoundRow {
    table: u8,
    writer: usize,
    c: u64,
    time: i64,
    v: f64,
}

/// Reads every row of every live file of both tables, checking each file against its
/// manifest entry (row count, time range, partition).
fn read_lake(lake: &Path) -> Vec<FoundRow> {
    let mut out = Vec::new();
    for (t, table) in TABLES.iter().enumerate() {
        let m = common::manifest(lake, DB, table);
        for f in m["files"].as_array().unwrap() {
            let path = lake.join(f["path"].as_str().unwrap());
            let partition = f["partition"].as_str().unwrap();
            let mut rows = 0u64;
            for batch in common::read_parquet(&path) {
                rows += batch.num_rows() as u64;
                let writer = arrow::compute::cast(
                    batch.column_by_name("writer").expect("writer column"),
                    &DataType::Utf8,
                )
                .unwrap();
                let writer = writer.as_string::<i32>();
                let n = batch
                    .column_by_name("n")
                    .unwrap()
                    .as_primitive::<Int64Type>();
                let v = batch
                    .column_by_name("v")
                    .unwrap()
                    .as_primitive::<Float64Type>();
                let time = batch
                    .column_by_name("time")
                    .unwrap()
                    .as_primitive::<TimestampNanosecondType>();
                for i in 0..batch.num_rows() {
                    assert!(
                        !writer.is_null(i) && !n.is_null(i) && !v.is_null(i),
                        "NULL in row {i} of {}",
                        path.display()
                    );
                    let ts = time.value(i);
                    let min = f["min_time"].as_i64().unwrap();
                    let max = f["max_time"].as_i64().unwrap();
                    assert!(
                        (min..=max).contains(&ts),
                        "row time {ts} outside the manifest's range {min}..={max} of {}",
                        path.display()
                    );
                    let date = chrono::DateTime::from_timestamp_nanos(ts)
                        .format("date=%Y-%m-%d")
                        .to_string();
                    assert_eq!(
                        date,
                        partition,
                        "row in the wrong partition file {}",
                        path.display()
                    );
                    out.push(FoundRow {
                        table: t as u8,
                        writer: writer.value(i).strip_prefix('w').unwrap().parse().unwrap(),
                        c: n.value(i) as u64,
                        time: ts,
                        v: v.value(i),
                    });
                }
            }
            assert_eq!(
                f["rows"].as_u64().unwrap(),
                rows,
                "manifest row count of {}",
                path.display()
            );
        }
    }
    out
}

#[derive(Debug, Default)]
struct Tally {
    acked: usize,
    unknown: usize,
    unknown_present: usize,
    refused: usize,
    rows_in_lake: usize,
}

/// Checks the lake's rows against what was sent and acknowledged.
fn verify(sent: &[Vec<SentRow>], bases: &[i64; 3], found: &[FoundRow]) -> Tally {
    let mut seen: Vec<Vec<u8>> = sent.iter().map(|rows| vec![0u8; rows.len()]).collect();
    let mut problems: Vec<String> = Vec::new();
    for r in found {
        let Some(s) = sent.get(r.writer).and_then(|rows| rows.get(r.c as usize)) else {
            problems.push(format!(
                "row w{} n={} was never sent (table {}, time {})",
                r.writer, r.c, TABLES[r.table as usize], r.time
            ));
            continue;
        };
        let expected_time = row_time(bases, s.day, r.c);
        if s.table != r.table || expected_time != r.time || row_value(r.writer, r.c) != r.v {
            problems.push(format!(
                "row w{} n={} does not match what was sent: table {} time {} v {} (sent table {} time {expected_time} v {})",
                r.writer,
                r.c,
                TABLES[r.table as usize],
                r.time,
                r.v,
                TABLES[s.table as usize],
                row_value(r.writer, r.c)
            ));
            continue;
        }
        if s.outcome == Outcome::Refused {
            problems.push(format!(
                "row w{} n={} is in the lake although its request never reached the server or got 503",
                r.writer, r.c
            ));
        }
        let k = &mut seen[r.writer][r.c as usize];
        *k = k.saturating_add(1);
        if *k == 2 {
            problems.push(format!(
                "row w{} n={} (table {}, time {}) appears more than once ({:?})",
                r.writer, r.c, TABLES[r.table as usize], r.time, s.outcome
            ));
        }
    }
    let mut tally = Tally {
        rows_in_lake: found.len(),
        ..Default::default()
    };
    let mut lost = 0usize;
    for (w, rows) in sent.iter().enumerate() {
        for (c, s) in rows.iter().enumerate() {
            match s.outcome {
                Outcome::Acked => {
                    tally.acked += 1;
                    if seen[w][c] == 0 {
                        lost += 1;
                        if lost <= 20 {
                            problems.push(format!(
                                "acknowledged row w{w} n={c} (table {}, time {}) is missing",
                                TABLES[s.table as usize],
                                row_time(bases, s.day, c as u64)
                            ));
                        }
                    }
                }
                Outcome::Unknown => {
                    tally.unknown += 1;
                    if seen[w][c] > 0 {
                        tally.unknown_present += 1;
                    }
                }
                Outcome::Refused => tally.refused += 1,
            }
        }
    }
    let shown: Vec<&String> = problems.iter().take(40).collect();
    assert!(
        problems.is_empty(),
        "{} problems ({lost} acknowledged rows lost), first ones:\n{shown:#?}",
        problems.len()
    );
    tally
}

/// Files under the tables' directories that the latest manifest neither lists nor schedules
/// for deletion.
fn orphans(lake: &Path, tables: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for table in tables {
        let m = common::manifest(lake, DB, table);
        let known: HashSet<PathBuf> = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .chain(m["pending_deletes"].as_array().unwrap())
            .map(|f| lake.join(f["path"].as_str().unwrap()))
            .collect();
        let mut stack = vec![lake.join("databases").join(DB).join("tables").join(table)];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if !known.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    out
}

fn wal_segments(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("wal"))
        .map(|d| d.filter_map(|e| e.ok()).count())
        .unwrap_or(0)
}

#[test]
fn kill9_at_20_points_loses_no_acknowledged_row_and_duplicates_none() {
    let started = Instant::now();
    let seed = std::env::var("HISTORIAN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("crash test seed: {seed} (HISTORIAN_CRASH_SEED={seed} replays the choices)");
    let mut rng = StdRng::seed_from_u64(seed);

    // 11 kills at random moments, each failpoint armed 3 times (it must fire at least twice).
    let mut plan = vec![Crash::Kill; CRASHES - 3 * FAILPOINTS.len()];
    for fp in FAILPOINTS {
        plan.extend([Crash::Failpoint(fp); 3]);
    }
    plan.shuffle(&mut rng);
    let env_for = |crash: Option<&Crash>, rng: &mut StdRng| -> Vec<(String, String)> {
        match crash {
            Some(Crash::Failpoint(name)) => vec![(
                "HISTORIAN_FAILPOINT".to_string(),
                format!("{name}:{}", rng.random_range(1..=3)),
            )],
            _ => Vec::new(),
        }
    };

    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let first_env = env_for(plan.first(), &mut rng);
    let first: Vec<(&str, &str)> = first_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut server = Server::start_with_env(&data_dir, CONFIG, &first);
    let mut armed: Option<String> = first_env.first().map(|(_, v)| v.clone());
    let mut alive_at_start = true;

    let today = now_ns().div_euclid(DAY_NS) * DAY_NS;
    let bases = [today, today - DAY_NS, today - 2 * DAY_NS];
    let addr = Arc::new(RwLock::new(server.addr.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| {
            rt.spawn(writer(
                w,
                server.client_with_timeout(Duration::from_secs(20)),
                addr.clone(),
                stop.clone(),
                seed.wrapping_add(w as u64 + 1),
                bases,
            ))
        })
        .collect();

    let mut kills = 0usize;
    let mut fired: BTreeMap<&str, usize> = BTreeMap::new();
    let mut not_fired: BTreeMap<&str, usize> = BTreeMap::new();
    let mut fired_at_start = 0usize;
    // Let the first flushes happen before the first crash.
    std::thread::sleep(Duration::from_millis(500));
    // The log as it was when the running server started.
    let mut before = String::new();
    for i in 0..CRASHES {
        match plan[i] {
            Crash::Kill => {
                std::thread::sleep(Duration::from_millis(rng.random_range(200..=1500)));
                assert!(
                    alive(server.pid()),
                    "crash {i}: the server died on its own; log tail:\n{}",
                    tail(&plain(&server.log()))
                );
                server.kill9();
                kills += 1;
            }
            Crash::Failpoint(name) => {
                let exited = !alive_at_start || server.wait_exit(Duration::from_secs(60));
                let log = plain(&server.log());
                let needle = format!("failpoint {name} reached");
                if !exited {
                    server.kill9();
                    *not_fired.entry(name).or_default() += 1;
                    println!("crash {i}: failpoint {armed:?} did not fire within 60 s; killed");
                } else {
                    assert!(
                        count(&log, &needle) > count(&before, &needle),
                        "crash {i}: the server armed with {armed:?} exited without reaching it; log tail:\n{}",
                        tail(&log)
                    );
                    *fired.entry(name).or_default() += 1;
                    if !alive_at_start {
                        fired_at_start += 1;
                    }
                }
            }
        }
        let env = env_for(plan.get(i + 1), &mut rng);
        armed = env.first().map(|(_, v)| v.clone());
        before = plain(&server.log());
        alive_at_start = restart(&mut server, &env);
        if !alive_at_start {
            assert!(
                armed.is_some(),
                "the server failed to start after crash {i}; log tail:\n{}",
                tail(&plain(&server.log()))
            );
        } else {
            *addr.write().unwrap() = server.addr.clone();
        }
        println!(
            "crash {:2} {:?} done at {:5.1}s; restarted{}{}",
            i + 1,
            plan[i],
            started.elapsed().as_secs_f64(),
            armed
                .as_ref()
                .map(|a| format!(" armed with {a}"))
                .unwrap_or_default(),
            if alive_at_start {
                ""
            } else {
                " (the failpoint fired before it listened)"
            }
        );
    }
    // The last restart is clean; write on a little more, then stop the writers.
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let mut sent: Vec<Vec<SentRow>> = Vec::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for h in handles {
        let (rows, errs) = rt.block_on(h).expect("writer task");
        sent.push(rows);
        for (k, v) in errs {
            *errors.entry(k).or_default() += v;
        }
    }
    drop(rt);

    // Graceful stop, then a clean start and stop: the replay must add nothing.
    server.stop();
    let lake = server.lake();
    let found = read_lake(&lake);
    let first_tally = verify(&sent, &bases, &found);
    server.restart_with_env(&[]);
    let log = plain(&server.log());
    let replay_line = log
        .lines()
        .rev()
        .find(|l| l.contains("WAL replayed"))
        .expect("a WAL replayed log line")
        .to_string();
    assert!(
        replay_line.contains("replayed=0"),
        "after a graceful stop the WAL replay must skip every row: {replay_line}"
    );
    // Let retention sweeps delete replaced files and closed partitions compact.
    std::thread::sleep(Duration::from_millis(2500));
    server.stop();
    let log = plain(&server.log());
    assert!(
        !log.contains("panicked"),
        "the server panicked; log tail:\n{}",
        tail(&log)
    );
    let found_again = read_lake(&lake);
    let tally = verify(&sent, &bases, &found_again);
    assert_eq!(
        tally.rows_in_lake, first_tally.rows_in_lake,
        "a clean restart changed the number of rows in the lake"
    );
    let left = orphans(&lake, &TABLES);
    assert!(
        left.is_empty(),
        "files outside the manifest after the last clean start: {left:#?}"
    );

    for fp in FAILPOINTS {
        assert!(
            fired.get(fp).copied().unwrap_or(0) >= 2,
            "failpoint {fp} fired {} times (want at least 2); not fired: {not_fired:?}",
            fired.get(fp).copied().unwrap_or(0)
        );
    }
    assert!(
        tally.acked > 10_000,
        "too few rows acknowledged ({}) for a meaningful test",
        tally.acked
    );
    let files: usize = TABLES
        .iter()
        .map(|t| {
            common::manifest(&lake, DB, t)["files"]
                .as_array()
                .unwrap()
                .len()
        })
        .sum();
    println!(
        "crash test summary after {:.1}s (seed {seed}):\n  \
         crashes: {kills} SIGKILL, failpoints fired {fired:?} ({fired_at_start} before listening), not fired {not_fired:?}\n  \
         rows: {} acknowledged (all present once), {} unknown ({} of them present), {} refused/unsent (none present); {} rows in the lake in {files} files\n  \
         client errors: {errors:?}\n  \
         server log: {} compactions, {} orphan files deleted at start, {} torn WAL tails cut, {} WAL segments left",
        started.elapsed().as_secs_f64(),
        tally.acked,
        tally.unknown,
        tally.unknown_present,
        tally.refused,
        tally.rows_in_lake,
        count(&log, "compacted partition files"),
        count(&log, "deleting a file no manifest lists"),
        count(&log, "cutting a torn WAL tail"),
        wal_segments(&data_dir),
    );
}

/// A crash between a table's very first Parquet upload and its first manifest commit leaves
/// a file in a table that has no manifest yet; the next start must delete it like any other
/// file no manifest lists.
#[test]
fn an_orphan_of_a_tables_first_flush_is_deleted_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = Server::start_with_env(
        &data_dir,
        CONFIG,
        &[("HISTORIAN_FAILPOINT", "manifest_commit:1")],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = server.client();
    let url = server.url(&format!("/api/v3/write_lp?db={DB}&precision=ns"));
    let (status, body) = rt.block_on(common::post(
        &client,
        &url,
        "first,writer=w0 n=0i,v=0 1000000000\n",
    ));
    assert_eq!(status, 204, "{body}");
    assert!(
        server.wait_exit(Duration::from_secs(30)),
        "the manifest_commit failpoint did not fire"
    );
    assert!(plain(&server.log()).contains("failpoint manifest_commit reached"));
    let lake = server.lake();
    let table_dir = lake.join("databases").join(DB).join("tables").join("first");
    let uploaded: Vec<PathBuf> = walk(&table_dir);
    assert_eq!(
        uploaded.len(),
        1,
        "the uploaded, uncommitted file: {uploaded:?}"
    );
    assert!(
        !lake
            .join("databases")
            .join(DB)
            .join("manifest")
            .join("first")
            .exists()
    );

    // A clean start: the row comes back from the WAL and is committed in a new file; the
    // file of the crashed flush must be gone.
    server.restart_with_env(&[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lake
        .join("databases")
        .join(DB)
        .join("manifest")
        .join("first")
        .exists()
    {
        assert!(Instant::now() < deadline, "no manifest after 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    server.stop();
    let live = common::live_files(&lake, DB, "first");
    assert_eq!(live.len(), 1);
    let rows: usize = common::read_parquet(&live[0])
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(rows, 1);
    let left = orphans(&lake, &["first"]);
    assert!(
        left.is_empty(),
        "the file of the crashed first flush survived a clean start and stop: {left:?}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
