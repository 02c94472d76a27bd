#!/usr/bin/env bash
# Overload goodput (the request-path issue's benchmark): a release server with the default
# registry and config, a 3-second 320x240 video, budget 1T, 16 then 64 clients resending at once
# on 429, 60 s each. Usage: benches/overload.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
work="$(mktemp -d)"; trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
ffmpeg -hide_banner -loglevel error -y -f lavfi -i testsrc2=s=320x240:r=10:d=3 -c:v libx264 -pix_fmt yuv420p "$work/v.mp4"
key="$(target/release/vvlm tenant --db "$work/db" add load 2>/dev/null)"
target/release/vvlm serve --bind 127.0.0.1:18090 --db "$work/db" > "$work/log" 2>&1 & pid=$!
until curl -sf http://127.0.0.1:18090/health >/dev/null; do sleep 0.3; done
for c in 16 64; do
  python3 benches/overload.py --base http://127.0.0.1:18090 --key "$key" --video "$work/v.mp4" \
    --clients "$c" --seconds "${1:-60}"
done
