#!/usr/bin/env bash
# `vvlm fit` (500 restarts x 100 bootstrap resamples, add-interact, 94 points, all cores) side by
# side with the same recipe in Python/scipy (benches/fit_scipy.py, L-BFGS-B with the analytic
# gradient). The full scipy fit takes hours on this machine, so scipy runs B = 2 resamples (1000
# L-BFGS runs) and the ratio is per L-BFGS run; vvlm runs the full fit.
#   pip install scipy numpy; benches/fit_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p vvlm-cli
data=benches/data/sweep.csv
t0=$(date +%s.%N)
target/release/vvlm fit --data "$data" --form add-interact --restarts 500 --bootstrap 100 --seed 0 --json > target/fit-vvlm.json 2>/dev/null
t1=$(date +%s.%N)
python3 benches/fit_scipy.py "$data" --restarts 500 --bootstrap "${SCIPY_BOOTSTRAP:-2}" > target/fit-scipy.json
python3 - "$t0" "$t1" <<'PY'
import json, sys
v = json.load(open("target/fit-vvlm.json")); s = json.load(open("target/fit-scipy.json"))
secs = float(sys.argv[2]) - float(sys.argv[1]); runs = 500 * 100
print(f"vvlm fit : {runs} L-BFGS runs in {secs:.1f} s = {1e3 * secs / runs:.2f} ms/run (train E% {v['e_pct']:.3f}, R2 {v['r2']:.4f})")
print(f"scipy    : {s['runs']} L-BFGS runs in {s['seconds']:.1f} s = {1e3 * s['seconds_per_run']:.2f} ms/run")
print(f"ratio    : vvlm is {s['seconds_per_run'] / (secs / runs):.1f}x faster per run; the full 500x100 fit would take scipy ~{s['seconds_per_run'] * runs / 60:.0f} min vs vvlm {secs:.0f} s")
PY
