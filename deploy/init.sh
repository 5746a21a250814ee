#!/bin/sh
# One-shot setup before the first start: the keyring (the MES table has a privacy
# profile) and the tokens that Grafana's data sources and the generator use, written to
# /secrets (one token per file). Idempotent: existing files are kept.
set -eu
CONFIG=/etc/historian/historian.toml
DATA=/var/lib/historian
if [ ! -f "$DATA/master.key" ]; then
    historian keys init --config "$CONFIG" --data-dir "$DATA"
fi
token() { # name role [attr]
    file="/secrets/$1.token"
    [ -s "$file" ] && return 0
    # Readable by Grafana (another user): the volume is mounted only where a token is used.
    umask 022
    if [ $# -ge 3 ]; then
        historian token create --data-dir "$DATA" --name "$1" --role "$2" --attr "$3" > "$file"
    else
        historian token create --data-dir "$DATA" --name "$1" --role "$2" > "$file"
    fi
}
token grafana-plant admin
token grafana-line1 line_viewer lines=line_1
token generator writer
