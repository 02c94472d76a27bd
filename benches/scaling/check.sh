#!/usr/bin/env bash
# The paper's loop on the suite ladder, step 3: the check that matters. On the test split
# (videos never used for fitting), at budgets spanning the ladder's range, the plan (per-family
# laws and the pooled law, fitted by fit.sh) against the oracle (best measured grid configuration
# within the budget) and the naive policies, all priced exactly as the server prices them.
# Reuses the test grid measured by sweep.sh (its cache); evaluates the planned configurations
# the grid does not hold.
# Usage: benches/scaling/check.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-training/work}
VVLM=${VVLM:-target/release/vvlm}
TEST_VIDEOS=${TEST_VIDEOS:-150}
BUDGETS=${BUDGETS:-1e8,3e8,1e9,3e9,1e10,3e10}
R=benches/results/scaling/check
mkdir -p "$R"
"$VVLM" eval --items "$WORK/suite/test/items.jsonl" --models models \
  --limit $((TEST_VIDEOS * 6)) --out "$WORK/eval/test" --quiet \
  --plan --budget "$BUDGETS" --cost-mode exact \
  --scaling configs/scaling/suite/pooled.json --family-models configs/scaling/suite \
  | tee "$R/output.txt"
cp "$WORK"/eval/test/{plan.csv,check.md,check.svg,sweep.csv} "$R/"
echo "[check] wrote $R"
