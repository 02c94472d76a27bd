"""Training the ladder: the vision tower once (per-patch targets), then every LM rung on frozen
features with a mixture of frame counts and pooling sides, then evaluation and export.

    python -m vvlm_train.train tower    --work W
    python -m vvlm_train.train features --work W
    python -m vvlm_train.train lm       --work W --size m --videos 3200
    python -m vvlm_train.train eval     --work W --rung m-n3200 --split test
    python -m vvlm_train.train export   --work W --rung m-n3200 --out models/ladder/...

W holds the suite's frame dumps (W/frames/<split>/frames.npy, labels.npy, from `vvlm suite
frames`), the suite folder (W/suite/<split>/items.jsonl) and everything this writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file, load_file
from tokenizers import Tokenizer

from . import data as D
from .model import SiglipTower, TextConfig, VideoVlm, VisionConfig, normalise, pool

VISION = VisionConfig()
# The LM ladder: Llama architecture, non-embedding parameters ~8x apart and more end to end.
SIZES = {
    "s": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4),
    "m": dict(hidden_size=96, intermediate_size=288, num_hidden_layers=4, num_attention_heads=4),
    "l": dict(hidden_size=112, intermediate_size=336, num_hidden_layers=6, num_attention_heads=4),
}
# Peak learning rate per size: the wider, deeper LMs need a smaller one to leave the
# answer-prior plateau (l at 3e-3 stayed on it for 800 steps; at 1e-3 it left by step 300).
LEARNING_RATES = {"s": 3e-3, "m": 1.5e-3, "l": 1e-3}
FRAME_CHOICES = [1, 2, 4, 8, 16, 32]
SIDE_CHOICES = list(range(1, VISION.grid + 1))
HEADS = {"colour": 9, "shape": 10, "background": 4, "row": 8, "col": 8}


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# ---------------------------------------------------------------- tower
def patch_targets(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """labels uint8 [N, g*g, 3] -> per-patch class targets, with row/col of each patch."""
    g = VISION.grid
    n = labels.shape[0]
    idx = torch.arange(g * g)
    return {
        "colour": labels[..., 0].long(), "shape": labels[..., 1].long(),
        "background": labels[..., 2].long(),
        "row": (idx // g).expand(n, -1), "col": (idx % g).expand(n, -1),
    }


def tower_loss(tower, head, frames_u8, labels):
    feats = tower(normalise(frames_u8))
    out = head(feats)
    tg = patch_targets(labels)
    loss, acc, o = 0.0, {}, 0
    # Object patches are rare (most patches are background): weight them up.
    weight = 1.0 + 4.0 * (tg["shape"] > 0).float()
    for name, k in HEADS.items():
        logits = out[..., o:o + k]
        o += k
        ce = F.cross_entropy(logits.reshape(-1, k), tg[name].reshape(-1), reduction="none")
        loss = loss + (ce * weight.reshape(-1)).sum() / weight.sum()
        acc[name] = (logits.argmax(-1) == tg[name]).float().mean().item()
    small = tg["shape"] >= 5
    if small.any():
        pred = out[..., HEADS["colour"]:HEADS["colour"] + HEADS["shape"]].argmax(-1)
        acc["small_shape"] = (pred[small] == tg["shape"][small]).float().mean().item()
    return loss, acc


def cmd_tower(a):
    seed_all(a.seed)
    work = Path(a.work)
    frames, labels = D.load_frames(work / "frames" / "train")
    vframes, vlabels = D.load_frames(work / "frames" / "val")
    tower = SiglipTower(VISION)
    head = nn.Linear(VISION.hidden_size, sum(HEADS.values()))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    n_videos = frames.shape[0]
    t0 = time.time()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr)
        v = np.random.randint(0, n_videos, a.batch)
        f = np.random.randint(0, frames.shape[1], a.batch)
        x = torch.from_numpy(np.stack([frames[i, j] for i, j in zip(v, f)]))
        y = torch.from_numpy(np.stack([labels[i, j] for i, j in zip(v, f)]))
        loss, acc = tower_loss(tower, head, x, y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == a.steps - 1:
            log(f"tower step {step} loss {loss.item():.4f} " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    # Held-out check (val videos): a linear probe of what the LM will read.
    with torch.no_grad():
        rng = np.random.default_rng(0)
        v = rng.integers(0, vframes.shape[0], 512)
        f = rng.integers(0, vframes.shape[1], 512)
        x = torch.from_numpy(np.stack([vframes[i, j] for i, j in zip(v, f)]))
        y = torch.from_numpy(np.stack([vlabels[i, j] for i, j in zip(v, f)]))
        _, acc = tower_loss(tower, head, x, y)
    report = {"steps": a.steps, "batch": a.batch, "seconds": round(time.time() - t0, 1),
              "val_patch_accuracy": acc, "config": VISION.hf()}
    log(f"tower val {acc}")
    out = work / "tower"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(out / "tower.safetensors"))
    (out / "report.json").write_text(json.dumps(report, indent=2))


def load_tower(work: Path) -> SiglipTower:
    t = SiglipTower(VISION)
    t.load_state_dict(load_file(str(work / "tower" / "tower.safetensors")))
    t.eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def cmd_features(a):
    work = Path(a.work)
    tower = load_tower(work)
    for split in a.splits.split(","):
        frames, _ = D.load_frames(work / "frames" / split)
        n, t = frames.shape[:2]
        out = np.lib.format.open_memmap(
            work / "frames" / split / "features.npy", mode="w+", dtype=np.float16,
            shape=(n, t, VISION.grid ** 2, VISION.hidden_size))
        t0 = time.time()
        with torch.no_grad():
            for i in range(0, n, 16):
                x = torch.from_numpy(np.ascontiguousarray(frames[i:i + 16])).reshape(-1, *frames.shape[2:])
                f = tower(normalise(x)).reshape(-1, t, VISION.grid ** 2, VISION.hidden_size)
                out[i:i + 16] = f.numpy().astype(np.float16)
        out.flush()
        log(f"features {split}: {n} videos x {t} frames in {time.time() - t0:.0f}s")


# ---------------------------------------------------------------- LM
class Examples:
    """Items of a split with their token ids and feature rows."""

    def __init__(self, work: Path, split: str, tok: Tokenizer, videos: int | None = None):
        self.items = D.read_items(work / "suite" / split)
        self.video_row = D.video_index(self.items)
        if videos is not None:
            keep = {v for v, r in self.video_row.items() if r < videos}
            self.items = [it for it in self.items if it["video"] in keep]
        self.features = np.load(work / "frames" / split / "features.npy", mmap_mode="r")
        self.tok = tok
        # The served prompt with the Plain template: the video's tokens, then "\n{question}\n".
        self.q_ids = [tok.encode(f"\n{it['question']}\n", add_special_tokens=False).ids for it in self.items]
        self.a_ids = [tok.encode(it["answer"], add_special_tokens=False).ids + [D.EOS] for it in self.items]
        self.rows = [self.video_row[it["video"]] for it in self.items]

    def feats(self, idx, frames: int) -> torch.Tensor:
        fi = D.frame_indices(frames, self.features.shape[1])
        rows = [self.rows[i] for i in idx]
        return torch.from_numpy(np.stack([self.features[r][fi] for r in rows]).astype(np.float32))


def video_groups(ex: Examples) -> list[list[int]]:
    """Item indices grouped by video (every family of a video)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(ex.rows):
        groups.setdefault(r, []).append(i)
    return list(groups.values())


