"""TSBS cpu-only queries: Historian over HTTP (format=arrow) against DuckDB reading the same
Parquet files, median of several runs each; or, with --under-load, query latencies while
something else writes; or, with --interfaces, the same queries over HTTP, Flight SQL (ADBC)
and the PostgreSQL protocol (psycopg, binary results).

Used by benches/scripts/query-bench.sh; runs with the test venv's Python (duckdb, pyarrow).
"""

import argparse
import json
import os
import statistics
import sys
import time
import urllib.error
import urllib.request

import duckdb
import pyarrow.ipc

FIELDS = [
    "usage_user", "usage_system", "usage_idle", "usage_nice", "usage_iowait",
    "usage_irq", "usage_softirq", "usage_steal", "usage_guest", "usage_guest_nice",
]


def hosts(n, start=0, step=97):
    return ", ".join(f"'host_{(start + i * step) % 1000}'" for i in range(n))


def ts(hour):
    day, h = divmod(hour, 24)
    return f"TIMESTAMP '2026-01-{1 + day:02d} {h:02d}:00:00'"


def queries(duckdb_dialect):
    """The TSBS query set with fixed parameters (TSBS draws random hosts and windows)."""
    def bucket(width):
        fn = "time_bucket" if duckdb_dialect else "date_bin"
        return f"{fn}(INTERVAL '{width}', time)"

    def maxes(n):
        return ", ".join(f"max({f}) AS {f}" for f in FIELDS[:n])

    def avgs(n):
        return ", ".join(f"avg({f}) AS {f}" for f in FIELDS[:n])

    q = {}
    for metrics, nhosts, hours in [(1, 1, 1), (1, 1, 12), (1, 8, 1), (5, 1, 1), (5, 1, 12), (5, 8, 1)]:
        q[f"single-groupby-{metrics}-{nhosts}-{hours}"] = (
            f"SELECT {bucket('1 minute')} AS minute, {maxes(metrics)} FROM cpu "
            f"WHERE hostname IN ({hosts(nhosts, 11)}) AND time >= {ts(6)} AND time < {ts(6 + hours)} "
            f"GROUP BY 1 ORDER BY 1")
    for nhosts in [1, 8]:
        q[f"cpu-max-all-{nhosts}"] = (
            f"SELECT {bucket('1 hour')} AS hour, {maxes(10)} FROM cpu "
            f"WHERE hostname IN ({hosts(nhosts, 23)}) AND time >= {ts(4)} AND time < {ts(12)} "
            f"GROUP BY 1 ORDER BY 1")
    for name, n in [("1", 1), ("5", 5), ("all", 10)]:
        q[f"double-groupby-{name}"] = (
            f"SELECT {bucket('1 hour')} AS hour, hostname, {avgs(n)} FROM cpu "
            f"WHERE time >= {ts(3)} AND time < {ts(15)} GROUP BY 1, 2 ORDER BY 1, 2")
    q["high-cpu-1"] = (
        f"SELECT * FROM cpu WHERE usage_user > 90.0 AND time >= {ts(2)} AND time < {ts(14)} "
        f"AND hostname IN ({hosts(1, 5)})")
    q["high-cpu-all"] = (
        f"SELECT * FROM cpu WHERE usage_user > 90.0 AND time >= {ts(2)} AND time < {ts(14)}")
    q["lastpoint"] = "SELECT DISTINCT ON (hostname) * FROM cpu ORDER BY hostname, time DESC"
    q["groupby-orderby-limit"] = (
        f"SELECT {bucket('1 minute')} AS minute, max(usage_user) AS m FROM cpu "
        f"WHERE time < {ts(20)} GROUP BY 1 ORDER BY 1 DESC LIMIT 5")
    return q


def historian(url, db, sql, token=None):
    body = json.dumps({"db": db, "q": sql, "format": "arrow"}).encode()
    token = token or os.environ.get("HISTORIAN_TOKEN", "")
    req = urllib.request.Request(f"{url}/api/v3/query_sql", data=body,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {token}"})
    # The Arrow stream is decoded as it arrives, as a streaming client does; reading the
    # whole body first and decoding it after costs 40-50 ms more on a 53 MB result.
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return pyarrow.ipc.open_stream(resp).read_all().num_rows
    except urllib.error.HTTPError as e:
        sys.exit(f"{e.code} for {sql!r}: {e.read().decode(errors='replace')}")


def timed(fn, runs):
    times, rows = [], None
    fn()  # warm-up: caches, file metadata
    for _ in range(runs):
        t = time.perf_counter()
        rows = fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), rows


