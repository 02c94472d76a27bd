#!/usr/bin/env bash
# Ten questions about one suite video with the video cache off and on (one `vvlm serve` each,
# the shipped suite ladder and configuration, 2 threads): latency and measured FLOPs per
# question, first (cold) vs the nine follow-ups. Also at a pinned rich configuration
# (suite-l, 32 frames, 64 tokens per frame), where vision is most of the cost.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
video=crates/server/console/samples/suite-00001.mp4
out=target/video-cache
mkdir -p $out
run() { # label cache_bytes extra-args...
  local label=$1 bytes=$2; shift 2
  local db=$out/$label.db port=$((20000 + RANDOM % 20000))
  rm -f "$db"
  local key
  key=$(target/release/vvlm tenant --db "$db" add bench --per-request-max 1P 2>/dev/null)
  target/release/vvlm serve --db "$db" --bind 127.0.0.1:$port \
    --cache-max-bytes "$bytes" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 200); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 0.2; done
  python3 benches/video_cache.py http://127.0.0.1:$port "$key" $video --label "$label" "$@" >> $out/results.jsonl
  kill $pid; wait $pid 2>/dev/null || true
}
rm -f $out/results.jsonl
run planned-off 0
run planned-on 536870912
run rich-off 0 --model suite-l --frames 32 --tpf 64 --budget 1T
run rich-on 536870912 --model suite-l --frames 32 --tpf 64 --budget 1T
# The ten questions as one conversation (each turn resends the earlier ones and their answers).
run chat-off 0 --model suite-l --frames 32 --tpf 64 --budget 1T --conversation
run chat-on 536870912 --model suite-l --frames 32 --tpf 64 --budget 1T --conversation
python3 - <<'PY'
import json
print("| run | cache | question 1 ms | questions 2-10 mean ms | question 1 FLOPs | questions 2-10 mean FLOPs | total FLOPs | plan (q1 -> q2) | prompt / cached tokens, q10 |")
print("|---|---|---|---|---|---|---|---|---|")
for line in open("target/video-cache/results.jsonl"):
    d = json.loads(line)
    r = d["rows"]
    rest = r[1:]
    g = lambda x: f"{x / 1e6:.1f}M"
    print(f"| {d['label'].split('-')[0]} | {d['label'].split('-')[1]} | {r[0]['ms']:.0f} | {sum(x['ms'] for x in rest) / len(rest):.0f} | "
          f"{g(r[0]['measured'])} | {g(sum(x['measured'] for x in rest) / len(rest))} | {g(sum(x['measured'] for x in r))} | {r[0]['plan']} -> {r[1]['plan']} | "
          f"{r[-1]['prompt_tokens']} / {r[-1]['cached_tokens']} |")
PY
