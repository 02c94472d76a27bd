#!/usr/bin/env bash
# A video joining running streams, through the whole server: benches/video_join.py against one
# release `vvlm serve` on loopback with the SmolLM2 demo checkpoint (its untrained 384 px tower
# of so400m's geometry, 4 layers: ~60 ms a frame on 2 cores), one worker of 2 threads: 4 text
# streams run, then a request with a 16-frame video joins. Extra arguments go to video_join.py.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
bash scripts/setup-models >/dev/null
out=target/video-join
mkdir -p $out
db=$out/bench.db
rm -f "$db"
key=$(target/release/vvlm tenant --db "$db" add bench --per-request-max 1P 2>/dev/null)
port=$((20000 + RANDOM % 20000))
${VVLM:-target/release/vvlm} serve --db "$db" --bind 127.0.0.1:$port --models-dir models/text-demo \
  --workers 1 --threads-per-worker 2 --max-batch 16 > $out/server.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 0.2; done
echo "$(bash benches/cpu_label.sh), one worker of 2 threads"
python3 benches/video_join.py --base http://127.0.0.1:$port --key "$key" --model demo-smollm2 \
  --video crates/server/console/samples/suite-00001.mp4 "$@"
