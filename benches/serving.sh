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
source benches/demo_server.sh
serve_demo $out/serving.db $out/server.log --max-batch 16
trap stop_demo EXIT
echo "$(bash benches/cpu_label.sh), one worker of 2 threads"
python3 benches/serving.py --base $base --key "$key" --model demo-smollm2 "$@"
python3 benches/serving.py --base $base --key "$key" --model demo-smollm2 \
  --temperature 0.7 --top-p 0.9 "$@"
