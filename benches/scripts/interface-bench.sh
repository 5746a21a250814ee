#!/usr/bin/env bash
# Query speed per interface: the TSBS cpu-only query set over ROWS rows (default 10.08M:
# 1000 hosts, 10 s apart, 28 hours) over HTTP (format=arrow), Arrow Flight SQL (ADBC) and
# the PostgreSQL protocol (psycopg, binary results), median of RUNS runs each, interleaved
# per query in the same run, every row fetched by the client. Then the server's RSS while
# psql pulls a 10M-row result over the PostgreSQL protocol (simple protocol) and while
# psycopg streams every row over the extended protocol (results stream; memory stays
# bounded), and a query's fixed cost over HTTP on a one-row table.
#
#   cargo build --release -p historian -p historian-benches
#   bash .ci/run   # once: creates the Python venv with psycopg and ADBC
#   bash benches/scripts/interface-bench.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${CARGO_TARGET_DIR:-/var/tmp/historian-target}/release"
PY="${HISTORIAN_PYTHON:-/var/tmp/historian-venv/bin/python}"
ROWS="${ROWS:-10080000}"
RUNS="${RUNS:-5}"
WORK="$(mktemp -d /var/tmp/interface-bench.XXXXXX)"
SERVER_PID=""
trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"' EXIT
URL=http://127.0.0.1:18184
PG_PORT=15434

# shellcheck source=tsbs-lake.sh
source benches/scripts/tsbs-lake.sh
rss_mib() { awk '/VmRSS/ { printf "%d", $2 / 1024 }' "/proc/$SERVER_PID/status"; }

cat > "$WORK/historian.toml" <<TOML
[persist]
closed_after = "5s"
TOML
"$BIN/historian" serve --config "$WORK/historian.toml" --data-dir "$WORK/data" \
    --http-bind 127.0.0.1:18184 --pg-bind "127.0.0.1:$PG_PORT" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do curl -sf "$URL/health" > /dev/null && break; sleep 0.1; done
export HISTORIAN_TOKEN="$(cat "$WORK/data/admin-token")"

load_tsbs

echo "== TSBS queries: HTTP vs Flight SQL vs PostgreSQL, median of $RUNS" >&2
"$PY" benches/scripts/query_bench.py --interfaces --url "$URL" --flight "grpc://127.0.0.1:18184" \
    --pg-port "$PG_PORT" --runs "$RUNS"

echo "== 10M-row result over the PostgreSQL protocol (psql): server RSS" >&2
before=$(rss_mib); peak=$before
start=$(date +%s.%N)
PGPASSWORD="$HISTORIAN_TOKEN" psql -X -A -t "host=127.0.0.1 port=$PG_PORT dbname=bench user=bench sslmode=disable" \
    -c "SELECT * FROM cpu LIMIT 10000000" > "$WORK/out.txt" &
PSQL=$!
while kill -0 "$PSQL" 2>/dev/null; do r=$(rss_mib); [ "$r" -gt "$peak" ] && peak=$r; sleep 0.2; done
wait "$PSQL"
end=$(date +%s.%N)
echo "rows: $(wc -l < "$WORK/out.txt"), $(awk "BEGIN { printf \"%.1f\", $end - $start }") s; server RSS before ${before} MiB, peak ${peak} MiB (+$((peak - before)) MiB)"

echo "== every row over the extended protocol (psycopg stream()): server RSS" >&2
before=$(rss_mib); peak=$before
"$PY" benches/scripts/query_bench.py --stream-pg --pg-port "$PG_PORT" --db bench > "$WORK/stream.txt" &
STREAM=$!
while kill -0 "$STREAM" 2>/dev/null; do r=$(rss_mib); [ "$r" -gt "$peak" ] && peak=$r; sleep 0.2; done
wait "$STREAM"
echo "$(cat "$WORK/stream.txt"); server RSS before ${before} MiB, peak ${peak} MiB (+$((peak - before)) MiB)"

echo "== fixed cost over HTTP: a one-row table, median of 50" >&2
curl -sf -H "Authorization: Bearer $HISTORIAN_TOKEN" --data-binary 'm v=1.5 1767225600000000000' \
    "$URL/api/v3/write_lp?db=fixed" > /dev/null
echo "| query | median ms |"
echo "|---|---|"
"$PY" benches/scripts/query_bench.py --fixed-cost --url "$URL" --db fixed
