#!/usr/bin/env bash
# A video joining running streams, through the whole server: benches/video_join.py against one
# release `vvlm serve` on loopback with the SmolLM2 demo checkpoint (its untrained 384 px tower
# of so400m's geometry, 4 layers: ~60 ms a frame on 2 cores), one worker of 2 threads: 4 text
# streams run, then a request with a 16-frame video joins. Extra arguments go to video_join.py.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
bash scripts/setup-models >/dev/null
out=target/video-join
mkdir -p $out
source benches/demo_server.sh
serve_demo $out/bench.db $out/server.log --max-batch 16
trap stop_demo EXIT
echo "$(bash benches/cpu_label.sh), one worker of 2 threads"
python3 benches/video_join.py --base $base --key "$key" --model demo-smollm2 \
  --video crates/server/console/samples/suite-00001.mp4 "$@"
