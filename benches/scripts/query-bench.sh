#!/usr/bin/env bash
# Query speed: the TSBS cpu-only query set over ROWS rows (default 10.08M: 1000 hosts,
# 10 s apart, 28 hours), Historian over HTTP (format=arrow) against DuckDB reading the same
# Parquet files, median of RUNS runs each; then query latencies while the load generator
# writes at RATE rows/s; then the server's RSS while it streams a 10M-row CSV result.
# EXTRA_CONFIG is appended to the server's config file (e.g. a [query] section).
#
#   cargo build --release -p historian -p historian-benches
#   bash .ci/run   # once: creates the Python venv with duckdb and pyarrow
#   bash benches/scripts/query-bench.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${CARGO_TARGET_DIR:-/var/tmp/historian-target}/release"
PY="${HISTORIAN_PYTHON:-/var/tmp/historian-venv/bin/python}"
ROWS="${ROWS:-10080000}"
RUNS="${RUNS:-5}"
RATE="${RATE:-214000}"      # 70 % of the 305,758 rows/s in BENCHMARKS.md
LOAD_SECONDS="${LOAD_SECONDS:-60}"
WORK="$(mktemp -d /var/tmp/query-bench.XXXXXX)"
SERVER_PID=""
trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"' EXIT
URL=http://127.0.0.1:18181

# shellcheck source=tsbs-lake.sh
source benches/scripts/tsbs-lake.sh
rss_mib() { awk '/VmRSS/ { printf "%d", $2 / 1024 }' "/proc/$SERVER_PID/status"; }

cat > "$WORK/historian.toml" <<TOML
[persist]
# Compact each day partition down to its final files soon after the load.
closed_after = "5s"
${EXTRA_CONFIG:-}
TOML
"$BIN/historian" serve --config "$WORK/historian.toml" --data-dir "$WORK/data" \
    --http-bind 127.0.0.1:18181 > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do curl -sf "$URL/health" > /dev/null && break; sleep 0.1; done
# The admin token the server wrote at its first start: loadgen and curl send it.
export HISTORIAN_TOKEN="$(cat "$WORK/data/admin-token")"

load_tsbs
"$PY" - "$WORK/data/lake" > "$WORK/files.json" <<'PY'
import json, os, sys
lake = sys.argv[1]
d = os.path.join(lake, "databases/bench/manifest/cpu")
m = json.load(open(os.path.join(d, sorted(os.listdir(d))[-1])))
print(json.dumps([os.path.join(lake, f["path"]) for f in m["files"]]))
print(f"{len(m['files'])} files, {sum(f['rows'] for f in m['files'])} rows, "
      f"{sum(f['bytes'] for f in m['files']) / 2**20:.0f} MiB", file=sys.stderr)
PY

echo "== TSBS queries: Historian vs DuckDB, median of $RUNS" >&2
"$PY" benches/scripts/query_bench.py --url "$URL" --files "$WORK/files.json" --runs "$RUNS" --threads "$(nproc)"

echo "== 10M-row CSV result: server RSS" >&2
before=$(rss_mib); peak=$before
curl -s -G -H "Authorization: Bearer $HISTORIAN_TOKEN" "$URL/api/v3/query_sql" --data-urlencode db=bench --data-urlencode format=csv \
    --data-urlencode "q=SELECT * FROM cpu LIMIT 10000000" -o "$WORK/out.csv" &
CURL=$!
while kill -0 "$CURL" 2>/dev/null; do r=$(rss_mib); [ "$r" -gt "$peak" ] && peak=$r; sleep 0.2; done
echo "csv: $(wc -l < "$WORK/out.csv") lines, $(($(stat -c %s "$WORK/out.csv") / 1048576)) MiB; server RSS before ${before} MiB, peak ${peak} MiB, rise $((peak - before)) MiB"
rm -f "$WORK/out.csv"

echo "== query latency while writing $RATE rows/s" >&2
# 1000 hosts at an interval that makes the data's time keep pace with the clock, so that
# "the last 5 minutes" holds the rows being written.
INTERVAL_US=$((1000 * 1000000 / RATE))
"$BIN/historian-loadgen" --url "$URL" --endpoint "/api/v3/write_lp?db=bench" \
    --connections 8 --batch-size 5000 --hosts 1000 --interval "${INTERVAL_US}us" --start now \
    --rate "$RATE" --duration "$((LOAD_SECONDS + 10))s" --warmup 5s --json > "$WORK/load.json" &
LOAD=$!
sleep 5
"$PY" benches/scripts/query_bench.py --url "$URL" --under-load --seconds "$LOAD_SECONDS"
wait "$LOAD"
"$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print("ingest during the run: %.0f rows/s, write p50 %.1f ms, p99 %.1f ms, 503s %s" % (r["rows_per_sec"], r["latency_ms"]["p50"], r["latency_ms"]["p99"], r["status_503"]))' "$WORK/load.json" || cat "$WORK/load.json"
