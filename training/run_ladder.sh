#!/usr/bin/env bash
# The whole ladder from nothing: suite -> frames (through vvlm's video path) -> tower -> features
# -> 3 LM sizes x 3 data sizes -> evaluation -> export of the served rungs. Fixed seeds.
# Usage: training/run_ladder.sh [WORK]   (default: training/work; needs a built `vvlm`)
# Measured wall time on the 2-core EPYC (Zen3) development machine: see training/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-training/work}
VVLM=${VVLM:-target/release/vvlm}
TRAIN_VIDEOS=${TRAIN_VIDEOS:-3200}
export OMP_WAIT_POLICY=PASSIVE PYTHONPATH=training${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$WORK"
step() { echo "[ladder $(date +%H:%M:%S)] $*"; }
step "suite"
"$VVLM" suite generate --out "$WORK/suite" --splits "train=$TRAIN_VIDEOS,val=400,test=400"
for s in train val test; do
  [ -f "$WORK/frames/$s/labels.npy" ] || "$VVLM" suite frames "$WORK/suite/$s" --out "$WORK/frames/$s"
done
python3 -m vvlm_train.train tokenizer --work "$WORK"
[ -f "$WORK/tower/tower.safetensors" ] || python3 -m vvlm_train.train tower --work "$WORK"
[ -f "$WORK/frames/test/features.npy" ] || python3 -m vvlm_train.train features --work "$WORK"
# The served rungs (largest n) first, then the smaller data sizes.
for n in "$TRAIN_VIDEOS" 400 1200; do
  for size in l m s; do
    [ -f "$WORK/rungs/$size-n$n/model.safetensors" ] || \
      python3 -m vvlm_train.train lm --work "$WORK" --size "$size" --videos "$n"
  done
done
step "done"