def compare(args):
    files = json.loads(open(args.files).read())
    con = duckdb.connect()
    con.execute(f"SET threads = {args.threads}")
    listing = ", ".join("'" + f + "'" for f in files)
    con.execute(f"CREATE VIEW cpu AS SELECT * EXCLUDE (_seq) FROM read_parquet([{listing}], union_by_name = true)")
    ours, theirs = queries(False), queries(True)
    print(f"| query | rows | Historian ms (HTTP, arrow) | DuckDB {duckdb.__version__} ms | ratio |")
    print("|---|---|---|---|---|")
    worst = []
    for name in ours:
        h_ms, h_rows = timed(lambda: historian(args.url, args.db, ours[name]), args.runs)
        # DuckDB's relation API: its DB-API result would copy the rows once more.
        d_ms, d_rows = timed(lambda: con.sql(theirs[name]).to_arrow_table().num_rows, args.runs)
        if h_rows != d_rows:
            print(f"{name}: Historian returned {h_rows} rows, DuckDB {d_rows}", file=sys.stderr)
            sys.exit(1)
        ratio = h_ms / d_ms
        worst.append((ratio, name))
        print(f"| {name} | {h_rows} | {h_ms:.1f} | {d_ms:.1f} | {ratio:.2f} |", flush=True)
    print(f"\nslowest relative to DuckDB: {max(worst)[1]} ({max(worst)[0]:.2f}x)", file=sys.stderr)


def policy(args):
    """The TSBS set as admin and as a policy-restricted role, interleaved per query."""
    ours = queries(False)
    print("| query | rows | admin ms | restricted role ms | ratio |")
    print("|---|---|---|---|---|")
    total_admin = total_role = 0.0
    for name, sql in ours.items():
        a_ms, a_rows = timed(lambda: historian(args.url, args.db, sql), args.runs)
        r_ms, r_rows = timed(lambda: historian(args.url, args.db, sql, args.policy_token), args.runs)
        if a_rows != r_rows:
            print(f"{name}: admin got {a_rows} rows, the role {r_rows}", file=sys.stderr)
            sys.exit(1)
        total_admin += a_ms
        total_role += r_ms
        print(f"| {name} | {a_rows} | {a_ms:.1f} | {r_ms:.1f} | {r_ms / a_ms:.2f} |", flush=True)
    print(f"| all (sum of medians) | | {total_admin:.1f} | {total_role:.1f} | "
          f"{total_role / total_admin:.2f} |")


def interfaces(args):
    """The TSBS set over each interface, interleaved per query; every row fetched."""
    import adbc_driver_flightsql.dbapi as flightsql
    import psycopg
    from adbc_driver_flightsql import DatabaseOptions
    token = os.environ.get("HISTORIAN_TOKEN", "")
    flight = flightsql.connect(args.flight, db_kwargs={
        DatabaseOptions.AUTHORIZATION_HEADER.value: "Bearer " + token,
        DatabaseOptions.RPC_CALL_HEADER_PREFIX.value + "database": args.db,
    }, autocommit=True)
    fcur = flight.cursor()
    pg = psycopg.connect(host="127.0.0.1", port=args.pg_port, dbname=args.db, user="bench",
                         password=token, sslmode="disable", autocommit=True)
    pcur = pg.cursor(binary=True)

    def via_flight(sql):
        fcur.execute(sql)
        return fcur.fetch_arrow_table().num_rows

    def via_pg(sql):
        pcur.execute(sql)
        return len(pcur.fetchall())

    print("| query | rows | HTTP (arrow) ms | Flight SQL (ADBC) ms | PostgreSQL (psycopg, binary) ms |")
    print("|---|---|---|---|---|")
    totals = [0.0, 0.0, 0.0]
    for name, sql in queries(False).items():
        h_ms, h_rows = timed(lambda: historian(args.url, args.db, sql), args.runs)
        f_ms, f_rows = timed(lambda: via_flight(sql), args.runs)
        p_ms, p_rows = timed(lambda: via_pg(sql), args.runs)
        if not h_rows == f_rows == p_rows:
            sys.exit(f"{name}: HTTP {h_rows} rows, Flight {f_rows}, PostgreSQL {p_rows}")
        for i, v in enumerate((h_ms, f_ms, p_ms)):
            totals[i] += v
        print(f"| {name} | {h_rows} | {h_ms:.1f} | {f_ms:.1f} | {p_ms:.1f} |", flush=True)
    print(f"| all (sum of medians) | | {totals[0]:.1f} | {totals[1]:.1f} | {totals[2]:.1f} |")


