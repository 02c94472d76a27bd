#!/usr/bin/env python3
"""PyTorch/transformers at the same shapes as `vvlm bench engine` / `vvlm-engine-bench` (random
weights): SigLIP so400m/14 at 384 px (26 layers, no head), a Llama-3.2-1B-shaped prefill of N
tokens then decode steps with a KV cache, and (with --batch) batched greedy decode as
`vvlm-engine-bench batch --random llama1b` measures it. Prints JSON.

CPU, as beside `vvlm bench engine` (benches/engine_vs_torch.sh):
    python3 benches/engine_vs_torch.py --threads 2 --prefill 512 --decode 16 --frames 2
GPU, as beside the bundle's engine and batch steps (scripts/gpu-run):
    python3 benches/engine_vs_torch.py --device cuda --dtype bf16 --frames 32 --prefill 4096 --profile \
        --decode 64 --batch 1,8,64 --ntg 128 --peak-tflops 989

On the CPU vision is timed one frame per call (median); on a GPU all frames go in one batch,
timed 3 times (median), as vvlm's bench does. GPU times are taken after torch.cuda.synchronize().
Eager mode, SDPA attention (transformers' default).
"""
import argparse, json, sys, time

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--threads", type=int, default=2, help="CPU threads")
ap.add_argument("--device", default="cpu", help="cpu or cuda")
ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
ap.add_argument("--prefill", type=int, default=512)
ap.add_argument("--decode", type=int, default=16)
ap.add_argument("--frames", type=int, default=2)
ap.add_argument("--parts", default="vision,llama1b", help="comma separated: vision, llama1b")
ap.add_argument("--batch", default="", help="batch sizes for batched decode, e.g. 1,8,64 (empty: skip)")
ap.add_argument("--npp", type=int, default=32, help="prompt tokens per sequence in the batch test")
ap.add_argument("--ntg", type=int, default=128, help="tokens generated per sequence in the batch test")
ap.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU")
ap.add_argument("--profile", action="store_true",
                help="one more vision pass and prefill timed by kind of op (vision_profile_ms, "
                     "llama1b_prefill_profile_ms), as vvlm's `engine --profile`")
a = ap.parse_args()
parts = set(p.strip() for p in a.parts.split(","))
try:
    batches = [int(b) for b in a.batch.split(",") if b.strip()]
except ValueError:
    ap.error(f"--batch must be comma separated integers, got {a.batch!r}")
if a.device not in ("cpu", "cuda") and not a.device.startswith("cuda:"):
    ap.error(f"--device must be cpu or cuda[:N], got {a.device!r}")

import torch  # after argument checks: `--help` and bad arguments need no torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

torch.set_num_threads(a.threads)
torch.manual_seed(0)
dev = torch.device(a.device)
dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
gpu = dev.type == "cuda"
sync = torch.cuda.synchronize if gpu else (lambda: None)


def clock():
    sync()
    return time.perf_counter()


out = {"torch": torch.__version__, "transformers": transformers.__version__, "device": a.device, "dtype": a.dtype, "threads": a.threads}
if gpu:
    out["gpu"] = torch.cuda.get_device_name(dev)
# Peak: an n^3 matmul, best of 3 (as vvlm's: 1024 on the CPU, 8192 on a GPU).
n = 8192 if gpu else 1024
x = torch.randn(n, n, device=dev, dtype=dtype); y = torch.randn(n, n, device=dev, dtype=dtype); x @ y
best = float("inf")
for _ in range(3):
    t0 = clock(); x @ y; best = min(best, clock() - t0)
out["matmul_peak_gflops"] = 2 * n ** 3 / best / 1e9
del x, y
peak_gflops = a.peak_tflops * 1e3 if a.peak_tflops else out["matmul_peak_gflops"]
out["mfu_reference_gflops"] = peak_gflops

LLAMA = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
             max_position_embeddings=131072)
ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
if int(transformers.__version__.split(".")[0]) >= 5:  # v5 names it rope_parameters, theta inside
    LLAMA["rope_parameters"] = dict(ROPE, rope_theta=500000.0)
else:
    LLAMA.update(rope_scaling=ROPE, rope_theta=500000.0)


def profiled(model, run):
    """One more `run()` with forward hooks timing, with the device synchronised around each,
    the modules vvlm's profile sections cover: linear layers (matmul, with their bias), norms,
    activations, and the attention modules' own time less their linear layers (attention: in
    transformers that includes RoPE, so vvlm's rope section belongs beside it). The rest of the
    pass is `other`; `total` is the profiled pass (slower than an unprofiled one)."""
    import torch.nn as nn
    kinds = {"matmul": 0.0, "attention": 0.0, "norm": 0.0, "activation": 0.0}
    stack = []  # [start, time of timed children]

    def kind(m):
        name = type(m).__name__
        if isinstance(m, nn.Linear):
            return "matmul"
        if "Norm" in name:
            return "norm"
        if name.endswith("Attention"):
            return "attention"
        if "Activation" in name or name in ("GELUTanh", "SiLU", "SiLUActivation", "PytorchGELUTanh", "GELU"):
            return "activation"
        return None

    def pre(m, args):
        sync()
        stack.append([time.perf_counter(), 0.0])

    def post(m, args, output):
        sync()
        t0, children = stack.pop()
        spent = time.perf_counter() - t0
        kinds[kind(m)] += spent - children
        if stack:
            stack[-1][1] += spent

    hooks = []
    for m in model.modules():
        if kind(m):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        t0 = clock()
        run()
        total = clock() - t0
    finally:
        for h in hooks:
            h.remove()
    res = {k: v * 1e3 for k, v in kinds.items()}
    res["other"] = max(0.0, total * 1e3 - sum(res.values()))
    res["total"] = total * 1e3
    return res


