#!/usr/bin/env bash
# Ingest throughput of Historian (fsync on and no_sync) beside VictoriaMetrics and
# InfluxDB 1.x, on the same TSBS cpu payload from historian-loadgen, one server at a time
# on this machine. Prints one JSON summary line per run and a table at the end.
#
#   cargo build --release -p historian -p historian-benches
#   DURATION=60s CONNECTIONS=16 BATCH=5000 bash benches/scripts/ingest-peers.sh
#
# Peers: Debian packages `victoria-metrics` and `influxdb` (apt-get install -y ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${CARGO_TARGET_DIR:-/var/tmp/historian-target}/release"
DURATION="${DURATION:-60s}"
CONNECTIONS="${CONNECTIONS:-16}"
BATCH="${BATCH:-5000}"
HOSTS="${HOSTS:-1000}"
# GZIP=1 sends gzip bodies; with ROWS=N every body is compressed before the run (use it with
# GZIP, so that compression does not compete with the server during the measurement).
GZIP="${GZIP:-}"
ROWS="${ROWS:-}"
ONLY="${ONLY:-historian historian-nosync victoriametrics influxdb}"
# CONFIG=file.toml starts Historian with that config (data dir and bind still from here).
CONFIG="${CONFIG:-}"
WORK="$(mktemp -d /var/tmp/ingest-peers.XXXXXX)"
RESULTS="$WORK/results.jsonl"
SERVER_PID=""
trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"' EXIT

wait_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "port $1 did not open" >&2
    return 1
}

stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

load() {
    local name="$1" port="$2" endpoint="$3"
    local length=(--duration "$DURATION")
    [ -n "$ROWS" ] && length=(--rows "$ROWS")
    local gzip=()
    [ -n "$GZIP" ] && gzip=(--gzip)
    echo "== $name: $CONNECTIONS connections x $BATCH rows/request, ${length[*]} ${gzip[*]}" >&2
    "$BIN/historian-loadgen" --url "http://127.0.0.1:$port" --endpoint "$endpoint" \
        --connections "$CONNECTIONS" --batch-size "$BATCH" --hosts "$HOSTS" \
        "${length[@]}" "${gzip[@]}" --pid "$SERVER_PID" --json \
        | sed "s/^{/{\"server\":\"$name\",/" | tee -a "$RESULTS"
}

for run in $ONLY; do
    case "$run" in
    historian | historian-nosync)
        mkdir -p "$WORK/$run"
        config=()
        [ -n "$CONFIG" ] && config=(--config "$CONFIG")
        "$BIN/historian" serve "${config[@]}" --data-dir "$WORK/$run" --http-bind 127.0.0.1:18181 \
            > "$WORK/$run.log" 2>&1 &
        SERVER_PID=$!
        wait_port 18181
        # loadgen reads the admin token from HISTORIAN_TOKEN; peers ignore it.
        export HISTORIAN_TOKEN="$(cat "$WORK/$run/admin-token")"
        endpoint="/api/v3/write_lp?db=bench&precision=ns"
        [ "$run" = historian-nosync ] && endpoint="$endpoint&no_sync=true"
        load "$run" 18181 "$endpoint"
        curl -s -H "Authorization: Bearer $HISTORIAN_TOKEN" http://127.0.0.1:18181/metrics | grep -E '^historian_(wal_fsyncs|write_requests|writes_throttled|files|partitions)' >&2 || true
        # Files per partition in the latest manifest, before the final flush adds any.
        python3 - "$WORK/$run/lake/databases/bench/manifest/cpu" <<'PY' >&2 || true
import json, os, sys, collections
d = sys.argv[1]
latest = sorted(f for f in os.listdir(d) if f.endswith(".json"))[-1]
m = json.load(open(os.path.join(d, latest)))
counts = collections.Counter(f["partition"] for f in m["files"])
print("files per partition:", dict(sorted(counts.items())), "max", max(counts.values()))
PY
        stop_server
        ;;
    victoriametrics)
        victoria-metrics -storageDataPath "$WORK/vm" -httpListenAddr 127.0.0.1:18428 \
            > "$WORK/vm.log" 2>&1 &
        SERVER_PID=$!
        wait_port 18428
        load victoriametrics 18428 "/write?db=bench"
        stop_server
        ;;
    influxdb)
        mkdir -p "$WORK/influx"
        influxd config 2>/dev/null \
            | sed -e "s|/var/lib/influxdb|$WORK/influx|g" \
                  -e 's|bind-address = ":8086"|bind-address = "127.0.0.1:18086"|' \
                  -e 's|bind-address = "127.0.0.1:8088"|bind-address = "127.0.0.1:18088"|' \
                  -e 's|reporting-disabled = false|reporting-disabled = true|' \
                  -e 's|log-enabled = true|log-enabled = false|' \
            > "$WORK/influx.conf"
        influxd -config "$WORK/influx.conf" > "$WORK/influx.log" 2>&1 &
        SERVER_PID=$!
        wait_port 18086
        curl -s -XPOST http://127.0.0.1:18086/query --data-urlencode "q=CREATE DATABASE bench" > /dev/null
        load influxdb 18086 "/write?db=bench&precision=ns"
        stop_server
        ;;
    esac
done

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| server | rows/s | values/s | p50 ms | p99 ms | 503s | failed rows | server RSS min-max MiB | server CPU cores | loadgen CPU cores |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    lat = r["latency_ms"]
    rss = r.get("server_rss_kib") or {}
    print(f"| {r['server']} | {r['rows_per_sec']:,.0f} | {r['values_per_sec']:,.0f} | {lat['p50']:.1f} | {lat['p99']:.1f} "
          f"| {r['status_503']} | {r['failed_rows']} | {rss.get('min', 0)/1024:.0f}-{rss.get('max', 0)/1024:.0f} "
          f"| {r.get('server_cpu_cores') or 0:.2f} | {r.get('loadgen_cpu_cores') or 0:.2f} |")
PY
