#!/usr/bin/env bash
# Shares under contention (tenant weights): one release server with the default config (the
# suite ladder, 32 admission places), a 3-second 320x240 video, budget 1T; tenants `a` and `b`
# run 24 clients each, resending at once on 429; first both at weight 1, then `a` at weight 3.
# Usage: [ROUNDS=1] benches/weighted_share.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
bash benches/cpu_label.sh
work="$(mktemp -d)"; trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
ffmpeg -hide_banner -loglevel error -y -f lavfi -i testsrc2=s=320x240:r=10:d=3 -c:v libx264 -pix_fmt yuv420p "$work/v.mp4"
vvlm=target/release/vvlm
for round in $(seq "${ROUNDS:-1}"); do
  for weight in 1 3; do
    rm -f "$work/db"*
    a="$($vvlm tenant --db "$work/db" add a --weight "$weight" 2>/dev/null)"
    b="$($vvlm tenant --db "$work/db" add b 2>/dev/null)"
    $vvlm serve --bind 127.0.0.1:18092 --db "$work/db" > "$work/log" 2>&1 & pid=$!
    until curl -sf http://127.0.0.1:18092/health >/dev/null; do sleep 0.3; done
    printf 'weight of a %s: ' "$weight"
    python3 benches/weighted_share.py --base http://127.0.0.1:18092 --keys "$a,$b" \
      --video "$work/v.mp4" --seconds "${1:-60}"
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
