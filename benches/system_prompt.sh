#!/usr/bin/env bash
# Ten text questions under one long system prompt, through a release `vvlm serve` with the
# SmolLM2 demo checkpoint (one worker of 2 threads), with the cache off (`--cache-max-bytes 0`)
# and on: the first request's latency and the mean of the nine after it, prompt and cached
# tokens, prefill FLOPs (benches/system_prompt.py).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
bash scripts/setup-models >/dev/null
out=target/system-prompt
mkdir -p $out
source benches/demo_server.sh
run() { # label cache_bytes
  serve_demo $out/$1.db $out/$1.log --cache-max-bytes "$2"
  python3 benches/system_prompt.py $base "$key" --label "$1" >> $out/results.jsonl
  stop_demo
}
rm -f $out/results.jsonl
run off 0
run on 536870912
echo "$(bash benches/cpu_label.sh), one worker of 2 threads"
python3 - <<'PY'
import json
print("| cache | request 1 ms | requests 2-10 mean ms | prompt / cached tokens (request 2) | prefill FLOPs, request 1 / 2-10 mean | answers equal |")
print("|---|---|---|---|---|---|")
runs = [json.loads(l) for l in open("target/system-prompt/results.jsonl")]
answers = [[r["answer"] for r in d["rows"]] for d in runs]
for d in runs:
    r = d["rows"]; rest = r[1:]
    print(f"| {d['label']} | {r[0]['ms']:.0f} | {sum(x['ms'] for x in rest) / len(rest):.0f} | "
          f"{r[1]['prompt_tokens']} / {r[1]['cached_tokens']} | {r[0]['prefill_flops'] / 1e9:.1f}G / "
          f"{sum(x['prefill_flops'] for x in rest) / len(rest) / 1e9:.2f}G | {answers[0] == answers[-1]} |")
PY
