#!/usr/bin/env bash
# Side by side on this machine: `vvlm bench engine` against PyTorch/transformers at the same
# shapes (f32, 2 threads each, run one after the other). Needs `pip install torch transformers`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
RAYON_NUM_THREADS=2 target/release/vvlm bench engine --parts vision,llama1b --json > target/engine-vvlm.json
python3 benches/engine_vs_torch.py --threads 2 > target/engine-torch.json
python3 - <<'PY'
import json
v = json.load(open("target/engine-vvlm.json")); t = json.load(open("target/engine-torch.json"))
print(f"matmul peak: vvlm/candle {v['matmul_peak_gflops']:.1f} GFLOP/s, torch {t['matmul_peak_gflops']:.1f} GFLOP/s")
print(f"SigLIP so400m frame: vvlm {v['vision_s_per_frame']:.2f} s, torch {t['vision_s_per_frame']:.2f} s -> vvlm {t['vision_s_per_frame']/v['vision_s_per_frame']:.2f}x torch's speed")
print(f"Llama-1B prefill: vvlm {v['llama1b_prefill_tok_s']:.1f} tok/s, torch {t['llama1b_prefill_tok_s']:.1f} tok/s -> {v['llama1b_prefill_tok_s']/t['llama1b_prefill_tok_s']:.2f}x")
print(f"Llama-1B decode: vvlm {v['llama1b_decode_tok_s']:.2f} tok/s, torch {t['llama1b_decode_tok_s']:.2f} tok/s -> {v['llama1b_decode_tok_s']/t['llama1b_decode_tok_s']:.2f}x")
PY
