"""The served architecture in plain PyTorch: SigLIP tower, 2-layer projector, bilinear pooling,
one image_newline, Llama decoder. Parameter names are the checkpoint's (transformers' saved
LLaVA-OneVision layout), so `state_dict()` is what vvlm loads. f32 throughout.

Numerics follow transformers (and so vvlm's engine): SigLIP pre-LN layers with
gelu_pytorch_tanh, LayerNorm eps 1e-6, features = last layer output without post_layernorm;
projector linear -> exact GELU -> linear; pooling = F.interpolate(bilinear, align_corners=False,
no antialias) of the g x g grid after the projector; ONE newline after all frames; Llama with
RMSNorm (f32, eps 1e-5), rotate-half RoPE (default type), SiLU MLP, tied embeddings."""

from __future__ import annotations

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VisionConfig:
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 96
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def hf(self) -> dict:
        d = asdict(self)
        d.update(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh",
                 attention_dropout=0.0, vision_use_head=False)
        return d


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    eos_token_id: int = 2
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def non_embedding_params(self) -> int:
        h, i, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        return n * (4 * h * h + 3 * h * i + 2 * h) + h

    def hf(self) -> dict:
        return dict(
            model_type="llama", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads, head_dim=self.head_dim,
            hidden_act="silu", rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            max_position_embeddings=self.max_position_embeddings, attention_bias=False,
            mlp_bias=False, tie_word_embeddings=True, bos_token_id=None,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
        )


# ---------------------------------------------------------------- SigLIP
class SiglipEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size)
        self.position_embedding = nn.Embedding(c.grid * c.grid, c.hidden_size)

    def forward(self, x):  # [N, 3, H, W]
        p = self.patch_embedding(x).flatten(2).transpose(1, 2)
        return p + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        h = c.hidden_size
        self.heads = c.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.v_proj, self.out_proj = nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, x):
        b, n, h = x.shape
        split = lambda t: t.view(b, n, self.heads, h // self.heads).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        a = torch.softmax(q @ k.transpose(-1, -2) * (h // self.heads) ** -0.5, dim=-1)
        return self.out_proj((a @ v).transpose(1, 2).reshape(b, n, h))


class SiglipMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SiglipAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([SiglipLayer(c) for _ in range(c.num_hidden_layers)])


class SiglipTower(nn.Module):
    """Features = output of the last encoder layer, before post_layernorm (kept in the
    checkpoint for completeness, unused as in LLaVA-OneVision)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.embeddings = SiglipEmbeddings(c)
        self.encoder = SiglipEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels):  # [N, 3, H, W] normalised
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return x  # [N, g*g, hidden]


def normalise(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> f32 [..., 3, H, W] with mean = std = 0.5, as vvlm preprocesses."""
    x = frames_u8.float().movedim(-1, -3)
    return (x / 255.0 - 0.5) / 0.5


# ---------------------------------------------------------------- projector + pooling
class Projector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


def pool(tokens: torch.Tensor, grid: int, side: int) -> torch.Tensor:
    """[..., g*g, d] -> [..., s*s, d] by bilinear interpolation (align_corners=False, no
    antialias), as LLaVA-OneVision's apply_pooling."""
    lead, d = tokens.shape[:-2], tokens.shape[-1]
    x = tokens.reshape(-1, grid, grid, d).permute(0, 3, 1, 2)
    if side != grid:
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(*lead, side * side, d)


# ---------------------------------------------------------------- Llama
class RMSNorm(nn.Module):
    def __init__(self, h: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))
        self.eps = eps

    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(v + self.eps)).to(x.dtype)


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


class LlamaAttention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        h = c.hidden_size
        self.heads, self.hd = c.num_attention_heads, c.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x, cos, sin, mask):
        b, n, h = x.shape
        split = lambda t: t.view(b, n, self.heads, self.hd).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.hd ** -0.5)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, h))


class LlamaMLP(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = LlamaMLP(c)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([LlamaLayer(c) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, embeds, attn_mask=None):
        """embeds [B, L, h] -> logits [B, L, vocab]. attn_mask: bool [B, 1, L, L] (True = attend)
        for left-padded batches; None = plain causal."""
        c = self.config
        n = embeds.shape[1]
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
        t = torch.arange(n, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        mask = attn_mask
        if mask is None:
            mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x) @ self.embed_tokens.weight.T


class LanguageModel(nn.Module):
    """`language_model.model.*` in the checkpoint."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.model = LlamaModel(c)


class VideoVlm(nn.Module):
    """The served LLaVA-OneVision layout. The tower may be frozen and run ahead of time:
    `forward_features` takes its features."""

    def __init__(self, vc: VisionConfig, tc: TextConfig, tower: SiglipTower | None = None):
        super().__init__()
        self.vision_tower = tower if tower is not None else SiglipTower(vc)
        self.multi_modal_projector = Projector(vc.hidden_size, tc.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(tc.hidden_size) / math.sqrt(tc.hidden_size))
        self.language_model = LanguageModel(tc)
        self.vc, self.tc = vc, tc

    def visual_tokens(self, feats, side):
        """feats [B, T, g*g, hv] -> [B, T*s*s + 1, ht] (projector, pooling, newline)."""
        b, t = feats.shape[:2]
        p = pool(self.multi_modal_projector(feats), self.vc.grid, side)
        p = p.reshape(b, t * side * side, -1)
        nl = self.image_newline[None, None].expand(b, 1, -1)
        return torch.cat([p, nl], dim=1)

    def embed(self, ids):
        return self.language_model.model.embed_tokens(ids)
