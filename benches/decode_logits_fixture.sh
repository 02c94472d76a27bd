#!/usr/bin/env bash
# Writes tests/fixtures/smollm2-llamacpp/decode.safetensors: llama.cpp's next-token logits for
# SmolLM2-135M Q4_1 decoding 8 token ids one at a time (steps 1, 4 and 8 kept), the reference
# for the engine test `smollm2::quantized_decode_matches_llama_cpp` (vvlm's decode uses the same
# arithmetic: 8-bit activation blocks times the file's blocks). Needs the peer built by
# benches/build_llamacpp.sh (libllama from llama-cpp-python's sdist).
set -euo pipefail
cd "$(dirname "$0")/.."
bash models/fetch-smollm2.sh >/dev/null
peer=$(bash benches/build_llamacpp.sh)
build=$(dirname "$(dirname "$peer")")
src=$(dirname "$build")/vendor/llama.cpp
cc -O2 benches/llamacpp_decode_logits.c -I"$src/include" -I"$src/ggml/include" \
  -L"$build/bin" -lllama -Wl,-rpath,"$PWD/$build/bin" -o target/peers/llamacpp_decode_logits
# "Once upon a time, in a small village" in SmolLM2's tokenizer (the ids of the logits fixture).
ids=$(python3 -c "
from safetensors.numpy import load_file
f = load_file('tests/fixtures/smollm2-llamacpp/logits.safetensors')
print(','.join(str(int(i)) for i in f['prompt1.ids'][:8]))")
target/peers/llamacpp_decode_logits models/cache/SmolLM2-135M-Instruct.Q4_1.gguf "$ids" \
  > target/peers/decode_logits.f32 2>/dev/null
IDS=$ids FLAGS="$(cat "$build/build-flags.txt")" python3 - <<'PY'
import os, numpy as np
from safetensors.numpy import save_file
ids = np.array([int(i) for i in os.environ["IDS"].split(",")], dtype=np.int64)
logits = np.fromfile("target/peers/decode_logits.f32", dtype=np.float32).reshape(len(ids), -1)
steps = np.array([1, 4, 8], dtype=np.int64)
save_file({"ids": ids, "steps": steps, "logits": logits[steps - 1]},
          "tests/fixtures/smollm2-llamacpp/decode.safetensors",
          metadata={"source": "llama.cpp from llama-cpp-python 0.3.36, built with " + os.environ["FLAGS"]
                    + "; SmolLM2-135M-Instruct.Q4_1.gguf, one token per llama_decode, f32 KV cache, no flash attention"})
print("steps", steps.tolist(), "logit range", float(logits.max() - logits.min()))
PY
