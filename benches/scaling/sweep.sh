#!/usr/bin/env bash
# The paper's loop on the suite ladder, step 1: the sweeps.
#   val : every rung (3 LM sizes x 3 data sizes) x the default grid (frames 1..32 x tokens 1..64)
#         on the first VAL_VIDEOS validation videos -> the data the scaling laws are fitted on;
#   test: the served rungs (models/suite-*) on the first TEST_VIDEOS test videos -> the grid the
#         plan is checked against (benches/scaling/check.sh).
# Needs the ladder trained (training/run_ladder.sh) and a release build of vvlm. Resumable: the
# per-item cache lives in $WORK/eval/<split>/cache.
# Usage: benches/scaling/sweep.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-training/work}
VVLM=${VVLM:-target/release/vvlm}
VAL_VIDEOS=${VAL_VIDEOS:-100}
TEST_VIDEOS=${TEST_VIDEOS:-150}
RUNGS=${RUNGS:-"s-n400 m-n400 l-n400 s-n1200 m-n1200 l-n1200 s-n3200 m-n3200 l-n3200"}
RESULTS=benches/results/scaling
export OMP_WAIT_POLICY=PASSIVE PYTHONPATH=training${PYTHONPATH:+:$PYTHONPATH}
step() { echo "[sweep $(date +%H:%M:%S)] $*"; }
mkdir -p "$WORK/all" "$WORK/registry" "$RESULTS/val" "$RESULTS/test"

# Every rung in HF format with a registry entry (the served ones are models/suite-*).
for r in $RUNGS; do
  [ -f "$WORK/rungs/$r/model.safetensors" ] || { step "skip $r (not trained)"; continue; }
  [ -f "$WORK/all/$r/config.json" ] ||
    python3 -m vvlm_train.train export --work "$WORK" --rung "$r" --out "$WORK/all/$r" >/dev/null
  python3 - "$WORK/all/$r" "$r" > "$WORK/registry/$r.toml" <<'PY'
import json, sys
d, name = sys.argv[1:]
cfg = json.load(open(d + "/config.json"))
t, info = cfg["text_config"], cfg["vvlm_training"]
lm = info["lm_non_embedding_params"] + t["vocab_size"] * t["hidden_size"]
print(f'name = "{name}"\npath = "../all/{name}"\nlm_params = {lm}\nmin_frames = 1\nmax_frames = 32\n'
      f'max_side = 8\ndata_size_m = {info["items"] / 1e6}')
PY
done

step "val sweep: $(ls "$WORK/registry" | wc -l) rungs x $VAL_VIDEOS videos"
for r in $RUNGS; do
  [ -f "$WORK/registry/$r.toml" ] || continue
  "$VVLM" eval --items "$WORK/suite/val/items.jsonl" --models "$WORK/registry" --model "$r" \
    --limit $((VAL_VIDEOS * 6)) --out "$WORK/eval/val" --quiet > /dev/null
  step "val $r done"
done
# One sweep file over all rungs (the cache makes this a re-read).
"$VVLM" eval --items "$WORK/suite/val/items.jsonl" --models "$WORK/registry" \
  --limit $((VAL_VIDEOS * 6)) --out "$WORK/eval/val" --quiet > /dev/null
cp "$WORK"/eval/val/sweep*.csv "$WORK"/eval/val/accuracy.svg "$RESULTS/val/"

step "test sweep: served rungs x $TEST_VIDEOS videos"
"$VVLM" eval --items "$WORK/suite/test/items.jsonl" --models models \
  --limit $((TEST_VIDEOS * 6)) --out "$WORK/eval/test" --quiet > /dev/null
cp "$WORK"/eval/test/sweep*.csv "$WORK"/eval/test/accuracy.svg "$RESULTS/test/"
step "done"
