//! Dashboards and BI end to end, against the real binary: the PostgreSQL wire protocol
//! with psql, psycopg (simple and extended protocol) and Go's pgx, Grafana's catalog and
//! time-series queries replayed, Arrow Flight SQL with ADBC and pyarrow; each as two roles,
//! to show that the policies hold on every interface.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use common::Server;
use serde_json::Value;

const CONFIG: &str = r#"
[server]
pg_bind = "127.0.0.1:0"

[persist]
flush_age = "300ms"
interval = "100ms"

[audit]
ship_interval = "500ms"

[tables.mes_event]
columns = ["line", "event", "qty"]
[tables.mes_event.subjects]
operator_id = ["operator_name", "badge_id"]

[roles.supervisor.tables.mes_event]
read = true
rows = "line IN ($lines)"
columns = { operator_name = "mask", badge_id = "deny" }
[roles.supervisor.tables.machine]
read = true
rows = "line IN ($lines)"

[roles.machine_reader.tables.machine]
read = true
"#;

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// Start of the machine data, on a 5-minute boundary: 10 one-minute samples per machine.
fn base_ns() -> i64 {
    let five_minutes = 300_000_000_000;
    (now_ns() - 3_600_000_000_000) / five_minutes * five_minutes
}

fn start(dir: &Path, config: &str) -> Server {
    let data = dir.join("data");
    Server::start_with_keyring(&data, config)
}

