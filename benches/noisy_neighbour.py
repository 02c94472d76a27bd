#!/usr/bin/env python3
"""A noisy neighbour: tenant `noisy` runs C clients sending captions back to back and resending
at once on 429; tenant `quiet` sends one caption at a time (waiting for each answer, then a pause).
What the quiet tenant gets is the measure: answered share, 429s, latency. Loopback only.

    python3 benches/noisy_neighbour.py --base URL --noisy-key K1 --quiet-key K2 --video v.mp4
"""
import argparse, http.client, json, threading, time, urllib.parse

ap = argparse.ArgumentParser()
ap.add_argument("--base", required=True)
ap.add_argument("--noisy-key", required=True)
ap.add_argument("--quiet-key", required=True)
ap.add_argument("--video", required=True)
ap.add_argument("--clients", type=int, default=48)
ap.add_argument("--seconds", type=float, default=60.0)
ap.add_argument("--pause", type=float, default=0.25, help="seconds between the quiet tenant's requests")
ap.add_argument("--budget", default="1T")
a = ap.parse_args()
u = urllib.parse.urlparse(a.base)
assert u.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
video = open(a.video, "rb").read()
b = "noisyboundary"
form = b"".join([f"--{b}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                 for k, v in [("prompt", "Describe the video."), ("budget", a.budget), ("max_tokens", "8")]])
form += (f"--{b}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\n\r\n".encode()
         + video + f"\r\n--{b}--\r\n".encode())
content_type = f"multipart/form-data; boundary={b}"
stop = time.perf_counter() + a.seconds
lock = threading.Lock()
stats = {who: {"codes": {}, "ok_s": [], "refused_s": []} for who in ("noisy", "quiet")}


def send(c, key):
    t0 = time.perf_counter()
    try:
        c.request("POST", "/v1/videos/caption", body=form,
                  headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})
        r = c.getresponse()
        r.read()
        return r.status, time.perf_counter() - t0, c
    except Exception:
        c.close()
        return "error", time.perf_counter() - t0, http.client.HTTPConnection(u.hostname, u.port, timeout=600)


def record(who, status, seconds):
    with lock:
        s = stats[who]
        s["codes"][str(status)] = s["codes"].get(str(status), 0) + 1
        (s["ok_s"] if status == 200 else s["refused_s"]).append(seconds)


def noisy():
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    while time.perf_counter() < stop:
        status, dt, c = send(c, a.noisy_key)
        record("noisy", status, dt)


def quiet():
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    time.sleep(2.0)  # the noisy clients fill the server first
    while time.perf_counter() < stop:
        status, dt, c = send(c, a.quiet_key)
        record("quiet", status, dt)
        time.sleep(a.pause)


t0 = time.perf_counter()
ts = [threading.Thread(target=noisy) for _ in range(a.clients)] + [threading.Thread(target=quiet)]
[t.start() for t in ts]
[t.join() for t in ts]
wall = time.perf_counter() - t0


def pct(xs, p):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p * len(xs)))], 3) if xs else None


out = {"clients": a.clients, "seconds": round(wall, 1)}
for who, s in stats.items():
    sent = sum(s["codes"].values())
    ok = s["codes"].get("200", 0)
    out[who] = {"sent": sent, "codes": s["codes"], "answered_share": round(ok / sent, 3) if sent else None,
                "answers_per_min": round(60 * ok / wall, 1),
                "p50_ok_s": pct(s["ok_s"], 0.5), "p90_ok_s": pct(s["ok_s"], 0.9), "max_ok_s": pct(s["ok_s"], 1.0)}
print(json.dumps(out))
