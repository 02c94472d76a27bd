#!/usr/bin/env bash
# Seeds for the decode_bytes target, covering the input kinds the hostile-input probe used:
# ordinary containers, HLS playlists and ffconcat scripts naming local files, a stream whose
# resolution changes mid-way, and containers with many streams. Writes fuzz/corpus/decode_bytes/.
set -euo pipefail
cd "$(dirname "$0")"
out=corpus/decode_bytes
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ff() { ffmpeg -hide_banner -loglevel error -y "$@"; }
src="testsrc=s=32x32:r=5:d=1"
ff -f lavfi -i "$src" -c:v libx264 -pix_fmt yuv420p "$out/h264.mp4"
ff -f lavfi -i "$src" -c:v libvpx-vp9 "$out/vp9.webm"
ff -f lavfi -i "$src" -c:v mpeg4 "$out/mpeg4.avi"
ff -f lavfi -i "$src" -c:v libx264 -pix_fmt yuv420p "$out/h264.ts"
# Resolution change mid-stream (64x64 -> 2048x2048), joined MPEG-TS.
ff -f lavfi -i "color=c=red:s=64x64:r=5:d=2" -c:v libx264 -pix_fmt yuv420p "$tmp/a.ts"
ff -f lavfi -i "color=c=blue:s=2048x2048:r=5:d=0.4" -c:v libx264 -pix_fmt yuv420p \
  -output_ts_offset 2 "$tmp/b.ts"
cat "$tmp/a.ts" "$tmp/b.ts" > "$out/grows.ts"
# Many streams.
maps=(); for _ in $(seq 40); do maps+=(-map 0:v); done
ff -f lavfi -i "color=c=green:s=16x16:r=5:d=0.4" "${maps[@]}" -c:v ffv1 "$out/streams-40.mkv"
# Playlists and concat scripts naming files on this machine.
printf '#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n%s\n#EXT-X-ENDLIST\n' "$PWD/$out/h264.mp4" > "$out/playlist.m3u8"
printf '#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n' > "$out/playlist-passwd.m3u8"
printf 'ffconcat version 1.0\nfile %s\n' "$PWD/$out/h264.ts" > "$out/concat.txt"
echo "wrote $(ls "$out" | wc -l) seeds to fuzz/$out"
