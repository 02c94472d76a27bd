#!/usr/bin/env bash
# The paper's loop on the suite ladder, step 2: fit. From the validation sweep
# (benches/results/scaling/val, made by sweep.sh):
#   - Table 2: all four forms, 5-fold CV on every rung (N, T, V, n) and extrapolation (fit on the
#     star around the largest centre, evaluate on isoFLOP points), pooled and per family;
#   - the shipped planner models: add-interact fitted on the served rungs (N, T, V), pooled and
#     one per family -> configs/scaling/suite/;
#   - the elasticities of the frontier with respect to data (the all-rungs add-interact fit).
# Usage: benches/scaling/fit.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
VVLM=${VVLM:-target/release/vvlm}
# 100 restarts x 10 bootstrap resamples per fit (the paper: 500 x 100; ~50x the time on 2 cores).
RESTARTS=${RESTARTS:-100}
BOOTSTRAP=${BOOTSTRAP:-10}
R=${RESULTS:-benches/results/scaling}
S=$R/subsets
F=$R/fits
SERVED_N=${SERVED_N:-0.0024}
SHIP=${SHIP:-configs/scaling/suite}
mkdir -p "$F" "$SHIP"
python3 benches/scaling/subsets.py "$R/val" "$S" "$SERVED_N"
fams=$(ls "$S" | sed -n 's/^all-\(.*\)\.csv$/\1/p')
fit() { "$VVLM" fit --restarts "$RESTARTS" --bootstrap "$BOOTSTRAP" --json "$@" 2>/dev/null; }
for fam in $fams; do
  for form in mult add add-interact-s add-interact; do
    echo "[fit $(date +%H:%M:%S)] $fam $form"
    fit --data "$S/all-$fam.csv" --form "$form" --cv 5 > "$F/cv-$fam-$form.json"
    fit --data "$S/star-$fam.csv" --form "$form" --holdout "$S/iso-$fam.csv" > "$F/ex-$fam-$form.json"
  done
  # The shipped planner model of this family (pooled: `all`).
  name=$fam; [ "$fam" = all ] && name=pooled
  fit --data "$S/served-$fam.csv" --form add-interact --cv 5 \
    --out "$SHIP/$name.json" > "$F/served-$fam.json"
done
# Elasticity of the frontier w.r.t. data: the all-rungs add-interact fit, over the ladder's
# LM sizes, frames 1..32, s 1..8, the tower's own paper-formula constant, budgets spanning the
# sweep, 100 data sizes up to the largest rung's and a step of half that (the paper: 5 of 10 M).
fit --data "$S/all-all.csv" --form add-interact --out "$F/all-add-interact.json" > /dev/null
python3 - "$S/tower.json" > "$F/elasticity-args" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
n = max(t["data_sizes_m"])
lo = 2 * (t["vision_flops_per_frame_half"] + min(t["lm_params_b"]) * 1e9)
hi = 2 * 32 * (t["vision_flops_per_frame_half"] + max(t["lm_params_b"]) * 1e9 * 64)
print(f'--vision-params {t["vision_flops_per_frame_half"]} --vision-features 1 '
      f'--lm-sizes {",".join(str(x) for x in t["lm_params_b"])} --max-frames 32 --max-side 8 '
      f'--budgets {lo}..{hi} --max-data-size {n} --delta {n / 2}')
PY
# shellcheck disable=SC2046
"$VVLM" elasticity --model "$F/all-add-interact.json" $(cat "$F/elasticity-args") --json \
  > "$F/elasticity.json"
python3 benches/scaling/report.py "$R" > "$R/fit.md"
echo "[fit $(date +%H:%M:%S)] wrote $R/fit.md and configs/scaling/suite/"
