// The fused q/k/v projection's rows split into per-head layouts with rotary embeddings applied
// to q and k, in one pass (instead of three strided copies and two RoPE ops):
//   qkv [b, len, H + 2 KV, d] (contiguous)  ->  out [b, H + 2 KV, len, d] (contiguous),
// heads 0..H (q) and H..H+KV (k) rotated at time t by cos/sin [len, d/2] (candle's `rope`: the
// two halves, o1 = x1 c - x2 s, o2 = x1 s + x2 c), heads H+KV.. (v) copied. In f32 arithmetic,
// rounded once to T. A batched decode step passes b = 1 and the batch as the time axis (each
// sequence's row at its own position: cos/sin [B, d/2]).
//
// CPU reference: `vvlm_engine::llama::SplitRope::cpu_fwd` (checked in CI against the copies and
// candle's rope); crates/engine/tests/cuda_parity.rs compares the two.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "dtype.cuh"

template <typename T>
__device__ void split_rope(const T* __restrict__ qkv, const T* __restrict__ cos, const T* __restrict__ sin,
                           T* __restrict__ out, int b, int len, int rotated, int heads, int d) {
    const int half = d / 2;
    const long long total = (long long)b * len * heads * half;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const int p = (int)(idx % half);
        long long r = idx / half;
        const int head = (int)(r % heads);
        r /= heads;
        const int t = (int)(r % len);
        const long long bi = r / len;
        const T* src = qkv + ((bi * len + t) * heads + head) * d;
        T* dst = out + ((bi * heads + head) * len + t) * d;
        const float x1 = load(src + p), x2 = load(src + p + half);
        if (head < rotated) {
            const float c = load(cos + (long long)t * half + p), s = load(sin + (long long)t * half + p);
            store(dst + p, __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
            store(dst + p + half, __fadd_rn(__fmul_rn(x1, s), __fmul_rn(x2, c)));
        } else {
            store(dst + p, x1);
            store(dst + p + half, x2);
        }
    }
}

#define SPLIT_ROPE(SUFFIX, T)                                                                        \
    extern "C" __global__ void split_rope_##SUFFIX(const T* qkv, const T* cos, const T* sin, T* out, \
                                                   int b, int len, int rotated, int heads, int d) {  \
        split_rope(qkv, cos, sin, out, b, len, rotated, heads, d);                                   \
    }

SPLIT_ROPE(f32, float)
SPLIT_ROPE(bf16, __nv_bfloat16)
SPLIT_ROPE(f16, __half)
