#!/usr/bin/env python3
"""Next-token logits of SmolLM2-135M from vvlm (the Q4_1 GGUF dequantized to f32, what it serves)
against llama.cpp (llama-cpp-python) on the same token ids: llama.cpp running the F32
requantization of the same file (the same dequantized weights, so this checks the forward pass:
measured max abs difference ~1e-2 over a logit range of ~40, from summation order) and llama.cpp running Q4_1 itself (which
also quantizes activations to 8 bits in its dot products, so only the top tokens should agree).

    python3 benches/smollm2_logits_vs_llamacpp.py [--checkpoint models/cache/demo-smollm2]
        [--write-fixture tests/fixtures/smollm2-llamacpp/logits.safetensors]

--write-fixture saves the prompts' ids and llama.cpp F32 logits, which the engine's test
`smollm2::logits_match_llama_cpp_f32` compares against without llama.cpp installed.
"""
import argparse, json, os, subprocess, tempfile
import numpy as np
import llama_cpp
from llamacpp_f32 import f32_gguf

ap = argparse.ArgumentParser()
ap.add_argument("--gguf", default="models/cache/SmolLM2-135M-Instruct.Q4_1.gguf")
ap.add_argument("--checkpoint", default="models/cache/demo-smollm2")
ap.add_argument("--vvlm", default="target/release/vvlm")
ap.add_argument("--write-fixture")
a = ap.parse_args()

f32 = f32_gguf(a.gguf)

prompts = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "Once upon a time, in a small village by the sea, there lived"]
report = []
fixture = {}
for n, text in enumerate(prompts):
    runs = {}
    for name, path in (("llama.cpp F32", f32), ("llama.cpp Q4_1", a.gguf)):
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, logits_all=True, n_threads=2, verbose=False)
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.eval(ids)
        runs[name] = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
        if name == "llama.cpp F32":
            fixture[f"prompt{n}.ids"] = np.array(ids, dtype=np.int64)
            fixture[f"prompt{n}.logits"] = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
        del llm
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "logits.json")
        subprocess.run([a.vvlm, "debug", "logits", "--checkpoint", a.checkpoint,
                        "--ids", ",".join(map(str, ids)), "--out", out], check=True, stdout=subprocess.DEVNULL)
        v = np.array(json.load(open(out))["logits"], dtype=np.float64)
    for name, ref in runs.items():
        top = lambda x, k: list(np.argsort(-x)[:k])
        row = {"prompt_tokens": len(ids), "against": name,
               "max_abs_diff": float(np.abs(v - ref).max()),
               "logit_range": float(ref.max() - ref.min()),
               "top1_equal": top(v, 1) == top(ref, 1),
               "top5_overlap": len(set(top(v, 5)) & set(top(ref, 5)))}
        report.append(row)
        print(json.dumps(row))
if a.write_fixture:
    from safetensors.numpy import save_file
    os.makedirs(os.path.dirname(a.write_fixture), exist_ok=True)
    save_file(fixture, a.write_fixture, metadata={"source": "llama-cpp-python " + llama_cpp.__version__ + " on " + os.path.basename(f32)})
    print("wrote", a.write_fixture)
