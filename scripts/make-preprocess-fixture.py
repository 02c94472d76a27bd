#!/usr/bin/env python3
"""Makes tests/fixtures/siglip-preprocess/reference.safetensors from frame.png with
transformers' SigLIP image processor, torchvision and PIL backends (needs torch, torchvision,
transformers, pillow, safetensors)."""
import os
from PIL import Image
from safetensors.torch import save_file
from transformers import SiglipImageProcessor, SiglipImageProcessorPil

d = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "siglip-preprocess")
img = Image.open(os.path.join(d, "frame.png")).convert("RGB")
kw = dict(size={"height": 384, "width": 384}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3)
tv = SiglipImageProcessor(**kw)(images=img, return_tensors="pt")["pixel_values"]
pil = SiglipImageProcessorPil(**kw)(images=img, return_tensors="pt")["pixel_values"]
print("torchvision vs PIL backend max abs diff:", float((tv - pil).abs().max()))
save_file({"pixel_values": tv.contiguous(), "pixel_values_pil": pil.contiguous()}, os.path.join(d, "reference.safetensors"))
