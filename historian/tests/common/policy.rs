//! The access-control scenario every interface is checked against: the roles, the data,
//! and the adversarial queries whose answers a row and column policy must not change.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::Server;

/// Roles: a line supervisor (rows by line, operator name masked, badge denied), quality
/// (decrypts its rows), a line-1 collector, a role over a field.
pub const CONFIG: &str = r#"
[server]
pg_bind = "127.0.0.1:0"

[persist]
flush_age = "300ms"
interval = "100ms"

[audit]
ship_interval = "500ms"

[tables.mes_event]
partition = "day"
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

[roles.quality.tables.mes_event]
read = true
rows = "event = 'quality_check'"
columns = { operator_id = "clear", operator_name = "clear", badge_id = "deny" }

[roles.collector.tables.machine]
write = true

[roles.hot.tables.machine]
read = true
rows = "temperature > 80.0"
"#;

/// Nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// Machine rows on lines L1 and L2 (the L2 rows have `count = 0`, so `1/count` fails on
/// them) and MES events, all flushed to Parquet.
pub async fn load(server: &Server) {
    let t = now_ns() - 60_000_000_000;
    let body = format!(
        "machine,line=L1,machine=m1 temperature=70.5,count=3i {}\n\
         machine,line=L1,machine=m2 temperature=71.0,count=5i {}\n\
         machine,line=L2,machine=m3 temperature=90.0,count=0i {}\n\
         machine,line=L2,machine=m4 temperature=95.0,count=0i {}\n\
         mes_event,line=L1,event=start operator_id=\"E1\",operator_name=\"Ann Arbor\",badge_id=\"B1\",qty=1i {}\n\
         mes_event,line=L1,event=quality_check operator_id=\"E1\",operator_name=\"Ann Arbor\",badge_id=\"B1\",qty=2i {}\n\
         mes_event,line=L2,event=start operator_id=\"E2\",operator_name=\"Bob Berg\",badge_id=\"B2\",qty=3i {}\n\
         mes_event,line=L2,event=quality_check operator_id=\"E2\",operator_name=\"Bob Berg\",badge_id=\"B2\",qty=4i {}\n",
        t,
        t + 1,
        t + 2,
        t + 3,
        t + 4,
        t + 5,
        t + 6,
        t + 7
    );
    let resp = server
        .client()
        .post(server.url("/api/v3/write_lp?db=plant&precision=ns"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        204,
        "{}",
        resp.text().await.unwrap()
    );
    // Both tables in Parquet, so that statistics exist that a policy must not use.
    let deadline = Instant::now() + Duration::from_secs(20);
    for table in ["machine", "mes_event"] {
        let manifest = server
            .lake()
            .join(format!("databases/plant/manifest/{table}"));
        while !manifest.exists() || super::live_files(&server.lake(), "plant", table).is_empty() {
            assert!(Instant::now() < deadline, "{table} was not flushed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Queries with the answer the L1 supervisor must get, whatever the SQL tries.
pub fn adversarial() -> Vec<(&'static str, Value)> {
    vec![
        // Statistics of the Parquet files must not answer past the policy.
        ("SELECT count(*) FROM machine", json!(2)),
        ("SELECT min(count) FROM machine", json!(3)),
        ("SELECT max(temperature) FROM machine", json!(71.0)),
        // An expression that fails on a hidden row (count = 0) must not fail the query.
        (
            "SELECT count(*) FROM machine WHERE 10 / count > 0",
            json!(2),
        ),
        ("SELECT sum(10 / count) FROM machine", json!(5)),
        ("SELECT count(*) FROM machine WHERE line = 'L2'", json!(0)),
        (
            "SELECT count(*) FROM machine WHERE machine = 'm3' OR line <> 'L1'",
            json!(0),
        ),
        // Joins, subqueries, CTEs see the secured table on every side.
        (
            "SELECT count(*) FROM machine a JOIN machine b ON a.machine = b.machine",
            json!(2),
        ),
        (
            "SELECT count(*) FROM machine m JOIN mes_event e ON m.line = e.line",
            json!(4),
        ),
        (
            "SELECT count(*) FROM machine WHERE line IN (SELECT line FROM mes_event)",
            json!(2),
        ),
        (
            "SELECT (SELECT count(*) FROM machine WHERE count = 0)",
            json!(0),
        ),
        (
            "WITH x AS (SELECT * FROM machine) SELECT count(*) FROM x WHERE line = 'L2'",
            json!(0),
        ),
        (
            "SELECT count(*) FROM machine WHERE EXISTS (SELECT 1 FROM machine m2 WHERE m2.count = 0)",
            json!(0),
        ),
        // Window functions.
        (
            "SELECT max(n) FROM (SELECT count(*) OVER () AS n FROM machine)",
            json!(2),
        ),
        (
            "SELECT max(r) FROM (SELECT row_number() OVER (ORDER BY count) AS r FROM machine)",
            json!(2),
        ),
        // Set operations.
        (
            "SELECT count(*) FROM (SELECT line FROM machine UNION SELECT line FROM mes_event)",
            json!(1),
        ),
        (
            "SELECT count(*) FROM (SELECT line FROM machine INTERSECT SELECT 'L2')",
            json!(0),
        ),
        (
            "SELECT count(*) FROM (SELECT 'L2' EXCEPT SELECT line FROM machine)",
            json!(1),
        ),
        // ORDER BY with LIMIT: the hidden rows have the lowest count.
        (
            "SELECT machine FROM machine ORDER BY count LIMIT 1",
            json!("m1"),
        ),
        ("SELECT count(DISTINCT line) FROM machine", json!(1)),
        // The latest row per series (the lastpoint fast path) under the policy.
        (
            "SELECT count(*) FROM (SELECT DISTINCT ON (machine) * FROM machine ORDER BY machine, time DESC)",
            json!(2),
        ),
        (
            "SELECT max(machine) FROM (SELECT DISTINCT ON (machine) machine FROM machine ORDER BY machine, time DESC)",
            json!("m2"),
        ),
        // ... and under a filter on a tag, which the secured view takes as exact.
        (
            "SELECT count(*) FROM (SELECT DISTINCT ON (machine) * FROM machine WHERE machine = 'm2' ORDER BY machine, time DESC)",
            json!(1),
        ),
        (
            "SELECT count(*) FROM (SELECT DISTINCT ON (machine) machine FROM machine WHERE machine IN ('m2', 'm3') ORDER BY machine, time DESC)",
            json!(1),
        ),
        ("SELECT count(DISTINCT machine) FROM machine", json!(2)),
        // Case and quoting variants resolve to the same secured table.
        ("SELECT count(*) FROM MACHINE", json!(2)),
        ("SELECT count(*) FROM \"machine\"", json!(2)),
        ("SELECT count(*) FROM public.machine", json!(2)),
        ("SELECT count(*) FROM historian.public.machine", json!(2)),
        // Masked values are NULL before filters, groups and distinct see them.
        (
            "SELECT count(*) FROM mes_event WHERE operator_name = 'Ann Arbor'",
            json!(0),
        ),
        (
            "SELECT count(*) FROM mes_event WHERE operator_name LIKE 'A%'",
            json!(0),
        ),
        (
            "SELECT count(DISTINCT operator_name) FROM mes_event",
            json!(0),
        ),
        (
            "SELECT count(*) FROM (SELECT operator_name FROM mes_event GROUP BY operator_name)",
            json!(1),
        ),
        ("SELECT count(*) FROM mes_event", json!(2)),
        (
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            json!(2),
        ),
        (
            "SELECT count(*) FROM information_schema.columns WHERE column_name IN ('badge_id', 'operator_id__enc')",
            json!(0),
        ),
    ]
}
