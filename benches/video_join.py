#!/usr/bin/env python3
"""What a joining video costs the streams already running: C clients stream long chat replies
(greedy, text only); once every one has streamed its first tokens, one request with a video
(`video_url`, a `data:` URL) joins the same worker. Reported: the running streams' inter-token
gaps before the video arrived and while it was encoded and prefilled (p50, p99, max), and the
video request's time to first token and end to end. Loopback only. Run by benches/video_join.sh.

    python3 benches/video_join.py --base http://127.0.0.1:8080 --key KEY --model demo-smollm2 \
        --video crates/server/console/samples/suite-00001.mp4 --frames 16
"""
import argparse, base64, http.client, json, statistics, threading, time, urllib.parse

ap = argparse.ArgumentParser()
ap.add_argument("--base", required=True)
ap.add_argument("--key", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--video", required=True)
ap.add_argument("--frames", type=int, default=16)
ap.add_argument("--tokens-per-frame", type=int, default=16)
ap.add_argument("--clients", type=int, default=4)
ap.add_argument("--max-tokens", type=int, default=400)
ap.add_argument("--json", action="store_true")
a = ap.parse_args()
u = urllib.parse.urlparse(a.base)
assert u.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
video = "data:video/mp4;base64," + base64.b64encode(open(a.video, "rb").read()).decode()


def stream(body, on_content):
    """POSTs a streaming chat request; calls on_content(t) at each content chunk."""
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Authorization": f"Bearer {a.key}", "Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"HTTP {r.status}: {r.read()[:300]!r}")
    for line in r:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        for c in json.loads(data).get("choices", []):
            if c.get("delta", {}).get("content"):
                on_content(time.perf_counter())
    conn.close()


times = [[] for _ in range(a.clients)]
started = threading.Barrier(a.clients + 1)


def text_client(i):
    first = [True]

    def on(t):
        times[i].append(t)
        if first[0] and len(times[i]) == 8:
            first[0] = False
            started.wait()
    stream({"model": a.model, "max_tokens": a.max_tokens, "temperature": 0.0, "stream": True,
            "budget_flops": "1P",
            "messages": [{"role": "user", "content": f"Write a long story about a lighthouse keeper, part {i}."}]}, on)


threads = [threading.Thread(target=text_client, args=(i,)) for i in range(a.clients)]
for t in threads:
    t.start()
started.wait()
time.sleep(0.5)
video_times = []
t_sent = time.perf_counter()
stream({"model": a.model, "max_tokens": 8, "temperature": 0.0, "stream": True, "budget_flops": "1P",
        "frames": a.frames, "tokens_per_frame": a.tokens_per_frame,
        "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": video}},
            {"type": "text", "text": "Describe the video."}]}]},
       video_times.append)
t_end = time.perf_counter()
for t in threads:
    t.join()
t_first = video_times[0] if video_times else t_end


def gaps(lo, hi):
    g = []
    for ts in times:
        g += [b - x for x, b in zip(ts, ts[1:]) if lo <= b <= hi]
    return sorted(g)


def pct(g, p):
    return g[min(len(g) - 1, int(p * len(g)))] * 1e3 if g else float("nan")


before = gaps(t_sent - 1.0, t_sent)
during = gaps(t_sent, t_first)
out = {
    "clients": a.clients, "frames": a.frames, "tokens_per_frame": a.tokens_per_frame,
    "video_ttft_ms": (t_first - t_sent) * 1e3, "video_e2e_ms": (t_end - t_sent) * 1e3,
    "before": {"gaps": len(before), "p50_ms": pct(before, .5), "p99_ms": pct(before, .99), "max_ms": pct(before, 1)},
    "during": {"gaps": len(during), "p50_ms": pct(during, .5), "p99_ms": pct(during, .99), "max_ms": pct(during, 1)},
}
if a.json:
    print(json.dumps(out))
else:
    print(f"{a.clients} text streams; a video joins ({a.frames} frames, {a.tokens_per_frame} tokens a frame): "
          f"its TTFT {out['video_ttft_ms']:.0f} ms, e2e {out['video_e2e_ms']:.0f} ms")
    for k in ("before", "during"):
        s = out[k]
        print(f"  streams' inter-token gaps {k:>6} it: {s['gaps']:4d} gaps, p50 {s['p50_ms']:.1f} ms, "
              f"p99 {s['p99_ms']:.1f} ms, max {s['max_ms']:.1f} ms")