def multi_qa_loss(model, ex, groups, frames, side, rng: random.Random):
    """One sequence per video: its visual tokens, then every item's question and answer (+EOS)
    in a random order, as multi-turn instruction data is laid out. The first question sits
    exactly where a served prompt puts it. Loss: mean over answers of each answer's mean token
    loss."""
    rows = [ex.rows[g[0]] for g in groups]
    fi = D.frame_indices(frames, ex.features.shape[1])
    feats = torch.from_numpy(np.stack([ex.features[r][fi] for r in rows]).astype(np.float32))
    vis = model.visual_tokens(feats, side)
    lv = vis.shape[1]
    seqs, spans = [], []
    for g in groups:
        order = g[:]
        rng.shuffle(order)
        ids, sp = [], []
        for i in order:
            ids += ex.q_ids[i]
            sp.append((len(ids), ex.a_ids[i]))
            ids += ex.a_ids[i]
        seqs.append(ids)
        spans.append(sp)
    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), D.PAD, dtype=torch.long)
    targets = torch.full((len(seqs), L), -100, dtype=torch.long)
    weights = torch.zeros(len(seqs), L)
    for b, (x, sp) in enumerate(zip(seqs, spans)):
        ids[b, :len(x)] = torch.tensor(x)
        for start, ans in sp:
            targets[b, start:start + len(ans)] = torch.tensor(ans)
            weights[b, start:start + len(ans)] = 1.0 / len(ans)
    logits = model.language_model.model(torch.cat([vis, model.embed(ids)], dim=1))
    pred = logits[:, lv - 1:lv - 1 + L]
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1),
                         ignore_index=-100, reduction="none")
    return (ce * weights.reshape(-1)).sum() / weights.sum()


