#!/usr/bin/env bash
# Batches beside interactive traffic: benches/batch_priority.py against one release `vvlm serve`
# on loopback with the SmolLM2 demo checkpoint (one worker of 2 threads, its batch up to 16
# sequences unless MAX_BATCH is set, `--batch-concurrency` lines at once: 2 unless
# BATCH_CONCURRENCY is set; of them
# `--batch-rows-beside-interactive` decode beside an interactive request: the configured default
# unless BATCH_ROWS is set). Extra
# arguments go to batch_priority.py (e.g. --seconds 20).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
bash scripts/setup-models >/dev/null
out=target/batch-priority
mkdir -p $out
source benches/demo_server.sh
serve_demo $out/bench.db $out/server.log --max-batch "${MAX_BATCH:-16}" \
  --batch-concurrency "${BATCH_CONCURRENCY:-2}" \
  ${BATCH_ROWS:+--batch-rows-beside-interactive "$BATCH_ROWS"}
trap stop_demo EXIT
echo "$(bash benches/cpu_label.sh), one worker of 2 threads, batch up to ${MAX_BATCH:-16} sequences, batch concurrency ${BATCH_CONCURRENCY:-2}, rows beside interactive ${BATCH_ROWS:-default}"
python3 benches/batch_priority.py --base $base --key "$key" --model demo-smollm2 "$@"
