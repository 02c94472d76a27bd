#!/usr/bin/env bash
# SmolLM2-135M prefill (512 tokens) and decode (128 steps), 2 threads: vvlm (Q4_1 dequantized to
# f32 at load, what it serves) against llama.cpp at F32 (requantized by llama.cpp) and at Q4_1.
# Needs `pip install llama-cpp-python` (builds llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
bash models/fetch-smollm2.sh >/dev/null
g=models/cache/SmolLM2-135M-Instruct.Q4_1.gguf
RAYON_NUM_THREADS=2 target/release/vvlm bench engine --parts smollm2 --prefill 512 --decode 128 --json > target/smol-vvlm.json
python3 benches/smollm2_llamacpp.py "$g" --prefill 512 --decode 128 > target/smol-llamacpp.json
python3 - <<'PY'
import json
v = json.load(open("target/smol-vvlm.json")); l = json.load(open("target/smol-llamacpp.json"))
for what in ("prefill", "decode"):
    vv = v[f"smollm2_{what}_tok_s"]
    print(f"{what:8s} vvlm f32 {vv:7.1f} tok/s | llama.cpp F32 {l['f32'][what + '_tok_s']:7.1f} ({vv / l['f32'][what + '_tok_s']:.2f}x) "
          f"| llama.cpp Q4_1 {l['q4_1'][what + '_tok_s']:7.1f} ({vv / l['q4_1'][what + '_tok_s']:.2f}x)")
PY
