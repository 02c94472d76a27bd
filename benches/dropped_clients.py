"""Clients that leave: ten threads for a bounded time send chats, streams they drop after a few
bytes, requests they drop before any answer, text completions (several prompts, n = 2, echo
with logprobs), JSON-mode chats and, with `--video`, video questions uploaded whole, cut
mid-body or dropped before the answer, to one `vvlm serve`; then checks that the server is idle
again: no admission place held, no queued or running job, no sequence or KV position in a
batch, and no reservation left open in the ledger (the tenant's reserved FLOPs 0, every
request settled or released). Exits 1 when something stayed held.

    python3 benches/dropped_clients.py --base URL --key KEY --admin-key ADMIN [--seconds 30]
        [--video FILE.mp4]
"""
import argparse
import json
import random
import socket
import sys
import threading
import time
import urllib.request

p = argparse.ArgumentParser()
p.add_argument("--base", required=True)
p.add_argument("--key", required=True)
p.add_argument("--admin-key", required=True)
p.add_argument("--tenant", default="bench")
p.add_argument("--seconds", type=float, default=30)
p.add_argument("--clients", type=int, default=10)
p.add_argument("--video", help="an MP4 to ask about (video requests are left out without it)")
a = p.parse_args()
VIDEO = open(a.video, "rb").read() if a.video else None
host, port = a.base.replace("http://", "").split(":")
stop = time.time() + a.seconds
counts: dict[str, int] = {}
lock = threading.Lock()
QUESTIONS = ["Tell me a story about a fox.", "What is 2+2?", "Name three colours.", "Write a haiku."]


def note(what):
    with lock:
        counts[what] = counts.get(what, 0) + 1


def post(path, body):
    req = urllib.request.Request(a.base + path, data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {a.key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def dropped(body, read_bytes, path="/v1/chat/completions", ctype="application/json", sent=None):
    """Sends a request and closes the socket after `read_bytes` of the answer (0: at once), or
    after `sent` bytes of the body (the rest never sent)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    s = socket.create_connection((host, int(port)))
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {a.key}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    if sent is not None:
        s.sendall(head + data[:sent])
        s.close()
        return
    s.sendall(head + data)
    got = 0
    while got < read_bytes:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += len(chunk)
    s.close()


def video_form(question):
    b = "droppedclients"
    form = (f"--{b}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\n{question}\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"max_tokens\"\r\n\r\n8\r\n"
            f"--{b}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\n"
            f"Content-Type: video/mp4\r\n\r\n").encode() + VIDEO + f"\r\n--{b}--\r\n".encode()
    return f"multipart/form-data; boundary={b}", form


def client(seed):
    rng = random.Random(seed)
    while time.time() < stop:
        messages = [{"role": "user", "content": rng.choice(QUESTIONS)}]
        kind = rng.randrange(7 if VIDEO else 6)
        if kind == 6:
            ctype, form = video_form(rng.choice(QUESTIONS))
            how = rng.randrange(3)
            if how == 0:
                req = urllib.request.Request(a.base + "/v1/videos/qa", data=form, headers={
                    "Authorization": f"Bearer {a.key}", "Content-Type": ctype})
                try:
                    with urllib.request.urlopen(req, timeout=120) as r:
                        r.read()
                        note(f"video {r.status}")
                except urllib.error.HTTPError as e:
                    note(f"video {e.code}")
            elif how == 1:
                dropped(form, 0, "/v1/videos/qa", ctype, sent=rng.randrange(len(form)))
                note("video upload cut")
            else:
                dropped(form, rng.randrange(0, 300), "/v1/videos/qa", ctype)
                note("video dropped")
            continue
        if kind == 0:
            note(f"chat {post('/v1/chat/completions', {'messages': messages, 'max_tokens': rng.randrange(1, 40), 'temperature': rng.choice([0, 0.7])})}")
        elif kind == 1:
            dropped({"messages": messages, "max_tokens": 64, "stream": True}, rng.randrange(0, 600))
            note("stream dropped")
        elif kind == 2:
            dropped({"messages": messages, "max_tokens": 64}, 0)
            note("request dropped")
        elif kind == 3:
            note(f"completions {post('/v1/completions', {'prompt': ['Once upon', 'The cat'], 'max_tokens': 8, 'n': 2, 'temperature': 0.5})}")
        elif kind == 4:
            note(f"echo+logprobs {post('/v1/completions', {'prompt': 'A B C D', 'max_tokens': 3, 'echo': True, 'logprobs': 2})}")
        else:
            note(f"json mode {post('/v1/chat/completions', {'messages': messages, 'max_tokens': 16, 'response_format': {'type': 'json_object'}})}")


threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("sent:", ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))


def idle_state():
    metrics = urllib.request.urlopen(a.base + "/metrics").read().decode()
    gauges = {}
    for line in metrics.splitlines():
        for name in ("vvlm_in_flight", "vvlm_queue_depth", "vvlm_admission_places_held",
                     "vvlm_admission_waiting", "vvlm_batch_sequences", "vvlm_batch_kv_tokens"):
            if line.startswith(name + " "):
                gauges[name] = float(line.split()[-1])
        if line.startswith(f'vvlm_tenant_reserved_flops{{tenant="{a.tenant}"}}'):
            gauges["reserved_flops"] = float(line.split()[-1])
    req = urllib.request.Request(f"{a.base}/admin/tenants/{a.tenant}/requests?limit=1000",
                                 headers={"Authorization": f"Bearer {a.admin_key}"})
    states: dict[str, int] = {}  # of the latest 1000 requests (the gauge above counts all)
    for r in json.loads(urllib.request.urlopen(req).read())["requests"]:
        states[r["state"]] = states.get(r["state"], 0) + 1
    return gauges, states


# Work a dropped client started finishes (or is cancelled) within a few seconds.
deadline = time.time() + 30
while True:
    gauges, states = idle_state()
    held = {k: v for k, v in gauges.items() if v != 0}
    if (not held and not states.get("open")) or time.time() > deadline:
        break
    time.sleep(1)
print("ledger:", ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
print("held after the load:", held or "nothing", f"(open reservations: {states.get('open', 0)})")
sys.exit(1 if held or states.get("open") else 0)
