#!/usr/bin/env bash
# A noisy neighbour (fair admission between tenants): one release server with the default
# registry and config (the suite ladder, 32 admission places), a 3-second 320x240 video, budget
# 1T; tenant `noisy` runs 48 clients resending at once on 429, tenant `quiet` one request at a
# time. Each round runs the other server binaries given (builds from before fair admission,
# PEERS="name=path ...") side by side, then this build, then this build with the noisy tenant
# limited to 16 in flight. Usage: [PEERS="fifo=/tmp/old-vvlm"] [ROUNDS=2] benches/noisy_neighbour.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
bash benches/cpu_label.sh
work="$(mktemp -d)"; trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
ffmpeg -hide_banner -loglevel error -y -f lavfi -i testsrc2=s=320x240:r=10:d=3 -c:v libx264 -pix_fmt yuv420p "$work/v.mp4"
new=target/release/vvlm
secs="${1:-60}"
run() { # NAME BINARY NOISY_LIMIT
  local name=$1 bin=$2 limit=$3
  rm -f "$work/db"*
  noisy="$("$bin" tenant --db "$work/db" add noisy 2>/dev/null)"
  quiet="$("$bin" tenant --db "$work/db" add quiet 2>/dev/null)"
  if [ "$limit" != none ]; then $new tenant --db "$work/db" set noisy --max-in-flight "$limit" >/dev/null; fi
  "$bin" serve --bind 127.0.0.1:18091 --db "$work/db" > "$work/log" 2>&1 & pid=$!
  until curl -sf http://127.0.0.1:18091/health >/dev/null; do sleep 0.3; done
  printf '%s ' "$name"
  python3 benches/noisy_neighbour.py --base http://127.0.0.1:18091 --noisy-key "$noisy" \
    --quiet-key "$quiet" --video "$work/v.mp4" --seconds "$secs"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
for round in $(seq "${ROUNDS:-1}"); do
  for peer in ${PEERS:-}; do run "${peer%%=*}" "${peer#*=}" none; done
  run fair "$new" none
  run fair+limit16 "$new" 16
done
