#!/usr/bin/env python3
"""PyTorch/transformers at the same shapes as `vvlm bench engine` (f32, random weights):
SigLIP so400m/14 at 384 px (26 layers, no head) per frame, and Llama-3.2-1B-shaped prefill of
N tokens then decode steps with a KV cache. Prints JSON.

    python3 benches/engine_vs_torch.py --threads 2 --prefill 512 --decode 16 --frames 2
"""
import argparse, json, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--prefill", type=int, default=512)
ap.add_argument("--decode", type=int, default=16)
ap.add_argument("--frames", type=int, default=2)
ap.add_argument("--parts", default="vision,llama1b")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
out = {"torch": torch.__version__, "threads": a.threads}

# Peak: f32 matmul 1024^3, best of 3 (same as vvlm's).
x = torch.randn(1024, 1024); y = torch.randn(1024, 1024); x @ y
best = min((lambda t0: (x @ y, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(3))
out["matmul_peak_gflops"] = 2 * 1024 ** 3 / best / 1e9

with torch.inference_mode():
    if "vision" in a.parts:
        cfg = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                 num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
        m = SiglipVisionModel(cfg).eval()
        m(pixel_values=torch.randn(1, 3, 384, 384))
        times = []  # one frame per call, median (as vvlm's bench)
        for _ in range(max(a.frames, 1)):
            px = torch.randn(1, 3, 384, 384)
            t0 = time.perf_counter()
            m(pixel_values=px, output_hidden_states=False)
            times.append(time.perf_counter() - t0)
        out["vision_s_per_frame"] = sorted(times)[len(times) // 2]
        del m
    if "llama1b" in a.parts:
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                          rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                          rope_theta=500000.0)
        m = LlamaForCausalLM(cfg).eval()
        ids = (100 + (torch.arange(a.prefill) * 7) % 1000).unsqueeze(0)
        m(input_ids=ids[:, :16])
        t0 = time.perf_counter()
        o = m(input_ids=ids, use_cache=True, logits_to_keep=1)
        out["llama1b_prefill_tok_s"] = a.prefill / (time.perf_counter() - t0)
        past = o.past_key_values
        nxt = o.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(a.decode):
            o = m(input_ids=nxt, past_key_values=past, use_cache=True)
            past = o.past_key_values
            nxt = o.logits[:, -1].argmax(-1, keepdim=True)
        out["llama1b_decode_tok_s"] = a.decode / (time.perf_counter() - t0)
print(json.dumps(out))
