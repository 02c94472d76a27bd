#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on SmolLM2-135M: prefill of N tokens and single-token
decode steps, 2 threads, for the Q4_1 file and an F32 requantization of it (llama.cpp's own
quantize tool), the same token ids as `vvlm bench engine`. Prints JSON."""
import argparse, json, time
import llama_cpp
from llamacpp_f32 import f32_gguf

ap = argparse.ArgumentParser()
ap.add_argument("gguf")
ap.add_argument("--prefill", type=int, default=512)
ap.add_argument("--decode", type=int, default=128)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()

f32 = f32_gguf(a.gguf)

ids = [100 + (i * 7) % 1000 for i in range(a.prefill)]
out = {}
for name, path in (("f32", f32), ("q4_1", a.gguf)):
    llm = llama_cpp.Llama(model_path=path, n_ctx=a.prefill + a.decode + 8, n_batch=a.prefill, n_ubatch=a.prefill,
                          n_threads=a.threads, n_threads_batch=a.threads, verbose=False, logits_all=False)
    llm.eval(ids[:16]); llm.reset()
    t0 = time.perf_counter(); llm.eval(ids); pre = time.perf_counter() - t0
    tok = 42
    t0 = time.perf_counter()
    for _ in range(a.decode):
        llm.eval([tok])
    dec = time.perf_counter() - t0
    out[name] = {"prefill_tok_s": a.prefill / pre, "decode_tok_s": a.decode / dec}
    del llm
print(json.dumps(out))
