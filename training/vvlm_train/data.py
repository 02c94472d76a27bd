"""The suite as training data: frames decoded by vvlm (`vvlm suite frames`), items, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIALS = ["<pad>", "<unk>", "<eos>", "<image>", "<video>"]
PAD, UNK, EOS, IMAGE, VIDEO = range(5)
FAMILIES = ["static", "temporal", "motion", "detail", "compositional", "caption"]


def frame_indices(frames: int, total: int = 32) -> list[int]:
    """The frames vvlm samples for x_T = `frames` from a `total`-frame video of constant rate:
    the centres of `frames` equal segments, t_i = (i + 0.5) * D / T, each mapped to the frame
    shown then (floor)."""
    return [int(np.floor((i + 0.5) * total / frames + 1e-9)) for i in range(frames)]


def read_items(split_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (split_dir / "items.jsonl").read_text().splitlines() if l.strip()]


def video_index(items: list[dict]) -> dict[str, int]:
    """Video path -> row of frames.npy (scenes.jsonl order = first appearance in items.jsonl)."""
    out: dict[str, int] = {}
    for it in items:
        out.setdefault(it["video"], len(out))
    return out


def build_tokenizer(words: list[str]) -> dict:
    """A word-level tokenizer (HF tokenizers JSON): lower-cased, split on whitespace and
    punctuation; decoding joins tokens with spaces."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in sorted(set(words)):
        if w not in vocab:
            vocab[w] = len(vocab)
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(SPECIALS)
    ]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def suite_words(items: list[dict]) -> list[str]:
    import re
    words = []
    for it in items:
        for text in [it["question"], it["answer"], *it.get("choices", [])]:
            words += re.findall(r"\w+|[^\w\s]+", text.lower())
    return words


def load_frames(dump_dir: Path):
    frames = np.load(dump_dir / "frames.npy", mmap_mode="r")
    labels = np.load(dump_dir / "labels.npy", mmap_mode="r")
    return frames, labels


def score_caption(predicted: str, reference: str) -> float:
    """The suite's caption scorer (crates/suite: `score_caption`), for training-time reports."""
    def sentences(t):
        return [" ".join(s.split()) for s in t.lower().split(".") if s.strip()]
    facts, said = sentences(reference), sentences(predicted)
    if not facts:
        return 0.0
    return sum(f in said for f in facts) / max(len(facts), len(said))
