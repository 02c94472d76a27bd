#!/usr/bin/env bash
# Exports the served rungs (every LM size at the served data size N) to models/ladder/<name>,
# writes their registry entries (models/<name>.toml) and the parity fixture
# (tests/fixtures/suite-ladder/: a test video, its question, and the training code's logits).
# Usage: training/export_served.sh [WORK]   (after training/run_ladder.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-training/work}
# The served data size: at 1200 steps the 400-video rungs measured best on val and test (the
# 3200-video rungs stayed on the answer-prior plateau for detail and binding; see training/README.md).
N=${SERVED_VIDEOS:-400}
export OMP_WAIT_POLICY=PASSIVE PYTHONPATH=training${PYTHONPATH:+:$PYTHONPATH}
for size in s m l; do
  name="suite-$size"
  out="models/ladder/$name"
  python3 -m vvlm_train.train export --work "$WORK" --rung "$size-n$N" --out "$out"
  python3 - "$out" "$name" "$size" <<'PY'
import json, sys
out, name, size = sys.argv[1:]
cfg = json.load(open(f"{out}/config.json"))
t, info = cfg["text_config"], cfg["vvlm_training"]
lm_params = info["lm_non_embedding_params"] + t["vocab_size"] * t["hidden_size"]
open(f"models/{name}.toml", "w").write(f"""# A rung of the suite ladder (training/): SigLIP-architecture tower (64 px, patch 8, g = 8) +
# projector + Llama ({t['hidden_size']} wide, {t['num_hidden_layers']} layers), trained on the
# procedural video-QA suite ({info['items']} items). Made by training/export_served.sh.
name = "{name}"
path = "ladder/{name}"
lm_params = {lm_params}
min_frames = 1
max_frames = 32
max_side = 8
data_size_m = {info['items'] / 1e6}
caption_prompt = "describe the video ."  # the suite's caption question, as trained
description = "suite ladder, LM size {size} ({lm_params} LM parameters): answers questions about the suite's videos"
""")
PY
done
python3 -m vvlm_train.train golden --work "$WORK" --checkpoint models/ladder/suite-l \
  --item test-00003-temporal --out tests/fixtures/suite-ladder --configs 1:1,4:2,8:8,32:3
