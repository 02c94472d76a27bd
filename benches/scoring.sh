#!/usr/bin/env bash
# lm-eval's log-likelihood (`score`) and greedy generation (`generate`) requests through a
# release `vvlm serve` with the SmolLM2 demo checkpoint (one worker of 2 threads), sent one
# prompt per request one after another, B prompts per request, and from B concurrent clients
# (benches/scoring.py): prompts/s and whether each way answers as the first.
#   ROUNDS=2 PROMPTS=64 BATCH=16 bash benches/scoring.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
bash scripts/setup-models >/dev/null
out=target/scoring
mkdir -p $out
source benches/demo_server.sh
rm -f $out/results.jsonl
for round in $(seq "${ROUNDS:-1}"); do
  serve_demo $out/bench.db $out/serve.log
  python3 benches/scoring.py $base "$key" --prompts "${PROMPTS:-64}" --batch "${BATCH:-16}" \
    --label "round $round" | tee -a $out/results.jsonl
  stop_demo
done
echo "$(bash benches/cpu_label.sh), one worker of 2 threads"
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("target/scoring/results.jsonl")]
print("| kind | mode | prompts/s (rounds) | answers as one at a time |")
print("|---|---|---|---|")
for kind in ["score", "generate"]:
    for mode in ["one", "batched", "concurrent"]:
        rs = [r for r in rows if r["kind"] == kind and r["mode"] == mode]
        rates = ", ".join("%.1f" % r["prompts_per_s"] for r in rs)
        print(f"| {kind} | {mode} (B={rs[0]['batch']}) | {rates} | "
              f"{all(r['same_as_one'] for r in rs)} |")
PY
