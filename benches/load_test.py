#!/usr/bin/env python3
"""Bounded load test against a vvlm server on loopback: requests/s and latency percentiles of
POST /v1/plan and POST /v1/videos/caption. Stops by itself after N requests per endpoint.

    python3 benches/load_test.py --base http://127.0.0.1:8080 --key KEY --video v.mp4
"""
import argparse, http.client, json, statistics, threading, time, urllib.parse

ap = argparse.ArgumentParser()
ap.add_argument("--base", required=True)
ap.add_argument("--key", required=True)
ap.add_argument("--video", required=True)
ap.add_argument("--plan-requests", type=int, default=2000)
ap.add_argument("--plan-concurrency", type=int, default=8)
ap.add_argument("--caption-requests", type=int, default=20)
ap.add_argument("--caption-concurrency", type=int, default=2)
a = ap.parse_args()
u = urllib.parse.urlparse(a.base)
assert u.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"

def run(n, conc, make):
    lat, codes, lock = [], {}, threading.Lock()
    left = [n]
    def worker():
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            path, body, headers = make()
            t0 = time.perf_counter()
            c.request("POST", path, body=body, headers=headers)
            r = c.getresponse(); r.read()
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt); codes[r.status] = codes.get(r.status, 0) + 1
    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(conc)]
    [t.start() for t in ts]; [t.join() for t in ts]
    wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: 1e3 * lat[min(len(lat) - 1, int(p * len(lat)))]
    return {"requests": n, "concurrency": conc, "seconds": wall, "req_per_s": n / wall, "codes": codes,
            "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "mean_ms": 1e3 * statistics.mean(lat)}

auth = {"Authorization": f"Bearer {a.key}"}
plan_body = json.dumps({"budget": "5T", "prompt": "Describe the video."})
plan = run(a.plan_requests, a.plan_concurrency,
           lambda: ("/v1/plan", plan_body, {**auth, "Content-Type": "application/json"}))
video = open(a.video, "rb").read()
b = "loadtestboundary"
form = b"".join([f"--{b}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                 for k, v in [("prompt", "Describe the video."), ("budget", "1T"), ("max_tokens", "8")]])
form += f"--{b}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\n\r\n".encode() + video + f"\r\n--{b}--\r\n".encode()
cap = run(a.caption_requests, a.caption_concurrency,
          lambda: ("/v1/videos/caption", form, {**auth, "Content-Type": f"multipart/form-data; boundary={b}"}))
print(json.dumps({"plan": plan, "caption": cap}, indent=1))
