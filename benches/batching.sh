#!/usr/bin/env bash
# Batched decode, side by side on this machine: `vvlm bench batch` (SmolLM2-135M decoding from
# its Q4_1/Q8_0 blocks, 2 threads) and llama.cpp's `llama-batched-bench` on the same GGUF file,
# built for this machine's instruction set by benches/build_llamacpp.sh. Both: 32 prompt tokens
# and 128 generated tokens per sequence, B = 1, 2, 4, 8, 16 sequences, 2 threads. Interleaved
# ROUNDS times; each side keeps its best round per B (noise only slows a run down). vvlm runs
# twice a round: with its default f32 KV cache and with an f16 one (llama.cpp's default).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-engine-bench
bash models/fetch-smollm2.sh >/dev/null
peer=$(bash benches/build_llamacpp.sh)
g=models/cache/SmolLM2-135M-Instruct.Q4_1.gguf
ROUNDS=${ROUNDS:-2}
out=target/batching
mkdir -p $out
for r in $(seq "$ROUNDS"); do
  RAYON_NUM_THREADS=2 target/release/vvlm-engine-bench batch --gguf $g --npp 32 --ntg 128 \
    --npl 1,2,4,8,16 --json > $out/vvlm.$r.json
  # With an f16 KV cache, as llama.cpp keeps its own by default (like for like).
  RAYON_NUM_THREADS=2 target/release/vvlm-engine-bench batch --gguf $g --npp 32 --ntg 128 \
    --npl 1,2,4,8,16 --kv-f16 --json > $out/vvlm-kv-f16.$r.json
  "$peer" -m $g -c 4096 -b 2048 -ub 512 -npp 32 -ntg 128 -npl 1,2,4,8,16 -t 2 \
    > $out/llamacpp.$r.txt 2>/dev/null
done
ROUNDS=$ROUNDS FLAGS="$(cat "$(dirname "$peer")/../build-flags.txt")" CPU="$(bash benches/cpu_label.sh)" \
python3 - <<'PY'
import json, os, re
n = int(os.environ["ROUNDS"])
def best_rows(name):
    best = {}
    for r in range(1, n + 1):
        for row in json.load(open(f"target/batching/{name}.{r}.json")):
            b = row["batch"]
            if b not in best or row["decode_tok_s"] > best[b]["decode_tok_s"]:
                best[b] = row
    return best
vv = best_rows("vvlm")
vh = best_rows("vvlm-kv-f16")
lc = {}
for r in range(1, n + 1):
    for line in open(f"target/batching/llamacpp.{r}.txt"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit():
            pp, tg, b = int(cells[0]), int(cells[1]), int(cells[2])
            s_tg = float(cells[7])
            lc[b] = max(lc.get(b, 0.0), s_tg)
single = max(r["sequential_decode_tok_s"] for r in vv.values())
print(f"{os.environ['CPU']}, 2 threads; llama.cpp built with {os.environ['FLAGS']}; best of {n} interleaved rounds")
single_h = max(r["sequential_decode_tok_s"] for r in vh.values())
print("| B | vvlm batched tok/s | vvlm / its single | vvlm TPOT p50 / p99 ms | vvlm f16 KV tok/s (TPOT p50) | llama.cpp S_TG tok/s | vvlm / llama.cpp (f16 KV) |")
print("|---|---|---|---|---|---|---|")
for b in sorted(vv):
    v, h = vv[b], vh[b]
    l = lc.get(b, float("nan"))
    print(f"| {b} | {v['decode_tok_s']:.1f} | {v['decode_tok_s'] / single:.2f}x | {v['tpot_p50_ms']:.1f} / {v['tpot_p99_ms']:.1f} | {h['decode_tok_s']:.1f} ({h['tpot_p50_ms']:.1f}) | {l:.1f} | {v['decode_tok_s'] / l:.2f}x ({h['decode_tok_s'] / l:.2f}x) |")
print(f"vvlm one sequence alone: {single:.1f} tok/s (f16 KV: {single_h:.1f})")
PY
