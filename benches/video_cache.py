"""Ten questions about one video, cold vs cached: the same questions asked with the video cache
off (`--cache-max-bytes 0`: every question decodes and encodes the video) and on (the first
question fills the cache, the next nine reuse its frames and vision features). Reports latency
and measured FLOPs per question and in total. Run by benches/video_cache.sh.

    python3 benches/video_cache.py BASE_URL KEY VIDEO [--budget B] [--model M --frames T --tpf V]
        [--conversation]

With --conversation the ten questions are one chat (`/v1/chat/completions`): each turn sends
the video in the first user message, every earlier question and answer, then the new question;
prompt and cached prompt tokens are reported per turn.
"""

import argparse
import base64
import json
import time
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("key")
ap.add_argument("video")
ap.add_argument("--label", default="")
ap.add_argument("--budget", default="1G")
ap.add_argument("--model")
ap.add_argument("--frames", type=int)
ap.add_argument("--tpf", type=int)
ap.add_argument("--conversation", action="store_true")
a = ap.parse_args()

QUESTIONS = [
    "what colour is the background ?",
    "what colour is the flash ?",
    "which way does the yellow object move ?",
    "what shape is the small object ?",
    "what colour is the moving circle ?",
    "what colour is the flash ?",
    "what shape is the small object ?",
    "what colour is the background ?",
    "which way does the yellow object move ?",
    "what colour is the moving circle ?",
]
video = "data:video/mp4;base64," + base64.b64encode(open(a.video, "rb").read()).decode()
rows = []
conversation = []  # the chat so far: the first question with the video, then every turn
for q in QUESTIONS:
    if a.conversation:
        path = "/v1/chat/completions"
        ask = {"role": "user", "content": q}
        if not conversation:
            ask["content"] = [{"type": "video_url", "video_url": {"url": video}},
                              {"type": "text", "text": q}]
        body = {"messages": conversation + [ask], "budget_flops": a.budget, "max_tokens": 4}
    else:
        path = "/v1/videos/qa"
        body = {"video": video, "question": q, "budget": a.budget, "max_tokens": 4}
    for k, v in (("model", a.model), ("frames", a.frames), ("tokens_per_frame", a.tpf)):
        if v is not None:
            body[k] = v
    req = urllib.request.Request(
        a.base + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + a.key, "Content-Type": "application/json"},
    )
    t = time.perf_counter()
    r = json.load(urllib.request.urlopen(req))
    ms = (time.perf_counter() - t) * 1e3
    u = r["usage"]
    answer = r["choices"][0]["message"]["content"] if a.conversation else r["text"]
    if a.conversation:
        conversation += [ask, {"role": "assistant", "content": answer}]
    rows.append({
        "ms": ms,
        "measured": u["measured_flops"]["total"],
        "vision": u["measured_flops"]["vision"] + u["measured_flops"]["projector"],
        "planned": r["plan"]["cost_flops"],
        "cold": r["plan"]["cold_cost_flops"],
        "cache": u["cache"],
        "prompt_tokens": u["prompt_tokens"],
        "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
        "plan": f'{r["plan"]["model"]} T={r["plan"]["frames"]} V={r["plan"]["tokens_per_frame"]}',
        "answer": answer,
    })
print(json.dumps({"label": a.label, "rows": rows}))
