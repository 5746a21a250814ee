#!/bin/sh
# Streams the MES demo: every 10 s, the machine signals and MES events of the last 10 s
# (historian-datagen mes), posted as line protocol with the generator's writer token.
set -eu
URL="${HISTORIAN_URL:-http://historian:8181}"
TOKEN=$(cat /secrets/generator.token)
while true; do
    start=$(date -u -d '-10 seconds' +%Y-%m-%dT%H:%M:%SZ)
    historian-datagen mes --seed "$(date +%s)" --lines 2 --machines 3 --interval 1s \
        --start "$start" --duration 10s --out /tmp/batch.lp
    curl -fsS -H "Authorization: Bearer $TOKEN" --data-binary @/tmp/batch.lp \
        "$URL/api/v3/write_lp?db=plant" || echo "write failed; retrying" >&2
    sleep 10
done
