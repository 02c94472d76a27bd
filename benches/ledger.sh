#!/usr/bin/env bash
# Admissions per second through the ledger (reserve + settle, one tenant with a quota), SQLite vs
# PostgreSQL, 1 and 3 replicas (`vvlm bench ledger`). PostgreSQL is a throwaway local cluster
# (scripts/with-postgres) with durability ON here (fsync, synchronous_commit), as SQLite's
# synchronous=FULL is, so the two pay for the same guarantee.
#   benches/ledger.sh [--seconds 5] [--clients 4]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet -p vvlm-cli
vvlm=${CARGO_TARGET_DIR:-target}/debug/vvlm
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
echo "[machine] $(nproc) vCPU, $(lscpu | sed -n 's/^Model name: *//p'), load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in 1 3; do
  "$vvlm" bench ledger --db "$work/ledger-$r.db" --replicas "$r" "$@"
done
VVLM_PG_DURABLE=1 bash scripts/with-postgres bash -c '
  for r in 1 3; do
    "$0" bench ledger --db "$VVLM_TEST_POSTGRES_URL" --replicas "$r" "${@}"
  done' "$vvlm" "$@"
