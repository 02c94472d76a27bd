#!/usr/bin/env bash
# SmolLM2-135M prefill (512 tokens) and decode (128 steps), 2 threads: vvlm (Q4_1 dequantized to
# f32 at load, what it serves) against llama.cpp at F32 (requantized by llama.cpp) and at Q4_1.
# Needs `pip install llama-cpp-python` (builds llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
bash models/fetch-smollm2.sh >/dev/null
g=models/cache/SmolLM2-135M-Instruct.Q4_1.gguf
# The two run interleaved, ROUNDS times each; each side keeps its best round (a shared machine's
# noise only ever slows a run down).
ROUNDS=${ROUNDS:-2}
for r in $(seq "$ROUNDS"); do
  RAYON_NUM_THREADS=2 target/release/vvlm bench engine --parts smollm2 --prefill 512 --decode 128 --json > "target/smol-vvlm.$r.json"
  python3 benches/smollm2_llamacpp.py "$g" --prefill 512 --decode 128 > "target/smol-llamacpp.$r.json"
done
ROUNDS=$ROUNDS python3 - <<'PY'
import json, os
n = int(os.environ["ROUNDS"])
vs = [json.load(open(f"target/smol-vvlm.{r}.json")) for r in range(1, n + 1)]
ls = [json.load(open(f"target/smol-llamacpp.{r}.json")) for r in range(1, n + 1)]
print(f"best of {n} interleaved rounds, 2 threads")
for what in ("prefill", "decode"):
    vv = max(v[f"smollm2_{what}_tok_s"] for v in vs)
    f32 = max(l["f32"][what + "_tok_s"] for l in ls)
    q41 = max(l["q4_1"][what + "_tok_s"] for l in ls)
    print(f"{what:8s} vvlm f32 {vv:7.1f} tok/s | llama.cpp F32 {f32:7.1f} ({vv / f32:.2f}x) "
          f"| llama.cpp Q4_1 {q41:7.1f} ({vv / q41:.2f}x)")
PY
