#!/usr/bin/env bash
# SmolLM2-135M prefill (512 tokens) and decode (128 steps), 2 threads: vvlm as it serves (prefill
# with the Q4_1 file dequantized to f32; decode from the file's own Q4_1/Q8_0 blocks) and with
# f32 decode, against llama.cpp at F32 (requantized by llama.cpp) and at Q4_1 (the same file).
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
  RAYON_NUM_THREADS=2 target/release/vvlm bench engine --parts smollm2 --prefill 512 --decode 128 --quantized-decode false --json > "target/smol-vvlm-f32.$r.json"
  python3 benches/smollm2_llamacpp.py "$g" --prefill 512 --decode 128 > "target/smol-llamacpp.$r.json"
done
ROUNDS=$ROUNDS python3 - <<'PY'
import json, os
n = int(os.environ["ROUNDS"])
vs = [json.load(open(f"target/smol-vvlm.{r}.json")) for r in range(1, n + 1)]
ls = [json.load(open(f"target/smol-llamacpp.{r}.json")) for r in range(1, n + 1)]
vf = [json.load(open(f"target/smol-vvlm-f32.{r}.json")) for r in range(1, n + 1)]
best = lambda runs, k: max(x[k] for x in runs)
f32 = {w: max(l["f32"][w + "_tok_s"] for l in ls) for w in ("prefill", "decode")}
q41 = {w: max(l["q4_1"][w + "_tok_s"] for l in ls) for w in ("prefill", "decode")}
print(f"best of {n} interleaved rounds, 2 threads")
vp = best(vs, "smollm2_prefill_tok_s")
print(f"prefill  vvlm (f32 matmuls)      {vp:7.1f} tok/s | llama.cpp F32 {f32['prefill']:7.1f} ({vp / f32['prefill']:.2f}x) | llama.cpp Q4_1 {q41['prefill']:7.1f} ({vp / q41['prefill']:.2f}x)")
vq = best(vs, "smollm2_decode_tok_s")
print(f"decode   vvlm (Q4_1/Q8_0 blocks) {vq:7.1f} tok/s | llama.cpp Q4_1 {q41['decode']:7.1f} ({vq / q41['decode']:.2f}x)")
vd = best(vf, "smollm2_decode_tok_s")
print(f"decode   vvlm (f32 matrices)     {vd:7.1f} tok/s | llama.cpp F32 {f32['decode']:7.1f} ({vd / f32['decode']:.2f}x)")
PY
