#!/usr/bin/env python3
"""Writes a synthetic sweep laid out like the paper's (star + isoFLOP, Table 6) for fitting
benchmarks: scores from a known add-interact model plus 1% multiplicative noise (seeded).

    python3 benches/make_sweep.py > benches/data/sweep.csv
"""
import math, random

random.seed(1234)
P = dict(alpha_N=12.0, a_N=0.45, alpha_T=30.0, a_T=0.4, alpha_V=25.0, a_V=0.35,
         beta_N=1.5, b_N=-0.3, beta_T=0.8, b_T=0.2, beta_V=0.6, b_V=0.25, d=0.4, xi=3.0, eps=28.0)

def error(N, T, V, n):
    f = P["alpha_N"] * N ** -P["a_N"] + P["alpha_T"] * T ** -P["a_T"] + P["alpha_V"] * V ** -P["a_V"]
    f += (P["beta_N"] * N ** P["b_N"] + P["beta_T"] * T ** P["b_T"] + P["beta_V"] * V ** P["b_V"]) * n ** -P["d"]
    return f + P["xi"] * n ** -P["d"] + P["eps"]

rows = []
for n in (0.25, 0.5, 1.0):  # star sweep around (7.5B, 32, 196)
    for N in (1.0, 2.8, 7.5):
        rows.append((N, 32, 196, n))
    for T in (4, 8, 12, 16, 32):
        rows.append((7.5, T, 196, n))
    for V in (4, 16, 25, 36, 49, 100, 196):
        rows.append((7.5, 32, V, n))
iso = {1.0: [(2,196),(3,9),(3,16),(4,289),(5,169),(6,81),(7,25),(8,625),(11,361),(16,144),(20,49),(22,16),(16,625),(26,256),(32,144),(37,81),(40,49)],
       2.8: [(2,64),(3,4),(3,169),(4,100),(5,64),(6,25),(7,9),(6,324),(11,121),(16,49),(19,25),(20,16),(9,484),(17,196),(22,121),(27,81),(35,36)],
       7.5: [(2,25),(3,1),(2,121),(3,64),(6,9),(7,4),(7,100),(8,81),(15,25),(19,9),(21,4),(16,81),(25,36),(29,25),(38,9)]}
for N, tv in iso.items():
    for T, V in tv:
        rows.append((N, T, V, 2.0))
print("lm_params_b,frames,tokens_per_frame,data_size_m,score")
for N, T, V, n in rows:
    e = error(N, T, V, n) * (1 + 0.01 * random.gauss(0, 1))
    print(f"{N},{T},{V},{n},{100 - e:.4f}")
