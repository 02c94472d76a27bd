#!/usr/bin/env bash
# One line naming this machine's processor for a benchmark's header: lscpu's model name (which
# is only "AMD EPYC" on the cloud machines, whatever the generation), the x86 family/model, and
# the vector extensions the kernels dispatch on, e.g.
# "AMD EPYC (family 25 model 17; avx2 fma f16c avx512f avx512_vnni avx512_bf16), 2 vCPU".
set -euo pipefail
name=$(lscpu | sed -n 's/^Model name: *//p')
family=$(sed -n 's/^cpu family\s*: *//p' /proc/cpuinfo | head -1)
model=$(sed -n 's/^model\s*: *//p' /proc/cpuinfo | head -1)
flags=$(grep -m1 '^flags' /proc/cpuinfo)
have=()
for f in avx2 fma f16c avx512f avx512_vnni avx_vnni avx512_bf16 amx_tile; do
  grep -qw "$f" <<<"$flags" && have+=("$f")
done
echo "$name (family $family model $model; ${have[*]}), $(nproc) vCPU"
