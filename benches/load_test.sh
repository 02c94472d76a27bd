#!/usr/bin/env bash
# Starts a release server on 127.0.0.1 with a scratch ledger and the demo checkpoint, then runs
# benches/load_test.py (bounded; loopback only). VVLM=path runs another server binary (an A/B).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
bash scripts/setup-models >/dev/null
work="$(mktemp -d)"; trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
ffmpeg -hide_banner -loglevel error -y -f lavfi -i testsrc2=s=320x240:r=10:d=4 -c:v libx264 -pix_fmt yuv420p "$work/v.mp4"
key="$(target/release/vvlm tenant --db "$work/db" add load 2>/dev/null)"
${VVLM:-target/release/vvlm} serve --bind 127.0.0.1:18089 --db "$work/db" --queue-depth 64 > "$work/log" 2>&1 & pid=$!
until curl -sf http://127.0.0.1:18089/health >/dev/null; do sleep 0.3; done
python3 benches/load_test.py --base http://127.0.0.1:18089 --key "$key" --video "$work/v.mp4" "$@"