async fn load(server: &Server) -> i64 {
    let base = base_ns();
    let mut body = String::new();
    for i in 0..10i64 {
        let t = base + i * 60_000_000_000;
        body.push_str(&format!(
            "machine,line=L1,machine=m1 temperature={},count={}i,running=true {t}\n",
            60.0 + i as f64,
            i
        ));
        body.push_str(&format!(
            "machine,line=L2,machine=m3 temperature={},count=0i,running=false {t}\n",
            90.0 + i as f64
        ));
    }
    body.push_str(&format!(
        "mes_event,line=L1,event=start operator_id=\"E1\",operator_name=\"Ann Arbor\",badge_id=\"B1\",qty=1i {base}\n\
         mes_event,line=L2,event=start operator_id=\"E2\",operator_name=\"Bob Berg\",badge_id=\"B2\",qty=3i {base}\n"
    ));
    let r = server
        .client()
        .post(server.url("/api/v3/write_lp?db=plant"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    base
}

/// The rows of `sql` over the audit log, as an auditor reads them over HTTP.
async fn audit_rows(server: &Server, sql: &str) -> Vec<Value> {
    let auditor = server.client_as(&server.token_for("auditor", &[]));
    let r = auditor
        .get(server.url("/api/v3/query_sql"))
        .query(&[("db", "_"), ("q", sql)])
        .send()
        .await
        .unwrap();
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

fn pg_port(server: &Server) -> String {
    server
        .pg_addr
        .as_ref()
        .expect("the server listens for PostgreSQL")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string()
}

fn dsn(server: &Server, token: &str) -> String {
    format!(
        "host=127.0.0.1 port={} dbname=plant user=grafana password={token} sslmode=disable",
        pg_port(server)
    )
}

/// Runs psql with `args`; returns (success, stdout, stderr).
fn psql(server: &Server, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("psql")
        .arg(dsn(server, token))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .output()
        .expect("psql is installed (.ci/run installs postgresql-client)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a psycopg script with `DSN` and `TOKEN` in its globals; returns its JSON output.
fn psycopg(server: &Server, token: &str, script: &str) -> Value {
    let program = format!(
        "import json, sys, psycopg\nDSN = sys.argv[1]\nout = {{}}\n{script}\nprint(json.dumps(out, default=str))\n"
    );
    let stdout = common::run_python(&program, &[&dsn(server, token)]);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_sees_each_role_its_own_tables_rows_and_columns() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), CONFIG);
    load(&server).await;
    let admin = server.token.clone();
    let l1 = server.token_for("supervisor", &["lines=L1"]);

    let (ok, out, err) = psql(
        &server,
        &admin,
        &[
            "-c",
            "SELECT line, count(*) FROM machine GROUP BY line ORDER BY line",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "L1|10\nL2|10");
    let (ok, out, err) = psql(
        &server,
        &l1,
        &[
            "-c",
            "SELECT line, count(*) FROM machine GROUP BY line ORDER BY line",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "L1|10", "the row policy holds over pgwire");

    // FETCH_COUNT: psql reads through a cursor, a few rows at a time.
    for (token, expected) in [(&admin, 20), (&l1, 10)] {
        let (ok, out, err) = psql(
            &server,
            token,
            &[
                "-v",
                "FETCH_COUNT=3",
                "-c",
                "SELECT line, temperature FROM machine ORDER BY time, line",
            ],
        );
        assert!(ok, "{err}");
        assert_eq!(out.lines().count(), expected, "{out}");
    }

    // \dt lists what the role may read; \d describes a table's columns with PG types.
    let (ok, out, err) = psql(&server, &admin, &["-c", "\\dt"]);
    assert!(ok, "{err}");
    assert!(out.contains("public|machine|table|"), "{out}");
    assert!(out.contains("public|mes_event|table|"), "{out}");
    let (ok, out, err) = psql(&server, &l1, &["-c", "\\d machine"]);
    assert!(ok, "{err}");
    assert!(out.contains("time|timestamp without time zone"), "{out}");
    assert!(out.contains("temperature|double precision"), "{out}");
    assert!(out.contains("count|bigint"), "{out}");
    assert!(out.contains("running|boolean"), "{out}");

    // The supervisor's view of mes_event: badge_id denied, operator_name masked.
    let (ok, out, err) = psql(&server, &l1, &["-c", "\\d mes_event"]);
    assert!(ok, "{err}");
    assert!(
        !out.contains("badge_id"),
        "a denied column is not in the catalog: {out}"
    );
    let (ok, _, err) = psql(&server, &l1, &["-c", "SELECT badge_id FROM mes_event"]);
    assert!(!ok);
    assert!(err.contains("badge_id"), "{err}");
    let (ok, out, err) = psql(&server, &l1, &["-c", "SELECT operator_name FROM mes_event"]);
    assert!(ok, "{err}");
    assert!(!out.contains("Ann") && !out.contains("Bob"), "{out}");

    // Writes and DDL are refused by the sandbox, also over pgwire.
    let (ok, _, err) = psql(&server, &admin, &["-c", "DROP TABLE machine"]);
    assert!(!ok);
    assert!(err.contains("only queries may run"), "{err}");

    // The writer role writes only: no queries over pgwire either.
    let writer = server.token_for("writer", &[]);
    let (ok, _, err) = psql(&server, &writer, &["-c", "SELECT 1"]);
    assert!(!ok);
    assert!(err.contains("the writer role may not query"), "{err}");

    // A wrong password is refused with PostgreSQL's code for it.
    let (ok, _, err) = psql(&server, "hst_0000000000000000_nope", &["-c", "SELECT 1"]);
    assert!(!ok);
    assert!(err.contains("password authentication failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn psycopg_types_parameters_prepared_statements_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), CONFIG);
    let base = load(&server).await;
    let admin = server.token.clone();
    let l1 = server.token_for("supervisor", &["lines=L1"]);

    let script = r#"
with psycopg.connect(DSN, autocommit=True) as conn:
    cur = conn.cursor()
    # Extended protocol with server-side parameters (psycopg's default).
    cur.execute("SELECT time, line, temperature, count, running FROM machine WHERE line = %s AND temperature >= %s ORDER BY time LIMIT 3", ("L1", 61.5))
    out["oids"] = [d.type_code for d in cur.description]
    rows = cur.fetchall()
    out["rows"] = [[r[0].isoformat(), r[1], r[2], r[3], r[4]] for r in rows]
    out["tz_oid"] = conn.execute("""SELECT arrow_cast(now(), 'Timestamp(Nanosecond, Some("UTC"))') AS t""").description[0].type_code
    # The simple protocol, as Grafana's driver speaks it.
    with psycopg.ClientCursor(conn) as c:
        c.execute("SELECT count(*) FROM machine WHERE line = %s", ("L2",))
        out["simple_l2"] = c.fetchone()[0]
    # A named prepared statement, executed twice with different parameters.
    cur.execute("SELECT count(*) FROM machine WHERE count >= %s", (5,), prepare=True)
    out["prepared_a"] = cur.fetchone()[0]
    cur.execute("SELECT count(*) FROM machine WHERE count >= %s", (8,), prepare=True)
    out["prepared_b"] = cur.fetchone()[0]
    # Injection through a parameter stays a value.
    cur.execute("SELECT count(*) FROM machine WHERE line = %s", ("L1' OR '1'='1",))
    out["injection"] = cur.fetchone()[0]
    out["version"] = conn.execute("SELECT version()").fetchone()[0]
# A named (server-side) cursor: DECLARE, FETCH in pieces, CLOSE.
with psycopg.connect(DSN) as tx:
    with tx.cursor(name="pieces") as c:
        c.execute("SELECT count FROM machine WHERE line = %s ORDER BY time", ("L1",))
        first = c.fetchmany(3)
        rest = c.fetchall()
        out["cursor"] = [r[0] for r in first] + [r[0] for r in rest]
# A cursor ends with its transaction: after ROLLBACK its name is free again.
with psycopg.connect(DSN, autocommit=True) as c:
    c.execute("BEGIN")
    c.execute("DECLARE again CURSOR FOR SELECT 1")
    c.execute("ROLLBACK")
    c.execute("DECLARE again CURSOR FOR SELECT 2 AS two")
    out["redeclared"] = c.execute("FETCH ALL FROM again").fetchall()[0][0]
with psycopg.connect(DSN, autocommit=True) as conn:
    out["server_version"] = conn.info.server_version
    # Cancellation: a long query stops with query_canceled.
    import threading, time
    t = threading.Timer(0.5, conn.cancel)
    t.start()
    started = time.time()
    try:
        # A column of the streamed side is summed: a count(*) of rows the buffer holds as
        # they are comes from statistics without running the join, and columns of the
        # collected sides would hit the memory limit before the cancel.
        conn.execute("SELECT sum(g.count) FROM machine a, machine b, machine c, machine d, machine e, machine f, machine g")
        out["cancel"] = "not cancelled"
    except psycopg.errors.QueryCanceled as e:
        out["cancel"] = "cancelled"
    out["cancel_s"] = time.time() - started
    # The connection works after the cancel.
    out["after_cancel"] = conn.execute("SELECT 1").fetchone()[0]
"#;
    let admin_out = psycopg(&server, &admin, script);
    // timestamp, text, float8, int8, bool
    assert_eq!(
        admin_out["oids"],
        serde_json::json!([1114, 25, 701, 20, 16])
    );
    assert_eq!(
        admin_out["tz_oid"], 1184,
        "a timestamp with a zone is a timestamptz"
    );
    let first = admin_out["rows"][0].as_array().unwrap();
    assert_eq!(first[1], "L1");
    assert_eq!(first[2], 62.0);
    assert_eq!(first[3], 2);
    assert_eq!(first[4], true);
    let expected_time = chrono::DateTime::from_timestamp_nanos(base + 2 * 60_000_000_000)
        .naive_utc()
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    assert_eq!(first[0], expected_time.as_str());
    assert_eq!(admin_out["simple_l2"], 10);
    assert_eq!(admin_out["prepared_a"], 5);
    assert_eq!(admin_out["prepared_b"], 2);
    assert_eq!(admin_out["injection"], 0);
    assert!(
        admin_out["version"]
            .as_str()
            .unwrap()
            .starts_with("PostgreSQL 16")
    );
    assert_eq!(admin_out["server_version"], 160006);
    assert_eq!(
        admin_out["cursor"],
        serde_json::json!([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    );
    assert_eq!(admin_out["cancel"], "cancelled");
    assert!(admin_out["cancel_s"].as_f64().unwrap() < 10.0);
    assert_eq!(admin_out["after_cancel"], 1);

    // The same statements as the L1 supervisor: the policy holds in both protocols.
    let script = r#"
with psycopg.connect(DSN, autocommit=True) as conn:
    out["extended_l2"] = conn.execute("SELECT count(*) FROM machine WHERE line = %s", ("L2",)).fetchone()[0]
    with psycopg.ClientCursor(conn) as c:
        c.execute("SELECT count(*) FROM machine WHERE line <> %s", ("nope",))
        out["simple_all"] = c.fetchone()[0]
    try:
        conn.execute("SELECT badge_id FROM mes_event WHERE line = %s", ("L1",))
        out["denied"] = "served"
    except psycopg.Error as e:
        out["denied"] = e.sqlstate
"#;
    let l1_out = psycopg(&server, &l1, script);
    assert_eq!(l1_out["extended_l2"], 0);
    assert_eq!(l1_out["simple_all"], 10);
    assert_eq!(l1_out["denied"], "42000");

    // A prepared statement is checked again when it runs: revoke the token between
    // prepare and execute, and the execution is refused.
    let revocable = server.token_for("supervisor", &["lines=L1"]);
    let id = revocable.split('_').nth(1).unwrap().to_string();
    let script = format!(
        r#"
import subprocess
with psycopg.connect(DSN, autocommit=True) as conn:
    cur = conn.cursor()
    cur.execute("SELECT count(*) FROM machine WHERE count >= %s", (1,), prepare=True)
    out["before"] = cur.fetchone()[0]
    subprocess.run([{bin:?}, "token", "revoke", {id:?}, "--data-dir", {data:?}], check=True, capture_output=True)
    try:
        cur.execute("SELECT count(*) FROM machine WHERE count >= %s", (1,), prepare=True)
        out["after"] = cur.fetchone()[0]
    except psycopg.Error as e:
        out["after"] = e.sqlstate
"#,
        bin = env!("CARGO_BIN_EXE_historian"),
        data = server.data_dir.display().to_string(),
    );
    let out = psycopg(&server, &revocable, &script);
    assert_eq!(out["before"], 9);
    assert_eq!(out["after"], "28P01", "{out}");

    // Every statement is in the audit log, as pgwire.
    let audit = audit_rows(
        &server,
        "SELECT role, sql FROM audit_log WHERE kind = 'query' AND interface = 'pgwire'",
    )
    .await;
    assert!(
        audit
            .iter()
            .any(|r| r["role"] == "supervisor" && r["sql"].as_str().unwrap().contains("badge_id")),
        "{audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grafana_catalog_and_time_series_queries_answer_sensibly() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), CONFIG);
    let base = load(&server).await;
    let l1 = server.token_for("supervisor", &["lines=L1"]);
    let from = chrono::DateTime::from_timestamp_nanos(base)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let to = chrono::DateTime::from_timestamp_nanos(base + 10 * 60_000_000_000)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    // Written down from Grafana's PostgreSQL data source
    // (public/app/plugins/datasource/grafana-postgresql-datasource/postgresMetaQuery.ts,
    // pkg/tsdb/grafana-postgresql-datasource/macros.go): sent over the simple protocol,
    // as Grafana's pgx driver sends them.
    let schema_constraint = "
          quote_ident(table_schema) IN (
          SELECT
            CASE WHEN trim(s[i]) = '\"$user\"' THEN user ELSE trim(s[i]) END
          FROM
            generate_series(
              array_lower(string_to_array(current_setting('search_path'),','),1),
              array_upper(string_to_array(current_setting('search_path'),','),1)
            ) as i,
            string_to_array(current_setting('search_path'),',') s
          )";
    let queries = serde_json::json!({
        "ping": "-- ping",
        "pq_ping": ";",
        "version": "SELECT current_setting('server_version_num')::int/100 as version",
        "timescale": "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'",
        "schemas": "SELECT schema_name AS \"name\"
    FROM information_schema.schemata
    WHERE schema_name NOT IN ('information_schema',
                              'pg_catalog',
                              'pg_toast',
                              '_timescaledb_cache',
                              '_timescaledb_catalog',
                              '_timescaledb_internal',
                              '_timescaledb_config',
                              'timescaledb_information',
                              'timescaledb_experimental')
    ORDER BY schema_name",
        "tables_in_schema": "SELECT quote_ident(table_name) AS \"table\"
      FROM information_schema.tables
      WHERE quote_ident(table_schema) = 'public'
      ORDER BY 1",
        "tables": format!("SELECT
    CASE WHEN {schema_constraint}
      THEN quote_ident(table_name)
      ELSE quote_ident(table_schema) || '.' || quote_ident(table_name)
    END AS \"table\"
    FROM information_schema.tables
    WHERE quote_ident(table_schema) NOT IN ('information_schema',
                             'pg_catalog',
                             '_timescaledb_cache',
                             '_timescaledb_catalog',
                             '_timescaledb_internal',
                             '_timescaledb_config',
                             'timescaledb_information',
                             'timescaledb_experimental')
    ORDER BY CASE WHEN {schema_constraint} THEN 0 ELSE 1 END, 1"),
        "columns": format!("SELECT quote_ident(column_name) AS \"column\", data_type AS \"type\"
    FROM information_schema.columns
    WHERE
      CASE WHEN array_length(parse_ident('machine'),1) = 2
        THEN quote_ident(table_schema) = (parse_ident('machine'))[1]
          AND quote_ident(table_name) = (parse_ident('machine'))[2]
        ELSE quote_ident(table_name) = 'machine'
          AND {schema_constraint}
      END"),
        "legacy_tables": format!("select quote_ident(table_name) as \"table\" from information_schema.tables
    where quote_ident(table_schema) not in ('information_schema',
                             'pg_catalog',
                             '_timescaledb_cache',
                             '_timescaledb_catalog',
                             '_timescaledb_internal',
                             '_timescaledb_config',
                             'timescaledb_information',
                             'timescaledb_experimental')
      and table_type = 'BASE TABLE' and {schema_constraint}"),
        "databases": "SELECT datname FROM pg_database WHERE datistemplate = false",
        // $__timeFilter(time) and $__timeGroupAlias(time,'5m') expanded as macros.go does.
        "series": format!("SELECT floor(extract(epoch from time)/300)*300 AS \"time\", line, avg(temperature) AS temperature
    FROM machine
    WHERE time BETWEEN '{from}' AND '{to}'
    GROUP BY 1, 2
    ORDER BY 1, 2"),
    });
    let script = r#"
QUERIES = json.loads(sys.argv[2])
with psycopg.connect(DSN, autocommit=True) as conn:
    for name, sql in QUERIES.items():
        with psycopg.ClientCursor(conn) as c:
            try:
                c.execute(sql)
                out[name] = {"columns": [d.name for d in c.description] if c.description else None,
                             "rows": c.fetchall() if c.description else None}
            except psycopg.Error as e:
                out[name] = {"error": str(e)}
"#;
    let program = format!(
        "import json, sys, psycopg\nDSN = sys.argv[1]\nout = {{}}\n{script}\nprint(json.dumps(out, default=str))\n"
    );
    for (token, role) in [(server.token.clone(), "admin"), (l1, "supervisor")] {
        let stdout = common::run_python(&program, &[&dsn(&server, &token), &queries.to_string()]);
        let out: Value = serde_json::from_str(stdout.trim()).unwrap();
        for (name, answer) in out.as_object().unwrap() {
            assert!(answer.get("error").is_none(), "{role} {name}: {answer}");
        }
        assert_eq!(out["ping"]["rows"], Value::Null);
        assert_eq!(out["version"]["rows"], serde_json::json!([[1600]]));
        assert_eq!(out["timescale"]["rows"], serde_json::json!([]));
        assert_eq!(out["schemas"]["rows"], serde_json::json!([["public"]]));
        let tables = serde_json::json!([["machine"], ["mes_event"]]);
        assert_eq!(out["tables_in_schema"]["rows"], tables, "{role}");
        assert_eq!(out["tables"]["rows"], tables, "{role}");
        assert_eq!(out["legacy_tables"]["rows"], tables, "{role}");
        assert_eq!(out["databases"]["rows"], serde_json::json!([["plant"]]));
        let columns = out["columns"]["rows"].as_array().unwrap();
        assert!(
            columns.contains(&serde_json::json!(["time", "timestamp without time zone"])),
            "{columns:?}"
        );
        assert!(columns.contains(&serde_json::json!(["temperature", "double precision"])));
        assert!(columns.contains(&serde_json::json!(["line", "text"])));
        // Two 5-minute buckets per line, each the mean of its five samples.
        let series = out["series"]["rows"].as_array().unwrap();
        let lines: Vec<&str> = series.iter().map(|r| r[1].as_str().unwrap()).collect();
        if role == "admin" {
            assert_eq!(lines, ["L1", "L2", "L1", "L2"], "{series:?}");
            assert_eq!(series[0][2], 62.0);
            assert_eq!(series[1][2], 92.0);
            assert_eq!(series[2][2], 67.0);
        } else {
            assert_eq!(lines, ["L1", "L1"], "{series:?}");
        }
        let first_bucket = series[0][0].as_f64().unwrap() as i64;
        assert_eq!(first_bucket, base / 1_000_000_000 / 300 * 300);
    }
}

/// Written down from pgJDBC's `PgDatabaseMetaData` (getTables, getColumns, getSchemas): the
/// catalog queries DBeaver and Metabase run through it, sent as pgJDBC sends them
/// (extended protocol, bound parameters).
const PGJDBC: &str = r#"
TABLES = ("SELECT NULL AS TABLE_CAT, n.nspname AS TABLE_SCHEM, c.relname AS TABLE_NAME, "
 " CASE n.nspname ~ '^pg_' OR n.nspname = 'information_schema' "
 " WHEN true THEN CASE "
 " WHEN n.nspname = 'pg_catalog' OR n.nspname = 'information_schema' THEN CASE c.relkind "
 "  WHEN 'r' THEN 'SYSTEM TABLE' "
 "  WHEN 'v' THEN 'SYSTEM VIEW' "
 "  WHEN 'i' THEN 'SYSTEM INDEX' "
 "  ELSE NULL "
 "  END "
 " WHEN n.nspname = 'pg_toast' THEN CASE c.relkind "
 "  WHEN 'r' THEN 'SYSTEM TOAST TABLE' "
 "  WHEN 'i' THEN 'SYSTEM TOAST INDEX' "
 "  ELSE NULL "
 "  END "
 " ELSE CASE c.relkind "
 "  WHEN 'r' THEN 'TEMPORARY TABLE' "
 "  WHEN 'i' THEN 'TEMPORARY INDEX' "
 "  WHEN 'S' THEN 'TEMPORARY SEQUENCE' "
 "  WHEN 'v' THEN 'TEMPORARY VIEW' "
 "  ELSE NULL "
 "  END "
 " END "
 " WHEN false THEN CASE c.relkind "
 " WHEN 'r' THEN 'TABLE' "
 " WHEN 'i' THEN 'INDEX' "
 " WHEN 'S' THEN 'SEQUENCE' "
 " WHEN 'v' THEN 'VIEW' "
 " WHEN 'c' THEN 'TYPE' "
 " WHEN 'f' THEN 'FOREIGN TABLE' "
 " ELSE NULL "
 " END "
 " ELSE NULL "
 " END "
 " AS TABLE_TYPE, d.description AS REMARKS "
 " FROM pg_catalog.pg_namespace n, pg_catalog.pg_class c "
 " LEFT JOIN pg_catalog.pg_description d ON (c.oid = d.objoid AND d.objsubid = 0) "
 " LEFT JOIN pg_catalog.pg_class dc ON (d.classoid=dc.oid AND dc.relname='pg_class') "
 " LEFT JOIN pg_catalog.pg_namespace dn ON (dn.oid=dc.relnamespace AND dn.nspname='pg_catalog') "
 " WHERE c.relnamespace = n.oid "
 " AND n.nspname LIKE $1 AND c.relname LIKE $2 "
 " AND (false  OR ( c.relkind = 'r' AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema' ) ) "
 " ORDER BY TABLE_TYPE,TABLE_SCHEM,TABLE_NAME ")
COLUMNS = ("SELECT * FROM ("
 "   SELECT n.nspname,c.relname,a.attname,a.atttypid,a.attnotnull OR (t.typtype = 'd' AND t.typnotnull) AS attnotnull,a.atttypmod,a.attlen,a.attrelid,"
 "     row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum) AS attnum, pg_catalog.pg_get_expr(def.adbin, def.adrelid) AS adsrc,dsc.description,t.typbasetype,t.typtype "
 "   FROM pg_catalog.pg_namespace n "
 "   JOIN pg_catalog.pg_class c ON (c.relnamespace = n.oid) "
 "   JOIN pg_catalog.pg_attribute a ON (a.attrelid=c.oid) "
 "   JOIN pg_catalog.pg_type t ON (a.atttypid = t.oid) "
 "   LEFT JOIN pg_catalog.pg_attrdef def ON (a.attrelid=def.adrelid AND a.attnum = def.adnum) "
 "   LEFT JOIN pg_catalog.pg_description dsc ON (c.oid=dsc.objoid AND a.attnum = dsc.objsubid) "
 "   LEFT JOIN pg_catalog.pg_class dc ON (dc.oid=dsc.classoid AND dc.relname='pg_class') "
 "   LEFT JOIN pg_catalog.pg_namespace dn ON (dc.relnamespace=dn.oid AND dn.nspname='pg_catalog') "
 "   WHERE a.attnum > 0 AND NOT a.attisdropped "
 " AND n.nspname LIKE $1 AND c.relname LIKE $2 ) c ORDER BY nspname,c.relname,attnum ")
SCHEMAS = ("SELECT nspname AS TABLE_SCHEM,  NULL AS TABLE_CATALOG"
 " FROM pg_catalog.pg_namespace "
 " WHERE "
 " ("
 " nspname <> 'pg_toast'"
 " AND"
 " (nspname !~ '^pg_temp_\\d+' OR nspname = (pg_catalog.current_schemas(true))[1])"
 " AND"
 " (nspname !~ '^pg_toast_temp_' OR nspname = replace((pg_catalog.current_schemas(true))[1], 'pg_temp_', 'pg_toast_temp_'))"
 " )"
 " ORDER BY TABLE_SCHEM")
out = {}
with psycopg.connect(DSN, autocommit=True) as conn:
    for name, sql, params in [("tables", TABLES, ("public", "%")), ("machine", COLUMNS, ("public", "machine")), ("mes_event", COLUMNS, ("public", "mes_event")), ("schemas", SCHEMAS, ())]:
        out[name] = conn.execute(sql.replace("$1", "%s").replace("$2", "%s"), params).fetchall()
"#;

#[tokio::test(flavor = "multi_thread")]
async fn bi_tools_catalog_queries_see_each_role_its_own_tables() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), CONFIG);
    load(&server).await;
    let supervisor = server.token_for("supervisor", &["lines=L1"]);
    let reader = server.token_for("machine_reader", &[]);
    let columns = |out: &Value, table: &str| -> Vec<String> {
        out[table]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[2].as_str().unwrap().to_string())
            .collect()
    };
    let out = psycopg(&server, &supervisor, PGJDBC);
    let tables: Vec<&str> = out["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r[0], Value::Null, "TABLE_CAT");
            assert_eq!(r[3], "TABLE");
            r[2].as_str().unwrap()
        })
        .collect();
    assert_eq!(tables, ["machine", "mes_event"]);
    let mut machine_columns = columns(&out, "machine");
    machine_columns.sort();
    assert_eq!(
        machine_columns,
        ["count", "line", "machine", "running", "temperature", "time"]
    );
    // Type OIDs as pgJDBC maps them: time is timestamp, temperature float8.
    let machine = out["machine"].as_array().unwrap();
    let oid = |name: &str| machine.iter().find(|r| r[2] == name).unwrap()[3].clone();
    assert_eq!(oid("time"), 1114);
    assert_eq!(oid("temperature"), 701);
    assert_eq!(oid("count"), 20);
    assert_eq!(oid("running"), 16);
    let events = columns(&out, "mes_event");
    assert!(events.contains(&"operator_name".to_string()), "{events:?}");
    assert!(
        !events.contains(&"badge_id".to_string()),
        "denied: {events:?}"
    );
    assert_eq!(
        out["schemas"],
        serde_json::json!([
            ["information_schema", null],
            ["pg_catalog", null],
            ["public", null]
        ])
    );

    // A role that reads one table finds one table, and nothing of the other.
    let out = psycopg(&server, &reader, PGJDBC);
    let tables: Vec<&str> = out["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[2].as_str().unwrap())
        .collect();
    assert_eq!(tables, ["machine"]);
    assert!(out["mes_event"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_is_offered_and_cleartext_tokens_stay_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(certs.join("key.pem"))
        .arg("-out")
        .arg(certs.join("cert.pem"))
        .output()
        .unwrap();
    assert!(status.status.success());
    let config = format!(
        "[server]\npg_bind = \"0.0.0.0:0\"\ntls_cert = {:?}\ntls_key = {:?}\n",
        certs.join("cert.pem"),
        certs.join("key.pem")
    );
    let server = start(dir.path(), &config);
    let port = pg_port(&server);
    // A non-loopback address of this machine.
    let hostname = Command::new("hostname").arg("-I").output().unwrap();
    let outside = String::from_utf8_lossy(&hostname.stdout)
        .split_whitespace()
        .find(|a| {
            a.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| !ip.is_loopback())
        })
        .expect("this machine has a non-loopback IPv4 address")
        .to_string();
    let script = r#"
PORT, TOKEN, OUTSIDE = sys.argv[2], sys.argv[3], sys.argv[4]
def connect(host, sslmode):
    try:
        with psycopg.connect(host=host, port=PORT, dbname="plant", user="x", password=TOKEN, sslmode=sslmode) as c:
            return ["ok", c.pgconn.ssl_in_use, c.execute("SELECT 1").fetchone()[0]]
    except psycopg.Error as e:
        return ["error", str(e)]
out["outside_plain"] = connect(OUTSIDE, "disable")
out["outside_tls"] = connect(OUTSIDE, "require")
out["loopback_plain"] = connect("127.0.0.1", "disable")
"#;
    let program = format!(
        "import json, sys, psycopg\nout = {{}}\n{script}\nprint(json.dumps(out, default=str))\n"
    );
    let stdout = common::run_python(&program, &["-", &port, &server.token, &outside]);
    let out: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(out["outside_plain"][0], "error", "{out}");
    assert!(
        out["outside_plain"][1].as_str().unwrap().contains("TLS"),
        "{out}"
    );
    assert_eq!(out["outside_tls"], serde_json::json!(["ok", true, 1]));
    assert_eq!(out["loopback_plain"], serde_json::json!(["ok", false, 1]));

    // Flight SQL shares the HTTP port's TLS: gRPC over TLS answers, plaintext gRPC does not.
    let script = r#"
import json, sys
import pyarrow.flight as fl
ADDR, TOKEN = sys.argv[1], sys.argv[2]
def call(uri, **kw):
    try:
        client = fl.FlightClient(uri, **kw)
        header = client.authenticate_basic_token(b"x", TOKEN.encode())
        return ["ok", header[1].decode().startswith("Bearer ")]
    except Exception as e:
        return ["error", type(e).__name__]
print(json.dumps({
    "tls": call("grpc+tls://" + ADDR, disable_server_verification=True),
    "plain": call("grpc://" + ADDR),
}))
"#;
    let stdout = common::run_python(script, &[&server.addr, &server.token]);
    let out: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(out["tls"], serde_json::json!(["ok", true]), "{out}");
    assert_eq!(out["plain"][0], "error", "{out}");
}

/// Runs a Flight SQL script with `URI`, `TOKEN` in its globals; returns its JSON output.
fn flight(server: &Server, token: &str, other: &str, script: &str) -> Value {
    let program = format!(
        "import json, sys\nURI, TOKEN, OTHER, WRITER = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]\nout = {{}}\n{script}\nprint(json.dumps(out, default=str))\n"
    );
    let uri = format!("grpc://{}", server.addr);
    let writer = server.token_for("writer", &[]);
    let stdout = common::run_python(&program, &[&uri, token, other, &writer]);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn flight_sql_serves_adbc_and_pyarrow_under_each_role() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), CONFIG);
    load(&server).await;
    let l1 = server.token_for("supervisor", &["lines=L1"]);
    let script = r#"
import adbc_driver_flightsql.dbapi as flightsql
from adbc_driver_flightsql import DatabaseOptions
conn = flightsql.connect(URI, db_kwargs={
    DatabaseOptions.AUTHORIZATION_HEADER.value: "Bearer " + TOKEN,
    DatabaseOptions.RPC_CALL_HEADER_PREFIX.value + "database": "plant",
})
cur = conn.cursor()
cur.execute("SELECT line, count(*) AS n FROM machine GROUP BY line ORDER BY line")
out["by_line"] = cur.fetch_arrow_table().to_pylist()
cur.execute("SELECT count(*) AS n FROM machine WHERE temperature > ?", parameters=(90.5,))
out["param"] = cur.fetchone()[0]
# The latest row per series (the lastpoint fast path, whose plan knows more about
# nullability than the described one): the announced schema still holds.
cur.execute("SELECT DISTINCT ON (machine) * FROM machine ORDER BY machine, time DESC")
out["lastpoint"] = cur.fetch_arrow_table().num_rows
objects = conn.adbc_get_objects(depth="columns").read_all().to_pylist()
tables = {}
for catalog in objects:
    for schema in catalog["catalog_db_schemas"]:
        for t in schema["db_schema_tables"]:
            tables[t["table_name"]] = sorted(c["column_name"] for c in t["table_columns"])
out["tables"] = tables
out["vendor"] = conn.adbc_get_info().get("vendor_name")
try:
    cur.execute("SELECT badge_id FROM mes_event")
    out["badge"] = cur.fetch_arrow_table().to_pylist()
except Exception as e:
    out["badge"] = "error"
cur.close()
conn.close()

# pyarrow.flight directly: a ticket is bound to the token it was issued to.
import pyarrow.flight as fl
def varint(n):
    b = bytearray()
    while True:
        if n < 0x80:
            b.append(n)
            return bytes(b)
        b.append((n & 0x7f) | 0x80)
        n >>= 7
def field(number, data):
    return bytes([number << 3 | 2]) + varint(len(data)) + data
def command(sql):
    inner = field(1, sql.encode())
    return field(1, b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery") + field(2, inner)
def options(token):
    return fl.FlightCallOptions(headers=[(b"authorization", b"Bearer " + token.encode()), (b"database", b"plant")])
client = fl.FlightClient(URI)
info = client.get_flight_info(fl.FlightDescriptor.for_command(command("SELECT count(*) AS n FROM machine")), options(TOKEN))
ticket = info.endpoints[0].ticket
out["own_ticket"] = client.do_get(ticket, options(TOKEN)).read_all().to_pylist()
try:
    client.do_get(ticket, options(OTHER)).read_all()
    out["other_ticket"] = "served"
except fl.FlightError as e:
    out["other_ticket"] = type(e).__name__
try:
    client.get_flight_info(fl.FlightDescriptor.for_command(command("SELECT 1")), options("hst_0000000000000000_bad"))
    out["bad_token"] = "served"
except fl.FlightError as e:
    out["bad_token"] = type(e).__name__
try:
    client.get_flight_info(fl.FlightDescriptor.for_command(command("SELECT 1")), options(WRITER))
    out["writer"] = "served"
except fl.FlightError as e:
    out["writer"] = type(e).__name__
# A handshake with basic auth answers with the bearer token to use.
header = client.authenticate_basic_token(b"anyone", TOKEN.encode())
out["handshake"] = header[1].decode().startswith("Bearer ")
opts = fl.FlightCallOptions(headers=[header, (b"database", b"plant")])
info = client.get_flight_info(fl.FlightDescriptor.for_command(command("SELECT 1 AS one")), opts)
out["after_handshake"] = client.do_get(info.endpoints[0].ticket, opts).read_all().to_pylist()
# A prepared statement belongs to the token that made it.
def fields(b):
    i, found = 0, {}
    while i < len(b):
        key = b[i]; i += 1
        n, shift = 0, 0
        while True:
            c = b[i]; i += 1
            n |= (c & 0x7f) << shift; shift += 7
            if c < 0x80:
                break
        found[key >> 3] = b[i:i + n]; i += n
    return found
create = field(1, b"type.googleapis.com/arrow.flight.protocol.sql.ActionCreatePreparedStatementRequest") + field(2, field(1, b"SELECT count(*) AS n FROM machine"))
result = list(client.do_action(fl.Action("CreatePreparedStatement", create), options(TOKEN)))[0]
handle = fields(fields(result.body.to_pybytes())[2])[1]
def prepared(handle):
    return field(1, b"type.googleapis.com/arrow.flight.protocol.sql.CommandPreparedStatementQuery") + field(2, field(1, handle))
info = client.get_flight_info(fl.FlightDescriptor.for_command(prepared(handle)), options(TOKEN))
out["prepared_own"] = client.do_get(info.endpoints[0].ticket, options(TOKEN)).read_all().to_pylist()
try:
    client.get_flight_info(fl.FlightDescriptor.for_command(prepared(handle)), options(OTHER))
    out["prepared_other"] = "served"
except Exception as e:
    out["prepared_other"] = str(e)
"#;
    let admin = flight(&server, &server.token, &l1, script);
    assert_eq!(
        admin["by_line"],
        serde_json::json!([{"line": "L1", "n": 10}, {"line": "L2", "n": 10}])
    );
    assert_eq!(admin["param"], 9);
    assert_eq!(admin["lastpoint"], 2);
    assert_eq!(admin["vendor"], "Historian");
    assert!(
        admin["tables"]["mes_event"]
            .as_array()
            .unwrap()
            .contains(&"badge_id".into())
    );
    assert_eq!(admin["own_ticket"], serde_json::json!([{"n": 20}]));
    assert_eq!(admin["other_ticket"], "FlightUnauthorizedError");
    assert_eq!(admin["bad_token"], "FlightUnauthenticatedError");
    assert_eq!(
        admin["writer"], "FlightUnauthorizedError",
        "the writer role may not query"
    );
    assert_eq!(admin["handshake"], true);
    assert_eq!(admin["after_handshake"], serde_json::json!([{"one": 1}]));
    assert_eq!(admin["prepared_own"], serde_json::json!([{"n": 20}]));
    assert!(
        admin["prepared_other"]
            .as_str()
            .unwrap()
            .contains("no such prepared statement"),
        "{admin}"
    );
    let sup = flight(&server, &l1, &server.token, script);
    assert_eq!(sup["by_line"], serde_json::json!([{"line": "L1", "n": 10}]));
    assert_eq!(sup["param"], 0);
    assert_eq!(sup["lastpoint"], 1);
    assert_eq!(sup["badge"], "error");
    assert_eq!(sup["own_ticket"], serde_json::json!([{"n": 10}]));
    assert_eq!(sup["prepared_own"], serde_json::json!([{"n": 10}]));

    // Flight SQL statements are in the audit log as such.
    let audit = audit_rows(
        &server,
        "SELECT role FROM audit_log WHERE kind = 'query' AND interface = 'flight'",
    )
    .await;
    assert!(audit.iter().any(|r| r["role"] == "supervisor"), "{audit:?}");
    assert!(audit.iter().any(|r| r["role"] == "admin"), "{audit:?}");
    assert!(
        !sup["tables"]["mes_event"]
            .as_array()
            .unwrap()
            .contains(&"badge_id".into()),
        "{sup}"
    );
}

/// Builds the pgx client of `tests/pgx` (Debian's golang and pgx packages, GOPATH mode).
fn pgx_client(dir: &Path) -> std::path::PathBuf {
    let binary = dir.join("pgxclient");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pgx/main.go"))
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", dir.join("gocache"))
        .output()
        .expect("go is installed (.ci/run installs golang-go and golang-github-jackc-pgx-v4-dev)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}

fn pgx(client: &Path, dsn: &str, mode: &str, sql: &str, args: &[&str]) -> Value {
    let out = Command::new(client)
        .args([dsn, mode, sql])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn go_pgx_the_driver_inside_grafana_reads_series_under_each_role() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), CONFIG);
    let base = load(&server).await;
    let client = pgx_client(dir.path());
    let l1 = server.token_for("supervisor", &["lines=L1"]);
    let url = |token: &str| {
        format!(
            "postgres://grafana:{token}@127.0.0.1:{}/plant?sslmode=disable",
            pg_port(&server)
        )
    };
    let from = chrono::DateTime::from_timestamp_nanos(base)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let to = chrono::DateTime::from_timestamp_nanos(base + 10 * 60_000_000_000)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    // A Grafana time-series panel: $__timeFilter expanded, over the simple protocol.
    let series = format!(
        "SELECT time AS \"time\", temperature, line FROM machine \
         WHERE time BETWEEN '{from}' AND '{to}' ORDER BY 1, 3"
    );
    for (token, lines) in [(server.token.as_str(), 2), (l1.as_str(), 1)] {
        let out = pgx(&client, &url(token), "simple", &series, &[]);
        assert!(out.get("error").is_none(), "{out}");
        assert_eq!(out["oids"], serde_json::json!([1114, 701, 25]));
        let rows = out["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 10 * lines, "{out}");
        let expected = chrono::DateTime::from_timestamp_nanos(base)
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        assert_eq!(rows[0][0], expected.as_str());
        assert_eq!(rows[0][1], 60.0);
        // The extended protocol with a bound parameter.
        let out = pgx(
            &client,
            &url(token),
            "extended",
            "SELECT count(*) AS n FROM machine WHERE line = $1",
            &["L2"],
        );
        assert!(out.get("error").is_none(), "{out}");
        assert_eq!(out["oids"], serde_json::json!([20]));
        assert_eq!(out["rows"][0][0], if lines == 2 { 10 } else { 0 });
    }
    let out = pgx(
        &client,
        &url("hst_0000000000000000_bad"),
        "simple",
        "SELECT 1",
        &[],
    );
    assert!(
        out["error"]
            .as_str()
            .unwrap()
            .contains("password authentication failed"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_limit_are_refused_and_admitted_again_later() {
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG.replace(
        "pg_bind = \"127.0.0.1:0\"",
        "pg_bind = \"127.0.0.1:0\"\npg_max_connections = 2",
    );
    let server = start(dir.path(), &config);
    let script = r#"
import json, sys, psycopg
DSN = sys.argv[1]
out = {}
a = psycopg.connect(DSN, autocommit=True)
b = psycopg.connect(DSN, autocommit=True)
try:
    psycopg.connect(DSN, autocommit=True)
    out["third"] = "admitted"
except psycopg.OperationalError as e:
    out["third"] = str(e)
a.close()
# The server notices the close asynchronously: retry briefly.
import time
deadline = time.time() + 5
while True:
    try:
        c = psycopg.connect(DSN, autocommit=True)
        break
    except psycopg.OperationalError:
        if time.time() > deadline:
            raise
        time.sleep(0.05)
out["after_close"] = c.execute("SELECT 1").fetchone()[0]
c.close()
out["b_still"] = b.execute("SELECT 2").fetchone()[0]
print(json.dumps(out))
"#;
    let stdout = common::run_python(script, &[&dsn(&server, &server.token)]);
    let out: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(
        out["third"]
            .as_str()
            .unwrap()
            .contains("too many connections"),
        "{out}"
    );
    assert_eq!(out["after_close"], 1);
    assert_eq!(out["b_still"], 2);
}
