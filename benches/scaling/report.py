"""Renders the fit results of benches/scaling/fit.sh as markdown (stdlib only).

    python3 benches/scaling/report.py benches/results/scaling > benches/results/scaling/fit.md
"""
import json
import os
import sys

FORMS = ["mult", "add", "add-interact-s", "add-interact"]
PAPER = {  # the paper's Table 2 (CV on star + isoFLOP; extrapolation star -> isoFLOP)
    "mult": ((1.21, 1.62, 0.88), (6.73, 3.55, 0.45)),
    "add-interact": ((0.20, 0.77, 0.98), (0.95, 1.33, 0.92)),
}


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def m(d, key):
    if not d or key not in d:
        return "-", "-", "-"
    x = d[key]
    return f"{x['mse']:.2f}", f"{x['e_pct']:.2f}", f"{x['r2']:.3f}"


def main():
    root = sys.argv[1]
    fits = os.path.join(root, "fits")
    subsets = os.path.join(root, "subsets")
    tower = load(os.path.join(subsets, "tower.json")) or {}
    fams = sorted(
        n[len("cv-"):-len("-add-interact.json")]
        for n in os.listdir(fits)
        if n.startswith("cv-") and n.endswith("-add-interact.json")
        and not n.endswith("-add-interact-s.json")
    )
    fams = ["all"] + [f for f in fams if f != "all"]
    out = []
    p = out.append
    p("### Table 2 on the suite ladder (validation split, pooled over families)\n")
    p(
        f"{tower.get('rows', '?')} sweep points (every rung x the grid); CV = 5-fold on all of "
        f"them; extrapolation = fit on the star around ({tower.get('centre')}) "
        f"({tower.get('star', '?')} points), evaluate on {tower.get('iso', '?')} off-star isoFLOP "
        "points. Metrics on the error 100 - score, in score points.\n"
    )
    p("| form | CV MSE | CV E% | CV R^2 | extrap. MSE | extrap. E% | extrap. R^2 | paper CV (MSE/E%/R^2) | paper extrap. |")
    p("|---|---|---|---|---|---|---|---|---|")
    for form in FORMS:
        cv = load(os.path.join(fits, f"cv-all-{form}.json"))
        ex = load(os.path.join(fits, f"ex-all-{form}.json"))
        pc, pe = PAPER.get(form, (None, None))
        fmt = lambda t: "/".join(str(v) for v in t) if t else "-"
        p(f"| {form} | {' | '.join(m(cv, 'cv'))} | {' | '.join(m(ex, 'holdout'))} | {fmt(pc)} | {fmt(pe)} |")
    p("\n### Per family (add-interact; best form by CV MSE)\n")
    p("| family | points | CV MSE | CV E% | CV R^2 | extrap. MSE | extrap. E% | extrap. R^2 | best form by CV |")
    p("|---|---|---|---|---|---|---|---|---|")
    for fam in fams:
        cv = load(os.path.join(fits, f"cv-{fam}-add-interact.json"))
        ex = load(os.path.join(fits, f"ex-{fam}-add-interact.json"))
        best = min(
            (
                (d["cv"]["mse"], form)
                for form in FORMS
                for d in [load(os.path.join(fits, f"cv-{fam}-{form}.json"))]
                if d and "cv" in d
            ),
            default=(None, "-"),
        )[1]
        n = cv["observations"] if cv else "-"
        p(f"| {fam} | {n} | {' | '.join(m(cv, 'cv'))} | {' | '.join(m(ex, 'holdout'))} | {best} |")
    p("\n### Shipped planner models (`configs/scaling/suite/`, add-interact on the served rungs)\n")
    p("| task | file | points | train MSE | train R^2 | CV MSE | CV E% | CV R^2 |")
    p("|---|---|---|---|---|---|---|---|")
    for fam in fams:
        d = load(os.path.join(fits, f"served-{fam}.json"))
        name = "pooled" if fam == "all" else fam
        tr, cv = m(d, "train"), m(d, "cv")
        n = d["observations"] if d else "-"
        p(f"| {name} | `configs/scaling/suite/{name}.json` | {n} | {tr[0]} | {tr[2]} | {' | '.join(cv)} |")
    e = load(os.path.join(fits, "elasticity.json"))
    if e:
        p("\n### Elasticity of the frontier with respect to data\n")
        p("| | e_N | e_T | e_V | points |")
        p("|---|---|---|---|---|")
        p(f"| this sweep (add-interact, all rungs) | {e['e_N']:+.3f} | {e['e_T']:+.3f} | {e['e_V']:+.3f} | {e['points']} |")
        p("| the paper | -0.22 | +0.17 | +0.79 | 30,000 |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
