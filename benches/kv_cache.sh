#!/usr/bin/env bash
# Decode at long contexts, where a step reads mostly the KV cache: SmolLM2-135M (the GGUF's
# Q4_1/Q8_0 blocks, as served), one sequence after CONTEXT prompt tokens and BATCH sequences
# after BATCH_CONTEXT each, 128 / 64 generated tokens, 2 threads; vvlm with its f32 KV cache
# (the default) and with `kv_cache_dtype = "f16"` (`--kv-f16`), beside llama.cpp built for this
# machine (benches/build_llamacpp.sh; its cache is f16 by default) on the same file.
# Interleaved ROUNDS times; each side keeps its best round.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-engine-bench
bash models/fetch-smollm2.sh >/dev/null
peer=$(bash benches/build_llamacpp.sh)
g=models/cache/SmolLM2-135M-Instruct.Q4_1.gguf
ROUNDS=${ROUNDS:-2}
CONTEXT=${CONTEXT:-2048}
BATCH=${BATCH:-4}
BATCH_CONTEXT=${BATCH_CONTEXT:-1024}
out=target/kv-cache
mkdir -p $out
for r in $(seq "$ROUNDS"); do
  for kv in f32 f16; do
    flag=""; [ $kv = f16 ] && flag="--kv-f16"
    RAYON_NUM_THREADS=2 target/release/vvlm-engine-bench engine --parts smollm2 \
      --prefill "$CONTEXT" --decode 128 $flag --json > $out/single-$kv.$r.json
    RAYON_NUM_THREADS=2 target/release/vvlm-engine-bench batch --gguf $g --npp "$BATCH_CONTEXT" \
      --ntg 64 --npl "$BATCH" $flag --json > $out/batch-$kv.$r.json
  done
  "$peer" -m $g -c $((CONTEXT + 256)) -b 2048 -ub 512 -npp "$CONTEXT" -ntg 128 -npl 1 -t 2 \
    > $out/llamacpp-single.$r.txt 2>/dev/null
  "$peer" -m $g -c $((BATCH * (BATCH_CONTEXT + 128))) -b 2048 -ub 512 -npp "$BATCH_CONTEXT" \
    -ntg 64 -npl "$BATCH" -t 2 > $out/llamacpp-batch.$r.txt 2>/dev/null
done
ROUNDS=$ROUNDS CONTEXT=$CONTEXT BATCH=$BATCH BATCH_CONTEXT=$BATCH_CONTEXT \
FLAGS="$(cat "$(dirname "$peer")/../build-flags.txt")" CPU="$(bash benches/cpu_label.sh)" \
python3 - <<'PY'
import json, os
n = int(os.environ["ROUNDS"])
d = "target/kv-cache"
def best(f):
    return max(f(r) for r in range(1, n + 1))
def peer(name):
    v = 0.0
    for r in range(1, n + 1):
        for line in open(f"{d}/llamacpp-{name}.{r}.txt"):
            c = [x.strip() for x in line.strip().strip("|").split("|")]
            if len(c) >= 8 and c[0].isdigit():
                v = max(v, float(c[7]))
    return v
single = {kv: best(lambda r: json.load(open(f"{d}/single-{kv}.{r}.json"))["smollm2_decode_tok_s"]) for kv in ("f32", "f16")}
batch = {kv: best(lambda r: json.load(open(f"{d}/batch-{kv}.{r}.json"))[0]["decode_tok_s"]) for kv in ("f32", "f16")}
tpot = {kv: min(json.load(open(f"{d}/batch-{kv}.{r}.json"))[0]["tpot_p50_ms"] for r in range(1, n + 1)) for kv in ("f32", "f16")}
ls, lb = peer("single"), peer("batch")
print(f"{os.environ['CPU']}, 2 threads; llama.cpp built with {os.environ['FLAGS']} (f16 KV cache); best of {n} interleaved rounds")
print("| decode | vvlm f32 KV tok/s | vvlm f16 KV tok/s | f16 / f32 | llama.cpp tok/s | vvlm f16 / llama.cpp |")
print("|---|---|---|---|---|---|")
c, b, bc = os.environ["CONTEXT"], os.environ["BATCH"], os.environ["BATCH_CONTEXT"]
print(f"| 1 sequence, 128 tokens after {c} | {single['f32']:.1f} | {single['f16']:.1f} | {single['f16'] / single['f32']:.2f}x | {ls:.1f} | {single['f16'] / ls:.2f}x |")
print(f"| {b} sequences, 64 tokens after {bc} each (aggregate) | {batch['f32']:.1f} | {batch['f16']:.1f} | {batch['f16'] / batch['f32']:.2f}x | {lb:.1f} | {batch['f16'] / lb:.2f}x |")
print(f"TPOT p50 at {b} sequences: {tpot['f32']:.1f} ms (f32 KV), {tpot['f16']:.1f} ms (f16 KV)")
PY
