#!/usr/bin/env python3
"""Line-for-line NumPy emulations of kernels/flash_attention.cu and kernels/decode_attention.cu,
to check their index arithmetic without a GPU: tiles, masks, online softmax, the merge of
partial results, and (flash) the fragments of `mma.sync.m16n8k16` as the 32 lanes hold them.
`mma` below rebuilds A (16x16), B (16x8) and C (16x8) from the lanes' registers by the PTX ISA's
layouts (lane = 4 * group + t; A a0..a3 = (group, 2t), (group+8, 2t), (group, 2t+8),
(group+8, 2t+8), pairs; B b0, b1 = (k 2t, n group), (k 2t+8, n group), pairs; C c0..c3 =
(group, 2t), (group, 2t+1), (group+8, 2t), (group+8, 2t+1)), multiplies, and scatters D back.
Values stay f64 (no bf16 rounding): what is checked is where every element goes.

    python3 kernels/emulate.py                   # exit 1 if any shape differs from plain attention
    python3 kernels/emulate.py --rounding bf16   # the parity tests' shapes with bf16's rounding
                                                 # (f16 too): the errors their tolerances bound

A transliteration, not the kernels: a change to a kernel needs the same change here.
"""
import sys
import numpy as np

# The element type's rounding where the kernels round (P before P.V in flash, every output):
# identity by default (index checks), bf16 or f16 with --rounding (tolerance checks).
ROUND = lambda x: x


def round_to(dtype):
    def bf16(x):
        b = np.asarray(x, dtype=np.float32).view(np.uint32)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000  # nearest, ties to even
        return b.view(np.float32).astype(np.float64)
    def f16(x):
        return np.asarray(x, dtype=np.float16).astype(np.float64)
    return {"bf16": bf16, "f16": f16}[dtype]


# ---- kernels/flash_attention.cu ----
BM = BN = 64

def mma(c, a, b):
    # c[lane] = [4 floats], a[lane] = [4 pairs], b[lane] = [2 pairs]
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for reg, (r, cc) in enumerate([(g, 2*t), (g+8, 2*t), (g, 2*t+8), (g+8, 2*t+8)]):
            A[r, cc], A[r, cc+1] = a[lane][reg]
        for reg, k in enumerate([2*t, 2*t+8]):
            B[k, g], B[k+1, g] = b[lane][reg]
        C[g, 2*t], C[g, 2*t+1], C[g+8, 2*t], C[g+8, 2*t+1] = c[lane]
    D = A @ B + C
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        c[lane] = [D[g, 2*t], D[g, 2*t+1], D[g+8, 2*t], D[g+8, 2*t+1]]

def ldmatrix_x4_trans(tile, addrs):
    """ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lanes 8i..8i+7 give the (row, col) of
    matrix i's rows (8 elements each from there); lane = 4 * group + t receives in r[i] matrix
    i's (row 2t, column group) and (row 2t + 1, column group), the PTX ISA's .trans layout."""
    mats = [np.array([tile[addrs[8*i + j][0], addrs[8*i + j][1]:addrs[8*i + j][1] + 8] for j in range(8)])
            for i in range(4)]
    regs = {}
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        regs[lane] = [(mats[i][2*t, g], mats[i][2*t + 1, g]) for i in range(4)]
    return regs

def load_tile(tile, src, r0, length, d, DP):
    tile[:] = 0
    for r in range(BN):
        for c in range(0, DP, 8):
            if r0 + r < length and c < d:
                tile[r, c:c+8] = src[r0 + r, c:c+8]

