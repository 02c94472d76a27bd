# Sourced by the serving benchmarks: `serve_demo DB LOG [vvlm serve args...]` starts a release
# `vvlm serve` (`$VVLM`, default target/release/vvlm) on a fresh ledger DB with one tenant, on a
# free loopback port, serving the SmolLM2 demo checkpoint (models/text-demo) with one worker of 2
# threads, and waits until it answers /health. Sets `base` (its URL), `key` (the tenant's key)
# and `pid`; the caller stops it with `stop_demo` (which waits for it to exit, so a script run
# right after does not find the ledger still held).
serve_demo() {
  local db=$1 log=$2
  shift 2
  local vvlm=${VVLM:-target/release/vvlm} port=$((20000 + RANDOM % 20000))
  rm -f "$db" "$db-wal" "$db-shm" "$db.settle-journal"
  if ! key=$("$vvlm" tenant --db "$db" add bench --per-request-max 1P 2>"$log"); then
    echo "serve_demo: could not add the tenant to $db:" >&2
    cat "$log" >&2
    return 1
  fi
  "$vvlm" serve --db "$db" --bind 127.0.0.1:$port --models-dir models/text-demo \
    --workers 1 --threads-per-worker 2 "$@" > "$log" 2>&1 &
  pid=$!
  base=http://127.0.0.1:$port
  for _ in $(seq 300); do curl -sf $base/health >/dev/null && break; sleep 0.2; done
}

# Stops the server serve_demo started and waits for it to exit.
stop_demo() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
