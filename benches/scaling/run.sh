#!/usr/bin/env bash
# The paper's loop on the suite ladder, end to end: sweep (val: every rung; test: the served
# rungs) -> fit (Table 2, per-family laws, the shipped planner models, elasticities) -> check
# (plan vs oracle vs naive policies on the test split). Needs the ladder trained
# (training/run_ladder.sh) and `cargo build --release`. Every step is resumable.
# Measured on the 2-core EPYC development machine: sweep ~70 min, fit ~5 min, check ~5 min.
set -euo pipefail
cd "$(dirname "$0")/../.."
benches/scaling/sweep.sh "$@"
benches/scaling/fit.sh
benches/scaling/check.sh "$@"
