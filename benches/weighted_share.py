#!/usr/bin/env python3
"""Shares under contention: two tenants each run C clients sending captions back to back and
resending at once on 429, for D seconds; what each tenant was answered is the measure (with
weights 3 and 1 it should get about three times as many places, so about three times the answers).
Loopback only.

    python3 benches/weighted_share.py --base URL --keys K1,K2 --video v.mp4 --clients 24
"""
import argparse, http.client, json, threading, time, urllib.parse

ap = argparse.ArgumentParser()
ap.add_argument("--base", required=True)
ap.add_argument("--keys", required=True, help="the two tenants' keys, comma-separated")
ap.add_argument("--video", required=True)
ap.add_argument("--clients", type=int, default=24, help="clients per tenant")
ap.add_argument("--seconds", type=float, default=60.0)
ap.add_argument("--budget", default="1T")
a = ap.parse_args()
u = urllib.parse.urlparse(a.base)
assert u.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
keys = a.keys.split(",")
video = open(a.video, "rb").read()
b = "shareboundary"
form = b"".join([f"--{b}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                 for k, v in [("prompt", "Describe the video."), ("budget", a.budget), ("max_tokens", "8")]])
form += (f"--{b}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\n\r\n".encode()
         + video + f"\r\n--{b}--\r\n".encode())
stop = time.perf_counter() + a.seconds
lock = threading.Lock()
stats = [{"codes": {}, "ok_s": []} for _ in keys]


def client(i):
    headers = {"Authorization": f"Bearer {keys[i]}", "Content-Type": f"multipart/form-data; boundary={b}"}
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        try:
            c.request("POST", "/v1/videos/caption", body=form, headers=headers)
            r = c.getresponse()
            r.read()
            status = r.status
        except Exception:
            c.close()
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
            status = "error"
        with lock:
            s = stats[i]
            s["codes"][str(status)] = s["codes"].get(str(status), 0) + 1
            if status == 200:
                s["ok_s"].append(time.perf_counter() - t0)


t0 = time.perf_counter()
ts = [threading.Thread(target=client, args=(i,)) for i in range(len(keys)) for _ in range(a.clients)]
[t.start() for t in ts]
[t.join() for t in ts]
wall = time.perf_counter() - t0
out = {"clients_each": a.clients, "seconds": round(wall, 1), "tenants": []}
for s in stats:
    ok = sorted(s["ok_s"])
    out["tenants"].append({"codes": s["codes"], "answers_per_min": round(60 * len(ok) / wall, 1),
                           "p50_ok_s": round(ok[len(ok) // 2], 3) if ok else None})
per_min = [t["answers_per_min"] for t in out["tenants"]]
out["ratio"] = round(per_min[0] / per_min[1], 2) if per_min[1] else None
print(json.dumps(out))
