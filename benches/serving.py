#!/usr/bin/env python3
"""Streaming chat over HTTP at several concurrencies, as a serving benchmark measures it (vLLM's
benchmark_serving names): for each concurrency C, C clients each send ROUNDS streaming
`POST /v1/chat/completions` one after another (story prompts, `max_tokens`, a temperature);
per request the time to first token (first content chunk), the time per output token after it
((end - first) / (tokens - 1), tokens from the final usage chunk), the gaps between its content
chunks (inter-token latency) and the end-to-end latency;
per C the output tokens per second of all requests over the wall time. Loopback only; stops
after C x ROUNDS requests per concurrency. Run by benches/serving.sh.

    python3 benches/serving.py --base http://127.0.0.1:8080 --key KEY --model demo-smollm2
"""
import argparse, http.client, json, statistics, threading, time, urllib.parse
from story_prompts import STORY_PROMPTS

ap = argparse.ArgumentParser()
ap.add_argument("--base", required=True)
ap.add_argument("--key", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--concurrency", default="1,2,4,8,16")
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--max-tokens", type=int, default=128)
ap.add_argument("--temperature", type=float, default=0.0)
ap.add_argument("--top-p", type=float, default=1.0)
ap.add_argument("--json", action="store_true")
a = ap.parse_args()
u = urllib.parse.urlparse(a.base)
assert u.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"

PROMPTS = STORY_PROMPTS


def one(conn, i):
    """One streamed request: (ttft_s, tpot_s or None, e2e_s, completion tokens)."""
    body = json.dumps({
        "model": a.model,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": a.max_tokens,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
        "budget_flops": "1P",
    })
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body,
                 {"Authorization": f"Bearer {a.key}", "Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"HTTP {r.status}: {r.read()[:300]!r}")
    first, tokens, last, gaps = None, None, None, []
    for line in r:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        for c in chunk.get("choices", []):
            if c.get("delta", {}).get("content"):
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    r.read()  # the rest of the chunked body, so the connection takes the next request
    first = first or end
    tpot = (end - first) / (tokens - 1) if tokens and tokens > 1 else None
    return first - t0, tpot, end - t0, tokens or 0, gaps


def level(c):
    rows, lock = [], threading.Lock()

    def client(k):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        for r in range(a.rounds):
            res = one(conn, k * a.rounds + r)
            with lock:
                rows.append(res)
        conn.close()

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(c)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round((len(xs) - 1) * q))] * 1e3

    ttft = [r[0] for r in rows]
    tpot = [r[1] for r in rows if r[1] is not None]
    e2e = [r[2] for r in rows]
    tokens = sum(r[3] for r in rows)
    # Inter-token latency: every gap between two content chunks of one stream.
    itl = [g for r in rows for g in r[4]] or [0.0]
    return {
        "concurrency": c,
        "requests": len(rows),
        "output_tokens": tokens,
        "output_tok_s": tokens / wall,
        "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
        "tpot_p50_ms": pct(tpot, 0.5), "tpot_p99_ms": pct(tpot, 0.99),
        "e2e_p50_ms": pct(e2e, 0.5), "e2e_p99_ms": pct(e2e, 0.99),
        "itl_p99_ms": pct(itl, 0.99), "itl_max_ms": pct(itl, 1.0),
        "mean_output_tokens": statistics.mean(r[3] for r in rows),
    }


results = [level(int(c)) for c in a.concurrency.split(",")]
if a.json:
    print(json.dumps(results))
else:
    print(f"{a.model}, streaming chat, max_tokens {a.max_tokens}, temperature {a.temperature}, "
          f"top_p {a.top_p}, {a.rounds} requests per client")
    print("| concurrency | requests | output tok/s | mean tokens | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p99 / max ms | e2e p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['concurrency']} | {r['requests']} | {r['output_tok_s']:.1f} | {r['mean_output_tokens']:.0f} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | "
              f"{r['itl_p99_ms']:.1f} / {r['itl_max_ms']:.0f} | {r['e2e_p50_ms']:.0f} / {r['e2e_p99_ms']:.0f} |")