def make_model(size: str, vocab: int, tower=None) -> VideoVlm:
    tc = TextConfig(vocab_size=vocab, **SIZES[size])
    m = VideoVlm(VISION, tc, tower)
    # Linear layers keep PyTorch's default init (uniform, 1/sqrt(fan_in)): at these widths it
    # gives attention logits large enough to become selective quickly (std 0.02, GPT-2's
    # choice for width 768, left the LMs on the answer-prior plateau for hundreds of steps).
    nn.init.normal_(m.language_model.model.embed_tokens.weight, std=0.02)
    return m


def batch_inputs(model: VideoVlm, ex: Examples, idx, frames: int, side: int, with_answer: bool):
    """Embeddings [B, L, h] of video + question (+ answer), right-padded, with the positions of
    the answer's targets."""
    vis = model.visual_tokens(ex.feats(idx, frames), side)  # [B, Lv, h]
    seqs, tgt = [], []
    for i in idx:
        text = ex.q_ids[i] + (ex.a_ids[i] if with_answer else [])
        seqs.append(text)
    L = max(len(s) for s in seqs)
    ids = torch.full((len(idx), L), D.PAD, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
    emb = torch.cat([vis, model.embed(ids)], dim=1)
    return emb, ids, vis.shape[1]


def lm_loss(model, ex, idx, frames, side):
    """Mean over items of each item's mean answer-token loss (so long captions do not outweigh
    single-word answers)."""
    emb, ids, lv = batch_inputs(model, ex, idx, frames, side, True)
    logits = model.language_model.model(emb)
    targets = torch.full(ids.shape, -100, dtype=torch.long)
    weights = torch.zeros(ids.shape)
    for b, i in enumerate(idx):
        q, ans = len(ex.q_ids[i]), ex.a_ids[i]
        targets[b, q:q + len(ans)] = torch.tensor(ans)
        weights[b, q:q + len(ans)] = 1.0 / len(ans)
    # Position lv + j - 1 predicts text token j.
    pred = logits[:, lv - 1:lv - 1 + ids.shape[1]]
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1),
                         ignore_index=-100, reduction="none")
    return (ce * weights.reshape(-1)).sum() / len(idx)


# Short sequences (few visual tokens) carry the most items per step; long ones teach the LM
# to find answers among many tokens. A curriculum: the first third of training draws only
# configurations of at most SHORT visual tokens, later ones every (x_T, s) with
# LONG_SHARE probability.
SHORT, LONG_SHARE = 256, 0.3


def sample_config(rng: random.Random, progress: float = 1.0) -> tuple[int, int]:
    fixed = os.environ.get("VVLM_TRAIN_FIXED_CONFIG")
    if fixed:
        f, s = fixed.split(":")
        return int(f), int(s)
    while True:
        frames, side = rng.choice(FRAME_CHOICES), rng.choice(SIDE_CHOICES)
        short = frames * side * side <= SHORT
        if short or (progress >= 1 / 3 and rng.random() < LONG_SHARE):
            return frames, side


