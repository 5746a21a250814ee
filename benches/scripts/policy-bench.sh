#!/usr/bin/env bash
# Cost of access policies: the TSBS cpu-only query set over ROWS rows (default 10.08M:
# 1000 hosts, 10 s apart, 28 hours) as admin and as a policy-restricted role, median of RUNS
# runs each, interleaved per query in the same run. The role reads `cpu` through a row
# predicate over a token attribute that admits every region (so both see the same rows and
# the difference is the policy's cost: the barrier, the secured scan, no statistics, no
# lastpoint fast path).
#
#   cargo build --release -p historian -p historian-benches
#   bash .ci/run   # once: creates the Python venv with pyarrow
#   bash benches/scripts/policy-bench.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="${CARGO_TARGET_DIR:-/var/tmp/historian-target}/release"
PY="${HISTORIAN_PYTHON:-/var/tmp/historian-venv/bin/python}"
ROWS="${ROWS:-10080000}"
RUNS="${RUNS:-5}"
WORK="$(mktemp -d /var/tmp/policy-bench.XXXXXX)"
SERVER_PID=""
trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"' EXIT
URL=http://127.0.0.1:18183

# shellcheck source=tsbs-lake.sh
source benches/scripts/tsbs-lake.sh

cat > "$WORK/historian.toml" <<TOML
[persist]
closed_after = "5s"

[roles.analyst.tables.cpu]
read = true
rows = "region IN (\$regions)"
TOML
"$BIN/historian" serve --config "$WORK/historian.toml" --data-dir "$WORK/data" \
    --http-bind 127.0.0.1:18183 > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do curl -sf "$URL/health" > /dev/null && break; sleep 0.1; done
export HISTORIAN_TOKEN="$(cat "$WORK/data/admin-token")"
ROLE_TOKEN="$("$BIN/historian" token create --data-dir "$WORK/data" --role analyst --name bench \
    --attr regions=us-east-1,us-west-1,us-west-2,eu-west-1,eu-central-1,ap-southeast-1,ap-southeast-2,ap-northeast-1,sa-east-1)"

load_tsbs

echo "== TSBS queries: admin vs the analyst role, median of $RUNS" >&2
"$PY" benches/scripts/query_bench.py --url "$URL" --runs "$RUNS" --policy-token "$ROLE_TOKEN"
