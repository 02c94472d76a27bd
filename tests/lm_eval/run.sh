#!/usr/bin/env bash
# lm-eval (EleutherAI's harness, pinned in tests/lm_eval/requirements.txt) against a release
# `vvlm serve` with the SmolLM2 demo checkpoint, on the capitals tasks here (log-likelihood
# multiple choice and greedy generation), twice: with lm-eval's default token-id requests and the
# server's own tokenizer (`tokenizer_backend=remote`: /tokenizer_info, /tokenize, /detokenize),
# then as text (`tokenized_requests=False`); 8 prompts a request. Prints each run's table and
# whether the two agree per sample. Not in CI: it installs ~150 MB from PyPI.
#   bash tests/lm_eval/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${LM_EVAL_VENV:-target/lm-eval-venv}
if [ ! -x "$venv/bin/lm_eval" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tests/lm_eval/requirements.txt
fi
cargo build --quiet --release -p vvlm-cli
bash scripts/setup-models >/dev/null
out=target/lm-eval
rm -rf $out && mkdir -p $out
source benches/demo_server.sh
serve_demo $out/ledger.db $out/serve.log
trap 'kill $pid' EXIT
for mode in tokens text; do
  args="model=demo-smollm2,base_url=$base/v1/completions,auth_token=$key,tokenizer_backend=remote"
  args="$args,max_retries=1,timeout=300"
  [ $mode = text ] && args="$args,tokenized_requests=False"
  OPENAI_API_KEY=$key HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$venv/bin/lm_eval" \
    --model local-completions --model_args "$args" --tasks vvlm_capitals,vvlm_capitals_gen \
    --include_path tests/lm_eval --batch_size 8 --output_path $out/$mode --log_samples \
    > $out/$mode.log 2>&1 || { tail -40 $out/$mode.log; exit 1; }
  echo "== $mode"; grep '^|' $out/$mode.log
done
# What the server charged beyond its reservations (none, if every request was priced right).
echo "requests that ran over their reservation: $(grep -c 'exceed the reservation' $out/serve.log || true)"
"$venv/bin/python" - <<'PY'
import glob, json
def samples(mode, task):
    [f] = glob.glob(f"target/lm-eval/{mode}/*/samples_{task}_2*.jsonl")
    return {json.loads(l)["doc_id"]: json.loads(l) for l in open(f)}
for task in ["vvlm_capitals", "vvlm_capitals_gen"]:
    a, b = samples("tokens", task), samples("text", task)
    same = all(a[i]["filtered_resps"] == b[i]["filtered_resps"] for i in a)
    print(f"{task}: {len(a)} samples, token-id and text requests agree on every one: {same}")
PY
