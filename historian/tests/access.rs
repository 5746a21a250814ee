//! Access control end to end, against the real binary: tokens, roles, row and column
//! policies under adversarial SQL, the audit trail and its verification, TLS.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{Value, json};

/// A server with the keyring initialised, machine data on lines L1 and L2 (the hidden L2
/// rows have `count = 0`, so `1/count` fails on them) and MES events, all flushed to Parquet.
fn start(dir: &Path) -> Server {
    start_with(dir, common::policy::CONFIG)
}

fn start_with(dir: &Path, config: &str) -> Server {
    let data = dir.join("data");
    Server::start_with_keyring(&data, config)
}

/// Runs `sql` as `client`: the status and the JSON rows (or the error body).
async fn sql(server: &Server, client: &reqwest::Client, sql: &str) -> (u16, Value) {
    let resp = client
        .get(server.url("/api/v3/query_sql"))
        .query(&[("db", "plant"), ("q", sql), ("format", "json")])
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The rows of a query that must succeed.
async fn ok(server: &Server, client: &reqwest::Client, q: &str) -> Vec<Value> {
    let (status, body) = sql(server, client, q).await;
    assert_eq!(status, 200, "{q}: {body}");
    body.as_array().unwrap().clone()
}

/// The single value of a one-row, one-column query.
async fn scalar(server: &Server, client: &reqwest::Client, q: &str) -> Value {
    let rows = ok(server, client, q).await;
    assert_eq!(rows.len(), 1, "{q}: {rows:?}");
    rows[0]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone()
}

/// The error message of a query that must fail with a 4xx.
async fn refused(server: &Server, client: &reqwest::Client, q: &str) -> String {
    let (status, body) = sql(server, client, q).await;
    assert!(
        (400..500).contains(&status),
        "{q} must fail: {status} {body}"
    );
    body["error"].as_str().unwrap_or_default().to_string()
}

fn strings(rows: &[Value], column: &str) -> Vec<String> {
    let mut v: Vec<String> = rows
        .iter()
        .map(|r| match &r[column] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn row_and_column_policies_hold_under_adversarial_sql() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    common::policy::load(&server).await;
    let admin = server.client();
    let s = &server;
    let l1 = server.client_as(&server.token_for("supervisor", &["lines=L1"]));
    let l2 = server.client_as(&server.token_for("supervisor", &["lines=L2"]));

    // Admin: every row, personal columns masked, pseudonyms shown.
    assert_eq!(
        scalar(s, &admin, "SELECT count(*) FROM machine").await,
        json!(4)
    );
    let events = ok(
        s,
        &admin,
        "SELECT operator_id, operator_name, badge_id FROM mes_event",
    )
    .await;
    assert!(
        events
            .iter()
            .all(|r| r["operator_name"].is_null() && r["badge_id"].is_null())
    );
    assert!(
        events
            .iter()
            .all(|r| r["operator_id"].as_str().unwrap().starts_with("ps-"))
    );

    // Two supervisors with the same role see their own line only.
    assert_eq!(
        strings(&ok(s, &l1, "SELECT line FROM machine").await, "line"),
        ["L1", "L1"]
    );
    assert_eq!(
        strings(&ok(s, &l2, "SELECT line FROM machine").await, "line"),
        ["L2", "L2"]
    );
    // A list attribute with several values.
    let both = server.client_as(&server.token_for("supervisor", &["lines=L1,L2"]));
    assert_eq!(
        scalar(s, &both, "SELECT count(*) FROM machine").await,
        json!(4)
    );

    for (q, want) in common::policy::adversarial() {
        assert_eq!(scalar(s, &l1, q).await, want, "{q}");
    }
    // A denied column does not exist for the role.
    let err = refused(s, &l1, "SELECT badge_id FROM mes_event").await;
    assert!(err.contains("badge_id"), "{err}");
    assert!(
        !ok(s, &l1, "SELECT * FROM mes_event").await[0]
            .as_object()
            .unwrap()
            .contains_key("badge_id")
    );
    // The stored ciphertext and tables outside the role are not reachable.
    refused(s, &l1, "SELECT operator_id__enc FROM mes_event").await;

    // EXPLAIN shows the caller's view, no policy internals.
    for q in [
        "EXPLAIN SELECT * FROM machine WHERE time > now() - INTERVAL '1 day'",
        "EXPLAIN ANALYZE SELECT count(*) FROM machine",
        "EXPLAIN VERBOSE SELECT count(*) FROM machine",
    ] {
        let text = ok(s, &l1, q)
            .await
            .iter()
            .map(|r| r["plan"].to_string())
            .collect::<String>();
        assert!(text.contains("SecuredScan"), "{q}: {text}");
        for secret in ["L1", "$lines", "line IN", ".parquet", "lines"] {
            assert!(!text.contains(secret), "{q} shows {secret}: {text}");
        }
    }

    // File-reading functions, DDL, DML, COPY and SET stay refused.
    for q in [
        "SELECT * FROM read_parquet('/etc/passwd')",
        "SELECT * FROM '/etc/passwd'",
        "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
        "CREATE TABLE x AS SELECT * FROM machine",
        "INSERT INTO machine VALUES ('L2', 'm9', now(), 1.0, 1)",
        "DELETE FROM machine",
        "DROP TABLE machine",
        "COPY machine TO '/tmp/x.csv'",
        "SET datafusion.execution.target_partitions = 1",
        "CREATE VIEW v AS SELECT * FROM machine",
    ] {
        refused(s, &l1, q).await;
    }

    // The quality role decrypts, but only its rows; its reads are audited.
    let quality = server.client_as(&server.token_for("quality", &[]));
    let rows = ok(
        s,
        &quality,
        "SELECT operator_id, operator_name, line FROM mes_event",
    )
    .await;
    assert_eq!(strings(&rows, "operator_name"), ["Ann Arbor", "Bob Berg"]);
    assert_eq!(strings(&rows, "operator_id"), ["E1", "E2"]);
    refused(s, &quality, "SELECT * FROM machine").await;
    assert_eq!(
        scalar(
            s,
            &quality,
            "SELECT count(*) FROM mes_event WHERE operator_name = 'Ann Arbor'"
        )
        .await,
        json!(1)
    );

    // A policy over a field: the lastpoint fast path falls back to every visible row.
    let hot = server.client_as(&server.token_for("hot", &[]));
    let latest = ok(
        s,
        &hot,
        "SELECT DISTINCT ON (machine) machine, temperature FROM machine ORDER BY machine, time DESC",
    )
    .await;
    assert_eq!(strings(&latest, "machine"), ["m3", "m4"]);

    // A token whose role needs an attribute it lacks is refused, never widened.
    let bare = server.client_as(&server.token_for("supervisor", &[]));
    let err = refused(s, &bare, "SELECT count(*) FROM machine").await;
    assert!(err.contains("attribute"), "{err}");

    // The auditor reads the audit log and nothing else; the writer reads nothing.
    let auditor = server.client_as(&server.token_for("auditor", &[]));
    refused(s, &auditor, "SELECT * FROM machine").await;
    let (status, _) = sql(
        s,
        &server.client_as(&server.token_for("writer", &[])),
        "SELECT 1",
    )
    .await;
    assert_eq!(status, 403);
    let deadline = Instant::now() + Duration::from_secs(10);
    let decrypting = loop {
        let rows = ok(
            s,
            &auditor,
            "SELECT role, sql, tables, columns, rows, outcome FROM audit_log \
             WHERE kind = 'query' AND personal_decrypted ORDER BY seq",
        )
        .await;
        if rows.len() >= 2 || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        decrypting.iter().all(|r| r["role"] == "quality"),
        "{decrypting:?}"
    );
    // Literals that could name a person are sealed, not stored in the SQL.
    let all = ok(
        s,
        &auditor,
        "SELECT sql FROM audit_log WHERE sql IS NOT NULL",
    )
    .await;
    assert!(
        all.iter()
            .all(|r| !r["sql"].as_str().unwrap().contains("Ann Arbor"))
    );
    assert!(
        all.iter()
            .any(|r| r["sql"].as_str().unwrap().contains("operator_name = $1"))
    );
    // A role that decrypts has each query on record before its rows are served.
    let started = scalar(
        s,
        &auditor,
        "SELECT count(*) FROM audit_log WHERE kind = 'query_start' AND role = 'quality'",
    )
    .await;
    assert_eq!(started, json!(2), "one per query that ran");
    let other_starts = scalar(
        s,
        &auditor,
        "SELECT count(*) FROM audit_log WHERE kind = 'query_start' AND role <> 'quality'",
    )
    .await;
    assert_eq!(other_starts, json!(0));
    // Each token's first use from an address is a login.
    let logins = ok(
        s,
        &auditor,
        "SELECT role, count(*) AS n FROM audit_log WHERE kind = 'login' GROUP BY role ORDER BY role",
    )
    .await;
    let roles = strings(&logins, "role");
    for role in ["admin", "auditor", "quality", "supervisor"] {
        assert!(roles.contains(&role.to_string()), "{logins:?}");
    }
    let refusals = scalar(
        s,
        &auditor,
        "SELECT count(*) FROM audit_log WHERE kind = 'query' AND outcome LIKE 'error%' AND role = 'supervisor'",
    )
    .await;
    assert!(refusals.as_i64().unwrap() >= 10, "{refusals}");

    // The subject export names who read the person's data.
    let (status, export) = common::post(
        &server.dpo(),
        &server.url("/api/v3/subjects/export"),
        json!({"subject": "E1"}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{export}");
    let access = export["access"].as_array().unwrap();
    assert!(
        access
            .iter()
            .any(|a| a["role"] == "quality" && a["kind"] == "query"),
        "{access:?}"
    );
    assert!(
        access.iter().all(|a| a["role"] != "supervisor"),
        "{access:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_checked_revoked_expired_and_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    common::policy::load(&server).await;
    let s = &server;
    let url = server.url("/api/v3/query_sql?db=plant&q=SELECT%201");
    let status = |r: reqwest::Response| r.status().as_u16();

    // The admin token file is private; the store holds no secret.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(server.data_dir.join("admin-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let store = std::fs::read_to_string(server.data_dir.join("auth/tokens.json")).unwrap();
    // The secret is all after `hst_<id>_`; base64url may itself hold `_`.
    assert!(!store.contains(server.token.splitn(3, '_').nth(2).unwrap()));

    let anonymous = reqwest::Client::new();
    assert_eq!(status(anonymous.get(&url).send().await.unwrap()), 401);
    let wrong = format!("{}x", server.token);
    assert_eq!(
        status(server.client_as(&wrong).get(&url).send().await.unwrap()),
        401
    );
    // InfluxDB's `Token` scheme and v1's Basic auth carry tokens too.
    let r = anonymous
        .get(&url)
        .header("Authorization", format!("Token {}", server.token))
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 200);
    let r = anonymous
        .post(server.url("/write?db=plant"))
        .basic_auth("telegraf", Some(&server.token))
        .body("machine,line=L1 temperature=1 1")
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 204);

    // Create by API, revoke by CLI.
    let admin = server.client();
    let (st, created) = common::post(
        &admin,
        &server.url("/api/v3/tokens"),
        json!({"name": "line 1 collector", "role": "collector"}).to_string(),
    )
    .await;
    assert_eq!(st, 201, "{created}");
    let collector = server.client_as(created["token"].as_str().unwrap());
    let write = |c: &reqwest::Client, table: &str| {
        c.post(server.url("/api/v3/write_lp?db=plant"))
            .body(format!("{table},line=L1 temperature=2 2"))
            .send()
    };
    assert_eq!(status(write(&collector, "machine").await.unwrap()), 204);
    // A role's write grant is per table; a writer-only token cannot read.
    let r = write(&collector, "mes_event").await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("may not write"));
    refused(s, &collector, "SELECT * FROM machine").await;
    let writer = server.client_as(&server.token_for("writer", &[]));
    assert_eq!(status(write(&writer, "machine").await.unwrap()), 204);
    assert_eq!(status(writer.get(&url).send().await.unwrap()), 403);
    let out = server
        .cli()
        .args(["token", "revoke", created["id"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(status(write(&collector, "machine").await.unwrap()), 401);
    let listed = server.cli().args(["token", "list"]).output().unwrap();
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert!(
        listed.contains("line 1 collector") && !listed.contains("hash"),
        "{listed}"
    );

    // Expiry (whole seconds: 2 s, so that the first use cannot fall past it).
    let (_, short) = common::post(
        &admin,
        &server.url("/api/v3/tokens"),
        json!({"name": "short", "role": "writer", "expires_in": "2s"}).to_string(),
    )
    .await;
    let short = server.client_as(short["token"].as_str().unwrap());
    assert_eq!(status(write(&short, "machine").await.unwrap()), 204);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(status(write(&short, "machine").await.unwrap()), 401);

    // Admin administers but cannot grant clear: not a dpo token, not a clear role.
    for role in ["dpo", "quality"] {
        let (st, body) = common::post(
            &admin,
            &server.url("/api/v3/tokens"),
            json!({"name": "x", "role": role}).to_string(),
        )
        .await;
        assert_eq!(st, 403, "admin granted {role}: {body}");
    }
    let clear_role =
        json!({"tables": {"mes_event": {"read": true, "columns": {"operator_name": "clear"}}}});
    let put = |c: &reqwest::Client, name: &str, def: &Value| {
        c.put(server.url(&format!("/api/v3/roles/{name}")))
            .body(def.to_string())
            .send()
    };
    assert_eq!(status(put(&admin, "hr", &clear_role).await.unwrap()), 403);
    let dpo = server.dpo();
    assert_eq!(status(put(&dpo, "hr", &clear_role).await.unwrap()), 204);
    // Nor can admin widen the role the dpo made, or delete it.
    let widened = json!({"tables": {"*": {"read": true, "columns": {"operator_name": "clear"}}}});
    assert_eq!(status(put(&admin, "hr", &widened).await.unwrap()), 403);
    let masked = json!({"tables": {"mes_event": {"read": true}}});
    assert_eq!(status(put(&admin, "viewer", &masked).await.unwrap()), 204);
    // A token the admin issued stops working if the dpo later gives its role `clear`.
    let (st, viewer) = common::post(
        &admin,
        &server.url("/api/v3/tokens"),
        json!({"name": "viewer", "role": "viewer"}).to_string(),
    )
    .await;
    assert_eq!(st, 201, "{viewer}");
    let viewer = server.client_as(viewer["token"].as_str().unwrap());
    assert_eq!(status(viewer.get(&url).send().await.unwrap()), 200);
    assert_eq!(status(put(&dpo, "viewer", &clear_role).await.unwrap()), 204);
    assert_eq!(status(viewer.get(&url).send().await.unwrap()), 401);
    assert_eq!(
        status(put(&admin, "supervisor", &masked).await.unwrap()),
        409
    );
    let (st, _) = common::post(
        &dpo,
        &server.url("/api/v3/tokens"),
        json!({"name": "hr", "role": "hr"}).to_string(),
    )
    .await;
    assert_eq!(st, 201);
    // Subject requests are the dpo's.
    let (st, _) = common::post(
        &admin,
        &server.url("/api/v3/subjects/export"),
        json!({"subject": "E1"}).to_string(),
    )
    .await;
    assert_eq!(st, 403);

    // Failed attempts are limited per address, then audited.
    let mut last = 0;
    for _ in 0..12 {
        last = status(
            server
                .client_as("hst_0_bad")
                .get(&url)
                .send()
                .await
                .unwrap(),
        );
    }
    assert_eq!(last, 429);
    assert_eq!(status(admin.get(&url).send().await.unwrap()), 429);
    let _ = s;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_chain_detects_every_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        common::policy::CONFIG.replace("ship_interval = \"500ms\"", "ship_interval = \"1s\"");
    let mut server = start_with(dir.path(), &config);
    common::policy::load(&server).await;
    let admin = server.client();
    // Several segments of several records: bursts of queries, shipped in between.
    for burst in 0..3 {
        for i in 0..5 {
            let q = format!(
                "SELECT count(*) FROM machine WHERE count > {}",
                burst * 5 + i
            );
            ok(&server, &admin, &q).await;
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    server.stop();
    let data = server.data_dir.clone();
    let verify = || {
        Command::new(env!("CARGO_BIN_EXE_historian"))
            .args(["audit", "verify", "--config"])
            .arg(data.join("historian.toml"))
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap()
    };
    let out = verify();
    assert!(out.status.success(), "{out:?}");
    let audit = data.join("lake/audit");
    let mut segments: Vec<_> = std::fs::read_dir(&audit)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    assert!(segments.len() >= 3, "{segments:?}");
    let original: Vec<(std::path::PathBuf, String)> = segments
        .iter()
        .map(|p| (p.clone(), std::fs::read_to_string(p).unwrap()))
        .collect();
    let restore = || {
        for p in std::fs::read_dir(&audit).unwrap() {
            std::fs::remove_file(p.unwrap().path()).unwrap();
        }
        for (p, text) in &original {
            std::fs::write(p, text).unwrap();
        }
    };
    let biggest = original
        .iter()
        .max_by_key(|(_, t)| t.lines().count())
        .unwrap()
        .clone();
    assert!(biggest.1.lines().count() >= 3, "{biggest:?}");
    let lines: Vec<&str> = biggest.1.lines().collect();
    let rewrite = |new_lines: Vec<String>| {
        let mut text = new_lines.join("\n");
        text.push('\n');
        std::fs::write(&biggest.0, text).unwrap();
    };
    let failed = |what: &str, expect: &str| {
        let out = verify();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} went unnoticed: {text}");
        assert!(text.contains(expect), "{what}: {text}");
    };

    // One byte changed.
    let mut changed: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    changed[1] = changed[1].replacen("\"rows\":", "\"rows\":9", 1);
    assert_ne!(changed[1], lines[1]);
    rewrite(changed);
    failed("a changed byte", "fails its mac");
    restore();

    // One record dropped.
    let mut dropped: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    dropped.remove(1);
    rewrite(dropped);
    failed("a dropped record", "expected");
    restore();

    // Two records swapped.
    let mut swapped: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    swapped.swap(0, 1);
    rewrite(swapped);
    failed("swapped records", "fails its mac");
    restore();

    // The tail cut: the last segment removed.
    std::fs::remove_file(&original.last().unwrap().0).unwrap();
    failed("a cut tail", "truncated");
    restore();

    // The whole chain rebuilt with another key (the attacker does not have ours).
    let script = r#"
import hmac, hashlib, os, sys
prev = bytes(32)
key = os.urandom(32)
for path in sorted(sys.argv[1:]):
    out = []
    for line in open(path).read().splitlines():
        at = line.rfind(',"mac":"')
        body = line[:at] + "}"
        mac = hmac.new(key, prev + body.encode(), hashlib.sha256).digest()
        out.append(line[:at] + ',"mac":"' + mac.hex() + '"}')
        prev = mac
    open(path, "w").write("\n".join(out) + "\n")
"#;
    let args: Vec<&str> = original.iter().map(|(p, _)| p.to_str().unwrap()).collect();
    common::run_python(script, &args);
    failed("a rebuilt chain", "fails its mac");
    restore();
    let out = verify();
    assert!(out.status.success(), "restored: {out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_https_only_and_a_bad_certificate_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let config = format!(
        "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let server = Server::start(&dir.path().join("data"), &config);
    let curl = |extra: &[&str], url: String| {
        Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
            ])
            .args(extra)
            .arg(url)
            .output()
            .unwrap()
    };
    let auth = format!("Authorization: Bearer {}", server.token);
    let https = format!("https://{}/api/v3/query_sql?db=x&q=SELECT%201", server.addr);
    let out = curl(
        &["--cacert", cert.to_str().unwrap(), "-H", &auth],
        https.clone(),
    );
    // 404: the database does not exist, but TLS and the token passed.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404", "{out:?}");
    let out = curl(&["-H", &auth], https.replace("https://", "http://"));
    assert_ne!(
        String::from_utf8_lossy(&out.stdout),
        "404",
        "plaintext was served"
    );
    drop(server);

    // A certificate that does not load stops the server; it never falls back to plaintext.
    std::fs::write(&cert, "not a certificate").unwrap();
    let data = dir.path().join("data2");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("historian.toml"), &config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_historian"))
        .args(["serve", "--http-bind", "127.0.0.1:0", "--config"])
        .arg(data.join("historian.toml"))
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS certificate"), "{err}");

    // --without-auth only on loopback.
    let out = Command::new(env!("CARGO_BIN_EXE_historian"))
        .args([
            "serve",
            "--without-auth",
            "--http-bind",
            "0.0.0.0:0",
            "--data-dir",
        ])
        .arg(dir.path().join("data3"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}
