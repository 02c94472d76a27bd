#!/usr/bin/env bash
# Builds and runs benches/simd_rates.c (the AVX2 multiply instructions' peak rates on one core)
# with the system C compiler, after printing which processor this is.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/simd-rates
cc -O2 -mavx2 -mfma -o target/simd-rates/simd_rates benches/simd_rates.c
bash benches/cpu_label.sh
target/simd-rates/simd_rates
