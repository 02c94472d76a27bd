#!/usr/bin/env bash
# Builds of `vvlm-engine-bench` side by side on this machine, for changes too small to see in one
# run on a noisy VM: ROUNDS interleaved runs of each (`batch --npp 32 --ntg 128 --npl 1,8`, plus
# the build's own arguments), then per build the median and minimum of TPOT p50 at B = 1 and 8
# and their ratio, then in how many rounds each build beat the first one. Each argument is
# LABEL=BINARY or LABEL=BINARY:EXTRA ARGS, e.g.
#   ROUNDS=5 bash benches/batch_ab.sh old=/tmp/bench-old new=target/release/vvlm-engine-bench \
#     old-f16=/tmp/bench-old:--kv-f16 new-f16=target/release/vvlm-engine-bench:--kv-f16
# (an old build: `git checkout OLD -- crates/engine/src && cargo build --release -p
# vvlm-engine-bench && cp target/release/vvlm-engine-bench /tmp/bench-old && git checkout HEAD --
# crates/engine/src`). Raw rows go to target/batch_ab/rows.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: ROUNDS=N $0 LABEL=BINARY[:ARGS] ..." >&2; exit 2; }
ROUNDS=${ROUNDS:-5}
g=models/cache/SmolLM2-135M-Instruct.Q4_1.gguf
out=target/batch_ab
mkdir -p $out
rows=$out/rows.txt
: > $rows
for r in $(seq "$ROUNDS"); do
  for spec in "$@"; do
    label=${spec%%=*}
    rest=${spec#*=}
    bin=${rest%%:*}
    extra=""
    [[ $rest == *:* ]] && extra=${rest#*:}
    # shellcheck disable=SC2086
    RAYON_NUM_THREADS=2 "$bin" batch --gguf $g --npp 32 --ntg 128 --npl 1,8 $extra --json \
      > $out/run.json
    python3 - "$label" >> $rows <<'PY'
import json, sys
rows = {r["batch"]: r for r in json.load(open("target/batch_ab/run.json"))}
print(sys.argv[1], rows[1]["tpot_p50_ms"], rows[8]["tpot_p50_ms"], rows[8]["decode_tok_s"])
PY
  done
done
echo "$(bash benches/cpu_label.sh), 2 threads, $ROUNDS interleaved rounds, SmolLM2-135M 32 + 128 tokens"
python3 - "$@" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open("target/batch_ab/rows.txt")]
print("| build | TPOT p50 at 1, median / min ms | at 8, median / min ms | 8 / 1 (medians) | tok/s at 8, median |")
print("|---|---|---|---|---|")
for spec in sys.argv[1:]:
    label = spec.split("=", 1)[0]
    t1 = [float(r[1]) for r in rows if r[0] == label]
    t8 = [float(r[2]) for r in rows if r[0] == label]
    tok = [float(r[3]) for r in rows if r[0] == label]
    print(f"| {label} | {st.median(t1):.2f} / {min(t1):.2f} | {st.median(t8):.2f} / {min(t8):.2f} "
          f"| {st.median(t8) / st.median(t1):.2f}x | {st.median(tok):.1f} |")
# Round by round against the first build (each round runs every build once, back to back, so a
# pair shares the host's load of that minute): in how many rounds each build was faster.
labels = [spec.split("=", 1)[0] for spec in sys.argv[1:]]
if len(labels) > 1:
    def series(label, col):
        return [float(r[col]) for r in rows if r[0] == label]
    base = labels[0]
    for label in labels[1:]:
        wins = []
        for col, name in ((1, "1"), (2, "8")):
            pairs = list(zip(series(base, col), series(label, col)))
            wins.append(f"at {name} {sum(b < a for a, b in pairs)} of {len(pairs)}")
        print(f"{label} faster than {base} round by round: " + ", ".join(wins))
PY
