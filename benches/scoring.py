#!/usr/bin/env python3
"""lm-eval's two kinds of `local-completions` request against a running `vvlm serve`, sent the
three ways lm-eval can send them: one prompt per request one after another (`batch_size=1`),
several prompts per request (`batch_size=B`: `prompt` a list), and single-prompt requests from B
clients at once (`num_concurrent=B`). Kinds: `score` (log-likelihood: `echo`, `logprobs=1`,
`max_tokens=1`, the prompt's token log-probabilities read back) and `generate` (greedy,
`max_tokens=32`). Prints one JSON line per (kind, mode): prompts/s and whether every prompt's
answer equals the one-at-a-time run's (token log-probabilities within 1e-4 for `score`, the text for
`generate`). Run by benches/scoring.sh.

    python3 benches/scoring.py BASE_URL KEY [--prompts 64] [--batch 16] [--label L]
"""
import argparse, json, time, urllib.request
from concurrent.futures import ThreadPoolExecutor

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("key")
ap.add_argument("--prompts", type=int, default=64)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--label", default="")
a = ap.parse_args()

PLACES = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
          ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi")]
LEADS = ["", "Geography quiz. ", "Answer with one word. ",
         "Here is a short question about the countries of the world and their capital cities. "]
PROMPTS = [f"{LEADS[i % len(LEADS)]}Question: what is the capital of {c}? Answer: {cap}"
           for i in range(a.prompts) for c, cap in [PLACES[i % len(PLACES)]]]

BODY = {
    "score": {"echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0},
    "generate": {"max_tokens": 32, "temperature": 0},
}


def post(prompt, kind):
    body = dict(BODY[kind], prompt=prompt, model="auto", budget_flops="100T")
    req = urllib.request.Request(a.base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + a.key,
                                          "Content-Type": "application/json"})
    r = json.load(urllib.request.urlopen(req, timeout=600))
    return [c for c in sorted(r["choices"], key=lambda c: c["index"])]


def answer(choice, kind):
    if kind == "score":
        return choice["logprobs"]["token_logprobs"]
    return choice["text"]


def same(x, y, kind):
    if kind == "generate":
        return x == y
    return len(x) == len(y) and all(
        (p is None and q is None) or (p is not None and q is not None and abs(p - q) <= 1e-4)
        for p, q in zip(x, y))


for kind in ["score", "generate"]:
    post(PROMPTS[0], kind)  # warm-up
    reference = None
    for mode in ["one", "batched", "concurrent"]:
        t = time.perf_counter()
        if mode == "one":
            got = [post(p, kind)[0] for p in PROMPTS]
        elif mode == "batched":
            got = [c for i in range(0, len(PROMPTS), a.batch)
                   for c in post(PROMPTS[i:i + a.batch], kind)]
        else:
            with ThreadPoolExecutor(a.batch) as ex:
                got = [cs[0] for cs in ex.map(lambda p: post(p, kind), PROMPTS)]
        s = time.perf_counter() - t
        answers = [answer(c, kind) for c in got]
        if reference is None:
            reference = answers
        print(json.dumps({"label": a.label, "kind": kind, "mode": mode, "prompts": len(PROMPTS),
                          "batch": a.batch, "s": s, "prompts_per_s": len(PROMPTS) / s,
                          "same_as_one": all(same(x, y, kind) for x, y in zip(answers, reference))}),
              flush=True)
