#!/usr/bin/env bash
# A large video by URL: one `vvlm serve` per build given (default: this tree's release build)
# fetches a 96 MiB body from a loopback HTTP server (`python3 -m http.server`) three times
# (random bytes: the request ends at the decoder's 422, so this times the fetch and the media
# path, not inference) and reports each request's time and the server's peak RSS (VmHWM).
#   PEERS="old=/path/to/old/vvlm new=target/release/vvlm" bash benches/media_url.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/media-url
mkdir -p $out
[ -f $out/big.mp4 ] || head -c $((96 * 1024 * 1024)) /dev/urandom > $out/big.mp4
if [ -z "${PEERS:-}" ]; then
  cargo build --quiet --release -p vvlm-cli
  PEERS="this=target/release/vvlm"
fi
hport=$((20000 + RANDOM % 20000))
python3 -m http.server $hport --bind 127.0.0.1 --directory $out > $out/http.log 2>&1 &
hpid=$!
trap 'kill $hpid 2>/dev/null || true' EXIT
echo "$(bash benches/cpu_label.sh)"
for peer in $PEERS; do
  label=${peer%%=*} bin=${peer#*=} port=$((20000 + RANDOM % 20000))
  rm -f $out/$label.db
  key=$("$bin" tenant --db $out/$label.db add t --per-request-max 1P 2>/dev/null)
  "$bin" serve --db $out/$label.db --bind 127.0.0.1:$port --url-allow "http://127.0.0.1:$hport/" \
    --url-private --workers 1 --threads-per-worker 2 > $out/$label.log 2>&1 &
  pid=$!
  for _ in $(seq 300); do curl -sf localhost:$port/health >/dev/null && break; sleep 0.2; done
  start=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
  for i in 1 2 3; do
    t=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' localhost:$port/v1/videos/qa \
      -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
      -d "{\"video\": \"http://127.0.0.1:$hport/big.mp4\", \"question\": \"what ?\"}")
    echo "$label request $i: HTTP ${t% *} in ${t#* } s"
  done
  peak=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
  echo "$label peak RSS $((peak / 1024)) MiB ($((start / 1024)) MiB after start)"
  kill $pid; wait $pid 2>/dev/null || true
done
