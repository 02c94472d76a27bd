#!/usr/bin/env python3
"""Makes tests/fixtures/tiny-llava-onevision-qwen2: a tiny random LLaVA-OneVision whose LM is
Qwen2 (QKV biases, untied LM head, plain RoPE), saved by transformers in the published llava-hf
key layout, with the logits transformers computes for the tiny-llava-onevision fixture's inputs.
Needs torch, transformers, safetensors."""
import os, torch
from safetensors.torch import load_file, save_file
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
out = os.path.join(root, "tiny-llava-onevision-qwen2")
ref = load_file(os.path.join(root, "tiny-llava-onevision", "reference.safetensors"))
torch.manual_seed(4321)
cfg = LlavaOnevisionConfig(
    vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, image_size=98, patch_size=14, vision_use_head=False),
    text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512, rope_theta=1000000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=4096),
    vision_feature_layer=-1, vision_feature_select_strategy="full", video_token_index=511, image_token_index=510,
    tie_word_embeddings=False,
)
model = LlavaOnevisionForConditionalGeneration(cfg).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.dim() == 1:  # perturb biases and norms so a missing one shows
            p.add_(0.1 * torch.randn_like(p))
model.save_pretrained(out)
ids = ref["input.input_ids"]
pix = ref["input.pixel_values_videos"]
with torch.no_grad():
    o = model(input_ids=ids, pixel_values_videos=pix)
save_file({"logits": o.logits.contiguous(), "input.input_ids": ids, "input.pixel_values_videos": pix},
          os.path.join(out, "reference.safetensors"))
keys = sorted(load_file(os.path.join(out, "model.safetensors")).keys())
print(len(keys), [k for k in keys if "bias" in k and "language" in k][:3], [k for k in keys if "lm_head" in k])
