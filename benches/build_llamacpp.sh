#!/usr/bin/env bash
# Builds llama.cpp's `llama-batched-bench` (the peer of `vvlm bench batch` and `vvlm bench engine
# --parts smollm2`) and `llama-quantize` (for the F32 requantization) from the source that
# llama-cpp-python's sdist carries (vendor/llama.cpp; PyPI is reachable where GitHub is not),
# for this machine's own instruction set: AVX2 + FMA + F16C, and each of AVX-512 (F, VBMI, VNNI,
# BF16), AVX-VNNI and BMI2 that /proc/cpuinfo lists. Not GGML_NATIVE (it died with an illegal instruction on one of the Xeons). Prints the
# binary's path; the flags used are written beside it (build-flags.txt).
# LLAMA_ISA=avx2 builds AVX2 + FMA + F16C only (into build-avx2/): on the AVX-512 Xeons its
# Q4_1 decode was the figure #16 quoted, so a comparison there runs against both builds.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
dir=target/peers/llama-cpp-python-$VERSION
if [ ! -d "$dir/vendor/llama.cpp" ]; then
  mkdir -p target/peers
  url=$(python3 - "$VERSION" <<'PY'
import json, sys, urllib.parse, urllib.request
v = sys.argv[1]
api = "https://pypi.org/pypi/llama-cpp-python/json"
d = json.load(urllib.request.urlopen(api))
u = [x["url"] for x in d["releases"][v] if x["packagetype"] == "sdist"][0]
print(urllib.parse.urljoin(api, u))
PY
)
  curl -sSfL -o target/peers/llama.tar.gz "$url"
  tar xzf target/peers/llama.tar.gz -C target/peers
  mv "target/peers/llama_cpp_python-$VERSION" "$dir"
fi
command -v cmake >/dev/null || python3 -m pip install --quiet cmake >&2
flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { grep -qw "$1" <<<"$cpu_flags"; }
build=$dir/build
case "${LLAMA_ISA:-native}" in
  native)
    if has avx512f; then flags+=(-DGGML_AVX512=ON); fi
    if has avx512vbmi; then flags+=(-DGGML_AVX512_VBMI=ON); fi
    if has avx512_vnni; then flags+=(-DGGML_AVX512_VNNI=ON); fi
    if has avx512_bf16; then flags+=(-DGGML_AVX512_BF16=ON); fi
    if has avx_vnni; then flags+=(-DGGML_AVX_VNNI=ON); fi
    if has bmi2; then flags+=(-DGGML_BMI2=ON); fi
    ;;
  avx2) build=$dir/build-avx2 ;;
  *) echo "LLAMA_ISA must be native or avx2, got '$LLAMA_ISA'" >&2; exit 2 ;;
esac
cmake -S "$dir/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=ON "${flags[@]}" >/dev/null
cmake --build "$build" --target llama-batched-bench llama-quantize -j "$(nproc)" >/dev/null
echo "${flags[*]}" > "$build/build-flags.txt"
echo "$build/bin/llama-batched-bench"
