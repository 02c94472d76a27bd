#!/usr/bin/env python3
"""Ten text questions under one long system prompt (~600 tokens), non-streamed, one after another:
latency, prompt and cached prompt tokens, and measured prefill FLOPs per request. With the cache
on, the first request prefills the system message and every later one continues from its KV.
Run by benches/system_prompt.sh.

    python3 benches/system_prompt.py BASE_URL KEY --label L
"""
import argparse, json, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("key")
ap.add_argument("--label", default="")
a = ap.parse_args()

RULES = [
    "Answer in one or two plain sentences.",
    "Name colours and shapes plainly; never invent details that were not given.",
    "When a question cannot be answered from what was given, say so in one sentence.",
    "Prefer concrete nouns to adjectives, and numbers to vague quantities.",
    "Do not repeat the question, do not apologise, and do not add a preamble.",
    "If a question is ambiguous, answer the most likely reading and name it.",
    "Use the metric system for distances and the 24-hour clock for times.",
    "Keep names, titles and quotations exactly as the user wrote them.",
]
SYSTEM = ("You are the assistant of a video question-answering service. "
          + " ".join(f"Rule {i + 1}: {r}" for i, r in enumerate(RULES * 4)))
QUESTIONS = [
    "What is the capital of France?", "Name three colours.", "What is 2 + 2?",
    "Say hello in Spanish.", "What shape has three sides?", "What colour is the sky?",
    "Name a large animal.", "What is the opposite of hot?", "How many days are in a week?",
    "What do bees make?",
]
rows = []
for q in QUESTIONS:
    body = {"max_tokens": 8, "budget_flops": "10T",
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]}
    req = urllib.request.Request(a.base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + a.key,
                                          "Content-Type": "application/json"})
    t = time.perf_counter()
    r = json.load(urllib.request.urlopen(req))
    ms = (time.perf_counter() - t) * 1e3
    u = r["usage"]
    rows.append({"ms": ms, "prompt_tokens": u["prompt_tokens"],
                 "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                 "prefill_flops": u["measured_flops"]["lm_prefill"],
                 "answer": r["choices"][0]["message"]["content"]})
print(json.dumps({"label": a.label, "rows": rows}))
