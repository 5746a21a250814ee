#!/usr/bin/env bash
# The test command: formatting, lints, then every test of the workspace.
# Needs the Python venv that .ci/run sets up (HISTORIAN_PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/historian-target}"
export HISTORIAN_PYTHON="${HISTORIAN_PYTHON:-/var/tmp/historian-venv/bin/python}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Two test binaries at a time: the end-to-end tests start servers of their own.
cargo test --workspace --locked -- --test-threads=2
