#!/usr/bin/env bash
# Ingest rate of MES events with the privacy profile on and off, same machine, same run.
#
# The generator's `mes_event` rows (operator id, name and badge on every row, a supervisor
# on quality checks) are split into PARALLEL shards and loaded by PARALLEL concurrent
# `historian import` clients into a fresh server, once with the table's privacy profile
# (pseudonyms, AES-256-GCM cells, keyring) and once without; RUNS alternating rounds,
# median reported.
#
#   cargo build --release -p historian -p historian-benches
#   bash benches/scripts/privacy-ingest.sh
#   EXTRA_CONFIG=$'[wal]\ncommit_delay = "5ms"' bash benches/scripts/privacy-ingest.sh   # both runs
#   PERF_DIR=/var/tmp/perf RUNS=1 bash benches/scripts/privacy-ingest.sh   # perf record the server
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${CARGO_TARGET_DIR:-/var/tmp/historian-target}/release"
RUNS="${RUNS:-3}"
PARALLEL="${PARALLEL:-4}"
HOURS="${HOURS:-24}"
WORK="$(mktemp -d /var/tmp/privacy-bench.XXXXXX)"
SERVER_PID=""
trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"' EXIT
URL=http://127.0.0.1:18282

# 100 machines, ~200 events per machine and hour.
"$BIN/historian-datagen" mes --seed 1 --lines 10 --machines 10 --interval 60s \
    --event-rate 20 --start 2026-11-01T00:00:00Z --duration "${HOURS}h" --out - \
    | grep '^mes_event' > "$WORK/events.lp"
ROWS=$(wc -l < "$WORK/events.lp")
split -n "l/$PARALLEL" "$WORK/events.lp" "$WORK/shard-"
echo "== $ROWS mes_event rows, $PARALLEL concurrent importers, $RUNS rounds" >&2

PROFILE='
[tables.mes_event]
columns = ["plant", "line", "machine", "event", "job_id", "alarm_code", "result"]
[tables.mes_event.subjects]
operator_id = ["operator_name", "badge_id"]
supervisor_id = []
'

run_once() { # $1 = on|off; prints rows/s
    local data="$WORK/data-$1"
    rm -rf "$data"
    mkdir -p "$data"
    if [ "$1" = on ]; then
        printf '%s\n%s\n' "$PROFILE" "${EXTRA_CONFIG:-}" > "$WORK/historian.toml"
        "$BIN/historian" keys init --config "$WORK/historian.toml" --data-dir "$data" > /dev/null
    else
        printf '%s\n' "${EXTRA_CONFIG:-}" > "$WORK/historian.toml"
    fi
    "$BIN/historian" serve --config "$WORK/historian.toml" --data-dir "$data" \
        --http-bind 127.0.0.1:18282 > "$WORK/server-$1.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do curl -sf "$URL/health" > /dev/null && break; sleep 0.1; done
    export HISTORIAN_TOKEN="$(cat "$data/admin-token")"
    local start end perf_pid=""
    if [ -n "${PERF_DIR:-}" ]; then
        mkdir -p "$PERF_DIR"
        perf record ${PERF_ARGS:--F 1999 -g} -p "$SERVER_PID" -o "$PERF_DIR/perf-$1.data" 2> /dev/null &
        perf_pid=$!
        sleep 0.5
    fi
    start=$(date +%s.%N)
    for shard in "$WORK"/shard-*; do
        "$BIN/historian" import --url "$URL" --db bench --quiet "$shard" > /dev/null &
    done
    wait $(jobs -p | grep -v -e "^$SERVER_PID$" -e "^$perf_pid$")
    end=$(date +%s.%N)
    [ -z "$perf_pid" ] || { kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; }
    local stored
    stored=$(curl -s -H "Authorization: Bearer $HISTORIAN_TOKEN" "$URL/api/v3/query_sql" --data-urlencode "db=bench" \
        --data-urlencode "q=SELECT count(*) AS n FROM mes_event" -G | tr -dc '0-9')
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
    [ "$stored" = "$ROWS" ] || { echo "stored $stored of $ROWS rows ($1)" >&2; exit 1; }
    awk -v r="$ROWS" -v s="$start" -v e="$end" 'BEGIN { printf "%.0f\n", r / (e - s) }'
}

off=(); on=()
for i in $(seq 1 "$RUNS"); do
    off+=("$(run_once off)"); on+=("$(run_once on)")
    echo "round $i: off ${off[-1]} rows/s, on ${on[-1]} rows/s" >&2
done
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
m_off=$(median "${off[@]}"); m_on=$(median "${on[@]}")
awk -v a="$m_off" -v b="$m_on" 'BEGIN {
    printf "profile off: %d rows/s\nprofile on:  %d rows/s\nslowdown: %.1f %%\n", a, b, (1 - b / a) * 100 }'
