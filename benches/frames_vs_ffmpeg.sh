#!/usr/bin/env bash
# Frames sampled per second: `vvlm frames` (probe, seek/decode, RGB, bicubic to 384, normalise)
# against one `ffmpeg -ss T -i V -frames:v 1` per frame (decode, bicubic to 384, raw RGB out),
# for 32 frames of a 10-minute 1080p H.264 video. Side by side, same machine, same run.
#   benches/frames_vs_ffmpeg.sh [FRAMES]
set -euo pipefail
cd "$(dirname "$0")/.."
frames="${1:-32}"
data=target/bench-data
mkdir -p "$data"
video="$data/ten-minutes-1080p.mp4"
if [ ! -f "$video" ]; then
  echo "making $video (10 min, 1080p, H.264, keyframe every 10 s)..." >&2
  ffmpeg -hide_banner -loglevel error -y -f lavfi -i testsrc2=s=1920x1080:r=25:d=600 \
    -c:v libx264 -preset ultrafast -g 250 -pix_fmt yuv420p "$video"
fi
cargo build --quiet --release -p vvlm-cli
bin=target/release/vvlm
duration=$(ffprobe -v error -show_entries format=duration -of csv=p=0 "$video")
best_vvlm=999999; best_ff=999999
for run in 1 2 3; do
  t0=$(date +%s.%N)
  "$bin" frames "$video" --frames "$frames" --max-bytes 100000000000 --json > "$data/vvlm-frames.json"
  t1=$(date +%s.%N)
  for i in $(seq 0 $((frames - 1))); do
    ts=$(python3 -c "print(($i + 0.5) * $duration / $frames)")
    ffmpeg -hide_banner -loglevel error -y -ss "$ts" -i "$video" -frames:v 1 -vf scale=384:384:flags=bicubic \
      -f rawvideo -pix_fmt rgb24 "$data/ff.raw"
  done
  t2=$(date +%s.%N)
  v=$(python3 -c "print($t1 - $t0)"); f=$(python3 -c "print($t2 - $t1)")
  best_vvlm=$(python3 -c "print(min($best_vvlm, $v))"); best_ff=$(python3 -c "print(min($best_ff, $f))")
done
python3 - "$best_vvlm" "$best_ff" "$frames" "$data/vvlm-frames.json" <<'PY'
import json, sys
v, f, n = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
d = json.load(open(sys.argv[4]))
print(f"{n} frames of a {d['probe']['duration_s']:.0f} s {d['probe']['width']}x{d['probe']['height']} {d['probe']['codec']} video (best of 3):")
print(f"  vvlm frames : {v:6.2f} s  {n / v:6.2f} frames/s  ({d['decoded_frames']} frames decoded, {'seeking' if d['seeked'] else 'sequential'})")
print(f"  ffmpeg -ss  : {f:6.2f} s  {n / f:6.2f} frames/s  (one process per frame)")
print(f"  ratio       : vvlm is {f / v:.2f}x the speed of the ffmpeg CLI")
PY
