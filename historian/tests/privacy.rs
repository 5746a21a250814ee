//! Personal data end to end: privacy profiles at ingest, no plaintext at rest, subject
//! export against the generator's ground truth, erasure (keys and rows), personal TTL, and
//! the keyring's backup, restore, rotation and master key checks.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Server, post, rows};
use historian_benches::mes::{MesConfig, MesGen};
use ingest::line_protocol::{FieldValue, parse_lines};
use serde_json::{Value, json};

const SEC: i64 = 1_000_000_000;
const DAY: i64 = 86_400 * SEC;

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn profile_config(extra: &str) -> String {
    format!(
        r#"
[persist]
flush_age = "1s"
interval = "200ms"
deletion_grace = "4s"
closed_after = "1h"

[query]
timeout = "3s"

[privacy]
key_expiry_interval = "1s"

[tables.mes_event]
partition = "day"
columns = ["plant", "line", "machine", "event", "job_id", "alarm_code", "result"]
drop = ["badge_photo"]
[tables.mes_event.subjects]
operator_id = ["operator_name", "badge_id"]
supervisor_id = []

[tables.access_log]
partition = "day"
columns = ["door"]
drop = ["badge_photo"]
[tables.access_log.subjects]
employee = ["name"]
{extra}
"#
    )
}

