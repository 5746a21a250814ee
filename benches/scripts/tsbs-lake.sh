# Sourced by the query benches: loads the TSBS cpu-only set into a running server and waits
# until it is flushed and compacted. Needs BIN, URL, ROWS and HISTORIAN_TOKEN.

metric() { curl -s -H "Authorization: Bearer $HISTORIAN_TOKEN" "$URL/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }

# ROWS rows: 1000 hosts, 10 s apart, from 2026-01-01; then no buffered rows and no file
# or compaction change for 15 s.
load_tsbs() {
    echo "== loading $ROWS rows" >&2
    "$BIN/historian-loadgen" --url "$URL" --endpoint "/api/v3/write_lp?db=bench" \
        --connections 8 --batch-size 5000 --hosts 1000 --interval 10s \
        --start 2026-01-01T00:00:00Z --rows "$ROWS" >&2
    echo "== waiting for flushes and compaction" >&2
    until [ "$(metric historian_buffer_rows)" = "0" ]; do sleep 1; done
    local last="" stable=0 now
    while [ "$stable" -lt 15 ]; do
        now="$(metric historian_files)/$(metric historian_files_compacted_total)"
        if [ "$now" = "$last" ]; then stable=$((stable + 1)); else stable=0; last="$now"; fi
        sleep 1
    done
}