def kernel(q, k, v, causal, past, scale, DP):
    """flash_attention<T, DP>: every block (m0, h, b) in turn; its 4 warps one after another
    (they share nothing after the Q fragments are read, so the order does not matter)."""
    B, H, QL, d = q.shape
    KVH, KL = k.shape[1], k.shape[2]
    out = np.full((B, QL, H, d), np.nan)
    sl2 = scale * np.log2(np.e)
    for b in range(B):
        for h in range(H):
            hk = h // (H // KVH)
            nblocks = (QL + BM - 1) // BM
            for bx in range(nblocks):
                qblock = nblocks - 1 - bx if causal else bx  # causal: the longest blocks first
                m0 = qblock * BM
                sk = np.zeros((BN, DP + 8)); sv = np.zeros((BN, DP + 8))
                load_tile(sk, q[b, h], m0, QL, d, DP)
                QA = {}
                for warp in range(4):
                    qa = QA.setdefault(warp, {})
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        r = warp * 16 + g
                        qa[lane] = [[(sk[r, s*16+2*t], sk[r, s*16+2*t+1]), (sk[r+8, s*16+2*t], sk[r+8, s*16+2*t+1]),
                                     (sk[r, s*16+8+2*t], sk[r, s*16+9+2*t]), (sk[r+8, s*16+8+2*t], sk[r+8, s*16+9+2*t])]
                                    for s in range(DP // 16)]
                for warp in range(4):
                    qa = QA[warp]
                    # per-warp state
                    acc = {l: [[0.0]*4 for _ in range(DP // 8)] for l in range(32)}
                    rmax = {l: [-np.inf, -np.inf] for l in range(32)}
                    rsum = {l: [0.0, 0.0] for l in range(32)}
                    qi = {l: [m0 + warp*16 + (l >> 2), m0 + warp*16 + (l >> 2) + 8] for l in range(32)}
                    kv_end = min(KL, past + min(m0 + BM, QL)) if causal else KL
                    for n0 in range(0, kv_end, BN):
                        load_tile(sk, k[b, hk], n0, KL, d, DP)
                        load_tile(sv, v[b, hk], n0, KL, d, DP)
                        s = {l: [[0.0]*4 for _ in range(BN // 8)] for l in range(32)}
                        for ks in range(DP // 16):
                            for j in range(BN // 8):
                                cs = [s[l][j] for l in range(32)]
                                bf = {}
                                for l in range(32):
                                    g, t = l >> 2, l & 3
                                    bf[l] = [(sk[8*j+g, ks*16+2*t], sk[8*j+g, ks*16+2*t+1]), (sk[8*j+g, ks*16+8+2*t], sk[8*j+g, ks*16+9+2*t])]
                                mma(cs, [qa[l][ks] for l in range(32)], bf)
                                for l in range(32): s[l][j] = cs[l]
                        newmax = {}
                        for l in range(32):
                            t = l & 3
                            nm = list(rmax[l])
                            for j in range(BN // 8):
                                for e in range(4):
                                    row = e >> 1
                                    kj = n0 + 8*j + 2*t + (e & 1)
                                    vis = kj < KL and (not causal or kj <= past + qi[l][row])
                                    x = s[l][j][e] * sl2 if vis else -np.inf
                                    s[l][j][e] = x
                                    nm[row] = max(nm[row], x)
                            newmax[l] = nm
                        for l in range(32):  # quad reduction
                            base = l & ~3
                            for row in range(2):
                                m = max(newmax[base + i][row] for i in range(4))
                                alpha = 1.0 if m == -np.inf else 2.0 ** (rmax[l][row] - m)
                                rmax[l][row] = m; rsum[l][row] *= alpha
                                for n in range(DP // 8):
                                    acc[l][n][2*row] *= alpha; acc[l][n][2*row+1] *= alpha
                        for l in range(32):
                            for j in range(BN // 8):
                                for e in range(4):
                                    row = e >> 1
                                    p = 0.0 if rmax[l][row] == -np.inf else 2.0 ** (s[l][j][e] - rmax[l][row])
                                    s[l][j][e] = p; rsum[l][row] += p
                        for kk in range(BN // 16):
                            R = lambda x: float(ROUND(x))  # Mma<T>::pack
                            pa = {l: [(R(s[l][2*kk][0]), R(s[l][2*kk][1])), (R(s[l][2*kk][2]), R(s[l][2*kk][3])),
                                      (R(s[l][2*kk+1][0]), R(s[l][2*kk+1][1])), (R(s[l][2*kk+1][2]), R(s[l][2*kk+1][3]))]
                                  for l in range(32)}
                            for n in range(0, DP // 8, 2):
                                # Lane l addresses row l & 7 of matrix l >> 3: keys 0-7 / 8-15 of the
                                # step (matrix bit 0), column block n / n + 1 (matrix bit 1).
                                addrs = [(16*kk + 8*((l >> 3) & 1) + (l & 7), 8*(n + (l >> 4))) for l in range(32)]
                                regs = ldmatrix_x4_trans(sv, addrs)
                                for half in range(2):
                                    bf = {l: [regs[l][2*half], regs[l][2*half + 1]] for l in range(32)}
                                    cs = [acc[l][n + half] for l in range(32)]
                                    mma(cs, [pa[l] for l in range(32)], bf)
                                    for l in range(32): acc[l][n + half] = cs[l]
                    for l in range(32):
                        g, t = l >> 2, l & 3
                        base = l & ~3
                        for row in range(2):
                            L = sum(rsum[base + i][row] for i in range(4))
                            inv = 1.0 / L if L > 0 else 0.0
                            if qi[l][row] >= QL: continue
                            for n in range(DP // 8):
                                col = 8*n + 2*t
                                if col < d:
                                    out[b, qi[l][row], h, col] = ROUND(acc[l][n][2*row] * inv)
                                    out[b, qi[l][row], h, col+1] = ROUND(acc[l][n][2*row+1] * inv)
    return out


# ---- kernels/decode_attention.cu ----
WARPS, MAX_D, GROUP = 8, 256, 4
PAIRS = MAX_D // 64
def decode_kernel(q, ks, vs, heads, kv_heads, d, scale):
    B = len(ks); out = np.zeros((B, heads, d))
    sl2 = scale * np.log2(np.e)
    for i in range(B):
        for h in range(heads):
            hk = h // (heads // kv_heads)
            K, V = ks[i][hk], vs[i][hk]; L = K.shape[0]
            pm, pl, po = [0]*WARPS, [0]*WARPS, np.zeros((WARPS, MAX_D))
            for warp in range(WARPS):
                m, l = -np.inf, 0.0
                o = np.zeros((32, PAIRS, 2))
                per = (L + WARPS - 1) // WARPS
                j0 = min(L, warp * per); j1 = min(L, j0 + per)
                for j in range(j0, j1, GROUP):
                    n = min(GROUP, j1 - j)
                    # The group's rows as the lanes load them (0 past the warp's range).
                    kv = np.zeros((GROUP, 32, PAIRS, 2)); vv = np.zeros((GROUP, 32, PAIRS, 2))
                    for g in range(GROUP):
                        for lane in range(32):
                            for p in range(PAIRS):
                                c = 64*p + 2*lane
                                if g < n and c < d:
                                    kv[g, lane, p] = K[j + g, c:c+2]; vv[g, lane, p] = V[j + g, c:c+2]
                    parts = np.zeros((GROUP, 32))
                    for g in range(GROUP):
                        for lane in range(32):
                            for p in range(PAIRS):
                                c = 64*p + 2*lane
                                if c < d: parts[g, lane] += q[i, h, c]*kv[g, lane, p, 0] + q[i, h, c+1]*kv[g, lane, p, 1]
                    for g in range(n):
                        s = parts[g].sum() * sl2
                        mn = max(m, s); corr = 2.0 ** (m - mn); w = 2.0 ** (s - mn)
                        l = l*corr + w
                        for lane in range(32):
                            for p in range(PAIRS):
                                c = 64*p + 2*lane
                                if c < d:
                                    o[lane, p, 0] = w*vv[g, lane, p, 0] + o[lane, p, 0]*corr
                                    o[lane, p, 1] = w*vv[g, lane, p, 1] + o[lane, p, 1]*corr
                        m = mn
                pm[warp], pl[warp] = m, l
                for lane in range(32):
                    for p in range(PAIRS):
                        c = 64*p + 2*lane
                        if c < d: po[warp, c], po[warp, c+1] = o[lane, p]
            big = max(pm)
            sc = [0.0 if pm[w] == -np.inf else 2.0 ** (pm[w] - big) for w in range(WARPS)]
            tot = sum(sc[w]*pl[w] for w in range(WARPS))
            for c in range(d):
                out[i, h, c] = ROUND(sum(sc[w]*po[w, c] for w in range(WARPS)) / tot)
    return out


def reference(q, k, v, causal, past, scale):
    """Plain attention: q [B, H, QL, d], k/v [B, KVH, KL, d] -> [B, QL, H, d]."""
    B, H, QL, d = q.shape
    KVH, KL = k.shape[1], k.shape[2]
    out = np.zeros((B, QL, H, d))
    for b in range(B):
        for h in range(H):
            hk = h // (H // KVH)
            s = q[b, h] @ k[b, hk].T * scale
            if causal:
                s[np.arange(KL)[None, :] > past + np.arange(QL)[:, None]] = -np.inf
            p = np.exp(s - s.max(1, keepdims=True))
            out[b, :, h] = (p / p.sum(1, keepdims=True)) @ v[b, hk]
    return out


def tolerances(dtype):
    """The parity tests' shapes and inputs (queries N(0, 0.5), keys and values N(0, 1), all
    rounded to `dtype`) through the kernels with `dtype`'s rounding, against plain attention in
    f64 on the same rounded inputs: the errors cuda_parity.rs bounds (bf16 2e-2, f16 4e-3)."""
    global ROUND
    ROUND = round_to(dtype)
    rng = np.random.default_rng(7)
    worst = 0.0
    for B, H, KVH, QL, past, d, DP, causal in [(1, 2, 2, 16, 0, 64, 64, True), (2, 8, 2, 65, 7, 64, 64, True),
                                               (1, 4, 1, 200, 300, 128, 128, True), (2, 6, 2, 100, 9, 72, 80, True)]:
        KL = QL + past
        q = ROUND(rng.standard_normal((B, H, QL, d)) * 0.5)
        k = ROUND(rng.standard_normal((B, KVH, KL, d)))
        v = ROUND(rng.standard_normal((B, KVH, KL, d)))
        err = np.abs(kernel(q, k, v, causal, past, 0.125, DP) - reference(q, k, v, causal, past, 0.125)).max()
        print(f"{dtype} flash  heads {H}/{KVH} q {QL} past {past} d {d}: max error {err:.2e}")
        worst = max(worst, err)
    for H, KVH, d in [(6, 2, 64), (4, 4, 72), (8, 1, 128)]:
        lens = [1, 5, 130, 700]
        q = ROUND(rng.standard_normal((len(lens), H, d)) * 0.5)
        ks = [ROUND(rng.standard_normal((KVH, n, d))) for n in lens]
        vs = [ROUND(rng.standard_normal((KVH, n, d))) for n in lens]
        got = decode_kernel(q, ks, vs, H, KVH, d, 0.125)
        err = max(np.abs(reference(q[i][None, :, None], ks[i][None], vs[i][None], False, 0, 0.125)[0, 0] - got[i]).max()
                  for i in range(len(lens)))
        print(f"{dtype} decode heads {H}/{KVH} d {d} lengths {lens}: max error {err:.2e}")
        worst = max(worst, err)
    print(f"{dtype}: worst {worst:.2e}")


def main():
    rng = np.random.default_rng(0)
    worst = 0.0
    # (B, heads, kv heads, q rows, kv rows, d, padded d, causal): one and two 64-row blocks,
    # partial tiles, a past, grouped heads, SigLIP's 72 padded to 80, bidirectional.
    for B, H, KVH, QL, KL, d, DP, causal in [(1, 2, 1, 5, 5, 64, 64, True), (1, 2, 2, 70, 77, 72, 80, True),
                                             (2, 4, 2, 3, 130, 32, 32, False), (1, 1, 1, 65, 65, 128, 128, True),
                                             (1, 2, 1, 16, 200, 64, 64, True)]:
        q = rng.standard_normal((B, H, QL, d))
        k = rng.standard_normal((B, KVH, KL, d))
        v = rng.standard_normal((B, KVH, KL, d))
        got = kernel(q, k, v, causal, KL - QL, 0.125, DP)
        err = np.abs(got - reference(q, k, v, causal, KL - QL, 0.125)).max()
        print(f"flash  B {B} heads {H}/{KVH} q {QL} kv {KL} d {d} (as {DP}) causal {causal}: max error {err:.1e}")
        worst = max(worst, err)
    # (heads, kv heads, d, cache lengths): fewer keys than warps, many, odd lengths.
    for H, KVH, d, lens in [(4, 2, 64, [1, 5, 33]), (2, 1, 72, [200]), (2, 2, 128, [7, 64])]:
        q = rng.standard_normal((len(lens), H, d))
        ks = [rng.standard_normal((KVH, n, d)) for n in lens]
        vs = [rng.standard_normal((KVH, n, d)) for n in lens]
        got = decode_kernel(q, ks, vs, H, KVH, d, 0.125)
        err = max(np.abs(reference(q[i][None, :, None], ks[i][None], vs[i][None], False, 0, 0.125)[0, 0] - got[i]).max()
                  for i in range(len(lens)))
        print(f"decode heads {H}/{KVH} d {d} lengths {lens}: max error {err:.1e}")
        worst = max(worst, err)
    if not worst < 1e-9:
        sys.exit(f"emulation differs from plain attention by {worst}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rounding"]:
        tolerances(sys.argv[2])
    else:
        main()
