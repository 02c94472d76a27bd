#!/usr/bin/env bash
# Streaming chat through the whole server (HTTP, admission, ledger, the scheduler's batch,
# SSE), at 1, 2, 4, 8 and 16 concurrent clients: benches/serving.py against one release
# `vvlm serve` on loopback with the SmolLM2 demo checkpoint (text only; one worker of 2
# threads, its batch up to 16 sequences), greedy and sampled (temperature 0.7, top-p 0.9).
# Extra arguments go to serving.py (e.g. --concurrency 1,8 --rounds 1).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
bash scripts/setup-models >/dev/null
out=target/serving
mkdir -p $out
db=$out/serving.db
rm -f "$db"
key=$(target/release/vvlm tenant --db "$db" add bench --per-request-max 1P 2>/dev/null)
port=$((20000 + RANDOM % 20000))
target/release/vvlm serve --db "$db" --bind 127.0.0.1:$port --models-dir models/text-demo \
  --workers 1 --threads-per-worker 2 --max-batch 16 > $out/server.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 0.2; done
echo "$(bash benches/cpu_label.sh), one worker of 2 threads"
python3 benches/serving.py --base http://127.0.0.1:$port --key "$key" --model demo-smollm2 "$@"
python3 benches/serving.py --base http://127.0.0.1:$port --key "$key" --model demo-smollm2 \
  --temperature 0.7 --top-p 0.9 "$@"
