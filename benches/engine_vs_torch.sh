#!/usr/bin/env bash
# Side by side on this machine: `vvlm bench engine` against PyTorch/transformers at the same
# shapes (f32, 2 threads each, run one after the other). Needs `pip install torch transformers`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
# Interleaved, ROUNDS times each; each side keeps its best round (noise only slows runs down).
ROUNDS=${ROUNDS:-2}
for r in $(seq "$ROUNDS"); do
  RAYON_NUM_THREADS=2 target/release/vvlm bench engine --parts vision,llama1b --frames 3 --json > "target/engine-vvlm.$r.json"
  python3 benches/engine_vs_torch.py --threads 2 --frames 3 > "target/engine-torch.$r.json"
done
ROUNDS=$ROUNDS python3 - <<'PY'
import json, os
n = int(os.environ["ROUNDS"])
vs = [json.load(open(f"target/engine-vvlm.{r}.json")) for r in range(1, n + 1)]
ts = [json.load(open(f"target/engine-torch.{r}.json")) for r in range(1, n + 1)]
best = lambda runs, k, f=max: f(r[k] for r in runs)
print(f"best of {n} interleaved rounds, 2 threads each, f32")
print(f"matmul peak 1024^3: vvlm/candle {best(vs, 'matmul_peak_gflops'):.1f} GFLOP/s, torch {best(ts, 'matmul_peak_gflops'):.1f} GFLOP/s")
vv, tv = best(vs, 'vision_s_per_frame', min), best(ts, 'vision_s_per_frame', min)
print(f"SigLIP so400m frame: vvlm {vv:.2f} s ({best(vs, 'vision_gflops'):.0f} GFLOP/s), torch {tv:.2f} s -> vvlm {tv / vv:.2f}x torch's speed")
for k, name in (("llama1b_prefill_tok_s", "Llama-1B prefill"), ("llama1b_decode_tok_s", "Llama-1B decode")):
    a, b = best(vs, k), best(ts, k)
    print(f"{name}: vvlm {a:.2f} tok/s, torch {b:.2f} tok/s -> {a / b:.2f}x")
PY
