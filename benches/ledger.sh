#!/usr/bin/env bash
# Admissions per second, SQLite vs PostgreSQL, 1 and 3 replicas:
#  1. through the ledger alone (`vvlm bench ledger`: reserve then settle, one tenant with a
#     quota, 4 clients per replica; a replica is an independent ledger handle);
#  2. over HTTP (benches/admissions_http.py: 8 clients round-robin over R `vvlm serve` replicas,
#     a text-only chat of one token on the suite ladder, the cheapest admitted request: auth,
#     plan, reserve, run, settle, usage).
# PostgreSQL is a throwaway local cluster (scripts/with-postgres) with durability ON (fsync,
# synchronous_commit), as SQLite's synchronous=FULL is, so both pay for the same guarantee.
#   benches/ledger.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VVLM_TEST_POSTGRES_URL:-}" ]; then
  cargo build --quiet -p vvlm-cli
  exec env VVLM_PG_DURABLE=1 bash scripts/with-postgres "$0" "$@"
fi
secs=${1:-5}
vvlm=${CARGO_TARGET_DIR:-target}/debug/vvlm
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
echo "[machine] $(nproc) vCPU, $(lscpu | sed -n 's/^Model name: *//p'), load $(cut -d' ' -f1-3 /proc/loadavg), synced 4 KiB write $(
  dd if=/dev/zero of="$work/dd" bs=4k count=200 oflag=dsync 2>&1 | awk '/copied/ {printf "%.2f ms", $(NF-3) / 200 * 1000}')"
export RUST_LOG=warn
for r in 1 3; do
  "$vvlm" bench ledger --db "$work/ledger-$r.db" --replicas "$r" --seconds "$secs"
done
for r in 1 3; do
  "$vvlm" bench ledger --db "$VVLM_TEST_POSTGRES_URL" --replicas "$r" --seconds "$secs"
done
pgdb() { # a fresh database on the throwaway server
  local name="vvlm_http_$1"
  psql -q "$VVLM_TEST_POSTGRES_URL" -c "CREATE DATABASE $name" >/dev/null
  echo "${VVLM_TEST_POSTGRES_URL%/*}/$name"
}
for backend in sqlite postgres; do
  for r in 1 3; do
    if [ "$backend" = sqlite ]; then db="$work/http-$r.db"; else db=$(pgdb "$r"); fi
    key=$("$vvlm" tenant --db "$db" add bench --quota 1e30 2>/dev/null)
    bases=()
    for i in $(seq 0 $((r - 1))); do
      port=$((18300 + 10 * r + i))
      "$vvlm" serve --bind "127.0.0.1:$port" --db "$db" --ledger-journal "$work/j-$backend-$r-$i" \
        --workers 1 --threads-per-worker 1 >"$work/serve-$backend-$r-$i.log" 2>&1 &
      pids+=($!)
      bases+=("http://127.0.0.1:$port")
    done
    for b in "${bases[@]}"; do until curl -sf "$b/health" >/dev/null; do sleep 0.3; done; done
    printf '%-8s http ' "$backend"
    python3 benches/admissions_http.py --bases "$(IFS=,; echo "${bases[*]}")" --key "$key" --seconds "$secs"
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    pids=()
  done
done
