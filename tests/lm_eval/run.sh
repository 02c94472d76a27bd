#!/usr/bin/env bash
# lm-eval (EleutherAI's harness 0.4.13 with its API extra, no torch: scripts/setup-lm-eval) against
# a `vvlm serve` with the SmolLM2 demo checkpoint, on the capitals tasks here (four-way multiple
# choice by log-likelihood, and greedy continuation), twice: with lm-eval's default token-id
# requests and the server's own tokenizer (`tokenizer_backend=remote`: /tokenizer_info, /tokenize,
# /detokenize), then as text (`tokenized_requests=False`); 8 prompts a request. Fails unless both
# ways answer every sample alike, accuracy holds (acc >= 0.75, exact_match >= 0.6; measured 0.833
# and 0.708) and no request ran over its reservation. `VVLM=path` uses that binary (scripts/test:
# the test build); otherwise a release build is made.
#   bash tests/lm_eval/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
lm_eval=$(bash scripts/setup-lm-eval)
if [ -z "${VVLM:-}" ]; then
  cargo build --quiet --release -p vvlm-cli
  export VVLM=target/release/vvlm
fi
# The demo checkpoint (scripts/setup-models makes it with a release build; this binary will do).
bash models/fetch-smollm2.sh >/dev/null
if [ ! -f models/cache/demo-smollm2/config.json ] ||
  [ ! -f models/cache/demo-smollm2/vision.safetensors ]; then
  "$VVLM" models make-demo
fi
out=target/lm-eval-run
rm -rf $out && mkdir -p $out
source benches/demo_server.sh
serve_demo $out/ledger.db $out/serve.log
trap 'kill $pid 2>/dev/null || true' EXIT
curl -sf "$base/health" >/dev/null || { echo "[lm-eval] the server is not ready:"; tail -20 $out/serve.log; exit 1; }
for mode in tokens text; do
  args="model=demo-smollm2,base_url=$base/v1/completions,auth_token=$key,tokenizer_backend=remote"
  args="$args,max_retries=1,timeout=300"
  [ $mode = text ] && args="$args,tokenized_requests=False"
  # `-S`: the pinned harness and its dependencies alone (scripts/setup-lm-eval installs them
  # all into $lm_eval), not the machine's site-packages: a global transformers that wants
  # another huggingface-hub made the harness fail at its end, in its environment report.
  OPENAI_API_KEY=$key HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONPATH=$lm_eval \
    python3 -S -m lm_eval --model local-completions --model_args "$args" \
    --tasks vvlm_capitals,vvlm_capitals_gen --include_path tests/lm_eval --batch_size 8 \
    --output_path $out/$mode --log_samples > $out/$mode.log 2>&1 || { tail -40 $out/$mode.log; exit 1; }
  echo "[lm-eval] $mode"; grep '^|' $out/$mode.log
done
over=$(grep -c 'exceed the reservation' $out/serve.log || true)
python3 - "$over" <<'PY'
import glob, json, sys
out = "target/lm-eval-run"
def results(mode):
    [f] = glob.glob(f"{out}/{mode}/*/results_*.json")
    return json.load(open(f))["results"]
def samples(mode, task):
    [f] = glob.glob(f"{out}/{mode}/*/samples_{task}_2*.jsonl")
    return {json.loads(l)["doc_id"]: json.loads(l)["filtered_resps"] for l in open(f)}
failed = []
for mode in ["tokens", "text"]:
    r = results(mode)
    acc, em = r["vvlm_capitals"]["acc,none"], r["vvlm_capitals_gen"]["exact_match,none"]
    print(f"[lm-eval] {mode}: acc {acc:.3f}, exact_match {em:.3f}")
    if acc < 0.75 or em < 0.6:
        failed.append(f"{mode}: acc {acc} (>= 0.75) or exact_match {em} (>= 0.6)")
for task in ["vvlm_capitals", "vvlm_capitals_gen"]:
    a, b = samples("tokens", task), samples("text", task)
    differ = [i for i in a if a[i] != b.get(i)]
    print(f"[lm-eval] {task}: {len(a)} samples, token-id and text requests differ on {len(differ)}")
    if differ or len(a) != 24:
        failed.append(f"{task}: samples {differ} differ")
print(f"[lm-eval] requests over their reservation: {sys.argv[1]}")
if sys.argv[1] != "0":
    failed.append("requests ran over their reservation")
if failed:
    sys.exit("[lm-eval] FAILED: " + "; ".join(failed))
PY