fn historian(args: &[&str], data_dir: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_historian"));
    cmd.args(args).arg("--data-dir").arg(data_dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run historian")
}

/// Runs `historian keys <args>` on `data_dir` and its config; asserts success and returns
/// standard output.
fn keys(data_dir: &Path, args: &[&str]) -> String {
    let config = data_dir.join("historian.toml");
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    all.extend(["--config", config.to_str().unwrap()]);
    let out = historian(&all, data_dir, &[]);
    assert!(
        out.status.success(),
        "historian {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Writes the config and creates the keyring, as an operator would before the first start.
/// One MES event as the generator wrote it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Event {
    time: i64,
    machine: String,
    event: String,
    operator_id: String,
    operator_name: String,
    badge_id: String,
    supervisor_id: Option<String>,
    job_id: Option<String>,
}

fn events_of(body: &[u8]) -> Vec<Event> {
    let text = |v: &FieldValue| match v {
        FieldValue::String(s) => s.to_string(),
        other => format!("{other:?}"),
    };
    parse_lines(body)
        .filter_map(Result::ok)
        .filter(|l| l.measurement == "mes_event")
        .map(|l| {
            let tag = |k: &str| {
                l.tags
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default()
            };
            let field = |k: &str| l.fields.iter().find(|(n, _)| n == k).map(|(_, v)| text(v));
            Event {
                time: l.timestamp.unwrap(),
                machine: tag("machine"),
                event: tag("event"),
                operator_id: field("operator_id").unwrap(),
                operator_name: field("operator_name").unwrap(),
                badge_id: field("badge_id").unwrap(),
                supervisor_id: field("supervisor_id"),
                job_id: field("job_id"),
            }
        })
        .collect()
}

/// Two days of MES data (2 lines x 2 machines, readings every minute, events between), plus
/// an access-log line per login naming the same person in a second table.
fn generate(start_ns: i64) -> (Vec<Vec<u8>>, Vec<Event>) {
    let mut generator = MesGen::new(&MesConfig {
        seed: 11,
        lines: 2,
        machines: 2,
        start_ns,
        interval_ns: 60 * SEC,
        event_rate: 2.0,
    });
    let mut bodies = Vec::new();
    let mut events = Vec::new();
    for _ in 0..48 {
        let mut body = Vec::new();
        for _ in 0..60 {
            generator.write_tick(&mut body);
        }
        let batch = events_of(&body);
        for e in batch.iter().filter(|e| e.event == "login") {
            body.extend_from_slice(
                format!(
                    "access_log,door=gate_{} employee=\"{}\",name=\"{}\",badge_photo=\"JPEG\" {}\n",
                    e.machine,
                    e.operator_id,
                    e.operator_name.replace('"', "\\\""),
                    e.time
                )
                .as_bytes(),
            );
        }
        events.extend(batch);
        bodies.push(body);
    }
    (bodies, events)
}

async fn export(server: &Server, subject: &str) -> Vec<Value> {
    let (status, body) = post(
        &server.dpo(),
        &server.url("/api/v3/subjects/export"),
        json!({"subject": subject}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["rows"].as_array().unwrap().clone()
}

async fn write_all(server: &Server, bodies: &[Vec<u8>]) {
    let client = server.client();
    for body in bodies {
        let (status, answer) = post(
            &client,
            &server.url("/api/v3/write_lp?db=plant&precision=ns"),
            body.clone(),
        )
        .await;
        assert!(status == 200 || status == 204, "{status} {answer}");
        if status == 200 {
            assert_eq!(
                answer["dropped_columns"],
                json!(["badge_photo"]),
                "{answer}"
            );
        }
    }
}

/// `rows` logins an hour apart from `t0` on machines M0-M2: every fourth by `leaving`, the
/// others by E-STAYS.
fn hourly_logins(t0: i64, rows: i64, leaving: &str) -> Vec<u8> {
    (0..rows)
        .map(|i| {
            let who = if i % 4 == 0 { leaving } else { "E-STAYS" };
            format!(
                "mes_event,line=L1,machine=M{},event=login operator_id=\"{who}\",operator_name=\"Name {who}\" {}\n",
                i % 3,
                t0 + i * 3600 * SEC
            )
        })
        .collect::<String>()
        .into_bytes()
}

async fn count(server: &Server, table: &str) -> i64 {
    rows(
        server,
        "plant",
        &format!("SELECT count(*) AS n FROM {table}"),
    )
    .await[0]["n"]
        .as_i64()
        .unwrap()
}

fn expected_rows(events: &[Event], subject: &str) -> Vec<(String, String, String, String)> {
    let mut out: Vec<_> = events
        .iter()
        .filter(|e| e.operator_id == subject || e.supervisor_id.as_deref() == Some(subject))
        .map(|e| {
            (
                e.machine.clone(),
                e.event.clone(),
                e.operator_id.clone(),
                e.supervisor_id.clone().unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn personal_data_is_never_stored_in_clear_and_erasure_reaches_every_copy() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = profile_config("");
    let mut server = Server::start_with_keyring(&data, &config);
    let start = (now_ns() / DAY - 3) * DAY;
    let (bodies, events) = generate(start);
    write_all(&server, &bodies).await;

    // Ground truth: every personal value the generator wrote.
    let mut secrets: BTreeSet<String> = BTreeSet::new();
    for e in &events {
        secrets.insert(e.operator_id.clone());
        secrets.insert(e.operator_name.clone());
        secrets.insert(e.badge_id.clone());
        secrets.extend(e.supervisor_id.clone());
    }
    secrets.insert("JPEG".into());
    assert!(secrets.len() > 20, "the generator names many people");

    // Masked view: pseudonyms and NULLs, never a value; the machine data is all there.
    let masked = rows(
        &server,
        "plant",
        "SELECT operator_id, operator_name, badge_id, supervisor_id FROM mes_event",
    )
    .await;
    assert_eq!(masked.len(), events.len());
    for r in &masked {
        assert!(r["operator_id"].as_str().unwrap().starts_with("ps-"), "{r}");
        assert!(r.get("operator_name").is_none_or(Value::is_null), "{r}");
        assert!(r.get("badge_id").is_none_or(Value::is_null), "{r}");
    }
    let columns: Vec<String> = rows(
        &server,
        "plant",
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'mes_event'",
    )
    .await
    .iter()
    .map(|r| r["column_name"].as_str().unwrap().to_string())
    .collect();
    assert!(!columns.iter().any(|c| c.ends_with("__enc")), "{columns:?}");

    // A plain value of the allow-list is stored in clear, so the scan below can see values.
    let job = events.iter().find_map(|e| e.job_id.clone()).unwrap();
    server.restart_graceful();
    let wal_and_lake = common::values_found(&data, &BTreeSet::from([job.clone()]));
    assert!(
        !wal_and_lake.is_empty(),
        "the scan finds clear values: {job}"
    );
    let leaks = common::values_found(&data, &secrets);
    assert!(
        leaks.is_empty(),
        "plaintext personal data at rest: {leaks:#?}"
    );

    // Export: 100 % recall against the generator, across both subject columns, the
    // partitions of three days and both tables.
    let supervisor = events.iter().find_map(|e| e.supervisor_id.clone()).unwrap();
    let operator = events[0].operator_id.clone();
    let mut partitions = BTreeSet::new();
    for subject in [&operator, &supervisor] {
        let exported = export(&server, subject).await;
        let mes: Vec<&Value> = exported
            .iter()
            .filter(|r| r["table"] == "mes_event")
            .collect();
        let mut got: Vec<(String, String, String, String)> = mes
            .iter()
            .map(|r| {
                (
                    r["machine"].as_str().unwrap().to_string(),
                    r["event"].as_str().unwrap().to_string(),
                    r["operator_id"].as_str().unwrap().to_string(),
                    r["supervisor_id"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        got.sort();
        assert_eq!(got, expected_rows(&events, subject), "export of {subject}");
        for r in &mes {
            partitions.insert(r["time"].as_str().unwrap()[..10].to_string());
            if r["operator_id"] == json!(subject) {
                let truth = events.iter().find(|e| &e.operator_id == subject).unwrap();
                assert_eq!(r["operator_name"], json!(truth.operator_name));
                assert_eq!(r["badge_id"], json!(truth.badge_id));
                assert_eq!(r["subject_columns"], json!(["operator_id"]));
            }
        }
        let logins = events
            .iter()
            .filter(|e| &e.operator_id == subject && e.event == "login")
            .count();
        let access: Vec<&Value> = exported
            .iter()
            .filter(|r| r["table"] == "access_log")
            .collect();
        assert_eq!(access.len(), logins, "access_log rows of {subject}");
        assert!(access.iter().all(|r| r["employee"] == json!(subject)));
    }
    assert!(
        partitions.len() >= 2,
        "export spans partitions: {partitions:?}"
    );
    let (status, csv) = {
        let resp = server
            .dpo()
            .post(server.url("/api/v3/subjects/export"))
            .body(json!({"subject": operator, "format": "csv"}).to_string())
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    };
    assert_eq!(status, 200);
    assert!(csv.starts_with("db,table,time,column,value\n"));
    assert!(
        csv.lines()
            .any(|l| l.ends_with(&format!(",operator_id,{operator}")))
    );

    // The operator's pseudonyms, learned by matching the masked rows to the export's.
    let theirs: BTreeSet<(String, String)> = export(&server, &operator)
        .await
        .iter()
        .filter(|r| r["operator_id"] == json!(operator))
        .map(|r| (r["time"].to_string(), r["machine"].to_string()))
        .collect();
    let pseudonyms: BTreeSet<String> = rows(
        &server,
        "plant",
        "SELECT time, machine, operator_id FROM mes_event",
    )
    .await
    .iter()
    .filter(|r| theirs.contains(&(r["time"].to_string(), r["machine"].to_string())))
    .map(|r| r["operator_id"].as_str().unwrap().to_string())
    .collect();
    assert!(!pseudonyms.is_empty());

    // Erasure: keys at once, then the rows everywhere; idempotent.
    let before_mes = count(&server, "mes_event").await;
    let before_access = count(&server, "access_log").await;
    let client = server.dpo();
    let (status, receipt) = post(
        &client,
        &server.url("/api/v3/subjects/erase"),
        json!({"subject": operator}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{receipt}");
    let receipt = &receipt["receipt"];
    assert!(
        receipt["keys_destroyed"].as_u64().unwrap() >= 2,
        "{receipt}"
    );
    assert!(
        receipt["files_with_deletion_vectors"].as_u64().unwrap() >= 2,
        "{receipt}"
    );
    assert!(
        !receipt.to_string().contains(&operator),
        "a receipt names no one"
    );
    let (_, again) = post(
        &client,
        &server.url("/api/v3/subjects/erase"),
        json!({"subject": operator}).to_string(),
    )
    .await;
    assert_eq!(again["receipt"]["keys_destroyed"], json!(0));
    assert!(export(&server, &operator).await.is_empty());
    let as_operator = events.iter().filter(|e| e.operator_id == operator).count() as i64;
    let own_logins = events
        .iter()
        .filter(|e| e.operator_id == operator && e.event == "login")
        .count() as i64;
    // Events the operator only countersigned are theirs too.
    let as_supervisor = events
        .iter()
        .filter(|e| e.supervisor_id.as_deref() == Some(&operator) && e.operator_id != operator)
        .count() as i64;
    assert_eq!(
        count(&server, "mes_event").await,
        before_mes - as_operator - as_supervisor
    );
    assert_eq!(
        count(&server, "access_log").await,
        before_access - own_logins
    );
    let list = pseudonyms
        .iter()
        .map(|p| format!("'{p}'"))
        .collect::<Vec<_>>()
        .join(",");
    let sql = format!("SELECT count(*) AS n FROM mes_event WHERE operator_id IN ({list})");
    assert_eq!(rows(&server, "plant", &sql).await[0]["n"], json!(0));
    // Another person is untouched.
    assert_eq!(
        export(&server, &supervisor).await.len() as i64 > 0,
        supervisor != operator
    );

    // After the grace period the replaced files are gone: nothing of the subject remains,
    // not even their pseudonyms, in the WAL, the lake or the keyring; and a restart (WAL
    // replay) brings nothing back.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut scan_for: BTreeSet<String> = pseudonyms.clone();
    scan_for.insert(operator.clone());
    loop {
        let left = common::values_found(&data, &scan_for);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still on disk after erasure: {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    server.kill9();
    server.restart_with_env(&[]);
    assert!(export(&server, &operator).await.is_empty());
    assert_eq!(rows(&server, "plant", &sql).await[0]["n"], json!(0));
    let leaks = common::values_found(&data, &secrets);
    assert!(
        leaks.is_empty(),
        "plaintext personal data at rest: {leaks:#?}"
    );
    // The log never names anyone.
    assert!(!server.log().contains(&operator));
}

/// Rows in the live files of `mes_event` (what DuckDB would read), and the deletion
/// vectors the manifest names.
fn stored_rows_and_vectors(lake: &Path) -> (usize, Vec<String>) {
    let m = common::manifest(lake, "plant", "mes_event");
    let files = m["files"].as_array().unwrap();
    let rows = files
        .iter()
        .map(|f| {
            common::read_parquet(&lake.join(f["path"].as_str().unwrap()))
                .iter()
                .map(|b| b.num_rows())
                .sum::<usize>()
        })
        .sum();
    let vectors = files
        .iter()
        .filter_map(|f| f["deletes"]["path"].as_str().map(str::to_string))
        .collect();
    (rows, vectors)
}

#[tokio::test(flavor = "multi_thread")]
async fn erasure_hides_rows_by_deletion_vectors_until_compaction_rewrites_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Maintenance runs once at start, then not for an hour: the vectors stay in place.
    let idle = profile_config("").replace("interval = \"200ms\"", "interval = \"1h\"");
    let mut server = Server::start_with_keyring(&data, &idle);
    let t0 = (now_ns() / DAY - 2) * DAY;
    write_all(&server, &[hourly_logins(t0, 40, "E-GONE")]).await;
    // A graceful stop flushes the buffer: the rows are in Parquet before the erasure.
    server.restart_graceful();
    let lake = server.lake();
    assert_eq!(stored_rows_and_vectors(&lake), (40, vec![]));

    let (status, receipt) = post(
        &server.dpo(),
        &server.url("/api/v3/subjects/erase"),
        json!({"subject": "E-GONE"}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{receipt}");
    let marked = receipt["receipt"]["files_with_deletion_vectors"]
        .as_u64()
        .unwrap();
    assert!(marked >= 2, "the subject's rows span two days: {receipt}");
    // The files are unchanged; their deletion vectors hide the subject's 10 rows from
    // every query at once.
    let (stored, vectors) = stored_rows_and_vectors(&lake);
    assert_eq!(stored, 40, "no file was rewritten yet");
    assert_eq!(vectors.len() as u64, marked);
    for v in &vectors {
        assert!(v.contains("/_deletes/") && v.ends_with(".roaring"), "{v}");
        assert!(lake.join(v).is_file(), "{v} is in the lake");
    }
    assert_eq!(count(&server, "mes_event").await, 30);
    let per_machine = rows(
        &server,
        "plant",
        "SELECT machine, count(*) AS n FROM mes_event GROUP BY machine ORDER BY machine",
    )
    .await;
    let expected: Vec<i64> = (0..3)
        .map(|m| (0..40).filter(|i| i % 3 == m && i % 4 != 0).count() as i64)
        .collect();
    let got: Vec<i64> = per_machine
        .iter()
        .map(|r| r["n"].as_i64().unwrap())
        .collect();
    assert_eq!(got, expected);
    assert_eq!(export(&server, "E-STAYS").await.len(), 30);
    assert!(export(&server, "E-GONE").await.is_empty());
    // Marking again finds nothing new.
    let (_, again) = post(
        &server.dpo(),
        &server.url("/api/v3/subjects/erase"),
        json!({"subject": "E-GONE"}).to_string(),
    )
    .await;
    assert_eq!(again["receipt"]["files_with_deletion_vectors"], json!(0));
    // A restart keeps them hidden (the vectors are in the manifest).
    server.kill9();
    server.restart_with_env(&[]);
    assert_eq!(count(&server, "mes_event").await, 30);

    // With maintenance running, compaction rewrites the files without the rows, and the
    // vectors leave the manifest (and, after the grace period, the lake).
    server.set_config(&profile_config(""));
    server.restart_graceful();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (stored, vectors_now) = stored_rows_and_vectors(&lake);
        if stored == 30 && vectors_now.is_empty() && vectors.iter().all(|v| !lake.join(v).exists())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not rewritten: {stored} rows stored, vectors {vectors_now:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(count(&server, "mes_event").await, 30);
    assert_eq!(export(&server, "E-STAYS").await.len(), 30);
}

#[tokio::test]
async fn an_erasure_whose_client_gives_up_still_purges_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = profile_config("");
    let mut server = Server::start_with_keyring(&data, &config);
    let t0 = (now_ns() / DAY - 2) * DAY;
    write_all(&server, &[hourly_logins(t0, 20, "E-LEAVES")]).await;
    // In Parquet first; then the purge after the keys waits 1.5 s.
    server.restart_graceful();
    server.restart_with_env(&[("HISTORIAN_DELAY", "erase_purge:1500")]);
    assert_eq!(count(&server, "mes_event").await, 20);

    let impatient = common::authed(
        reqwest::Client::builder().timeout(Duration::from_millis(300)),
        &server.token_for("dpo", &[]),
    );
    let gave_up = impatient
        .post(server.url("/api/v3/subjects/erase"))
        .header("content-type", "application/json")
        .body(json!({"subject": "E-LEAVES"}).to_string())
        .send()
        .await;
    assert!(
        gave_up.as_ref().is_err_and(|e| e.is_timeout()),
        "the client gave up before the purge: {gave_up:?}"
    );

    // The erasure goes on without its client: the rows are hidden and the erasure is in the
    // audit log.
    let auditor = server.client_as(&server.token_for("auditor", &[]));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let remaining = count(&server, "mes_event").await;
        let answer = auditor
            .get(server.url("/api/v3/query_sql"))
            .query(&[
                ("db", "plant"),
                (
                    "q",
                    "SELECT outcome FROM audit_log WHERE kind = 'subject_erase'",
                ),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let audited: Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
        if remaining == 15 && audited.as_array().is_some_and(|a| !a.is_empty()) {
            assert_eq!(audited, json!([{"outcome": "ok"}]));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{remaining} rows left, audit records {audited}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(export(&server, "E-LEAVES").await.is_empty());
    assert_eq!(export(&server, "E-STAYS").await.len(), 15);
}

#[tokio::test(flavor = "multi_thread")]
async fn export_reads_only_the_files_whose_key_bitmaps_name_the_subject() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = profile_config("");
    let mut server = Server::start_with_keyring(&data, &config);
    let day = (now_ns() / DAY - 2) * DAY;
    // Anna works on the first day, Bert on the second: one file each.
    let body = format!(
        "mes_event,line=L1,event=login operator_id=\"E-ANNA\",operator_name=\"Anna\" {}\n\
         mes_event,line=L1,event=login operator_id=\"E-BERT\",operator_name=\"Bert\" {}\n",
        day + 3600 * SEC,
        day + DAY + 3600 * SEC
    );
    write_all(&server, &[body.into_bytes()]).await;
    server.restart_graceful();
    let lake = server.lake();
    let m = common::manifest(&lake, "plant", "mes_event");
    let files = m["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{m}");
    assert_eq!(export(&server, "E-ANNA").await.len(), 1);
    // Break Bert's day: a query that read it would fail. Anna's export does not read it.
    let second = files
        .iter()
        .find(|f| f["min_time"].as_i64().unwrap() >= day + DAY)
        .unwrap();
    std::fs::write(lake.join(second["path"].as_str().unwrap()), b"not parquet").unwrap();
    let anna = export(&server, "E-ANNA").await;
    assert_eq!(anna.len(), 1);
    assert_eq!(anna[0]["operator_name"], json!("Anna"));
    let (status, _) = post(
        &server.dpo(),
        &server.url("/api/v3/subjects/export"),
        json!({"subject": "E-BERT"}).to_string(),
    )
    .await;
    assert_ne!(status, 200, "Bert's export reads the broken file");
}

#[tokio::test(flavor = "multi_thread")]
async fn personal_ttl_hides_cells_at_once_and_destroys_expired_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = profile_config("").replace(
        "[tables.mes_event]\npartition = \"day\"",
        "[tables.mes_event]\npartition = \"day\"\nttl = \"3650d\"\npersonal_ttl = \"30d\"\nkey_period = \"day\"",
    );
    let mut server = Server::start_with_keyring(&data, &config);
    let now = now_ns();
    // The same person 60 days ago (a key period wholly past personal_ttl), just past
    // personal_ttl (in a key period that ends after the horizon, so its key lives), and an
    // hour ago.
    let at = [now - 60 * DAY, now - 30 * DAY - 10 * SEC, now - 3600 * SEC];
    let body: String = at
        .iter()
        .map(|t| {
            format!("mes_event,line=L1,event=login operator_id=\"E-TTL\",operator_name=\"Tess Tull\" {t}\n")
        })
        .collect();
    write_all(&server, &[body.into_bytes()]).await;
    assert_eq!(
        count(&server, "mes_event").await,
        3,
        "machine data stays until ttl"
    );

    // Once the expiry task ran, the oldest day's key is gone: its pseudonym links to no one.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status: Value = serde_json::from_str(&keys(&data, &["status"])).unwrap();
        if status["destroyed"]["personal_ttl"].as_u64() == Some(1) {
            break status;
        }
        assert!(Instant::now() < deadline, "no key expired: {status}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(status["keys"], json!(2), "{status}");
    let exported = export(&server, "E-TTL").await;
    let mut names: Vec<Value> = exported
        .iter()
        .map(|r| r["operator_name"].clone())
        .collect();
    names.sort_by_key(|v| v.to_string());
    // Just past personal_ttl: its key lives, but the cell is hidden at once.
    assert_eq!(names, vec![json!("Tess Tull"), Value::Null], "{exported:?}");

    // The inventory for the records of processing, through the CLI.
    let out = server
        .cli()
        .args(["subject", "inventory", "--url", &server.url("")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inventory: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mes = inventory["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "mes_event")
        .unwrap()
        .clone();
    assert_eq!(mes["retention"]["personal_ttl"], json!("30d"), "{mes}");
    assert_eq!(mes["retention"]["ttl"], json!("3650d"));
    assert_eq!(mes["subjects_with_live_keys"], json!(1));
    assert_eq!(
        mes["subjects"]["operator_id"],
        json!(["operator_name", "badge_id"])
    );
    assert!(
        mes["oldest_personal_data"].as_str().unwrap()
            < mes["newest_personal_data"].as_str().unwrap()
    );
    assert_eq!(inventory["keys_destroyed"]["personal_ttl"], json!(1));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("E-TTL"));
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn keyring_backup_restore_rotation_and_master_key_checks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = profile_config("");
    let mut server = Server::start_with_keyring(&data, &config);
    let config_path = data.join("historian.toml");
    let config_arg = config_path.to_str().unwrap();
    let now = now_ns();
    let body = format!(
        "mes_event,line=L1,event=login operator_id=\"E-A\",operator_name=\"Ann A\" {now}\n\
         mes_event,line=L1,event=login operator_id=\"E-B\",operator_name=\"Bob B\" {}\n",
        now + 1
    );
    write_all(&server, &[body.into_bytes()]).await;
    // Acknowledged = the row in the WAL and its key in the keyring: a crash right after
    // the answer loses neither.
    server.kill9();
    server.restart_with_env(&[]);
    let bob = export(&server, "E-B").await;
    assert_eq!(bob.len(), 1);
    assert_eq!(bob[0]["operator_name"], json!("Bob B"));
    let backup = dir.path().join("keyring.backup");
    keys(&data, &["backup", backup.to_str().unwrap()]);
    let (status, _) = post(
        &server.dpo(),
        &server.url("/api/v3/subjects/erase"),
        json!({"subject": "E-A"}).to_string(),
    )
    .await;
    assert_eq!(status, 200);
    server.stop();

    // Restoring the backup from before the erasure does not bring Ann back.
    keys(&data, &["restore", backup.to_str().unwrap()]);
    // Rotation re-seals the keyring; the old key no longer opens it.
    let old_key = std::fs::read_to_string(data.join("master.key")).unwrap();
    keys(&data, &["rotate"]);
    assert_ne!(
        std::fs::read_to_string(data.join("master.key")).unwrap(),
        old_key
    );
    let printed = keys(&data, &["status"]);
    let status: Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(status["destroyed"]["erasure"], json!(1), "{status}");
    assert!(!printed.contains("E-B"));

    server.restart_graceful();
    assert!(export(&server, "E-A").await.is_empty());
    let bob = export(&server, "E-B").await;
    assert_eq!(bob.len(), 1);
    assert_eq!(bob[0]["operator_name"], json!("Bob B"));
    server.stop();

    // A wrong or missing master key stops the server at start with a clear message.
    let serve = |env: &[(&str, &str)]| {
        historian(
            &[
                "serve",
                "--config",
                config_arg,
                "--http-bind",
                "127.0.0.1:0",
            ],
            &data,
            env,
        )
    };
    let out = serve(&[("HISTORIAN_MASTER_KEY", old_key.trim())]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("master key does not open the keyring"),
        "{err}"
    );
    std::fs::rename(data.join("master.key"), dir.path().join("elsewhere.key")).unwrap();
    let out = serve(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("master key") && err.contains("keys init"),
        "{err}"
    );
}
