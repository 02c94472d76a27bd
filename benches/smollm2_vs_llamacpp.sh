#!/usr/bin/env bash
# SmolLM2-135M prefill (512 tokens) and decode (128 steps), one sequence, 2 threads: vvlm as it
# serves (prefill and decode from the file's own Q4_1/Q8_0 blocks with 8-bit activations), with
# f32 prefill (`--quantized-prefill false`: the file dequantized at load) and with f32 decode,
# against llama.cpp built for this machine
# (benches/build_llamacpp.sh: `llama-batched-bench -npp 512 -ntg 128 -npl 1`) at F32 (the file
# requantized by llama.cpp's `llama-quantize`: the same dequantized weights) and at Q4_1 (the
# same file). Interleaved ROUNDS times; each side keeps its best round.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-engine-bench
bash models/fetch-smollm2.sh >/dev/null
peer=$(bash benches/build_llamacpp.sh)
g=models/cache/SmolLM2-135M-Instruct.Q4_1.gguf
f32=models/cache/SmolLM2-135M-Instruct.F32.gguf
[ -f "$f32" ] || "$(dirname "$peer")/llama-quantize" --allow-requantize "$g" "$f32" F32 >/dev/null 2>&1
ROUNDS=${ROUNDS:-2}
out=target/smollm2-vs-llamacpp
mkdir -p $out
for r in $(seq "$ROUNDS"); do
  RAYON_NUM_THREADS=2 target/release/vvlm-engine-bench engine --parts smollm2 --prefill 512 --decode 128 --quantized-prefill true --json > $out/vvlm.$r.json
  RAYON_NUM_THREADS=2 target/release/vvlm-engine-bench engine --parts smollm2 --prefill 512 --decode 128 --quantized-prefill false --json > $out/vvlm-f32-prefill.$r.json
  RAYON_NUM_THREADS=2 target/release/vvlm-engine-bench engine --parts smollm2 --prefill 512 --decode 128 --quantized-decode false --json > $out/vvlm-f32.$r.json
  for m in q4_1 f32; do
    file=$g; [ $m = f32 ] && file=$f32
    "$peer" -m "$file" -c 1024 -b 512 -ub 512 -npp 512 -ntg 128 -npl 1 -t 2 > $out/llamacpp-$m.$r.txt 2>/dev/null
  done
done
ROUNDS=$ROUNDS FLAGS="$(cat "$(dirname "$peer")/../build-flags.txt")" CPU="$(bash benches/cpu_label.sh)" python3 - <<'PY'
import json, os
n = int(os.environ["ROUNDS"])
d = "target/smollm2-vs-llamacpp"
vs = [json.load(open(f"{d}/vvlm.{r}.json")) for r in range(1, n + 1)]
vf = [json.load(open(f"{d}/vvlm-f32.{r}.json")) for r in range(1, n + 1)]
vp32 = [json.load(open(f"{d}/vvlm-f32-prefill.{r}.json")) for r in range(1, n + 1)]
def peer(m):
    best = {"prefill": 0.0, "decode": 0.0}
    for r in range(1, n + 1):
        for line in open(f"{d}/llamacpp-{m}.{r}.txt"):
            c = [x.strip() for x in line.strip().strip("|").split("|")]
            if len(c) >= 10 and c[0].isdigit():
                best["prefill"] = max(best["prefill"], float(c[5]))
                best["decode"] = max(best["decode"], float(c[7]))
    return best
q41, f32 = peer("q4_1"), peer("f32")
best = lambda runs, k: max(x[k] for x in runs)
print(f"{os.environ['CPU']}, 2 threads; vvlm's decode kernels {vs[0].get('cpu_decode_kernels', '?')}; llama.cpp built with {os.environ['FLAGS']}; best of {n} interleaved rounds")
for name, runs in [("Q4_1/Q8_0 blocks, int8 activations", vs), ("f32 matmuls, dequantized file", vp32)]:
    vp = best(runs, "smollm2_prefill_tok_s")
    rss = min(x["smollm2_resident_mib"] for x in runs)
    peak = min(x["smollm2_load_peak_mib"] for x in runs)
    print(f"prefill 512  vvlm ({name}; resident after load {rss:.0f} MiB, load peak {peak:.0f} MiB) {vp:7.1f} tok/s | llama.cpp F32 {f32['prefill']:7.1f} ({vp / f32['prefill']:.2f}x) | llama.cpp Q4_1 {q41['prefill']:7.1f} ({vp / q41['prefill']:.2f}x)")
vq = best(vs, "smollm2_decode_tok_s")
print(f"decode 128   vvlm (Q4_1/Q8_0, int8 activations) {vq:7.1f} tok/s | llama.cpp Q4_1 {q41['decode']:7.1f} ({vq / q41['decode']:.2f}x)")
vd = best(vf, "smollm2_decode_tok_s")
print(f"decode 128   vvlm (f32 matrices)            {vd:7.1f} tok/s | llama.cpp F32 {f32['decode']:7.1f} ({vd / f32['decode']:.2f}x)")
PY
