#!/usr/bin/env python3
"""Admissions per second over HTTP: clients spread round-robin over replicas send the cheapest
request that is admitted (reserved, run, settled): a text-only chat completion of one token.
Loopback only; stops after --seconds.

    python3 benches/admissions_http.py --bases http://127.0.0.1:18100,http://127.0.0.1:18101 --key KEY
"""
import argparse, http.client, json, threading, time, urllib.parse

ap = argparse.ArgumentParser()
ap.add_argument("--bases", required=True)
ap.add_argument("--key", required=True)
ap.add_argument("--clients", type=int, default=8)
ap.add_argument("--seconds", type=float, default=10)
a = ap.parse_args()
bases = [urllib.parse.urlparse(b) for b in a.bases.split(",")]
assert all(u.hostname in ("127.0.0.1", "localhost", "::1") for u in bases), "loopback only"
body = json.dumps({"model": "auto", "max_tokens": 1, "budget_flops": "1G",
                   "messages": [{"role": "user", "content": "What is shown?"}]})
headers = {"Authorization": f"Bearer {a.key}", "Content-Type": "application/json"}
lat, codes, lock = [], {}, threading.Lock()
deadline = time.perf_counter() + a.seconds

def client(i):
    u = bases[i % len(bases)]
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        c.request("POST", "/v1/chat/completions", body=body, headers=headers)
        r = c.getresponse(); text = r.read()
        dt = time.perf_counter() - t0
        with lock:
            codes[r.status] = codes.get(r.status, 0) + 1
            if r.status == 200:
                lat.append(dt)
            elif codes[r.status] == 1:
                print(f"status {r.status}: {text[:300]!r}")

t0 = time.perf_counter()
ts = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
[t.start() for t in ts]; [t.join() for t in ts]
wall = time.perf_counter() - t0
lat.sort()
q = lambda p: 1e3 * lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0.0
print(json.dumps({"replicas": len(bases), "clients": a.clients, "seconds": round(wall, 2),
                  "admitted": len(lat), "admissions_per_s": round(len(lat) / wall, 1),
                  "p50_ms": round(q(0.5), 2), "p99_ms": round(q(0.99), 2), "codes": codes}))
