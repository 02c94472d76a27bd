"""Markdown tables of the ladder's measured accuracy (from `train eval` results in WORK/eval).

    python -m vvlm_train.report --work W [--split test] [--base 16:16] [--largest l-n3200]
"""

import argparse
import json
from pathlib import Path

FAMILIES = ["static", "temporal", "motion", "detail", "compositional", "caption", "overall"]


def cell(r):
    return f"{r['acc']:.1f} ± {r['se']:.1f}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--base", default="16:16")
    p.add_argument("--largest", default="l-n3200")
    a = p.parse_args()
    ev = Path(a.work) / "eval"
    res = {f.name[: -len(f"-{a.split}.json")]: json.loads(f.read_text())
           for f in sorted(ev.glob(f"*-{a.split}.json"))}
    rungs = sorted(res, key=lambda r: ("sml".index(r[0]), int(r.split("-n")[1])))
    print(f"Accuracy (%, ± standard error) on the {a.split} split at x_T:x_V = {a.base}:\n")
    print("| rung | LM params (non-emb.) | train items | " + " | ".join(FAMILIES) + " |")
    print("|" + " --- |" * (3 + len(FAMILIES)))
    for r in rungs:
        if a.base not in res[r]:
            continue
        info = json.loads((Path(a.work) / "rungs" / r / "train.json").read_text())
        row = res[r][a.base]
        print(f"| {r} | {info['lm_non_embedding_params']:,} | {info['items']:,} | "
              + " | ".join(cell(row[f]) if f in row else "" for f in FAMILIES) + " |")
    big = res.get(a.largest, {})
    if big:
        print(f"\n{a.largest} over the grid (x_T:x_V):\n")
        print("| x_T:x_V | " + " | ".join(FAMILIES) + " |")
        print("|" + " --- |" * (1 + len(FAMILIES)))
        key = lambda k: (int(k.split(":")[0]), int(k.split(":")[1]))
        for k in sorted(big, key=key):
            print(f"| {k} | " + " | ".join(cell(big[k][f]) if f in big[k] else "" for f in FAMILIES) + " |")


if __name__ == "__main__":
    main()