def llama_prefill_flops(n_tok):
    """Matmul FLOPs of a prefill, as vvlm counts them (linear layers, causal attention over the
    visible pairs, the LM head on the last position)."""
    h, q, kv, i, L, V = 2048, 2048, 512, 8192, 16, 128256
    linear = L * 2 * (h * q + 2 * h * kv + q * h + 3 * h * i)
    pairs = n_tok * (n_tok + 1) / 2
    return n_tok * linear + L * 4 * pairs * q + 2 * h * V


def siglip_frame_flops():
    """Matmul FLOPs of one 384 px frame through so400m/14's 26 layers (patch embedding, QKV/O,
    attention, MLP), as vvlm counts them."""
    d, f, p, L = 1152, 4304, 729, 26
    patch = 2 * p * (3 * 14 * 14) * d
    layer = 2 * p * (4 * d * d + 2 * d * f) + 2 * 2 * p * p * d
    return patch + L * layer


with torch.inference_mode():
    if "vision" in parts:
        cfg = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                 num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
        with torch.device(dev):
            m = SiglipVisionModel(cfg).to(dtype).eval()
        fb = max(a.frames, 1) if gpu else 1
        m(pixel_values=torch.randn(fb, 3, 384, 384, device=dev, dtype=dtype))
        times = []
        for _ in range(3 if gpu else max(a.frames, 1)):
            px = torch.randn(fb, 3, 384, 384, device=dev, dtype=dtype)
            t0 = clock()
            m(pixel_values=px, output_hidden_states=False)
            times.append((clock() - t0) / fb)
        s = sorted(times)[len(times) // 2]
        out["vision_s_per_frame"] = s
        out["vision_frames_per_s"] = 1 / s
        out["vision_gflops"] = siglip_frame_flops() / s / 1e9
        out["vision_mfu"] = out["vision_gflops"] / peak_gflops
        if a.profile:
            px = torch.randn(fb, 3, 384, 384, device=dev, dtype=dtype)
            out["vision_profile_ms"] = profiled(m, lambda: m(pixel_values=px, output_hidden_states=False))
        del m
    if "llama1b" in parts or batches:
        with torch.device(dev):
            m = LlamaForCausalLM(LlamaConfig(**LLAMA)).to(dtype).eval()
    if "llama1b" in parts:
        ids = (100 + (torch.arange(a.prefill, device=dev) * 7) % 1000).unsqueeze(0)
        m(input_ids=ids[:, :16])
        t0 = clock()
        o = m(input_ids=ids, use_cache=True, logits_to_keep=1)
        ps = clock() - t0
        out["llama1b_prefill_tok_s"] = a.prefill / ps
        out["llama1b_prefill_gflops"] = llama_prefill_flops(a.prefill) / ps / 1e9
        out["llama1b_prefill_mfu"] = out["llama1b_prefill_gflops"] / peak_gflops
        if a.profile:
            out["llama1b_prefill_profile_ms"] = profiled(
                m, lambda: m(input_ids=ids, use_cache=True, logits_to_keep=1))
        past = o.past_key_values
        nxt = o.logits[:, -1].argmax(-1, keepdim=True)
        t0 = clock()
        for _ in range(a.decode):
            o = m(input_ids=nxt, past_key_values=past, use_cache=True)
            past = o.past_key_values
            nxt = o.logits[:, -1].argmax(-1, keepdim=True)
        if a.decode:
            out["llama1b_decode_tok_s"] = a.decode / (clock() - t0)
    if batches:
        rows = []
        for b in batches:
            ids = torch.stack([(100 + (torch.arange(a.npp, device=dev) * 7 + s * 13) % 1000) for s in range(b)])
            o = m(input_ids=ids, use_cache=True, logits_to_keep=1)
            past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
            steps = []
            t_all = clock()
            for _ in range(a.ntg):
                t0 = clock()
                o = m(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
                nxt.cpu()  # the tokens reach the host each step, as a server's must
                steps.append((clock() - t0) * 1e3)
            total = clock() - t_all
            steps.sort()
            rows.append({"batch": b, "decode_tok_s": b * a.ntg / total,
                         "tpot_p50_ms": steps[len(steps) // 2],
                         "tpot_p99_ms": steps[min(len(steps) - 1, round(0.99 * (len(steps) - 1)))]})
        out["batch"] = rows
print(json.dumps(out, indent=2))