def fixed_cost(args):
    """A query's fixed cost over HTTP: tiny queries on a one-row table, median of 50."""
    for sql in ["SELECT 1", "SELECT max(v) FROM m",
                "SELECT date_bin(INTERVAL '1 minute', time) AS t, max(v) FROM m GROUP BY 1 ORDER BY 1"]:
        for _ in range(5):
            historian(args.url, args.db, sql)
        times = []
        for _ in range(50):
            t = time.perf_counter()
            historian(args.url, args.db, sql)
            times.append((time.perf_counter() - t) * 1000)
        print(f"| `{sql}` | {statistics.median(times):.2f} |")


def stream_pg(args):
    """Every row of the table over the extended protocol (server-side parameter), consumed
    as it arrives (psycopg's stream())."""
    import psycopg
    token = os.environ.get("HISTORIAN_TOKEN", "")
    with psycopg.connect(host="127.0.0.1", port=args.pg_port, dbname=args.db, user="bench",
                         password=token, sslmode="disable") as conn:
        cur = conn.cursor(binary=True)
        t = time.perf_counter()
        n = sum(1 for _ in cur.stream("SELECT * FROM cpu WHERE usage_user >= %s", (0.0,)))
        print(f"rows: {n}, {time.perf_counter() - t:.1f} s")


def under_load(args):
    """Dashboard-style queries over the data being written, back to back for --seconds."""
    recent = {
        "last-5m-per-minute-1-host": (
            "SELECT date_bin(INTERVAL '1 minute', time) AS minute, max(usage_user) FROM cpu "
            "WHERE hostname = 'host_7' AND time >= now() - INTERVAL '5 minutes' GROUP BY 1 ORDER BY 1"),
        "last-1m-avg-per-host": (
            "SELECT hostname, avg(usage_user) FROM cpu "
            "WHERE time >= now() - INTERVAL '1 minute' GROUP BY 1 ORDER BY 2 DESC LIMIT 10"),
        "last-15m-count": "SELECT count(*) FROM cpu WHERE time >= now() - INTERVAL '15 minutes'",
    }
    lat = {k: [] for k in recent}
    start = time.time()
    end = start + args.seconds
    while time.time() < end:
        for name, sql in recent.items():
            t = time.perf_counter()
            historian(args.url, args.db, sql)
            ms = (time.perf_counter() - t) * 1000
            lat[name].append(ms)
            if ms > 1000:
                print(f"slow: {name} {ms:.0f} ms at {time.time() - start:.1f} s", file=sys.stderr)
    print("| query | runs | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for name, v in lat.items():
        v.sort()
        p = lambda q: v[min(len(v) - 1, int(q * len(v)))]
        print(f"| {name} | {len(v)} | {p(0.5):.1f} | {p(0.99):.1f} | {v[-1]:.1f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:18181")
    ap.add_argument("--db", default="bench")
    ap.add_argument("--files", help="JSON list of the table's Parquet files")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--under-load", action="store_true")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--policy-token", help="compare admin with this token's role")
    ap.add_argument("--interfaces", action="store_true", help="HTTP vs Flight SQL vs PostgreSQL")
    ap.add_argument("--flight", default="grpc://127.0.0.1:18181")
    ap.add_argument("--pg-port", default="15432")
    ap.add_argument("--fixed-cost", action="store_true", help="tiny queries on a one-row table")
    ap.add_argument("--stream-pg", action="store_true", help="all rows over the extended protocol")
    args = ap.parse_args()
    if args.fixed_cost:
        fixed_cost(args)
    elif args.stream_pg:
        stream_pg(args)
    elif args.interfaces:
        interfaces(args)
    elif args.policy_token:
        policy(args)
    elif args.under_load:
        under_load(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
