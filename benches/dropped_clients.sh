#!/usr/bin/env bash
# Clients that leave mid-request (benches/dropped_clients.py) against one release `vvlm serve`
# with the SmolLM2 demo checkpoint (one worker of 2 threads): afterwards nothing may stay held
# (admission places, queued or running jobs, batch sequences and KV, open reservations in the
# ledger). Video questions about a suite video ride along (uploaded whole, cut mid-body, dropped).
# Extra arguments go to dropped_clients.py (e.g. --seconds 60).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
bash scripts/setup-models >/dev/null
out=target/dropped-clients
mkdir -p $out
[ -f $out/suite/test/videos/test-00000.mp4 ] || target/release/vvlm suite generate --out $out/suite --splits test=1 >/dev/null
admin="admin_$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
source benches/demo_server.sh
serve_demo $out/ledger.db $out/server.log --admin-key "$admin"
trap stop_demo EXIT
echo "$(bash benches/cpu_label.sh), one worker of 2 threads"
python3 benches/dropped_clients.py --base $base --key "$key" --admin-key "$admin" \
  --video $out/suite/test/videos/test-00000.mp4 "$@"
