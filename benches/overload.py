#!/usr/bin/env python3
"""Overload goodput: C clients each send captions back to back for D seconds and resend at once
on 429 (the worst client behaviour). Goodput = 200 answers per minute. Loopback only.

    python3 benches/overload.py --base http://127.0.0.1:18090 --key KEY --video v.mp4 --clients 16
"""
import argparse, http.client, json, threading, time, urllib.parse

ap = argparse.ArgumentParser()
ap.add_argument("--base", required=True)
ap.add_argument("--key", required=True)
ap.add_argument("--video", required=True)
ap.add_argument("--clients", type=int, default=16)
ap.add_argument("--seconds", type=float, default=60.0)
ap.add_argument("--budget", default="1T")
a = ap.parse_args()
u = urllib.parse.urlparse(a.base)
assert u.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
video = open(a.video, "rb").read()
b = "overloadboundary"
form = b"".join([f"--{b}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                 for k, v in [("prompt", "Describe the video."), ("budget", a.budget), ("max_tokens", "8")]])
form += (f"--{b}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\n\r\n".encode()
         + video + f"\r\n--{b}--\r\n".encode())
headers = {"Authorization": f"Bearer {a.key}", "Content-Type": f"multipart/form-data; boundary={b}"}
codes, lat_ok, lock = {}, [], threading.Lock()
stop = time.perf_counter() + a.seconds

def client():
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        try:
            c.request("POST", "/v1/videos/caption", body=form, headers=headers)
            r = c.getresponse(); r.read()
            status = r.status
        except Exception:
            c.close(); c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
            status = "error"
        with lock:
            codes[status] = codes.get(status, 0) + 1
            if status == 200:
                lat_ok.append(time.perf_counter() - t0)

t0 = time.perf_counter()
ts = [threading.Thread(target=client) for _ in range(a.clients)]
[t.start() for t in ts]; [t.join() for t in ts]
wall = time.perf_counter() - t0
lat_ok.sort()
ok = codes.get(200, 0)
print(json.dumps({"clients": a.clients, "seconds": round(wall, 1), "codes": {str(k): v for k, v in codes.items()},
                  "goodput_per_min": round(60 * ok / wall, 1),
                  "p50_ok_s": round(lat_ok[len(lat_ok) // 2], 3) if lat_ok else None}))
