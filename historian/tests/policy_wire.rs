//! The access-control policy suite over the PostgreSQL protocol (psycopg, extended and
//! simple protocol) and Flight SQL (ADBC): the same adversarial queries as over HTTP
//! (`access.rs`) must give the L1 supervisor the same answers, and the same refusals.

mod common;

use common::Server;
use serde_json::Value;

fn start(dir: &std::path::Path) -> Server {
    let data = dir.join("data");
    Server::start_with_keyring(&data, common::policy::CONFIG)
}

/// Every query of the suite and the refusals; the script prints `{query: answer}`.
fn inputs() -> (String, String) {
    let queries: Vec<&str> = common::policy::adversarial()
        .into_iter()
        .map(|(q, _)| q)
        .collect();
    let refused = [
        "SELECT badge_id FROM mes_event",
        "SELECT operator_id__enc FROM mes_event",
        "SELECT * FROM read_parquet('/etc/passwd')",
        "CREATE TABLE x AS SELECT * FROM machine",
        "DELETE FROM machine",
        "COPY machine TO '/tmp/x.csv'",
        "SELECT * FROM audit_log",
    ];
    (
        serde_json::to_string(&queries).unwrap(),
        serde_json::to_string(&refused).unwrap(),
    )
}

fn check(interface: &str, out: &Value) {
    for (q, want) in common::policy::adversarial() {
        assert_eq!(out["answers"][q], want, "{interface}: {q}");
    }
    for (q, answer) in out["refused"].as_object().unwrap() {
        assert_eq!(answer, "refused", "{interface}: {q} must be refused");
    }
    // A denied column is not in the row either.
    let columns = out["star_columns"].as_array().unwrap();
    assert!(
        !columns.contains(&"badge_id".into()),
        "{interface}: {columns:?}"
    );
    assert!(columns.contains(&"operator_name".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_policy_suite_holds_over_pgwire_and_flight_sql() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    common::policy::load(&server).await;
    let l1 = server.token_for("supervisor", &["lines=L1"]);
    let (queries, refused) = inputs();
    let port = server
        .pg_addr
        .as_ref()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();

    let pg = r#"
import json, sys, psycopg
PORT, TOKEN, QUERIES, REFUSED, SIMPLE = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5] == "simple"
out = {"answers": {}, "refused": {}}
with psycopg.connect(host="127.0.0.1", port=PORT, dbname="plant", user="x", password=TOKEN, sslmode="disable", autocommit=True) as conn:
    cur = psycopg.ClientCursor(conn) if SIMPLE else conn.cursor()
    for q in QUERIES:
        cur.execute(q)
        out["answers"][q] = cur.fetchone()[0]
    for q in REFUSED:
        try:
            cur.execute(q)
            out["refused"][q] = "served"
        except psycopg.Error:
            out["refused"][q] = "refused"
    cur.execute("SELECT * FROM mes_event")
    out["star_columns"] = [d.name for d in cur.description]
print(json.dumps(out, default=str))
"#;
    for mode in ["extended", "simple"] {
        let stdout = common::run_python(pg, &[&port, &l1, &queries, &refused, mode]);
        let out: Value = serde_json::from_str(stdout.trim()).unwrap();
        check(&format!("pgwire ({mode})"), &out);
    }

    let flight = r#"
import json, sys
import adbc_driver_flightsql.dbapi as flightsql
from adbc_driver_flightsql import DatabaseOptions
URI, TOKEN, QUERIES, REFUSED = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
out = {"answers": {}, "refused": {}}
conn = flightsql.connect(URI, db_kwargs={
    DatabaseOptions.AUTHORIZATION_HEADER.value: "Bearer " + TOKEN,
    DatabaseOptions.RPC_CALL_HEADER_PREFIX.value + "database": "plant",
}, autocommit=True)
cur = conn.cursor()
for q in QUERIES:
    cur.execute(q)
    out["answers"][q] = cur.fetchone()[0]
for q in REFUSED:
    try:
        cur.execute(q)
        cur.fetchall()
        out["refused"][q] = "served"
    except Exception:
        out["refused"][q] = "refused"
cur.execute("SELECT * FROM mes_event")
out["star_columns"] = cur.fetch_arrow_table().column_names
print(json.dumps(out, default=str))
"#;
    let uri = format!("grpc://{}", server.addr);
    let stdout = common::run_python(flight, &[&uri, &l1, &queries, &refused]);
    let out: Value = serde_json::from_str(stdout.trim()).unwrap();
    check("flight", &out);
}