def cmd_lm(a):
    seed_all(a.seed)
    work = Path(a.work)
    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    ex = Examples(work, "train", tok, a.videos)
    model = make_model(a.size, tok.get_vocab_size(), load_tower(work))
    params = [p for n, p in model.named_parameters() if not n.startswith("vision_tower")]
    a.lr = a.lr or LEARNING_RATES[a.size]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    rng = random.Random(a.seed)
    name = a.name or f"{a.size}-n{a.videos}"
    groups = video_groups(ex)
    text_len = max(sum(len(ex.q_ids[i]) + len(ex.a_ids[i]) for i in g) for g in groups)
    t0 = time.time()
    losses = []
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr)
        frames, side = sample_config(rng, step / a.steps)
        length = frames * side * side + 1 + text_len
        b = max(2, min(a.batch, a.tokens // length))
        loss = multi_qa_loss(model, ex, [rng.choice(groups) for _ in range(b)], frames, side, rng)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == a.steps - 1:
            log(f"{name} step {step} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f}s)")
    out = work / "rungs" / name
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"))
    info = {"size": a.size, "videos": a.videos, "items": len(ex.items), "steps": a.steps,
            "tokens_per_step": a.tokens, "lr": a.lr, "seed": a.seed,
            "train_seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-100:])),
            "lm_non_embedding_params": model.tc.non_embedding_params(),
            "threads": torch.get_num_threads()}
    (out / "train.json").write_text(json.dumps(info, indent=2))
    log(f"{name} done: {info}")


def load_rung(work: Path, name: str, tok: Tokenizer) -> VideoVlm:
    size = json.loads((work / "rungs" / name / "train.json").read_text())["size"]
    m = make_model(size, tok.get_vocab_size())
    m.load_state_dict(load_file(str(work / "rungs" / name / "model.safetensors")))
    m.eval()
    return m


@torch.no_grad()
def evaluate(model: VideoVlm, ex: Examples, frames: int, side: int, limit_caption: int = 10**9):
    """Per-item scores at one (x_T, s): choices by the highest log-likelihood (single-token
    choices: the next-token logit), captions by greedy decoding scored by facts."""
    scores = []
    choice_ids = {}
    mc = [i for i, it in enumerate(ex.items) if it.get("choices")]
    cap = [i for i, it in enumerate(ex.items) if not it.get("choices")][:limit_caption]
    for start in range(0, len(mc), 64):
        idx = mc[start:start + 64]
        # Left-pad questions so the last prompt token sits at the same position: instead, run
        # each question length group separately (lengths are few).
        groups: dict[int, list[int]] = {}
        for i in idx:
            groups.setdefault(len(ex.q_ids[i]), []).append(i)
        for _, g in groups.items():
            emb, ids, lv = batch_inputs(model, ex, g, frames, side, False)
            logits = model.language_model.model(emb)[:, -1]
            for b, i in enumerate(g):
                it = ex.items[i]
                key = tuple(it["choices"])
                if key not in choice_ids:
                    choice_ids[key] = [ex.tok.token_to_id(c) for c in it["choices"]]
                ll = logits[b, choice_ids[key]]
                pred = it["choices"][int(ll.argmax())]
                scores.append((i, float(pred == it["answer"])))
    for start in range(0, len(cap), 32):
        g = cap[start:start + 32]
        emb, ids, lv = batch_inputs(model, ex, g, frames, side, False)
        out = [[] for _ in g]
        done = [False] * len(g)
        for _ in range(40):
            nxt = model.language_model.model(emb)[:, -1].argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    if t == D.EOS:
                        done[b] = True
                    else:
                        out[b].append(t)
            if all(done):
                break
            emb = torch.cat([emb, model.embed(nxt[:, None])], dim=1)
        for b, i in enumerate(g):
            text = ex.tok.decode(out[b])
            scores.append((i, D.score_caption(text, ex.items[i]["answer"])))
    return scores


def summarise(ex: Examples, scores):
    by = {}
    for i, s in scores:
        by.setdefault(ex.items[i].get("family", "all"), []).append(s)
    res = {}
    for f, v in by.items():
        v = np.array(v)
        res[f] = {"n": len(v), "acc": round(100 * v.mean(), 2),
                  "se": round(100 * v.std(ddof=1) / math.sqrt(len(v)), 2) if len(v) > 1 else 0.0}
    allv = np.array([s for _, s in scores])
    res["overall"] = {"n": len(allv), "acc": round(100 * allv.mean(), 2),
                      "se": round(100 * allv.std(ddof=1) / math.sqrt(len(allv)), 2)}
    return res


def cmd_eval(a):
    work = Path(a.work)
    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    ex = Examples(work, a.split, tok, a.videos)
    out = work / "eval"
    out.mkdir(exist_ok=True)
    # FRAMES:TOKENS_PER_FRAME, as `vvlm eval --grid` (tokens per frame = s*s).
    grid = []
    for g in a.grid.split(","):
        frames, tokens = map(int, g.split(":"))
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise SystemExit(f"grid point {g}: tokens per frame must be a perfect square")
        grid.append((frames, side))
    for rung in a.rungs.split(","):
        model = load_rung(work, rung, tok)
        path = out / f"{rung}-{a.split}{'' if a.videos is None else f'-v{a.videos}'}.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        for frames, side in grid:
            key = f"{frames}:{side * side}"
            if key in results:
                continue
            t0 = time.time()
            res = summarise(ex, evaluate(model, ex, frames, side, a.caption_limit))
            res["seconds"] = round(time.time() - t0, 1)
            results[key] = res
            path.write_text(json.dumps(results, indent=1))
            log(f"{rung} {a.split} T={frames} V={side * side}: " + " ".join(
                f"{f} {r['acc']:.1f}" for f, r in res.items() if isinstance(r, dict)))


# ---------------------------------------------------------------- export
def cmd_export(a):
    work = Path(a.work)
    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    model = load_rung(work, a.rung, tok)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    info = json.loads((work / "rungs" / a.rung / "train.json").read_text())
    cfg = {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "dtype": "float32",
        "image_token_index": D.IMAGE,
        "video_token_index": D.VIDEO,
        "multimodal_projector_bias": True,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "tie_word_embeddings": True,
        "text_config": model.tc.hf(),
        "vision_config": VISION.hf(),
        "vvlm_notes": [
            f"vvlm suite ladder rung {a.rung}: trained on the procedural video-QA suite only "
            f"({info['items']} items from {info['videos']} videos); answers questions about "
            "coloured shapes, motion, flashes and small objects in 64x64 videos"
        ],
        "vvlm_training": info,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "tokenizer.json").write_text((work / "tokenizer.json").read_text())
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "size": {"height": VISION.image_size,
        "width": VISION.image_size}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "resample": 3, "rescale_factor": 1 / 255, "do_normalize": True}, indent=2) + "\n")
    log(f"exported {a.rung} -> {out}")


