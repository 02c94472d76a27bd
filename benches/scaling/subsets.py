"""Cuts a `vvlm eval` sweep into the sets the paper fits and validates on (stdlib only).

    python3 benches/scaling/subsets.py VAL_DIR OUT_DIR SERVED_DATA_SIZE_M

VAL_DIR holds sweep.csv and sweep-<family>.csv (every rung of the ladder). Writes to OUT_DIR:
  all-<fam>.csv     every rung, factors N, T, V and n (data size)
  star-<fam>.csv    the star around the largest centre (largest N, most frames, most tokens per
                    frame), varying one of N, T, V at a time, at every data size
  iso-<fam>.csv     off-star points whose paper FLOPs (with the ladder tower's constants) lie
                    within a factor 1.25 of one of four isoFLOP targets (the paper's 2:5:15:30
                    ratios, the largest at half the sweep's most expensive point)
  served-<fam>.csv  the served rungs only (data size SERVED_DATA_SIZE_M), factors N, T, V: what
                    the shipped planner models are fitted on
  tower.json        the tower's x_M * x_W recovered from theoretical_flops (for `vvlm elasticity`)
where <fam> is `all` (pooled) or a family name.
"""
import csv
import json
import os
import sys

FACTORS = ["lm_params_b", "frames", "tokens_per_frame", "data_size_m"]


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write(path, rows, cols):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] for c in cols])


def main():
    val, out, served = sys.argv[1], sys.argv[2], float(sys.argv[3])
    os.makedirs(out, exist_ok=True)
    files = {"all": os.path.join(val, "sweep.csv")}
    for name in sorted(os.listdir(val)):
        if name.startswith("sweep-") and name.endswith(".csv"):
            files[name[len("sweep-"):-len(".csv")]] = os.path.join(val, name)
    cols = ["model"] + FACTORS + ["family", "items", "score", "theoretical_flops"]
    tower = None
    for fam, path in files.items():
        rows = read(path)
        key = lambda r: tuple(float(r[c]) for c in FACTORS)
        n_max = max(float(r["lm_params_b"]) for r in rows)
        t_max = max(float(r["frames"]) for r in rows)
        v_max = max(float(r["tokens_per_frame"]) for r in rows)
        centre = (n_max, t_max, v_max)

        def on_star(r):
            x = (float(r["lm_params_b"]), float(r["frames"]), float(r["tokens_per_frame"]))
            return sum(a != b for a, b in zip(x, centre)) <= 1

        star = [r for r in rows if on_star(r)]
        top = max(float(r["theoretical_flops"]) for r in rows)
        targets = [top / 2 * k / 30 for k in (2, 5, 15, 30)]
        iso = [
            r
            for r in rows
            if not on_star(r)
            and any(t / 1.25 <= float(r["theoretical_flops"]) <= t * 1.25 for t in targets)
        ]
        write(os.path.join(out, f"all-{fam}.csv"), sorted(rows, key=key), cols)
        write(os.path.join(out, f"star-{fam}.csv"), sorted(star, key=key), cols)
        write(os.path.join(out, f"iso-{fam}.csv"), sorted(iso, key=key), cols)
        srv = [r for r in rows if abs(float(r["data_size_m"]) - served) < 1e-12]
        write(
            os.path.join(out, f"served-{fam}.csv"),
            sorted(srv, key=key),
            [c for c in cols if c != "data_size_m"],
        )
        if fam == "all":
            r = rows[0]
            tower = float(r["theoretical_flops"]) / (2 * float(r["frames"])) - float(
                r["lm_params_b"]
            ) * 1e9 * float(r["tokens_per_frame"])
            info = {
                "vision_flops_per_frame_half": tower,
                "lm_params_b": sorted({float(r["lm_params_b"]) for r in rows}),
                "data_sizes_m": sorted({float(r["data_size_m"]) for r in rows}),
                "centre": centre,
                "iso_targets": targets,
                "rows": len(rows),
                "star": len(star),
                "iso": len(iso),
                "served": len(srv),
            }
            with open(os.path.join(out, "tower.json"), "w") as f:
                json.dump(info, f, indent=1)
            print(json.dumps(info))


if __name__ == "__main__":
    main()
