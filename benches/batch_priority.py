#!/usr/bin/env python3
"""Batches beside interactive traffic: what a running batch costs an interactive user, and what
interactive traffic costs a batch. One client sends streaming chats one after another (story
prompts, greedy, `max_tokens`) for SECONDS, first with the server otherwise idle, then while a
large batch of similar chat requests runs (the batch is cancelled when the window ends); then a
batch runs alone. Reports the interactive requests' time to first token, time per output token
and end-to-end latency (p50, p90), and the batch's answered lines per minute with and without
the interactive client. Loopback only. Run by benches/batch_priority.sh.

    python3 benches/batch_priority.py --base http://127.0.0.1:8080 --key KEY --model demo-smollm2
"""
import argparse, http.client, json, statistics, time, urllib.parse, urllib.request, uuid
from story_prompts import STORY_PROMPTS

ap = argparse.ArgumentParser()
ap.add_argument("--base", required=True)
ap.add_argument("--key", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--seconds", type=float, default=40.0)
ap.add_argument("--lines", type=int, default=600, help="lines in each batch")
ap.add_argument("--max-tokens", type=int, default=64)
a = ap.parse_args()
u = urllib.parse.urlparse(a.base)
assert u.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
AUTH = {"Authorization": f"Bearer {a.key}"}

# The first six (the mix this bench's figures were measured with).
PROMPTS = STORY_PROMPTS[:6]


def chat_body(i):
    return {"model": a.model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": a.max_tokens, "temperature": 0, "budget_flops": "1P"}


def api(method, path, body=None, content_type="application/json"):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(a.base + path, data=data, method=method,
                                 headers={**AUTH, "Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def start_batch(n):
    jsonl = "".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": chat_body(i)}) + "\n" for i in range(n)).encode()
    boundary = uuid.uuid4().hex
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + jsonl + f"\r\n--{boundary}--\r\n".encode()
    f = api("POST", "/v1/files", form, f"multipart/form-data; boundary={boundary}")
    return api("POST", "/v1/batches", {"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                       "completion_window": "24h"})["id"]


def answered(batch):
    c = api("GET", f"/v1/batches/{batch}")["request_counts"]
    return c["completed"] + c["failed"]


def interactive(seconds):
    """Streaming chats one after another: lists of ttft, tpot, e2e (s)."""
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    ttft, tpot, e2e = [], [], []
    end, i = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        body = {**chat_body(i), "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {**AUTH, "Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status}: {r.read()[:300]!r}")
        first, tokens = None, None
        for line in r:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
            if chunk.get("usage") and not chunk.get("choices"):
                tokens = chunk["usage"]["completion_tokens"]
        t1 = time.perf_counter()
        ttft.append(first - t0)
        e2e.append(t1 - t0)
        if tokens and tokens > 1:
            tpot.append((t1 - first) / (tokens - 1))
        i += 1
    return ttft, tpot, e2e


def metric(name):
    """A counter from /metrics (0 when this build does not report it)."""
    with urllib.request.urlopen(urllib.request.Request(a.base + "/metrics", headers=AUTH), timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


PREEMPTION = ("vvlm_batch_lines_preempted_total", "vvlm_batch_lines_resumed_total",
              "vvlm_resume_recomputed_flops_total", "vvlm_batch_lines_resumed_kv_kept_total")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def show(name, m):
    ttft, tpot, e2e = m
    print(f"{name:<28} {len(e2e):>4} requests  TTFT p50 {pct(ttft, .5)*1e3:7.1f} p90 {pct(ttft, .9)*1e3:7.1f} ms"
          f"  TPOT p50 {pct(tpot, .5)*1e3:5.2f} p90 {pct(tpot, .9)*1e3:5.2f} ms"
          f"  e2e p50 {pct(e2e, .5):5.2f} p90 {pct(e2e, .9):5.2f} s")


alone = interactive(a.seconds)
batch = start_batch(a.lines)
t0 = time.perf_counter()
n0 = answered(batch)
m0 = [metric(n) for n in PREEMPTION]
beside = interactive(a.seconds)
beside_rate = (answered(batch) - n0) / (time.perf_counter() - t0) * 60
preemption = [metric(n) - m for n, m in zip(PREEMPTION, m0)]
api("POST", f"/v1/batches/{batch}/cancel", {})
while api("GET", f"/v1/batches/{batch}")["status"] == "cancelling":
    time.sleep(0.2)
solo = start_batch(a.lines)
t0 = time.perf_counter()
n0 = answered(solo)
time.sleep(a.seconds)
solo_rate = (answered(solo) - n0) / (time.perf_counter() - t0) * 60
api("POST", f"/v1/batches/{solo}/cancel", {})

print(f"interactive: streaming chats one after another, {a.max_tokens} tokens, greedy; "
      f"batch lines: the same chats; {a.seconds:.0f} s windows")
show("interactive, server idle", alone)
show("interactive, a batch running", beside)
print(f"batch lines per minute: alone {solo_rate:.1f}, beside the interactive client {beside_rate:.1f}")
print(f"beside the client: {preemption[0]:.0f} lines preempted for its room, {preemption[1]:.0f} resumed "
      f"where they were, {preemption[3]:.0f} with the KV they kept "
      f"({preemption[2] / 1e9:.1f} GFLOP recomputed to resume them)")
print(f"interactive e2e p50 ratio (with batch / idle): {pct(beside[2], .5) / pct(alone[2], .5):.2f}x; "
      f"TPOT p50 ratio {pct(beside[1], .5) / pct(alone[1], .5):.2f}x")