def load_exported(ckpt: Path) -> tuple[VideoVlm, Tokenizer]:
    """A checkpoint folder as vvlm loads it (config.json, model.safetensors, tokenizer.json)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    t = cfg["text_config"]
    tc = TextConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                    intermediate_size=t["intermediate_size"],
                    num_hidden_layers=t["num_hidden_layers"],
                    num_attention_heads=t["num_attention_heads"], rms_norm_eps=t["rms_norm_eps"],
                    rope_theta=t["rope_parameters"]["rope_theta"])
    v = cfg["vision_config"]
    vc = VisionConfig(**{k: v[k] for k in VisionConfig.__dataclass_fields__})
    m = VideoVlm(vc, tc)
    m.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    m.eval()
    return m, Tokenizer.from_file(str(ckpt / "tokenizer.json"))


@torch.no_grad()
def cmd_golden(a):
    """Logits of the training code's forward pass for one video and question at several
    (x_T, s), from the frames vvlm decoded: the parity fixture for vvlm's engine."""
    work = Path(a.work)
    model, tok = load_exported(Path(a.checkpoint))
    items = D.read_items(work / "suite" / a.split)
    row = D.video_index(items)
    item = next(it for it in items if it["id"] == a.item)
    frames, _ = D.load_frames(work / "frames" / a.split)
    video = torch.from_numpy(np.ascontiguousarray(frames[row[item["video"]]]))
    q = tok.encode(f"\n{item['question']}\n", add_special_tokens=False).ids
    out = {"question_ids": torch.tensor(q, dtype=torch.int64)}
    configs = [tuple(map(int, c.split(":"))) for c in a.configs.split(",")]
    for frames_n, side in configs:
        fi = D.frame_indices(frames_n, video.shape[0])
        feats = model.vision_tower(normalise(video[fi]))[None]
        vis = model.visual_tokens(feats, side)
        emb = torch.cat([vis, model.embed(torch.tensor([q]))], dim=1)
        out[f"logits_T{frames_n}_s{side}"] = model.language_model.model(emb)[0].contiguous()
    dest = Path(a.out)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dest / "golden.safetensors"))
    import shutil
    shutil.copy(work / "suite" / a.split / item["video"], dest / Path(item["video"]).name)
    (dest / "golden.json").write_text(json.dumps({
        "checkpoint": str(a.checkpoint), "item": item, "configs": configs,
        "video_file": Path(item["video"]).name,
        "made_by": "python -m vvlm_train.train golden", "torch": torch.__version__}, indent=2) + "\n")
    log(f"golden for {item['id']} at {configs} -> {dest}")


def cmd_tokenizer(a):
    work = Path(a.work)
    items = D.read_items(work / "suite" / "train")
    tj = D.build_tokenizer(D.suite_words(items))
    (work / "tokenizer.json").write_text(json.dumps(tj, indent=1))
    log(f"tokenizer: {len(tj['model']['vocab'])} tokens")


def main():
    torch.set_num_threads(int(os.environ.get("VVLM_TRAIN_THREADS", "2")))
    p = argparse.ArgumentParser(prog="vvlm_train")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("tokenizer"); s.add_argument("--work", required=True)
    s = sub.add_parser("tower"); s.add_argument("--work", required=True)
    s.add_argument("--steps", type=int, default=1200); s.add_argument("--batch", type=int, default=32)
    s.add_argument("--lr", type=float, default=2e-3); s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("features"); s.add_argument("--work", required=True)
    s.add_argument("--splits", default="train,val,test")
    s = sub.add_parser("lm"); s.add_argument("--work", required=True)
    s.add_argument("--size", choices=list(SIZES), required=True)
    s.add_argument("--videos", type=int, required=True)
    s.add_argument("--steps", type=int, default=1200); s.add_argument("--batch", type=int, default=32)
    s.add_argument("--tokens", type=int, default=2560)
    s.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per size)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--name", default=None, help="rung name (default SIZE-nVIDEOS)")
    s = sub.add_parser("eval"); s.add_argument("--work", required=True)
    s.add_argument("--rungs", required=True); s.add_argument("--split", default="test")
    s.add_argument("--grid", default="16:16", help="FRAMES:TOKENS_PER_FRAME,...")
    s.add_argument("--caption-limit", type=int, default=100)
    s.add_argument("--videos", type=int, default=None, help="only the first N videos")
    s = sub.add_parser("export"); s.add_argument("--work", required=True)
    s.add_argument("--rung", required=True); s.add_argument("--out", required=True)
    s = sub.add_parser("golden"); s.add_argument("--work", required=True)
    s.add_argument("--checkpoint", required=True); s.add_argument("--split", default="test")
    s.add_argument("--item", required=True); s.add_argument("--out", required=True)
    s.add_argument("--configs", default="1:1,4:2,8:8,32:3")
    a = p.parse_args()
    {"tokenizer": cmd_tokenizer, "tower": cmd_tower, "features": cmd_features, "lm": cmd_lm,
     "eval": cmd_eval, "export": cmd_export,
     "golden": cmd_golden}[a.cmd](a)


if __name__ == "__main__":
    main()
